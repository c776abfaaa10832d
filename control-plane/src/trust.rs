//! The trust policy: which keys or certificate roots may sign which model names, and which
//! names may (for development, visibly and audited) be accepted unsigned. Loaded from the
//! database for every decision, so changes take effect without a restart.

use steward_artifact::digest::Sha256Hex;
pub use steward_artifact::policy::{Acceptance, PolicyRefusal, pattern_matches};
use steward_artifact::policy::{Policy, ScopedAnchor};
use steward_artifact::signing::TrustAnchor;
use steward_db::{Store, TrustAnchorRecord, UnsignedAllowanceRecord};

pub const KIND_PUBLIC_KEY: &str = "public_key";
pub const KIND_CERTIFICATE_ROOT: &str = "certificate_root";

/// The policy as stored now.
#[derive(Clone, Debug, Default)]
pub struct TrustPolicy {
    pub anchors: Vec<TrustAnchorRecord>,
    pub unsigned: Vec<UnsignedAllowanceRecord>,
}

impl TrustPolicy {
    pub async fn load(store: &Store) -> Result<Self, steward_db::DbError> {
        Ok(Self {
            anchors: store.list_trust_anchors().await?,
            unsigned: store.list_unsigned_allowances().await?,
        })
    }

    /// The policy in the form decisions are made in (here and, sent, on agents).
    pub fn decision_policy(&self) -> Policy {
        Policy {
            anchors: self
                .anchors
                .iter()
                .map(|a| ScopedAnchor {
                    anchor: anchor(a),
                    name_pattern: a.name_pattern.clone(),
                })
                .collect(),
            unsigned_allowed: self
                .unsigned
                .iter()
                .map(|a| a.name_pattern.clone())
                .collect(),
        }
    }

    /// Decides whether `name`, made of `files`, with an optional signature bundle, is trusted.
    pub fn evaluate(
        &self,
        name: &str,
        files: &[(String, Sha256Hex)],
        bundle: Option<&[u8]>,
    ) -> Result<Acceptance, PolicyRefusal> {
        self.decision_policy().evaluate(name, files, bundle)
    }
}

fn anchor(record: &TrustAnchorRecord) -> TrustAnchor {
    if record.kind == KIND_CERTIFICATE_ROOT {
        TrustAnchor::CertificateRoot {
            pem: record.pem.clone(),
            identity: (!record.identity.is_empty()).then(|| record.identity.clone()),
        }
    } else {
        TrustAnchor::PublicKey {
            pem: record.pem.clone(),
        }
    }
}
