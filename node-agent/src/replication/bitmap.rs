//! The dirty bitmap: one bit per 4 KiB block, set where the two replicas may differ.
//!
//! The in-memory bitmap also remembers which of its on-disk pages changed since they were
//! last written, so the metadata store writes only those. Runs of set bits travel to the
//! peer run-length encoded (see [`Bitmap::encode_runs`]), which keeps the handshake small
//! for the scattered-but-sparse dirty sets replication produces.

use std::collections::BTreeSet;

use super::geometry::BlockRange;

/// Bytes the metadata store puts before each on-disk page's payload (magic, page index,
/// format id, checksum); the page geometry is the bitmap's, so it is fixed here.
pub const PAGE_HEADER_BYTES: usize = 24;
/// Bytes of bitmap payload per on-disk page (a 4 KiB page minus its header).
pub const PAGE_PAYLOAD_BYTES: usize = 4096 - PAGE_HEADER_BYTES;
/// Blocks described by one on-disk page.
pub const BLOCKS_PER_PAGE: u64 = (PAGE_PAYLOAD_BYTES * 8) as u64;
const WORDS_PER_PAGE: usize = PAGE_PAYLOAD_BYTES / 8;

/// Why an encoded run list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunDecodeError {
    #[error("bitmap chunk starts at block {start}, beyond the volume's {blocks} blocks")]
    StartOutOfRange { start: u64, blocks: u64 },
    #[error("bitmap chunk runs past the volume's {blocks} blocks")]
    RunOutOfRange { blocks: u64 },
    #[error("bitmap chunk has a truncated or oversized run length")]
    BadVarint,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    blocks: u64,
    words: Vec<u64>,
    set: u64,
    dirty_pages: BTreeSet<u32>,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmap").field("blocks", &self.blocks).field("set", &self.set).finish()
    }
}

impl Bitmap {
    /// A clear bitmap for `blocks` blocks.
    pub fn new(blocks: u64) -> Self {
        let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX);
        Bitmap { blocks, words: vec![0; words], set: 0, dirty_pages: BTreeSet::new() }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn is_empty(&self) -> bool {
        self.set == 0
    }

    pub fn page_count(&self) -> u32 {
        page_count(self.blocks)
    }

    pub fn test(&self, block: u64) -> bool {
        if block >= self.blocks {
            return false;
        }
        let (w, b) = split(block);
        self.words[w] & (1 << b) != 0
    }

    /// Sets every bit in `range` (clipped to the volume); returns how many were newly set.
    pub fn set_range(&mut self, range: BlockRange) -> u64 {
        self.update_range(range, true)
    }

    /// Clears every bit in `range` (clipped to the volume); returns how many were set before.
    pub fn clear_range(&mut self, range: BlockRange) -> u64 {
        self.update_range(range, false)
    }

    pub fn set_all(&mut self) -> u64 {
        self.set_range(BlockRange::new(0, self.blocks))
    }

    pub fn clear_all(&mut self) -> u64 {
        self.clear_range(BlockRange::new(0, self.blocks))
    }

    /// Number of set bits inside `range`.
    pub fn count_range(&self, range: BlockRange) -> u64 {
        let end = range.end.min(self.blocks);
        let mut n = 0;
        let mut b = range.start;
        while b < end {
            let (w, bit) = split(b);
            let span = (64 - bit).min(end - b);
            let mask = mask(bit, span);
            n += u64::from((self.words[w] & mask).count_ones());
            b += span;
        }
        n
    }

    fn update_range(&mut self, range: BlockRange, value: bool) -> u64 {
        let end = range.end.min(self.blocks);
        let mut changed = 0u64;
        let mut b = range.start;
        while b < end {
            let (w, bit) = split(b);
            let span = (64 - bit).min(end - b);
            let mask = mask(bit, span);
            let before = self.words[w];
            let after = if value { before | mask } else { before & !mask };
            if after != before {
                changed += u64::from((before ^ after).count_ones());
                self.words[w] = after;
                self.dirty_pages.insert(page_of(b));
            }
            b += span;
        }
        if value {
            self.set += changed;
        } else {
            self.set -= changed;
        }
        changed
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let (mut w, bit) = split(from);
        let mut word = self.words[w] & (!0u64 << bit);
        loop {
            if word != 0 {
                let block = (w as u64) * 64 + u64::from(word.trailing_zeros());
                return (block < self.blocks).then_some(block);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }

    /// The first clear bit at or after `from`, or the volume's block count.
    pub fn next_clear(&self, from: u64) -> u64 {
        if from >= self.blocks {
            return self.blocks;
        }
        let (mut w, bit) = split(from);
        let mut word = !self.words[w] & (!0u64 << bit);
        loop {
            if word != 0 {
                let block = (w as u64) * 64 + u64::from(word.trailing_zeros());
                return block.min(self.blocks);
            }
            w += 1;
            if w >= self.words.len() {
                return self.blocks;
            }
            word = !self.words[w];
        }
    }

    /// The next run of set bits starting at or after `from`, at most `max_len` blocks long.
    pub fn next_run(&self, from: u64, max_len: u64) -> Option<BlockRange> {
        let start = self.next_set(from)?;
        let end = self.next_clear(start).min(start.saturating_add(max_len.max(1)));
        Some(BlockRange::new(start, end))
    }

    /// Every maximal run of set bits, in order.
    pub fn runs(&self) -> Vec<BlockRange> {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(run) = self.next_run(from, u64::MAX) {
            from = run.end;
            out.push(run);
        }
        out
    }

    /// Sets every bit that is set in `other` (same geometry); returns how many were new.
    pub fn merge(&mut self, other: &Bitmap) -> u64 {
        let mut added = 0;
        for run in other.runs() {
            added += self.set_range(run);
        }
        added
    }

    /// Pages changed since the last [`Bitmap::take_dirty_pages`], in order.
    pub fn take_dirty_pages(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.dirty_pages).into_iter().collect()
    }

    pub fn has_dirty_pages(&self) -> bool {
        !self.dirty_pages.is_empty()
    }

    /// Marks every page as changed, so the next persist writes the whole bitmap.
    pub fn mark_all_pages_dirty(&mut self) {
        self.dirty_pages = (0..self.page_count()).collect();
    }

    /// Marks the pages holding `range` as changed.
    pub fn mark_pages_dirty(&mut self, range: BlockRange) {
        if range.is_empty() {
            return;
        }
        let last = range.end.min(self.blocks).saturating_sub(1);
        for page in page_of(range.start)..=page_of(last) {
            if page < self.page_count() {
                self.dirty_pages.insert(page);
            }
        }
    }

    /// The payload of on-disk page `page`: its blocks' bits, little-endian, bit i of byte j
    /// describing block `page * BLOCKS_PER_PAGE + 8j + i`.
    pub fn page_payload(&self, page: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(PAGE_PAYLOAD_BYTES);
        let first = (page as usize) * WORDS_PER_PAGE;
        for i in 0..WORDS_PER_PAGE {
            let word = self.words.get(first + i).copied().unwrap_or(0);
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Loads on-disk page `page` from its payload; bits beyond the volume are ignored.
    pub fn load_page(&mut self, page: u32, payload: &[u8]) {
        let first = (page as usize) * WORDS_PER_PAGE;
        for (i, chunk) in payload.chunks_exact(8).take(WORDS_PER_PAGE).enumerate() {
            let Some(slot) = self.words.get_mut(first + i) else { break };
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *slot = u64::from_le_bytes(bytes);
        }
        self.trim_tail();
        self.recount();
    }

    /// Sets every bit of page `page` (used when the page on disk cannot be trusted).
    pub fn set_page(&mut self, page: u32) {
        let start = u64::from(page) * BLOCKS_PER_PAGE;
        self.set_range(BlockRange::new(start, start + BLOCKS_PER_PAGE));
    }

    fn trim_tail(&mut self) {
        let used = self.blocks % 64;
        if used != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << used) - 1;
        }
    }

    fn recount(&mut self) {
        self.set = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// Run-length encodes the bits of `[start, blocks)` into at most about `max_bytes`
    /// bytes: alternating clear and set run lengths as LEB128 varints, starting with a
    /// (possibly empty) clear run. Returns the encoding and the block where it stopped.
    pub fn encode_runs(&self, start: u64, max_bytes: usize) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut pos = start.min(self.blocks);
        let mut want_set = false;
        while pos < self.blocks && out.len() + 20 <= max_bytes.max(20) {
            let next = if want_set { self.next_clear(pos) } else { self.next_set(pos).unwrap_or(self.blocks) };
            put_varint(&mut out, next - pos);
            pos = next;
            want_set = !want_set;
        }
        // A chunk must end on a completed set run so the next chunk restarts with a clear run.
        if want_set {
            put_varint(&mut out, 0);
        }
        (out, pos)
    }

    /// Sets the bits described by a run list produced by [`Bitmap::encode_runs`] starting
    /// at `start`; returns the block after the last run.
    pub fn merge_runs(&mut self, start: u64, data: &[u8]) -> Result<u64, RunDecodeError> {
        let ranges = decode_runs(start, data, self.blocks)?;
        for range in &ranges.0 {
            self.set_range(*range);
        }
        Ok(ranges.1)
    }
}

/// Decodes a run list without applying it: the set ranges and the end position.
pub fn decode_runs(start: u64, data: &[u8], blocks: u64) -> Result<(Vec<BlockRange>, u64), RunDecodeError> {
    if start > blocks {
        return Err(RunDecodeError::StartOutOfRange { start, blocks });
    }
    let mut pos = start;
    let mut want_set = false;
    let mut rest = data;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, used) = get_varint(rest).ok_or(RunDecodeError::BadVarint)?;
        rest = &rest[used..];
        let end = pos.checked_add(len).filter(|e| *e <= blocks).ok_or(RunDecodeError::RunOutOfRange { blocks })?;
        if want_set && len > 0 {
            out.push(BlockRange::new(pos, end));
        }
        pos = end;
        want_set = !want_set;
    }
    Ok((out, pos))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(data: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in data.iter().enumerate().take(10) {
        let part = u64::from(byte & 0x7f);
        if i == 9 && part > 1 {
            return None;
        }
        v |= part << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

pub fn page_count(blocks: u64) -> u32 {
    u32::try_from(blocks.div_ceil(BLOCKS_PER_PAGE)).unwrap_or(u32::MAX)
}

fn page_of(block: u64) -> u32 {
    u32::try_from(block / BLOCKS_PER_PAGE).unwrap_or(u32::MAX)
}

fn split(block: u64) -> (usize, u64) {
    ((block / 64) as usize, block % 64)
}

fn mask(bit: u64, span: u64) -> u64 {
    if span >= 64 { !0 } else { ((1u64 << span) - 1) << bit }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn set_and_clear_ranges_count_changes() {
        let mut bm = Bitmap::new(1000);
        assert_eq!(bm.set_range(BlockRange::new(10, 200)), 190);
        assert_eq!(bm.set_range(BlockRange::new(100, 300)), 100);
        assert_eq!(bm.count(), 290);
        assert_eq!(bm.clear_range(BlockRange::new(0, 50)), 40);
        assert_eq!(bm.count(), 250);
        assert_eq!(bm.count_range(BlockRange::new(50, 60)), 10);
        assert_eq!(bm.runs(), vec![BlockRange::new(50, 300)]);
        assert_eq!(bm.set_range(BlockRange::new(990, 2000)), 10, "clipped to the volume");
        assert_eq!(bm.next_set(301), Some(990));
        assert_eq!(bm.next_clear(990), 1000);
        assert_eq!(bm.next_run(0, 16), Some(BlockRange::new(50, 66)));
    }

    #[test]
    fn pages_round_trip_and_track_dirtiness() {
        let blocks = BLOCKS_PER_PAGE * 2 + 77;
        let mut bm = Bitmap::new(blocks);
        bm.set_range(BlockRange::new(5, 9));
        bm.set_range(BlockRange::new(blocks - 3, blocks));
        assert_eq!(bm.take_dirty_pages(), vec![0, 2]);
        assert!(bm.take_dirty_pages().is_empty());
        let mut copy = Bitmap::new(blocks);
        for page in 0..bm.page_count() {
            copy.load_page(page, &bm.page_payload(page));
        }
        assert_eq!(copy.runs(), bm.runs());
        assert_eq!(copy.count(), 7);
        // Garbage beyond the volume's end must not count.
        let mut tail = vec![0xffu8; PAGE_PAYLOAD_BYTES];
        tail[0] = 0;
        copy.load_page(2, &tail);
        assert_eq!(copy.count_range(BlockRange::new(blocks, blocks + 1000)), 0);
        assert_eq!(copy.next_set(blocks - 100), Some(2 * BLOCKS_PER_PAGE + 8));
    }

    #[test]
    fn runs_encode_and_decode_in_chunks() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let blocks = 1 << 20;
        let mut bm = Bitmap::new(blocks);
        for _ in 0..5000 {
            let start = rng.random_range(0..blocks);
            let len = rng.random_range(1..40);
            bm.set_range(BlockRange::new(start, start + len));
        }
        let mut copy = Bitmap::new(blocks);
        let mut pos = 0;
        let mut chunks = 0;
        while pos < blocks {
            let (data, next) = bm.encode_runs(pos, 1024);
            assert!(data.len() <= 1024 + 20);
            let end = copy.merge_runs(pos, &data).unwrap();
            assert_eq!(end, next);
            pos = next;
            chunks += 1;
        }
        assert!(chunks > 1);
        assert_eq!(copy.runs(), bm.runs());
    }

    #[test]
    fn hostile_run_lists_are_refused() {
        let mut bm = Bitmap::new(100);
        assert_eq!(bm.merge_runs(101, &[]), Err(RunDecodeError::StartOutOfRange { start: 101, blocks: 100 }));
        assert_eq!(bm.merge_runs(0, &[50, 51]), Err(RunDecodeError::RunOutOfRange { blocks: 100 }));
        assert_eq!(bm.merge_runs(0, &[0x80]), Err(RunDecodeError::BadVarint));
        assert_eq!(bm.merge_runs(0, &[0xff; 11]), Err(RunDecodeError::BadVarint));
        assert_eq!(bm.count(), 0, "nothing applied from a refused list");
        assert_eq!(bm.merge_runs(0, &[10, 5]), Ok(15));
        assert_eq!(bm.runs(), vec![BlockRange::new(10, 15)]);
    }
}
