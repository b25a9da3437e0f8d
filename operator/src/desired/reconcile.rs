//! The reconcile core: a snapshot of the desired objects and the controller's own state in,
//! one desired-config bundle per node out.
//!
//! Dereference (reading the snapshot), publish (handing bundles to the node API) and status
//! writes touch the outside world and live behind [`crate::controller::store::Store`] and
//! [`crate::controller::publish::Publisher`]; everything here is a pure function of its inputs, with
//! time and randomness passed in. The Kubernetes operator calls the same function with a
//! snapshot read from the API server.

use std::collections::{BTreeMap, BTreeSet};

use hapair_crds::manifest::ManifestError;
use hapair_crds::nodeapi::{DesiredConfig, GroupConfig, GroupKey, VolumeWipe};
use rand::RngCore;

use crate::desired::actions::pending_for;
use crate::desired::bundle::group_config;
use crate::desired::catalog::Catalog;
use crate::desired::resolve::resolve;
use crate::desired::retire::{Retirement, retire_volumes};
use crate::desired::revision::assign;
use crate::desired::state::{ControllerState, Deleting};
use crate::support::timestamp::UnixMillis;

/// What the controller knows about one group after a reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupPlan {
    /// The config its nodes run (without per-node actions); `None` when it never was valid.
    pub config: Option<GroupConfig>,
    /// Why the current manifest is refused (the config, if any, is the last good one).
    pub error: Option<ManifestError>,
    /// Removed from the desired state; nodes are cleaning up.
    pub deleting: bool,
    /// `metadata.generation` of the object as last seen, even when refused; the status
    /// reports it so users can tell their latest edit was looked at.
    pub observed_generation: Option<i64>,
}

impl GroupPlan {
    pub fn nodes(&self) -> Vec<String> {
        self.config.as_ref().map(|c| c.spec.nodes.iter().map(|n| n.name.clone()).collect()).unwrap_or_default()
    }
}

/// The result of one reconcile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reconciled {
    /// Every node that has ever had a bundle, with its current one.
    pub bundles: BTreeMap<String, DesiredConfig>,
    /// Nodes whose bundle changed (their revision went up).
    pub changed: BTreeSet<String>,
    pub groups: BTreeMap<GroupKey, GroupPlan>,
    /// Every refused document or object.
    pub errors: Vec<ManifestError>,
    /// Groups that started deleting in this reconcile.
    pub deletion_started: Vec<GroupKey>,
    /// Groups whose deletion every node confirmed in this reconcile; they are gone.
    pub deletion_finished: Vec<GroupKey>,
    /// What happened to deleted volumes.
    pub volumes: Retirement,
}

/// Builds every node's bundle from `catalog`, updating `state` (last good configs, UUIDs,
/// generated keys, deletions of groups and volumes, revisions).
pub fn reconcile(catalog: &Catalog, state: &mut ControllerState, now: UnixMillis, rng: &mut dyn RngCore) -> Reconciled {
    let resolution = resolve(catalog, state, rng);
    let mut out = Reconciled { errors: resolution.errors.clone(), ..Reconciled::default() };

    for key in &resolution.removed {
        if let Some(source) = state.last_good.remove(key) {
            state.deleting.insert(key.clone(), Deleting { source, cleaned_up: BTreeSet::new(), since: now });
            out.deletion_started.push(key.clone());
        }
    }
    for key in resolution.live.keys() {
        // Re-added while its nodes were still cleaning up: it simply runs again.
        state.deleting.remove(key);
    }
    let finished: Vec<GroupKey> = state
        .deleting
        .iter()
        .filter(|(_, d)| d.source.group.spec.nodes.iter().all(|n| d.cleaned_up.contains(&n.name)))
        .map(|(k, _)| k.clone())
        .collect();
    for key in finished {
        state.deleting.remove(&key);
        state.generated_keys.remove(&key);
        state.actions.retain(|_, a| a.group != key);
        out.deletion_finished.push(key);
    }

    for (key, live) in &resolution.live {
        let config = group_config(key, &live.source, &mut state.volume_uuids, rng);
        let observed_generation = catalog.generations.get(key).copied().or(Some(config.generation));
        out.groups.insert(
            key.clone(),
            GroupPlan { config: Some(config), error: live.error.clone(), deleting: false, observed_generation },
        );
    }
    for (key, deleting) in &state.deleting {
        let mut config = group_config(key, &deleting.source, &mut state.volume_uuids, rng);
        config.deleting = true;
        let observed_generation = Some(config.generation);
        out.groups
            .insert(key.clone(), GroupPlan { config: Some(config), error: None, deleting: true, observed_generation });
    }
    for (key, error) in &resolution.refused {
        out.groups.entry(key.clone()).or_insert(GroupPlan {
            config: None,
            error: Some(error.clone()),
            deleting: false,
            observed_generation: catalog.generations.get(key).copied(),
        });
    }

    out.volumes = retire_volumes(catalog, state, now);

    let mut per_node: BTreeMap<String, Vec<GroupConfig>> =
        state.nodes.keys().map(|n| (n.clone(), Vec::new())).collect();
    for (key, plan) in &out.groups {
        let Some(config) = &plan.config else { continue };
        for node in &config.spec.nodes {
            let mut for_node = config.clone();
            if !plan.deleting {
                for_node.actions = pending_for(&state.actions, key, &node.name);
            }
            per_node.entry(node.name.clone()).or_default().push(for_node);
        }
    }
    let mut wipes: BTreeMap<String, Vec<VolumeWipe>> = BTreeMap::new();
    for (key, wiping) in &state.wiping {
        for node in wiping.pending() {
            per_node.entry(node.clone()).or_default();
            let wipe = VolumeWipe { volume: key.clone(), uuid: wiping.uuid.clone(), spec: wiping.spec.clone() };
            wipes.entry(node).or_default().push(wipe);
        }
    }
    for (node, groups) in per_node {
        let (bundle, changed) = assign(&mut state.nodes, &node, groups, wipes.remove(&node).unwrap_or_default());
        if changed {
            out.changed.insert(node.clone());
        }
        out.bundles.insert(node, bundle);
    }
    out
}

/// Records that `node` finished cleaning up a deleting group. Returns whether this was news.
pub fn note_cleaned_up(state: &mut ControllerState, key: &GroupKey, node: &str) -> bool {
    match state.deleting.get_mut(key) {
        Some(deleting) if deleting.source.group.spec.nodes.iter().any(|n| n.name == node) => {
            deleting.cleaned_up.insert(node.to_string())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::actions::queue;
    use base64::Engine;
    use hapair_crds::nodeapi::{AdminActionKind, HeartbeatKey};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const GROUP: &str = r#"
apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: g, namespace: ns}
spec:
  nodes:
    - {name: a, heartbeatAddresses: [198.18.1.1]}
    - {name: b, heartbeatAddresses: [198.18.1.2]}
  virtualIPs:
    - {name: www, address: 198.18.1.80/24, interface: eth0}
  flow:
    - name: data
      volume: {volumeRef: data}
"#;

    const VOLUME: &str = r#"
apiVersion: hapair.dev/v1alpha1
kind: ReplicatedVolume
metadata: {name: data, namespace: ns}
spec:
  group: g
  size: 1Gi
  backing:
    - {node: a, path: /srv/data.img}
    - {node: b, path: /srv/data.img}
"#;

    const OTHER: &str = r#"
apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: other, namespace: ns}
spec:
  nodes:
    - {name: b, heartbeatAddresses: [198.18.2.2]}
    - {name: c, heartbeatAddresses: [198.18.2.3]}
"#;

    fn catalog(sources: &[(&str, &str)]) -> Catalog {
        Catalog::from_sources(sources.iter().copied())
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn bundle<'a>(out: &'a Reconciled, node: &str) -> &'a DesiredConfig {
        out.bundles.get(node).unwrap_or_else(|| panic!("no bundle for {node}: {:?}", out.bundles.keys()))
    }

    fn key() -> GroupKey {
        GroupKey::new("ns", "g")
    }

    #[test]
    fn builds_one_bundle_per_node_with_explicit_vips_volumes_and_a_key() {
        let mut state = ControllerState::default();
        let out =
            reconcile(&catalog(&[("g.yaml", GROUP), ("v.yaml", VOLUME), ("o.yaml", OTHER)]), &mut state, 0, &mut rng());
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.bundles.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(out.changed.len(), 3);
        let a = bundle(&out, "a");
        assert_eq!((a.node.as_str(), a.revision, a.groups.len()), ("a", 1, 1));
        let b_groups: Vec<String> = bundle(&out, "b").groups.iter().map(|g| g.key.to_string()).collect();
        assert_eq!(b_groups, ["ns/g", "ns/other"]);
        let g = &a.groups[0];
        let steps: Vec<&str> = g.spec.flow.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(steps, ["data", "vip-www"]);
        assert_eq!(g.volumes.len(), 1);
        assert_eq!(g.volumes[0].name, "data");
        assert!(uuid::Uuid::parse_str(&g.volumes[0].uuid).is_ok());
        let HeartbeatKey::Inline(k) = &g.heartbeat_key else { panic!("inline key expected") };
        let raw = base64::engine::general_purpose::STANDARD.decode(k).unwrap_or_default();
        assert_eq!(raw.len(), crate::desired::resolve::GENERATED_KEY_BYTES);
        // Both nodes of a group get identical group content.
        let g_on_b = bundle(&out, "b").groups.iter().find(|c| c.key == key()).cloned();
        assert_eq!(g_on_b.as_ref(), Some(g));
        // Every bundle passes the agent's own checks.
        for (node, b) in &out.bundles {
            for group in &b.groups {
                hapair_crds::validation::validate_group(&group.spec).unwrap_or_else(|e| panic!("{node}: {e}"));
            }
        }
    }

    #[test]
    fn uuids_keys_and_revisions_survive_a_restart_and_move_only_on_change() {
        let sources = [("g.yaml", GROUP), ("v.yaml", VOLUME), ("o.yaml", OTHER)];
        let mut state = ControllerState::default();
        let first = reconcile(&catalog(&sources), &mut state, 0, &mut rng());
        // A restart: the state goes through JSON and the RNG is different.
        let json = serde_json::to_string(&state).unwrap_or_else(|e| panic!("{e}"));
        let mut restored: ControllerState = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(restored, state);
        let again = reconcile(&catalog(&sources), &mut restored, 1, &mut StdRng::seed_from_u64(99));
        assert!(again.changed.is_empty(), "{:?}", again.changed);
        assert_eq!(again.bundles, first.bundles);

        // Editing only group "other" changes b's and c's bundles, not a's.
        let edited = OTHER.replace("198.18.2.3", "198.18.2.4");
        let sources = [("g.yaml", GROUP), ("v.yaml", VOLUME), ("o.yaml", edited.as_str())];
        let third = reconcile(&catalog(&sources), &mut restored, 2, &mut rng());
        assert_eq!(third.changed, ["b".to_string(), "c".to_string()].into());
        assert_eq!(bundle(&third, "a").revision, 1);
        assert_eq!(bundle(&third, "b").revision, 2);
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_good_config_and_names_the_field() {
        let mut state = ControllerState::default();
        let good = reconcile(&catalog(&[("g.yaml", GROUP), ("v.yaml", VOLUME)]), &mut state, 0, &mut rng());
        let broken = GROUP.replace("198.18.1.2]", "not-an-ip]");
        let out = reconcile(&catalog(&[("g.yaml", broken.as_str()), ("v.yaml", VOLUME)]), &mut state, 1, &mut rng());
        assert!(out.changed.is_empty(), "nothing may change on the nodes");
        assert_eq!(out.bundles, good.bundles);
        let plan = out.groups.get(&key()).unwrap_or_else(|| panic!("group kept"));
        let error = plan.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            error,
            "g.yaml (document 1), HaGroup ns/g: spec.nodes[1].heartbeatAddresses[0]: \"not-an-ip\" is not an IP address"
        );
        assert!(plan.config.is_some() && !plan.deleting);
        // A YAML syntax error names no object but must not delete the group either.
        let out = reconcile(&catalog(&[("g.yaml", "nodes: [unclosed"), ("v.yaml", VOLUME)]), &mut state, 2, &mut rng());
        assert!(out.changed.is_empty());
        assert!(out.groups.get(&key()).is_some_and(|p| p.error.is_some() && !p.deleting));
        // A volume turned invalid refuses the group through its reference; still no change.
        let bad_volume = VOLUME.replace("1Gi", "1001");
        let out = reconcile(&catalog(&[("g.yaml", GROUP), ("v.yaml", bad_volume.as_str())]), &mut state, 3, &mut rng());
        assert!(out.changed.is_empty());
        assert!(out.groups.get(&key()).is_some_and(|p| p.error.is_some()));
    }

    #[test]
    fn a_size_edit_is_refused_naming_the_volume_and_its_field_and_nothing_changes() {
        let mut state = ControllerState::default();
        let good = reconcile(&catalog(&[("g.yaml", GROUP), ("v.yaml", VOLUME)]), &mut state, 0, &mut rng());
        for (size, words) in [("512Mi", "is smaller than the volume's 1Gi"), ("2Gi", "cannot grow yet")] {
            let resized = VOLUME.replace("1Gi", size);
            let out =
                reconcile(&catalog(&[("g.yaml", GROUP), ("v.yaml", resized.as_str())]), &mut state, 1, &mut rng());
            assert!(out.changed.is_empty(), "{size}: nothing may change on the nodes");
            assert_eq!(out.bundles, good.bundles);
            let plan = out.groups.get(&key()).unwrap_or_else(|| panic!("group kept"));
            let error = plan.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                error.starts_with("v.yaml (document 1), HaGroup ns/g: ReplicatedVolume ns/data: spec.size: "),
                "{error}"
            );
            assert!(error.contains(words), "{error}");
            assert!(plan.config.is_some() && !plan.deleting);
            // Still refused on the next pass: the refused size was not remembered as accepted.
            let again =
                reconcile(&catalog(&[("g.yaml", GROUP), ("v.yaml", resized.as_str())]), &mut state, 2, &mut rng());
            assert!(again.changed.is_empty() && again.groups.get(&key()).is_some_and(|p| p.error.is_some()));
        }
        // The same size in bytes is no change at all.
        let same = VOLUME.replace("1Gi", "1073741824");
        let out = reconcile(&catalog(&[("g.yaml", GROUP), ("v.yaml", same.as_str())]), &mut state, 3, &mut rng());
        assert!(out.groups.get(&key()).is_some_and(|p| p.error.is_none()), "{:?}", out.errors);
    }

    #[test]
    fn a_group_never_valid_runs_nothing_but_is_reported() {
        let mut state = ControllerState::default();
        let broken = GROUP.replace("198.18.1.2]", "not-an-ip]");
        let out = reconcile(&catalog(&[("g.yaml", broken.as_str()), ("v.yaml", VOLUME)]), &mut state, 0, &mut rng());
        assert!(out.bundles.is_empty());
        let plan = out.groups.get(&key()).unwrap_or_else(|| panic!("reported"));
        assert!(plan.config.is_none() && plan.error.is_some());
    }

    #[test]
    fn heartbeat_keys_come_from_secret_data_or_string_data() {
        let with_ref =
            GROUP.replace("  virtualIPs:", "  heartbeat:\n    keySecretRef: {name: hb, key: k}\n  virtualIPs:");
        let data =
            "apiVersion: v1\nkind: Secret\nmetadata: {name: hb, namespace: ns}\ndata:\n  k: MDEyMzQ1Njc4OWFiY2RlZg==\n";
        let string_data =
            "apiVersion: v1\nkind: Secret\nmetadata: {name: hb, namespace: ns}\nstringData:\n  k: 0123456789abcdef\n";
        for secret in [data, string_data] {
            let mut state = ControllerState::default();
            let sources = [("g.yaml", with_ref.as_str()), ("v.yaml", VOLUME), ("s.yaml", secret)];
            let out = reconcile(&catalog(&sources), &mut state, 0, &mut rng());
            assert!(out.errors.is_empty(), "{:?}", out.errors);
            let key = &bundle(&out, "a").groups[0].heartbeat_key;
            let expected = base64::engine::general_purpose::STANDARD.encode("0123456789abcdef");
            assert_eq!(key, &HeartbeatKey::Inline(expected));
            assert!(state.generated_keys.is_empty());
        }
        let mut state = ControllerState::default();
        let short = string_data.replace("0123456789abcdef", "short");
        let out = reconcile(
            &catalog(&[("g.yaml", with_ref.as_str()), ("v.yaml", VOLUME), ("s.yaml", short.as_str())]),
            &mut state,
            0,
            &mut rng(),
        );
        let error = out.errors.first().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.contains("HaGroup ns/g: spec.heartbeat.keySecretRef.key: key \"k\" of Secret ns/hb is 5 bytes"),
            "{error}"
        );
        let out = reconcile(&catalog(&[("g.yaml", with_ref.as_str()), ("v.yaml", VOLUME)]), &mut state, 0, &mut rng());
        let error = out.errors.first().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.ends_with("spec.heartbeat.keySecretRef.name: no Secret named \"hb\" in namespace \"ns\""),
            "{error}"
        );
        assert!(out.bundles.is_empty());
    }

    #[test]
    fn a_removed_group_is_delivered_as_deleting_until_both_nodes_cleaned_up() {
        let mut state = ControllerState::default();
        reconcile(&catalog(&[("g.yaml", GROUP), ("v.yaml", VOLUME), ("o.yaml", OTHER)]), &mut state, 0, &mut rng());
        let out = reconcile(&catalog(&[("o.yaml", OTHER)]), &mut state, 1, &mut rng());
        assert_eq!(out.deletion_started, [key()]);
        let a = bundle(&out, "a");
        assert_eq!((a.revision, a.groups.len(), a.groups[0].deleting), (2, 1, true));
        assert!(note_cleaned_up(&mut state, &key(), "a"));
        assert!(!note_cleaned_up(&mut state, &key(), "c"), "c is not a member");
        let out = reconcile(&catalog(&[("o.yaml", OTHER)]), &mut state, 2, &mut rng());
        assert!(out.changed.is_empty() && out.deletion_finished.is_empty());
        assert!(note_cleaned_up(&mut state, &key(), "b"));
        let out = reconcile(&catalog(&[("o.yaml", OTHER)]), &mut state, 3, &mut rng());
        assert_eq!(out.deletion_finished, [key()]);
        // a keeps an (empty) bundle so its agent learns it has nothing left to run.
        let a = bundle(&out, "a");
        assert_eq!((a.revision, a.groups.len()), (3, 0));
        assert!(!out.groups.contains_key(&key()));
        // The volume's identity outlives the group, for retained data.
        assert!(state.volume_uuids.contains_key(&GroupKey::new("ns", "data")));
    }

    #[test]
    fn a_wiped_volume_goes_out_to_its_nodes_only_after_its_group_cleaned_up_and_until_they_answer() {
        let wipe_volume = VOLUME.replace("  size: 1Gi\n", "  size: 1Gi\n  deletionPolicy: Wipe\n");
        let mut state = ControllerState::default();
        reconcile(
            &catalog(&[("g.yaml", GROUP), ("v.yaml", &wipe_volume), ("o.yaml", OTHER)]),
            &mut state,
            0,
            &mut rng(),
        );
        let data = GroupKey::new("ns", "data");
        let uuid = state.volume_uuids.get(&data).cloned().unwrap_or_default();

        // Group and volume deleted together: the group cleans up first, the volume waits.
        let out = reconcile(&catalog(&[("o.yaml", OTHER)]), &mut state, 1, &mut rng());
        assert_eq!(out.deletion_started, [key()]);
        assert!(out.volumes.wipe_started.is_empty() && bundle(&out, "a").wipes.is_empty());
        assert!(note_cleaned_up(&mut state, &key(), "a") && note_cleaned_up(&mut state, &key(), "b"));
        let out = reconcile(&catalog(&[("o.yaml", OTHER)]), &mut state, 2, &mut rng());
        assert_eq!(
            (out.deletion_finished.as_slice(), out.volumes.wipe_started.as_slice()),
            ([key()].as_slice(), [data.clone()].as_slice())
        );
        for node in ["a", "b"] {
            let wipes = &bundle(&out, node).wipes;
            assert_eq!(wipes.len(), 1, "{node}");
            assert_eq!((&wipes[0].volume, &wipes[0].uuid), (&data, &uuid));
        }
        assert!(bundle(&out, "c").wipes.is_empty(), "c holds no replica");

        // a answers: its bundle drops the wipe (a new revision), b's keeps it.
        let answer = hapair_crds::nodeapi::WipeReport {
            volume: data.clone(),
            uuid: uuid.clone(),
            outcome: hapair_crds::nodeapi::WipeOutcome::Wiped,
            message: "done".into(),
        };
        assert!(crate::desired::retire::note_wipe_answer(&mut state, "a", &answer));
        let out = reconcile(&catalog(&[("o.yaml", OTHER)]), &mut state, 3, &mut rng());
        assert_eq!(out.changed, ["a".to_string()].into());
        assert!(bundle(&out, "a").wipes.is_empty() && bundle(&out, "b").wipes.len() == 1);
        assert!(crate::desired::retire::note_wipe_answer(&mut state, "b", &answer));
        let out = reconcile(&catalog(&[("o.yaml", OTHER)]), &mut state, 4, &mut rng());
        assert_eq!(out.volumes.wipe_finished.len(), 1);
        assert!(bundle(&out, "b").wipes.is_empty() && !state.volume_uuids.contains_key(&data));
    }

    /// The typos a user makes in a manifest that held a running group, each of which once
    /// read as "the group is gone".
    type Typo = (&'static str, fn(&str) -> String);

    fn typos() -> [Typo; 5] {
        [
            ("kind", |doc| {
                doc.replacen("kind: HaGroup", "kind: HAGroup", 1).replacen(
                    "kind: ReplicatedVolume",
                    "kind: ReplicatedVol",
                    1,
                )
            }),
            ("apiVersion", |doc| doc.replacen("hapair.dev/v1alpha1", "hapair.dev/v1alpha", 1)),
            ("metadata key", |doc| doc.replacen("metadata:", "metdata:", 1)),
            ("namespace key", |doc| doc.replacen("namespace: ns", "namepsace: ns", 1)),
            ("YAML error", |doc| doc.replacen("spec:\n", "spec:\n  nodes: [unclosed\n", 1)),
        ]
    }

    #[test]
    fn a_typo_in_a_running_groups_file_neither_deletes_nor_wipes_also_after_a_restart() {
        let wipe_volume = VOLUME.replace("  size: 1Gi\n", "  size: 1Gi\n  deletionPolicy: Wipe\n");
        for (class, typo) in typos() {
            for (culprit, group_doc, volume_doc) in
                [("group", typo(GROUP), wipe_volume.clone()), ("volume", GROUP.to_string(), typo(&wipe_volume))]
            {
                let label = format!("{class} typo in the {culprit}");
                let good = format!("{GROUP}---{wipe_volume}");
                let broken = format!("{group_doc}---{volume_doc}");
                let mut state = ControllerState::default();
                let first = reconcile(&catalog(&[("pair.yaml", &good), ("o.yaml", OTHER)]), &mut state, 0, &mut rng());
                assert!(first.errors.is_empty(), "{label}: {:?}", first.errors);
                for now in 1..4 {
                    // The nodes would confirm a cleanup at once if one were asked of them.
                    for node in ["a", "b"] {
                        note_cleaned_up(&mut state, &key(), node);
                    }
                    let out =
                        reconcile(&catalog(&[("pair.yaml", &broken), ("o.yaml", OTHER)]), &mut state, now, &mut rng());
                    assert!(!out.errors.is_empty(), "{label}: the typo must be reported");
                    assert!(out.changed.is_empty(), "{label}: nothing may change on the nodes");
                    assert_eq!(out.bundles, first.bundles, "{label}");
                    assert!(out.deletion_started.is_empty() && out.volumes == Retirement::default(), "{label}");
                    let plan = out.groups.get(&key()).unwrap_or_else(|| panic!("{label}: group dropped"));
                    assert!(plan.config.is_some() && !plan.deleting && plan.error.is_some(), "{label}: {plan:?}");
                }
                // A restart: the state goes through JSON, the catalog is read afresh.
                let json = serde_json::to_string(&state).unwrap_or_else(|e| panic!("{e}"));
                let mut restored: ControllerState = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
                let out =
                    reconcile(&catalog(&[("pair.yaml", &broken), ("o.yaml", OTHER)]), &mut restored, 9, &mut rng());
                assert_eq!(out.bundles, first.bundles, "{label}, after a restart");
                assert!(restored.deleting.is_empty() && restored.wiping.is_empty(), "{label}, after a restart");
                // The fix goes in: still the same group, nothing moved.
                let out =
                    reconcile(&catalog(&[("pair.yaml", &good), ("o.yaml", OTHER)]), &mut restored, 10, &mut rng());
                assert!(out.changed.is_empty() && out.errors.is_empty(), "{label}: {:?}", out.errors);
            }
        }
    }

    #[test]
    fn a_group_is_deleted_once_its_file_parses_and_no_longer_names_it() {
        let mut state = ControllerState::default();
        let both = format!("{GROUP}---{VOLUME}");
        reconcile(&catalog(&[("pair.yaml", &both), ("o.yaml", OTHER)]), &mut state, 0, &mut rng());
        // Renamed in the same file: a different object, so the old one goes.
        let renamed = both.replace("name: g,", "name: h,").replace("group: g", "group: h");
        let out = reconcile(&catalog(&[("pair.yaml", &renamed), ("o.yaml", OTHER)]), &mut state, 1, &mut rng());
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.deletion_started, [key()]);
        // A typo in another file holds only that file's groups.
        let mut state = ControllerState::default();
        reconcile(&catalog(&[("pair.yaml", &both), ("o.yaml", OTHER)]), &mut state, 0, &mut rng());
        let other_typo = OTHER.replace("kind: HaGroup", "kind: HAGroup");
        let out = reconcile(&catalog(&[("o.yaml", &other_typo)]), &mut state, 1, &mut rng());
        assert_eq!(out.deletion_started, [key()]);
        assert!(out.groups.get(&GroupKey::new("ns", "other")).is_some_and(|p| !p.deleting && p.error.is_some()));
    }

    #[test]
    fn pending_actions_ride_in_the_bundles_of_the_groups_nodes() {
        let mut state = ControllerState::default();
        let sources = [("g.yaml", GROUP), ("v.yaml", VOLUME), ("o.yaml", OTHER)];
        reconcile(&catalog(&sources), &mut state, 0, &mut rng());
        state.actions.insert("s1".into(), queue(&key(), "s1", AdminActionKind::Switchover { to: "b".into() }, 0));
        let out = reconcile(&catalog(&sources), &mut state, 1, &mut rng());
        assert_eq!(out.changed, ["a".to_string(), "b".to_string()].into());
        let on_b = bundle(&out, "b").groups.iter().find(|g| g.key == key()).map(|g| g.actions.clone());
        assert_eq!(on_b.map(|a| a.len()), Some(1));
        let other_on_b = bundle(&out, "b").groups.iter().find(|g| g.key.name == "other").map(|g| g.actions.len());
        assert_eq!(other_on_b, Some(0));
    }

    #[test]
    fn the_examples_build() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let catalog = Catalog::load_dir(&dir, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut state = ControllerState::default();
        let out = reconcile(&catalog, &mut state, 0, &mut rng());
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.bundles.keys().collect::<Vec<_>>(), ["db1", "db2", "web1", "web2"]);
        let web = &bundle(&out, "web1").groups[0];
        assert_eq!(web.spec.flow.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["vip-www"]);
        let pg = &bundle(&out, "db2").groups[0];
        assert_eq!(pg.key, GroupKey::new("databases", "pg"));
        // Every VIP of the PostgreSQL pair is already referenced by a step.
        assert_eq!(pg.spec.flow.len(), 3);
        assert_eq!(pg.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["pg-data"]);
        let expected = base64::engine::general_purpose::STANDARD.encode("3q2+7wVg0r8dYk6m1u9QWx4ZJpL5sT2aNcRfHbEiKoM=");
        assert_eq!(pg.heartbeat_key, HeartbeatKey::Inline(expected));
        assert_eq!(state.generated_keys.keys().map(|k| k.to_string()).collect::<Vec<_>>(), ["default/web"]);
    }
}
