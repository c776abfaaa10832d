//! A control plane killed with SIGKILL while it appends audit events loses no acknowledged
//! event and leaves an unbroken chain, on SQLite and PostgreSQL.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use steward_tests::{Admin, Backend, TestDb, binary};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the control plane; returns it, its endpoint and (first start only) the credential.
fn start(data_dir: &std::path::Path, db: &TestDb) -> (Killed, String, Option<String>) {
    let port = free_port();
    let mut cmd = Command::new(binary("steward-control-plane"));
    cmd.args(["--data-dir", data_dir.to_str().unwrap()])
        .args(["--grpc-listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(url) = &db.url {
        cmd.args(["--database-url", url]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut credential = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(c) = line.strip_prefix("bootstrap admin credential (shown once): ") {
            credential = Some(c.to_owned());
        }
        if line.starts_with("control plane ready") {
            break;
        }
    }
    (
        Killed(child),
        format!("https://127.0.0.1:{port}"),
        credential,
    )
}

async fn acknowledged_audit_events_survive_repeated_sigkill(backend: Backend) {
    let db = TestDb::new(backend).await;
    let data_dir = tempfile::tempdir().unwrap();
    let ca_path = data_dir.path().join("ca.pem");
    let mut credential = None;
    let mut acknowledged: Vec<String> = Vec::new();

    for round in 0..6u64 {
        let (mut cp, endpoint, first) = start(data_dir.path(), &db);
        if credential.is_none() {
            credential = first;
        }
        let ca = std::fs::read_to_string(&ca_path).unwrap();
        let admin = Admin::connect(&endpoint, &ca, credential.as_ref().unwrap()).await;
        // Writers append token-creation events as fast as they can; each Ok is an ack.
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let admin = admin.clone();
            writers.spawn(async move {
                let mut acked = Vec::new();
                loop {
                    let request =
                        admin.request(steward_proto::admin::v1::CreateEnrollmentTokenRequest {
                            ttl_seconds: 60,
                            description: "durability".into(),
                        });
                    match admin.client.clone().create_enrollment_token(request).await {
                        Ok(r) => acked.push(r.into_inner().info.unwrap().id),
                        Err(_) => return acked,
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(300 + round * 97)).await;
        cp.0.kill().unwrap(); // SIGKILL
        cp.0.wait().unwrap();
        while let Some(acked) = writers.join_next().await {
            acknowledged.extend(acked.unwrap());
        }
    }
    assert!(
        acknowledged.len() > 20,
        "too few writes to prove anything: {}",
        acknowledged.len()
    );

    let url = db.url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            data_dir.path().join("steward.db").display()
        )
    });
    let store = steward_tests::Store::connect(&url).await.unwrap();
    let events = store.audit_events().await.unwrap();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as i64 + 1, "gap in the chain at {i}");
        assert!(event.hash_is_valid(), "event {} hash broken", event.seq);
        if i > 0 {
            assert_eq!(
                event.prev_hash,
                events[i - 1].hash,
                "link broken at {}",
                event.seq
            );
        }
    }
    let audited: std::collections::HashSet<&str> = events
        .iter()
        .filter(|e| e.action == "enrollment_token.create")
        .map(|e| e.target.as_str())
        .collect();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !audited.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged events lost after SIGKILL: {lost:?}"
    );
    let tokens = store.list_enrollment_tokens().await.unwrap();
    assert!(tokens.len() >= acknowledged.len());
    store.close().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_audit_events_survive_repeated_sigkill_on_sqlite() {
    acknowledged_audit_events_survive_repeated_sigkill(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_audit_events_survive_repeated_sigkill_on_postgres() {
    acknowledged_audit_events_survive_repeated_sigkill(Backend::Postgres).await;
}
