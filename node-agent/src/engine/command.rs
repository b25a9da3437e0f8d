//! What the engine asks the runtime to do.
//!
//! Execution contract (the simulation's executor follows it, and so must the agent):
//!
//! - commands are executed in the order given;
//! - [`Command::Persist`] is durable (written and synced) before any later command runs:
//!   an epoch must be on disk before the node acts in it;
//! - [`Command::ArmWatchdog`] guarantees that the machine is reset no later than
//!   `deadline` (local monotonic clock) unless a later `ArmWatchdog` or a
//!   [`Command::DisarmWatchdog`] arrives first: the backstop for a process that stalls
//!   while serving (`/dev/watchdog`, as sbd and Patroni use it);
//! - flow and volume commands report back with `Event::StepDone` / `Event::VolumeDone`;
//!   the engine never has two of them outstanding for the same step or volume;
//! - sending a heartbeat or a witness request is fire-and-forget; a witness request is
//!   answered with `Event::Witness` carrying the same `request_id`.

use hapair_crds::nodeapi::{ActionResult, EventType, LeaseRequest};

use super::heartbeat::Heartbeat;
use super::persist::PersistedState;
use super::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Send this heartbeat on every link.
    SendHeartbeat(Heartbeat),
    /// Ask the witness (acquire, renew or release the group's lease).
    Witness {
        request_id: u64,
        request: LeaseRequest,
    },
    /// Make the local replica primary (writable) in `epoch`. Without `force` the volume
    /// layer refuses a replica that is not UpToDate; `force` (force-active, split-brain
    /// winner) promotes it anyway.
    PromoteVolume {
        volume: String,
        epoch: u64,
        force: bool,
    },
    /// Make the local replica secondary (read-only).
    DemoteVolume {
        volume: String,
    },
    /// Start flow step `step` (attach/mount for volume steps, unit or command otherwise).
    StartStep {
        step: usize,
        name: String,
    },
    /// Stop flow step `step`.
    StopStep {
        step: usize,
        name: String,
    },
    /// Stop then start flow step `step` (a local restart before any failover).
    RestartStep {
        step: usize,
        name: String,
    },
    /// Add the virtual IP of `virtualIP` step `step` and announce it.
    AddVip {
        step: usize,
        vip: String,
    },
    /// Remove the virtual IP of `virtualIP` step `step`.
    RemoveVip {
        step: usize,
        vip: String,
    },
    /// End a split brain on `volume`: keep the local data (winner) or discard it (loser).
    ResolveSplitBrain {
        volume: String,
        keep_local: bool,
    },
    /// Start an online verify of `volume` for admin action `action`; reports back with
    /// `Event::VerifyStarted`.
    StartVerify {
        volume: String,
        action: String,
    },
    ArmWatchdog {
        deadline: Instant,
    },
    DisarmWatchdog,
    Persist(PersistedState),
    /// A decision or incident worth an event (Kubernetes Event in operator mode).
    Emit(Notice),
    /// The outcome of an admin action, for the node report.
    ActionResult(ActionResult),
}

/// An event with a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub type_: EventType,
    pub reason: Reason,
    pub message: String,
}

/// Machine-readable reasons of [`Notice`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Decided to become primary (candidate).
    Promoting,
    /// Started acting as primary in a new epoch.
    Acting,
    /// The flow is up: serving.
    Promoted,
    /// The agent restarted within its lease and serves on without interruption.
    Resumed,
    Demoting,
    Demoted,
    /// Lost (or about to lose) the lease: demoting itself.
    SelfFenced,
    /// Heard nothing from the peer on any link for `deadAfter`.
    PeerLost,
    PeerFound,
    PeerRestarted,
    /// The peer serves in a newer epoch.
    NewerPrimary,
    /// A message from an older epoch was refused.
    StaleEpoch,
    WitnessDenied,
    /// A witness request failed or went unanswered while the witness was needed.
    WitnessUnreachable,
    Switchover,
    Failback,
    ForceActive,
    SplitBrainResolved,
    /// An online verify was asked for (started, or refused).
    Verify,
    Candidacy,
    StepFailed,
    StepRestarted,
    StopFailed,
    ProbeFailed,
    ProbeRecovered,
    /// A failover was wanted but cannot happen (peer not ready, maintenance).
    FailoverBlocked,
    Maintenance,
    ActionRejected,
    ActionFailed,
    ConfigApplied,
    ConfigRejected,
    CleanedUp,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Promoting => "Promoting",
            Reason::Acting => "Acting",
            Reason::Promoted => "Promoted",
            Reason::Resumed => "Resumed",
            Reason::Demoting => "Demoting",
            Reason::Demoted => "Demoted",
            Reason::SelfFenced => "SelfFenced",
            Reason::PeerLost => "PeerLost",
            Reason::PeerFound => "PeerFound",
            Reason::PeerRestarted => "PeerRestarted",
            Reason::NewerPrimary => "NewerPrimary",
            Reason::StaleEpoch => "StaleEpoch",
            Reason::WitnessDenied => "WitnessDenied",
            Reason::WitnessUnreachable => "WitnessUnreachable",
            Reason::Switchover => "Switchover",
            Reason::Failback => "Failback",
            Reason::ForceActive => "ForceActive",
            Reason::SplitBrainResolved => "SplitBrainResolved",
            Reason::Verify => "Verify",
            Reason::Candidacy => "Candidacy",
            Reason::StepFailed => "StepFailed",
            Reason::StepRestarted => "StepRestarted",
            Reason::StopFailed => "StopFailed",
            Reason::ProbeFailed => "ProbeFailed",
            Reason::ProbeRecovered => "ProbeRecovered",
            Reason::FailoverBlocked => "FailoverBlocked",
            Reason::Maintenance => "Maintenance",
            Reason::ActionRejected => "ActionRejected",
            Reason::ActionFailed => "ActionFailed",
            Reason::ConfigApplied => "ConfigApplied",
            Reason::ConfigRejected => "ConfigRejected",
            Reason::CleanedUp => "CleanedUp",
        }
    }
}
