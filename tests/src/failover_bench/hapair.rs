//! hapair as the HA implementation, in the two modes users choose between:
//!
//! - **witness** (the default, safe mode): the standalone controller runs in the client
//!   namespace as the pair's witness, each server enrolls its agent against it with a
//!   one-time token, and the agents take their bundles from it;
//! - **no witness** (`witness: none`, the two-node mode in which a full partition makes both
//!   servers active): `hapair-agent run --bundle` on each server, with the bundles the
//!   controller's own reconcile builds from the same HaGroup manifest.
//!
//! and in two stacks:
//!
//! - **service**: the flow starts the service with an exec step and then adds the virtual IP;
//! - **volume** (the demo's stack): first a protocol C `ReplicatedVolume` attached through
//!   `scripts/nbd-attach-fuse.sh` (nbdfuse and a loop device), with ext4 on it, mounted;
//!   then the service, which increments a counter on that filesystem, durably, on every
//!   connection and answers with it, so the client can tell whether the new server lost
//!   any write the old one acknowledged; then the virtual IP.
//!
//! The group heartbeats over both links and fails back manually (a restored server stays
//! the standby). The pair has settled when the primary's agent reports Primary and the
//! other's reports Standby with the peer reachable (and, with the volume, its replica
//! UpToDate and connected), on their `/v1/status` endpoints. After each kill, the
//! survivor's `lastFailover` gives the phases of its takeover.
//!
//! The agents mount inside their own mount namespaces (`ip netns exec` makes one). A killed
//! node's loop device and nbdfuse directory outlive it; they are torn down once the node is
//! dead, before it reboots.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hapair_agent::endpoints::StatusSnapshot;
use hapair_crds::hagroup::{FailoverRecord, NodeRole};
use hapair_crds::nodeapi::DesiredConfig;
use hapair_crds::volume::{ConnectionState, DiskState};
use hapair_operator::desired::catalog::Catalog;
use hapair_operator::desired::state::ControllerState;

use super::{BenchError, HaPair, Node, PerNode, Result, SERVICE_PORT, Testbed, VIP, VIP_PREFIX_LEN, io_error};
use crate::controller::{Controller, enroll};
use crate::mounts::{AttachDirCleanup, attach_script};
use crate::netns::{ChildGuard, wait_for};
use crate::sim::Timings;
use crate::topology::C0;

/// Where each agent serves `/v1/status`, inside its own namespace.
const STATUS_ADDRESS: &str = "127.0.0.1:9464";
/// The replicated volume of the volume stack.
const VOLUME: &str = "bench-data";

/// What the flow runs besides the virtual IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// The service alone.
    Service,
    /// A protocol C volume with ext4 mounted, and the service writing to it.
    Volume,
}

/// Where the volume is mounted on either node (each agent in its own mount namespace).
fn mount_path(work: &Path) -> PathBuf {
    work.join("mnt")
}

/// Where `scripts/nbd-attach-fuse.sh` keeps a node's attachments (the agent's
/// `HAPAIR_ATTACH_DIR`), on its disk so that they can be torn down after a kill.
fn attach_dir(bed: &Testbed, node: Node) -> PathBuf {
    bed.disk_dir(node).join("attach")
}

/// The HaGroup the benchmark runs, and with the volume stack its ReplicatedVolume, as a
/// manifest (JSON documents, which are YAML too). `work` is the testbed's work directory,
/// holding one directory per node name.
pub fn manifest(timings: &Timings, witness: bool, stack: Stack, program: &Path, work: &Path) -> String {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let pid_file = format!("'{}'/\"$HAPAIR_NODE\"/run/service.pid", work.display());
    let counter = match stack {
        Stack::Service => String::new(),
        Stack::Volume => format!(" --counter '{}'", mount_path(work).join("visits").display()),
    };
    let start = format!(
        "'{}' serve --name \"$HAPAIR_NODE\" --port {SERVICE_PORT}{counter} --daemon --pid-file {pid_file} </dev/null >/dev/null 2>&1",
        program.display()
    );
    let stop = format!("f={pid_file}; if [ -f \"$f\" ]; then kill \"$(cat \"$f\")\"; rm -f \"$f\"; fi");
    let node = |n: Node| {
        serde_json::json!({
            "name": n.name(),
            "heartbeatAddresses": [n.heartbeat_address(), n.lan_address()],
        })
    };
    let script = attach_script();
    let script = script.canonicalize().unwrap_or(script);
    let mut flow = Vec::new();
    if stack == Stack::Volume {
        flow.push(serde_json::json!({
            "name": "data",
            "volume": {
                "volumeRef": VOLUME,
                "mountPath": mount_path(work),
                "mkfs": true,
                "attachCommand": format!("'{}' attach", script.display()),
                "detachCommand": format!("'{}' detach", script.display()),
            },
            "timeout": "60s",
        }));
    }
    flow.push(serde_json::json!({"name": "service", "exec": {"start": start, "stop": stop}}));
    flow.push(serde_json::json!({"name": "service-ip", "virtualIP": {"name": "service"}}));
    let group = serde_json::json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "HaGroup",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "nodes": [node(Node::A), node(Node::B)],
            "heartbeat": {
                "interval": ms(timings.interval),
                "deadAfter": ms(timings.dead_after),
                "leaseTTL": ms(timings.lease),
            },
            "witness": {"mode": if witness { "controller" } else { "none" }},
            "failback": {"mode": "manual"},
            "virtualIPs": [{"name": "service", "address": format!("{VIP}/{VIP_PREFIX_LEN}"), "interface": "eth0"}],
            "flow": flow,
        },
    });
    if stack == Stack::Service {
        return group.to_string();
    }
    let backing = |n: Node| {
        serde_json::json!({
            "node": n.name(),
            "path": work.join(n.name()).join("volume.img"),
            "address": n.heartbeat_address(),
        })
    };
    let volume = serde_json::json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "ReplicatedVolume",
        "metadata": {"name": VOLUME, "namespace": "default"},
        "spec": {
            "group": "bench",
            "size": "64Mi",
            "protocol": "C",
            "port": 7790,
            "backing": [backing(Node::A), backing(Node::B)],
        },
    });
    format!("{volume}\n---\n{group}\n")
}

/// Each node's desired-config bundle, built by the controller's reconcile from `manifest`
/// and checked the way the agent checks it.
pub fn bundles(manifest: &str) -> Result<BTreeMap<String, DesiredConfig>> {
    let catalog = Catalog::from_sources([("bench-failover.yaml", manifest)]);
    if let Some(error) = catalog.errors.first() {
        return Err(BenchError::Setup(format!("the benchmark's HaGroup is refused: {error}")));
    }
    let mut state = ControllerState::default();
    let reconciled = hapair_operator::desired::reconcile::reconcile(
        &catalog,
        &mut state,
        hapair_operator::support::timestamp::now_millis(),
        &mut rand::rng(),
    );
    if let Some(error) = reconciled.errors.first() {
        return Err(BenchError::Setup(format!("the benchmark's HaGroup is refused: {error}")));
    }
    for node in Node::BOTH {
        let bundle = reconciled
            .bundles
            .get(node.name())
            .ok_or_else(|| BenchError::Setup(format!("reconcile built no bundle for node {}", node.name())))?;
        hapair_agent::bundle::check(bundle, node.name())
            .map_err(|e| BenchError::Setup(format!("bundle for node {}: {e}", node.name())))?;
    }
    Ok(reconciled.bundles)
}

/// The agents of one pair, at one timing setting, with or without the witness.
#[derive(Debug)]
pub struct Hapair {
    name: String,
    timings: Timings,
    witness: bool,
    stack: Stack,
    agent: PathBuf,
    /// Written at the first start, once the testbed's paths are known (no witness).
    bundles: Option<BTreeMap<String, DesiredConfig>>,
    /// Started at the first start (witness).
    controller: Option<Controller>,
    running: PerNode<Option<ChildGuard>>,
    /// The last takeover whose phases were read, so the next one is told from it.
    last_failover: Option<FailoverRecord>,
    /// Each node's attachment directory once it ran an agent (volume stack).
    attach_dirs: PerNode<Option<PathBuf>>,
}

impl Hapair {
    /// `name` tells the setting apart in the table ("witness", "no-witness (unsafe)").
    pub fn new(name: &str, timings: Timings, witness: bool, stack: Stack, agent: PathBuf) -> Self {
        Hapair {
            name: name.to_string(),
            timings,
            witness,
            stack,
            agent,
            bundles: None,
            controller: None,
            running: PerNode::default(),
            last_failover: None,
            attach_dirs: PerNode::default(),
        }
    }

    /// The controller, started with the benchmark's manifest on the first call.
    fn controller(&mut self, bed: &Testbed) -> &Controller {
        let manifest = manifest(&self.timings, true, self.stack, bed.program(), bed.work_dir());
        self.controller
            .get_or_insert_with(|| Controller::start(bed.client(), C0, &bed.work_dir().join("controller"), &manifest))
    }

    /// The node's agent config, enrolled against the controller the first time.
    fn enrolled_config(&mut self, bed: &Testbed, node: Node) -> Result<PathBuf> {
        let home = bed.disk_dir(node).join("etc");
        let config = home.join("agent.yaml");
        if config.exists() {
            return Ok(config);
        }
        std::fs::create_dir_all(&home).map_err(io_error(format!("creating {}", home.display())))?;
        let text = format!(
            "apiVersion: hapair.dev/v1alpha1\nkind: AgentConfig\nstateDir: {}\nruntimeDir: {}\nendpoints:\n  listen: {STATUS_ADDRESS}\n",
            bed.disk_dir(node).join("state").display(),
            bed.run_dir(node).display()
        );
        std::fs::write(&config, text).map_err(io_error(format!("writing {}", config.display())))?;
        let controller = self.controller(bed);
        enroll(bed.ns(node), controller, node.name(), &home);
        Ok(config)
    }

    fn bundle_file(&mut self, bed: &Testbed, node: Node) -> Result<PathBuf> {
        if self.bundles.is_none() {
            self.bundles = Some(bundles(&manifest(&self.timings, false, self.stack, bed.program(), bed.work_dir()))?);
        }
        let bundle = self
            .bundles
            .as_ref()
            .and_then(|b| b.get(node.name()))
            .ok_or_else(|| BenchError::Setup(format!("no bundle for node {}", node.name())))?;
        let path = bed.disk_dir(node).join("bundle.json");
        let text =
            serde_json::to_string_pretty(bundle).map_err(|e| BenchError::Setup(format!("encoding the bundle: {e}")))?;
        std::fs::write(&path, text).map_err(io_error(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// The agent's status, read over HTTP inside the node's namespace.
    fn status(bed: &Testbed, node: Node) -> Option<StatusSnapshot> {
        bed.ns(node).run(|| {
            let address: SocketAddr = STATUS_ADDRESS.parse().ok()?;
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(300)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            stream.write_all(b"GET /v1/status HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            let (head, body) = text.split_once("\r\n\r\n")?;
            if head.split_whitespace().nth(1) != Some("200") {
                return None;
            }
            serde_json::from_str(body).ok()
        })
    }

    fn failover(bed: &Testbed, node: Node) -> Option<FailoverRecord> {
        Self::status(bed, node)?.groups.first()?.last_failover.clone()
    }

    fn role(bed: &Testbed, node: Node) -> Option<(NodeRole, bool)> {
        let status = Self::status(bed, node)?;
        let group = status.groups.first()?;
        Some((group.role, group.peer_reachable))
    }

    /// The standby can take over: Standby, hearing the peer, and with the volume stack its
    /// replica UpToDate and connected (else a kill would find nothing safe to promote).
    fn ready_standby(&self, bed: &Testbed, node: Node) -> bool {
        let Some(status) = Self::status(bed, node) else { return false };
        let Some(group) = status.groups.first() else { return false };
        let replica_ready = match self.stack {
            Stack::Service => true,
            Stack::Volume => group.volumes.iter().any(|v| {
                v.name == VOLUME && v.disk_state == DiskState::UpToDate && v.connection == ConnectionState::Connected
            }),
        };
        group.role == NodeRole::Standby && group.peer_reachable && replica_ready
    }
}

impl HaPair for Hapair {
    fn label(&self) -> String {
        format!("hapair {}", self.name)
    }

    fn parameters(&self) -> String {
        let t = &self.timings;
        let witness = if self.witness {
            "witness: the standalone controller in the client namespace (agents enrolled, bundles from it)"
        } else {
            "witness none (two-node: a full partition makes both servers active)"
        };
        let stack = match self.stack {
            Stack::Service => "no volume; flow: exec step starting the service, then the VIP (GARP defaults)",
            Stack::Volume => {
                "flow: a 64 MiB protocol C ReplicatedVolume (nbdfuse + loop device, ext4, mounted), then the \
                 service, which fsyncs a counter on it before answering each connection, then the VIP (GARP \
                 defaults)"
            }
        };
        format!(
            "heartbeat every {} ms on both links, deadAfter {} ms, leaseTTL {} ms, {witness}, manual failback; {stack}",
            t.interval.as_millis(),
            t.dead_after.as_millis(),
            t.lease.as_millis()
        )
    }

    fn failover_bound(&self) -> Duration {
        self.timings.dead_after + self.timings.lease + Duration::from_secs(5)
    }

    fn settle_time(&self) -> Duration {
        // The standby reports the peer reachable only after hearing it.
        self.timings.interval * 5
    }

    fn start_node(&mut self, bed: &Testbed, node: Node) -> Result<()> {
        let state_dir = bed.disk_dir(node).join("state");
        std::fs::create_dir_all(&state_dir).map_err(io_error(format!("creating {}", state_dir.display())))?;
        let log = bed.disk_dir(node).join("agent.log");
        let agent = self.agent.display().to_string();
        let attach = attach_dir(bed, node);
        std::fs::create_dir_all(&attach).map_err(io_error(format!("creating {}", attach.display())))?;
        *self.attach_dirs.get_mut(node) = Some(attach.clone());
        let env = [("HAPAIR_ATTACH_DIR", attach.as_path())];
        if self.witness {
            let config = self.enrolled_config(bed, node)?.display().to_string();
            let args = [agent.as_str(), "run", "--config", &config];
            *self.running.get_mut(node) = Some(bed.spawn_with_env(node, &args, &env, &log)?);
            return Ok(());
        }
        let bundle = self.bundle_file(bed, node)?.display().to_string();
        let state_dir = state_dir.display().to_string();
        let args = [
            agent.as_str(),
            "run",
            "--bundle",
            &bundle,
            "--node",
            node.name(),
            "--state-dir",
            &state_dir,
            "--listen",
            STATUS_ADDRESS,
        ];
        *self.running.get_mut(node) = Some(bed.spawn_with_env(node, &args, &env, &log)?);
        Ok(())
    }

    fn settled(&mut self, bed: &Testbed, primary: Node) -> bool {
        let alive = Node::BOTH.iter().all(|&n| self.running.get_mut(n).as_mut().is_some_and(|agent| !agent.exited()));
        alive
            && matches!(Self::role(bed, primary), Some((NodeRole::Primary, _)))
            && self.ready_standby(bed, primary.other())
    }

    fn starts_together(&self) -> bool {
        self.stack == Stack::Volume
    }

    fn node_killed(&mut self, node: Node) {
        *self.running.get_mut(node) = None;
        // What the attach helper left after the node died: loop device, FUSE, nbdfuse.
        drop(self.attach_dirs.get_mut(node).take().map(AttachDirCleanup));
    }

    fn failover_phases(&mut self, bed: &Testbed, survivor: Node) -> Option<Vec<(String, Duration)>> {
        // The survivor publishes its takeover as it starts serving; allow for the report.
        let previous = self.last_failover.clone();
        let record = wait_for(Duration::from_secs(2), || {
            Self::failover(bed, survivor).filter(|f| f.to == survivor.name() && Some(f) != previous.as_ref())
        })?;
        let phases = record.phases.iter().map(|p| (p.phase.clone(), Duration::from_millis(p.at_ms))).collect();
        self.last_failover = Some(record);
        Some(phases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{AGGRESSIVE_TIMINGS, DEFAULT_TIMINGS};

    #[test]
    fn the_benchmark_group_builds_valid_bundles_for_both_nodes() {
        for timings in [DEFAULT_TIMINGS, AGGRESSIVE_TIMINGS] {
            let text =
                manifest(&timings, false, Stack::Service, Path::new("/opt/bench-failover"), Path::new("/tmp/work"));
            let built = bundles(&text).unwrap_or_else(|e| panic!("{e}"));
            let group = &built["a"].groups[0];
            assert_eq!(group.spec.heartbeat.interval.as_std(), timings.interval);
            assert_eq!(group.spec.heartbeat.dead_after.as_std(), timings.dead_after);
            let steps: Vec<_> = group.spec.flow.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(steps, ["service", "service-ip"]);
            let exec = group.spec.flow[0].exec.as_ref().unwrap_or_else(|| panic!("no exec step"));
            assert!(exec.start.starts_with("'/opt/bench-failover' serve --name \"$HAPAIR_NODE\""), "{}", exec.start);
            assert!(exec.stop.contains("'/tmp/work'/\"$HAPAIR_NODE\"/run/service.pid"), "{}", exec.stop);
            assert_eq!(built["a"].groups[0].heartbeat_key, built["b"].groups[0].heartbeat_key);
        }
    }

    #[test]
    fn the_volume_stack_mounts_a_protocol_c_volume_before_a_service_that_writes_to_it() {
        let text = manifest(&DEFAULT_TIMINGS, true, Stack::Volume, Path::new("/opt/bench-failover"), Path::new("/w"));
        let built = bundles(&text).unwrap_or_else(|e| panic!("{e}"));
        for node in ["a", "b"] {
            let group = &built[node].groups[0];
            let steps: Vec<_> = group.spec.flow.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(steps, ["data", "service", "service-ip"]);
            let volume = group.spec.flow[0].volume.as_ref().unwrap_or_else(|| panic!("no volume step"));
            assert_eq!((volume.volume_ref.as_str(), volume.mount_path.as_deref()), (VOLUME, Some("/w/mnt")));
            let exec = group.spec.flow[1].exec.as_ref().unwrap_or_else(|| panic!("no exec step"));
            assert!(exec.start.contains(" --counter '/w/mnt/visits' "), "{}", exec.start);
            let replicated = &group.volumes;
            assert_eq!(replicated.len(), 1, "{replicated:?}");
            assert_eq!(replicated[0].name, VOLUME);
        }
    }
}
