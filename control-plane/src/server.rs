//! Start-up and shutdown of the control plane: storage, CA, bootstrap credential, the gRPC
//! (TLS) and HTTP listeners, and the liveness sweeper.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use serde_json::json;
use steward_db::{AdminCredentialRecord, CaRecord, Store};
use steward_proto::admin::v1::admin_service_server::AdminServiceServer;
use steward_proto::admin::v1::audit_service_server::AuditServiceServer;
use steward_proto::admin::v1::deployment_service_server::DeploymentServiceServer;
use steward_proto::admin::v1::model_service_server::ModelServiceServer;
use steward_proto::admin::v1::trust_service_server::TrustServiceServer;
use steward_proto::enrollment::{AdminCredential, hash_secret};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::blobs::BlobStore;
use crate::deployments::Deployments;
use crate::fleet::{Actor, Fleet, FleetSettings, audit, now_unix};
use crate::grpc::artifact_download::AgentServiceWithDownloads;
use crate::grpc::deployments::DeploymentApi;
use crate::grpc::models::{AuditApi, ModelApi, TrustApi};
use crate::grpc::{admin::AdminApi, agent::AgentApi};
use crate::metrics::Metrics;
use crate::pki::{CertificateAuthority, PkiError};
use crate::placement::Strategy;
use crate::registry::{Registry, RegistrySettings};

/// Largest gRPC message a push may carry (the CLI sends 1 MiB chunks; headers carry the
/// signature bundle).
const PUSH_MESSAGE_LIMIT: usize = 16 << 20;
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 << 10;

/// Everything the control plane needs to start, minus its sockets.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds the SQLite database (unless `database_url` is set) and `ca.pem`.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; default: SQLite under `data_dir`.
    pub database_url: Option<String>,
    /// Extra DNS names or IPs for the server certificate (localhost and loopback IPs are
    /// always included).
    pub server_names: Vec<String>,
    /// A session with no message for this long is ended and its node marked unavailable.
    pub heartbeat_timeout: Duration,
    pub fleet: FleetSettings,
    pub registry: RegistrySettings,
    /// How new replicas are placed.
    pub placement: Strategy,
    /// How long one rollout step may take to be ready and answer its probe.
    pub rollout_step_timeout: Duration,
    /// A gRPC connection that has not completed its TLS handshake after this long is closed,
    /// so clients that connect and say nothing cannot pile up open sockets and tasks.
    pub tls_handshake_timeout: Duration,
    /// A gRPC connection from which nothing has arrived for this long is closed (see
    /// `read_deadline`); longer than the 30 s keep-alive ping interval plus its timeout.
    pub grpc_idle_timeout: Duration,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database_url: None,
            server_names: Vec::new(),
            heartbeat_timeout: Duration::from_secs(15),
            fleet: FleetSettings::default(),
            registry: RegistrySettings::default(),
            placement: Strategy::default(),
            rollout_step_timeout: Duration::from_secs(30 * 60),
            tls_handshake_timeout: Duration::from_secs(10),
            grpc_idle_timeout: Duration::from_secs(60),
        }
    }

    pub fn effective_database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("steward.db").display()
            )
        })
    }
}

/// The sockets the control plane serves on; tests bind `127.0.0.1:0`.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot use data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage is unavailable")]
    Db(#[from] steward_db::DbError),
    #[error("certificate authority")]
    Pki(#[from] PkiError),
    #[error("TLS configuration")]
    Tls(#[from] tonic::transport::Error),
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("listener")]
    Io(#[from] std::io::Error),
    #[error("blob store")]
    Blobs(#[from] crate::blobs::BlobError),
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub ca_certificate_pem: String,
    pub ca_sha256: String,
    /// Set only on the first start against an empty database: the bootstrap admin
    /// credential, which is never stored in plain text and cannot be shown again.
    pub bootstrap_admin_credential: Option<String>,
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl ControlPlane {
    pub async fn start(config: Config, listeners: Listeners) -> Result<Self, StartError> {
        prepare_data_dir(&config.data_dir)?;
        let store = Store::connect(&config.effective_database_url()).await?;
        tracing::info!(backend = store.backend_name(), "database ready");
        let ca = Arc::new(load_or_create_ca(&store).await?);
        write_ca_file(&config.data_dir, ca.certificate_pem())?;
        let bootstrap_admin_credential = bootstrap_admin(&store).await?;
        let reset = store.mark_all_nodes_unavailable(now_unix()).await?;
        if reset > 0 {
            tracing::info!(nodes = reset, "nodes await their agents' sessions");
        }

        let blobs = BlobStore::open(&config.data_dir)?;
        let registry = Arc::new(Registry::new(store.clone(), blobs, config.registry.clone()));
        let metrics = Arc::new(Metrics::default());
        let fleet = Arc::new(Fleet::new(store, ca.clone(), metrics, config.fleet.clone()));
        let deployments = Arc::new(Deployments::new(
            fleet.clone(),
            registry.clone(),
            config.placement,
            config.rollout_step_timeout,
        ));
        let shutdown = CancellationToken::new();

        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        names.extend(config.server_names.iter().cloned());
        let (chain, key) =
            ca.issue_server_certificate(&names, Duration::from_secs(365 * 24 * 3600))?;
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(chain, key))
            .client_ca_root(Certificate::from_pem(ca.certificate_pem()))
            .client_auth_optional(true)
            .timeout(config.tls_handshake_timeout);
        // Both reflection versions: older grpcurl/grpc_cli builds only speak v1alpha.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(steward_proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(steward_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let grpc_addr = listeners.grpc.local_addr()?;
        let http_addr = listeners.http.local_addr()?;
        let grpc = Server::builder()
            .tls_config(tls)?
            // Large HTTP/2 windows so a model push is not throttled to 64 KiB per round trip.
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(AgentServiceWithDownloads::new(AgentApi::new(
                fleet.clone(),
                registry.clone(),
                deployments.clone(),
            )))
            .add_service(AdminServiceServer::new(AdminApi::new(
                fleet.clone(),
                deployments.clone(),
            )))
            .add_service(
                ModelServiceServer::new(ModelApi::new(
                    fleet.clone(),
                    registry.clone(),
                    deployments.clone(),
                ))
                .max_decoding_message_size(PUSH_MESSAGE_LIMIT),
            )
            .add_service(TrustServiceServer::new(TrustApi::new(
                fleet.clone(),
                registry.clone(),
                deployments.clone(),
            )))
            .add_service(DeploymentServiceServer::new(DeploymentApi::new(
                fleet.clone(),
                deployments.clone(),
            )))
            .add_service(AuditServiceServer::new(AuditApi::new(fleet.clone())))
            .add_service(reflection)
            .add_service(reflection_alpha);

        let mut tasks = Vec::new();
        // No Nagle on accepted sockets (tonic's own `tcp_nodelay` setting only reaches sockets
        // it binds itself). Without it, the end of a response waited for the client's delayed
        // ACK: 40 ms added to about half of all CLI calls and pushes. Reads under TLS carry
        // the idle deadline (`read_deadline`).
        let idle = config.grpc_idle_timeout;
        let incoming = tonic::transport::server::TcpIncoming::from(listeners.grpc)
            .with_nodelay(Some(true))
            .map_ok(move |tcp| crate::read_deadline::ReadDeadline::new(tcp, idle));
        let grpc_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = grpc
                .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled_owned())
                .await
            {
                tracing::error!(error = %steward_telemetry::chain(&e), "gRPC server failed");
            }
        }));
        let http_shutdown = shutdown.clone();
        let router = crate::http::router(fleet.clone());
        let http_listener = listeners.http;
        tasks.push(tokio::spawn(async move {
            let head_timeout = steward_proto::http::HEAD_TIMEOUT;
            let stopped = http_shutdown.cancelled_owned();
            if let Err(e) =
                steward_proto::http::serve(http_listener, router, head_timeout, stopped).await
            {
                tracing::error!(error = %steward_telemetry::chain(&e), "HTTP server failed");
            }
        }));
        tasks.push(tokio::spawn(deployments.clone().run(shutdown.clone())));
        tasks.push(tokio::spawn(sweep_silent_sessions(
            fleet.clone(),
            config.heartbeat_timeout,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(retry_unrecorded_nodes(
            fleet.clone(),
            shutdown.clone(),
        )));
        tracing::info!(%grpc_addr, %http_addr, ca_sha256 = %ca.sha256_hex(), "control plane serving");
        Ok(Self {
            grpc_addr,
            http_addr,
            ca_certificate_pem: ca.certificate_pem().to_owned(),
            ca_sha256: ca.sha256_hex(),
            bootstrap_admin_credential,
            fleet,
            registry,
            shutdown,
            tasks,
        })
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// `https://127.0.0.1:PORT` for clients on this machine.
    pub fn grpc_endpoint(&self) -> String {
        format!("https://{}", self.grpc_addr)
    }

    /// Stops serving: ends agent sessions, then the listeners (bounded by a grace period).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.fleet.sessions.cancel_all();
        // One grace period for everything: idle client connections (an admin's open channel)
        // can hold gRPC's graceful shutdown, and a restart should not wait on each in turn.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Runs until `shutdown` resolves. Binaries use this; tests use [`ControlPlane::start`].
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
    on_started: impl FnOnce(&ControlPlane),
) -> Result<(), StartError> {
    let control_plane = ControlPlane::start(config, listeners).await?;
    on_started(&control_plane);
    shutdown.await;
    tracing::info!("shutting down");
    control_plane.stop().await;
    Ok(())
}

/// Every second, stores unavailable the nodes whose session ended but whose write failed.
/// Apart from [`sweep_silent_sessions`], which a slow database must not hold up.
async fn retry_unrecorded_nodes(fleet: Arc<Fleet>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => fleet.store_unrecorded_nodes_unavailable().await,
        }
    }
}

async fn sweep_silent_sessions(fleet: Arc<Fleet>, timeout: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(timeout / 2));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let n = fleet.sessions.cancel_silent(timeout);
                if n > 0 {
                    tracing::warn!(sessions = n, timeout = ?timeout, "ended silent agent sessions");
                }
            }
        }
    }
}

fn prepare_data_dir(path: &Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

fn write_ca_file(data_dir: &Path, pem: &str) -> Result<(), StartError> {
    let path = data_dir.join("ca.pem");
    let tmp = data_dir.join("ca.pem.tmp");
    std::fs::write(&tmp, pem)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| StartError::DataDir { path, source })
}

async fn load_or_create_ca(store: &Store) -> Result<CertificateAuthority, StartError> {
    if let Some(stored) = store.load_ca().await? {
        return Ok(CertificateAuthority::from_pem(
            &stored.certificate_pem,
            &stored.private_key_pem,
        )?);
    }
    let ca = CertificateAuthority::generate()?;
    let stored = store
        .insert_ca_if_absent(
            CaRecord {
                certificate_pem: ca.certificate_pem().to_owned(),
                private_key_pem: ca.private_key_pem(),
                created_at: now_unix(),
            },
            audit(
                &Actor::System,
                "ca.create",
                &ca.sha256_hex(),
                "success",
                json!({}),
            ),
        )
        .await?;
    tracing::info!("created the fleet certificate authority");
    Ok(CertificateAuthority::from_pem(
        &stored.certificate_pem,
        &stored.private_key_pem,
    )?)
}

async fn bootstrap_admin(store: &Store) -> Result<Option<String>, StartError> {
    if store.admin_credential_count().await? > 0 {
        return Ok(None);
    }
    let credential = AdminCredential::generate();
    store
        .insert_admin_credential(
            AdminCredentialRecord {
                id: credential.id.clone(),
                name: "bootstrap".to_owned(),
                secret_hash: hash_secret(&credential.secret),
                role: "admin".to_owned(),
                created_at: now_unix(),
            },
            audit(
                &Actor::System,
                "admin_credential.bootstrap",
                &credential.id,
                "success",
                json!({"role": "admin"}),
            ),
        )
        .await?;
    Ok(Some(credential.to_string()))
}
