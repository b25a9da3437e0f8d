//! Admin actions: switchover, force-active, resolve-split-brain, maintenance, verify.
//!
//! Both nodes receive every action (in their desired config, or as `Event::Admin`); each
//! does its part, and the target also tells the peer through its heartbeats (a takeover
//! request), so an action completes even when only one node got it in time.
//!
//! - **switchover `to`** (zero data loss): the serving node checks that `to` stands by,
//!   UpToDate, then stops its flow (VIPs first), demotes its volumes and offers the
//!   service; `to` promotes in a new epoch only if its own data is UpToDate. Refused when
//!   the target is not in sync.
//! - **force-active `node`**: `node` promotes without health or sync checks, but never
//!   with overlapping leases: it still needs the peer's consent (the serving peer demotes
//!   and hands over on request), or a witness grant plus the `L·(1+δ)` wait (in mode
//!   `none`: silence plus the wait).
//! - **resolve-split-brain `winner`**: the winner keeps its data and becomes active
//!   (forced); the loser demotes if it serves, then discards its local changes.
//! - **maintenance on/off**: freezes (or unfreezes) automatic actions; survives restarts.
//! - **verify `volume`**: the serving node starts an online verify of the volume (its
//!   replica compares block digests with the peer's and resyncs what differs); the
//!   standby answers that the serving peer runs it. With no node serving it fails.
//!
//! Each action id is handled once; repeated deliveries are ignored.

use hapair_crds::nodeapi::{ActionOutcome, AdminAction, AdminActionKind, EventType};
use hapair_crds::volume::DiskState;

use super::Engine;
use super::candidacy::CandidacyKind;
use super::command::{Command, Reason};
use super::heartbeat::MAX_ACTION_ID_LEN;
use super::role::Role;
use super::serving::TakeoverAsk;
use super::time::Instant;

impl Engine {
    pub(super) fn on_admin(&mut self, now: Instant, action: AdminAction) {
        let id = action.id.clone();
        if id.is_empty() || id.len() > MAX_ACTION_ID_LEN {
            let message = format!("actions[].id: must be 1 to {MAX_ACTION_ID_LEN} bytes, got {}", id.len());
            self.notice(EventType::Warning, Reason::ActionRejected, message.clone());
            self.results_for_bad_id(id, message);
            return;
        }
        if self.finished_actions.contains(&id) || self.pending_actions.contains(&id) {
            return;
        }
        let (me, peer) = (self.cfg.me.clone(), self.cfg.peer.clone());
        let named = match &action.kind {
            AdminActionKind::Switchover { to } => Some(to),
            AdminActionKind::ForceActive { node } => Some(node),
            AdminActionKind::ResolveSplitBrain { winner } => Some(winner),
            AdminActionKind::Maintenance { .. } | AdminActionKind::Verify { .. } => None,
        };
        if let Some(node) = named
            && node != &me
            && node != &peer
        {
            let message = format!("{}: {node:?} is not a node of this group", action.kind.label());
            self.notice(EventType::Warning, Reason::ActionRejected, message.clone());
            self.action_result(Some(id), ActionOutcome::Rejected, message);
            return;
        }
        self.pending_actions.push(id.clone());
        let serving = self.acting && self.role == Role::Primary;
        match action.kind {
            AdminActionKind::Maintenance { enabled } => {
                self.maintenance_override = Some(enabled);
                let state = if enabled { "on: automatic actions frozen" } else { "off" };
                self.notice(EventType::Normal, Reason::Maintenance, format!("maintenance {state}"));
                self.action_result(Some(id), ActionOutcome::Succeeded, format!("maintenance {state}"));
            }
            AdminActionKind::Switchover { to } if to == me => {
                if serving {
                    self.action_result(Some(id), ActionOutcome::Succeeded, "already serving");
                } else if self.disk() != DiskState::UpToDate {
                    let message = format!("switchover refused: local data is {}, not UpToDate", self.disk().as_str());
                    self.notice(EventType::Warning, Reason::ActionRejected, message.clone());
                    self.action_result(Some(id), ActionOutcome::Rejected, message);
                } else {
                    self.ask_takeover(now, CandidacyKind::Switchover, id, false);
                }
            }
            AdminActionKind::Switchover { .. } => {
                if self.acting {
                    self.answered_takeover = Some(Some(id.clone()));
                    match self.peer_ready_for_switchover(now) {
                        Ok(()) => self.begin_demotion(
                            Reason::Switchover,
                            format!("switchover to {peer}"),
                            Some((false, Some(id.clone()))),
                            false,
                            Some(id),
                        ),
                        Err(why) => {
                            let message = format!("switchover refused: {why}");
                            self.notice(EventType::Warning, Reason::ActionRejected, message.clone());
                            self.action_result(Some(id), ActionOutcome::Rejected, message);
                        }
                    }
                } else {
                    self.pending_actions.retain(|p| p != &id);
                }
            }
            AdminActionKind::ForceActive { node } if node == me => {
                if serving {
                    self.action_result(Some(id), ActionOutcome::Succeeded, "already serving");
                } else {
                    self.notice(
                        EventType::Warning,
                        Reason::ForceActive,
                        "forced active: skipping health and sync checks",
                    );
                    self.ask_takeover(now, CandidacyKind::ForceActive, id, true);
                }
            }
            AdminActionKind::ForceActive { .. } => {
                if self.acting {
                    self.answered_takeover = Some(Some(id.clone()));
                    let why = format!("{peer} is forced active");
                    self.begin_demotion(Reason::ForceActive, why, Some((true, Some(id.clone()))), false, Some(id));
                } else {
                    self.pending_actions.retain(|p| p != &id);
                }
            }
            AdminActionKind::Verify { volume } => self.on_verify(now, id, volume, serving),
            AdminActionKind::ResolveSplitBrain { winner } if winner == me => {
                for volume in self.cfg.flow.volumes.clone() {
                    self.out.push(Command::ResolveSplitBrain { volume, keep_local: true });
                }
                self.notice(
                    EventType::Warning,
                    Reason::SplitBrainResolved,
                    "split brain: this node wins and keeps its data",
                );
                if serving {
                    self.action_result(Some(id), ActionOutcome::Succeeded, "winner already serving");
                } else {
                    self.ask_takeover(now, CandidacyKind::SplitBrainWinner, id, true);
                }
            }
            AdminActionKind::ResolveSplitBrain { .. } => {
                let why = format!("split brain resolved in favour of {peer}");
                self.notice(EventType::Warning, Reason::SplitBrainResolved, format!("{why}: discarding local changes"));
                if self.acting {
                    self.answered_takeover = Some(Some(id.clone()));
                    self.begin_demotion(
                        Reason::SplitBrainResolved,
                        why,
                        Some((true, Some(id.clone()))),
                        true,
                        Some(id),
                    );
                } else {
                    for volume in self.cfg.flow.volumes.clone() {
                        self.out.push(Command::ResolveSplitBrain { volume, keep_local: false });
                    }
                    self.action_result(Some(id), ActionOutcome::Succeeded, "local changes discarded");
                }
            }
        }
    }

    fn on_verify(&mut self, now: Instant, id: String, volume: String, serving: bool) {
        let refused = if !self.cfg.flow.volumes.contains(&volume) {
            Some(format!("verify: {volume:?} is not a volume of this group's flow"))
        } else if serving {
            None
        } else if self.peer.fresh(now, self.cfg.timing.dead_after).is_some_and(|hb| hb.role == Role::Primary) {
            let message = format!("verify of {volume}: runs on {}, which serves it", self.cfg.peer);
            self.action_result(Some(id), ActionOutcome::Succeeded, message);
            return;
        } else {
            Some(format!("verify of {volume}: no node serves the group; a verify runs on the primary"))
        };
        if let Some(message) = refused {
            self.notice(EventType::Warning, Reason::ActionRejected, message.clone());
            self.action_result(Some(id), ActionOutcome::Rejected, message);
            return;
        }
        self.out.push(Command::StartVerify { volume: volume.clone(), action: id.clone() });
        self.action_result(Some(id), ActionOutcome::Pending, format!("verify of {volume}: starting"));
    }

    pub(super) fn on_verify_started(&mut self, id: String, volume: &str, result: Result<(), String>) {
        if !self.pending_actions.contains(&id) {
            return;
        }
        match result {
            Ok(()) => {
                let message = format!("verify of {volume} started: the replicas' block digests are compared");
                self.notice(EventType::Normal, Reason::Verify, message.clone());
                self.action_result(Some(id), ActionOutcome::Succeeded, message);
            }
            Err(e) => {
                let message = format!("verify of {volume} refused: {e}");
                self.notice(EventType::Warning, Reason::ActionFailed, message.clone());
                self.action_result(Some(id), ActionOutcome::Failed, message);
            }
        }
    }

    fn ask_takeover(&mut self, now: Instant, kind: CandidacyKind, id: String, force: bool) {
        let until = now + self.cfg.timing.action_timeout;
        // A newer ask replaces an older one; the older one failed.
        if let Some(old) = self.takeover.take() {
            self.action_result(old.action, ActionOutcome::Failed, "superseded by a newer action");
        }
        if let Some(c) = &self.candidacy
            && !self.acting
            && !c.forced
            && force
        {
            self.abort_candidacy(now, "superseded by a forced action");
        }
        self.takeover = Some(TakeoverAsk { kind, action: Some(id.clone()), force, until });
        self.heartbeat_now = true;
        self.action_result(
            Some(id),
            ActionOutcome::Pending,
            format!("{}: waiting for the peer and the lease", kind.describe()),
        );
    }

    fn results_for_bad_id(&mut self, id: String, message: String) {
        // Reported under a truncated id so the controller can still match a prefix.
        let mut cut = id;
        while cut.len() > MAX_ACTION_ID_LEN {
            cut.pop();
        }
        if !cut.is_empty() {
            self.action_result(Some(cut), ActionOutcome::Rejected, message);
        }
    }
}
