//! CPU and memory use from procfs, and the "above the threshold for so long" rule.

use std::time::{Duration, Instant};

/// Cumulative CPU time counters from the `cpu` line of `/proc/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`.
pub fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    // already counted in user, so only the first eight add up to the total.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes { busy: total.saturating_sub(idle), total })
}

/// Busy share between two samples, percent.
pub fn cpu_percent(before: CpuTimes, after: CpuTimes) -> Option<u32> {
    let total = after.total.checked_sub(before.total)?;
    let busy = after.busy.checked_sub(before.busy)?;
    if total == 0 {
        return None;
    }
    u32::try_from(busy.min(total) * 100 / total).ok()
}

/// Used memory percent from `/proc/meminfo` (`MemTotal` less `MemAvailable`).
pub fn parse_memory_percent(meminfo: &str) -> Option<u32> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.split_whitespace().next()?.parse::<u64>().ok())
    };
    let total = field("MemTotal")?;
    let available = field("MemAvailable")?;
    if total == 0 {
        return None;
    }
    u32::try_from(total.saturating_sub(available) * 100 / total).ok()
}

/// Tracks how long a value has stayed above a threshold. Sans-IO.
#[derive(Clone, Debug)]
pub struct Sustained {
    threshold: u32,
    duration: Duration,
    above_since: Option<Instant>,
}

impl Sustained {
    pub fn new(threshold_percent: u32, duration: Duration) -> Self {
        Sustained { threshold: threshold_percent, duration, above_since: None }
    }

    /// Feeds a sample; returns whether the value has been above the threshold for at least
    /// the duration (only samples strictly above count).
    pub fn sample(&mut self, now: Instant, percent: u32) -> bool {
        if percent > self.threshold {
            let since = *self.above_since.get_or_insert(now);
            now.saturating_duration_since(since) >= self.duration
        } else {
            self.above_since = None;
            false
        }
    }

    pub fn above_since(&self) -> Option<Instant> {
        self.above_since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_and_percent() {
        let a = parse_cpu("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n");
        let b = parse_cpu("cpu  200 0 200 800 100 0 0 0 0 0\n");
        assert_eq!(a, Some(CpuTimes { busy: 200, total: 1000 }));
        assert_eq!(a.zip(b).and_then(|(a, b)| cpu_percent(a, b)), Some(66));
        assert_eq!(parse_cpu("intr 1 2 3"), None);
        assert_eq!(parse_cpu("cpu  x y z"), None);
    }

    #[test]
    fn memory_percent() {
        let text = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n";
        assert_eq!(parse_memory_percent(text), Some(75));
        assert_eq!(parse_memory_percent("MemTotal: 0 kB\nMemAvailable: 0 kB"), None);
        assert_eq!(parse_memory_percent("garbage"), None);
    }

    #[test]
    fn sustained_needs_the_whole_duration_above() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut t = Sustained::new(80, 10 * s);
        assert!(!t.sample(t0, 90));
        assert!(!t.sample(t0 + 9 * s, 95));
        assert!(t.sample(t0 + 10 * s, 85));
        assert!(!t.sample(t0 + 11 * s, 80), "at the threshold is not above it");
        assert!(!t.sample(t0 + 12 * s, 90), "the clock restarted");
    }
}
