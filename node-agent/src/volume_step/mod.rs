//! The pieces of the `volume` flow step: promote the replica, attach its export as a block
//! device, create the filesystem on first use when asked, mount it; and in reverse on
//! demotion: unmount, flush, detach, then demote. The flow runtime calls [`activate`] and
//! [`deactivate`]; each stage's failure names the stage.

pub mod attach;
pub mod filesystem;

use std::path::PathBuf;
use std::time::Duration;

use hapair_crds::hagroup::VolumeStep;

use crate::replication::replica::Replica;
use attach::AttachMethod;

/// What the step does, resolved from its spec on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub mount_path: Option<PathBuf>,
    pub fs_type: String,
    pub mount_options: Vec<String>,
    pub mkfs: bool,
    pub attach: AttachMethod,
    pub timeout: Duration,
}

impl StepPlan {
    pub fn from_step(step: &VolumeStep) -> Result<StepPlan, StepError> {
        let attach = attach::choose(step.attach_command.as_deref(), step.detach_command.as_deref())
            .map_err(|e| StepError::new(Stage::Attach, e))?;
        Ok(StepPlan {
            mount_path: step.mount_path.as_ref().map(PathBuf::from),
            fs_type: step.fs_type.clone(),
            mount_options: step.mount_options.clone(),
            mkfs: step.mkfs,
            attach,
            timeout: Duration::from_secs(60),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Promote,
    Attach,
    Filesystem,
    Mount,
    Unmount,
    Flush,
    Detach,
    Demote,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("volume step, {stage:?}: {message}")]
pub struct StepError {
    pub stage: Stage,
    pub message: String,
}

impl StepError {
    fn new(stage: Stage, e: impl std::fmt::Display) -> Self {
        StepError { stage, message: e.to_string() }
    }
}

/// A volume in use on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveVolume {
    pub device: PathBuf,
    pub mounted: Option<PathBuf>,
    pub created_filesystem: bool,
    attach: AttachMethod,
}

/// Promotes the replica at `epoch`, attaches, prepares the filesystem and mounts it. A
/// failure undoes the stages already done (best effort) before returning.
pub async fn activate(replica: &Replica, plan: &StepPlan, epoch: u64) -> Result<ActiveVolume, StepError> {
    replica.promote(epoch, false).await.map_err(|e| StepError::new(Stage::Promote, e))?;
    match bring_up(replica, plan).await {
        Ok(active) => Ok(active),
        Err(e) => {
            if let Err(undo) = demote(replica, plan.timeout).await {
                tracing::warn!(error = %undo, "demoting after a failed volume step activation failed too");
            }
            Err(e)
        }
    }
}

/// The step's part once the replica is primary (the agent runtime promotes separately,
/// when its engine says so): attach, create the filesystem on first use when asked, mount.
/// A failure undoes what was done (best effort); the replica stays primary.
pub async fn bring_up(replica: &Replica, plan: &StepPlan) -> Result<ActiveVolume, StepError> {
    let socket = replica
        .nbd_socket()
        .ok_or_else(|| StepError::new(Stage::Attach, "the replica is not primary: nothing to attach"))?;
    let device =
        attach::attach(&plan.attach, &socket, plan.timeout).await.map_err(|e| StepError::new(Stage::Attach, e))?;
    let mut active = ActiveVolume { device, mounted: None, created_filesystem: false, attach: plan.attach.clone() };
    let Some(path) = &plan.mount_path else { return Ok(active) };
    let mounted = async {
        // Mounting first: on every takeover but the first the filesystem is there, and
        // probing it beforehand (blkid) costs tens of milliseconds of the outage. A mount
        // never writes to a device it does not recognise, so only when it fails is the
        // device probed, to create the filesystem on first use or to say what is there.
        let mount = || filesystem::mount(&active.device, path, &plan.fs_type, &plan.mount_options);
        let Err(first) = mount().await else { return Ok(false) };
        let created = filesystem::ensure(&active.device, &plan.fs_type, plan.mkfs)
            .await
            .map_err(|e| StepError::new(Stage::Filesystem, e))?;
        if !created {
            return Err(StepError::new(Stage::Mount, first));
        }
        mount().await.map_err(|e| StepError::new(Stage::Mount, e)).map(|()| true)
    }
    .await;
    match mounted {
        Ok(created) => {
            active.created_filesystem = created;
            active.mounted = Some(path.clone());
            Ok(active)
        }
        Err(e) => {
            if let Err(undo) = take_down(active, plan.timeout, replica.status().fenced).await {
                tracing::warn!(error = %undo, "undoing a failed attach failed too");
            }
            Err(e)
        }
    }
}

/// Unmounts, flushes and detaches; the replica's role is left alone.
///
/// `fenced`: the replica was fenced by a newer epoch (the peer serves), so it refuses every
/// write and flush. A failed flush then loses nothing anyone was promised: every write
/// acknowledged before the fence is already on the peer (protocol C), and every later one
/// was refused to its writer. Stopping anyway is what lets this node stand by; on a
/// replica that is not fenced, a failed flush may hide lost data and stops the stop.
pub async fn take_down(active: ActiveVolume, timeout: Duration, fenced: bool) -> Result<(), StepError> {
    if let Some(path) = &active.mounted {
        filesystem::unmount(path, timeout).await.map_err(|e| StepError::new(Stage::Unmount, e))?;
    }
    match filesystem::flush(&active.device).await {
        Ok(()) => {}
        Err(e) if fenced => {
            tracing::warn!(
                device = %active.device.display(),
                error = %e,
                "flush refused by the fenced replica (a newer epoch serves); writes made after the fence are discarded"
            );
        }
        Err(e) => return Err(StepError::new(Stage::Flush, e)),
    }
    attach::detach(&active.attach, &active.device, timeout).await.map_err(|e| StepError::new(Stage::Detach, e))
}

/// Demotes the replica, waiting up to `timeout` for the attach helper's NBD connection to
/// close (it does so asynchronously after a detach).
pub async fn demote(replica: &Replica, timeout: Duration) -> Result<(), StepError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match replica.demote(false).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline && e.to_string().contains("NBD client") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(StepError::new(Stage::Demote, e)),
        }
    }
}

/// Unmounts, flushes, detaches and only then demotes, so nothing written through the
/// mount can reach the volume after it is secondary.
pub async fn deactivate(replica: &Replica, active: ActiveVolume, timeout: Duration) -> Result<(), StepError> {
    take_down(active, timeout, replica.status().fenced).await?;
    demote(replica, timeout).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A device whose flush fails (it does not exist), detached by a command that leaves
    /// a mark.
    fn failing_device(dir: &std::path::Path) -> ActiveVolume {
        let detach = format!("touch {}", dir.join("detached").display());
        ActiveVolume {
            device: dir.join("no-such-device"),
            mounted: None,
            created_filesystem: false,
            attach: AttachMethod::Command { attach: "false".into(), detach: Some(detach) },
        }
    }

    #[tokio::test]
    async fn a_failed_flush_stops_the_stop_of_a_replica_that_is_not_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let err = take_down(failing_device(dir.path()), Duration::from_secs(5), false).await.unwrap_err();
        assert!(err.to_string().contains("fsync"), "{err}");
        assert!(!dir.path().join("detached").exists(), "detached after a failed flush");
    }

    #[tokio::test]
    async fn a_fenced_replica_is_detached_even_though_it_refuses_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        take_down(failing_device(dir.path()), Duration::from_secs(5), true).await.unwrap();
        assert!(dir.path().join("detached").exists(), "the fenced replica's device was not detached");
    }
}
