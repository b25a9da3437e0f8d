//! Serving and stopping: the lease check and self-fencing, the watchdog, the witness
//! upkeep of an acting node, the primary's duties (flow, restarts, wanted failovers,
//! takeover requests) and every way down (demotion, fencing, startup cleanup).
//!
//! # Self-fencing and the watchdog
//!
//! An acting node checks its lease before handling every event. Once less than
//! `fence_margin` (`L/4`) is left it fences itself: it stops renewing, forgets its send
//! times (no late acknowledgement can revive the lease) and brings the flow down, virtual
//! IPs first. From the moment it acts, the watchdog is armed at the lease's end and moved
//! only forward with the lease; fencing leaves it where it is and only a *clean* stop
//! disarms it. A process that stalls while serving (and so cannot remove its VIP) is
//! therefore reset by the watchdog before the peer can have waited out its promise.
//!
//! In witness mode `none` there is no lease to hold, so neither fencing nor watchdog apply.
//!
//! # Asking the witness early
//!
//! A primary whose acknowledgements stop (peer lease below `max(L/2, L−3I)`) renews the
//! witness lease at once, long before its lease runs out, and keeps it above `2L/3`. In
//! a partition where both nodes still reach the witness, the primary therefore holds the
//! witness lease long before the standby (which waits `deadAfter > L`) asks for it.

use std::collections::BTreeSet;

use hapair_crds::nodeapi::{ActionOutcome, EventType, LeaseOp};

use super::candidacy::CandidacyKind;
use super::command::{Command, Reason};
use super::flow::Progress;
use super::role::Role;
use super::status::FailoverSummary;
use super::time::Instant;
use super::timeline::{Settling, Timeline, phase};
use super::{Engine, mutation};

/// Why a failover is wanted; the wish ends when its cause recovers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailoverCause {
    /// A monitor with action failover (or restart, past its limit) fired.
    Monitor(String),
    /// A step failed past its restart limit.
    Step(usize),
    /// A volume failed.
    Volume,
}

/// A graceful demotion in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demotion {
    pub why: String,
    /// Offer the service to the peer once down: `(force, action)`.
    pub handover: Option<(bool, Option<String>)>,
    /// Discard the local data of every volume once down (split-brain loser).
    pub discard: bool,
    pub action: Option<String>,
}

/// The service offered to the peer after a demotion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoverOffer {
    pub action: Option<String>,
    pub force: bool,
    pub until: Instant,
    /// The epoch this node served in; the peer takes over in a later one.
    pub epoch: u64,
}

/// This node asks the peer to hand the service over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeoverAsk {
    pub kind: CandidacyKind,
    pub action: Option<String>,
    pub force: bool,
    pub until: Instant,
}

impl Engine {
    /// Fences this node if it acts without (enough) lease. Runs before every event.
    pub(super) fn check_lease(&mut self, now: Instant) {
        if !self.acting
            || self.lease_abandoned
            || !self.controller_witness()
            || self.mutated(mutation::Mutation::NoSelfFence)
        {
            return;
        }
        match self.lease.expiry() {
            Some(end) if now + self.cfg.timing.fence_margin < end => {}
            Some(end) if now < end => self.fence(&format!("lease ends at {end}, renewal failed")),
            _ => self.fence("lease expired"),
        }
    }

    fn fence(&mut self, why: &str) {
        self.lease_abandoned = true;
        self.stopping = true;
        // Given back once everything is down, so the peer need not wait for it to expire.
        self.release_after_stop = self.lease.witness_epoch().or(self.release_after_stop);
        self.lease.void();
        self.witness.forget();
        self.flow_restart = false;
        let actions: Vec<Option<String>> = [
            self.promotion.take().and_then(|p| p.action),
            self.demotion.take().and_then(|d| d.action),
            self.candidacy.take().and_then(|c| c.action),
        ]
        .into_iter()
        .collect();
        self.set_role(Role::Fenced, format!("self-fenced: {why}"));
        self.notice(
            EventType::Warning,
            Reason::SelfFenced,
            format!("{why}: demoting itself (virtual IPs first); watchdog stays armed at the lease's end"),
        );
        for action in actions {
            self.action_result(action, ActionOutcome::Failed, format!("self-fenced: {why}"));
        }
    }

    /// Moves the watchdog to the current lease end (only ever forward).
    pub(super) fn feed_watchdog(&mut self) {
        if !self.controller_witness() || self.lease_abandoned || self.mutated(mutation::Mutation::NoSelfFence) {
            return;
        }
        if let Some(end) = self.lease.expiry()
            && self.watchdog.is_none_or(|w| end > w)
        {
            self.watchdog = Some(end);
            self.out.push(Command::ArmWatchdog { deadline: end });
        }
    }

    /// Whether a witness grant would be used now.
    pub(super) fn wants_witness_lease(&self) -> bool {
        self.controller_witness()
            && ((self.acting && !self.lease_abandoned && self.role.wants_lease())
                || (!self.acting
                    && self.role == Role::Promoting
                    && self.candidacy.as_ref().is_some_and(|c| c.uses_witness)))
    }

    /// Sends the witness requests an acting node or a witness candidate needs.
    pub(super) fn witness_upkeep(&mut self, now: Instant) {
        if !self.controller_witness() {
            return;
        }
        self.witness.expire(now);
        let t = self.cfg.timing.clone();
        if self.witness.in_flight(now, t.witness_timeout).is_some() || now < self.witness.retry_at() {
            return;
        }
        if !self.wants_witness_lease() {
            return;
        }
        let (op, epoch) = if self.acting {
            if self.lease.peer_left(now) >= t.witness_below || self.lease.witness_left(now) >= t.witness_renew_below {
                return;
            }
            (LeaseOp::Renew, self.epoch)
        } else {
            let left = self.lease.witness_left(now);
            match self.lease.witness_epoch() {
                _ if left > t.witness_renew_below => return,
                Some(epoch) if !left.is_zero() => (LeaseOp::Renew, epoch),
                _ => (LeaseOp::Acquire, self.candidacy.as_ref().map_or(self.floor + 1, |c| c.proposal)),
            }
        };
        let (request_id, request) = self.witness.request(now, &self.cfg.group, &self.cfg.me, op, epoch, t.lease_ttl);
        self.out.push(Command::Witness { request_id, request });
        if let Some(c) = &mut self.candidacy {
            c.timeline.mark(phase::WITNESS_REQUESTED, now);
        }
    }

    /// Gives the witness lease back (the node no longer needs it and holds nothing under it).
    pub(super) fn release_witness(&mut self, now: Instant) {
        // Name the newest grant this node may hold, including one still on its way.
        let asked = self.witness.outstanding().iter().map(|o| o.epoch).max().unwrap_or(0);
        let epoch = self.lease.witness_epoch().unwrap_or(self.epoch).max(asked);
        self.release_witness_epoch(now, epoch);
    }

    /// Releases the witness grant of `epoch` (a release names the grant it frees).
    pub(super) fn release_witness_epoch(&mut self, now: Instant, epoch: u64) {
        self.witness.forget();
        self.lease.void_witness();
        let (request_id, request) = self.witness.request(
            now,
            &self.cfg.group,
            &self.cfg.me,
            LeaseOp::Release,
            epoch,
            self.cfg.timing.lease_ttl,
        );
        self.out.push(Command::Witness { request_id, request });
    }

    /// Releases the witness lease if it still runs here, or a request may still be granted.
    pub(super) fn release_witness_if_held(&mut self, now: Instant) {
        if self.controller_witness()
            && (!self.lease.witness_left(now).is_zero() || !self.witness.outstanding().is_empty())
        {
            self.release_witness(now);
        }
    }

    /// Promoting and acting: bring the flow up.
    pub(super) fn step_acting_up(&mut self, now: Instant) {
        let mut wake = None;
        let force = self.promotion.as_ref().is_some_and(|p| p.forced);
        let progress = self.flow.drive_up(now, self.epoch, force, &mut self.out, &mut |at| wake = Some(at));
        if let Some(at) = wake {
            self.wake_at(at);
        }
        match progress {
            Progress::Done => self.become_primary(now),
            Progress::Working => {}
            Progress::StepFailed(i) => self.handle_step_failure(now, i),
            Progress::VolumeFailed(volume) => {
                let why = format!("volume {volume} could not be promoted");
                self.promotion_refused_until = Some(now + self.cfg.timing.dead_after);
                let handover = self.peer_ready_for_switchover(now).is_ok().then_some((false, None));
                self.begin_demotion(Reason::Demoting, why, handover, false, None);
            }
        }
    }

    fn become_primary(&mut self, now: Instant) {
        let promotion = self.promotion.take();
        self.set_role(Role::Primary, "serving");
        let (kind, action, since, promotion_timeline) = promotion
            .map_or((CandidacyKind::Bootstrap, None, now, None), |p| (p.kind, p.action, p.since, Some(p.timeline)));
        let took = now.since(since);
        let mut timeline = promotion_timeline.unwrap_or_else(|| Timeline::new(now));
        timeline.mark(phase::SERVING, now);
        let phases = timeline.phases();
        let pending: BTreeSet<usize> = self
            .flow
            .checked_steps()
            .filter(|(_, name)| !timeline.has(&phase::step_healthy(name)))
            .map(|(i, _)| i)
            .collect();
        self.settling = (!pending.is_empty()).then_some(Settling { epoch: self.epoch, timeline, pending });
        let (reason, what) = match kind {
            CandidacyKind::PeerLost => (Reason::Promoted, "failover"),
            CandidacyKind::Bootstrap => (Reason::Promoted, "bootstrap"),
            CandidacyKind::Handover | CandidacyKind::Switchover => (Reason::Switchover, "switchover"),
            CandidacyKind::Failback => (Reason::Failback, "failback"),
            CandidacyKind::ForceActive => (Reason::ForceActive, "force-active"),
            CandidacyKind::SplitBrainWinner => (Reason::SplitBrainResolved, "split-brain resolution"),
        };
        self.notice(
            EventType::Normal,
            reason,
            format!(
                "serving in epoch {} ({what}, {} ms after the decision; {})",
                self.epoch,
                took.as_millis(),
                phases
                    .iter()
                    .map(|p| format!("{} at {} ms", p.phase, p.after.as_millis()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        self.last_failover = Some(FailoverSummary {
            from: Some(self.cfg.peer.clone()),
            to: self.cfg.me.clone(),
            reason: what.to_string(),
            epoch: self.epoch,
            took,
            phases,
        });
        if self.takeover.as_ref().is_some_and(|t| t.action == action) {
            self.takeover = None;
        }
        self.action_result(action, ActionOutcome::Succeeded, format!("serving in epoch {}", self.epoch));
    }

    /// Step `step` passed a health check at `now`: the first one after a promotion is a
    /// phase of that promotion, marked on its timeline while it runs, or added to the
    /// summary of the failover that is already serving.
    pub(super) fn first_healthy(&mut self, now: Instant, step: usize) {
        let Some(name) = self.flow.step(step).map(|(p, _)| phase::step_healthy(&p.name)) else { return };
        if let Some(p) = &mut self.promotion {
            p.timeline.mark(name, now);
            return;
        }
        let Some(s) = self.settling.as_mut().filter(|s| s.epoch == self.epoch) else { return };
        if !s.pending.remove(&step) {
            return;
        }
        s.timeline.mark(name, now);
        if let Some(f) = self.last_failover.as_mut().filter(|f| f.epoch == s.epoch) {
            f.phases = s.timeline.phases();
        }
        if s.pending.is_empty() {
            self.settling = None;
        }
    }

    pub(super) fn step_primary(&mut self, now: Instant) {
        if self.flow_restart && !self.cfg.deleting {
            if !self.flow.drive_down(true, &mut self.out) {
                return;
            }
            self.flow_restart = false;
        }
        let mut wake = None;
        let progress = self.flow.drive_up(now, self.epoch, false, &mut self.out, &mut |at| wake = Some(at));
        if let Some(at) = wake {
            self.wake_at(at);
        }
        match progress {
            Progress::Done => {
                // A step that failed past its limit runs again (restarted once the window
                // allowed it): no failover is wanted for it any more.
                if matches!(self.failover_wanted, Some((FailoverCause::Step(_), _))) {
                    self.failover_wanted = None;
                    self.failover_blocked_noted = false;
                }
            }
            Progress::Working => {}
            Progress::StepFailed(i) => self.handle_step_failure(now, i),
            Progress::VolumeFailed(volume) => {
                self.want_failover(FailoverCause::Volume, format!("volume {volume} failed"))
            }
        }
        if self.cfg.deleting {
            self.begin_demotion(Reason::Demoting, "group is being deleted".into(), None, false, None);
            return;
        }
        if self.answer_takeover(now) {
            return;
        }
        if let Some((_, why)) = self.failover_wanted.clone() {
            if self.maintenance() {
                self.note_blocked(format!("failover wanted ({why}) but maintenance freezes it"));
                return;
            }
            match self.peer_ready_for_switchover(now) {
                Ok(())
                    if self
                        .peer
                        .fresh(now, self.cfg.timing.dead_after)
                        .is_some_and(|hb| hb.health != hapair_crds::hagroup::NodeHealth::Failed) =>
                {
                    self.begin_demotion(Reason::Demoting, format!("failover: {why}"), Some((false, None)), false, None);
                }
                Ok(()) => self.note_blocked(format!("failover wanted ({why}) but the peer's health has failed")),
                Err(peer) => self.note_blocked(format!("failover wanted ({why}) but {peer}")),
            }
            return;
        }
        self.maybe_failback(now);
    }

    fn note_blocked(&mut self, message: String) {
        if !self.failover_blocked_noted {
            self.failover_blocked_noted = true;
            self.notice(EventType::Warning, Reason::FailoverBlocked, message.clone());
        }
        self.role_reason = message;
    }

    pub(super) fn want_failover(&mut self, cause: FailoverCause, why: String) {
        if self.failover_wanted.is_none() {
            self.notice(EventType::Warning, Reason::StepFailed, format!("failover wanted: {why}"));
            self.failover_wanted = Some((cause, why));
        }
    }

    /// A failed step: restart it locally while its policy allows, then ask for a failover.
    pub(super) fn handle_step_failure(&mut self, now: Instant, i: usize) {
        let Some((plan, _)) = self.flow.step(i) else { return };
        let (name, limit, window) = (plan.name.clone(), plan.restart_limit, plan.restart_window);
        if self.maintenance() {
            self.note_blocked(format!("step {name} failed; maintenance freezes restarts"));
            return;
        }
        let allowed = self.flow.restarts_mut(i).is_some_and(|(_, w)| w.try_restart(now, limit, window));
        if allowed && self.flow.restart(i, &mut self.out) {
            self.notice(
                EventType::Warning,
                Reason::StepRestarted,
                format!("step {name} failed: restarting it locally"),
            );
            return;
        }
        self.want_failover(
            FailoverCause::Step(i),
            format!("step {name} failed and its restart limit ({limit} in {window:?}) is reached"),
        );
    }

    /// A takeover request in the peer's heartbeat (switchover or force-active asked on the
    /// peer's side). Returns true when it started a demotion.
    fn answer_takeover(&mut self, now: Instant) -> bool {
        let Some(ask) = self.peer.fresh(now, self.cfg.timing.dead_after).and_then(|hb| hb.takeover.clone()) else {
            return false;
        };
        if self.answered_takeover.as_ref() == Some(&ask.action) {
            return false;
        }
        self.answered_takeover = Some(ask.action.clone());
        if ask.force {
            let why = format!("{} forces itself active", self.cfg.peer);
            self.begin_demotion(Reason::ForceActive, why, Some((true, ask.action.clone())), false, ask.action);
            return true;
        }
        match self.peer_ready_for_switchover(now) {
            Ok(()) => {
                let why = format!("switchover to {}", self.cfg.peer);
                self.begin_demotion(Reason::Switchover, why, Some((false, ask.action.clone())), false, ask.action);
                true
            }
            Err(why) => {
                self.notice(EventType::Warning, Reason::ActionRejected, format!("switchover refused: {why}"));
                self.action_result(ask.action, ActionOutcome::Rejected, format!("switchover refused: {why}"));
                false
            }
        }
    }

    /// Starts bringing the flow down on purpose, keeping the lease until it is down.
    pub(super) fn begin_demotion(
        &mut self,
        reason: Reason,
        why: String,
        handover: Option<(bool, Option<String>)>,
        discard: bool,
        action: Option<String>,
    ) {
        if let Some(p) = self.promotion.take()
            && p.action.is_some()
            && p.action != action
        {
            self.action_result(p.action, ActionOutcome::Failed, format!("interrupted: {why}"));
        }
        self.candidacy = None;
        self.flow_restart = false;
        self.failover_wanted = None;
        self.demotion = Some(Demotion { why: why.clone(), handover, discard, action });
        self.set_role(Role::Demoting, why.clone());
        self.notice(EventType::Normal, reason, format!("demoting: {why}"));
    }

    pub(super) fn step_demoting(&mut self, now: Instant) {
        if self.flow.drive_down(false, &mut self.out) {
            self.finished_down(now);
        }
    }

    /// A peer heartbeat shows a newer epoch while this node acts: it is stale.
    pub(super) fn step_down_for_newer(&mut self, epoch: u64) {
        if matches!(self.role, Role::Primary | Role::Promoting) && self.acting {
            self.notice(
                EventType::Warning,
                Reason::NewerPrimary,
                format!("peer {} is in epoch {epoch}: stepping down", self.cfg.peer),
            );
            self.begin_demotion(Reason::Demoting, format!("peer serves in newer epoch {epoch}"), None, false, None);
        }
    }

    /// Everything is down (or as down as it gets): drop the lease, settle the role.
    pub(super) fn finished_down(&mut self, now: Instant) {
        self.acting = false;
        self.stopping = false;
        self.promotion = None;
        // A wanted failover was about the service here, which is gone.
        self.failover_wanted = None;
        self.failover_blocked_noted = false;
        let clean = self.flow.is_clean_idle();
        let release_after_stop = self.release_after_stop.take();
        // Only a clean stop gives the witness lease back early. After a failed stop the
        // grant must run out on its own: it outlasts the watchdog deadline, so the peer
        // cannot be granted before this machine is reset.
        if clean {
            self.release_witness_if_held(now);
            if let Some(epoch) = release_after_stop {
                self.release_witness_epoch(now, epoch);
            }
        } else {
            self.witness.forget();
        }
        self.lease.void();
        if clean {
            if self.watchdog.is_some() || self.watchdog_unknown {
                self.watchdog = None;
                self.watchdog_unknown = false;
                self.out.push(Command::DisarmWatchdog);
            }
        } else {
            self.notice(
                EventType::Warning,
                Reason::StopFailed,
                "some resources could not be stopped; the watchdog will reset this machine at the lease's end",
            );
        }
        self.lease_abandoned = false;
        if let Some(d) = self.demotion.take() {
            if let Some((force, action)) = d.handover {
                self.handover = Some(HandoverOffer {
                    action,
                    force,
                    until: now + self.cfg.timing.handover_timeout,
                    epoch: self.epoch,
                });
            }
            if d.discard {
                for volume in self.cfg.flow.volumes.clone() {
                    self.out.push(Command::ResolveSplitBrain { volume, keep_local: false });
                }
                self.action_result(d.action.clone(), ActionOutcome::Succeeded, "demoted; local changes discarded");
            }
            self.notice(EventType::Normal, Reason::Demoted, format!("standing by: {}", d.why));
            let role = if clean { Role::Standby } else { Role::Fenced };
            self.set_role(role, format!("demoted: {}", d.why));
        } else if self.role == Role::Fenced {
            self.role_reason = "self-fenced; waiting to hear from the peer or the witness".into();
        } else {
            self.set_role(if clean { Role::Standby } else { Role::Fenced }, "standing by");
        }
    }

    /// Ends handover offers and takeover asks whose time is up, and notices a handover
    /// that succeeded.
    pub(super) fn expire_offers(&mut self, now: Instant) {
        if let Some(offer) = self.handover.clone() {
            let taken = self
                .peer
                .fresh(now, self.cfg.timing.dead_after)
                .is_some_and(|hb| hb.holding && hb.epoch > offer.epoch && hb.role == Role::Primary);
            if taken {
                self.handover = None;
                self.action_result(offer.action, ActionOutcome::Succeeded, format!("{} serves now", self.cfg.peer));
            } else if now >= offer.until {
                self.handover = None;
                self.notice(
                    EventType::Warning,
                    Reason::ActionFailed,
                    format!("{} did not take the service over", self.cfg.peer),
                );
                self.action_result(offer.action, ActionOutcome::Failed, format!("{} did not take over", self.cfg.peer));
            }
        }
        if let Some(ask) = self.takeover.clone()
            && now >= ask.until
        {
            self.takeover = None;
            if self.candidacy.as_ref().is_none_or(|c| c.action != ask.action) {
                self.action_result(ask.action, ActionOutcome::Failed, "timed out");
            }
        }
    }
}
