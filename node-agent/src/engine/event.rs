//! What the runtime tells the engine.
//!
//! Every input is an [`Event`] handed to `Engine::handle` together with the current
//! monotonic time. Nothing is missing from this list on purpose:
//!
//! - *heartbeat missed*: the engine keeps per-link arrival times and notices silence on
//!   its own at the deadline it asked for (`Engine::next_deadline`), so the runtime only
//!   reports what arrives; [`Event::Tick`] carries the time;
//! - *heartbeat acknowledgement*: acknowledgements ride inside the peer's heartbeats
//!   ([`super::heartbeat::LeaseGrant`]);
//! - *resume after a stall*: every event first re-checks the lease against `now`, so the
//!   first event after a pause (usually a tick) is where a stalled primary fences itself.

use hapair_crds::nodeapi::{AdminAction, GroupConfig, LeaseResponse};
use hapair_crds::volume::{ConnectionState, DiskState};

use super::heartbeat::Heartbeat;

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Time passed; the runtime calls this at (or after) `Engine::next_deadline`.
    Tick,
    /// An authenticated heartbeat arrived on heartbeat link `link` (0-based).
    Heartbeat { link: usize, message: Heartbeat },
    /// The witness answered request `request_id`, or the request failed.
    Witness { request_id: u64, answer: WitnessAnswer },
    /// One observation of a monitor.
    Probe { monitor: String, healthy: bool, message: Option<String> },
    /// One health-check observation of a running flow step.
    StepCheck { step: usize, healthy: bool, message: Option<String> },
    /// A step command (start, stop or restart; for `virtualIP` steps: add or remove the
    /// address) finished.
    StepDone { step: usize, op: StepOp, result: Result<(), String> },
    /// A volume promotion or demotion finished.
    VolumeDone { volume: String, op: VolumeOp, result: Result<(), String> },
    /// The replica of `volume` started the verify of admin action `action`, or refused it.
    VerifyStarted { action: String, volume: String, result: Result<(), String> },
    /// The local replica of a volume changed state.
    Volume { volume: String, disk: DiskState, connection: ConnectionState },
    /// An admin action (also accepted inside [`Event::Config`]).
    Admin(AdminAction),
    /// A new desired config for this group.
    Config(Box<GroupConfig>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WitnessAnswer {
    Response(LeaseResponse),
    /// No answer within the runtime's request timeout.
    Timeout,
    /// The request could not be made (connection refused, TLS, HTTP error).
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepOp {
    Start,
    Stop,
    Restart,
}

impl StepOp {
    pub fn as_str(&self) -> &'static str {
        match self {
            StepOp::Start => "start",
            StepOp::Stop => "stop",
            StepOp::Restart => "restart",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VolumeOp {
    Promote,
    Demote,
}
