//! End-to-end: the real `steward-control-plane`, `steward-node-agent` and `steward`
//! binaries, talking over TLS on loopback.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use steward_tests::bench::read_bootstrap_credential;
use steward_tests::binary;

fn free_port() -> u16 {
    steward_tests::openai_load::free_port().unwrap()
}

struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct ControlPlane {
    process: Running,
    grpc: String,
    http: String,
    data_dir: tempfile::TempDir,
    credential: String,
}

fn start_control_plane() -> ControlPlane {
    start_control_plane_with_env(&[])
}

fn start_control_plane_with_env(env: &[(&str, &str)]) -> ControlPlane {
    start_control_plane_with(env, &[])
}

/// Like [`start_control_plane`], with extra environment variables and flags.
fn start_control_plane_with(env: &[(&str, &str)], extra: &[&str]) -> ControlPlane {
    let data_dir = tempfile::tempdir().unwrap();
    let (grpc_port, http_port) = (free_port(), free_port());
    let mut child = Command::new(binary("steward-control-plane"))
        .envs(env.iter().copied())
        .args(extra)
        .args(["--data-dir", data_dir.path().to_str().unwrap()])
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args(["--heartbeat-timeout", "5s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let credential =
        read_bootstrap_credential(&mut child).expect("bootstrap credential printed on first start");
    ControlPlane {
        process: Running { child },
        grpc: format!("https://127.0.0.1:{grpc_port}"),
        http: format!("http://127.0.0.1:{http_port}"),
        credential,
        data_dir,
    }
}

impl ControlPlane {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("steward"))
            .args(args)
            .env("STEWARD_ENDPOINT", &self.grpc)
            .env("STEWARD_TOKEN", &self.credential)
            .env("STEWARD_CA_FILE", self.data_dir.path().join("ca.pem"))
            .output()
            .unwrap()
    }

    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "steward {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn start_agent(&self, data_dir: &Path, token: Option<&str>) -> Running {
        self.start_agent_with(data_dir, token, &[])
    }

    /// Like [`ControlPlane::start_agent`], with extra agent flags.
    fn start_agent_with(&self, data_dir: &Path, token: Option<&str>, extra: &[&str]) -> Running {
        let mut cmd = Command::new(binary("steward-node-agent"));
        cmd.args(["--control-plane", &self.grpc])
            .args(extra)
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .args(["--name", "e2e-node", "--heartbeat-interval", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(token) = token {
            cmd.args(["--token", token]);
        }
        Running {
            child: cmd.spawn().unwrap(),
        }
    }

    /// Polls `steward nodes show` until the node has `state` ("ready", "unavailable").
    fn wait_for_state(
        &self,
        node: &str,
        state: &str,
        within: Duration,
    ) -> (serde_json::Value, Duration) {
        let started = Instant::now();
        loop {
            let out = self.cli(&["-o", "json", "nodes", "show", node]);
            if out.status.success() {
                let node: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if node["state"] == state {
                    return (node, started.elapsed());
                }
            }
            assert!(
                started.elapsed() < within,
                "node {node} not in state {state} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binaries_enroll_an_agent_see_it_die_and_see_it_return_with_its_id() {
    let cp = start_control_plane();
    let token = cp.cli_json(&["token", "create", "--ttl", "10m", "--description", "e2e"]);
    let token = token["token"].as_str().unwrap().to_owned();
    let agent_dir = tempfile::tempdir().unwrap();

    let mut agent = cp.start_agent(agent_dir.path(), Some(&token));
    let (node, _) = cp.wait_for_state("e2e-node", "ready", Duration::from_secs(30));
    let node_id = node["id"].as_str().unwrap().to_owned();
    assert_eq!(node["inventory"]["accelerator"], "cpu");

    let table = cp.cli(&["nodes", "list"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("e2e-node") && table.contains("Ready"),
        "{table}"
    );

    // SIGKILL: no goodbye from the agent.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let (_, took) = cp.wait_for_state(&node_id, "unavailable", Duration::from_secs(30));
    assert!(took < Duration::from_secs(30));

    let _agent = cp.start_agent(agent_dir.path(), None);
    let (node, _) = cp.wait_for_state(&node_id, "ready", Duration::from_secs(30));
    assert_eq!(node["id"], node_id.as_str());
    let nodes = cp.cli_json(&["nodes", "list"]);
    assert_eq!(nodes.as_array().unwrap().len(), 1);

    let tokens = cp.cli_json(&["token", "list"]);
    assert_eq!(tokens[0]["used_by_node_id"], node_id.as_str());
    assert_eq!(tokens[0]["state"], "used");

    let metrics = reqwest::get(format!("{}/metrics", cp.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("steward_nodes{state=\"ready\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("steward_agent_sessions 1"), "{metrics}");
    assert!(
        metrics.contains("steward_heartbeat_rtt_seconds_bucket"),
        "{metrics}"
    );
    let ready = reqwest::get(format!("{}/readyz", cp.http)).await.unwrap();
    assert_eq!(ready.status(), 200);

    // The bootstrap credential is not stored in plain text anywhere in the data dir.
    for entry in std::fs::read_dir(cp.data_dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        let secret = cp.credential.rsplit('.').next().unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "admin secret found in plain text"
        );
    }
    drop(cp.process);
}

/// `GLIBC_TUNABLES` in the environment of the running process `pid`.
fn glibc_tunables_of(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"GLIBC_TUNABLES="))
        .map(|value| String::from_utf8(value.to_vec()).unwrap())
}

#[test]
fn the_control_plane_runs_with_the_rep_movsb_threshold_raised_where_glibc_is_slow() {
    use steward_proto::glibc_memcpy::{Host, tunables_for};
    let inherited = std::env::var_os("GLIBC_TUNABLES");
    let want = tunables_for(Host::current(), inherited.as_deref())
        .map(|v| v.into_string().unwrap())
        .or_else(|| inherited.map(|v| v.into_string().unwrap()));
    eprintln!(
        "this host: {:?}, expecting GLIBC_TUNABLES={want:?}",
        Host::current()
    );
    // The process answered with its bootstrap credential, so it runs after the restart.
    let cp = start_control_plane();
    let pid = cp.process.child.id();
    assert_eq!(glibc_tunables_of(pid), want);
    // Restarted under its own name, so that `ps` and `pgrep` still find it.
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(name.trim_end(), "steward-control");

    // An operator's own threshold is kept as it is.
    let chosen = "glibc.cpu.x86_rep_movsb_threshold=2112";
    let cp = start_control_plane_with_env(&[("GLIBC_TUNABLES", chosen)]);
    assert_eq!(
        glibc_tunables_of(cp.process.child.id()).as_deref(),
        Some(chosen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_closes_silent_connections_after_the_timeouts_its_flags_set() {
    // Both well below the defaults (10 s and 60 s), so only the flags can close these in time.
    let cp = start_control_plane_with(
        &[],
        &[
            "--tls-handshake-timeout",
            "300ms",
            "--grpc-idle-timeout",
            "1s",
        ],
    );
    let addr = cp.grpc.trim_start_matches("https://").to_owned();
    // A client that connects and never starts the TLS handshake.
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    steward_tests::expect_closed_unanswered(&mut silent, "silent", Duration::from_secs(5)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed by the handshake timeout, not at once"
    );

    // A client that completes the TLS handshake and then never sends the HTTP/2 preface.
    let ca = std::fs::read_to_string(cp.data_dir.path().join("ca.pem")).unwrap();
    let closed_after =
        steward_tests::time_until_a_mute_tls_client_is_closed(&addr, &ca, Duration::from_secs(5))
            .await
            .expect("the mute connection is still open after 5 s");
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed by the idle deadline, not at once"
    );
}

#[test]
fn control_plane_refuses_a_zero_or_malformed_timeout_and_names_the_flag() {
    for (flag, value, says) in [
        ("--grpc-idle-timeout", "0s", "must be longer than zero"),
        (
            "--tls-handshake-timeout",
            "soon",
            "expected a duration such as 10s",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(binary("steward-control-plane"))
            .args(["--data-dir", dir.path().to_str().unwrap(), flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag}"))
                && stderr.contains(says),
            "{stderr}"
        );
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing is created before the flags are accepted"
        );
    }
}

#[test]
fn control_plane_exits_with_a_clear_error_when_the_database_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("steward-control-plane"))
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args(["--database-url", "postgres://postgres@127.0.0.1:1/steward"])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: storage is unavailable: cannot open the database at postgres://postgres@127.0.0.1:1/steward"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cli_without_a_credential_says_how_to_get_one() {
    let out = Command::new(binary("steward"))
        .args(["nodes", "list"])
        .env_remove("STEWARD_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no admin credential: pass --token or set STEWARD_TOKEN"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_reflection_lists_every_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let db = steward_tests::TestDb::new(steward_tests::Backend::Sqlite).await;
    let cp = steward_tests::TestControlPlane::start(&db).await;
    let channel = cp.anonymous_channel().await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "steward.agent.v1.AgentService",
        "steward.admin.v1.AdminService",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing from {names:?}"
        );
    }
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_verifies_and_any_edit_removal_reorder_or_truncation_is_caught() {
    let cp = start_control_plane();
    for i in 0..4 {
        cp.cli_json(&["token", "create", "--description", &format!("audit {i}")]);
    }
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("audit.jsonl");
    let out = cp.cli(&["audit", "export", "-o", export.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = cp.data_dir.path().join("ca.pem");
    let verify = |file: &Path, ca: &Path| {
        let out = Command::new(binary("steward"))
            .args([
                "audit",
                "verify",
                file.to_str().unwrap(),
                "--ca",
                ca.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = verify(&export, &ca);
    assert!(ok && text.contains("audit export intact"), "{text}");

    let original = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(
        lines.len() >= 6,
        "CA, bootstrap and 4 tokens: {}",
        lines.len()
    );
    let manifest = std::fs::read_to_string(dir.path().join("audit.jsonl.manifest.json")).unwrap();
    let variant = |name: &str, body: String| {
        let file = dir.path().join(name);
        std::fs::write(&file, body).unwrap();
        std::fs::write(dir.path().join(format!("{name}.manifest.json")), &manifest).unwrap();
        verify(&file, &ca)
    };
    let join = |ls: Vec<&str>| ls.join("\n") + "\n";

    let edited = join(
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == 3 {
                    l.replacen("audit 1", "audit X", 1).leak() as &str
                } else {
                    l
                }
            })
            .collect(),
    );
    let (ok, text) = variant("edited.jsonl", edited);
    assert!(!ok && text.contains("seq 4 (line 4) was edited"), "{text}");

    let mut removed = lines.clone();
    removed.remove(2);
    let (ok, text) = variant("removed.jsonl", join(removed));
    assert!(
        !ok && text.contains("line 3: expected event seq 3, found seq 4"),
        "{text}"
    );

    let mut reordered = lines.clone();
    reordered.swap(3, 4);
    let (ok, text) = variant("reordered.jsonl", join(reordered));
    assert!(
        !ok && text.contains("expected event seq 4, found seq 5"),
        "{text}"
    );

    let truncated = join(lines[..lines.len() - 1].to_vec());
    let (ok, text) = variant("truncated.jsonl", truncated);
    assert!(!ok && text.contains("truncated"), "{text}");

    // A forged manifest (claiming fewer events) breaks the signature.
    let forged = manifest.replacen("\"count\": ", "\"count\": 1", 1);
    std::fs::write(dir.path().join("forged.jsonl"), &original).unwrap();
    std::fs::write(dir.path().join("forged.jsonl.manifest.json"), forged).unwrap();
    let (ok, text) = verify(&dir.path().join("forged.jsonl"), &ca);
    assert!(!ok && text.contains("manifest"), "{text}");

    // Pinned to another control plane's CA: refused.
    let other = start_control_plane();
    let (ok, text) = verify(&export, &other.data_dir.path().join("ca.pem"));
    assert!(!ok && text.contains("different control plane"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_gemma_model_signed_with_model_signing_is_pushed_and_verified() {
    let gemma = steward_tests::gemma_path();
    let tool = steward_tests::model_signing_tool();
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (key_path, pub_path) = (dir.path().join("k.pem"), dir.path().join("k.pub"));
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&pub_path, key.public_key_pem()).unwrap();

    // The OpenSSF tool signs; Steward verifies on push.
    let tool_sig = dir.path().join("gemma.tool.sig");
    let status = Command::new(&tool)
        .args(["sign", "key"])
        .arg(&gemma)
        .args(["--private_key", key_path.to_str().unwrap()])
        .args(["--signature", tool_sig.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "model_signing sign failed");
    let cp = start_control_plane();
    let out = cp.cli(&[
        "trust",
        "add-key",
        pub_path.to_str().unwrap(),
        "--models",
        "gemma*",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = cp.cli_json(&[
        "model",
        "push",
        gemma.to_str().unwrap(),
        "--name",
        "gemma3-270m",
        "--version",
        "q4_k_m",
        "--signature",
        tool_sig.to_str().unwrap(),
    ]);
    assert_eq!(model["verification"], "verified");
    assert_eq!(model["size_bytes"], 253_113_024);
    assert!(model["digest"].as_str().unwrap().starts_with("a5fd3b62"));
    assert_eq!(model["gguf"]["architecture"], "gemma3");
    assert_eq!(model["gguf"]["quantization"], "Q4_K_M");
    let params = model["gguf"]["parameter_count"].as_u64().unwrap();
    assert!((250_000_000..300_000_000).contains(&params), "{params}");
    // This GGUF carries no `tokenizer.chat_template`; the pre-parse reports that honestly.
    assert_eq!(model["gguf"]["has_chat_template"], false);

    // Steward signs; the OpenSSF tool verifies.
    let our_sig = dir.path().join("gemma.steward.sig");
    let out = cp.cli(&[
        "model",
        "sign",
        gemma.to_str().unwrap(),
        "--key",
        key_path.to_str().unwrap(),
        "--output",
        our_sig.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = Command::new(&tool)
        .args(["verify", "key"])
        .arg(&gemma)
        .args(["--signature", our_sig.to_str().unwrap()])
        .args(["--public_key", pub_path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "model_signing refused Steward's signature"
    );
    let shown = String::from_utf8(cp.cli(&["model", "show", "gemma3-270m@q4_k_m"]).stdout).unwrap();
    assert!(shown.contains("Architecture:         gemma3"), "{shown}");
}

/// Waits until `url` answers 200 (a server that is still loading does not listen yet or
/// answers otherwise).
async fn wait_until_ok(url: &str, within: Duration) {
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status() == 200
        {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{url} did not answer within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serving_a_model_answers_openai_requests_and_nodes_show_its_throughput() {
    let cp = start_control_plane();
    let token = cp.cli_json(&["token", "create", "--ttl", "10m"]);
    let token = token["token"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    steward_engine::tiny_model::TinyModel::default()
        .write_to(&model)
        .unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let agent_dir = dir.path().join("agent");
    let _agent = Running {
        child: Command::new(binary("steward-node-agent"))
            .args([
                "--control-plane",
                &cp.grpc,
                "--token",
                &token,
                "--name",
                "e2e-node",
            ])
            .args([
                "--data-dir",
                agent_dir.to_str().unwrap(),
                "--heartbeat-interval",
                "1s",
            ])
            .args(["--model", model.to_str().unwrap(), "--model-name", "tiny"])
            .args([
                "--slots",
                "2",
                "--ctx",
                "512",
                "--threads",
                "2",
                "--api-listen",
                &api,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    };
    wait_until_ok(&format!("http://{api}/healthz"), Duration::from_secs(30)).await;
    // No --api-key: the agent generated one, readable only by its user.
    let key_file = agent_dir.join("api-key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .post(format!("http://{api}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(
                &serde_json::json!({"model": "tiny", "max_tokens": 8, "ignore_eos": true,
                                      "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["usage"]["completion_tokens"], 8);
            break;
        }
        // 404 until the model has loaded.
        assert_eq!(r.status(), 404);
        assert!(Instant::now() < deadline, "model never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let node = loop {
        let out = cp.cli(&["-o", "json", "nodes", "show", "e2e-node"]);
        if out.status.success() {
            let node: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if node["models"][0]["stats"]["requests_completed"] == 1 {
                break node;
            }
        }
        assert!(
            Instant::now() < deadline,
            "heartbeats never carried the model's stats"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(node["models"][0]["name"], "tiny");
    assert_eq!(node["models"][0]["state"], "ready");
    assert_eq!(node["models"][0]["stats"]["generated_tokens"], 8);
    let table = String::from_utf8(cp.cli(&["nodes", "show", "e2e-node"]).stdout).unwrap();
    assert!(
        table.contains("Models:") && table.contains("GEN TOK/S"),
        "{table}"
    );
    assert!(table.contains("0/2 busy"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_control_plane_answers_and_refuses_a_broken_model_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    steward_engine::tiny_model::TinyModel::default()
        .write_to(&model)
        .unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let _serve = Running {
        child: Command::new(binary("steward-node-agent"))
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--api-key",
                "sk-a,sk-b",
            ])
            .args([
                "--data-dir",
                dir.path().to_str().unwrap(),
                "--api-listen",
                &api,
            ])
            .args(["--slots", "1", "--ctx", "256", "--threads", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    };
    wait_until_ok(&format!("http://{api}/healthz"), Duration::from_secs(30)).await;
    let models: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{api}/v1/models"))
        .bearer_auth("sk-b")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models["data"][0]["id"], "tiny",
        "the name defaults to the file stem"
    );

    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF\x03\x00\x00\x00 not really").unwrap();
    let out = Command::new(binary("steward-node-agent"))
        .args([
            "serve",
            "--model",
            broken.to_str().unwrap(),
            "--api-key",
            "k",
        ])
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--api-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.gguf") && stderr.contains("pre-parse"),
        "{stderr}"
    );
}

/// The README's demo journey with the real binaries: sign the real gemma with a fresh key,
/// trust it, push it, deploy it to an agent, stop the agent mid-download and prove the
/// restarted agent resumes (the control plane sends only the missing bytes), get an answer
/// through the agent's OpenAI API, then revoke the model and prove the agent unloads and
/// deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_journey_resumes_an_interrupted_pull_and_unloads_a_revoked_model() {
    let gemma = steward_tests::gemma_path();
    let size = std::fs::metadata(&gemma).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (key_path, pub_path) = (dir.path().join("k.pem"), dir.path().join("k.pub"));
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&pub_path, key.public_key_pem()).unwrap();
    let sig = dir.path().join("gemma.sig");

    let cp = start_control_plane();
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    ok(cp.cli(&[
        "trust",
        "add-key",
        pub_path.to_str().unwrap(),
        "--models",
        "gemma3-*",
    ]));
    // Signs `file` with the fresh key and pushes it as `gemma3-270m@VERSION`; its digest.
    let sign_and_push = |file: &std::path::Path, sig: &std::path::Path, version: &str| {
        ok(cp.cli(&[
            "model",
            "sign",
            file.to_str().unwrap(),
            "--key",
            key_path.to_str().unwrap(),
            "--output",
            sig.to_str().unwrap(),
        ]));
        let model = cp.cli_json(&[
            "model",
            "push",
            file.to_str().unwrap(),
            "--name",
            "gemma3-270m",
            "--version",
            version,
            "--signature",
            sig.to_str().unwrap(),
        ]);
        model["digest"].as_str().unwrap().to_owned()
    };
    let digest = sign_and_push(&gemma, &sig, "1");

    let token = cp.cli_json(&["token", "create", "--ttl", "10m"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent_dir = dir.path().join("agent");
    let api_port = free_port();
    // Capped at 40 MiB/s so the pull takes seconds and can be interrupted.
    let api = format!("127.0.0.1:{api_port}");
    let flags = [
        "--api-listen",
        &api,
        "--api-key",
        "sk-e2e",
        "--pull-rate-limit-mib",
        "40",
        "--threads",
        "2",
    ];
    let start_agent = |token: Option<&str>| cp.start_agent_with(&agent_dir, token, &flags);
    let mut agent = start_agent(Some(&token));
    cp.wait_for_state("e2e-node", "ready", Duration::from_secs(20));
    let sent = || async {
        let text = reqwest::get(format!("{}/metrics", cp.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("steward_artifact_sent_bytes_total "))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    ok(cp.cli(&[
        "deploy",
        "create",
        "gemma",
        "--model",
        "gemma3-270m@1",
        "--nodes",
        "e2e-node",
        "--slots",
        "2",
        "--ctx",
        "1024",
    ]));

    // Stop the agent (SIGKILL) once a fifth of the artifact has arrived.
    let partial = agent_dir.join("artifacts/partial").join(&digest);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < size / 5 {
        assert!(Instant::now() < deadline, "the pull never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    drop(agent);
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(
        kept > 0 && kept < size,
        "interrupted mid-download: {kept} of {size}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent_before = sent().await;

    let _agent = start_agent(None);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = cp.cli_json(&["deploy", "show", "gemma"]);
        if d["placed"][0]["status"]["state"] == "ready" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready after the restart: {d:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        sent().await - sent_before,
        size - kept,
        "the restarted agent fetched only the missing bytes"
    );

    // A new version rolls out through the CLI (gated on ready and a probe), then back by
    // hand; the agent still holds version 1 in its cache.
    let v2 = dir.path().join("v2.gguf");
    steward_engine::tiny_model::TinyModel::default()
        .write_to(&v2)
        .unwrap();
    let v2_digest = sign_and_push(&v2, &dir.path().join("v2.sig"), "2");
    let wait_rolled_to = |digest: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let d = cp.cli_json(&["deploy", "show", "gemma"]);
            let replica = &d["placed"][0];
            if d["rollout"]["phase"] == "complete"
                && replica["digest"] == digest
                && replica["status"]["state"] == "ready"
                && replica["status"]["digest"] == digest
            {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "not rolled out to {digest}: {d:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    ok(cp.cli(&["deploy", "update", "gemma", "--model", "gemma3-270m@2"]));
    let d = wait_rolled_to(&v2_digest);
    assert_eq!(d["rollout"]["from_digest"], digest.as_str());
    let rollback = ok(cp.cli(&["deploy", "rollback", "gemma"]));
    assert!(
        String::from_utf8_lossy(&rollback.stdout).contains("gemma3-270m@2 → gemma3-270m@1"),
        "{}",
        String::from_utf8_lossy(&rollback.stdout)
    );
    wait_rolled_to(&digest);

    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api_port}/v1/completions"))
        .bearer_auth("sk-e2e")
        .json(&serde_json::json!({"model": "gemma",
            "prompt": "Question: What is the capital of France?\nAnswer:",
            "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = answer["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    let chat = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api_port}/v1/chat/completions"))
        .bearer_auth("sk-e2e")
        .json(&serde_json::json!({"model": "gemma", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);

    ok(cp.cli(&["model", "revoke", &digest, "--reason", "e2e: revoked"]));
    let cached = agent_dir.join("artifacts").join(format!("{digest}.gguf"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let node = cp.cli_json(&["nodes", "show", "e2e-node"]);
        let listed = node["models"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == "gemma"));
        if !listed && !cached.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revoked model still loaded or cached: {node:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api_port}/v1/completions"))
        .bearer_auth("sk-e2e")
        .json(&serde_json::json!({"model": "gemma", "prompt": "x", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404, "a revoked model is not served");
}
