//! What the controller itself must remember across restarts, as opposed to what users wrote
//! (the manifests) or what agents observed (their reports).
//!
//! Losing any of this would be visible on the nodes: a volume UUID that changed would make
//! both replicas look foreign, a regenerated heartbeat key would split the pair until both
//! agents reloaded, a revision that went backwards would stall the agents' long-polls, and
//! an invalid edit would tear down a running group instead of keeping its last good config.
//! The reconcile core reads and updates this value; a [`crate::controller::store::Store`] persists it.

use std::collections::{BTreeMap, BTreeSet};

use hapair_crds::nodeapi::{ActionOutcome, ActionResult, AdminAction, GroupKey, WipeReport};
use hapair_crds::volume::ReplicatedVolumeSpec;
use hapair_crds::{HaGroup, ReplicatedVolume};
use serde::{Deserialize, Serialize};

use crate::desired::catalog::Origin;
use crate::support::timestamp::UnixMillis;

/// The controller's durable memory. Serialized as one JSON document; unknown or missing
/// fields default so that older state files keep loading.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ControllerState {
    /// Stable identity of every ReplicatedVolume ever delivered, by `namespace/name`. Kept
    /// after deletion so that a re-created volume over retained data is still recognised.
    #[serde(default)]
    pub volume_uuids: BTreeMap<GroupKey, String>,
    /// Heartbeat keys the controller generated for groups without `keySecretRef` (base64).
    #[serde(default)]
    pub generated_keys: BTreeMap<GroupKey, String>,
    /// The last configuration of each group that passed every check; served while a later
    /// edit is invalid.
    #[serde(default)]
    pub last_good: BTreeMap<GroupKey, GroupSource>,
    /// Groups removed from the desired state whose nodes have not yet confirmed cleanup.
    #[serde(default)]
    pub deleting: BTreeMap<GroupKey, Deleting>,
    /// Per node: the revision of its bundle and a hash of the content it was given for.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeRevision>,
    /// Admin actions, pending and recently finished, by id.
    #[serde(default)]
    pub actions: BTreeMap<String, ActionEntry>,
    /// The last accepted spec of every volume that has a UUID, and where it was read: once
    /// its manifest is gone, this is what says what its deletion does (`deletionPolicy`).
    #[serde(default)]
    pub volume_specs: BTreeMap<GroupKey, KnownVolume>,
    /// Deleted volumes with `deletionPolicy: Wipe` whose nodes have not all answered yet.
    #[serde(default)]
    pub wiping: BTreeMap<GroupKey, Wiping>,
}

/// A volume as last accepted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KnownVolume {
    pub spec: ReplicatedVolumeSpec,
    pub origin: Origin,
}

/// A deleted volume whose replicas are being erased: each backing node receives it in its
/// bundle until it has answered with a final outcome.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Wiping {
    pub uuid: String,
    pub spec: ReplicatedVolumeSpec,
    /// Final answers, by node.
    #[serde(default)]
    pub answers: BTreeMap<String, WipeReport>,
    pub since: UnixMillis,
}

impl Wiping {
    /// Backing nodes that have not answered yet.
    pub fn pending(&self) -> Vec<String> {
        self.spec.backing.iter().filter(|b| !self.answers.contains_key(&b.node)).map(|b| b.node.clone()).collect()
    }
}

/// Everything a group's config is built from, captured when it was last valid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupSource {
    pub group: HaGroup,
    /// The ReplicatedVolumes the group's flow and monitors reference.
    #[serde(default)]
    pub volumes: Vec<ReplicatedVolume>,
    /// The heartbeat key material, base64, resolved from the Secret or generated.
    pub heartbeat_key: String,
    pub origin: Origin,
}

/// A group on its way out: its nodes keep receiving it with `deleting: true` until each has
/// reported `cleanedUp`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Deleting {
    pub source: GroupSource,
    #[serde(default)]
    pub cleaned_up: BTreeSet<String>,
    pub since: UnixMillis,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRevision {
    pub revision: u64,
    /// SHA-256 of the bundle's groups as JSON; the revision moves only when this does.
    pub content_hash: String,
}

/// One admin action and what the agents said about it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActionEntry {
    pub group: GroupKey,
    pub action: AdminAction,
    pub submitted: UnixMillis,
    /// The latest result each node reported.
    #[serde(default)]
    pub results: BTreeMap<String, ActionResult>,
    pub outcome: ActionOutcome,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<UnixMillis>,
}

impl ActionEntry {
    pub fn is_final(&self) -> bool {
        self.outcome.is_final()
    }
}
