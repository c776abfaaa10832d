//! Per-request token choice: a fast greedy path, or llama.cpp's sampler chain.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::request::SamplingParams;

pub enum Sampler {
    /// Temperature 0 without penalties: the most likely token. Done here on the logits,
    /// which skips building llama.cpp's candidate array over the whole vocabulary.
    Greedy,
    Chain(LlamaSampler),
}

impl Sampler {
    pub fn new(params: &SamplingParams, n_vocab: i32) -> Self {
        if params.is_greedy() {
            return Self::Greedy;
        }
        let mut chain = Vec::new();
        if params.repeat_penalty != 1.0 {
            chain.push(LlamaSampler::penalties(
                n_vocab,
                params.repeat_last_n,
                params.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        if params.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if params.top_k > 0 {
                chain.push(LlamaSampler::top_k(params.top_k));
            }
            if params.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(params.top_p, 1));
            }
            if params.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(params.min_p, 1));
            }
            chain.push(LlamaSampler::temp(params.temperature));
            chain.push(LlamaSampler::dist(params.seed.unwrap_or_else(rand::random)));
        }
        Self::Chain(LlamaSampler::chain_simple(chain))
    }

    /// Feeds the prompt to samplers that remember history (the repeat penalty).
    pub fn accept_prompt(&mut self, prompt: &[LlamaToken]) {
        if let Self::Chain(s) = self {
            s.accept_many(prompt);
        }
    }

    /// Chooses the next token from the logits at batch index `idx`, and remembers it.
    pub fn sample(&mut self, ctx: &LlamaContext<'_>, idx: i32) -> LlamaToken {
        match self {
            Self::Greedy => LlamaToken(argmax(ctx.get_logits_ith(idx)) as i32),
            Self::Chain(s) => s.sample(ctx, idx),
        }
    }
}

/// Index of the largest value; the first one on ties, as llama.cpp's greedy sampler.
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }
}
