//! How a model is loaded and served.

use std::path::PathBuf;

/// How many layers to offload to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// As many as fit in the free VRAM the agent detected; none without a GPU.
    #[default]
    Auto,
    Fixed(u32),
}

impl std::str::FromStr for GpuLayers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        s.parse()
            .map(Self::Fixed)
            .map_err(|_| format!("gpu layers must be `auto` or a number of layers, not `{s}`"))
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The name clients use (`model` in the OpenAI API).
    pub name: String,
    pub path: PathBuf,
    /// Requests generated at once (continuous batching across this many sequences).
    pub slots: u32,
    /// Context tokens available to each request (prompt and completion together). The KV
    /// cache holds `slots × context_per_slot` tokens.
    pub context_per_slot: u32,
    /// One KV buffer shared by all slots instead of one stream of `context_per_slot` per
    /// slot. Off by default: with a fixed context per slot, separate streams give each slot
    /// the same room, and attention then covers only the slot's own tokens instead of every
    /// slot's (measured 10–20% more aggregate throughput at 4–8 streams; docs/BENCHMARKS.md).
    pub kv_unified: bool,
    /// CPU threads for generation and prompt processing; by default every core.
    pub threads: Option<u32>,
    /// Most tokens decoded in one llama.cpp call (prompt chunks of several requests share it).
    pub batch_tokens: u32,
    pub gpu_layers: GpuLayers,
    /// Free VRAM (bytes) on the GPU the agent detected, for [`GpuLayers::Auto`].
    pub free_vram_bytes: Option<u64>,
    /// A llama.cpp built-in template name (`chatml`, `gemma`, `llama3`, …) or template text,
    /// used instead of the GGUF's `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl ModelConfig {
    /// A configuration with llama.cpp-like defaults: 4 slots of 4096 tokens.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            slots: 4,
            context_per_slot: 4096,
            kv_unified: false,
            threads: None,
            batch_tokens: 2048,
            gpu_layers: GpuLayers::Auto,
            free_vram_bytes: None,
            chat_template: None,
        }
    }
}
