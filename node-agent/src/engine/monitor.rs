//! Monitors: counting failed observations until a monitor fires, and the node health that
//! results.
//!
//! A monitor fires once when `failureThreshold` consecutive observations fail, and
//! recovers at the first healthy observation. What firing does depends on its action
//! (failover, restart, alert); that decision belongs to the engine.

use hapair_crds::hagroup::{MonitorAction, NodeHealth};
use hapair_crds::nodeapi::MonitorReport;

use super::config::PlannedMonitor;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MonitorState {
    failures: u32,
    firing: bool,
    message: Option<String>,
}

/// What one observation changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    Fired,
    Recovered,
}

#[derive(Clone, Debug, Default)]
pub struct Monitors {
    plan: Vec<PlannedMonitor>,
    states: Vec<MonitorState>,
}

impl Monitors {
    pub fn new(plan: Vec<PlannedMonitor>) -> Monitors {
        let states = vec![MonitorState::default(); plan.len()];
        Monitors { plan, states }
    }

    /// Replaces the plan, keeping the state of monitors that kept their name.
    pub fn replace(&mut self, plan: Vec<PlannedMonitor>) {
        let states = plan
            .iter()
            .map(|p| {
                self.plan.iter().position(|old| old.name == p.name).map(|i| self.states[i].clone()).unwrap_or_default()
            })
            .collect();
        self.plan = plan;
        self.states = states;
    }

    pub fn observe(&mut self, name: &str, healthy: bool, message: Option<String>) -> Option<(PlannedMonitor, Change)> {
        let i = self.plan.iter().position(|p| p.name == name)?;
        let plan = &self.plan[i];
        let state = &mut self.states[i];
        state.message = message;
        let change = if healthy {
            state.failures = 0;
            if std::mem::take(&mut state.firing) { Change::Recovered } else { Change::None }
        } else {
            state.failures = state.failures.saturating_add(1);
            if !state.firing && state.failures >= plan.failure_threshold {
                state.firing = true;
                Change::Fired
            } else {
                Change::None
            }
        };
        Some((plan.clone(), change))
    }

    fn any_firing(&self, pred: impl Fn(MonitorAction) -> bool) -> bool {
        self.plan.iter().zip(&self.states).any(|(p, s)| s.firing && pred(p.action))
    }

    /// Health from the monitors alone: a firing failover monitor makes the node Failed,
    /// any other firing monitor Degraded.
    pub fn health(&self) -> NodeHealth {
        if self.any_firing(|a| a == MonitorAction::Failover) {
            NodeHealth::Failed
        } else if self.any_firing(|_| true) {
            NodeHealth::Degraded
        } else {
            NodeHealth::Healthy
        }
    }

    pub fn reports(&self) -> Vec<MonitorReport> {
        self.plan
            .iter()
            .zip(&self.states)
            .map(|(p, s)| MonitorReport { name: p.name.clone(), healthy: !s.firing, message: s.message.clone() })
            .collect()
    }
}
