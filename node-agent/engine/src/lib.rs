//! Steward's inference engine: llama.cpp in-process (`llama-cpp-2`) with continuous
//! batching over N slots of a unified KV cache, per-request sampling, cancellation, and
//! the node's OpenAI-compatible API with its metrics.
//!
//! One inference thread per model owns the llama.cpp model and context (the context is not
//! `Sync`); the API talks to it over a channel through a [`ModelHandle`].

pub mod api;
pub mod config;
mod gpu;
mod memory;
pub mod metrics;
mod model;
pub mod request;
mod sampling;
mod text;
pub mod tiny_model;
mod worker;

pub use config::{GpuLayers, ModelConfig};
pub use gpu::layers_to_offload;
pub use model::{ChatTemplateSource, LoadError, ModelHandle, ModelInfo, gpu_offload_supported};
