//! A pair as an operator runs it: the standalone controller (and witness) in the client
//! namespace, two agents enrolled against it, one group `default/web` whose flow starts a
//! real service (`bench-failover serve`) behind a virtual IP, optionally on a protocol C
//! `ReplicatedVolume` attached through `scripts/nbd-attach-fuse.sh` (not mounted: tests
//! write raw blocks to the export's socket). Admin actions go through `kubectl-hapair`,
//! exactly the path a user takes.
//!
//! Drop order: agents, controller, the network (which kills what is left in the
//! namespaces), the nbdfuse attachments, then the files.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::agents::{Agent, GROUP, binary, group, role, status};
use crate::controller::{Controller, enroll, unenrolled_config};
use crate::failover_bench::SERVICE_PORT;
use crate::failover_bench::probe;
use crate::mounts::{AttachDirCleanup, attach_script};
use crate::netns::{Netns, wait_for};
use crate::topology::{A0, A0_V6, A1, B0, B0_V6, B1, C0, TwoServersAndClient};

/// Bound on every wait for something that must happen (a start, a takeover, a resync).
pub const UP: Duration = Duration::from_secs(40);
/// The volume's name.
pub const VOLUME: &str = "data";

/// What the group looks like.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// `controller` or `none`.
    pub witness: &'static str,
    /// A protocol C volume as the flow's first step.
    pub volume: bool,
    /// The virtual IP and heartbeats on link 0 over IPv6.
    pub ipv6: bool,
    /// The group's `monitors`, as JSON; `{dir}` in a string stands for the test's directory.
    pub monitors: serde_json::Value,
    /// Heartbeat timing: interval, deadAfter, leaseTTL.
    pub timing: (Duration, Duration, Duration),
    /// A gateway host on link 0 at [`GATEWAY`], for gateway monitors.
    pub gateway: bool,
    /// How long stopping the service takes (a slow shutdown).
    pub stop_delay: Duration,
}

/// The gateway host's address, with [`PairOptions::gateway`].
pub const GATEWAY: &str = "198.18.0.254";

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            witness: "controller",
            volume: false,
            ipv6: false,
            monitors: serde_json::json!([]),
            timing: (Duration::from_millis(100), Duration::from_millis(1500), Duration::from_millis(1000)),
            gateway: false,
            stop_delay: Duration::ZERO,
        }
    }
}

impl PairOptions {
    /// The virtual IP, with its prefix length.
    pub fn vip_cidr(&self) -> &'static str {
        if self.ipv6 { "2001:db8::100/64" } else { "198.18.0.100/24" }
    }

    pub fn vip(&self) -> IpAddr {
        let (ip, _) = self.vip_cidr().split_once('/').unwrap_or_default();
        ip.parse().unwrap_or(IpAddr::from([198, 18, 0, 100]))
    }
}

/// The pair, its controller and the client; see the module doc.
#[derive(Debug)]
pub struct EnrolledPair {
    pub agents: Vec<Agent>,
    pub controller: Controller,
    pub topo: TwoServersAndClient,
    _attached: AttachDirCleanup,
    pub options: PairOptions,
    /// The test's files: manifests, agent homes, backing images, pid files.
    pub dir: tempfile::TempDir,
}

impl EnrolledPair {
    /// Controller up, both agents enrolled, `a` started first so that it becomes the
    /// primary (the designated node of a new volume's initial sync), then `b`; returns once `a` serves the client, `b` stands by and (with a
    /// volume) both replicas are in sync.
    pub fn start(options: PairOptions) -> EnrolledPair {
        let mut topo = TwoServersAndClient::build().unwrap_or_else(|e| panic!("building the network: {e}"));
        if options.gateway {
            topo.add_host("gw", GATEWAY).unwrap_or_else(|e| panic!("adding the gateway: {e}"));
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("a temporary directory: {e}"));
        let attach_dir = dir.path().join("attach");
        std::fs::create_dir_all(&attach_dir).unwrap_or_else(|e| panic!("creating {}: {e}", attach_dir.display()));
        let attached = AttachDirCleanup(attach_dir.clone());
        let controller = Controller::start(&topo.client, C0, dir.path(), &manifest(dir.path(), &options));
        let mut agents = Vec::new();
        for (node, ns) in [("a", &topo.a), ("b", &topo.b)] {
            let home = dir.path().join(node);
            std::fs::create_dir_all(&home).unwrap_or_else(|e| panic!("creating {}: {e}", home.display()));
            std::fs::write(home.join("agent.yaml"), unenrolled_config(&home))
                .unwrap_or_else(|e| panic!("writing agent.yaml: {e}"));
            enroll(ns, &controller, node, &home);
            agents.push(Agent::with_config(node, &home));
        }
        let mut pair = EnrolledPair { agents, controller, topo, _attached: attached, options, dir };
        pair.agents[0].start(&pair.topo.a);
        // A new volume is Inconsistent on both nodes until the pair's initial sync, which
        // needs both agents; without one, a alone starts serving.
        if !pair.options.volume {
            pair.wait_serving("a");
        }
        pair.agents[1].start(&pair.topo.b);
        pair.wait_pair("a");
        pair
    }

    /// Kills `node`'s agent and starts it again, as after a crash.
    pub fn restart_agent(&mut self, node: &str) {
        let (i, ns) = if node == "a" { (0, &self.topo.a) } else { (1, &self.topo.b) };
        self.agents[i].kill();
        self.agents[i].start(ns);
    }

    pub fn ns(&self, node: &str) -> &Netns {
        if node == "a" { &self.topo.a } else { &self.topo.b }
    }

    pub fn agent(&mut self, node: &str) -> &mut Agent {
        &mut self.agents[usize::from(node != "a")]
    }

    /// Both agents' status documents, for failure messages.
    pub fn describe(&self) -> String {
        format!("a: {:?}\nb: {:?}", status(&self.topo.a), status(&self.topo.b))
    }

    /// The group's report on `node`.
    pub fn report(&self, node: &str) -> Option<serde_json::Value> {
        group(&status(self.ns(node))?, GROUP)
    }

    pub fn role(&self, node: &str) -> Option<String> {
        role(self.ns(node), GROUP)
    }

    pub fn epoch(&self, node: &str) -> Option<u64> {
        self.report(node)?["epoch"].as_u64()
    }

    /// The volume's report on `node`.
    pub fn volume(&self, node: &str) -> Option<serde_json::Value> {
        self.report(node)?["volumes"].as_array()?.iter().find(|v| v["name"] == VOLUME).cloned()
    }

    /// The group's events as `node` reports them, as one string.
    pub fn events(&self, node: &str) -> String {
        self.report(node).map(|g| g["events"].to_string()).unwrap_or_default()
    }

    /// Whether `node` holds the virtual IP.
    pub fn has_vip(&self, node: &str) -> bool {
        let family = if self.options.ipv6 { "-6" } else { "-4" };
        let want = format!(" {} ", self.options.vip_cidr());
        self.ns(node)
            .ip(&["-o", family, "addr", "show", "dev", "eth0"])
            .unwrap_or_default()
            .replace('\n', " ")
            .contains(&want)
    }

    /// One connection to the VIP from the client: who answered.
    pub fn ask(&self) -> Option<String> {
        let target = SocketAddr::new(self.options.vip(), SERVICE_PORT);
        self.topo.client.block_on(|| probe::ask(target, Duration::from_millis(500))).map(|a| a.server)
    }

    /// Waits until `node` is Primary, holds the VIP and answers the client.
    pub fn wait_serving(&self, node: &str) {
        let ok =
            wait_for(UP, || (self.role(node)? == "Primary" && self.has_vip(node) && self.ask()? == node).then_some(()));
        assert!(ok.is_some(), "{node} does not serve:\n{}", self.describe());
    }

    /// Waits until `primary` serves and the other node stands by hearing it, with (if the
    /// group has a volume) both replicas UpToDate and connected.
    pub fn wait_pair(&self, primary: &str) {
        self.wait_serving(primary);
        let standby = other(primary);
        let ok = wait_for(UP, || {
            let g = self.report(standby)?;
            let synced = !self.options.volume || {
                let v = self.volume(standby)?;
                v["diskState"] == "UpToDate" && v["connection"] == "Connected"
            };
            (g["role"] == "Standby" && g["peerReachable"] == true && !self.has_vip(standby) && synced).then_some(())
        });
        assert!(ok.is_some(), "{standby} does not stand by in sync:\n{}", self.describe());
    }

    /// `kubectl-hapair ARGS` from the client namespace; panics unless it succeeds.
    pub fn hapair(&self, args: &[&str]) -> String {
        let out = self.hapair_output(args);
        assert!(
            out.status.success(),
            "kubectl-hapair {}: {}\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn hapair_output(&self, args: &[&str]) -> Output {
        self.controller.kubectl(&self.topo.client, args)
    }

    /// The export's socket on `node` (served there whatever the role; writable while
    /// primary).
    pub fn nbd_socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(node).join("run").join(format!("default_web_{VOLUME}.nbd"))
    }

    pub fn backing(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.img"))
    }

    /// The pid of the service the flow started on `node`, if it runs.
    pub fn service_pid(&self, node: &str) -> Option<i32> {
        let text = std::fs::read_to_string(service_pid_file(self.dir.path(), node)).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// Blackhole routes between the servers' heartbeat (and replication) addresses: no
    /// heartbeat on either link; both still reach the controller on link 0.
    pub fn cut_heartbeats(&self, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        let (a0, b0) = if self.options.ipv6 { (A0_V6, B0_V6) } else { (A0, B0) };
        for (node, peers) in [("a", [b0, B1]), ("b", [a0, A1])] {
            for peer in peers {
                let prefix = if peer.contains(':') { "128" } else { "32" };
                let route = format!("{peer}/{prefix}");
                let args: Vec<&str> = if peer.contains(':') {
                    vec!["-6", "route", verb, "blackhole", &route]
                } else {
                    vec!["route", verb, "blackhole", &route]
                };
                self.ns(node).ip(&args).unwrap_or_else(|e| panic!("{verb} blackhole {route} on {node}: {e}"));
            }
        }
    }

    /// A power failure of `node`: links down, every process in it killed.
    pub fn power_off(&mut self, node: &str) {
        for dev in ["eth0", "eth1"] {
            self.ns(node).ip(&["link", "set", dev, "down"]).unwrap_or_else(|e| panic!("{node} {dev} down: {e}"));
        }
        let left = self.ns(node).kill_processes(Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
        assert!(left.is_empty(), "processes survived on {node}: {left:?}");
        self.agent(node).kill();
    }
}

pub fn other(node: &str) -> &'static str {
    if node == "a" { "b" } else { "a" }
}

/// Where the service's pid is on `node` (the flow writes it; a process monitor may watch it).
pub fn service_pid_file(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}-service.pid"))
}

/// The manifests: the group, and its volume when asked for.
fn manifest(dir: &Path, options: &PairOptions) -> String {
    let pid_file = format!("'{}'/\"$HAPAIR_NODE\"-service.pid", dir.display());
    let bench = binary("bench-failover").display().to_string();
    let start = format!(
        "'{bench}' serve --name \"$HAPAIR_NODE\" --port {SERVICE_PORT} --daemon --pid-file {pid_file} </dev/null >/dev/null 2>&1"
    );
    let stop = format!(
        "sleep {}; f={pid_file}; if [ -f \"$f\" ]; then kill \"$(cat \"$f\")\"; rm -f \"$f\"; fi",
        options.stop_delay.as_secs_f64()
    );
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let (interval, dead_after, lease) = options.timing;
    let (a0, b0) = if options.ipv6 { (A0_V6, B0_V6) } else { (A0, B0) };
    let monitors: serde_json::Value =
        serde_json::from_str(&options.monitors.to_string().replace("{dir}", &dir.display().to_string()))
            .unwrap_or_else(|e| panic!("the monitors with the directory: {e}"));
    let mut flow = Vec::new();
    if options.volume {
        flow.push(volume_step(dir));
    }
    flow.push(serde_json::json!({"name": "service", "exec": {"start": start, "stop": stop}}));
    flow.push(serde_json::json!({"name": "service-ip", "virtualIP": {"name": "www"}}));
    let group = serde_json::json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "HaGroup",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "nodes": [
                {"name": "a", "heartbeatAddresses": [a0, A1]},
                {"name": "b", "heartbeatAddresses": [b0, B1]},
            ],
            "heartbeat": {"interval": ms(interval), "deadAfter": ms(dead_after), "leaseTTL": ms(lease)},
            "witness": {"mode": options.witness},
            "virtualIPs": [{"name": "www", "address": options.vip_cidr(), "interface": "eth0", "garp": {"count": 3, "interval": "100ms"}}],
            "monitors": monitors,
            "flow": flow,
        },
    });
    let mut text = group.to_string();
    if options.volume {
        let volume = volume_manifest(dir);
        text = format!("{text}\n---\n{volume}\n");
    }
    text
}

/// The flow step of the volume [`VOLUME`], attached with `scripts/nbd-attach-fuse.sh` under
/// `dir/attach`, as on a machine without the nbd module.
pub fn volume_step(dir: &Path) -> serde_json::Value {
    let helper = format!(
        "HAPAIR_ATTACH_DIR={} {}",
        dir.join("attach").display(),
        attach_script().canonicalize().unwrap_or_else(|e| panic!("the attach script: {e}")).display()
    );
    serde_json::json!({
        "name": VOLUME,
        "volume": {"volumeRef": VOLUME, "attachCommand": format!("{helper} attach"), "detachCommand": format!("{helper} detach")},
        "timeout": "60s",
    })
}

/// The 16 MiB protocol C volume [`VOLUME`] of group `default/web`, backed by `dir/a.img` and
/// `dir/b.img`, replicating over the second link.
pub fn volume_manifest(dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "ReplicatedVolume",
        "metadata": {"name": VOLUME, "namespace": "default"},
        "spec": {
            "group": "web",
            "size": "16Mi",
            "protocol": "C",
            "port": 7790,
            "splitBrainPolicy": "manual",
            "backing": [
                {"node": "a", "path": dir.join("a.img").display().to_string(), "address": A1},
                {"node": "b", "path": dir.join("b.img").display().to_string(), "address": B1},
            ],
        },
    })
}
