//! What crosses the boundary: inputs, outputs, disk operations and their tags, refusals, events.

use bytes::Bytes;
use hapair_crds::volume::DiskState;

use super::{ConnId, ReqId};
use crate::replication::geometry::BlockRange;
use crate::replication::wire::{Envelope, Frame, Resolution};

/// Why a request or an administrative action was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not allowed in the current role or state.
    NotPermitted,
    /// A disk operation failed.
    Io,
    /// Outside the volume.
    OutOfRange,
    /// Not possible right now, but may be once a transient state passes.
    Busy,
}

pub(super) fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into() }
}

/// Identifies what a disk operation was for, so its completion can be routed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoTag {
    App(ReqId),
    AppFlush(ReqId),
    PeerWrite { conn: ConnId, seq: u64 },
    PeerFlush { conn: ConnId, seq: u64 },
    ResyncRead { conn: ConnId, range: BlockRange },
    ResyncWrite { conn: ConnId, range: BlockRange },
    VerifyLocal { start: u64, range: BlockRange },
    VerifyPeer { conn: ConnId, range: BlockRange },
    DemoteFlush,
    Meta(MetaPurpose),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaPurpose {
    Promote(ReqId),
    Demote(ReqId),
    SyncTargetReady(ConnId),
    SyncTargetDone(ConnId),
    SyncSourceDone,
    Housekeeping,
    Checkpoint(ReqId),
    /// An activity-log transaction: until it is durable nothing more goes to the peer.
    ActivityLog,
}

/// One step of a metadata update; steps run in order, each finished before the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaStep {
    /// A metadata write, durable when the step finishes: nothing written after it (data or
    /// metadata) can reach the disk before it.
    Write { offset: u64, bytes: Vec<u8> },
    /// Every data write issued before this step is durable.
    SyncData,
}

/// A disk operation for the ordered disk worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoOp {
    Write { tag: IoTag, offset: u64, data: Bytes, fua: bool },
    Zero { tag: IoTag, offset: u64, len: u64, punch: bool, fua: bool },
    Read { tag: IoTag, offset: u64, len: u32 },
    Digest { tag: IoTag, offset: u64, len: u32 },
    Flush { tag: IoTag },
    Meta { tag: Option<IoTag>, steps: Vec<MetaStep> },
}

/// What a completed disk operation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoOutput {
    Done,
    Data(Bytes),
    Digests(Vec<u128>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Write {
        req: ReqId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Zero {
        req: ReqId,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    },
    Flush {
        req: ReqId,
    },
    Promote {
        req: ReqId,
        epoch: u64,
        force: bool,
        wall_ms: u64,
    },
    Demote {
        req: ReqId,
        force: bool,
        open_clients: usize,
    },
    ObserveEpoch {
        epoch: u64,
    },
    /// The engine gave up its lease (self-fenced): the peer may be promoted once the lease
    /// has run out, so nothing may complete here any more without the peer's ack.
    LeaseLost {
        reason: String,
    },
    StartVerify {
        req: ReqId,
    },
    ResolveSplitBrain {
        req: ReqId,
        resolution: Resolution,
    },
    /// Make the bitmap and superblock durable now (clean shutdown).
    Checkpoint {
        req: ReqId,
    },
    Connected {
        conn: ConnId,
    },
    Frame {
        conn: ConnId,
        env: Envelope,
    },
    Sent {
        conn: ConnId,
        seq: u64,
    },
    Disconnected {
        conn: ConnId,
        reason: String,
    },
    IoDone {
        tag: IoTag,
        result: Result<IoOutput, String>,
    },
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Io(IoOp),
    /// Send `frame` on connection `conn` stamped with `epoch`; with `notify_sent`, report
    /// [`Input::Sent`] once it is written to the socket.
    Send {
        conn: ConnId,
        frame: Frame,
        epoch: u64,
        notify_sent: bool,
    },
    Complete {
        req: ReqId,
        result: Result<(), Refusal>,
    },
    /// Close the connection; the machine has already forgotten it. Reconnect no sooner
    /// than `retry_after_ms`.
    Close {
        conn: ConnId,
        reason: String,
        retry_after_ms: u64,
    },
    Event(ReplicaEvent),
}

/// Blocks overwritten when a split brain was resolved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscardRecord {
    /// True on the replica whose changes were discarded.
    pub local_discarded: bool,
    pub resolved_by: String,
    /// Byte ranges `(offset, length)` the resync overwrites on the losing replica (in
    /// status snapshots only the first [`SNAPSHOT_RANGES`](super::SNAPSHOT_RANGES); events
    /// carry them all).
    pub ranges: Vec<(u64, u64)>,
    pub total_ranges: usize,
    pub bytes: u64,
}

/// Things worth telling the engine and the operator, each with its reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum ReplicaEvent {
    Promoted { epoch: u64, forced: bool },
    Demoted,
    Fenced { epoch: u64, reason: String },
    Connected { peer: String },
    Disconnected { reason: String },
    PeerRefused { reason: String },
    SplitBrain { reason: String },
    SyncStarted { source: bool, full: bool, bytes: u64, reason: String },
    SyncFinished { source: bool, bytes: u64, elapsed_ms: u64 },
    Discarded(DiscardRecord),
    VerifyFinished { mismatched: Vec<(u64, u64)>, checked_bytes: u64, elapsed_ms: u64 },
    DiskStateChanged { from: DiskState, to: DiskState, reason: String },
    IoError { operation: String, message: String },
}
