//! A started step's health over time: consecutive check failures against the threshold,
//! and the stabilization period it must stay healthy for before it counts. Sans-IO.

use std::time::{Duration, Instant};

/// Where a started step stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Started, not yet healthy for the whole stabilization period.
    Stabilizing {
        healthy_in: Duration,
    },
    Healthy,
    /// The check failed `failure_threshold` times in a row.
    Failed {
        reason: String,
    },
}

/// Tracks one started step.
#[derive(Clone, Debug)]
pub struct StepHealth {
    failure_threshold: u32,
    stabilization: Duration,
    /// Since when the step has been continuously healthy.
    healthy_since: Instant,
    consecutive_failures: u32,
    failed: Option<String>,
}

impl StepHealth {
    /// A step whose start command succeeded at `started`.
    pub fn started(started: Instant, failure_threshold: u32, stabilization: Duration) -> Self {
        StepHealth {
            failure_threshold: failure_threshold.max(1),
            stabilization,
            healthy_since: started,
            consecutive_failures: 0,
            failed: None,
        }
    }

    /// Feeds one check result.
    pub fn observe(&mut self, now: Instant, passed: bool, reason: &str) -> Health {
        if self.failed.is_none() {
            if passed {
                self.consecutive_failures = 0;
            } else {
                self.consecutive_failures += 1;
                // Any failure restarts the stabilization clock: the step must *stay* healthy.
                self.healthy_since = now;
                if self.consecutive_failures >= self.failure_threshold {
                    self.failed = Some(format!("check failed {} times in a row: {reason}", self.consecutive_failures));
                }
            }
        }
        self.state(now)
    }

    pub fn state(&self, now: Instant) -> Health {
        if let Some(reason) = &self.failed {
            return Health::Failed { reason: reason.clone() };
        }
        let stable_for = now.saturating_duration_since(self.healthy_since);
        if self.consecutive_failures == 0 && stable_for >= self.stabilization {
            Health::Healthy
        } else {
            Health::Stabilizing {
                healthy_in: self.stabilization.saturating_sub(stable_for).max(Duration::from_nanos(1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn healthy_only_after_the_stabilization_period() {
        let t0 = Instant::now();
        let mut h = StepHealth::started(t0, 3, 10 * S);
        assert_eq!(h.observe(t0 + 5 * S, true, ""), Health::Stabilizing { healthy_in: 5 * S });
        assert_eq!(h.observe(t0 + 10 * S, true, ""), Health::Healthy);
    }

    #[test]
    fn a_failure_restarts_the_stabilization_clock() {
        let t0 = Instant::now();
        let mut h = StepHealth::started(t0, 3, 10 * S);
        h.observe(t0 + 8 * S, false, "refused");
        assert_eq!(h.observe(t0 + 12 * S, true, ""), Health::Stabilizing { healthy_in: 6 * S });
        assert_eq!(h.observe(t0 + 18 * S, true, ""), Health::Healthy);
    }

    #[test]
    fn the_threshold_counts_consecutive_failures() {
        let t0 = Instant::now();
        let mut h = StepHealth::started(t0, 3, Duration::ZERO);
        assert_eq!(h.observe(t0, true, ""), Health::Healthy);
        h.observe(t0 + S, false, "x");
        h.observe(t0 + 2 * S, false, "x");
        assert_eq!(h.observe(t0 + 3 * S, true, ""), Health::Healthy, "a pass resets the count");
        h.observe(t0 + 4 * S, false, "x");
        h.observe(t0 + 5 * S, false, "x");
        assert_eq!(
            h.observe(t0 + 6 * S, false, "connection refused"),
            Health::Failed { reason: "check failed 3 times in a row: connection refused".into() }
        );
        assert!(matches!(h.observe(t0 + 7 * S, true, ""), Health::Failed { .. }), "failure sticks until restart");
    }
}
