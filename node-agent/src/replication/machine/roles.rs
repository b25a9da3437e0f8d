//! Role changes: promotion, demotion, epochs and fencing, and the operator's split-brain verdict.

use super::messages::{ErrorCode, IoOp, IoTag, MetaPurpose, ReplicaEvent, refusal};
use super::{Machine, Phase, RETRY_SOON_MS, ReqId, Role, wire_disk};
use crate::replication::handshake::SyncReason;
use crate::replication::metadata::{StoredDisk, flags};
use crate::replication::wire::{Frame, Resolution, WireRole};

#[derive(Debug)]
pub(super) struct DemoteRun {
    req: ReqId,
    flush_sent: bool,
    pub(super) local_flushed: bool,
    pub(super) peer_flush_seq: Option<u64>,
    persisting: bool,
}

/// A link to a primary peer that a promotion may close: see [`Machine::lost_primary_link`].
struct LostLink {
    conn: super::ConnId,
    reason: String,
}

impl Machine {
    /// The link to a peer that still reads as primary but is gone, when a promotion in
    /// `epoch` comes: the engine takes a newer term than the peer's only once the peer's
    /// lease is over, and the peer has not been heard here for longer than it pings (a
    /// live peer sends something every ping interval). A peer still heard keeps its link,
    /// and the promotion is refused: the heartbeat links may be cut while this one works.
    fn lost_primary_link(&self, epoch: u64) -> Option<LostLink> {
        let link = self.link.as_ref()?;
        if link.peer_role != WireRole::Primary {
            return None;
        }
        let peer_epoch = link.peer.as_ref().map_or(0, |h| h.promoted_epoch);
        let silent_ms = self.now.saturating_sub(link.last_rx_ms);
        (epoch > peer_epoch && silent_ms >= self.cfg.ping_interval_ms * 3 / 2).then(|| LostLink {
            conn: link.conn,
            reason: format!(
                "peer {} lost: silent here for {silent_ms} ms, and epoch {epoch} supersedes its {peer_epoch}",
                self.cfg.peer
            ),
        })
    }

    pub(super) fn on_promote(&mut self, req: ReqId, epoch: u64, force: bool, wall_ms: u64) {
        if epoch < self.sb.known_epoch {
            let msg = format!("epoch {epoch} is older than the newest known epoch {}", self.sb.known_epoch);
            self.complete(req, Err(refusal(ErrorCode::NotPermitted, msg)));
            return;
        }
        if self.demote.is_some() {
            self.complete(req, Err(refusal(ErrorCode::Busy, "a demotion is in progress")));
            return;
        }
        if let Some(lost) = self.lost_primary_link(epoch) {
            // Waiting for this link's own timeout would only delay the takeover.
            self.close(lost.conn, &lost.reason, RETRY_SOON_MS);
        }
        if let Some(link) = &self.link {
            if link.phase == Phase::AwaitHello {
                self.complete(req, Err(refusal(ErrorCode::Busy, "the replication handshake is in progress")));
                return;
            }
            if link.peer_role == WireRole::Primary {
                let msg = format!(
                    "peer {} is primary and was heard on the replication link {} ms ago",
                    self.cfg.peer,
                    self.now.saturating_sub(link.last_rx_ms)
                );
                self.complete(req, Err(refusal(ErrorCode::NotPermitted, msg)));
                return;
            }
            if link.sync.as_ref().is_some_and(|s| !s.source) {
                let msg = "this replica is a sync target: its data is inconsistent until the resync completes";
                self.complete(req, Err(refusal(ErrorCode::NotPermitted, msg)));
                return;
            }
        }
        let was_primary = self.role == Role::Primary;
        let mut forced = false;
        if self.sb.disk != StoredDisk::UpToDate {
            if !force {
                let msg = format!(
                    "the local disk is {}: promotion needs UpToDate data (or an explicit force)",
                    self.disk_state().as_str()
                );
                self.complete(req, Err(refusal(ErrorCode::NotPermitted, msg)));
                return;
            }
            let fresh = self.fresh_gen();
            self.sb.gens.force_new(fresh);
            self.set_disk(StoredDisk::UpToDate, "forced promotion");
            forced = true;
            // The peer must learn from a fresh handshake that it is now behind.
            if let Some(conn) = self.conn() {
                self.close(conn, "forced promotion: renegotiating with the peer", RETRY_SOON_MS);
            }
        }
        self.role = Role::Primary;
        self.fenced = false;
        self.sb.set_flag(flags::SUPERSEDED, false);
        self.split_brain = None;
        self.refused = None;
        self.sb.known_epoch = self.sb.known_epoch.max(epoch);
        if !was_primary || epoch > self.sb.promoted_epoch {
            self.sb.promoted_epoch = epoch;
            self.sb.promoted_at_ms = wall_ms;
        }
        self.sb.set_flag(flags::PRIMARY, true);
        self.persist(Some(IoTag::Meta(MetaPurpose::Promote(req))), false);
        self.event(ReplicaEvent::Promoted { epoch, forced });
        if let Some(link) = self.link.as_ref().filter(|l| l.phase != Phase::AwaitHello) {
            let conn = link.conn;
            let ready = link.phase == Phase::Ready;
            self.send(conn, Frame::State { role: WireRole::Primary, disk: wire_disk(self.sb.disk) });
            if ready && !self.bitmap.is_empty() {
                self.begin_resync_as_source(conn, SyncReason::OutOfSyncBlocks);
            }
        }
    }

    pub(super) fn on_demote(&mut self, req: ReqId, force: bool, open_clients: usize) {
        if self.role == Role::Secondary && self.demote.is_none() {
            self.complete(req, Ok(()));
            return;
        }
        if self.demote.is_some() {
            self.complete(req, Err(refusal(ErrorCode::Busy, "a demotion is already in progress")));
            return;
        }
        if open_clients > 0 && !force {
            let msg = format!("{open_clients} NBD client(s) still attached: unmount and detach first (or force)");
            self.complete(req, Err(refusal(ErrorCode::Busy, msg)));
            return;
        }
        self.demote =
            Some(DemoteRun { req, flush_sent: false, local_flushed: false, peer_flush_seq: None, persisting: false });
        // Requests that have not started never will.
        while let Some(op) = self.stalled.pop_front() {
            self.complete(op.req(), Err(refusal(ErrorCode::NotPermitted, "the volume is being demoted")));
        }
    }

    /// Demotion: wait for writes in flight, flush both replicas, persist, then secondary.
    pub(super) fn progress_demote(&mut self) {
        let Some(d) = &self.demote else { return };
        if !self.requests.is_empty() || d.persisting {
            return;
        }
        if !d.flush_sent {
            let replicate = self.link.as_ref().filter(|l| l.replicating()).map(|l| l.conn);
            let seq = replicate.map(|_| {
                let s = self.next_seq;
                self.next_seq += 1;
                s
            });
            if let (Some(conn), Some(seq)) = (replicate, seq) {
                self.send(conn, Frame::Flush { seq });
            }
            self.io(IoOp::Flush { tag: IoTag::DemoteFlush });
            if let Some(d) = &mut self.demote {
                d.flush_sent = true;
                d.peer_flush_seq = seq;
            }
            return;
        }
        if !d.local_flushed || d.peer_flush_seq.is_some() {
            return;
        }
        let req = d.req;
        if let Some(d) = &mut self.demote {
            d.persisting = true;
        }
        self.sb.set_flag(flags::PRIMARY, false);
        self.persist(Some(IoTag::Meta(MetaPurpose::Demote(req))), true);
    }

    pub(super) fn finish_demote(&mut self, req: ReqId, result: Result<(), String>) {
        self.demote = None;
        match result {
            Ok(()) => {
                self.role = Role::Secondary;
                self.fenced = false;
                self.split_brain = None;
                self.refused = None;
                self.event(ReplicaEvent::Demoted);
                if let Some(conn) = self.link.as_ref().filter(|l| l.phase != Phase::AwaitHello).map(|l| l.conn) {
                    self.send(conn, Frame::State { role: WireRole::Secondary, disk: wire_disk(self.sb.disk) });
                }
                self.complete(req, Ok(()));
            }
            Err(e) => {
                self.sb.set_flag(flags::PRIMARY, true);
                self.complete(req, Err(refusal(ErrorCode::Io, format!("demotion could not persist metadata: {e}"))));
            }
        }
    }

    pub(super) fn observe_epoch(&mut self, epoch: u64, reason: &str) {
        if epoch <= self.sb.known_epoch {
            return;
        }
        self.sb.known_epoch = epoch;
        self.sb_dirty = true;
        // Not superseded: a newer epoch seen while still primary means both served (two-node
        // mode, a forced promotion), a split brain that the policy or the operator resolves.
        if self.role == Role::Primary && epoch > self.sb.promoted_epoch && !self.fenced {
            self.fenced = true;
            self.event(ReplicaEvent::Fenced { epoch, reason: reason.to_string() });
        }
    }

    /// Fences a primary whose engine lost its lease. Writes still waiting for the peer fail
    /// now (see `fail_unacknowledged`), and are never completed locally if the link then
    /// drops (see `peer_finished`): the peer may serve in a newer epoch by then, and a
    /// write acknowledged here would be missing there. It is remembered on disk: the peer can only be promoted after this lease, so
    /// every change this replica holds that a newer primary lacks was refused to its
    /// writer, and the handshake may discard it (see `handshake`).
    pub(super) fn on_lease_lost(&mut self, reason: &str) {
        if self.role == Role::Primary && !self.fenced {
            self.fenced = true;
            self.sb.set_flag(flags::SUPERSEDED, true);
            self.persist(None, false);
            self.event(ReplicaEvent::Fenced { epoch: self.sb.known_epoch, reason: reason.to_string() });
            self.fail_unacknowledged(
                "this primary is fenced (its lease ended) before the peer acknowledged: not durable on the serving node",
            );
        }
    }

    pub(super) fn on_resolve(&mut self, req: ReqId, resolution: Resolution) {
        self.resolution = Some(resolution);
        self.split_brain = None;
        self.complete(req, Ok(()));
        // An established link renegotiates so the choice is applied at once.
        if let Some(conn) = self.conn() {
            self.close(conn, "split-brain resolution chosen: renegotiating", RETRY_SOON_MS);
        }
    }
}
