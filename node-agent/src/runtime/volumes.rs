//! One group's replicated volumes on this node: each `ReplicatedVolume` of the group's
//! config is opened as a [`Replica`] (backing, metadata, peer address, protocol, TLS) that
//! replicates with the peer agent from the moment the group starts, whatever the role.
//!
//! - Opening is retried in the background until it works (a backing that appears later,
//!   an address not configured yet); until then the engine hears nothing of the volume,
//!   so it counts it `Unknown` and never promotes on it.
//! - Every status change reaches the group task as [`Input::VolumeStatus`]; the task feeds
//!   the engine an `Event::Volume` whenever disk state or connection changed, which is how
//!   an Inconsistent or outdated standby is kept from being promoted.
//! - Replica events (connected, resync started/finished, split brain, discards, fencing)
//!   become the group's events, with their reason.
//! - The engine's promote/demote/resolve/verify commands run as tasks and answer with
//!   [`Input::VolumeDone`] or [`Input::VerifyStarted`] (resolution results are events; a
//!   finished verify is an event and goes into the volume's reports).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hapair_crds::nodeapi::{EventType, GroupConfig, GroupKey, VolumeConfig, VolumeReport};
use hapair_crds::volume::{ConnectionState, DiskState, VerifyReport};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::inbox::Input;
use super::report::{Board, record};
use crate::engine::VolumeOp;
use crate::metrics::AgentMetrics;
use crate::probe::replication::VolumeStates;
use crate::replication::replica::{Replica, ReplicaOptions};
use crate::replication::status::ReplicaStatus;
use crate::replication::tls::TlsMaterial;
use crate::replication::wire::Resolution;
use crate::runtime::storage::storage_report;

/// How long a failed open waits before the next attempt.
const REOPEN_EVERY: Duration = Duration::from_secs(2);
/// Status changes are forwarded at most this often (a resync changes its progress all the
/// time); disk state and connection changes still arrive within this delay.
const STATUS_EVERY: Duration = Duration::from_millis(100);
/// How long a demotion waits for the attach helper's NBD connection to close.
const DEMOTE_WAIT: Duration = Duration::from_secs(10);

/// The NBD socket of `volume` of group `key` under `runtime_dir`.
pub fn nbd_socket(runtime_dir: &Path, key: &GroupKey, volume: &str) -> PathBuf {
    runtime_dir.join(format!("{}_{}_{volume}.nbd", key.namespace, key.name))
}

/// What the volumes need from the node.
#[derive(Clone, Debug)]
pub struct VolumeContext {
    pub node: String,
    pub key: GroupKey,
    pub runtime_dir: PathBuf,
    pub tls: Option<TlsMaterial>,
    pub board: Arc<Board>,
    pub inbox: UnboundedSender<Input>,
    pub metrics: Arc<AgentMetrics>,
}

/// What a new replica status changes, as [`GroupVolumes::status_changed`] sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct StatusChange {
    /// The engine event to feed: disk state or connection changed since it last heard.
    pub engine: Option<(String, DiskState, ConnectionState)>,
    /// A state the status report shows changed (a promotion keeps disk and connection,
    /// so the engine hearing nothing must not leave the report saying Secondary).
    pub shown: bool,
}

/// Whether two statuses show the same states; counters and progress move all the time
/// and go out with the next periodic report.
fn same_states(a: &ReplicaStatus, b: &ReplicaStatus) -> bool {
    (a.role, a.disk, a.connection, a.peer_disk, a.peer_role, a.fenced, &a.split_brain, &a.refused)
        == (b.role, b.disk, b.connection, b.peer_disk, b.peer_role, b.fenced, &b.split_brain, &b.refused)
}

/// The group's replicas, opened or being opened.
#[derive(Debug, Default)]
pub struct GroupVolumes {
    replicas: BTreeMap<String, Replica>,
    /// Last status per volume (also of volumes whose replica is not open).
    status: BTreeMap<String, ReplicaStatus>,
    /// What the engine was last told per volume.
    told: BTreeMap<String, (DiskState, ConnectionState)>,
    /// The same states for the group's `replication` monitors.
    states: VolumeStates,
    /// The last verify each volume's replica finished on this node.
    verified: BTreeMap<String, VerifyReport>,
    /// Each volume's backing on this node, for the storage part of the reports.
    backings: BTreeMap<String, PathBuf>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for GroupVolumes {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl GroupVolumes {
    /// Starts opening every volume of `config` this node has a backing for.
    pub fn open(ctx: &VolumeContext, config: &GroupConfig) -> GroupVolumes {
        let mut volumes = GroupVolumes::default();
        for volume in &config.volumes {
            let Some(backing) = volume.spec.backing.iter().find(|b| b.node == ctx.node) else {
                continue;
            };
            volumes.backings.insert(volume.name.clone(), PathBuf::from(&backing.path));
            let (ctx, volume) = (ctx.clone(), volume.clone());
            let span = tracing::info_span!("volume", volume = %volume.name);
            let ping_every = ping_interval(config.spec.heartbeat.interval.as_std());
            volumes.tasks.push(tokio::spawn(open_until_done(ctx, volume, ping_every).instrument(span)));
        }
        volumes
    }

    /// What the group's `replication` monitors read.
    pub fn states(&self) -> &VolumeStates {
        &self.states
    }

    pub fn replica(&self, volume: &str) -> Option<&Replica> {
        self.replicas.get(volume)
    }

    /// A replica finished opening: its status and events start flowing.
    pub fn opened(&mut self, ctx: &VolumeContext, volume: String, replica: Replica) {
        let span = tracing::info_span!("volume", volume = %volume);
        self.tasks.push(tokio::spawn(
            forward_status(ctx.inbox.clone(), volume.clone(), replica.clone()).instrument(span.clone()),
        ));
        self.tasks.push(tokio::spawn(
            forward_events(ctx.inbox.clone(), Arc::clone(&ctx.board), ctx.key.clone(), volume.clone(), replica.clone())
                .instrument(span),
        ));
        self.replicas.insert(volume, replica);
    }

    /// Records `status` and says what of it must go out now.
    pub fn status_changed(&mut self, volume: String, status: ReplicaStatus) -> StatusChange {
        let now = (status.disk, status.connection);
        let shown = self.status.get(&volume).is_none_or(|old| !same_states(old, &status));
        self.states.set(status.report());
        self.status.insert(volume.clone(), status);
        if self.told.get(&volume) == Some(&now) {
            return StatusChange { engine: None, shown };
        }
        self.told.insert(volume.clone(), now);
        StatusChange { engine: Some((volume, now.0, now.1)), shown }
    }

    /// The engine's epoch, so that a primary learning of a newer one fences itself.
    pub fn observe_epoch(&self, epoch: u64) {
        for replica in self.replicas.values() {
            replica.observe_epoch(epoch);
        }
    }

    /// The engine self-fenced (its lease is ending unrenewed): fences every primary replica.
    pub fn lease_lost(&self, reason: &str) {
        for replica in self.replicas.values() {
            replica.lease_lost(reason);
        }
    }

    /// Per-volume disk state, connection, out-of-sync bytes and sync progress.
    pub fn reports(&self) -> Vec<VolumeReport> {
        self.status
            .values()
            .map(|status| VolumeReport {
                last_verify: self.verified.get(&status.volume).cloned(),
                storage: self.backings.get(&status.volume).and_then(|path| storage_report(path)),
                ..status.report()
            })
            .collect()
    }

    /// Records what a finished verify found, for the reports.
    pub fn verified(&mut self, volume: String, report: VerifyReport) {
        self.verified.insert(volume, report);
    }

    /// Starts an online verify for admin action `action`; the answer arrives as
    /// [`Input::VerifyStarted`], the findings as an event and [`Input::VolumeVerified`].
    pub fn start_verify(&self, inbox: &UnboundedSender<Input>, volume: &str, action: String) {
        let (inbox, volume) = (inbox.clone(), volume.to_string());
        let Some(replica) = self.replicas.get(&volume).cloned() else {
            let result = Err(format!("volume {volume}: the replica is not open on this node (see its events)"));
            let _ = inbox.send(Input::VerifyStarted { action, volume, result });
            return;
        };
        tokio::spawn(
            async move {
                let result = replica.start_verify().await.map_err(|e| e.to_string());
                let _ = inbox.send(Input::VerifyStarted { action, volume, result });
            }
            .in_current_span(),
        );
    }

    /// Carries out a promotion or demotion; the answer arrives as [`Input::VolumeDone`].
    pub fn run(&self, inbox: &UnboundedSender<Input>, volume: &str, op: VolumeOp, epoch: u64, force: bool) {
        let inbox = inbox.clone();
        let volume = volume.to_string();
        let Some(replica) = self.replicas.get(&volume).cloned() else {
            // Opening runs in the background and the engine stops everything at start-up.
            // A replica that is not open serves nothing and opens as Secondary, so there
            // is nothing to demote; a promotion, though, cannot happen without it.
            let result = match op {
                VolumeOp::Demote => Ok(()),
                VolumeOp::Promote => {
                    Err(format!("volume {volume}: the replica is not open on this node (see its events)"))
                }
            };
            let _ = inbox.send(Input::VolumeDone { volume, op, result });
            return;
        };
        tokio::spawn(
            async move {
                let result = match op {
                    VolumeOp::Promote => replica.promote(epoch, force).await.map_err(|e| e.to_string()),
                    VolumeOp::Demote => {
                        crate::volume_step::demote(&replica, DEMOTE_WAIT).await.map_err(|e| e.to_string())
                    }
                };
                let _ = inbox.send(Input::VolumeDone { volume, op, result });
            }
            .in_current_span(),
        );
    }

    /// The operator chose a split-brain winner: keep the local data (winner) or discard it
    /// and resync from the peer (loser). The outcome is an event.
    pub fn resolve_split_brain(&self, board: &Arc<Board>, key: &GroupKey, volume: &str, keep_local: bool, epoch: u64) {
        let (board, key, volume) = (Arc::clone(board), key.clone(), volume.to_string());
        let Some(replica) = self.replicas.get(&volume).cloned() else {
            board.event(
                &key,
                record(
                    EventType::Warning,
                    "SplitBrainNotResolved",
                    format!("volume {volume}: the replica is not open on this node; nothing resolved"),
                    epoch,
                ),
            );
            return;
        };
        let resolution = if keep_local { Resolution::KeepLocal } else { Resolution::DiscardLocal };
        tokio::spawn(
            async move {
                let (type_, reason, message) = match replica.resolve_split_brain(resolution).await {
                    Ok(()) if keep_local => {
                        (EventType::Normal, "SplitBrainResolution", format!("volume {volume}: keeping the local data"))
                    }
                    Ok(()) => (
                        EventType::Warning,
                        "SplitBrainResolution",
                        format!("volume {volume}: discarding the local changes and resyncing from the peer"),
                    ),
                    Err(e) => (EventType::Warning, "SplitBrainNotResolved", format!("{e}")),
                };
                tracing::warn!(reason, "{message}");
                board.event(&key, record(type_, reason, message, epoch));
            }
            .in_current_span(),
        );
    }

    /// Stops every replica (releasing backings and sockets).
    pub async fn shutdown(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        for (volume, replica) in std::mem::take(&mut self.replicas) {
            if let Err(e) = replica.shutdown().await {
                tracing::warn!(volume, error = %e, "stopping the replica");
            }
        }
    }
}

/// The replication link pings as often as the group heartbeats (within bounds): a
/// promotion after the peer's loss closes a link that has been silent for one and a half
/// ping intervals, so the link must not take longer to read as silent than the heartbeats.
/// The interval is fixed when the replica opens.
fn ping_interval(heartbeat: Duration) -> Duration {
    heartbeat.clamp(Duration::from_millis(20), Duration::from_millis(500))
}

async fn open_until_done(ctx: VolumeContext, volume: VolumeConfig, ping_every: Duration) {
    let socket = nbd_socket(&ctx.runtime_dir, &ctx.key, &volume.name);
    let mut reported: Option<String> = None;
    loop {
        let opened = match std::fs::create_dir_all(&ctx.runtime_dir) {
            Ok(()) => {
                let mut options = ReplicaOptions::new(&socket);
                options.tls.clone_from(&ctx.tls);
                options.timing.ping_interval = ping_every;
                options.observer = Some(ctx.metrics.volume_io(&ctx.key.to_string(), &volume.name));
                Replica::open(&volume, &ctx.node, options).await.map_err(|e| e.to_string())
            }
            Err(e) => Err(format!("runtime directory {}: {e}", ctx.runtime_dir.display())),
        };
        match opened {
            Ok(replica) => {
                tracing::info!(socket = %socket.display(), "replica open");
                let _ = ctx.inbox.send(Input::VolumeOpened { volume: volume.name.clone(), replica: Box::new(replica) });
                return;
            }
            Err(e) => {
                if reported.as_ref() != Some(&e) {
                    let message = format!("{e}; retrying every {}s", REOPEN_EVERY.as_secs());
                    tracing::warn!("{message}");
                    ctx.board.event(&ctx.key, record(EventType::Warning, "VolumeUnavailable", message, 0));
                    reported = Some(e);
                }
                tokio::time::sleep(REOPEN_EVERY).await;
            }
        }
    }
}

async fn forward_status(inbox: UnboundedSender<Input>, volume: String, replica: Replica) {
    let mut watch = replica.watch();
    loop {
        let status = watch.borrow_and_update().clone();
        if inbox.send(Input::VolumeStatus { volume: volume.clone(), status: Box::new(status) }).is_err() {
            return;
        }
        tokio::time::sleep(STATUS_EVERY).await;
        if watch.changed().await.is_err() {
            return;
        }
    }
}

async fn forward_events(
    inbox: UnboundedSender<Input>,
    board: Arc<Board>,
    key: GroupKey,
    volume: String,
    replica: Replica,
) {
    let mut events = replica.events();
    loop {
        match events.recv().await {
            Ok(event) => {
                if let Some(report) = event.verify_report(super::clock::rfc3339_now()) {
                    let _ = inbox.send(Input::VolumeVerified { volume: volume.clone(), report: Box::new(report) });
                }
                let (reason, warning) = event.reason();
                let message = format!("volume {volume}: {}", event.message());
                let type_ = if warning { EventType::Warning } else { EventType::Normal };
                if warning {
                    tracing::warn!(reason, "{message}");
                } else {
                    tracing::info!(reason, "{message}");
                }
                board.event(&key, record(type_, reason, message, replica.status().epoch));
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "replica events were dropped");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_named_per_group_and_volume() {
        let key = GroupKey { namespace: "db".into(), name: "pg".into() };
        assert_eq!(nbd_socket(Path::new("/run/hapair"), &key, "data"), PathBuf::from("/run/hapair/db_pg_data.nbd"));
    }

    fn status(disk: DiskState, connection: ConnectionState, out_of_sync: u64) -> ReplicaStatus {
        let snapshot = crate::replication::machine::Snapshot {
            disk,
            connection,
            peer_disk: None,
            peer_role: None,
            out_of_sync_bytes: out_of_sync,
            sync: None,
            epoch: 1,
            ..crate::replication::status::tests::snapshot()
        };
        ReplicaStatus::new("data", "b", "a", snapshot)
    }

    #[test]
    fn the_engine_hears_only_disk_state_and_connection_changes_while_reports_follow_every_status() {
        let mut volumes = GroupVolumes::default();
        let (inconsistent, syncing) = (DiskState::Inconsistent, ConnectionState::SyncTarget);
        assert_eq!(
            volumes.status_changed("data".into(), status(inconsistent, syncing, 8 << 20)),
            StatusChange { engine: Some(("data".into(), inconsistent, syncing)), shown: true }
        );
        // Resync progress alone: nothing to tell, the periodic report carries it.
        assert_eq!(
            volumes.status_changed("data".into(), status(inconsistent, syncing, 4 << 20)),
            StatusChange { engine: None, shown: false }
        );
        assert_eq!(volumes.reports()[0].out_of_sync_bytes, 4 << 20);
        assert_eq!(volumes.reports()[0].disk_state, inconsistent);
        let (up, connected) = (DiskState::UpToDate, ConnectionState::Connected);
        assert_eq!(
            volumes.status_changed("data".into(), status(up, connected, 0)),
            StatusChange { engine: Some(("data".into(), up, connected)), shown: true }
        );
        assert_eq!(volumes.reports().len(), 1);
    }

    #[test]
    fn a_promotion_keeps_disk_and_connection_but_goes_out_at_once() {
        let mut volumes = GroupVolumes::default();
        let (up, lost) = (DiskState::UpToDate, ConnectionState::Connecting);
        volumes.status_changed("data".into(), status(up, lost, 0));
        let mut promoted = status(up, lost, 0);
        promoted.role = hapair_crds::volume::VolumeRole::Primary;
        assert_eq!(volumes.status_changed("data".into(), promoted), StatusChange { engine: None, shown: true });
        assert_eq!(volumes.reports()[0].role, hapair_crds::volume::VolumeRole::Primary);
    }

    #[tokio::test]
    async fn operations_on_a_volume_that_is_not_open_fail_saying_so() {
        let volumes = GroupVolumes::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        volumes.run(&tx, "data", VolumeOp::Promote, 3, false);
        match rx.recv().await {
            Some(Input::VolumeDone { volume, op: VolumeOp::Promote, result: Err(e) }) => {
                assert_eq!(volume, "data");
                assert!(e.contains("not open"), "{e}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
