//! What reaches a group task: its one inbox carries config changes, the results of the
//! step, volume and witness operations it started, replica status and probe observations.
//!
//! It is its own room so that the tasks which answer ([`super::steps`], [`super::volumes`])
//! depend on the message and not on the group task that reads it.

use hapair_crds::nodeapi::GroupConfig;
use hapair_crds::volume::VerifyReport;

use crate::engine::{StepOp, VolumeOp, WitnessAnswer};
use crate::probe::{Observation, Probe};
use crate::replication::replica::Replica;
use crate::replication::status::ReplicaStatus;

/// What reaches a group task.
#[derive(Debug)]
pub enum Input {
    /// A new desired config for the group.
    Config(Box<GroupConfig>),
    /// The group is gone from the bundle: stop everything, report, end.
    Remove,
    StepDone {
        step: usize,
        op: StepOp,
        result: Result<(), String>,
    },
    VolumeDone {
        volume: String,
        op: VolumeOp,
        result: Result<(), String>,
    },
    /// A replica started (or refused) the verify of an admin action.
    VerifyStarted {
        action: String,
        volume: String,
        result: Result<(), String>,
    },
    /// A replica finished a verify: what it found, for the reports.
    VolumeVerified {
        volume: String,
        report: Box<VerifyReport>,
    },
    /// A replica of the group finished opening.
    VolumeOpened {
        volume: String,
        replica: Box<Replica>,
    },
    /// A replica's status changed.
    VolumeStatus {
        volume: String,
        status: Box<ReplicaStatus>,
    },
    Witness {
        request_id: u64,
        answer: WitnessAnswer,
    },
    Observed {
        generation: u64,
        index: usize,
        probe: Box<Probe>,
        observation: Observation,
        at: std::time::Instant,
    },
    Checked {
        step: usize,
        generation: u64,
        healthy: bool,
        message: Option<String>,
    },
}
