//! Making state durable: superblock and bitmap-page updates, disk state, generation tracking.

use hapair_crds::volume::DiskState;

use super::Machine;
use super::Role;
use super::messages::{IoOp, IoTag, MetaStep, ReplicaEvent};
use super::{Phase, wire_disk};
use crate::replication::metadata::{StoredDisk, encode_bitmap_page};
use crate::replication::wire::Frame;

impl Machine {
    pub(super) fn fresh_gen(&mut self) -> u64 {
        // splitmix64: deterministic given the seed, so tests can predict identifiers.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) | 0x100
    }

    fn superblock_steps(&mut self) -> Vec<MetaStep> {
        self.sb.seq += 1;
        self.sb_dirty = false;
        let slot = (self.sb.seq % 2) as usize;
        vec![MetaStep::Write { offset: self.cfg.layout.superblock_offset(slot), bytes: self.sb.encode() }]
    }

    pub(super) fn bitmap_steps(&mut self) -> Vec<MetaStep> {
        let pages = self.bitmap.take_dirty_pages();
        pages
            .into_iter()
            .map(|p| MetaStep::Write {
                offset: self.cfg.layout.bitmap_page_offset(p),
                bytes: encode_bitmap_page(&self.bitmap, p, self.sb.format_id),
            })
            .collect()
    }

    /// Persists the superblock, after the changed bitmap pages when `with_bitmap`.
    pub(super) fn persist(&mut self, tag: Option<IoTag>, with_bitmap: bool) {
        let mut steps = Vec::new();
        if with_bitmap {
            // Clearing a bit on disk is only safe once the data it stood for is durable.
            steps.push(MetaStep::SyncData);
            steps.extend(self.bitmap_steps());
        }
        steps.extend(self.superblock_steps());
        self.io(IoOp::Meta { tag, steps });
    }

    pub(super) fn disk_state(&self) -> DiskState {
        match self.sb.disk {
            StoredDisk::UpToDate => DiskState::UpToDate,
            StoredDisk::Inconsistent => DiskState::Inconsistent,
            StoredDisk::Outdated => DiskState::Outdated,
        }
    }

    pub(super) fn set_disk(&mut self, disk: StoredDisk, reason: &str) {
        if self.sb.disk == disk {
            return;
        }
        let from = self.disk_state();
        self.sb.disk = disk;
        self.sb_dirty = true;
        let to = self.disk_state();
        self.event(ReplicaEvent::DiskStateChanged { from, to, reason: reason.to_string() });
        if let Some(conn) = self.link.as_ref().filter(|l| l.phase != Phase::AwaitHello).map(|l| l.conn) {
            let frame = Frame::State { role: self.wire_role(), disk: wire_disk(disk) };
            self.send(conn, frame);
        }
    }

    /// Starts tracking changes the peer will not receive (DRBD's new current UUID), made
    /// durable before the write that caused it.
    pub(super) fn ensure_tracking(&mut self) {
        if self.sb.gens.bitmap == 0 && self.role == Role::Primary {
            let fresh = self.fresh_gen();
            self.sb.gens.start_tracking(fresh);
            self.persist(None, false);
        }
    }
}
