//! Erasing deleted volumes' replicas on this node (`deletionPolicy: Wipe`).
//!
//! The controller lists, in this node's bundle, every deleted volume whose replica here
//! must go; it keeps listing it until this node's report carries a final answer. A wipe
//! waits while a group of the bundle still delivers the volume (its deletion is not
//! finished) and while a replica still holds the backing open (a group being stopped);
//! I/O errors are retried. What is erased, and what is refused, is decided by
//! [`crate::replication::wipe`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hapair_crds::nodeapi::{GroupConfig, GroupKey, VolumeWipe, WipeOutcome, WipeReport};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::report::{Board, NodeState};
use crate::replication::store::{MetaLocation, volume_uuid_bytes};
use crate::replication::wipe::{WipeError, Wiped, wipe};

/// How long a wipe that could not run (replica open, I/O error) waits before trying again.
const RETRY_EVERY: Duration = Duration::from_secs(2);

type WipeId = (GroupKey, String);

/// The wipes of the bundle in force, running or answered.
#[derive(Debug)]
pub struct Wipes {
    node: String,
    state: Arc<Mutex<NodeState>>,
    board: Arc<Board>,
    tasks: BTreeMap<WipeId, JoinHandle<()>>,
}

impl Drop for Wipes {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

impl Wipes {
    pub fn new(node: &str, state: Arc<Mutex<NodeState>>, board: Arc<Board>) -> Wipes {
        Wipes { node: node.to_string(), state, board, tasks: BTreeMap::new() }
    }

    /// Brings the wipes in line with a newly applied bundle: wipes no longer listed are
    /// dropped (the controller has their answer), new ones start unless a group of the
    /// bundle still uses the volume.
    pub fn apply(&mut self, wipes: &[VolumeWipe], groups: &[GroupConfig]) {
        let wanted: BTreeMap<WipeId, &VolumeWipe> =
            wipes.iter().map(|w| ((w.volume.clone(), w.uuid.clone()), w)).collect();
        self.tasks.retain(|id, task| {
            let keep = wanted.contains_key(id);
            if !keep {
                task.abort();
            }
            keep
        });
        lock(&self.state).wipes.retain(|r| wanted.contains_key(&(r.volume.clone(), r.uuid.clone())));
        for (id, request) in wanted {
            let users: Vec<String> = groups
                .iter()
                .filter(|g| {
                    g.key.namespace == request.volume.namespace
                        && g.volumes.iter().any(|v| v.name == request.volume.name || v.uuid == request.uuid)
                })
                .map(|g| g.key.to_string())
                .collect();
            if !users.is_empty() {
                if let Some(task) = self.tasks.remove(&id) {
                    task.abort();
                }
                let message = format!("waiting: group {} on this node still uses the volume", users.join(", "));
                if set(&self.state, &self.board, report(request, WipeOutcome::Waiting, message.clone())) {
                    tracing::info!(volume = %request.volume, "wipe {message}");
                }
                continue;
            }
            let answered = lock(&self.state)
                .wipes
                .iter()
                .any(|r| r.volume == request.volume && r.uuid == request.uuid && r.outcome.is_final());
            if answered || self.tasks.get(&id).is_some_and(|t| !t.is_finished()) {
                continue;
            }
            let span = tracing::info_span!("wipe", volume = %request.volume, node = %self.node);
            let task = run(self.node.clone(), request.clone(), Arc::clone(&self.state), Arc::clone(&self.board));
            self.tasks.insert(id, tokio::spawn(task.instrument(span)));
        }
    }
}

fn lock(state: &Mutex<NodeState>) -> std::sync::MutexGuard<'_, NodeState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn report(request: &VolumeWipe, outcome: WipeOutcome, message: String) -> WipeReport {
    WipeReport { volume: request.volume.clone(), uuid: request.uuid.clone(), outcome, message }
}

/// Records `answer` (replacing the previous one for the same wipe) and, when it is news,
/// has the reporter send it now. Returns whether it was news.
fn set(state: &Mutex<NodeState>, board: &Board, answer: WipeReport) -> bool {
    let mut node = lock(state);
    match node.wipes.iter_mut().find(|r| r.volume == answer.volume && r.uuid == answer.uuid) {
        Some(existing) if *existing == answer => return false,
        Some(existing) => *existing = answer,
        None => node.wipes.push(answer),
    }
    drop(node);
    board.urgent.notify_one();
    true
}

/// Tries the wipe until it has a final answer.
async fn run(node: String, request: VolumeWipe, state: Arc<Mutex<NodeState>>, board: Arc<Board>) {
    let Some(backing) = request.spec.backing.iter().find(|b| b.node == node) else {
        let message = format!("volume {} has no backing on node {node}: nothing to wipe here", request.volume);
        tracing::warn!(reason = "NothingToWipe", "{message}");
        set(&state, &board, report(&request, WipeOutcome::NothingToWipe, message));
        return;
    };
    let data_path = PathBuf::from(&backing.path);
    let meta = MetaLocation::from_spec(&backing.metadata);
    let uuid = volume_uuid_bytes(&request.uuid);
    loop {
        let (path, location) = (data_path.clone(), meta.clone());
        let result = tokio::task::spawn_blocking(move || wipe(&path, &location, uuid)).await.unwrap_or_else(|e| {
            Err(WipeError::Io { path: data_path.display().to_string(), op: "wiping", source: std::io::Error::other(e) })
        });
        let (outcome, message) = match result {
            Ok(Wiped::Erased { data_bytes, meta_bytes }) => (
                WipeOutcome::Wiped,
                format!(
                    "discarded {data_bytes} bytes of data in {} and blanked {meta_bytes} bytes of metadata",
                    data_path.display()
                ),
            ),
            Ok(Wiped::NothingThere(why)) => (WipeOutcome::NothingToWipe, why),
            Err(e @ WipeError::Locked { .. }) => (WipeOutcome::Waiting, e.to_string()),
            Err(e) if e.is_final() => (WipeOutcome::Refused, e.to_string()),
            Err(e) => (WipeOutcome::Failed, format!("{e}; retrying every {}s", RETRY_EVERY.as_secs())),
        };
        if set(&state, &board, report(&request, outcome, message.clone())) {
            match outcome {
                WipeOutcome::Wiped => tracing::info!(reason = "VolumeWiped", "{message}"),
                WipeOutcome::NothingToWipe => tracing::info!(reason = "NothingToWipe", "{message}"),
                WipeOutcome::Waiting => tracing::info!(reason = "WipeWaiting", "{message}"),
                WipeOutcome::Refused => tracing::warn!(reason = "WipeRefused", "{message}"),
                WipeOutcome::Failed => tracing::warn!(reason = "WipeFailed", "{message}"),
            }
        }
        if outcome.is_final() {
            return;
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
