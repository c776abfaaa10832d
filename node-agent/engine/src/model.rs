//! A loaded model: its inference thread and the handle callers submit requests to.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use llama_cpp_2::llama_backend::LlamaBackend;
use steward_artifact::gguf::{GgufFacts, Limits, inspect_file};
use tokio::sync::mpsc;

use crate::config::ModelConfig;
use crate::metrics::{EngineMetrics, ModelMetrics, ModelStatsSnapshot};
use crate::request::{Event, Generation, GenerationRequest, RequestError};
use crate::worker;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{path}: refused by the GGUF pre-parse")]
    Preparse {
        path: String,
        #[source]
        source: steward_artifact::gguf::GgufError,
    },
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("llama.cpp could not load {path}")]
    Model { path: String },
    #[error("llama.cpp could not create a context of {n_ctx} tokens for {model}: {reason}")]
    Context {
        model: String,
        n_ctx: u32,
        reason: String,
    },
    #[error("the inference thread could not start: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the inference thread stopped while loading the model")]
    ThreadDied,
}

/// The process-wide llama.cpp backend (it may be initialised only once).
pub(crate) fn backend() -> Result<&'static LlamaBackend, LoadError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LoadError::Backend(e.clone()))
}

/// True when this build of llama.cpp can offload layers to a GPU.
pub fn gpu_offload_supported() -> bool {
    backend().is_ok_and(|b| b.supports_gpu_offload())
}

/// What was loaded, as the engine resolved it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub facts: GgufFacts,
    pub slots: u32,
    pub context_per_slot: u32,
    pub threads: u32,
    pub gpu_layers: u32,
    /// Where the chat template comes from, or why chat is unavailable.
    pub chat_template: ChatTemplateSource,
    pub load_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatTemplateSource {
    /// `tokenizer.chat_template` in the GGUF.
    Gguf,
    /// The configured template name or text.
    Configured(String),
    /// llama.cpp's built-in template for the architecture (for GGUFs that lack one).
    BuiltIn(&'static str),
    /// No usable template: chat requests are refused with this reason.
    Unavailable(String),
}

pub(crate) enum Command {
    Generate {
        request: Box<GenerationRequest>,
        events: mpsc::UnboundedSender<Event>,
        arrived: Instant,
    },
    Shutdown,
}

/// A loaded model. Clones share it; [`ModelHandle::unload`] (or dropping the last clone)
/// stops the inference thread and frees the model's memory.
#[derive(Clone, Debug)]
pub struct ModelHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    info: ModelInfo,
    commands: std_mpsc::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: ModelMetrics,
}

impl ModelHandle {
    /// Pre-parses the GGUF with Steward's strict reader, then loads it with llama.cpp on a
    /// new inference thread. Blocks until the model is ready (call from a blocking context).
    pub fn load(config: ModelConfig, metrics: &EngineMetrics) -> Result<Self, LoadError> {
        if config.slots == 0 {
            return Err(LoadError::Config("slots must be at least 1".into()));
        }
        if config.context_per_slot < 16 {
            return Err(LoadError::Config(
                "context per slot must be at least 16 tokens".into(),
            ));
        }
        if config.batch_tokens == 0 {
            return Err(LoadError::Config("batch tokens must be at least 1".into()));
        }
        let facts = inspect_file(&config.path, &Limits::default()).map_err(|source| {
            LoadError::Preparse {
                path: config.path.display().to_string(),
                source,
            }
        })?;
        backend()?;
        let model_metrics = metrics.for_model(&config.name, config.slots);
        let (commands, receiver) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("llama-{}", config.name))
            .spawn({
                let metrics = model_metrics.clone();
                move || worker::run(config, facts, metrics, receiver, ready_tx)
            })?;
        match ready_rx.recv() {
            Ok(Ok(info)) => Ok(Self {
                inner: Arc::new(Inner {
                    info,
                    commands,
                    thread: Mutex::new(Some(thread)),
                    metrics: model_metrics,
                }),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(LoadError::ThreadDied)
            }
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    pub fn name(&self) -> &str {
        &self.inner.info.name
    }

    pub fn stats(&self) -> ModelStatsSnapshot {
        self.inner.metrics.snapshot()
    }

    /// Queues a request. Events arrive on the returned receiver; dropping it cancels the
    /// request and frees its slot at the next step.
    pub fn submit(&self, request: GenerationRequest) -> Generation {
        let (events, generation) = mpsc::unbounded_channel();
        let command = Command::Generate {
            request: Box::new(request),
            events,
            arrived: Instant::now(),
        };
        if let Err(std_mpsc::SendError(Command::Generate { events, .. })) =
            self.inner.commands.send(command)
        {
            let _ = events.send(Event::Failed(RequestError::Unloading(self.name().into())));
        }
        generation
    }

    /// Stops the inference thread (requests in flight fail with `Unloading`) and frees the
    /// model and its context. Blocks until the thread has exited.
    pub fn unload(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        let thread = self
            .thread
            .lock()
            .expect("model thread lock poisoned")
            .take();
        let Some(thread) = thread else { return };
        if thread.join().is_err() {
            tracing::error!(model = %self.info.name, "the inference thread panicked");
        }
        crate::memory::return_freed_memory_to_the_os();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}
