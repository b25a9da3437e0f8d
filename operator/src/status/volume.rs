//! A ReplicatedVolume's status from what its two nodes report: each node's disk state,
//! role and connection, the one-word sync state, and the Synced, SplitBrain, InUse and
//! Valid conditions.
//!
//! Pure, like the group's: the same reports and time give the same status.

use hapair_crds::condition::{ConditionStatus, set_condition, types};
use hapair_crds::nodeapi::VolumeReport;
use hapair_crds::volume::{ConnectionState, DiskState, VolumeNodeStatus, VolumeRole};
use hapair_crds::{ReplicatedVolumeStatus, condition::Condition};

use crate::support::timestamp::{UnixMillis, format_millis};

/// One word (or two) for a volume's replication state across both nodes:
/// `SplitBrain`, `Syncing N%`, `Disconnected`, `UpToDate`, `OutOfSync` or `Unknown`.
pub fn sync_state(per_node: &[(Option<&VolumeReport>, bool)]) -> String {
    let fresh: Vec<&VolumeReport> = per_node.iter().filter(|(_, f)| *f).filter_map(|(r, _)| *r).collect();
    if fresh.is_empty() {
        return "Unknown".into();
    }
    if fresh.iter().any(|r| r.connection == ConnectionState::SplitBrain) {
        return "SplitBrain".into();
    }
    if let Some(percent) = fresh.iter().filter_map(|r| r.sync.as_ref().map(|s| s.percent())).min() {
        return format!("Syncing {percent}%");
    }
    if fresh.iter().any(|r| matches!(r.connection, ConnectionState::StandAlone | ConnectionState::Connecting)) {
        return "Disconnected".into();
    }
    let all_up = fresh.len() == per_node.len()
        && fresh.iter().all(|r| r.disk_state == DiskState::UpToDate && r.out_of_sync_bytes == 0);
    if all_up { "UpToDate".into() } else { "OutOfSync".into() }
}

/// A ReplicatedVolume's status from what its two nodes report. `per_node` holds, per node of
/// the volume, its latest report of the volume and whether that report is fresh.
pub fn volume_status(
    previous: &ReplicatedVolumeStatus,
    generation: Option<i64>,
    per_node: &[(&str, Option<&VolumeReport>, bool)],
    now: UnixMillis,
) -> ReplicatedVolumeStatus {
    let now_text = format_millis(now);
    let mut status = previous.clone();
    status.nodes = per_node
        .iter()
        .filter_map(|(node, report, _)| {
            report.map(|r| VolumeNodeStatus {
                node: node.to_string(),
                disk_state: r.disk_state,
                role: Some(r.role),
                connection: r.connection,
                out_of_sync_bytes: r.out_of_sync_bytes,
                sync: r.sync.clone(),
                // An agent forgets its last verify when it restarts; the status does not.
                last_verify: r
                    .last_verify
                    .clone()
                    .or_else(|| previous.nodes.iter().find(|n| n.node == *node).and_then(|n| n.last_verify.clone())),
                storage: r.storage.clone(),
            })
        })
        .collect();
    let pairs: Vec<(Option<&VolumeReport>, bool)> = per_node.iter().map(|(_, r, f)| (*r, *f)).collect();
    let state = sync_state(&pairs);
    status.sync_state = Some(state.clone());
    status.observed_generation = generation;
    let condition = |type_: &str, s: ConditionStatus, reason: &str, message: String| Condition {
        type_: type_.to_string(),
        status: s,
        reason: reason.to_string(),
        message,
        last_transition_time: now_text.clone(),
        observed_generation: generation,
    };
    let synced = match state.as_str() {
        "UpToDate" => {
            condition(types::SYNCED, ConditionStatus::True, "UpToDate", "both replicas are up to date".into())
        }
        "Unknown" => {
            condition(types::SYNCED, ConditionStatus::Unknown, "NoReports", "no current report from either node".into())
        }
        other => condition(
            types::SYNCED,
            ConditionStatus::False,
            other.split(' ').next().unwrap_or(other),
            other.to_string(),
        ),
    };
    set_condition(&mut status.conditions, synced);
    let split = state == "SplitBrain";
    set_condition(
        &mut status.conditions,
        if split {
            condition(
                types::SPLIT_BRAIN,
                ConditionStatus::True,
                "DataDiverged",
                "generation identifiers diverged; resolve with resolve-split-brain".into(),
            )
        } else {
            condition(types::SPLIT_BRAIN, ConditionStatus::False, "NoSplitBrain", "replicas share history".into())
        },
    );
    let primary: Vec<&str> = per_node
        .iter()
        .filter(|(_, r, fresh)| *fresh && r.is_some_and(|r| r.role == VolumeRole::Primary))
        .map(|(n, _, _)| *n)
        .collect();
    set_condition(
        &mut status.conditions,
        if primary.is_empty() {
            condition(
                types::IN_USE,
                ConditionStatus::False,
                "NoPrimary",
                "no node has the volume open for writing".into(),
            )
        } else {
            condition(types::IN_USE, ConditionStatus::True, "Primary", format!("primary on {}", primary.join(", ")))
        },
    );
    status
}

/// Sets a ReplicatedVolume's `Valid` condition: refused with `error` (which names the
/// field), or accepted. `generation` is the spec the verdict is about.
pub fn set_volume_validity(
    status: &mut ReplicatedVolumeStatus,
    error: Option<&str>,
    generation: Option<i64>,
    now: UnixMillis,
) {
    let (state, reason, message) = match error {
        Some(error) => (ConditionStatus::False, "InvalidSpec", error.to_string()),
        None => (ConditionStatus::True, "Valid", "spec accepted".to_string()),
    };
    if generation.is_some() {
        status.observed_generation = generation;
    }
    set_condition(
        &mut status.conditions,
        Condition {
            type_: types::VALID.to_string(),
            status: state,
            reason: reason.to_string(),
            message,
            last_transition_time: format_millis(now),
            observed_generation: status.observed_generation,
        },
    );
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use hapair_crds::condition::find;

    const NOW: UnixMillis = 1_700_000_100_000;

    pub(in crate::status) fn volume(state: DiskState, connection: ConnectionState, role: VolumeRole) -> VolumeReport {
        VolumeReport {
            name: "data".into(),
            disk_state: state,
            role,
            connection,
            out_of_sync_bytes: 0,
            sync: None,
            peer_disk_state: None,
            last_verify: None,
            storage: None,
        }
    }

    #[test]
    fn volume_status_summarizes_both_replicas() {
        let up = volume(DiskState::UpToDate, ConnectionState::Connected, VolumeRole::Primary);
        let down = volume(DiskState::UpToDate, ConnectionState::StandAlone, VolumeRole::Secondary);
        let s = volume_status(
            &ReplicatedVolumeStatus::default(),
            Some(2),
            &[("a", Some(&up), true), ("b", Some(&down), true)],
            NOW,
        );
        assert_eq!(s.sync_state.as_deref(), Some("Disconnected"));
        assert_eq!(s.nodes.len(), 2);
        let in_use = find(&s.conditions, types::IN_USE).map(|c| (c.status, c.message.clone()));
        assert_eq!(in_use, Some((ConditionStatus::True, "primary on a".into())));
        let secondary = volume(DiskState::UpToDate, ConnectionState::Connected, VolumeRole::Secondary);
        let s = volume_status(&s, Some(2), &[("a", Some(&up), true), ("b", Some(&secondary), true)], NOW);
        assert_eq!(s.sync_state.as_deref(), Some("UpToDate"));
        assert_eq!(find(&s.conditions, types::SYNCED).map(|c| c.status), Some(ConditionStatus::True));
        let s = volume_status(&s, Some(2), &[("a", Some(&up), false), ("b", None, false)], NOW);
        assert_eq!(s.sync_state.as_deref(), Some("Unknown"));
    }

    #[test]
    fn the_last_verify_outlives_an_agent_restart_until_a_newer_one() {
        let report = |finished: &str| hapair_crds::volume::VerifyReport {
            finished: finished.into(),
            duration_seconds: 3,
            checked_bytes: 64 << 20,
            mismatched_bytes: 4096,
            mismatched_ranges: vec!["8192+4096".into()],
        };
        let verified = VolumeReport {
            last_verify: Some(report("2026-12-07T10:00:00Z")),
            ..volume(DiskState::UpToDate, ConnectionState::Connected, VolumeRole::Primary)
        };
        let b = volume(DiskState::UpToDate, ConnectionState::Connected, VolumeRole::Secondary);
        let first = volume_status(&ReplicatedVolumeStatus::default(), None, &[("a", Some(&verified), true)], NOW);
        let last = |s: &ReplicatedVolumeStatus| s.nodes[0].last_verify.as_ref().map(|v| v.finished.clone());
        assert_eq!(last(&first).as_deref(), Some("2026-12-07T10:00:00Z"));
        // a restarted: its report has no verify, the status keeps the one it had.
        let restarted = volume(DiskState::UpToDate, ConnectionState::Connected, VolumeRole::Primary);
        let kept = volume_status(&first, None, &[("a", Some(&restarted), true), ("b", Some(&b), true)], NOW);
        assert_eq!(last(&kept).as_deref(), Some("2026-12-07T10:00:00Z"));
        assert_eq!(kept.nodes[1].last_verify, None);
        let newer = VolumeReport { last_verify: Some(report("2026-12-08T10:00:00Z")), ..restarted };
        let replaced = volume_status(&kept, None, &[("a", Some(&newer), true)], NOW);
        assert_eq!(last(&replaced).as_deref(), Some("2026-12-08T10:00:00Z"));
    }
}
