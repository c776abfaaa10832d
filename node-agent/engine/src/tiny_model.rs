//! A tiny llama-architecture GGUF with random weights that llama.cpp loads in milliseconds.
//! Tests of the engine and the API use it instead of a real model: its output is gibberish,
//! but it is deterministic, it runs the real llama.cpp code paths, and it needs no download.
//!
//! The vocabulary is a SentencePiece ("llama") vocabulary: `<unk>`, `<s>`, `</s>`, the 256
//! `<0xXX>` byte tokens (so any text tokenizes), the ChatML markers and a few hundred word
//! pieces.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use steward_artifact::gguf::writer::GgufWriter;

/// Shape and metadata of a tiny model.
#[derive(Clone, Debug)]
pub struct TinyModel {
    /// Seeds the weights; two seeds give two different models, one seed the same bytes
    /// (within one build of `rand`).
    pub seed: u64,
    pub embedding_length: u32,
    pub feed_forward_length: u32,
    pub block_count: u32,
    pub head_count: u32,
    pub head_count_kv: u32,
    pub context_length: u32,
    /// `tokenizer.chat_template`, or none for a model without one.
    pub chat_template: Option<String>,
}

/// A ChatML template, which llama.cpp's built-in template support recognises.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            seed: 1,
            embedding_length: 256,
            feed_forward_length: 512,
            block_count: 2,
            head_count: 4,
            head_count_kv: 2,
            context_length: 4096,
            chat_template: Some(CHATML_TEMPLATE.to_string()),
        }
    }
}

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "model", "node", "fleet", "signed", "Paris", "France",
    "capital", "steward", "hello", "world", "answer", "question", "token", "batch",
];

/// Token types in `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const BYTE: i32 = 6;

impl TinyModel {
    fn vocab(&self) -> (Vec<String>, Vec<f32>, Vec<i32>) {
        let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
        let mut types = vec![UNKNOWN, CONTROL, CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(BYTE);
        }
        for marker in ["<|im_start|>", "<|im_end|>"] {
            tokens.push(marker.to_string());
            types.push(CONTROL);
        }
        let mut pieces: Vec<String> = Vec::new();
        for c in ('a'..='z').chain('A'..='Z').chain('0'..='9') {
            pieces.push(c.to_string());
            pieces.push(format!("▁{c}"));
        }
        for p in [".", ",", "?", "!", "\n", "▁"] {
            pieces.push(p.to_string());
        }
        for w in WORDS {
            pieces.push(format!("▁{w}"));
        }
        // Scores rank merges: longer pieces first, as SentencePiece does.
        let mut scores = vec![0.0; tokens.len()];
        for p in pieces {
            scores.push(p.chars().count() as f32 - 100.0);
            tokens.push(p);
            types.push(NORMAL);
        }
        (tokens, scores, types)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.writer().to_bytes()
    }

    /// Writes the model to `path`.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        self.writer().write_to(path)
    }

    fn writer(&self) -> GgufWriter {
        let (tokens, scores, types) = self.vocab();
        let n_vocab = tokens.len() as u64;
        let n_embd = u64::from(self.embedding_length);
        let n_ff = u64::from(self.feed_forward_length);
        let head_dim = n_embd / u64::from(self.head_count);
        let n_kv = head_dim * u64::from(self.head_count_kv);
        let mut rng = StdRng::seed_from_u64(self.seed);

        let mut w = GgufWriter::new(3)
            .kv_string("general.architecture", "llama")
            .kv_string("general.name", "steward tiny test model")
            .kv_u32("llama.context_length", self.context_length)
            .kv_u32("llama.embedding_length", self.embedding_length)
            .kv_u32("llama.block_count", self.block_count)
            .kv_u32("llama.feed_forward_length", self.feed_forward_length)
            .kv_u32("llama.attention.head_count", self.head_count)
            .kv_u32("llama.attention.head_count_kv", self.head_count_kv)
            .kv_u32("llama.rope.dimension_count", head_dim as u32)
            .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .kv_string("tokenizer.ggml.model", "llama")
            .kv_string_array("tokenizer.ggml.tokens", &tokens)
            .kv_f32_array("tokenizer.ggml.scores", &scores)
            .kv_i32_array("tokenizer.ggml.token_type", &types)
            .kv_u32("tokenizer.ggml.unknown_token_id", 0)
            .kv_u32("tokenizer.ggml.bos_token_id", 1)
            .kv_u32("tokenizer.ggml.eos_token_id", 2)
            .kv_bool("tokenizer.ggml.add_bos_token", true);
        if let Some(template) = &self.chat_template {
            w = w.kv_string("tokenizer.chat_template", template);
        }
        let mut matrix = |rows: u64, cols: u64, scale: f32| -> Vec<f32> {
            (0..rows * cols)
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect()
        };
        w = w
            .tensor_f16(
                "token_embd.weight",
                &[n_embd, n_vocab],
                &matrix(n_embd, n_vocab, 1.0),
            )
            .tensor_f32("output_norm.weight", &[n_embd], &vec![1.0; n_embd as usize])
            .tensor_f16(
                "output.weight",
                &[n_embd, n_vocab],
                &matrix(n_embd, n_vocab, 0.5),
            );
        for b in 0..self.block_count {
            let t = |s: &str| format!("blk.{b}.{s}.weight");
            let s = 1.0 / (n_embd as f32).sqrt();
            w = w
                .tensor_f32(&t("attn_norm"), &[n_embd], &vec![1.0; n_embd as usize])
                .tensor_f16(&t("attn_q"), &[n_embd, n_embd], &matrix(n_embd, n_embd, s))
                .tensor_f16(&t("attn_k"), &[n_embd, n_kv], &matrix(n_embd, n_kv, s))
                .tensor_f16(&t("attn_v"), &[n_embd, n_kv], &matrix(n_embd, n_kv, s))
                .tensor_f16(
                    &t("attn_output"),
                    &[n_embd, n_embd],
                    &matrix(n_embd, n_embd, s),
                )
                .tensor_f32(&t("ffn_norm"), &[n_embd], &vec![1.0; n_embd as usize])
                .tensor_f16(&t("ffn_gate"), &[n_embd, n_ff], &matrix(n_embd, n_ff, s))
                .tensor_f16(&t("ffn_up"), &[n_embd, n_ff], &matrix(n_embd, n_ff, s))
                .tensor_f16(&t("ffn_down"), &[n_ff, n_embd], &matrix(n_ff, n_embd, s));
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_artifact::gguf::{Limits, inspect};

    #[test]
    fn tiny_model_passes_the_strict_reader_and_is_small() {
        let bytes = TinyModel::default().to_bytes();
        let facts = inspect(&bytes[..], bytes.len() as u64, &Limits::default()).unwrap();
        assert_eq!(facts.architecture, "llama");
        assert_eq!(facts.block_count, Some(2));
        assert!(facts.has_chat_template);
        assert!(bytes.len() < 4 << 20, "{} bytes", bytes.len());
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        let a = TinyModel::default().to_bytes();
        assert_eq!(a, TinyModel::default().to_bytes());
        let b = TinyModel {
            seed: 2,
            ..TinyModel::default()
        }
        .to_bytes();
        assert_ne!(a, b);
    }
}
