//! What the engine needs from a group's configuration, derived once per config update.
//!
//! The engine reads [`hapair_crds::nodeapi::GroupConfig`] through this module only: node
//! identities, the timing constants of the protocol (and the derived ones, documented on
//! [`Timing`]), the flow plan (with unreferenced virtual IPs appended as trailing steps),
//! the monitors and the policies. A config that fails the shared validation is refused
//! whole; the engine keeps running on the previous one.

use std::collections::BTreeSet;
use std::time::Duration;

use hapair_crds::hagroup::{FailbackMode, MonitorAction, StepKind, WitnessMode};
use hapair_crds::nodeapi::{GroupConfig, GroupKey};
use hapair_crds::validation::{ValidationErrors, validate_group};

/// Why a config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("group {group}: node {node:?} is not one of the group's nodes")]
    NotAMember { group: String, node: String },
    #[error("group {group}: {errors}")]
    Invalid { group: String, errors: ValidationErrors },
    #[error("group {group}: config is for group {found}, but this engine runs {group}")]
    WrongGroup { group: String, found: String },
}

/// Protocol timing, from `spec.heartbeat` plus the constants derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// `I`: heartbeat period on every link.
    pub interval: Duration,
    /// `D`: silence on every link after which the peer counts as dead.
    pub dead_after: Duration,
    /// `L`: lease lifetime, measured on the holder's clock from the send time of the
    /// heartbeat (or witness request) that earned it.
    pub lease_ttl: Duration,
    /// `δ` in parts per million.
    pub drift_ppm: u32,
    /// `L·(1+δ)`: how long a node waits after its last lease grant before it may act, and
    /// how long a restarted witness stays silent.
    pub lease_wait: Duration,
    /// A primary starts demoting itself this long before its lease ends, so that the VIP
    /// is gone (and the flow stopped) before the lease is. `L/4`.
    pub fence_margin: Duration,
    /// A primary asks the witness as soon as its peer lease has less than this left:
    /// `max(L/2, L − 3·I)`, i.e. after about two missed acknowledgements.
    pub witness_below: Duration,
    /// Renew a held witness lease once less than this is left: `2L/3`.
    pub witness_renew_below: Duration,
    /// An unanswered witness request counts as lost after this: `L/2`.
    pub witness_timeout: Duration,
    /// Two standbys that hear each other wait this long before the designated one
    /// promotes: `3·I`.
    pub bootstrap_settle: Duration,
    /// How long a demoted primary offers the service to its peer: `3·D`.
    pub handover_timeout: Duration,
    /// How long an admin action may stay pending before it fails: `max(10·D, 10 s)`.
    pub action_timeout: Duration,
}

impl Timing {
    pub fn new(interval: Duration, dead_after: Duration, lease_ttl: Duration, drift_ppm: u32) -> Timing {
        let three_intervals = interval.saturating_mul(3);
        Timing {
            interval,
            dead_after,
            lease_ttl,
            drift_ppm,
            lease_wait: hapair_crds::drift::stretch(lease_ttl, drift_ppm),
            fence_margin: lease_ttl / 4,
            witness_below: (lease_ttl / 2).max(lease_ttl.saturating_sub(three_intervals)),
            witness_renew_below: lease_ttl * 2 / 3,
            witness_timeout: lease_ttl / 2,
            bootstrap_settle: three_intervals,
            handover_timeout: dead_after.saturating_mul(3),
            action_timeout: dead_after.saturating_mul(10).max(Duration::from_secs(10)),
        }
    }
}

/// One step of the flow as the engine drives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedStep {
    pub name: String,
    pub kind: PlannedKind,
    pub stabilization: Duration,
    pub restart_limit: u32,
    pub restart_window: Duration,
    /// Consecutive failed health checks before the step counts as failed; `None` when the
    /// step has no check.
    pub check_threshold: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlannedKind {
    /// Attach and mount a volume (promoted before any step starts).
    Volume {
        volume: String,
    },
    /// One of the group's virtual IPs; removed before anything else on demotion.
    VirtualIp {
        vip: String,
    },
    Systemd,
    Exec,
}

impl PlannedStep {
    pub fn is_vip(&self) -> bool {
        matches!(self.kind, PlannedKind::VirtualIp { .. })
    }
}

/// The flow in start order, and the volumes it promotes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowPlan {
    pub steps: Vec<PlannedStep>,
    /// Distinct volumes of the flow's volume steps, in flow order.
    pub volumes: Vec<String>,
}

impl FlowPlan {
    /// Builds the plan from a validated spec: the flow as written, then a trailing
    /// `virtualIP` step for every VIP that no step names (the controller may already have
    /// added them; adding is idempotent).
    pub fn from_spec(spec: &hapair_crds::HaGroupSpec) -> FlowPlan {
        let mut plan = FlowPlan::default();
        let mut referenced = BTreeSet::new();
        let names: BTreeSet<&str> = spec.flow.iter().map(|s| s.name.as_str()).collect();
        for step in &spec.flow {
            let kind = match step.kind() {
                Some(StepKind::Volume(v)) => {
                    if !plan.volumes.contains(&v.volume_ref) {
                        plan.volumes.push(v.volume_ref.clone());
                    }
                    PlannedKind::Volume { volume: v.volume_ref.clone() }
                }
                Some(StepKind::VirtualIp(v)) => {
                    referenced.insert(v.name.clone());
                    PlannedKind::VirtualIp { vip: v.name.clone() }
                }
                Some(StepKind::Systemd(_)) => PlannedKind::Systemd,
                // Validation guarantees exactly one kind; an exec step is the neutral reading.
                Some(StepKind::Exec(_)) | None => PlannedKind::Exec,
            };
            plan.steps.push(PlannedStep {
                name: step.name.clone(),
                kind,
                stabilization: step.stabilization.as_std(),
                restart_limit: step.restart.limit,
                restart_window: step.restart.window.as_std(),
                check_threshold: step.check.as_ref().map(|c| c.failure_threshold.max(1)),
            });
        }
        for vip in spec.virtual_ips.iter().filter(|v| !referenced.contains(&v.name)) {
            let mut name = format!("vip-{}", vip.name);
            while names.contains(name.as_str()) || plan.steps.iter().any(|s| s.name == name) {
                name.push('-');
                name.push('x');
            }
            plan.steps.push(PlannedStep {
                name,
                kind: PlannedKind::VirtualIp { vip: vip.name.clone() },
                stabilization: Duration::ZERO,
                restart_limit: 0,
                restart_window: Duration::ZERO,
                check_threshold: None,
            });
        }
        plan
    }
}

/// A monitor as the engine acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedMonitor {
    pub name: String,
    pub action: MonitorAction,
    /// For `restart`: the step to restart; `None` restarts the whole flow.
    pub restart_step: Option<usize>,
    pub failure_threshold: u32,
}

/// Everything the engine reads from a group config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    pub group: GroupKey,
    pub generation: i64,
    pub me: String,
    pub peer: String,
    /// The preferred node, if any.
    pub preferred: Option<String>,
    pub links: usize,
    pub timing: Timing,
    pub witness: WitnessMode,
    pub failback: FailbackMode,
    pub failback_stabilization: Duration,
    pub flow: FlowPlan,
    pub monitors: Vec<PlannedMonitor>,
    /// `spec.maintenance`.
    pub maintenance: bool,
    /// The group is being deleted: stop everything, never promote.
    pub deleting: bool,
}

/// Default restart policy for whole-flow restarts (no single step's policy applies).
pub const FLOW_RESTART_LIMIT: u32 = 3;
pub const FLOW_RESTART_WINDOW: Duration = Duration::from_secs(300);

impl EngineConfig {
    /// Derives the engine's view of `config` for node `me`, after the shared validation.
    pub fn from_group(config: &GroupConfig, me: &str) -> Result<EngineConfig, ConfigError> {
        let group = config.key.to_string();
        let spec = &config.spec;
        validate_group(spec).map_err(|errors| ConfigError::Invalid { group: group.clone(), errors })?;
        let peer = match spec.nodes.as_slice() {
            [a, b] if a.name == me => b,
            [a, b] if b.name == me => a,
            _ => return Err(ConfigError::NotAMember { group, node: me.to_string() }),
        };
        let flow = FlowPlan::from_spec(spec);
        let monitors = spec
            .monitors
            .iter()
            .map(|m| PlannedMonitor {
                name: m.name.clone(),
                action: m.action,
                restart_step: m.restart_step.as_ref().and_then(|s| flow.steps.iter().position(|p| &p.name == s)),
                failure_threshold: m.failure_threshold.max(1),
            })
            .collect();
        let hb = &spec.heartbeat;
        Ok(EngineConfig {
            group: config.key.clone(),
            generation: config.generation,
            me: me.to_string(),
            peer: peer.name.clone(),
            preferred: spec.nodes.iter().find(|n| n.preferred).map(|n| n.name.clone()),
            links: peer.heartbeat_addresses.len().max(1),
            timing: Timing::new(
                hb.interval.as_std(),
                hb.dead_after.as_std(),
                hb.lease_ttl.as_std(),
                hb.max_clock_drift_ppm,
            ),
            witness: spec.witness.mode,
            failback: spec.failback.mode,
            failback_stabilization: spec.failback.stabilization.as_std(),
            flow,
            monitors,
            maintenance: spec.maintenance,
            deleting: config.deleting,
        })
    }

    /// Whether `a` wins ties against `b` (both standby, both candidates): the preferred
    /// node first, then the smaller name. Both nodes compute the same answer.
    pub fn outranks(&self, a: &str, b: &str) -> bool {
        let pref = |n: &str| self.preferred.as_deref() == Some(n);
        match (pref(a), pref(b)) {
            (true, false) => true,
            (false, true) => false,
            _ => a < b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::nodeapi::HeartbeatKey;

    fn config(yaml: &str) -> GroupConfig {
        let spec = serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"));
        GroupConfig {
            key: GroupKey::new("ns", "g"),
            generation: 1,
            spec,
            volumes: vec![],
            heartbeat_key: HeartbeatKey::Inline(String::new()),
            actions: vec![],
            deleting: false,
        }
    }

    const SPEC: &str = r#"
nodes:
  - {name: a, heartbeatAddresses: [198.18.0.1, 198.19.0.1]}
  - {name: b, heartbeatAddresses: [198.18.0.2, 198.19.0.2], preferred: true}
virtualIPs:
  - {name: www, address: 198.18.0.100/24, interface: eth0}
  - {name: api, address: 198.18.0.101/24, interface: eth0}
flow:
  - {name: app, exec: {start: "true", stop: "true"}}
  - {name: ip, virtualIP: {name: www}}
"#;

    #[test]
    fn derives_peer_timing_and_trailing_vips() {
        let cfg = EngineConfig::from_group(&config(SPEC), "a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.peer, "b");
        assert_eq!(cfg.links, 2);
        assert_eq!(cfg.preferred.as_deref(), Some("b"));
        assert_eq!(cfg.timing.lease_wait, Duration::from_millis(808));
        assert_eq!(cfg.timing.fence_margin, Duration::from_millis(200));
        assert_eq!(cfg.timing.witness_below, Duration::from_millis(500));
        let names: Vec<_> = cfg.flow.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["app", "ip", "vip-api"]);
        assert!(cfg.outranks("b", "a"));
        assert!(!cfg.outranks("a", "b"));
    }

    #[test]
    fn refuses_a_stranger_and_an_invalid_spec() {
        let err = EngineConfig::from_group(&config(SPEC), "c").err();
        assert_eq!(err, Some(ConfigError::NotAMember { group: "ns/g".into(), node: "c".into() }));
        let bad = SPEC.replace("198.19.0.2", "nope");
        let err = EngineConfig::from_group(&config(&bad), "a").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("spec.nodes[1].heartbeatAddresses[1]"), "{err}");
    }
}
