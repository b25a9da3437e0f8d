//! The clock-drift bound `maxClockDriftPpm` (δ), applied to a duration: `L·(1+δ)`.
//!
//! Nodes never compare clocks; the one cross-clock assumption is that while one clock
//! advances by `d`, any other advances by at most `d·(1+δ)`. The agent's engine waits
//! out a lease it granted with it, and the witness waits out the leases it granted with
//! it, so both must compute the same bound: it lives here, once.

use std::time::Duration;

/// `d·(1 + ppm/10⁶)`, rounded up to the nanosecond: the longest `d` measured on one clock
/// can last on another clock within the drift bound. Rounding up keeps every wait on the
/// safe side (a lease is never assumed expired early); saturates at `u64::MAX` ns.
pub fn stretch(d: Duration, ppm: u32) -> Duration {
    let nanos = d.as_nanos();
    let extra = (nanos * u128::from(ppm)).div_ceil(1_000_000);
    Duration::from_nanos(u64::try_from(nanos + extra).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretch_adds_the_drift_and_rounds_up() {
        assert_eq!(stretch(Duration::from_millis(800), 10_000), Duration::from_millis(808));
        assert_eq!(stretch(Duration::from_millis(160), 10_000), Duration::from_nanos(161_600_000));
        assert_eq!(stretch(Duration::from_nanos(1), 1), Duration::from_nanos(2));
        assert_eq!(stretch(Duration::from_nanos(1_000_000), 0), Duration::from_nanos(1_000_000));
        assert_eq!(stretch(Duration::ZERO, 10_000), Duration::ZERO);
    }

    #[test]
    fn stretch_saturates() {
        assert_eq!(stretch(Duration::MAX, 10_000), Duration::from_nanos(u64::MAX));
        assert_eq!(stretch(Duration::from_nanos(u64::MAX), u32::MAX), Duration::from_nanos(u64::MAX));
    }
}
