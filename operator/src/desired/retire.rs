//! What deleting a ReplicatedVolume does to its replicas, decided from a snapshot and the
//! controller's memory: `Retain` leaves the data where it is; `Wipe` has each backing node
//! erase its replica (see `hapair-agent`'s `replication::wipe`) and waits for every node's
//! final answer.
//!
//! A volume counts as deleted when it is gone from the snapshot (or, on Kubernetes, marked
//! for deletion) and no group runs, cleans up or names it. Two things are not deletions: a
//! volume whose edit is refused (an error names it) and a volume last seen in a file that
//! cannot be parsed at all; both keep their data, as a group does in the same situation.
//!
//! Pure: the reconcile core calls it with time passed in.

use std::collections::BTreeSet;

use hapair_crds::nodeapi::{GroupKey, WipeReport};
use hapair_crds::volume::DeletionPolicy;

use crate::desired::catalog::{Catalog, refusal_in_file, refused_object};
use crate::desired::resolve::{referenced_volumes, resize_refusal};
use crate::desired::state::{ControllerState, KnownVolume, Wiping};
use crate::support::timestamp::UnixMillis;

/// What one reconcile decided about deleted volumes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Retirement {
    /// Deleted with `Wipe`: their nodes were asked to erase them.
    pub wipe_started: Vec<GroupKey>,
    /// Every backing node answered; the volume is gone, with the answers.
    pub wipe_finished: Vec<(GroupKey, Wiping)>,
    /// Re-created before every node had answered: the nodes that had not wiped yet keep
    /// their data.
    pub wipe_cancelled: Vec<GroupKey>,
    /// Deleted with `Retain`: nothing happens on the nodes.
    pub retained: Vec<GroupKey>,
}

/// Updates what the controller remembers of volumes and starts or finishes their deletion.
/// Runs after the groups were resolved, so that `state.last_good` and `state.deleting`
/// say which volumes are still in use.
pub fn retire_volumes(catalog: &Catalog, state: &mut ControllerState, now: UnixMillis) -> Retirement {
    let mut out = Retirement::default();
    let in_use = volumes_in_use(catalog, state);
    for (key, (volume, origin)) in &catalog.volumes {
        if volume.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if state.wiping.remove(key).is_some() {
            out.wipe_cancelled.push(key.clone());
        }
        // A resized spec is refused (see `resolve`): the size on the disks stays what is known.
        let resized = state.volume_specs.get(key).is_some_and(|k| resize_refusal(&k.spec, &volume.spec).is_some());
        if state.volume_uuids.contains_key(key) && !resized {
            state.volume_specs.insert(key.clone(), KnownVolume { spec: volume.spec.clone(), origin: origin.clone() });
        }
    }
    let known: Vec<GroupKey> = state.volume_specs.keys().cloned().collect();
    for key in known {
        let listed = catalog.volumes.get(&key);
        if listed.is_some_and(|(v, _)| v.metadata.deletion_timestamp.is_none()) || in_use.contains(&key) {
            continue;
        }
        if listed.is_none() && !really_gone(catalog, state, &key) {
            continue;
        }
        let Some(volume) = state.volume_specs.remove(&key) else { continue };
        match volume.spec.deletion_policy {
            DeletionPolicy::Retain => out.retained.push(key),
            DeletionPolicy::Wipe => {
                let Some(uuid) = state.volume_uuids.get(&key).cloned() else { continue };
                state
                    .wiping
                    .insert(key.clone(), Wiping { uuid, spec: volume.spec, answers: Default::default(), since: now });
                out.wipe_started.push(key);
            }
        }
    }
    let finished: Vec<GroupKey> =
        state.wiping.iter().filter(|(_, w)| w.pending().is_empty()).map(|(k, _)| k.clone()).collect();
    for key in finished {
        if let Some(wiping) = state.wiping.remove(&key) {
            // The data is gone: a volume created again under this name is a new one.
            state.volume_uuids.remove(&key);
            out.wipe_finished.push((key, wiping));
        }
    }
    out
}

/// Records a node's final answer to a wipe. Returns whether it was news (the wipe is
/// current, the node one of its backing nodes, and it had not answered yet).
pub fn note_wipe_answer(state: &mut ControllerState, node: &str, answer: &WipeReport) -> bool {
    if !answer.outcome.is_final() {
        return false;
    }
    match state.wiping.get_mut(&answer.volume) {
        Some(wiping)
            if wiping.uuid == answer.uuid
                && wiping.spec.backing.iter().any(|b| b.node == node)
                && !wiping.answers.contains_key(node) =>
        {
            wiping.answers.insert(node.to_string(), answer.clone());
            true
        }
        _ => false,
    }
}

/// Volumes a group runs, cleans up or names (valid or not).
fn volumes_in_use(catalog: &Catalog, state: &ControllerState) -> BTreeSet<GroupKey> {
    let sources = state.last_good.iter().chain(state.deleting.iter().map(|(k, d)| (k, &d.source)));
    let delivered = sources.flat_map(|(group, source)| {
        source.volumes.iter().filter_map(|v| v.metadata.name.as_ref().map(|n| GroupKey::new(&group.namespace, n)))
    });
    let named = catalog.groups.iter().flat_map(|(group, (g, _))| {
        referenced_volumes(g).into_iter().map(|name| GroupKey::new(&group.namespace, &name))
    });
    delivered.chain(named).collect()
}

/// A volume missing from the snapshot is deleted unless its manifest was refused (an error
/// names it) or any document of the file it was last read from is refused: a misspelt kind
/// or metadata key must not erase a replica.
fn really_gone(catalog: &Catalog, state: &ControllerState, key: &GroupKey) -> bool {
    let named = catalog.errors.iter().any(|e| refused_object(e, "ReplicatedVolume").as_ref() == Some(key));
    let held = state.volume_specs.get(key).is_some_and(|v| refusal_in_file(&catalog.errors, &v.origin.file).is_some());
    !named && !held
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::ReplicatedVolume;
    use hapair_crds::manifest::ManifestError;
    use hapair_crds::nodeapi::WipeOutcome;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use crate::desired::catalog::Origin;

    const UUID: &str = "9a7e3c1d-0b2f-4e5a-8c6d-7f8e9a0b1c2d";

    fn volume(name: &str, policy: &str) -> ReplicatedVolume {
        serde_yaml::from_str(&format!(
            "apiVersion: hapair.dev/v1alpha1\nkind: ReplicatedVolume\nmetadata: {{name: {name}, namespace: db}}\nspec:\n  group: pg\n  size: 1Gi\n  deletionPolicy: {policy}\n  backing:\n    - {{node: a, path: /srv/a.img}}\n    - {{node: b, path: /srv/b.img}}\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn catalog(volumes: Vec<ReplicatedVolume>) -> Catalog {
        let mut catalog = Catalog::default();
        for v in volumes {
            let key = GroupKey::new("db", v.metadata.name.as_deref().unwrap_or_default());
            catalog.volumes.insert(key, (v, Origin { file: "volumes.yaml".into(), index: 0 }));
        }
        catalog
    }

    fn key(name: &str) -> GroupKey {
        GroupKey::new("db", name)
    }

    /// A state in which `data` was delivered to nodes (it has a UUID) and was last seen
    /// with `policy`.
    fn delivered(policy: &str) -> ControllerState {
        let mut state = ControllerState::default();
        state.volume_uuids.insert(key("data"), UUID.into());
        retire_volumes(&catalog(vec![volume("data", policy)]), &mut state, 1);
        assert!(state.volume_specs.contains_key(&key("data")));
        state
    }

    fn answer(outcome: WipeOutcome) -> WipeReport {
        WipeReport { volume: key("data"), uuid: UUID.into(), outcome, message: "m".into() }
    }

    #[test]
    fn a_retained_volume_leaves_nothing_to_do_and_keeps_its_uuid() {
        let mut state = delivered("Retain");
        let out = retire_volumes(&catalog(vec![]), &mut state, 2);
        assert_eq!(out, Retirement { retained: vec![key("data")], ..Retirement::default() });
        assert!(state.wiping.is_empty() && state.volume_specs.is_empty());
        assert_eq!(state.volume_uuids.get(&key("data")).map(String::as_str), Some(UUID));
    }

    #[test]
    fn a_wiped_volume_waits_for_a_final_answer_from_every_backing_node() {
        let mut state = delivered("Wipe");
        let out = retire_volumes(&catalog(vec![]), &mut state, 2);
        assert_eq!(out.wipe_started, [key("data")]);
        assert_eq!(state.wiping[&key("data")].pending(), ["a", "b"]);

        // Waiting and failures are not answers; a stale uuid or a stranger is ignored.
        assert!(!note_wipe_answer(&mut state, "a", &answer(WipeOutcome::Waiting)));
        assert!(!note_wipe_answer(&mut state, "a", &answer(WipeOutcome::Failed)));
        let stale = WipeReport { uuid: "other".into(), ..answer(WipeOutcome::Wiped) };
        assert!(!note_wipe_answer(&mut state, "a", &stale));
        assert!(!note_wipe_answer(&mut state, "c", &answer(WipeOutcome::Wiped)));
        assert!(note_wipe_answer(&mut state, "a", &answer(WipeOutcome::Wiped)));
        assert!(!note_wipe_answer(&mut state, "a", &answer(WipeOutcome::Wiped)), "news only once");
        assert_eq!(retire_volumes(&catalog(vec![]), &mut state, 3), Retirement::default());
        assert_eq!(state.wiping[&key("data")].pending(), ["b"]);

        assert!(note_wipe_answer(&mut state, "b", &answer(WipeOutcome::NothingToWipe)));
        let out = retire_volumes(&catalog(vec![]), &mut state, 4);
        assert_eq!(out.wipe_finished.len(), 1);
        let (finished, wiping) = &out.wipe_finished[0];
        assert_eq!((finished, wiping.answers.len()), (&key("data"), 2));
        assert!(state.wiping.is_empty());
        assert!(!state.volume_uuids.contains_key(&key("data")), "a re-created volume must get a new identity");
    }

    #[test]
    fn a_volume_marked_for_deletion_is_wiped_while_still_listed() {
        let mut state = delivered("Wipe");
        let mut marked = volume("data", "Wipe");
        marked.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let out = retire_volumes(&catalog(vec![marked]), &mut state, 2);
        assert_eq!(out.wipe_started, [key("data")]);
    }

    #[test]
    fn a_volume_in_use_a_refused_edit_and_an_unreadable_file_are_not_deletions() {
        // Named by a group in the snapshot.
        let mut state = delivered("Wipe");
        let mut with_group = catalog(vec![]);
        let group: hapair_crds::HaGroup = serde_yaml::from_str(
            "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {name: pg, namespace: db}\nspec:\n  nodes: [{name: a, heartbeatAddresses: [198.18.1.1]}, {name: b, heartbeatAddresses: [198.18.1.2]}]\n  flow: [{name: data, volume: {volumeRef: data}}]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        with_group.groups.insert(GroupKey::new("db", "pg"), (group, Origin { file: "pg.yaml".into(), index: 0 }));
        assert_eq!(retire_volumes(&with_group, &mut state, 2), Retirement::default());
        assert!(state.wiping.is_empty());

        let error = |object: Option<&str>, file: &str| ManifestError {
            file: file.into(),
            index: 0,
            object: object.map(str::to_string),
            field: None,
            message: "bad".into(),
        };
        let mut refused = catalog(vec![]);
        refused.errors.push(error(Some("ReplicatedVolume db/data"), "volumes.yaml"));
        assert_eq!(retire_volumes(&refused, &mut state, 3), Retirement::default());
        let mut unreadable = catalog(vec![]);
        unreadable.errors.push(error(None, "volumes.yaml"));
        assert_eq!(retire_volumes(&unreadable, &mut state, 4), Retirement::default());
        // An unreadable *other* file says nothing about this volume.
        let mut elsewhere = catalog(vec![]);
        elsewhere.errors.push(error(None, "other.yaml"));
        assert_eq!(retire_volumes(&elsewhere, &mut state, 5).wipe_started, [key("data")]);
    }

    #[test]
    fn re_creating_a_volume_cancels_its_wipe_and_a_never_delivered_one_has_nothing_to_wipe() {
        let mut state = delivered("Wipe");
        retire_volumes(&catalog(vec![]), &mut state, 2);
        assert!(note_wipe_answer(&mut state, "a", &answer(WipeOutcome::Wiped)));
        let out = retire_volumes(&catalog(vec![volume("data", "Wipe")]), &mut state, 3);
        assert_eq!(out.wipe_cancelled, [key("data")]);
        assert!(state.wiping.is_empty() && state.volume_specs.contains_key(&key("data")));

        // No UUID: never delivered, so no node holds anything of it.
        let mut fresh = ControllerState::default();
        retire_volumes(&catalog(vec![volume("new", "Wipe")]), &mut fresh, 1);
        assert!(fresh.volume_specs.is_empty());
        assert_eq!(retire_volumes(&catalog(vec![]), &mut fresh, 2), Retirement::default());
    }
}
