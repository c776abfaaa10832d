//! Deployments: which verified model runs where. Creating, changing or deleting one (and any
//! change to the nodes placement depends on) re-runs placement, stores every node's
//! assigned models with a new desired generation where they changed, and pushes the new
//! desired state to connected agents. Changing a deployment's model starts a rollout
//! ([`crate::rollout`]), which every placement moves on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::json;
use steward_artifact::digest::Sha256Hex;
use steward_artifact::gguf::GgufFacts;
use steward_db::{
    ArtifactRecord, DeploymentRecord, ModelRecord, ModelRef, NodeRecord, NodeState, RolloutPhase,
    ServingSettings, UnixSeconds,
};
use steward_proto::agent::v1::{Inventory, ModelState, ModelStatus, ProbeResult};
use tokio::sync::Mutex;

use crate::fleet::{Actor, Fleet, FleetError, audit, now_unix};
use crate::placement::{Demand, Kept, NodeView, Placement, Selector, Strategy, place};
use crate::probes::Probes;
use crate::registry::{Registry, RegistryError};
use crate::rollout::{self, ReplicaView};
use crate::trust::TrustPolicy;

/// Bounds on what a deployment may ask for.
const MAX_REPLICAS: u32 = 1024;
const MAX_SLOTS: u32 = 256;
const MIN_CONTEXT: u32 = 128;
const MAX_CONTEXT: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request cannot be done in the deployment's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("model {reference} cannot be deployed: {reason}")]
    Refused { reference: String, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("storage failed")]
    Db(#[source] steward_db::DbError),
}

impl From<steward_db::DbError> for DeployError {
    fn from(e: steward_db::DbError) -> Self {
        match e {
            steward_db::DbError::NotFound(what) => Self::NotFound(what),
            steward_db::DbError::Conflict(what) => Self::AlreadyExists(what),
            other => Self::Db(other),
        }
    }
}

/// What an admin asks for; `None` keeps the current value on update.
#[derive(Clone, Debug, Default)]
pub struct DeploymentSpec {
    pub model: Option<String>,
    pub selector: Option<String>,
    pub replicas: Option<u32>,
    pub slots: Option<u32>,
    pub context_per_slot: Option<u32>,
    pub gpu_layers: Option<i32>,
    pub max_unavailable: Option<u32>,
}

/// A deployment with where it runs and how each replica is doing.
#[derive(Clone, Debug)]
pub struct DeploymentStatus {
    pub record: DeploymentRecord,
    pub replicas: Vec<ReplicaStatus>,
    pub missing_replicas: u32,
    /// Why the missing replicas could not be placed (`node: reason`).
    pub unschedulable_reasons: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    pub node_id: String,
    pub node_name: String,
    pub digest: String,
    /// What the agent last reported for this model; `None` before its first report.
    pub model: Option<ModelStatus>,
}

#[derive(Debug)]
pub struct Deployments {
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    strategy: Strategy,
    /// One placement at a time, so two changes cannot interleave their writes.
    placing: Mutex<Placement>,
    /// Wakes [`Deployments::run`] for a placement that nobody waits for.
    wake: tokio::sync::Notify,
    probes: Probes,
    /// How long one rollout step may take to be ready and answer its probe.
    step_timeout: std::time::Duration,
    /// When this control plane started: a step's time runs from then at the earliest, so
    /// the time the control plane was down (and its agents not yet reconnected) does not
    /// count against a step.
    started_at: UnixSeconds,
    /// Deployments the last placement could not place at all, with the reason (revoked or
    /// untrusted model); `None` before the first placement. A new refusal is audited.
    refused: std::sync::Mutex<Option<BTreeMap<String, String>>>,
}

impl Deployments {
    pub fn new(
        fleet: Arc<Fleet>,
        registry: Arc<Registry>,
        strategy: Strategy,
        step_timeout: std::time::Duration,
    ) -> Self {
        Self {
            fleet,
            registry,
            strategy,
            placing: Mutex::new(Placement::default()),
            wake: tokio::sync::Notify::new(),
            probes: Probes::default(),
            step_timeout,
            started_at: now_unix(),
            refused: std::sync::Mutex::new(None),
        }
    }

    /// Records a node's answer to a probe and moves rollouts on.
    pub fn probe_finished(&self, node_id: &str, result: &ProbeResult) {
        self.probes.finished(node_id, result);
        self.trigger();
    }

    /// Asks for a placement soon (a node connected, its inventory changed); many requests
    /// made while one runs coalesce into one more.
    pub fn trigger(&self) {
        self.wake.notify_one();
    }

    /// Places once at start (what changed while the control plane was down), then whenever
    /// triggered and every 30 s (every second while a rollout progresses, to follow what
    /// the agents report), until `shutdown`. A failed placement (e.g. a busy database) is
    /// retried after a second.
    pub async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let next = match self.reconcile().await {
                Ok(Reconciled { rolling: true }) => std::time::Duration::from_secs(1),
                Ok(Reconciled { rolling: false }) => std::time::Duration::from_secs(30),
                Err(e) => {
                    tracing::warn!(error = %steward_telemetry::chain(&e), "placement failed; retrying");
                    std::time::Duration::from_secs(1)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(next) => {}
            }
        }
    }

    /// Places now; when that fails, the background loop retries (the change that asked for
    /// it is already stored, so the caller's request still succeeds).
    pub async fn replace_now(&self) {
        self.replace_now_telling(Tell::Changed).await;
    }

    /// [`Deployments::replace_now`], then sends every connected agent its desired state,
    /// changed or not: a revocation changes no assignment on a node that only caches the
    /// artifact, yet every agent must delete it.
    pub async fn replace_now_telling_every_agent(&self) {
        self.replace_now_telling(Tell::Every).await;
    }

    async fn replace_now_telling(&self, tell: Tell) {
        match self.reconcile_telling(tell).await {
            // The background loop follows a rollout from here (it may be asleep for 30 s).
            Ok(Reconciled { rolling: true }) => self.trigger(),
            Ok(Reconciled { rolling: false }) => {}
            Err(e) => {
                tracing::warn!(error = %steward_telemetry::chain(&e), "placement failed; retrying in the background");
                self.trigger();
            }
        }
    }

    pub async fn create(
        &self,
        actor: &Actor,
        name: &str,
        spec: DeploymentSpec,
    ) -> Result<DeploymentStatus, DeployError> {
        check_deployment_name(name)?;
        let reference = spec
            .model
            .clone()
            .ok_or_else(|| DeployError::InvalidArgument("--model is required".into()))?;
        let model = match self.deployable(&reference).await {
            Ok(model) => model,
            Err(e) => return Err(self.refused(actor, "deployment.create", name, e).await),
        };
        let now = now_unix();
        let record = DeploymentRecord {
            name: name.to_owned(),
            model_name: model.name.clone(),
            model_version: model.version.clone(),
            digest: model.artifact.digest.clone(),
            selector: spec.selector.clone().unwrap_or_else(|| "*".into()),
            replicas: spec.replicas.unwrap_or(1),
            slots: spec.slots.unwrap_or(4),
            context_per_slot: spec.context_per_slot.unwrap_or(4096),
            gpu_layers: spec.gpu_layers.unwrap_or(-1),
            created_at: now,
            updated_at: now,
            created_by: actor.to_string(),
            max_unavailable: spec.max_unavailable.unwrap_or(1),
            rollout: None,
        };
        check_record(&record)?;
        let event = audit(
            actor,
            "deployment.create",
            name,
            "success",
            deployment_details(&record),
        );
        self.fleet.store.insert_deployment(&record, event).await?;
        self.replace_now().await;
        self.status(name).await
    }

    pub async fn update(
        &self,
        actor: &Actor,
        name: &str,
        spec: DeploymentSpec,
    ) -> Result<DeploymentStatus, DeployError> {
        // Read-modify-write under the placement lock, so a rollout step stored meanwhile
        // is not overwritten.
        let placing = self.placing.lock().await;
        let mut record = self.get(name).await?;
        let previous_digest = record.digest.clone();
        let mut to_model = rollout::current_model(&record);
        if let Some(reference) = &spec.model {
            let model = match self.deployable(reference).await {
                Ok(model) => model,
                Err(e) => return Err(self.refused(actor, "deployment.update", name, e).await),
            };
            to_model = ModelRef {
                name: model.name,
                version: model.version,
                digest: model.artifact.digest,
            };
        }
        let current_settings = record.settings();
        let to_settings = ServingSettings {
            slots: spec.slots.unwrap_or(current_settings.slots),
            context_per_slot: spec
                .context_per_slot
                .unwrap_or(current_settings.context_per_slot),
            gpu_layers: spec.gpu_layers.unwrap_or(current_settings.gpu_layers),
        };
        // The whole request is checked first, so a bad value is named before anything else.
        let mut requested = record.clone();
        requested.set_settings(to_settings);
        if let Some(selector) = &spec.selector {
            requested.selector = selector.clone();
        }
        requested.replicas = spec.replicas.unwrap_or(record.replicas);
        requested.max_unavailable = spec.max_unavailable.unwrap_or(record.max_unavailable);
        check_record(&requested)?;
        // A new model or new settings restart every replica: that rolls node by node.
        let rollout_started = to_model.digest != record.digest || to_settings != current_settings;
        if rollout_started {
            if let Some(r) = record.rollout.as_ref().filter(|r| r.phase.is_active()) {
                let error =
                    DeployError::FailedPrecondition(if r.phase == RolloutPhase::Progressing {
                        format!(
                            "deployment `{name}` is rolling out {}; wait until it completes \
                         or roll it back (`steward deploy rollback {name}`)",
                            rollout_change(&record, r)
                        )
                    } else {
                        format!(
                            "deployment `{name}` is rolling back from {} ({}); wait until it is \
                         back on {}",
                            r.to, r.message, r.from
                        )
                    });
                return Err(self.refused(actor, "deployment.update", name, error).await);
            }
            rollout::start(
                &mut record,
                to_model,
                to_settings,
                &actor.to_string(),
                now_unix(),
            );
        } else {
            record.model_name = to_model.name;
            record.model_version = to_model.version;
        }
        record.selector = requested.selector;
        record.replicas = requested.replicas;
        record.max_unavailable = requested.max_unavailable;
        record.updated_at = now_unix();
        let mut details = deployment_details(&record);
        details["previous_digest"] = json!(previous_digest);
        let mut events = vec![audit(actor, "deployment.update", name, "success", details)];
        if let Some(r) = record.rollout.as_ref().filter(|_| rollout_started) {
            events.push(rollout_start_event(actor, name, r));
        }
        self.fleet.store.update_deployment(&record, events).await?;
        drop(placing);
        self.replace_now().await;
        self.status(name).await
    }

    /// Returns `name` to the model it ran before its last rollout: at once while that
    /// rollout progresses, otherwise as a new rollout (gated like any other).
    pub async fn rollback(
        &self,
        actor: &Actor,
        name: &str,
    ) -> Result<DeploymentStatus, DeployError> {
        let placing = self.placing.lock().await;
        let mut record = self.get(name).await?;
        let Some(last) = record.rollout.clone() else {
            let error = DeployError::FailedPrecondition(format!(
                "deployment `{name}` has no previous model to roll back to (its model never changed)"
            ));
            return Err(self
                .refused(actor, "deployment.rollback", name, error)
                .await);
        };
        let now = now_unix();
        let mut events = Vec::new();
        match last.phase {
            RolloutPhase::RolledBack | RolloutPhase::RollingBack => {
                let already = if last.phase == RolloutPhase::RolledBack {
                    "was already rolled back"
                } else {
                    "is already rolling back"
                };
                let error = DeployError::FailedPrecondition(format!(
                    "deployment `{name}` {already} to {} ({})",
                    last.from, last.message
                ));
                return Err(self
                    .refused(actor, "deployment.rollback", name, error)
                    .await);
            }
            RolloutPhase::Progressing => {
                let reason = format!("rolled back by {actor}");
                let (from_settings, to_settings) = rollout::settings_of(&record, &last);
                rollout::begin_roll_back(&mut record, &reason, now);
                events.push(audit(
                    actor,
                    "deployment.rollback",
                    name,
                    "success",
                    json!({
                        "automatic": false,
                        "from": last.to.to_string(),
                        "from_digest": last.to.digest,
                        "to": last.from.to_string(),
                        "to_digest": last.from.digest,
                        "from_settings": to_settings.to_string(),
                        "to_settings": from_settings.to_string(),
                    }),
                ));
            }
            RolloutPhase::Complete => {
                if let Err(e) = self.deployable(&last.from.digest).await {
                    return Err(self.refused(actor, "deployment.rollback", name, e).await);
                }
                let (from_settings, to_settings) = rollout::settings_of(&record, &last);
                rollout::start(
                    &mut record,
                    last.from.clone(),
                    from_settings,
                    &actor.to_string(),
                    now,
                );
                events.push(audit(
                    actor,
                    "deployment.rollback",
                    name,
                    "success",
                    json!({
                        "automatic": false,
                        "from": last.to.to_string(),
                        "to": last.from.to_string(),
                        "to_digest": last.from.digest,
                        "from_settings": to_settings.to_string(),
                        "to_settings": from_settings.to_string(),
                        "as": "rollout",
                    }),
                ));
                let started = record.rollout.as_ref().expect("just started");
                events.push(rollout_start_event(actor, name, started));
            }
        }
        record.updated_at = now;
        self.fleet.store.update_deployment(&record, events).await?;
        self.probes.forget(name);
        drop(placing);
        self.replace_now().await;
        self.status(name).await
    }

    pub async fn delete(&self, actor: &Actor, name: &str) -> Result<(), DeployError> {
        let event = audit(actor, "deployment.delete", name, "success", json!({}));
        // Not while a placement runs: it may be storing a rollout step of this deployment.
        let placing = self.placing.lock().await;
        self.fleet.store.delete_deployment(name, event).await?;
        self.probes.forget(name);
        drop(placing);
        self.replace_now().await;
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<DeploymentStatus>, DeployError> {
        let placement = self.placing.lock().await.clone();
        let nodes = self.fleet.list_nodes().await?;
        let mut out = Vec::new();
        for record in self.fleet.store.list_deployments().await? {
            out.push(self.status_of(record, &placement, &nodes));
        }
        Ok(out)
    }

    pub async fn status(&self, name: &str) -> Result<DeploymentStatus, DeployError> {
        let record = self.get(name).await?;
        let placement = self.placing.lock().await.clone();
        let nodes = self.fleet.list_nodes().await?;
        Ok(self.status_of(record, &placement, &nodes))
    }

    async fn get(&self, name: &str) -> Result<DeploymentRecord, DeployError> {
        self.fleet
            .store
            .get_deployment(name)
            .await?
            .ok_or_else(|| DeployError::NotFound(format!("deployment `{name}`")))
    }

    fn status_of(
        &self,
        record: DeploymentRecord,
        placement: &Placement,
        nodes: &[NodeRecord],
    ) -> DeploymentStatus {
        let mut replicas = Vec::new();
        for node in nodes {
            for assigned in &node.desired_models {
                if assigned.deployment != record.name {
                    continue;
                }
                let model = self
                    .fleet
                    .sessions
                    .models(&node.id)
                    .into_iter()
                    .find(|m| m.name == record.name);
                replicas.push(ReplicaStatus {
                    node_id: node.id.clone(),
                    node_name: node.name.clone(),
                    digest: assigned.digest.clone(),
                    model,
                });
            }
        }
        let unschedulable = placement.unschedulable.get(&record.name);
        DeploymentStatus {
            missing_replicas: unschedulable.map_or(0, |u| u.missing_replicas),
            unschedulable_reasons: unschedulable.map(|u| u.reasons.clone()).unwrap_or_default(),
            replicas,
            record,
        }
    }

    /// The single model `reference` names, if it may be deployed: not revoked, and still
    /// trusted under the current policy.
    async fn deployable(&self, reference: &str) -> Result<ModelRecord, DeployError> {
        let refused = |reason: String| DeployError::Refused {
            reference: reference.to_owned(),
            reason,
        };
        let mut models = self.registry.resolve(reference).await?;
        let model = models.remove(0);
        let policy = TrustPolicy::load(&self.fleet.store).await?;
        may_run(&policy, &model).map_err(refused)?;
        Ok(model)
    }

    async fn refused(
        &self,
        actor: &Actor,
        action: &str,
        name: &str,
        error: DeployError,
    ) -> DeployError {
        let event = audit(
            actor,
            action,
            name,
            "refused",
            json!({"reason": steward_telemetry::chain(&error).to_string()}),
        );
        if let Err(e) = self.fleet.store.append_audit(event).await {
            tracing::error!(error = %steward_telemetry::chain(&e), "could not audit a refused deployment");
        }
        error
    }

    /// Moves progressing rollouts on (storing each step with its audit events first),
    /// re-runs placement over every node and deployment, stores each node's assigned
    /// models (bumping its desired generation where they changed) and pushes the new
    /// desired state to the agents that are connected.
    pub async fn reconcile(&self) -> Result<Reconciled, DeployError> {
        self.reconcile_telling(Tell::Changed).await
    }

    async fn reconcile_telling(&self, tell: Tell) -> Result<Reconciled, DeployError> {
        let mut last = self.placing.lock().await;
        let nodes = self.fleet.list_nodes().await?;
        let mut records = self.fleet.store.list_deployments().await?;
        let policy = TrustPolicy::load(&self.fleet.store).await?;
        let mut demands = Vec::new();
        let mut refused: BTreeMap<String, String> = BTreeMap::new();
        let mut rolling = false;
        for d in &mut records {
            let pinned = self.advance_rollout(d, &nodes, &policy).await?;
            rolling |= d.rollout.as_ref().is_some_and(|r| r.phase.is_active());
            match self.demand(d, &policy, pinned).await? {
                Ok(demand) => demands.push(demand),
                Err(reason) => {
                    refused.insert(d.name.clone(), reason);
                }
            }
        }
        self.audit_new_refusals(&refused).await;
        let sizes = assigned_sizes(&demands);
        let views: Vec<NodeView> = nodes
            .iter()
            .map(|node| node_view(node, &sizes, &self.fleet.sessions.models(&node.id)))
            .collect();
        let mut placement = place(&views, &demands, self.strategy);
        for (name, reason) in refused {
            let replicas = records
                .iter()
                .find(|d| d.name == name)
                .map_or(0, |d| d.replicas);
            placement.unschedulable.insert(
                name,
                crate::placement::Unschedulable {
                    missing_replicas: replicas,
                    reasons: vec![reason],
                },
            );
        }
        let (mut changed, mut stored) = (Vec::new(), Ok(()));
        for node in &nodes {
            let models = placement.nodes.get(&node.id).cloned().unwrap_or_default();
            if models == node.desired_models {
                continue;
            }
            let event = audit(
                &Actor::System,
                "node.assign",
                &node.id,
                "success",
                json!({
                    "node": node.name,
                    "models": models.iter().map(|m| json!({"deployment": m.deployment, "digest": m.digest})).collect::<Vec<_>>(),
                }),
            );
            match self
                .fleet
                .store
                .set_node_desired_models(&node.id, &models, event)
                .await
            {
                Ok(Some(updated)) => {
                    tracing::info!(node = %updated.name, generation = updated.desired_generation, models = models.len(), "node assignment changed");
                    changed.push(updated);
                }
                Ok(None) => {}
                Err(e) => {
                    stored = Err(e);
                    break;
                }
            }
        }
        // The changed nodes are told together, once every change is stored (and also when a
        // later store failed): a node told as soon as its own change was stored started
        // pulling while the others' changes were still being written, and its pull's CPU
        // slowed those writes, so the last of ten nodes started about half a second after
        // the first (docs/BENCHMARKS.md).
        if tell == Tell::Every {
            for node in &nodes {
                if !changed.iter().any(|c| c.id == node.id) {
                    changed.push(node.clone());
                }
            }
        }
        changed.retain(|n| self.fleet.sessions.get(&n.id).is_some());
        let states = self.fleet.desired_states(&changed).await?;
        for (node, desired) in changed.iter().zip(states) {
            self.fleet.sessions.push_desired_state(&node.id, desired);
        }
        stored?;
        *last = placement;
        Ok(Reconciled { rolling })
    }

    /// Moves `d`'s rollout on if it progresses: stores what changed with its audit events,
    /// sends the probes it asks for, and returns the digests its placed replicas keep.
    async fn advance_rollout(
        &self,
        d: &mut DeploymentRecord,
        nodes: &[NodeRecord],
        policy: &TrustPolicy,
    ) -> Result<BTreeMap<String, rollout::Revision>, DeployError> {
        let Some(phase) = d
            .rollout
            .as_ref()
            .map(|r| r.phase)
            .filter(|p| p.is_active())
        else {
            return Ok(BTreeMap::new());
        };
        if self.end_rollout_if_unusable(d, policy).await? {
            return Ok(BTreeMap::new());
        }
        let mut replicas = Vec::new();
        for node in nodes {
            if let Some(assigned) = node.desired_models.iter().find(|a| a.deployment == d.name) {
                replicas.push(ReplicaView {
                    node_id: node.id.clone(),
                    node_name: node.name.clone(),
                    assigned: rollout::Revision {
                        digest: assigned.digest.clone(),
                        settings: ServingSettings {
                            slots: assigned.slots,
                            context_per_slot: assigned.context_per_slot,
                            gpu_layers: assigned.gpu_layers,
                        },
                    },
                    status: self
                        .fleet
                        .sessions
                        .models(&node.id)
                        .into_iter()
                        .find(|m| m.name == d.name),
                });
            }
        }
        let to = d.digest.clone();
        let mut next = d.clone();
        let now = now_unix();
        let timed = rollout::time_steps(&mut next, self.started_at, now);
        let step = rollout::advance(
            &mut next,
            &replicas,
            |node| self.probes.state(node, &d.name, &to),
            now,
            self.step_timeout.as_secs() as i64,
        );
        if step.changed || timed {
            let events = step
                .events
                .iter()
                .map(|e| {
                    audit(
                        &Actor::System,
                        e.action,
                        &d.name,
                        e.outcome,
                        e.details.clone(),
                    )
                })
                .collect();
            for e in &step.events {
                tracing::info!(deployment = %d.name, action = e.action, details = %e.details, "rollout");
            }
            if step.changed {
                next.updated_at = now;
            }
            *d = self.fleet.store.update_deployment(&next, events).await?;
            // Probes are kept by digest: a rollout that turned back (or ended) must not
            // count an answer given in the other direction, which for new settings is the
            // same digest.
            if d.rollout.as_ref().map(|r| r.phase) != Some(phase) {
                self.probes.forget(&d.name);
            }
        }
        for node in &step.probe {
            self.probes.send(&self.fleet.sessions, node, &d.name, &to);
        }
        Ok(step.pinned)
    }

    /// Audits each deployment placement newly cannot place at all (its model was revoked
    /// or is no longer trusted), once per reason. What was refused before this control plane
    /// started was audited then (or by the change that caused it).
    async fn audit_new_refusals(&self, refused: &BTreeMap<String, String>) {
        let before = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(refused.clone());
        let Some(before) = before else {
            return;
        };
        for (name, reason) in refused {
            if before.get(name) == Some(reason) {
                continue;
            }
            tracing::warn!(deployment = %name, %reason, "deployment cannot be placed");
            let event = audit(
                &Actor::System,
                "deployment.refused",
                name,
                "refused",
                json!({"reason": reason}),
            );
            if let Err(e) = self.fleet.store.append_audit(event).await {
                tracing::error!(error = %steward_telemetry::chain(&e), "could not audit a refused deployment; trying again");
                // Forgotten, so the next placement sees the refusal as new and audits it.
                if let Some(known) = self
                    .refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    known.remove(name);
                }
            }
        }
    }

    /// Ends `d`'s active rollout at once, stored with its audit event, when one of its two
    /// models may no longer run ([`rollout::end_for_unusable`]); returns whether it did.
    async fn end_rollout_if_unusable(
        &self,
        d: &mut DeploymentRecord,
        policy: &TrustPolicy,
    ) -> Result<bool, DeployError> {
        let Some(rollout) = d.rollout.as_ref() else {
            return Ok(false);
        };
        let unusable = rollout::Unusable {
            from: self.may_not_run(&rollout.from, policy).await?,
            to: self.may_not_run(&rollout.to, policy).await?,
        };
        let mut next = d.clone();
        let Some(event) = rollout::end_for_unusable(&mut next, &unusable, now_unix()) else {
            return Ok(false);
        };
        tracing::warn!(deployment = %d.name, action = event.action, details = %event.details, "rollout ended: one of its models may no longer run");
        let event = audit(
            &Actor::System,
            event.action,
            &d.name,
            event.outcome,
            event.details,
        );
        next.updated_at = now_unix();
        *d = self
            .fleet
            .store
            .update_deployment(&next, vec![event])
            .await?;
        self.probes.forget(&d.name);
        Ok(true)
    }

    /// Why `model` may no longer run (its artifact is gone, revoked or no longer trusted).
    async fn may_not_run(
        &self,
        model: &ModelRef,
        policy: &TrustPolicy,
    ) -> Result<Option<String>, DeployError> {
        let Some(artifact) = self.fleet.store.find_artifact(&model.digest).await? else {
            return Ok(Some(format!(
                "artifact {} is not in the registry",
                model.digest
            )));
        };
        let model = ModelRecord {
            name: model.name.clone(),
            version: model.version.clone(),
            created_at: 0,
            created_by: String::new(),
            artifact,
        };
        Ok(may_run(policy, &model).err())
    }

    /// What placing `d` takes, or why it cannot be placed at all. A failed database read
    /// fails the placement (retried), rather than refusing the deployment.
    async fn demand(
        &self,
        d: &DeploymentRecord,
        policy: &TrustPolicy,
        pinned: BTreeMap<String, rollout::Revision>,
    ) -> Result<Result<Demand, String>, DeployError> {
        let selector = match Selector::parse(&d.selector) {
            Ok(selector) => selector,
            Err(reason) => return Ok(Err(reason)),
        };
        let Some(artifact) = self.fleet.store.find_artifact(&d.digest).await? else {
            return Ok(Err(format!("artifact {} is not in the registry", d.digest)));
        };
        let model = ModelRecord {
            name: d.model_name.clone(),
            version: d.model_version.clone(),
            created_at: 0,
            created_by: String::new(),
            artifact: artifact.clone(),
        };
        if let Err(reason) = may_run(policy, &model) {
            return Ok(Err(reason));
        }
        let pinned = self
            .kept(&artifact, pinned, rollout::rolled_from(d).as_ref())
            .await?;
        Ok(Ok(Demand {
            deployment: d.name.clone(),
            digest: d.digest.clone(),
            pinned,
            selector,
            replicas: d.replicas,
            slots: d.slots,
            context_per_slot: d.context_per_slot,
            gpu_layers: d.gpu_layers,
            memory_bytes: memory_needed(&artifact, d.slots, d.context_per_slot),
            size_bytes: artifact.size_bytes,
        }))
    }

    /// Costs each replica a rollout pins with the model and settings it keeps, and no less
    /// than the revision the rollout would go back to (`way_back`), so that a failed
    /// rollout always has room to return. `current` is the deployment's own artifact; a
    /// kept artifact no longer in the registry is costed as the current one.
    async fn kept(
        &self,
        current: &ArtifactRecord,
        pinned: BTreeMap<String, rollout::Revision>,
        way_back: Option<&rollout::Revision>,
    ) -> Result<BTreeMap<String, Kept>, DeployError> {
        // Other artifacts than `current`, each looked up once (outside a rollout there are none).
        let mut others: BTreeMap<String, Option<ArtifactRecord>> = BTreeMap::new();
        let digests = pinned.values().chain(way_back).map(|r| &r.digest);
        for digest in digests {
            if *digest != current.digest && !others.contains_key(digest) {
                let found = self.fleet.store.find_artifact(digest).await?;
                others.insert(digest.clone(), found);
            }
        }
        let artifact = |revision: &rollout::Revision| {
            others
                .get(&revision.digest)
                .and_then(Option::as_ref)
                .unwrap_or(current)
        };
        let cost = |revision: &rollout::Revision| {
            let settings = &revision.settings;
            memory_needed(
                artifact(revision),
                settings.slots,
                settings.context_per_slot,
            )
        };
        let reserved = way_back.map_or(0, cost);
        Ok(pinned
            .into_iter()
            .map(|(node, revision)| {
                let memory_bytes = cost(&revision).max(reserved);
                let size_bytes = artifact(&revision).size_bytes;
                (
                    node,
                    Kept {
                        revision,
                        memory_bytes,
                        size_bytes,
                    },
                )
            })
            .collect())
    }
}

/// Which connected agents a placement sends their desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tell {
    /// Those whose assigned models changed.
    Changed,
    /// Every one, changed or not (the revoked digests travel with the desired state).
    Every,
}

/// What a placement found.
#[derive(Clone, Copy, Debug)]
pub struct Reconciled {
    /// A rollout is progressing (placement should run again soon).
    pub rolling: bool,
}

fn rollout_start_event(
    actor: &Actor,
    name: &str,
    r: &steward_db::Rollout,
) -> steward_db::NewAuditEvent {
    audit(
        actor,
        "deployment.rollout.start",
        name,
        "success",
        json!({
            "from": r.from.to_string(),
            "from_digest": r.from.digest,
            "to": r.to.to_string(),
            "to_digest": r.to.digest,
            "from_settings": r.from_settings.map(|s| s.to_string()),
            "to_settings": r.to_settings.map(|s| s.to_string()),
        }),
    )
}

/// What a rollout changes, for messages: `m@1 → m@2`, or the settings when only they change.
fn rollout_change(record: &DeploymentRecord, r: &steward_db::Rollout) -> String {
    let (from, to) = rollout::settings_of(record, r);
    match (r.from.digest == r.to.digest, from == to) {
        (true, false) => format!("{} from {from} to {to}", r.to),
        (false, true) => format!("{} → {}", r.from, r.to),
        _ => format!("{} ({from}) → {} ({to})", r.from, r.to),
    }
}

/// Whether `model` may run: its artifact is not revoked, and it is trusted under `policy`.
fn may_run(policy: &TrustPolicy, model: &ModelRecord) -> Result<(), String> {
    let artifact = &model.artifact;
    if artifact.revoked_at.is_some() {
        return Err(format!(
            "artifact {} is revoked ({})",
            artifact.digest,
            artifact.revoked_reason.as_deref().unwrap_or("no reason")
        ));
    }
    trusted(policy, model)
}

/// Whether `model` verifies under `policy` now (anchors may have been removed since push).
fn trusted(policy: &TrustPolicy, model: &ModelRecord) -> Result<(), String> {
    let artifact = &model.artifact;
    let digest = Sha256Hex::parse(&artifact.digest)
        .ok_or_else(|| format!("stored digest `{}` is malformed", artifact.digest))?;
    policy
        .evaluate(
            &model.name,
            &[(artifact.file_name.clone(), digest)],
            Some(artifact.signature_bundle.as_bytes()),
        )
        .map(|_| ())
        .map_err(|e| format!("not trusted: {}", steward_telemetry::chain(&e)))
}

/// The GGUF load estimate plus the KV cache for `slots × context` tokens.
pub fn memory_needed(artifact: &ArtifactRecord, slots: u32, context_per_slot: u32) -> u64 {
    let facts: Option<GgufFacts> = serde_json::from_str(&artifact.gguf_facts_json).ok();
    let tokens = u64::from(slots) * u64::from(context_per_slot);
    match facts {
        Some(f) => f
            .estimated_load_bytes
            .saturating_add(f.kv_cache_bytes(tokens).unwrap_or(0)),
        None => artifact.size_bytes,
    }
}

/// Bytes the assigned artifacts still need on a node, beyond the free disk its inventory
/// reports. An artifact two deployments share counts once.
///
/// An agent that lists its artifact cache in the inventory (read just before the free disk,
/// given here as `on_disk`) is judged by that listing: what the cache lacks of each
/// artifact (nothing of one complete, the rest of a partial one, all of one not listed). `sizes` gives the size of each artifact
/// a deployment still runs; any other counts nothing. One whose model the agent refused
/// (for memory, say) counts too: the agent admits it again whenever the node's desired
/// state changes, and may then pull it.
///
/// An agent that does not list its cache is judged by the model states it reports: the rest
/// of one it is pulling; nothing for one it has in full (verifying, loading or ready under
/// any deployment), nor for one it has not reported pulling (the placement that assigned it
/// counted it in full; a cached one is already off the free disk its inventory reports). A
/// failed model (refused for memory, say) says nothing about the pull of its artifact for
/// another.
fn disk_pending(
    assigned: &[steward_db::AssignedModel],
    on_disk: Option<&BTreeMap<String, u64>>,
    sizes: &BTreeMap<String, u64>,
    reported: &[ModelStatus],
) -> u64 {
    let digests: BTreeSet<&str> = assigned.iter().map(|a| a.digest.as_str()).collect();
    digests
        .into_iter()
        .map(|digest| {
            if let Some(on_disk) = on_disk {
                let size = sizes.get(digest).copied().unwrap_or(0);
                return size.saturating_sub(on_disk.get(digest).copied().unwrap_or(0));
            }
            let mut pulling: Option<u64> = None;
            for status in reported.iter().filter(|s| s.digest == digest) {
                match status.state() {
                    ModelState::Verifying | ModelState::Loading | ModelState::Ready => return 0,
                    ModelState::Pulling => {
                        let owed = status.bytes_total.saturating_sub(status.bytes_done);
                        pulling = Some(pulling.map_or(owed, |p| p.min(owed)));
                    }
                    ModelState::Failed | ModelState::Unspecified => {}
                }
            }
            pulling.unwrap_or(0)
        })
        .sum()
}

/// The size of every artifact a deployment still runs: its digest, and the digests its
/// rollout keeps on some nodes. An artifact no deployment runs any more is about to leave
/// every node, so it has no size to count; one that leaves some nodes but runs on others
/// still counts, for this pass, where it leaves.
fn assigned_sizes(demands: &[Demand]) -> BTreeMap<String, u64> {
    let kept = demands
        .iter()
        .flat_map(|d| d.pinned.values())
        .map(|k| (k.revision.digest.clone(), k.size_bytes));
    let current = demands.iter().map(|d| (d.digest.clone(), d.size_bytes));
    kept.chain(current).collect()
}

/// Digest → the most bytes of it the agent lists on disk (a complete file beside a partial
/// one left from an earlier pull counts in full).
fn on_disk(inventory: &Inventory) -> BTreeMap<String, u64> {
    let mut on_disk = BTreeMap::new();
    for artifact in &inventory.artifacts {
        let bytes: &mut u64 = on_disk.entry(artifact.digest.clone()).or_default();
        *bytes = artifact.bytes.max(*bytes);
    }
    on_disk
}

/// A node as placement sees it, with `reported`: the model states its agent last reported.
fn node_view(
    node: &NodeRecord,
    sizes: &BTreeMap<String, u64>,
    reported: &[ModelStatus],
) -> NodeView {
    let inventory: Inventory = serde_json::from_str(&node.inventory_json).unwrap_or_default();
    let on_disk = on_disk(&inventory);
    let listed = inventory.artifacts_listed.then_some(&on_disk);
    NodeView {
        id: node.id.clone(),
        name: node.name.clone(),
        labels: node.labels.clone(),
        ready: node.state == NodeState::Ready,
        cordoned: node.cordoned,
        draining: node.draining,
        memory_total_bytes: inventory.memory_total_bytes,
        gpu_memory_bytes: inventory
            .gpus
            .iter()
            .map(|g| g.memory_total_bytes)
            .max()
            .unwrap_or(0),
        memory_limit_bytes: inventory.model_memory_limit_bytes,
        disk_free_bytes: inventory.disk_free_bytes,
        disk_pending_bytes: disk_pending(&node.desired_models, listed, sizes, reported),
        assigned: node.desired_models.clone(),
        on_disk,
    }
}

fn deployment_details(d: &DeploymentRecord) -> serde_json::Value {
    json!({
        "model": format!("{}@{}", d.model_name, d.model_version),
        "digest": d.digest,
        "selector": d.selector,
        "replicas": d.replicas,
        "slots": d.slots,
        "context_per_slot": d.context_per_slot,
        "gpu_layers": d.gpu_layers,
        "max_unavailable": d.max_unavailable,
    })
}

fn check_deployment_name(name: &str) -> Result<(), DeployError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(DeployError::InvalidArgument(format!(
            "deployment name `{name}` must be 1-64 letters, digits and `-_.` \
             (it is also the model name clients use)"
        )))
    }
}

fn check_record(d: &DeploymentRecord) -> Result<(), DeployError> {
    Selector::parse(&d.selector).map_err(DeployError::InvalidArgument)?;
    let invalid = |m: String| Err(DeployError::InvalidArgument(m));
    if d.replicas == 0 || d.replicas > MAX_REPLICAS {
        return invalid(format!(
            "--replicas must be 1-{MAX_REPLICAS}, got {}",
            d.replicas
        ));
    }
    if d.slots == 0 || d.slots > MAX_SLOTS {
        return invalid(format!("--slots must be 1-{MAX_SLOTS}, got {}", d.slots));
    }
    if !(MIN_CONTEXT..=MAX_CONTEXT).contains(&d.context_per_slot) {
        return invalid(format!(
            "--ctx must be {MIN_CONTEXT}-{MAX_CONTEXT} tokens, got {}",
            d.context_per_slot
        ));
    }
    if d.max_unavailable == 0 || d.max_unavailable > MAX_REPLICAS {
        return invalid(format!(
            "--max-unavailable must be 1-{MAX_REPLICAS}, got {}",
            d.max_unavailable
        ));
    }
    if d.gpu_layers < -1 {
        return invalid(format!(
            "--gpu-layers must be `auto` or a layer count, got {}",
            d.gpu_layers
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(deployment: &str, digest: &str) -> steward_db::AssignedModel {
        steward_db::AssignedModel {
            deployment: deployment.into(),
            digest: digest.into(),
            slots: 1,
            context_per_slot: 512,
            gpu_layers: -1,
        }
    }

    fn reported(digest: &str, state: ModelState, done: u64, total: u64) -> ModelStatus {
        ModelStatus {
            name: "any".into(),
            digest: digest.into(),
            state: state as i32,
            bytes_done: done,
            bytes_total: total,
            ..ModelStatus::default()
        }
    }

    #[test]
    fn disk_is_pending_for_what_an_agent_is_still_pulling() {
        let models = [
            assigned("pulling", "a"),
            assigned("shares-a", "a"),
            assigned("refused-beside-a-pull", "b"),
            assigned("pulling-b", "b"),
            assigned("ready", "c"),
            assigned("unreported", "d"),
            assigned("refused", "e"),
        ];
        let statuses = [
            reported("a", ModelState::Pulling, 20, 100),
            reported("a", ModelState::Pulling, 20, 100),
            reported("b", ModelState::Failed, 0, 0),
            reported("b", ModelState::Pulling, 10, 50),
            reported("c", ModelState::Ready, 0, 0),
            reported("c", ModelState::Pulling, 0, 30),
            reported("e", ModelState::Failed, 0, 0),
        ];
        // The rest of a (once) and of b; nothing of c (in full), d or e.
        let sizes = BTreeMap::from([("d".to_owned(), 70)]);
        assert_eq!(disk_pending(&models, None, &sizes, &statuses), 80 + 40);
        assert_eq!(
            disk_pending(&models, None, &sizes, &[]),
            0,
            "nothing reported yet"
        );
    }

    fn cached(
        digest: &str,
        bytes: u64,
        complete: bool,
    ) -> steward_proto::agent::v1::CachedArtifact {
        steward_proto::agent::v1::CachedArtifact {
            digest: digest.into(),
            bytes,
            complete,
        }
    }

    /// An agent that lists its cache is judged by the listing, read with its free disk: an
    /// artifact assigned but not yet reported (the pull has not begun) takes all its disk,
    /// a partial one the rest as of that listing, whatever the model states say since.
    #[test]
    fn disk_is_pending_for_what_the_cache_listing_still_lacks() {
        let models = [
            assigned("not-begun", "a"),
            assigned("shares-a", "a"),
            assigned("half-pulled", "b"),
            assigned("cached", "c"),
            assigned("cached-and-a-stale-partial", "d"),
            assigned("size-unknown", "e"),
        ];
        let inventory = Inventory {
            artifacts: vec![
                cached("b", 30, false),
                cached("c", 50, true),
                cached("d", 5, false),
                cached("d", 60, true),
                cached("unassigned", 10, false),
            ],
            artifacts_listed: true,
            ..Inventory::default()
        };
        let sizes = BTreeMap::from([
            ("a".to_owned(), 100),
            ("b".to_owned(), 80),
            ("c".to_owned(), 50),
            ("d".to_owned(), 60),
        ]);
        // Reports say b has 70 bytes by now, and nothing of a: the listing decides.
        let statuses = [reported("b", ModelState::Pulling, 70, 80)];
        assert_eq!(
            disk_pending(&models, Some(&on_disk(&inventory)), &sizes, &statuses),
            100 + 50
        );
        // A model the agent refused (for memory) is admitted again when the node's desired
        // state changes, and then pulled: its artifact still counts.
        let refused = [
            reported("a", ModelState::Failed, 0, 0),
            reported("a", ModelState::Failed, 0, 0),
        ];
        assert_eq!(
            disk_pending(&models, Some(&on_disk(&inventory)), &sizes, &refused),
            100 + 50
        );
        // An artifact no deployment runs any more (no size) is about to go: nothing.
        let sizes = BTreeMap::from([("b".to_owned(), 80)]);
        assert_eq!(
            disk_pending(&models, Some(&on_disk(&inventory)), &sizes, &[]),
            50
        );
    }

    #[test]
    fn a_node_has_on_disk_the_most_of_each_artifact_its_agent_lists() {
        let inventory = Inventory {
            artifacts: vec![
                cached("d", 5, false),
                cached("d", 60, true),
                cached("b", 30, false),
            ],
            artifacts_listed: true,
            ..Inventory::default()
        };
        assert_eq!(
            on_disk(&inventory),
            BTreeMap::from([("b".to_owned(), 30), ("d".to_owned(), 60)])
        );
    }
}
