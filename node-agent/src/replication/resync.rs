//! Resync planning on the sync target: which dirty ranges to request next, how fast, and
//! how far along the resync is.
//!
//! The target walks its bitmap (the union of both replicas' bitmaps) with a cursor and
//! requests runs of dirty blocks from the source, bounded by the bytes in flight and by the
//! configured rate. A block's bit is cleared only once its data is written on the target,
//! so an interrupted resync resumes from the bitmap alone. Time is an input (milliseconds
//! on any monotonic clock), never read here.

use std::collections::{BTreeMap, VecDeque};

use hapair_crds::volume::SyncProgress;

use super::bitmap::Bitmap;
use super::geometry::{BLOCK_SIZE, BlockRange};

/// A token bucket over bytes, refilled continuously at `rate` bytes per second.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: Option<u64>,
    /// Available bytes, in thousandths, so millisecond refills stay exact.
    milli_tokens: u128,
    capacity_milli: u128,
    last_ms: u64,
}

impl RateLimiter {
    /// `rate` of `None` is unlimited. The bucket holds a tenth of a second of traffic (at
    /// least `min_burst` bytes), so a limited resync sends smoothly instead of in bursts.
    pub fn new(rate: Option<u64>, min_burst: u64, now_ms: u64) -> Self {
        let capacity = rate.map_or(0, |r| (r / 10).max(min_burst));
        let capacity_milli = u128::from(capacity) * 1000;
        RateLimiter { rate, milli_tokens: capacity_milli, capacity_milli, last_ms: now_ms }
    }

    fn refill(&mut self, now_ms: u64) {
        if let Some(rate) = self.rate {
            let elapsed = now_ms.saturating_sub(self.last_ms);
            self.milli_tokens = (self.milli_tokens + u128::from(rate) * u128::from(elapsed)).min(self.capacity_milli);
        }
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes `bytes` if available now; otherwise returns when they will be.
    pub fn take(&mut self, bytes: u64, now_ms: u64) -> Result<(), u64> {
        let Some(rate) = self.rate else { return Ok(()) };
        self.refill(now_ms);
        let need = u128::from(bytes) * 1000;
        if self.milli_tokens >= need.min(self.capacity_milli) {
            self.milli_tokens = self.milli_tokens.saturating_sub(need);
            return Ok(());
        }
        let missing = need.min(self.capacity_milli) - self.milli_tokens;
        let wait = missing.div_ceil(u128::from(rate.max(1)));
        Err(now_ms + u64::try_from(wait).unwrap_or(u64::MAX / 2).max(1))
    }
}

/// Progress and throughput of a running resync or verify, for status reports.
#[derive(Debug, Clone)]
pub struct ProgressMeter {
    total: u64,
    done: u64,
    started_ms: u64,
    samples: VecDeque<(u64, u64)>,
}

const WINDOW_MS: u64 = 5_000;

impl ProgressMeter {
    pub fn new(total_bytes: u64, now_ms: u64) -> Self {
        ProgressMeter { total: total_bytes, done: 0, started_ms: now_ms, samples: VecDeque::from([(now_ms, 0)]) }
    }

    pub fn add(&mut self, bytes: u64, now_ms: u64) {
        self.done += bytes;
        self.total = self.total.max(self.done);
        self.samples.push_back((now_ms, self.done));
        while self.samples.len() > 2 && self.samples.front().is_some_and(|&(t, _)| now_ms.saturating_sub(t) > WINDOW_MS)
        {
            self.samples.pop_front();
        }
    }

    pub fn grow_total(&mut self, total_bytes: u64) {
        self.total = self.total.max(total_bytes);
    }

    pub fn done(&self) -> u64 {
        self.done
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn elapsed_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.started_ms)
    }

    /// Bytes per second over the last few seconds.
    pub fn rate(&self, now_ms: u64) -> u64 {
        let Some(&(t0, d0)) = self.samples.front() else { return 0 };
        let dt = now_ms.saturating_sub(t0);
        if dt == 0 {
            return 0;
        }
        (u128::from(self.done - d0) * 1000 / u128::from(dt)) as u64
    }

    pub fn snapshot(&self, now_ms: u64) -> SyncProgress {
        let rate = self.rate(now_ms);
        let remaining = self.total.saturating_sub(self.done);
        SyncProgress {
            done_bytes: self.done,
            total_bytes: self.total,
            bytes_per_second: rate,
            eta_seconds: (rate > 0).then(|| remaining.div_ceil(rate)),
        }
    }
}

/// Limits on one resync's traffic.
#[derive(Debug, Clone, Copy)]
pub struct ResyncLimits {
    pub max_request_blocks: u64,
    pub max_in_flight_bytes: u64,
    pub rate: Option<u64>,
}

impl Default for ResyncLimits {
    fn default() -> Self {
        ResyncLimits { max_request_blocks: 64, max_in_flight_bytes: 8 << 20, rate: None }
    }
}

/// What to request now, and when to poll again if the rate limit held requests back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Poll {
    pub requests: Vec<BlockRange>,
    pub wake_at_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ResyncPlanner {
    limits: ResyncLimits,
    limiter: RateLimiter,
    cursor: u64,
    in_flight: BTreeMap<u64, u64>,
    in_flight_bytes: u64,
    meter: ProgressMeter,
    passes: u32,
}

impl ResyncPlanner {
    pub fn new(bitmap: &Bitmap, limits: ResyncLimits, now_ms: u64) -> Self {
        let burst = limits.max_request_blocks * BLOCK_SIZE;
        ResyncPlanner {
            limits,
            limiter: RateLimiter::new(limits.rate, burst, now_ms),
            cursor: 0,
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            meter: ProgressMeter::new(bitmap.count() * BLOCK_SIZE, now_ms),
            passes: 0,
        }
    }

    pub fn poll(&mut self, bitmap: &Bitmap, now_ms: u64) -> Poll {
        let mut out = Poll::default();
        self.meter.grow_total(self.meter.done() + bitmap.count() * BLOCK_SIZE);
        while self.in_flight_bytes < self.limits.max_in_flight_bytes {
            let run = match bitmap.next_run(self.cursor, self.limits.max_request_blocks) {
                Some(run) => run,
                None => {
                    // Bits left behind the cursor (a failed request, or marked during the
                    // resync) are picked up by another pass once nothing is in flight.
                    if self.in_flight.is_empty() && !bitmap.is_empty() && self.passes < 16 {
                        self.passes += 1;
                        self.cursor = 0;
                        continue;
                    }
                    break;
                }
            };
            if let Err(at) = self.limiter.take(run.byte_len(), now_ms) {
                out.wake_at_ms = Some(at);
                break;
            }
            self.cursor = run.end;
            self.in_flight.insert(run.start, run.end);
            self.in_flight_bytes += run.byte_len();
            out.requests.push(run);
        }
        out
    }

    /// A requested range was written on the target.
    pub fn completed(&mut self, range: BlockRange, now_ms: u64) -> bool {
        if self.in_flight.get(&range.start) != Some(&range.end) {
            return false;
        }
        self.in_flight.remove(&range.start);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(range.byte_len());
        self.meter.add(range.byte_len(), now_ms);
        true
    }

    /// Whether `range` is exactly a request this planner has outstanding.
    pub fn is_in_flight(&self, range: BlockRange) -> bool {
        self.in_flight.get(&range.start) == Some(&range.end)
    }

    pub fn finished(&self, bitmap: &Bitmap) -> bool {
        self.in_flight.is_empty() && bitmap.is_empty()
    }

    /// Whether the planner gave up passing over blocks that keep failing.
    pub fn stuck(&self, bitmap: &Bitmap) -> bool {
        self.in_flight.is_empty() && !bitmap.is_empty() && self.passes >= 16
    }

    pub fn progress(&self, now_ms: u64) -> SyncProgress {
        self.meter.snapshot(now_ms)
    }

    pub fn meter(&self) -> &ProgressMeter {
        &self.meter
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn bitmap(runs: &[(u64, u64)]) -> Bitmap {
        let mut b = Bitmap::new(10_000);
        for &(s, e) in runs {
            b.set_range(BlockRange::new(s, e));
        }
        b
    }

    #[test]
    fn requests_dirty_runs_only_and_bounds_them() {
        let bm = bitmap(&[(10, 20), (100, 300)]);
        let limits = ResyncLimits { max_request_blocks: 64, max_in_flight_bytes: 1 << 30, rate: None };
        let mut p = ResyncPlanner::new(&bm, limits, 0);
        let poll = p.poll(&bm, 0);
        assert_eq!(
            poll.requests,
            vec![
                BlockRange::new(10, 20),
                BlockRange::new(100, 164),
                BlockRange::new(164, 228),
                BlockRange::new(228, 292),
                BlockRange::new(292, 300),
            ]
        );
        assert_eq!(poll.wake_at_ms, None);
        assert_eq!(p.poll(&bm, 0), Poll::default(), "nothing twice");
    }

    #[test]
    fn in_flight_bytes_are_bounded() {
        let mut bm = bitmap(&[(0, 1000)]);
        let limits = ResyncLimits { max_request_blocks: 64, max_in_flight_bytes: 128 * 4096, rate: None };
        let mut p = ResyncPlanner::new(&bm, limits, 0);
        let first = p.poll(&bm, 0).requests;
        assert_eq!(first, vec![BlockRange::new(0, 64), BlockRange::new(64, 128)]);
        bm.clear_range(first[0]);
        assert!(p.completed(first[0], 10));
        assert!(!p.completed(first[0], 10), "completions are counted once");
        assert_eq!(p.poll(&bm, 10).requests, vec![BlockRange::new(128, 192)]);
    }

    #[test]
    fn rate_limit_spaces_requests_and_reports_when_to_wake() {
        let bm = bitmap(&[(0, 1000)]);
        // 64 blocks = 256 KiB per request at 1 MiB/s: the burst allows one, then ~250 ms each.
        let limits = ResyncLimits { max_request_blocks: 64, max_in_flight_bytes: 1 << 30, rate: Some(1 << 20) };
        let mut p = ResyncPlanner::new(&bm, limits, 1000);
        let poll = p.poll(&bm, 1000);
        assert_eq!(poll.requests.len(), 1);
        assert_eq!(poll.wake_at_ms, Some(1250));
        assert!(p.poll(&bm, 1100).requests.is_empty());
        assert_eq!(p.poll(&bm, 1250).requests.len(), 1);
    }

    #[test]
    fn resumes_left_behind_blocks_in_another_pass_and_finishes() {
        let mut bm = bitmap(&[(0, 10), (50, 60)]);
        let mut p = ResyncPlanner::new(&bm, ResyncLimits::default(), 0);
        let reqs = p.poll(&bm, 0).requests;
        assert_eq!(reqs.len(), 2);
        // The first range completes; the second fails (its bits stay set).
        bm.clear_range(reqs[0]);
        p.completed(reqs[0], 5);
        p.in_flight.remove(&reqs[1].start);
        p.in_flight_bytes = 0;
        // Verify marked another block behind the cursor meanwhile.
        bm.set_range(BlockRange::new(5, 6));
        assert_eq!(p.poll(&bm, 6).requests, vec![BlockRange::new(5, 6), BlockRange::new(50, 60)]);
        for r in [BlockRange::new(5, 6), BlockRange::new(50, 60)] {
            bm.clear_range(r);
            p.completed(r, 7);
        }
        assert!(p.finished(&bm));
        assert_eq!(p.progress(7).done_bytes, 21 * 4096);
    }

    #[test]
    fn progress_reports_rate_and_eta() {
        let mut m = ProgressMeter::new(100 << 20, 0);
        m.add(10 << 20, 1000);
        m.add(10 << 20, 2000);
        let s = m.snapshot(2000);
        assert_eq!(s.done_bytes, 20 << 20);
        assert_eq!(s.bytes_per_second, 10 << 20);
        assert_eq!(s.eta_seconds, Some(8));
    }
}
