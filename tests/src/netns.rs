//! Test hosts made of Linux network namespaces, with guards that remove everything they
//! create on drop — also when the test panics.
//!
//! Every guard owns exactly what it created and deletes nothing else. Names are unique per
//! test process (`unique_name`), so tests running at the same time, in this process or in
//! another, never collide. Devices are created directly inside their namespaces (`ip link
//! add … netns …`), so nothing ever appears in the host's namespace.
//!
//! Drop order matters: declare processes before links and links before namespaces in a
//! struct, because Rust drops fields in declaration order. Deleting a namespace also
//! destroys the devices inside it, and [`Netns`] kills processes left in it first.
//!
//! Code under test runs inside a namespace with [`Netns::run`] / [`Netns::block_on`]: a
//! fresh OS thread joins the namespace (network namespaces are per thread), so sockets
//! and netlink connections created there belong to it and can then be used from anywhere.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Why a piece of the test network could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, NetnsError>;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[usize::try_from(n % 36).unwrap_or(0)]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// `hp<pid><counter><tag>` in base 36: unique per process and call, and at most 15 bytes
/// (the kernel's interface name limit) for tags of up to 4 bytes.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).take(4).collect();
    format!("hp{}{}{}", base36(u64::from(std::process::id())), base36(u64::from(n)), tag)
}

/// Runs a command; fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let describe = || format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Io { what: describe(), source })?;
    if !output.status.success() {
        return Err(NetnsError::Command {
            command: describe(),
            message: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        });
    }
    Ok(output)
}

fn stdout(output: Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace, deleted on drop (after killing any process still inside).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name and its loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique_name(tag);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full).map(stdout)
    }

    /// Runs a program inside the namespace and returns its output whatever its status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        Command::new("ip")
            .args(&full)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| NetnsError::Io { what: format!("ip {}", full.join(" ")), source })
    }

    /// Like [`Netns::exec`], failing unless the program exits 0.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.exec(args)?;
        if !output.status.success() {
            return Err(NetnsError::Command {
                command: format!("[{}] {}", self.name, args.join(" ")),
                message: format!(
                    "{}: {}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        Ok(stdout(output))
    }

    /// Starts a long-running program inside the namespace in its own process group; the
    /// returned guard kills the group on drop.
    pub fn spawn(&self, args: &[&str]) -> Result<ChildGuard> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.name.as_str()]).args(args).stdin(Stdio::null()).process_group(0);
        let child = command
            .spawn()
            .map_err(|source| NetnsError::Io { what: format!("spawning {}", args.join(" ")), source })?;
        Ok(ChildGuard::new(child, args.join(" ")))
    }

    /// A command that runs `program` inside this namespace. Only the network namespace is
    /// entered, so mounts and Unix sockets made inside stay visible to the test.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        command
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns its result.
    /// A panic in `f` is resumed on the caller's thread.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        run_in(self.path(), f)
    }

    /// Runs a future inside the namespace on a current-thread tokio runtime.
    pub fn block_on<T: Send, Fut: Future<Output = T>, F: FnOnce() -> Fut + Send>(&self, f: F) -> T {
        self.run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
            runtime.block_on(f())
        })
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// The MAC address of `device` in this namespace.
    pub fn mac(&self, device: &str) -> Result<String> {
        let text = self.ip(&["-o", "link", "show", "dev", device])?;
        text.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).map(str::to_string).ok_or_else(|| {
            NetnsError::Command { command: format!("ip link show {device}"), message: "no MAC address".into() }
        })
    }

    /// SIGKILLs every process inside the namespace, sweeping until none is left (a
    /// supervisor may restart a child that died first), for at most `within`; returns
    /// the processes still there then, if any.
    pub fn kill_processes(&self, within: Duration) -> Result<Vec<i32>> {
        let deadline = Instant::now() + within;
        loop {
            let pids: Vec<i32> = stdout(run("ip", &["netns", "pids", &self.name])?)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.is_empty() || Instant::now() >= deadline {
                return Ok(pids);
            }
            for &pid in &pids {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether a namespace of this name still exists.
    pub fn exists(name: &str) -> bool {
        Path::new("/var/run/netns").join(name).exists()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]).map(stdout) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: deleting namespace {}: {e}", self.name);
        }
    }
}

/// A veth pair whose ends live in two namespaces; deleted on drop.
#[derive(Debug)]
pub struct Veth {
    ns: String,
    name: String,
}

impl Veth {
    /// Creates `name_a` in `a` and `name_b` in `b`, both up.
    pub fn new(a: &Netns, name_a: &str, b: &Netns, name_b: &str) -> Result<Self> {
        run(
            "ip",
            &[
                "link",
                "add",
                "name",
                name_a,
                "netns",
                a.name(),
                "type",
                "veth",
                "peer",
                "name",
                name_b,
                "netns",
                b.name(),
            ],
        )?;
        let veth = Veth { ns: a.name().to_string(), name: name_a.to_string() };
        a.ip(&["link", "set", name_a, "up"])?;
        b.ip(&["link", "set", name_b, "up"])?;
        Ok(veth)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Gone already when its namespace went first; deleting one end removes both.
        if Netns::exists(&self.ns) {
            let _ = run("ip", &["-n", &self.ns, "link", "del", &self.name]);
        }
    }
}

/// A bridge inside a namespace; deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    ns: String,
    name: String,
}

impl Bridge {
    pub fn new(ns: &Netns, name: &str) -> Result<Self> {
        ns.ip(&["link", "add", name, "type", "bridge"])?;
        let bridge = Bridge { ns: ns.name().to_string(), name: name.to_string() };
        ns.ip(&["link", "set", name, "up"])?;
        Ok(bridge)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Enslaves `port` (a device in the bridge's namespace).
    pub fn attach(&self, port: &str) -> Result<()> {
        run("ip", &["-n", &self.ns, "link", "set", port, "master", &self.name]).map(|_| ())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if Netns::exists(&self.ns) {
            let _ = run("ip", &["-n", &self.ns, "link", "del", &self.name]);
        }
    }
}

/// An address added to a device; removed on drop.
#[derive(Debug)]
pub struct Address {
    ns: String,
    device: String,
    cidr: String,
}

impl Address {
    /// Adds `cidr`; IPv6 addresses skip DAD so tests need not wait.
    pub fn new(ns: &Netns, device: &str, cidr: &str) -> Result<Self> {
        let mut args = vec!["addr", "add", cidr, "dev", device];
        if cidr.contains(':') {
            args.push("nodad");
        }
        ns.ip(&args)?;
        Ok(Address { ns: ns.name().to_string(), device: device.to_string(), cidr: cidr.to_string() })
    }

    /// Hands responsibility for removing the address to someone else (e.g. the code under
    /// test).
    pub fn release(mut self) {
        self.cidr.clear();
    }
}

impl Drop for Address {
    fn drop(&mut self) {
        if !self.cidr.is_empty() && Netns::exists(&self.ns) {
            let _ = run("ip", &["-n", &self.ns, "addr", "del", &self.cidr, "dev", &self.device]);
        }
    }
}

/// How long a SIGKILLed child may take to exit before cleanup gives up waiting for it.
const KILLED_EXIT: Duration = Duration::from_secs(30);

/// Where process `pid` waits in the kernel: its state, wait channel and kernel stack.
fn kernel_wait(pid: u32) -> String {
    let read = |what: &str| std::fs::read_to_string(format!("/proc/{pid}/{what}")).unwrap_or_default();
    let state: String =
        read("stat").rsplit_once(") ").map(|(_, rest)| rest.chars().take(1).collect()).unwrap_or_default();
    format!("state {state}, wchan {}, stack:\n{}", read("wchan"), read("stack"))
}

/// A child process, killed with its whole process group and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    label: String,
}

impl ChildGuard {
    /// Guards `child`; `label` names it in test messages.
    pub fn new(child: Child, label: impl Into<String>) -> Self {
        ChildGuard { child, label: label.into() }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills it now, as a crash would.
    pub fn kill(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // Only a child started in its own group has one to kill; for others this is
            // ESRCH, harmlessly.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        // A killed process still in the kernel (a FUSE request, a loop device) cannot be
        // reaped until that returns; a bounded wait keeps a test from hanging on it, and
        // what it waits in is the evidence.
        if self.wait(KILLED_EXIT).is_none() {
            eprintln!(
                "cleanup: {} (pid {}) has not exited {KILLED_EXIT:?} after SIGKILL: {}",
                self.label,
                self.child.id(),
                kernel_wait(self.child.id())
            );
        }
    }

    /// Waits up to `timeout` for it to exit on its own.
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

/// A filesystem mounted on a fresh directory; unmounted and removed on drop.
#[derive(Debug)]
pub struct Mount {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Mount {
    /// Mounts a small tmpfs.
    pub fn tmpfs() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&unique_name("mnt"))
            .tempdir()
            .map_err(|source| NetnsError::Io { what: "creating a mount point".into(), source })?;
        let path = dir.path().display().to_string();
        run("mount", &["-t", "tmpfs", "-o", "size=1m", "hapair-test", &path])?;
        Ok(Mount { dir, mounted: true })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Remounts read-only or read-write.
    pub fn set_read_only(&self, read_only: bool) -> Result<()> {
        let options = if read_only { "remount,ro" } else { "remount,rw" };
        run("mount", &["-o", options, &self.path().display().to_string()]).map(|_| ())
    }

    /// Unmounts now (the directory stays until drop).
    pub fn unmount(&mut self) -> Result<()> {
        if self.mounted {
            run("umount", &[&self.path().display().to_string()])?;
            self.mounted = false;
        }
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let path = self.path().display().to_string();
            if run("umount", &[&path]).is_err() {
                let _ = run("umount", &["-l", &path]);
            }
        }
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The multi-host tests build namespaces, which needs root; CI runs as root.
pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "this test builds network namespaces and must run as root");
}

/// [`Netns::run`] for the namespace at `path`, for a caller that must lend `f` what owns
/// the namespace.
pub fn run_in<T: Send, F: FnOnce() -> T + Send>(path: PathBuf, f: F) -> T {
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            // SAFETY: setns on a valid namespace descriptor affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
            f()
        });
        handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
