//! A monitor's verdict over time: `failureThreshold` consecutive failed observations fire
//! it, one healthy observation clears it; observations are due every `interval`. Sans-IO.

use std::time::{Duration, Instant};

use hapair_crds::hagroup::{MonitorAction, MonitorSpec};

use super::Observation;

/// A change the engine must hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Fired { monitor: String, action: MonitorAction, restart_step: Option<String>, reason: String },
    Cleared { monitor: String },
}

/// One monitor's state.
#[derive(Clone, Debug)]
pub struct MonitorState {
    name: String,
    action: MonitorAction,
    restart_step: Option<String>,
    interval: Duration,
    failure_threshold: u32,
    consecutive_failures: u32,
    firing: bool,
    next_due: Option<Instant>,
    last: Option<Observation>,
}

impl MonitorState {
    pub fn new(spec: &MonitorSpec) -> Self {
        MonitorState {
            name: spec.name.clone(),
            action: spec.action,
            restart_step: spec.restart_step.clone(),
            interval: spec.interval.as_std(),
            failure_threshold: spec.failure_threshold.max(1),
            consecutive_failures: 0,
            firing: false,
            next_due: None,
            last: None,
        }
    }

    /// Whether an observation is due at `now` (the first one is due at once).
    pub fn due(&self, now: Instant) -> bool {
        self.next_due.is_none_or(|t| now >= t)
    }

    /// When the next observation is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.next_due
    }

    /// Records an observation made at `now`.
    pub fn observe(&mut self, now: Instant, observation: Observation) -> Option<Transition> {
        self.next_due = Some(now + self.interval);
        let transition = if observation.healthy {
            self.consecutive_failures = 0;
            if self.firing {
                self.firing = false;
                Some(Transition::Cleared { monitor: self.name.clone() })
            } else {
                None
            }
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            if !self.firing && self.consecutive_failures >= self.failure_threshold {
                self.firing = true;
                Some(Transition::Fired {
                    monitor: self.name.clone(),
                    action: self.action,
                    restart_step: self.restart_step.clone(),
                    reason: format!(
                        "monitor {} failed {} times in a row: {}",
                        self.name, self.consecutive_failures, observation.message
                    ),
                })
            } else {
                None
            }
        };
        self.last = Some(observation);
        transition
    }

    pub fn firing(&self) -> bool {
        self.firing
    }

    pub fn last(&self) -> Option<&Observation> {
        self.last.as_ref()
    }

    /// For the node report.
    pub fn report(&self) -> hapair_crds::nodeapi::MonitorReport {
        hapair_crds::nodeapi::MonitorReport {
            name: self.name.clone(),
            healthy: !self.firing,
            message: self.last.as_ref().map(|o| o.message.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(threshold: u32, action: &str) -> MonitorSpec {
        serde_json::from_value(serde_json::json!({
            "name": "pg", "process": {"name": "postgres"}, "action": action,
            "restartStep": "db", "interval": "2s", "failureThreshold": threshold
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn bad() -> Observation {
        Observation { healthy: false, message: "no process named postgres".into() }
    }

    fn good() -> Observation {
        Observation { healthy: true, message: "pid 42".into() }
    }

    #[test]
    fn fires_after_the_threshold_and_clears_on_health() {
        let t0 = Instant::now();
        let mut m = MonitorState::new(&spec(2, "restart"));
        assert!(m.due(t0));
        assert_eq!(m.observe(t0, bad()), None);
        assert!(!m.due(t0 + Duration::from_secs(1)));
        assert!(m.due(t0 + Duration::from_secs(2)));
        assert_eq!(
            m.observe(t0 + Duration::from_secs(2), bad()),
            Some(Transition::Fired {
                monitor: "pg".into(),
                action: MonitorAction::Restart,
                restart_step: Some("db".into()),
                reason: "monitor pg failed 2 times in a row: no process named postgres".into(),
            })
        );
        assert_eq!(m.observe(t0 + Duration::from_secs(4), bad()), None, "fires once");
        assert!(!m.report().healthy);
        assert_eq!(m.observe(t0 + Duration::from_secs(6), good()), Some(Transition::Cleared { monitor: "pg".into() }));
        assert!(m.report().healthy);
    }

    #[test]
    fn a_healthy_observation_resets_the_count() {
        let t0 = Instant::now();
        let mut m = MonitorState::new(&spec(2, "failover"));
        m.observe(t0, bad());
        m.observe(t0, good());
        assert_eq!(m.observe(t0, bad()), None);
        assert!(matches!(m.observe(t0, bad()), Some(Transition::Fired { action: MonitorAction::Failover, .. })));
    }
}
