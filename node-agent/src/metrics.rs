//! The agent's Prometheus metrics (all named `hapair_agent_*`).
//!
//! The runtime feeds these from what the engine and adapters report; the endpoint server
//! encodes them for `/metrics`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use hapair_crds::hagroup::NodeRole;
use hapair_crds::nodeapi::StepState;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::timeline::PhaseTime;
use crate::heartbeat::{DropCounts, DropReason};

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

/// Every metric family the agent exports.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    role: Family<Labels, Gauge>,
    epoch: Family<Labels, Gauge>,
    link_up: Family<Labels, Gauge>,
    heartbeat_loss: Family<Labels, Gauge>,
    heartbeat_dropped: Family<Labels, Counter>,
    probe_healthy: Family<Labels, Gauge>,
    step_state: Family<Labels, Gauge>,
    step_restarts: Family<Labels, Gauge>,
    failovers: Family<Labels, Counter>,
    last_failover_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    failover_phase_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Drop counts already added to the counters, per group: the transport reports totals.
    drops_seen: Mutex<HashMap<String, DropCounts>>,
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
            probe_healthy: Family::default(),
            step_state: Family::default(),
            step_restarts: Family::default(),
            failovers: Family::default(),
            last_failover_seconds: Family::default(),
            failover_phase_seconds: Family::new_with_constructor(phase_histogram),
            drops_seen: Mutex::new(HashMap::new()),
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
        AgentMetrics { registry, ..m }
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
        for line in [
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
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
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
