//! The `HaGroup` resource: a pair of servers running one service with failover.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::duration::Duration;

/// Pattern for node, step, monitor and VIP names: a DNS label, so names are safe in
/// metric labels, file names and Kubernetes object names.
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// A pair of servers that keep one service available. One node is active (holds the virtual
/// IPs, runs the service flow and writes the replicated volumes); the other stands by and
/// takes over when the active node, its network or its application fails.
// kube's printcolumn(...) repeats keys by design; clippy reads them as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hapair.dev",
    version = "v1alpha1",
    kind = "HaGroup",
    doc = "A pair of servers running one service with automatic failover.",
    namespaced,
    shortname = "hag",
    category = "hapair",
    status = "HaGroupStatus",
    derive = "PartialEq",
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeNode"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct HaGroupSpec {
    /// The two servers of the pair.
    #[schemars(length(min = 2, max = 2))]
    pub nodes: Vec<NodeSpec>,
    /// Heartbeat timing, port and key.
    #[serde(default)]
    pub heartbeat: HeartbeatSpec,
    /// Who breaks ties when the heartbeat links fail.
    #[serde(default)]
    pub witness: WitnessSpec,
    /// What happens when the preferred node comes back.
    #[serde(default)]
    pub failback: FailbackSpec,
    /// Virtual IP addresses that follow the active node.
    #[serde(default, rename = "virtualIPs", skip_serializing_if = "Vec::is_empty")]
    pub virtual_ips: Vec<VirtualIpSpec>,
    /// The service flow: steps started in order on the active node and stopped in reverse.
    /// Virtual IPs that no `virtualIP` step names are brought up after the last step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flow: Vec<FlowStep>,
    /// Failure detectors on each node and what to do when they fire.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitors: Vec<MonitorSpec>,
    /// While true, no automatic action is taken: no failover, no restart, no failback.
    #[serde(default)]
    pub maintenance: bool,
}

/// One server of the pair.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// The node's name; the agent on that server enrolls under this name.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// The node's address on each heartbeat link, in link order. Both nodes list the same
    /// number of links; link N connects the two Nth addresses.
    #[schemars(length(min = 1, max = 8))]
    pub heartbeat_addresses: Vec<String>,
    /// The node the service prefers to run on (at most one node).
    #[serde(default)]
    pub preferred: bool,
    /// Interface names that differ on this node: logical name used in the group (for
    /// example in `virtualIPs[].interface`) to this server's device name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub interfaces: BTreeMap<String, String>,
}

/// Heartbeat timing and authentication.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatSpec {
    /// How often each node sends a heartbeat on every link.
    #[serde(default = "defaults::interval")]
    pub interval: Duration,
    /// How long the standby waits without hearing the active node on any link before it
    /// considers it dead.
    #[serde(default = "defaults::dead_after")]
    pub dead_after: Duration,
    /// Lifetime of the lease that entitles a node to act as primary. Must be shorter than
    /// `deadAfter`.
    #[serde(default = "defaults::lease_ttl", rename = "leaseTTL")]
    pub lease_ttl: Duration,
    /// Upper bound on the rate difference between the two nodes' monotonic clocks, in parts
    /// per million. Lease expiry is stretched by this factor.
    #[serde(default = "defaults::max_clock_drift_ppm")]
    #[schemars(range(max = 100_000))]
    pub max_clock_drift_ppm: u32,
    /// UDP port heartbeats are sent to, on every link.
    #[serde(default = "defaults::heartbeat_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Secret holding the HMAC-SHA256 key that authenticates heartbeats. When absent the
    /// controller generates a key for the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<SecretKeyRef>,
}

impl Default for HeartbeatSpec {
    fn default() -> Self {
        HeartbeatSpec {
            interval: defaults::interval(),
            dead_after: defaults::dead_after(),
            lease_ttl: defaults::lease_ttl(),
            max_clock_drift_ppm: defaults::max_clock_drift_ppm(),
            port: defaults::heartbeat_port(),
            key_secret_ref: None,
        }
    }
}

/// A key inside a Secret in the group's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (in standalone mode: a Secret manifest in the manifest directory).
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key inside the Secret's data; its value is the raw key, at least 16 bytes.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// The tie-breaker consulted only while heartbeats fail.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WitnessSpec {
    /// `controller`: the controller grants leases while heartbeats fail. `none`: two-node
    /// mode without a witness, in which a full partition makes both nodes active (reported
    /// as a risk; the volumes' split-brain policy then decides whose writes survive).
    #[serde(default)]
    pub mode: WitnessMode,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WitnessMode {
    /// The controller (operator leader or standalone controller) grants leases.
    #[default]
    Controller,
    /// Two-node mode without a witness: the standby promotes on heartbeat loss alone.
    /// Both nodes can become active during a full partition; recovery relies on the
    /// volumes' split-brain policy. Reported as a risk in the group's status.
    None,
}

/// Failback to the preferred node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailbackSpec {
    /// `manual`: a returning node becomes standby and stays so until an admin switches
    /// over. `auto`: the service moves back to the preferred node once it has been healthy
    /// and in sync for `stabilization`.
    #[serde(default)]
    pub mode: FailbackMode,
    /// How long the preferred node must be healthy and in sync before an automatic
    /// failback moves the service to it.
    #[serde(default = "defaults::failback_stabilization")]
    pub stabilization: Duration,
}

impl Default for FailbackSpec {
    fn default() -> Self {
        FailbackSpec { mode: FailbackMode::default(), stabilization: defaults::failback_stabilization() }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FailbackMode {
    /// A returning node becomes standby and stays so until an admin switches over.
    #[default]
    Manual,
    /// The service moves back to the preferred node after it has been healthy and in sync
    /// for `stabilization`.
    Auto,
}

/// A virtual IP address that follows the active node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualIpSpec {
    /// Name used by `virtualIP` flow steps.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Address with prefix length, IPv4 or IPv6, e.g. `198.18.0.100/24`.
    pub address: String,
    /// Logical interface the address is added to (overridable per node).
    #[schemars(length(min = 1, max = 15))]
    pub interface: String,
    /// Gratuitous ARP / unsolicited neighbour advertisement announcements.
    #[serde(default)]
    pub garp: GarpSpec,
}

/// How a takeover is announced to the neighbours.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GarpSpec {
    /// Announcements sent on takeover.
    #[serde(default = "defaults::garp_count")]
    #[schemars(range(min = 1, max = 100))]
    pub count: u32,
    /// Gap between takeover announcements.
    #[serde(default = "defaults::garp_interval")]
    pub interval: Duration,
    /// Re-announce periodically while active (`0s` disables).
    #[serde(default)]
    pub refresh: Duration,
}

impl Default for GarpSpec {
    fn default() -> Self {
        GarpSpec { count: defaults::garp_count(), interval: defaults::garp_interval(), refresh: Duration::ZERO }
    }
}

/// One step of the service flow. Exactly one of `volume`, `virtualIP`, `systemd` or `exec`
/// is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowStep {
    /// Step name, unique in the flow; used in events, metrics and monitors' `restartStep`.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Promote, attach and mount a ReplicatedVolume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeStep>,
    /// Bring up one of the group's virtual IPs.
    #[serde(default, rename = "virtualIP", skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<VirtualIpStep>,
    /// Start and stop a systemd unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd: Option<SystemdStep>,
    /// Run start and stop commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecStep>,
    /// Health check run after the step has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// Upper bound on starting or stopping the step; a command still running is killed.
    #[serde(default = "defaults::step_timeout")]
    pub timeout: Duration,
    /// Time the step must stay healthy after starting before the next step starts.
    #[serde(default)]
    pub stabilization: Duration,
    /// Local restarts allowed before asking for a failover.
    #[serde(default)]
    pub restart: RestartPolicy,
}

/// The kind of a flow step, borrowed from whichever union member is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind<'a> {
    Volume(&'a VolumeStep),
    VirtualIp(&'a VirtualIpStep),
    Systemd(&'a SystemdStep),
    Exec(&'a ExecStep),
}

impl FlowStep {
    /// Every union member that is set, in declaration order. Validation insists on exactly one.
    pub fn kinds(&self) -> Vec<StepKind<'_>> {
        let mut kinds = Vec::with_capacity(1);
        if let Some(v) = &self.volume {
            kinds.push(StepKind::Volume(v));
        }
        if let Some(v) = &self.virtual_ip {
            kinds.push(StepKind::VirtualIp(v));
        }
        if let Some(s) = &self.systemd {
            kinds.push(StepKind::Systemd(s));
        }
        if let Some(e) = &self.exec {
            kinds.push(StepKind::Exec(e));
        }
        kinds
    }

    /// The step's kind, when exactly one union member is set.
    pub fn kind(&self) -> Option<StepKind<'_>> {
        match self.kinds().as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}

impl StepKind<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            StepKind::Volume(_) => "volume",
            StepKind::VirtualIp(_) => "virtualIP",
            StepKind::Systemd(_) => "systemd",
            StepKind::Exec(_) => "exec",
        }
    }
}

/// A ReplicatedVolume used by the flow.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStep {
    /// Name of a ReplicatedVolume in the group's namespace.
    #[schemars(length(min = 1))]
    pub volume_ref: String,
    /// Where the filesystem is mounted; when absent the volume is attached but not mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// Filesystem type passed to `mount` (and to `mkfs`).
    #[serde(default = "defaults::fs_type")]
    pub fs_type: String,
    /// Options passed to `mount -o`, e.g. `noatime`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_options: Vec<String>,
    /// Create the filesystem when the volume holds none yet (first use only).
    #[serde(default)]
    pub mkfs: bool,
    /// Command that attaches the exported volume where no `/dev/nbd*` exists. It receives
    /// `HAPAIR_NBD_SOCKET` and must print the block device path it attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_command: Option<String>,
    /// Command that undoes `attachCommand`; receives `HAPAIR_BLOCK_DEVICE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach_command: Option<String>,
}

/// Names one of `spec.virtualIPs`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualIpStep {
    /// Name of one of the group's `virtualIPs`.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// A systemd unit driven with `systemctl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SystemdStep {
    /// Unit name, e.g. `postgresql@16-main.service`.
    #[schemars(length(min = 1, max = 256))]
    pub unit: String,
}

/// Commands run with `/bin/sh -c` in their own process group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecStep {
    /// Starts the service; must return (exit 0) once it is started.
    #[schemars(length(min = 1))]
    pub start: String,
    /// Stops the service; run on demotion, and before a local restart.
    #[schemars(length(min = 1))]
    pub stop: String,
    /// Extra environment for the commands.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// A health check. Exactly one of `exec`, `tcp` or `http` is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckSpec {
    /// Healthy while a command exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecCheck>,
    /// Healthy while a TCP port accepts connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// Healthy while an HTTP GET answers below `maxStatus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Time between two runs of the check. A run is also made as soon as the step has
    /// started; it can only report the step healthy early, and a failure of that run is
    /// not counted toward `failureThreshold`.
    #[serde(default = "defaults::check_interval")]
    pub interval: Duration,
    /// A run that takes longer counts as failed.
    #[serde(default = "defaults::check_timeout")]
    pub timeout: Duration,
    /// Consecutive failures before the check counts as failed.
    #[serde(default = "defaults::failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecCheck {
    /// Exits 0 when healthy.
    #[schemars(length(min = 1))]
    pub command: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpCheck {
    /// Host to connect to; defaults to the loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP port that must accept a connection.
    #[schemars(range(min = 1))]
    pub port: u16,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// `http://` URL fetched with GET.
    #[schemars(regex(pattern = r"^http://"))]
    pub url: String,
    /// Statuses below this count as healthy.
    #[serde(default = "defaults::http_max_status")]
    #[schemars(range(min = 200, max = 599))]
    pub max_status: u16,
}

/// Local restarts allowed before the step asks for a failover.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartPolicy {
    /// Local restarts allowed within `window`; one more failure asks for a failover. `0`
    /// fails over at the first failure.
    #[serde(default = "defaults::restart_limit")]
    #[schemars(range(max = 100))]
    pub limit: u32,
    /// Restarts older than this no longer count against `limit`.
    #[serde(default = "defaults::restart_window")]
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { limit: defaults::restart_limit(), window: defaults::restart_window() }
    }
}

/// A failure detector. Exactly one of the detector fields is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitorSpec {
    /// Monitor name, unique in the group; used in events and metrics.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// A process that must be alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessMonitor>,
    /// A network interface that must be up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkMonitor>,
    /// A gateway that must answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayMonitor>,
    /// CPU use that must not stay above a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<LoadMonitor>,
    /// Memory use that must not stay above a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<LoadMonitor>,
    /// A mount point that must be present (and writable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<MountMonitor>,
    /// A replicated volume that must be connected with its peer UpToDate (`action: alert`
    /// only: failover and restart cannot repair replication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationMonitor>,
    /// What a failure triggers.
    pub action: MonitorAction,
    /// For `action: restart`: the flow step to restart (the whole flow when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_step: Option<String>,
    /// Time between two observations.
    #[serde(default = "defaults::monitor_interval")]
    pub interval: Duration,
    /// Consecutive failed observations before the monitor fires.
    #[serde(default = "defaults::failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: u32,
}

/// The detector of a monitor, borrowed from whichever union member is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorKind<'a> {
    Process(&'a ProcessMonitor),
    Link(&'a LinkMonitor),
    Gateway(&'a GatewayMonitor),
    Cpu(&'a LoadMonitor),
    Memory(&'a LoadMonitor),
    Mount(&'a MountMonitor),
    Replication(&'a ReplicationMonitor),
}

impl MonitorSpec {
    pub fn kinds(&self) -> Vec<MonitorKind<'_>> {
        let mut kinds = Vec::with_capacity(1);
        if let Some(m) = &self.process {
            kinds.push(MonitorKind::Process(m));
        }
        if let Some(m) = &self.link {
            kinds.push(MonitorKind::Link(m));
        }
        if let Some(m) = &self.gateway {
            kinds.push(MonitorKind::Gateway(m));
        }
        if let Some(m) = &self.cpu {
            kinds.push(MonitorKind::Cpu(m));
        }
        if let Some(m) = &self.memory {
            kinds.push(MonitorKind::Memory(m));
        }
        if let Some(m) = &self.mount {
            kinds.push(MonitorKind::Mount(m));
        }
        if let Some(m) = &self.replication {
            kinds.push(MonitorKind::Replication(m));
        }
        kinds
    }

    pub fn kind(&self) -> Option<MonitorKind<'_>> {
        match self.kinds().as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}

impl MonitorKind<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            MonitorKind::Process(_) => "process",
            MonitorKind::Link(_) => "link",
            MonitorKind::Gateway(_) => "gateway",
            MonitorKind::Cpu(_) => "cpu",
            MonitorKind::Memory(_) => "memory",
            MonitorKind::Mount(_) => "mount",
            MonitorKind::Replication(_) => "replication",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MonitorAction {
    /// Move the service to the other node.
    Failover,
    /// Restart locally (counted against the step's restart policy, then fail over).
    Restart,
    /// Record an event and a metric only.
    Alert,
}

/// A process that must be alive: by exact name (`comm`) or by pidfile.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessMonitor {
    /// Exact process name as the kernel keeps it (`comm`, the first 15 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// File holding the process id (its first line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<String>,
}

/// A network interface that must be operationally up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkMonitor {
    /// Logical interface name (overridable per node in `nodes[].interfaces`).
    #[schemars(length(min = 1, max = 15))]
    pub interface: String,
}

/// A gateway that must answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayMonitor {
    /// IPv4 or IPv6 address of the gateway.
    pub address: String,
    /// `icmp` (echo request) or `arp` (ARP request on `interface`, IPv4 only).
    #[serde(default)]
    pub method: GatewayMethod,
    /// Logical interface to send from (ARP method requires it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// An answer later than this counts as none.
    #[serde(default = "defaults::check_timeout")]
    pub timeout: Duration,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GatewayMethod {
    #[default]
    Icmp,
    Arp,
}

/// CPU or memory use that must not stay above a threshold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadMonitor {
    /// Use, in percent of the whole machine, above which the clock starts. At most 99: use
    /// never exceeds 100 %.
    #[schemars(range(min = 1, max = 99))]
    pub threshold_percent: u32,
    /// How long the use must stay above the threshold before the monitor fires.
    #[serde(default = "defaults::load_sustained")]
    pub sustained: Duration,
}

/// A mount point that must be present (and writable, by default).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MountMonitor {
    /// The mount point; it must be a mount, not just a directory.
    pub path: String,
    /// Also require that a file can be created and removed there.
    #[serde(default = "defaults::yes")]
    pub writable: bool,
}

/// A replicated volume whose replication must be healthy (connected, peer UpToDate).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationMonitor {
    /// Name of a ReplicatedVolume of this group.
    pub volume_ref: String,
}

/// Observed state of a HaGroup, aggregated from the agents' reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HaGroupStatus {
    /// `Pending` (no reports yet), `Healthy`, `Degraded` (serving without a usable standby),
    /// `FailingOver`, `Down` (nobody serving), `SplitBrain`, `Maintenance` or `Invalid` (the
    /// spec is refused; the last valid one stays in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GroupPhase>,
    /// The node serving now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_node: Option<String>,
    /// Incremented by every promotion.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<ActionRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum GroupPhase {
    /// Waiting for the agents to report.
    Pending,
    /// One node active, the other standing by and in sync.
    Healthy,
    /// Serving, but without a usable standby (peer down, out of sync, link lost).
    Degraded,
    /// A promotion or demotion is in progress.
    FailingOver,
    /// No node is serving.
    Down,
    /// Both nodes claimed to be active, or the volumes diverged.
    SplitBrain,
    /// Automatic actions are frozen.
    Maintenance,
    /// The spec failed validation; the last valid config stays in force.
    Invalid,
}

impl GroupPhase {
    pub fn as_str(&self) -> &'static str {
        match self {
            GroupPhase::Pending => "Pending",
            GroupPhase::Healthy => "Healthy",
            GroupPhase::Degraded => "Degraded",
            GroupPhase::FailingOver => "FailingOver",
            GroupPhase::Down => "Down",
            GroupPhase::SplitBrain => "SplitBrain",
            GroupPhase::Maintenance => "Maintenance",
            GroupPhase::Invalid => "Invalid",
        }
    }
}

/// The most recent change of active node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// RFC 3339 time the new node became active.
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    /// From the decision to fail over until the new node was serving.
    pub duration_ms: u64,
    /// When each phase ended, in order, on the new node's clock. A failover's timeline
    /// starts at the last heartbeat heard from the old primary; any other change at the
    /// decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<FailoverPhase>,
}

/// The end of one phase of a failover or switchover.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverPhase {
    /// What ended: `link N silent`, `silence detected`, `witness lease requested`,
    /// `witness lease granted`, `old lease ended`, `term taken`, `volume V promoted`,
    /// `step S started` (for a volume step `step S attached and mounted`, for a VIP step
    /// `step S VIP added, first ARP/NA sent`), `serving`, `step S first healthy` (a checked
    /// step's first passing health check, which may come after `serving`).
    pub phase: String,
    /// Milliseconds from the start of the timeline.
    pub at_ms: u64,
}

/// One node as its agent last reported it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<NodeHealth>,
    /// RFC 3339 time the peer last heard from this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// RFC 3339 time of the agent's last report to the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report: Option<String>,
    #[serde(default)]
    pub uptime_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<Hardware>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkStatus>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum NodeRole {
    Standby,
    Promoting,
    Primary,
    Demoting,
    /// Demoted itself after losing its lease; waits to hear from the peer or witness.
    Fenced,
    Maintenance,
}

impl NodeRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeRole::Standby => "Standby",
            NodeRole::Promoting => "Promoting",
            NodeRole::Primary => "Primary",
            NodeRole::Demoting => "Demoting",
            NodeRole::Fenced => "Fenced",
            NodeRole::Maintenance => "Maintenance",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum NodeHealth {
    Healthy,
    /// A monitor or check is failing but no failover was needed.
    Degraded,
    /// A monitor with `action: failover` fired.
    Failed,
    /// The controller has not heard from the agent.
    Unknown,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hardware {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    #[serde(default)]
    pub cpus: u32,
    /// Current CPU use, percent.
    #[serde(default)]
    pub cpu_percent: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    /// Current memory use, percent.
    #[serde(default)]
    pub memory_percent: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// Heartbeat link index (0-based) or empty for public interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_link: Option<u32>,
    pub interface: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_mbps: Option<u32>,
    pub up: bool,
    /// Heartbeats lost on this link over the last window, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_loss_percent: Option<u32>,
}

// How an admin action ended, or that it has not yet (no doc comment: it would enter the CRD schema).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ActionOutcome {
    /// Accepted and in progress.
    Pending,
    Succeeded,
    Failed,
    /// Refused before doing anything (for example a switchover to an out-of-sync node).
    Rejected,
}

impl ActionOutcome {
    pub fn is_final(&self) -> bool {
        !matches!(self, ActionOutcome::Pending)
    }
}

/// Outcome of the last admin action.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionRecord {
    pub id: String,
    pub action: String,
    pub outcome: ActionOutcome,
    pub message: String,
    /// RFC 3339 time the outcome was recorded.
    pub time: String,
}

/// Defaults shared by serde and the documentation.
pub mod defaults {
    use crate::duration::Duration;

    pub fn interval() -> Duration {
        Duration::from_millis(100)
    }
    pub fn dead_after() -> Duration {
        Duration::from_millis(1000)
    }
    pub fn lease_ttl() -> Duration {
        Duration::from_millis(800)
    }
    pub fn max_clock_drift_ppm() -> u32 {
        10_000
    }
    pub fn heartbeat_port() -> u16 {
        7405
    }
    pub fn failback_stabilization() -> Duration {
        Duration::from_secs(30)
    }
    pub fn garp_count() -> u32 {
        5
    }
    pub fn garp_interval() -> Duration {
        Duration::from_millis(200)
    }
    pub fn step_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn check_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn check_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn failure_threshold() -> u32 {
        3
    }
    pub fn http_max_status() -> u16 {
        400
    }
    pub fn restart_limit() -> u32 {
        3
    }
    pub fn restart_window() -> Duration {
        Duration::from_secs(300)
    }
    pub fn monitor_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn load_sustained() -> Duration {
        Duration::from_secs(60)
    }
    pub fn fs_type() -> String {
        "ext4".to_string()
    }
    pub fn yes() -> bool {
        true
    }
}
