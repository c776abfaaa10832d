//! Open agent sessions, held in memory.
//!
//! Heartbeats only touch an atomic timestamp here; the database hears about a node only when
//! its state changes (session opened, session lost). A sweeper cancels sessions whose agent
//! has gone quiet, which is how a node behind a dead network path becomes unavailable.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use steward_proto::agent::v1::{
    ControlMessage, DesiredState, ModelState, ModelStatus, control_message,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

/// One open session, as the registry sees it.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    pub epoch: u64,
    pub outbound: Outbound,
    pub cancel: CancellationToken,
    /// Unix milliseconds of the last message from the agent.
    pub last_seen_ms: Arc<AtomicI64>,
    /// The models and their serving stats from the agent's last heartbeat.
    pub models: Arc<Mutex<Vec<ModelStatus>>>,
}

impl SessionHandle {
    pub fn touch(&self) {
        self.last_seen_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Keeps the agent's latest report; returns the models in it that failed since the
    /// report before (newly failed, or failed for another digest or another reason), which
    /// the control plane audits.
    pub fn set_models(&self, models: Vec<ModelStatus>) -> Vec<ModelStatus> {
        let mut current = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let failed = |m: &ModelStatus| m.state() == ModelState::Failed;
        let newly_failed = models
            .iter()
            .filter(|m| {
                failed(m)
                    && !current.iter().any(|c| {
                        failed(c)
                            && c.name == m.name
                            && c.digest == m.digest
                            && c.detail == m.detail
                    })
            })
            .cloned()
            .collect();
        if *current != models {
            *current = models;
        }
        newly_failed
    }
}

#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    next_epoch: AtomicU64,
    /// Set by [`SessionRegistry::cancel_all`]: the control plane is stopping.
    closed: std::sync::atomic::AtomicBool,
}

impl SessionRegistry {
    /// Registers a new session for `node_id`, ending any older one for the same node (an agent
    /// that reconnects before its old connection timed out).
    pub fn open(&self, node_id: &str, outbound: Outbound) -> SessionHandle {
        let handle = SessionHandle {
            epoch: self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1,
            outbound,
            cancel: CancellationToken::new(),
            last_seen_ms: Arc::new(AtomicI64::new(now_ms())),
            models: Arc::default(),
        };
        let previous = self.lock().insert(node_id.to_owned(), handle.clone());
        if let Some(previous) = previous {
            previous.cancel.cancel();
        }
        // A session that arrives while the control plane stops (an agent reconnecting at
        // once over a connection the graceful shutdown still serves) ends at once; otherwise
        // it would outlive the shutdown and the agent would never reach the next instance.
        if self.closed.load(Ordering::SeqCst) {
            handle.cancel.cancel();
        }
        handle
    }

    /// Removes the session if it is still the current one for the node. Returns whether it
    /// was (only then is the node really gone).
    pub fn close(&self, node_id: &str, epoch: u64) -> bool {
        let mut sessions = self.lock();
        match sessions.get(node_id) {
            Some(current) if current.epoch == epoch => {
                sessions.remove(node_id);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, node_id: &str) -> Option<SessionHandle> {
        self.lock().get(node_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pushes a desired state to the node if it is connected. Returns whether it was queued.
    pub fn push_desired_state(&self, node_id: &str, desired: DesiredState) -> bool {
        self.push(node_id, control_message::Body::DesiredState(desired))
    }

    /// Sends a message to the node if it is connected. Returns whether it was queued.
    pub fn push(&self, node_id: &str, body: control_message::Body) -> bool {
        let Some(session) = self.get(node_id) else {
            return false;
        };
        let message = ControlMessage { body: Some(body) };
        match session.outbound.try_send(Ok(message)) {
            Ok(()) => true,
            Err(_) => {
                // The agent is not reading; it will get the current state when it reconnects.
                session.cancel.cancel();
                false
            }
        }
    }

    /// Cancels sessions silent for longer than `timeout`; returns how many.
    pub fn cancel_silent(&self, timeout: Duration) -> usize {
        let cutoff = now_ms() - timeout.as_millis() as i64;
        let sessions = self.lock();
        let mut n = 0;
        for handle in sessions.values() {
            if handle.last_seen_ms.load(Ordering::Relaxed) < cutoff && !handle.cancel.is_cancelled()
            {
                handle.cancel.cancel();
                n += 1;
            }
        }
        n
    }

    /// Whether the control plane is stopping (no new sessions).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Ends every session, and every session opened from now on (control-plane shutdown).
    pub fn cancel_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for handle in self.lock().values() {
            handle.cancel.cancel();
        }
    }

    /// Unix seconds of the last message from a connected node.
    /// The models a connected node reported last; empty when it is not connected.
    pub fn models(&self, node_id: &str) -> Vec<ModelStatus> {
        self.get(node_id)
            .map(|h| h.models.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    pub fn last_seen_unix(&self, node_id: &str) -> Option<i64> {
        self.get(node_id)
            .map(|h| h.last_seen_ms.load(Ordering::Relaxed) / 1000)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHandle>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, state: ModelState, detail: &str) -> ModelStatus {
        ModelStatus {
            name: name.into(),
            digest: "d1".into(),
            state: state as i32,
            detail: detail.into(),
            ..ModelStatus::default()
        }
    }

    #[test]
    fn a_model_is_reported_failed_once_per_failure() {
        let registry = SessionRegistry::default();
        let (tx, _rx) = mpsc::channel(1);
        let session = registry.open("n1", tx);
        let pulling = status("chat", ModelState::Pulling, "");
        let refused = status("chat", ModelState::Failed, "signature refused");
        assert!(session.set_models(vec![pulling.clone()]).is_empty());
        assert_eq!(
            session.set_models(vec![refused.clone()]),
            std::slice::from_ref(&refused)
        );
        assert!(
            session.set_models(vec![refused.clone()]).is_empty(),
            "the same failure reported again"
        );
        let other_reason = status("chat", ModelState::Failed, "over the memory limit");
        assert_eq!(
            session.set_models(vec![other_reason.clone()]),
            [other_reason]
        );
        assert!(session.set_models(vec![pulling]).is_empty());
        assert_eq!(session.set_models(vec![refused.clone()]), [refused]);
    }

    #[test]
    fn a_reconnect_cancels_the_older_session_and_only_the_newer_one_closes_the_node() {
        let registry = SessionRegistry::default();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let old = registry.open("n1", tx1);
        let new = registry.open("n1", tx2);
        assert!(old.cancel.is_cancelled());
        assert!(
            !registry.close("n1", old.epoch),
            "stale session must not close the node"
        );
        assert!(registry.get("n1").is_some());
        assert!(registry.close("n1", new.epoch));
        assert!(registry.is_empty());
    }

    #[test]
    fn silent_sessions_are_cancelled_and_chatty_ones_are_not() {
        let registry = SessionRegistry::default();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let quiet = registry.open("quiet", tx1);
        let chatty = registry.open("chatty", tx2);
        quiet
            .last_seen_ms
            .store(now_ms() - 60_000, Ordering::Relaxed);
        chatty.touch();
        assert_eq!(registry.cancel_silent(Duration::from_secs(15)), 1);
        assert!(quiet.cancel.is_cancelled());
        assert!(!chatty.cancel.is_cancelled());
    }
}
