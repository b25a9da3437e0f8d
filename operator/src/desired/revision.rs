//! Per-node bundle revisions that move only when the node's content changes.
//!
//! Agents long-poll "anything newer than revision N"; a revision bumped by a timestamp or a
//! change to some other node's group would wake every agent for nothing, so the revision is
//! tied to a hash of exactly what the node receives.

use std::collections::BTreeMap;

use hapair_crds::nodeapi::{DesiredConfig, GroupConfig, VolumeWipe};
use sha2::{Digest, Sha256};

use crate::desired::state::NodeRevision;
use crate::support::hex;

/// Hash of a node's groups (and wipes, when there are any) as canonical JSON (struct
/// fields in declaration order, maps sorted), hex. Without wipes the hash covers the groups
/// alone, exactly as before wipes existed, so upgrading the controller moves no revision.
pub fn content_hash(groups: &[GroupConfig], wipes: &[VolumeWipe]) -> String {
    let json = if wipes.is_empty() {
        serde_json::to_vec(groups).unwrap_or_default()
    } else {
        serde_json::to_vec(&(groups, wipes)).unwrap_or_default()
    };
    hex::encode(&Sha256::digest(&json))
}

/// Wraps `groups` and `wipes` into the node's bundle, bumping its revision when the content differs from
/// what was last published. Returns the bundle and whether it changed.
pub fn assign(
    nodes: &mut BTreeMap<String, NodeRevision>,
    node: &str,
    groups: Vec<GroupConfig>,
    wipes: Vec<VolumeWipe>,
) -> (DesiredConfig, bool) {
    let hash = content_hash(&groups, &wipes);
    let entry = nodes.entry(node.to_string()).or_default();
    let changed = entry.content_hash != hash || entry.revision == 0;
    if changed {
        entry.revision = entry.revision.saturating_add(1);
        entry.content_hash = hash;
    }
    (DesiredConfig { node: node.to_string(), revision: entry.revision, groups, wipes }, changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::nodeapi::{GroupKey, HeartbeatKey};

    fn group(name: &str) -> GroupConfig {
        let spec = serde_yaml::from_str(
            "nodes: [{name: a, heartbeatAddresses: [198.18.1.1]}, {name: b, heartbeatAddresses: [198.18.1.2]}]",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        GroupConfig {
            key: GroupKey::new("default", name),
            generation: 1,
            spec,
            volumes: vec![],
            heartbeat_key: HeartbeatKey::Inline("a2V5".into()),
            actions: vec![],
            deleting: false,
        }
    }

    #[test]
    fn revision_moves_only_on_content_change() {
        let mut nodes = BTreeMap::new();
        let (first, changed) = assign(&mut nodes, "a", vec![group("g")], vec![]);
        assert_eq!((first.revision, changed), (1, true));
        let (same, changed) = assign(&mut nodes, "a", vec![group("g")], vec![]);
        assert_eq!((same.revision, changed), (1, false));
        let mut edited = group("g");
        edited.generation = 2;
        let (next, changed) = assign(&mut nodes, "a", vec![edited], vec![]);
        assert_eq!((next.revision, changed), (2, true));
        // Another node's bundle has its own counter.
        let (other, _) = assign(&mut nodes, "b", vec![group("g")], vec![]);
        assert_eq!(other.revision, 1);
    }

    #[test]
    fn an_empty_bundle_still_gets_a_first_revision() {
        let mut nodes = BTreeMap::new();
        let (bundle, changed) = assign(&mut nodes, "a", vec![], vec![]);
        assert_eq!((bundle.revision, changed), (1, true));
        let (bundle, changed) = assign(&mut nodes, "a", vec![], vec![]);
        assert_eq!((bundle.revision, changed), (1, false));
    }
}
