//! A control plane in-process with real agents over real TLS gRPC on 127.0.0.1:0, against
//! SQLite and PostgreSQL. Each scenario runs on both backends.

use std::time::{Duration, Instant};

use steward_node_agent::identity::{FileIdentityStore, IdentityStore, enroll};
use steward_proto::admin::v1::{
    ListEnrollmentTokensRequest, ListNodesRequest, NodeRef, NodeState, RevokeEnrollmentTokenRequest,
};
use steward_proto::agent::v1::agent_service_client::AgentServiceClient;
use steward_proto::agent::v1::{AgentMessage, Hello, agent_message};
use steward_proto::transport::Windows;
use steward_tests::{Backend, TestAgent, TestControlPlane, TestDb, init_logging};

steward_tests::on_both_backends!(
    agent_enrolls_and_its_node_becomes_ready_with_its_inventory,
    used_expired_revoked_and_forged_tokens_are_refused_and_audited,
    node_goes_unavailable_when_its_agent_stops_and_returns_with_the_same_id,
    silent_agent_is_marked_unavailable_after_the_heartbeat_timeout,
    drain_reaches_the_agent_as_a_new_generation_it_persists_and_acks,
    agent_renews_its_certificate_over_the_session_before_it_expires,
    heartbeats_cost_no_database_writes,
    agents_reconnect_after_a_control_plane_restart,
);

async fn agent_enrolls_and_its_node_becomes_ready_with_its_inventory(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, node_id) = TestAgent::start_ready(&cp.endpoint, &admin, dir.path()).await;

    let node = admin.node("test-node").await;
    assert_eq!(node.id, node_id, "nodes can be found by name");
    assert!(node.connected);
    let inventory = node.inventory.expect("inventory reported");
    assert_eq!(
        inventory.accelerator, "cpu",
        "no GPU here: reported honestly"
    );
    assert!(inventory.cpu.unwrap().logical_cores >= 1);
    assert!(inventory.memory_total_bytes > 0);
    assert!(inventory.disk_free_bytes > 0);
    assert!(node.certificate_not_after_unix > 0);

    let token_state = admin
        .client
        .clone()
        .list_enrollment_tokens(admin.request(ListEnrollmentTokensRequest {}))
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(token_state.len(), 1);
    assert_eq!(token_state[0].used_by_node_id, node_id);

    agent.stop().await.unwrap();
    cp.stop().await;
    db.cleanup().await;
}

async fn used_expired_revoked_and_forged_tokens_are_refused_and_audited(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let refused = |token: String| {
        let endpoint = cp.endpoint.clone();
        async move {
            enroll(&endpoint, &token, "n", "test")
                .await
                .expect_err("enrollment must be refused")
                .to_string()
        }
    };

    let used = admin.token(600).await;
    enroll(&cp.endpoint, &used, "first", "test").await.unwrap();
    assert!(refused(used.clone()).await.contains("already used"));

    let expiring = admin.token(1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(refused(expiring).await.contains("expired"));

    let revoked = admin.token(600).await;
    let id = revoked.split('.').nth(1).unwrap().to_owned();
    admin
        .client
        .clone()
        .revoke_enrollment_token(admin.request(RevokeEnrollmentTokenRequest { id }))
        .await
        .unwrap();
    assert!(refused(revoked).await.contains("revoked"));

    // Right id and CA, wrong secret.
    let genuine = admin.token(600).await;
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let fake_secret = "0".repeat(64);
    parts[2] = &fake_secret;
    assert!(refused(parts.join(".")).await.contains("does not match"));

    // A token pinning some other CA: the agent refuses the control plane.
    let mut parts: Vec<String> = admin
        .token(600)
        .await
        .split('.')
        .map(str::to_owned)
        .collect();
    parts[3] = "ab".repeat(32);
    let err = refused(parts.join(".")).await;
    assert!(err.contains("cannot reach the control plane"), "{err}");
    let chain = {
        let e = enroll(&cp.endpoint, &parts.join("."), "n", "t")
            .await
            .unwrap_err();
        steward_telemetry::chain(&e).to_string()
    };
    assert!(
        chain.contains("does not match the CA hash in the enrollment token"),
        "{chain}"
    );

    let denied: Vec<_> = cp
        .store()
        .audit_events()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "node.enroll" && e.outcome == "denied")
        .map(|e| e.details)
        .collect();
    for reason in ["already_used", "expired", "revoked", "wrong_secret"] {
        assert!(
            denied.iter().any(|d| d.contains(reason)),
            "no audited refusal for {reason}: {denied:?}"
        );
    }
    let events = cp.store().audit_events().await.unwrap();
    assert!(events.iter().all(|e| e.hash_is_valid()));
    assert!(
        events
            .windows(2)
            .all(|w| w[1].prev_hash == w[0].hash && w[1].seq == w[0].seq + 1)
    );
    cp.stop().await;
    db.cleanup().await;
}

async fn node_goes_unavailable_when_its_agent_stops_and_returns_with_the_same_id(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, node_id) = TestAgent::start_ready(&cp.endpoint, &admin, dir.path()).await;
    agent.stop().await.unwrap();
    admin
        .wait_for_state(&node_id, NodeState::Unavailable, Duration::from_secs(30))
        .await;
    assert!(!admin.node(&node_id).await.connected);

    // Restart without a token: the stored identity is reused.
    let agent = TestAgent::start(&cp.endpoint, dir.path(), None);
    assert_eq!(agent.node_id().await, node_id);
    admin
        .wait_for_state(&node_id, NodeState::Ready, Duration::from_secs(10))
        .await;
    let nodes = admin
        .client
        .clone()
        .list_nodes(admin.request(ListNodesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1, "a restart must not enroll a second node");
    agent.stop().await.unwrap();
    cp.stop().await;
    db.cleanup().await;
}

/// When storing a node unavailable fails as its session ends, the node would read as ready
/// with no agent behind it, and take replicas it never runs. The control plane stores it
/// unavailable later, unless its agent has reconnected meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_left_ready_without_a_session_is_stored_unavailable_later() {
    init_logging();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, node_id) = TestAgent::start_ready(&cp.endpoint, &admin, dir.path()).await;
    agent.stop().await.unwrap();
    admin
        .wait_for_state(&node_id, NodeState::Unavailable, Duration::from_secs(30))
        .await;
    // What a failed write leaves: the node stored ready, no session, the node remembered.
    let fleet = cp.control_plane.as_ref().unwrap().fleet().clone();
    let inventory = steward_proto::agent::v1::Inventory::default();
    fleet
        .node_connected(&node_id, "test", &inventory, 0)
        .await
        .unwrap();
    assert_eq!(admin.node(&node_id).await.state(), NodeState::Ready);
    fleet.sessions.remember_unrecorded(&node_id);
    admin
        .wait_for_state(&node_id, NodeState::Unavailable, Duration::from_secs(5))
        .await;

    let agent = TestAgent::start(&cp.endpoint, dir.path(), None);
    admin
        .wait_for_state(&node_id, NodeState::Ready, Duration::from_secs(10))
        .await;
    fleet.sessions.remember_unrecorded(&node_id);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        admin.node(&node_id).await.state(),
        NodeState::Ready,
        "a node whose agent reconnected stays ready"
    );
    agent.stop().await.unwrap();
    cp.stop().await;
    db.cleanup().await;
}

/// When an agent's run returns, its inference API no longer listens: the same agent started
/// again at once (in this process, as tests restart agents) can bind its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_has_released_its_api_port() {
    init_logging();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let mut token = Some(admin.token(600).await);
    for _ in 0..5 {
        let api = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let serving = steward_node_agent::serving::ServingConfig {
            listen: api,
            api_keys: vec!["sk-port".into()],
            models: Vec::new(),
        };
        let agent = TestAgent::start_serving(&cp.endpoint, dir.path(), token.take(), Some(serving));
        let node_id = agent.node_id().await;
        admin
            .wait_for_state(&node_id, NodeState::Ready, Duration::from_secs(10))
            .await;
        agent.stop().await.unwrap();
        if let Err(e) = std::net::TcpListener::bind(api) {
            panic!("the stopped agent still holds its API port {api}: {e}");
        }
        admin
            .wait_for_state(&node_id, NodeState::Unavailable, Duration::from_secs(10))
            .await;
    }
    cp.stop().await;
    db.cleanup().await;
}

async fn silent_agent_is_marked_unavailable_after_the_heartbeat_timeout(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await; // heartbeat timeout 3 s
    let admin = cp.admin().await;
    let identity = enroll(&cp.endpoint, &admin.token(600).await, "quiet", "test")
        .await
        .unwrap();
    // Open a session, say Hello, then never send another message while keeping TCP open.
    let channel = identity
        .channel(&cp.endpoint, Windows::default())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(Hello::default())),
    })
    .await
    .unwrap();
    let _inbound = AgentServiceClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    admin
        .wait_for_state(&identity.node_id, NodeState::Ready, Duration::from_secs(5))
        .await;
    let took = admin
        .wait_for_state(
            &identity.node_id,
            NodeState::Unavailable,
            Duration::from_secs(30),
        )
        .await;
    assert!(
        took >= Duration::from_secs(1),
        "went unavailable too early: {took:?}"
    );
    drop(tx);
    cp.stop().await;
    db.cleanup().await;
}

async fn drain_reaches_the_agent_as_a_new_generation_it_persists_and_acks(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, node_id) = TestAgent::start_ready(&cp.endpoint, &admin, dir.path()).await;
    let before = admin.node(&node_id).await;

    let drained = admin
        .client
        .clone()
        .drain_node(admin.request(NodeRef {
            node: node_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(drained.cordoned && drained.draining);
    assert_eq!(drained.desired_generation, before.desired_generation + 1);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let node = admin.node(&node_id).await;
        if node.applied_generation == drained.desired_generation {
            break;
        }
        assert!(Instant::now() < deadline, "agent never acked: {node:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let persisted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("desired-state.json")).unwrap())
            .unwrap();
    assert_eq!(persisted["drain"], true);
    assert_eq!(persisted["generation"], drained.desired_generation);

    // Cordon alone changes nothing the agent runs, so the generation stays.
    let uncordoned = admin
        .client
        .clone()
        .uncordon_node(admin.request(NodeRef {
            node: node_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!uncordoned.cordoned && !uncordoned.draining);
    let cordoned = admin
        .client
        .clone()
        .cordon_node(admin.request(NodeRef {
            node: node_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cordoned.desired_generation, uncordoned.desired_generation);
    let actions: Vec<_> = cp
        .store()
        .audit_events()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    for action in ["node.drain", "node.uncordon", "node.cordon", "node.enroll"] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} not audited: {actions:?}"
        );
    }
    agent.stop().await.unwrap();
    cp.stop().await;
    db.cleanup().await;
}

async fn agent_renews_its_certificate_over_the_session_before_it_expires(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start_with(&db, |c| {
        c.fleet.agent_certificate_ttl = Duration::from_secs(6);
    })
    .await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(&cp.endpoint, dir.path(), Some(admin.token(600).await));
    let node_id = agent.node_id().await;
    let first = FileIdentityStore::new(dir.path()).load().unwrap().unwrap();

    // Renewal is due after 4 s; by 12 s the original certificate has expired, so a node that
    // is still ready must have renewed (perhaps more than once).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let now = FileIdentityStore::new(dir.path()).load().unwrap().unwrap();
    assert_ne!(now.certificate_pem, first.certificate_pem);
    assert_ne!(
        now.private_key_pem, first.private_key_pem,
        "renewal rotates the key"
    );
    assert!(now.not_after_unix > first.not_after_unix);
    assert_eq!(now.node_id, node_id);
    admin
        .wait_for_state(&node_id, NodeState::Ready, Duration::from_secs(10))
        .await;
    assert!(
        cp.store()
            .audit_events()
            .await
            .unwrap()
            .iter()
            .any(|e| e.action == "node.certificate.renew" && e.target == node_id)
    );
    agent.stop().await.unwrap();
    cp.stop().await;
    db.cleanup().await;
}

async fn heartbeats_cost_no_database_writes(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let sim = cp.simulate(20, Duration::from_millis(100)).await;
    // Let the Hello writes and generation acks settle, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes_before = cp.store().writes();
    let acked_before = sim
        .stats
        .heartbeats_acked
        .load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked = sim
        .stats
        .heartbeats_acked
        .load(std::sync::atomic::Ordering::Relaxed)
        - acked_before;
    assert!(
        acked >= 200,
        "only {acked} heartbeats acked in 2 s from 20 agents at 10 Hz"
    );
    assert_eq!(
        cp.store().writes(),
        writes_before,
        "heartbeats wrote to the database"
    );
    sim.stop().await;
    cp.stop().await;
    db.cleanup().await;
}

async fn agents_reconnect_after_a_control_plane_restart(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let mut cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, node_id) = TestAgent::start_ready(&cp.endpoint, &admin, dir.path()).await;
    let ca_before = cp.ca_pem.clone();
    cp.restart_in_place().await;
    assert_eq!(
        cp.cp().ca_certificate_pem,
        ca_before,
        "the CA survives a restart"
    );
    let admin = cp.admin().await;
    admin
        .wait_for_state(&node_id, NodeState::Ready, Duration::from_secs(30))
        .await;
    agent.stop().await.unwrap();
    cp.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_right_credentials_are_refused() {
    init_logging();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = TestControlPlane::start(&db).await;

    // No admin credential.
    let anonymous = steward_tests::Admin::connect(&cp.endpoint, &cp.ca_pem, "").await;
    let status = anonymous
        .client
        .clone()
        .list_nodes(tonic::Request::new(ListNodesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // A well-formed but unknown credential.
    let forged = steward_tests::Admin::connect(
        &cp.endpoint,
        &cp.ca_pem,
        &steward_proto::enrollment::AdminCredential::generate().to_string(),
    )
    .await;
    let status = forged
        .client
        .clone()
        .list_nodes(forged.request(ListNodesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // A session without a client certificate.
    let channel = cp.anonymous_channel().await;
    let (_tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1);
    let status = AgentServiceClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    cp.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_stalled_grpc_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    init_logging();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = TestControlPlane::start_with(&db, |config| {
        config.tls_handshake_timeout = Duration::from_millis(500);
        config.grpc_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = cp.cp().grpc_addr;
    let started = Instant::now();
    // One client connects and says nothing; another sends the start of a ClientHello record
    // (handshake, TLS 1.0 framing, 512 bytes announced) and then nothing.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    for (what, stream) in [("silent", &mut silent), ("stalled", &mut stalled)] {
        steward_tests::expect_closed_unanswered(stream, what, Duration::from_secs(10)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed by the handshake timeout, not at once"
    );
    // A third completes the TLS handshake (asking for HTTP/2) and then never sends the
    // HTTP/2 preface: hyper has no deadline for it, the idle deadline closes it.
    let closed_after = steward_tests::time_until_a_mute_tls_client_is_closed(
        &addr.to_string(),
        &cp.ca_pem,
        Duration::from_secs(10),
    )
    .await
    .expect("a connection that never sends the HTTP/2 preface stays open");
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed by the idle deadline, not at once"
    );
    // Well-behaved clients are served as before.
    let admin = steward_tests::Admin::connect(&cp.endpoint, &cp.ca_pem, &cp.admin_credential).await;
    admin
        .client
        .clone()
        .list_nodes(admin.request(ListNodesRequest {}))
        .await
        .expect("a client that completes the handshake is served");
    cp.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_refused_token_exits_with_the_reason() {
    init_logging();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let token = admin.token(600).await;
    enroll(&cp.endpoint, &token, "first", "t").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = TestAgent::start(&cp.endpoint, dir.path(), Some(token))
        .exit()
        .await
        .unwrap_err();
    let text = steward_telemetry::chain(&err).to_string();
    assert!(
        text.contains("enrollment failed") && text.contains("already used"),
        "{text}"
    );
    assert_eq!(
        text.matches("already used").count(),
        1,
        "said twice: {text}"
    );
    assert!(FileIdentityStore::new(dir.path()).load().unwrap().is_none());
    cp.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_run_the_real_session_code_at_scale() {
    init_logging();
    let db = TestDb::new(Backend::Postgres).await;
    let cp = TestControlPlane::start(&db).await;
    let sim = cp.simulate(200, Duration::from_secs(1)).await;
    let admin = cp.admin().await;
    let nodes = admin
        .client
        .clone()
        .list_nodes(admin.request(ListNodesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 200);
    assert!(nodes.iter().all(|n| n.state == NodeState::Ready as i32));
    let gpus: usize = nodes
        .iter()
        .map(|n| n.inventory.as_ref().unwrap().gpus.len())
        .sum();
    assert!(gpus > 0, "synthetic inventories carry GPUs");
    sim.stop().await;
    for id in ["sim-00000", "sim-00199"] {
        admin
            .wait_for_state(id, NodeState::Unavailable, Duration::from_secs(30))
            .await;
    }
    cp.stop().await;
    db.cleanup().await;
}
