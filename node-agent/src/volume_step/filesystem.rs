//! The filesystem on an attached volume: detecting it, creating it on first use (only when
//! asked), mounting, unmounting and flushing.

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("{device} holds no filesystem and mkfs was not requested (set mkfs: true to create one on first use)")]
    NoFilesystem { device: String },
    #[error("{device} holds a {found} filesystem, but the step expects {expected}: refusing to touch it")]
    WrongType { device: String, found: String, expected: String },
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    #[error("{path} is still busy after {seconds}s: {message}")]
    Busy { path: String, seconds: u64, message: String },
}

async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<std::process::Output, FsError> {
    let label = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true).stdin(std::process::Stdio::null());
    tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| FsError::Command {
            command: label.clone(),
            message: format!("no answer within {}s", timeout.as_secs()),
        })?
        .map_err(|e| FsError::Command { command: label, message: e.to_string() })
}

fn failed(program: &str, args: &[&str], out: &std::process::Output) -> FsError {
    FsError::Command {
        command: format!("{program} {}", args.join(" ")),
        message: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
    }
}

/// The filesystem type on `device`, probing the device itself (not a cache).
pub async fn detect(device: &Path) -> Result<Option<String>, FsError> {
    let dev = device.display().to_string();
    let args = ["-p", "-o", "value", "-s", "TYPE", dev.as_str()];
    let out = run("blkid", &args, Duration::from_secs(30)).await?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((!t.is_empty()).then_some(t))
        }
        // blkid's "nothing found".
        Some(2) => Ok(None),
        _ => Err(failed("blkid", &args, &out)),
    }
}

/// Makes sure `device` holds a `fs_type` filesystem, creating one only if it holds none and
/// `mkfs` was asked for. Returns whether it created one.
pub async fn ensure(device: &Path, fs_type: &str, mkfs: bool) -> Result<bool, FsError> {
    let dev = device.display().to_string();
    match detect(device).await? {
        Some(found) if found == fs_type => Ok(false),
        Some(found) => Err(FsError::WrongType { device: dev, found, expected: fs_type.to_string() }),
        None if !mkfs => Err(FsError::NoFilesystem { device: dev }),
        None => {
            let program = format!("mkfs.{fs_type}");
            let args = ["-q", dev.as_str()];
            let out = run(&program, &args, Duration::from_secs(600)).await?;
            if !out.status.success() {
                return Err(failed(&program, &args, &out));
            }
            Ok(true)
        }
    }
}

pub async fn mount(device: &Path, path: &Path, fs_type: &str, options: &[String]) -> Result<(), FsError> {
    std::fs::create_dir_all(path)
        .map_err(|e| FsError::Command { command: format!("mkdir {}", path.display()), message: e.to_string() })?;
    let dev = device.display().to_string();
    let target = path.display().to_string();
    let opts = options.join(",");
    let mut args = vec!["-t", fs_type];
    if !opts.is_empty() {
        args.extend(["-o", opts.as_str()]);
    }
    args.extend([dev.as_str(), target.as_str()]);
    let out = run("mount", &args, Duration::from_secs(120)).await?;
    if !out.status.success() {
        return Err(failed("mount", &args, &out));
    }
    Ok(())
}

/// Unmounts, retrying while the mount is busy; never detaches lazily, because a lazy
/// unmount would let writes continue after the volume is demoted.
pub async fn unmount(path: &Path, timeout: Duration) -> Result<(), FsError> {
    let target = path.display().to_string();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let out = run("umount", &[target.as_str()], Duration::from_secs(60)).await?;
        if out.status.success() {
            return Ok(());
        }
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if message.contains("not mounted") {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(FsError::Busy { path: target, seconds: timeout.as_secs(), message });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes the device's cached blocks through to the export and asks it to flush.
pub async fn flush(device: &Path) -> Result<(), FsError> {
    let dev = device.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(&dev).and_then(|f| f.sync_all()))
        .await
        .map_err(|e| FsError::Command { command: format!("fsync {}", device.display()), message: e.to_string() })?
        .map_err(|e| FsError::Command { command: format!("fsync {}", device.display()), message: e.to_string() })
}
