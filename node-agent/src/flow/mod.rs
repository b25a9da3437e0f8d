//! Service flow steps: the executors that start, stop and check each step.
//!
//! The engine decides the order (start in order on promotion, stop in reverse on
//! demotion) and judges the results (stabilization and failure threshold in
//! `engine::flow`, the restart limit in `engine::restart`); [`runner::FlowRunner`] carries
//! out one step operation at a time and reports a structured [`Outcome`].

pub mod check;
pub mod command;
pub mod runner;
pub mod systemd;

use std::time::Duration;

pub use runner::FlowRunner;

/// How one start, stop or check went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `detail` is what the step printed or did, for events.
    Ok {
        detail: String,
    },
    Failed {
        reason: String,
        detail: String,
    },
    /// Overran its timeout; a command was killed with its whole process group.
    TimedOut {
        after: Duration,
        detail: String,
    },
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }

    /// A one-line reason, for events and step reports.
    pub fn summary(&self) -> String {
        match self {
            Outcome::Ok { .. } => "ok".to_string(),
            Outcome::Failed { reason, .. } => reason.clone(),
            Outcome::TimedOut { after, .. } => {
                format!("timed out after {}", hapair_crds::duration::Duration::from(*after))
            }
        }
    }
}
