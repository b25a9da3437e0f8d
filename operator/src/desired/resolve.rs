//! Dereferencing a snapshot of the desired objects: for each HaGroup, the volumes it uses
//! and its heartbeat key, or the reason it cannot run, falling back to the last good
//! configuration when an edit broke it.
//!
//! This is where "an invalid manifest never tears down a running group" is decided: a group
//! that has a recorded error keeps its last good [`GroupSource`]; a group that is simply
//! gone from the snapshot is removed.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hapair_crds::HaGroup;
use hapair_crds::manifest::ManifestError;
use hapair_crds::nodeapi::GroupKey;
use hapair_crds::quantity::parse_bytes;
use hapair_crds::volume::ReplicatedVolumeSpec;
use rand::RngCore;

use crate::desired::catalog::{Catalog, Origin, refusal_in_file};
use crate::desired::state::{ControllerState, GroupSource};

/// Shortest heartbeat key accepted from a Secret. HMAC-SHA256 takes any length, but a short
/// key can be guessed offline from one captured heartbeat.
pub const MIN_KEY_BYTES: usize = 16;

/// Length of generated heartbeat keys.
pub const GENERATED_KEY_BYTES: usize = 32;

/// A group that gets a config.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveGroup {
    pub source: GroupSource,
    /// Set when the current manifest is refused and `source` is the last good config.
    pub error: Option<ManifestError>,
}

/// The outcome of dereferencing one snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    pub live: BTreeMap<GroupKey, LiveGroup>,
    /// Groups refused that never had a valid config: nothing runs for them.
    pub refused: BTreeMap<GroupKey, ManifestError>,
    /// Groups that had a config and are no longer in the desired state.
    pub removed: Vec<GroupKey>,
    /// Every refused document or object, including heartbeat-key problems found here.
    pub errors: Vec<ManifestError>,
}

/// Resolves every group of `catalog`. Valid groups become the new last good config in
/// `state`; generated keys are created (from `rng`) the first time a group needs one.
pub fn resolve(catalog: &Catalog, state: &mut ControllerState, rng: &mut dyn RngCore) -> Resolution {
    let mut resolution = Resolution { errors: catalog.errors.clone(), ..Resolution::default() };
    for (key, (group, origin)) in &catalog.groups {
        match source_for(catalog, state, key, group, origin, rng) {
            Ok(source) => {
                state.last_good.insert(key.clone(), source.clone());
                resolution.live.insert(key.clone(), LiveGroup { source, error: None });
            }
            Err(error) => resolution.errors.push(error),
        }
    }
    for error in &resolution.errors {
        let Some(key) = group_named_by(error) else { continue };
        if resolution.live.contains_key(&key) {
            continue;
        }
        match state.last_good.get(&key) {
            Some(source) => {
                resolution.live.insert(key, LiveGroup { source: source.clone(), error: Some(error.clone()) });
            }
            None => {
                resolution.refused.entry(key).or_insert_with(|| error.clone());
            }
        }
    }
    // A refused document may be the group itself under a misspelt kind, apiVersion or
    // metadata key, or hide it behind a YAML error: whatever it names, every group last
    // seen in its file keeps running. Only a file that is gone, or whose documents all
    // parse without naming the group, deletes it.
    for (key, source) in &state.last_good {
        if resolution.live.contains_key(key) {
            continue;
        }
        match refusal_in_file(&resolution.errors, &source.origin.file) {
            Some(error) => {
                resolution.live.insert(key.clone(), LiveGroup { source: source.clone(), error: Some(error.clone()) });
            }
            None => resolution.removed.push(key.clone()),
        }
    }
    resolution
}

/// The group a manifest error is about, when it names one.
pub fn group_named_by(error: &ManifestError) -> Option<GroupKey> {
    error.object.as_deref()?.strip_prefix("HaGroup ")?.parse().ok()
}

fn source_for(
    catalog: &Catalog,
    state: &mut ControllerState,
    key: &GroupKey,
    group: &HaGroup,
    origin: &Origin,
    rng: &mut dyn RngCore,
) -> Result<GroupSource, ManifestError> {
    let error = |field: &str, message: String| ManifestError {
        file: origin.file.clone(),
        index: origin.index,
        object: Some(format!("HaGroup {key}")),
        field: Some(field.to_string()),
        message,
    };
    let mut volumes = Vec::new();
    for name in referenced_volumes(group) {
        let volume_key = GroupKey::new(&key.namespace, &name);
        // The catalog refuses groups whose references do not resolve, so this only fails
        // when the catalog was built some other way.
        let Some((volume, volume_origin)) = catalog.volumes.get(&volume_key) else {
            return Err(error("spec.flow", format!("no ReplicatedVolume named {name:?} in the group's namespace")));
        };
        // Both replicas hold data of the size they were made with: a new size would keep
        // them from opening at the next start, so the edit is refused before it gets there.
        if let Some(message) = state.volume_specs.get(&volume_key).and_then(|k| resize_refusal(&k.spec, &volume.spec)) {
            return Err(ManifestError {
                file: volume_origin.file.clone(),
                index: volume_origin.index,
                object: Some(format!("HaGroup {key}")),
                field: Some(format!("ReplicatedVolume {volume_key}: spec.size")),
                message,
            });
        }
        // The group runs on the spec; a deletion mark is the volume's business (see
        // `retire`) and would only make the recorded source differ for nothing.
        let mut volume = volume.clone();
        volume.metadata.deletion_timestamp = None;
        volumes.push(volume);
    }
    let heartbeat_key = match &group.spec.heartbeat.key_secret_ref {
        Some(reference) => {
            let secret_key = GroupKey::new(&key.namespace, &reference.name);
            if let Some(why) = catalog.unreadable_secrets.get(&secret_key) {
                return Err(error(
                    "spec.heartbeat.keySecretRef.name",
                    format!("cannot read Secret {secret_key}: {why}"),
                ));
            }
            let Some(secret) = catalog.secrets.get(&secret_key) else {
                return Err(error(
                    "spec.heartbeat.keySecretRef.name",
                    format!("no Secret named {:?} in namespace {:?}", reference.name, key.namespace),
                ));
            };
            let from_data = secret.data.as_ref().and_then(|d| d.get(&reference.key)).map(|b| b.0.clone());
            let from_string =
                secret.string_data.as_ref().and_then(|d| d.get(&reference.key)).map(|s| s.as_bytes().to_vec());
            // The API server merges stringData over data; do the same.
            let Some(bytes) = from_string.or(from_data) else {
                return Err(error(
                    "spec.heartbeat.keySecretRef.key",
                    format!("Secret {secret_key} has no key {:?}", reference.key),
                ));
            };
            if bytes.len() < MIN_KEY_BYTES {
                return Err(error(
                    "spec.heartbeat.keySecretRef.key",
                    format!(
                        "key {:?} of Secret {secret_key} is {} bytes; at least {MIN_KEY_BYTES} are needed",
                        reference.key,
                        bytes.len()
                    ),
                ));
            }
            BASE64.encode(bytes)
        }
        None => state
            .generated_keys
            .entry(key.clone())
            .or_insert_with(|| {
                let mut bytes = [0u8; GENERATED_KEY_BYTES];
                rng.fill_bytes(&mut bytes);
                BASE64.encode(bytes)
            })
            .clone(),
    };
    Ok(GroupSource { group: group.clone(), volumes, heartbeat_key, origin: origin.clone() })
}

/// Why a volume's new spec cannot replace its accepted one, when its size changed: a
/// shrink would cut off data, and growing is not supported yet. The same size written
/// another way (`1Gi`, `1073741824`) is no change.
pub fn resize_refusal(known: &ReplicatedVolumeSpec, new: &ReplicatedVolumeSpec) -> Option<String> {
    let (Ok(before), Ok(after)) = (parse_bytes(&known.size), parse_bytes(&new.size)) else { return None };
    let (old, wanted) = (&known.size.0, &new.size.0);
    match after.cmp(&before) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(format!(
            "{wanted} ({after} bytes) is smaller than the volume's {old} ({before} bytes): shrinking would cut off \
             data, so the edit is refused and the volume keeps its size"
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "{wanted} ({after} bytes) is larger than the volume's {old} ({before} bytes): a replicated volume cannot \
             grow yet, so the edit is refused and the volume keeps its size"
        )),
    }
}

/// Names of the ReplicatedVolumes a group's flow and monitors use, sorted, without repeats.
pub fn referenced_volumes(group: &HaGroup) -> Vec<String> {
    let mut names: Vec<String> = group
        .spec
        .flow
        .iter()
        .filter_map(|s| s.volume.as_ref().map(|v| v.volume_ref.clone()))
        .chain(group.spec.monitors.iter().filter_map(|m| m.replication.as_ref().map(|r| r.volume_ref.clone())))
        .collect();
    names.sort();
    names.dedup();
    names
}
