//! What a caller asks of a loaded model, and what it gets back.

use tokio::sync::mpsc;

/// The input of a generation: raw text, or chat messages the model's template renders.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Per-request sampling. Defaults are llama.cpp's (`llama-server`'s) defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (always the most likely token).
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: i32,
    pub min_p: f32,
    /// 1.0 disables the repeat penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: i32,
    /// Fixed seed for reproducible sampling; random when absent.
    pub seed: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the parameter.
    pub fn validate(&self) -> Result<(), RequestError> {
        let bad = |name: &'static str, why: &'static str| {
            Err(RequestError::InvalidParameter { name, why })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            return bad("temperature", "must be between 0 and 100");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be greater than 0 and at most 1");
        }
        if self.top_k < 0 {
            return bad("top_k", "must not be negative");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be between 0 and 1");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repeat_penalty", "must be greater than 0");
        }
        if self.repeat_last_n < -1 {
            return bad(
                "repeat_last_n",
                "must be -1 (whole context), 0 (off) or positive",
            );
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repeat_penalty == 1.0
    }
}

#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// Most tokens to generate; by default, up to the end of the slot's context.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Reuse the slot's cached KV for the prompt's longest cached prefix (llama.cpp's
    /// `cache_prompt`). `false` decodes the whole prompt, so the answer does not depend on
    /// what the slot ran before (batch shapes change logits in the last bits) and a prompt
    /// benchmark decodes exactly the tokens it counts.
    pub cache_prompt: bool,
}

impl GenerationRequest {
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            cache_prompt: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens taken from the slot's KV cache instead of decoded.
    pub cached_tokens: u32,
}

/// What the inference thread sends back, in order: `Accepted`, any number of `Text`, then
/// `Finished`; or a single `Failed` (before `Accepted`: a bad request; after: a failure).
#[derive(Debug)]
pub enum Event {
    Accepted { prompt_tokens: u32 },
    Text(String),
    Finished { reason: FinishReason, usage: Usage },
    Failed(RequestError),
}

/// The receiving end of one generation. Dropping it cancels the request and frees its slot.
pub type Generation = mpsc::UnboundedReceiver<Event>;

/// Why a request was refused or failed. `is_client_error` tells a 400 from a 5xx.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt is {prompt_tokens} tokens long, but a request may use at most {context} \
         tokens of context (prompt and completion together)"
    )]
    PromptTooLong { prompt_tokens: u32, context: u32 },
    #[error(
        "{prompt_tokens} prompt tokens plus max_tokens {max_tokens} exceed the context of \
         {context} tokens per request"
    )]
    ContextExceeded {
        prompt_tokens: u32,
        max_tokens: u32,
        context: u32,
    },
    #[error(
        "model `{model}` has no chat template in its GGUF and none is configured; use the \
         completions API or configure a chat template"
    )]
    NoChatTemplate { model: String },
    #[error("the chat template of model `{model}` could not be applied: {reason}")]
    ChatTemplate { model: String, reason: String },
    #[error("invalid `{name}`: {why}")]
    InvalidParameter {
        name: &'static str,
        why: &'static str,
    },
    #[error("model `{0}` is unloading")]
    Unloading(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

impl RequestError {
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::Unloading(_) | Self::Inference(_))
    }
}
