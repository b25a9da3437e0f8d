//! Attaching an NBD export as a local block device, and detaching it.
//!
//! Where the kernel has the `nbd` driver, `nbd-client` attaches the export's Unix socket to
//! a free `/dev/nbdN`. Elsewhere the step's `attachCommand` does it: it runs with
//! `HAPAIR_NBD_SOCKET` set and prints the block device it attached (the tests use
//! `scripts/nbd-attach-fuse.sh`: `nbdfuse` plus a loop device); `detachCommand` undoes it
//! with `HAPAIR_BLOCK_DEVICE` set.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

/// How this node attaches exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachMethod {
    NbdClient { device: PathBuf },
    Command { attach: String, detach: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("no attachCommand is configured and this machine has no free /dev/nbd* device (is the nbd module loaded?)")]
    NoMethod,
    #[error("{command:?} failed: {message}")]
    Failed { command: String, message: String },
    #[error("{command:?} did not finish within {seconds}s")]
    Timeout { command: String, seconds: u64 },
    #[error("{command:?} printed {device:?}, which is not a block device")]
    NotABlockDevice { command: String, device: String },
}

/// Picks the attach method: the step's command when given, else a free `/dev/nbdN`.
pub fn choose(attach_command: Option<&str>, detach_command: Option<&str>) -> Result<AttachMethod, AttachError> {
    if let Some(attach) = attach_command {
        return Ok(AttachMethod::Command { attach: attach.to_string(), detach: detach_command.map(str::to_string) });
    }
    free_nbd_device(Path::new("/sys/block"), Path::new("/dev"))
        .map(|device| AttachMethod::NbdClient { device })
        .ok_or(AttachError::NoMethod)
}

/// The first `/dev/nbdN` whose sysfs entry shows no attached client.
pub fn free_nbd_device(sys_block: &Path, dev: &Path) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("nbd") && n[3..].chars().all(|c| c.is_ascii_digit()) && n.len() > 3)
        .collect();
    names.sort_by_key(|n| n[3..].parse::<u32>().unwrap_or(u32::MAX));
    names.into_iter().find(|n| !sys_block.join(n).join("pid").exists() && dev.join(n).exists()).map(|n| dev.join(n))
}

/// The command line `nbd-client` is run with.
pub fn nbd_client_args(socket: &Path, device: &Path) -> Vec<String> {
    vec![
        "-unix".into(),
        socket.display().to_string(),
        device.display().to_string(),
        "-block-size".into(),
        "4096".into(),
    ]
}

async fn run(mut cmd: Command, label: String, timeout: Duration) -> Result<String, AttachError> {
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| AttachError::Timeout { command: label.clone(), seconds: timeout.as_secs() })?
        .map_err(|e| AttachError::Failed { command: label.clone(), message: e.to_string() })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(AttachError::Failed { command: label, message: format!("{}: {stderr}", out.status) });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Attaches the export at `socket`; returns the block device.
pub async fn attach(method: &AttachMethod, socket: &Path, timeout: Duration) -> Result<PathBuf, AttachError> {
    match method {
        AttachMethod::NbdClient { device } => {
            let mut cmd = Command::new("nbd-client");
            cmd.args(nbd_client_args(socket, device));
            run(cmd, "nbd-client".into(), timeout).await?;
            Ok(device.clone())
        }
        AttachMethod::Command { attach, .. } => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(attach).env("HAPAIR_NBD_SOCKET", socket);
            let out = run(cmd, attach.clone(), timeout).await?;
            let device = out.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default().to_string();
            let is_block = std::fs::metadata(&device).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_block_device()
            });
            if !is_block {
                return Err(AttachError::NotABlockDevice { command: attach.clone(), device });
            }
            Ok(PathBuf::from(device))
        }
    }
}

/// Detaches what [`attach`] attached.
pub async fn detach(method: &AttachMethod, device: &Path, timeout: Duration) -> Result<(), AttachError> {
    match method {
        AttachMethod::NbdClient { .. } => {
            let mut cmd = Command::new("nbd-client");
            cmd.arg("-d").arg(device);
            run(cmd, "nbd-client -d".into(), timeout).await.map(|_| ())
        }
        AttachMethod::Command { detach: Some(detach), .. } => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(detach).env("HAPAIR_BLOCK_DEVICE", device);
            run(cmd, detach.clone(), timeout).await.map(|_| ())
        }
        AttachMethod::Command { detach: None, attach } => Err(AttachError::Failed {
            command: attach.clone(),
            message: "no detachCommand is configured to undo it".into(),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_configured_command() {
        assert_eq!(
            choose(Some("attach.sh"), Some("detach.sh")),
            Ok(AttachMethod::Command { attach: "attach.sh".into(), detach: Some("detach.sh".into()) })
        );
    }

    #[test]
    fn finds_the_first_free_nbd_device() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, dev) = (dir.path().join("sys"), dir.path().join("dev"));
        for n in ["nbd0", "nbd1", "nbd10", "nbd2", "loop0"] {
            std::fs::create_dir_all(sys.join(n)).unwrap();
        }
        std::fs::create_dir_all(&dev).unwrap();
        for n in ["nbd0", "nbd1", "nbd2", "nbd10"] {
            std::fs::write(dev.join(n), b"").unwrap();
        }
        std::fs::write(sys.join("nbd0/pid"), b"123").unwrap();
        assert_eq!(free_nbd_device(&sys, &dev), Some(dev.join("nbd1")));
        std::fs::write(sys.join("nbd1/pid"), b"124").unwrap();
        std::fs::write(sys.join("nbd2/pid"), b"125").unwrap();
        assert_eq!(free_nbd_device(&sys, &dev), Some(dev.join("nbd10")));
        assert_eq!(free_nbd_device(&dir.path().join("missing"), &dev), None);
        assert_eq!(
            nbd_client_args(Path::new("/run/v.sock"), Path::new("/dev/nbd1")),
            vec!["-unix", "/run/v.sock", "/dev/nbd1", "-block-size", "4096"]
        );
    }

    #[tokio::test]
    async fn command_attach_reports_failures_and_non_devices() {
        let method = AttachMethod::Command { attach: "echo /etc/hostname".into(), detach: None };
        let err = attach(&method, Path::new("/nonexistent.sock"), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, AttachError::NotABlockDevice { .. }), "{err}");
        let method = AttachMethod::Command { attach: "echo oops >&2; exit 3".into(), detach: None };
        let err = attach(&method, Path::new("/x"), Duration::from_secs(5)).await.unwrap_err();
        assert!(err.to_string().contains("oops"), "{err}");
        let method =
            AttachMethod::Command { attach: "test \"$HAPAIR_NBD_SOCKET\" = /s.sock && sleep 5".into(), detach: None };
        let err = attach(&method, Path::new("/s.sock"), Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, AttachError::Timeout { .. }), "{err}");
        let err = detach(&method, Path::new("/dev/null"), Duration::from_secs(1)).await.unwrap_err();
        assert!(err.to_string().contains("no detachCommand"), "{err}");
    }
}
