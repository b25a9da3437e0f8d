//! Drives `replica-harness` processes: one per node, optionally inside a network
//! namespace, killed (like a crashed node) or shut down on demand, and always killed on
//! drop.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::{ChildGuard, Netns};

/// The replication port every test volume uses (each host has its own namespace).
pub const PORT: u16 = 7789;

/// A volume shared by the two test nodes `a` and `b`.
#[derive(Debug, Clone)]
pub struct TestVolume {
    pub dir: PathBuf,
    pub config: Value,
    pub path: PathBuf,
}

/// Options of a test volume.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub size: String,
    pub protocol: &'static str,
    pub policy: &'static str,
    pub al_extents: u32,
    pub resync_rate: Option<String>,
}

impl Default for VolumeSpec {
    fn default() -> Self {
        VolumeSpec { size: "64Mi".into(), protocol: "C", policy: "manual", al_extents: 7, resync_rate: None }
    }
}

impl TestVolume {
    /// Writes `dir/volume.json` describing backing files `dir/a.img` and `dir/b.img`.
    pub fn new(dir: &Path, spec: &VolumeSpec, addr_a: IpAddr, addr_b: IpAddr) -> TestVolume {
        let mut s = serde_json::json!({
            "group": "g",
            "size": spec.size,
            "backing": [
                {"node": "a", "path": dir.join("a.img"), "address": addr_a.to_string()},
                {"node": "b", "path": dir.join("b.img"), "address": addr_b.to_string()},
            ],
            "protocol": spec.protocol,
            "port": PORT,
            "splitBrainPolicy": spec.policy,
            "activityLogExtents": spec.al_extents,
        });
        if let Some(rate) = &spec.resync_rate {
            s["resyncRate"] = Value::String(rate.clone());
        }
        let config = serde_json::json!({
            "name": "vol",
            "uuid": "2b7e1516-28ae-4d2a-a6d2-0a1b2c3d4e5f",
            "generation": 1,
            "spec": s,
        });
        let path = dir.join("volume.json");
        if let Err(e) = std::fs::write(&path, config.to_string()) {
            panic!("writing {}: {e}", path.display());
        }
        TestVolume { dir: dir.to_path_buf(), config, path }
    }

    /// The same volume under another UUID or size (for refusal tests), in its own file.
    pub fn variant(&self, file: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
        let mut c = self.config.clone();
        edit(&mut c);
        let path = self.dir.join(file);
        if let Err(e) = std::fs::write(&path, c.to_string()) {
            panic!("writing {}: {e}", path.display());
        }
        path
    }

    pub fn backing(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.img"))
    }

    pub fn socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.sock"))
    }
}

/// One running replica process.
#[derive(Debug)]
pub struct ReplicaProc {
    pub node: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

impl ReplicaProc {
    /// Starts `harness` for `node` of `volume` (inside `ns` when given). Returns the error
    /// the harness reported when the replica refused to open.
    pub fn start(
        harness: &str,
        ns: Option<&Netns>,
        volume: &Path,
        node: &str,
        socket: &Path,
        extra: &[&str],
    ) -> Result<ReplicaProc, String> {
        let log = volume.with_file_name(format!("{node}.{}.log", crate::netns::unique_name("l")));
        let stderr = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let mut cmd = match ns {
            Some(ns) => ns.command(harness),
            None => Command::new(harness),
        };
        cmd.arg("--volume")
            .arg(volume)
            .arg("--node")
            .arg(node)
            .arg("--nbd-socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().map_err(|e| format!("spawning {harness}: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let child = ChildGuard::new(child, format!("replica {node}"));
        let (tx, lines) = mpsc::channel();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        let mut p = ReplicaProc { node: node.to_string(), socket: socket.to_path_buf(), log, child, stdin, lines };
        let first = p.next_line(Duration::from_secs(60))?;
        let v: Value = serde_json::from_str(&first).map_err(|e| format!("harness said {first:?}: {e}"))?;
        if v["ready"] == Value::Bool(true) { Ok(p) } else { Err(v["error"].as_str().unwrap_or(&first).to_string()) }
    }

    fn next_line(&mut self, timeout: Duration) -> Result<String, String> {
        self.lines
            .recv_timeout(timeout)
            .map_err(|e| format!("replica {} gave no answer ({e}); log:\n{}", self.node, self.log_text()))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a command and returns its JSON answer.
    pub fn cmd(&mut self, line: &str) -> Value {
        let sent = self.stdin.as_mut().map(|s| writeln!(s, "{line}").and_then(|()| s.flush()));
        if !matches!(sent, Some(Ok(()))) {
            panic!("replica {} is not running; log:\n{}", self.node, self.log_text());
        }
        let answer = self.next_line(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("{line}: {e}"));
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{line}: bad answer {answer:?}: {e}"))
    }

    fn ok(&mut self, line: &str) -> Result<(), String> {
        let v = self.cmd(line);
        if v["ok"] == Value::Bool(true) { Ok(()) } else { Err(v["error"].as_str().unwrap_or_default().to_string()) }
    }

    pub fn status(&mut self) -> Value {
        self.cmd("status")["status"].clone()
    }

    pub fn promote(&mut self, epoch: u64) -> Result<(), String> {
        self.ok(&format!("promote {epoch}"))
    }

    pub fn promote_forced(&mut self, epoch: u64) -> Result<(), String> {
        self.ok(&format!("promote {epoch} force"))
    }

    pub fn demote(&mut self) -> Result<(), String> {
        self.ok("demote")
    }

    pub fn verify(&mut self) -> Result<(), String> {
        self.ok("verify")
    }

    pub fn resolve(&mut self, which: &str) -> Result<(), String> {
        self.ok(&format!("resolve {which}"))
    }

    /// Polls the status until `pred` holds; panics with the last status and the log when
    /// `timeout` passes.
    pub fn wait(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("replica {}: timed out waiting for {what}; status: {s:#}\nlog:\n{}", self.node, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The replica process's peak resident set so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Kills the process (SIGKILL): the node crashes.
    pub fn kill(&mut self) {
        self.stdin = None;
        self.child.kill();
    }

    /// Asks the replica to shut down cleanly and waits for it.
    pub fn shutdown(&mut self) {
        let _ = self.ok("shutdown");
        self.stdin = None;
        let _ = self.child.wait(Duration::from_secs(30));
    }
}

/// Whether the status says connected, up to date and fully in sync.
pub fn in_sync(s: &Value) -> bool {
    s["connection"] == "Connected" && s["disk"] == "UpToDate" && s["peerDisk"] == "UpToDate" && s["outOfSyncBytes"] == 0
}

/// A pair of replica processes in a two-host namespace pair.
#[derive(Debug)]
pub struct ReplicaPair {
    pub a: ReplicaProc,
    pub b: ReplicaProc,
    pub volume: TestVolume,
    pub net: crate::topology::Pair,
    pub harness: String,
    _dir: tempfile::TempDir,
}

impl ReplicaPair {
    /// Two fresh replicas of a new volume, connected and up to date (the fresh sparse
    /// files need no initial sync).
    pub fn start(harness: &str, spec: &VolumeSpec) -> ReplicaPair {
        crate::netns::require_root();
        let dir = tempfile::Builder::new().prefix("hapair-vol").tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let net = crate::topology::Pair::new().unwrap_or_else(|e| panic!("building the namespace pair: {e}"));
        let volume = TestVolume::new(dir.path(), spec, net.addr_a, net.addr_b);
        let a = Self::spawn(harness, &net, &volume, "a").unwrap_or_else(|e| panic!("starting a: {e}"));
        let b = Self::spawn(harness, &net, &volume, "b").unwrap_or_else(|e| panic!("starting b: {e}"));
        let mut pair = ReplicaPair { a, b, volume, net, harness: harness.to_string(), _dir: dir };
        pair.a.wait("initial sync", Duration::from_secs(30), in_sync);
        pair.b.wait("initial sync", Duration::from_secs(30), in_sync);
        pair
    }

    fn spawn(
        harness: &str,
        net: &crate::topology::Pair,
        volume: &TestVolume,
        node: &str,
    ) -> Result<ReplicaProc, String> {
        let ns = if node == "a" { &net.a } else { &net.b };
        ReplicaProc::start(harness, Some(ns), &volume.path, node, &volume.socket(node), &[])
    }

    /// Starts `node` again after it was killed or shut down.
    pub fn restart(&mut self, node: &str) {
        let p = Self::spawn(&self.harness, &self.net, &self.volume, node)
            .unwrap_or_else(|e| panic!("restarting {node}: {e}"));
        if node == "a" {
            self.a = p;
        } else {
            self.b = p;
        }
    }

    pub fn node(&mut self, node: &str) -> &mut ReplicaProc {
        if node == "a" { &mut self.a } else { &mut self.b }
    }
}
