//! Online verify: comparing block digests with the peer and marking mismatches out of sync.

use super::Phase;
use super::Role;
use super::messages::{ErrorCode, IoOp, IoTag, ReplicaEvent, refusal};
use super::{ConnId, Machine, RETRY_LATER_MS, ReqId};
use crate::replication::geometry::{BLOCK_SIZE, BlockRange};
use crate::replication::handshake::SyncReason;
use crate::replication::verify::VerifyPlanner;
use crate::replication::wire::{Frame, MAX_DATA};

#[derive(Debug)]
pub(super) struct VerifyRun {
    pub(super) conn: ConnId,
    pub(super) planner: VerifyPlanner,
    pub(super) started_ms: u64,
}

impl Machine {
    pub(super) fn on_start_verify(&mut self, req: ReqId) {
        let Some(link) = self.link.as_ref() else {
            self.complete(req, Err(refusal(ErrorCode::NotPermitted, "not connected to the peer")));
            return;
        };
        if link.phase != Phase::Ready {
            self.complete(req, Err(refusal(ErrorCode::Busy, "the replicas are not in sync yet")));
            return;
        }
        if self.verify.is_some() {
            self.complete(req, Err(refusal(ErrorCode::Busy, "a verify is already running")));
            return;
        }
        let conn = link.conn;
        let planner = VerifyPlanner::new(self.blocks(), 256, self.cfg.resync.rate, self.now);
        self.verify = Some(VerifyRun { conn, planner, started_ms: self.now });
        self.complete(req, Ok(()));
        self.poll_verify();
    }

    pub(super) fn poll_verify(&mut self) {
        let now = self.now;
        let Some(v) = self.verify.as_mut() else { return };
        let conn = v.conn;
        if v.planner.finished() {
            let mismatched: Vec<(u64, u64)> =
                v.planner.mismatched().iter().map(|r| (r.byte_offset(), r.byte_len())).collect();
            let checked = v.planner.progress(now).done_bytes;
            let elapsed_ms = now.saturating_sub(v.started_ms);
            self.verify = None;
            let bytes: u64 = mismatched.iter().map(|(_, l)| l).sum();
            self.counters.verify_mismatched_bytes = bytes;
            self.counters.verifies_completed += 1;
            self.last_verify = Some(mismatched.clone());
            self.event(ReplicaEvent::VerifyFinished { mismatched, checked_bytes: checked, elapsed_ms });
            let ready = self.link.as_ref().is_some_and(|l| l.conn == conn && l.phase == Phase::Ready);
            if ready && self.role == Role::Primary && !self.bitmap.is_empty() {
                self.begin_resync_as_source(conn, SyncReason::OutOfSyncBlocks);
            }
            return;
        }
        let (chunks, _) = v.planner.poll(now);
        for range in chunks {
            self.reads.push(range);
            let len = u32::try_from(range.byte_len()).unwrap_or(MAX_DATA);
            self.io(IoOp::Digest {
                tag: IoTag::VerifyLocal { start: range.start, range },
                offset: range.byte_offset(),
                len,
            });
            self.send(conn, Frame::VerifyRequest { offset: range.byte_offset(), len });
        }
    }

    pub(super) fn on_verify_reply(&mut self, conn: ConnId, offset: u64, digests: Vec<u128>) {
        let now = self.now;
        let Some(v) = self.verify.as_mut().filter(|v| v.conn == conn) else {
            let r = format!("peer {} sent verify digests nobody asked for", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        };
        match v.planner.peer(offset / BLOCK_SIZE, digests, now) {
            Ok(result) => self.mark_mismatches(conn, &result.mismatched),
            Err(e) => {
                let r = format!("peer {} sent bad verify digests: {e}", self.cfg.peer);
                self.close(conn, &r, RETRY_LATER_MS);
            }
        }
        self.poll_verify();
    }

    pub(super) fn mark_mismatches(&mut self, conn: ConnId, ranges: &[BlockRange]) {
        for r in ranges {
            self.bitmap.set_range(*r);
            self.send(conn, Frame::OutOfSync { offset: r.byte_offset(), len: r.byte_len() });
        }
    }
}
