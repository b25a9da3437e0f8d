//! Simulated monotonic clocks that drift within the bound.
//!
//! True (simulated) time runs in nanoseconds. Each node and the witness read their own
//! clock, advancing at a fixed rate in parts per billion of true time. All rates of one
//! schedule lie in `[r, r·(1+δ)]`, so any two clocks differ in rate by at most the factor
//! `1+δ` the engines assume, and some clocks run slow while others run fast.

/// Parts per billion of true time.
pub const PPB: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimClock {
    base_true: u64,
    base_local: u64,
    rate_ppb: u64,
}

impl SimClock {
    /// A clock that reads `local` at true time `at` and runs at `rate_ppb`.
    pub fn new(at: u64, local: u64, rate_ppb: u64) -> SimClock {
        SimClock { base_true: at, base_local: local, rate_ppb: rate_ppb.max(1) }
    }

    /// The local reading at true time `t` (rounded down).
    pub fn local(&self, t: u64) -> u64 {
        let elapsed = u128::from(t.saturating_sub(self.base_true));
        self.base_local + u64::try_from(elapsed * u128::from(self.rate_ppb) / u128::from(PPB)).unwrap_or(u64::MAX / 2)
    }

    /// The first true time at which the clock reads at least `local`.
    pub fn true_at(&self, local: u64) -> u64 {
        if local <= self.base_local {
            return self.base_true;
        }
        let need = u128::from(local - self.base_local) * u128::from(PPB);
        self.base_true + u64::try_from(need.div_ceil(u128::from(self.rate_ppb))).unwrap_or(u64::MAX / 2)
    }

    pub fn rate_ppb(&self) -> u64 {
        self.rate_ppb
    }
}

/// The slowest rate of a schedule such that the fastest, `slowest·(1+δ)`, stays symmetric
/// around true time: `slowest = 1/√(1+δ)` (in ppb).
pub fn slowest_rate(drift_ppm: u32) -> u64 {
    let factor = 1.0 + f64::from(drift_ppm) / 1e6;
    // Truncation keeps slowest·(1+δ) at or below the fastest allowed rate.
    (PPB as f64 / factor.sqrt()) as u64
}

/// The fastest rate allowed with `slowest`: `slowest·(1+δ)`, rounded down.
pub fn fastest_rate(slowest: u64, drift_ppm: u32) -> u64 {
    slowest + slowest * u64::from(drift_ppm) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_conservatively() {
        let c = SimClock::new(1_000, 50, 1_010_000_000);
        assert_eq!(c.local(1_000), 50);
        for local in [51, 1_000, 123_456_789] {
            let t = c.true_at(local);
            assert!(c.local(t) >= local);
            assert!(c.local(t - 1) < local);
        }
    }

    #[test]
    fn rates_stay_within_the_drift_bound() {
        for ppm in [0, 1, 10_000, 100_000] {
            let lo = slowest_rate(ppm);
            let hi = fastest_rate(lo, ppm);
            assert!(lo <= PPB && hi >= PPB - 1, "{ppm}: {lo} {hi}");
            assert!(u128::from(hi) * 1_000_000 <= u128::from(lo) * u128::from(1_000_000 + ppm));
        }
    }
}
