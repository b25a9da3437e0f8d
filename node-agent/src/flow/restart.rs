//! The restart policy: up to `limit` local restarts within a sliding `window`, after which
//! the step asks for a failover instead. Sans-IO.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hapair_crds::hagroup::RestartPolicy;

/// What to do about a failed step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart locally; `attempt` counts restarts within the window, from 1.
    Restart { attempt: u32 },
    /// The local budget is spent: ask the engine to fail over.
    Failover { restarts_in_window: u32 },
}

/// Restart history of one step.
#[derive(Clone, Debug)]
pub struct RestartBudget {
    limit: u32,
    window: Duration,
    restarts: VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(policy: &RestartPolicy) -> Self {
        RestartBudget { limit: policy.limit, window: policy.window.as_std(), restarts: VecDeque::new() }
    }

    /// The step failed at `now`: restart it or fail over. A restart is counted when
    /// decided.
    pub fn on_failure(&mut self, now: Instant) -> RestartDecision {
        while self.restarts.front().is_some_and(|t| now.saturating_duration_since(*t) >= self.window) {
            self.restarts.pop_front();
        }
        let used = u32::try_from(self.restarts.len()).unwrap_or(u32::MAX);
        if used >= self.limit {
            return RestartDecision::Failover { restarts_in_window: used };
        }
        self.restarts.push_back(now);
        RestartDecision::Restart { attempt: used + 1 }
    }

    /// Restarts counted within the window ending at `now`.
    pub fn restarts(&self, now: Instant) -> u32 {
        let n = self.restarts.iter().filter(|t| now.saturating_duration_since(**t) < self.window).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Forget the history, e.g. after the flow was stopped on demotion.
    pub fn reset(&mut self) {
        self.restarts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(limit: u32, window_s: u64) -> RestartPolicy {
        RestartPolicy { limit, window: hapair_crds::duration::Duration::from_secs(window_s) }
    }

    #[test]
    fn n_restarts_then_failover() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(&policy(2, 60));
        assert_eq!(b.on_failure(t0), RestartDecision::Restart { attempt: 1 });
        assert_eq!(b.on_failure(t0 + Duration::from_secs(1)), RestartDecision::Restart { attempt: 2 });
        assert_eq!(b.on_failure(t0 + Duration::from_secs(2)), RestartDecision::Failover { restarts_in_window: 2 });
        assert_eq!(b.restarts(t0 + Duration::from_secs(2)), 2);
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(&policy(1, 60));
        assert_eq!(b.on_failure(t0), RestartDecision::Restart { attempt: 1 });
        assert_eq!(b.on_failure(t0 + Duration::from_secs(59)), RestartDecision::Failover { restarts_in_window: 1 });
        assert_eq!(b.on_failure(t0 + Duration::from_secs(60)), RestartDecision::Restart { attempt: 1 });
    }

    #[test]
    fn a_zero_limit_fails_over_at_once() {
        let mut b = RestartBudget::new(&policy(0, 60));
        assert_eq!(b.on_failure(Instant::now()), RestartDecision::Failover { restarts_in_window: 0 });
    }
}
