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

/// Lanes [`argmax`] keeps side by side: the compiler turns the per-lane comparisons into
/// vector compares and blends (as a scalar loop, one pass over gemma's 262k logits took 0.65%
/// of the agent's decode CPU).
const LANES: usize = 16;

/// Index of the largest value; the first one on ties, as llama.cpp's greedy sampler. NaN
/// never wins (every comparison with it is false).
fn argmax(logits: &[f32]) -> usize {
    let mut best_v = [f32::NEG_INFINITY; LANES];
    let mut best_i = [0u32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let base = (c * LANES) as u32;
        for lane in 0..LANES {
            let v = chunk[lane];
            let better = v > best_v[lane];
            best_v[lane] = if better { v } else { best_v[lane] };
            best_i[lane] = if better {
                base + lane as u32
            } else {
                best_i[lane]
            };
        }
    }
    // Each lane holds its first maximum; across lanes (and the tail) the larger value wins,
    // then the smaller index. NaN compares false both ways and is skipped.
    let tail_start = logits.len() - tail.len();
    let lanes = best_v.iter().zip(best_i).map(|(&v, i)| (v, i as usize));
    let rest = tail.iter().enumerate().map(|(k, &v)| (v, tail_start + k));
    let mut best = (f32::NEG_INFINITY, 0);
    for (v, i) in lanes.chain(rest) {
        if v > best.0 || (v == best.0 && i < best.1) {
            best = (v, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::argmax;

    /// The plain scalar definition the vectorised one must agree with.
    fn first_max(logits: &[f32]) -> usize {
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

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
        // Equal maxima in different lanes and in the tail past the last full chunk.
        let mut v = vec![0.0f32; 100];
        v[37] = 5.0;
        v[21] = 5.0;
        v[99] = 5.0;
        assert_eq!(argmax(&v), 21);
        v[98] = 6.0;
        assert_eq!(argmax(&v), 98);
    }

    #[test]
    fn argmax_agrees_with_the_scalar_definition_on_vocabulary_sized_logits() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in [1, 15, 16, 17, 262_144, 262_147] {
            let logits: Vec<f32> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Few distinct values, so ties are common.
                    (state % 64) as f32 - 40.0
                })
                .collect();
            assert_eq!(argmax(&logits), first_max(&logits), "{len} logits");
        }
    }

    #[test]
    fn argmax_never_picks_nan() {
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN]), 1);
        let mut v = vec![f32::NAN; 40];
        v[33] = -2.0;
        assert_eq!(argmax(&v), 33);
        assert_eq!(argmax(&[f32::NAN; 20]), 0);
    }
}
