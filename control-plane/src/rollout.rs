//! Rollouts: moving a deployment's replicas from one model, or one set of serving settings
//! (slots, context, GPU layers), to another, node by node. Either change restarts a replica,
//! so both are gated the same way.
//!
//! [`advance`] is a pure function of the deployment (its stored rollout), where its replicas
//! run and what their agents report, so it is tested without a database and a restarted
//! control plane carries on from what was stored. Each call:
//! - checks the nodes already switched: a model that failed, a probe that failed, or a step
//!   not proven within the step timeout rolls the whole deployment back to `from` (model and
//!   settings) at once;
//!   a model that is ready gets a probe request, and a passed probe verifies the step;
//! - switches further nodes (in node-name order) while fewer than `max_unavailable` steps
//!   are unverified;
//! - completes the rollout when every replica runs `to` and every step is verified.
//!
//! A replica's state counts for the target only when the agent reports it for the target's
//! digest and settings: the same digest under the old settings is still the old replica.
//!
//! Replicas placed on new nodes during a rollout start on `to` directly: there is nothing
//! running there to keep available.

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
    /// Nodes whose new model is ready and must be probed.
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
    });
}

/// Ends a progressing rollout by returning every replica to `from` at once.
pub fn roll_back(record: &mut DeploymentRecord, reason: &str, now: UnixSeconds) {
    let Some(rollout) = record.rollout.as_mut() else {
        return;
    };
    rollout.phase = RolloutPhase::RolledBack;
    rollout.finished_at = Some(now);
    rollout.message = reason.to_owned();
    let from = rollout.from.clone();
    let from_settings = rollout.from_settings;
    record.model_name = from.name;
    record.model_version = from.version;
    record.digest = from.digest;
    if let Some(settings) = from_settings {
        record.set_settings(settings);
    }
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

pub fn current_model(record: &DeploymentRecord) -> ModelRef {
    ModelRef {
        name: record.model_name.clone(),
        version: record.model_version.clone(),
        digest: record.digest.clone(),
    }
}

/// Moves a progressing rollout on; see the module docs.
pub fn advance(
    record: &mut DeploymentRecord,
    replicas: &[ReplicaView],
    probe: impl Fn(&str) -> Probe,
    now: UnixSeconds,
    step_timeout_secs: i64,
) -> Advance {
    let mut out = Advance::default();
    let max_unavailable = record.max_unavailable.max(1) as usize;
    let current_settings = record.settings();
    let Some(rollout) = record.rollout.as_mut() else {
        return out;
    };
    if rollout.phase != RolloutPhase::Progressing {
        return out;
    }
    let target = Revision {
        digest: rollout.to.digest.clone(),
        settings: rollout.to_settings.unwrap_or(current_settings),
    };
    let to = target.digest.clone();
    let replica = |node: &str| replicas.iter().find(|r| r.node_id == node);

    // A switched node that no longer runs a replica (it drained, or stopped matching) is
    // no longer part of the rollout.
    let before = rollout.steps.len();
    rollout.steps.retain(|node, _| replica(node).is_some());
    out.changed |= rollout.steps.len() != before;

    let mut failure = None;
    for (node, step) in rollout.steps.iter_mut() {
        if step.verified_at.is_some() {
            continue;
        }
        let status = replica(node)
            .and_then(|r| r.status.as_ref())
            .filter(|s| target.reported_by(s));
        let state = status.map_or(ModelState::Unspecified, |s| s.state());
        if state == ModelState::Failed {
            let detail = status.map(|s| s.detail.as_str()).unwrap_or_default();
            failure = Some(format!(
                "{}: the new model failed: {detail}",
                step.node_name
            ));
            break;
        }
        if state == ModelState::Ready {
            match probe(node) {
                Probe::Passed(answer) => {
                    step.verified_at = Some(now);
                    out.changed = true;
                    out.events.push(StepEvent {
                        action: "deployment.rollout.verified",
                        outcome: "success",
                        details: json!({
                            "node": step.node_name,
                            "digest": to,
                            "settings": target.settings.to_string(),
                            "probe": answer,
                        }),
                    });
                    continue;
                }
                Probe::Failed(why) => {
                    failure = Some(format!(
                        "{}: the new model did not answer its probe: {why}",
                        step.node_name
                    ));
                    break;
                }
                Probe::NotSent => out.probe.push(node.clone()),
                Probe::Waiting => {}
            }
        }
        if now - step.started_at > step_timeout_secs {
            failure = Some(format!(
                "{}: the new model was not ready and answering within {step_timeout_secs} s",
                step.node_name
            ));
            break;
        }
    }
    if let Some(reason) = failure {
        let from = rollout.from.clone();
        let to_model = rollout.to.clone();
        let from_settings = rollout.from_settings.unwrap_or(target.settings);
        roll_back(record, &reason, now);
        out.changed = true;
        out.probe.clear();
        out.events.push(StepEvent {
            action: "deployment.rollback",
            outcome: "success",
            details: json!({
                "automatic": true,
                "reason": reason,
                "from": to_model.to_string(),
                "from_digest": to_model.digest,
                "to": from.to_string(),
                "to_digest": from.digest,
                "from_settings": target.settings.to_string(),
                "to_settings": from_settings.to_string(),
            }),
        });
        return out;
    }

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
            action: "deployment.rollout.step",
            outcome: "success",
            details: json!({
                "node": r.node_name,
                "from_digest": r.assigned.digest,
                "to_digest": to,
                "from_settings": r.assigned.settings.to_string(),
                "to_settings": target.settings.to_string(),
            }),
        });
    }
    if waiting.is_empty() && rollout.steps.values().all(|s| s.verified_at.is_some()) {
        rollout.phase = RolloutPhase::Complete;
        rollout.finished_at = Some(now);
        out.changed = true;
        out.events.push(StepEvent {
            action: "deployment.rollout.complete",
            outcome: "success",
            details: json!({
                "from": rollout.from.to_string(),
                "to": rollout.to.to_string(),
                "digest": to,
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
    out
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
    fn a_failed_model_rolls_every_replica_back_to_the_previous_digest() {
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
        assert!(
            a.pinned.is_empty(),
            "every replica takes the record's digest"
        );
        assert_eq!(d.digest, "old");
        assert_eq!(d.model_version, "1");
        let rollout = d.rollout.as_ref().unwrap();
        assert_eq!(rollout.phase, RolloutPhase::RolledBack);
        assert!(
            rollout.message.contains("a: the new model failed"),
            "{}",
            rollout.message
        );
        // Nothing happens after a rollback.
        let a = advance(&mut d, &nodes, |_| Probe::NotSent, 3, TIMEOUT);
        assert!(!a.changed);
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
