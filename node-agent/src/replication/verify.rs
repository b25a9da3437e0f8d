//! Online verify: compare per-block digests of both replicas and collect the differences.
//!
//! The verify source walks the volume in chunks; for each chunk it computes its own digests
//! and asks the peer for the peer's. Both digests of a chunk are taken at the same point in
//! the replicated write stream (the request travels in order with the data), so a
//! difference is a real divergence, never a write in flight.

use std::collections::BTreeMap;

use hapair_crds::volume::SyncProgress;

use super::geometry::{BLOCK_SIZE, BlockRange};
use super::resync::{ProgressMeter, RateLimiter};

/// One digest per 4 KiB block of `data` (a trailing partial block is digested as is).
pub fn block_digests(data: &[u8]) -> Vec<u128> {
    data.chunks(BLOCK_SIZE as usize).map(xxhash_rust::xxh3::xxh3_128).collect()
}

#[derive(Debug, Default, Clone)]
struct Pending {
    end: u64,
    local: Option<Vec<u128>>,
    peer: Option<Vec<u128>>,
}

#[derive(Debug, Clone)]
pub struct VerifyPlanner {
    blocks: u64,
    chunk_blocks: u64,
    max_in_flight: usize,
    cursor: u64,
    pending: BTreeMap<u64, Pending>,
    limiter: RateLimiter,
    meter: ProgressMeter,
    mismatched: Vec<BlockRange>,
}

/// What finishing a chunk revealed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkResult {
    pub mismatched: Vec<BlockRange>,
}

impl VerifyPlanner {
    pub fn new(blocks: u64, chunk_blocks: u64, rate: Option<u64>, now_ms: u64) -> Self {
        let chunk_blocks = chunk_blocks.clamp(1, 1024);
        VerifyPlanner {
            blocks,
            chunk_blocks,
            max_in_flight: 4,
            cursor: 0,
            pending: BTreeMap::new(),
            limiter: RateLimiter::new(rate, chunk_blocks * BLOCK_SIZE, now_ms),
            meter: ProgressMeter::new(blocks * BLOCK_SIZE, now_ms),
            mismatched: Vec::new(),
        }
    }

    /// Chunks to verify now, and when to poll again if the rate limit held them back.
    pub fn poll(&mut self, now_ms: u64) -> (Vec<BlockRange>, Option<u64>) {
        let mut out = Vec::new();
        while self.pending.len() < self.max_in_flight && self.cursor < self.blocks {
            let end = (self.cursor + self.chunk_blocks).min(self.blocks);
            let range = BlockRange::new(self.cursor, end);
            if let Err(at) = self.limiter.take(range.byte_len(), now_ms) {
                return (out, Some(at));
            }
            self.pending.insert(range.start, Pending { end, ..Pending::default() });
            self.cursor = end;
            out.push(range);
        }
        (out, None)
    }

    /// Records the local digests of a chunk.
    pub fn local(&mut self, start: u64, digests: Vec<u128>, now_ms: u64) -> Result<ChunkResult, String> {
        self.record(start, digests, true, now_ms)
    }

    /// Records the peer's digests of a chunk; refuses replies to chunks never asked for.
    pub fn peer(&mut self, start: u64, digests: Vec<u128>, now_ms: u64) -> Result<ChunkResult, String> {
        self.record(start, digests, false, now_ms)
    }

    fn record(&mut self, start: u64, digests: Vec<u128>, local: bool, now_ms: u64) -> Result<ChunkResult, String> {
        let Some(p) = self.pending.get_mut(&start) else {
            return Err(format!("digests for block {start}, which is not being verified"));
        };
        if digests.len() as u64 != p.end - start {
            return Err(format!("{} digests for a chunk of {} blocks", digests.len(), p.end - start));
        }
        let slot = if local { &mut p.local } else { &mut p.peer };
        if slot.is_some() {
            return Err(format!("digests for block {start} arrived twice"));
        }
        *slot = Some(digests);
        let (Some(a), Some(b)) = (&p.local, &p.peer) else { return Ok(ChunkResult::default()) };
        let mut result = ChunkResult::default();
        let mut run: Option<BlockRange> = None;
        for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            let block = start + i as u64;
            if x == y {
                continue;
            }
            match &mut run {
                Some(r) if r.end == block => r.end += 1,
                _ => {
                    if let Some(r) = run.take() {
                        result.mismatched.push(r);
                    }
                    run = Some(BlockRange::new(block, block + 1));
                }
            }
        }
        result.mismatched.extend(run);
        let len = (p.end - start) * BLOCK_SIZE;
        self.pending.remove(&start);
        self.meter.add(len, now_ms);
        self.mismatched.extend(result.mismatched.iter().copied());
        Ok(result)
    }

    pub fn finished(&self) -> bool {
        self.cursor >= self.blocks && self.pending.is_empty()
    }

    pub fn mismatched(&self) -> &[BlockRange] {
        &self.mismatched
    }

    pub fn progress(&self, now_ms: u64) -> SyncProgress {
        self.meter.snapshot(now_ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_differing_blocks_whichever_side_answers_first() {
        let mut v = VerifyPlanner::new(10, 4, None, 0);
        let (chunks, wake) = v.poll(0);
        assert_eq!(chunks, vec![BlockRange::new(0, 4), BlockRange::new(4, 8), BlockRange::new(8, 10)]);
        assert_eq!(wake, None);
        let same = vec![1u128, 2, 3, 4];
        assert_eq!(v.local(0, same.clone(), 1).unwrap(), ChunkResult::default());
        assert_eq!(v.peer(0, same, 1).unwrap(), ChunkResult::default());
        v.peer(4, vec![5, 0, 0, 8], 2).unwrap();
        let r = v.local(4, vec![5, 6, 7, 8], 2).unwrap();
        assert_eq!(r.mismatched, vec![BlockRange::new(5, 7)]);
        v.local(8, vec![1, 2], 3).unwrap();
        assert_eq!(v.peer(8, vec![1, 9], 3).unwrap().mismatched, vec![BlockRange::new(9, 10)]);
        assert!(v.finished());
        assert_eq!(v.mismatched(), &[BlockRange::new(5, 7), BlockRange::new(9, 10)]);
        assert_eq!(v.progress(3).done_bytes, 10 * 4096);
    }

    #[test]
    fn unsolicited_or_malformed_replies_are_refused() {
        let mut v = VerifyPlanner::new(8, 4, None, 0);
        v.poll(0);
        assert!(v.peer(2, vec![1, 2, 3, 4], 0).unwrap_err().contains("not being verified"));
        assert!(v.peer(0, vec![1], 0).unwrap_err().contains("1 digests"));
        v.peer(0, vec![1, 2, 3, 4], 0).unwrap();
        assert!(v.peer(0, vec![1, 2, 3, 4], 0).unwrap_err().contains("twice"));
    }

    #[test]
    fn digests_cover_each_block() {
        let mut data = vec![0u8; 3 * 4096];
        data[5000] = 1;
        let d = block_digests(&data);
        assert_eq!(d.len(), 3);
        assert_eq!(d[0], d[2]);
        assert_ne!(d[0], d[1]);
    }
}
