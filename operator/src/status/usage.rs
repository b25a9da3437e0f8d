//! Each node's CPU and memory use over the last hour, kept from the agents' reports for the
//! console's charts. Bounded: one sample per node every [`SAMPLE_EVERY_MS`], at most
//! [`SAMPLES`] per node, so the whole history costs [`UsageHistory::bytes`] — a few KiB per
//! node — however often agents report. Lost on a controller restart, which only blanks the
//! charts for a while.

use std::collections::{BTreeMap, VecDeque};

use hapair_crds::hagroup::Hardware;
use serde::Serialize;

use crate::support::timestamp::UnixMillis;

/// Resolution of the charts.
pub const SAMPLE_EVERY_MS: UnixMillis = 10_000;
/// One hour at that resolution.
pub const SAMPLES: usize = 360;

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UsageSample {
    /// Unix milliseconds.
    pub time: UnixMillis,
    pub cpu_percent: u8,
    pub memory_percent: u8,
}

#[derive(Debug, Default)]
pub struct UsageHistory {
    nodes: BTreeMap<String, VecDeque<UsageSample>>,
}

impl UsageHistory {
    /// Takes a report's figures, unless the node's last sample is more recent than the
    /// resolution; drops what is older than an hour.
    pub fn record(&mut self, node: &str, now: UnixMillis, hardware: &Hardware) {
        let samples = self.nodes.entry(node.to_string()).or_default();
        if samples.back().is_some_and(|last| now - last.time < SAMPLE_EVERY_MS && now >= last.time) {
            return;
        }
        // A clock stepped back leaves samples "from the future": they would never age out.
        samples.retain(|s| s.time <= now);
        let oldest = now - SAMPLE_EVERY_MS * SAMPLES as UnixMillis;
        while samples.front().is_some_and(|s| s.time <= oldest) || samples.len() >= SAMPLES {
            samples.pop_front();
        }
        samples.push_back(UsageSample {
            time: now,
            cpu_percent: u8::try_from(hardware.cpu_percent.min(100)).unwrap_or(100),
            memory_percent: u8::try_from(hardware.memory_percent.min(100)).unwrap_or(100),
        });
    }

    /// Forgets nodes that are no longer in any group.
    pub fn retain(&mut self, known: impl Fn(&str) -> bool) {
        self.nodes.retain(|node, _| known(node));
    }

    pub fn node(&self, node: &str) -> Vec<UsageSample> {
        self.nodes.get(node).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Memory the samples take, in bytes (capacity, not length: what is really held).
    pub fn bytes(&self) -> usize {
        self.nodes.iter().map(|(n, s)| n.capacity() + s.capacity() * std::mem::size_of::<UsageSample>()).sum()
    }

    /// The most this history can hold for `nodes` nodes, in bytes (names aside).
    pub fn bound(nodes: usize) -> usize {
        nodes * SAMPLES.next_power_of_two() * std::mem::size_of::<UsageSample>()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn load(cpu: u32, memory: u32) -> Hardware {
        Hardware { cpu_percent: cpu, memory_percent: memory, ..Hardware::default() }
    }

    #[test]
    fn one_sample_per_resolution_for_one_hour() {
        let mut history = UsageHistory::default();
        // An agent reporting every second for two hours.
        for second in 0..7200 {
            history.record("a", second * 1000, &load(u32::try_from(second % 100).unwrap(), 40));
        }
        let samples = history.node("a");
        assert_eq!(samples.len(), SAMPLES);
        assert_eq!(samples.last().unwrap().time, 7_190_000);
        assert_eq!(samples.first().unwrap().time, 7_190_000 - 359 * 10_000);
        assert!(samples.windows(2).all(|w| w[1].time - w[0].time == SAMPLE_EVERY_MS));
        assert!(history.bytes() <= UsageHistory::bound(1) + 1);
    }

    #[test]
    fn a_silent_hour_empties_the_chart_and_odd_figures_are_clamped() {
        let mut history = UsageHistory::default();
        history.record("a", 0, &load(250, 7));
        assert_eq!(history.node("a"), vec![UsageSample { time: 0, cpu_percent: 100, memory_percent: 7 }]);
        history.record("a", 3_600_000, &load(1, 2));
        assert_eq!(history.node("a").len(), 1, "the sample of an hour ago is gone");
        // The clock steps back a day: the newer samples go rather than stay for ever.
        history.record("a", 3_600_000 - 86_400_000, &load(3, 4));
        assert_eq!(history.node("a").len(), 1);
        history.retain(|n| n != "a");
        assert!(history.node("a").is_empty());
    }
}
