//! Runs the models the desired state assigns to this node: for each, pull its artifact
//! (resuming, verified), load it and serve it; unload what is no longer assigned; delete
//! and refuse revoked artifacts; keep the cache within its budget.
//!
//! It starts from the desired state the agent persisted, so after a restart without a
//! control plane the node serves from its cache what it last applied (invariant 3).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use steward_engine::{GpuLayers, ModelConfig};
use steward_proto::agent::v1::agent_service_client::AgentServiceClient;
use steward_proto::agent::v1::{AgentTrustPolicy, DesiredState, ModelAssignment};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admission::MemoryBudget;
use crate::artifacts::ArtifactCache;
use crate::backoff::Backoff;
use crate::identity::IdentityStore;
use crate::serving::{Assigned, Serving, Slot};

/// Settings every assigned model is loaded with.
#[derive(Clone, Debug)]
pub struct LoadDefaults {
    pub threads: Option<u32>,
    /// The most memory assigned models may take together (the agent's
    /// `--memory-limit-gib`), by the control plane's estimates; `None`: no limit.
    pub memory_limit_bytes: Option<u64>,
    /// While the node drains, how long requests already running on a model that moves
    /// elsewhere may take to finish before it is unloaded.
    pub drain_grace: Duration,
}

impl Default for LoadDefaults {
    fn default() -> Self {
        Self {
            threads: None,
            memory_limit_bytes: None,
            drain_grace: Duration::from_secs(30),
        }
    }
}

/// One model being pulled, loaded or served.
struct Running {
    assignment: ModelAssignment,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

#[derive(Clone)]
pub struct Assignments {
    serving: Arc<Serving>,
    cache: ArtifactCache,
    identity: Arc<dyn IdentityStore>,
    endpoint: String,
    defaults: LoadDefaults,
    /// Digests the applied desired state assigns: what eviction must keep.
    needed: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl Assignments {
    pub fn new(
        serving: Arc<Serving>,
        cache: ArtifactCache,
        identity: Arc<dyn IdentityStore>,
        endpoint: impl Into<String>,
        defaults: LoadDefaults,
    ) -> Self {
        Self {
            serving,
            cache,
            identity,
            endpoint: endpoint.into(),
            defaults,
            needed: Arc::default(),
        }
    }

    /// Follows the applied desired state until `shutdown`.
    pub async fn run(
        self,
        mut desired: watch::Receiver<DesiredState>,
        shutdown: CancellationToken,
    ) {
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        loop {
            let state = desired.borrow_and_update().clone();
            self.converge(&state, &mut running).await;
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = desired.changed() => if changed.is_err() { break },
            }
        }
        for (_, r) in running {
            r.cancel.cancel();
            let _ = r.task.await;
        }
    }

    async fn converge(&self, state: &DesiredState, running: &mut BTreeMap<String, Running>) {
        self.serving.set_draining(state.drain);
        let revoked: BTreeSet<&str> = state.revoked_digests.iter().map(String::as_str).collect();
        let wanted: BTreeMap<&str, &ModelAssignment> =
            state.models.iter().map(|m| (m.name.as_str(), m)).collect();
        // Stop what is no longer wanted as it is (removed, changed, or revoked).
        let stale: Vec<String> = running
            .iter()
            .filter(|(name, r)| {
                !wanted
                    .get(name.as_str())
                    .is_some_and(|w| same_model(w, &r.assignment))
                    || revoked.contains(r.assignment.digest.as_str())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = running.remove(&name) {
                r.cancel.cancel();
                let _ = r.task.await;
                if state.drain && !revoked.contains(r.assignment.digest.as_str()) {
                    self.finish_in_flight(&name).await;
                }
            }
            self.serving.remove(&name).await;
            tracing::info!(model = %name, "model unassigned; unloaded");
        }
        // Assigned models with a state but no task (e.g. a refused one no longer assigned).
        // Models from the agent's own configuration carry no digest and are left alone.
        for (name, digest) in self.serving.entries() {
            if !digest.is_empty()
                && !running.contains_key(&name)
                && !wanted.contains_key(name.as_str())
            {
                self.serving.remove(&name).await;
            }
        }
        for digest in &revoked {
            self.cache.remove(digest);
        }
        // What eviction must keep, set before any pull starts: a pull makes room in the
        // cache first, and must not delete what this state assigns (a partial it resumes,
        // an artifact another model is about to load).
        *self.needed.lock().unwrap_or_else(|e| e.into_inner()) =
            state.models.iter().map(|m| m.digest.clone()).collect();
        let trust = state.trust.clone().unwrap_or_default();
        // What runs keeps running (it was admitted under the same limit), counted with the
        // control plane's latest estimate; new models are admitted in name order.
        let mut budget = MemoryBudget::new(self.defaults.memory_limit_bytes);
        for (name, r) in running.iter_mut() {
            if let Some(w) = wanted.get(name.as_str()) {
                r.assignment.memory_estimate_bytes = w.memory_estimate_bytes;
            }
            budget.charge(&r.assignment);
        }
        for (name, assignment) in wanted {
            if running.contains_key(name) {
                continue;
            }
            if revoked.contains(assignment.digest.as_str()) {
                self.serving.set_state(
                    name,
                    &Assigned::from(assignment),
                    Slot::Failed("the artifact is revoked; it will not be loaded".into()),
                );
                continue;
            }
            if let Err(reason) = budget.admit(assignment) {
                tracing::warn!(model = %name, digest = %assignment.digest, %reason, "assigned model refused");
                self.serving
                    .set_state(name, &Assigned::from(assignment), Slot::Failed(reason));
                continue;
            }
            let cancel = CancellationToken::new();
            let task = tokio::spawn(self.clone().serve_one(
                assignment.clone(),
                trust.clone(),
                cancel.clone(),
            ));
            running.insert(
                name.to_owned(),
                Running {
                    assignment: assignment.clone(),
                    cancel,
                    task,
                },
            );
        }
        self.evict(0);
    }

    /// Keeps the cache within its budget, with `room_for` more bytes about to be pulled.
    fn evict(&self, room_for: u64) {
        let keep = self
            .needed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for digest in self.cache.evict(&keep, room_for) {
            tracing::info!(%digest, "evicted an unassigned artifact from the cache");
        }
    }

    /// Waits (up to the drain grace period) for the requests running on `name` to finish.
    async fn finish_in_flight(&self, name: &str) {
        let deadline = tokio::time::Instant::now() + self.defaults.drain_grace;
        loop {
            let in_flight = self.serving.in_flight(name);
            if in_flight == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(model = %name, in_flight, "drain grace period over; unloading with requests still running");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pulls (retrying transient failures with backoff), then loads one model.
    async fn serve_one(
        self,
        assignment: ModelAssignment,
        trust: AgentTrustPolicy,
        cancel: CancellationToken,
    ) {
        let name = assignment.name.clone();
        let digest = assignment.digest.clone();
        let assigned = Assigned::from(&assignment);
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let path = loop {
            if let Some(path) = self.cache.cached(&digest) {
                break path;
            }
            self.serving.set_state(
                &name,
                &assigned,
                Slot::Pulling {
                    done: self.cache.partial_len(&digest),
                    total: assignment.size_bytes,
                },
            );
            // Room for the artifact once it is in the cache, so the cache stays within its
            // budget.
            self.evict(assignment.size_bytes);
            let attempt = tokio::select! {
                () = cancel.cancelled() => return,
                result = self.pull(&assignment, &trust) => result,
            };
            match attempt {
                Ok(path) => {
                    // Pulls running side by side may each have made room for themselves only.
                    self.evict(0);
                    break path;
                }
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(model = %name, %digest, error = %steward_telemetry::chain(&e), ?delay, "pull failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    let reason = steward_telemetry::chain(&e).to_string();
                    tracing::error!(model = %name, %digest, error = %reason, "artifact refused; not loading it");
                    self.serving
                        .set_state(&name, &assigned, Slot::Failed(reason));
                    return;
                }
            }
        };
        let config = ModelConfig {
            slots: assignment.slots.max(1),
            context_per_slot: assignment.context_per_slot.max(1),
            threads: self.defaults.threads,
            gpu_layers: u32::try_from(assignment.gpu_layers)
                .map_or(GpuLayers::Auto, GpuLayers::Fixed),
            ..ModelConfig::new(name.clone(), path)
        };
        tokio::select! {
            () = cancel.cancelled() => {}
            _ = self.serving.load(config, &assigned) => {}
        }
    }

    async fn pull(
        &self,
        assignment: &ModelAssignment,
        trust: &AgentTrustPolicy,
    ) -> Result<std::path::PathBuf, crate::artifacts::ArtifactError> {
        let began = std::time::Instant::now();
        let transient =
            |reason: String| crate::artifacts::ArtifactError::Interrupted { at: 0, reason };
        let identity = self
            .identity
            .load()
            .map_err(|e| transient(steward_telemetry::chain(&e).to_string()))?
            .ok_or_else(|| transient("the node is not enrolled".into()))?;
        let channel = identity
            .channel(&self.endpoint, self.cache.pull_windows())
            .await
            .map_err(|e| transient(steward_telemetry::chain(&e).to_string()))?;
        let mut client = AgentServiceClient::new(channel).max_decoding_message_size(4 << 20);
        let (serving, name, assigned) = (
            self.serving.clone(),
            assignment.name.clone(),
            Assigned::from(assignment),
        );
        let progress = move |done: u64, total: u64| {
            let slot = if done >= total {
                Slot::Verifying
            } else {
                Slot::Pulling { done, total }
            };
            serving.set_state(&name, &assigned, slot);
        };
        self.cache
            .pull(&mut client, assignment, trust, &progress, began)
            .await
    }
}

/// Whether a running model is still what `wanted` assigns: everything but the control
/// plane's memory estimate (which a newer control plane may compute differently) counts.
fn same_model(wanted: &ModelAssignment, running: &ModelAssignment) -> bool {
    *wanted
        == ModelAssignment {
            memory_estimate_bytes: wanted.memory_estimate_bytes,
            ..running.clone()
        }
}
