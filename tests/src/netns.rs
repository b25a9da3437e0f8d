//! Hosts made of network namespaces, and guards for everything a test creates: namespaces,
//! veth pairs, bridges, child processes, mounts, loop devices and FUSE mounts. Every guard
//! removes its object on drop, also when the test panics. Names are unique per test process
//! (a prefix, the process id and a counter), so tests running in parallel never collide and
//! never touch what they did not create.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process, at most 15 characters (the interface-name limit).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}{:x}{n:x}", std::process::id());
    name.chars().take(15).collect()
}

#[derive(Debug, thiserror::Error)]
#[error("{command}: {message}")]
pub struct CmdError {
    pub command: String,
    pub message: String,
}

/// Runs a short administrative command, bounded by `timeout(1)`.
pub fn run(program: &str, args: &[&str]) -> Result<String, CmdError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CmdError { command: command.clone(), message: e.to_string() })?;
    if !out.status.success() {
        return Err(CmdError {
            command,
            message: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace; deleted (with its interfaces) on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Netns, CmdError> {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String, CmdError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that runs `program` inside this namespace (network only: the mount
    /// namespace stays the host's, so mounts and sockets made inside are visible outside).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg("--").arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes left inside would keep the namespace alive; they are this test's.
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A veth pair with one end in each namespace.
#[derive(Debug)]
pub struct Veth {
    pub a: String,
    pub b: String,
    ns_a: String,
}

impl Veth {
    pub fn new(a: &Netns, b: &Netns) -> Result<Veth, CmdError> {
        let (na, nb) = (unique("hva"), unique("hvb"));
        run("ip", &["link", "add", &na, "netns", &a.name, "type", "veth", "peer", "name", &nb, "netns", &b.name])?;
        Ok(Veth { a: na, b: nb, ns_a: a.name.clone() })
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = run("ip", &["-n", &self.ns_a, "link", "del", &self.a]);
    }
}

/// A bridge inside a namespace, for topologies with more than two hosts.
#[derive(Debug)]
pub struct Bridge {
    pub name: String,
    ns: String,
}

impl Bridge {
    pub fn new(ns: &Netns) -> Result<Bridge, CmdError> {
        let name = unique("hbr");
        ns.ip(&["link", "add", &name, "type", "bridge"])?;
        ns.ip(&["link", "set", &name, "up"])?;
        Ok(Bridge { name, ns: ns.name.clone() })
    }

    pub fn attach(&self, ifname: &str) -> Result<(), CmdError> {
        run("ip", &["-n", &self.ns, "link", "set", ifname, "master", &self.name])?;
        run("ip", &["-n", &self.ns, "link", "set", ifname, "up"]).map(|_| ())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = run("ip", &["-n", &self.ns, "link", "del", &self.name]);
    }
}

/// Two hosts joined by one link: `a` at 198.18.0.1/24, `b` at 198.18.0.2/24.
#[derive(Debug)]
pub struct Pair {
    pub veth: Veth,
    pub a: Netns,
    pub b: Netns,
    pub addr_a: IpAddr,
    pub addr_b: IpAddr,
}

impl Pair {
    pub fn new() -> Result<Pair, CmdError> {
        let a = Netns::new("hna")?;
        let b = Netns::new("hnb")?;
        let veth = Veth::new(&a, &b)?;
        a.ip(&["addr", "add", "198.18.0.1/24", "dev", &veth.a])?;
        b.ip(&["addr", "add", "198.18.0.2/24", "dev", &veth.b])?;
        a.ip(&["link", "set", &veth.a, "up"])?;
        b.ip(&["link", "set", &veth.b, "up"])?;
        let addr_a = IpAddr::from([198, 18, 0, 1]);
        let addr_b = IpAddr::from([198, 18, 0, 2]);
        Ok(Pair { veth, a, b, addr_a, addr_b })
    }

    /// Takes the link down on both ends: packets stop, connections hang (no reset).
    pub fn cut(&self) -> Result<(), CmdError> {
        self.a.ip(&["link", "set", &self.veth.a, "down"])?;
        self.b.ip(&["link", "set", &self.veth.b, "down"]).map(|_| ())
    }

    pub fn heal(&self) -> Result<(), CmdError> {
        self.a.ip(&["link", "set", &self.veth.a, "up"])?;
        self.b.ip(&["link", "set", &self.veth.b, "up"]).map(|_| ())
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Child,
    pub label: String,
}

impl ChildGuard {
    pub fn new(child: Child, label: impl Into<String>) -> Self {
        ChildGuard { child, label: label.into() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process now, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A mount point unmounted (lazily, so a dead backing device cannot block it) on drop.
#[derive(Debug)]
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let p = self.0.display().to_string();
        if is_mounted(&self.0) {
            let _ = run("umount", &["-l", &p]);
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
        let _ = run("losetup", &["-d", &self.0]);
    }
}

/// A FUSE mount unmounted on drop.
#[derive(Debug)]
pub struct FuseGuard(pub PathBuf);

impl Drop for FuseGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = run("fusermount3", &["-u", "-z", &self.0.display().to_string()]);
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
        let dir = run("losetup", &["-n", "-O", "BACK-FILE", device])
            .ok()
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
            let _ = run("losetup", &["-d", &self.device]);
        }
        if let Some(dir) = self.dir.take() {
            let mnt = dir.join("mnt");
            if is_mounted(&mnt) {
                let _ = run("fusermount3", &["-u", "-z", &mnt.display().to_string()]);
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

/// Whether this process may build namespaces (root with `ip netns`); the multi-host tests
/// need it and CI runs as root.
pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "this test builds network namespaces and must run as root");
}
