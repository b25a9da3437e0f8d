//! The controller's durable memory ([`ControllerState`]) in Kubernetes: Secrets in the
//! operator's namespace, never the pod's filesystem (read-only, and there are two replicas).
//!
//! The state holds generated heartbeat keys, so it is a Secret. With a thousand groups it
//! is several megabytes (each group's last good config is kept), far over a Secret's 1 MiB,
//! so it is split into [`STATE_SHARDS`] Secrets `<prefix>-0` … by a stable hash of the
//! group (or node) each entry belongs to. A change to one group rewrites one shard. Every
//! write is compare-and-swap on the shard's `resourceVersion`; only the leader writes, and
//! after a takeover it overwrites whatever a fenced-off predecessor may still have written.

use std::sync::{Arc, Mutex, MutexGuard};

use hapair_crds::nodeapi::GroupKey;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use sha2::{Digest, Sha256};

use crate::controller::metrics::Metrics;
use crate::controller::store::StoreError;
use crate::desired::state::ControllerState;

/// Number of state Secrets. Fixed: every entry's shard is a function of its key and this.
pub const STATE_SHARDS: usize = 16;

/// Data key of the state JSON in each shard.
pub const STATE_KEY: &str = "state.json";

/// Label on every Secret the operator creates, saying what it holds (`pki`, `tokens`,
/// `state`), so that `kubectl hapair` can find them.
pub const SECRET_ROLE_LABEL: &str = "hapair.dev/secret";

/// Largest shard written: a Secret is limited to 1 MiB, and the object around the data
/// needs some room.
pub const MAX_SHARD_BYTES: usize = 900 * 1024;

/// The shard an entry keyed by `key` lives in.
pub fn shard_of(key: &str, shards: usize) -> usize {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let shards = u64::try_from(shards.max(1)).unwrap_or(1);
    usize::try_from(u64::from_be_bytes(first) % shards).unwrap_or(0)
}

fn group_shard(key: &GroupKey, shards: usize) -> usize {
    shard_of(&key.to_string(), shards)
}

/// Splits `state` into `shards` parts: everything about one group in one part (volumes go
/// by their own key), node revisions by node name.
pub fn split(state: &ControllerState, shards: usize) -> Vec<ControllerState> {
    let shards = shards.max(1);
    let mut parts = vec![ControllerState::default(); shards];
    for (key, uuid) in &state.volume_uuids {
        parts[group_shard(key, shards)].volume_uuids.insert(key.clone(), uuid.clone());
    }
    for (key, value) in &state.generated_keys {
        parts[group_shard(key, shards)].generated_keys.insert(key.clone(), value.clone());
    }
    for (key, source) in &state.last_good {
        parts[group_shard(key, shards)].last_good.insert(key.clone(), source.clone());
    }
    for (key, deleting) in &state.deleting {
        parts[group_shard(key, shards)].deleting.insert(key.clone(), deleting.clone());
    }
    for (node, revision) in &state.nodes {
        parts[shard_of(node, shards)].nodes.insert(node.clone(), revision.clone());
    }
    for (id, action) in &state.actions {
        parts[group_shard(&action.group, shards)].actions.insert(id.clone(), action.clone());
    }
    for (key, volume) in &state.volume_specs {
        parts[group_shard(key, shards)].volume_specs.insert(key.clone(), volume.clone());
    }
    for (key, wiping) in &state.wiping {
        parts[group_shard(key, shards)].wiping.insert(key.clone(), wiping.clone());
    }
    parts
}

/// The inverse of [`split`].
pub fn merge(parts: impl IntoIterator<Item = ControllerState>) -> ControllerState {
    let mut state = ControllerState::default();
    for part in parts {
        state.volume_uuids.extend(part.volume_uuids);
        state.generated_keys.extend(part.generated_keys);
        state.last_good.extend(part.last_good);
        state.deleting.extend(part.deleting);
        state.nodes.extend(part.nodes);
        state.actions.extend(part.actions);
        state.volume_specs.extend(part.volume_specs);
        state.wiping.extend(part.wiping);
    }
    state
}

/// What was last read or written for a shard.
#[derive(Clone, Debug, Default)]
struct Shard {
    /// `None` when the Secret does not exist (yet).
    resource_version: Option<String>,
    json: Vec<u8>,
}

/// The state Secrets of one operator installation.
#[derive(Debug)]
pub struct StateSecrets {
    api: Api<Secret>,
    prefix: String,
    count: usize,
    shards: Mutex<Vec<Shard>>,
    metrics: Arc<Metrics>,
}

fn backend(what: String) -> impl FnOnce(kube::Error) -> StoreError {
    move |e| StoreError::Backend(format!("{what}: {e}"))
}

impl StateSecrets {
    /// `api` is namespaced to the operator's namespace; shards are `<prefix>-N`.
    pub fn new(api: Api<Secret>, prefix: &str, metrics: Arc<Metrics>) -> Self {
        StateSecrets::with_shards(api, prefix, STATE_SHARDS, metrics)
    }

    /// With another number of shards than [`STATE_SHARDS`]; for tests that want to see
    /// every request. The count must never change for one installation.
    pub fn with_shards(api: Api<Secret>, prefix: &str, count: usize, metrics: Arc<Metrics>) -> Self {
        let count = count.max(1);
        StateSecrets {
            api,
            prefix: prefix.to_string(),
            count,
            shards: Mutex::new(vec![Shard::default(); count]),
            metrics,
        }
    }

    pub fn name(&self, shard: usize) -> String {
        format!("{}-{shard}", self.prefix)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Shard>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads every shard. A missing shard is empty; an unreadable one is an error (starting
    /// from nothing would re-key every group and re-identify every volume).
    pub async fn load(&self) -> Result<ControllerState, StoreError> {
        let mut parts = Vec::with_capacity(self.count);
        for i in 0..self.count {
            let name = self.name(i);
            let secret = self.api.get_opt(&name).await.map_err(backend(format!("reading Secret {name}")))?;
            let shard = match secret {
                None => Shard::default(),
                Some(secret) => {
                    let json =
                        secret.data.as_ref().and_then(|d| d.get(STATE_KEY)).map(|b| b.0.clone()).unwrap_or_default();
                    let part: ControllerState = if json.is_empty() {
                        ControllerState::default()
                    } else {
                        serde_json::from_slice(&json).map_err(|e| {
                            StoreError::Backend(format!("Secret {name} key {STATE_KEY} is not controller state: {e}"))
                        })?
                    };
                    parts.push(part);
                    Shard { resource_version: secret.metadata.resource_version, json }
                }
            };
            self.lock()[i] = shard;
        }
        Ok(merge(parts))
    }

    /// Writes the shards whose content changed since last read or written.
    pub async fn save(&self, state: &ControllerState) -> Result<(), StoreError> {
        for (i, part) in split(state, self.count).into_iter().enumerate() {
            let json = serde_json::to_vec(&part).map_err(|e| StoreError::Backend(format!("encoding state: {e}")))?;
            let known = self.lock()[i].clone();
            if known.json == json && known.resource_version.is_some() {
                continue;
            }
            if known.resource_version.is_none() && part == ControllerState::default() {
                // Never create an empty shard.
                continue;
            }
            let name = self.name(i);
            if json.len() > MAX_SHARD_BYTES {
                return Err(StoreError::Backend(format!(
                    "state shard Secret {name} would hold {} bytes, over the {MAX_SHARD_BYTES}-byte limit; too many groups for one operator installation",
                    json.len()
                )));
            }
            let version = self.write(&name, known.resource_version, &json).await?;
            self.lock()[i] = Shard { resource_version: Some(version), json };
        }
        Ok(())
    }

    fn secret(&self, name: &str, resource_version: Option<String>, json: &[u8]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                resource_version,
                labels: Some(
                    [
                        (SECRET_ROLE_LABEL.to_string(), "state".to_string()),
                        ("app.kubernetes.io/managed-by".to_string(), "hapair-operator".to_string()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some([(STATE_KEY.to_string(), ByteString(json.to_vec()))].into()),
            ..Secret::default()
        }
    }

    /// Creates or replaces one shard; returns its new `resourceVersion`.
    async fn write(&self, name: &str, resource_version: Option<String>, json: &[u8]) -> Result<String, StoreError> {
        let pp = PostParams::default();
        let first = match &resource_version {
            Some(_) => self.api.replace(name, &pp, &self.secret(name, resource_version.clone(), json)).await,
            None => self.api.create(&pp, &self.secret(name, None, json)).await,
        };
        let written = match first {
            Ok(secret) => secret,
            // Changed or created behind this replica's back (a predecessor that had not yet
            // noticed it lost the lead): this replica leads now, its state is the one to keep.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                let current = self.api.get_opt(name).await.map_err(backend(format!("reading Secret {name}")))?;
                match current.and_then(|c| c.metadata.resource_version) {
                    Some(version) => self
                        .api
                        .replace(name, &pp, &self.secret(name, Some(version), json))
                        .await
                        .map_err(backend(format!("writing Secret {name}")))?,
                    None => self
                        .api
                        .create(&pp, &self.secret(name, None, json))
                        .await
                        .map_err(backend(format!("creating Secret {name}")))?,
                }
            }
            Err(e) => return Err(backend(format!("writing Secret {name}"))(e)),
        };
        self.metrics.kube_write("state");
        Ok(written.metadata.resource_version.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::actions::queue;
    use crate::desired::state::NodeRevision;
    use hapair_crds::nodeapi::AdminActionKind;

    fn sample() -> ControllerState {
        let mut state = ControllerState::default();
        for i in 0..50 {
            let key = GroupKey::new("ns", format!("g{i}"));
            state.generated_keys.insert(key.clone(), format!("key{i}"));
            state.volume_uuids.insert(GroupKey::new("ns", format!("v{i}")), format!("uuid{i}"));
            state.nodes.insert(format!("n{i}"), NodeRevision { revision: i, content_hash: format!("h{i}") });
            state.actions.insert(
                format!("a{i}"),
                queue(&key, &format!("a{i}"), AdminActionKind::Maintenance { enabled: true }, 0),
            );
            let volume = GroupKey::new("ns", format!("v{i}"));
            let spec: hapair_crds::ReplicatedVolumeSpec = serde_yaml::from_str(
                "{group: g, size: 1Gi, backing: [{node: a, path: /a.img}, {node: b, path: /b.img}]}",
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let origin = crate::desired::catalog::Origin { file: "v.yaml".into(), index: i as usize };
            state
                .volume_specs
                .insert(volume.clone(), crate::desired::state::KnownVolume { spec: spec.clone(), origin });
            let wiping =
                crate::desired::state::Wiping { uuid: format!("uuid{i}"), spec, answers: Default::default(), since: 0 };
            state.wiping.insert(GroupKey::new("ns", format!("w{i}")), wiping);
            let group = hapair_crds::HaGroup::new(
                &format!("g{i}"),
                serde_yaml::from_str("{nodes: []}").unwrap_or_else(|e| panic!("{e}")),
            );
            let source = crate::desired::state::GroupSource {
                group,
                volumes: vec![],
                heartbeat_key: "k".into(),
                origin: crate::desired::catalog::Origin { file: "g.yaml".into(), index: 0 },
            };
            state.last_good.insert(key.clone(), source.clone());
            let deleting = crate::desired::state::Deleting { source, cleaned_up: Default::default(), since: 0 };
            state.deleting.insert(GroupKey::new("ns", format!("d{i}")), deleting);
        }
        state
    }

    #[test]
    fn the_sample_fills_every_field_of_the_state() {
        // A field added to ControllerState but not to split/merge would be lost on every
        // save; the round trip below only catches that if the sample fills it.
        let json = serde_json::to_value(sample()).unwrap_or_else(|e| panic!("{e}"));
        let fields = json.as_object().unwrap_or_else(|| panic!("not an object"));
        let defaults = serde_json::to_value(ControllerState::default()).unwrap_or_else(|e| panic!("{e}"));
        for (name, default) in defaults.as_object().unwrap_or_else(|| panic!("not an object")) {
            assert_ne!(fields.get(name), Some(default), "the sample leaves {name} empty");
        }
    }

    #[test]
    fn split_and_merge_round_trip_and_keep_a_groups_entries_together() {
        let state = sample();
        let parts = split(&state, STATE_SHARDS);
        assert_eq!(parts.len(), STATE_SHARDS);
        assert_eq!(merge(parts.clone()), state);
        assert!(parts.iter().filter(|p| **p != ControllerState::default()).count() > 8, "entries spread out");
        for part in &parts {
            for action in part.actions.values() {
                assert!(part.generated_keys.contains_key(&action.group), "an action sits with its group");
            }
        }
    }

    #[test]
    fn shards_are_stable() {
        // Moving entries between shards after an upgrade would orphan them: the function
        // must never change.
        assert_eq!(shard_of("databases/pg", 16), 14);
        assert_eq!(shard_of("default/web", 16), 4);
        let spread: std::collections::BTreeSet<usize> = (0..100).map(|i| shard_of(&format!("k{i}"), 16)).collect();
        assert_eq!(spread.len(), 16);
        assert_eq!(shard_of("anything", 1), 0);
    }
}
