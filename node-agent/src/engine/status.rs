//! A snapshot of the engine for reports and metrics.

use std::time::Duration;

use hapair_crds::hagroup::{NodeHealth, NodeRole};
use hapair_crds::nodeapi::{ActionResult, MonitorReport, StepReport};

use super::Engine;
use super::role::{Role, report_role};
use super::time::Instant;
use super::timeline::PhaseTime;

/// The last change of serving node this engine took part in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverSummary {
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    pub epoch: u64,
    /// From the decision to promote until the flow was up.
    pub took: Duration,
    /// When each phase ended, from the timeline's start (for a failover, the last
    /// heartbeat heard from the old primary).
    pub phases: Vec<PhaseTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSnapshot {
    pub index: usize,
    /// Heard within `deadAfter`.
    pub up: bool,
    pub last_heard: Option<Instant>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    pub role: Role,
    /// The role for reports (`Maintenance` while frozen).
    pub report_role: NodeRole,
    pub epoch: u64,
    /// Why the node is in its role.
    pub role_reason: String,
    pub health: NodeHealth,
    pub maintenance: bool,
    /// May hold resources (VIP, flow, primary volume).
    pub holding: bool,
    /// Everything is up here: this is the active node.
    pub serving: bool,
    pub peer_reachable: bool,
    pub last_peer_heartbeat: Option<Instant>,
    pub links: Vec<LinkSnapshot>,
    pub peer_lease_until: Option<Instant>,
    pub witness_lease_until: Option<Instant>,
    pub watchdog: Option<Instant>,
    pub steps: Vec<StepReport>,
    pub monitors: Vec<MonitorReport>,
    pub actions: Vec<ActionResult>,
    pub last_failover: Option<FailoverSummary>,
    /// The group is being deleted and everything is stopped here.
    pub cleaned_up: bool,
}

impl Engine {
    pub fn status(&self, now: Instant) -> Status {
        let dead_after = self.cfg.timing.dead_after;
        Status {
            role: self.role,
            report_role: report_role(self.role, self.maintenance()),
            epoch: self.epoch,
            role_reason: self.role_reason.clone(),
            health: self.health(),
            maintenance: self.maintenance(),
            holding: self.holding(),
            serving: self.role == Role::Primary && self.flow.is_up(),
            peer_reachable: self.peer.reachable(now, dead_after),
            last_peer_heartbeat: self.peer.last_heard(),
            links: (0..self.peer.link_count())
                .map(|index| {
                    let last_heard = self.peer.link_heard(index);
                    LinkSnapshot { index, up: last_heard.is_some_and(|t| now.since(t) < dead_after), last_heard }
                })
                .collect(),
            peer_lease_until: self.lease.peer_expiry(),
            witness_lease_until: self.lease.witness_expiry(),
            watchdog: self.watchdog,
            steps: self.flow.reports(),
            monitors: self.monitors.reports(),
            actions: self.results.iter().cloned().collect(),
            last_failover: self.last_failover.clone(),
            cleaned_up: self.cleaned_up,
        }
    }
}
