//! The agent's Prometheus metrics (all named `hapair_agent_*`).
//!
//! The runtime feeds these from what the engine and adapters report; the endpoint server
//! encodes them for `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use hapair_crds::hagroup::NodeRole;
use hapair_crds::nodeapi::StepState;
use hapair_crds::volume::{ConnectionState, DiskState, VolumeRole};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::timeline::PhaseTime;
use crate::heartbeat::{DropCounts, DropReason};
use crate::replication::observer::{IoKind, IoObserver, IoStage};
use crate::replication::status::ReplicaStatus;

type Labels = Vec<(&'static str, String)>;

const ROLES: [NodeRole; 6] = [
    NodeRole::Standby,
    NodeRole::Promoting,
    NodeRole::Primary,
    NodeRole::Demoting,
    NodeRole::Fenced,
    NodeRole::Maintenance,
];

const STEP_STATES: [StepState; 7] = [
    StepState::Stopped,
    StepState::Starting,
    StepState::Stabilizing,
    StepState::Running,
    StepState::Restarting,
    StepState::Stopping,
    StepState::Failed,
];

const VOLUME_ROLES: [VolumeRole; 2] = [VolumeRole::Primary, VolumeRole::Secondary];

const CONNECTION_STATES: [ConnectionState; 8] = [
    ConnectionState::StandAlone,
    ConnectionState::Connecting,
    ConnectionState::Connected,
    ConnectionState::SyncSource,
    ConnectionState::SyncTarget,
    ConnectionState::VerifySource,
    ConnectionState::VerifyTarget,
    ConnectionState::SplitBrain,
];

const DISK_STATES: [DiskState; 5] =
    [DiskState::UpToDate, DiskState::Inconsistent, DiskState::Outdated, DiskState::Diskless, DiskState::Unknown];

/// A replica's running totals that become counters: the replica reports totals since it
/// was opened, the counters advance by the difference.
#[derive(Clone, Copy, Debug, Default)]
struct VolumeTotals {
    resync_sent: u64,
    resync_received: u64,
    wire_sent: u64,
    wire_received: u64,
    verify_mismatched: u64,
    al_transactions: u64,
}

impl VolumeTotals {
    fn of(status: &ReplicaStatus) -> Self {
        VolumeTotals {
            resync_sent: status.counters.resync_bytes_sent,
            resync_received: status.counters.resync_bytes_received,
            wire_sent: status.wire_sent_bytes,
            wire_received: status.wire_received_bytes,
            verify_mismatched: status.counters.verify_mismatched_bytes,
            al_transactions: status.counters.al_transactions,
        }
    }
}

/// The labels of one volume's series: group, volume, then `extra`. Creating, updating and
/// forgetting a volume's series all build them here, so they name the same series.
fn volume_labels(group: &str, volume: &str, extra: &[(&'static str, &str)]) -> Labels {
    let mut labels = vec![("group", group.to_string()), ("volume", volume.to_string())];
    labels.extend(extra.iter().map(|&(name, value)| (name, value.to_string())));
    labels
}

/// How far a counter advances from total `before` to total `now`. A total that went down
/// belongs to a replica opened again, counting from zero.
fn advance(before: u64, now: u64) -> u64 {
    if now >= before { now - before } else { now }
}

fn step_state_label(s: StepState) -> &'static str {
    match s {
        StepState::Stopped => "Stopped",
        StepState::Starting => "Starting",
        StepState::Stabilizing => "Stabilizing",
        StepState::Running => "Running",
        StepState::Restarting => "Restarting",
        StepState::Stopping => "Stopping",
        StepState::Failed => "Failed",
    }
}

/// Buckets for failover phases: tens of milliseconds (aggressive timings) to seconds.
fn phase_histogram() -> Histogram {
    Histogram::new([0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0])
}

/// Buckets for export requests: tens of microseconds (a write to page cache) to a second
/// (a flush waiting for a slow disk on both nodes).
fn io_histogram() -> Histogram {
    Histogram::new([0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])
}

/// One volume's export requests, as the replica reports them: a histogram per kind, the
/// requests in flight and the failed ones.
#[derive(Debug)]
pub struct VolumeIo {
    seconds: [Histogram; 4],
    failed: [Counter; 4],
    in_flight: Gauge,
    stages: [Histogram; 2],
}

impl VolumeIo {
    fn index(kind: IoKind) -> usize {
        match kind {
            IoKind::Read => 0,
            IoKind::Write => 1,
            IoKind::Flush => 2,
            IoKind::Zero => 3,
        }
    }
}

impl IoObserver for VolumeIo {
    fn started(&self, _kind: IoKind) {
        self.in_flight.inc();
    }

    fn finished(&self, kind: IoKind, took: std::time::Duration, ok: bool) {
        self.in_flight.dec();
        self.seconds[Self::index(kind)].observe(took.as_secs_f64());
        if !ok {
            self.failed[Self::index(kind)].inc();
        }
    }

    fn stage(&self, stage: IoStage, took: std::time::Duration) {
        let i = match stage {
            IoStage::Local => 0,
            IoStage::Peer => 1,
        };
        self.stages[i].observe(took.as_secs_f64());
    }
}

/// Every metric family the agent exports.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    role: Family<Labels, Gauge>,
    epoch: Family<Labels, Gauge>,
    link_up: Family<Labels, Gauge>,
    heartbeat_loss: Family<Labels, Gauge>,
    heartbeat_dropped: Family<Labels, Counter>,
    peer_protocol_version: Family<Labels, Gauge>,
    probe_healthy: Family<Labels, Gauge>,
    step_state: Family<Labels, Gauge>,
    step_restarts: Family<Labels, Gauge>,
    failovers: Family<Labels, Counter>,
    last_failover_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    failover_phase_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    volume_role: Family<Labels, Gauge>,
    volume_connection: Family<Labels, Gauge>,
    volume_disk_state: Family<Labels, Gauge>,
    volume_out_of_sync: Family<Labels, Gauge>,
    volume_resync_rate: Family<Labels, Gauge>,
    volume_resync_eta: Family<Labels, Gauge>,
    volume_resync_bytes: Family<Labels, Counter>,
    volume_replication_bytes: Family<Labels, Counter>,
    volume_verify_mismatched: Family<Labels, Counter>,
    volume_al_transactions: Family<Labels, Counter>,
    volume_nbd_clients: Family<Labels, Gauge>,
    volume_io_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    volume_io_stage_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    volume_io_failed: Family<Labels, Counter>,
    volume_io_in_flight: Family<Labels, Gauge>,
    /// Drop counts already added to the counters, per group: the transport reports totals.
    drops_seen: Mutex<HashMap<String, DropCounts>>,
    /// Replica totals already added to the counters, per (group, volume).
    volume_totals_seen: Mutex<HashMap<(String, String), VolumeTotals>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hapair_agent");
        let m = AgentMetrics {
            role: Family::default(),
            epoch: Family::default(),
            link_up: Family::default(),
            heartbeat_loss: Family::default(),
            heartbeat_dropped: Family::default(),
            peer_protocol_version: Family::default(),
            probe_healthy: Family::default(),
            step_state: Family::default(),
            step_restarts: Family::default(),
            failovers: Family::default(),
            last_failover_seconds: Family::default(),
            failover_phase_seconds: Family::new_with_constructor(phase_histogram),
            volume_role: Family::default(),
            volume_connection: Family::default(),
            volume_disk_state: Family::default(),
            volume_out_of_sync: Family::default(),
            volume_resync_rate: Family::default(),
            volume_resync_eta: Family::default(),
            volume_resync_bytes: Family::default(),
            volume_replication_bytes: Family::default(),
            volume_verify_mismatched: Family::default(),
            volume_al_transactions: Family::default(),
            volume_nbd_clients: Family::default(),
            volume_io_seconds: Family::new_with_constructor(io_histogram),
            volume_io_stage_seconds: Family::new_with_constructor(io_histogram),
            volume_io_failed: Family::default(),
            volume_io_in_flight: Family::default(),
            drops_seen: Mutex::new(HashMap::new()),
            volume_totals_seen: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register("role", "1 for the node's current role in the group, 0 for the others", m.role.clone());
        registry.register("epoch", "The group's epoch as this node knows it", m.epoch.clone());
        registry.register("heartbeat_link_up", "1 while heartbeats arrive on the link", m.link_up.clone());
        registry.register(
            "heartbeat_loss_percent",
            "Heartbeats lost on the link over the recent window",
            m.heartbeat_loss.clone(),
        );
        registry.register(
            "heartbeat_dropped",
            "Received heartbeat datagrams dropped, by reason",
            m.heartbeat_dropped.clone(),
        );
        registry.register(
            "peer_protocol_version",
            "The wire-protocol version this node and its peer agreed on, by protocol",
            m.peer_protocol_version.clone(),
        );
        registry.register("probe_healthy", "1 while the monitor's probe is healthy", m.probe_healthy.clone());
        registry.register(
            "flow_step_state",
            "1 for the flow step's current state, 0 for the others",
            m.step_state.clone(),
        );
        registry.register(
            "flow_step_restarts",
            "Local restarts of the flow step within its window",
            m.step_restarts.clone(),
        );
        registry.register("failovers", "Times this node took over the group", m.failovers.clone());
        registry.register(
            "last_failover_duration_seconds",
            "From the decision to fail over until this node was serving",
            m.last_failover_seconds.clone(),
        );
        registry.register(
            "failover_phase_seconds",
            "When each phase of a takeover ended, from the start of its timeline (for a failover, the last \
             heartbeat heard from the old primary)",
            m.failover_phase_seconds.clone(),
        );
        registry.register(
            "volume_role",
            "1 for the replica's current role (Primary, Secondary), 0 for the other",
            m.volume_role.clone(),
        );
        registry.register(
            "volume_connection",
            "1 for the replication link's current state, 0 for the others",
            m.volume_connection.clone(),
        );
        registry.register(
            "volume_disk_state",
            "1 for the disk state of the local replica and of the peer's as last reported, 0 for the others",
            m.volume_disk_state.clone(),
        );
        registry.register(
            "volume_out_of_sync_bytes",
            "Bytes marked out of sync in the replica's bitmap: what a resync would copy",
            m.volume_out_of_sync.clone(),
        );
        registry.register(
            "volume_resync_bytes_per_second",
            "Rate of the resync in progress (0 when none is)",
            m.volume_resync_rate.clone(),
        );
        registry.register(
            "volume_resync_eta_seconds",
            "Estimated time left for the resync in progress (0 when none is)",
            m.volume_resync_eta.clone(),
        );
        registry.register(
            "volume_resync_bytes",
            "Bytes copied by resyncs, by direction (sent as source, received as target)",
            m.volume_resync_bytes.clone(),
        );
        registry.register(
            "volume_replication_bytes",
            "Bytes on the replication link, by direction (writes, resync and protocol traffic)",
            m.volume_replication_bytes.clone(),
        );
        registry.register(
            "volume_verify_mismatched_bytes",
            "Bytes an online verify found different between the replicas",
            m.volume_verify_mismatched.clone(),
        );
        registry.register(
            "volume_activity_log_transactions",
            "Activity-log transactions written (one per write to an extent not already active)",
            m.volume_al_transactions.clone(),
        );
        registry.register(
            "volume_nbd_clients",
            "NBD clients connected to the replica's export",
            m.volume_nbd_clients.clone(),
        );
        registry.register(
            "volume_io_seconds",
            "Export requests by kind (read, write, flush, zero), from arrival to completion as the NBD client \
             sees it: for protocol C, a write or flush includes the peer's acknowledgement",
            m.volume_io_seconds.clone(),
        );
        registry.register(
            "volume_io_stage_seconds",
            "The halves of application writes, zeroes and flushes: local disk (queueing included) and peer acknowledgement",
            m.volume_io_stage_seconds.clone(),
        );
        registry.register("volume_io_failed", "Export requests that failed, by kind", m.volume_io_failed.clone());
        registry.register("volume_io_in_flight", "Export requests in progress", m.volume_io_in_flight.clone());
        AgentMetrics { registry, ..m }
    }

    /// Removes every series of `volume` in `group`: its replica is closed for good.
    pub fn forget_volume(&self, group: &str, volume: &str) {
        let with = |extra: &[(&'static str, &str)]| volume_labels(group, volume, extra);
        let base = with(&[]);
        for role in VOLUME_ROLES {
            self.volume_role.remove(&with(&[("role", &format!("{role:?}"))]));
        }
        for state in CONNECTION_STATES {
            self.volume_connection.remove(&with(&[("state", &format!("{state:?}"))]));
        }
        for replica in ["local", "peer"] {
            for state in DISK_STATES {
                self.volume_disk_state.remove(&with(&[("replica", replica), ("state", state.as_str())]));
            }
        }
        for gauge in [
            &self.volume_out_of_sync,
            &self.volume_resync_rate,
            &self.volume_resync_eta,
            &self.volume_nbd_clients,
            &self.volume_io_in_flight,
        ] {
            gauge.remove(&base);
        }
        for counter in [&self.volume_verify_mismatched, &self.volume_al_transactions] {
            counter.remove(&base);
        }
        self.peer_protocol_version.remove(&with(&[("protocol", "replication")]));
        for direction in ["sent", "received"] {
            let labels = with(&[("direction", direction)]);
            self.volume_resync_bytes.remove(&labels);
            self.volume_replication_bytes.remove(&labels);
        }
        for kind in IoKind::ALL {
            let labels = with(&[("op", kind.as_str())]);
            self.volume_io_seconds.remove(&labels);
            self.volume_io_failed.remove(&labels);
        }
        for stage in IoStage::ALL {
            self.volume_io_stage_seconds.remove(&with(&[("stage", stage.as_str())]));
        }
        if let Ok(mut seen) = self.volume_totals_seen.lock() {
            seen.remove(&(group.to_string(), volume.to_string()));
        }
    }

    /// The handles a replica of `volume` in `group` reports its export requests to.
    pub fn volume_io(&self, group: &str, volume: &str) -> Arc<VolumeIo> {
        let of = |kind: IoKind| volume_labels(group, volume, &[("op", kind.as_str())]);
        Arc::new(VolumeIo {
            seconds: IoKind::ALL.map(|k| self.volume_io_seconds.get_or_create(&of(k)).clone()),
            failed: IoKind::ALL.map(|k| self.volume_io_failed.get_or_create(&of(k)).clone()),
            in_flight: self.volume_io_in_flight.get_or_create(&volume_labels(group, volume, &[])).clone(),
            stages: IoStage::ALL.map(|s| {
                let labels = volume_labels(group, volume, &[("stage", s.as_str())]);
                self.volume_io_stage_seconds.get_or_create(&labels).clone()
            }),
        })
    }

    /// A replica's status, as the group task receives it.
    pub fn set_volume(&self, group: &str, status: &ReplicaStatus) {
        let with = |extra: &[(&'static str, &str)]| volume_labels(group, &status.volume, extra);
        let base = with(&[]);
        for role in VOLUME_ROLES {
            let labels = with(&[("role", &format!("{role:?}"))]);
            self.volume_role.get_or_create(&labels).set(i64::from(role == status.role));
        }
        for state in CONNECTION_STATES {
            let labels = with(&[("state", &format!("{state:?}"))]);
            self.volume_connection.get_or_create(&labels).set(i64::from(state == status.connection));
        }
        for (replica, disk) in [("local", Some(status.disk)), ("peer", status.peer_disk)] {
            for state in DISK_STATES {
                let labels = with(&[("replica", replica), ("state", state.as_str())]);
                self.volume_disk_state.get_or_create(&labels).set(i64::from(disk == Some(state)));
            }
        }
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.volume_out_of_sync.get_or_create(&base).set(gauge(status.out_of_sync_bytes));
        let (rate, eta) = status.sync.as_ref().map_or((0, 0), |s| (s.bytes_per_second, s.eta_seconds.unwrap_or(0)));
        self.volume_resync_rate.get_or_create(&base).set(gauge(rate));
        self.volume_resync_eta.get_or_create(&base).set(gauge(eta));
        self.volume_nbd_clients.get_or_create(&base).set(gauge(status.nbd_clients as u64));
        if let Some(version) = status.protocol_version {
            let labels = with(&[("protocol", "replication")]);
            self.peer_protocol_version.get_or_create(&labels).set(i64::from(version));
        }

        let now = VolumeTotals::of(status);
        let Ok(mut seen) = self.volume_totals_seen.lock() else { return };
        let before = seen.insert((group.to_string(), status.volume.clone()), now).unwrap_or_default();
        let sent = with(&[("direction", "sent")]);
        let received = with(&[("direction", "received")]);
        self.volume_resync_bytes.get_or_create(&sent).inc_by(advance(before.resync_sent, now.resync_sent));
        self.volume_resync_bytes.get_or_create(&received).inc_by(advance(before.resync_received, now.resync_received));
        self.volume_replication_bytes.get_or_create(&sent).inc_by(advance(before.wire_sent, now.wire_sent));
        self.volume_replication_bytes.get_or_create(&received).inc_by(advance(before.wire_received, now.wire_received));
        self.volume_verify_mismatched
            .get_or_create(&base)
            .inc_by(advance(before.verify_mismatched, now.verify_mismatched));
        self.volume_al_transactions.get_or_create(&base).inc_by(advance(before.al_transactions, now.al_transactions));
    }

    pub fn set_role(&self, group: &str, node: &str, role: NodeRole) {
        for r in ROLES {
            let labels =
                vec![("group", group.to_string()), ("node", node.to_string()), ("role", r.as_str().to_string())];
            self.role.get_or_create(&labels).set(i64::from(r == role));
        }
    }

    pub fn set_epoch(&self, group: &str, epoch: u64) {
        self.epoch.get_or_create(&vec![("group", group.to_string())]).set(i64::try_from(epoch).unwrap_or(i64::MAX));
    }

    pub fn set_link(&self, group: &str, link: u32, up: bool, loss_percent: u32) {
        let labels = vec![("group", group.to_string()), ("link", link.to_string())];
        self.link_up.get_or_create(&labels).set(i64::from(up));
        self.heartbeat_loss.get_or_create(&labels).set(i64::from(loss_percent));
    }

    /// Takes the transport's cumulative drop counts and advances the counters to match.
    pub fn record_heartbeat_drops(&self, group: &str, counts: DropCounts) {
        let Ok(mut seen) = self.drops_seen.lock() else { return };
        let previous = seen.get(group).copied().unwrap_or_default();
        for reason in DropReason::ALL {
            let delta = counts.get(reason).saturating_sub(previous.get(reason));
            let labels = vec![("group", group.to_string()), ("reason", reason.label().to_string())];
            self.heartbeat_dropped.get_or_create(&labels).inc_by(delta);
        }
        seen.insert(group.to_string(), counts);
    }

    /// An authenticated datagram whose payload is not a heartbeat the engine understands
    /// (e.g. a peer running a newer wire version): counted beside the transport's drops.
    pub fn record_undecodable(&self, group: &str) {
        let labels = vec![("group", group.to_string()), ("reason", "undecodable".to_string())];
        self.heartbeat_dropped.get_or_create(&labels).inc();
    }

    /// An authenticated heartbeat in a version this agent does not speak: the peer is more
    /// than one version away, outside the supported skew.
    pub fn record_unsupported_heartbeat(&self, group: &str) {
        let labels = vec![("group", group.to_string()), ("reason", "unsupported_version".to_string())];
        self.heartbeat_dropped.get_or_create(&labels).inc();
    }

    pub fn set_peer_protocol_version(&self, group: &str, protocol: &str, version: u8) {
        let labels = vec![("group", group.to_string()), ("protocol", protocol.to_string())];
        self.peer_protocol_version.get_or_create(&labels).set(i64::from(version));
    }

    pub fn set_probe(&self, group: &str, monitor: &str, healthy: bool) {
        let labels = vec![("group", group.to_string()), ("monitor", monitor.to_string())];
        self.probe_healthy.get_or_create(&labels).set(i64::from(healthy));
    }

    pub fn set_step(&self, group: &str, step: &str, state: StepState, restarts: u32) {
        for s in STEP_STATES {
            let labels = vec![
                ("group", group.to_string()),
                ("step", step.to_string()),
                ("state", step_state_label(s).to_string()),
            ];
            self.step_state.get_or_create(&labels).set(i64::from(s == state));
        }
        let labels = vec![("group", group.to_string()), ("step", step.to_string())];
        self.step_restarts.get_or_create(&labels).set(i64::from(restarts));
    }

    pub fn record_failover(&self, group: &str, duration: std::time::Duration, phases: &[PhaseTime]) {
        let labels = vec![("group", group.to_string())];
        self.failovers.get_or_create(&labels).inc();
        self.last_failover_seconds.get_or_create(&labels).set(duration.as_secs_f64());
        self.record_phases(group, phases);
    }

    /// Phases of a failover already recorded, which ended after it was serving.
    pub fn record_phases(&self, group: &str, phases: &[PhaseTime]) {
        for p in phases {
            let labels = vec![("group", group.to_string()), ("phase", p.phase.clone())];
            self.failover_phase_seconds.get_or_create(&labels).observe(p.after.as_secs_f64());
        }
    }

    /// The Prometheus text exposition (OpenMetrics flavour).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one of `lines` is a whole line of the exposition `text`.
    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn families_are_named_and_labelled() {
        let m = AgentMetrics::new();
        m.set_role("db/pg", "a", NodeRole::Primary);
        m.set_epoch("db/pg", 4);
        m.set_link("db/pg", 1, false, 100);
        m.set_probe("db/pg", "gw", true);
        m.set_step("db/pg", "app", StepState::Running, 2);
        let phases = [
            PhaseTime { phase: "silence detected".into(), after: std::time::Duration::from_millis(600) },
            PhaseTime { phase: "serving".into(), after: std::time::Duration::from_millis(1100) },
        ];
        m.record_failover("db/pg", std::time::Duration::from_millis(1500), &phases);
        let text = m.encode();
        assert_lines(
            &text,
            &[
                "hapair_agent_role{group=\"db/pg\",node=\"a\",role=\"Primary\"} 1",
                "hapair_agent_role{group=\"db/pg\",node=\"a\",role=\"Standby\"} 0",
                "hapair_agent_epoch{group=\"db/pg\"} 4",
                "hapair_agent_heartbeat_link_up{group=\"db/pg\",link=\"1\"} 0",
                "hapair_agent_heartbeat_loss_percent{group=\"db/pg\",link=\"1\"} 100",
                "hapair_agent_probe_healthy{group=\"db/pg\",monitor=\"gw\"} 1",
                "hapair_agent_flow_step_state{group=\"db/pg\",step=\"app\",state=\"Running\"} 1",
                "hapair_agent_flow_step_restarts{group=\"db/pg\",step=\"app\"} 2",
                "hapair_agent_failovers_total{group=\"db/pg\"} 1",
                "hapair_agent_last_failover_duration_seconds{group=\"db/pg\"} 1.5",
                "hapair_agent_failover_phase_seconds_count{group=\"db/pg\",phase=\"serving\"} 1",
                "hapair_agent_failover_phase_seconds_sum{group=\"db/pg\",phase=\"silence detected\"} 0.6",
                "hapair_agent_failover_phase_seconds_bucket{le=\"1.25\",group=\"db/pg\",phase=\"serving\"} 1",
                "hapair_agent_failover_phase_seconds_bucket{le=\"1.0\",group=\"db/pg\",phase=\"serving\"} 0",
            ],
        );
    }

    fn replica_status(connection: ConnectionState, resync_sent: u64, wire_sent: u64) -> ReplicaStatus {
        let snapshot = crate::replication::machine::Snapshot {
            role: VolumeRole::Primary,
            disk: DiskState::UpToDate,
            connection,
            peer_disk: Some(DiskState::Inconsistent),
            peer_role: Some(VolumeRole::Secondary),
            out_of_sync_bytes: 48 << 20,
            sync: Some(hapair_crds::volume::SyncProgress {
                done_bytes: 16 << 20,
                total_bytes: 64 << 20,
                bytes_per_second: 8 << 20,
                eta_seconds: Some(6),
            }),
            epoch: 3,
            counters: crate::replication::machine::Counters {
                resync_bytes_sent: resync_sent,
                al_transactions: 3,
                ..Default::default()
            },
            writes_allowed: true,
            reads_allowed: true,
            ..crate::replication::status::tests::snapshot()
        };
        let mut status = ReplicaStatus::new("data", "a", "b", snapshot);
        status.wire_sent_bytes = wire_sent;
        status.nbd_clients = 1;
        status
    }

    #[test]
    fn a_volume_shows_its_states_progress_and_traffic() {
        let m = AgentMetrics::new();
        m.set_volume("db/pg", &replica_status(ConnectionState::SyncSource, 16 << 20, 17 << 20));
        let text = m.encode();
        assert_lines(
            &text,
            &[
                "hapair_agent_volume_role{group=\"db/pg\",volume=\"data\",role=\"Primary\"} 1",
                "hapair_agent_volume_role{group=\"db/pg\",volume=\"data\",role=\"Secondary\"} 0",
                "hapair_agent_volume_connection{group=\"db/pg\",volume=\"data\",state=\"SyncSource\"} 1",
                "hapair_agent_volume_connection{group=\"db/pg\",volume=\"data\",state=\"Connected\"} 0",
                "hapair_agent_volume_disk_state{group=\"db/pg\",volume=\"data\",replica=\"local\",state=\"UpToDate\"} 1",
                "hapair_agent_volume_disk_state{group=\"db/pg\",volume=\"data\",replica=\"peer\",state=\"Inconsistent\"} 1",
                "hapair_agent_volume_disk_state{group=\"db/pg\",volume=\"data\",replica=\"peer\",state=\"UpToDate\"} 0",
                "hapair_agent_volume_out_of_sync_bytes{group=\"db/pg\",volume=\"data\"} 50331648",
                "hapair_agent_volume_resync_bytes_per_second{group=\"db/pg\",volume=\"data\"} 8388608",
                "hapair_agent_volume_resync_eta_seconds{group=\"db/pg\",volume=\"data\"} 6",
                "hapair_agent_volume_resync_bytes_total{group=\"db/pg\",volume=\"data\",direction=\"sent\"} 16777216",
                "hapair_agent_volume_replication_bytes_total{group=\"db/pg\",volume=\"data\",direction=\"sent\"} 17825792",
                "hapair_agent_volume_nbd_clients{group=\"db/pg\",volume=\"data\"} 1",
                "hapair_agent_peer_protocol_version{group=\"db/pg\",volume=\"data\",protocol=\"replication\"} 2",
                "hapair_agent_volume_activity_log_transactions_total{group=\"db/pg\",volume=\"data\"} 3",
            ],
        );
    }

    #[test]
    fn a_forgotten_volume_leaves_no_series_while_others_stay() {
        let m = AgentMetrics::new();
        m.set_volume("db/pg", &replica_status(ConnectionState::Connected, 1, 2));
        m.set_volume("other", &replica_status(ConnectionState::Connected, 1, 2));
        let io = m.volume_io("db/pg", "data");
        io.started(IoKind::Read);
        io.finished(IoKind::Read, std::time::Duration::from_micros(100), true);
        m.forget_volume("db/pg", "data");
        let text = m.encode();
        let gone: Vec<&str> = text.lines().filter(|l| l.contains("group=\"db/pg\"")).collect();
        assert!(gone.is_empty(), "series left behind: {gone:?}");
        assert!(text.contains("hapair_agent_volume_out_of_sync_bytes{group=\"other\",volume=\"data\"} "), "{text}");
    }

    #[test]
    fn volume_counters_add_what_the_replica_added_and_survive_its_reopening() {
        let m = AgentMetrics::new();
        m.set_volume("g", &replica_status(ConnectionState::SyncSource, 100, 1000));
        m.set_volume("g", &replica_status(ConnectionState::SyncSource, 250, 1500));
        // Reopened: the replica counts from zero again; nothing is subtracted.
        m.set_volume("g", &replica_status(ConnectionState::Connected, 40, 300));
        let text = m.encode();
        let sent = "{group=\"g\",volume=\"data\",direction=\"sent\"}";
        assert!(text.contains(&format!("hapair_agent_volume_resync_bytes_total{sent} 290\n")), "{text}");
        assert!(text.contains(&format!("hapair_agent_volume_replication_bytes_total{sent} 1800\n")), "{text}");
        assert!(
            text.contains("hapair_agent_volume_connection{group=\"g\",volume=\"data\",state=\"SyncSource\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn export_requests_are_timed_by_kind_and_counted_while_in_flight() {
        let m = AgentMetrics::new();
        let io = m.volume_io("db/pg", "data");
        io.started(IoKind::Write);
        io.started(IoKind::Flush);
        io.finished(IoKind::Write, std::time::Duration::from_micros(300), true);
        let again = m.volume_io("db/pg", "data");
        again.started(IoKind::Write);
        again.finished(IoKind::Write, std::time::Duration::from_millis(20), false);
        io.stage(IoStage::Local, std::time::Duration::from_micros(80));
        io.stage(IoStage::Peer, std::time::Duration::from_micros(700));
        let text = m.encode();
        assert_lines(
            &text,
            &[
                "hapair_agent_volume_io_in_flight{group=\"db/pg\",volume=\"data\"} 1",
                "hapair_agent_volume_io_seconds_count{group=\"db/pg\",volume=\"data\",op=\"write\"} 2",
                "hapair_agent_volume_io_seconds_bucket{le=\"0.0005\",group=\"db/pg\",volume=\"data\",op=\"write\"} 1",
                "hapair_agent_volume_io_seconds_bucket{le=\"0.025\",group=\"db/pg\",volume=\"data\",op=\"write\"} 2",
                "hapair_agent_volume_io_seconds_count{group=\"db/pg\",volume=\"data\",op=\"flush\"} 0",
                "hapair_agent_volume_io_failed_total{group=\"db/pg\",volume=\"data\",op=\"write\"} 1",
                "hapair_agent_volume_io_stage_seconds_bucket{le=\"0.0001\",group=\"db/pg\",volume=\"data\",stage=\"local\"} 1",
                "hapair_agent_volume_io_stage_seconds_bucket{le=\"0.0005\",group=\"db/pg\",volume=\"data\",stage=\"peer\"} 0",
                "hapair_agent_volume_io_stage_seconds_count{group=\"db/pg\",volume=\"data\",stage=\"peer\"} 1",
            ],
        );
    }

    #[test]
    fn drop_counters_follow_the_transport_totals() {
        let m = AgentMetrics::new();
        let mut v = crate::heartbeat::verify::Verifier::new(
            crate::heartbeat::verify::Expectation {
                group: crate::heartbeat::GroupId(1),
                peer: crate::heartbeat::NodeId(2),
                peer_addresses: vec![],
            },
            crate::heartbeat::HmacKey::from_bytes(vec![0; 16], "t").unwrap_or_else(|e| panic!("{e}")),
        );
        let source = std::net::IpAddr::from([198, 18, 0, 1]);
        let _ = v.verify(b"x", 0, source, 0);
        m.record_heartbeat_drops("g", v.drops());
        let _ = v.verify(b"y", 0, source, 0);
        m.record_heartbeat_drops("g", v.drops());
        m.record_heartbeat_drops("g", v.drops());
        let text = m.encode();
        assert!(text.contains("hapair_agent_heartbeat_dropped_total{group=\"g\",reason=\"truncated\"} 2"), "{text}");
        assert!(text.contains("hapair_agent_heartbeat_dropped_total{group=\"g\",reason=\"forged\"} 0"), "{text}");
    }
}
