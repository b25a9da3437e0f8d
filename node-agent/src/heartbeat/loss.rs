//! Per-link loss accounting: how many heartbeats arrived against how many the peer's
//! interval says should have, over a sliding window. Sans-IO: callers pass the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Receive history of one link.
#[derive(Clone, Debug)]
pub struct LinkLoss {
    interval: Duration,
    window: Duration,
    since: Instant,
    arrivals: VecDeque<Instant>,
    last: Option<Instant>,
    received_total: u64,
}

impl LinkLoss {
    /// `since` is when listening started: a link that never heard anything is lossy from then.
    pub fn new(interval: Duration, window: Duration, since: Instant) -> Self {
        LinkLoss {
            interval: interval.max(Duration::from_millis(1)),
            window: window.max(interval),
            since,
            arrivals: VecDeque::new(),
            last: None,
            received_total: 0,
        }
    }

    pub fn on_receive(&mut self, at: Instant) {
        self.arrivals.push_back(at);
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
        self.received_total += 1;
        self.prune(at);
    }

    fn prune(&mut self, now: Instant) {
        while let Some(first) = self.arrivals.front() {
            if now.saturating_duration_since(*first) >= self.window {
                self.arrivals.pop_front();
            } else {
                break;
            }
        }
    }

    /// Heartbeats the peer should have sent within the window ending at `now`.
    pub fn expected(&self, now: Instant) -> u64 {
        let span = now.saturating_duration_since(self.since).min(self.window);
        u64::try_from(span.as_nanos() / self.interval.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Heartbeats received within the window ending at `now`.
    pub fn received(&self, now: Instant) -> u64 {
        let n = self.arrivals.iter().filter(|t| now.saturating_duration_since(**t) < self.window).count();
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// Lost share of the expected heartbeats over the window, 0–100.
    pub fn loss_percent(&self, now: Instant) -> u32 {
        let expected = self.expected(now);
        if expected == 0 {
            return 0;
        }
        let received = self.received(now).min(expected);
        u32::try_from((expected - received) * 100 / expected).unwrap_or(100)
    }

    /// The link is up while something arrived within `dead_after`.
    pub fn is_up(&self, now: Instant, dead_after: Duration) -> bool {
        self.last.is_some_and(|l| now.saturating_duration_since(l) <= dead_after)
    }

    pub fn last_received(&self) -> Option<Instant> {
        self.last
    }

    pub fn received_total(&self) -> u64 {
        self.received_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_steady_link_has_no_loss_and_a_silent_one_loses_everything() {
        let t0 = Instant::now();
        let mut link = LinkLoss::new(100 * MS, 1000 * MS, t0);
        for i in 1..=20 {
            link.on_receive(t0 + i * 100 * MS);
        }
        let now = t0 + 2000 * MS;
        assert_eq!(link.expected(now), 10);
        assert_eq!(link.loss_percent(now), 0);
        assert!(link.is_up(now, 300 * MS));
        let later = now + 1500 * MS;
        assert_eq!(link.loss_percent(later), 100);
        assert!(!link.is_up(later, 300 * MS));
        assert_eq!(link.received_total(), 20);
    }

    #[test]
    fn half_the_heartbeats_is_fifty_percent() {
        let t0 = Instant::now();
        let mut link = LinkLoss::new(100 * MS, 1000 * MS, t0);
        for i in (2..=20).step_by(2) {
            link.on_receive(t0 + i * 100 * MS);
        }
        assert_eq!(link.loss_percent(t0 + 2000 * MS), 50);
    }

    #[test]
    fn a_link_that_never_heard_anything_is_down() {
        let t0 = Instant::now();
        let link = LinkLoss::new(100 * MS, 1000 * MS, t0);
        assert_eq!(link.loss_percent(t0), 0, "nothing expected yet");
        assert_eq!(link.loss_percent(t0 + 500 * MS), 100);
        assert!(!link.is_up(t0 + 500 * MS, 300 * MS));
    }
}
