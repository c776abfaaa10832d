//! Deployments end to end, in process: a real control plane (SQLite and PostgreSQL) places a
//! signed model on a real agent, which pulls it over mTLS gRPC, verifies it, loads it with
//! llama.cpp and serves it; revocation, deletion, corruption in transit, resumption,
//! offline survival, rollouts of a new model version (gated, rolled back on failure or by
//! hand, carried on across a control-plane restart), and an agent's memory limit: honoured
//! by placement (during a rollout too, and re-checked when lowered) and by the agent itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use steward_engine::tiny_model::TinyModel;
use steward_node_agent::agent::AgentConfig;
use steward_node_agent::serving::ServingConfig;
use steward_proto::admin::v1::deployment_service_client::DeploymentServiceClient;
use steward_proto::admin::v1::{
    CreateDeploymentRequest, Deployment, DeploymentRef, LabelNodeRequest, Model,
    RevokeModelRequest, RolloutPhase, UpdateDeploymentRequest,
};
use steward_proto::agent::v1::ModelState;
use steward_tests::{
    Admin, Backend, TestAgent, TestControlPlane, TestDb, init_logging, on_both_backends, sign,
    signing_key,
};

const API_KEY: &str = "sk-deploy-test";

/// A short greedy completion of `model` from the agent API at `api`.
async fn complete_at(api: std::net::SocketAddr, model: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{api}/v1/completions"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap()
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// An inference API on `api` taking [`API_KEY`], with no models of the agent's own.
fn serving_at(api: std::net::SocketAddr) -> ServingConfig {
    ServingConfig {
        listen: api,
        api_keys: vec![API_KEY.into()],
        models: Vec::new(),
    }
}

/// A control plane, a signed tiny model pushed as `tiny-chat@1` under a trusted key, and an
/// agent with an inference API and no models of its own.
struct World {
    cp: TestControlPlane,
    admin: Admin,
    deploy: DeploymentServiceClient<tonic::transport::Channel>,
    model: Model,
    agent: Option<TestAgent>,
    agent_dir: PathBuf,
    api: std::net::SocketAddr,
    node_id: String,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start(db: &TestDb) -> Self {
        init_logging();
        let cp = TestControlPlane::start(db).await;
        let admin = cp.admin().await;
        let dir = tempfile::tempdir().unwrap();
        let (key, public_pem) = signing_key(dir.path());
        admin.trust_key(&public_pem, "tiny-*").await;
        let model_path = dir.path().join("tiny-chat.gguf");
        TinyModel::default().write_to(&model_path).unwrap();
        let signature = sign(&model_path, &key);
        let model = admin
            .push(&model_path, "tiny-chat", "1", Some(&signature))
            .await
            .expect("push");
        let agent_dir = dir.path().join("agent");
        let api = free_port();
        let mut world = Self {
            deploy: admin.deployments(),
            cp,
            admin,
            model,
            agent: None,
            agent_dir,
            api,
            node_id: String::new(),
            key,
            _dir: dir,
        };
        let token = world.admin.token(600).await;
        world.start_agent(Some(token));
        world.node_id = world.agent.as_ref().unwrap().node_id().await;
        world
            .admin
            .wait_for_state(
                &world.node_id,
                steward_proto::admin::v1::NodeState::Ready,
                Duration::from_secs(10),
            )
            .await;
        world
    }

    fn start_agent(&mut self, token: Option<String>) {
        self.agent = Some(TestAgent::start_serving(
            &self.cp.endpoint,
            &self.agent_dir,
            token,
            Some(serving_at(self.api)),
        ));
    }

    /// Stops `agent` and starts it again from its data directory (already enrolled), with
    /// its API on `api` and `configure` applied to its settings.
    async fn restart_agent(
        &self,
        agent: TestAgent,
        api: std::net::SocketAddr,
        configure: impl FnOnce(&mut AgentConfig),
    ) -> TestAgent {
        let data_dir = agent.data_dir.clone();
        agent.stop().await.unwrap();
        TestAgent::start_configured(
            &self.cp.endpoint,
            &data_dir,
            None,
            Some(serving_at(api)),
            configure,
        )
    }

    async fn create(
        &self,
        name: &str,
        model: &str,
        selector: &str,
    ) -> Result<Deployment, tonic::Status> {
        self.create_with_context(name, model, selector, 512).await
    }

    /// [`World::create`] with two slots of `context_per_slot` tokens each.
    async fn create_with_context(
        &self,
        name: &str,
        model: &str,
        selector: &str,
        context_per_slot: u32,
    ) -> Result<Deployment, tonic::Status> {
        self.deploy
            .clone()
            .create_deployment(self.admin.request(CreateDeploymentRequest {
                name: name.into(),
                model: model.into(),
                selector: selector.into(),
                replicas: 1,
                slots: 2,
                context_per_slot,
                gpu_layers: None,
                max_unavailable: 0,
            }))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Signs and pushes `tiny-chat@VERSION`, written by `write`.
    async fn push_version(&self, version: &str, write: impl FnOnce(&Path)) -> Model {
        self.push_model("tiny-chat", version, write).await
    }

    /// Writes model `name@version` with `write`, signs it with the trusted key and pushes it.
    async fn push_model(&self, name: &str, version: &str, write: impl FnOnce(&Path)) -> Model {
        let path = self._dir.path().join(format!("{name}-{version}.gguf"));
        write(&path);
        let signature = sign(&path, &self.key);
        self.admin
            .push(&path, name, version, Some(&signature))
            .await
            .expect("push")
    }

    /// Pushes a working `tiny-chat@2` (other weights than version 1).
    async fn push_working_v2(&self) -> Model {
        self.push_version("2", |p| {
            TinyModel {
                seed: 2,
                ..TinyModel::default()
            }
            .write_to(p)
            .unwrap()
        })
        .await
    }

    /// Starts another enrolled agent with an inference API; returns it, its id and API.
    async fn another_agent(&self, name: &str) -> (TestAgent, String, std::net::SocketAddr) {
        self.another_agent_configured(name, |_| {}).await
    }

    /// [`World::another_agent`] with `configure` applied to the agent's settings.
    async fn another_agent_configured(
        &self,
        name: &str,
        configure: impl FnOnce(&mut AgentConfig),
    ) -> (TestAgent, String, std::net::SocketAddr) {
        let api = free_port();
        let agent = TestAgent::start_configured(
            &self.cp.endpoint,
            &self.agent_dir.with_file_name(name),
            Some(self.admin.token(600).await),
            Some(serving_at(api)),
            configure,
        );
        let id = agent.node_id().await;
        self.admin
            .wait_for_state(
                &id,
                steward_proto::admin::v1::NodeState::Ready,
                Duration::from_secs(10),
            )
            .await;
        (agent, id, api)
    }

    async fn update_model(&self, name: &str, model: &str) -> Result<Deployment, tonic::Status> {
        self.update(UpdateDeploymentRequest {
            name: name.into(),
            model: Some(model.into()),
            ..UpdateDeploymentRequest::default()
        })
        .await
    }

    async fn update(&self, request: UpdateDeploymentRequest) -> Result<Deployment, tonic::Status> {
        self.deploy
            .clone()
            .update_deployment(self.admin.request(request))
            .await
            .map(tonic::Response::into_inner)
    }

    /// The names of this world's first node and of node `other`, sorted.
    async fn sorted_node_names(&self, other: &str) -> Vec<String> {
        let mut names = Vec::new();
        for id in [self.node_id.as_str(), other] {
            names.push(self.admin.node(id).await.name);
        }
        names.sort();
        names
    }

    async fn rollback(&self, name: &str) -> Result<Deployment, tonic::Status> {
        self.deploy
            .clone()
            .rollback_deployment(self.admin.request(DeploymentRef { name: name.into() }))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until the deployment's rollout is in `phase` and every replica it wants is
    /// ready on the deployment's digest and settings.
    async fn wait_rollout(&self, name: &str, phase: RolloutPhase, within: Duration) -> Deployment {
        let deadline = Instant::now() + within;
        loop {
            let d = self.show(name).await;
            let settled = d.rollout.as_ref().is_some_and(|r| r.phase() == phase)
                && d.placed.len() as u32 == d.replicas
                && d.placed.iter().all(|r| {
                    r.digest == d.digest
                        && r.status.as_ref().is_some_and(|s| {
                            s.state == ModelState::Ready as i32
                                && s.digest == d.digest
                                && s.assigned_slots == d.slots
                                && s.assigned_context_per_slot == d.context_per_slot
                        })
                });
            if settled {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "rollout of {name} not {phase:?} with every replica ready in {within:?}: {d:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The audit events about deployment `name`, as `action node` strings in order.
    async fn rollout_audit(&self, name: &str) -> Vec<String> {
        self.cp
            .store()
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.target == name && e.action.starts_with("deployment."))
            .map(|e| {
                let details: serde_json::Value = serde_json::from_str(&e.details).unwrap();
                match details["node"].as_str() {
                    Some(node) => format!("{} {node}", e.action),
                    None => format!("{} {}", e.action, e.outcome),
                }
            })
            .collect()
    }

    async fn show(&self, name: &str) -> Deployment {
        self.deploy
            .clone()
            .get_deployment(self.admin.request(DeploymentRef { name: name.into() }))
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until the deployment's replica on our node reports `state`.
    async fn wait_replica(&self, name: &str, state: ModelState, within: Duration) -> Deployment {
        self.wait_replica_on(name, &self.node_id, state, within)
            .await
    }

    /// Waits until the deployment's replica on `node` (an id) reports `state`.
    async fn wait_replica_on(
        &self,
        name: &str,
        node: &str,
        state: ModelState,
        within: Duration,
    ) -> Deployment {
        let deadline = Instant::now() + within;
        loop {
            let d = self.show(name).await;
            if d.placed.iter().any(|r| {
                r.node_id == node && r.status.as_ref().is_some_and(|s| s.state == state as i32)
            }) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "replica of {name} on {node} not {state:?} in {within:?}: {d:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the node reports no model named `name`.
    async fn wait_gone(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let node = self.admin.node(&self.node_id).await;
            if !node.models.iter().any(|m| m.name == name) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} still reported: {:?}",
                node.models
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn complete(&self, model: &str) -> reqwest::Response {
        complete_at(self.api, model).await
    }

    fn cached_file(&self) -> PathBuf {
        self.agent_dir
            .join("artifacts")
            .join(format!("{}.gguf", self.model.digest))
    }

    async fn artifact_bytes_sent(&self) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.cp.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("steward_artifact_sent_bytes_total "))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    async fn stop(mut self, db: TestDb) {
        if let Some(agent) = self.agent.take() {
            agent.stop().await.unwrap();
        }
        self.cp.stop().await;
        db.cleanup().await;
    }
}

async fn a_deployed_model_is_pulled_verified_loaded_and_served(backend: Backend) {
    let db = TestDb::new(backend).await;
    let w = World::start(&db).await;
    w.admin
        .client
        .clone()
        .label_node(w.admin.request(LabelNodeRequest {
            node: w.node_id.clone(),
            set: [("dept".to_owned(), "radiology".to_owned())].into(),
            remove: vec![],
        }))
        .await
        .unwrap();
    let created = w
        .create("chat", "tiny-chat@1", "dept=radiology")
        .await
        .unwrap();
    assert_eq!(created.digest, w.model.digest);
    assert_eq!(
        created.placed.len(),
        1,
        "placed on the labelled node: {created:?}"
    );

    let d = w
        .wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    assert_eq!(d.placed[0].digest, w.model.digest);
    assert!(
        w.cached_file().exists(),
        "verified artifact renamed into the cache"
    );
    let r = w.complete("chat").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let node = w.admin.node(&w.node_id).await;
    assert!(node.applied_generation >= node.desired_generation - 1);
    let actions: Vec<String> =
        w.cp.store()
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
    for expected in ["deployment.create", "node.assign", "node.label"] {
        assert!(
            actions.iter().any(|a| a == expected),
            "{expected} not audited: {actions:?}"
        );
    }

    w.deploy
        .clone()
        .delete_deployment(w.admin.request(DeploymentRef {
            name: "chat".into(),
        }))
        .await
        .unwrap();
    w.wait_gone("chat").await;
    assert_eq!(
        w.complete("chat").await.status(),
        404,
        "unloaded after delete"
    );
    w.stop(db).await;
}

async fn revoking_a_deployed_model_unloads_and_deletes_it_on_the_agent(backend: Backend) {
    let db = TestDb::new(backend).await;
    let w = World::start(&db).await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    w.admin
        .models()
        .revoke_model(w.admin.request(RevokeModelRequest {
            digest: w.model.digest.clone(),
            reason: "test: found a backdoor".into(),
        }))
        .await
        .unwrap();
    w.wait_gone("chat").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.cached_file().exists() {
        assert!(
            Instant::now() < deadline,
            "revoked artifact not deleted from the agent's cache"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(w.complete("chat").await.status(), 404);
    let events = w.rollout_audit("chat").await;
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "deployment.refused refused")
            .count(),
        1,
        "the refusal is audited once: {events:#?}"
    );
    let d = w.show("chat").await;
    assert_eq!(d.missing_replicas, 1);
    assert!(
        d.unschedulable_reasons
            .iter()
            .any(|r| r.contains("revoked")),
        "{:?}",
        d.unschedulable_reasons
    );
    let refused = w.create("again", &w.model.digest, "*").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    w.stop(db).await;
}

/// An agent tells the control plane its free disk as soon as an artifact enters its cache.
/// Its periodic inventory rounds free disk to 1/64 of the disk (at least 1 GiB), so
/// placement would otherwise go on counting the artifact's disk as free once its pull ends.
/// With the free disk comes the cache's listing, read at the same moment, which then holds
/// every byte of the artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reports_its_free_disk_as_soon_as_an_artifact_enters_its_cache() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    let inventory = || async {
        let node = w.admin.node(&w.node_id).await;
        node.inventory.unwrap_or_default()
    };
    let disk_free = || async { inventory().await.disk_free_bytes };
    let listed = inventory().await;
    assert!(listed.artifacts_listed, "the agent lists its cache");
    assert!(listed.artifacts.is_empty(), "{:?}", listed.artifacts);
    let before = disk_free().await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while disk_free().await == before {
        assert!(
            Instant::now() < deadline,
            "the control plane still has the free disk from before the pull ({before} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let artifacts = inventory().await.artifacts;
    let pulled = artifacts
        .iter()
        .find(|a| a.digest == w.model.digest)
        .unwrap_or_else(|| panic!("the pulled artifact is not listed: {artifacts:?}"));
    assert_eq!(pulled.bytes, w.model.size_bytes, "{pulled:?}");
    w.stop(db).await;
}

/// An agent keeps its cache within its disk budget as it pulls: an artifact no deployment
/// needs any more is evicted to make room for the next one before that is pulled, not only
/// when a desired state arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_makes_room_in_its_cache_before_it_pulls_the_next_artifact() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut w = World::start(&db).await;
    // Room for one tiny artifact and a half; pulls slow enough (about 4 s) to be seen.
    let budget = w.model.size_bytes * 3 / 2;
    let rate = w.model.size_bytes / 4;
    let agent = w.agent.take().expect("the world's agent");
    w.agent = Some(
        w.restart_agent(agent, w.api, |c| {
            c.cache_budget_bytes = budget;
            c.pull_rate_limit = Some(rate);
        })
        .await,
    );
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    w.deploy
        .clone()
        .delete_deployment(w.admin.request(DeploymentRef {
            name: "chat".into(),
        }))
        .await
        .unwrap();
    w.wait_gone("chat").await;
    assert!(
        w.cached_file().exists(),
        "within the budget, an unneeded artifact stays cached"
    );

    let v2 = w.push_working_v2().await;
    assert!(w.model.size_bytes + v2.size_bytes > budget);
    w.create("other", "tiny-chat@2", "*").await.unwrap();
    w.wait_replica("other", ModelState::Pulling, Duration::from_secs(30))
        .await;
    assert!(
        !w.cached_file().exists(),
        "the unneeded artifact was not evicted to make room before the pull"
    );
    w.wait_replica("other", ModelState::Ready, Duration::from_secs(60))
        .await;
    let pulled = w
        .agent_dir
        .join("artifacts")
        .join(format!("{}.gguf", v2.digest));
    assert!(pulled.exists(), "{} missing", pulled.display());
    assert_eq!(w.complete("other").await.status(), 200);
    w.stop(db).await;
}

impl World {
    async fn revoke(&self, digest: &str, reason: &str) {
        self.admin
            .models()
            .revoke_model(self.admin.request(RevokeModelRequest {
                digest: digest.into(),
                reason: reason.into(),
            }))
            .await
            .unwrap();
    }

    /// Restarts the world's own agent with pulls at 16 KiB/s: a new tiny model then takes
    /// minutes to arrive, which holds a rollout at the step that switched this node.
    async fn slow_the_agents_pulls(&mut self) {
        let agent = self.agent.take().expect("the world's agent");
        self.agent = Some(
            self.restart_agent(agent, self.api, |c| c.pull_rate_limit = Some(16 << 10))
                .await,
        );
    }
}

/// Waits until `path` is gone (an agent deleted it).
async fn wait_deleted(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{what} not deleted: {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A revoked artifact is deleted from every agent that caches it, also from one whose
/// assignment does not change (it only keeps the artifact from an earlier rollout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_artifact_is_deleted_where_it_is_only_cached() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    w.push_working_v2().await;
    w.update_model("chat", "tiny-chat@2").await.unwrap();
    w.wait_rollout("chat", RolloutPhase::Complete, Duration::from_secs(60))
        .await;
    assert!(w.cached_file().exists(), "version 1 stays cached, unneeded");
    let before = w.admin.node(&w.node_id).await.desired_generation;
    w.revoke(&w.model.digest, "test: found a backdoor").await;
    wait_deleted(&w.cached_file(), "the revoked, cached-only artifact").await;
    // The revocation is a new desired state, so a state sent before it cannot undo it.
    let node = w.admin.node(&w.node_id).await;
    assert!(
        node.desired_generation > before,
        "the revocation did not raise the node's generation ({before})"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.admin.node(&w.node_id).await.applied_generation < node.desired_generation {
        assert!(
            Instant::now() < deadline,
            "the agent did not acknowledge generation {}",
            node.desired_generation
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        w.complete("chat").await.status(),
        200,
        "version 2 serves on"
    );
    w.stop(db).await;
}

/// Revoking the model a rollout moves to ends the rollout at once: every replica returns
/// to the previous model, the switched node included, and the step's partial pull is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_new_model_mid_rollout_returns_every_replica_to_the_previous_one() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut w = World::start(&db).await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    w.slow_the_agents_pulls().await;
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    let v2 = w.push_working_v2().await;
    w.update_model("chat", "tiny-chat@2").await.unwrap();
    let d = w
        .wait_replica("chat", ModelState::Pulling, Duration::from_secs(30))
        .await;
    assert_eq!(d.placed[0].digest, v2.digest, "the node is switched");

    w.revoke(&v2.digest, "test: found a backdoor").await;
    let d = w
        .wait_rollout("chat", RolloutPhase::RolledBack, Duration::from_secs(60))
        .await;
    assert_eq!(d.digest, w.model.digest);
    let message = d.rollout.unwrap().message;
    assert!(
        message.contains("may no longer run") && message.contains("found a backdoor"),
        "{message}"
    );
    let events = w.rollout_audit("chat").await;
    assert!(
        events.contains(&"deployment.rollback.forced success".to_owned()),
        "{events:#?}"
    );
    assert_eq!(w.complete("chat").await.status(), 200);
    let partial = w
        .agent_dir
        .join("artifacts")
        .join("partial")
        .join(&v2.digest);
    wait_deleted(&partial, "the revoked artifact's partial pull").await;
    w.stop(db).await;
}

/// Revoking the model a rollout moves away from ends the rollout at once the other way:
/// the node the rollout has not reached yet stops serving the revoked model and deletes it
/// now, instead of serving it until its step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_previous_model_mid_rollout_moves_every_replica_on_at_once() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut w = World::start(&db).await;
    let (second, second_id, second_api) = two_replicas(&w).await;
    let first_name = w.sorted_node_names(&second_id).await.remove(0);
    // The node switched first pulls slowly, so the rollout waits at its first step.
    let (second, second_api) = if first_name == w.admin.node(&w.node_id).await.name {
        w.slow_the_agents_pulls().await;
        (second, second_api)
    } else {
        let api = free_port();
        let slowed = w
            .restart_agent(second, api, |c| c.pull_rate_limit = Some(16 << 10))
            .await;
        (slowed, api)
    };
    for node in [&w.node_id, &second_id] {
        w.wait_replica_on("chat", node, ModelState::Ready, Duration::from_secs(60))
            .await;
    }
    let v2 = w.push_working_v2().await;
    w.update_model("chat", "tiny-chat@2").await.unwrap();
    let d = w.show("chat").await;
    let (switched, waiting): (Vec<_>, Vec<_>) =
        d.placed.iter().partition(|r| r.digest == v2.digest);
    assert_eq!((switched.len(), waiting.len()), (1, 1), "{d:#?}");
    let (waiting_id, waiting_api) = if waiting[0].node_id == w.node_id {
        (w.node_id.clone(), w.api)
    } else {
        (second_id.clone(), second_api)
    };
    assert_eq!(complete_at(waiting_api, "chat").await.status(), 200);

    w.revoke(&w.model.digest, "test: licence withdrawn").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = w.show("chat").await;
        let rollout = d.rollout.clone().unwrap();
        if rollout.phase() == RolloutPhase::Complete
            && d.placed.len() == 2
            && d.placed.iter().all(|r| r.digest == v2.digest)
        {
            assert!(
                rollout.message.contains("licence withdrawn"),
                "{}",
                rollout.message
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not move on: {d:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = w.rollout_audit("chat").await;
    assert!(
        events.contains(&"deployment.rollout.forced success".to_owned()),
        "{events:#?}"
    );
    let waiting_dir = if waiting_id == w.node_id {
        w.agent_dir.clone()
    } else {
        second.data_dir.clone()
    };
    let v1 = waiting_dir
        .join("artifacts")
        .join(format!("{}.gguf", w.model.digest));
    wait_deleted(&v1, "the revoked previous model").await;
    // The node the rollout had not reached runs version 2 now, ungated.
    let served = w
        .wait_replica_on(
            "chat",
            &waiting_id,
            ModelState::Ready,
            Duration::from_secs(60),
        )
        .await;
    assert!(served.placed.iter().all(|r| r.digest == v2.digest));
    second.stop().await.unwrap();
    w.stop(db).await;
}

/// Creates `chat`: two replicas of `tiny-chat@1` with one slot of 512 tokens on the nodes
/// `selector` matches, one node switched at a time; waits until both are ready.
async fn chat_on_two_nodes(w: &World, selector: &str) {
    w.deploy
        .clone()
        .create_deployment(w.admin.request(CreateDeploymentRequest {
            name: "chat".into(),
            model: "tiny-chat@1".into(),
            selector: selector.into(),
            replicas: 2,
            slots: 1,
            context_per_slot: 512,
            gpu_layers: None,
            max_unavailable: 1,
        }))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = w.show("chat").await;
        let ready = d
            .placed
            .iter()
            .filter(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.state == ModelState::Ready as i32)
            })
            .count();
        if ready == 2 {
            return;
        }
        assert!(Instant::now() < deadline, "two replicas not ready: {d:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `chat` on two nodes running `tiny-chat@1`, with the second agent, its id and API.
async fn two_replicas(w: &World) -> (TestAgent, String, std::net::SocketAddr) {
    let second = w.another_agent("agent-2").await;
    chat_on_two_nodes(w, "*").await;
    second
}

/// The second node (by name) switched only after the first answered its probe.
fn assert_one_node_at_a_time(events: &[String], node_names: &[String]) {
    let (first, next) = (&node_names[0], &node_names[1]);
    assert!(
        position(events, &format!("deployment.rollout.verified {first}"))
            < position(events, &format!("deployment.rollout.step {next}")),
        "the second node switched before the first answered its probe: {events:#?}"
    );
}

fn position(events: &[String], wanted: &str) -> usize {
    events
        .iter()
        .position(|e| e == wanted)
        .unwrap_or_else(|| panic!("`{wanted}` not audited: {events:#?}"))
}

async fn a_new_model_version_rolls_out_node_by_node_and_rolls_back_by_hand(backend: Backend) {
    let db = TestDb::new(backend).await;
    let w = World::start(&db).await;
    let (second, second_id, second_api) = two_replicas(&w).await;
    let node_names = w.sorted_node_names(&second_id).await;
    let v2 = w.push_working_v2().await;

    let started = w.update_model("chat", "tiny-chat@2").await.unwrap();
    assert_eq!(started.digest, v2.digest);
    let rollout = started.rollout.expect("a rollout started");
    assert_eq!(rollout.to_digest, v2.digest);
    assert_eq!(rollout.from_digest, w.model.digest);
    let d = w
        .wait_rollout("chat", RolloutPhase::Complete, Duration::from_secs(60))
        .await;
    assert_eq!(d.model_version, "2");
    let events = w.rollout_audit("chat").await;
    assert_one_node_at_a_time(&events, &node_names);
    assert!(
        position(&events, "deployment.rollout.start success")
            < position(&events, "deployment.rollout.complete success")
    );
    // Each step was proven by a real generation on the new model.
    let probes: Vec<serde_json::Value> =
        w.cp.store()
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == "deployment.rollout.verified")
            .map(|e| serde_json::from_str(&e.details).unwrap())
            .collect();
    assert_eq!(probes.len(), 2, "{probes:#?}");
    for probe in &probes {
        assert_eq!(probe["digest"], v2.digest.as_str());
        assert!(
            probe["probe"]
                .as_str()
                .unwrap()
                .contains("generated tokens"),
            "{probe}"
        );
    }
    for api in [w.api, second_api] {
        assert_eq!(complete_at(api, "chat").await.status(), 200);
    }

    // By hand, back to version 1: a new rollout, gated the same way.
    let back = w.rollback("chat").await.unwrap();
    assert_eq!(back.digest, w.model.digest);
    let d = w
        .wait_rollout("chat", RolloutPhase::Complete, Duration::from_secs(60))
        .await;
    assert_eq!(d.model_version, "1");
    assert!(
        w.rollout_audit("chat")
            .await
            .contains(&"deployment.rollback success".to_owned())
    );
    second.stop().await.unwrap();
    w.stop(db).await;
}

async fn a_rollout_whose_new_model_fails_rolls_back_to_the_previous_digest(backend: Backend) {
    let db = TestDb::new(backend).await;
    let w = World::start(&db).await;
    let (second, second_id, _) = two_replicas(&w).await;
    // Version 2 passes the signature check and the GGUF pre-parse but lacks the tensors
    // llama.cpp needs, so it fails to load.
    let broken = w
        .push_version("2", |p| steward_tests::tiny_gguf(p, 7))
        .await;
    w.update_model("chat", "tiny-chat@2").await.unwrap();
    let d = w
        .wait_rollout("chat", RolloutPhase::RolledBack, Duration::from_secs(60))
        .await;
    assert_eq!(d.digest, w.model.digest, "back on the previous digest");
    let rollout = d.rollout.unwrap();
    assert_eq!(rollout.to_digest, broken.digest);
    assert!(
        rollout.message.contains("the new model failed"),
        "{}",
        rollout.message
    );
    let events = w.rollout_audit("chat").await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.starts_with("deployment.rollout.step"))
            .count(),
        1,
        "the second node was never switched: {events:#?}"
    );
    assert!(events.contains(&"deployment.rollback success".to_owned()));
    // The failed node came back gated like any step: ready on the old model and answering.
    let back = events
        .iter()
        .find(|e| e.starts_with("deployment.rollback.verified "))
        .unwrap_or_else(|| panic!("no verified step back: {events:#?}"));
    assert!(
        position(&events, back) < position(&events, "deployment.rollback.complete success"),
        "{events:#?}"
    );
    let second_name = w.admin.node(&second_id).await.name;
    let first_name = w.admin.node(&w.node_id).await.name;
    let switched = if events.contains(&format!("deployment.rollout.step {first_name}")) {
        &first_name
    } else {
        &second_name
    };
    assert!(events.contains(&format!("deployment.rollout.step {switched}")));
    // The agent's failure is in the audit log with its reason, beside the rollback.
    let failed: Vec<serde_json::Value> =
        w.cp.store()
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == "deployment.replica.failed" && e.target == "chat")
            .map(|e| serde_json::from_str(&e.details).unwrap())
            .collect();
    assert!(
        failed.iter().any(|f| f["node"] == switched.as_str()
            && f["digest"] == broken.digest.as_str()
            && !f["reason"].as_str().unwrap_or_default().is_empty()),
        "{failed:#?}"
    );
    second.stop().await.unwrap();
    w.stop(db).await;
}

/// During a rollout to a model of another name, a node not yet switched is still sent the
/// name its model was trusted under: its assignment (and so its replica) stays as it was
/// until its own step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_not_yet_switched_keeps_the_name_its_model_was_trusted_under() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    let (second, _, _) = two_replicas(&w).await;
    w.push_model("tiny-other", "1", |p| {
        TinyModel {
            seed: 3,
            ..TinyModel::default()
        }
        .write_to(p)
        .unwrap()
    })
    .await;
    w.update_model("chat", "tiny-other@1").await.unwrap();

    let fleet = w.cp.cp().fleet();
    let mut not_switched = 0;
    for node in fleet.list_nodes().await.unwrap() {
        for m in fleet.desired_state(&node).await.unwrap().models {
            let expected = if m.digest == w.model.digest {
                not_switched += 1;
                "tiny-chat"
            } else {
                "tiny-other"
            };
            assert_eq!(m.model_name, expected, "{m:?}");
        }
    }
    assert_eq!(not_switched, 1, "one node waits for the first step");
    // Built for every node at once (what the nodes share is read once), each state is the
    // one built for its node alone: the node on the old digest keeps its model's name.
    let nodes = fleet.list_nodes().await.unwrap();
    let together = fleet.desired_states(&nodes).await.unwrap();
    assert_eq!(together.len(), nodes.len());
    for (node, state) in nodes.iter().zip(together) {
        assert_eq!(
            state,
            fleet.desired_state(node).await.unwrap(),
            "{}",
            node.name
        );
    }
    w.wait_rollout("chat", RolloutPhase::Complete, Duration::from_secs(60))
        .await;
    second.stop().await.unwrap();
    w.stop(db).await;
}

/// Changing only the serving settings restarts every replica, so it rolls like a new model:
/// node by node, each step proven by a probe, and back by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_serving_settings_roll_out_node_by_node_and_roll_back_by_hand() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    let (second, second_id, second_api) = two_replicas(&w).await;
    let node_names = w.sorted_node_names(&second_id).await;

    let started = w
        .update(UpdateDeploymentRequest {
            name: "chat".into(),
            slots: Some(2),
            context_per_slot: Some(1024),
            ..UpdateDeploymentRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(started.digest, w.model.digest, "the model stays");
    let rollout = started.rollout.expect("a rollout started");
    assert_eq!(rollout.from_digest, rollout.to_digest);
    assert_eq!(rollout.from_settings, "slots 1, ctx 512, gpu-layers auto");
    assert_eq!(rollout.to_settings, "slots 2, ctx 1024, gpu-layers auto");
    // A bad value is named as such (even mid-rollout) and changes nothing.
    let bad = w
        .update(UpdateDeploymentRequest {
            name: "chat".into(),
            slots: Some(0),
            ..UpdateDeploymentRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("--slots"), "{}", bad.message());
    assert_eq!(w.show("chat").await.slots, 2);

    let d = w
        .wait_rollout("chat", RolloutPhase::Complete, Duration::from_secs(60))
        .await;
    assert_eq!((d.slots, d.context_per_slot), (2, 1024));
    assert_one_node_at_a_time(&w.rollout_audit("chat").await, &node_names);
    for api in [w.api, second_api] {
        assert_eq!(complete_at(api, "chat").await.status(), 200);
    }

    let back = w.rollback("chat").await.unwrap();
    assert_eq!((back.slots, back.context_per_slot), (1, 512));
    let d = w
        .wait_rollout("chat", RolloutPhase::Complete, Duration::from_secs(60))
        .await;
    for replica in &d.placed {
        let status = replica.status.as_ref().unwrap();
        assert_eq!(
            (status.assigned_slots, status.assigned_context_per_slot),
            (1, 512),
            "{replica:#?}"
        );
    }
    second.stop().await.unwrap();
    w.stop(db).await;
}

on_both_backends!(
    a_deployed_model_is_pulled_verified_loaded_and_served,
    revoking_a_deployed_model_unloads_and_deletes_it_on_the_agent,
    a_new_model_version_rolls_out_node_by_node_and_rolls_back_by_hand,
    a_rollout_whose_new_model_fails_rolls_back_to_the_previous_digest,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_carries_on_after_the_control_plane_restarts() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut w = World::start(&db).await;
    let (second, _, _) = two_replicas(&w).await;
    let v2 = w.push_working_v2().await;
    let started = w.update_model("chat", "tiny-chat@2").await.unwrap();
    let rollout = started.rollout.unwrap();
    assert_eq!(rollout.phase(), RolloutPhase::Progressing);
    assert_eq!(
        rollout.steps.len(),
        1,
        "the first step started: {rollout:?}"
    );

    // A second change while one rolls out is refused, with the way out.
    let busy = w.update_model("chat", "tiny-chat@1").await.unwrap_err();
    assert_eq!(busy.code(), tonic::Code::FailedPrecondition);
    assert!(busy.message().contains("rolling out"), "{}", busy.message());

    w.cp.restart_in_place().await;
    let d = w
        .wait_rollout("chat", RolloutPhase::Complete, Duration::from_secs(90))
        .await;
    assert_eq!(d.digest, v2.digest);
    let events = w.rollout_audit("chat").await;
    let steps: Vec<&String> = events
        .iter()
        .filter(|e| e.starts_with("deployment.rollout.step"))
        .collect();
    assert_eq!(
        steps.len(),
        2,
        "each node switched exactly once: {events:#?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "deployment.rollout.complete success")
            .count(),
        1
    );
    second.stop().await.unwrap();
    w.stop(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_back_without_a_previous_model_is_refused_with_the_reason() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    let refused = w.rollback("chat").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("no previous model"),
        "{}",
        refused.message()
    );
    let missing = w.rollback("nope").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    w.stop(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_memory_limit_keeps_models_that_need_more_off_its_node() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    const LIMIT: u64 = 256 << 20;
    let (limited, limited_id, limited_api) = w
        .another_agent_configured("agent-limited", |c| c.memory_limit_bytes = Some(LIMIT))
        .await;
    let node = w.admin.node(&limited_id).await;
    assert_eq!(
        node.inventory.as_ref().unwrap().model_memory_limit_bytes,
        LIMIT
    );
    let selector = format!("name={}", node.name);

    // Two slots of 128 Ki tokens: 256 MiB of KV cache for the tiny model, beside its weights
    // and buffers (about 70 MiB by the estimate): over the limit.
    let big = w
        .create_with_context("big", "tiny-chat@1", &selector, 128 << 10)
        .await
        .unwrap();
    assert_eq!(big.missing_replicas, 1, "{big:#?}");
    assert!(
        big.unschedulable_reasons
            .iter()
            .any(|r| r.contains("not enough memory") && r.contains("memory limit")),
        "{:?}",
        big.unschedulable_reasons
    );
    // The node without a limit takes the same deployment.
    let unlimited = w.admin.node(&w.node_id).await;
    let elsewhere = w
        .create_with_context(
            "big-elsewhere",
            "tiny-chat@1",
            &format!("name={}", unlimited.name),
            128 << 10,
        )
        .await
        .unwrap();
    assert_eq!(elsewhere.placed.len(), 1, "{elsewhere:#?}");

    // A small context fits under the limit, and is served there.
    w.create_with_context("small", "tiny-chat@1", &selector, 512)
        .await
        .unwrap();
    w.wait_replica_on(
        "small",
        &limited_id,
        ModelState::Ready,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(complete_at(limited_api, "small").await.status(), 200);
    limited.stop().await.unwrap();
    w.stop(db).await;
}

/// An operator restarts an agent with a lower memory limit while its control plane is
/// down: from its last desired state the agent loads, in name order, only the models that
/// fit. When the control plane is back and sees the new limit, it takes the other replica
/// off the node and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_under_a_lower_memory_limit_loads_only_what_fits() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut w = World::start(&db).await;
    let (agent, id, api) = w.another_agent("agent-shrinks").await;
    let selector = format!("name={}", w.admin.node(&id).await.name);
    for name in ["a-first", "b-second"] {
        w.create(name, "tiny-chat@1", &selector).await.unwrap();
    }
    for name in ["a-first", "b-second"] {
        w.wait_replica_on(name, &id, ModelState::Ready, Duration::from_secs(60))
            .await;
    }
    let artifact =
        w.cp.store()
            .find_artifact(&w.model.digest)
            .await
            .unwrap()
            .unwrap();
    // Both deployments have two slots of 512 tokens: room for one and a half.
    let one = steward_control_plane::deployments::memory_needed(&artifact, 2, 512);
    let ports = w.cp.pause().await;
    let agent = w
        .restart_agent(agent, api, |c| c.memory_limit_bytes = Some(one + one / 2))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while complete_at_once(api, "a-first").await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "a-first not served after restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both were in the desired state the agent restarted with; the second was not loaded.
    assert_eq!(complete_at(api, "b-second").await.status(), 404);

    w.cp.resume(ports).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = w.show("b-second").await;
        let off_the_node = d.placed.iter().all(|r| r.node_id != id);
        let why = d
            .unschedulable_reasons
            .iter()
            .any(|r| r.contains("not enough memory") && r.contains("memory limit"));
        if off_the_node && d.missing_replicas == 1 && why {
            break;
        }
        assert!(Instant::now() < deadline, "b-second still placed: {d:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.wait_replica_on("a-first", &id, ModelState::Ready, Duration::from_secs(30))
        .await;
    assert_eq!(complete_at(api, "a-first").await.status(), 200);
    agent.stop().await.unwrap();
    w.stop(db).await;
}

/// A rollout to settings that need more memory than an agent's limit allows: the control
/// plane keeps the replica the rollout pins there, the agent refuses to load it, and the
/// rollout fails with the agent's reason and rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_over_an_agents_memory_limit_fails_on_the_agent_and_rolls_back() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    let (capped, capped_id, capped_api) = w
        .another_agent_configured("agent-capped", |c| c.memory_limit_bytes = Some(256 << 20))
        .await;
    let selector = format!("name={}", w.admin.node(&capped_id).await.name);
    w.create("chat", "tiny-chat@1", &selector).await.unwrap();
    w.wait_replica_on(
        "chat",
        &capped_id,
        ModelState::Ready,
        Duration::from_secs(60),
    )
    .await;

    // Two slots of 128 Ki tokens: 256 MiB of KV cache beside the weights.
    w.update(UpdateDeploymentRequest {
        name: "chat".into(),
        context_per_slot: Some(128 << 10),
        ..UpdateDeploymentRequest::default()
    })
    .await
    .unwrap();
    let d = w
        .wait_rollout("chat", RolloutPhase::RolledBack, Duration::from_secs(60))
        .await;
    let message = d.rollout.unwrap().message;
    assert!(
        message.contains("the new model failed: not loaded: over the node's memory limit"),
        "{message}"
    );
    assert_eq!(d.context_per_slot, 512, "back on the previous settings");
    let d = w
        .wait_replica_on(
            "chat",
            &capped_id,
            ModelState::Ready,
            Duration::from_secs(60),
        )
        .await;
    let status = d.placed[0].status.as_ref().unwrap();
    assert_eq!(status.assigned_context_per_slot, 512);
    assert_eq!(complete_at(capped_api, "chat").await.status(), 200);
    capped.stop().await.unwrap();
    w.stop(db).await;
}

/// A rollout to a smaller revision keeps room on each node it switched for the revision it
/// would go back to: while the new model is still on its way to a capped node, the memory
/// the old one used is not given to another deployment, so a failed rollout can return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_keeps_room_on_a_switched_node_for_its_way_back() {
    const LIMIT: u64 = 256 << 20;
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    let (capped, capped_id, api) = w
        .another_agent_configured("agent-capped", |c| c.memory_limit_bytes = Some(LIMIT))
        .await;
    let selector = format!("name={}", w.admin.node(&capped_id).await.name);
    w.create_with_context("chat", "tiny-chat@1", &selector, 64 << 10)
        .await
        .unwrap();
    w.wait_replica_on(
        "chat",
        &capped_id,
        ModelState::Ready,
        Duration::from_secs(60),
    )
    .await;
    // The same agent again, now pulling at 16 KiB/s: the new model takes minutes to arrive,
    // which holds the rollout at its first step.
    let capped = w
        .restart_agent(capped, api, |c| {
            c.memory_limit_bytes = Some(LIMIT);
            c.pull_rate_limit = Some(16 << 10);
        })
        .await;
    w.wait_replica_on(
        "chat",
        &capped_id,
        ModelState::Ready,
        Duration::from_secs(60),
    )
    .await;

    let v2 = w.push_working_v2().await;
    w.update(UpdateDeploymentRequest {
        name: "chat".into(),
        model: Some("tiny-chat@2".into()),
        context_per_slot: Some(512),
        ..UpdateDeploymentRequest::default()
    })
    .await
    .unwrap();
    let d = w
        .wait_replica_on(
            "chat",
            &capped_id,
            ModelState::Pulling,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(d.placed[0].digest, v2.digest, "the node is switched");

    let store = w.cp.store();
    let v1 = store.find_artifact(&w.model.digest).await.unwrap().unwrap();
    let v2 = store.find_artifact(&v2.digest).await.unwrap().unwrap();
    let back = steward_control_plane::deployments::memory_needed(&v1, 2, 64 << 10);
    let ahead = steward_control_plane::deployments::memory_needed(&v2, 2, 512);
    let other = steward_control_plane::deployments::memory_needed(&v1, 2, 16 << 10);
    assert!(
        LIMIT - back < other && other <= LIMIT - ahead,
        "the other deployment ({other} B) must fit beside the new revision ({ahead} B) \
         and not beside the old one ({back} B)"
    );
    let refused = w
        .create_with_context("other", "tiny-chat@1", &selector, 16 << 10)
        .await
        .unwrap();
    assert_eq!(refused.missing_replicas, 1, "{refused:#?}");
    assert!(
        refused
            .unschedulable_reasons
            .iter()
            .any(|r| r.contains("not enough memory") && r.contains("memory limit")),
        "{:?}",
        refused.unschedulable_reasons
    );
    capped.stop().await.unwrap();
    w.stop(db).await;
}

/// The status of one completion request, or `None` while the API does not answer.
async fn complete_at_once(api: std::net::SocketAddr, model: &str) -> Option<u16> {
    reqwest::Client::new()
        .post(format!("http://{api}/v1/completions"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({"model": model, "prompt": "hello", "max_tokens": 2}))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// A rollout to settings that need more memory than a capped node has: while the rollout
/// has not reached that node, its replica still runs the old settings, and another
/// deployment may use the memory those leave free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_the_rollout_has_not_reached_is_costed_with_the_settings_it_keeps() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    // Rollouts switch nodes in name order: `a-…` first, and it is stopped before the
    // rollout, so its step never completes and `b-…` keeps the old settings meanwhile.
    let (first, first_id, _) = w
        .another_agent_configured("agent-a", |c| c.name = Some("a-first".into()))
        .await;
    let (capped, capped_id, _) = w
        .another_agent_configured("agent-b", |c| {
            c.name = Some("b-capped".into());
            c.memory_limit_bytes = Some(256 << 20);
        })
        .await;
    for node in [&first_id, &capped_id] {
        w.admin
            .client
            .clone()
            .label_node(w.admin.request(LabelNodeRequest {
                node: node.clone(),
                set: [("pool".to_owned(), "rollout".to_owned())].into(),
                remove: vec![],
            }))
            .await
            .unwrap();
    }
    chat_on_two_nodes(&w, "pool=rollout").await;
    first.stop().await.unwrap();

    // 256 Ki tokens of KV cache need more than the capped node's 256 MiB.
    let rolling = w
        .update(UpdateDeploymentRequest {
            name: "chat".into(),
            context_per_slot: Some(256 << 10),
            ..UpdateDeploymentRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(
        rolling.rollout.as_ref().map(|r| r.phase()),
        Some(RolloutPhase::Progressing),
        "{rolling:#?}"
    );
    let capped_name = w.admin.node(&capped_id).await.name;
    let on_capped = |d: &Deployment| {
        d.placed
            .iter()
            .find(|r| r.node_id == capped_id)
            .and_then(|r| r.status.clone())
    };
    assert_eq!(
        on_capped(&rolling).map(|s| s.assigned_context_per_slot),
        Some(512),
        "the capped node still runs the old settings: {rolling:#?}"
    );

    // Costed with the new settings, the capped node would have nothing left.
    let side = w
        .create_with_context("side", "tiny-chat@1", &format!("name={capped_name}"), 512)
        .await
        .unwrap();
    assert_eq!(
        side.placed.iter().map(|r| &r.node_id).collect::<Vec<_>>(),
        [&capped_id],
        "{side:#?}"
    );
    let still = w.show("chat").await;
    assert_eq!(
        still.rollout.as_ref().map(|r| r.phase()),
        Some(RolloutPhase::Progressing),
        "{still:#?}"
    );
    capped.stop().await.unwrap();
    w.stop(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deployments_are_refused_with_the_reason() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    let unknown = w.create("x", "nope@1", "*").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let bad_name = w.create("bad name!", "tiny-chat@1", "*").await.unwrap_err();
    assert_eq!(bad_name.code(), tonic::Code::InvalidArgument);
    let bad_selector = w.create("x", "tiny-chat@1", "a=b=c").await.unwrap_err();
    assert!(
        bad_selector.message().contains("selector"),
        "{}",
        bad_selector.message()
    );
    w.create("x", "tiny-chat@1", "*").await.unwrap();
    let twice = w.create("x", "tiny-chat@1", "*").await.unwrap_err();
    assert_eq!(twice.code(), tonic::Code::AlreadyExists);

    let nowhere = w
        .create("nowhere", "tiny-chat@1", "dept=oncology")
        .await
        .unwrap();
    assert_eq!(nowhere.missing_replicas, 1, "{nowhere:?}");
    assert!(nowhere.placed.is_empty());
    let refusals =
        w.cp.store()
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == "deployment.create" && e.outcome == "refused")
            .count();
    assert!(refusals >= 1, "refused deployments are audited");
    w.stop(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_are_discarded_and_fetched_again() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    // A partial download whose bytes are wrong: the pull resumes after them, the digest
    // does not match, the file is discarded and fetched again from the start.
    seed_partial(&w.agent_dir, &w.model.digest, &vec![0xAB; 4096]);
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    assert_eq!(
        std::fs::read(w.cached_file()).unwrap().len() as u64,
        w.model.size_bytes
    );
    assert_eq!(w.complete("chat").await.status(), 200);
    w.stop(db).await;
}

/// Every chunk of a download from `offset`, or the status that refused or ended it.
async fn download(
    channel: tonic::transport::Channel,
    digest: &str,
    offset: u64,
) -> Result<Vec<(u64, Vec<u8>)>, tonic::Status> {
    use steward_proto::agent::v1::FetchArtifactRequest;
    use steward_proto::agent::v1::agent_service_client::AgentServiceClient;
    let mut client = AgentServiceClient::new(channel);
    let request = FetchArtifactRequest {
        digest: digest.to_owned(),
        offset,
    };
    let mut stream = client.fetch_artifact(request).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push((chunk.offset, chunk.data.to_vec()));
    }
    Ok(chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_serves_only_an_assigned_artifact_from_an_offset_within_it() {
    use steward_node_agent::identity::{FileIdentityStore, IdentityStore};
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    let source = std::fs::read(w.cached_file()).unwrap();
    let (digest, size) = (&w.model.digest, source.len() as u64);
    let identity = FileIdentityStore::new(&w.agent_dir)
        .load()
        .unwrap()
        .expect("the agent enrolled");
    let node = || identity.channel(&w.cp.endpoint, Default::default());

    // From an offset inside the artifact: its tail, in order, with each chunk's offset.
    let from = size - 1000;
    let chunks = download(node().await.unwrap(), digest, from).await.unwrap();
    let mut at = from;
    for (offset, data) in &chunks {
        assert_eq!(*offset, at, "chunks arrive in order");
        at += data.len() as u64;
    }
    let tail: Vec<u8> = chunks.into_iter().flat_map(|(_, data)| data).collect();
    assert_eq!(tail, source[from as usize..]);
    // From the end: nothing, and no error.
    let at_end = download(node().await.unwrap(), digest, size).await.unwrap();
    assert!(at_end.is_empty());

    let past = download(node().await.unwrap(), digest, size + 1)
        .await
        .unwrap_err();
    assert_eq!(past.code(), tonic::Code::OutOfRange);
    assert!(past.message().contains("past the end"), "{past:?}");

    let other = "ab".repeat(32);
    let unassigned = download(node().await.unwrap(), &other, 0)
        .await
        .unwrap_err();
    assert_eq!(unassigned.code(), tonic::Code::PermissionDenied);
    assert!(
        unassigned.message().contains("not assigned"),
        "{unassigned:?}"
    );

    let anonymous = download(w.cp.anonymous_channel().await, digest, 0)
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    w.stop(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_resumes_from_the_bytes_already_received() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    let digest = &w.model.digest;
    let blob =
        w.cp.data_dir
            .path()
            .join("blobs/sha256")
            .join(&digest[..2])
            .join(digest);
    let source = std::fs::read(blob).unwrap();
    let half = source.len() / 2;
    seed_partial(&w.agent_dir, &w.model.digest, &source[..half]);
    let before = w.artifact_bytes_sent().await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    let sent = w.artifact_bytes_sent().await - before;
    assert_eq!(
        sent,
        (source.len() - half) as u64,
        "only the missing half was sent"
    );
    w.stop(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_without_its_control_plane_serves_what_it_last_applied() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut w = World::start(&db).await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;
    let cp = w.cp.control_plane.take().unwrap();
    cp.stop().await;
    w.agent.take().unwrap().stop().await.unwrap();
    w.start_agent(None);
    // The API comes up once the agent restarted; the model loads from its cache.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = complete_at_once(w.api, "chat").await;
        if status == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served after restart: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.agent.take().unwrap().stop().await.unwrap();
    db.cleanup().await;
}

fn seed_partial(agent_dir: &Path, digest: &str, bytes: &[u8]) {
    let dir = agent_dir.join("artifacts").join("partial");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(digest), bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_refuses_new_requests_and_moves_its_replicas() {
    let db = TestDb::new(Backend::Sqlite).await;
    let w = World::start(&db).await;
    w.create("chat", "tiny-chat@1", "*").await.unwrap();
    w.wait_replica("chat", ModelState::Ready, Duration::from_secs(60))
        .await;

    // A second node, then drain the first: the replica moves, the first refuses new work.
    let (other, other_id, other_api) = w.another_agent("agent-2").await;
    w.admin
        .client
        .clone()
        .drain_node(w.admin.request(steward_proto::admin::v1::NodeRef {
            node: w.node_id.clone(),
        }))
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = w.show("chat").await;
        let moved = d.placed.iter().any(|r| {
            r.node_id == other_id
                && r.status
                    .as_ref()
                    .is_some_and(|s| s.state == ModelState::Ready as i32)
        });
        if moved && d.placed.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica did not move off the draining node: {d:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = w.complete("chat").await;
    assert!(
        matches!(refused.status().as_u16(), 503 | 404),
        "the drained node must not take new requests: {}",
        refused.status()
    );
    let health = reqwest::get(format!("http://{}/healthz", w.api))
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        503,
        "a draining node is not healthy for new work"
    );
    assert_eq!(complete_at(other_api, "chat").await.status(), 200);
    other.stop().await.unwrap();
    w.stop(db).await;
}
