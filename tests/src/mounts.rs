//! Guards for the block-device plumbing of the volume tests: mounts made by the code under
//! test, loop devices, FUSE mounts and the whole nbdfuse attachment, each torn down on drop
//! even when the NBD server behind it is dead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns::run;

/// Cleanup must never fail a test that is already failing, so errors are dropped here.
fn run_quiet(program: &str, args: &[&str]) -> Option<String> {
    run(program, args).ok().map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A mount point unmounted (lazily, so a dead backing device cannot block it) on drop.
#[derive(Debug)]
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let p = self.0.display().to_string();
        if is_mounted(&self.0) {
            let _ = run_quiet("umount", &["-l", &p]);
        }
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    let p = path.display().to_string();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(p.as_str()))
}

/// A loop device detached on drop.
#[derive(Debug)]
pub struct LoopGuard(pub String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = run_quiet("losetup", &["-d", &self.0]);
    }
}

/// A FUSE mount unmounted on drop.
#[derive(Debug)]
pub struct FuseGuard(pub PathBuf);

impl Drop for FuseGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = run_quiet("fusermount3", &["-u", "-z", &self.0.display().to_string()]);
        }
    }
}

/// Everything `scripts/nbd-attach-fuse.sh attach` created for one device (the loop device,
/// the nbdfuse mount and process, its directory), torn down on drop even if the NBD
/// server behind it is dead.
#[derive(Debug)]
pub struct FuseAttachGuard {
    pub device: String,
    dir: Option<PathBuf>,
}

impl FuseAttachGuard {
    pub fn new(device: &str) -> Self {
        let dir = run_quiet("losetup", &["-n", "-O", "BACK-FILE", device])
            .and_then(|f| Path::new(f.trim()).parent().and_then(Path::parent).map(Path::to_path_buf));
        FuseAttachGuard { device: device.to_string(), dir }
    }

    /// Forgets the device (after a clean detach).
    pub fn disarm(mut self) {
        self.dir = None;
        self.device.clear();
    }
}

impl Drop for FuseAttachGuard {
    fn drop(&mut self) {
        if !self.device.is_empty() {
            let _ = run_quiet("losetup", &["-d", &self.device]);
        }
        if let Some(dir) = self.dir.take() {
            let mnt = dir.join("mnt");
            if is_mounted(&mnt) {
                let _ = run_quiet("fusermount3", &["-u", "-z", &mnt.display().to_string()]);
            }
            if let Ok(pid) = std::fs::read_to_string(dir.join("pid"))
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Tears down what `scripts/nbd-attach-fuse.sh` attached under its `HAPAIR_ATTACH_DIR` when
/// agents ran it, on drop: `nbd-attach-fuse.sh cleanup` (loop devices, FUSE connections
/// aborted, nbdfuse killed). A killed agent's nbdfuse otherwise keeps a loop device busy
/// for good: see the script.
#[derive(Debug)]
pub struct AttachDirCleanup(pub PathBuf);

impl Drop for AttachDirCleanup {
    fn drop(&mut self) {
        let cleanup = std::process::Command::new(attach_script())
            .arg("cleanup")
            .env("HAPAIR_ATTACH_DIR", &self.0)
            .stdin(std::process::Stdio::null())
            .spawn();
        // Bounded: a test must not hang in its cleanup, whatever the kernel is waiting for.
        if let Ok(child) = cleanup {
            let mut guard = crate::netns::ChildGuard::new(child, "nbd-attach-fuse.sh cleanup");
            if guard.wait(Duration::from_secs(60)).is_none() {
                eprintln!("cleanup: nbd-attach-fuse.sh cleanup in {} did not finish within 60 s", self.0.display());
            }
        }
    }
}

/// `scripts/nbd-attach-fuse.sh`, the volume step's attach helper where no `/dev/nbd*` exists.
pub fn attach_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nbd-attach-fuse.sh")
}
