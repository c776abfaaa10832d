//! Plain records the storage layer hands out and takes in. No ORM types cross this line.

use std::collections::BTreeMap;

/// Unix seconds, UTC.
pub type UnixSeconds = i64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaRecord {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub created_at: UnixSeconds,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminCredentialRecord {
    pub id: String,
    pub name: String,
    pub secret_hash: String,
    pub role: String,
    pub created_at: UnixSeconds,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentTokenRecord {
    pub id: String,
    pub secret_hash: String,
    pub description: String,
    pub created_by: String,
    pub created_at: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub used_at: Option<UnixSeconds>,
    pub used_by_node_id: Option<String>,
    pub revoked_at: Option<UnixSeconds>,
}

/// Why an enrollment token was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("enrollment token secret does not match (forged or mistyped token)")]
    WrongSecret,
    #[error("enrollment token was already used")]
    AlreadyUsed,
    #[error("enrollment token has expired")]
    Expired,
    #[error("enrollment token was revoked")]
    Revoked,
}

impl TokenRejection {
    /// Short machine-readable reason for the audit log and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::WrongSecret => "wrong_secret",
            Self::AlreadyUsed => "already_used",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    Ready,
    Unavailable,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Unavailable => "unavailable",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "ready" => Some(Self::Ready),
            "unavailable" => Some(Self::Unavailable),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub state: NodeState,
    pub cordoned: bool,
    pub draining: bool,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    /// The agent's last reported inventory as JSON; empty object before the first session.
    pub inventory_json: String,
    pub desired_generation: u64,
    pub applied_generation: u64,
    pub enrolled_at: UnixSeconds,
    pub state_changed_at: UnixSeconds,
    pub certificate_serial: String,
    pub certificate_not_after: UnixSeconds,
    /// The models the node was assigned, in deployment-name order.
    pub desired_models: Vec<AssignedModel>,
}

/// What enrollment stores about a new node.
#[derive(Clone, Debug)]
pub struct NewNode {
    pub id: String,
    pub requested_name: String,
    pub agent_version: String,
    pub certificate_serial: String,
    pub certificate_not_after: UnixSeconds,
}

/// One audit event before it is chained.
#[derive(Clone, Debug)]
pub struct NewAuditEvent {
    pub at: UnixSeconds,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub details: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: UnixSeconds,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub details: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Hash of the (empty) event before the first one.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl AuditRecord {
    /// The chain hash: sha256 over every field but `hash` itself, each length-prefixed so
    /// that no two different events serialise to the same bytes.
    pub fn chain_hash(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.seq.to_be_bytes());
        h.update(self.at.to_be_bytes());
        for field in [
            &self.actor,
            &self.action,
            &self.target,
            &self.outcome,
            &self.details,
            &self.prev_hash,
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        hex::encode(h.finalize())
    }

    pub fn hash_is_valid(&self) -> bool {
        self.chain_hash() == self.hash
    }
}

/// A stored artifact, identified by the sha256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRecord {
    pub digest: String,
    pub size_bytes: u64,
    pub file_name: String,
    /// The GGUF pre-parse facts as JSON.
    pub gguf_facts_json: String,
    /// The signature bundle as pushed (JSON); empty when unsigned.
    pub signature_bundle: String,
    pub signer: String,
    pub verification: String,
    pub created_at: UnixSeconds,
    pub created_by: String,
    pub revoked_at: Option<UnixSeconds>,
    pub revoked_reason: Option<String>,
    pub revoked_by: Option<String>,
}

/// A name and version pointing at an artifact, with the artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRecord {
    pub name: String,
    pub version: String,
    pub created_at: UnixSeconds,
    pub created_by: String,
    pub artifact: ArtifactRecord,
}

/// Why a model version could not be registered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegisterConflict {
    #[error("{name}@{version} already names a different artifact ({existing_digest})")]
    VersionTaken {
        name: String,
        version: String,
        existing_digest: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustAnchorRecord {
    pub id: String,
    /// `public_key` or `certificate_root`.
    pub kind: String,
    pub pem: String,
    pub identity: String,
    pub name_pattern: String,
    pub description: String,
    pub fingerprint: String,
    pub created_at: UnixSeconds,
    pub created_by: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsignedAllowanceRecord {
    pub name_pattern: String,
    pub reason: String,
    pub created_at: UnixSeconds,
    pub created_by: String,
}

/// A deployment: a verified artifact to run on the nodes its selector matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentRecord {
    /// Also the model name clients use in the OpenAI API.
    pub name: String,
    pub model_name: String,
    pub model_version: String,
    pub digest: String,
    /// `key=value,…` over node labels, `name=NODE`, or `*` for every node.
    pub selector: String,
    pub replicas: u32,
    pub slots: u32,
    pub context_per_slot: u32,
    /// Layers to offload to a GPU; -1: chosen by the agent from free VRAM.
    pub gpu_layers: i32,
    pub created_at: UnixSeconds,
    pub updated_at: UnixSeconds,
    pub created_by: String,
    /// Replicas a rollout may take down at once.
    pub max_unavailable: u32,
    /// The last rollout (from the model before to `digest`); `None` before the first.
    pub rollout: Option<Rollout>,
}

impl DeploymentRecord {
    /// The settings every replica is to run with.
    pub fn settings(&self) -> ServingSettings {
        ServingSettings {
            slots: self.slots,
            context_per_slot: self.context_per_slot,
            gpu_layers: self.gpu_layers,
        }
    }

    pub fn set_settings(&mut self, s: ServingSettings) {
        self.slots = s.slots;
        self.context_per_slot = s.context_per_slot;
        self.gpu_layers = s.gpu_layers;
    }
}

/// How a replica runs its model: changing these restarts the replica, so a change rolls out
/// node by node like a new model does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServingSettings {
    pub slots: u32,
    pub context_per_slot: u32,
    /// -1: chosen by the agent from free VRAM.
    pub gpu_layers: i32,
}

impl std::fmt::Display for ServingSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "slots {}, ctx {}, gpu-layers ",
            self.slots, self.context_per_slot
        )?;
        match self.gpu_layers {
            layers if layers < 0 => write!(f, "auto"),
            layers => write!(f, "{layers}"),
        }
    }
}

/// A model by name, version and digest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    pub digest: String,
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Replacing replicas node by node.
    Progressing,
    /// Every replica runs the new model and answered its probe.
    Complete,
    /// Every replica went back to `from`.
    RolledBack,
    /// A step failed, or an admin asked: replicas return to `from` node by node.
    RollingBack,
}

impl RolloutPhase {
    /// Whether replicas are still being moved (in either direction).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Progressing | Self::RollingBack)
    }
}

/// A change of a deployment's model or serving settings, replica by replica. Kept with the
/// deployment, so a control plane restarted mid-way carries on where it stopped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    pub phase: RolloutPhase,
    pub from: ModelRef,
    pub to: ModelRef,
    /// The settings rolled from and to. `None` in rollouts stored before settings rolled
    /// (they changed only the model): the deployment's settings held on both sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_settings: Option<ServingSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_settings: Option<ServingSettings>,
    pub started_at: UnixSeconds,
    pub finished_at: Option<UnixSeconds>,
    pub started_by: String,
    /// The nodes switched to `to`, by node id.
    pub steps: BTreeMap<String, RolloutStep>,
    /// Why it was rolled back, when it was.
    pub message: String,
    /// When a control plane last timed the steps (stored every few seconds while the
    /// rollout is active): after a restart, the time from then until the new control plane
    /// started is downtime, which does not count against a step. `None` in rollouts stored
    /// before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<UnixSeconds>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RolloutStep {
    pub node_name: String,
    pub started_at: UnixSeconds,
    /// When the new model was ready and answered its probe.
    pub verified_at: Option<UnixSeconds>,
}

/// One model a node was assigned (the models part of its desired state), as the control
/// plane decided it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssignedModel {
    pub deployment: String,
    pub digest: String,
    pub slots: u32,
    pub context_per_slot: u32,
    pub gpu_layers: i32,
}
