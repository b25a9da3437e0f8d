//! Turning inputs into state: peer heartbeats (liveness, epochs, lease grants), witness
//! answers, probe and check observations, command results and config updates.
//!
//! Epoch rules applied here: a heartbeat from an older epoch is refused (it still proves
//! the peer alive, but its grant, handover and takeover are ignored); a newer epoch is
//! adopted, and a node acting in an older epoch steps down. Two nodes acting in the same
//! epoch can only happen without a witness (mode `none`, split brain); the lower-ranked
//! one steps down.

use std::time::Duration;

use hapair_crds::nodeapi::{EventType, GroupConfig, LeaseResponse};

use super::command::Reason;
use super::config::{EngineConfig, PlannedKind};
use super::event::{StepOp, VolumeOp, WitnessAnswer};
use super::flow::Outcome;
use super::heartbeat::Heartbeat;
use super::monitor::Change;
use super::peer::{Arrival, PeerTracker};
use super::role::Role;
use super::serving::FailoverCause;
use super::time::Instant;
use super::timeline::phase;
use super::{Engine, mutation};
use hapair_crds::hagroup::MonitorAction;

impl Engine {
    pub(super) fn on_heartbeat(&mut self, now: Instant, link: usize, message: Heartbeat) {
        if message.sender != self.cfg.peer || link >= self.cfg.links {
            return;
        }
        let known = self.peer.incarnation();
        match self.peer.observe(link, message, now) {
            Arrival::Stale | Arrival::LinkOnly => return,
            Arrival::Newest { new_incarnation } => {
                if new_incarnation && known != 0 {
                    self.notice(EventType::Normal, Reason::PeerRestarted, format!("{} restarted", self.cfg.peer));
                }
            }
        }
        let Some(view) = self.peer.latest() else { return };
        let hb = view.heartbeat.clone();
        if hb.epoch < self.epoch {
            if self.stale_epoch_noted != Some(hb.epoch) {
                self.stale_epoch_noted = Some(hb.epoch);
                self.notice(
                    EventType::Warning,
                    Reason::StaleEpoch,
                    format!("{} speaks in epoch {}, older than {}: refused", self.cfg.peer, hb.epoch, self.epoch),
                );
            }
            return;
        }
        if hb.epoch > self.epoch {
            self.epoch = hb.epoch;
            self.floor = self.floor.max(hb.epoch);
            self.step_down_for_newer(hb.epoch);
        } else if self.acting
            && hb.holding
            // A peer that is demoting (it may have just learnt this epoch from us) is on
            // its way down: yielding to it would leave nobody serving.
            && matches!(hb.role, Role::Primary | Role::Promoting)
            && !self.cfg.outranks(&self.cfg.me, &self.cfg.peer)
        {
            self.step_down_for_newer(hb.epoch);
        }
        if let Some(grant) = hb.grant
            && self.role.wants_lease()
            && !self.lease_abandoned
            && self.lease.on_grant(&grant, self.incarnation, self.cfg.timing.lease_ttl).is_some()
            && self.acting
        {
            self.feed_watchdog();
        }
    }

    pub(super) fn on_witness(&mut self, now: Instant, request_id: u64, answer: WitnessAnswer) {
        let response = match answer {
            WitnessAnswer::Response(response) => response,
            WitnessAnswer::Timeout => {
                self.witness_unreachable(request_id, "no answer in time".into());
                return;
            }
            WitnessAnswer::Failed(why) => {
                self.witness_unreachable(request_id, why);
                // A refusal comes back within a round trip (no controller leads, connection
                // refused): asking again at once would send hundreds of requests while the
                // controllers elect a leader. One per heartbeat interval costs at most that.
                self.witness.set_retry_at(now + self.cfg.timing.interval);
                return;
            }
        };
        let Some(request) = self.witness.take(request_id) else {
            // An answer to a forgotten request. A grant nobody wants is given back at once
            // so that it does not delay the peer; one that might be in use is left alone.
            if let LeaseResponse::Granted { holder, epoch, .. } = &response
                && holder == &self.cfg.me
                && !self.wants_witness_lease()
                && !self.holding()
            {
                self.release_witness_epoch(now, *epoch);
            }
            return;
        };
        match response {
            LeaseResponse::Granted { holder, ttl_ms, epoch } => {
                if holder != self.cfg.me {
                    return;
                }
                if !self.wants_witness_lease() {
                    if !self.holding() {
                        self.release_witness_epoch(now, epoch);
                    }
                    return;
                }
                let ttl = request.ttl.min(Duration::from_millis(ttl_ms));
                self.lease.on_witness_grant(request.sent_at, ttl, epoch);
                if let Some(c) = &mut self.candidacy {
                    c.denied_noted = false;
                    c.unreachable_noted = false;
                    c.timeline.mark(phase::WITNESS_GRANTED, now);
                }
                if self.acting {
                    self.feed_watchdog();
                }
            }
            LeaseResponse::Denied { holder, retry_after_ms, reason } => {
                let t = &self.cfg.timing;
                let retry = Duration::from_millis(retry_after_ms).clamp(t.interval, t.lease_ttl);
                self.witness.set_retry_at(now + retry);
                let who = holder.map(|h| format!(" (held by {h})")).unwrap_or_default();
                let message = format!("witness refused the lease{who}: {reason}");
                let first = self.candidacy.as_mut().is_some_and(|c| !std::mem::replace(&mut c.denied_noted, true));
                if first {
                    self.notice(EventType::Normal, Reason::WitnessDenied, message.clone());
                }
                if self.role == Role::Promoting || self.acting {
                    self.role_reason = format!("waiting for witness: {message}");
                }
            }
            LeaseResponse::Released => {}
        }
    }

    /// A witness request got no answer: asked again at once by the candidacy; what an
    /// operator sees is why this node is not serving (a standby that cannot tell a dead
    /// primary from a partition must not promote without the witness), noted once per
    /// candidacy.
    fn witness_unreachable(&mut self, request_id: u64, why: String) {
        self.witness.give_up(request_id);
        let message = format!("witness unreachable: {why}");
        let first = self.candidacy.as_mut().is_some_and(|c| !std::mem::replace(&mut c.unreachable_noted, true));
        if first {
            self.notice(EventType::Warning, Reason::WitnessUnreachable, message.clone());
        }
        if self.role == Role::Promoting || self.acting {
            self.role_reason = format!("waiting for witness: {message}");
        }
    }

    pub(super) fn on_probe(&mut self, now: Instant, monitor: &str, healthy: bool, message: Option<String>) {
        let Some((plan, change)) = self.monitors.observe(monitor, healthy, message.clone()) else { return };
        let detail = message.unwrap_or_default();
        match change {
            Change::None => {}
            Change::Recovered => {
                self.notice(EventType::Normal, Reason::ProbeRecovered, format!("monitor {monitor} healthy again"));
                if matches!(&self.failover_wanted, Some((FailoverCause::Monitor(m), _)) if m == monitor) {
                    self.failover_wanted = None;
                    self.failover_blocked_noted = false;
                }
            }
            Change::Fired => {
                self.notice(
                    EventType::Warning,
                    Reason::ProbeFailed,
                    format!("monitor {monitor} failed ({detail}); action {:?}", plan.action),
                );
                let serving = self.acting && matches!(self.role, Role::Primary | Role::Promoting);
                match plan.action {
                    MonitorAction::Alert => {}
                    MonitorAction::Failover if serving => self.want_failover(
                        FailoverCause::Monitor(monitor.to_string()),
                        format!("monitor {monitor} failed"),
                    ),
                    MonitorAction::Failover => {}
                    MonitorAction::Restart if serving => self.restart_for_monitor(now, monitor, plan.restart_step),
                    MonitorAction::Restart => {}
                }
            }
        }
    }

    fn restart_for_monitor(&mut self, now: Instant, monitor: &str, step: Option<usize>) {
        if self.maintenance() {
            self.notice(
                EventType::Warning,
                Reason::FailoverBlocked,
                format!("monitor {monitor} asks for a restart; maintenance freezes it"),
            );
            return;
        }
        match step {
            Some(i) => {
                let Some((plan, _)) = self.flow.step(i) else { return };
                let (name, limit, window) = (plan.name.clone(), plan.restart_limit, plan.restart_window);
                let allowed = self.flow.restarts_mut(i).is_some_and(|(_, w)| w.try_restart(now, limit, window));
                if allowed && self.flow.restart(i, &mut self.out) {
                    self.notice(
                        EventType::Warning,
                        Reason::StepRestarted,
                        format!("restarting step {name} (monitor {monitor})"),
                    );
                } else {
                    self.want_failover(
                        FailoverCause::Monitor(monitor.to_string()),
                        format!("monitor {monitor} failed and step {name} reached its restart limit"),
                    );
                }
            }
            None => {
                let (limit, window) = (super::config::FLOW_RESTART_LIMIT, super::config::FLOW_RESTART_WINDOW);
                if self.flow_restarts.try_restart(now, limit, window) {
                    self.flow_restart = true;
                    self.notice(
                        EventType::Warning,
                        Reason::StepRestarted,
                        format!("restarting the whole flow (monitor {monitor})"),
                    );
                } else {
                    self.want_failover(
                        FailoverCause::Monitor(monitor.to_string()),
                        format!("monitor {monitor} failed and the flow reached its restart limit"),
                    );
                }
            }
        }
    }

    pub(super) fn on_step_check(&mut self, now: Instant, step: usize, healthy: bool, message: Option<String>) {
        if healthy && self.flow.check_counts(step) && !self.mutated(mutation::Mutation::ForgetFirstHealthy) {
            self.first_healthy(now, step);
        }
        if self.flow.on_check(now, step, healthy, message.clone()) {
            let name = self.flow.step(step).map(|(p, _)| p.name.clone()).unwrap_or_default();
            self.notice(
                EventType::Warning,
                Reason::StepFailed,
                format!("step {name}: health check failed ({})", message.unwrap_or_default()),
            );
        }
    }

    pub(super) fn on_step_done(&mut self, now: Instant, step: usize, op: StepOp, result: Result<(), String>) {
        let name = self.flow.step(step).map(|(p, _)| p.name.clone()).unwrap_or_default();
        if let (Some(p), StepOp::Start, Ok(())) = (&mut self.promotion, op, &result) {
            let phase = match self.flow.step(step).map(|(s, _)| &s.kind) {
                Some(PlannedKind::VirtualIp { .. }) => phase::vip_announced(&name),
                Some(PlannedKind::Volume { .. }) => phase::volume_mounted(&name),
                _ => phase::step_started(&name),
            };
            p.timeline.mark(phase, now);
        }
        if let Outcome::Failed(e) = self.flow.on_step_done(step, op, result, now) {
            let reason = if op == StepOp::Stop { Reason::StopFailed } else { Reason::StepFailed };
            self.notice(EventType::Warning, reason, format!("step {name}: {} failed: {e}", op.as_str()));
        }
    }

    pub(super) fn on_volume_done(&mut self, now: Instant, volume: &str, op: VolumeOp, result: Result<(), String>) {
        if let (Some(p), VolumeOp::Promote, Ok(())) = (&mut self.promotion, op, &result) {
            p.timeline.mark(phase::volume_promoted(volume), now);
        }
        if let Outcome::Failed(e) = self.flow.on_volume_done(volume, op, result) {
            let (reason, what) = match op {
                VolumeOp::Promote => (Reason::StepFailed, "promotion"),
                VolumeOp::Demote => (Reason::StopFailed, "demotion"),
            };
            self.notice(EventType::Warning, reason, format!("volume {volume}: {what} failed: {e}"));
        }
    }

    pub(super) fn on_config(&mut self, now: Instant, config: &GroupConfig) {
        if config.key != self.cfg.group {
            let message = format!("config for group {} refused: this engine runs {}", config.key, self.cfg.group);
            self.notice(EventType::Warning, Reason::ConfigRejected, message);
            return;
        }
        let new = match EngineConfig::from_group(config, &self.cfg.me) {
            Ok(new) => new,
            Err(e) => {
                self.notice(EventType::Warning, Reason::ConfigRejected, format!("keeping the previous config: {e}"));
                return;
            }
        };
        if new.peer != self.cfg.peer {
            self.peer = PeerTracker::new(new.links, 0);
        } else {
            self.peer.resize_links(new.links);
        }
        if new.maintenance != self.cfg.maintenance {
            // The spec changed maintenance since the last admin action: the spec wins.
            self.maintenance_override = None;
        }
        if new.flow != self.cfg.flow && !self.flow.replace_plan(new.flow.clone()) {
            self.pending_plan = Some(new.flow.clone());
        }
        self.monitors.replace(new.monitors.clone());
        self.next_heartbeat = self.next_heartbeat.min(now + new.timing.interval);
        let generation = new.generation;
        self.cfg = new;
        self.notice(EventType::Normal, Reason::ConfigApplied, format!("config generation {generation} applied"));
        for action in config.actions.clone() {
            self.on_admin(now, action);
        }
    }
}
