//! Inference on the node: loads the configured models into the engine, serves the
//! OpenAI-compatible API and `/metrics`, and reports each model's state and throughput for
//! the session's heartbeats.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use steward_engine::api::{ApiKeys, ApiState, ModelSet};
use steward_engine::metrics::{EngineMetrics, ModelStatsSnapshot};
use steward_engine::{ModelConfig, ModelHandle};
use steward_proto::agent::v1::{
    Inventory, ModelAssignment, ModelServingStats, ModelState, ModelStatus,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct ServingConfig {
    /// Where the OpenAI-compatible API and `/metrics` listen.
    pub listen: SocketAddr,
    /// Keys clients present as `Authorization: Bearer <key>`. When empty, one is generated
    /// and kept in `<data dir>/api-key`.
    pub api_keys: Vec<String>,
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("cannot listen on {addr} for the inference API")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot keep the generated API key at {path}")]
    ApiKeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    ApiKeys(String),
    #[error("model `{name}` could not be loaded: {reason}")]
    Load { name: String, reason: String },
}

/// Reports the models an agent holds, for heartbeats, and hands out a loaded one for the
/// control plane's probes.
pub trait ModelReporter: Send + Sync + std::fmt::Debug {
    fn model_statuses(&self) -> Vec<ModelStatus>;

    /// The model `name` if it is ready and loaded from `digest`; otherwise why not.
    fn ready_model(&self, name: &str, digest: &str) -> Result<ModelHandle, String>;
}

/// An agent without inference (the simulator).
#[derive(Debug, Default)]
pub struct NoModels;

impl ModelReporter for NoModels {
    fn model_statuses(&self) -> Vec<ModelStatus> {
        Vec::new()
    }

    fn ready_model(&self, name: &str, _digest: &str) -> Result<ModelHandle, String> {
        Err(format!("this agent runs no inference, so not `{name}`"))
    }
}

/// Longest a probe generation may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs one short greedy generation on `model`: the control plane's proof that a model it
/// rolled out answers. Returns what it answered, or why it did not.
pub async fn probe(model: ModelHandle) -> Result<String, String> {
    use steward_engine::request::{Event, GenerationRequest, Prompt, SamplingParams};
    let started = std::time::Instant::now();
    let mut request = GenerationRequest::new(Prompt::Text("The capital of France is".into()));
    request.sampling = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    request.max_tokens = Some(4);
    let mut events = model.submit(request);
    let mut text = String::new();
    let outcome = tokio::time::timeout(PROBE_TIMEOUT, async {
        while let Some(event) = events.recv().await {
            match event {
                Event::Accepted { .. } => {}
                Event::Text(t) => text.push_str(&t),
                Event::Finished { usage, .. } => return Ok(usage),
                Event::Failed(e) => return Err(e.to_string()),
            }
        }
        Err("the inference thread stopped".to_owned())
    })
    .await
    .map_err(|_| format!("no answer within {} s", PROBE_TIMEOUT.as_secs()))?;
    let usage = outcome?;
    Ok(format!(
        "{} prompt + {} generated tokens in {} ms: {text:?}",
        usage.prompt_tokens,
        usage.completion_tokens,
        started.elapsed().as_millis()
    ))
}

/// Where one model is on its way to serving.
#[derive(Clone, Debug)]
pub enum Slot {
    /// Fetching its artifact from the control plane.
    Pulling {
        done: u64,
        total: u64,
    },
    /// Checking the fetched file (digest, signature, GGUF pre-parse).
    Verifying,
    Loading,
    Ready(ModelHandle),
    Failed(String),
}

/// What a deployment assigned a model as; reported with the model's state, so that the
/// control plane can tell which assignment the state belongs to (a rollout of new settings
/// keeps the digest). Empty for a model from the agent's own configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assigned {
    /// sha256 of the GGUF.
    pub digest: String,
    pub slots: u32,
    pub context_per_slot: u32,
    /// -1: chosen from free VRAM.
    pub gpu_layers: i32,
}

impl From<&ModelAssignment> for Assigned {
    fn from(a: &ModelAssignment) -> Self {
        Self {
            digest: a.digest.clone(),
            slots: a.slots,
            context_per_slot: a.context_per_slot,
            gpu_layers: a.gpu_layers,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    assigned: Assigned,
    slot: Slot,
}

/// The serving side of an agent: the engine's models and the API in front of them.
#[derive(Debug)]
pub struct Serving {
    models: ModelSet,
    states: Mutex<Vec<Entry>>,
    metrics: EngineMetrics,
    local_addr: SocketAddr,
    /// Models loading now (the API's `/healthz` answers 503 while any is).
    loading: Arc<AtomicUsize>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    free_vram: Option<u64>,
    /// Cancelled once the API's listener is closed.
    api_closed: CancellationToken,
}

impl Serving {
    /// Binds the API, then loads the models in the background (each is `loading` until it
    /// is ready or failed). The API runs until `shutdown` fires.
    pub async fn start(
        config: ServingConfig,
        data_dir: &Path,
        inventory: &Inventory,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, ServingError> {
        let keys = if config.api_keys.is_empty() {
            vec![generated_api_key(data_dir)?]
        } else {
            config.api_keys.clone()
        };
        let keys = ApiKeys::new(keys).map_err(ServingError::ApiKeys)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServingError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServingError::Listen {
                addr: config.listen,
                source,
            })?;
        let mut registry = Registry::with_prefix("steward");
        let metrics = EngineMetrics::register(&mut registry);
        let loading = Arc::new(AtomicUsize::new(0));
        let serving = Arc::new(Self {
            models: ModelSet::default(),
            states: Mutex::new(
                config
                    .models
                    .iter()
                    .map(|m| Entry {
                        name: m.name.clone(),
                        assigned: Assigned::default(),
                        slot: Slot::Loading,
                    })
                    .collect(),
            ),
            metrics,
            local_addr,
            loading: loading.clone(),
            draining: Arc::default(),
            free_vram: free_vram_bytes(inventory),
            api_closed: CancellationToken::new(),
        });
        let state = ApiState {
            models: serving.models.clone(),
            keys,
            registry: Arc::new(registry),
            loading,
            draining: serving.draining.clone(),
        };
        // Dropped with the listener, also if the server task panics.
        let closed = serving.api_closed.clone().drop_guard();
        tokio::spawn(async move {
            if let Err(e) = steward_engine::api::serve_telling_closed(
                listener,
                state,
                shutdown.cancelled_owned(),
                closed,
            )
            .await
            {
                tracing::error!(error = %e, "the inference API stopped");
            }
        });
        tracing::info!(%local_addr, "inference API listening");
        for model in config.models {
            let serving = serving.clone();
            serving.loading.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = serving.load_counted(model, Assigned::default()).await;
            });
        }
        Ok(serving)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the API has stopped listening (after shutdown): its port can be bound
    /// again, say by the same agent restarted in this process. Requests in flight may
    /// still be finishing.
    pub async fn api_closed(&self) {
        self.api_closed.cancelled().await;
    }

    /// Sets (or adds) a model's state, e.g. while its artifact is pulled.
    pub fn set_state(&self, name: &str, assigned: &Assigned, slot: Slot) {
        let mut states = self.lock();
        match states.iter_mut().find(|e| e.name == name) {
            Some(entry) => {
                entry.assigned = assigned.clone();
                entry.slot = slot;
            }
            None => states.push(Entry {
                name: name.to_owned(),
                assigned: assigned.clone(),
                slot,
            }),
        }
    }

    /// Loads a model and serves it under its name; `assigned` is reported with its state.
    /// On failure the reason is kept as the model's state and returned.
    pub async fn load(&self, config: ModelConfig, assigned: &Assigned) -> Result<(), String> {
        self.loading.fetch_add(1, Ordering::Relaxed);
        self.load_counted(config, assigned.clone()).await
    }

    /// Loads with `loading` already counted up; counts it down however this ends (also when
    /// the caller stops waiting because the model was unassigned mid-load).
    async fn load_counted(
        &self,
        mut config: ModelConfig,
        assigned: Assigned,
    ) -> Result<(), String> {
        let _loading = LoadingGuard(self.loading.clone());
        let name = config.name.clone();
        let digest = &assigned.digest;
        config.free_vram_bytes = config.free_vram_bytes.or(self.free_vram);
        self.set_state(&name, &assigned, Slot::Loading);
        let metrics = self.metrics.clone();
        let result = tokio::task::spawn_blocking(move || ModelHandle::load(config, &metrics)).await;
        match result {
            Ok(Ok(handle)) => {
                if let Some(old) = self.models.insert(handle.clone()) {
                    let _ = tokio::task::spawn_blocking(move || old.unload()).await;
                }
                tracing::info!(model = %name, %digest, "model ready");
                self.set_state(&name, &assigned, Slot::Ready(handle));
                Ok(())
            }
            Ok(Err(e)) => {
                let reason = steward_telemetry::chain(&e).to_string();
                tracing::error!(model = %name, error = %reason, "model failed to load");
                self.set_state(&name, &assigned, Slot::Failed(reason.clone()));
                Err(reason)
            }
            Err(e) => {
                let reason = format!("the loading task failed: {e}");
                self.set_state(&name, &assigned, Slot::Failed(reason.clone()));
                Err(reason)
            }
        }
    }

    /// Stops serving a model and unloads it (memory returns); forgets its state.
    pub async fn remove(&self, name: &str) {
        self.lock().retain(|e| e.name != name);
        if let Some(model) = self.models.remove(name) {
            tracing::info!(model = %name, "unloading model");
            let _ = tokio::task::spawn_blocking(move || model.unload()).await;
        }
    }

    /// While set, new generations are refused (503) and running ones finish.
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) != draining {
            tracing::info!(draining, "inference API drain flag changed");
        }
    }

    /// Requests running or queued on a model now (0 for a model not loaded).
    pub fn in_flight(&self, name: &str) -> u32 {
        self.models.get(name).map_or(0, |m| {
            let s = m.stats();
            s.busy_slots + s.queue_depth
        })
    }

    /// The names and digests of every model with a state.
    pub fn entries(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|e| (e.name.clone(), e.assigned.digest.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no model is loading; returns the first failure, if any.
    pub async fn wait_until_loaded(&self) -> Result<(), ServingError> {
        loop {
            {
                let states = self.lock();
                if let Some(Entry {
                    name,
                    slot: Slot::Failed(reason),
                    ..
                }) = states.iter().find(|e| matches!(e.slot, Slot::Failed(_)))
                {
                    return Err(ServingError::Load {
                        name: name.clone(),
                        reason: reason.clone(),
                    });
                }
                if !states.iter().any(|e| matches!(e.slot, Slot::Loading)) {
                    return Ok(());
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Unloads every model (memory returns to the system).
    pub async fn unload_all(&self) {
        for model in self.models.all() {
            self.models.remove(model.name());
            let _ = tokio::task::spawn_blocking(move || model.unload()).await;
        }
    }
}

impl ModelReporter for Serving {
    fn ready_model(&self, name: &str, digest: &str) -> Result<ModelHandle, String> {
        let states = self.lock();
        let entry = states
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| format!("model `{name}` is not on this node"))?;
        if entry.assigned.digest != digest {
            return Err(format!(
                "model `{name}` runs {}, not {digest}",
                if entry.assigned.digest.is_empty() {
                    "a local file"
                } else {
                    &entry.assigned.digest
                }
            ));
        }
        match &entry.slot {
            Slot::Ready(handle) => Ok(handle.clone()),
            Slot::Failed(reason) => Err(format!("model `{name}` failed: {reason}")),
            _ => Err(format!("model `{name}` is not ready yet")),
        }
    }

    fn model_statuses(&self) -> Vec<ModelStatus> {
        let states = self.lock().clone();
        states
            .into_iter()
            .map(
                |Entry {
                     name,
                     assigned,
                     slot,
                 }| {
                    let (mut bytes_done, mut bytes_total) = (0, 0);
                    let (state, detail, stats) = match slot {
                        Slot::Pulling { done, total } => {
                            (bytes_done, bytes_total) = (done, total);
                            (ModelState::Pulling, String::new(), None)
                        }
                        Slot::Verifying => (ModelState::Verifying, String::new(), None),
                        Slot::Loading => (ModelState::Loading, String::new(), None),
                        Slot::Ready(h) => (
                            ModelState::Ready,
                            String::new(),
                            Some(stats_proto(&h.stats())),
                        ),
                        Slot::Failed(reason) => (ModelState::Failed, reason, None),
                    };
                    ModelStatus {
                        name,
                        digest: assigned.digest,
                        assigned_slots: assigned.slots,
                        assigned_context_per_slot: assigned.context_per_slot,
                        assigned_gpu_layers: assigned.gpu_layers,
                        state: state as i32,
                        detail,
                        stats,
                        bytes_done,
                        bytes_total,
                    }
                },
            )
            .collect()
    }
}

fn stats_proto(s: &ModelStatsSnapshot) -> ModelServingStats {
    ModelServingStats {
        requests_completed: s.requests_completed,
        requests_cancelled: s.requests_cancelled,
        requests_rejected: s.requests_rejected,
        requests_failed: s.requests_failed,
        prompt_tokens: s.prompt_tokens,
        generated_tokens: s.generated_tokens,
        generation_tokens_per_second: s.generation_tokens_per_second,
        prompt_tokens_per_second: s.prompt_tokens_per_second,
        ttft_p50_seconds: s.ttft_p50_seconds,
        ttft_p95_seconds: s.ttft_p95_seconds,
        tpot_p50_seconds: s.tpot_p50_seconds,
        tpot_p95_seconds: s.tpot_p95_seconds,
        queue_depth: s.queue_depth,
        busy_slots: s.busy_slots,
        slots: s.slots,
    }
}

/// Counts one model load down when dropped.
struct LoadingGuard(Arc<AtomicUsize>);

impl Drop for LoadingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Free memory of the GPU with the most of it, when the inventory found one.
fn free_vram_bytes(inventory: &Inventory) -> Option<u64> {
    inventory
        .gpus
        .iter()
        .map(|g| g.memory_total_bytes.saturating_sub(g.memory_used_bytes))
        .max()
}

/// The key in `<data dir>/api-key`, created (random, 0600) on first use.
fn generated_api_key(data_dir: &Path) -> Result<String, ServingError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("api-key");
    let err = |source| ServingError::ApiKeyFile {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(key) if !key.trim().is_empty() => return Ok(key.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(err)?;
    let key = format!("sk-steward-{}", hex::encode(rand::random::<[u8; 24]>()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    file.write_all(key.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(err)?;
    tracing::info!(path = %path.display(), "generated an API key for the inference API");
    Ok(key)
}
