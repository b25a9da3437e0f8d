//! The replica state machine: every decision about one replica, with no I/O.
//!
//! Inputs are application requests (from the NBD export), role changes (from the engine),
//! connection events and frames (from the replication link), completed disk operations and
//! clock ticks; outputs are disk operations for the ordered disk worker, frames to send,
//! request completions, connection closes and events. The driver in [`super::replica`]
//! executes the outputs; tests feed inputs and assert the exact outputs.
//!
//! Ordering is the invariant everything rests on: disk operations are executed in the
//! order they are emitted, and frames are sent in the order they are emitted. A metadata
//! update emitted before a data write is therefore durable before that write starts, and
//! the peer applies replicated writes in the order the primary applied them. Resync and
//! verify reads on the source are the one place where a read result is sent later; writes
//! overlapping such a read wait until its result has been sent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;

use bytes::Bytes;
use hapair_crds::volume::{ConnectionState, DiskState, SyncProgress, VolumeRole};

use super::activity_log::{ActivityLog, Admission};
use super::bitmap::Bitmap;
use super::geometry::{BLOCK_SIZE, BlockRange, blocks_touched, extents_touched};
use super::handshake::{self, Decision, SyncReason};
use super::metadata::{Layout, StoredDisk, Superblock, encode_bitmap_page, flags};
use super::resync::{ProgressMeter, ResyncLimits, ResyncPlanner};
use super::verify::VerifyPlanner;
use super::wire::{
    Envelope, Frame, Hello, MAX_DATA, PROTOCOL_VERSION, Resolution, WireDisk, WirePolicy, WireProtocol, WireRole,
};

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;

pub type ReqId = u64;
pub type ConnId = u64;

/// Fixed parameters of one replica.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub node: String,
    pub peer: String,
    pub protocol: WireProtocol,
    pub policy: WirePolicy,
    pub resync: ResyncLimits,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    pub bitmap_flush_interval_ms: u64,
    pub layout: Layout,
}

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

fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
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

/// One step of a metadata update; steps run in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaStep {
    Write { offset: u64, bytes: Vec<u8> },
    SyncMeta,
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
    /// status snapshots only the first [`SNAPSHOT_RANGES`]; events carry them all).
    pub ranges: Vec<(u64, u64)>,
    pub total_ranges: usize,
    pub bytes: u64,
}

/// Ranges kept in status snapshots; the events and logs carry the full lists.
pub const SNAPSHOT_RANGES: usize = 64;

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
    VerifyFinished { mismatched: Vec<(u64, u64)>, checked_bytes: u64 },
    DiskStateChanged { from: DiskState, to: DiskState, reason: String },
    IoError { operation: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    /// Bitmaps are being exchanged before a resync.
    Bitmaps {
        source: bool,
    },
    /// The target persisted the merged bitmap and is requesting blocks (or, on the
    /// source, the source serves requests).
    Syncing {
        source: bool,
    },
    Ready,
    /// Connected, but neither side has data to offer until a forced promotion.
    Waiting,
}

#[derive(Debug)]
struct SyncRun {
    source: bool,
    full: bool,
    reason: SyncReason,
    peer_gens: super::generation::Generations,
    got_peer_bitmap: bool,
    target_ready: bool,
    planner: Option<ResyncPlanner>,
    meter: ProgressMeter,
    started_ms: u64,
    discard: Option<DiscardRecord>,
    resolved_by: Option<String>,
}

#[derive(Debug)]
struct Link {
    conn: ConnId,
    phase: Phase,
    /// The hello this side sent; the decision must use exactly what the peer saw.
    local_hello: Hello,
    peer: Option<Hello>,
    peer_role: WireRole,
    peer_disk: WireDisk,
    last_rx_ms: u64,
    last_ping_ms: u64,
    opened_ms: u64,
    sync: Option<SyncRun>,
}

impl Link {
    /// Whether application writes are mirrored to the peer on this link.
    fn replicating(&self) -> bool {
        match self.phase {
            Phase::Ready => true,
            Phase::Bitmaps { source } | Phase::Syncing { source } => source,
            Phase::AwaitHello | Phase::Waiting => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqKind {
    Write,
    Zero,
    Flush,
}

/// An application request in flight. It is *completed* (the client told) once local and
/// peer are done as the protocol requires, and *retired* (its activity-log reference
/// dropped) only once the peer acknowledged it, so under protocol A an extent stays hot
/// until the peer really has the data.
#[derive(Debug)]
struct AppReq {
    kind: ReqKind,
    range: BlockRange,
    extents: Range<u64>,
    local_done: bool,
    peer_sent: bool,
    peer_acked: bool,
    completed: bool,
    error: Option<Refusal>,
}

#[derive(Debug)]
enum Stalled {
    Write { req: ReqId, offset: u64, data: Bytes, fua: bool },
    Zero { req: ReqId, offset: u64, len: u64, fua: bool, punch: bool },
    Flush { req: ReqId },
}

impl Stalled {
    fn req(&self) -> ReqId {
        match self {
            Stalled::Write { req, .. } | Stalled::Zero { req, .. } | Stalled::Flush { req } => *req,
        }
    }
}

#[derive(Debug)]
struct DemoteRun {
    req: ReqId,
    flush_sent: bool,
    local_flushed: bool,
    peer_flush_seq: Option<u64>,
    persisting: bool,
}

#[derive(Debug)]
struct VerifyRun {
    conn: ConnId,
    planner: VerifyPlanner,
}

/// Counters for status and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    pub resync_bytes_sent: u64,
    pub resync_bytes_received: u64,
    pub last_sync_bytes: u64,
    pub last_sync_ms: u64,
    pub syncs_completed: u64,
    pub verify_mismatched_bytes: u64,
    pub verifies_completed: u64,
}

/// A point-in-time view of the replica, cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub role: VolumeRole,
    pub disk: DiskState,
    pub connection: ConnectionState,
    pub peer_disk: Option<DiskState>,
    pub peer_role: Option<VolumeRole>,
    pub out_of_sync_bytes: u64,
    pub sync: Option<SyncProgress>,
    pub verify: Option<SyncProgress>,
    pub epoch: u64,
    pub fenced: bool,
    pub split_brain: Option<String>,
    pub refused: Option<String>,
    pub crashed_primary: bool,
    pub generations: super::generation::Generations,
    pub last_discard: Option<DiscardRecord>,
    pub last_verify_mismatches: Option<Vec<(u64, u64)>>,
    pub counters: Counters,
    pub writes_allowed: bool,
    pub reads_allowed: bool,
}

const RETRY_SOON_MS: u64 = 200;
const RETRY_LATER_MS: u64 = 2_000;

#[derive(Debug)]
pub struct Machine {
    cfg: MachineConfig,
    sb: Superblock,
    sb_dirty: bool,
    bitmap: Bitmap,
    al: ActivityLog,
    role: Role,
    fenced: bool,
    link: Option<Link>,
    last_peer_disk: Option<WireDisk>,
    last_peer_role: Option<WireRole>,
    split_brain: Option<String>,
    refused: Option<String>,
    resolution: Option<Resolution>,
    requests: HashMap<ReqId, AppReq>,
    stalled: VecDeque<Stalled>,
    peer_pending: BTreeMap<u64, ReqId>,
    peer_flushes: BTreeMap<u64, ReqId>,
    next_seq: u64,
    reads: Vec<BlockRange>,
    demote: Option<DemoteRun>,
    verify: Option<VerifyRun>,
    last_discard: Option<DiscardRecord>,
    last_verify: Option<Vec<(u64, u64)>>,
    counters: Counters,
    last_flush_ms: u64,
    rng: u64,
    now: u64,
    out: Vec<Output>,
    /// Activity-log transactions issued and not yet durable.
    al_unsynced: u32,
    /// Frames held back until those transactions are durable, in order. A peer must never
    /// hold a write whose extent this replica's activity log may not record: if this
    /// primary died first, it would come back believing that extent clean, and the resync
    /// would leave the two replicas different.
    held: VecDeque<Output>,
}

impl Machine {
    /// A replica as loaded from disk. It always starts secondary: after a restart only the
    /// engine may decide it is primary again.
    pub fn new(cfg: MachineConfig, sb: Superblock, bitmap: Bitmap, al: ActivityLog, now_ms: u64, seed: u64) -> Self {
        Machine {
            cfg,
            sb,
            sb_dirty: false,
            bitmap,
            al,
            role: Role::Secondary,
            fenced: false,
            link: None,
            last_peer_disk: None,
            last_peer_role: None,
            split_brain: None,
            refused: None,
            resolution: None,
            requests: HashMap::new(),
            stalled: VecDeque::new(),
            peer_pending: BTreeMap::new(),
            peer_flushes: BTreeMap::new(),
            next_seq: 1,
            reads: Vec::new(),
            demote: None,
            verify: None,
            last_discard: None,
            last_verify: None,
            counters: Counters::default(),
            last_flush_ms: now_ms,
            rng: seed | 1,
            now: now_ms,
            out: Vec::new(),
            al_unsynced: 0,
            held: VecDeque::new(),
        }
    }

    /// Feeds one input at time `now_ms` (monotonic) and returns the outputs, in order.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Output> {
        self.now = self.now.max(now_ms);
        match input {
            Input::Write { req, offset, data, fua } => self.on_app(Stalled::Write { req, offset, data, fua }),
            Input::Zero { req, offset, len, fua, punch } => self.on_app(Stalled::Zero { req, offset, len, fua, punch }),
            Input::Flush { req } => self.on_app(Stalled::Flush { req }),
            Input::Promote { req, epoch, force, wall_ms } => self.on_promote(req, epoch, force, wall_ms),
            Input::Demote { req, force, open_clients } => self.on_demote(req, force, open_clients),
            Input::ObserveEpoch { epoch } => self.observe_epoch(epoch, "the engine reported a newer epoch"),
            Input::StartVerify { req } => self.on_start_verify(req),
            Input::ResolveSplitBrain { req, resolution } => self.on_resolve(req, resolution),
            Input::Checkpoint { req } => self.persist(Some(IoTag::Meta(MetaPurpose::Checkpoint(req))), true),
            Input::Connected { conn } => self.on_connected(conn),
            Input::Frame { conn, env } => self.on_frame(conn, env),
            Input::Sent { conn, seq } => self.on_sent(conn, seq),
            Input::Disconnected { conn, reason } => {
                if self.link.as_ref().is_some_and(|l| l.conn == conn) {
                    self.drop_link(&reason);
                }
            }
            Input::IoDone { tag, result } => self.on_io_done(tag, result),
            Input::Tick => self.on_tick(),
        }
        self.pump_stalled();
        self.progress_demote();
        if self.al_unsynced > 0
            && let Some(current) = self.conn()
        {
            // Frames to a link being closed (its goodbye) go at once; it gets nothing else.
            let (sends, rest): (Vec<Output>, Vec<Output>) = std::mem::take(&mut self.out)
                .into_iter()
                .partition(|o| matches!(o, Output::Send { conn, .. } if *conn == current));
            self.held.extend(sends);
            self.out = rest;
        }
        std::mem::take(&mut self.out)
    }

    // ----- small helpers -------------------------------------------------------------

    fn fresh_gen(&mut self) -> u64 {
        // splitmix64: deterministic given the seed, so tests can predict identifiers.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) | 0x100
    }

    fn emit(&mut self, o: Output) {
        self.out.push(o);
    }

    fn event(&mut self, e: ReplicaEvent) {
        self.out.push(Output::Event(e));
    }

    fn io(&mut self, op: IoOp) {
        self.out.push(Output::Io(op));
    }

    fn send(&mut self, conn: ConnId, frame: Frame) {
        let epoch = self.sb.known_epoch;
        self.out.push(Output::Send { conn, frame, epoch, notify_sent: false });
    }

    fn complete(&mut self, req: ReqId, result: Result<(), Refusal>) {
        self.out.push(Output::Complete { req, result });
    }

    fn superblock_steps(&mut self) -> Vec<MetaStep> {
        self.sb.seq += 1;
        self.sb_dirty = false;
        let slot = (self.sb.seq % 2) as usize;
        vec![
            MetaStep::Write { offset: self.cfg.layout.superblock_offset(slot), bytes: self.sb.encode() },
            MetaStep::SyncMeta,
        ]
    }

    fn bitmap_steps(&mut self) -> Vec<MetaStep> {
        let pages = self.bitmap.take_dirty_pages();
        let mut steps: Vec<MetaStep> = pages
            .into_iter()
            .map(|p| MetaStep::Write {
                offset: self.cfg.layout.bitmap_page_offset(p),
                bytes: encode_bitmap_page(&self.bitmap, p, self.sb.format_id),
            })
            .collect();
        if !steps.is_empty() {
            steps.push(MetaStep::SyncMeta);
        }
        steps
    }

    /// Persists the superblock, after the changed bitmap pages when `with_bitmap`.
    fn persist(&mut self, tag: Option<IoTag>, with_bitmap: bool) {
        let mut steps = Vec::new();
        if with_bitmap {
            // Clearing a bit on disk is only safe once the data it stood for is durable.
            steps.push(MetaStep::SyncData);
            steps.extend(self.bitmap_steps());
        }
        steps.extend(self.superblock_steps());
        self.io(IoOp::Meta { tag, steps });
    }

    fn disk_state(&self) -> DiskState {
        match self.sb.disk {
            StoredDisk::UpToDate => DiskState::UpToDate,
            StoredDisk::Inconsistent => DiskState::Inconsistent,
            StoredDisk::Outdated => DiskState::Outdated,
        }
    }

    fn set_disk(&mut self, disk: StoredDisk, reason: &str) {
        if self.sb.disk == disk {
            return;
        }
        let from = self.disk_state();
        self.sb.disk = disk;
        self.sb_dirty = true;
        let to = self.disk_state();
        self.event(ReplicaEvent::DiskStateChanged { from, to, reason: reason.to_string() });
        if let Some(conn) = self.link.as_ref().filter(|l| l.phase != Phase::AwaitHello).map(|l| l.conn) {
            let frame = Frame::State { role: self.wire_role(), disk: wire_disk(disk) };
            self.send(conn, frame);
        }
    }

    fn wire_role(&self) -> WireRole {
        match self.role {
            Role::Primary => WireRole::Primary,
            Role::Secondary => WireRole::Secondary,
        }
    }

    fn blocks(&self) -> u64 {
        self.bitmap.blocks()
    }

    fn size(&self) -> u64 {
        self.sb.data_size
    }

    fn conn(&self) -> Option<ConnId> {
        self.link.as_ref().map(|l| l.conn)
    }

    /// Starts tracking changes the peer will not receive (DRBD's new current UUID), made
    /// durable before the write that caused it.
    fn ensure_tracking(&mut self) {
        if self.sb.gens.bitmap == 0 && self.role == Role::Primary {
            let fresh = self.fresh_gen();
            self.sb.gens.start_tracking(fresh);
            self.persist(None, false);
        }
    }

    // ----- application requests --------------------------------------------------------

    fn writes_allowed(&self) -> Result<(), Refusal> {
        if self.role != Role::Primary {
            return Err(refusal(ErrorCode::NotPermitted, "the volume is secondary here: read-only"));
        }
        if self.fenced {
            return Err(refusal(ErrorCode::NotPermitted, "a newer epoch exists: this primary is fenced"));
        }
        if self.demote.is_some() {
            return Err(refusal(ErrorCode::NotPermitted, "the volume is being demoted"));
        }
        Ok(())
    }

    fn on_app(&mut self, op: Stalled) {
        if let Err(e) = self.writes_allowed() {
            self.complete(op.req(), Err(e));
            return;
        }
        if let Stalled::Write { offset, data, .. } = &op
            && (offset.checked_add(data.len() as u64).is_none_or(|end| end > self.size()) || data.is_empty())
        {
            self.complete(op.req(), Err(refusal(ErrorCode::OutOfRange, "write outside the volume")));
            return;
        }
        if let Stalled::Zero { offset, len, .. } = &op
            && (offset.checked_add(*len).is_none_or(|end| end > self.size()) || *len == 0)
        {
            self.complete(op.req(), Err(refusal(ErrorCode::OutOfRange, "zero outside the volume")));
            return;
        }
        self.stalled.push_back(op);
    }

    /// Starts stalled requests in order until one cannot start yet.
    fn pump_stalled(&mut self) {
        while let Some(op) = self.stalled.pop_front() {
            if let Err(e) = self.writes_allowed() {
                self.complete(op.req(), Err(e));
                continue;
            }
            match self.try_start(op) {
                Ok(()) => {}
                Err(op) => {
                    self.stalled.push_front(op);
                    return;
                }
            }
        }
    }

    fn try_start(&mut self, op: Stalled) -> Result<(), Stalled> {
        if self.link.as_ref().is_some_and(|l| l.phase == Phase::AwaitHello) {
            // Both sides must see stable state while they compare it.
            return Err(op);
        }
        let (req, kind, offset, len) = match &op {
            Stalled::Write { req, offset, data, .. } => (*req, ReqKind::Write, *offset, data.len() as u64),
            Stalled::Zero { req, offset, len, .. } => (*req, ReqKind::Zero, *offset, *len),
            Stalled::Flush { req } => (*req, ReqKind::Flush, 0, 0),
        };
        if kind == ReqKind::Flush {
            self.start_flush(req);
            return Ok(());
        }
        let range = blocks_touched(offset, len);
        if self.reads.iter().any(|r| r.overlaps(&range)) {
            return Err(op);
        }
        let extents = extents_touched(offset, len);
        match self.al.admit(extents.clone()) {
            Admission::Busy => return Err(op),
            Admission::Ready(None) => {}
            Admission::Ready(Some(tx)) => {
                let mut steps = Vec::new();
                if !tx.evicted.is_empty() {
                    steps.extend(self.bitmap_steps());
                }
                steps.push(MetaStep::Write { offset: self.cfg.layout.al_block_offset(tx.ring_index), bytes: tx.block });
                steps.push(MetaStep::SyncMeta);
                self.io(IoOp::Meta { tag: Some(IoTag::Meta(MetaPurpose::ActivityLog)), steps });
                self.al_unsynced += 1;
            }
        }
        let replicate = self.link.as_ref().filter(|l| l.replicating()).map(|l| l.conn);
        let mut peer_acked = true;
        if let Some(conn) = replicate {
            let seq = self.next_seq;
            self.next_seq += 1;
            let frame = match &op {
                Stalled::Write { offset, data, fua, .. } => {
                    Frame::Data { seq, offset: *offset, fua: *fua, data: data.clone() }
                }
                Stalled::Zero { offset, len, fua, punch, .. } => {
                    Frame::Zero { seq, offset: *offset, len: *len, fua: *fua, punch: *punch }
                }
                Stalled::Flush { .. } => return Ok(()),
            };
            let notify_sent = self.cfg.protocol == WireProtocol::A;
            let epoch = self.sb.known_epoch;
            self.out.push(Output::Send { conn, frame, epoch, notify_sent });
            self.peer_pending.insert(seq, req);
            peer_acked = false;
        } else {
            self.ensure_tracking();
            self.bitmap.set_range(range);
        }
        match op {
            Stalled::Write { offset, data, fua, .. } => {
                self.io(IoOp::Write { tag: IoTag::App(req), offset, data, fua });
            }
            Stalled::Zero { offset, len, fua, punch, .. } => {
                self.io(IoOp::Zero { tag: IoTag::App(req), offset, len, punch, fua });
            }
            Stalled::Flush { .. } => {}
        }
        self.requests.insert(
            req,
            AppReq {
                kind,
                range,
                extents,
                local_done: false,
                peer_sent: peer_acked,
                peer_acked,
                completed: false,
                error: None,
            },
        );
        Ok(())
    }

    fn start_flush(&mut self, req: ReqId) {
        self.io(IoOp::Flush { tag: IoTag::AppFlush(req) });
        let mut peer_acked = true;
        if let Some(conn) = self.link.as_ref().filter(|l| l.replicating()).map(|l| l.conn) {
            let seq = self.next_seq;
            self.next_seq += 1;
            let epoch = self.sb.known_epoch;
            let notify_sent = self.cfg.protocol == WireProtocol::A;
            self.out.push(Output::Send { conn, frame: Frame::Flush { seq }, epoch, notify_sent });
            self.peer_flushes.insert(seq, req);
            peer_acked = false;
        }
        self.requests.insert(
            req,
            AppReq {
                kind: ReqKind::Flush,
                range: BlockRange::new(0, 0),
                extents: 0..0,
                local_done: false,
                peer_sent: peer_acked,
                peer_acked,
                completed: false,
                error: None,
            },
        );
    }

    fn maybe_finish(&mut self, req: ReqId) {
        let protocol_a = self.cfg.protocol == WireProtocol::A;
        let Some(r) = self.requests.get_mut(&req) else { return };
        if !r.local_done {
            return;
        }
        let mut result = None;
        if !r.completed && (r.peer_acked || (protocol_a && r.peer_sent)) {
            r.completed = true;
            result = Some(match r.error.clone() {
                Some(e) => Err(e),
                None => Ok(()),
            });
        }
        let retire = r.peer_acked;
        if let Some(result) = result {
            self.complete(req, result);
        }
        if retire
            && let Some(r) = self.requests.remove(&req)
            && r.kind != ReqKind::Flush
        {
            self.al.release(r.extents.clone());
        }
    }

    /// The peer acknowledged (or can no longer acknowledge) a request.
    fn peer_finished(&mut self, req: ReqId, ok: bool) {
        let mut lost = None;
        if let Some(r) = self.requests.get_mut(&req) {
            r.peer_acked = true;
            r.peer_sent = true;
            if !ok && r.kind != ReqKind::Flush {
                lost = Some(r.range);
            }
        }
        if let Some(range) = lost {
            // The peer does not have this write: it is out of sync from now on.
            self.ensure_tracking();
            self.bitmap.set_range(range);
        }
        self.maybe_finish(req);
    }

    fn on_sent(&mut self, conn: ConnId, seq: u64) {
        if self.conn() != Some(conn) || self.cfg.protocol != WireProtocol::A {
            return;
        }
        // Protocol A completes on send; the ack later retires the request.
        if let Some(&req) = self.peer_pending.get(&seq).or_else(|| self.peer_flushes.get(&seq))
            && let Some(r) = self.requests.get_mut(&req)
        {
            r.peer_sent = true;
            self.maybe_finish(req);
        }
    }

    // ----- role changes ------------------------------------------------------------------

    fn on_promote(&mut self, req: ReqId, epoch: u64, force: bool, wall_ms: u64) {
        if epoch < self.sb.known_epoch {
            let msg = format!("epoch {epoch} is older than the newest known epoch {}", self.sb.known_epoch);
            self.complete(req, Err(refusal(ErrorCode::NotPermitted, msg)));
            return;
        }
        if self.demote.is_some() {
            self.complete(req, Err(refusal(ErrorCode::Busy, "a demotion is in progress")));
            return;
        }
        if let Some(link) = &self.link {
            if link.phase == Phase::AwaitHello {
                self.complete(req, Err(refusal(ErrorCode::Busy, "the replication handshake is in progress")));
                return;
            }
            if link.peer_role == WireRole::Primary {
                let msg = format!("peer {} is primary", self.cfg.peer);
                self.complete(req, Err(refusal(ErrorCode::NotPermitted, msg)));
                return;
            }
            if link.sync.as_ref().is_some_and(|s| !s.source) {
                let msg = "this replica is a sync target: its data is inconsistent until the resync completes";
                self.complete(req, Err(refusal(ErrorCode::NotPermitted, msg)));
                return;
            }
        }
        let was_primary = self.role == Role::Primary;
        let mut forced = false;
        if self.sb.disk != StoredDisk::UpToDate {
            if !force {
                let msg = format!(
                    "the local disk is {}: promotion needs UpToDate data (or an explicit force)",
                    self.disk_state().as_str()
                );
                self.complete(req, Err(refusal(ErrorCode::NotPermitted, msg)));
                return;
            }
            let fresh = self.fresh_gen();
            self.sb.gens.force_new(fresh);
            self.set_disk(StoredDisk::UpToDate, "forced promotion");
            forced = true;
            // The peer must learn from a fresh handshake that it is now behind.
            if let Some(conn) = self.conn() {
                self.close(conn, "forced promotion: renegotiating with the peer", RETRY_SOON_MS);
            }
        }
        self.role = Role::Primary;
        self.fenced = false;
        self.split_brain = None;
        self.refused = None;
        self.sb.known_epoch = self.sb.known_epoch.max(epoch);
        if !was_primary || epoch > self.sb.promoted_epoch {
            self.sb.promoted_epoch = epoch;
            self.sb.promoted_at_ms = wall_ms;
        }
        self.sb.set_flag(flags::PRIMARY, true);
        self.persist(Some(IoTag::Meta(MetaPurpose::Promote(req))), false);
        self.event(ReplicaEvent::Promoted { epoch, forced });
        if let Some(link) = self.link.as_ref().filter(|l| l.phase != Phase::AwaitHello) {
            let conn = link.conn;
            let ready = link.phase == Phase::Ready;
            self.send(conn, Frame::State { role: WireRole::Primary, disk: wire_disk(self.sb.disk) });
            if ready && !self.bitmap.is_empty() {
                self.begin_resync_as_source(conn, SyncReason::OutOfSyncBlocks);
            }
        }
    }

    fn on_demote(&mut self, req: ReqId, force: bool, open_clients: usize) {
        if self.role == Role::Secondary && self.demote.is_none() {
            self.complete(req, Ok(()));
            return;
        }
        if self.demote.is_some() {
            self.complete(req, Err(refusal(ErrorCode::Busy, "a demotion is already in progress")));
            return;
        }
        if open_clients > 0 && !force {
            let msg = format!("{open_clients} NBD client(s) still attached: unmount and detach first (or force)");
            self.complete(req, Err(refusal(ErrorCode::Busy, msg)));
            return;
        }
        self.demote =
            Some(DemoteRun { req, flush_sent: false, local_flushed: false, peer_flush_seq: None, persisting: false });
        // Requests that have not started never will.
        while let Some(op) = self.stalled.pop_front() {
            self.complete(op.req(), Err(refusal(ErrorCode::NotPermitted, "the volume is being demoted")));
        }
    }

    /// Demotion: wait for writes in flight, flush both replicas, persist, then secondary.
    fn progress_demote(&mut self) {
        let Some(d) = &self.demote else { return };
        if !self.requests.is_empty() || d.persisting {
            return;
        }
        if !d.flush_sent {
            let replicate = self.link.as_ref().filter(|l| l.replicating()).map(|l| l.conn);
            let seq = replicate.map(|_| {
                let s = self.next_seq;
                self.next_seq += 1;
                s
            });
            if let (Some(conn), Some(seq)) = (replicate, seq) {
                self.send(conn, Frame::Flush { seq });
            }
            self.io(IoOp::Flush { tag: IoTag::DemoteFlush });
            if let Some(d) = &mut self.demote {
                d.flush_sent = true;
                d.peer_flush_seq = seq;
            }
            return;
        }
        if !d.local_flushed || d.peer_flush_seq.is_some() {
            return;
        }
        let req = d.req;
        if let Some(d) = &mut self.demote {
            d.persisting = true;
        }
        self.sb.set_flag(flags::PRIMARY, false);
        self.persist(Some(IoTag::Meta(MetaPurpose::Demote(req))), true);
    }

    fn finish_demote(&mut self, req: ReqId, result: Result<(), String>) {
        self.demote = None;
        match result {
            Ok(()) => {
                self.role = Role::Secondary;
                self.fenced = false;
                self.split_brain = None;
                self.refused = None;
                self.event(ReplicaEvent::Demoted);
                if let Some(conn) = self.link.as_ref().filter(|l| l.phase != Phase::AwaitHello).map(|l| l.conn) {
                    self.send(conn, Frame::State { role: WireRole::Secondary, disk: wire_disk(self.sb.disk) });
                }
                self.complete(req, Ok(()));
            }
            Err(e) => {
                self.sb.set_flag(flags::PRIMARY, true);
                self.complete(req, Err(refusal(ErrorCode::Io, format!("demotion could not persist metadata: {e}"))));
            }
        }
    }

    fn observe_epoch(&mut self, epoch: u64, reason: &str) {
        if epoch <= self.sb.known_epoch {
            return;
        }
        self.sb.known_epoch = epoch;
        self.sb_dirty = true;
        if self.role == Role::Primary && epoch > self.sb.promoted_epoch && !self.fenced {
            self.fenced = true;
            self.event(ReplicaEvent::Fenced { epoch, reason: reason.to_string() });
        }
    }

    fn on_resolve(&mut self, req: ReqId, resolution: Resolution) {
        self.resolution = Some(resolution);
        self.split_brain = None;
        self.complete(req, Ok(()));
        // An established link renegotiates so the choice is applied at once.
        if let Some(conn) = self.conn() {
            self.close(conn, "split-brain resolution chosen: renegotiating", RETRY_SOON_MS);
        }
    }

    // ----- connection --------------------------------------------------------------------

    fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            node: self.cfg.node.clone(),
            volume_uuid: self.sb.volume_uuid,
            size: self.sb.data_size,
            gens: self.sb.gens,
            disk: wire_disk(self.sb.disk),
            role: self.wire_role(),
            crashed_primary: self.sb.has(flags::CRASHED_PRIMARY),
            data_zeroed: self.sb.has(flags::DATA_ZEROED),
            dirty_blocks: self.bitmap.count(),
            promoted_epoch: self.sb.promoted_epoch,
            promoted_at_ms: self.sb.promoted_at_ms,
            format_id: self.sb.format_id,
            policy: self.cfg.policy,
            protocol: self.cfg.protocol,
            resolution: self.resolution,
        }
    }

    fn on_connected(&mut self, conn: ConnId) {
        if let Some(old) = self.conn() {
            self.close(old, "replaced by a new connection from the peer", 0);
        }
        let hello = self.hello();
        self.link = Some(Link {
            conn,
            phase: Phase::AwaitHello,
            local_hello: hello.clone(),
            peer: None,
            peer_role: WireRole::Secondary,
            peer_disk: WireDisk::Inconsistent,
            last_rx_ms: self.now,
            last_ping_ms: self.now,
            opened_ms: self.now,
            sync: None,
        });
        self.send(conn, Frame::Hello(Box::new(hello)));
    }

    fn close(&mut self, conn: ConnId, reason: &str, retry_after_ms: u64) {
        if self.conn() == Some(conn) {
            self.send(conn, Frame::Goodbye { reason: reason.to_string() });
            self.drop_link(reason);
        }
        self.emit(Output::Close { conn, reason: reason.to_string(), retry_after_ms });
    }

    /// Forgets the link: writes the peer never acknowledged become out of sync.
    fn drop_link(&mut self, reason: &str) {
        let Some(link) = self.link.take() else { return };
        self.held.retain(|o| !matches!(o, Output::Send { conn, .. } if *conn == link.conn));
        // The peer may or may not have applied writes it never acknowledged.
        let pending: Vec<ReqId> = std::mem::take(&mut self.peer_pending).into_values().collect();
        for req in pending {
            self.peer_finished(req, false);
        }
        let flushes: Vec<ReqId> = std::mem::take(&mut self.peer_flushes).into_values().collect();
        for req in flushes {
            self.peer_finished(req, true);
        }
        if let Some(d) = &mut self.demote {
            d.peer_flush_seq = None;
        }
        if link.phase != Phase::AwaitHello {
            self.last_peer_disk = Some(link.peer_disk);
            self.last_peer_role = Some(link.peer_role);
        }
        self.verify = None;
        self.event(ReplicaEvent::Disconnected { reason: reason.to_string() });
    }

    fn on_frame(&mut self, conn: ConnId, env: Envelope) {
        let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) else { return };
        link.last_rx_ms = self.now;
        let phase = link.phase.clone();
        let frame = env.frame;
        // Writes stamped with an older epoch come from a primary that has been superseded.
        if matches!(frame, Frame::Data { .. } | Frame::Zero { .. }) && env.epoch < self.sb.known_epoch {
            let reason = format!(
                "peer {} sent a write stamped with epoch {}, older than the known epoch {}: refusing a superseded primary",
                self.cfg.peer, env.epoch, self.sb.known_epoch
            );
            self.close(conn, &reason, RETRY_LATER_MS);
            return;
        }
        self.observe_epoch(env.epoch, "the peer carries a newer epoch");
        match (phase, frame) {
            (Phase::AwaitHello, Frame::Hello(h)) => self.on_hello(conn, *h),
            (Phase::AwaitHello, Frame::Goodbye { reason }) => {
                let r = format!("peer {} closed the connection: {reason}", self.cfg.peer);
                self.close(conn, &r, RETRY_LATER_MS);
            }
            (Phase::AwaitHello, other) => {
                let r = format!("peer {} sent {} before its hello", self.cfg.peer, other.name());
                self.close(conn, &r, RETRY_LATER_MS);
            }
            (_, Frame::Hello(_)) => {
                let r = format!("peer {} sent a second hello", self.cfg.peer);
                self.close(conn, &r, RETRY_LATER_MS);
            }
            (_, Frame::Ping) => self.send(conn, Frame::PingAck),
            (_, Frame::PingAck) => {}
            (_, Frame::Goodbye { reason }) => {
                let r = format!("peer {} closed the connection: {reason}", self.cfg.peer);
                self.close(conn, &r, RETRY_SOON_MS);
            }
            (_, Frame::State { role, disk }) => self.on_peer_state(conn, role, disk),
            (_, Frame::Data { seq, offset, fua, data }) => {
                if let Some(e) = self.check_peer_write(offset, data.len() as u64) {
                    self.close(conn, &e, RETRY_LATER_MS);
                } else {
                    self.io(IoOp::Write { tag: IoTag::PeerWrite { conn, seq }, offset, data, fua });
                }
            }
            (_, Frame::Zero { seq, offset, len, fua, punch }) => {
                if let Some(e) = self.check_peer_write(offset, len) {
                    self.close(conn, &e, RETRY_LATER_MS);
                } else {
                    self.io(IoOp::Zero { tag: IoTag::PeerWrite { conn, seq }, offset, len, punch, fua });
                }
            }
            (_, Frame::Flush { seq }) => self.io(IoOp::Flush { tag: IoTag::PeerFlush { conn, seq } }),
            (_, Frame::Ack { seq, ok }) => {
                if let Some(req) = self.peer_pending.remove(&seq) {
                    self.peer_finished(req, ok);
                }
            }
            (_, Frame::FlushAck { seq, ok }) => {
                if self.demote.as_ref().is_some_and(|d| d.peer_flush_seq == Some(seq)) {
                    if let Some(d) = &mut self.demote {
                        d.peer_flush_seq = None;
                    }
                } else if let Some(req) = self.peer_flushes.remove(&seq) {
                    if !ok {
                        self.event(ReplicaEvent::IoError {
                            operation: "peer flush".into(),
                            message: format!("peer {} could not flush its disk", self.cfg.peer),
                        });
                    }
                    self.peer_finished(req, true);
                }
            }
            (Phase::Bitmaps { source }, Frame::Bitmap { start, last, runs }) => {
                self.on_peer_bitmap(conn, source, start, last, &runs)
            }
            (Phase::Ready, Frame::StartResync) => {
                if self.role == Role::Primary {
                    let r = format!("peer {} asked to resync into this primary", self.cfg.peer);
                    self.close(conn, &r, RETRY_LATER_MS);
                } else {
                    self.begin_sync(conn, false, false, SyncReason::OutOfSyncBlocks, None);
                }
            }
            (
                Phase::Syncing { source: true } | Phase::Bitmaps { source: true },
                Frame::ResyncRequest { offset, len },
            ) => self.on_resync_request(conn, offset, len),
            (Phase::Syncing { source: false }, Frame::ResyncReply { offset, data, zero_len }) => {
                self.on_resync_reply(conn, offset, data, zero_len)
            }
            (Phase::Syncing { source: true }, Frame::ResyncAck { offset, len }) => {
                let range = blocks_touched(offset, u64::from(len));
                let cleared = self.bitmap.clear_range(range);
                self.counters.resync_bytes_sent += u64::from(len);
                if let Some(sync) = self.link.as_mut().and_then(|l| l.sync.as_mut()) {
                    sync.meter.add(cleared * BLOCK_SIZE, self.now);
                }
            }
            (Phase::Syncing { source: true }, Frame::SyncDone { gens }) => self.on_sync_done(conn, gens),
            (Phase::Ready, Frame::VerifyRequest { offset, len }) => {
                let range = blocks_touched(offset, u64::from(len));
                if offset % BLOCK_SIZE != 0 || range.end > self.blocks() {
                    let r = format!("peer {} asked to verify outside the volume", self.cfg.peer);
                    self.close(conn, &r, RETRY_LATER_MS);
                } else {
                    self.io(IoOp::Digest { tag: IoTag::VerifyPeer { conn, range }, offset, len });
                }
            }
            (Phase::Ready, Frame::VerifyReply { offset, digests }) => self.on_verify_reply(conn, offset, digests),
            (_, Frame::OutOfSync { offset, len }) => {
                if offset.checked_add(len).is_none_or(|e| e > self.size()) {
                    let r = format!("peer {} marked blocks outside the volume", self.cfg.peer);
                    self.close(conn, &r, RETRY_LATER_MS);
                } else {
                    self.bitmap.set_range(blocks_touched(offset, len));
                }
            }
            (phase, other) => {
                let r = format!("peer {} sent an unexpected {} frame in state {phase:?}", self.cfg.peer, other.name());
                self.close(conn, &r, RETRY_LATER_MS);
            }
        }
    }

    fn check_peer_write(&self, offset: u64, len: u64) -> Option<String> {
        if self.role == Role::Primary {
            return Some(format!("peer {} sent a write to this primary", self.cfg.peer));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size()) || len == 0 {
            return Some(format!("peer {} sent a write outside the volume ({len} bytes at {offset})", self.cfg.peer));
        }
        None
    }

    fn on_peer_state(&mut self, conn: ConnId, role: WireRole, disk: WireDisk) {
        let Some(link) = self.link.as_mut() else { return };
        link.peer_role = role;
        link.peer_disk = disk;
        if role == WireRole::Primary && self.role == Role::Primary {
            let reason = format!("peer {} became primary while this replica is primary", self.cfg.peer);
            self.split_brain = Some(reason.clone());
            self.event(ReplicaEvent::SplitBrain { reason: reason.clone() });
            self.close(conn, &reason, RETRY_LATER_MS);
        }
    }

    fn on_hello(&mut self, conn: ConnId, peer: Hello) {
        let Some(local) = self.link.as_ref().map(|l| l.local_hello.clone()) else { return };
        if let Err(reason) = handshake::check_peer(&local, &peer, &self.cfg.peer) {
            self.refused = Some(reason.clone());
            self.event(ReplicaEvent::PeerRefused { reason: reason.clone() });
            self.close(conn, &reason, RETRY_LATER_MS);
            return;
        }
        if let Some(link) = self.link.as_mut() {
            link.peer_role = peer.role;
            link.peer_disk = peer.disk;
            link.peer = Some(peer.clone());
        }
        let decision = handshake::decide(&local, &peer);
        // A resolution is spent by the handshake that sees it.
        self.resolution = None;
        self.refused = None;
        match decision {
            Decision::InSync => {
                self.split_brain = None;
                self.set_phase(Phase::Ready);
                self.event(ReplicaEvent::Connected { peer: self.cfg.peer.clone() });
                if self.sb.has(flags::CRASHED_PRIMARY) {
                    self.sb.set_flag(flags::CRASHED_PRIMARY, false);
                    self.sb_dirty = true;
                }
            }
            Decision::InitialSkip { current } => {
                self.split_brain = None;
                let gens = super::generation::Generations { current, bitmap: 0, history: [0, 0] };
                self.sb.gens = gens;
                if let Some(p) = self.link.as_mut().and_then(|l| l.peer.as_mut()) {
                    p.gens = gens;
                }
                self.set_disk(StoredDisk::UpToDate, "both replicas are new and all zeroes: identical without a sync");
                self.persist(None, false);
                self.set_phase(Phase::Ready);
                if let Some(link) = self.link.as_mut() {
                    // The peer reaches the same verdict and is up to date as well.
                    link.peer_disk = WireDisk::UpToDate;
                }
                self.event(ReplicaEvent::Connected { peer: self.cfg.peer.clone() });
            }
            Decision::Resync { local_is_source, full, reason } => {
                self.split_brain = None;
                self.event(ReplicaEvent::Connected { peer: self.cfg.peer.clone() });
                let resolved_by = match reason {
                    SyncReason::SplitBrainResolved(by) => Some(by.label().to_string()),
                    _ => None,
                };
                self.begin_sync(conn, local_is_source, full, reason, resolved_by);
            }
            Decision::WaitForForce { reason } => {
                self.set_phase(Phase::Waiting);
                self.event(ReplicaEvent::PeerRefused { reason });
            }
            Decision::SplitBrain { reason } => {
                self.split_brain = Some(reason.clone());
                self.event(ReplicaEvent::SplitBrain { reason: reason.clone() });
                self.close(conn, &format!("split brain: {reason}"), RETRY_LATER_MS);
            }
            Decision::Refuse { reason } => {
                self.refused = Some(reason.clone());
                self.event(ReplicaEvent::PeerRefused { reason: reason.clone() });
                self.close(conn, &reason, RETRY_LATER_MS);
            }
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(link) = self.link.as_mut() {
            link.phase = phase;
        }
    }

    // ----- resync ------------------------------------------------------------------------

    fn begin_resync_as_source(&mut self, conn: ConnId, reason: SyncReason) {
        self.send(conn, Frame::StartResync);
        self.begin_sync(conn, true, false, reason, None);
    }

    /// Enters the bitmap exchange: both sides send their bitmaps; each merges the other's.
    fn begin_sync(&mut self, conn: ConnId, source: bool, full: bool, reason: SyncReason, resolved_by: Option<String>) {
        let peer_gens = self.link.as_ref().and_then(|l| l.peer.as_ref()).map(|p| p.gens).unwrap_or_default();
        if full {
            self.bitmap.set_all();
        }
        if !source && self.sb.disk == StoredDisk::UpToDate {
            self.set_disk(StoredDisk::Outdated, "the peer has newer data");
        }
        let meter = ProgressMeter::new(self.bitmap.count() * BLOCK_SIZE, self.now);
        if let Some(link) = self.link.as_mut() {
            link.phase = Phase::Bitmaps { source };
            link.sync = Some(SyncRun {
                source,
                full,
                reason,
                peer_gens,
                got_peer_bitmap: false,
                target_ready: false,
                planner: None,
                meter,
                started_ms: self.now,
                discard: None,
                resolved_by,
            });
        }
        let mut pos = 0;
        loop {
            let (runs, next) = self.bitmap.encode_runs(pos, 32 << 10);
            let last = next >= self.blocks();
            self.send(conn, Frame::Bitmap { start: pos, last, runs: Bytes::from(runs) });
            pos = next;
            if last {
                break;
            }
        }
    }

    fn on_peer_bitmap(&mut self, conn: ConnId, source: bool, start: u64, last: bool, runs: &[u8]) {
        if let Err(e) = self.bitmap.merge_runs(start, runs) {
            let r = format!("peer {} sent a bad bitmap: {e}", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        }
        if !last {
            return;
        }
        let total = self.bitmap.count() * BLOCK_SIZE;
        let (full, reason, resolved_by) = match self.link.as_mut().and_then(|l| l.sync.as_mut()) {
            Some(sync) => {
                sync.got_peer_bitmap = true;
                sync.meter = ProgressMeter::new(total, self.now);
                (sync.full, sync.reason, sync.resolved_by.clone())
            }
            None => return,
        };
        self.event(ReplicaEvent::SyncStarted { source, full, bytes: total, reason: reason.label() });
        if let Some(by) = resolved_by {
            let ranges: Vec<(u64, u64)> = self.bitmap.runs().iter().map(|r| (r.byte_offset(), r.byte_len())).collect();
            let total_ranges = ranges.len();
            let record =
                DiscardRecord { local_discarded: !source, resolved_by: by, ranges, total_ranges, bytes: total };
            self.last_discard = Some(record.clone());
            if let Some(sync) = self.link.as_mut().and_then(|l| l.sync.as_mut()) {
                sync.discard = Some(record.clone());
            }
            self.event(ReplicaEvent::Discarded(record));
        }
        if source {
            self.set_phase(Phase::Syncing { source: true });
        } else {
            // Persist the union and the Inconsistent state before any resync data lands.
            self.set_disk(StoredDisk::Inconsistent, "sync target: receiving resync data");
            self.bitmap.mark_all_pages_dirty();
            self.persist(Some(IoTag::Meta(MetaPurpose::SyncTargetReady(conn))), true);
            self.set_phase(Phase::Syncing { source: false });
        }
    }

    fn target_ready(&mut self, conn: ConnId) {
        let limits = self.cfg.resync;
        let planner = ResyncPlanner::new(&self.bitmap, limits, self.now);
        if let Some(sync) = self.link.as_mut().filter(|l| l.conn == conn).and_then(|l| l.sync.as_mut()) {
            sync.target_ready = true;
            sync.planner = Some(planner);
        }
        self.poll_resync();
    }

    fn poll_resync(&mut self) {
        let now = self.now;
        let Some(link) = self.link.as_mut() else { return };
        let conn = link.conn;
        let Some(sync) = link.sync.as_mut().filter(|s| !s.source && s.target_ready) else { return };
        let Some(planner) = sync.planner.as_mut() else { return };
        if planner.finished(&self.bitmap) {
            self.finish_target(conn);
            return;
        }
        if planner.stuck(&self.bitmap) {
            let reason = "resync made no progress over repeated passes".to_string();
            self.close(conn, &reason, RETRY_LATER_MS);
            return;
        }
        let poll = planner.poll(&self.bitmap, now);
        for range in poll.requests {
            let len = u32::try_from(range.byte_len()).unwrap_or(MAX_DATA);
            self.send(conn, Frame::ResyncRequest { offset: range.byte_offset(), len });
        }
    }

    fn on_resync_request(&mut self, conn: ConnId, offset: u64, len: u32) {
        let range = blocks_touched(offset, u64::from(len));
        if !offset.is_multiple_of(BLOCK_SIZE) || u64::from(len) % BLOCK_SIZE != 0 || range.end > self.blocks() {
            let r = format!("peer {} requested resync data outside the volume", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        }
        self.reads.push(range);
        self.io(IoOp::Read { tag: IoTag::ResyncRead { conn, range }, offset, len });
    }

    fn on_resync_reply(&mut self, conn: ConnId, offset: u64, data: Bytes, zero_len: u32) {
        let len = if data.is_empty() { u64::from(zero_len) } else { data.len() as u64 };
        let range = blocks_touched(offset, len);
        let expected = self
            .link
            .as_ref()
            .and_then(|l| l.sync.as_ref())
            .and_then(|s| s.planner.as_ref())
            .is_some_and(|p| p.is_in_flight(range) && offset.is_multiple_of(BLOCK_SIZE) && len % BLOCK_SIZE == 0);
        if !expected {
            let r = format!("peer {} sent resync data that was not requested (offset {offset})", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        }
        self.counters.resync_bytes_received += len;
        let tag = IoTag::ResyncWrite { conn, range };
        if data.is_empty() {
            self.io(IoOp::Zero { tag, offset, len, punch: false, fua: false });
        } else {
            self.io(IoOp::Write { tag, offset, data, fua: false });
        }
    }

    fn finish_target(&mut self, conn: ConnId) {
        let Some(sync) = self.link.as_mut().and_then(|l| l.sync.as_mut()) else { return };
        if sync.planner.is_none() {
            return;
        }
        // Only one completion: drop the planner so later ticks do not finish again.
        if let Some(planner) = sync.planner.take() {
            sync.meter = planner.meter().clone();
        }
        let mut gens = sync.peer_gens;
        gens.finish_tracking();
        self.sb.gens = gens;
        self.sb.set_flag(flags::CRASHED_PRIMARY, false);
        self.sb.set_flag(flags::DATA_ZEROED, false);
        self.set_disk(StoredDisk::UpToDate, "resync completed");
        self.persist(Some(IoTag::Meta(MetaPurpose::SyncTargetDone(conn))), true);
    }

    fn on_sync_done(&mut self, conn: ConnId, gens: super::generation::Generations) {
        let mut expected = self.sb.gens;
        expected.finish_tracking();
        if gens != expected {
            let r = format!("peer {} finished the resync with unexpected generations {gens:?}", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        }
        self.sb.gens = expected;
        self.sb.set_flag(flags::CRASHED_PRIMARY, false);
        self.sb.set_flag(flags::DATA_ZEROED, false);
        let (bytes, elapsed) = self
            .link
            .as_ref()
            .and_then(|l| l.sync.as_ref())
            .map(|s| (s.meter.done(), self.now.saturating_sub(s.started_ms)))
            .unwrap_or_default();
        if let Some(link) = self.link.as_mut() {
            link.sync = None;
            link.phase = Phase::Ready;
            link.peer_disk = WireDisk::UpToDate;
            if let Some(p) = link.peer.as_mut() {
                p.gens = expected;
            }
        }
        self.persist(Some(IoTag::Meta(MetaPurpose::SyncSourceDone)), true);
        self.counters.last_sync_bytes = bytes;
        self.counters.last_sync_ms = elapsed;
        self.counters.syncs_completed += 1;
        self.event(ReplicaEvent::SyncFinished { source: true, bytes, elapsed_ms: elapsed });
    }

    // ----- verify ------------------------------------------------------------------------

    fn on_start_verify(&mut self, req: ReqId) {
        let Some(link) = self.link.as_ref() else {
            self.complete(req, Err(refusal(ErrorCode::NotPermitted, "not connected to the peer")));
            return;
        };
        if link.phase != Phase::Ready {
            self.complete(req, Err(refusal(ErrorCode::Busy, "the replicas are not in sync yet")));
            return;
        }
        if self.verify.is_some() {
            self.complete(req, Err(refusal(ErrorCode::Busy, "a verify is already running")));
            return;
        }
        let conn = link.conn;
        let planner = VerifyPlanner::new(self.blocks(), 256, self.cfg.resync.rate, self.now);
        self.verify = Some(VerifyRun { conn, planner });
        self.complete(req, Ok(()));
        self.poll_verify();
    }

    fn poll_verify(&mut self) {
        let now = self.now;
        let Some(v) = self.verify.as_mut() else { return };
        let conn = v.conn;
        if v.planner.finished() {
            let mismatched: Vec<(u64, u64)> =
                v.planner.mismatched().iter().map(|r| (r.byte_offset(), r.byte_len())).collect();
            let checked = v.planner.progress(now).done_bytes;
            self.verify = None;
            let bytes: u64 = mismatched.iter().map(|(_, l)| l).sum();
            self.counters.verify_mismatched_bytes = bytes;
            self.counters.verifies_completed += 1;
            self.last_verify = Some(mismatched.clone());
            self.event(ReplicaEvent::VerifyFinished { mismatched, checked_bytes: checked });
            let ready = self.link.as_ref().is_some_and(|l| l.conn == conn && l.phase == Phase::Ready);
            if ready && self.role == Role::Primary && !self.bitmap.is_empty() {
                self.begin_resync_as_source(conn, SyncReason::OutOfSyncBlocks);
            }
            return;
        }
        let (chunks, _) = v.planner.poll(now);
        for range in chunks {
            self.reads.push(range);
            let len = u32::try_from(range.byte_len()).unwrap_or(MAX_DATA);
            self.io(IoOp::Digest {
                tag: IoTag::VerifyLocal { start: range.start, range },
                offset: range.byte_offset(),
                len,
            });
            self.send(conn, Frame::VerifyRequest { offset: range.byte_offset(), len });
        }
    }

    fn on_verify_reply(&mut self, conn: ConnId, offset: u64, digests: Vec<u128>) {
        let now = self.now;
        let Some(v) = self.verify.as_mut().filter(|v| v.conn == conn) else {
            let r = format!("peer {} sent verify digests nobody asked for", self.cfg.peer);
            self.close(conn, &r, RETRY_LATER_MS);
            return;
        };
        match v.planner.peer(offset / BLOCK_SIZE, digests, now) {
            Ok(result) => self.mark_mismatches(conn, &result.mismatched),
            Err(e) => {
                let r = format!("peer {} sent bad verify digests: {e}", self.cfg.peer);
                self.close(conn, &r, RETRY_LATER_MS);
            }
        }
        self.poll_verify();
    }

    fn mark_mismatches(&mut self, conn: ConnId, ranges: &[BlockRange]) {
        for r in ranges {
            self.bitmap.set_range(*r);
            self.send(conn, Frame::OutOfSync { offset: r.byte_offset(), len: r.byte_len() });
        }
    }

    // ----- disk completions ----------------------------------------------------------------

    fn on_io_done(&mut self, tag: IoTag, result: Result<IoOutput, String>) {
        match tag {
            IoTag::App(req) => {
                if let Err(e) = &result {
                    self.event(ReplicaEvent::IoError { operation: "write".into(), message: e.clone() });
                }
                if let Some(r) = self.requests.get_mut(&req) {
                    r.local_done = true;
                    if let Err(e) = result {
                        r.error = Some(refusal(ErrorCode::Io, e));
                    }
                }
                self.maybe_finish(req);
            }
            IoTag::AppFlush(req) => {
                if let Some(r) = self.requests.get_mut(&req) {
                    r.local_done = true;
                    if let Err(e) = result {
                        r.error = Some(refusal(ErrorCode::Io, e));
                    }
                }
                self.maybe_finish(req);
            }
            IoTag::PeerWrite { conn, seq } => {
                let ok = result.is_ok();
                if let Err(e) = result {
                    self.event(ReplicaEvent::IoError { operation: "replicated write".into(), message: e });
                    self.set_disk(StoredDisk::Inconsistent, "a replicated write failed");
                }
                if self.conn() == Some(conn) {
                    self.send(conn, Frame::Ack { seq, ok });
                }
            }
            IoTag::PeerFlush { conn, seq } => {
                if self.conn() == Some(conn) {
                    self.send(conn, Frame::FlushAck { seq, ok: result.is_ok() });
                }
            }
            IoTag::ResyncRead { conn, range } => {
                if let Some(i) = self.reads.iter().position(|r| *r == range) {
                    self.reads.swap_remove(i);
                }
                if self.conn() != Some(conn) {
                    return;
                }
                match result {
                    Ok(IoOutput::Data(data)) => {
                        let offset = range.byte_offset();
                        let frame = if data.iter().all(|&b| b == 0) {
                            Frame::ResyncReply { offset, data: Bytes::new(), zero_len: data.len() as u32 }
                        } else {
                            Frame::ResyncReply { offset, data, zero_len: 0 }
                        };
                        self.send(conn, frame);
                    }
                    Ok(_) | Err(_) => {
                        let reason = format!("could not read resync data at offset {}", range.byte_offset());
                        self.event(ReplicaEvent::IoError { operation: "resync read".into(), message: reason.clone() });
                        self.close(conn, &reason, RETRY_LATER_MS);
                    }
                }
            }
            IoTag::ResyncWrite { conn, range } => {
                if self.conn() != Some(conn) {
                    return;
                }
                if let Err(e) = result {
                    self.event(ReplicaEvent::IoError { operation: "resync write".into(), message: e.clone() });
                    self.close(conn, &format!("resync write failed: {e}"), RETRY_LATER_MS);
                    return;
                }
                self.bitmap.clear_range(range);
                let now = self.now;
                if let Some(p) = self.link.as_mut().and_then(|l| l.sync.as_mut()).and_then(|s| s.planner.as_mut()) {
                    p.completed(range, now);
                }
                let len = u32::try_from(range.byte_len()).unwrap_or(MAX_DATA);
                self.send(conn, Frame::ResyncAck { offset: range.byte_offset(), len });
                self.poll_resync();
            }
            IoTag::VerifyLocal { start, range } => {
                if let Some(i) = self.reads.iter().position(|r| *r == range) {
                    self.reads.swap_remove(i);
                }
                let now = self.now;
                let Some(v) = self.verify.as_mut() else { return };
                let conn = v.conn;
                match result {
                    Ok(IoOutput::Digests(d)) => match v.planner.local(start, d, now) {
                        Ok(r) => self.mark_mismatches(conn, &r.mismatched),
                        Err(e) => self.event(ReplicaEvent::IoError { operation: "verify".into(), message: e }),
                    },
                    _ => {
                        self.verify = None;
                        self.event(ReplicaEvent::IoError {
                            operation: "verify read".into(),
                            message: format!("could not read blocks at {}", range.byte_offset()),
                        });
                        return;
                    }
                }
                self.poll_verify();
            }
            IoTag::VerifyPeer { conn, range } => {
                if self.conn() != Some(conn) {
                    return;
                }
                match result {
                    Ok(IoOutput::Digests(digests)) => {
                        self.send(conn, Frame::VerifyReply { offset: range.byte_offset(), digests })
                    }
                    _ => {
                        let reason = format!("could not read blocks at {} to verify", range.byte_offset());
                        self.close(conn, &reason, RETRY_LATER_MS);
                    }
                }
            }
            IoTag::DemoteFlush => {
                if let Some(d) = &mut self.demote {
                    d.local_flushed = true;
                }
                if let Err(e) = result {
                    self.event(ReplicaEvent::IoError { operation: "flush before demotion".into(), message: e });
                }
            }
            IoTag::Meta(purpose) => self.on_meta_done(purpose, result.map(|_| ())),
        }
    }

    fn on_meta_done(&mut self, purpose: MetaPurpose, result: Result<(), String>) {
        if let Err(e) = &result {
            self.event(ReplicaEvent::IoError { operation: "metadata update".into(), message: e.clone() });
        }
        match purpose {
            MetaPurpose::Promote(req) => match result {
                Ok(()) => self.complete(req, Ok(())),
                Err(e) => {
                    self.role = Role::Secondary;
                    self.complete(req, Err(refusal(ErrorCode::Io, format!("could not persist the promotion: {e}"))));
                }
            },
            MetaPurpose::Demote(req) => self.finish_demote(req, result),
            MetaPurpose::SyncTargetReady(conn) => {
                if self.conn() == Some(conn) {
                    if result.is_ok() {
                        self.target_ready(conn);
                    } else {
                        self.close(conn, "could not persist the resync bitmap", RETRY_LATER_MS);
                    }
                }
            }
            MetaPurpose::SyncTargetDone(conn) => {
                if self.conn() != Some(conn) || result.is_err() {
                    return;
                }
                let gens = self.sb.gens;
                let now = self.now;
                let (bytes, elapsed) = self
                    .link
                    .as_ref()
                    .and_then(|l| l.sync.as_ref())
                    .map(|s| (s.meter.done(), now.saturating_sub(s.started_ms)))
                    .unwrap_or_default();
                if let Some(link) = self.link.as_mut() {
                    link.sync = None;
                    link.phase = Phase::Ready;
                    if let Some(p) = link.peer.as_mut() {
                        p.gens = gens;
                    }
                }
                self.counters.last_sync_bytes = bytes;
                self.counters.last_sync_ms = elapsed;
                self.counters.syncs_completed += 1;
                self.send(conn, Frame::SyncDone { gens });
                self.event(ReplicaEvent::SyncFinished { source: false, bytes, elapsed_ms: elapsed });
            }
            MetaPurpose::Checkpoint(req) => {
                let r = result.map_err(|e| refusal(ErrorCode::Io, format!("could not persist metadata: {e}")));
                self.complete(req, r);
            }
            MetaPurpose::SyncSourceDone | MetaPurpose::Housekeeping => {}
            MetaPurpose::ActivityLog => {
                self.al_unsynced = self.al_unsynced.saturating_sub(1);
                if result.is_err() {
                    // The extent may not be recorded: the peer must not get what was held
                    // back. Dropping the link marks those writes out of sync here instead.
                    self.held.clear();
                    if let Some(conn) = self.conn() {
                        self.close(conn, "could not persist the activity log", RETRY_LATER_MS);
                    }
                } else if self.al_unsynced == 0 {
                    let held = std::mem::take(&mut self.held);
                    self.out.extend(held);
                }
            }
        }
    }

    // ----- time ----------------------------------------------------------------------------

    fn on_tick(&mut self) {
        let now = self.now;
        if let Some(link) = &self.link {
            let conn = link.conn;
            if link.phase == Phase::AwaitHello && now.saturating_sub(link.opened_ms) > self.cfg.handshake_timeout_ms {
                let r = format!("peer {} did not complete the handshake in time", self.cfg.peer);
                self.close(conn, &r, RETRY_SOON_MS);
            } else if now.saturating_sub(link.last_rx_ms) > self.cfg.ping_timeout_ms {
                let r = format!("peer {} silent for {} ms", self.cfg.peer, now.saturating_sub(link.last_rx_ms));
                self.close(conn, &r, RETRY_SOON_MS);
            } else if now.saturating_sub(link.last_ping_ms) >= self.cfg.ping_interval_ms {
                if let Some(l) = self.link.as_mut() {
                    l.last_ping_ms = now;
                }
                self.send(conn, Frame::Ping);
            }
        }
        self.poll_resync();
        self.poll_verify();
        if now.saturating_sub(self.last_flush_ms) >= self.cfg.bitmap_flush_interval_ms {
            self.last_flush_ms = now;
            if self.bitmap.has_dirty_pages() && !self.sb_dirty {
                let mut steps = vec![MetaStep::SyncData];
                steps.extend(self.bitmap_steps());
                self.io(IoOp::Meta { tag: Some(IoTag::Meta(MetaPurpose::Housekeeping)), steps });
            } else if self.sb_dirty {
                self.persist(Some(IoTag::Meta(MetaPurpose::Housekeeping)), true);
            }
        }
    }

    // ----- queries -------------------------------------------------------------------------

    pub fn role(&self) -> Role {
        self.role
    }

    /// The newest engine epoch this replica knows.
    pub fn snapshot_epoch(&self) -> u64 {
        self.sb.known_epoch
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = self.now;
        let connection = match &self.link {
            None if self.split_brain.is_some() => ConnectionState::SplitBrain,
            None if self.refused.is_some() => ConnectionState::StandAlone,
            None => ConnectionState::Connecting,
            Some(l) => match l.phase {
                Phase::AwaitHello => ConnectionState::Connecting,
                Phase::Bitmaps { source: true } | Phase::Syncing { source: true } => ConnectionState::SyncSource,
                Phase::Bitmaps { source: false } | Phase::Syncing { source: false } => ConnectionState::SyncTarget,
                Phase::Ready if self.verify.is_some() => ConnectionState::VerifySource,
                Phase::Ready | Phase::Waiting => ConnectionState::Connected,
            },
        };
        let (peer_disk, peer_role) = match &self.link {
            Some(l) if l.phase != Phase::AwaitHello => (Some(l.peer_disk), Some(l.peer_role)),
            _ => (self.last_peer_disk, self.last_peer_role),
        };
        let sync = self.link.as_ref().and_then(|l| l.sync.as_ref()).map(|s| match (&s.planner, s.source) {
            (Some(p), false) => p.progress(now),
            _ => s.meter.snapshot(now),
        });
        let disk = self.disk_state();
        Snapshot {
            role: match self.role {
                Role::Primary => VolumeRole::Primary,
                Role::Secondary => VolumeRole::Secondary,
            },
            disk,
            connection,
            peer_disk: peer_disk.map(|d| match d {
                WireDisk::UpToDate => DiskState::UpToDate,
                WireDisk::Inconsistent => DiskState::Inconsistent,
                WireDisk::Outdated => DiskState::Outdated,
            }),
            peer_role: peer_role.map(|r| match r {
                WireRole::Primary => VolumeRole::Primary,
                WireRole::Secondary => VolumeRole::Secondary,
            }),
            out_of_sync_bytes: self.bitmap.count() * BLOCK_SIZE,
            sync,
            verify: self.verify.as_ref().map(|v| v.planner.progress(now)),
            epoch: self.sb.known_epoch,
            fenced: self.fenced,
            split_brain: self.split_brain.clone(),
            refused: self.refused.clone(),
            crashed_primary: self.sb.has(flags::CRASHED_PRIMARY),
            generations: self.sb.gens,
            last_discard: self.last_discard.as_ref().map(|d| DiscardRecord {
                local_discarded: d.local_discarded,
                resolved_by: d.resolved_by.clone(),
                ranges: d.ranges.iter().take(SNAPSHOT_RANGES).copied().collect(),
                total_ranges: d.total_ranges,
                bytes: d.bytes,
            }),
            last_verify_mismatches: self
                .last_verify
                .as_ref()
                .map(|v| v.iter().take(SNAPSHOT_RANGES).copied().collect()),
            counters: self.counters.clone(),
            writes_allowed: self.writes_allowed().is_ok(),
            reads_allowed: self.role == Role::Primary || matches!(disk, DiskState::UpToDate | DiskState::Outdated),
        }
    }
}

fn wire_disk(d: StoredDisk) -> WireDisk {
    match d {
        StoredDisk::UpToDate => WireDisk::UpToDate,
        StoredDisk::Inconsistent => WireDisk::Inconsistent,
        StoredDisk::Outdated => WireDisk::Outdated,
    }
}
