//! Applies the control plane's desired state. Idempotent: the same generation twice is a
//! no-op; an older generation than the one applied is ignored (a stale message from a
//! previous session). What was applied is persisted before it is acknowledged.

use std::sync::{Arc, Mutex};

use steward_proto::agent::v1::DesiredState;
use tokio::sync::watch;

use crate::state::{StateError, StateStore};

/// What [`Reconciler::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A newer generation was applied and persisted.
    Updated,
    /// The same generation was already applied.
    Unchanged,
    /// Older than what is applied; ignored.
    Stale,
}

#[derive(Debug)]
pub struct Reconciler {
    store: Arc<dyn StateStore>,
    applied: Mutex<DesiredState>,
    draining: watch::Sender<bool>,
    desired: watch::Sender<DesiredState>,
}

impl Reconciler {
    /// Starts from whatever was persisted, so a restarted agent serves what it last applied
    /// before it reaches the control plane.
    pub fn new(store: Arc<dyn StateStore>) -> Result<Self, StateError> {
        let applied = store.load()?.unwrap_or_default();
        let (draining, _) = watch::channel(applied.drain);
        let (desired, _) = watch::channel(applied.clone());
        Ok(Self {
            store,
            applied: Mutex::new(applied),
            draining,
            desired,
        })
    }

    pub fn applied(&self) -> DesiredState {
        self.lock().clone()
    }

    pub fn applied_generation(&self) -> u64 {
        self.lock().generation
    }

    /// Watch the drain flag (the inference engine stops taking new work while it is set).
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Watch the applied desired state (the models to run follow it).
    pub fn watch(&self) -> watch::Receiver<DesiredState> {
        self.desired.subscribe()
    }

    pub fn apply(&self, desired: DesiredState) -> Result<Applied, StateError> {
        let mut applied = self.lock();
        if desired.generation < applied.generation {
            return Ok(Applied::Stale);
        }
        if desired.generation == applied.generation && desired == *applied {
            return Ok(Applied::Unchanged);
        }
        self.store.save(&desired)?;
        if desired.drain != applied.drain {
            tracing::info!(
                drain = desired.drain,
                generation = desired.generation,
                "drain flag changed"
            );
        }
        self.draining.send_replace(desired.drain);
        self.desired.send_replace(desired.clone());
        *applied = desired;
        Ok(Applied::Updated)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DesiredState> {
        self.applied.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{FileStateStore, MemoryStateStore};

    fn state(generation: u64, drain: bool) -> DesiredState {
        DesiredState {
            generation,
            drain,
            models: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn newer_generations_apply_and_stale_ones_are_ignored() {
        let r = Reconciler::new(Arc::new(MemoryStateStore::default())).unwrap();
        let drain = r.draining();
        assert_eq!(r.apply(state(2, true)).unwrap(), Applied::Updated);
        assert!(*drain.borrow());
        assert_eq!(r.apply(state(2, true)).unwrap(), Applied::Unchanged);
        assert_eq!(r.apply(state(1, false)).unwrap(), Applied::Stale);
        assert_eq!(r.applied(), state(2, true));
    }

    #[test]
    fn a_restarted_agent_resumes_from_the_persisted_generation() {
        let dir = tempfile::tempdir().unwrap();
        let first = Reconciler::new(Arc::new(FileStateStore::new(dir.path()))).unwrap();
        first.apply(state(5, true)).unwrap();
        drop(first);
        let second = Reconciler::new(Arc::new(FileStateStore::new(dir.path()))).unwrap();
        assert_eq!(second.applied_generation(), 5);
        assert!(*second.draining().borrow());
        assert_eq!(second.apply(state(4, false)).unwrap(), Applied::Stale);
    }
}
