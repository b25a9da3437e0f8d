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
//!
//! [`Machine::handle`] dispatches each input to the file of its topic: `messages` (what
//! comes in and goes out), `requests`, `roles`, `connection`, `syncing`, `verifying`,
//! `completions` (finished disk operations), `persistence` (metadata updates) and
//! `snapshot` (the view status reports read).

mod completions;
mod connection;
mod messages;
mod persistence;
mod requests;
mod roles;
mod snapshot;
mod syncing;
mod verifying;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::activity_log::ActivityLog;
use super::bitmap::Bitmap;
use super::geometry::BlockRange;
use super::metadata::StoredDisk;
use super::metadata::{Layout, Superblock};
use super::resync::ResyncLimits;
use super::wire::{Frame, Hello, Resolution, WireDisk, WirePolicy, WireProtocol, WireRole};

pub use messages::{
    DiscardRecord, ErrorCode, Input, IoOp, IoOutput, IoTag, MetaPurpose, MetaStep, Output, Refusal, ReplicaEvent,
};
pub use snapshot::{Counters, SNAPSHOT_RANGES, Snapshot};

use requests::{AppReq, Stalled};
use roles::DemoteRun;
use syncing::SyncRun;
use verifying::VerifyRun;

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
    /// The replication protocol versions this replica speaks: the build's, or fewer when
    /// the agent was told to speak an older version for a rolling upgrade.
    pub speaks: crate::protocol::Range,
}

const RETRY_SOON_MS: u64 = 200;
const RETRY_LATER_MS: u64 = 2_000;

/// Whether this replica serves writes; the engine alone changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

/// Where the link to the peer stands, from the first hello to serving writes.
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
    /// This side wrote a newer hello than the peer: the peer either is of the previous
    /// release and refuses it (closing without a word), or remembered this side as older
    /// and renegotiates (saying goodbye). Either way the connection ends undecided.
    outpaced: bool,
    heard_goodbye: bool,
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

/// What a replica says of its disk to the peer.
fn wire_disk(d: StoredDisk) -> WireDisk {
    match d {
        StoredDisk::UpToDate => WireDisk::UpToDate,
        StoredDisk::Inconsistent => WireDisk::Inconsistent,
        StoredDisk::Outdated => WireDisk::Outdated,
    }
}

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
    /// What the peer speaks, as far as this replica knows: announced in its last newer
    /// hello, or [`crate::protocol::Range::V1`] once it refused one of ours. The next hello
    /// is written in the newest version both speak; unknown, in this side's newest.
    peer_speaks: Option<crate::protocol::Range>,
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
            peer_speaks: None,
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
            Input::LeaseLost { reason } => self.on_lease_lost(&reason),
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

    fn blocks(&self) -> u64 {
        self.bitmap.blocks()
    }

    fn size(&self) -> u64 {
        self.sb.data_size
    }

    fn conn(&self) -> Option<ConnId> {
        self.link.as_ref().map(|l| l.conn)
    }

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
}
