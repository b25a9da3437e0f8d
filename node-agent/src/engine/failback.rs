//! Watching the peer from the serving side: reachability, readiness to take the service
//! (switchover, wanted failover) and automatic failback to the preferred node.
//!
//! Failback `auto` moves the service back to the preferred node only after it has been,
//! *continuously* for `failback.stabilization`: reachable, standing by with nothing held,
//! UpToDate, Healthy and not in maintenance. Any lapse restarts the clock. The move is an
//! ordinary switchover (demote, hand over, the preferred node promotes in a new epoch).

use hapair_crds::hagroup::{FailbackMode, NodeHealth};
use hapair_crds::nodeapi::EventType;
use hapair_crds::volume::DiskState;

use super::Engine;
use super::command::Reason;
use super::role::Role;
use super::time::Instant;

impl Engine {
    /// Reachability notices, and the instants the failback and bootstrap clocks started.
    pub(super) fn track_peer(&mut self, now: Instant) {
        let reachable = self.peer.reachable(now, self.cfg.timing.dead_after);
        if reachable != self.peer_was_reachable {
            self.peer_was_reachable = reachable;
            if reachable {
                self.notice(EventType::Normal, Reason::PeerFound, format!("hearing {} again", self.cfg.peer));
            } else {
                let silence = self.cfg.timing.dead_after;
                self.notice(
                    EventType::Warning,
                    Reason::PeerLost,
                    format!("nothing heard from {} on any link for {} ms", self.cfg.peer, silence.as_millis()),
                );
            }
        }
        if self.peer_ready_for_failback(now) {
            self.peer_ready_since.get_or_insert(now);
        } else {
            self.peer_ready_since = None;
        }
        let me_idle = matches!(self.role, Role::Standby | Role::Fenced) && !self.holding() && self.candidacy.is_none();
        let peer_idle = self
            .peer
            .fresh(now, self.cfg.timing.dead_after)
            .is_some_and(|hb| matches!(hb.role, Role::Standby | Role::Fenced) && !hb.holding);
        if me_idle && peer_idle {
            self.both_idle_since.get_or_insert(now);
        } else {
            self.both_idle_since = None;
        }
    }

    /// Whether the peer can take the service with no data loss; otherwise why not.
    pub(super) fn peer_ready_for_switchover(&self, now: Instant) -> Result<(), String> {
        let peer = &self.cfg.peer;
        let Some(hb) = self.peer.fresh(now, self.cfg.timing.dead_after) else {
            return Err(format!("{peer} is not reachable"));
        };
        if hb.holding || !matches!(hb.role, Role::Standby | Role::Fenced) {
            return Err(format!("{peer} is {} and not standing by", hb.role.as_str()));
        }
        if hb.disk != DiskState::UpToDate {
            return Err(format!("{peer}'s data is {}, not UpToDate", hb.disk.as_str()));
        }
        Ok(())
    }

    fn peer_ready_for_failback(&self, now: Instant) -> bool {
        self.cfg.failback == FailbackMode::Auto
            && self.cfg.preferred.as_deref() == Some(self.cfg.peer.as_str())
            && self.peer_ready_for_switchover(now).is_ok()
            && self
                .peer
                .fresh(now, self.cfg.timing.dead_after)
                .is_some_and(|hb| hb.health == NodeHealth::Healthy && !hb.maintenance)
    }

    /// On a serving node whose peer is preferred: hand back once the peer was ready for
    /// the whole stabilization time.
    pub(super) fn maybe_failback(&mut self, now: Instant) {
        if self.role != Role::Primary || self.maintenance() || !self.flow.is_up() {
            return;
        }
        let Some(since) = self.peer_ready_since else { return };
        let stabilization = self.cfg.failback_stabilization;
        if now >= since + stabilization {
            let why = format!(
                "failback to preferred node {} (healthy and in sync for {} s)",
                self.cfg.peer,
                stabilization.as_secs()
            );
            self.begin_demotion(Reason::Failback, why, Some((false, None)), false, None);
        }
    }
}
