//! Probes: the node-level failure detectors behind `spec.monitors`. Each probe makes one
//! [`Observation`] when asked; a [`monitor::MonitorState`] turns observations into fire and
//! clear transitions that carry the monitor's action for the engine.

pub mod gateway;
pub mod load;
pub mod monitor;
pub mod mount;
pub mod process;
pub mod replication;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hapair_crds::hagroup::{GatewayMethod, MonitorKind, MonitorSpec, NodeSpec};

use crate::iface::Netlink;
pub use monitor::{MonitorState, Transition};

/// One look at the thing a probe watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub healthy: bool,
    pub message: String,
}

impl Observation {
    pub fn healthy(message: impl Into<String>) -> Self {
        Observation { healthy: true, message: message.into() }
    }

    pub fn unhealthy(message: impl Into<String>) -> Self {
        Observation { healthy: false, message: message.into() }
    }
}

/// Why a monitor cannot be probed on this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("monitor {monitor:?}: {message}")]
    Invalid { monitor: String, message: String },
}

/// Where the probes read the kernel's view; tests may point them elsewhere.
#[derive(Clone, Debug)]
pub struct ProcPaths {
    pub proc: PathBuf,
}

impl Default for ProcPaths {
    fn default() -> Self {
        ProcPaths { proc: PathBuf::from("/proc") }
    }
}

/// A configured detector with whatever it must remember between observations.
#[derive(Clone, Debug)]
pub enum Probe {
    ProcessName(String),
    PidFile(PathBuf),
    Link {
        device: String,
    },
    Gateway {
        address: IpAddr,
        method: GatewayMethod,
        device: Option<String>,
        timeout: Duration,
    },
    Cpu {
        sustained: load::Sustained,
        threshold: u32,
        previous: Option<load::CpuTimes>,
    },
    Memory {
        sustained: load::Sustained,
        threshold: u32,
    },
    Mount {
        path: String,
        writable: bool,
    },
    /// Reads the group's replica states; see [`Probe::with_volume_states`].
    Replication {
        volume: String,
        states: replication::VolumeStates,
    },
}

impl Probe {
    /// Builds the probe for `spec` on `node` (logical interface names resolved through the
    /// node's overrides).
    pub fn from_spec(spec: &MonitorSpec, node: &NodeSpec) -> Result<Self, ProbeError> {
        let invalid = |message: &str| ProbeError::Invalid { monitor: spec.name.clone(), message: message.to_string() };
        let device = |logical: &str| node.interfaces.get(logical).cloned().unwrap_or_else(|| logical.to_string());
        match spec.kind() {
            Some(MonitorKind::Process(p)) => match (&p.name, &p.pid_file) {
                (Some(name), None) => Ok(Probe::ProcessName(name.clone())),
                (None, Some(file)) => Ok(Probe::PidFile(PathBuf::from(file))),
                _ => Err(invalid("a process monitor sets exactly one of name or pidFile")),
            },
            Some(MonitorKind::Link(l)) => Ok(Probe::Link { device: device(&l.interface) }),
            Some(MonitorKind::Gateway(g)) => {
                let address: IpAddr = g
                    .address
                    .parse()
                    .map_err(|_| invalid(&format!("gateway address {:?} is not an IP address", g.address)))?;
                if g.method == GatewayMethod::Arp && (g.interface.is_none() || address.is_ipv6()) {
                    return Err(invalid("the ARP method needs an interface and an IPv4 gateway"));
                }
                Ok(Probe::Gateway {
                    address,
                    method: g.method,
                    device: g.interface.as_deref().map(device),
                    timeout: g.timeout.as_std(),
                })
            }
            Some(MonitorKind::Cpu(l)) => Ok(Probe::Cpu {
                sustained: load::Sustained::new(l.threshold_percent, l.sustained.as_std()),
                threshold: l.threshold_percent,
                previous: None,
            }),
            Some(MonitorKind::Memory(l)) => Ok(Probe::Memory {
                sustained: load::Sustained::new(l.threshold_percent, l.sustained.as_std()),
                threshold: l.threshold_percent,
            }),
            Some(MonitorKind::Mount(m)) => Ok(Probe::Mount { path: m.path.clone(), writable: m.writable }),
            Some(MonitorKind::Replication(r)) => {
                Ok(Probe::Replication { volume: r.volume_ref.clone(), states: replication::VolumeStates::default() })
            }
            None => Err(invalid("set exactly one detector")),
        }
    }

    /// Connects a replication probe to the states its group's replicas publish (other
    /// probes are returned as they are).
    pub fn with_volume_states(self, states: &replication::VolumeStates) -> Self {
        match self {
            Probe::Replication { volume, .. } => Probe::Replication { volume, states: states.clone() },
            other => other,
        }
    }

    /// Makes one observation at `now`. `netlink` serves the link and ARP probes.
    pub async fn observe(&mut self, netlink: &Netlink, paths: &ProcPaths, now: Instant) -> Observation {
        match self {
            Probe::ProcessName(name) => process::by_name(&paths.proc, name),
            Probe::PidFile(file) => process::by_pid_file(&paths.proc, file),
            Probe::Link { device } => match netlink.interface(device).await {
                Ok(i) if i.running => Observation::healthy(format!("{device} is {}", i.oper_state)),
                Ok(i) => Observation::unhealthy(format!("{device} is {}", i.oper_state)),
                Err(e) => Observation::unhealthy(e.to_string()),
            },
            Probe::Gateway { address, method: GatewayMethod::Icmp, device, timeout } => {
                gateway::icmp(*address, device.clone(), *timeout).await
            }
            Probe::Gateway { address: IpAddr::V4(gw), method: GatewayMethod::Arp, device: Some(device), timeout } => {
                gateway::arp(netlink, *gw, device, *timeout).await
            }
            Probe::Gateway { address, .. } => {
                Observation::unhealthy(format!("gateway {address}: ARP needs an IPv4 gateway and an interface"))
            }
            Probe::Cpu { sustained, threshold, previous } => {
                let text = std::fs::read_to_string(paths.proc.join("stat")).unwrap_or_default();
                let Some(times) = load::parse_cpu(&text) else {
                    return Observation::unhealthy("cannot read CPU times from /proc/stat");
                };
                let Some(percent) = previous.replace(times).and_then(|before| load::cpu_percent(before, times)) else {
                    return Observation::healthy("first CPU sample taken");
                };
                load_observation(
                    "CPU",
                    percent,
                    *threshold,
                    sustained.sample(now, percent),
                    sustained.above_since(),
                    now,
                )
            }
            Probe::Memory { sustained, threshold } => {
                let text = std::fs::read_to_string(paths.proc.join("meminfo")).unwrap_or_default();
                let Some(percent) = load::parse_memory_percent(&text) else {
                    return Observation::unhealthy("cannot read memory use from /proc/meminfo");
                };
                load_observation(
                    "memory",
                    percent,
                    *threshold,
                    sustained.sample(now, percent),
                    sustained.above_since(),
                    now,
                )
            }
            Probe::Mount { path, writable } => {
                let (path, writable, mountinfo) = (path.clone(), *writable, paths.proc.join("self/mountinfo"));
                // Writing to a hung filesystem blocks; keep that off the async workers.
                tokio::task::spawn_blocking(move || mount::observe(&mountinfo, &path, writable))
                    .await
                    .unwrap_or_else(|e| Observation::unhealthy(format!("mount probe: {e}")))
            }
            Probe::Replication { volume, states } => replication::observe(volume, states),
        }
    }
}

fn load_observation(
    what: &str,
    percent: u32,
    threshold: u32,
    fire: bool,
    since: Option<Instant>,
    now: Instant,
) -> Observation {
    match (fire, since) {
        (true, Some(since)) => Observation::unhealthy(format!(
            "{what} use {percent}% has been above {threshold}% for {:.0?}",
            now.saturating_duration_since(since)
        )),
        (false, Some(_)) => {
            Observation::healthy(format!("{what} use {percent}% is above {threshold}%, not yet for long enough"))
        }
        _ => Observation::healthy(format!("{what} use {percent}% (threshold {threshold}%)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeSpec {
        serde_json::from_value(serde_json::json!({
            "name": "a", "heartbeatAddresses": ["198.18.0.1"], "interfaces": {"public": "ens3"}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn monitor(detector: serde_json::Value) -> MonitorSpec {
        let mut m = serde_json::json!({"name": "m", "action": "alert"});
        if let (Some(m), Some(d)) = (m.as_object_mut(), detector.as_object()) {
            m.extend(d.clone());
        }
        serde_json::from_value(m).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn specs_become_probes_with_interface_overrides() {
        let p = Probe::from_spec(&monitor(serde_json::json!({"link": {"interface": "public"}})), &node());
        assert!(matches!(p, Ok(Probe::Link { ref device }) if device == "ens3"), "{p:?}");
        let p = Probe::from_spec(&monitor(serde_json::json!({"gateway": {"address": "nope"}})), &node());
        assert_eq!(
            p.err().map(|e| e.to_string()).as_deref(),
            Some("monitor \"m\": gateway address \"nope\" is not an IP address")
        );
        let p = Probe::from_spec(
            &monitor(serde_json::json!({"gateway": {"address": "198.18.0.254", "method": "arp"}})),
            &node(),
        );
        assert!(matches!(p, Err(ProbeError::Invalid { .. })));
        let p = Probe::from_spec(&monitor(serde_json::json!({"replication": {"volumeRef": "v"}})), &node());
        assert!(matches!(p, Ok(Probe::Replication { ref volume, .. }) if volume == "v"), "{p:?}");
        let p =
            Probe::from_spec(&monitor(serde_json::json!({"process": {"name": "a", "pidFile": "/run/a.pid"}})), &node());
        assert!(matches!(p, Err(ProbeError::Invalid { .. })));
    }
}
