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

    #[test]
    fn allows_limit_restarts_per_window() {
        let window = Duration::from_secs(60);
        let mut w = RestartWindow::default();
        assert!(w.try_restart(Instant::from_millis(0), 2, window));
        assert!(w.try_restart(Instant::from_millis(1_000), 2, window));
        assert!(!w.try_restart(Instant::from_millis(2_000), 2, window));
        // The first restart leaves the window.
        assert!(w.try_restart(Instant::from_millis(60_000), 2, window));
        assert!(!RestartWindow::default().try_restart(Instant::ZERO, 0, window));
    }
}
