//! The `ReplicatedVolume` resource: a block device mirrored between the two nodes of a group.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::hagroup::NAME_PATTERN;

/// A block device replicated synchronously (protocol C) or asynchronously (protocol A)
/// between the two nodes of a HaGroup, DRBD-style, and exported over NBD on the active node.
// kube's printcolumn(...) repeats keys by design; clippy reads them as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hapair.dev",
    version = "v1alpha1",
    kind = "ReplicatedVolume",
    doc = "A block device mirrored between the two nodes of a HaGroup.",
    namespaced,
    shortname = "rvol",
    category = "hapair",
    status = "ReplicatedVolumeStatus",
    derive = "PartialEq",
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.group"),
    printcolumn(name = "Size", type_ = "string", json_path = ".spec.size"),
    printcolumn(name = "Sync", type_ = "string", json_path = ".status.syncState"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedVolumeSpec {
    /// Name of the HaGroup (same namespace) whose nodes hold the replicas.
    #[schemars(length(min = 1, max = 253))]
    pub group: String,
    /// Usable size; a multiple of 4 KiB.
    pub size: Quantity,
    /// Where each node keeps its replica; one entry per group node.
    #[schemars(length(min = 2, max = 2))]
    pub backing: Vec<BackingSpec>,
    /// `C` (synchronous, default): a write completes once it is stable on both nodes. `A`
    /// (asynchronous): once it is written locally and sent; a failover may lose the last
    /// writes.
    #[serde(default)]
    pub protocol: ReplicationProtocol,
    /// TCP port the replication link listens on.
    #[serde(default = "defaults::replication_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Encryption of the replication link.
    #[serde(default)]
    pub tls: TlsSpec,
    /// Resync bandwidth limit in bytes per second (e.g. `100Mi`). Absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_rate: Option<Quantity>,
    /// How a detected split brain is resolved.
    #[serde(default)]
    pub split_brain_policy: SplitBrainPolicy,
    /// Activity-log slots (4 MiB extents each): the most data a crashed primary resyncs.
    #[serde(default = "defaults::al_extents")]
    #[schemars(range(min = 7, max = 65534))]
    pub activity_log_extents: u32,
    /// What deleting the resource does to the replicas' data.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// One node's replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackingSpec {
    /// Node name from the group.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub node: String,
    /// Block device or file holding the data (a file is created sparse if missing).
    #[schemars(length(min = 1), regex(pattern = r"^/"))]
    pub path: String,
    /// `internal` (metadata at the end of `path`) or the path of a separate metadata file.
    #[serde(default = "defaults::meta_internal")]
    pub metadata: String,
    /// Address the peer connects to for replication; defaults to the node's first
    /// heartbeat address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ReplicationProtocol {
    /// Asynchronous: a write completes once written locally and sent.
    A,
    /// Synchronous: a write completes once stable on both nodes.
    #[default]
    C,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Encrypt and authenticate the replication link with the nodes' enrollment certificates.
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// Stay disconnected until an admin runs resolve-split-brain.
    #[default]
    Manual,
    /// The node that became primary last loses its changes.
    DiscardYoungerPrimary,
    /// The node with fewer changed blocks loses its changes.
    DiscardLeastChanges,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum DeletionPolicy {
    /// Leave the backing data and metadata in place.
    #[default]
    Retain,
    /// Once no group uses it, each node discards the backing data and erases the metadata,
    /// but only where the metadata carries this volume's UUID.
    Wipe,
}

/// Observed state of a ReplicatedVolume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedVolumeStatus {
    /// Summary for `kubectl get`: UpToDate, Syncing 42%, Disconnected, SplitBrain…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_state: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<VolumeNodeStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One replica as its node reported it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeNodeStatus {
    pub node: String,
    pub disk_state: DiskState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<VolumeRole>,
    pub connection: ConnectionState,
    #[serde(default)]
    pub out_of_sync_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncProgress>,
    /// The last online verify this node ran (only the primary runs one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<VerifyReport>,
    /// The replica's backing on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageReport>,
}

/// Where a replica's data lives on its node, as the agent found it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageReport {
    /// The backing's path.
    pub path: String,
    /// `File` or `BlockDevice`.
    pub kind: BackingKind,
    /// Size of the backing (data and internal metadata).
    pub size_bytes: u64,
    /// Free space on the filesystem holding a file backing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem_free_bytes: Option<u64>,
    /// The block device under it, e.g. `sda`, `nvme0n1`, `vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// That device's model, where the kernel knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_model: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackingKind {
    File,
    BlockDevice,
}

/// The outcome of an online verify: both replicas' block digests compared, and what did
/// not match marked out of sync, so the resync that follows repairs it from the primary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// When it finished, RFC 3339.
    pub finished: String,
    pub duration_seconds: u64,
    pub checked_bytes: u64,
    pub mismatched_bytes: u64,
    /// The first mismatched ranges, as `offset+length` in bytes (the event lists more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatched_ranges: Vec<String>,
}

/// How many mismatched ranges a [`VerifyReport`] lists; the event names them all.
pub const VERIFY_RANGES_SHOWN: usize = 16;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum DiskState {
    UpToDate,
    /// Partially synced: a resync target, or never synced.
    Inconsistent,
    /// Consistent but older than the peer's data.
    Outdated,
    /// No local backing attached.
    Diskless,
    #[default]
    Unknown,
}

impl DiskState {
    pub fn as_str(&self) -> &'static str {
        match self {
            DiskState::UpToDate => "UpToDate",
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Outdated => "Outdated",
            DiskState::Diskless => "Diskless",
            DiskState::Unknown => "Unknown",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum VolumeRole {
    Primary,
    Secondary,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ConnectionState {
    #[default]
    StandAlone,
    Connecting,
    Connected,
    SyncSource,
    SyncTarget,
    VerifySource,
    VerifyTarget,
    /// Generation identifiers diverged; waiting for policy or admin resolution.
    SplitBrain,
}

/// Progress of a running resync.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    #[serde(default)]
    pub bytes_per_second: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
}

impl SyncProgress {
    pub fn percent(&self) -> u64 {
        self.done_bytes.saturating_mul(100).checked_div(self.total_bytes).unwrap_or(100)
    }
}

pub mod defaults {
    pub fn replication_port() -> u16 {
        7789
    }
    pub fn al_extents() -> u32 {
        257
    }
    pub fn meta_internal() -> String {
        "internal".to_string()
    }
}
