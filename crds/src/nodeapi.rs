//! Types exchanged between the controller and the node agents (the node API).
//!
//! Agents connect out to the controller: they long-poll their [`DesiredConfig`], post a
//! [`NodeReport`], and ask the witness for leases with [`LeaseRequest`]. Admin actions travel
//! inside the desired config; their outcomes come back inside the report. Every type here is
//! plain data so both sides (and the tests) can build and compare it.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

// The outcome belongs to the group status that records it; the node API speaks it too.
pub use crate::hagroup::ActionOutcome;
use crate::hagroup::{FailoverRecord, HaGroupSpec, Hardware, LinkStatus, NodeHealth, NodeRole};
use crate::volume::{ConnectionState, DiskState, ReplicatedVolumeSpec, SyncProgress, VolumeRole};

/// URL paths of the node API, relative to the controller's base URL.
pub mod paths {
    /// `GET ?revision=N&wait=SECONDS`: the node's desired config once its revision exceeds N.
    pub fn config(node: &str) -> String {
        format!("/v1/nodes/{node}/config")
    }
    /// `POST`: the node's [`super::NodeReport`].
    pub fn report(node: &str) -> String {
        format!("/v1/nodes/{node}/report")
    }
    /// `POST`: a [`super::LeaseRequest`], answered by a [`super::LeaseResponse`].
    pub const LEASE: &str = "/v1/witness/lease";
    /// `POST`: an [`super::EnrollRequest`] carrying a one-time token.
    pub const ENROLL: &str = "/v1/enroll";
    /// `GET`: every group's status (admin API).
    pub const GROUPS: &str = "/v1/groups";
    /// `POST`: an [`super::AdminAction`] for a group (admin API).
    pub fn actions(namespace: &str, name: &str) -> String {
        format!("/v1/groups/{namespace}/{name}/actions")
    }
}

/// Header a controller that is not the leader adds to its 503 answers when it knows who
/// leads: the leader's base URL. Agents follow it only to a controller they were
/// configured with, so a hint can never send them somewhere new.
pub const LEADER_HEADER: &str = "x-hapair-leader";

/// Header carrying the node-API protocol version: an agent sends the version it speaks,
/// the controller answers with the one it used. Version 1, the previous release, sends
/// no header, so its absence means 1.
pub const PROTOCOL_HEADER: &str = "x-hapair-protocol";
/// The node-API protocol version of this release.
pub const NODE_API_VERSION: u8 = 2;
/// The oldest node-API protocol version still accepted: the previous release's.
pub const NODE_API_OLDEST: u8 = NODE_API_VERSION - 1;

/// The version of a request that carried `header` (its [`PROTOCOL_HEADER`] value, if
/// any), or why it is refused, naming both sides' versions.
pub fn node_api_version(header: Option<&str>) -> Result<u8, String> {
    let Some(value) = header else { return Ok(1) };
    match value.trim().parse::<u8>() {
        Ok(v) if (NODE_API_OLDEST..=NODE_API_VERSION).contains(&v) => Ok(v),
        _ => Err(format!(
            "node API protocol version {value:?} is not supported: this controller speaks {NODE_API_OLDEST} to \
             {NODE_API_VERSION}; upgrade the controller first, then the agents, one version at a time"
        )),
    }
}

/// A group's identity across namespaces, written `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub namespace: String,
    pub name: String,
}

impl GroupKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        GroupKey { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid group key {0:?}: expected namespace/name")]
pub struct GroupKeyError(String);

impl FromStr for GroupKey {
    type Err = GroupKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Names never hold a '/', but state written before names were validated may hold a
        // namespace that does ("a/b"); splitting at the last '/' keeps such state loadable.
        match s.rsplit_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok(GroupKey::new(ns, name)),
            _ => Err(GroupKeyError(s.to_string())),
        }
    }
}

impl Serialize for GroupKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GroupKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GroupKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GroupKey".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^[^/]+/[^/]+$" })
    }
}

/// Everything one node must run: every group it belongs to, at one revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DesiredConfig {
    pub node: String,
    /// Increases with every change to anything in this bundle.
    pub revision: u64,
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    /// Deleted volumes (`deletionPolicy: Wipe`) whose replica on this node must be erased.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wipes: Vec<VolumeWipe>,
}

/// A deleted ReplicatedVolume whose data this node must erase: its backing is discarded
/// (reads as zeroes) and its metadata blanked, but only when the metadata on disk carries
/// `uuid`, so a backing that was reused for something else is never touched.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeWipe {
    /// Namespace and name of the deleted volume.
    pub volume: GroupKey,
    pub uuid: String,
    /// The volume's last spec; the node's `backing` entry says where its replica lives.
    pub spec: ReplicatedVolumeSpec,
}

/// How erasing one deleted volume's replica went on one node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WipeOutcome {
    /// Data discarded and metadata blanked.
    Wiped,
    /// No metadata of this volume was there (never created here, or already wiped).
    NothingToWipe,
    /// The backing holds something this agent must not erase (another volume's metadata,
    /// foreign or unreadable metadata); it was left as it was.
    Refused,
    /// A group on this node still uses the volume, or its replica is still open; the agent
    /// tries again.
    Waiting,
    /// An I/O error; the agent tries again.
    Failed,
}

impl WipeOutcome {
    /// Whether the agent is done with the wipe (it will not try again).
    pub fn is_final(self) -> bool {
        matches!(self, WipeOutcome::Wiped | WipeOutcome::NothingToWipe | WipeOutcome::Refused)
    }
}

/// One node's answer to a [`VolumeWipe`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WipeReport {
    pub volume: GroupKey,
    pub uuid: String,
    pub outcome: WipeOutcome,
    pub message: String,
}

/// One group as seen by one of its nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupConfig {
    pub key: GroupKey,
    /// `metadata.generation` of the HaGroup this was built from.
    #[serde(default)]
    pub generation: i64,
    /// The validated spec, with unreferenced virtual IPs made explicit as trailing steps.
    pub spec: HaGroupSpec,
    /// The ReplicatedVolumes this group's flow and monitors use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeConfig>,
    pub heartbeat_key: HeartbeatKey,
    /// Admin actions not yet acknowledged by this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<AdminAction>,
    /// The group is being deleted: stop the flow, remove VIPs, demote volumes, then report.
    #[serde(default)]
    pub deleting: bool,
}

/// A ReplicatedVolume as delivered to a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeConfig {
    pub name: String,
    /// Stable identity written into the on-disk metadata; a replica with another UUID is
    /// foreign and refused.
    pub uuid: String,
    #[serde(default)]
    pub generation: i64,
    pub spec: ReplicatedVolumeSpec,
}

/// The HMAC-SHA256 key authenticating a group's heartbeats.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum HeartbeatKey {
    /// Base64 key material, delivered over the mutually authenticated node API.
    Inline(String),
    /// A file on the node holding the key (raw bytes).
    File(String),
}

impl fmt::Debug for HeartbeatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeartbeatKey::Inline(_) => f.write_str("Inline(<redacted>)"),
            HeartbeatKey::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// An operator's request to change roles, carried to the agents in their desired config.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminAction {
    /// Unique per request, so retries are idempotent and outcomes can be matched.
    pub id: String,
    #[serde(flatten)]
    pub kind: AdminActionKind,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum AdminActionKind {
    /// Graceful move of the service to `to`, with no data loss.
    Switchover { to: String },
    /// Make `node` active regardless of health and sync (never overlapping leases).
    ForceActive { node: String },
    /// End a split brain: `winner` keeps its data and becomes active.
    ResolveSplitBrain { winner: String },
    /// Freeze (or unfreeze) automatic actions.
    Maintenance { enabled: bool },
    /// Start an online verify of `volume` on the node that serves it. Node API 2 and later.
    Verify { volume: String },
}

impl AdminActionKind {
    pub fn label(&self) -> &'static str {
        match self {
            AdminActionKind::Switchover { .. } => "switchover",
            AdminActionKind::ForceActive { .. } => "force-active",
            AdminActionKind::ResolveSplitBrain { .. } => "resolve-split-brain",
            AdminActionKind::Maintenance { .. } => "maintenance",
            AdminActionKind::Verify { .. } => "verify",
        }
    }
}

/// A node's answer to an admin action.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActionResult {
    pub id: String,
    pub outcome: ActionOutcome,
    pub message: String,
}

/// What an agent tells the controller about itself and its groups.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    /// Revision of the desired config the agent is running.
    pub applied_revision: u64,
    /// Why the agent refused the latest desired config, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    pub agent_version: String,
    pub os: String,
    pub uptime_seconds: u64,
    #[serde(default)]
    pub hardware: Hardware,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkStatus>,
    #[serde(default)]
    pub groups: Vec<GroupReport>,
    /// Answers to the bundle's `wipes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wipes: Vec<WipeReport>,
}

/// One group as one node sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupReport {
    pub key: GroupKey,
    pub role: NodeRole,
    pub epoch: u64,
    pub health: NodeHealth,
    /// Why the node is in its role (e.g. "waiting for witness: unreachable").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_reason: Option<String>,
    /// Whether any heartbeat link currently reaches the peer.
    pub peer_reachable: bool,
    /// RFC 3339 time of the last heartbeat received from the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_peer_heartbeat: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heartbeat_links: Vec<HeartbeatLinkReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitors: Vec<MonitorReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionResult>,
    /// Events since the previous report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRecord>,
    /// Set once a deleting group has stopped everything on this node.
    #[serde(default)]
    pub cleaned_up: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatLinkReport {
    pub index: u32,
    pub local_address: String,
    pub peer_address: String,
    pub up: bool,
    /// Heartbeats lost over the recent window, percent.
    pub loss_percent: u32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepState {
    Stopped,
    Starting,
    /// Started; waiting out the stabilization time.
    Stabilizing,
    Running,
    Restarting,
    Stopping,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub name: String,
    pub state: StepState,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitorReport {
    pub name: String,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeReport {
    pub name: String,
    pub disk_state: DiskState,
    pub role: VolumeRole,
    pub connection: ConnectionState,
    #[serde(default)]
    pub out_of_sync_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncProgress>,
    /// Whether the peer's replica was UpToDate at last contact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_disk_state: Option<DiskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<crate::volume::VerifyReport>,
    /// The backing: path, size, free space, device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::volume::StorageReport>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

/// A decision or incident, with its reason, as it becomes a Kubernetes Event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// RFC 3339.
    pub time: String,
    #[serde(rename = "type")]
    pub type_: EventType,
    /// CamelCase, e.g. `Failover`, `ProbeFailed`, `SelfFenced`.
    pub reason: String,
    pub message: String,
    #[serde(default)]
    pub epoch: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum LeaseOp {
    Acquire,
    Renew,
    Release,
}

/// A node asking the witness for (or giving back) the group's lease.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRequest {
    pub group: GroupKey,
    pub node: String,
    pub op: LeaseOp,
    /// The epoch the node will act in once granted.
    pub epoch: u64,
    /// Requested lifetime; the witness never grants longer than the group's leaseTTL.
    pub ttl_ms: u64,
}

/// The witness's answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum LeaseResponse {
    /// The lease is the caller's for `ttlMs`, measured from when it sent the request.
    Granted {
        holder: String,
        ttl_ms: u64,
        epoch: u64,
    },
    /// Someone else holds it, or the witness is waiting out a restart.
    Denied {
        holder: Option<String>,
        retry_after_ms: u64,
        reason: String,
    },
    Released,
}

/// Exchanging a one-time token for a client certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    pub node: String,
    pub token: String,
    /// PEM certificate signing request for the node's key (CN = node name).
    pub csr_pem: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub certificate_pem: String,
    pub ca_pem: String,
    /// Every controller endpoint (base URL) the agent should use, the one enrolled through
    /// included; empty from a controller that does not say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
}

/// Body of every non-2xx node API answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_api_versions_one_behind_are_accepted() {
        assert_eq!(node_api_version(None), Ok(1));
        assert_eq!(node_api_version(Some("1")), Ok(1));
        assert_eq!(node_api_version(Some("2")), Ok(2));
        for bad in ["0", "3", "", "two", "256"] {
            let err = node_api_version(Some(bad)).err().unwrap_or_default();
            assert!(err.contains("this controller speaks 1 to 2"), "{bad}: {err}");
        }
    }

    use super::*;

    #[test]
    fn group_key_round_trips() {
        let key: GroupKey = "db/pg".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key, GroupKey::new("db", "pg"));
        assert_eq!(serde_json::to_string(&key).ok().as_deref(), Some("\"db/pg\""));
        for bad in ["pg", "/pg", "db/"] {
            assert!(bad.parse::<GroupKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_written_before_names_were_validated_still_loads() {
        let legacy = GroupKey::new("a/b", "pg");
        let text = serde_json::to_string(&legacy).unwrap_or_else(|e| panic!("{e}"));
        let back: GroupKey = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, legacy);
    }

    #[test]
    fn admin_actions_are_tagged() {
        let action = AdminAction { id: "a1".into(), kind: AdminActionKind::Switchover { to: "b".into() } };
        let json = serde_json::to_value(&action).unwrap_or_default();
        assert_eq!(json, serde_json::json!({"id": "a1", "action": "switchover", "to": "b"}));
        let back: AdminAction = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, action);
    }

    #[test]
    fn heartbeat_key_debug_is_redacted() {
        let key = HeartbeatKey::Inline("c2VjcmV0".into());
        assert!(!format!("{key:?}").contains("c2VjcmV0"));
    }
}
