//! The activity log: the set of 4 MiB extents a primary may have writes in flight to.
//!
//! Before the first write to an extent that is not "hot", a transaction naming it is made
//! durable; only then is the data written. After a primary crash every extent the log names
//! is treated as out of sync, so a crashed primary resyncs its hot extents instead of the
//! whole volume, and a dirty bit that was only in memory is never lost: an extent leaves
//! the log only after the bitmap pages covering it are on disk.
//!
//! On disk the log is a ring of 4 KiB transaction blocks. Each block carries the slot
//! updates of one admission plus a rotating window of the complete slot table, so replaying
//! every intact block of the ring in sequence order rebuilds the table even though no block
//! holds all of it. A torn last block fails its checksum and is ignored: the write it was
//! guarding had not been issued.

use std::collections::HashMap;
use std::ops::Range;

pub const AL_BLOCK_SIZE: usize = 4096;
/// Slot updates one transaction can carry.
pub const MAX_UPDATES: usize = 64;
/// Slots of the full table each transaction rewrites.
pub const CONTEXT_PER_BLOCK: usize = 880;

const MAGIC: u32 = 0x4850_414c; // "HPAL"
const VERSION: u32 = 1;
const EMPTY: u32 = u32::MAX;
const UPDATES_AT: usize = 40;
const CONTEXT_AT: usize = UPDATES_AT + MAX_UPDATES * 8;
const CRC_AT: usize = AL_BLOCK_SIZE - 4;

/// Ring length needed so that the blocks written since any slot was last rewritten all
/// survive, even when the newest block is torn.
pub fn ring_len_for(slots: u32) -> u32 {
    let rotation = (slots as usize).div_ceil(CONTEXT_PER_BLOCK) as u32;
    (rotation + 2).max(4)
}

/// A durable update to make before the write that needed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    pub seq: u64,
    /// Index of the ring block to overwrite.
    pub ring_index: u32,
    pub block: Vec<u8>,
    /// Extents that left the log; their bitmap pages must be on disk first.
    pub evicted: Vec<u64>,
}

/// Outcome of asking the log to cover a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Covered; persist the transaction (if any) before writing the data.
    Ready(Option<AlTransaction>),
    /// Every slot that could be reused still has writes in flight; retry after one completes.
    Busy,
}

#[derive(Clone, PartialEq, Eq)]
pub struct ActivityLog {
    format_id: u64,
    ring_len: u32,
    slots: Vec<u32>,
    index: HashMap<u32, usize>,
    refs: Vec<u32>,
    last_used: Vec<u64>,
    clock: u64,
    next_seq: u64,
    cursor: usize,
}

impl std::fmt::Debug for ActivityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityLog")
            .field("slots", &self.slots.len())
            .field("active", &self.index.len())
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl ActivityLog {
    /// An empty log of `slots` slots, writing into a ring of `ring_len` blocks.
    pub fn new(format_id: u64, slots: u32, ring_len: u32) -> Self {
        let n = slots as usize;
        ActivityLog {
            format_id,
            ring_len: ring_len.max(1),
            slots: vec![EMPTY; n],
            index: HashMap::new(),
            refs: vec![0; n],
            last_used: vec![0; n],
            clock: 0,
            next_seq: 1,
            cursor: 0,
        }
    }

    /// Rebuilds the log from the ring's blocks as read from disk (in ring order).
    /// Blocks that are blank, torn or from another metadata instance are skipped.
    pub fn recover(format_id: u64, slots: u32, ring: &[Vec<u8>]) -> Self {
        let mut log = ActivityLog::new(format_id, slots, u32::try_from(ring.len()).unwrap_or(u32::MAX));
        let mut txs: Vec<DecodedTx> = ring.iter().filter_map(|b| decode(b, format_id, slots)).collect();
        txs.sort_by_key(|t| t.seq);
        for tx in &txs {
            for &(slot, extent) in &tx.updates {
                log.slots[slot] = extent;
            }
            // The window wraps around the end of the table.
            let n = log.slots.len();
            for (i, &extent) in tx.context.iter().enumerate() {
                log.slots[(tx.context_start + i) % n] = extent;
            }
        }
        log.next_seq = txs.last().map_or(1, |t| t.seq + 1);
        log.cursor = txs.last().map_or(0, |t| (t.context_start + t.context.len()) % log.slots.len().max(1));
        log.reindex();
        log
    }

    fn reindex(&mut self) {
        self.index.clear();
        for (slot, &extent) in self.slots.iter().enumerate() {
            if extent != EMPTY {
                // A duplicate can only come from a corrupted table; the later slot wins and
                // the earlier one is simply reused.
                self.index.insert(extent, slot);
            }
        }
    }

    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn ring_len(&self) -> u32 {
        self.ring_len
    }

    /// Extents currently named by the log, ascending.
    pub fn active_extents(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.index.keys().map(|&e| u64::from(e)).collect();
        v.sort_unstable();
        v
    }

    /// Whether any write is still in flight under the log.
    pub fn in_flight(&self) -> bool {
        self.refs.iter().any(|&r| r > 0)
    }

    /// Covers a write to `extents`: takes a reference on each, and returns the transaction
    /// to persist if any extent was not already hot. Nothing changes when the answer is
    /// [`Admission::Busy`].
    pub fn admit(&mut self, extents: Range<u64>) -> Admission {
        let wanted: Vec<u32> = extents.filter_map(|e| u32::try_from(e).ok()).collect();
        let missing: Vec<u32> = wanted.iter().copied().filter(|e| !self.index.contains_key(e)).collect();
        if missing.len() > MAX_UPDATES || missing.len() > self.slots.len() {
            return Admission::Busy;
        }
        // Choose victims: empty slots first, then the least recently used idle slots that
        // this write does not itself need.
        let mut candidates: Vec<usize> =
            (0..self.slots.len()).filter(|&s| self.refs[s] == 0 && !wanted.contains(&self.slots[s])).collect();
        candidates.sort_by_key(|&s| (self.slots[s] != EMPTY, self.last_used[s]));
        if candidates.len() < missing.len() {
            return Admission::Busy;
        }
        let mut updates = Vec::with_capacity(missing.len());
        let mut evicted = Vec::new();
        for (&extent, &slot) in missing.iter().zip(candidates.iter()) {
            let old = self.slots[slot];
            if old != EMPTY {
                self.index.remove(&old);
                evicted.push(u64::from(old));
            }
            self.slots[slot] = extent;
            self.index.insert(extent, slot);
            updates.push((slot, extent));
        }
        self.clock += 1;
        for extent in &wanted {
            if let Some(&slot) = self.index.get(extent) {
                self.refs[slot] += 1;
                self.last_used[slot] = self.clock;
            }
        }
        if updates.is_empty() {
            return Admission::Ready(None);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let block = self.encode(seq, &updates);
        let ring_index = (seq % u64::from(self.ring_len)) as u32;
        evicted.sort_unstable();
        Admission::Ready(Some(AlTransaction { seq, ring_index, block, evicted }))
    }

    /// Drops the references [`ActivityLog::admit`] took.
    pub fn release(&mut self, extents: Range<u64>) {
        for extent in extents {
            let Ok(e) = u32::try_from(extent) else { continue };
            if let Some(&slot) = self.index.get(&e) {
                self.refs[slot] = self.refs[slot].saturating_sub(1);
            }
        }
    }

    fn encode(&mut self, seq: u64, updates: &[(usize, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; AL_BLOCK_SIZE];
        let n = self.slots.len();
        let ctx_start = if n == 0 { 0 } else { self.cursor % n };
        let ctx_len = CONTEXT_PER_BLOCK.min(n);
        put_u32(&mut b, 0, MAGIC);
        put_u32(&mut b, 4, VERSION);
        put_u64(&mut b, 8, self.format_id);
        put_u64(&mut b, 16, seq);
        put_u32(&mut b, 24, updates.len() as u32);
        put_u32(&mut b, 28, ctx_start as u32);
        put_u32(&mut b, 32, ctx_len as u32);
        put_u32(&mut b, 36, n as u32);
        for (i, &(slot, extent)) in updates.iter().enumerate() {
            put_u32(&mut b, UPDATES_AT + i * 8, slot as u32);
            put_u32(&mut b, UPDATES_AT + i * 8 + 4, extent);
        }
        for i in 0..ctx_len {
            let extent = self.slots[(ctx_start + i) % n];
            put_u32(&mut b, CONTEXT_AT + i * 4, extent);
        }
        if n > 0 {
            self.cursor = (ctx_start + ctx_len) % n;
        }
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        put_u32(&mut b, CRC_AT, crc);
        b
    }
}

struct DecodedTx {
    seq: u64,
    updates: Vec<(usize, u32)>,
    context_start: usize,
    context: Vec<u32>,
}

/// Decodes one ring block, or `None` when it is not an intact transaction of this log.
fn decode(b: &[u8], format_id: u64, slots: u32) -> Option<DecodedTx> {
    if b.len() != AL_BLOCK_SIZE || get_u32(b, 0) != MAGIC || get_u32(b, 4) != VERSION {
        return None;
    }
    if crc32c::crc32c(&b[..CRC_AT]) != get_u32(b, CRC_AT) || get_u64(b, 8) != format_id {
        return None;
    }
    let n_updates = get_u32(b, 24) as usize;
    let ctx_start = get_u32(b, 28) as usize;
    let ctx_len = get_u32(b, 32) as usize;
    let table = get_u32(b, 36);
    let n = slots as usize;
    if table != slots
        || n_updates > MAX_UPDATES
        || ctx_len > CONTEXT_PER_BLOCK
        || ctx_len > n
        || (n > 0 && ctx_start >= n)
    {
        return None;
    }
    let mut updates = Vec::with_capacity(n_updates);
    for i in 0..n_updates {
        let slot = get_u32(b, UPDATES_AT + i * 8) as usize;
        if slot >= n {
            return None;
        }
        updates.push((slot, get_u32(b, UPDATES_AT + i * 8 + 4)));
    }
    let context: Vec<u32> = (0..ctx_len).map(|i| get_u32(b, CONTEXT_AT + i * 4)).collect();
    Some(DecodedTx { seq: get_u64(b, 16), updates, context_start: ctx_start, context })
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ring_of(log: &ActivityLog) -> Vec<Vec<u8>> {
        vec![vec![0u8; AL_BLOCK_SIZE]; log.ring_len() as usize]
    }

    fn apply(ring: &mut [Vec<u8>], a: &Admission) {
        if let Admission::Ready(Some(tx)) = a {
            ring[tx.ring_index as usize] = tx.block.clone();
        }
    }

    #[test]
    fn admits_hot_extents_without_a_transaction() {
        let mut log = ActivityLog::new(9, 7, ring_len_for(7));
        let a = log.admit(3..5);
        let Admission::Ready(Some(tx)) = &a else { panic!("expected a transaction, got {a:?}") };
        assert_eq!(tx.seq, 1);
        assert!(tx.evicted.is_empty());
        assert_eq!(log.admit(3..4), Admission::Ready(None));
        assert_eq!(log.active_extents(), vec![3, 4]);
    }

    #[test]
    fn evicts_least_recently_used_idle_extent_and_reports_it() {
        let mut log = ActivityLog::new(9, 7, ring_len_for(7));
        for e in 0..7 {
            log.admit(e..e + 1);
            log.release(e..e + 1);
        }
        log.admit(0..1); // 0 becomes the most recently used
        log.release(0..1);
        let Admission::Ready(Some(tx)) = log.admit(100..101) else { panic!("expected a transaction") };
        assert_eq!(tx.evicted, vec![1]);
        assert_eq!(log.active_extents(), vec![0, 2, 3, 4, 5, 6, 100]);
    }

    #[test]
    fn busy_when_every_slot_has_writes_in_flight() {
        let mut log = ActivityLog::new(9, 7, ring_len_for(7));
        for e in 0..7 {
            assert!(matches!(log.admit(e..e + 1), Admission::Ready(Some(_))));
        }
        let before = log.clone();
        assert_eq!(log.admit(50..51), Admission::Busy);
        assert_eq!(log, before, "a refused admission changes nothing");
        log.release(4..5);
        let Admission::Ready(Some(tx)) = log.admit(50..51) else { panic!("expected a transaction") };
        assert_eq!(tx.evicted, vec![4]);
    }

    #[test]
    fn recovery_replays_the_ring_even_for_tables_larger_than_one_block() {
        let slots = 2000;
        let mut log = ActivityLog::new(42, slots, ring_len_for(slots));
        let mut ring = ring_of(&log);
        for e in 0..5000u64 {
            let a = log.admit(e * 7 % 9000..e * 7 % 9000 + 1);
            apply(&mut ring, &a);
            log.release(e * 7 % 9000..e * 7 % 9000 + 1);
        }
        let recovered = ActivityLog::recover(42, slots, &ring);
        assert_eq!(recovered.active_extents(), log.active_extents());
        // A torn newest block loses at most that block's own update.
        let mut torn = ring.clone();
        let newest = ((log.next_seq - 1) % u64::from(log.ring_len())) as usize;
        torn[newest][100] ^= 0xff;
        let partial = ActivityLog::recover(42, slots, &torn);
        let lost: Vec<u64> =
            log.active_extents().into_iter().filter(|e| !partial.active_extents().contains(e)).collect();
        assert!(lost.len() <= 1, "lost {lost:?}");
    }

    #[test]
    fn foreign_and_blank_blocks_are_ignored() {
        let mut log = ActivityLog::new(1, 7, ring_len_for(7));
        let mut ring = ring_of(&log);
        apply(&mut ring, &log.admit(5..6));
        assert!(ActivityLog::recover(2, 7, &ring).active_extents().is_empty(), "other format id");
        assert!(ActivityLog::recover(1, 8, &ring).active_extents().is_empty(), "other table size");
        assert_eq!(ActivityLog::recover(1, 7, &ring).active_extents(), vec![5]);
        let recovered = ActivityLog::recover(1, 7, &ring);
        assert_eq!(recovered.next_seq, 2);
    }
}
