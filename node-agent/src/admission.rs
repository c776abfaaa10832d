//! Which assigned models the node's memory limit admits.
//!
//! The control plane's placement honours the limit the agent reports. The agent checks
//! again with the control plane's own estimates, in name order, so that a limit lowered
//! under models that already ran here (the agent restarts with its last desired state
//! before the control plane has re-placed anything), or a control plane that ignores the
//! limit, never makes the node load more than its operator allowed.

use steward_artifact::units::bytes as size;
use steward_proto::agent::v1::ModelAssignment;

/// Memory the node's assigned models may still take under the operator's limit.
#[derive(Clone, Copy, Debug)]
pub struct MemoryBudget {
    limit: Option<u64>,
    used: u64,
}

impl MemoryBudget {
    /// `limit`: the agent's `--memory-limit-gib` in bytes; `None` admits everything.
    pub fn new(limit: Option<u64>) -> Self {
        Self { limit, used: 0 }
    }

    /// Counts a model that already runs here (it was admitted before).
    pub fn charge(&mut self, model: &ModelAssignment) {
        self.used = self.used.saturating_add(model.memory_estimate_bytes);
    }

    /// Admits `model` and counts it if it fits beside what is counted; otherwise says why.
    /// A model without an estimate (from a control plane that sends none) counts as 0.
    pub fn admit(&mut self, model: &ModelAssignment) -> Result<(), String> {
        let needed = model.memory_estimate_bytes;
        if let Some(limit) = self.limit {
            let left = limit.saturating_sub(self.used);
            if needed > left {
                return Err(format!(
                    "not loaded: over the node's memory limit: the model needs {} by the \
                     control plane's estimate (weights and KV cache for {} × {} tokens), {} is \
                     left of the {} the agent's --memory-limit-gib allows",
                    size(needed),
                    model.slots,
                    model.context_per_slot,
                    size(left),
                    size(limit),
                ));
            }
        }
        self.used = self.used.saturating_add(needed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, mib: u64) -> ModelAssignment {
        ModelAssignment {
            name: name.into(),
            slots: 2,
            context_per_slot: 512,
            memory_estimate_bytes: mib << 20,
            ..ModelAssignment::default()
        }
    }

    #[test]
    fn models_are_admitted_until_the_limit_and_the_rest_say_why() {
        let mut budget = MemoryBudget::new(Some(100 << 20));
        budget.charge(&model("running", 30));
        assert_eq!(budget.admit(&model("a", 50)), Ok(()));
        let refused = budget.admit(&model("b", 40)).unwrap_err();
        assert_eq!(
            refused,
            "not loaded: over the node's memory limit: the model needs 40.0 MiB by the \
             control plane's estimate (weights and KV cache for 2 × 512 tokens), 20.0 MiB is \
             left of the 100 MiB the agent's --memory-limit-gib allows"
        );
        // A refused model took nothing: a smaller one still fits.
        assert_eq!(budget.admit(&model("c", 20)), Ok(()));
        assert!(budget.admit(&model("d", 1)).is_err());
    }

    #[test]
    fn without_a_limit_every_model_is_admitted() {
        let mut budget = MemoryBudget::new(None);
        for i in 0..4 {
            assert_eq!(budget.admit(&model(&format!("m{i}"), 1 << 20)), Ok(()));
        }
    }

    #[test]
    fn a_model_without_an_estimate_is_admitted_under_a_full_limit() {
        let mut budget = MemoryBudget::new(Some(10 << 20));
        assert_eq!(budget.admit(&model("fills", 10)), Ok(()));
        assert_eq!(budget.admit(&model("unknown", 0)), Ok(()));
        assert!(budget.admit(&model("more", 1)).is_err());
    }
}
