//! What the node says about itself: the board where group tasks publish their state and
//! events, the [`NodeReport`] posted to the controller, and the `/v1/status` snapshot.
//!
//! Reports go out every [`REPORT_EVERY`] and at once when a group changes role. Events
//! are kept per group with a sequence number; a report carries the events the controller
//! has not acknowledged yet (an accepted post acknowledges them), so an unreachable
//! controller misses none of the last [`EVENTS_KEPT`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use hapair_crds::nodeapi::{EventRecord, EventType, GroupKey, GroupReport, NodeReport, WipeReport};
use tokio::sync::Notify;

use super::host::HeartbeatAddress;
use crate::endpoints::StatusSnapshot;

/// How often a report is posted when nothing changes (the controller reads a node as
/// Unknown after 15 s without one).
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Events kept per group until the controller has them.
pub const EVENTS_KEPT: usize = 200;
/// Events shown per group on `/v1/status`.
pub const EVENTS_SHOWN: usize = 20;
/// Reports that carry a group's final state after its task ended (cleaned up) before it
/// is forgotten.
const FINAL_REPORTS: u32 = 3;

#[derive(Debug)]
struct GroupView {
    report: GroupReport,
    events: VecDeque<(u64, EventRecord)>,
    heartbeat: Vec<HeartbeatAddress>,
    /// The group's task has ended; the view is reported this many more times.
    final_reports: Option<u32>,
}

#[derive(Debug, Default)]
struct Inner {
    groups: BTreeMap<GroupKey, GroupView>,
    next_seq: u64,
    /// Sequence number of the newest event the controller acknowledged, per group.
    acked: BTreeMap<GroupKey, u64>,
}

/// Group states and events, shared by the group tasks and the reporter.
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Inner>,
    /// Woken when a report should go out at once (a role changed).
    pub urgent: Notify,
}

/// A group's report before its engine runs.
pub fn placeholder(key: &GroupKey) -> GroupReport {
    GroupReport {
        key: key.clone(),
        role: hapair_crds::hagroup::NodeRole::Standby,
        epoch: 0,
        health: hapair_crds::hagroup::NodeHealth::Unknown,
        role_reason: Some("starting".into()),
        peer_reachable: false,
        last_peer_heartbeat: None,
        heartbeat_links: vec![],
        steps: vec![],
        monitors: vec![],
        volumes: vec![],
        last_failover: None,
        actions: vec![],
        events: vec![],
        cleaned_up: false,
    }
}

impl Board {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces a group's state (its events stay).
    pub fn publish(&self, report: GroupReport, heartbeat: Vec<HeartbeatAddress>) {
        let mut inner = self.inner();
        let key = report.key.clone();
        let view = inner.groups.entry(key).or_insert_with(|| GroupView {
            report: placeholder(&report.key),
            events: VecDeque::new(),
            heartbeat: vec![],
            final_reports: None,
        });
        view.report = report;
        view.heartbeat = heartbeat;
        view.final_reports = None;
    }

    /// Records an event of one group.
    pub fn event(&self, key: &GroupKey, record: EventRecord) {
        let mut inner = self.inner();
        inner.next_seq += 1;
        let seq = inner.next_seq;
        let view = inner.groups.entry(key.clone()).or_insert_with(|| GroupView {
            report: placeholder(key),
            events: VecDeque::new(),
            heartbeat: vec![],
            final_reports: None,
        });
        if view.events.len() == EVENTS_KEPT {
            view.events.pop_front();
        }
        view.events.push_back((seq, record));
    }

    /// Records a node-level event (a refused bundle) with every group, since events are
    /// shown per group.
    pub fn event_all(&self, record: &EventRecord) {
        let keys: Vec<GroupKey> = self.inner().groups.keys().cloned().collect();
        for key in keys {
            self.event(&key, record.clone());
        }
    }

    /// The group's task ended: its last state is reported a few more times, then dropped.
    pub fn finished(&self, key: &GroupKey) {
        if let Some(view) = self.inner().groups.get_mut(key) {
            view.final_reports = Some(FINAL_REPORTS);
        }
    }

    /// Every group with the events after the acknowledged ones, and the newest sequence
    /// number included per group (to acknowledge once the report is accepted).
    pub fn for_report(&self) -> (Vec<GroupReport>, BTreeMap<GroupKey, u64>) {
        let inner = self.inner();
        let mut reports = Vec::new();
        let mut newest = BTreeMap::new();
        for (key, view) in &inner.groups {
            let acked = inner.acked.get(key).copied().unwrap_or(0);
            let mut report = view.report.clone();
            report.events = view.events.iter().filter(|(seq, _)| *seq > acked).map(|(_, e)| e.clone()).collect();
            if let Some((seq, _)) = view.events.back() {
                newest.insert(key.clone(), *seq);
            }
            reports.push(report);
        }
        (reports, newest)
    }

    /// The controller accepted a report carrying events up to `newest`; groups whose
    /// task ended count one final report down.
    pub fn delivered(&self, newest: &BTreeMap<GroupKey, u64>) {
        let mut inner = self.inner();
        for (key, seq) in newest {
            let acked = inner.acked.entry(key.clone()).or_insert(0);
            *acked = (*acked).max(*seq);
        }
        self.count_down(&mut inner);
    }

    fn count_down(&self, inner: &mut Inner) {
        let mut gone = Vec::new();
        for (key, view) in &mut inner.groups {
            if let Some(left) = &mut view.final_reports {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    gone.push(key.clone());
                }
            }
        }
        for key in gone {
            inner.groups.remove(&key);
            inner.acked.remove(&key);
        }
    }

    /// Without a controller, finished groups leave after a few status rounds.
    pub fn status_round(&self) {
        let mut inner = self.inner();
        self.count_down(&mut inner);
    }

    /// The groups as `/v1/status` shows them: with their latest events.
    pub fn for_status(&self) -> Vec<GroupReport> {
        let inner = self.inner();
        inner
            .groups
            .values()
            .map(|view| {
                let mut report = view.report.clone();
                let skip = view.events.len().saturating_sub(EVENTS_SHOWN);
                report.events = view.events.iter().skip(skip).map(|(_, e)| e.clone()).collect();
                report
            })
            .collect()
    }

    /// The heartbeat addresses of every group, to mark interfaces in the report.
    pub fn heartbeat_addresses(&self) -> Vec<HeartbeatAddress> {
        self.inner().groups.values().flat_map(|v| v.heartbeat.clone()).collect()
    }
}

/// An event record stamped now.
pub fn record(type_: EventType, reason: &str, message: impl Into<String>, epoch: u64) -> EventRecord {
    EventRecord { time: super::clock::rfc3339_now(), type_, reason: reason.to_string(), message: message.into(), epoch }
}

/// What the node itself is running, for reports and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    pub node: String,
    pub applied_revision: Option<u64>,
    pub config_error: Option<String>,
    /// The latest answer to each wipe of the bundle in force.
    pub wipes: Vec<WipeReport>,
    /// The node-API version the controller answered the last report in.
    pub controller_protocol_version: Option<u8>,
}

pub fn status_snapshot(state: &NodeState, board: &Board, agent_uptime: Duration) -> StatusSnapshot {
    StatusSnapshot {
        node: state.node.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: agent_uptime.as_secs(),
        config_revision: state.applied_revision,
        config_error: state.config_error.clone(),
        groups: board.for_status(),
        wipes: state.wipes.clone(),
        controller_protocol_version: state.controller_protocol_version,
    }
}

/// Assembles a report from the node's state, the machine and the board.
pub fn node_report(
    state: &NodeState,
    hardware: hapair_crds::hagroup::Hardware,
    links: Vec<hapair_crds::hagroup::LinkStatus>,
    groups: Vec<GroupReport>,
) -> NodeReport {
    NodeReport {
        node: state.node.clone(),
        applied_revision: state.applied_revision.unwrap_or(0),
        config_error: state.config_error.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        os: super::host::os(),
        uptime_seconds: super::host::uptime_seconds(),
        hardware,
        links,
        groups,
        wipes: state.wipes.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(key: &GroupKey) -> GroupReport {
        placeholder(key)
    }

    #[test]
    fn events_go_out_until_acknowledged() {
        let board = Board::default();
        let g = GroupKey::new("db", "pg");
        board.publish(report(&g), vec![]);
        board.event(&g, record(EventType::Normal, "Promoted", "serving", 2));
        board.event(&g, record(EventType::Warning, "PeerLost", "silent", 2));
        let (reports, newest) = board.for_report();
        assert_eq!(reports[0].events.len(), 2);
        // A failed post acknowledges nothing: the same events go out again.
        let (again, _) = board.for_report();
        assert_eq!(again[0].events.len(), 2);
        board.delivered(&newest);
        board.event(&g, record(EventType::Normal, "PeerFound", "back", 2));
        let (reports, _) = board.for_report();
        assert_eq!(reports[0].events.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), ["PeerFound"]);
        // The status page shows the recent ones whatever was acknowledged.
        assert_eq!(board.for_status()[0].events.len(), 3);
    }

    #[test]
    fn the_ring_is_bounded_and_finished_groups_leave() {
        let board = Board::default();
        let g = GroupKey::new("db", "pg");
        for i in 0..(EVENTS_KEPT + 5) {
            board.event(&g, record(EventType::Normal, "X", i.to_string(), 0));
        }
        let (reports, newest) = board.for_report();
        assert_eq!(reports[0].events.len(), EVENTS_KEPT);
        assert_eq!(reports[0].events[0].message, "5");
        assert_eq!(board.for_status()[0].events.len(), EVENTS_SHOWN);
        board.finished(&g);
        for _ in 0..FINAL_REPORTS {
            assert_eq!(board.for_report().0.len(), 1);
            board.delivered(&newest);
        }
        assert!(board.for_report().0.is_empty());
    }
}
