//! The node's cryptographic identity: enrollment with a single-use token (pinning the
//! control plane's CA by the hash the token carries), the private key that never leaves the
//! node, and renewal of the short-lived client certificate.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde::{Deserialize, Serialize};
use steward_proto::agent::v1::agent_service_client::AgentServiceClient;
use steward_proto::agent::v1::{EnrollRequest, RenewCertificateRequest};
use steward_proto::enrollment::EnrollmentToken;
use steward_proto::transport::{
    ClientIdentity, ServerTrust, TransportError, Windows, client_config, connect,
    connect_with_windows, parse_certs,
};
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "this node is not enrolled yet: pass --token with an enrollment token (`steward token create`)"
    )]
    NotEnrolled,
    #[error("invalid enrollment token")]
    BadToken(#[from] steward_proto::enrollment::TokenFormatError),
    #[error("cannot reach the control plane")]
    Transport(#[from] TransportError),
    #[error("the control plane refused: {0}")]
    Refused(String),
    #[error("the control plane's CA (sha256 {actual}) is not the one the token pins ({expected})")]
    WrongCa { expected: String, actual: String },
    #[error("key generation failed")]
    Key(#[from] rcgen::Error),
    #[error("cannot store the node identity at {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stored node identity at {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Everything the node needs to talk to the control plane over mTLS.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: String,
    pub node_name: String,
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub ca_certificate_pem: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("node_name", &self.node_name)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    pub fn client(&self) -> ClientIdentity {
        ClientIdentity {
            certificate_pem: self.certificate_pem.clone(),
            private_key_pem: self.private_key_pem.clone(),
        }
    }

    /// Renew once two thirds of the certificate's lifetime have passed.
    pub fn renewal_due_unix(&self) -> i64 {
        let lifetime = (self.not_after_unix - self.not_before_unix).max(0);
        self.not_before_unix + lifetime * 2 / 3
    }

    /// An mTLS channel to the control plane with this identity.
    pub async fn channel(
        &self,
        endpoint: &str,
        windows: Windows,
    ) -> Result<Channel, TransportError> {
        let config = client_config(
            &ServerTrust::CaPem(self.ca_certificate_pem.clone()),
            Some(&self.client()),
        )?;
        connect_with_windows(endpoint, config, windows).await
    }
}

/// Where the identity is kept between runs.
pub trait IdentityStore: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<Option<NodeIdentity>, IdentityError>;
    fn save(&self, identity: &NodeIdentity) -> Result<(), IdentityError>;
}

/// `identity.json` (mode 0600) in the agent's data directory.
#[derive(Debug)]
pub struct FileIdentityStore {
    path: PathBuf,
}

impl FileIdentityStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join("identity.json"),
        }
    }
}

impl IdentityStore for FileIdentityStore {
    fn load(&self) -> Result<Option<NodeIdentity>, IdentityError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| IdentityError::Corrupt {
                        path: self.path.clone(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IdentityError::Store {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn save(&self, identity: &NodeIdentity) -> Result<(), IdentityError> {
        let bytes =
            serde_json::to_vec_pretty(identity).map_err(|source| IdentityError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        crate::state::write_atomically(&self.path, &bytes, 0o600).map_err(|source| {
            IdentityError::Store {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// In memory, for simulated agents.
#[derive(Debug, Default)]
pub struct MemoryIdentityStore {
    identity: Mutex<Option<NodeIdentity>>,
}

impl IdentityStore for MemoryIdentityStore {
    fn load(&self) -> Result<Option<NodeIdentity>, IdentityError> {
        Ok(self
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    fn save(&self, identity: &NodeIdentity) -> Result<(), IdentityError> {
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity.clone());
        Ok(())
    }
}

/// A fresh key pair and a CSR for it.
fn key_and_csr(name: &str) -> Result<(KeyPair, Vec<u8>), IdentityError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

fn refused(status: tonic::Status) -> IdentityError {
    IdentityError::Refused(status.message().to_owned())
}

/// Enrolls this node: pins the CA named by the token, proves possession of the token, and
/// receives a client certificate for a new node ID.
pub async fn enroll(
    endpoint: &str,
    token: &str,
    requested_name: &str,
    agent_version: &str,
) -> Result<NodeIdentity, IdentityError> {
    let token = EnrollmentToken::parse(token)?;
    let config = client_config(&ServerTrust::PinnedCaSha256(token.ca_sha256.clone()), None)?;
    let channel = connect(endpoint, config).await?;
    let (key, csr_der) = key_and_csr(requested_name)?;
    let response = AgentServiceClient::new(channel)
        .enroll(EnrollRequest {
            token: token.credential(),
            csr_der,
            requested_name: requested_name.to_owned(),
            agent_version: agent_version.to_owned(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    // The TLS handshake already proved the server holds a key certified by the pinned CA;
    // also check the CA it hands us to store is that same CA.
    let ca_der = parse_certs(&response.ca_certificate_pem, "the control plane's CA")?;
    let actual = steward_proto::certificate_sha256_hex(&ca_der[0]);
    if actual != token.ca_sha256 {
        return Err(IdentityError::WrongCa {
            expected: token.ca_sha256,
            actual,
        });
    }
    Ok(NodeIdentity {
        node_id: response.node_id,
        node_name: response.node_name,
        certificate_pem: response.certificate_pem,
        private_key_pem: key.serialize_pem(),
        ca_certificate_pem: response.ca_certificate_pem,
        not_before_unix: now_unix(),
        not_after_unix: response.not_after_unix,
    })
}

/// Obtains a new certificate (with a new key) over an authenticated channel.
pub async fn renew(
    channel: Channel,
    current: &NodeIdentity,
) -> Result<NodeIdentity, IdentityError> {
    let (key, csr_der) = key_and_csr(&current.node_name)?;
    let response = AgentServiceClient::new(channel)
        .renew_certificate(RenewCertificateRequest { csr_der })
        .await
        .map_err(refused)?
        .into_inner();
    Ok(NodeIdentity {
        certificate_pem: response.certificate_pem,
        private_key_pem: key.serialize_pem(),
        not_before_unix: now_unix(),
        not_after_unix: response.not_after_unix,
        ..current.clone()
    })
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> NodeIdentity {
        NodeIdentity {
            node_id: "id".into(),
            node_name: "n".into(),
            certificate_pem: "c".into(),
            private_key_pem: "secret key".into(),
            ca_certificate_pem: "ca".into(),
            not_before_unix: 1_000,
            not_after_unix: 1_300,
        }
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        assert_eq!(identity().renewal_due_unix(), 1_200);
    }

    #[test]
    fn identity_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileIdentityStore::new(dir.path());
        assert!(store.load().unwrap().is_none());
        store.save(&identity()).unwrap();
        assert_eq!(store.load().unwrap(), Some(identity()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("identity.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{:?}", identity()).contains("secret key"));
    }
}
