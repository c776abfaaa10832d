//! Prometheus metrics of the control plane, named `steward_<name>_<unit>[_total]`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    pub nodes: Family<StateLabel, Gauge>,
    pub sessions: Gauge,
    pub heartbeats: Counter,
    /// Round trip of heartbeats as agents measured it (reported on the next heartbeat).
    pub heartbeat_rtt: Histogram,
    /// Time from a heartbeat arriving to its acknowledgement being queued.
    pub heartbeat_handling: Histogram,
    pub enrollments: Family<OutcomeLabel, Counter>,
    pub db_writes: Counter,
    db_writes_seen: Mutex<u64>,
    /// Artifact bytes streamed to agents (a resumed pull sends only the rest).
    pub artifact_bytes_sent: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("steward");
        let nodes = Family::<StateLabel, Gauge>::default();
        registry.register("nodes", "Enrolled nodes by state", nodes.clone());
        let sessions = Gauge::default();
        registry.register(
            "agent_sessions",
            "Agent sessions open now",
            sessions.clone(),
        );
        let heartbeats = Counter::default();
        registry.register("heartbeats", "Heartbeats received", heartbeats.clone());
        let heartbeat_rtt = Histogram::new(latency_buckets());
        registry.register(
            "heartbeat_rtt_seconds",
            "Heartbeat round trip measured by agents",
            heartbeat_rtt.clone(),
        );
        let heartbeat_handling = Histogram::new(latency_buckets());
        registry.register(
            "heartbeat_handling_seconds",
            "Time the control plane spends on one heartbeat",
            heartbeat_handling.clone(),
        );
        let enrollments = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "enrollments",
            "Enrollment attempts by outcome",
            enrollments.clone(),
        );
        let db_writes = Counter::default();
        registry.register(
            "db_writes",
            "Database write transactions committed",
            db_writes.clone(),
        );
        let artifact_bytes_sent = Counter::default();
        registry.register(
            "artifact_sent_bytes",
            "Artifact bytes streamed to agents",
            artifact_bytes_sent.clone(),
        );
        Self {
            artifact_bytes_sent,
            registry,
            nodes,
            sessions,
            heartbeats,
            heartbeat_rtt,
            heartbeat_handling,
            enrollments,
            db_writes,
            db_writes_seen: Mutex::new(0),
        }
    }
}

impl Metrics {
    /// Brings the DB write counter up to the store's running total.
    pub fn observe_db_writes(&self, total: u64) {
        let mut seen = self
            .db_writes_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if total > *seen {
            self.db_writes.inc_by(total - *seen);
            *seen = total;
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
