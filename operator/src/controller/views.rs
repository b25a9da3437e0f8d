//! What the controller shows and is asked through the admin half of the node API, spoken
//! by `kubectl-hapair` with the admin certificate: what `GET /v1/groups` returns, how an
//! action is requested and how its outcome reads, and the CLI config file the controller
//! writes for it. The controller builds these views; the server only serializes them.

use std::fmt;

use hapair_crds::hagroup::{HaGroupSpec, WitnessMode};
use hapair_crds::nodeapi::{ActionOutcome, AdminActionKind, GroupKey, GroupReport};
use hapair_crds::{HaGroupStatus, ReplicatedVolumeStatus};
use serde::{Deserialize, Serialize};

use crate::status::events::GroupEvent;

/// File name of the CLI config the standalone controller writes into its state directory.
pub const CLI_CONFIG_FILE: &str = "hapair-admin.json";

/// `GET` one action's outcome (admin API).
pub fn action_path(namespace: &str, name: &str, id: &str) -> String {
    format!("{}/{id}", hapair_crds::nodeapi::paths::actions(namespace, name))
}

/// Answer to `GET /v1/groups`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupsOverview {
    #[serde(default)]
    pub groups: Vec<GroupView>,
    /// Refused manifests (`file (document N), Kind ns/name: field: message`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Deleted volumes whose deletion is not finished (`ns/name: why it waits`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleting_volumes: Vec<String>,
}

/// One group, as `status` and `describe` show it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    pub key: GroupKey,
    /// Node names in spec order (empty when the group never had a valid spec).
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub witness: WitnessMode,
    /// Why the current manifest is refused; the last good config keeps running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub deleting: bool,
    #[serde(default)]
    pub status: HaGroupStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeView>,
    /// The group's virtual IPs and the flow steps that bring them up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_ips: Vec<VirtualIpView>,
    /// Per node: what its agent last said about this group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_details: Vec<NodeDetail>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<GroupEvent>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView {
    pub name: String,
    pub status: ReplicatedVolumeStatus,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualIpView {
    pub name: String,
    /// With its prefix length.
    pub address: String,
    pub interface: String,
    /// The flow step that brings it up: the node whose step runs holds the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

impl VirtualIpView {
    /// The virtual IPs `spec` declares.
    pub fn of_spec(spec: &HaGroupSpec) -> Vec<VirtualIpView> {
        spec.virtual_ips
            .iter()
            .map(|vip| VirtualIpView {
                name: vip.name.clone(),
                address: vip.address.clone(),
                interface: vip.interface.clone(),
                step: spec
                    .flow
                    .iter()
                    .find(|s| s.virtual_ip.as_ref().is_some_and(|v| v.name == vip.name))
                    .map(|s| s.name.clone()),
            })
            .collect()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeDetail {
    pub node: String,
    /// Revision of the bundle the controller publishes for the node.
    #[serde(default)]
    pub desired_revision: u64,
    /// Revision the agent says it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<GroupReport>,
}

/// Body of `POST /v1/groups/{ns}/{name}/actions`, e.g.
/// `{"action": "switchover", "to": "db2"}`. A client-chosen `id` makes retries idempotent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(flatten)]
    pub kind: AdminActionKind,
}

/// An action and its outcome (answer to both the `POST` and the `GET`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActionView {
    pub id: String,
    pub group: GroupKey,
    #[serde(flatten)]
    pub kind: AdminActionKind,
    pub outcome: ActionOutcome,
    pub message: String,
    /// RFC 3339.
    pub submitted: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<NodeActionResult>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeActionResult {
    pub node: String,
    pub outcome: ActionOutcome,
    pub message: String,
}

/// How the CLI reaches and authenticates to a controller: the file the standalone
/// controller writes as `hapair-admin.json` in its state directory (mode 0600).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdminConfig {
    /// Base URL of the node API, e.g. `https://ctl.example:7443`.
    pub controller: String,
    /// Every controller of a replicated set (`controller` among them), tried in turn and
    /// followed to the leader; empty for a single controller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// PEM of the controller CA.
    pub ca_pem: String,
    /// PEM of the admin client certificate (CN `hapair-admin`).
    pub cert_pem: String,
    /// PEM of its private key.
    pub key_pem: String,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig").field("controller", &self.controller).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_requests_are_flat() {
        let request: ActionRequest =
            serde_json::from_str(r#"{"action": "switchover", "to": "db2"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(request, ActionRequest { id: None, kind: AdminActionKind::Switchover { to: "db2".into() } });
        let with_id: ActionRequest = serde_json::from_str(r#"{"id": "x1", "action": "maintenance", "enabled": true}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(with_id.id.as_deref(), Some("x1"));
        assert_eq!(action_path("db", "pg", "x1"), "/v1/groups/db/pg/actions/x1");
    }
}
