//! `steward.agent.v1.AgentService`: enrollment, the session stream, certificate renewal and
//! artifact downloads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use steward_proto::agent::v1::agent_service_server::AgentService;
use steward_proto::agent::v1::{
    AgentMessage, ArtifactChunk, ControlMessage, EnrollRequest, EnrollResponse,
    FetchArtifactRequest, HeartbeatAck, RenewCertificateRequest, RenewCertificateResponse,
    agent_message, control_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::status;
use crate::deployments::Deployments;
use crate::fleet::Fleet;
use crate::pki::node_id_from_certificate;
use crate::registry::Registry;
use crate::sessions::{Outbound, SessionHandle};

/// How long an agent may take to say Hello after opening a session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Outbound messages queued per session before the agent counts as not reading.
const OUTBOUND_QUEUE: usize = 32;
/// Bytes per artifact chunk sent to an agent.
const ARTIFACT_CHUNK: usize = 1 << 20;

#[derive(Debug)]
pub struct AgentApi {
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    deployments: Arc<Deployments>,
}

impl AgentApi {
    pub fn new(fleet: Arc<Fleet>, registry: Arc<Registry>, deployments: Arc<Deployments>) -> Self {
        Self {
            fleet,
            registry,
            deployments,
        }
    }

    /// The node ID from the verified client certificate. rustls has already checked the
    /// chain against our CA; here we only read who it names and that the node exists.
    async fn authenticated_node<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated("this call needs the node's client certificate (enroll first)")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
        let node_id = node_id_from_certificate(leaf)
            .map_err(|e| Status::unauthenticated(steward_telemetry::chain(&e).to_string()))?;
        self.fleet.require_node(&node_id).await.map_err(status)?;
        Ok(node_id)
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let req = request.into_inner();
        let enrollment = self
            .fleet
            .enroll(
                &peer,
                &req.token,
                &req.csr_der,
                &req.requested_name,
                &req.agent_version,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(EnrollResponse {
            node_id: enrollment.node.id,
            node_name: enrollment.node.name,
            certificate_pem: enrollment.certificate.certificate_pem,
            ca_certificate_pem: self.fleet.ca.certificate_pem().to_owned(),
            not_after_unix: enrollment.certificate.not_after_unix,
        }))
    }

    type SessionStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if self.fleet.sessions.is_closed() {
            return Err(Status::unavailable("the control plane is shutting down"));
        }
        let node_id = self.authenticated_node(&request).await?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let fleet = self.fleet.clone();
        let deployments = self.deployments.clone();
        tokio::spawn(async move {
            if let Err(e) = run_session(&fleet, &deployments, &node_id, inbound, tx).await {
                tracing::info!(node_id, reason = %e, "agent session ended");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_certificate(
        &self,
        request: Request<RenewCertificateRequest>,
    ) -> Result<Response<RenewCertificateResponse>, Status> {
        let node_id = self.authenticated_node(&request).await?;
        let issued = self
            .fleet
            .renew_certificate(&node_id, &request.get_ref().csr_der)
            .await
            .map_err(status)?;
        Ok(Response::new(RenewCertificateResponse {
            certificate_pem: issued.certificate_pem,
            not_after_unix: issued.not_after_unix,
        }))
    }

    type FetchArtifactStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<ArtifactChunk, Status>> + Send + 'static>,
    >;

    async fn fetch_artifact(
        &self,
        request: Request<FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let chunks = self.open_download(request).await?;
        Ok(Response::new(Box::pin(chunks.map(|chunk| {
            chunk.map(|(offset, data)| ArtifactChunk { offset, data })
        }))))
    }
}

impl AgentApi {
    /// Checks that the calling node may download the artifact (assigned to it, not revoked,
    /// offset within it) and streams its chunks from `offset` on. The server routes
    /// `FetchArtifact` to [`super::artifact_download`], which sends these chunks without
    /// tonic's encode copy; the trait method above, which the generated service requires,
    /// sends the same messages through tonic.
    pub(super) async fn open_download(
        &self,
        request: Request<FetchArtifactRequest>,
    ) -> Result<super::artifact_download::Chunks, Status> {
        let node_id = self.authenticated_node(&request).await?;
        let FetchArtifactRequest { digest, offset } = request.into_inner();
        let node = self.fleet.require_node(&node_id).await.map_err(status)?;
        if !node.desired_models.iter().any(|m| m.digest == digest) {
            return Err(Status::permission_denied(format!(
                "artifact {digest} is not assigned to node {}",
                node.name
            )));
        }
        let artifact = self
            .fleet
            .store
            .find_artifact(&digest)
            .await
            .map_err(|e| Status::internal(steward_telemetry::chain(&e).to_string()))?
            .ok_or_else(|| Status::not_found(format!("artifact {digest}")))?;
        if artifact.revoked_at.is_some() {
            return Err(Status::permission_denied(format!(
                "artifact {digest} is revoked"
            )));
        }
        if offset > artifact.size_bytes {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end of artifact {digest} ({} bytes)",
                artifact.size_bytes
            )));
        }
        let digest = steward_artifact::digest::Sha256Hex::parse(&digest)
            .ok_or_else(|| Status::internal(format!("stored digest `{digest}` is malformed")))?;
        let path = self.registry.blobs.path_of(&digest);
        let file = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || std::fs::File::open(path)).await
        }
        .map_err(std::io::Error::other)
        .and_then(|opened| opened)
        .map_err(|e| unreadable(&path, &e))?;
        tracing::info!(node = %node.name, %digest, offset, "sending artifact");
        let sent = self.fleet.metrics.artifact_bytes_sent.clone();
        let chunks = crate::artifact_stream::ArtifactStream::new(file, offset, ARTIFACT_CHUNK);
        Ok(Box::pin(chunks.map(move |chunk| {
            let (offset, data) = chunk.map_err(|e| unreadable(&path, &e))?;
            sent.inc_by(data.len() as u64);
            Ok((offset, data))
        })))
    }
}

/// Audits a model the agent reports failed: a refusal on the agent (the signature or the
/// GGUF check under the trust policy, a revoked artifact, the node's memory limit) or a
/// load that failed, with the agent's reason.
async fn audit_failed_replica(
    fleet: &Fleet,
    node_id: &str,
    failed: &steward_proto::agent::v1::ModelStatus,
) {
    let node = match fleet.require_node(node_id).await {
        Ok(node) => node.name,
        Err(_) => node_id.to_owned(),
    };
    let event = crate::fleet::audit(
        &crate::fleet::Actor::Node(node_id.to_owned()),
        "deployment.replica.failed",
        &failed.name,
        "failure",
        serde_json::json!({
            "node": node,
            "digest": failed.digest,
            "reason": failed.detail,
        }),
    );
    if let Err(e) = fleet.store.append_audit(event).await {
        tracing::error!(error = %steward_telemetry::chain(&e), node_id, "could not audit a failed replica; trying again");
        // Forgotten, so the agent's next report of it is audited.
        fleet.sessions.forget_failure(node_id, failed);
    }
}

/// The error an agent gets when an artifact's blob cannot be read; logged here.
fn unreadable(path: &std::path::Path, e: &std::io::Error) -> Status {
    tracing::error!(path = %path.display(), error = %e, "reading an artifact failed");
    Status::internal(format!("reading the artifact failed: {e}"))
}

/// Drives one agent session until the agent leaves, goes silent, or is replaced.
async fn run_session(
    fleet: &Arc<Fleet>,
    deployments: &Deployments,
    node_id: &str,
    mut inbound: Streaming<AgentMessage>,
    outbound: Outbound,
) -> Result<(), String> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| "no Hello within the timeout".to_owned())?
        .map_err(|e| format!("stream error before Hello: {e}"))?
        .ok_or_else(|| "stream closed before Hello".to_owned())?;
    let Some(agent_message::Body::Hello(hello)) = first.body else {
        let _ = outbound
            .send(Err(Status::failed_precondition(
                "the first session message must be Hello",
            )))
            .await;
        return Err("first message was not Hello".into());
    };
    let inventory = hello.inventory.unwrap_or_default();
    // The session is registered before the node is stored as ready, so a node that reads
    // as ready is also connected (listing it in between showed it ready but not connected).
    let (session, node) = fleet
        .sessions
        .open_recording(
            node_id,
            outbound.clone(),
            fleet.node_connected(
                node_id,
                &hello.agent_version,
                &inventory,
                hello.applied_generation,
            ),
        )
        .await
        .map_err(|e| {
            // The write may have landed before it failed: the node may read as ready.
            fleet.sessions.remember_unrecorded(node_id);
            steward_telemetry::chain(&e).to_string()
        })?;
    // A node that comes back may take replicas that found no place while it was away.
    deployments.trigger();
    // Whatever ends the session from here on, it is closed and the node stored unavailable.
    let result = async {
        let desired = fleet
            .desired_state(&node)
            .await
            .map_err(|e| steward_telemetry::chain(&e).to_string())?;
        let _ = outbound
            .send(Ok(ControlMessage {
                body: Some(control_message::Body::DesiredState(desired)),
            }))
            .await;
        session_loop(
            fleet,
            deployments,
            node_id,
            &session,
            &mut inbound,
            inventory,
        )
        .await
    }
    .await;

    fleet.end_session(node_id, session.epoch).await;
    result
}

async fn session_loop(
    fleet: &Arc<Fleet>,
    deployments: &Deployments,
    node_id: &str,
    session: &SessionHandle,
    inbound: &mut Streaming<AgentMessage>,
    mut inventory: steward_proto::agent::v1::Inventory,
) -> Result<(), String> {
    loop {
        let message = tokio::select! {
            () = session.cancel.cancelled() => return Err("session cancelled (silent agent or newer session)".into()),
            message = inbound.message() => message,
        };
        let message = match message {
            Ok(Some(m)) => m,
            Ok(None) => return Err("agent closed the session".into()),
            Err(e) => return Err(format!("stream error: {}", e.message())),
        };
        session.touch();
        match message.body {
            Some(agent_message::Body::Heartbeat(hb)) => {
                let started = Instant::now();
                fleet.metrics.heartbeats.inc();
                if hb.last_rtt_micros > 0 {
                    fleet
                        .metrics
                        .heartbeat_rtt
                        .observe(hb.last_rtt_micros as f64 / 1e6);
                }
                let ack = ControlMessage {
                    body: Some(control_message::Body::HeartbeatAck(HeartbeatAck {
                        seq: hb.seq,
                    })),
                };
                // A full queue means the agent is not reading; dropping an ack is harmless.
                let _ = session.outbound.try_send(Ok(ack));
                // Written beside the session, which goes on reading its agent meanwhile.
                for failed in fleet.sessions.newly_failed(node_id, &hb.models) {
                    let (fleet, node_id) = (fleet.clone(), node_id.to_owned());
                    tokio::spawn(async move {
                        audit_failed_replica(&fleet, &node_id, &failed).await;
                    });
                }
                session.set_models(hb.models);
                fleet
                    .metrics
                    .heartbeat_handling
                    .observe(started.elapsed().as_secs_f64());
            }
            Some(agent_message::Body::Inventory(new)) => {
                if new != inventory {
                    // Not once a newer session of the node has stored its own inventory.
                    let stored = fleet
                        .sessions
                        .record_if_current(
                            node_id,
                            session.epoch,
                            fleet.inventory_changed(node_id, &new),
                        )
                        .await;
                    stored
                        .transpose()
                        .map_err(|e| steward_telemetry::chain(&e).to_string())?;
                    inventory = new;
                    deployments.trigger();
                }
            }
            Some(agent_message::Body::Ack(ack)) => {
                if ack.error.is_empty() {
                    let stored = fleet
                        .sessions
                        .record_if_current(
                            node_id,
                            session.epoch,
                            fleet.generation_applied(node_id, ack.generation),
                        )
                        .await;
                    stored
                        .transpose()
                        .map_err(|e| steward_telemetry::chain(&e).to_string())?;
                } else {
                    tracing::warn!(node_id, generation = ack.generation, error = %ack.error, "agent could not apply desired state");
                }
            }
            Some(agent_message::Body::ProbeResult(result)) => {
                deployments.probe_finished(node_id, &result);
            }
            Some(agent_message::Body::Hello(_)) | None => {
                let _ = session
                    .outbound
                    .send(Err(Status::failed_precondition(
                        "unexpected message in an established session",
                    )))
                    .await;
                return Err("protocol violation".into());
            }
        }
    }
}
