//! Rollouts: moving a deployment's replicas from one model, or one set of serving settings
//! (slots, context, GPU layers), to another, node by node. Either change restarts a replica,
//! so both are gated the same way, and so is the way back.
//!
//! [`advance`] is a pure function of the deployment (its stored rollout), where its replicas
//! run and what their agents report, so it is tested without a database and a restarted
//! control plane carries on from what was stored. Each call, towards the target (`to` while
//! progressing, `from` while rolling back):
//! - checks the nodes already switched: a model that is ready gets a probe request, and a
//!   passed probe verifies the step. While progressing, a model that failed, a probe that
//!   failed, or a step not proven within the step timeout turns the rollout around: the
//!   deployment takes `from` (model and settings) again, the switched nodes not yet proven
//!   return at once and the proven ones one step at a time ([`begin_roll_back`]). If the way
//!   back fails too, every replica takes `from` at once;
//! - switches further nodes (in node-name order) while fewer than `max_unavailable` steps
//!   are unverified;
//! - ends the rollout (complete, or rolled back) when every replica runs the target and
//!   every step is verified.
//!
//! A replica's state counts for the target only when the agent reports it for the target's
//! digest and settings: the same digest under the old settings is still the old replica.
//!
//! Replicas placed on new nodes during a rollout start on the target directly: there is
//! nothing running there to keep available.

use std::collections::BTreeMap;

use serde_json::json;
use steward_db::{
    DeploymentRecord, ModelRef, Rollout, RolloutPhase, RolloutStep, ServingSettings, UnixSeconds,
};
use steward_proto::agent::v1::{ModelState, ModelStatus};

/// What a replica runs: a model and the settings it runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    pub digest: String,
    pub settings: ServingSettings,
}

impl Revision {
    /// Whether the agent's report is about this revision. Agents that do not report the
    /// settings they were assigned (0 slots) are matched by digest alone.
    pub fn reported_by(&self, status: &ModelStatus) -> bool {
        status.digest == self.digest
            && (status.assigned_slots == 0
                || ServingSettings {
                    slots: status.assigned_slots,
                    context_per_slot: status.assigned_context_per_slot,
                    gpu_layers: status.assigned_gpu_layers,
                } == self.settings)
    }
}

/// A replica of the deployment, as placed now.
#[derive(Clone, Debug)]
pub struct ReplicaView {
    pub node_id: String,
    pub node_name: String,
    /// What the node is assigned for this deployment.
    pub assigned: Revision,
    /// What the agent last reported for the deployment's model; `None` when it has not.
    pub status: Option<ModelStatus>,
}

/// Where the probe of a switched node stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    NotSent,
    Waiting,
    Passed(String),
    Failed(String),
}

/// An audit event the step produced: action and details (the target is the deployment).
#[derive(Clone, Debug, PartialEq)]
pub struct StepEvent {
    pub action: &'static str,
    pub outcome: &'static str,
    pub details: serde_json::Value,
}

/// What one call decided.
#[derive(Debug, Default)]
pub struct Advance {
    /// Whether the stored rollout (or deployment) changed and must be written.
    pub changed: bool,
    pub events: Vec<StepEvent>,
    /// Switched nodes whose target model is ready and must be probed.
    pub probe: Vec<String>,
    /// Node id → what the replicas already placed keep (see `placement::Demand::pinned`).
    pub pinned: BTreeMap<String, Revision>,
}

/// Starts a rollout of `record` to model `to` with `to_settings` (the record takes both).
pub fn start(
    record: &mut DeploymentRecord,
    to: ModelRef,
    to_settings: ServingSettings,
    actor: &str,
    now: UnixSeconds,
) {
    let from = current_model(record);
    let from_settings = record.settings();
    record.model_name = to.name.clone();
    record.model_version = to.version.clone();
    record.digest = to.digest.clone();
    record.set_settings(to_settings);
    record.rollout = Some(Rollout {
        phase: RolloutPhase::Progressing,
        from,
        to,
        from_settings: Some(from_settings),
        to_settings: Some(to_settings),
        started_at: now,
        finished_at: None,
        started_by: actor.to_owned(),
        steps: BTreeMap::new(),
        message: String::new(),
        checked_at: Some(now),
    });
}

/// Turns a progressing rollout around: the deployment takes `from` (model and settings)
/// again, and its replicas return to it node by node. The nodes switched but not yet proven
/// (the one that failed among them) return at once, ahead of the others: they serve nothing
/// useful now. The nodes already proven on `to` keep it until their turn, so the deployment
/// keeps its capacity on the way back.
pub fn begin_roll_back(record: &mut DeploymentRecord, reason: &str, now: UnixSeconds) {
    let Some(rollout) = record.rollout.as_mut() else {
        return;
    };
    rollout.phase = RolloutPhase::RollingBack;
    rollout.message = reason.to_owned();
    rollout.steps = std::mem::take(&mut rollout.steps)
        .into_iter()
        .filter(|(_, step)| step.verified_at.is_none())
        .map(|(node, step)| {
            let step = RolloutStep {
                node_name: step.node_name,
                started_at: now,
                verified_at: None,
            };
            (node, step)
        })
        .collect();
    restore_from(record);
}

/// Ends a rollout (either direction) with every replica on `from` at once.
pub fn roll_back(record: &mut DeploymentRecord, reason: &str, now: UnixSeconds) {
    let Some(rollout) = record.rollout.as_mut() else {
        return;
    };
    rollout.phase = RolloutPhase::RolledBack;
    rollout.finished_at = Some(now);
    rollout.message = reason.to_owned();
    restore_from(record);
}

/// The deployment takes its rollout's `from` model and settings.
fn restore_from(record: &mut DeploymentRecord) {
    let Some(rollout) = record.rollout.as_ref() else {
        return;
    };
    let from = rollout.from.clone();
    let from_settings = rollout.from_settings;
    record.model_name = from.name;
    record.model_version = from.version;
    record.digest = from.digest;
    if let Some(settings) = from_settings {
        record.set_settings(settings);
    }
}

/// Why each of a rollout's two models may no longer run (its artifact is revoked, or no
/// longer trusted); `None` where it still may.
#[derive(Clone, Debug, Default)]
pub struct Unusable {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// Ends an active rollout at once when one of its two models may no longer run. A revoked
/// model must stop serving on every node now, not when the rollout reaches the node, and it
/// is no way back: every replica takes the other model at once, ungated. That holds for a
/// rollback too: when the model it returns to may no longer run, every replica takes the
/// new model again (a failure, in the audit log), which serves where it works rather than
/// nothing anywhere. Returns the audit event, or `None` when both models may still run (or
/// no rollout is active).
pub fn end_for_unusable(
    record: &mut DeploymentRecord,
    unusable: &Unusable,
    now: UnixSeconds,
) -> Option<StepEvent> {
    let rollout = record.rollout.as_ref().filter(|r| r.phase.is_active())?;
    let (from_settings, to_settings) = settings_of(record, rollout);
    let phase = rollout.phase;
    let (reason, action, outcome) = match (&unusable.from, &unusable.to) {
        (_, Some(why)) => (
            format!("the new model {} may no longer run: {why}", rollout.to),
            "deployment.rollback.forced",
            if unusable.from.is_none() {
                "success"
            } else {
                "failure"
            },
        ),
        (Some(why), None) if phase == RolloutPhase::Progressing => (
            format!(
                "the previous model {} may no longer run: {why}",
                rollout.from
            ),
            "deployment.rollout.forced",
            "success",
        ),
        (Some(why), None) => (
            format!(
                "{}; then, on the way back, the previous model {} may no longer run: {why}; \
                 every replica takes the new model again",
                rollout.message, rollout.from
            ),
            "deployment.rollout.forced",
            "failure",
        ),
        (None, None) => return None,
    };
    let forward = action == "deployment.rollout.forced";
    let details = json!({
        "automatic": true,
        "reason": reason,
        "from": if forward { rollout.from.to_string() } else { rollout.to.to_string() },
        "from_digest": if forward { &rollout.from.digest } else { &rollout.to.digest },
        "from_settings": if forward { from_settings } else { to_settings }.to_string(),
        "to": if forward { rollout.to.to_string() } else { rollout.from.to_string() },
        "to_digest": if forward { &rollout.to.digest } else { &rollout.from.digest },
        "to_settings": if forward { to_settings } else { from_settings }.to_string(),
    });
    if forward {
        let rollout = record.rollout.as_mut().expect("checked above");
        rollout.phase = RolloutPhase::Complete;
        rollout.finished_at = Some(now);
        rollout.message = reason;
        let to = rollout.to.clone();
        record.model_name = to.name;
        record.model_version = to.version;
        record.digest = to.digest;
        record.set_settings(to_settings);
    } else {
        roll_back(record, &reason, now);
    }
    Some(StepEvent {
        action,
        outcome,
        details,
    })
}

/// The settings a rollout moves from and to (see [`Rollout::from_settings`]).
pub fn settings_of(
    record: &DeploymentRecord,
    rollout: &Rollout,
) -> (ServingSettings, ServingSettings) {
    let current = record.settings();
    (
        rollout.from_settings.unwrap_or(current),
        rollout.to_settings.unwrap_or(current),
    )
}

/// The revision an active rollout started from: where a failed rollout goes back to, so
/// placement keeps room for it on every node the rollout pins.
pub fn rolled_from(record: &DeploymentRecord) -> Option<Revision> {
    let rollout = record.rollout.as_ref().filter(|r| r.phase.is_active())?;
    let (from, _) = settings_of(record, rollout);
    Some(Revision {
        digest: rollout.from.digest.clone(),
        settings: from,
    })
}

pub fn current_model(record: &DeploymentRecord) -> ModelRef {
    ModelRef {
        name: record.model_name.clone(),
        version: record.model_version.clone(),
        digest: record.digest.clone(),
    }
}

/// How often, at most, a control plane stores that it timed a rollout's steps once it has
/// run a while: after a crash, up to this much of the time it ran counts as downtime.
pub const CHECK_EVERY_SECS: i64 = 10;

/// Leaves the time no control plane ran out of the rollout's step clocks. A control plane
/// that was down (and whose agents have not reconnected yet, so it knows none of their
/// states) must not count that time against a step, and one that restarts often must still
/// time a hung step out: each step's start moves on by the downtime, from when a control
/// plane last timed the steps (`checked_at`) to when this one `started`, once. A step begun
/// inside that gap (after the last stored check) is timed from `started`; so is every step
/// of a rollout stored before `checked_at` was kept.
///
/// Then records `now` as checked when the stored check predates `started`, lies in the
/// future (a clock set back), or is as old as half the time since `started` (at least 1 s,
/// at most [`CHECK_EVERY_SECS`]): a control plane that crashes soon after it starts has
/// stored checks often enough that at least half of its run counts. Returns whether the
/// record changed and must be stored.
pub fn time_steps(record: &mut DeploymentRecord, started: UnixSeconds, now: UnixSeconds) -> bool {
    let Some(rollout) = record.rollout.as_mut() else {
        return false;
    };
    match rollout.checked_at {
        Some(checked) if checked >= started => {
            let every = ((now - started) / 2).clamp(1, CHECK_EVERY_SECS);
            if (0..every).contains(&(now - checked)) {
                return false;
            }
        }
        Some(checked) => {
            let down = started - checked;
            for step in rollout.steps.values_mut() {
                step.started_at = if step.started_at <= checked {
                    step.started_at + down
                } else {
                    step.started_at.max(started)
                };
            }
        }
        None => {
            for step in rollout.steps.values_mut() {
                step.started_at = step.started_at.max(started);
            }
        }
    }
    rollout.checked_at = Some(now);
    true
}

/// Moves a progressing or rolling-back rollout on; see the module docs.
pub fn advance(
    record: &mut DeploymentRecord,
    replicas: &[ReplicaView],
    probe: impl Fn(&str) -> Probe,
    now: UnixSeconds,
    step_timeout_secs: i64,
) -> Advance {
    let mut out = Advance::default();
    let max_unavailable = record.max_unavailable.max(1) as usize;
    let Some(phase) = record.rollout.as_ref().map(|r| r.phase) else {
        return out;
    };
    if !phase.is_active() {
        return out;
    }
    let mut rollout = record.rollout.clone().expect("checked above");
    let (from_settings, to_settings) = settings_of(record, &rollout);
    let (from, to) = (
        Revision {
            digest: rollout.from.digest.clone(),
            settings: from_settings,
        },
        Revision {
            digest: rollout.to.digest.clone(),
            settings: to_settings,
        },
    );
    let replica = |node: &str| replicas.iter().find(|r| r.node_id == node);

    // A switched node that no longer runs a replica (it drained, or stopped matching) is
    // no longer part of the rollout.
    let before = rollout.steps.len();
    rollout.steps.retain(|node, _| replica(node).is_some());
    out.changed |= rollout.steps.len() != before;

    let mut target = if phase == RolloutPhase::Progressing {
        to.clone()
    } else {
        from.clone()
    };
    if let Some(reason) = check_steps(
        &mut rollout,
        &target,
        replicas,
        &probe,
        now,
        step_timeout_secs,
        &mut out,
    ) {
        out.changed = true;
        out.probe.clear();
        let details = json!({
            "automatic": true,
            "reason": reason,
            "from": rollout.to.to_string(),
            "from_digest": to.digest,
            "from_settings": to.settings.to_string(),
            "to": rollout.from.to_string(),
            "to_digest": from.digest,
            "to_settings": from.settings.to_string(),
        });
        if phase == RolloutPhase::RollingBack {
            // Returning to what ran before failed too: there is nothing safer to wait for,
            // so every replica takes `from` now.
            let message = format!("{}; then, on the way back, {reason}", rollout.message);
            record.rollout = Some(rollout);
            roll_back(record, &message, now);
            out.events.push(StepEvent {
                action: "deployment.rollback.forced",
                outcome: "failure",
                details,
            });
            return out;
        }
        out.events.push(StepEvent {
            action: "deployment.rollback",
            outcome: "success",
            details,
        });
        record.rollout = Some(rollout);
        begin_roll_back(record, &reason, now);
        rollout = record.rollout.clone().expect("rolling back");
        target = from.clone();
    }
    let phase = rollout.phase;
    let (step_action, complete_action) = match phase {
        RolloutPhase::Progressing => ("deployment.rollout.step", "deployment.rollout.complete"),
        _ => ("deployment.rollback.step", "deployment.rollback.complete"),
    };

    let unverified = rollout
        .steps
        .values()
        .filter(|s| s.verified_at.is_none())
        .count();
    let mut waiting: Vec<&ReplicaView> = replicas
        .iter()
        .filter(|r| r.assigned != target && !rollout.steps.contains_key(&r.node_id))
        .collect();
    waiting.sort_by(|a, b| a.node_name.cmp(&b.node_name));
    let starting = max_unavailable
        .saturating_sub(unverified)
        .min(waiting.len());
    for r in waiting.drain(..starting) {
        rollout.steps.insert(
            r.node_id.clone(),
            RolloutStep {
                node_name: r.node_name.clone(),
                started_at: now,
                verified_at: None,
            },
        );
        out.changed = true;
        out.events.push(StepEvent {
            action: step_action,
            outcome: "success",
            details: json!({
                "node": r.node_name,
                "from_digest": r.assigned.digest,
                "to_digest": target.digest,
                "from_settings": r.assigned.settings.to_string(),
                "to_settings": target.settings.to_string(),
            }),
        });
    }
    if waiting.is_empty() && rollout.steps.values().all(|s| s.verified_at.is_some()) {
        rollout.phase = match phase {
            RolloutPhase::Progressing => RolloutPhase::Complete,
            _ => RolloutPhase::RolledBack,
        };
        rollout.finished_at = Some(now);
        out.changed = true;
        out.events.push(StepEvent {
            action: complete_action,
            outcome: "success",
            details: json!({
                "from": rollout.from.to_string(),
                "to": rollout.to.to_string(),
                "digest": target.digest,
                "settings": target.settings.to_string(),
                "nodes": rollout.steps.values().map(|s| s.node_name.clone()).collect::<Vec<_>>(),
            }),
        });
    }
    for r in replicas {
        let keeps = if rollout.steps.contains_key(&r.node_id) {
            target.clone()
        } else {
            r.assigned.clone()
        };
        out.pinned.insert(r.node_id.clone(), keeps);
    }
    record.rollout = Some(rollout);
    out
}

/// Checks the switched nodes: verifies those whose `target` is ready and answered its
/// probe, asks for probes, and returns why a step failed, if one did.
fn check_steps(
    rollout: &mut Rollout,
    target: &Revision,
    replicas: &[ReplicaView],
    probe: &impl Fn(&str) -> Probe,
    now: UnixSeconds,
    step_timeout_secs: i64,
    out: &mut Advance,
) -> Option<String> {
    let (verified_action, what) = match rollout.phase {
        RolloutPhase::Progressing => ("deployment.rollout.verified", "the new model"),
        _ => ("deployment.rollback.verified", "the previous model"),
    };
    for (node, step) in rollout.steps.iter_mut() {
        if step.verified_at.is_some() {
            continue;
        }
        let status = replicas
            .iter()
            .find(|r| &r.node_id == node)
            .and_then(|r| r.status.as_ref())
            .filter(|s| target.reported_by(s));
        let state = status.map_or(ModelState::Unspecified, |s| s.state());
        if state == ModelState::Failed {
            let detail = status.map(|s| s.detail.as_str()).unwrap_or_default();
            return Some(format!("{}: {what} failed: {detail}", step.node_name));
        }
        if state == ModelState::Ready {
            match probe(node) {
                Probe::Passed(answer) => {
                    step.verified_at = Some(now);
                    out.changed = true;
                    out.events.push(StepEvent {
                        action: verified_action,
                        outcome: "success",
                        details: json!({
                            "node": step.node_name,
                            "digest": target.digest,
                            "settings": target.settings.to_string(),
                            "probe": answer,
                        }),
                    });
                    continue;
                }
                Probe::Failed(why) => {
                    return Some(format!(
                        "{}: {what} did not answer its probe: {why}",
                        step.node_name
                    ));
                }
                Probe::NotSent => out.probe.push(node.clone()),
                Probe::Waiting => {}
            }
        }
        if now - step.started_at > step_timeout_secs {
            return Some(format!(
                "{}: {what} was not ready and answering within {step_timeout_secs} s",
                step.node_name
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: i64 = 600;
    /// The settings of [`record`].
    const SETTINGS: ServingSettings = ServingSettings {
        slots: 1,
        context_per_slot: 512,
        gpu_layers: -1,
    };

    fn record(max_unavailable: u32) -> DeploymentRecord {
        DeploymentRecord {
            name: "chat".into(),
            model_name: "m".into(),
            model_version: "1".into(),
            digest: "old".into(),
            selector: "*".into(),
            replicas: 3,
            slots: 1,
            context_per_slot: 512,
            gpu_layers: -1,
            created_at: 0,
            updated_at: 0,
            created_by: "admin".into(),
            max_unavailable,
            rollout: None,
        }
    }

    fn new_model() -> ModelRef {
        ModelRef {
            name: "m".into(),
            version: "2".into(),
            digest: "new".into(),
        }
    }

    fn replica(node: &str, digest: &str, state: Option<ModelState>) -> ReplicaView {
        replica_with(node, digest, SETTINGS, state)
    }

    /// A replica assigned `settings`, whose agent reports them with its state.
    fn replica_with(
        node: &str,
        digest: &str,
        settings: ServingSettings,
        state: Option<ModelState>,
    ) -> ReplicaView {
        ReplicaView {
            node_id: format!("id-{node}"),
            node_name: node.into(),
            assigned: Revision {
                digest: digest.into(),
                settings,
            },
            status: state.map(|s| ModelStatus {
                name: "chat".into(),
                digest: digest.into(),
                state: s as i32,
                assigned_slots: settings.slots,
                assigned_context_per_slot: settings.context_per_slot,
                assigned_gpu_layers: settings.gpu_layers,
                detail: if s == ModelState::Failed {
                    "llama.cpp could not load it".into()
                } else {
                    String::new()
                },
                ..ModelStatus::default()
            }),
        }
    }

    /// Records `node` as switched at time 0, proven at `verified_at`.
    fn switched(d: &mut DeploymentRecord, node: &str, verified_at: Option<UnixSeconds>) {
        switched_at(d, node, 0, verified_at);
    }

    fn switched_at(
        d: &mut DeploymentRecord,
        node: &str,
        started_at: UnixSeconds,
        verified_at: Option<UnixSeconds>,
    ) {
        d.rollout.as_mut().unwrap().steps.insert(
            format!("id-{node}"),
            RolloutStep {
                node_name: node.into(),
                started_at,
                verified_at,
            },
        );
    }

    fn actions(a: &Advance) -> Vec<&str> {
        a.events.iter().map(|e| e.action).collect()
    }

    #[test]
    fn a_rollout_switches_one_node_at_a_time_and_completes_after_every_probe() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        assert_eq!(d.digest, "new");
        let ready = Some(ModelState::Ready);
        let mut nodes = vec![
            replica("a", "old", ready),
            replica("b", "old", ready),
            replica("c", "old", ready),
        ];
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        assert_eq!(actions(&a), ["deployment.rollout.step"]);
        assert_eq!(a.pinned["id-a"].digest, "new");
        assert_eq!(a.pinned["id-b"].digest, "old");
        assert_eq!(a.pinned["id-c"].digest, "old");

        // Node a pulls and loads: nothing more starts, and no probe before it is ready.
        nodes[0] = replica("a", "new", Some(ModelState::Loading));
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 2, TIMEOUT);
        assert!(!a.changed && a.probe.is_empty());

        nodes[0] = replica("a", "new", ready);
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 3, TIMEOUT);
        assert_eq!(a.probe, ["id-a"]);
        assert!(a.events.is_empty());
        let a = advance(&mut d, &nodes, |_| Probe::Waiting, 4, TIMEOUT);
        assert!(a.probe.is_empty() && a.events.is_empty());

        let a = advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 5, TIMEOUT);
        assert_eq!(
            actions(&a),
            ["deployment.rollout.verified", "deployment.rollout.step"]
        );
        assert_eq!(a.pinned["id-b"].digest, "new");
        assert_eq!(a.pinned["id-c"].digest, "old");

        nodes[1] = replica("b", "new", ready);
        advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 6, TIMEOUT);
        nodes[2] = replica("c", "new", ready);
        let a = advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 7, TIMEOUT);
        assert_eq!(
            actions(&a),
            ["deployment.rollout.verified", "deployment.rollout.complete"]
        );
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::Complete);
        assert_eq!(rollout.finished_at, Some(7));
        assert_eq!(d.digest, "new");
    }

    #[test]
    fn max_unavailable_switches_that_many_nodes_together() {
        let mut d = record(2);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let nodes: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| replica(n, "old", Some(ModelState::Ready)))
            .collect();
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        assert_eq!(
            actions(&a),
            ["deployment.rollout.step", "deployment.rollout.step"]
        );
        assert_eq!(a.pinned["id-c"].digest, "old");
    }

    #[test]
    fn a_failed_model_turns_the_rollout_back_and_the_failed_node_returns_first() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let mut nodes = vec![
            replica("a", "old", Some(ModelState::Ready)),
            replica("b", "old", Some(ModelState::Ready)),
        ];
        advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        nodes[0] = replica("a", "new", Some(ModelState::Failed));
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 2, TIMEOUT);
        assert_eq!(actions(&a), ["deployment.rollback"]);
        assert_eq!(a.events[0].details["automatic"], true);
        assert_eq!(
            a.pinned["id-a"].digest, "old",
            "the failed node returns at once"
        );
        assert_eq!(a.pinned["id-b"].digest, "old", "never switched");
        assert_eq!(d.digest, "old");
        assert_eq!(d.model_version, "1");
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::RollingBack);
        assert!(
            rollout.message.contains("a: the new model failed"),
            "{}",
            rollout.message
        );

        // The way back is gated too: ready on the old model, then a probe.
        nodes[0] = replica("a", "old", Some(ModelState::Loading));
        assert!(!advance(&mut d, &nodes, |_| Probe::NotSent, 3, TIMEOUT).changed);
        nodes[0] = replica("a", "old", Some(ModelState::Ready));
        let a = advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 4, TIMEOUT);
        assert_eq!(
            actions(&a),
            [
                "deployment.rollback.verified",
                "deployment.rollback.complete"
            ]
        );
        assert_eq!(d.rollout.as_ref().unwrap().phase, RolloutPhase::RolledBack);
        // Nothing happens after a rollback.
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 5, TIMEOUT);
        assert!(!a.changed);
    }

    #[test]
    fn proven_nodes_return_one_step_at_a_time_keeping_their_replicas_serving() {
        let ready = Some(ModelState::Ready);
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let mut nodes = vec![
            replica("a", "new", ready),
            replica("b", "new", ready),
            replica("c", "old", ready),
        ];
        // a and b were switched and proven; c fails.
        switched(&mut d, "a", Some(1));
        switched(&mut d, "b", Some(1));
        advance(&mut d, &nodes, |_| Probe::NotSent, 2, TIMEOUT);
        nodes[2] = replica("c", "new", Some(ModelState::Failed));
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 3, TIMEOUT);
        assert_eq!(actions(&a), ["deployment.rollback"]);
        assert_eq!(a.pinned["id-a"].digest, "new", "a keeps serving for now");
        assert_eq!(a.pinned["id-b"].digest, "new", "b keeps serving for now");
        assert_eq!(
            a.pinned["id-c"].digest, "old",
            "the failed node returns at once"
        );

        nodes[2] = replica("c", "old", ready);
        let a = advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 4, TIMEOUT);
        assert_eq!(
            actions(&a),
            ["deployment.rollback.verified", "deployment.rollback.step"]
        );
        assert_eq!(a.pinned["id-a"].digest, "old");
        assert_eq!(a.pinned["id-b"].digest, "new", "one at a time");

        nodes[0] = replica("a", "old", ready);
        let a = advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 5, TIMEOUT);
        assert_eq!(
            actions(&a),
            ["deployment.rollback.verified", "deployment.rollback.step"]
        );
        nodes[1] = replica("b", "old", ready);
        let a = advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 6, TIMEOUT);
        assert_eq!(
            actions(&a),
            [
                "deployment.rollback.verified",
                "deployment.rollback.complete"
            ]
        );
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::RolledBack);
        assert_eq!(rollout.finished_at, Some(6));
    }

    #[test]
    fn rolling_back_by_hand_returns_unproven_nodes_first_and_keeps_proven_ones() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        switched(&mut d, "a", Some(1));
        switched(&mut d, "b", None);
        begin_roll_back(&mut d, "rolled back by admin", 7);
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::RollingBack);
        assert_eq!(rollout.steps.keys().collect::<Vec<_>>(), ["id-b"]);
        assert_eq!(rollout.steps["id-b"].started_at, 7);
        assert_eq!((d.digest.as_str(), d.model_version.as_str()), ("old", "1"));
    }

    #[test]
    fn a_failure_on_the_way_back_returns_every_replica_at_once() {
        let ready = Some(ModelState::Ready);
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let mut nodes = vec![replica("a", "new", ready), replica("b", "old", ready)];
        switched(&mut d, "a", Some(1));
        advance(&mut d, &nodes, |_| Probe::NotSent, 2, TIMEOUT);
        nodes[1] = replica("b", "new", Some(ModelState::Failed));
        advance(&mut d, &nodes, |_| Probe::NotSent, 3, TIMEOUT);
        // b is back on the old model, but it does not answer its probe.
        nodes[1] = replica("b", "old", ready);
        let a = advance(
            &mut d,
            &nodes,
            |_| Probe::Failed("no tokens".into()),
            4,
            TIMEOUT,
        );
        assert_eq!(actions(&a), ["deployment.rollback.forced"]);
        assert!(
            a.pinned.is_empty(),
            "every replica takes the record's digest"
        );
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::RolledBack);
        assert!(
            rollout.message.contains("b: the new model failed")
                && rollout
                    .message
                    .contains("b: the previous model did not answer"),
            "{}",
            rollout.message
        );
        assert_eq!(d.digest, "old");
    }

    #[test]
    fn a_rollout_whose_new_model_may_no_longer_run_returns_every_replica_at_once() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        switched(&mut d, "a", Some(1));
        let revoked = Unusable {
            from: None,
            to: Some("artifact new is revoked (a backdoor)".into()),
        };
        let event = end_for_unusable(&mut d, &revoked, 5).expect("the rollout ends");
        assert_eq!(
            (event.action, event.outcome),
            ("deployment.rollback.forced", "success")
        );
        assert_eq!(event.details["to_digest"], "old");
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::RolledBack);
        assert_eq!(rollout.finished_at, Some(5));
        assert!(
            rollout.message.contains("a backdoor"),
            "{}",
            rollout.message
        );
        assert_eq!((d.digest.as_str(), d.model_version.as_str()), ("old", "1"));
        // Ended: nothing further happens, and every replica takes the record's digest.
        let nodes = [replica("a", "new", Some(ModelState::Ready))];
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 6, TIMEOUT);
        assert!(a.events.is_empty() && a.pinned.is_empty(), "{a:?}");
    }

    #[test]
    fn a_rollout_whose_previous_model_may_no_longer_run_completes_at_once() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let revoked = Unusable {
            from: Some("artifact old is revoked (expired licence)".into()),
            to: None,
        };
        let event = end_for_unusable(&mut d, &revoked, 5).expect("the rollout ends");
        assert_eq!(
            (event.action, event.outcome),
            ("deployment.rollout.forced", "success")
        );
        assert_eq!(event.details["to_digest"], "new");
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::Complete);
        assert!(rollout.message.contains("expired licence"));
        assert_eq!(d.digest, "new");
    }

    #[test]
    fn a_rollback_to_a_model_that_may_no_longer_run_ends_on_the_new_one_as_a_failure() {
        let mut d = record(1);
        let bigger = ServingSettings {
            slots: 2,
            ..SETTINGS
        };
        start(&mut d, new_model(), bigger, "admin", 0);
        begin_roll_back(&mut d, "a: the new model failed", 3);
        assert_eq!((d.digest.as_str(), d.slots), ("old", 1));
        let revoked = Unusable {
            from: Some("artifact old is revoked (a backdoor)".into()),
            to: None,
        };
        let event = end_for_unusable(&mut d, &revoked, 5).expect("the rollback ends");
        assert_eq!(
            (event.action, event.outcome),
            ("deployment.rollout.forced", "failure")
        );
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::Complete);
        assert!(
            rollout.message.contains("a: the new model failed")
                && rollout.message.contains("a backdoor"),
            "{}",
            rollout.message
        );
        assert_eq!(
            (d.digest.as_str(), d.model_version.as_str(), d.slots),
            ("new", "2", 2),
            "the deployment takes the new model and settings again"
        );
    }

    #[test]
    fn a_rollout_whose_models_may_both_run_or_that_ended_is_left_alone() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        assert!(end_for_unusable(&mut d, &Unusable::default(), 5).is_none());
        assert_eq!(d.rollout.as_ref().unwrap().phase, RolloutPhase::Progressing);
        d.rollout.as_mut().unwrap().phase = RolloutPhase::Complete;
        let revoked = Unusable {
            from: Some("revoked".into()),
            to: Some("revoked".into()),
        };
        assert!(end_for_unusable(&mut d, &revoked, 5).is_none());
        assert_eq!(d.digest, "new");
    }

    #[test]
    fn time_the_control_plane_was_down_does_not_count_against_a_step() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        switched(&mut d, "a", None);
        let nodes = [replica("a", "new", None), replica("b", "old", None)];
        // Restarted at 1000, long after the step began at 0 and was last timed; no agent
        // has reported yet.
        assert!(time_steps(&mut d, 1000, 1001));
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 1001, TIMEOUT);
        assert!(a.events.is_empty(), "{a:?}");
        assert_eq!(d.rollout.as_ref().unwrap().phase, RolloutPhase::Progressing);
        // The step still times out, counted from the restart.
        let a = advance(
            &mut d,
            &nodes,
            |_| Probe::NotSent,
            1001 + TIMEOUT + 1,
            TIMEOUT,
        );
        assert_eq!(actions(&a), ["deployment.rollback"]);
        // A step begun after the restart keeps its own start.
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        switched_at(&mut d, "a", 2000, None);
        assert!(time_steps(&mut d, 1000, 2001));
        assert_eq!(d.rollout.as_ref().unwrap().steps["id-a"].started_at, 2000);
    }

    #[test]
    fn only_the_downtime_since_the_last_check_is_left_out_of_a_step() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let steps = |d: &DeploymentRecord| {
            let rollout = d.rollout.as_ref().unwrap();
            (
                rollout.steps["id-a"].started_at,
                rollout.steps.get("id-b").map(|s| s.started_at),
                rollout.checked_at,
            )
        };
        switched_at(&mut d, "a", 100, None);
        // Timed by a control plane started at 50: stored at most every CHECK_EVERY_SECS
        // once it has run a while, and again when the clock was set back.
        assert!(time_steps(&mut d, 50, 120));
        assert!(!time_steps(&mut d, 50, 120 + CHECK_EVERY_SECS - 1));
        assert!(
            time_steps(&mut d, 50, 119),
            "a check in the future is stored again"
        );
        assert!(!time_steps(&mut d, 50, 120));
        assert_eq!(steps(&d), (100, None, Some(119)));
        // b switched after that check; then the control plane died, and one started at 400.
        switched_at(&mut d, "b", 125, None);
        assert!(time_steps(&mut d, 400, 401));
        assert_eq!(
            steps(&d),
            (100 + (400 - 119), Some(400), Some(401)),
            "a moves on by the downtime; b, begun in the gap, counts from the restart"
        );
        // Once per start: the next timing leaves the steps alone.
        assert!(
            time_steps(&mut d, 400, 402),
            "just after a start, checks are stored every second"
        );
        assert_eq!(steps(&d).0, 381);
    }

    #[test]
    fn a_control_plane_that_restarts_often_still_times_out_a_hung_step() {
        // A control plane runs `run` seconds (timing the steps each second), crashes, and
        // is back `down` seconds later, over and over, with the agent's new model never
        // ready: the step times out after TIMEOUT seconds of control-plane time, each
        // restart's downtime (from the last stored check) left out.
        for (run, down) in [(90, 10), (5, 1)] {
            let mut d = record(1);
            start(&mut d, new_model(), SETTINGS, "admin", 0);
            switched(&mut d, "a", None);
            let nodes = [replica("a", "new", None), replica("b", "old", None)];
            let mut rolled_back_at = None;
            let cycles = 4 * TIMEOUT / (run + down);
            'restarts: for started in (0..cycles).map(|i| i * (run + down)) {
                for now in started..started + run {
                    time_steps(&mut d, started, now);
                    let a = advance(&mut d, &nodes, |_| Probe::NotSent, now, TIMEOUT);
                    if !a.events.is_empty() {
                        assert_eq!(actions(&a), ["deployment.rollback"]);
                        rolled_back_at = Some(now);
                        break 'restarts;
                    }
                }
            }
            let at = rolled_back_at
                .unwrap_or_else(|| panic!("runs of {run} s: the hung step never timed out"));
            assert!(at > TIMEOUT, "runs of {run} s: rolled back at {at}");
        }
    }

    #[test]
    fn a_failed_probe_or_a_slow_step_rolls_back() {
        let ready = Some(ModelState::Ready);
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let mut nodes = vec![replica("a", "old", ready)];
        advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        nodes[0] = replica("a", "new", ready);
        let a = advance(
            &mut d,
            &nodes,
            |_| Probe::Failed("no tokens".into()),
            2,
            TIMEOUT,
        );
        assert_eq!(actions(&a), ["deployment.rollback"]);
        assert!(d.rollout.unwrap().message.contains("probe: no tokens"));

        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let mut nodes = vec![replica("a", "old", ready)];
        advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        nodes[0] = replica("a", "new", Some(ModelState::Pulling));
        assert!(!advance(&mut d, &nodes, |_| Probe::NotSent, 1 + TIMEOUT, TIMEOUT).changed);
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 2 + TIMEOUT, TIMEOUT);
        assert_eq!(actions(&a), ["deployment.rollback"]);
        assert!(d.rollout.unwrap().message.contains("within 600 s"));
    }

    #[test]
    fn a_status_of_the_old_model_does_not_count_for_the_new_one() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let mut nodes = vec![replica("a", "old", Some(ModelState::Ready))];
        advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        // Still reporting the old model as ready (the new desired state not yet applied).
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 2, TIMEOUT);
        assert!(a.probe.is_empty());
        // And a failure of the old model is not the new model's failure.
        nodes[0] = replica("a", "old", Some(ModelState::Failed));
        nodes[0].assigned.digest = "new".into();
        assert!(!advance(&mut d, &nodes, |_| Probe::NotSent, 3, TIMEOUT).changed);
    }

    #[test]
    fn a_stored_rollout_carries_on_from_where_it_stopped() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let ready = Some(ModelState::Ready);
        let nodes = vec![replica("a", "old", ready), replica("b", "old", ready)];
        advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        // The control plane restarts: the stored step is kept, no second node starts, and
        // the node switched before keeps the new digest.
        let stored: Rollout =
            serde_json::from_str(&serde_json::to_string(&d.rollout).unwrap()).unwrap();
        let mut restarted = d.clone();
        restarted.rollout = Some(stored);
        let a = advance(&mut restarted, &nodes, |_| Probe::NotSent, 50, TIMEOUT);
        assert!(a.events.is_empty());
        assert_eq!(a.pinned["id-a"].digest, "new");
        assert_eq!(a.pinned["id-b"].digest, "old");
    }

    #[test]
    fn a_rollout_without_replicas_completes_at_once() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let a = advance(&mut d, &[], |_| Probe::NotSent, 1, TIMEOUT);
        assert_eq!(actions(&a), ["deployment.rollout.complete"]);
    }

    #[test]
    fn a_settings_change_rolls_node_by_node_and_a_report_of_the_old_settings_does_not_count() {
        let bigger = ServingSettings {
            slots: 2,
            context_per_slot: 1024,
            gpu_layers: -1,
        };
        let mut d = record(1);
        let same_model = current_model(&d);
        start(&mut d, same_model, bigger, "admin", 0);
        assert_eq!((d.slots, d.context_per_slot), (2, 1024));
        let ready = Some(ModelState::Ready);
        let mut nodes = vec![replica("a", "old", ready), replica("b", "old", ready)];
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        assert_eq!(actions(&a), ["deployment.rollout.step"]);
        assert_eq!(a.pinned["id-a"].settings, bigger);
        assert_eq!(
            a.pinned["id-b"].settings, SETTINGS,
            "b keeps running as it was"
        );
        assert_eq!(
            a.events[0].details["to_settings"],
            "slots 2, ctx 1024, gpu-layers auto"
        );

        // Node a is assigned the new settings but still reports the old replica as ready:
        // no probe, no verification.
        nodes[0].assigned.settings = bigger;
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 2, TIMEOUT);
        assert!(a.probe.is_empty() && !a.changed);

        nodes[0] = replica_with("a", "old", bigger, ready);
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 3, TIMEOUT);
        assert_eq!(a.probe, ["id-a"]);
        let a = advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 4, TIMEOUT);
        assert_eq!(
            actions(&a),
            ["deployment.rollout.verified", "deployment.rollout.step"]
        );
        nodes[1] = replica_with("b", "old", bigger, ready);
        let a = advance(&mut d, &nodes, |_| Probe::Passed("ok".into()), 5, TIMEOUT);
        assert_eq!(
            actions(&a),
            ["deployment.rollout.verified", "deployment.rollout.complete"]
        );
    }

    #[test]
    fn a_failed_settings_change_rolls_back_to_the_previous_settings() {
        let huge = ServingSettings {
            slots: 64,
            context_per_slot: 131_072,
            gpu_layers: 99,
        };
        let mut d = record(1);
        let same_model = current_model(&d);
        start(&mut d, same_model, huge, "admin", 0);
        let mut nodes = vec![replica("a", "old", Some(ModelState::Ready))];
        advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        nodes[0] = replica_with("a", "old", huge, Some(ModelState::Failed));
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 2, TIMEOUT);
        assert_eq!(actions(&a), ["deployment.rollback"]);
        assert_eq!(d.settings(), SETTINGS);
        assert_eq!(d.digest, "old");
        assert_eq!(
            a.events[0].details["to_settings"],
            "slots 1, ctx 512, gpu-layers auto"
        );
    }

    #[test]
    fn an_agent_that_reports_no_settings_is_matched_by_digest_alone() {
        let target = Revision {
            digest: "new".into(),
            settings: SETTINGS,
        };
        let mut status = ModelStatus {
            digest: "new".into(),
            ..ModelStatus::default()
        };
        assert!(target.reported_by(&status));
        status.assigned_slots = 4;
        assert!(!target.reported_by(&status), "other settings reported");
        status.assigned_slots = 1;
        status.assigned_context_per_slot = 512;
        status.assigned_gpu_layers = -1;
        assert!(target.reported_by(&status));
        status.digest = "old".into();
        assert!(!target.reported_by(&status));
    }

    #[test]
    fn a_rollout_stored_before_settings_rolled_keeps_the_deployments_settings() {
        let mut d = record(1);
        start(&mut d, new_model(), SETTINGS, "admin", 0);
        let mut stored = d.rollout.take().unwrap();
        stored.from_settings = None;
        stored.to_settings = None;
        let json = serde_json::to_string(&stored).unwrap();
        assert!(!json.contains("settings"), "{json}");
        d.rollout = Some(serde_json::from_str(&json).unwrap());
        let nodes = vec![replica("a", "old", Some(ModelState::Ready))];
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 1, TIMEOUT);
        assert_eq!(a.pinned["id-a"].settings, SETTINGS);
        roll_back(&mut d, "by hand", 2);
        assert_eq!((d.digest.as_str(), d.settings()), ("old", SETTINGS));
    }
}
