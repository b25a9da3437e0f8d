//! A human-readable account of what a set of manifests asks for: per group, the nodes and
//! links, the timing and the failover bound it implies, the flow in start order, the
//! monitors and the volumes. `hapair-operator plan` prints it before anything runs.

use std::fmt::Write;

use hapair_crds::hagroup::{MonitorKind, StepKind, WitnessMode};
use hapair_crds::quantity::{format_bytes, parse_bytes};

use crate::desired::catalog::Catalog;

/// Renders the plan of every valid group, then every refused manifest.
pub fn render(catalog: &Catalog) -> String {
    let mut out = String::new();
    for (key, (group, origin)) in &catalog.groups {
        let spec = &group.spec;
        let _ = writeln!(out, "HaGroup {key}  ({})", origin.file);
        for node in &spec.nodes {
            let preferred = if node.preferred { " (preferred)" } else { "" };
            let _ = writeln!(
                out,
                "  node {}{preferred}: heartbeat links {}",
                node.name,
                node.heartbeat_addresses.join(", ")
            );
        }
        let hb = &spec.heartbeat;
        let witness = match spec.witness.mode {
            WitnessMode::Controller => "controller witness",
            WitnessMode::None => "NO witness (two-node mode: a full partition can make both nodes active)",
        };
        let _ = writeln!(
            out,
            "  timing: heartbeat every {}, peer dead after {}, lease {}; {witness}",
            hb.interval, hb.dead_after, hb.lease_ttl
        );
        let _ = writeln!(out, "  failback: {:?}, stabilization {}", spec.failback.mode, spec.failback.stabilization);
        let _ = writeln!(out, "  flow (start order; stopped in reverse):");
        let mut referenced = Vec::new();
        for (i, step) in spec.flow.iter().enumerate() {
            let what = match step.kind() {
                Some(StepKind::Volume(v)) => format!(
                    "volume {}{}",
                    v.volume_ref,
                    v.mount_path.as_deref().map(|m| format!(" mounted at {m} ({})", v.fs_type)).unwrap_or_default()
                ),
                Some(StepKind::VirtualIp(v)) => {
                    referenced.push(v.name.clone());
                    format!("virtual IP {}", describe_vip(spec, &v.name))
                }
                Some(StepKind::Systemd(s)) => format!("systemd unit {}", s.unit),
                Some(StepKind::Exec(e)) => format!("exec start {:?} / stop {:?}", e.start, e.stop),
                None => "invalid step".to_string(),
            };
            let _ = writeln!(out, "    {}. {}: {what}", i + 1, step.name);
        }
        for vip in spec.virtual_ips.iter().filter(|v| !referenced.contains(&v.name)) {
            let _ = writeln!(out, "    +. virtual IP {} (after the flow)", describe_vip(spec, &vip.name));
        }
        for monitor in &spec.monitors {
            let what = monitor.kind().map(|k| describe_monitor(&k)).unwrap_or_default();
            let _ = writeln!(out, "  monitor {}: {what} -> {:?}", monitor.name, monitor.action);
        }
        for (vkey, (volume, _)) in
            catalog.volumes.iter().filter(|(k, (v, _))| k.namespace == key.namespace && v.spec.group == key.name)
        {
            let size = parse_bytes(&volume.spec.size).map(format_bytes).unwrap_or_else(|e| e.to_string());
            let _ = writeln!(
                out,
                "  volume {}: {size}, protocol {:?}, port {}, split brain {:?}",
                vkey.name, volume.spec.protocol, volume.spec.port, volume.spec.split_brain_policy
            );
        }
        if spec.maintenance {
            let _ = writeln!(out, "  maintenance: automatic actions are frozen");
        }
    }
    for error in &catalog.errors {
        let _ = writeln!(out, "REFUSED {error}");
    }
    out
}

fn describe_vip(spec: &hapair_crds::HaGroupSpec, name: &str) -> String {
    match spec.virtual_ips.iter().find(|v| v.name == name) {
        Some(v) => format!("{} {} on {} ({} announcements)", v.name, v.address, v.interface, v.garp.count),
        None => name.to_string(),
    }
}

fn describe_monitor(kind: &MonitorKind<'_>) -> String {
    match kind {
        MonitorKind::Process(p) => format!("process {}", p.name.as_deref().or(p.pid_file.as_deref()).unwrap_or("")),
        MonitorKind::Link(l) => format!("link {} up", l.interface),
        MonitorKind::Gateway(g) => format!("gateway {} ({:?})", g.address, g.method),
        MonitorKind::Cpu(l) => format!("cpu above {}% for {}", l.threshold_percent, l.sustained),
        MonitorKind::Memory(l) => format!("memory above {}% for {}", l.threshold_percent, l.sustained),
        MonitorKind::Mount(m) => format!("mount {}{}", m.path, if m.writable { " writable" } else { "" }),
        MonitorKind::Replication(r) => format!("replication of {}", r.volume_ref),
    }
}
