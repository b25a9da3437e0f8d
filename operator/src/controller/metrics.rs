//! The controller's Prometheus metrics, served at `GET /metrics`.
//!
//! Labels carry categories, endpoints and phases, never group or node names: the endpoint
//! is served without a client certificate so any Prometheus can scrape it, and names would
//! tell a stranger what runs where.

use std::sync::Mutex;
use std::time::Duration;

use hapair_crds::hagroup::GroupPhase;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];

/// The `reason` labels of `api_connections_refused`.
pub const API_REFUSAL_REASONS: [&str; 2] = ["total_limit", "client_limit"];
/// The `phase` labels of `api_timeouts`.
pub const API_TIMEOUT_PHASES: [&str; 4] = ["handshake", "idle", "header", "body"];

const PHASES: [GroupPhase; 8] = [
    GroupPhase::Pending,
    GroupPhase::Healthy,
    GroupPhase::Degraded,
    GroupPhase::FailingOver,
    GroupPhase::Down,
    GroupPhase::SplitBrain,
    GroupPhase::Maintenance,
    GroupPhase::Invalid,
];

/// Every metric of the controller, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Counter,
    errors: Family<Labels, Counter>,
    witness: Family<Labels, Counter>,
    requests: Family<Labels2, Counter>,
    groups: Family<Labels, Gauge>,
    enrollments: Family<Labels, Counter>,
    reconcile_seconds: Histogram,
    leader: Gauge,
    kube_writes: Family<Labels, Counter>,
    api_connections_refused: Family<Labels, Counter>,
    api_connections: Gauge,
    api_timeouts: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hapair_controller");
        let reconciles = Counter::default();
        let errors = Family::<Labels, Counter>::default();
        let witness = Family::<Labels, Counter>::default();
        let requests = Family::<Labels2, Counter>::default();
        let groups = Family::<Labels, Gauge>::default();
        let enrollments = Family::<Labels, Counter>::default();
        // 0.5 ms … 16 s: a reconcile of one small change up to a thousand groups at once.
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let leader = Gauge::default();
        let kube_writes = Family::<Labels, Counter>::default();
        let api_connections_refused = Family::<Labels, Counter>::default();
        let api_connections = Gauge::default();
        let api_timeouts = Family::<Labels, Counter>::default();
        registry.register("reconciles", "Reconciles of the desired state", reconciles.clone());
        registry.register("errors", "Errors by category (manifest, store, report, action, tls)", errors.clone());
        registry.register("witness_decisions", "Witness answers by decision", witness.clone());
        registry.register("api_requests", "Node API requests by endpoint and status code", requests.clone());
        registry.register("groups", "HaGroups by phase", groups.clone());
        registry.register("enrollments", "Enrollment attempts by result", enrollments.clone());
        registry.register("reconcile_duration_seconds", "Duration of reconciles", reconcile_seconds.clone());
        registry.register("leader", "1 while this operator replica is the elected leader", leader.clone());
        registry.register(
            "kube_writes",
            "Writes to the Kubernetes API by kind (status, finalizer, annotation, event, state, lease, token)",
            kube_writes.clone(),
        );
        registry.register(
            "api_connections_refused",
            "Node API connections closed at accept, by reason (total_limit, client_limit)",
            api_connections_refused.clone(),
        );
        registry.register("api_connections", "Open node API connections", api_connections.clone());
        registry.register(
            "api_timeouts",
            "Node API connections or requests ended because the client was too slow, by phase (handshake, \
             idle: kept-alive connection without a request, header: request head, body: request body)",
            api_timeouts.clone(),
        );
        // From 0, so that rate() and alerts work before the first refusal or timeout.
        for reason in API_REFUSAL_REASONS {
            let _ = api_connections_refused.get_or_create(&[("reason", reason.to_string())]);
        }
        for phase in API_TIMEOUT_PHASES {
            let _ = api_timeouts.get_or_create(&[("phase", phase.to_string())]);
        }
        Metrics {
            registry: Mutex::new(registry),
            reconciles,
            errors,
            witness,
            requests,
            groups,
            enrollments,
            reconcile_seconds,
            leader,
            kube_writes,
            api_connections_refused,
            api_connections,
            api_timeouts,
        }
    }

    /// A node API connection closed at accept; `reason` is one of [`API_REFUSAL_REASONS`].
    pub fn api_connection_refused(&self, reason: &str) {
        self.api_connections_refused.get_or_create(&[("reason", reason.to_string())]).inc();
    }

    /// Node API connections closed at accept so far, for this reason.
    pub fn api_connections_refused(&self, reason: &str) -> u64 {
        self.api_connections_refused.get_or_create(&[("reason", reason.to_string())]).get()
    }

    pub fn set_api_connections(&self, open: usize) {
        self.api_connections.set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// Open node API connections.
    pub fn api_connections(&self) -> i64 {
        self.api_connections.get()
    }

    /// A client too slow in `phase`, one of [`API_TIMEOUT_PHASES`].
    pub fn api_timeout(&self, phase: &str) {
        self.api_timeouts.get_or_create(&[("phase", phase.to_string())]).inc();
    }

    /// Slow-client timeouts so far in `phase`.
    pub fn api_timeouts(&self, phase: &str) -> u64 {
        self.api_timeouts.get_or_create(&[("phase", phase.to_string())]).get()
    }

    pub fn reconciled(&self) {
        self.reconciles.inc();
    }

    pub fn reconcile_duration(&self, took: Duration) {
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn kube_write(&self, kind: &str) {
        self.kube_writes.get_or_create(&[("kind", kind.to_string())]).inc();
    }

    /// Kubernetes API writes so far, by kind.
    pub fn kube_writes(&self, kind: &str) -> u64 {
        self.kube_writes.get_or_create(&[("kind", kind.to_string())]).get()
    }

    /// Reconciles so far.
    pub fn reconcile_count(&self) -> u64 {
        self.reconciles.get()
    }

    /// Witness answers so far with this decision (`granted`, `denied`, `released`, `refused`).
    pub fn witness_decisions(&self, decision: &str) -> u64 {
        self.witness.get_or_create(&[("decision", decision.to_string())]).get()
    }

    pub fn error(&self, category: &str) {
        self.errors.get_or_create(&[("category", category.to_string())]).inc();
    }

    pub fn witness_decision(&self, decision: &str) {
        self.witness.get_or_create(&[("decision", decision.to_string())]).inc();
    }

    pub fn request(&self, endpoint: &str, code: u16) {
        self.requests.get_or_create(&[("endpoint", endpoint.to_string()), ("code", code.to_string())]).inc();
    }

    pub fn enrollment(&self, result: &str) {
        self.enrollments.get_or_create(&[("result", result.to_string())]).inc();
    }

    /// Sets the per-phase group counts; phases not in `phases` read 0.
    pub fn set_groups(&self, phases: impl IntoIterator<Item = GroupPhase>) {
        let mut counts = [0i64; PHASES.len()];
        for phase in phases {
            if let Some(i) = PHASES.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        for (phase, count) in PHASES.iter().zip(counts) {
            self.groups.get_or_create(&[("phase", phase.as_str().to_string())]).set(count);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_their_labels() {
        let metrics = Metrics::new();
        metrics.reconciled();
        metrics.request("/v1/groups", 200);
        metrics.witness_decision("granted");
        metrics.set_groups([GroupPhase::Healthy, GroupPhase::Healthy, GroupPhase::Down]);
        metrics.reconcile_duration(Duration::from_millis(3));
        metrics.set_leader(true);
        metrics.kube_write("status");
        let fresh = metrics.render();
        assert!(fresh.contains("hapair_controller_api_connections_refused_total{reason=\"total_limit\"} 0"), "{fresh}");
        assert!(fresh.contains("hapair_controller_api_timeouts_total{phase=\"idle\"} 0"), "{fresh}");
        metrics.api_connection_refused("client_limit");
        metrics.set_api_connections(7);
        metrics.api_timeout("body");
        let text = metrics.render();
        assert!(text.contains("hapair_controller_reconcile_duration_seconds_count 1"), "{text}");
        assert!(text.contains("hapair_controller_leader 1"), "{text}");
        assert!(text.contains("hapair_controller_kube_writes_total{kind=\"status\"} 1"), "{text}");
        assert!(text.contains("hapair_controller_reconciles_total 1"), "{text}");
        assert!(text.contains("hapair_controller_api_connections_refused_total{reason=\"client_limit\"} 1"), "{text}");
        assert!(text.contains("hapair_controller_api_connections 7"), "{text}");
        assert!(text.contains("hapair_controller_api_timeouts_total{phase=\"body\"} 1"), "{text}");
        assert!(
            text.contains("hapair_controller_api_requests_total{endpoint=\"/v1/groups\",code=\"200\"} 1"),
            "{text}"
        );
        assert!(text.contains("hapair_controller_groups{phase=\"Healthy\"} 2"), "{text}");
        assert!(text.contains("hapair_controller_groups{phase=\"SplitBrain\"} 0"), "{text}");
        assert!(text.contains("hapair_controller_witness_decisions_total{decision=\"granted\"} 1"), "{text}");
    }
}
