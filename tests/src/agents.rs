//! Real `hapair-agent` (and `hapair-operator`) processes inside test namespaces: built
//! binaries located next to the test executable, bundles written for them, and their
//! `/v1/status` and `/metrics` read from inside their namespace.
//!
//! Every process is a [`ChildGuard`] in its own process group (killed on drop), with its
//! output in a log file that is printed when a test fails.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hapair_agent::flow::check::http_get;

use crate::netns::{ChildGuard, Netns, NetnsError, Result, wait_for};

/// Where the agents serve their endpoints, inside each server's own namespace.
pub const ENDPOINTS: &str = "127.0.0.1:9464";
/// A 32-byte heartbeat key, base64.
pub const HEARTBEAT_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
pub const GROUP: &str = "default/web";

/// A workspace binary built next to the running test (`target/debug/<name>`): the test
/// executable lives in `target/debug/deps`. `scripts/test.sh` builds every binary before
/// the tests run.
pub fn binary(name: &str) -> PathBuf {
    let from_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(|dir| dir.join(name)))
        .filter(|p| p.exists());
    let from_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug").join(name);
    match from_exe {
        Some(path) => path,
        None if from_manifest.exists() => from_manifest,
        None => panic!(
            "{name} is not built (looked next to the test executable and in {}); run `cargo build --workspace` first",
            from_manifest.display()
        ),
    }
}

/// Starts `args` inside `ns` in a new process group, output appended to `log`.
pub fn spawn_logged(ns: &Netns, args: &[&str], log: &Path) -> Result<ChildGuard> {
    let io = |what: String| move |source| NetnsError::Io { what, source };
    let out = File::options().create(true).append(true).open(log).map_err(io(format!("opening {}", log.display())))?;
    let err = out.try_clone().map_err(io("cloning a log handle".into()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", "info,hapair_agent=debug")
        .process_group(0)
        .spawn()
        .map_err(io(format!("spawning {}", args.join(" "))))?;
    Ok(ChildGuard::new(child, args.join(" ")))
}

/// `GET http://127.0.0.1:9464<path>` from inside `ns`.
pub fn get(ns: &Netns, path: &str) -> Option<(u16, String)> {
    let url = format!("http://{ENDPOINTS}{path}");
    ns.block_on(|| async move { http_get(&url, Duration::from_secs(2)).await.ok() })
        .map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

/// One agent process: its namespace, state directory, log and bundle file.
#[derive(Debug)]
pub struct Agent {
    pub node: String,
    pub dir: PathBuf,
    process: Option<ChildGuard>,
    args: Vec<String>,
    ns_name: String,
}

impl Agent {
    /// An agent run on a bundle file (`--bundle`), in `dir` (bundle, state, log).
    pub fn with_bundle(node: &str, dir: &Path) -> Agent {
        let args = [
            "run",
            "--bundle",
            &dir.join("bundle.yaml").display().to_string(),
            "--node",
            node,
            "--state-dir",
            &dir.join("state").display().to_string(),
            "--listen",
            ENDPOINTS,
        ]
        .map(str::to_string)
        .to_vec();
        Agent { node: node.into(), dir: dir.to_path_buf(), process: None, args, ns_name: String::new() }
    }

    /// An agent run on an `agent.yaml` (`--config`).
    pub fn with_config(node: &str, dir: &Path) -> Agent {
        let args = vec!["run".to_string(), "--config".into(), dir.join("agent.yaml").display().to_string()];
        Agent { node: node.into(), dir: dir.to_path_buf(), process: None, args, ns_name: String::new() }
    }

    /// One more command-line argument (e.g. `--runtime-dir`), for the next start.
    pub fn arg(&mut self, arg: &str) {
        self.args.push(arg.to_string());
    }

    /// The running process's id (`ip netns exec` execs the agent, so it is the agent's).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildGuard::id)
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts (or restarts) the process inside `ns`.
    pub fn start(&mut self, ns: &Netns) {
        let exe = binary("hapair-agent").display().to_string();
        let mut args = vec![exe.as_str()];
        args.extend(self.args.iter().map(String::as_str));
        self.ns_name = ns.name().to_string();
        let child = spawn_logged(ns, &args, &self.log_path()).unwrap_or_else(|e| panic!("starting {}: {e}", self.node));
        self.process = Some(child);
    }

    /// `kill -9`, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    pub fn running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| !p.exited())
    }

    /// The last lines of the agent's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of agent {} ({}) ----\n{}", self.node, self.ns_name, self.log_tail(80));
        }
    }
}

/// The agent's `/v1/status`, if it answers.
pub fn status(ns: &Netns) -> Option<serde_json::Value> {
    let (code, body) = get(ns, "/v1/status")?;
    if code != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// The group's report in a status document.
pub fn group(status: &serde_json::Value, key: &str) -> Option<serde_json::Value> {
    status["groups"].as_array()?.iter().find(|g| g["key"] == key).cloned()
}

/// What the agent in `ns` reports of the volume `data` of the group [`GROUP`].
pub fn volume_report(ns: &Netns) -> Option<serde_json::Value> {
    group(&status(ns)?, GROUP)?["volumes"].as_array()?.iter().find(|v| v["name"] == "data").cloned()
}

/// The node's role in the group (`Primary`, `Standby`, …).
pub fn role(ns: &Netns, key: &str) -> Option<String> {
    group(&status(ns)?, key)?["role"].as_str().map(str::to_string)
}

/// Waits until the node's role in `key` is `want`.
pub fn wait_role(ns: &Netns, key: &str, want: &str, timeout: Duration) -> bool {
    wait_for(timeout, || (role(ns, key).as_deref() == Some(want)).then_some(())).is_some()
}

/// One sample of a Prometheus counter or gauge with exactly these labels.
pub fn metric(ns: &Netns, name: &str, labels: &str) -> Option<f64> {
    let (_, text) = get(ns, "/metrics")?;
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// Options of [`bundle`].
#[derive(Clone, Debug)]
pub struct BundleSpec {
    pub revision: u64,
    /// `controller` or `none`.
    pub witness: &'static str,
    /// Extra YAML under `spec:` (flow, monitors, …), indented by six spaces.
    pub spec_extra: String,
    pub deleting: bool,
    /// No group at all (the group was removed).
    pub empty: bool,
}

impl Default for BundleSpec {
    fn default() -> Self {
        BundleSpec { revision: 1, witness: "none", spec_extra: String::new(), deleting: false, empty: false }
    }
}

/// The pair's heartbeat timing in every test: fast enough for tests, slow enough for two
/// loaded cores.
pub const TIMING: &str = "{interval: 100ms, deadAfter: 2s, leaseTTL: 1500ms}";

/// The group spec of the topology's two servers: links 0 and 1, the VIP 198.18.0.100 on
/// eth0 announced three times.
pub fn group_spec(witness: &str, extra: &str) -> String {
    format!(
        "      nodes:\n        - {{name: a, heartbeatAddresses: [198.18.0.1, 198.18.1.1]}}\n        - {{name: b, heartbeatAddresses: [198.18.0.2, 198.18.1.2]}}\n      heartbeat: {TIMING}\n      witness: {{mode: {witness}}}\n      virtualIPs:\n        - {{name: www, address: 198.18.0.100/24, interface: eth0, garp: {{count: 3, interval: 100ms}}}}\n{extra}"
    )
}

/// The HaGroup [`GROUP`] as a manifest for a controller: [`group_spec`] with `witness` and
/// `extra`, under `spec:`.
pub fn group_manifest(witness: &str, extra: &str) -> String {
    let spec: String = group_spec(witness, extra).lines().map(|l| format!("{}\n", &l[4..])).collect();
    let (namespace, name) = GROUP.split_once('/').unwrap_or(("default", GROUP));
    format!(
        "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )
}

/// A desired-config bundle for `node` holding the group [`GROUP`].
pub fn bundle(node: &str, spec: &BundleSpec) -> String {
    if spec.empty {
        return format!("node: {node}\nrevision: {}\ngroups: []\n", spec.revision);
    }
    let mut text = format!("node: {node}\nrevision: {}\ngroups:\n", spec.revision);
    text.push_str(&format!(
        "  - key: {GROUP}\n    heartbeatKey: {{inline: \"{HEARTBEAT_KEY}\"}}\n    deleting: {}\n    spec:\n{}",
        spec.deleting,
        group_spec(spec.witness, &spec.spec_extra)
    ));
    text
}

/// Writes `text` to `path` so that a watcher sees a new modification time.
pub fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}
