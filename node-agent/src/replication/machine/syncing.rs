//! Resync: the bitmap exchange, then the source serving and the target fetching what differs.

use bytes::Bytes;

use super::messages::{DiscardRecord, IoOp, IoTag, MetaPurpose, ReplicaEvent};
use super::{ConnId, Machine, Phase, RETRY_LATER_MS};
use crate::replication::geometry::{BLOCK_SIZE, blocks_touched};
use crate::replication::handshake::SyncReason;
use crate::replication::metadata::{StoredDisk, flags};
use crate::replication::resync::{ProgressMeter, ResyncPlanner};
use crate::replication::wire::{Frame, MAX_DATA, WireDisk};

#[derive(Debug)]
pub(super) struct SyncRun {
    pub(super) source: bool,
    full: bool,
    reason: SyncReason,
    peer_gens: crate::replication::generation::Generations,
    got_peer_bitmap: bool,
    target_ready: bool,
    pub(super) planner: Option<ResyncPlanner>,
    pub(super) meter: ProgressMeter,
    pub(super) started_ms: u64,
    discard: Option<DiscardRecord>,
    resolved_by: Option<String>,
}

impl Machine {
    pub(super) fn begin_resync_as_source(&mut self, conn: ConnId, reason: SyncReason) {
        self.send(conn, Frame::StartResync);
        self.begin_sync(conn, true, false, reason, None);
    }

    /// Enters the bitmap exchange: both sides send their bitmaps; each merges the other's.
    pub(super) fn begin_sync(
        &mut self,
        conn: ConnId,
        source: bool,
        full: bool,
        reason: SyncReason,
        resolved_by: Option<String>,
    ) {
        let peer_gens = self.link.as_ref().and_then(|l| l.peer.as_ref()).map(|p| p.gens).unwrap_or_default();
        if full {
            self.bitmap.set_all();
        }
        if !source && self.sb.disk == StoredDisk::UpToDate {
            self.set_disk(StoredDisk::Outdated, "the peer has newer data");
        }
        let meter = ProgressMeter::new(self.bitmap.count() * BLOCK_SIZE, self.now);
        if let Some(link) = self.link.as_mut() {
            link.phase = Phase::Bitmaps { source };
            link.sync = Some(SyncRun {
                source,
                full,
                reason,
                peer_gens,
                got_peer_bitmap: false,
                target_ready: false,
                planner: None,
                meter,
                started_ms: self.now,
                discard: None,
                resolved_by,
            });
        }
        let mut pos = 0;
        loop {
            let (runs, next) = self.bitmap.encode_runs(pos, 32 << 10);
            let last = next >= self.blocks();
            self.send(conn, Frame::Bitmap { start: pos, last, runs: Bytes::from(runs) });
            pos = next;
            if last {
                break;
            }
        }
    }

    pub(super) fn on_peer_bitmap(&mut self, conn: ConnId, source: bool, start: u64, last: bool, runs: &[u8]) {
        if let Err(e) = self.bitmap.merge_runs(start, runs) {
            let r = format!("peer {} sent a bad bitmap: {e}", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        }
        if !last {
            return;
        }
        let total = self.bitmap.count() * BLOCK_SIZE;
        let (full, reason, resolved_by) = match self.link.as_mut().and_then(|l| l.sync.as_mut()) {
            Some(sync) => {
                sync.got_peer_bitmap = true;
                sync.meter = ProgressMeter::new(total, self.now);
                (sync.full, sync.reason, sync.resolved_by.clone())
            }
            None => return,
        };
        self.event(ReplicaEvent::SyncStarted { source, full, bytes: total, reason: reason.label() });
        if let Some(by) = resolved_by {
            let ranges: Vec<(u64, u64)> = self.bitmap.runs().iter().map(|r| (r.byte_offset(), r.byte_len())).collect();
            let total_ranges = ranges.len();
            let record =
                DiscardRecord { local_discarded: !source, resolved_by: by, ranges, total_ranges, bytes: total };
            self.last_discard = Some(record.clone());
            if let Some(sync) = self.link.as_mut().and_then(|l| l.sync.as_mut()) {
                sync.discard = Some(record.clone());
            }
            self.event(ReplicaEvent::Discarded(record));
        }
        if source {
            self.set_phase(Phase::Syncing { source: true });
        } else {
            // Persist the union and the Inconsistent state before any resync data lands.
            self.set_disk(StoredDisk::Inconsistent, "sync target: receiving resync data");
            self.bitmap.mark_all_pages_dirty();
            self.persist(Some(IoTag::Meta(MetaPurpose::SyncTargetReady(conn))), true);
            self.set_phase(Phase::Syncing { source: false });
        }
    }

    pub(super) fn target_ready(&mut self, conn: ConnId) {
        let limits = self.cfg.resync;
        let planner = ResyncPlanner::new(&self.bitmap, limits, self.now);
        if let Some(sync) = self.link.as_mut().filter(|l| l.conn == conn).and_then(|l| l.sync.as_mut()) {
            sync.target_ready = true;
            sync.planner = Some(planner);
        }
        self.poll_resync();
    }

    pub(super) fn poll_resync(&mut self) {
        let now = self.now;
        let Some(link) = self.link.as_mut() else { return };
        let conn = link.conn;
        let Some(sync) = link.sync.as_mut().filter(|s| !s.source && s.target_ready) else { return };
        let Some(planner) = sync.planner.as_mut() else { return };
        if planner.finished(&self.bitmap) {
            self.finish_target(conn);
            return;
        }
        if planner.stuck(&self.bitmap) {
            let reason = "resync made no progress over repeated passes".to_string();
            self.close(conn, &reason, RETRY_LATER_MS);
            return;
        }
        let poll = planner.poll(&self.bitmap, now);
        for range in poll.requests {
            let len = u32::try_from(range.byte_len()).unwrap_or(MAX_DATA);
            self.send(conn, Frame::ResyncRequest { offset: range.byte_offset(), len });
        }
    }

    pub(super) fn on_resync_request(&mut self, conn: ConnId, offset: u64, len: u32) {
        let range = blocks_touched(offset, u64::from(len));
        if !offset.is_multiple_of(BLOCK_SIZE) || u64::from(len) % BLOCK_SIZE != 0 || range.end > self.blocks() {
            let r = format!("peer {} requested resync data outside the volume", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        }
        self.reads.push(range);
        self.io(IoOp::Read { tag: IoTag::ResyncRead { conn, range }, offset, len });
    }

    pub(super) fn on_resync_reply(&mut self, conn: ConnId, offset: u64, data: Bytes, zero_len: u32) {
        let len = if data.is_empty() { u64::from(zero_len) } else { data.len() as u64 };
        let range = blocks_touched(offset, len);
        let expected = self
            .link
            .as_ref()
            .and_then(|l| l.sync.as_ref())
            .and_then(|s| s.planner.as_ref())
            .is_some_and(|p| p.is_in_flight(range) && offset.is_multiple_of(BLOCK_SIZE) && len % BLOCK_SIZE == 0);
        if !expected {
            let r = format!("peer {} sent resync data that was not requested (offset {offset})", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        }
        self.counters.resync_bytes_received += len;
        let tag = IoTag::ResyncWrite { conn, range };
        if data.is_empty() {
            self.io(IoOp::Zero { tag, offset, len, punch: false, fua: false });
        } else {
            self.io(IoOp::Write { tag, offset, data, fua: false });
        }
    }

    fn finish_target(&mut self, conn: ConnId) {
        let Some(sync) = self.link.as_mut().and_then(|l| l.sync.as_mut()) else { return };
        if sync.planner.is_none() {
            return;
        }
        // Only one completion: drop the planner so later ticks do not finish again.
        if let Some(planner) = sync.planner.take() {
            sync.meter = planner.meter().clone();
        }
        let mut gens = sync.peer_gens;
        gens.finish_tracking();
        self.sb.gens = gens;
        self.sb.set_flag(flags::CRASHED_PRIMARY, false);
        self.sb.set_flag(flags::DATA_ZEROED, false);
        self.sb.set_flag(flags::SUPERSEDED, false);
        self.set_disk(StoredDisk::UpToDate, "resync completed");
        self.persist(Some(IoTag::Meta(MetaPurpose::SyncTargetDone(conn))), true);
    }

    pub(super) fn on_sync_done(&mut self, conn: ConnId, gens: crate::replication::generation::Generations) {
        let mut expected = self.sb.gens;
        expected.finish_tracking();
        if gens != expected {
            let r = format!("peer {} finished the resync with unexpected generations {gens:?}", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        }
        self.sb.gens = expected;
        self.sb.set_flag(flags::CRASHED_PRIMARY, false);
        self.sb.set_flag(flags::DATA_ZEROED, false);
        self.sb.set_flag(flags::SUPERSEDED, false);
        let (bytes, elapsed) = self
            .link
            .as_ref()
            .and_then(|l| l.sync.as_ref())
            .map(|s| (s.meter.done(), self.now.saturating_sub(s.started_ms)))
            .unwrap_or_default();
        if let Some(link) = self.link.as_mut() {
            link.sync = None;
            link.phase = Phase::Ready;
            link.peer_disk = WireDisk::UpToDate;
            if let Some(p) = link.peer.as_mut() {
                p.gens = expected;
            }
        }
        self.persist(Some(IoTag::Meta(MetaPurpose::SyncSourceDone)), true);
        self.counters.last_sync_bytes = bytes;
        self.counters.last_sync_ms = elapsed;
        self.counters.syncs_completed += 1;
        self.event(ReplicaEvent::SyncFinished { source: true, bytes, elapsed_ms: elapsed });
    }
}
