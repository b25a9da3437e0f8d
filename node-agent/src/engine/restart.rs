//! Restart-before-failover counting: at most `limit` local restarts within a sliding
//! `window`; one more failure asks for a failover instead.

use std::collections::VecDeque;
use std::time::Duration;

use super::time::Instant;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestartWindow {
    times: VecDeque<Instant>,
}

impl RestartWindow {
    /// Restarts counted within `window` before `now`.
    pub fn count(&mut self, now: Instant, window: Duration) -> u32 {
        while self.times.front().is_some_and(|t| now.since(*t) >= window) {
            self.times.pop_front();
        }
        u32::try_from(self.times.len()).unwrap_or(u32::MAX)
    }

    /// Records a restart at `now` when the policy allows one; false means "fail over".
    pub fn try_restart(&mut self, now: Instant, limit: u32, window: Duration) -> bool {
        if limit == 0 || self.count(now, window) >= limit {
            return false;
        }
        self.times.push_back(now);
        true
    }

    pub fn total(&self) -> u32 {
        u32::try_from(self.times.len()).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn at_s(s: u64) -> Instant {
        Instant::from_millis(s * 1_000)
    }

    #[test]
    fn limit_restarts_then_failover() {
        let mut w = RestartWindow::default();
        assert!(w.try_restart(at_s(0), 2, WINDOW));
        assert!(w.try_restart(at_s(1), 2, WINDOW));
        assert!(!w.try_restart(at_s(2), 2, WINDOW), "a third failure within the window fails over");
        assert_eq!(w.count(at_s(2), WINDOW), 2, "a refused restart is not counted");
        assert_eq!(w.total(), 2);
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let mut w = RestartWindow::default();
        assert!(w.try_restart(at_s(0), 1, WINDOW));
        assert!(!w.try_restart(at_s(59), 1, WINDOW));
        assert_eq!(w.count(at_s(59), WINDOW), 1);
        // Exactly one window after the first restart, it no longer counts.
        assert_eq!(w.count(at_s(60), WINDOW), 0);
        assert!(w.try_restart(at_s(60), 1, WINDOW));
        assert_eq!(w.count(at_s(60), WINDOW), 1);
        assert_eq!(w.total(), 1);
    }

    #[test]
    fn a_zero_limit_fails_over_at_once() {
        let mut w = RestartWindow::default();
        assert!(!w.try_restart(Instant::ZERO, 0, WINDOW));
        assert_eq!(w.total(), 0);
    }
}
