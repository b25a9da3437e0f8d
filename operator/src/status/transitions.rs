//! Which changes between a status and the next deserve an event: the active node moving,
//! the phase changing, a resync starting, finishing or stopping short.
//!
//! Pure: two statuses and the time in, the events (with their reasons) out. The controller
//! records them in the group's event ring and the store; a status written again unchanged
//! produces none.

use hapair_crds::condition::ConditionStatus;
use hapair_crds::hagroup::GroupPhase;
use hapair_crds::nodeapi::{EventType, GroupKey};
use hapair_crds::{HaGroupStatus, ReplicatedVolumeStatus};
use tracing::info;

use super::events::GroupEvent;
use crate::support::timestamp::{UnixMillis, format_millis};

/// The events a group's status change deserves: `ActiveNodeChanged` when another node took
/// the service, `PhaseChanged` (or `SplitBrain`) when the phase moved. Entering Invalid has
/// its own `InvalidManifest` event, with the reason, and a new group starting Pending is
/// not news.
pub fn group_events(
    key: &GroupKey,
    previous: &HaGroupStatus,
    status: &HaGroupStatus,
    now: UnixMillis,
) -> Vec<GroupEvent> {
    let mut events = Vec::new();
    if let (Some(from), Some(to)) = (&previous.active_node, &status.active_node)
        && from != to
    {
        let why = status.last_failover.as_ref().map(|f| format!(" ({})", f.reason)).unwrap_or_default();
        info!(group = %key, epoch = status.epoch, "active node {from} -> {to}{why}");
        events.push(GroupEvent::controller(
            format_millis(now),
            EventType::Normal,
            "ActiveNodeChanged",
            format!("{from} -> {to} in epoch {}{why}", status.epoch),
        ));
    }
    if let Some(phase) = status.phase
        && (previous.phase.is_some_and(|p| p != phase) || previous.phase.is_none() && phase != GroupPhase::Pending)
        && phase != GroupPhase::Invalid
    {
        let from = previous.phase.map(|p| p.as_str()).unwrap_or("none");
        let why = phase_reason(status);
        let type_ = if matches!(phase, GroupPhase::Healthy | GroupPhase::Maintenance) {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let reason = if phase == GroupPhase::SplitBrain { "SplitBrain" } else { "PhaseChanged" };
        info!(group = %key, epoch = status.epoch, active = status.active_node.as_deref().unwrap_or(""), "phase {from} -> {}", phase.as_str());
        events.push(GroupEvent::controller(
            format_millis(now),
            type_,
            reason,
            format!("{from} -> {}{why}", phase.as_str()),
        ));
    }
    events
}

/// The event a volume's status change deserves, if any, in its group's history.
pub fn volume_event(
    key: &GroupKey,
    volume: &str,
    previous: &ReplicatedVolumeStatus,
    status: &ReplicatedVolumeStatus,
    now: UnixMillis,
) -> Option<GroupEvent> {
    let (type_, reason, message) = resync_transition(previous.sync_state.as_deref(), status.sync_state.as_deref())?;
    info!(group = %key, volume, "{reason}: {message}");
    Some(GroupEvent::controller(format_millis(now), type_, reason, format!("volume {volume}: {message}")))
}

/// The event a volume's sync state change deserves, if any: a resync starting, finishing,
/// or stopping before it finished.
fn resync_transition(from: Option<&str>, to: Option<&str>) -> Option<(EventType, &'static str, String)> {
    let syncing = |s: Option<&str>| s.is_some_and(|s| s.starts_with("Syncing"));
    let (from_text, to_text) = (from.unwrap_or("Unknown"), to.unwrap_or("Unknown"));
    match (syncing(from), syncing(to)) {
        (false, true) => Some((EventType::Normal, "ResyncStarted", format!("resync started ({to_text})"))),
        (true, false) if to == Some("UpToDate") => {
            Some((EventType::Normal, "ResyncFinished", "resync finished; both replicas are up to date".into()))
        }
        (true, false) => {
            Some((EventType::Warning, "ResyncInterrupted", format!("resync stopped at {from_text}: now {to_text}")))
        }
        _ => None,
    }
}

/// Why the phase is what it is, from the first condition that is not as it should be.
fn phase_reason(status: &HaGroupStatus) -> String {
    let interesting = ["Degraded", "Ready", "Valid", "SplitBrain"];
    status
        .conditions
        .iter()
        .filter(|c| interesting.contains(&c.type_.as_str()))
        .find(|c| {
            (c.type_ == "Ready" || c.type_ == "Valid") && c.status != ConditionStatus::True
                || (c.type_ == "Degraded" || c.type_ == "SplitBrain") && c.status == ConditionStatus::True
        })
        .map(|c| format!(" ({})", c.message))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::condition::Condition;
    use hapair_crds::hagroup::FailoverRecord;

    const NOW: UnixMillis = 1_700_000_100_000;

    fn key() -> GroupKey {
        GroupKey::new("default", "g")
    }

    fn group(phase: Option<GroupPhase>, active: Option<&str>) -> HaGroupStatus {
        HaGroupStatus { phase, active_node: active.map(str::to_string), epoch: 3, ..HaGroupStatus::default() }
    }

    fn said(events: &[GroupEvent]) -> Vec<(EventType, String, String)> {
        events.iter().map(|e| (e.event.type_, e.event.reason.clone(), e.event.message.clone())).collect()
    }

    #[test]
    fn resync_events_mark_start_finish_and_interruption() {
        let t = |from: Option<&str>, to: Option<&str>| resync_transition(from, to);
        assert_eq!(
            t(Some("Disconnected"), Some("Syncing 3%")),
            Some((EventType::Normal, "ResyncStarted", "resync started (Syncing 3%)".into()))
        );
        assert_eq!(t(Some("Syncing 3%"), Some("Syncing 40%")), None);
        assert_eq!(
            t(Some("Syncing 99%"), Some("UpToDate")),
            Some((EventType::Normal, "ResyncFinished", "resync finished; both replicas are up to date".into()))
        );
        assert_eq!(
            t(Some("Syncing 40%"), Some("Disconnected")),
            Some((EventType::Warning, "ResyncInterrupted", "resync stopped at Syncing 40%: now Disconnected".into()))
        );
        assert_eq!(t(None, Some("UpToDate")), None);
    }

    #[test]
    fn a_volume_event_names_the_volume() {
        let from = ReplicatedVolumeStatus { sync_state: Some("Syncing 40%".into()), ..Default::default() };
        let to = ReplicatedVolumeStatus { sync_state: Some("UpToDate".into()), ..Default::default() };
        let event = volume_event(&key(), "data", &from, &to, NOW).map(|e| (e.event.reason, e.event.message));
        assert_eq!(
            event,
            Some(("ResyncFinished".into(), "volume data: resync finished; both replicas are up to date".into()))
        );
        assert!(volume_event(&key(), "data", &to, &to, NOW).is_none());
    }

    #[test]
    fn a_failover_says_who_took_over_and_why() {
        let from = group(Some(GroupPhase::Healthy), Some("a"));
        let mut to = group(Some(GroupPhase::Degraded), Some("b"));
        to.last_failover = Some(FailoverRecord {
            time: "2023-11-14T22:15:00Z".into(),
            from: Some("a".into()),
            to: "b".into(),
            reason: "peer lost".into(),
            duration_ms: 900,
            phases: vec![],
        });
        to.conditions.push(Condition {
            type_: "Degraded".into(),
            status: ConditionStatus::True,
            reason: "StandbyMissing".into(),
            message: "node a is not reporting".into(),
            last_transition_time: String::new(),
            observed_generation: None,
        });
        assert_eq!(
            said(&group_events(&key(), &from, &to, NOW)),
            vec![
                (EventType::Normal, "ActiveNodeChanged".into(), "a -> b in epoch 3 (peer lost)".into()),
                (EventType::Warning, "PhaseChanged".into(), "Healthy -> Degraded (node a is not reporting)".into()),
            ]
        );
    }

    #[test]
    fn a_new_pending_group_an_unchanged_one_and_entering_invalid_are_not_news() {
        let none = HaGroupStatus::default();
        let pending = group(Some(GroupPhase::Pending), None);
        assert!(group_events(&key(), &none, &pending, NOW).is_empty());
        let healthy = group(Some(GroupPhase::Healthy), Some("a"));
        assert!(group_events(&key(), &healthy, &healthy, NOW).is_empty());
        assert!(group_events(&key(), &healthy, &group(Some(GroupPhase::Invalid), Some("a")), NOW).is_empty());
        let split = group(Some(GroupPhase::SplitBrain), Some("a"));
        assert_eq!(
            said(&group_events(&key(), &healthy, &split, NOW)),
            vec![(EventType::Warning, "SplitBrain".into(), "Healthy -> SplitBrain".into())]
        );
        // A group first seen already serving is news.
        assert_eq!(
            said(&group_events(&key(), &none, &healthy, NOW)),
            vec![(EventType::Normal, "PhaseChanged".into(), "none -> Healthy".into())]
        );
    }
}
