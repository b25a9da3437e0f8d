//! The figures printed for one implementation: nearest-rank percentiles of the measured
//! failover times, and the count of kills after which the service never came back.

use std::time::Duration;

/// The measurements of one implementation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    /// Kill to first answer from the other server, for every kill that got one.
    pub times: Vec<Duration>,
    /// Kills after which no answer came within the implementation's bound.
    pub failures: usize,
}

/// p50, p99 and max of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Samples {
    /// Kills measured, answered or not.
    pub fn kills(&self) -> usize {
        self.times.len() + self.failures
    }

    /// The mean of the measured times; `None` when there is none.
    pub fn mean(&self) -> Option<Duration> {
        let n = u32::try_from(self.times.len()).ok().filter(|n| *n > 0)?;
        Some(self.times.iter().sum::<Duration>() / n)
    }

    /// `None` when no kill was answered.
    pub fn summary(&self) -> Option<Summary> {
        let mut sorted = self.times.clone();
        sorted.sort();
        let max = *sorted.last()?;
        Some(Summary { p50: percentile(&sorted, 50), p99: percentile(&sorted, 99), max })
    }
}

/// The nearest-rank percentile: the smallest sample at or above `p` percent of them.
/// `sorted` must be sorted and not empty.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().copied().map(Duration::from_millis).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples = Samples { times: ms(&[40, 10, 30, 20]), failures: 0 };
        let s = samples.summary().unwrap_or_else(|| panic!("no summary"));
        assert_eq!(
            (s.p50, s.p99, s.max),
            (Duration::from_millis(20), Duration::from_millis(40), Duration::from_millis(40))
        );

        let hundred: Vec<u64> = (1..=100).collect();
        let s = Samples { times: ms(&hundred), failures: 0 }.summary().unwrap_or_else(|| panic!("no summary"));
        assert_eq!(
            (s.p50, s.p99, s.max),
            (Duration::from_millis(50), Duration::from_millis(99), Duration::from_millis(100))
        );
    }

    #[test]
    fn one_sample_is_every_percentile_and_failures_count_as_kills() {
        let samples = Samples { times: ms(&[7]), failures: 2 };
        let s = samples.summary().unwrap_or_else(|| panic!("no summary"));
        assert_eq!(
            (s.p50, s.p99, s.max),
            (Duration::from_millis(7), Duration::from_millis(7), Duration::from_millis(7))
        );
        assert_eq!(samples.kills(), 3);
        assert_eq!(Samples { times: vec![], failures: 3 }.summary(), None);
    }
}
