//! Admin actions (switchover, force-active, resolve-split-brain, maintenance, verify): checking a
//! request, carrying it to the agents inside their bundles, and deciding its outcome from
//! what the agents answer.
//!
//! The controller never performs an action itself; the agents do, under the same lease
//! rules as any failover. What is decided here is only bookkeeping, so it is all pure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hapair_crds::HaGroupSpec;
use hapair_crds::nodeapi::{ActionOutcome, ActionResult, AdminAction, AdminActionKind, GroupKey};
use hapair_crds::validation::is_valid_name;

use crate::desired::state::ActionEntry;
use crate::support::timestamp::{UnixMillis, age};

/// How long an action may stay without a final outcome before it is declared failed.
pub const DEFAULT_ACTION_TIMEOUT: Duration = Duration::from_secs(300);

/// How long finished actions stay queryable.
pub const FINISHED_RETENTION: Duration = Duration::from_secs(3600);

/// Why a request was refused before anything was queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
}

/// The group an action is aimed at, as far as the checks need it.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub spec: &'a HaGroupSpec,
    pub deleting: bool,
    /// The node-API version each node spoke in its latest report (none yet: absent).
    pub node_api: &'a BTreeMap<String, u8>,
}

/// The first node-API version whose agents know the verify action.
pub const VERIFY_NODE_API: u8 = 2;

/// The node whose success completes the action, if one node decides it.
pub fn deciding_node(kind: &AdminActionKind) -> Option<&str> {
    match kind {
        AdminActionKind::Switchover { to } => Some(to),
        AdminActionKind::ForceActive { node } => Some(node),
        AdminActionKind::ResolveSplitBrain { winner } => Some(winner),
        AdminActionKind::Maintenance { .. } | AdminActionKind::Verify { .. } => None,
    }
}

/// Checks a request. Returns `Ok(Some(existing))` when `id` names an identical action that
/// was already queued (a retry), `Ok(None)` when it may be queued.
pub fn check<'s>(
    key: &GroupKey,
    id: &str,
    kind: &AdminActionKind,
    target: Option<Target<'_>>,
    actions: &'s BTreeMap<String, ActionEntry>,
) -> Result<Option<&'s ActionEntry>, Refusal> {
    if !is_valid_name(id) {
        return Err(Refusal::Invalid(format!(
            "id: {id:?} is not a valid action id (lowercase letters, digits and '-', at most 63)"
        )));
    }
    if let Some(existing) = actions.get(id) {
        return if existing.group == *key && existing.action.kind == *kind {
            Ok(Some(existing))
        } else {
            Err(Refusal::Conflict(format!("action id {id:?} is already used for another request")))
        };
    }
    let Some(target) = target else {
        return Err(Refusal::NotFound(format!("no HaGroup {key}")));
    };
    if target.deleting {
        return Err(Refusal::Conflict(format!("HaGroup {key} is being deleted")));
    }
    if let Some(node) = deciding_node(kind)
        && !target.spec.nodes.iter().any(|n| n.name == node)
    {
        let field = match kind {
            AdminActionKind::Switchover { .. } => "to",
            AdminActionKind::ForceActive { .. } => "node",
            _ => "winner",
        };
        let nodes: Vec<&str> = target.spec.nodes.iter().map(|n| n.name.as_str()).collect();
        return Err(Refusal::Invalid(format!(
            "{field}: {node:?} is not a node of HaGroup {key} (nodes: {})",
            nodes.join(", ")
        )));
    }
    if let AdminActionKind::Verify { volume } = kind {
        check_verify(key, volume, target)?;
    }
    if let Some((other_id, other)) = actions.iter().find(|(_, a)| a.group == *key && !a.is_final()) {
        return Err(Refusal::Conflict(format!(
            "action {other_id} ({}) on HaGroup {key} is still pending",
            other.action.kind.label()
        )));
    }
    Ok(None)
}

/// A verify names a volume of the group's flow, and every node must know the action: an
/// agent of the previous release would refuse the whole config that carried it.
fn check_verify(key: &GroupKey, volume: &str, target: Target<'_>) -> Result<(), Refusal> {
    let volumes: Vec<&str> =
        target.spec.flow.iter().filter_map(|s| s.volume.as_ref().map(|v| v.volume_ref.as_str())).collect();
    if !volumes.contains(&volume) {
        let known = if volumes.is_empty() { "none".to_string() } else { volumes.join(", ") };
        return Err(Refusal::Invalid(format!(
            "volume: {volume:?} is not a volume of HaGroup {key}'s flow (volumes: {known})"
        )));
    }
    for node in &target.spec.nodes {
        match target.node_api.get(&node.name) {
            Some(v) if *v >= VERIFY_NODE_API => {}
            Some(v) => {
                return Err(Refusal::Conflict(format!(
                    "verify: node {} speaks node API {v}, from before verify; upgrade its agent first",
                    node.name
                )));
            }
            None => {
                return Err(Refusal::Conflict(format!(
                    "verify: node {} has not reported to this controller yet, so its agent's version is unknown",
                    node.name
                )));
            }
        }
    }
    Ok(())
}

/// A freshly queued action.
pub fn queue(key: &GroupKey, id: &str, kind: AdminActionKind, now: UnixMillis) -> ActionEntry {
    ActionEntry {
        group: key.clone(),
        action: AdminAction { id: id.to_string(), kind },
        submitted: now,
        results: BTreeMap::new(),
        outcome: ActionOutcome::Pending,
        message: "waiting for the agents".into(),
        finished: None,
    }
}

/// Records what `node` reported about actions of `group`. Results for unknown ids or for
/// another group's actions are ignored. Returns whether anything changed.
pub fn record_results(
    actions: &mut BTreeMap<String, ActionEntry>,
    group: &GroupKey,
    node: &str,
    results: &[ActionResult],
) -> bool {
    let mut changed = false;
    for result in results {
        let Some(entry) = actions.get_mut(&result.id) else { continue };
        if entry.group != *group || entry.is_final() {
            continue;
        }
        if entry.results.get(node) != Some(result) {
            entry.results.insert(node.to_string(), result.clone());
            changed = true;
        }
    }
    changed
}

/// The overall outcome once it is final: a rejection or failure from any node ends the
/// action; otherwise success from the deciding node (for maintenance: from every node that
/// is reporting) completes it.
pub fn decide(entry: &ActionEntry, reporting_members: &BTreeSet<String>) -> Option<(ActionOutcome, String)> {
    for bad in [ActionOutcome::Rejected, ActionOutcome::Failed] {
        if let Some((node, result)) = entry.results.iter().find(|(_, r)| r.outcome == bad) {
            return Some((bad, format!("{node}: {}", result.message)));
        }
    }
    let succeeded = |node: &str| entry.results.get(node).is_some_and(|r| r.outcome == ActionOutcome::Succeeded);
    match deciding_node(&entry.action.kind) {
        Some(node) => succeeded(node).then(|| {
            let message = entry.results.get(node).map(|r| r.message.clone()).unwrap_or_default();
            (ActionOutcome::Succeeded, format!("{node}: {message}"))
        }),
        None => {
            let done = !reporting_members.is_empty() && reporting_members.iter().all(|n| succeeded(n));
            done.then(|| {
                let nodes: Vec<&str> = reporting_members.iter().map(String::as_str).collect();
                (ActionOutcome::Succeeded, format!("applied on {}", nodes.join(", ")))
            })
        }
    }
}

/// Finalizes `entry` if its outcome is decided or it timed out. Returns whether it changed.
pub fn settle(
    entry: &mut ActionEntry,
    reporting_members: &BTreeSet<String>,
    now: UnixMillis,
    timeout: Duration,
) -> bool {
    if entry.is_final() {
        return false;
    }
    let verdict = decide(entry, reporting_members).or_else(|| {
        (age(now, entry.submitted) >= timeout)
            .then(|| (ActionOutcome::Failed, format!("no final outcome from the agents within {}s", timeout.as_secs())))
    });
    match verdict {
        Some((outcome, message)) => {
            entry.outcome = outcome;
            entry.message = message;
            entry.finished = Some(now);
            true
        }
        None => {
            let progress: Vec<String> =
                entry.results.iter().map(|(node, r)| format!("{node}: {:?} {}", r.outcome, r.message)).collect();
            let message = if progress.is_empty() { "waiting for the agents".to_string() } else { progress.join("; ") };
            let changed = entry.message != message;
            entry.message = message;
            changed
        }
    }
}

/// The actions `node` must still see for `group`: not final overall, and not yet answered
/// with a final result by this node.
pub fn pending_for(actions: &BTreeMap<String, ActionEntry>, group: &GroupKey, node: &str) -> Vec<AdminAction> {
    let mut pending: Vec<&ActionEntry> = actions
        .values()
        .filter(|a| a.group == *group && !a.is_final())
        .filter(|a| a.results.get(node).is_none_or(|r| !r.outcome.is_final()))
        .collect();
    pending.sort_by(|a, b| a.submitted.cmp(&b.submitted).then_with(|| a.action.id.cmp(&b.action.id)));
    pending.into_iter().map(|a| a.action.clone()).collect()
}

/// Forgets finished actions older than `retention`. Returns whether any was removed.
pub fn prune(actions: &mut BTreeMap<String, ActionEntry>, now: UnixMillis, retention: Duration) -> bool {
    let before = actions.len();
    actions.retain(|_, a| a.finished.is_none_or(|t| age(now, t) < retention));
    actions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HaGroupSpec {
        serde_yaml::from_str(
            "nodes: [{name: a, heartbeatAddresses: [198.18.1.1]}, {name: b, heartbeatAddresses: [198.18.1.2]}]",
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn key() -> GroupKey {
        GroupKey::new("default", "g")
    }

    fn result(id: &str, outcome: ActionOutcome, message: &str) -> ActionResult {
        ActionResult { id: id.into(), outcome, message: message.into() }
    }

    #[test]
    fn refuses_foreign_nodes_unknown_groups_and_a_second_pending_action() {
        let spec = spec();
        let versions = BTreeMap::new();
        let target = Some(Target { spec: &spec, deleting: false, node_api: &versions });
        let mut actions = BTreeMap::new();
        let to_c = AdminActionKind::Switchover { to: "c".into() };
        assert_eq!(
            check(&key(), "x1", &to_c, target, &actions),
            Err(Refusal::Invalid("to: \"c\" is not a node of HaGroup default/g (nodes: a, b)".into()))
        );
        assert!(matches!(check(&key(), "x1", &to_c, None, &actions), Err(Refusal::NotFound(_))));
        assert!(matches!(check(&key(), "Bad_Id", &to_c, target, &actions), Err(Refusal::Invalid(_))));
        let to_b = AdminActionKind::Switchover { to: "b".into() };
        assert_eq!(check(&key(), "x1", &to_b, target, &actions), Ok(None));
        actions.insert("x1".into(), queue(&key(), "x1", to_b.clone(), 0));
        // The same request again is a retry, not a conflict.
        assert!(matches!(check(&key(), "x1", &to_b, target, &actions), Ok(Some(_))));
        let maintenance = AdminActionKind::Maintenance { enabled: true };
        assert_eq!(
            check(&key(), "x2", &maintenance, target, &actions),
            Err(Refusal::Conflict("action x1 (switchover) on HaGroup default/g is still pending".into()))
        );
        assert!(matches!(check(&key(), "x1", &maintenance, target, &actions), Err(Refusal::Conflict(_))));
        let deleting = Some(Target { spec: &spec, deleting: true, node_api: &versions });
        assert!(matches!(check(&key(), "x3", &maintenance, deleting, &BTreeMap::new()), Err(Refusal::Conflict(_))));
    }

    #[test]
    fn verify_names_a_volume_of_the_flow_and_waits_for_agents_that_know_it() {
        let spec: HaGroupSpec = serde_yaml::from_str(
            "nodes: [{name: a, heartbeatAddresses: [198.18.1.1]}, {name: b, heartbeatAddresses: [198.18.1.2]}]\n\
             flow: [{name: data, volume: {volumeRef: pgdata}}]",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let verify = |volume: &str| AdminActionKind::Verify { volume: volume.into() };
        let check_with = |versions: &[(&str, u8)], kind: &AdminActionKind| {
            let node_api: BTreeMap<String, u8> = versions.iter().map(|(n, v)| (n.to_string(), *v)).collect();
            let target = Some(Target { spec: &spec, deleting: false, node_api: &node_api });
            check(&key(), "v1", kind, target, &BTreeMap::new()).map(|existing| existing.is_some())
        };
        let current = [("a", VERIFY_NODE_API), ("b", VERIFY_NODE_API)];
        assert_eq!(check_with(&current, &verify("pgdata")), Ok(false));
        assert_eq!(
            check_with(&current, &verify("logs")),
            Err(Refusal::Invalid(
                "volume: \"logs\" is not a volume of HaGroup default/g's flow (volumes: pgdata)".into()
            ))
        );
        assert_eq!(
            check_with(&[("a", VERIFY_NODE_API), ("b", 1)], &verify("pgdata")),
            Err(Refusal::Conflict(
                "verify: node b speaks node API 1, from before verify; upgrade its agent first".into()
            ))
        );
        assert_eq!(
            check_with(&[("b", VERIFY_NODE_API)], &verify("pgdata")),
            Err(Refusal::Conflict(
                "verify: node a has not reported to this controller yet, so its agent's version is unknown".into()
            ))
        );
        // Nothing else asks for versions.
        assert_eq!(check_with(&[], &AdminActionKind::Maintenance { enabled: true }), Ok(false));
    }

    #[test]
    fn switchover_completes_on_the_target_nodes_success() {
        let mut actions = BTreeMap::new();
        actions.insert("s1".into(), queue(&key(), "s1", AdminActionKind::Switchover { to: "b".into() }, 0));
        let members: BTreeSet<String> = ["a".into(), "b".into()].into();
        assert_eq!(pending_for(&actions, &key(), "a").len(), 1);
        assert!(record_results(&mut actions, &key(), "a", &[result("s1", ActionOutcome::Succeeded, "demoted")]));
        // The demoted node no longer needs to see it; the target still does.
        assert!(pending_for(&actions, &key(), "a").is_empty());
        assert_eq!(pending_for(&actions, &key(), "b").len(), 1);
        let entry = actions.get_mut("s1").unwrap_or_else(|| panic!("queued"));
        assert!(settle(entry, &members, 1_000, DEFAULT_ACTION_TIMEOUT), "progress message changes");
        assert_eq!((entry.outcome, entry.message.as_str()), (ActionOutcome::Pending, "a: Succeeded demoted"));
        assert!(record_results(&mut actions, &key(), "b", &[result("s1", ActionOutcome::Succeeded, "serving")]));
        let entry = actions.get_mut("s1").unwrap_or_else(|| panic!("queued"));
        assert!(settle(entry, &members, 2_000, DEFAULT_ACTION_TIMEOUT));
        assert_eq!((entry.outcome, entry.message.as_str()), (ActionOutcome::Succeeded, "b: serving"));
        assert_eq!(entry.finished, Some(2_000));
        assert!(pending_for(&actions, &key(), "b").is_empty());
        // Later results for a finished action change nothing.
        assert!(!record_results(&mut actions, &key(), "b", &[result("s1", ActionOutcome::Failed, "late")]));
    }

    #[test]
    fn a_rejection_from_any_node_ends_the_action() {
        let mut entry = queue(&key(), "f1", AdminActionKind::ForceActive { node: "a".into() }, 0);
        entry.results.insert("b".into(), result("f1", ActionOutcome::Rejected, "peer holds the lease"));
        assert_eq!(decide(&entry, &BTreeSet::new()), Some((ActionOutcome::Rejected, "b: peer holds the lease".into())));
    }

    #[test]
    fn maintenance_waits_for_every_reporting_node_and_times_out() {
        let mut entry = queue(&key(), "m1", AdminActionKind::Maintenance { enabled: true }, 0);
        let both: BTreeSet<String> = ["a".into(), "b".into()].into();
        entry.results.insert("a".into(), result("m1", ActionOutcome::Succeeded, "frozen"));
        assert_eq!(decide(&entry, &both), None);
        let only_a: BTreeSet<String> = ["a".into()].into();
        assert_eq!(decide(&entry, &only_a).map(|(o, _)| o), Some(ActionOutcome::Succeeded));
        assert_eq!(decide(&entry, &BTreeSet::new()), None);

        let timeout = Duration::from_secs(10);
        assert!(settle(&mut entry, &both, 5_000, timeout));
        assert_eq!(entry.outcome, ActionOutcome::Pending);
        assert!(settle(&mut entry, &both, 10_000, timeout));
        assert_eq!(entry.outcome, ActionOutcome::Failed);
        assert!(entry.message.contains("within 10s"), "{}", entry.message);
    }

    #[test]
    fn prune_forgets_only_old_finished_actions() {
        let mut actions = BTreeMap::new();
        let mut old = queue(&key(), "old", AdminActionKind::Maintenance { enabled: false }, 0);
        old.outcome = ActionOutcome::Succeeded;
        old.finished = Some(0);
        actions.insert("old".into(), old);
        actions.insert("new".into(), queue(&key(), "new", AdminActionKind::Maintenance { enabled: true }, 0));
        assert!(prune(&mut actions, 7_200_000, FINISHED_RETENTION));
        assert_eq!(actions.keys().collect::<Vec<_>>(), ["new"]);
    }
}
