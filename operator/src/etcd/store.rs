//! The [`Store`] of controllers on etcd: manifests from this controller's directory,
//! everything the controller writes in etcd, each write fenced by the leader's revision.
//!
//! One key per group status, volume status and group event list, so a write touches only
//! what changed and no value nears etcd's request limit (1.5 MiB by default); the
//! controller state is split in [`STATE_SHARDS`] parts as the Kubernetes operator splits
//! its state Secrets, and only changed parts are written, in one transaction.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use etcd_client::{Client, TxnOp};
use hapair_crds::nodeapi::GroupKey;
use hapair_crds::{HaGroupStatus, ReplicatedVolumeStatus};

use super::{EtcdError, Fence, Keys, STATE_SHARDS, decode, encode, fenced_write, get_json, get_prefix};
use crate::controller::store::{Statuses, Store, StoreError};
use crate::desired::catalog::Catalog;
use crate::desired::state::ControllerState;
use crate::k8s::state_secrets::{merge, split};
use crate::standalone::file_store::{Generations, assign_generations};
use crate::status::events::{EventRing, GroupEvent};

impl From<EtcdError> for StoreError {
    fn from(e: EtcdError) -> Self {
        StoreError::Backend(e.to_string())
    }
}

#[derive(Debug, Default)]
struct Buffered {
    statuses: Statuses,
    events: EventRing,
    generations: Generations,
    dirty_groups: BTreeSet<GroupKey>,
    dirty_volumes: BTreeSet<GroupKey>,
    dirty_events: BTreeSet<GroupKey>,
    /// The JSON of each state shard as last read or written.
    shards: Vec<Vec<u8>>,
}

/// A leader's store; built anew for every term, with that term's fence.
pub struct EtcdStore {
    manifests: PathBuf,
    client: Client,
    keys: Keys,
    fence: Fence,
    buffered: Mutex<Buffered>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The etcd client has no Debug of its own.
        f.debug_struct("EtcdStore")
            .field("manifests", &self.manifests)
            .field("keys", &self.keys)
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

/// Everything the store keeps, as read from etcd.
#[derive(Debug, Default)]
pub struct Contents {
    pub statuses: Statuses,
    pub events: EventRing,
    pub generations: Generations,
}

/// Reads every status, event list and the generations.
pub async fn read_contents(client: &Client, keys: &Keys) -> Result<Contents, EtcdError> {
    let mut contents = Contents::default();
    for kv in get_prefix(client, &keys.group_statuses()).await? {
        if let Some(group) = Keys::group_of(kv.key(), &keys.group_statuses()) {
            contents.statuses.groups.insert(group, decode(&kv)?);
        }
    }
    for kv in get_prefix(client, &keys.volume_statuses()).await? {
        if let Some(volume) = Keys::group_of(kv.key(), &keys.volume_statuses()) {
            contents.statuses.volumes.insert(volume, decode(&kv)?);
        }
    }
    for kv in get_prefix(client, &keys.all_events()).await? {
        if let Some(group) = Keys::group_of(kv.key(), &keys.all_events()) {
            for event in decode::<Vec<GroupEvent>>(&kv)? {
                contents.events.push(&group, event);
            }
        }
    }
    contents.generations = get_json(client, &keys.generations()).await?.unwrap_or_default();
    Ok(contents)
}

/// The writes that put `contents` in etcd as a whole (for migration).
pub fn contents_ops(keys: &Keys, contents: &Contents) -> Vec<TxnOp> {
    let mut ops = Vec::new();
    for (group, status) in &contents.statuses.groups {
        ops.push(TxnOp::put(keys.group_status(group), encode(status), None));
    }
    for (volume, status) in &contents.statuses.volumes {
        ops.push(TxnOp::put(keys.volume_status(volume), encode(status), None));
    }
    for group in contents.events.groups() {
        ops.push(TxnOp::put(keys.events(group), encode(&contents.events.recent(group)), None));
    }
    ops.push(TxnOp::put(keys.generations(), encode(&contents.generations), None));
    ops
}

/// The writes that put `state` in etcd, skipping shards whose JSON is already `known`.
pub fn state_ops(keys: &Keys, state: &ControllerState, known: &[Vec<u8>]) -> (Vec<TxnOp>, Vec<Vec<u8>>) {
    let shards: Vec<Vec<u8>> = split(state, STATE_SHARDS).iter().map(encode).collect();
    let ops = shards
        .iter()
        .enumerate()
        .filter(|(i, json)| known.get(*i) != Some(*json))
        .map(|(i, json)| TxnOp::put(keys.state_shard(i), json.clone(), None))
        .collect();
    (ops, shards)
}

impl EtcdStore {
    /// Opens the store for a term led under `fence`, reading what earlier leaders wrote.
    pub async fn open(manifests: &Path, client: Client, keys: Keys, fence: Fence) -> Result<EtcdStore, EtcdError> {
        let contents = read_contents(&client, &keys).await?;
        let buffered = Buffered {
            statuses: contents.statuses,
            events: contents.events,
            generations: contents.generations,
            ..Buffered::default()
        };
        Ok(EtcdStore { manifests: manifests.to_path_buf(), client, keys, fence, buffered: Mutex::new(buffered) })
    }

    fn lock(&self) -> MutexGuard<'_, Buffered> {
        // As in the file store: losing a half-made change matters less than the controller.
        self.buffered.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn write(&self, what: &str, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        Ok(fenced_write(&self.client, &self.keys, self.fence, what, ops).await?)
    }
}

impl Store for EtcdStore {
    async fn snapshot(&self) -> Result<Catalog, StoreError> {
        let incumbents = self.lock().generations.incumbents().clone();
        let mut catalog = Catalog::load_dir(&self.manifests, &incumbents)?;
        let changed = {
            let mut buffered = self.lock();
            assign_generations(&mut buffered.generations, &mut catalog).then(|| buffered.generations.clone())
        };
        if let Some(generations) = changed {
            self.write("writing generations", vec![TxnOp::put(self.keys.generations(), encode(&generations), None)])
                .await?;
        }
        Ok(catalog)
    }

    async fn load_state(&self) -> Result<ControllerState, StoreError> {
        let kvs = get_prefix(&self.client, &self.keys.state_prefix()).await?;
        let mut parts = Vec::new();
        let mut shards = vec![Vec::new(); STATE_SHARDS];
        for kv in kvs {
            let index = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(&self.keys.state_prefix()))
                .and_then(|i| i.parse::<usize>().ok());
            if let Some(slot) = index.and_then(|i| shards.get_mut(i)) {
                *slot = kv.value().to_vec();
            }
            parts.push(decode::<ControllerState>(&kv)?);
        }
        self.lock().shards = shards;
        Ok(merge(parts))
    }

    async fn save_state(&self, state: &ControllerState) -> Result<(), StoreError> {
        let known = self.lock().shards.clone();
        let (ops, shards) = state_ops(&self.keys, state, &known);
        if !ops.is_empty() {
            // One transaction: a successor never sees half of a state change.
            self.write("writing the controller state", ops).await?;
        }
        self.lock().shards = shards;
        Ok(())
    }

    async fn load_statuses(&self) -> Result<Statuses, StoreError> {
        Ok(self.lock().statuses.clone())
    }

    async fn write_group_status(&self, key: &GroupKey, status: Option<&HaGroupStatus>) -> Result<(), StoreError> {
        let mut buffered = self.lock();
        let changed = buffered.statuses.set_group(key, status);
        if changed {
            buffered.dirty_groups.insert(key.clone());
        }
        if status.is_none() && buffered.events.forget(key) {
            buffered.dirty_events.insert(key.clone());
        }
        Ok(())
    }

    async fn write_volume_status(
        &self,
        key: &GroupKey,
        status: Option<&ReplicatedVolumeStatus>,
    ) -> Result<(), StoreError> {
        let mut buffered = self.lock();
        let changed = buffered.statuses.set_volume(key, status);
        if changed {
            buffered.dirty_volumes.insert(key.clone());
        }
        Ok(())
    }

    async fn record_event(&self, key: &GroupKey, event: &GroupEvent) -> Result<(), StoreError> {
        let mut buffered = self.lock();
        if buffered.events.push(key, event.clone()) {
            buffered.dirty_events.insert(key.clone());
        }
        Ok(())
    }

    async fn load_events(&self) -> Result<EventRing, StoreError> {
        Ok(self.lock().events.clone())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (ops, groups, volumes, events) = {
            let mut buffered = self.lock();
            let groups = std::mem::take(&mut buffered.dirty_groups);
            let volumes = std::mem::take(&mut buffered.dirty_volumes);
            let events = std::mem::take(&mut buffered.dirty_events);
            let mut ops = Vec::new();
            for group in &groups {
                ops.push(match buffered.statuses.groups.get(group) {
                    Some(status) => TxnOp::put(self.keys.group_status(group), encode(status), None),
                    None => TxnOp::delete(self.keys.group_status(group), None),
                });
            }
            for volume in &volumes {
                ops.push(match buffered.statuses.volumes.get(volume) {
                    Some(status) => TxnOp::put(self.keys.volume_status(volume), encode(status), None),
                    None => TxnOp::delete(self.keys.volume_status(volume), None),
                });
            }
            for group in &events {
                let recent = buffered.events.recent(group);
                ops.push(if recent.is_empty() {
                    TxnOp::delete(self.keys.events(group), None)
                } else {
                    TxnOp::put(self.keys.events(group), encode(&recent), None)
                });
            }
            (ops, groups, volumes, events)
        };
        if ops.is_empty() {
            return Ok(());
        }
        let result = self.write("writing statuses and events", ops).await;
        if result.is_err() {
            // Written again on the next flush rather than lost.
            let mut buffered = self.lock();
            buffered.dirty_groups.extend(groups);
            buffered.dirty_volumes.extend(volumes);
            buffered.dirty_events.extend(events);
        }
        result
    }
}
