//! The point-in-time view of the replica that status reports and metrics read.

use hapair_crds::volume::{ConnectionState, DiskState, SyncProgress, VolumeRole};

use super::Machine;
use super::Phase;
use super::Role;
use super::messages::DiscardRecord;
use crate::replication::geometry::BLOCK_SIZE;
use crate::replication::metadata::flags;
use crate::replication::wire::{WireDisk, WireRole};

/// Ranges kept in status snapshots; the events and logs carry the full lists.
pub const SNAPSHOT_RANGES: usize = 64;

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
    /// Activity-log transactions written: one per write to a cold extent. A rate that
    /// stays high means the working set is larger than `alExtents` covers.
    pub al_transactions: u64,
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
    /// Fenced as primary and not served since (see `handshake`).
    pub superseded: bool,
    /// The replication protocol version the current connection's handshake used.
    pub protocol_version: Option<u32>,
    pub generations: crate::replication::generation::Generations,
    pub last_discard: Option<DiscardRecord>,
    pub last_verify_mismatches: Option<Vec<(u64, u64)>>,
    pub counters: Counters,
    pub writes_allowed: bool,
    pub reads_allowed: bool,
}

impl Machine {
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
            superseded: self.sb.has(flags::SUPERSEDED),
            protocol_version: self.agreed_version(),
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
