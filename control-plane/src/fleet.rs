//! The application layer: enrollment, node identity, scheduling flags and the desired state
//! sent to agents. gRPC and HTTP handlers translate wire types and call in here; this module
//! holds the rules and never sees an ORM type.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use steward_db::{
    AssignedModel, DeploymentRecord, EnrollmentTokenRecord, NewAuditEvent, NewNode, NodeRecord,
    NodeState, Store, TokenRejection,
};
use steward_proto::agent::v1::{
    AgentTrustAnchor, AgentTrustPolicy, DesiredState, Inventory, ModelAssignment,
};
use steward_proto::enrollment::{EnrollmentToken, hash_secret};

use crate::metrics::{Metrics, OutcomeLabel, StateLabel};
use crate::pki::{CertificateAuthority, IssuedCertificate, PkiError};
use crate::sessions::SessionRegistry;

/// Who performed an action, for the audit log.
#[derive(Clone, Debug)]
pub enum Actor {
    Admin {
        credential_id: String,
        name: String,
    },
    Node(String),
    /// Someone not yet authenticated (an enrolling agent), by peer address.
    Anonymous(String),
    System,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Admin { name, .. } => write!(f, "admin:{name}"),
            Self::Node(id) => write!(f, "node:{id}"),
            Self::Anonymous(peer) => write!(f, "anonymous:{peer}"),
            Self::System => f.write_str("system"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("enrollment refused")]
    EnrollmentRefused(#[source] TokenRejection),
    #[error("malformed enrollment token")]
    MalformedToken(#[source] steward_proto::enrollment::TokenFormatError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("node {0} is not enrolled (or was removed)")]
    UnknownNode(String),
    #[error("certificate issuance failed")]
    Pki(#[from] PkiError),
    #[error("storage failed")]
    Db(#[from] steward_db::DbError),
}

/// Tunables the application layer needs.
#[derive(Clone, Debug)]
pub struct FleetSettings {
    pub default_token_ttl: Duration,
    pub max_token_ttl: Duration,
    pub agent_certificate_ttl: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            default_token_ttl: Duration::from_secs(24 * 3600),
            max_token_ttl: Duration::from_secs(24 * 3600),
            agent_certificate_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Result of a successful enrollment.
#[derive(Debug)]
pub struct Enrollment {
    pub node: NodeRecord,
    pub certificate: IssuedCertificate,
}

#[derive(Debug)]
pub struct Fleet {
    pub store: Store,
    pub ca: Arc<CertificateAuthority>,
    pub sessions: Arc<SessionRegistry>,
    pub metrics: Arc<Metrics>,
    pub settings: FleetSettings,
}

impl Fleet {
    pub fn new(
        store: Store,
        ca: Arc<CertificateAuthority>,
        metrics: Arc<Metrics>,
        settings: FleetSettings,
    ) -> Self {
        Self {
            store,
            ca,
            sessions: Arc::new(SessionRegistry::default()),
            metrics,
            settings,
        }
    }

    // ---- enrollment tokens --------------------------------------------------------------

    pub async fn create_enrollment_token(
        &self,
        actor: &Actor,
        ttl: Option<Duration>,
        description: &str,
    ) -> Result<(EnrollmentToken, EnrollmentTokenRecord), FleetError> {
        let ttl = ttl.unwrap_or(self.settings.default_token_ttl);
        if ttl.is_zero() {
            return Err(FleetError::InvalidArgument(
                "token lifetime must be positive".into(),
            ));
        }
        if ttl > self.settings.max_token_ttl {
            return Err(FleetError::InvalidArgument(format!(
                "token lifetime {} exceeds the maximum of {}",
                humantime::format_duration(ttl),
                humantime::format_duration(self.settings.max_token_ttl)
            )));
        }
        let token = EnrollmentToken::generate(&self.ca.sha256_hex());
        let now = now_unix();
        let record = EnrollmentTokenRecord {
            id: token.id.clone(),
            secret_hash: hash_secret(&token.secret),
            description: description.to_owned(),
            created_by: actor.to_string(),
            created_at: now,
            expires_at: now + ttl.as_secs() as i64,
            used_at: None,
            used_by_node_id: None,
            revoked_at: None,
        };
        self.store
            .insert_enrollment_token(
                record.clone(),
                audit(
                    actor,
                    "enrollment_token.create",
                    &token.id,
                    "success",
                    json!({"expires_at": record.expires_at, "description": description}),
                ),
            )
            .await?;
        Ok((token, record))
    }

    pub async fn list_enrollment_tokens(&self) -> Result<Vec<EnrollmentTokenRecord>, FleetError> {
        Ok(self.store.list_enrollment_tokens().await?)
    }

    pub async fn revoke_enrollment_token(
        &self,
        actor: &Actor,
        id: &str,
    ) -> Result<EnrollmentTokenRecord, FleetError> {
        if self.store.find_enrollment_token(id).await?.is_none() {
            return Err(FleetError::NotFound(format!("enrollment token {id}")));
        }
        Ok(self
            .store
            .revoke_enrollment_token(
                id,
                now_unix(),
                audit(actor, "enrollment_token.revoke", id, "success", json!({})),
            )
            .await?)
    }

    // ---- enrollment and identity --------------------------------------------------------

    /// Exchanges a token credential (`<id>.<secret>`) and a CSR for a node identity. Every
    /// refusal is audited with its reason and counted.
    pub async fn enroll(
        &self,
        peer: &str,
        credential: &str,
        csr_der: &[u8],
        requested_name: &str,
        agent_version: &str,
    ) -> Result<Enrollment, FleetError> {
        let actor = Actor::Anonymous(peer.to_owned());
        let (token_id, secret) = match EnrollmentToken::parse_credential(credential) {
            Ok(parts) => parts,
            Err(e) => {
                self.refuse_enrollment(&actor, "", "malformed", requested_name)
                    .await;
                return Err(FleetError::MalformedToken(e));
            }
        };
        if requested_name.len() > 253 || requested_name.chars().any(char::is_control) {
            return Err(FleetError::InvalidArgument(
                "node name must be at most 253 printable characters".into(),
            ));
        }
        let node_id = uuid::Uuid::new_v4().to_string();
        let certificate = match self.ca.issue_node_certificate(
            csr_der,
            &node_id,
            self.settings.agent_certificate_ttl,
        ) {
            Ok(c) => c,
            Err(e) => {
                self.refuse_enrollment(&actor, &token_id, "bad_csr", requested_name)
                    .await;
                return Err(e.into());
            }
        };
        let new = NewNode {
            id: node_id,
            requested_name: requested_name.to_owned(),
            agent_version: agent_version.to_owned(),
            certificate_serial: certificate.serial_hex.clone(),
            certificate_not_after: certificate.not_after_unix,
        };
        let outcome = self
            .store
            .enroll_node(
                &token_id,
                &hash_secret(&secret),
                now_unix(),
                new,
                audit(
                    &actor,
                    "node.enroll",
                    "",
                    "success",
                    json!({"token_id": token_id, "requested_name": requested_name,
                           "certificate_serial": certificate.serial_hex}),
                ),
            )
            .await?;
        match outcome {
            Ok(node) => {
                self.count_enrollment("success");
                tracing::info!(node_id = %node.id, node_name = %node.name, %peer, "node enrolled");
                Ok(Enrollment { node, certificate })
            }
            Err(rejection) => {
                self.refuse_enrollment(&actor, &token_id, rejection.code(), requested_name)
                    .await;
                Err(FleetError::EnrollmentRefused(rejection))
            }
        }
    }

    async fn refuse_enrollment(&self, actor: &Actor, token_id: &str, reason: &str, name: &str) {
        self.count_enrollment(reason);
        tracing::warn!(%actor, token_id, reason, "enrollment refused");
        let event = audit(
            actor,
            "node.enroll",
            token_id,
            "denied",
            json!({"reason": reason, "requested_name": name}),
        );
        if let Err(e) = self.store.append_audit(event).await {
            tracing::error!(error = %steward_telemetry::chain(&e), "could not audit a refused enrollment");
        }
    }

    fn count_enrollment(&self, outcome: &str) {
        self.metrics
            .enrollments
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Issues a fresh certificate to an authenticated node.
    pub async fn renew_certificate(
        &self,
        node_id: &str,
        csr_der: &[u8],
    ) -> Result<IssuedCertificate, FleetError> {
        let node = self.require_node(node_id).await?;
        let certificate = self.ca.issue_node_certificate(
            csr_der,
            &node.id,
            self.settings.agent_certificate_ttl,
        )?;
        self.store
            .record_certificate(
                &node.id,
                &certificate.serial_hex,
                certificate.not_after_unix,
                audit(
                    &Actor::Node(node.id.clone()),
                    "node.certificate.renew",
                    &node.id,
                    "success",
                    json!({"serial": certificate.serial_hex, "not_after": certificate.not_after_unix}),
                ),
            )
            .await?;
        tracing::info!(
            node_id,
            not_after = certificate.not_after_unix,
            "node certificate renewed"
        );
        Ok(certificate)
    }

    pub async fn require_node(&self, node_id: &str) -> Result<NodeRecord, FleetError> {
        self.store
            .get_node(node_id)
            .await?
            .ok_or_else(|| FleetError::UnknownNode(node_id.to_owned()))
    }

    // ---- sessions -----------------------------------------------------------------------

    /// A session opened: the node is ready with this inventory.
    pub async fn node_connected(
        &self,
        node_id: &str,
        agent_version: &str,
        inventory: &Inventory,
        applied_generation: u64,
    ) -> Result<NodeRecord, FleetError> {
        let inventory_json = serde_json::to_string(inventory)
            .map_err(|e| FleetError::InvalidArgument(format!("inventory: {e}")))?;
        let node = self
            .store
            .record_node_connected(
                node_id,
                agent_version,
                &inventory_json,
                applied_generation,
                now_unix(),
            )
            .await?;
        tracing::info!(node_id, node_name = %node.name, "node ready");
        Ok(node)
    }

    /// Ends the session `epoch` of `node_id`; if it was the node's current one, stores the node
    /// unavailable. If that write fails, it is tried again every second
    /// ([`Fleet::store_unrecorded_nodes_unavailable`]): a node stored ready without a session
    /// would take replicas it never runs, and nothing else would correct it.
    pub async fn end_session(&self, node_id: &str, epoch: u64) {
        self.sessions
            .close_recording(node_id, epoch, async {
                if let Err(e) = self.node_disconnected(node_id).await {
                    tracing::error!(node_id, error = %steward_telemetry::chain(&e), "could not store the node unavailable; trying again");
                    self.sessions.remember_unrecorded(node_id);
                }
            })
            .await;
    }

    /// Stores unavailable each node whose session ended but whose write failed, unless it
    /// has a session again; a write that fails again is tried on the next call.
    pub async fn store_unrecorded_nodes_unavailable(&self) {
        for node_id in self.sessions.take_unrecorded() {
            let _turn = self.sessions.turn(&node_id).await;
            if self.sessions.get(&node_id).is_some() {
                continue;
            }
            if let Err(e) = self.node_disconnected(&node_id).await {
                tracing::error!(node_id, error = %steward_telemetry::chain(&e), "could not store the node unavailable; trying again");
                self.sessions.remember_unrecorded(&node_id);
            }
        }
    }

    pub async fn node_disconnected(&self, node_id: &str) -> Result<(), FleetError> {
        if self
            .store
            .record_node_unavailable(node_id, now_unix())
            .await?
        {
            tracing::warn!(node_id, "node unavailable");
        }
        Ok(())
    }

    pub async fn inventory_changed(
        &self,
        node_id: &str,
        inventory: &Inventory,
    ) -> Result<(), FleetError> {
        let json = serde_json::to_string(inventory)
            .map_err(|e| FleetError::InvalidArgument(format!("inventory: {e}")))?;
        Ok(self.store.record_inventory(node_id, &json).await?)
    }

    pub async fn generation_applied(
        &self,
        node_id: &str,
        generation: u64,
    ) -> Result<(), FleetError> {
        self.store
            .record_applied_generation(node_id, generation)
            .await?;
        Ok(())
    }

    /// What the node should run now: its assigned models with what the agent needs to
    /// fetch and verify them, the trust policy it verifies under, and the revoked digests
    /// it must delete.
    pub async fn desired_state(&self, node: &NodeRecord) -> Result<DesiredState, FleetError> {
        let mut states = self.desired_states(std::slice::from_ref(node)).await?;
        Ok(states.remove(0))
    }

    /// The desired state of each of `nodes`, in order. What they share (the trust policy, the
    /// revoked digests, each assigned artifact and deployment) is read once for all of them.
    pub async fn desired_states(
        &self,
        nodes: &[NodeRecord],
    ) -> Result<Vec<DesiredState>, FleetError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let policy = crate::trust::TrustPolicy::load(&self.store).await?;
        let trust = AgentTrustPolicy {
            anchors: policy
                .anchors
                .iter()
                .map(|a| AgentTrustAnchor {
                    kind: a.kind.clone(),
                    pem: a.pem.clone(),
                    identity: a.identity.clone(),
                    name_pattern: a.name_pattern.clone(),
                })
                .collect(),
            unsigned_allowed: policy
                .unsigned
                .iter()
                .map(|a| a.name_pattern.clone())
                .collect(),
        };
        let revoked_digests = self.store.revoked_artifact_digests().await?;
        let mut artifacts = HashMap::new();
        let mut model_names = HashMap::new();
        let mut states = Vec::with_capacity(nodes.len());
        for node in nodes {
            let mut models = Vec::with_capacity(node.desired_models.len());
            for assigned in &node.desired_models {
                let artifact = match artifacts.get(&assigned.digest) {
                    Some(known) => known,
                    None => {
                        let found = self.store.find_artifact(&assigned.digest).await?;
                        artifacts.entry(assigned.digest.clone()).or_insert(found)
                    }
                };
                let Some(artifact) = artifact else {
                    tracing::error!(digest = %assigned.digest, "an assigned artifact is missing from the registry");
                    continue;
                };
                let key = (assigned.deployment.clone(), assigned.digest.clone());
                let model_name = match model_names.get(&key) {
                    Some(name) => String::clone(name),
                    None => {
                        let name = self.model_name(assigned).await?;
                        model_names.insert(key, name.clone());
                        name
                    }
                };
                models.push(ModelAssignment {
                    name: assigned.deployment.clone(),
                    digest: assigned.digest.clone(),
                    model_name,
                    file_name: artifact.file_name.clone(),
                    size_bytes: artifact.size_bytes,
                    signature_bundle: artifact.signature_bundle.clone().into_bytes(),
                    slots: assigned.slots,
                    context_per_slot: assigned.context_per_slot,
                    gpu_layers: assigned.gpu_layers,
                    memory_estimate_bytes: crate::deployments::memory_needed(
                        artifact,
                        assigned.slots,
                        assigned.context_per_slot,
                    ),
                });
            }
            states.push(DesiredState {
                generation: node.desired_generation,
                drain: node.draining,
                models,
                trust: Some(trust.clone()),
                revoked_digests: revoked_digests.clone(),
            });
        }
        Ok(states)
    }

    /// The name `assigned`'s deployment was trusted under (one digest may carry several). A
    /// node not yet switched by a rollout keeps the name of the model it runs.
    async fn model_name(&self, assigned: &AssignedModel) -> Result<String, FleetError> {
        let deployment = self.store.get_deployment(&assigned.deployment).await?;
        if let Some(name) = deployment.and_then(|d| name_of(&d, &assigned.digest)) {
            return Ok(name);
        }
        Ok(self
            .store
            .versions_of(&assigned.digest)
            .await?
            .into_iter()
            .next()
            .map(|m| m.name)
            .unwrap_or_default())
    }

    // ---- nodes --------------------------------------------------------------------------

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, FleetError> {
        Ok(self.store.list_nodes().await?)
    }

    pub async fn find_node(&self, id_or_name: &str) -> Result<NodeRecord, FleetError> {
        self.store
            .find_node(id_or_name)
            .await?
            .ok_or_else(|| FleetError::NotFound(format!("node `{id_or_name}`")))
    }

    pub async fn cordon(&self, actor: &Actor, node: &str) -> Result<NodeRecord, FleetError> {
        let current = self.find_node(node).await?;
        self.set_scheduling(actor, current, true, false, "node.cordon")
            .await
    }

    pub async fn uncordon(&self, actor: &Actor, node: &str) -> Result<NodeRecord, FleetError> {
        let current = self.find_node(node).await?;
        self.set_scheduling(actor, current, false, false, "node.uncordon")
            .await
    }

    pub async fn drain(&self, actor: &Actor, node: &str) -> Result<NodeRecord, FleetError> {
        let current = self.find_node(node).await?;
        self.set_scheduling(actor, current, true, true, "node.drain")
            .await
    }

    /// Sets and removes labels. Keys and values are 1-63 characters of letters, digits and
    /// `-_./`; `name` is reserved (selectors use it for the node name).
    pub async fn label(
        &self,
        actor: &Actor,
        node: &str,
        set: HashMap<String, String>,
        remove: &[String],
    ) -> Result<NodeRecord, FleetError> {
        let current = self.find_node(node).await?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        };
        let mut labels = current.labels.clone();
        for key in remove {
            labels.remove(key);
        }
        for (key, value) in &set {
            if key == "name" {
                return Err(FleetError::InvalidArgument(
                    "the label `name` is reserved: selectors match `name=` against node names"
                        .into(),
                ));
            }
            if !valid(key) || !valid(value) {
                return Err(FleetError::InvalidArgument(format!(
                    "label `{key}={value}`: keys and values must be 1-63 characters of \
                     letters, digits and `-_./`"
                )));
            }
            labels.insert(key.clone(), value.clone());
        }
        if labels == current.labels {
            return Ok(current);
        }
        let event = audit(
            actor,
            "node.label",
            &current.id,
            "success",
            json!({"labels": labels, "previous": current.labels}),
        );
        Ok(self
            .store
            .set_node_labels(&current.id, &labels, event)
            .await?)
    }

    async fn set_scheduling(
        &self,
        actor: &Actor,
        current: NodeRecord,
        cordoned: bool,
        draining: bool,
        action: &str,
    ) -> Result<NodeRecord, FleetError> {
        let updated = self
            .store
            .set_node_scheduling(
                &current.id,
                cordoned,
                draining,
                audit(
                    actor,
                    action,
                    &current.id,
                    "success",
                    json!({"cordoned": cordoned, "draining": draining}),
                ),
            )
            .await?;
        if updated.desired_generation != current.desired_generation
            && self.sessions.get(&updated.id).is_some()
        {
            let desired = self.desired_state(&updated).await?;
            self.sessions.push_desired_state(&updated.id, desired);
        }
        Ok(updated)
    }

    /// Refreshes the node-count gauges from the database (called at scrape time).
    pub async fn refresh_node_gauges(&self) -> Result<(), FleetError> {
        let counts = self.store.count_nodes_by_state().await?;
        for state in [NodeState::Ready, NodeState::Unavailable] {
            let n = counts.get(state.as_str()).copied().unwrap_or(0);
            self.metrics
                .nodes
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(n as i64);
        }
        self.metrics.sessions.set(self.sessions.len() as i64);
        self.metrics.observe_db_writes(self.store.writes());
        Ok(())
    }
}

pub fn audit(
    actor: &Actor,
    action: &str,
    target: &str,
    outcome: &str,
    details: serde_json::Value,
) -> NewAuditEvent {
    NewAuditEvent {
        at: now_unix(),
        actor: actor.to_string(),
        action: action.to_owned(),
        target: target.to_owned(),
        outcome: outcome.to_owned(),
        details,
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The model name deployment `d` runs `digest` under: its own, or during a rollout the name
/// of the side (`from` or `to`) with that digest.
fn name_of(d: &DeploymentRecord, digest: &str) -> Option<String> {
    if d.digest == digest {
        return Some(d.model_name.clone());
    }
    let rollout = d.rollout.as_ref()?;
    [&rollout.from, &rollout.to]
        .into_iter()
        .find(|m| m.digest == digest)
        .map(|m| m.name.clone())
}
