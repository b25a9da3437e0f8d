//! What the runtime keeps in the state directory, on top of [`crate::state::StateStore`]:
//!
//! - `agent-state.json`: the node's last incarnation, so the next run picks a larger one;
//! - `desired-config.json`: the last accepted desired config, run again after a restart
//!   and while the controller is unreachable;
//! - `group-<ns>-<name>.json`: per group, the engine's persisted facts (epochs, the peer's
//!   incarnation, finished actions, the serving lease) and the boot they were written in.
//!
//! A corrupt file is set aside by the store and reported by the caller; the group then
//! starts as if for the first time, which is safe (it comes back as standby; epochs are
//! relearnt from the peer and the witness).

use hapair_crds::nodeapi::{DesiredConfig, GroupKey};
use serde::{Deserialize, Serialize};

use crate::engine::PersistedState;
use crate::state::{DESIRED_CONFIG, Loaded, StateError, StateStore, Versioned, group_file_name};

const NODE_FILE: &str = "agent-state.json";
const RECORD_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct NodeRecord {
    incarnation: u64,
}

/// One group's facts as written.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GroupRecord {
    /// The boot the facts were written in (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    pub engine: PersistedState,
}

/// What loading a group's record found.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    pub state: Option<PersistedState>,
    /// The file was unusable and moved aside: (reason, where it went).
    pub corrupt: Option<(String, String)>,
    /// A serving lease was recorded in another boot and dropped.
    pub lease_from_other_boot: bool,
}

/// Picks and records this run's incarnation (larger than any before).
pub fn take_incarnation(store: &StateStore, now_unix_millis: u64) -> Result<(u64, Option<String>), StateError> {
    let (previous, corrupt) = match store.load::<Versioned<NodeRecord>>(NODE_FILE)? {
        Loaded::Found(r) => (Some(r.record.incarnation), None),
        Loaded::Missing => (None, None),
        Loaded::Corrupt { reason, moved_to } => (None, Some(format!("{reason}; set aside as {}", moved_to.display()))),
    };
    let incarnation = super::clock::next_incarnation(previous, now_unix_millis);
    store.save(NODE_FILE, &Versioned { version: RECORD_VERSION, record: NodeRecord { incarnation } })?;
    Ok((incarnation, corrupt))
}

/// The cached desired config.
pub fn load_bundle(store: &StateStore) -> Result<Loaded<DesiredConfig>, StateError> {
    store.load(DESIRED_CONFIG)
}

pub fn save_bundle(store: &StateStore, bundle: &DesiredConfig) -> Result<(), StateError> {
    store.save(DESIRED_CONFIG, bundle)
}

/// One group's record file.
#[derive(Clone, Debug)]
pub struct GroupFile {
    store: StateStore,
    name: String,
    boot_id: String,
}

impl GroupFile {
    pub fn new(store: &StateStore, group: &GroupKey, boot_id: &str) -> GroupFile {
        GroupFile { store: store.clone(), name: group_file_name(group), boot_id: boot_id.to_string() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads the record. A serving lease recorded in another boot (or with this boot's id
    /// unknown) is dropped: its instants were on a clock that started over.
    pub fn load(&self) -> Result<Restored, StateError> {
        match self.store.load::<Versioned<GroupRecord>>(&self.name)? {
            Loaded::Missing => Ok(Restored::default()),
            Loaded::Corrupt { reason, moved_to } => Ok(Restored {
                state: None,
                corrupt: Some((reason, moved_to.display().to_string())),
                lease_from_other_boot: false,
            }),
            Loaded::Found(found) => {
                let mut state = found.record.engine;
                let same_boot = !self.boot_id.is_empty() && found.record.boot_id == self.boot_id;
                let lease_from_other_boot = state.serving.is_some() && !same_boot;
                if !same_boot {
                    state.serving = None;
                }
                Ok(Restored { state: Some(state), corrupt: None, lease_from_other_boot })
            }
        }
    }

    /// Writes the record durably (the engine's `Persist` contract).
    pub fn save(&self, state: &PersistedState) -> Result<(), StateError> {
        let record = GroupRecord { boot_id: self.boot_id.clone(), engine: state.clone() };
        self.store.save(&self.name, &Versioned { version: RECORD_VERSION, record })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::persist::ServingLease;

    fn serving_state() -> PersistedState {
        PersistedState {
            epoch: 3,
            floor: 3,
            serving: Some(ServingLease { epoch: 3, lease_end_nanos: 5, steps: vec!["app".into()] }),
            ..PersistedState::default()
        }
    }

    #[test]
    fn a_serving_lease_survives_only_within_the_same_boot() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = StateStore::open(dir.path())?;
        let key = GroupKey::new("db", "pg");
        GroupFile::new(&store, &key, "boot-1").save(&serving_state())?;
        let same = GroupFile::new(&store, &key, "boot-1").load()?;
        assert_eq!(same.state, Some(serving_state()));
        assert!(!same.lease_from_other_boot);
        let other = GroupFile::new(&store, &key, "boot-2").load()?;
        assert_eq!(other.state, Some(PersistedState { serving: None, ..serving_state() }));
        assert!(other.lease_from_other_boot);
        Ok(())
    }

    #[test]
    fn a_corrupt_record_is_set_aside_and_reported() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = StateStore::open(dir.path())?;
        let key = GroupKey::new("db", "pg");
        let file = GroupFile::new(&store, &key, "boot-1");
        file.save(&serving_state())?;
        let path = dir.path().join(file.name());
        let mut bytes = std::fs::read(&path)?;
        let last = bytes.len() - 3;
        bytes[last] ^= 0x20;
        std::fs::write(&path, bytes)?;
        let restored = file.load()?;
        assert_eq!(restored.state, None);
        let (reason, moved_to) = restored.corrupt.unwrap_or_default();
        assert!(reason.contains("checksum"), "{reason}");
        assert!(std::path::Path::new(&moved_to).exists() && !path.exists());
        assert_eq!(file.load()?, Restored::default(), "the next start is a first start");
        Ok(())
    }

    #[test]
    fn incarnations_grow_across_runs() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = StateStore::open(dir.path())?;
        let (first, _) = take_incarnation(&store, 1_000)?;
        let (second, _) = take_incarnation(&store, 500)?;
        assert_eq!((first, second), (1_000, 1_001));
        Ok(())
    }
}
