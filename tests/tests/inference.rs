//! An agent serving a model under a real control plane: it reports each model's state and
//! throughput in its heartbeats, and `steward nodes show` shows them.

use std::time::{Duration, Instant};

use steward_control_plane::cli::render;
use steward_engine::ModelConfig;
use steward_engine::tiny_model::TinyModel;
use steward_node_agent::serving::ServingConfig;
use steward_proto::agent::v1::ModelState;
use steward_tests::{Backend, TestAgent, TestControlPlane, TestDb, init_logging};

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn nodes_show_reports_each_models_state_and_throughput() {
    init_logging();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    TinyModel::default().write_to(&model_path).unwrap();
    let listen = free_port();
    let serving = ServingConfig {
        listen,
        api_keys: vec!["sk-node".into()],
        models: vec![ModelConfig {
            slots: 2,
            context_per_slot: 512,
            threads: Some(2),
            ..ModelConfig::new("tiny", &model_path)
        }],
    };
    let agent_dir = dir.path().join("agent");
    let agent = TestAgent::start_serving(
        &cp.endpoint,
        &agent_dir,
        Some(admin.token(600).await),
        Some(serving),
    );
    let node_id = agent.node_id().await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let node = admin.node(&node_id).await;
        if node
            .models
            .iter()
            .any(|m| m.name == "tiny" && m.state == ModelState::Ready as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "model never reported ready: {:?}",
            node.models
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let client = reqwest::Client::new();
    for _ in 0..3 {
        let r = client
            .post(format!("http://{listen}/v1/completions"))
            .bearer_auth("sk-node")
            .json(
                &serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 16,
                                      "ignore_eos": true, "temperature": 0}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    let node = loop {
        let node = admin.node(&node_id).await;
        let stats = node
            .models
            .iter()
            .find(|m| m.name == "tiny")
            .and_then(|m| m.stats);
        if stats.as_ref().is_some_and(|s| s.requests_completed == 3) {
            break node;
        }
        assert!(
            Instant::now() < deadline,
            "stats never arrived: {:?}",
            node.models
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stats = node.models[0].stats.unwrap();
    assert_eq!(stats.generated_tokens, 48);
    assert_eq!(stats.slots, 2);
    assert!(stats.generation_tokens_per_second > 0.0, "{stats:?}");
    assert!(
        stats.ttft_p50_seconds > 0.0 && stats.tpot_p50_seconds > 0.0,
        "{stats:?}"
    );

    let shown = render::node_detail(&node, 0);
    assert!(shown.contains("Models:"), "{shown}");
    assert!(shown.contains("tiny") && shown.contains("ready"), "{shown}");
    assert!(shown.contains("3 ok"), "{shown}");
    let json = render::node_json(&node);
    assert_eq!(json["models"][0]["state"], "ready");
    assert_eq!(json["models"][0]["stats"]["generated_tokens"], 48);
    agent.stop().await.unwrap();
}
