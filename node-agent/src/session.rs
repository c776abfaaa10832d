//! The agent's half of the session: one long-lived bidirectional stream, re-established with
//! exponential backoff and jitter whenever it breaks. The agent always dials out.
//!
//! On the stream the agent sends Hello (inventory and the generation it has applied), then
//! heartbeats and inventory changes; the control plane sends desired states, which the
//! [`Reconciler`] applies and the agent acknowledges.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use steward_proto::agent::v1::agent_service_client::AgentServiceClient;
use steward_proto::agent::v1::{
    AgentMessage, DesiredStateAck, Heartbeat, Hello, ProbeResult, agent_message, control_message,
};
use steward_proto::transport::Windows;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::identity::{IdentityError, IdentityStore, now_unix, renew};
use crate::inventory::{InventoryProbe, significant};
use crate::reconciler::{Applied, Reconciler};
use steward_proto::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the control plane ended the session: {0}")]
    Rpc(String),
    #[error("no message from the control plane for {0:?}")]
    Silent(Duration),
    #[error("cannot persist desired state")]
    State(#[from] crate::state::StateError),
}

/// How one agent talks to the control plane.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub endpoint: String,
    pub heartbeat_interval: Duration,
    pub inventory_interval: Duration,
    pub agent_version: String,
    pub backoff: Backoff,
}

impl SessionConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            heartbeat_interval: Duration::from_secs(5),
            inventory_interval: Duration::from_secs(60),
            agent_version: crate::AGENT_VERSION.to_owned(),
            backoff: Backoff::default(),
        }
    }
}

/// The agent's parts the session drives. The simulator fills these with in-memory and
/// synthetic implementations; the session code is the same.
#[derive(Clone, Debug)]
pub struct SessionParts {
    pub identity: Arc<dyn IdentityStore>,
    pub probe: Arc<dyn InventoryProbe>,
    pub reconciler: Arc<Reconciler>,
    pub stats: Arc<SessionStats>,
    /// The models reported with every heartbeat.
    pub models: Arc<dyn crate::serving::ModelReporter>,
    /// Notified when the artifact cache gained or lost a file: the inventory is then sent
    /// at once, exactly. (Its periodic send rounds free disk to 1/64 of the disk, which
    /// would hide an artifact's disk from placement for good.)
    pub cache_changed: Arc<tokio::sync::Notify>,
}

/// Counters shared by one or many agents (the simulator shares one across all).
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Sessions established right now.
    pub connected: AtomicI64,
    pub sessions_opened: AtomicU64,
    pub heartbeats_acked: AtomicU64,
    pub renewals: AtomicU64,
    rtt_micros: Mutex<Vec<u32>>,
}

impl SessionStats {
    fn record_rtt(&self, rtt: Duration) {
        self.heartbeats_acked.fetch_add(1, Ordering::Relaxed);
        let micros = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX);
        self.rtt_micros
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(micros);
    }

    /// Takes the heartbeat round trips recorded since the last call.
    pub fn take_rtts(&self) -> Vec<u32> {
        std::mem::take(&mut *self.rtt_micros.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

enum SessionEnd {
    Shutdown,
    Renewed,
    Closed,
}

/// Keeps a session up until `shutdown` fires.
pub async fn maintain(config: SessionConfig, parts: SessionParts, shutdown: CancellationToken) {
    let mut backoff = config.backoff.clone();
    loop {
        let started = Instant::now();
        let result = one_session(&config, &parts, &shutdown).await;
        // A session that lasted a while was healthy: start the next backoff from the bottom.
        if started.elapsed() > config.heartbeat_interval * 2 {
            backoff.reset();
        }
        match result {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::Renewed) => {
                backoff.reset();
                continue;
            }
            Ok(SessionEnd::Closed) => {
                tracing::warn!("control plane closed the session; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %steward_telemetry::chain(&e), "session failed");
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(delay = ?delay, "reconnecting after backoff");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn one_session(
    config: &SessionConfig,
    parts: &SessionParts,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, SessionError> {
    let identity = parts.identity.load()?.ok_or(IdentityError::NotEnrolled)?;
    let channel = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        c = identity.channel(&config.endpoint, Windows::default()) => c?,
    };
    if now_unix() >= identity.renewal_due_unix() {
        renew_and_store(channel, &identity, parts).await?;
        return Ok(SessionEnd::Renewed);
    }

    let inventory = parts.probe.inventory().await;
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            agent_version: config.agent_version.clone(),
            inventory: Some(inventory.clone()),
            applied_generation: parts.reconciler.applied_generation(),
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| SessionError::Rpc("outbound stream closed".into()))?;
    let mut client = AgentServiceClient::new(channel.clone());
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| SessionError::Rpc(s.message().to_owned()))?
        .into_inner();

    parts.stats.connected.fetch_add(1, Ordering::Relaxed);
    parts.stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
    tracing::info!(node_id = %identity.node_id, "session established");
    let result = session_loop(
        config,
        parts,
        shutdown,
        &identity,
        channel,
        &tx,
        &mut inbound,
        inventory,
    )
    .await;
    parts.stats.connected.fetch_sub(1, Ordering::Relaxed);
    result
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    config: &SessionConfig,
    parts: &SessionParts,
    shutdown: &CancellationToken,
    identity: &crate::identity::NodeIdentity,
    channel: tonic::transport::Channel,
    tx: &mpsc::Sender<AgentMessage>,
    inbound: &mut tonic::Streaming<steward_proto::agent::v1::ControlMessage>,
    mut last_inventory: steward_proto::agent::v1::Inventory,
) -> Result<SessionEnd, SessionError> {
    let send = |message: agent_message::Body| async move {
        tx.send(AgentMessage {
            body: Some(message),
        })
        .await
        .map_err(|_| SessionError::Rpc("outbound stream closed".into()))
    };
    // Spread heartbeats of many agents across the interval instead of firing them together.
    let offset = rand::rng().random_range(0..config.heartbeat_interval.as_millis().max(1) as u64);
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(offset),
        config.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inventory_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + config.inventory_interval,
        config.inventory_interval,
    );
    inventory_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renew_in = Duration::from_secs((identity.renewal_due_unix() - now_unix()).max(0) as u64);
    let renewal = tokio::time::sleep(renew_in);
    tokio::pin!(renewal);

    let silence_limit = config.heartbeat_interval * 3;
    let mut last_inbound = Instant::now();
    let mut seq = 0u64;
    let mut pending: Option<(u64, Instant)> = None;
    let mut last_rtt = Duration::ZERO;

    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            () = &mut renewal => {
                renew_and_store(channel, identity, parts).await?;
                return Ok(SessionEnd::Renewed);
            }
            _ = heartbeat.tick() => {
                if last_inbound.elapsed() > silence_limit {
                    return Err(SessionError::Silent(last_inbound.elapsed()));
                }
                seq += 1;
                pending = Some((seq, Instant::now()));
                send(agent_message::Body::Heartbeat(Heartbeat {
                    seq,
                    last_rtt_micros: last_rtt.as_micros() as u64,
                    models: parts.models.model_statuses(),
                })).await?;
            }
            () = parts.cache_changed.notified() => {
                let current = parts.probe.inventory().await;
                if current != last_inventory {
                    send(agent_message::Body::Inventory(current.clone())).await?;
                    last_inventory = current;
                }
            }
            _ = inventory_tick.tick() => {
                let current = parts.probe.inventory().await;
                if significant(&current) != significant(&last_inventory) {
                    send(agent_message::Body::Inventory(current.clone())).await?;
                    last_inventory = current;
                }
            }
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(SessionEnd::Closed),
                    Err(status) => return Err(SessionError::Rpc(status.message().to_owned())),
                };
                last_inbound = Instant::now();
                match message.body {
                    Some(control_message::Body::HeartbeatAck(ack)) => {
                        if let Some((pending_seq, sent)) = pending
                            && pending_seq == ack.seq
                        {
                            last_rtt = sent.elapsed();
                            parts.stats.record_rtt(last_rtt);
                            pending = None;
                        }
                    }
                    Some(control_message::Body::DesiredState(desired)) => {
                        let generation = desired.generation;
                        let ack = match parts.reconciler.apply(desired) {
                            Ok(Applied::Updated) => {
                                tracing::info!(generation, "applied desired state");
                                DesiredStateAck { generation, error: String::new() }
                            }
                            Ok(Applied::Unchanged) => DesiredStateAck { generation, error: String::new() },
                            Ok(Applied::Stale) => {
                                tracing::debug!(generation, "ignored stale desired state");
                                DesiredStateAck {
                                    generation: parts.reconciler.applied_generation(),
                                    error: String::new(),
                                }
                            }
                            Err(e) => {
                                tracing::error!(generation, error = %steward_telemetry::chain(&e), "cannot apply desired state");
                                DesiredStateAck { generation, error: steward_telemetry::chain(&e).to_string() }
                            }
                        };
                        send(agent_message::Body::Ack(ack)).await?;
                    }
                    Some(control_message::Body::Probe(request)) => {
                        // Answered from its own task: a probe waits on inference, and the
                        // session must keep its heartbeats going meanwhile.
                        let (models, tx) = (parts.models.clone(), tx.clone());
                        tokio::spawn(async move {
                            let outcome = match models.ready_model(&request.model, &request.digest) {
                                Ok(model) => crate::serving::probe(model).await,
                                Err(why) => Err(why),
                            };
                            tracing::info!(model = %request.model, ok = outcome.is_ok(), "answered a probe");
                            let (ok, detail) = match outcome {
                                Ok(answer) => (true, answer),
                                Err(why) => (false, why),
                            };
                            let _ = tx
                                .send(AgentMessage {
                                    body: Some(agent_message::Body::ProbeResult(ProbeResult {
                                        id: request.id,
                                        ok,
                                        detail,
                                    })),
                                })
                                .await;
                        });
                    }
                    None => {}
                }
            }
        }
    }
}

async fn renew_and_store(
    channel: tonic::transport::Channel,
    identity: &crate::identity::NodeIdentity,
    parts: &SessionParts,
) -> Result<(), SessionError> {
    let renewed = renew(channel, identity).await?;
    parts.identity.save(&renewed)?;
    parts.stats.renewals.fetch_add(1, Ordering::Relaxed);
    tracing::info!(node_id = %renewed.node_id, not_after = renewed.not_after_unix, "certificate renewed");
    Ok(())
}
