//! A group's status from the latest reports of its two nodes: phase, active node, epoch,
//! per-node health and role, the one-word sync state of each of its volumes, conditions and
//! the last failover.
//!
//! Pure, with the current time and the staleness bound as inputs. Conditions go through
//! [`set_condition`] so a condition whose status did not change keeps its transition time,
//! and the same inputs always produce an identical status (no needless status writes).

use std::time::Duration;

use hapair_crds::condition::{ConditionStatus, set_condition, types};
use hapair_crds::hagroup::{ActionRecord, GroupPhase, NodeHealth, NodeRole, NodeStatus, WitnessMode};
use hapair_crds::nodeapi::{GroupKey, GroupReport, NodeReport, VolumeReport};
use hapair_crds::volume::ConnectionState;
use hapair_crds::{HaGroupStatus, condition::Condition};

use super::volume::sync_state;
use crate::desired::reconcile::GroupPlan;
use crate::support::timestamp::{UnixMillis, age, format_millis};

/// Default bound after which a node's report no longer counts: agents report at least every
/// few seconds, so three missed reports mean the controller has lost touch.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(15);

/// One node's latest report, if any, and when it arrived.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    pub node: &'a str,
    pub report: Option<&'a NodeReport>,
    pub received: Option<UnixMillis>,
}

/// Everything a group's status is computed from.
#[derive(Clone, Debug)]
pub struct GroupInputs<'a> {
    pub key: &'a GroupKey,
    pub plan: &'a GroupPlan,
    /// One per group node, in spec order.
    pub observations: Vec<Observation<'a>>,
    pub last_action: Option<ActionRecord>,
    pub now: UnixMillis,
    pub stale_after: Duration,
}

struct Seen<'a> {
    node: &'a str,
    report: Option<&'a NodeReport>,
    group: Option<&'a GroupReport>,
    received: Option<UnixMillis>,
    fresh: bool,
    /// A primary claim in an older epoch than another node's, under a witness.
    superseded: bool,
}

impl<'a> Seen<'a> {
    fn new(obs: &Observation<'a>, key: &GroupKey, now: UnixMillis, stale_after: Duration) -> Self {
        let fresh = obs.received.is_some_and(|t| age(now, t) < stale_after);
        let group = obs.report.and_then(|r| r.groups.iter().find(|g| g.key == *key));
        Seen { node: obs.node, report: obs.report, group, received: obs.received, fresh, superseded: false }
    }

    /// The group as this node sees it, only while its report is fresh and not superseded.
    fn live(&self) -> Option<&'a GroupReport> {
        self.group.filter(|_| self.fresh && !self.superseded)
    }
}

/// Under a witness, a node can act as primary in epoch E only with the witness's grant of
/// E, and the witness grants a newer epoch only after the older holder's lease has run out
/// on its own clock. So of two primary claims in different epochs, the older one is a
/// report written before its node died or lost its lease (the report interval is seconds,
/// a failover one), not a second active node. Without a witness both can truly be active,
/// and both claims stand.
fn mark_superseded(seen: &mut [Seen<'_>], witness: WitnessMode) {
    if witness == WitnessMode::None {
        return;
    }
    let newest = seen.iter().filter_map(|s| s.live()).filter(|g| g.role == NodeRole::Primary).map(|g| g.epoch).max();
    if let Some(newest) = newest {
        for s in seen.iter_mut() {
            if s.live().is_some_and(|g| g.role == NodeRole::Primary && g.epoch < newest) {
                s.superseded = true;
            }
        }
    }
}

/// Computes the group's status from `inputs`, starting from `previous` so that unchanged
/// conditions keep their transition times and the epoch never goes backwards.
pub fn group_status(previous: &HaGroupStatus, inputs: &GroupInputs<'_>) -> HaGroupStatus {
    let now_text = format_millis(inputs.now);
    let mut seen: Vec<Seen<'_>> =
        inputs.observations.iter().map(|o| Seen::new(o, inputs.key, inputs.now, inputs.stale_after)).collect();
    let spec = inputs.plan.config.as_ref().map(|c| &c.spec);
    mark_superseded(&mut seen, spec.map(|s| s.witness.mode).unwrap_or_default());
    let generation = inputs.plan.observed_generation.or(inputs.plan.config.as_ref().map(|c| c.generation));

    let primaries: Vec<&str> =
        seen.iter().filter(|s| s.live().is_some_and(|g| g.role == NodeRole::Primary)).map(|s| s.node).collect();
    let volume_split = seen
        .iter()
        .filter_map(|s| s.live())
        .flat_map(|g| &g.volumes)
        .any(|v| v.connection == ConnectionState::SplitBrain);
    let split_brain = primaries.len() >= 2 || volume_split;
    let any_live = seen.iter().any(|s| s.live().is_some());
    let maintenance = spec.is_some_and(|s| s.maintenance)
        || seen.iter().filter_map(|s| s.live()).any(|g| g.role == NodeRole::Maintenance);
    let transitioning =
        seen.iter().filter_map(|s| s.live()).any(|g| matches!(g.role, NodeRole::Promoting | NodeRole::Demoting));
    let active = if split_brain || primaries.len() != 1 { None } else { primaries.first().map(|n| n.to_string()) };
    let configured: Vec<&str> =
        inputs.plan.config.iter().flat_map(|c| c.volumes.iter().map(|v| v.name.as_str())).collect();
    let volumes = volume_summaries(&seen, &configured);
    let degraded_reasons = degraded_reasons(&seen, active.as_deref(), &volumes);

    let phase = if inputs.plan.config.is_none() {
        GroupPhase::Invalid
    } else if split_brain {
        GroupPhase::SplitBrain
    } else if inputs.plan.error.is_some() {
        GroupPhase::Invalid
    } else if !any_live {
        GroupPhase::Pending
    } else if maintenance {
        GroupPhase::Maintenance
    } else if transitioning {
        GroupPhase::FailingOver
    } else if active.is_none() {
        GroupPhase::Down
    } else if degraded_reasons.is_empty() {
        GroupPhase::Healthy
    } else {
        GroupPhase::Degraded
    };

    let mut status = previous.clone();
    status.phase = Some(phase);
    status.active_node = active.clone();
    let reported_epoch = seen.iter().filter_map(|s| s.group).map(|g| g.epoch).max().unwrap_or(0);
    status.epoch = status.epoch.max(reported_epoch);
    let newest_failover = seen
        .iter()
        .filter_map(|s| s.group)
        .filter_map(|g| g.last_failover.as_ref().map(|f| (g.epoch, f)))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.time.cmp(&b.1.time)));
    if let Some((_, failover)) = newest_failover {
        status.last_failover = Some(failover.clone());
    }
    status.nodes = seen.iter().map(|s| node_status(s, &seen)).collect();
    if inputs.last_action.is_some() {
        status.last_action = inputs.last_action.clone();
    }
    status.observed_generation = generation;

    let condition = |type_: &str, state: ConditionStatus, reason: &str, message: String| Condition {
        type_: type_.to_string(),
        status: state,
        reason: reason.to_string(),
        message,
        last_transition_time: now_text.clone(),
        observed_generation: generation,
    };
    let conditions = &mut status.conditions;
    match &inputs.plan.error {
        Some(error) => {
            set_condition(conditions, condition(types::VALID, ConditionStatus::False, "InvalidSpec", error.to_string()))
        }
        None => {
            set_condition(conditions, condition(types::VALID, ConditionStatus::True, "Valid", "spec accepted".into()))
        }
    }
    let ready = match (phase, &active) {
        (GroupPhase::SplitBrain, _) => condition(
            types::READY,
            ConditionStatus::False,
            "SplitBrain",
            format!("both nodes claim to be active: {}", primaries.join(", ")),
        ),
        (_, Some(node)) if inputs.plan.deleting => condition(
            types::READY,
            ConditionStatus::False,
            "Deleting",
            format!("being removed; {node} still reported active"),
        ),
        (_, Some(node)) => condition(types::READY, ConditionStatus::True, "Active", format!("{node} is active")),
        (_, None) if inputs.plan.deleting => {
            condition(types::READY, ConditionStatus::False, "Deleting", "being removed".into())
        }
        (_, None) if !any_live => {
            condition(types::READY, ConditionStatus::Unknown, "NoReports", "no current report from any node".into())
        }
        (GroupPhase::FailingOver, None) => condition(
            types::READY,
            ConditionStatus::False,
            "FailingOver",
            "a promotion or demotion is in progress".into(),
        ),
        (_, None) => condition(types::READY, ConditionStatus::False, "NoActiveNode", "no node is active".into()),
    };
    set_condition(conditions, ready);
    let degraded = if active.is_none() {
        condition(types::DEGRADED, ConditionStatus::Unknown, "NoActiveNode", "no node is active".into())
    } else if degraded_reasons.is_empty() {
        condition(types::DEGRADED, ConditionStatus::False, "Redundant", "the standby is ready to take over".into())
    } else {
        condition(types::DEGRADED, ConditionStatus::True, "NoReadyStandby", degraded_reasons.join("; "))
    };
    set_condition(conditions, degraded);
    let synced = if volumes.is_empty() {
        condition(types::SYNCED, ConditionStatus::True, "NoVolumes", "the group has no replicated volumes".into())
    } else if volumes.iter().all(|(_, s)| s == "UpToDate") {
        condition(types::SYNCED, ConditionStatus::True, "UpToDate", "every volume is in sync on both nodes".into())
    } else if volumes.iter().all(|(_, s)| s == "Unknown") {
        condition(types::SYNCED, ConditionStatus::Unknown, "NoReports", "no current volume reports".into())
    } else {
        let detail: Vec<String> =
            volumes.iter().filter(|(_, s)| s != "UpToDate").map(|(n, s)| format!("{n}: {s}")).collect();
        condition(types::SYNCED, ConditionStatus::False, "OutOfSync", detail.join("; "))
    };
    set_condition(conditions, synced);
    set_condition(
        conditions,
        if split_brain {
            let why = if primaries.len() >= 2 {
                format!("{} all report Primary", primaries.join(" and "))
            } else {
                "a volume detected diverged data".to_string()
            };
            condition(
                types::SPLIT_BRAIN,
                ConditionStatus::True,
                "SplitBrain",
                format!("{why}; resolve with resolve-split-brain"),
            )
        } else {
            condition(types::SPLIT_BRAIN, ConditionStatus::False, "NoSplitBrain", "at most one node is active".into())
        },
    );
    set_condition(
        conditions,
        if maintenance {
            condition(types::MAINTENANCE, ConditionStatus::True, "Maintenance", "automatic actions are frozen".into())
        } else {
            condition(types::MAINTENANCE, ConditionStatus::False, "Automatic", "automatic failover is enabled".into())
        },
    );
    if spec.is_some_and(|s| s.witness.mode == WitnessMode::None) {
        set_condition(
            conditions,
            condition(
                types::QUORUM_RISK,
                ConditionStatus::True,
                "NoWitness",
                "witness mode none: a full partition can make both nodes active".into(),
            ),
        );
    } else {
        conditions.retain(|c| c.type_ != types::QUORUM_RISK);
    }
    status
}

fn node_status(me: &Seen<'_>, all: &[Seen<'_>]) -> NodeStatus {
    let peer_heard_me =
        all.iter().filter(|s| s.node != me.node).filter_map(|s| s.group).find_map(|g| g.last_peer_heartbeat.clone());
    NodeStatus {
        name: me.node.to_string(),
        role: me.group.map(|g| g.role),
        health: Some(me.live().map(|g| g.health).unwrap_or(NodeHealth::Unknown)),
        last_heartbeat: peer_heard_me,
        last_report: me.received.map(format_millis),
        uptime_seconds: me.report.map(|r| r.uptime_seconds).unwrap_or(0),
        agent_version: me.report.map(|r| r.agent_version.clone()),
        os: me.report.map(|r| r.os.clone()),
        hardware: me.report.map(|r| r.hardware.clone()),
        links: me.report.map(|r| r.links.clone()).unwrap_or_default(),
    }
}

/// Why a serving group is not fully redundant, in words; empty when it is.
fn degraded_reasons(seen: &[Seen<'_>], active: Option<&str>, volumes: &[(String, String)]) -> Vec<String> {
    let mut reasons = Vec::new();
    for s in seen {
        match s.live() {
            None if s.report.is_none() => reasons.push(format!("{}: no report", s.node)),
            None => reasons.push(format!("{}: not heard from", s.node)),
            Some(g) => {
                if g.health != NodeHealth::Healthy {
                    reasons.push(format!("{}: health {:?}", s.node, g.health));
                }
                if Some(s.node) != active && g.role != NodeRole::Standby {
                    reasons.push(format!("{}: {}", s.node, g.role.as_str()));
                }
                if !g.peer_reachable {
                    reasons.push(format!("{}: peer unreachable", s.node));
                }
            }
        }
    }
    for (name, state) in volumes {
        if state != "UpToDate" {
            reasons.push(format!("volume {name}: {state}"));
        }
    }
    reasons
}

/// Per volume of the group (configured or reported): its name and one-word sync state.
fn volume_summaries<'a>(seen: &[Seen<'a>], configured: &[&'a str]) -> Vec<(String, String)> {
    let mut names: Vec<&str> = seen
        .iter()
        .filter_map(|s| s.group)
        .flat_map(|g| g.volumes.iter().map(|v| v.name.as_str()))
        .chain(configured.iter().copied())
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let per_node: Vec<(Option<&VolumeReport>, bool)> = seen
                .iter()
                .map(|s| (s.group.and_then(|g| g.volumes.iter().find(|v| v.name == name)), s.fresh))
                .collect();
            (name.to_string(), sync_state(&per_node))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::HaGroupSpec;
    use hapair_crds::condition::find;
    use hapair_crds::hagroup::{FailoverRecord, Hardware};
    use hapair_crds::manifest::ManifestError;
    use hapair_crds::nodeapi::{GroupConfig, HeartbeatKey};
    use hapair_crds::volume::SyncProgress;
    use hapair_crds::volume::{DiskState, VolumeRole};

    use crate::status::volume::tests::volume;

    const NOW: UnixMillis = 1_700_000_100_000;

    fn key() -> GroupKey {
        GroupKey::new("default", "g")
    }

    fn plan(witness: &str) -> GroupPlan {
        let spec: HaGroupSpec = serde_yaml::from_str(&format!(
            "nodes: [{{name: a, heartbeatAddresses: [198.18.1.1]}}, {{name: b, heartbeatAddresses: [198.18.1.2]}}]\nwitness: {{mode: {witness}}}"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        GroupPlan {
            config: Some(GroupConfig {
                key: key(),
                generation: 4,
                spec,
                volumes: vec![],
                heartbeat_key: HeartbeatKey::Inline("x".into()),
                actions: vec![],
                deleting: false,
            }),
            error: None,
            deleting: false,
            observed_generation: Some(4),
        }
    }

    fn report(node: &str, role: NodeRole, epoch: u64) -> NodeReport {
        let volume_role = if role == NodeRole::Primary { VolumeRole::Primary } else { VolumeRole::Secondary };
        NodeReport {
            node: node.into(),
            applied_revision: 1,
            config_error: None,
            agent_version: "0.1.0".into(),
            os: "Debian 12".into(),
            uptime_seconds: 60,
            hardware: Hardware { cpus: 4, ..Hardware::default() },
            links: vec![],
            wipes: vec![],
            groups: vec![GroupReport {
                key: key(),
                role,
                epoch,
                health: NodeHealth::Healthy,
                role_reason: None,
                peer_reachable: true,
                last_peer_heartbeat: Some(format!("2023-11-14T22:15:0{epoch}Z")),
                heartbeat_links: vec![],
                steps: vec![],
                monitors: vec![],
                volumes: vec![volume(DiskState::UpToDate, ConnectionState::Connected, volume_role)],
                last_failover: None,
                actions: vec![],
                events: vec![],
                cleaned_up: false,
            }],
        }
    }

    fn status_of(
        plan: &GroupPlan,
        a: Option<(&NodeReport, UnixMillis)>,
        b: Option<(&NodeReport, UnixMillis)>,
    ) -> HaGroupStatus {
        status_from(&HaGroupStatus::default(), plan, a, b, NOW)
    }

    fn status_from(
        previous: &HaGroupStatus,
        plan: &GroupPlan,
        a: Option<(&NodeReport, UnixMillis)>,
        b: Option<(&NodeReport, UnixMillis)>,
        now: UnixMillis,
    ) -> HaGroupStatus {
        fn obs<'a>(node: &'a str, r: Option<(&'a NodeReport, UnixMillis)>) -> Observation<'a> {
            Observation { node, report: r.map(|x| x.0), received: r.map(|x| x.1) }
        }
        let key = key();
        let inputs = GroupInputs {
            key: &key,
            plan,
            observations: vec![obs("a", a), obs("b", b)],
            last_action: None,
            now,
            stale_after: DEFAULT_STALE_AFTER,
        };
        group_status(previous, &inputs)
    }

    fn condition(status: &HaGroupStatus, type_: &str) -> (ConditionStatus, String) {
        let c = find(&status.conditions, type_).unwrap_or_else(|| panic!("no {type_} condition"));
        (c.status, c.reason.clone())
    }

    #[test]
    fn no_reports_is_pending_with_unknown_health() {
        let status = status_of(&plan("controller"), None, None);
        assert_eq!(status.phase, Some(GroupPhase::Pending));
        assert_eq!(status.active_node, None);
        assert_eq!(condition(&status, types::READY), (ConditionStatus::Unknown, "NoReports".into()));
        assert!(status.nodes.iter().all(|n| n.health == Some(NodeHealth::Unknown)));
        assert_eq!(condition(&status, types::DEGRADED), (ConditionStatus::Unknown, "NoActiveNode".into()));
        assert_eq!(condition(&status, types::SYNCED), (ConditionStatus::True, "NoVolumes".into()));
        assert_eq!(status.observed_generation, Some(4));
        assert!(find(&status.conditions, types::QUORUM_RISK).is_none());
    }

    #[test]
    fn a_configured_volume_nobody_reported_is_not_called_synced() {
        let mut plan = plan("controller");
        let spec =
            serde_yaml::from_str("group: g\nsize: 1Gi\nbacking: [{node: a, path: /srv/d}, {node: b, path: /srv/d}]")
                .unwrap_or_else(|e| panic!("{e}"));
        if let Some(config) = plan.config.as_mut() {
            config.volumes.push(hapair_crds::nodeapi::VolumeConfig {
                name: "data".into(),
                uuid: "u".into(),
                generation: 1,
                spec,
            });
        }
        let status = status_of(&plan, None, None);
        assert_eq!(condition(&status, types::SYNCED), (ConditionStatus::Unknown, "NoReports".into()));
    }

    #[test]
    fn primary_and_ready_standby_is_healthy() {
        let (a, b) = (report("a", NodeRole::Primary, 3), report("b", NodeRole::Standby, 3));
        let status = status_of(&plan("controller"), Some((&a, NOW - 1000)), Some((&b, NOW - 2000)));
        assert_eq!(status.phase, Some(GroupPhase::Healthy));
        assert_eq!(status.active_node.as_deref(), Some("a"));
        assert_eq!(status.epoch, 3);
        assert_eq!(condition(&status, types::READY), (ConditionStatus::True, "Active".into()));
        assert_eq!(condition(&status, types::DEGRADED).0, ConditionStatus::False);
        assert_eq!(condition(&status, types::SYNCED), (ConditionStatus::True, "UpToDate".into()));
        assert_eq!(condition(&status, types::SPLIT_BRAIN).0, ConditionStatus::False);
        // b's status carries when a last heard from it, per a's report.
        assert_eq!(status.nodes[1].last_heartbeat.as_deref(), Some("2023-11-14T22:15:03Z"));
        assert_eq!(status.nodes[0].hardware.as_ref().map(|h| h.cpus), Some(4));
        assert_eq!(status.nodes[0].last_report.as_deref(), Some("2023-11-14T22:14:59Z"));
    }

    #[test]
    fn a_stale_standby_degrades_the_group_and_reads_unknown() {
        let (a, b) = (report("a", NodeRole::Primary, 3), report("b", NodeRole::Standby, 3));
        let stale = NOW - DEFAULT_STALE_AFTER.as_millis() as i64 - 1;
        let status = status_of(&plan("controller"), Some((&a, NOW)), Some((&b, stale)));
        assert_eq!(status.phase, Some(GroupPhase::Degraded));
        assert_eq!(status.nodes[1].health, Some(NodeHealth::Unknown));
        assert_eq!(status.nodes[1].role, Some(NodeRole::Standby), "last known role is kept");
        let degraded = find(&status.conditions, types::DEGRADED).map(|c| c.message.clone()).unwrap_or_default();
        assert!(degraded.contains("b: not heard from"), "{degraded}");
    }

    #[test]
    fn two_primaries_are_split_brain_whatever_their_epochs() {
        for (ea, eb) in [(3, 3), (3, 4)] {
            let (a, b) = (report("a", NodeRole::Primary, ea), report("b", NodeRole::Primary, eb));
            let status = status_of(&plan("none"), Some((&a, NOW)), Some((&b, NOW)));
            assert_eq!(status.phase, Some(GroupPhase::SplitBrain));
            assert_eq!(status.active_node, None);
            assert_eq!(status.epoch, eb);
            assert_eq!(condition(&status, types::SPLIT_BRAIN).0, ConditionStatus::True);
            assert_eq!(condition(&status, types::READY), (ConditionStatus::False, "SplitBrain".into()));
            assert_eq!(condition(&status, types::QUORUM_RISK), (ConditionStatus::True, "NoWitness".into()));
        }
    }

    #[test]
    fn under_a_witness_an_older_epochs_primary_claim_is_superseded_not_a_split_brain() {
        // The last report of a primary that died a second ago, next to the new primary's.
        let (a, b) = (report("a", NodeRole::Primary, 3), report("b", NodeRole::Primary, 4));
        let status = status_of(&plan("controller"), Some((&a, NOW - 1_000)), Some((&b, NOW)));
        assert_eq!(status.phase, Some(GroupPhase::Degraded));
        assert_eq!(status.active_node.as_deref(), Some("b"));
        assert_eq!(condition(&status, types::SPLIT_BRAIN).0, ConditionStatus::False);
        // Two primaries in the same epoch are a split brain even under a witness.
        let a = report("a", NodeRole::Primary, 4);
        let status = status_of(&plan("controller"), Some((&a, NOW)), Some((&b, NOW)));
        assert_eq!(status.phase, Some(GroupPhase::SplitBrain));
    }

    #[test]
    fn a_stale_old_primary_is_not_a_split_brain() {
        let (a, b) = (report("a", NodeRole::Primary, 3), report("b", NodeRole::Primary, 4));
        let status = status_of(&plan("controller"), Some((&a, NOW - 60_000)), Some((&b, NOW)));
        assert_eq!(status.phase, Some(GroupPhase::Degraded));
        assert_eq!(status.active_node.as_deref(), Some("b"));
    }

    #[test]
    fn diverged_volumes_are_split_brain_and_syncing_is_out_of_sync() {
        let (a, mut b) = (report("a", NodeRole::Primary, 3), report("b", NodeRole::Standby, 3));
        b.groups[0].volumes[0].connection = ConnectionState::SplitBrain;
        let status = status_of(&plan("controller"), Some((&a, NOW)), Some((&b, NOW)));
        assert_eq!(status.phase, Some(GroupPhase::SplitBrain));
        b.groups[0].volumes[0] = volume(DiskState::Inconsistent, ConnectionState::SyncTarget, VolumeRole::Secondary);
        b.groups[0].volumes[0].sync =
            Some(SyncProgress { done_bytes: 42, total_bytes: 100, bytes_per_second: 0, eta_seconds: None });
        let status = status_of(&plan("controller"), Some((&a, NOW)), Some((&b, NOW)));
        assert_eq!(status.phase, Some(GroupPhase::Degraded));
        let synced = find(&status.conditions, types::SYNCED).map(|c| (c.status, c.message.clone()));
        assert_eq!(synced, Some((ConditionStatus::False, "data: Syncing 42%".into())));
    }

    #[test]
    fn transitions_maintenance_and_invalid_specs_have_their_phases() {
        let (a, b) = (report("a", NodeRole::Promoting, 4), report("b", NodeRole::Fenced, 3));
        assert_eq!(
            status_of(&plan("controller"), Some((&a, NOW)), Some((&b, NOW))).phase,
            Some(GroupPhase::FailingOver)
        );
        let (a, b) = (report("a", NodeRole::Standby, 4), report("b", NodeRole::Fenced, 3));
        assert_eq!(status_of(&plan("controller"), Some((&a, NOW)), Some((&b, NOW))).phase, Some(GroupPhase::Down));
        let (a, b) = (report("a", NodeRole::Maintenance, 4), report("b", NodeRole::Standby, 4));
        let status = status_of(&plan("controller"), Some((&a, NOW)), Some((&b, NOW)));
        assert_eq!(status.phase, Some(GroupPhase::Maintenance));
        assert_eq!(condition(&status, types::MAINTENANCE).0, ConditionStatus::True);

        let mut invalid = plan("controller");
        invalid.error = Some(ManifestError {
            file: "g.yaml".into(),
            index: 1,
            object: Some("HaGroup default/g".into()),
            field: Some("spec.nodes".into()),
            message: "bad".into(),
        });
        let (a, b) = (report("a", NodeRole::Primary, 3), report("b", NodeRole::Standby, 3));
        let status = status_of(&invalid, Some((&a, NOW)), Some((&b, NOW)));
        assert_eq!(status.phase, Some(GroupPhase::Invalid));
        assert_eq!(status.active_node.as_deref(), Some("a"), "the last good config still runs");
        let valid = find(&status.conditions, types::VALID).map(|c| (c.status, c.message.clone()));
        assert_eq!(
            valid,
            Some((ConditionStatus::False, "g.yaml (document 1), HaGroup default/g: spec.nodes: bad".into()))
        );
    }

    #[test]
    fn the_same_inputs_later_give_the_same_status_and_the_epoch_never_drops() {
        let (a, b) = (report("a", NodeRole::Primary, 3), report("b", NodeRole::Standby, 3));
        let plan = plan("none");
        let first = status_from(&HaGroupStatus::default(), &plan, Some((&a, NOW)), Some((&b, NOW)), NOW);
        let later = status_from(&first, &plan, Some((&a, NOW)), Some((&b, NOW)), NOW + 5_000);
        assert_eq!(later, first);
        // A flip changes only the flipped condition's transition time.
        let (a2, b2) = (report("a", NodeRole::Primary, 1), report("b", NodeRole::Primary, 2));
        let flipped = status_from(&first, &plan, Some((&a2, NOW + 6_000)), Some((&b2, NOW + 6_000)), NOW + 6_000);
        assert_eq!(flipped.epoch, 3, "epoch is monotonic");
        let time = |s: &HaGroupStatus, t| find(&s.conditions, t).map(|c| c.last_transition_time.clone());
        assert_eq!(time(&flipped, types::SPLIT_BRAIN), Some(format_millis(NOW + 6_000)));
        assert_eq!(time(&flipped, types::VALID), time(&first, types::VALID));
    }

    #[test]
    fn last_failover_comes_from_the_newest_epoch() {
        let record = |to: &str, time: &str| FailoverRecord {
            time: time.into(),
            from: None,
            to: to.into(),
            reason: "peer dead".into(),
            duration_ms: 900,
            phases: vec![],
        };
        let (mut a, mut b) = (report("a", NodeRole::Standby, 2), report("b", NodeRole::Primary, 5));
        a.groups[0].last_failover = Some(record("a", "2023-11-14T20:00:00Z"));
        b.groups[0].last_failover = Some(record("b", "2023-11-14T21:00:00Z"));
        let status = status_of(&plan("controller"), Some((&a, NOW)), Some((&b, NOW)));
        assert_eq!(status.last_failover.map(|f| f.to), Some("b".into()));
    }
}
