//! Application requests: admission, the activity log, mirroring to the peer, completion.

use std::ops::Range;

use bytes::Bytes;

use super::Phase;
use super::Role;
use super::messages::{ErrorCode, IoOp, IoTag, MetaPurpose, MetaStep, Output, Refusal, refusal};
use super::{ConnId, Machine, ReqId};
use crate::replication::activity_log::Admission;
use crate::replication::geometry::{BlockRange, blocks_touched, extents_touched};
use crate::replication::wire::{Frame, WireProtocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReqKind {
    Write,
    Zero,
    Flush,
}

/// An application request in flight. It is *completed* (the client told) once local and
/// peer are done as the protocol requires, and *retired* (its activity-log reference
/// dropped) only once the peer acknowledged it, so under protocol A an extent stays hot
/// until the peer really has the data.
#[derive(Debug)]
pub(super) struct AppReq {
    kind: ReqKind,
    range: BlockRange,
    extents: Range<u64>,
    pub(super) local_done: bool,
    peer_sent: bool,
    peer_acked: bool,
    completed: bool,
    pub(super) error: Option<Refusal>,
}

#[derive(Debug)]
pub(super) enum Stalled {
    Write { req: ReqId, offset: u64, data: Bytes, fua: bool },
    Zero { req: ReqId, offset: u64, len: u64, fua: bool, punch: bool },
    Flush { req: ReqId },
}

impl Stalled {
    pub(super) fn req(&self) -> ReqId {
        match self {
            Stalled::Write { req, .. } | Stalled::Zero { req, .. } | Stalled::Flush { req } => *req,
        }
    }
}

impl Machine {
    pub(super) fn writes_allowed(&self) -> Result<(), Refusal> {
        if self.role != Role::Primary {
            return Err(refusal(ErrorCode::NotPermitted, "the volume is secondary here: read-only"));
        }
        if self.fenced {
            return Err(refusal(ErrorCode::NotPermitted, "a newer epoch exists: this primary is fenced"));
        }
        if self.demote.is_some() {
            return Err(refusal(ErrorCode::NotPermitted, "the volume is being demoted"));
        }
        Ok(())
    }

    pub(super) fn on_app(&mut self, op: Stalled) {
        if let Err(e) = self.writes_allowed() {
            self.complete(op.req(), Err(e));
            return;
        }
        if let Stalled::Write { offset, data, .. } = &op
            && (offset.checked_add(data.len() as u64).is_none_or(|end| end > self.size()) || data.is_empty())
        {
            self.complete(op.req(), Err(refusal(ErrorCode::OutOfRange, "write outside the volume")));
            return;
        }
        if let Stalled::Zero { offset, len, .. } = &op
            && (offset.checked_add(*len).is_none_or(|end| end > self.size()) || *len == 0)
        {
            self.complete(op.req(), Err(refusal(ErrorCode::OutOfRange, "zero outside the volume")));
            return;
        }
        self.stalled.push_back(op);
    }

    /// Starts stalled requests in order until one cannot start yet.
    pub(super) fn pump_stalled(&mut self) {
        while let Some(op) = self.stalled.pop_front() {
            if let Err(e) = self.writes_allowed() {
                self.complete(op.req(), Err(e));
                continue;
            }
            match self.try_start(op) {
                Ok(()) => {}
                Err(op) => {
                    self.stalled.push_front(op);
                    return;
                }
            }
        }
    }

    fn try_start(&mut self, op: Stalled) -> Result<(), Stalled> {
        if self.link.as_ref().is_some_and(|l| l.phase == Phase::AwaitHello) {
            // Both sides must see stable state while they compare it.
            return Err(op);
        }
        let (req, kind, offset, len) = match &op {
            Stalled::Write { req, offset, data, .. } => (*req, ReqKind::Write, *offset, data.len() as u64),
            Stalled::Zero { req, offset, len, .. } => (*req, ReqKind::Zero, *offset, *len),
            Stalled::Flush { req } => (*req, ReqKind::Flush, 0, 0),
        };
        if kind == ReqKind::Flush {
            self.start_flush(req);
            return Ok(());
        }
        let range = blocks_touched(offset, len);
        if self.reads.iter().any(|r| r.overlaps(&range)) {
            return Err(op);
        }
        let extents = extents_touched(offset, len);
        match self.al.admit(extents.clone()) {
            Admission::Busy => return Err(op),
            Admission::Ready(None) => {}
            Admission::Ready(Some(tx)) => {
                let mut steps = Vec::new();
                if !tx.evicted.is_empty() {
                    steps.extend(self.bitmap_steps());
                }
                steps.push(MetaStep::Write { offset: self.cfg.layout.al_block_offset(tx.ring_index), bytes: tx.block });
                self.io(IoOp::Meta { tag: Some(IoTag::Meta(MetaPurpose::ActivityLog)), steps });
                self.al_unsynced += 1;
                self.counters.al_transactions += 1;
            }
        }
        let replicate = self.link.as_ref().filter(|l| l.replicating()).map(|l| l.conn);
        let mut peer_acked = true;
        if let Some(conn) = replicate {
            let seq = self.next_seq;
            self.next_seq += 1;
            let frame = match &op {
                Stalled::Write { offset, data, fua, .. } => {
                    Frame::Data { seq, offset: *offset, fua: *fua, data: data.clone() }
                }
                Stalled::Zero { offset, len, fua, punch, .. } => {
                    Frame::Zero { seq, offset: *offset, len: *len, fua: *fua, punch: *punch }
                }
                Stalled::Flush { .. } => return Ok(()),
            };
            let notify_sent = self.cfg.protocol == WireProtocol::A;
            let epoch = self.sb.known_epoch;
            self.out.push(Output::Send { conn, frame, epoch, notify_sent });
            self.peer_pending.insert(seq, req);
            peer_acked = false;
        } else {
            self.ensure_tracking();
            self.bitmap.set_range(range);
        }
        match op {
            Stalled::Write { offset, data, fua, .. } => {
                self.io(IoOp::Write { tag: IoTag::App(req), offset, data, fua });
            }
            Stalled::Zero { offset, len, fua, punch, .. } => {
                self.io(IoOp::Zero { tag: IoTag::App(req), offset, len, punch, fua });
            }
            Stalled::Flush { .. } => {}
        }
        self.requests.insert(
            req,
            AppReq {
                kind,
                range,
                extents,
                local_done: false,
                peer_sent: peer_acked,
                peer_acked,
                completed: false,
                error: None,
            },
        );
        Ok(())
    }

    fn start_flush(&mut self, req: ReqId) {
        self.io(IoOp::Flush { tag: IoTag::AppFlush(req) });
        let mut peer_acked = true;
        if let Some(conn) = self.link.as_ref().filter(|l| l.replicating()).map(|l| l.conn) {
            let seq = self.next_seq;
            self.next_seq += 1;
            let epoch = self.sb.known_epoch;
            let notify_sent = self.cfg.protocol == WireProtocol::A;
            self.out.push(Output::Send { conn, frame: Frame::Flush { seq }, epoch, notify_sent });
            self.peer_flushes.insert(seq, req);
            peer_acked = false;
        }
        self.requests.insert(
            req,
            AppReq {
                kind: ReqKind::Flush,
                range: BlockRange::new(0, 0),
                extents: 0..0,
                local_done: false,
                peer_sent: peer_acked,
                peer_acked,
                completed: false,
                error: None,
            },
        );
    }

    pub(super) fn maybe_finish(&mut self, req: ReqId) {
        let protocol_a = self.cfg.protocol == WireProtocol::A;
        let fenced = self.fenced;
        let Some(r) = self.requests.get_mut(&req) else { return };
        if !r.local_done {
            return;
        }
        let mut result = None;
        // A fenced primary's failed request is answered without waiting for the peer: it
        // fails whatever the peer says. It keeps its activity-log extents until the peer
        // answers or the link drops, as every request does.
        let failed_while_fenced = fenced && r.error.is_some();
        if !r.completed && (r.peer_acked || (protocol_a && r.peer_sent) || failed_while_fenced) {
            r.completed = true;
            result = Some(match r.error.clone() {
                Some(e) => Err(e),
                None => Ok(()),
            });
        }
        let retire = r.peer_acked;
        if let Some(result) = result {
            self.complete(req, result);
        }
        if retire
            && let Some(r) = self.requests.remove(&req)
            && r.kind != ReqKind::Flush
        {
            self.al.release(r.extents.clone());
        }
    }

    /// Fails every request the peer has not acknowledged yet. A primary whose lease ended
    /// may be superseded from now on, so none of them may succeed here; failing them at
    /// once rather than when the link times out (seconds later, if the peer is gone) lets
    /// their writers move to the new primary sooner.
    pub(super) fn fail_unacknowledged(&mut self, reason: &str) {
        let mut waiting: Vec<ReqId> =
            self.requests.iter().filter(|(_, r)| !r.peer_acked && !r.completed).map(|(id, _)| *id).collect();
        waiting.sort_unstable();
        for req in waiting {
            if let Some(r) = self.requests.get_mut(&req)
                && r.error.is_none()
            {
                r.error = Some(refusal(ErrorCode::Io, reason));
            }
            self.maybe_finish(req);
        }
    }

    /// The peer acknowledged (or can no longer acknowledge) a request.
    pub(super) fn peer_finished(&mut self, req: ReqId, ok: bool) {
        let mut lost = None;
        let fenced = self.fenced;
        if let Some(r) = self.requests.get_mut(&req) {
            r.peer_acked = true;
            r.peer_sent = true;
            if !ok && r.kind != ReqKind::Flush {
                lost = Some(r.range);
            }
            // Completing locally is what a primary that keeps its lease does when its peer
            // dies; a fenced one may already be superseded, so the writer must not see
            // success for something the serving node may not have.
            if !ok && fenced && r.error.is_none() {
                r.error = Some(refusal(
                    ErrorCode::Io,
                    "this primary is fenced and lost its peer before the peer acknowledged: not durable on the serving node",
                ));
            }
        }
        if let Some(range) = lost {
            // The peer does not have this write: it is out of sync from now on.
            self.ensure_tracking();
            self.bitmap.set_range(range);
        }
        self.maybe_finish(req);
    }

    pub(super) fn on_sent(&mut self, conn: ConnId, seq: u64) {
        if self.conn() != Some(conn) || self.cfg.protocol != WireProtocol::A {
            return;
        }
        // Protocol A completes on send; the ack later retires the request.
        if let Some(&req) = self.peer_pending.get(&seq).or_else(|| self.peer_flushes.get(&seq))
            && let Some(r) = self.requests.get_mut(&req)
        {
            r.peer_sent = true;
            self.maybe_finish(req);
        }
    }
}
