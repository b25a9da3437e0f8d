//! The standalone [`Store`]: desired objects from a directory of manifests, everything the
//! controller writes in a state directory, as JSON files replaced atomically.
//!
//! Layout of the state directory (beside the PKI files of [`crate::pki`]):
//! `state.json` (controller state, mode 0600: it holds generated heartbeat keys),
//! `status.json` (group and volume statuses), `events.json` (recent events per group),
//! `generations.json` (the `metadata.generation` this store assigns, since no API server
//! does it here, and which file holds each object, to settle duplicates).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use hapair_crds::nodeapi::GroupKey;
use hapair_crds::{HaGroupStatus, ReplicatedVolumeStatus};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::controller::store::{Statuses, Store, StoreError};
use crate::desired::catalog::{Catalog, Incumbents};
use crate::desired::state::ControllerState;
use crate::status::events::{EventRing, GroupEvent};
use crate::support::atomic_file::{read_json, write_json};
use crate::support::hex;

pub const STATE_FILE: &str = "state.json";
pub const STATUS_FILE: &str = "status.json";
pub const EVENTS_FILE: &str = "events.json";
pub const GENERATIONS_FILE: &str = "generations.json";

/// `metadata.generation` bookkeeping: the hash of each object's spec and its generation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Generations {
    #[serde(default)]
    groups: BTreeMap<GroupKey, (String, i64)>,
    #[serde(default)]
    volumes: BTreeMap<GroupKey, (String, i64)>,
    /// Which file holds each object, so a duplicate added later never wins, even across
    /// a restart.
    #[serde(default)]
    incumbents: Incumbents,
}

#[derive(Debug)]
struct Buffered {
    statuses: Statuses,
    events: EventRing,
    statuses_dirty: bool,
    events_dirty: bool,
    generations: Generations,
}

/// Manifests from `manifests`, controller data in `state_dir`.
#[derive(Debug)]
pub struct FileStore {
    manifests: PathBuf,
    state_dir: PathBuf,
    buffered: Mutex<Buffered>,
}

impl FileStore {
    /// Opens the store, loading what a previous run wrote.
    pub fn open(manifests: &Path, state_dir: &Path) -> Result<FileStore, StoreError> {
        let statuses = read_json(&state_dir.join(STATUS_FILE))?.unwrap_or_default();
        let events = read_json(&state_dir.join(EVENTS_FILE))?.unwrap_or_default();
        let generations = read_json(&state_dir.join(GENERATIONS_FILE))?.unwrap_or_default();
        Ok(FileStore {
            manifests: manifests.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            buffered: Mutex::new(Buffered {
                statuses,
                events,
                statuses_dirty: false,
                events_dirty: false,
                generations,
            }),
        })
    }

    pub fn manifests(&self) -> &Path {
        &self.manifests
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn lock(&self) -> MutexGuard<'_, Buffered> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the controller; keep serving with what is there.
        self.buffered.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn spec_hash<T: Serialize>(spec: &T) -> String {
    hex::encode(&Sha256::digest(serde_json::to_vec(spec).unwrap_or_default()))
}

/// Gives each object the generation its spec has been seen at, bumping it when the spec
/// changes, as the API server does on every spec update.
fn next_generation(book: &mut BTreeMap<GroupKey, (String, i64)>, key: &GroupKey, hash: String) -> (i64, bool) {
    match book.get_mut(key) {
        Some((known, generation)) if *known == hash => (*generation, false),
        Some((known, generation)) => {
            *known = hash;
            *generation += 1;
            (*generation, true)
        }
        None => {
            book.insert(key.clone(), (hash, 1));
            (1, true)
        }
    }
}

/// Sets `metadata.generation` on every object of `catalog` from `book` (bumping it where
/// the spec changed) and records which file holds each object; whether `book` changed.
pub(crate) fn assign_generations(book: &mut Generations, catalog: &mut Catalog) -> bool {
    let mut changed = false;
    let next = book.incumbents.after(catalog);
    if next != book.incumbents {
        book.incumbents = next;
        changed = true;
    }
    for (key, (group, _)) in catalog.groups.iter_mut() {
        let (generation, bumped) = next_generation(&mut book.groups, key, spec_hash(&group.spec));
        group.metadata.generation = Some(generation);
        changed |= bumped;
    }
    for (key, (volume, _)) in catalog.volumes.iter_mut() {
        let (generation, bumped) = next_generation(&mut book.volumes, key, spec_hash(&volume.spec));
        volume.metadata.generation = Some(generation);
        changed |= bumped;
    }
    changed
}

impl Generations {
    /// Which file holds each object.
    pub fn incumbents(&self) -> &Incumbents {
        &self.incumbents
    }
}

impl Store for FileStore {
    async fn snapshot(&self) -> Result<Catalog, StoreError> {
        let incumbents = self.lock().generations.incumbents.clone();
        let mut catalog = Catalog::load_dir(&self.manifests, &incumbents)?;
        let changed = {
            let mut buffered = self.lock();
            assign_generations(&mut buffered.generations, &mut catalog).then(|| buffered.generations.clone())
        };
        if let Some(generations) = changed {
            write_json(&self.state_dir.join(GENERATIONS_FILE), &generations, 0o644)?;
        }
        Ok(catalog)
    }

    async fn load_state(&self) -> Result<ControllerState, StoreError> {
        Ok(read_json(&self.state_dir.join(STATE_FILE))?.unwrap_or_default())
    }

    async fn save_state(&self, state: &ControllerState) -> Result<(), StoreError> {
        Ok(write_json(&self.state_dir.join(STATE_FILE), state, 0o600)?)
    }

    async fn load_statuses(&self) -> Result<Statuses, StoreError> {
        Ok(self.lock().statuses.clone())
    }

    async fn write_group_status(&self, key: &GroupKey, status: Option<&HaGroupStatus>) -> Result<(), StoreError> {
        let mut buffered = self.lock();
        let changed = buffered.statuses.set_group(key, status);
        buffered.statuses_dirty |= changed;
        if status.is_none() && buffered.events.forget(key) {
            buffered.events_dirty = true;
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
        buffered.statuses_dirty |= changed;
        Ok(())
    }

    async fn record_event(&self, key: &GroupKey, event: &GroupEvent) -> Result<(), StoreError> {
        let mut buffered = self.lock();
        if buffered.events.push(key, event.clone()) {
            buffered.events_dirty = true;
        }
        Ok(())
    }

    async fn load_events(&self) -> Result<EventRing, StoreError> {
        Ok(self.lock().events.clone())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (statuses, events) = {
            let mut buffered = self.lock();
            let statuses = buffered.statuses_dirty.then(|| buffered.statuses.clone());
            let events = buffered.events_dirty.then(|| buffered.events.clone());
            buffered.statuses_dirty = false;
            buffered.events_dirty = false;
            (statuses, events)
        };
        let result = (|| {
            if let Some(statuses) = &statuses {
                write_json(&self.state_dir.join(STATUS_FILE), statuses, 0o644)?;
            }
            if let Some(events) = &events {
                write_json(&self.state_dir.join(EVENTS_FILE), events, 0o644)?;
            }
            Ok::<(), StoreError>(())
        })();
        if result.is_err() {
            // Try again on the next flush rather than losing the writes.
            let mut buffered = self.lock();
            buffered.statuses_dirty |= statuses.is_some();
            buffered.events_dirty |= events.is_some();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::hagroup::GroupPhase;
    use hapair_crds::nodeapi::EventType;

    const GROUP: &str = "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {name: g}\nspec:\n  nodes:\n    - {name: a, heartbeatAddresses: [198.18.1.1]}\n    - {name: b, heartbeatAddresses: [198.18.1.2]}\n";

    #[tokio::test]
    async fn generations_move_with_the_spec_and_survive_reopening() -> Result<(), Box<dyn std::error::Error>> {
        let manifests = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        std::fs::write(manifests.path().join("g.yaml"), GROUP)?;
        let store = FileStore::open(manifests.path(), state.path())?;
        let key = GroupKey::new("default", "g");
        let generation = |c: &Catalog| c.groups.get(&key).and_then(|(g, _)| g.metadata.generation);
        assert_eq!(generation(&store.snapshot().await?), Some(1));
        assert_eq!(generation(&store.snapshot().await?), Some(1));
        std::fs::write(manifests.path().join("g.yaml"), GROUP.replace("198.18.1.2", "198.18.1.3"))?;
        assert_eq!(generation(&store.snapshot().await?), Some(2));
        let reopened = FileStore::open(manifests.path(), state.path())?;
        assert_eq!(generation(&reopened.snapshot().await?), Some(2));
        Ok(())
    }

    #[tokio::test]
    async fn statuses_and_events_are_written_on_flush_and_reloaded() -> Result<(), Box<dyn std::error::Error>> {
        let manifests = tempfile::tempdir()?;
        let state = tempfile::tempdir()?;
        let store = FileStore::open(manifests.path(), state.path())?;
        let key = GroupKey::new("default", "g");
        let status = HaGroupStatus { phase: Some(GroupPhase::Healthy), epoch: 7, ..HaGroupStatus::default() };
        store.write_group_status(&key, Some(&status)).await?;
        let event = GroupEvent::controller("2025-01-01T00:00:00Z".into(), EventType::Normal, "Test", "hello".into());
        store.record_event(&key, &event).await?;
        assert!(!state.path().join(STATUS_FILE).exists(), "buffered until flush");
        store.flush().await?;
        let reopened = FileStore::open(manifests.path(), state.path())?;
        assert_eq!(reopened.load_statuses().await?.groups.get(&key), Some(&status));
        assert_eq!(reopened.load_events().await?.recent(&key), vec![event]);

        let mut controller_state = ControllerState::default();
        controller_state.generated_keys.insert(key.clone(), "c2VjcmV0".into());
        store.save_state(&controller_state).await?;
        assert_eq!(reopened.load_state().await?, controller_state);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.path().join(STATE_FILE))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        Ok(())
    }
}
