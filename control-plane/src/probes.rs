//! Probe requests the control plane sent to agents (a rollout step is proven by the new
//! model answering one), and their answers. Held in memory: after a restart a step that was
//! not yet proven is simply probed again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use steward_proto::agent::v1::{ProbeRequest, ProbeResult, control_message};

use crate::rollout::Probe;
use crate::sessions::SessionRegistry;

/// A probe unanswered for this long (the agent reconnected, the message was lost) is sent
/// again.
const RESEND_AFTER: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    node_id: String,
    deployment: String,
    digest: String,
}

#[derive(Debug)]
enum Entry {
    Waiting { id: u64, sent: Instant },
    Done(Probe),
}

#[derive(Debug, Default)]
pub struct Probes {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    entries: HashMap<Key, Entry>,
}

impl Probes {
    /// Where the probe of `deployment` at `digest` on `node_id` stands.
    pub fn state(&self, node_id: &str, deployment: &str, digest: &str) -> Probe {
        let inner = self.lock();
        match inner.entries.get(&key(node_id, deployment, digest)) {
            None => Probe::NotSent,
            Some(Entry::Waiting { sent, .. }) if sent.elapsed() > RESEND_AFTER => Probe::NotSent,
            Some(Entry::Waiting { .. }) => Probe::Waiting,
            Some(Entry::Done(probe)) => probe.clone(),
        }
    }

    /// Sends a probe over the node's session; returns whether it was queued.
    pub fn send(
        &self,
        sessions: &SessionRegistry,
        node_id: &str,
        deployment: &str,
        digest: &str,
    ) -> bool {
        let id = {
            let mut inner = self.lock();
            inner.next_id += 1;
            let id = inner.next_id;
            inner.entries.insert(
                key(node_id, deployment, digest),
                Entry::Waiting {
                    id,
                    sent: Instant::now(),
                },
            );
            id
        };
        let request = ProbeRequest {
            id,
            model: deployment.to_owned(),
            digest: digest.to_owned(),
        };
        let queued = sessions.push(node_id, control_message::Body::Probe(request));
        if queued {
            tracing::info!(node_id, deployment, digest, id, "probe sent");
        } else {
            self.lock()
                .entries
                .remove(&key(node_id, deployment, digest));
        }
        queued
    }

    /// Records an agent's answer from `node_id`; unknown or stale ids are ignored.
    pub fn finished(&self, node_id: &str, result: &ProbeResult) {
        let mut inner = self.lock();
        let key = inner.entries.iter().find_map(|(k, e)| match e {
            Entry::Waiting { id, .. } if *id == result.id && k.node_id == node_id => {
                Some(k.clone())
            }
            _ => None,
        });
        if let Some(key) = key {
            let probe = if result.ok {
                Probe::Passed(result.detail.clone())
            } else {
                Probe::Failed(result.detail.clone())
            };
            tracing::info!(node_id, deployment = %key.deployment, ok = result.ok, detail = %result.detail, "probe answered");
            inner.entries.insert(key, Entry::Done(probe));
        }
    }

    /// Forgets every probe of `deployment` (its rollout ended).
    pub fn forget(&self, deployment: &str) {
        self.lock()
            .entries
            .retain(|k, _| k.deployment != deployment);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn key(node_id: &str, deployment: &str, digest: &str) -> Key {
    Key {
        node_id: node_id.to_owned(),
        deployment: deployment.to_owned(),
        digest: digest.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[test]
    fn an_answer_is_recorded_only_for_the_probe_it_answers() {
        let sessions = SessionRegistry::default();
        let (tx, mut rx) = mpsc::channel(4);
        sessions.open("n1", tx);
        let probes = Probes::default();
        assert_eq!(probes.state("n1", "chat", "d2"), Probe::NotSent);
        assert!(probes.send(&sessions, "n1", "chat", "d2"));
        let sent = match rx.try_recv().unwrap().unwrap().body {
            Some(control_message::Body::Probe(p)) => p,
            other => panic!("expected a probe, got {other:?}"),
        };
        assert_eq!((sent.model.as_str(), sent.digest.as_str()), ("chat", "d2"));
        assert_eq!(probes.state("n1", "chat", "d2"), Probe::Waiting);

        let answer = |id, ok| ProbeResult {
            id,
            ok,
            detail: "4 tokens".into(),
        };
        probes.finished("n2", &answer(sent.id, true));
        probes.finished("n1", &answer(sent.id + 1, true));
        assert_eq!(probes.state("n1", "chat", "d2"), Probe::Waiting);
        probes.finished("n1", &answer(sent.id, false));
        assert_eq!(
            probes.state("n1", "chat", "d2"),
            Probe::Failed("4 tokens".into())
        );
        probes.forget("chat");
        assert_eq!(probes.state("n1", "chat", "d2"), Probe::NotSent);
    }

    #[test]
    fn a_probe_to_a_node_without_a_session_is_not_left_waiting() {
        let probes = Probes::default();
        assert!(!probes.send(&SessionRegistry::default(), "gone", "chat", "d"));
        assert_eq!(probes.state("gone", "chat", "d"), Probe::NotSent);
    }
}
