//! Placement: which nodes run which deployment's replicas. A pure function of the nodes,
//! the deployments and the previous assignment, so it is tested without a database and a
//! restarted control plane decides the same way.
//!
//! Rules:
//! - A node runs at most one replica of a deployment.
//! - A replica already placed on a node stays there while the node still matches the
//!   selector and is not draining, even if the node is unavailable or cordoned (what runs
//!   keeps running; an agent that lost the control plane keeps serving, invariant 3).
//!   Running replicas are counted before new ones are placed, so a new replica never takes
//!   the memory of a running one, nor the disk of one switched to an artifact its node has
//!   yet to pull. One that no longer fits under its node's memory limit
//!   (the operator lowered it) is placed anew: those not pinned by a rollout are counted in
//!   deployment-name order, as an agent restarted under a lower limit admits its models.
//!   A replica a rollout pins stays whatever it costs (the rollout's gate decides).
//! - A kept replica runs the digest its deployment pins for that node (a rollout not yet
//!   at that node keeps the previous model there); every other replica runs the
//!   deployment's digest.
//! - New replicas go only to nodes that are ready, not cordoned, not draining, and have the
//!   memory (GGUF load estimate plus KV cache for slots × context) and the disk for the model,
//!   counting what this placement already put there and the assigned artifacts whose bytes
//!   have yet to reach the node (its reported free disk does not count those bytes yet). A
//!   model whose artifact the node's cache holds, in full or in part, needs only the rest.
//! - Among those, `Spread` prefers the node with the fewest models, `Pack` the most; ties go
//!   by node name.
//! - Every replica that cannot be placed gets the reason of each node that was passed over.

use std::collections::{BTreeMap, BTreeSet};

use steward_artifact::units::bytes as size;
use steward_db::{AssignedModel, ServingSettings};

use crate::rollout::Revision;

/// Share of a node's memory kept free for the OS and the agent.
const MEMORY_RESERVE_PERCENT: u64 = 10;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    #[default]
    Spread,
    Pack,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spread" => Ok(Self::Spread),
            "pack" => Ok(Self::Pack),
            other => Err(format!(
                "unknown placement strategy `{other}` (spread or pack)"
            )),
        }
    }
}

/// A node as placement sees it.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub cordoned: bool,
    pub draining: bool,
    pub memory_total_bytes: u64,
    /// Memory of the largest GPU; 0 without one.
    pub gpu_memory_bytes: u64,
    /// The most memory models may have on this node, as its agent's operator set it; 0: no
    /// limit beyond the node's own memory.
    pub memory_limit_bytes: u64,
    pub disk_free_bytes: u64,
    /// Of the free disk, what the artifacts assigned to the node still take as they arrive
    /// (the free disk it reports does not count those bytes yet).
    pub disk_pending_bytes: u64,
    /// What the node was assigned before this placement.
    pub assigned: Vec<AssignedModel>,
    /// Digest → bytes of it the node's agent has on disk (cached in full, or a pull's
    /// partial file), as its inventory lists them: a new replica needs only the rest.
    pub on_disk: BTreeMap<String, u64>,
}

/// What a replica pinned during a rollout keeps, and what that costs its node.
#[derive(Clone, Debug)]
pub struct Kept {
    pub revision: Revision,
    /// Memory to load the kept model with the kept settings (not the new ones'), and no
    /// less than what the revision its rollout would go back to needs.
    pub memory_bytes: u64,
    /// The kept artifact's size on disk.
    pub size_bytes: u64,
}

/// A deployment as placement sees it.
#[derive(Clone, Debug)]
pub struct Demand {
    pub deployment: String,
    pub digest: String,
    /// Node id → the model and settings a replica already on that node keeps (during a
    /// rollout); the others take `digest` and the settings below.
    pub pinned: BTreeMap<String, Kept>,
    pub selector: Selector,
    pub replicas: u32,
    pub slots: u32,
    pub context_per_slot: u32,
    pub gpu_layers: i32,
    /// Memory to load the model and its KV cache.
    pub memory_bytes: u64,
    /// The artifact's size on disk.
    pub size_bytes: u64,
}

/// The outcome: every node's models, and per deployment where its replicas run and why
/// the rest could not be placed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub nodes: BTreeMap<String, Vec<AssignedModel>>,
    pub placed: BTreeMap<String, Vec<String>>,
    pub unschedulable: BTreeMap<String, Unschedulable>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unschedulable {
    pub missing_replicas: u32,
    /// `node: reason` for each node passed over; empty when no node matches the selector.
    pub reasons: Vec<String>,
}

/// A node selector: `*` (every node), or comma-separated terms that must all hold, each
/// `key=value` over node labels, `name=NODE` for a node name, or a bare node name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<(String, String)>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the node selector is empty (use `*` for every node)".into());
        }
        if text == "*" {
            return Ok(Self { terms: Vec::new() });
        }
        let mut terms = Vec::new();
        for term in text.split(',') {
            let term = term.trim();
            let (key, value) = match term.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => ("name", term),
            };
            if key.is_empty() || value.is_empty() || value.contains('=') {
                return Err(format!(
                    "selector term `{term}` is not `key=value` or a node name"
                ));
            }
            terms.push((key.to_owned(), value.to_owned()));
        }
        Ok(Self { terms })
    }

    pub fn matches(&self, node: &NodeView) -> bool {
        self.terms.iter().all(|(key, value)| {
            if key == "name" {
                node.name == *value
            } else {
                node.labels.get(key) == Some(value)
            }
        })
    }
}

/// Places every demand, in deployment-name order.
pub fn place(nodes: &[NodeView], demands: &[Demand], strategy: Strategy) -> Placement {
    let mut out = Placement::default();
    let mut demands: Vec<&Demand> = demands.iter().collect();
    demands.sort_by(|a, b| a.deployment.cmp(&b.deployment));
    let mut nodes: Vec<&NodeView> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    // Memory and disk this placement already gave away, per node.
    let mut used_memory: BTreeMap<&str, u64> = BTreeMap::new();
    let mut used_disk = DiskUse::default();
    for node in &nodes {
        out.nodes.insert(node.id.clone(), Vec::new());
    }

    // Replicas stay where they run. They are counted before any new replica is placed, so
    // that a new one never takes the memory (or the disk) of one already running (under a
    // later name).
    // A replica its rollout pins is kept whatever it costs: the rollout gates the switch
    // (the agent refuses a model over its memory limit, the step fails, the rollout rolls
    // back). Every other one is kept while it fits under the node's memory limit, counted
    // in deployment-name order as the agent admits its models; one over a lowered limit is
    // placed anew. Only the operator's limit is checked again here, not the probed memory,
    // which a failed probe may report as less for a while.
    let mut kept: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for pinned_round in [false, true] {
        for demand in &demands {
            let on = kept.entry(demand.deployment.as_str()).or_default();
            for node in &nodes {
                if on.len() as u32 >= demand.replicas {
                    break;
                }
                let pinned = demand.pinned.contains_key(&node.id);
                let runs_here = node
                    .assigned
                    .iter()
                    .any(|a| a.deployment == demand.deployment);
                if pinned != pinned_round
                    || !runs_here
                    || node.draining
                    || !demand.selector.matches(node)
                {
                    continue;
                }
                let (assignment, memory, size_bytes) = assignment_on(demand, node, true);
                let used = used_memory.entry(&node.id).or_default();
                let limit = node.memory_limit_bytes;
                if !pinned && limit > 0 && used.saturating_add(memory) > limit {
                    continue;
                }
                *used += memory;
                // A kept replica switched to a new model (a rollout reached this node)
                // still has that artifact to pull: its disk is taken before any new one's.
                count_disk(node, &assignment.digest, size_bytes, &mut used_disk);
                on.insert(&node.id);
            }
        }
    }

    for demand in demands {
        let kept_here = kept.remove(demand.deployment.as_str()).unwrap_or_default();
        let mut chosen = kept_here.clone();
        let mut reasons = Vec::new();
        let mut candidates: Vec<&NodeView> = Vec::new();
        for node in &nodes {
            if chosen.contains(node.id.as_str()) || !demand.selector.matches(node) {
                continue;
            }
            match refusal(node, demand, &used_memory, &used_disk) {
                Some(reason) => reasons.push(format!("{}: {reason}", node.name)),
                None => candidates.push(node),
            }
        }
        let load = |node: &NodeView, out: &Placement| out.nodes[&node.id].len();
        candidates.sort_by(|a, b| {
            let (la, lb) = (load(a, &out), load(b, &out));
            let by_load = match strategy {
                Strategy::Spread => la.cmp(&lb),
                Strategy::Pack => lb.cmp(&la),
            };
            by_load.then(a.name.cmp(&b.name))
        });
        for node in candidates {
            if chosen.len() as u32 >= demand.replicas {
                break;
            }
            chosen.insert(&node.id);
        }
        let mut placed_names = Vec::new();
        for node in &nodes {
            if chosen.contains(node.id.as_str()) {
                let keeps = kept_here.contains(node.id.as_str());
                let (assignment, memory, size_bytes) = assignment_on(demand, node, keeps);
                if !keeps {
                    *used_memory.entry(&node.id).or_default() += memory;
                    count_disk(node, &assignment.digest, size_bytes, &mut used_disk);
                }
                out.nodes
                    .get_mut(&node.id)
                    .expect("every node has an entry")
                    .push(assignment);
                placed_names.push(node.name.clone());
            }
        }
        let missing = demand.replicas.saturating_sub(chosen.len() as u32);
        if missing > 0 {
            out.unschedulable.insert(
                demand.deployment.clone(),
                Unschedulable {
                    missing_replicas: missing,
                    reasons,
                },
            );
        }
        out.placed.insert(demand.deployment.clone(), placed_names);
    }
    out
}

/// What a replica of `demand` on `node` runs, and the memory that takes: a replica kept
/// where a rollout pins it keeps the pinned model and settings; every other one (a new
/// replica too) takes the deployment's.
fn assignment_on(demand: &Demand, node: &NodeView, kept: bool) -> (AssignedModel, u64, u64) {
    let pin = demand.pinned.get(&node.id).filter(|_| kept);
    let (digest, settings, memory, size_bytes) = match pin {
        Some(kept) => (
            &kept.revision.digest,
            kept.revision.settings,
            kept.memory_bytes,
            kept.size_bytes,
        ),
        None => (
            &demand.digest,
            ServingSettings {
                slots: demand.slots,
                context_per_slot: demand.context_per_slot,
                gpu_layers: demand.gpu_layers,
            },
            demand.memory_bytes,
            demand.size_bytes,
        ),
    };
    let assignment = AssignedModel {
        deployment: demand.deployment.clone(),
        digest: digest.clone(),
        slots: settings.slots,
        context_per_slot: settings.context_per_slot,
        gpu_layers: settings.gpu_layers,
    };
    (assignment, memory, size_bytes)
}

/// Why `node` cannot take a new replica of `demand`, if it cannot.
fn refusal(
    node: &NodeView,
    demand: &Demand,
    used_memory: &BTreeMap<&str, u64>,
    used_disk: &DiskUse,
) -> Option<String> {
    if !node.ready {
        return Some("unavailable".into());
    }
    if node.draining {
        return Some("draining".into());
    }
    if node.cordoned {
        return Some("cordoned".into());
    }
    let capacity = memory_capacity(node);
    let free = capacity.saturating_sub(used_memory.get(node.id.as_str()).copied().unwrap_or(0));
    if demand.memory_bytes > free {
        let limit = if node.memory_limit_bytes > 0 && capacity == node.memory_limit_bytes {
            format!(" of the node's {} memory limit", size(capacity))
        } else {
            String::new()
        };
        return Some(format!(
            "not enough memory: the model needs {} (weights and KV cache for {} × {} tokens), \
             {} is left{limit}",
            size(demand.memory_bytes),
            demand.slots,
            demand.context_per_slot,
            size(free),
        ));
    }
    let disk = node
        .disk_free_bytes
        .saturating_sub(node.disk_pending_bytes)
        .saturating_sub(used_disk.bytes(&node.id));
    let needed = used_disk.needs(node, &demand.digest, demand.size_bytes);
    if needed > disk {
        return Some(format!(
            "not enough disk: the artifact needs {}, {} is free",
            size(needed),
            size(disk)
        ));
    }
    None
}

/// Disk this placement already gave away per node: artifacts the node did not hold before.
#[derive(Default)]
struct DiskUse {
    bytes: BTreeMap<String, u64>,
    /// (node id, digest) of each artifact counted, so one shared by two deployments on a
    /// node is counted once.
    counted: BTreeSet<(String, String)>,
}

impl DiskUse {
    fn bytes(&self, node_id: &str) -> u64 {
        self.bytes.get(node_id).copied().unwrap_or(0)
    }

    /// Whether `node` has (or will have, by this placement) the artifact `digest` counted:
    /// assigned before (its missing bytes are the node's pending disk), or counted by this
    /// placement.
    fn holds(&self, node: &NodeView, digest: &str) -> bool {
        node.assigned.iter().any(|a| a.digest == digest)
            || self.counted.contains(&(node.id.clone(), digest.to_owned()))
    }

    /// The disk a replica running `digest` (of `size_bytes`) would take on `node` beyond
    /// what is counted already: none where the node holds it, else what its cache lacks.
    fn needs(&self, node: &NodeView, digest: &str, size_bytes: u64) -> u64 {
        if self.holds(node, digest) {
            return 0;
        }
        size_bytes.saturating_sub(node.on_disk.get(digest).copied().unwrap_or(0))
    }
}

/// Counts the disk a replica running `digest` on `node` takes, unless the node holds it:
/// what its cache lacks of the artifact.
fn count_disk(node: &NodeView, digest: &str, size_bytes: u64, disk: &mut DiskUse) {
    if disk.holds(node, digest) {
        return;
    }
    let needed = disk.needs(node, digest, size_bytes);
    disk.counted.insert((node.id.clone(), digest.to_owned()));
    *disk.bytes.entry(node.id.clone()).or_default() += needed;
}

/// Memory models may have on `node`: its RAM or its largest GPU's memory, whichever is
/// larger, less a share for the OS and the agent, and no more than its operator's limit.
fn memory_capacity(node: &NodeView) -> u64 {
    let reserve = |total: u64| total - total / 100 * MEMORY_RESERVE_PERCENT;
    let capacity = reserve(node.memory_total_bytes).max(reserve(node.gpu_memory_bytes));
    match node.memory_limit_bytes {
        0 => capacity,
        limit => capacity.min(limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, memory_gib: u64) -> NodeView {
        NodeView {
            id: format!("id-{name}"),
            name: name.into(),
            ready: true,
            memory_total_bytes: memory_gib * GIB,
            disk_free_bytes: 100 * GIB,
            ..NodeView::default()
        }
    }

    fn demand(name: &str, selector: &str, replicas: u32, memory_gib: u64) -> Demand {
        Demand {
            deployment: name.into(),
            digest: format!("digest-{name}"),
            pinned: BTreeMap::new(),
            selector: Selector::parse(selector).unwrap(),
            replicas,
            slots: 4,
            context_per_slot: 4096,
            gpu_layers: -1,
            memory_bytes: memory_gib * GIB,
            size_bytes: GIB,
        }
    }

    /// A replica of `deployment` running `digest` with 4 slots of 4096 tokens.
    fn running(deployment: &str, digest: &str) -> AssignedModel {
        AssignedModel {
            deployment: deployment.into(),
            digest: digest.into(),
            slots: 4,
            context_per_slot: 4096,
            gpu_layers: -1,
        }
    }

    /// What a replica pinned to [`running`]'s `digest` keeps, costing `memory_gib`.
    fn kept(digest: &str, memory_gib: u64) -> Kept {
        Kept {
            revision: Revision {
                digest: digest.into(),
                settings: ServingSettings {
                    slots: 4,
                    context_per_slot: 4096,
                    gpu_layers: -1,
                },
            },
            memory_bytes: memory_gib * GIB,
            size_bytes: GIB,
        }
    }

    #[test]
    fn selectors_match_labels_names_and_everything() {
        let mut n = node("gpu-1", 8);
        n.labels.insert("dept".into(), "radiology".into());
        assert!(Selector::parse("*").unwrap().matches(&n));
        assert!(Selector::parse("dept=radiology").unwrap().matches(&n));
        assert!(Selector::parse("gpu-1").unwrap().matches(&n));
        assert!(
            Selector::parse("name=gpu-1,dept=radiology")
                .unwrap()
                .matches(&n)
        );
        assert!(!Selector::parse("dept=oncology").unwrap().matches(&n));
        assert!(!Selector::parse("name=gpu-2").unwrap().matches(&n));
        for bad in ["", "a=", "=b", "a=b=c"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spread_puts_replicas_on_the_least_loaded_nodes() {
        let nodes = [node("a", 16), node("b", 16), node("c", 16)];
        let p = place(
            &nodes,
            &[demand("m1", "*", 1, 1), demand("m2", "*", 2, 1)],
            Strategy::Spread,
        );
        assert_eq!(p.placed["m1"], ["a"]);
        assert_eq!(p.placed["m2"], ["b", "c"]);
        assert!(p.unschedulable.is_empty());
    }

    #[test]
    fn pack_fills_one_node_before_the_next() {
        let nodes = [node("a", 16), node("b", 16)];
        let p = place(
            &nodes,
            &[demand("m1", "*", 1, 1), demand("m2", "*", 1, 1)],
            Strategy::Pack,
        );
        assert_eq!(p.placed["m1"], ["a"]);
        assert_eq!(p.placed["m2"], ["a"]);
    }

    #[test]
    fn every_unschedulable_replica_says_why() {
        let mut cordoned = node("cordoned", 64);
        cordoned.cordoned = true;
        let mut down = node("down", 64);
        down.ready = false;
        let mut draining = node("draining", 64);
        draining.draining = true;
        let mut full_disk = node("full-disk", 64);
        full_disk.disk_free_bytes = GIB / 2;
        let nodes = [node("small", 4), cordoned, down, draining, full_disk];
        let p = place(&nodes, &[demand("big", "*", 2, 8)], Strategy::Spread);
        let u = &p.unschedulable["big"];
        assert_eq!(u.missing_replicas, 2);
        let all = u.reasons.join("\n");
        for expected in [
            "small: not enough memory: the model needs 8.00 GiB",
            "cordoned: cordoned",
            "down: unavailable",
            "draining: draining",
            "full-disk: not enough disk",
        ] {
            assert!(all.contains(expected), "{expected:?} missing from\n{all}");
        }
    }

    #[test]
    fn memory_already_placed_counts_against_a_node() {
        let nodes = [node("a", 10)];
        let p = place(
            &nodes,
            &[demand("m1", "*", 1, 6), demand("m2", "*", 1, 6)],
            Strategy::Spread,
        );
        assert_eq!(p.placed["m1"], ["a"]);
        assert!(p.placed["m2"].is_empty());
        assert!(p.unschedulable["m2"].reasons[0].contains("not enough memory"));
    }

    #[test]
    fn a_nodes_memory_limit_caps_what_its_models_may_use() {
        let mut capped = node("box", 64);
        capped.memory_limit_bytes = 10 * GIB;
        let p = place(
            &[capped.clone()],
            &[demand("m1", "*", 1, 6), demand("m2", "*", 1, 6)],
            Strategy::Spread,
        );
        assert_eq!(p.placed["m1"], ["box"], "{p:#?}");
        assert!(p.placed["m2"].is_empty());
        let reason = &p.unschedulable["m2"].reasons[0];
        assert!(
            reason.contains("4.00 GiB is left of the node's 10.0 GiB memory limit"),
            "{reason}"
        );

        // A limit above what the node has changes nothing, and no limit is named where the
        // node has none (not even on a node that reported no memory at all).
        capped.memory_limit_bytes = 1024 * GIB;
        let unreported = node("unreported", 0);
        let p = place(
            &[capped, unreported],
            &[demand("m", "*", 1, 60)],
            Strategy::Spread,
        );
        assert!(p.placed["m"].is_empty());
        let reasons = &p.unschedulable["m"].reasons;
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(!reasons.iter().any(|r| r.contains("limit")), "{reasons:?}");
    }

    #[test]
    fn a_replica_that_no_longer_fits_under_a_lowered_limit_is_placed_anew() {
        let mut shrunk = node("box", 64);
        shrunk.memory_limit_bytes = 10 * GIB;
        shrunk.assigned = vec![running("m1", "digest-m1"), running("m2", "digest-m2")];
        let demands = [demand("m1", "*", 1, 6), demand("m2", "*", 1, 6)];
        let p = place(
            &[shrunk.clone(), node("other", 64)],
            &demands,
            Strategy::Spread,
        );
        assert_eq!(p.placed["m1"], ["box"], "the first in name order stays");
        assert_eq!(p.placed["m2"], ["other"], "the one over the limit moves");

        // With nowhere else to go it is unschedulable, and says why.
        let p = place(&[shrunk], &demands, Strategy::Spread);
        assert_eq!(p.placed["m1"], ["box"]);
        assert!(p.placed["m2"].is_empty(), "{p:#?}");
        let reason = &p.unschedulable["m2"].reasons[0];
        assert!(
            reason.contains("4.00 GiB is left of the node's 10.0 GiB memory limit"),
            "{reason}"
        );
    }

    #[test]
    fn a_replica_its_rollout_pins_is_kept_over_the_limit_and_moves_no_other() {
        // "alpha" rolls to a revision costing 8 GiB (its old one cost 1) on a node limited
        // to 10; "zeta" runs there with 6. The rollout's step fails on the agent and rolls
        // back; meanwhile neither replica moves, and nothing new fits beside them.
        let mut node_box = node("box", 64);
        node_box.memory_limit_bytes = 10 * GIB;
        node_box.assigned = vec![running("alpha", "old"), running("zeta", "digest-zeta")];
        let mut alpha = demand("alpha", "*", 1, 1);
        alpha.pinned.insert("id-box".into(), kept("rolled-to", 8));
        let p = place(
            &[node_box, node("other", 64)],
            &[
                alpha,
                demand("zeta", "*", 1, 6),
                demand("newcomer", "box", 1, 1),
            ],
            Strategy::Spread,
        );
        assert_eq!(p.placed["alpha"], ["box"]);
        assert_eq!(p.placed["zeta"], ["box"]);
        assert_eq!(p.nodes["id-box"][0].digest, "rolled-to");
        assert!(p.placed["newcomer"].is_empty(), "{p:#?}");
        let reason = &p.unschedulable["newcomer"].reasons[0];
        assert!(reason.contains("0 B is left"), "{reason}");
    }

    #[test]
    fn a_replica_stays_when_its_node_reports_less_memory_for_a_while() {
        // A GPU probe that failed leaves only the RAM; no limit was lowered.
        let mut shrunk = node("a", 4);
        shrunk.assigned = vec![running("m", "digest-m")];
        let p = place(
            &[shrunk, node("b", 64)],
            &[demand("m", "*", 1, 6)],
            Strategy::Spread,
        );
        assert_eq!(p.placed["m"], ["a"]);
    }

    #[test]
    fn a_new_replica_never_takes_the_memory_of_one_running_under_a_later_name() {
        // "zeta" runs on node a (6 of its 9 GiB); "alpha", placed first by name, needs 4.
        let mut a = node("a", 10);
        a.assigned = vec![running("zeta", "digest-zeta")];
        let demands = [demand("alpha", "*", 1, 4), demand("zeta", "*", 1, 6)];
        let p = place(&[a.clone()], &demands, Strategy::Spread);
        assert_eq!(p.placed["zeta"], ["a"]);
        assert!(p.placed["alpha"].is_empty(), "{p:#?}");
        assert!(p.unschedulable["alpha"].reasons[0].contains("not enough memory"));
        // A second node takes it.
        let p = place(&[a, node("b", 10)], &demands, Strategy::Spread);
        assert_eq!(p.placed["alpha"], ["b"]);
        assert_eq!(p.placed["zeta"], ["a"]);
    }

    #[test]
    fn a_new_replica_never_takes_the_disk_a_switched_replica_still_has_to_pull() {
        // "zeta" runs on node a, which a rollout switched to a new 1 GiB artifact it has
        // not pulled yet; a has 1.5 GiB free. "alpha", placed first by name, needs 1 GiB.
        let mut a = node("a", 64);
        a.assigned = vec![running("zeta", "digest-zeta-before")];
        a.disk_free_bytes = GIB * 3 / 2;
        let demands = [demand("alpha", "*", 1, 1), demand("zeta", "*", 1, 1)];
        let p = place(&[a.clone()], &demands, Strategy::Spread);
        assert_eq!(p.placed["zeta"], ["a"]);
        assert_eq!(p.nodes["id-a"][0].digest, "digest-zeta");
        assert!(p.placed["alpha"].is_empty(), "{p:#?}");
        assert!(
            p.unschedulable["alpha"].reasons[0].contains("not enough disk"),
            "{p:#?}"
        );
    }

    #[test]
    fn disk_an_agent_has_yet_to_pull_is_not_free() {
        let mut a = node("a", 64);
        a.disk_free_bytes = GIB * 3 / 2;
        a.disk_pending_bytes = GIB;
        let p = place(&[a], &[demand("m", "*", 1, 1)], Strategy::Spread);
        assert!(p.placed["m"].is_empty(), "{p:#?}");
        assert!(
            p.unschedulable["m"].reasons[0].contains("not enough disk"),
            "{p:#?}"
        );
    }

    #[test]
    fn an_artifact_a_node_has_cached_needs_only_the_disk_its_cache_lacks() {
        // 0.5 GiB free: too little for a 1 GiB artifact, unless the node has it already
        // (kept in its cache after an earlier deployment), or enough of it from a pull.
        let mut a = node("a", 64);
        a.disk_free_bytes = GIB / 2;
        let refused = place(&[a.clone()], &[demand("m", "*", 1, 1)], Strategy::Spread);
        assert!(refused.placed["m"].is_empty(), "{refused:#?}");
        a.on_disk.insert("digest-m".into(), GIB);
        let cached = place(&[a.clone()], &[demand("m", "*", 1, 1)], Strategy::Spread);
        assert_eq!(cached.placed["m"], ["a"], "{cached:#?}");
        a.on_disk.insert("digest-m".into(), GIB * 3 / 4);
        let partial = place(&[a.clone()], &[demand("m", "*", 1, 1)], Strategy::Spread);
        assert_eq!(
            partial.placed["m"],
            ["a"],
            "a quarter GiB fits: {partial:#?}"
        );
        a.on_disk.insert("digest-m".into(), GIB / 4);
        let little = place(&[a], &[demand("m", "*", 1, 1)], Strategy::Spread);
        let reason = &little.unschedulable["m"].reasons[0];
        assert!(reason.contains("the artifact needs 768 MiB"), "{reason}");
    }

    #[test]
    fn each_replica_counts_only_what_the_cache_lacks_of_its_artifact() {
        // 1.5 GiB free; three quarters of a's artifact on disk already: a takes a quarter,
        // b all of its 1 GiB, and both fit.
        let mut n = node("n", 64);
        n.disk_free_bytes = GIB * 3 / 2;
        n.on_disk.insert("digest-a".into(), GIB * 3 / 4);
        let demands = [demand("a", "*", 1, 1), demand("b", "*", 1, 1)];
        let p = place(&[n.clone()], &demands, Strategy::Spread);
        assert_eq!(
            (&p.placed["a"], &p.placed["b"]),
            (&vec!["n".to_owned()], &vec!["n".to_owned()]),
            "{p:#?}"
        );
        n.on_disk.clear();
        let p = place(&[n], &demands, Strategy::Spread);
        assert!(
            p.placed["b"].is_empty(),
            "without the cache, b does not fit: {p:#?}"
        );
    }

    #[test]
    fn a_pinned_replica_takes_the_disk_of_the_artifact_it_keeps() {
        // A rollout pins m on n to a 2 GiB artifact n does not hold; m's own is 1 GiB. With
        // 2.5 GiB free, z (1 GiB) no longer fits beside it.
        let mut n = node("n", 64);
        n.disk_free_bytes = GIB * 5 / 2;
        n.assigned = vec![running("m", "digest-other")];
        let mut m = demand("m", "*", 1, 1);
        let mut keep = kept("digest-kept", 1);
        keep.size_bytes = 2 * GIB;
        m.pinned.insert("id-n".into(), keep);
        let p = place(&[n], &[m, demand("z", "*", 1, 1)], Strategy::Spread);
        assert_eq!(p.nodes["id-n"][0].digest, "digest-kept", "{p:#?}");
        assert!(p.placed["z"].is_empty(), "{p:#?}");
        assert!(
            p.unschedulable["z"].reasons[0].contains("not enough disk"),
            "{p:#?}"
        );
    }

    #[test]
    fn two_deployments_of_one_artifact_take_its_disk_once() {
        let mut a = node("a", 64);
        a.disk_free_bytes = GIB * 3 / 2;
        let mut second = demand("second", "*", 1, 1);
        second.digest = "digest-first".into();
        let p = place(
            &[a],
            &[demand("first", "*", 1, 1), second],
            Strategy::Spread,
        );
        assert_eq!(p.placed["first"], ["a"]);
        assert_eq!(p.placed["second"], ["a"], "{p:#?}");
    }

    #[test]
    fn running_replicas_stay_on_unavailable_or_cordoned_nodes_but_leave_draining_ones() {
        let d = demand("m", "*", 1, 1);
        let assigned = AssignedModel {
            deployment: "m".into(),
            digest: d.digest.clone(),
            slots: d.slots,
            context_per_slot: d.context_per_slot,
            gpu_layers: d.gpu_layers,
        };
        let mut b = node("b", 16);
        b.assigned = vec![assigned.clone()];
        b.ready = false;
        b.cordoned = true;
        let p = place(
            &[node("a", 16), b.clone()],
            std::slice::from_ref(&d),
            Strategy::Spread,
        );
        assert_eq!(p.placed["m"], ["b"], "kept where it runs");
        b.draining = true;
        let p = place(&[node("a", 16), b], &[d], Strategy::Spread);
        assert_eq!(p.placed["m"], ["a"], "moved off the draining node");
    }

    #[test]
    fn a_pinned_replica_keeps_its_digest_while_others_take_the_new_one() {
        let old = |name: &str| {
            let mut n = node(name, 16);
            n.assigned = vec![running("m", "old")];
            n
        };
        let mut d = demand("m", "*", 3, 1);
        d.pinned.insert("id-a".into(), kept("old", 1));
        let p = place(&[old("a"), old("b"), node("c", 16)], &[d], Strategy::Spread);
        assert_eq!(p.placed["m"], ["a", "b", "c"], "kept where they run");
        assert_eq!(p.nodes["id-a"][0].digest, "old");
        assert_eq!(
            (
                p.nodes["id-a"][0].slots,
                p.nodes["id-a"][0].context_per_slot
            ),
            (4, 4096),
            "with the settings it runs with"
        );
        assert_eq!(p.nodes["id-b"][0].digest, "digest-m");
        assert_eq!(p.nodes["id-c"][0].digest, "digest-m");
    }

    #[test]
    fn a_pinned_replica_is_costed_with_the_model_it_keeps_not_the_new_one() {
        // "big" rolls from a 6 GiB model to a 1 GiB one; its replica on node a still runs
        // the 6 GiB one. "small" (placed after it) needs 4 GiB: 6 + 4 is more than the 9 GiB
        // node a offers (10 GiB less the reserve), so it must go to node b.
        let mut a = node("a", 10);
        a.assigned = vec![running("big", "old")];
        let mut big = demand("big", "name=a", 1, 1);
        big.pinned.insert("id-a".into(), kept("old", 6));
        let small = demand("small", "*", 1, 4);
        let p = place(&[a, node("b", 10)], &[big, small], Strategy::Pack);
        assert_eq!(p.placed["big"], ["a"]);
        assert_eq!(p.nodes["id-a"][0].digest, "old");
        assert_eq!(p.placed["small"], ["b"], "node a has 3 GiB left, not 8");
    }

    #[test]
    fn a_changed_model_is_placed_anew() {
        let mut a = node("a", 16);
        a.assigned = vec![running("m", "old")];
        let p = place(&[a], &[demand("m", "*", 1, 1)], Strategy::Spread);
        assert_eq!(p.nodes["id-a"][0].digest, "digest-m");
    }
}
