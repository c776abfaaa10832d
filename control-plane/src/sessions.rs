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

    pub fn set_models(&self, models: Vec<ModelStatus>) {
        let mut current = self.models.lock().unwrap_or_else(|e| e.into_inner());
        if *current != models {
            *current = models;
        }
    }
}

/// A failed model as its agent reported it: name, digest and reason.
type Failure = (String, String, String);

#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    next_epoch: AtomicU64,
    /// Set by [`SessionRegistry::cancel_all`]: the control plane is stopping.
    closed: std::sync::atomic::AtomicBool,
    /// Per node, the failed models (name, digest, reason) its agent last reported; kept
    /// across sessions, so a reconnect does not report the same failure again.
    failures: Mutex<HashMap<String, Vec<Failure>>>,
    /// Per node, a turn that a session takes to open or end together with storing the
    /// node's state: see [`SessionRegistry::open_recording`].
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Nodes whose session ended (or failed to open) but could not be stored unavailable;
    /// see [`crate::fleet::Fleet::store_unrecorded_nodes_unavailable`].
    unrecorded: Mutex<std::collections::BTreeSet<String>>,
}

impl SessionRegistry {
    /// The models in the node's report that failed since its report before, across
    /// reconnects (newly failed, or failed for another digest or reason), which the control
    /// plane audits. Models from the agent's own configuration (no digest) are left out.
    pub fn newly_failed(&self, node_id: &str, models: &[ModelStatus]) -> Vec<ModelStatus> {
        let failed: Vec<&ModelStatus> = models
            .iter()
            .filter(|m| m.state() == ModelState::Failed && !m.digest.is_empty())
            .collect();
        let key = |m: &ModelStatus| (m.name.clone(), m.digest.clone(), m.detail.clone());
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let before = failures.entry(node_id.to_owned()).or_default();
        let newly = failed
            .iter()
            .filter(|m| !before.contains(&key(m)))
            .map(|m| (*m).clone())
            .collect();
        *before = failed.into_iter().map(key).collect();
        newly
    }

    /// Forgets that `failed` was reported (its audit could not be written), so the node's
    /// next report of it counts as new in [`SessionRegistry::newly_failed`].
    pub fn forget_failure(&self, node_id: &str, failed: &ModelStatus) {
        let key = (
            failed.name.clone(),
            failed.digest.clone(),
            failed.detail.clone(),
        );
        if let Some(known) = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(node_id)
        {
            known.retain(|k| *k != key);
        }
    }

    /// Opens a session for `node_id` (see [`SessionRegistry::open`]) and runs `record`, which
    /// stores the node as connected, in the node's turn: an older session that ended just
    /// before cannot store the node as unavailable after it (see
    /// [`SessionRegistry::close_recording`]). If `record` fails, the session is closed again.
    pub async fn open_recording<T, E>(
        &self,
        node_id: &str,
        outbound: Outbound,
        record: impl Future<Output = Result<T, E>>,
    ) -> Result<(SessionHandle, T), E> {
        let _turn = self.turn(node_id).await;
        let session = self.open(node_id, outbound);
        match record.await {
            Ok(recorded) => Ok((session, recorded)),
            Err(e) => {
                self.close(node_id, session.epoch);
                Err(e)
            }
        }
    }

    /// Closes the session (see [`SessionRegistry::close`]) and, if it was the node's current
    /// one, runs `record`, which stores the node as unavailable, in the node's turn: a newer
    /// session opening meanwhile stores the node as connected only after that. Without the
    /// turn, an agent that reconnected at once could stay unavailable while it is connected.
    /// Returns whether the session was current.
    pub async fn close_recording(
        &self,
        node_id: &str,
        epoch: u64,
        record: impl Future<Output = ()>,
    ) -> bool {
        let _turn = self.turn(node_id).await;
        let current = self.close(node_id, epoch);
        if current {
            record.await;
        }
        current
    }

    /// Runs `record` (storing what the session's agent reported) in the node's turn, and only
    /// if the session is still the node's current one: a session that a reconnect replaced
    /// must not overwrite what the newer session stored. `None` if it was not current.
    pub async fn record_if_current<T>(
        &self,
        node_id: &str,
        epoch: u64,
        record: impl Future<Output = T>,
    ) -> Option<T> {
        let _turn = self.turn(node_id).await;
        let current = self.lock().get(node_id).is_some_and(|s| s.epoch == epoch);
        if current { Some(record.await) } else { None }
    }

    /// Remembers that `node_id` has no session but could not be stored unavailable.
    pub fn remember_unrecorded(&self, node_id: &str) {
        self.unrecorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node_id.to_owned());
    }

    /// The nodes remembered by [`SessionRegistry::remember_unrecorded`], forgotten here.
    pub fn take_unrecorded(&self) -> Vec<String> {
        std::mem::take(&mut *self.unrecorded.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }

    /// Waits for the node's turn to open or end a session, or to store what it reported.
    pub async fn turn(&self, node_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = self
            .turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(node_id.to_owned())
            .or_default()
            .clone();
        turn.lock_owned().await
    }

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

    /// The models a connected node reported last; empty when it is not connected.
    pub fn models(&self, node_id: &str) -> Vec<ModelStatus> {
        self.get(node_id)
            .map(|h| h.models.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Unix seconds of the last message from a connected node.
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
    fn a_model_is_reported_failed_once_per_failure_across_reconnects() {
        let registry = SessionRegistry::default();
        let pulling = status("chat", ModelState::Pulling, "");
        let refused = status("chat", ModelState::Failed, "signature refused");
        let newly = |models: &[ModelStatus]| registry.newly_failed("n1", models);
        assert!(newly(std::slice::from_ref(&pulling)).is_empty());
        assert_eq!(
            newly(std::slice::from_ref(&refused)),
            std::slice::from_ref(&refused)
        );
        assert!(
            newly(std::slice::from_ref(&refused)).is_empty(),
            "the same failure reported again (also after a reconnect)"
        );
        assert_eq!(
            registry.newly_failed("n2", std::slice::from_ref(&refused)),
            std::slice::from_ref(&refused),
            "another node's failure"
        );
        let other_reason = status("chat", ModelState::Failed, "over the memory limit");
        assert_eq!(newly(std::slice::from_ref(&other_reason)), [other_reason]);
        assert!(newly(&[pulling]).is_empty());
        assert_eq!(
            newly(std::slice::from_ref(&refused)),
            std::slice::from_ref(&refused)
        );
        registry.forget_failure("n1", &refused);
        assert_eq!(
            newly(std::slice::from_ref(&refused)),
            std::slice::from_ref(&refused),
            "a failure whose audit could not be written is reported again"
        );
        let mut configured = status("local", ModelState::Failed, "no such file");
        configured.digest.clear();
        assert!(
            newly(&[configured]).is_empty(),
            "a model of the agent's own configuration is no deployment's replica"
        );
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

    /// The order a flaky end-to-end test once met: the old session ends, and while its
    /// node is being stored unavailable the agent's new session opens. The node must end
    /// stored connected.
    #[tokio::test]
    async fn a_node_that_reconnects_while_its_old_session_ends_is_stored_connected_last() {
        let registry = Arc::new(SessionRegistry::default());
        let stored = Arc::new(Mutex::new(Vec::new()));
        let (tx1, _rx1) = mpsc::channel(1);
        let old = registry.open("n1", tx1);
        let (writing, write_started) = tokio::sync::oneshot::channel();
        let closing = tokio::spawn({
            let (registry, stored) = (registry.clone(), stored.clone());
            async move {
                registry
                    .close_recording("n1", old.epoch, async {
                        writing.send(()).unwrap();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        stored.lock().unwrap().push("unavailable");
                    })
                    .await
            }
        });
        write_started.await.unwrap();
        let (tx2, _rx2) = mpsc::channel(1);
        let (new, ()) = registry
            .open_recording("n1", tx2, async {
                stored.lock().unwrap().push("connected");
                Ok::<_, String>(())
            })
            .await
            .unwrap();
        assert!(
            closing.await.unwrap(),
            "the old session was current when it ended"
        );
        assert_eq!(*stored.lock().unwrap(), ["unavailable", "connected"]);
        assert_eq!(registry.get("n1").map(|s| s.epoch), Some(new.epoch));
    }

    #[tokio::test]
    async fn a_session_whose_node_cannot_be_stored_connected_is_closed_again() {
        let registry = SessionRegistry::default();
        let (tx, _rx) = mpsc::channel(1);
        let failed = registry
            .open_recording("n1", tx, async { Err::<(), _>("database down") })
            .await;
        assert_eq!(failed.err(), Some("database down"));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn a_replaced_session_does_not_store_what_its_agent_reported() {
        let registry = SessionRegistry::default();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let old = registry.open("n1", tx1);
        assert_eq!(
            registry
                .record_if_current("n1", old.epoch, async { 1 })
                .await,
            Some(1)
        );
        let new = registry.open("n1", tx2);
        assert_eq!(
            registry
                .record_if_current("n1", old.epoch, async { 2 })
                .await,
            None,
            "the replaced session's late inventory or acknowledgement"
        );
        assert_eq!(
            registry
                .record_if_current("n1", new.epoch, async { 3 })
                .await,
            Some(3)
        );
    }

    #[test]
    fn nodes_left_unrecorded_are_handed_out_once() {
        let registry = SessionRegistry::default();
        registry.remember_unrecorded("n2");
        registry.remember_unrecorded("n1");
        registry.remember_unrecorded("n2");
        assert_eq!(registry.take_unrecorded(), ["n1", "n2"]);
        assert!(registry.take_unrecorded().is_empty());
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
