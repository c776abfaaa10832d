//! Many agents in one process (ARCHITECTURE.md invariant 7): synthetic hardware, in-memory
//! identity and state, and the real enrollment, session and reconciler code.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use steward_proto::admin::v1::CreateEnrollmentTokenRequest;
use steward_proto::admin::v1::admin_service_client::AdminServiceClient;
use steward_proto::transport::{ServerTrust, TransportError, client_config, connect};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::identity::{IdentityError, IdentityStore, MemoryIdentityStore, enroll};
use crate::inventory::SyntheticProbe;
use crate::reconciler::Reconciler;
use crate::session::{SessionConfig, SessionParts, SessionStats, maintain};
use crate::state::MemoryStateStore;

#[derive(Clone, Debug)]
pub struct SimulationConfig {
    pub endpoint: String,
    /// Admin credential used to mint one enrollment token per simulated agent.
    pub admin_credential: String,
    pub ca_certificate_pem: String,
    pub count: usize,
    pub heartbeat_interval: Duration,
    pub name_prefix: String,
    /// Enrollments in flight at once.
    pub enroll_concurrency: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("creating an enrollment token failed: {0}")]
    Token(String),
    #[error("simulated agent {index} could not enroll")]
    Enroll {
        index: usize,
        #[source]
        source: IdentityError,
    },
}

/// Running simulated agents.
#[derive(Debug)]
pub struct Simulation {
    pub stats: Arc<SessionStats>,
    pub node_ids: Vec<String>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Simulation {
    /// Enrolls `count` agents and starts their sessions.
    pub async fn start(config: SimulationConfig) -> Result<Self, SimulationError> {
        let tls = client_config(&ServerTrust::CaPem(config.ca_certificate_pem.clone()), None)?;
        let admin = AdminServiceClient::new(connect(&config.endpoint, tls).await?);
        let authorization: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", config.admin_credential)
                .parse()
                .map_err(|_| {
                    SimulationError::Token("admin credential is not header-safe".into())
                })?;

        let identities: Vec<_> = futures::stream::iter(0..config.count)
            .map(|index| {
                let mut admin = admin.clone();
                let authorization = authorization.clone();
                let config = &config;
                async move {
                    let mut request = tonic::Request::new(CreateEnrollmentTokenRequest {
                        ttl_seconds: 3600,
                        description: format!("simulated agent {index}"),
                    });
                    request
                        .metadata_mut()
                        .insert("authorization", authorization);
                    let token = admin
                        .create_enrollment_token(request)
                        .await
                        .map_err(|s| SimulationError::Token(s.message().to_owned()))?
                        .into_inner()
                        .token;
                    let name = format!("{}-{index:05}", config.name_prefix);
                    enroll(&config.endpoint, &token, &name, crate::AGENT_VERSION)
                        .await
                        .map_err(|source| SimulationError::Enroll { index, source })
                }
            })
            .buffered(config.enroll_concurrency.max(1))
            .collect()
            .await;

        let stats = Arc::new(SessionStats::default());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut node_ids = Vec::with_capacity(config.count);
        for (index, identity) in identities.into_iter().enumerate() {
            let identity = identity?;
            node_ids.push(identity.node_id.clone());
            let store = MemoryIdentityStore::default();
            store
                .save(&identity)
                .map_err(|source| SimulationError::Enroll { index, source })?;
            let reconciler = Reconciler::new(Arc::new(MemoryStateStore::default()))
                .expect("an empty in-memory state store always loads");
            let parts = SessionParts {
                identity: Arc::new(store),
                probe: Arc::new(SyntheticProbe::new(index as u64)),
                reconciler: Arc::new(reconciler),
                stats: stats.clone(),
                models: Arc::new(crate::serving::NoModels),
                cache_changed: Arc::default(),
            };
            let mut session = SessionConfig::new(&config.endpoint);
            session.heartbeat_interval = config.heartbeat_interval;
            tasks.spawn(maintain(session, parts, shutdown.child_token()));
        }
        Ok(Self {
            stats,
            node_ids,
            shutdown,
            tasks,
        })
    }

    /// Sessions established right now.
    pub fn connected(&self) -> i64 {
        self.stats
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
