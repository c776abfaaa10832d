//! The real agent: enroll on first start, then keep the session with the control plane.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use steward_proto::transport::Windows;
use tokio_util::sync::CancellationToken;

use crate::artifacts::ArtifactCache;
use crate::assignments::{Assignments, LoadDefaults};
use crate::identity::{FileIdentityStore, IdentityError, IdentityStore, enroll};
use crate::inventory::HostProbe;
use crate::inventory::InventoryProbe;
use crate::reconciler::Reconciler;
use crate::serving::{ModelReporter, NoModels, Serving, ServingConfig, ServingError};
use crate::session::{SessionConfig, SessionParts, SessionStats, maintain};
use crate::state::{FileStateStore, StateError};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `https://HOST:PORT` of the control plane's gRPC listener.
    pub control_plane: String,
    pub data_dir: PathBuf,
    /// Needed only until the node is enrolled.
    pub enrollment_token: Option<String>,
    /// Name to request at enrollment (default: the hostname).
    pub name: Option<String>,
    pub heartbeat_interval: Duration,
    pub inventory_interval: Duration,
    /// Models to load at start and the API serving them; none for an agent without
    /// inference (it cannot take deployments).
    pub serving: Option<ServingConfig>,
    /// Disk the artifact cache may use before unassigned artifacts are evicted.
    pub cache_budget_bytes: u64,
    /// Threads for models loaded from deployments (default: every core).
    pub threads: Option<u32>,
    /// Cap on artifact pull speed, bytes per second.
    pub pull_rate_limit: Option<u64>,
    /// HTTP/2 receive windows of artifact pulls.
    pub pull_windows: Windows,
    /// The most memory the control plane may give to models on this node (default: the
    /// node's own memory; 0 is no limit either); the agent itself loads assigned models
    /// only up to it.
    pub memory_limit_bytes: Option<u64>,
}

impl AgentConfig {
    pub fn new(control_plane: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            control_plane: control_plane.into(),
            data_dir: data_dir.into(),
            enrollment_token: None,
            name: None,
            heartbeat_interval: Duration::from_secs(5),
            inventory_interval: Duration::from_secs(60),
            serving: None,
            cache_budget_bytes: 100 << 30,
            threads: None,
            pull_rate_limit: None,
            pull_windows: Windows::default(),
            memory_limit_bytes: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot use data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("enrollment failed")]
    Enroll(#[source] IdentityError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot load the last applied desired state")]
    State(#[from] StateError),
    #[error("cannot start inference")]
    Serving(#[from] ServingError),
    #[error("cannot open the artifact cache")]
    Cache(#[from] crate::artifacts::ArtifactError),
}

/// Runs the agent until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AgentError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let identity_store: Arc<dyn IdentityStore> = Arc::new(FileIdentityStore::new(&config.data_dir));
    let identity = match identity_store.load()? {
        Some(identity) => {
            if config.enrollment_token.is_some() {
                tracing::info!(node_id = %identity.node_id, "already enrolled; ignoring the enrollment token");
            }
            identity
        }
        None => {
            let token = config
                .enrollment_token
                .as_deref()
                .ok_or(AgentError::Enroll(IdentityError::NotEnrolled))?;
            let name = config.name.clone().unwrap_or_else(hostname);
            let identity = enroll(&config.control_plane, token, &name, crate::AGENT_VERSION)
                .await
                .map_err(AgentError::Enroll)?;
            identity_store.save(&identity)?;
            tracing::info!(node_id = %identity.node_id, node_name = %identity.node_name, "enrolled");
            identity
        }
    };
    tracing::info!(node_id = %identity.node_id, node_name = %identity.node_name, control_plane = %config.control_plane, "agent starting");
    let reconciler = Arc::new(Reconciler::new(Arc::new(FileStateStore::new(
        &config.data_dir,
    )))?);
    // A limit of 0 bytes would be reported as "no limit" while refusing every model.
    let memory_limit = config.memory_limit_bytes.filter(|&bytes| bytes > 0);
    let probe = Arc::new(HostProbe::new(&config.data_dir).with_memory_limit(memory_limit));
    // The API stops with the agent, also when the agent stops on an error below.
    let api_shutdown = shutdown.child_token();
    let _stop_api = api_shutdown.clone().drop_guard();
    let serving = match config.serving.clone() {
        Some(serving) => {
            let inventory = probe.inventory().await;
            Some(Serving::start(serving, &config.data_dir, &inventory, api_shutdown).await?)
        }
        None => None,
    };
    let models: Arc<dyn ModelReporter> = match &serving {
        Some(s) => s.clone(),
        None => Arc::new(NoModels),
    };
    let cache_changed = Arc::new(tokio::sync::Notify::new());
    let assignments = match &serving {
        Some(serving) => {
            let cache = ArtifactCache::open(&config.data_dir, config.cache_budget_bytes)?
                .with_change_notice(cache_changed.clone())
                .with_rate_limit(config.pull_rate_limit)
                .with_pull_windows(config.pull_windows);
            let runner = Assignments::new(
                serving.clone(),
                cache,
                identity_store.clone(),
                config.control_plane.clone(),
                LoadDefaults {
                    threads: config.threads,
                    memory_limit_bytes: memory_limit,
                    ..LoadDefaults::default()
                },
            );
            Some(tokio::spawn(
                runner.run(reconciler.watch(), shutdown.clone()),
            ))
        }
        None => {
            if !reconciler.applied().models.is_empty() {
                tracing::warn!(
                    "models are assigned to this node, but it runs without inference (start it with --api-listen)"
                );
            }
            None
        }
    };
    let parts = SessionParts {
        identity: identity_store,
        probe,
        reconciler,
        stats: Arc::new(SessionStats::default()),
        models,
        cache_changed,
    };
    let mut session = SessionConfig::new(&config.control_plane);
    session.heartbeat_interval = config.heartbeat_interval;
    session.inventory_interval = config.inventory_interval;
    maintain(session, parts, shutdown).await;
    if let Some(task) = assignments {
        let _ = task.await;
    }
    if let Some(serving) = serving {
        serving.unload_all().await;
        serving.api_closed().await;
    }
    Ok(())
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}
