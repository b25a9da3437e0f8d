//! Becoming primary: when a standing-by node becomes a candidate, what lets it act, and
//! when it gives up.
//!
//! A candidate (role Promoting, not yet acting) has stopped granting the peer leases. It
//! starts acting — takes a new epoch and brings the flow up — through exactly one of:
//!
//! 1. **peer consent**: it holds a peer lease (the peer, standing by, acknowledged one of
//!    its Promoting heartbeats) with more than the fence margin left;
//! 2. **witness**: it holds a witness lease with more than the fence margin left, and the
//!    peer has been silent on every link for `deadAfter` (not required when forced);
//! 3. **no witness** (mode `none`): the peer has been silent for `deadAfter`;
//!
//! and, in every case, every lease it granted the peer is over: `L·(1+δ)` has passed on
//! its clock since it received the last heartbeat it acknowledged (see `lease`), or the
//! peer's newest heartbeat says it stands by holding nothing. Paths 1 and 2 make two
//! acting nodes impossible: a peer lease exists only while the peer keeps its promise
//! not to act, and the witness grants one holder at a time, re-granting only after the
//! previous holder's lease has run out on the witness's clock.
//!
//! Why a node becomes a candidate, in order of precedence: the peer hands the service
//! over to it; an admin action asks it to take over; the peer has been silent for
//! `deadAfter` (automatic failover); both nodes stand by and this one is designated
//! (bootstrap). Automatic candidacies need UpToDate data, no failed failover monitor, and
//! no maintenance; forced ones (force-active, split-brain winner) skip those checks but
//! not the lease rules.

use hapair_crds::hagroup::NodeHealth;
use hapair_crds::nodeapi::{ActionOutcome, EventType};
use hapair_crds::volume::DiskState;

use super::command::Reason;
use super::heartbeat::Heartbeat;
use super::role::Role;
use super::time::Instant;
use super::timeline::{Timeline, phase};
use super::{Engine, mutation};

/// Why a node wants to become primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CandidacyKind {
    /// The peer was silent on every link for `deadAfter`.
    PeerLost,
    /// Both nodes stand by; this one is designated.
    Bootstrap,
    /// The peer demoted itself and offered the service to this node.
    Handover,
    /// Admin switchover to this node.
    Switchover,
    /// Admin force-active of this node.
    ForceActive,
    /// Admin resolve-split-brain naming this node the winner.
    SplitBrainWinner,
    /// Automatic failback to this (preferred) node.
    Failback,
}

/// What the current promotion is for, to report when the flow is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotion {
    pub kind: CandidacyKind,
    /// Promote volumes even when not UpToDate (force-active, split-brain winner).
    pub forced: bool,
    pub action: Option<String>,
    pub since: Instant,
    pub timeline: Timeline,
}

impl CandidacyKind {
    pub fn describe(&self) -> &'static str {
        match self {
            CandidacyKind::PeerLost => "peer silent on every link",
            CandidacyKind::Bootstrap => "both nodes standing by, this one designated",
            CandidacyKind::Handover => "peer handed the service over",
            CandidacyKind::Switchover => "switchover requested",
            CandidacyKind::ForceActive => "force-active requested",
            CandidacyKind::SplitBrainWinner => "split-brain winner",
            CandidacyKind::Failback => "failback to the preferred node",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidacy {
    pub kind: CandidacyKind,
    /// The epoch this candidate proposes for its term (its floor).
    pub proposal: u64,
    pub action: Option<String>,
    /// Skips health, sync and peer-silence checks (never the lease rules).
    pub forced: bool,
    pub since: Instant,
    /// Gives up at this instant.
    pub deadline: Option<Instant>,
    /// Asks the witness for a lease.
    pub uses_witness: bool,
    pub denied_noted: bool,
    /// The witness was found unreachable during this candidacy (noted once).
    pub unreachable_noted: bool,
    pub timeline: Timeline,
}

impl Engine {
    /// Standby and Fenced: finish bringing the flow down, then look for a reason to
    /// become a candidate.
    pub(super) fn step_idle(&mut self, now: Instant) {
        if self.stopping || self.acting || !self.flow.is_idle() {
            if self.flow.drive_down(false, &mut self.out) {
                self.finished_down(now);
            }
            return;
        }
        if !self.flow.is_clean_idle() {
            // A stop failed: nothing more is tried here; the watchdog resets the machine.
            return;
        }
        if let Some(plan) = self.pending_plan.take() {
            self.flow.replace_plan(plan);
        }
        if self.cfg.deleting {
            if !self.cleaned_up {
                self.cleaned_up = true;
                self.set_role(Role::Standby, "group deleted: everything stopped");
                self.notice(
                    EventType::Normal,
                    Reason::CleanedUp,
                    "group is being deleted: flow stopped, virtual IPs removed, volumes demoted",
                );
            }
            return;
        }
        if self.role == Role::Fenced && self.peer.reachable(now, self.cfg.timing.dead_after) {
            self.set_role(Role::Standby, "peer heard again");
        }
        self.maybe_start_candidacy(now);
    }

    fn peer_silent(&self, now: Instant) -> bool {
        let since = self.peer.last_heard().unwrap_or(self.started_at);
        now.since(since) >= self.cfg.timing.dead_after
    }

    /// The peer's newest heartbeat says it stands by and holds nothing: every lease this
    /// node granted it is void.
    pub(super) fn peer_released(&self) -> bool {
        self.peer
            .latest()
            .is_some_and(|v| matches!(v.heartbeat.role, Role::Standby | Role::Fenced) && !v.heartbeat.holding)
    }

    fn peer_idle(hb: &Heartbeat) -> bool {
        matches!(hb.role, Role::Standby | Role::Fenced) && !hb.holding
    }

    fn designated_over(&self, hb: &Heartbeat) -> bool {
        let peer_eligible = hb.disk == DiskState::UpToDate && hb.health != NodeHealth::Failed && !hb.maintenance;
        !peer_eligible || self.cfg.outranks(&self.cfg.me, &self.cfg.peer)
    }

    fn maybe_start_candidacy(&mut self, now: Instant) {
        let t = self.cfg.timing.clone();
        let fresh = self.peer.fresh(now, t.dead_after).cloned();
        if let Some(hb) = &fresh
            && let Some(h) = &hb.handover
            && h.to == self.cfg.me
            && Self::peer_idle(hb)
        {
            if h.force || self.disk() == DiskState::UpToDate {
                let kind = if h.force { CandidacyKind::ForceActive } else { CandidacyKind::Handover };
                let deadline = Some(now + t.handover_timeout);
                self.start_candidacy(now, kind, h.action.clone(), h.force, deadline);
            } else {
                self.role_reason = format!(
                    "peer offers the service; waiting for local data to be UpToDate (now {})",
                    self.disk().as_str()
                );
            }
            return;
        }
        if let Some(ask) = self.takeover.clone() {
            if ask.force {
                self.start_candidacy(now, ask.kind, ask.action, true, Some(ask.until));
                return;
            }
            if let Some(hb) = &fresh
                && Self::peer_idle(hb)
                && self.disk() == DiskState::UpToDate
            {
                self.start_candidacy(now, ask.kind, ask.action, false, Some(ask.until));
                return;
            }
        }
        if self.maintenance() {
            self.role_reason = "maintenance: automatic actions are frozen".into();
            return;
        }
        if !self.eligible_auto() {
            self.role_reason = match self.promotion_refused_until {
                Some(until) if now < until => format!("a volume refused promotion; not trying again before {until}"),
                _ => format!("not eligible to promote: disk {}, health {:?}", self.disk().as_str(), self.health()),
            };
            return;
        }
        if self.peer_silent(now) {
            self.start_candidacy(now, CandidacyKind::PeerLost, None, false, None);
            return;
        }
        if let (Some(hb), Some(since)) = (&fresh, self.both_idle_since)
            && hb.takeover.is_none()
            && hb.handover.is_none()
            && self.handover.is_none()
            && self.designated_over(hb)
            && now >= since + t.bootstrap_settle
        {
            self.start_candidacy(now, CandidacyKind::Bootstrap, None, false, None);
        }
    }

    pub(super) fn start_candidacy(
        &mut self,
        now: Instant,
        kind: CandidacyKind,
        action: Option<String>,
        forced: bool,
        deadline: Option<Instant>,
    ) {
        let uses_witness = self.controller_witness() && (forced || kind == CandidacyKind::PeerLost);
        let timeline = self.candidacy_timeline(now, kind);
        let proposal = self.next_proposal();
        self.floor = proposal;
        self.candidacy = Some(Candidacy {
            kind,
            proposal,
            action,
            forced,
            since: now,
            deadline,
            uses_witness,
            denied_noted: false,
            unreachable_noted: false,
            timeline,
        });
        self.lease.void();
        self.set_role(Role::Promoting, format!("candidate: {}", kind.describe()));
        let type_ = if kind == CandidacyKind::PeerLost { EventType::Warning } else { EventType::Normal };
        self.notice(type_, Reason::Promoting, format!("becoming primary: {}", kind.describe()));
    }

    /// A new candidacy's timeline. A failover's starts at the last heartbeat heard from the
    /// peer, with each link's silence marked where `deadAfter` ran out on it; any other
    /// promotion starts at the decision.
    fn candidacy_timeline(&self, now: Instant, kind: CandidacyKind) -> Timeline {
        if kind != CandidacyKind::PeerLost {
            let mut timeline = Timeline::new(now);
            timeline.mark(phase::DECIDED, now);
            return timeline;
        }
        let mut timeline = Timeline::new(self.peer.last_heard().unwrap_or(self.started_at).min(now));
        for link in 0..self.peer.link_count() {
            if let Some(heard) = self.peer.link_heard(link) {
                timeline.mark(phase::link_silent(link), (heard + self.cfg.timing.dead_after).min(now));
            }
        }
        timeline.mark(phase::SILENCE_DETECTED, now);
        timeline
    }

    /// An epoch above everything this node and (as far as it knows) its peer have
    /// proposed, granted or acted in.
    fn next_proposal(&self) -> u64 {
        let peer_floor = self.peer.latest().map_or(0, |v| v.heartbeat.floor.max(v.heartbeat.epoch));
        self.floor.max(self.epoch).max(peer_floor) + 1
    }

    fn abort_reason(&self, now: Instant, c: &Candidacy) -> Option<String> {
        if c.deadline.is_some_and(|d| now >= d) {
            return Some("timed out".into());
        }
        if self.cfg.deleting {
            return Some("group is being deleted".into());
        }
        if c.forced {
            return None;
        }
        if matches!(c.kind, CandidacyKind::PeerLost | CandidacyKind::Bootstrap) {
            if self.maintenance() {
                return Some("maintenance turned on".into());
            }
            if !self.eligible_auto() {
                return Some(format!("no longer eligible: disk {}, health {:?}", self.disk().as_str(), self.health()));
            }
        }
        // A switchover is zero data loss: never without UpToDate data.
        if self.disk() != DiskState::UpToDate {
            return Some(format!("local data is {}, not UpToDate", self.disk().as_str()));
        }
        let fresh = self.peer.fresh(now, self.cfg.timing.dead_after);
        if let Some(hb) = fresh {
            if hb.holding {
                return Some("peer is serving".into());
            }
            let peer_forced = hb.takeover.as_ref().is_some_and(|t| t.force);
            if hb.role == Role::Promoting && (peer_forced || self.cfg.outranks(&self.cfg.peer, &self.cfg.me)) {
                return Some("peer is promoting and takes precedence".into());
            }
        } else if c.kind == CandidacyKind::Bootstrap {
            return Some("peer went silent".into());
        }
        None
    }

    /// Role Promoting: acquire a lease and start acting, or bring the flow up once acting.
    pub(super) fn step_promoting(&mut self, now: Instant) {
        if self.acting {
            self.step_acting_up(now);
            return;
        }
        let Some(c) = self.candidacy.clone() else {
            self.set_role(Role::Standby, "standing by");
            return;
        };
        if let Some(why) = self.abort_reason(now, &c) {
            self.abort_candidacy(now, &why);
            return;
        }
        if let Some(hb) = self.peer.latest().map(|v| &v.heartbeat) {
            // A peer that consented to this proposal has raised its floor to it; any other
            // peer floor at or above it means the epoch is promised elsewhere.
            let consented = hb.grant.is_some_and(|g| g.incarnation == self.incarnation && self.lease.has_sent(g.seq));
            if hb.floor > c.proposal || (hb.floor == c.proposal && !consented) {
                self.repropose();
                return;
            }
        }
        let t = self.cfg.timing.clone();
        let silent = self.peer_silent(now);
        let promise_kept =
            self.lease.promise_kept(now) || self.peer_released() || self.mutated(mutation::Mutation::IgnorePromise);
        if !promise_kept {
            self.role_reason =
                format!("waiting until the lease granted to the peer is over ({})", self.lease.promise_until());
            return;
        }
        if let Some(c) = &mut self.candidacy {
            // Over by the clock, or (sooner) by the peer's word that it holds nothing.
            c.timeline.mark(phase::OLD_LEASE_ENDED, self.lease.promise_until().min(now));
        }
        if self.lease.peer_left(now) > t.fence_margin {
            self.start_acting(now, c.proposal, "peer consent");
            return;
        }
        if self.controller_witness() {
            if (c.forced || silent) && self.lease.witness_left(now) > t.fence_margin {
                match self.lease.witness_epoch() {
                    Some(epoch) if epoch > self.epoch => self.start_acting(now, epoch, "witness grant"),
                    // Granted in an epoch this node has since seen used: ask again, higher.
                    _ => {
                        self.release_witness(now);
                        self.repropose();
                    }
                }
                return;
            }
            if silent && self.mutated(mutation::Mutation::PromoteWithoutWitness) {
                // The bug: behave as if the witness had granted, without asking it.
                self.lease.on_witness_grant(now, t.lease_ttl, c.proposal);
                self.start_acting(now, c.proposal, "mutation: witness grant assumed");
                return;
            }
            if c.uses_witness {
                if !self.role_reason.starts_with("waiting for witness") {
                    self.role_reason = "waiting for witness".into();
                }
            } else {
                self.role_reason = "waiting for the peer's consent".into();
            }
            return;
        }
        if silent {
            self.start_acting(now, c.proposal, "peer silent, no witness");
        } else {
            self.role_reason = "waiting for the peer's consent".into();
        }
    }

    pub(super) fn abort_candidacy(&mut self, now: Instant, why: &str) {
        let c = self.candidacy.take();
        self.release_witness_if_held(now);
        self.lease.void();
        self.set_role(Role::Standby, format!("candidacy abandoned: {why}"));
        self.notice(EventType::Normal, Reason::Candidacy, format!("no longer becoming primary: {why}"));
        if let Some(c) = c
            && c.action.is_some()
        {
            if self.takeover.as_ref().is_some_and(|t| t.action == c.action) {
                self.takeover = None;
            }
            self.action_result(c.action, ActionOutcome::Failed, format!("not promoted: {why}"));
        }
    }

    /// Proposes an epoch above everything known, and lets no grant for the old proposal
    /// count.
    fn repropose(&mut self) {
        let proposal = self.next_proposal();
        self.floor = proposal;
        self.lease.void();
        if let Some(c) = &mut self.candidacy {
            c.proposal = proposal;
        }
        self.heartbeat_now = true;
    }

    /// Takes epoch `epoch` and starts acting: from here on this node may hold resources.
    fn start_acting(&mut self, now: Instant, epoch: u64, via: &str) {
        if epoch <= self.epoch {
            self.repropose();
            return;
        }
        let Some(mut c) = self.candidacy.take() else { return };
        c.timeline.mark(phase::ACTING, now);
        self.epoch = epoch;
        self.floor = self.floor.max(epoch);
        self.acting = true;
        self.lease_abandoned = false;
        self.handover = None;
        self.failover_wanted = None;
        self.failover_blocked_noted = false;
        self.promotion =
            Some(Promotion { kind: c.kind, forced: c.forced, action: c.action, since: c.since, timeline: c.timeline });
        self.set_role(Role::Promoting, format!("acting in epoch {} ({via}); starting the flow", self.epoch));
        // The peer learns the new term at once.
        self.heartbeat_now = true;
        self.notice(EventType::Normal, Reason::Acting, format!("acting as primary in epoch {} ({via})", self.epoch));
        self.feed_watchdog();
    }
}
