//! Semantic validation of HaGroup and ReplicatedVolume specs.
//!
//! The generated CRD schema already enforces enums, ranges and patterns at the API server
//! (and the standalone loader applies the same schema). What a schema cannot express lives
//! here: cross-field and cross-object rules. Both the controller and the agent run these
//! checks, so a config that reaches an agent by any route has passed them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::hagroup::{
    CheckSpec, FailbackMode, FlowStep, HaGroupSpec, MonitorAction, MonitorKind, MonitorSpec, StepKind,
};
use crate::quantity::parse_bytes;
use crate::volume::ReplicatedVolumeSpec;

/// Block size of replicated volumes: sizes and bitmap granularity are multiples of it.
pub const BLOCK_SIZE: u64 = 4096;

/// One rule broken by one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path in the manifest, e.g. `spec.nodes[1].heartbeatAddresses`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every rule a spec breaks; validation reports them all at once so users fix them in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    pub fn first(&self) -> Option<&FieldError> {
        self.0.first()
    }
}

#[derive(Default)]
struct Collector(Vec<FieldError>);

impl Collector {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }

    fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(ValidationErrors(self.0)) }
    }
}

/// Linux interface names: 1–15 bytes, no `/`, no whitespace, not `.` or `..`.
pub fn is_valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// DNS-label names used for nodes, steps, monitors and VIPs.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// Longest object name Kubernetes accepts (a DNS-1123 subdomain).
pub const MAX_OBJECT_NAME: usize = 253;

/// Longest namespace Kubernetes accepts (a DNS-1123 label).
pub const MAX_NAMESPACE: usize = 63;

/// Checks `metadata.name` as the API server does: a DNS-1123 subdomain of at most 253
/// bytes. The message names the first thing wrong, so `a/b` is told about its `/`.
pub fn check_object_name(name: &str) -> Result<(), String> {
    check_dns_name(name, MAX_OBJECT_NAME, true)
}

/// Checks `metadata.namespace` as the API server does: a DNS-1123 label of at most 63 bytes.
pub fn check_namespace(namespace: &str) -> Result<(), String> {
    check_dns_name(namespace, MAX_NAMESPACE, false)
}

fn check_dns_name(value: &str, max: usize, dots: bool) -> Result<(), String> {
    let shape = if dots {
        "a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
    } else {
        "a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit"
    };
    let refuse = |why: String| Err(format!("{value:?} is not valid: {why}; it must be {shape}, at most {max} bytes"));
    if value.is_empty() {
        return refuse("it is empty".into());
    }
    if value.len() > max {
        return refuse(format!("it is {} bytes long", value.len()));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.')) {
        let what = match c {
            '/' => "'/' separates namespace and name".to_string(),
            c if c.is_control() => format!("control character {:?}", c.escape_default().to_string()),
            c if c.is_whitespace() => "it contains white space".to_string(),
            c if c.is_uppercase() => format!("upper-case {c:?}"),
            c => format!("character {c:?}"),
        };
        return refuse(what);
    }
    if !dots && value.contains('.') {
        return refuse("'.' is not allowed here".into());
    }
    if value.contains("..") {
        return refuse("it contains \"..\"".into());
    }
    for part in value.split('.') {
        let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
        if !alnum(part.as_bytes().first()) || !alnum(part.as_bytes().last()) {
            return refuse("each part must start and end with a letter or digit".into());
        }
    }
    Ok(())
}

/// Validates one HaGroup spec on its own.
pub fn validate_group(spec: &HaGroupSpec) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    check_nodes(spec, &mut c);
    check_timing(spec, &mut c);
    let vip_names = check_virtual_ips(spec, &mut c);
    let step_names = check_flow(spec, &vip_names, &mut c);
    check_monitors(&spec.monitors, &step_names, &mut c);
    if spec.failback.mode == FailbackMode::Auto && !spec.nodes.iter().any(|n| n.preferred) {
        c.push("spec.failback.mode", "failback auto needs one node marked preferred");
    }
    c.finish()
}

fn check_nodes(spec: &HaGroupSpec, c: &mut Collector) {
    if spec.nodes.len() != 2 {
        c.push("spec.nodes", format!("a group has exactly two nodes, found {}", spec.nodes.len()));
    }
    let mut names = BTreeSet::new();
    let mut addresses: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (i, node) in spec.nodes.iter().enumerate() {
        let path = format!("spec.nodes[{i}]");
        if !is_valid_name(&node.name) {
            c.push(
                format!("{path}.name"),
                format!("{:?} is not a valid node name (lowercase letters, digits and '-', at most 63)", node.name),
            );
        } else if !names.insert(node.name.as_str()) {
            c.push(format!("{path}.name"), format!("duplicate node name {:?}", node.name));
        }
        if node.heartbeat_addresses.is_empty() {
            c.push(format!("{path}.heartbeatAddresses"), "at least one heartbeat address is required");
        }
        for (j, address) in node.heartbeat_addresses.iter().enumerate() {
            let field = format!("{path}.heartbeatAddresses[{j}]");
            match address.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                    c.push(field, format!("{address} cannot be a heartbeat address"))
                }
                Ok(ip) => {
                    if let Some(previous) = addresses.insert(ip, field.clone()) {
                        c.push(field, format!("address {address} is already used by {previous}"));
                    }
                }
                Err(_) => c.push(field, format!("{address:?} is not an IP address")),
            }
        }
        for (logical, device) in &node.interfaces {
            if !is_valid_interface_name(logical) {
                c.push(format!("{path}.interfaces"), format!("{logical:?} is not a valid interface name"));
            }
            if !is_valid_interface_name(device) {
                c.push(format!("{path}.interfaces.{logical}"), format!("{device:?} is not a valid interface name"));
            }
        }
    }
    if spec.nodes.iter().filter(|n| n.preferred).count() > 1 {
        c.push("spec.nodes", "at most one node may be preferred");
    }
    if let [a, b] = spec.nodes.as_slice() {
        if a.heartbeat_addresses.len() != b.heartbeat_addresses.len() {
            c.push(
                "spec.nodes[1].heartbeatAddresses",
                format!(
                    "both nodes need the same number of heartbeat links: {} has {}, {} has {}",
                    a.name,
                    a.heartbeat_addresses.len(),
                    b.name,
                    b.heartbeat_addresses.len()
                ),
            );
        } else {
            for (j, (x, y)) in a.heartbeat_addresses.iter().zip(&b.heartbeat_addresses).enumerate() {
                if let (Ok(x), Ok(y)) = (x.parse::<IpAddr>(), y.parse::<IpAddr>())
                    && x.is_ipv4() != y.is_ipv4()
                {
                    c.push(
                        format!("spec.nodes[1].heartbeatAddresses[{j}]"),
                        format!("link {j} mixes IPv4 and IPv6 ({x} and {y})"),
                    );
                }
            }
        }
    }
}

fn check_timing(spec: &HaGroupSpec, c: &mut Collector) {
    let hb = &spec.heartbeat;
    let interval = hb.interval.as_std();
    let dead_after = hb.dead_after.as_std();
    let lease = hb.lease_ttl.as_std();
    if interval.is_zero() {
        c.push("spec.heartbeat.interval", "must be greater than zero");
    }
    if interval * 3 >= dead_after {
        c.push(
            "spec.heartbeat.interval",
            format!("interval ({}) must be less than deadAfter/3 ({} / 3) so that one lost heartbeat never looks like a dead node", hb.interval, hb.dead_after),
        );
    }
    if lease >= dead_after {
        c.push(
            "spec.heartbeat.leaseTTL",
            format!("leaseTTL ({}) must be less than deadAfter ({}): the primary must lose its lease before the standby may take over", hb.lease_ttl, hb.dead_after),
        );
    }
    if lease < interval * 2 {
        c.push(
            "spec.heartbeat.leaseTTL",
            format!(
                "leaseTTL ({}) must be at least twice the interval ({}) or a single lost acknowledgement expires it",
                hb.lease_ttl, hb.interval
            ),
        );
    }
    if spec.failback.mode == FailbackMode::Auto && spec.failback.stabilization.is_zero() {
        c.push(
            "spec.failback.stabilization",
            "must be greater than zero with failback auto, or the service would bounce back immediately",
        );
    }
}

fn check_virtual_ips(spec: &HaGroupSpec, c: &mut Collector) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    for (i, vip) in spec.virtual_ips.iter().enumerate() {
        let path = format!("spec.virtualIPs[{i}]");
        if !is_valid_name(&vip.name) {
            c.push(format!("{path}.name"), format!("{:?} is not a valid name", vip.name));
        } else if !names.insert(vip.name.clone()) {
            c.push(format!("{path}.name"), format!("duplicate virtual IP name {:?}", vip.name));
        }
        match vip.address.parse::<IpNet>() {
            Ok(net) => {
                if net.addr() == net.network() && net.prefix_len() < net.max_prefix_len() {
                    c.push(
                        format!("{path}.address"),
                        format!("{} is a network address, not a host address", vip.address),
                    );
                } else if !addresses.insert(net.addr()) {
                    c.push(format!("{path}.address"), format!("duplicate virtual IP {}", net.addr()));
                }
            }
            Err(_) => c.push(
                format!("{path}.address"),
                format!("{:?} is not a CIDR address such as 198.18.0.100/24", vip.address),
            ),
        }
        if !is_valid_interface_name(&vip.interface) {
            c.push(format!("{path}.interface"), format!("{:?} is not a valid interface name", vip.interface));
        }
        if vip.garp.count == 0 {
            c.push(format!("{path}.garp.count"), "at least one announcement is needed to move the address");
        }
    }
    names
}

fn check_flow(spec: &HaGroupSpec, vip_names: &BTreeSet<String>, c: &mut Collector) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut vip_users: BTreeMap<&str, String> = BTreeMap::new();
    let mut volume_users: BTreeMap<&str, String> = BTreeMap::new();
    for (i, step) in spec.flow.iter().enumerate() {
        let path = format!("spec.flow[{i}]");
        if !is_valid_name(&step.name) {
            c.push(format!("{path}.name"), format!("{:?} is not a valid step name", step.name));
        } else if !names.insert(step.name.clone()) {
            c.push(format!("{path}.name"), format!("duplicate step name {:?}", step.name));
        }
        check_step_kind(step, &path, vip_names, &mut vip_users, &mut volume_users, c);
        if step.timeout.is_zero() {
            c.push(format!("{path}.timeout"), "must be greater than zero");
        }
        if step.restart.limit > 0 && step.restart.window.is_zero() {
            c.push(format!("{path}.restart.window"), "must be greater than zero when restart.limit is set");
        }
        if let Some(check) = &step.check {
            check_check(check, &format!("{path}.check"), c);
        }
    }
    names
}

fn check_step_kind<'a>(
    step: &'a FlowStep,
    path: &str,
    vip_names: &BTreeSet<String>,
    vip_users: &mut BTreeMap<&'a str, String>,
    volume_users: &mut BTreeMap<&'a str, String>,
    c: &mut Collector,
) {
    let kinds = step.kinds();
    match kinds.as_slice() {
        [] => c.push(path.to_string(), "set exactly one of volume, virtualIP, systemd or exec"),
        [kind] => match kind {
            StepKind::VirtualIp(v) => {
                if !vip_names.contains(&v.name) {
                    c.push(
                        format!("{path}.virtualIP.name"),
                        format!("no virtual IP named {:?} in spec.virtualIPs", v.name),
                    );
                } else if let Some(previous) = vip_users.insert(v.name.as_str(), path.to_string()) {
                    c.push(
                        format!("{path}.virtualIP.name"),
                        format!("virtual IP {:?} is already brought up by {previous}", v.name),
                    );
                }
            }
            StepKind::Volume(v) => {
                if v.volume_ref.is_empty() {
                    c.push(format!("{path}.volume.volumeRef"), "must name a ReplicatedVolume");
                } else if let Some(previous) = volume_users.insert(v.volume_ref.as_str(), path.to_string()) {
                    c.push(
                        format!("{path}.volume.volumeRef"),
                        format!("volume {:?} is already used by {previous}", v.volume_ref),
                    );
                }
                if let Some(mount) = &v.mount_path
                    && !mount.starts_with('/')
                {
                    c.push(format!("{path}.volume.mountPath"), format!("{mount:?} must be an absolute path"));
                }
                if v.fs_type.is_empty() || v.fs_type.contains(|ch: char| ch.is_whitespace() || ch == '/') {
                    c.push(format!("{path}.volume.fsType"), format!("{:?} is not a filesystem type", v.fs_type));
                }
            }
            StepKind::Systemd(s) => {
                let unit = s.unit.as_str();
                let known_suffix = [".service", ".mount", ".target", ".socket", ".timer", ".path", ".scope"]
                    .iter()
                    .any(|suffix| unit.ends_with(suffix));
                if unit.is_empty()
                    || unit.contains('/')
                    || unit.contains(char::is_whitespace)
                    || unit.starts_with('-')
                    || !known_suffix
                {
                    c.push(
                        format!("{path}.systemd.unit"),
                        format!("{unit:?} is not a systemd unit name (e.g. postgresql.service)"),
                    );
                }
            }
            StepKind::Exec(e) => {
                if e.start.trim().is_empty() {
                    c.push(format!("{path}.exec.start"), "must not be empty");
                }
                if e.stop.trim().is_empty() {
                    c.push(format!("{path}.exec.stop"), "must not be empty");
                }
            }
        },
        many => c.push(
            path.to_string(),
            format!(
                "set exactly one of volume, virtualIP, systemd or exec, found {}",
                many.iter().map(|k| k.label()).collect::<Vec<_>>().join(", ")
            ),
        ),
    }
}

fn check_check(check: &CheckSpec, path: &str, c: &mut Collector) {
    let set = [check.exec.is_some(), check.tcp.is_some(), check.http.is_some()].iter().filter(|s| **s).count();
    if set != 1 {
        c.push(path.to_string(), "set exactly one of exec, tcp or http");
    }
    if let Some(tcp) = &check.tcp {
        if let Some(host) = &tcp.host
            && host.parse::<IpAddr>().is_err()
        {
            c.push(format!("{path}.tcp.host"), format!("{host:?} is not an IP address"));
        }
        if tcp.port == 0 {
            c.push(format!("{path}.tcp.port"), "must be between 1 and 65535");
        }
    }
    if let Some(http) = &check.http {
        let rest = http.url.strip_prefix("http://").unwrap_or("");
        if rest.is_empty() || rest.starts_with('/') {
            c.push(format!("{path}.http.url"), format!("{:?} is not an http:// URL with a host", http.url));
        }
    }
    if let Some(exec) = &check.exec
        && exec.command.trim().is_empty()
    {
        c.push(format!("{path}.exec.command"), "must not be empty");
    }
    if check.interval.is_zero() {
        c.push(format!("{path}.interval"), "must be greater than zero");
    }
    if check.timeout.is_zero() {
        c.push(format!("{path}.timeout"), "must be greater than zero");
    }
}

fn check_monitors(monitors: &[MonitorSpec], step_names: &BTreeSet<String>, c: &mut Collector) {
    let mut names = BTreeSet::new();
    for (i, monitor) in monitors.iter().enumerate() {
        let path = format!("spec.monitors[{i}]");
        if !is_valid_name(&monitor.name) {
            c.push(format!("{path}.name"), format!("{:?} is not a valid monitor name", monitor.name));
        } else if !names.insert(monitor.name.as_str()) {
            c.push(format!("{path}.name"), format!("duplicate monitor name {:?}", monitor.name));
        }
        match monitor.kinds().as_slice() {
            [] => c.push(path.clone(), "set exactly one of process, link, gateway, cpu, memory, mount or replication"),
            [kind] => check_monitor_kind(kind, &path, c),
            many => c.push(
                path.clone(),
                format!(
                    "set exactly one detector, found {}",
                    many.iter().map(|k| k.label()).collect::<Vec<_>>().join(", ")
                ),
            ),
        }
        match (&monitor.restart_step, monitor.action) {
            (Some(step), MonitorAction::Restart) if !step_names.contains(step) => {
                c.push(format!("{path}.restartStep"), format!("no flow step named {step:?}"));
            }
            (Some(_), action) if action != MonitorAction::Restart => {
                c.push(format!("{path}.restartStep"), "only meaningful with action: restart");
            }
            _ => {}
        }
        if monitor.replication.is_some() && monitor.action != MonitorAction::Alert {
            // The broken link is the peer's problem as much as ours: moving or restarting
            // the service cannot cure it, and promotion already requires UpToDate data.
            c.push(
                format!("{path}.action"),
                "a replication monitor only alerts (action: alert); failover and restart cannot repair replication",
            );
        }
        if monitor.action == MonitorAction::Restart && step_names.is_empty() {
            c.push(format!("{path}.action"), "restart needs a service flow to restart");
        }
        if monitor.interval.is_zero() {
            c.push(format!("{path}.interval"), "must be greater than zero");
        }
    }
}

fn check_monitor_kind(kind: &MonitorKind<'_>, path: &str, c: &mut Collector) {
    match kind {
        MonitorKind::Process(p) => match (&p.name, &p.pid_file) {
            (Some(_), Some(_)) | (None, None) => {
                c.push(format!("{path}.process"), "set exactly one of name or pidFile")
            }
            (Some(name), None) if name.is_empty() || name.len() > 15 => c.push(
                format!("{path}.process.name"),
                format!("{name:?} is not a process name (1 to 15 characters, as in /proc/PID/comm)"),
            ),
            (None, Some(file)) if !file.starts_with('/') => {
                c.push(format!("{path}.process.pidFile"), format!("{file:?} must be an absolute path"))
            }
            _ => {}
        },
        MonitorKind::Link(l) => {
            if !is_valid_interface_name(&l.interface) {
                c.push(format!("{path}.link.interface"), format!("{:?} is not a valid interface name", l.interface));
            }
        }
        MonitorKind::Gateway(g) => {
            match g.address.parse::<IpAddr>() {
                Ok(IpAddr::V6(_)) if g.method == crate::hagroup::GatewayMethod::Arp => {
                    c.push(format!("{path}.gateway.method"), "arp works only for IPv4 gateways; use icmp")
                }
                Ok(_) => {}
                Err(_) => c.push(format!("{path}.gateway.address"), format!("{:?} is not an IP address", g.address)),
            }
            match &g.interface {
                Some(i) if !is_valid_interface_name(i) => {
                    c.push(format!("{path}.gateway.interface"), format!("{i:?} is not a valid interface name"))
                }
                None if g.method == crate::hagroup::GatewayMethod::Arp => {
                    c.push(format!("{path}.gateway.interface"), "the arp method needs an interface")
                }
                _ => {}
            }
        }
        MonitorKind::Cpu(l) | MonitorKind::Memory(l) => {
            let field = if matches!(kind, MonitorKind::Cpu(_)) { "cpu" } else { "memory" };
            // Use is measured in whole percent and never exceeds 100, so a threshold of 100
            // would accept a monitor that can never fire: a silent non-protection.
            match l.threshold_percent {
                1..=99 => {}
                100 => c.push(
                    format!("{path}.{field}.thresholdPercent"),
                    "must be between 1 and 99: 100 % can never be exceeded",
                ),
                other => {
                    c.push(format!("{path}.{field}.thresholdPercent"), format!("must be between 1 and 99, not {other}"))
                }
            }
        }
        MonitorKind::Mount(m) => {
            if !m.path.starts_with('/') {
                c.push(format!("{path}.mount.path"), format!("{:?} must be an absolute path", m.path));
            }
        }
        MonitorKind::Replication(r) => {
            if r.volume_ref.is_empty() {
                c.push(format!("{path}.replication.volumeRef"), "must name a ReplicatedVolume");
            }
        }
    }
}

/// Validates one ReplicatedVolume spec on its own.
pub fn validate_volume(spec: &ReplicatedVolumeSpec) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    match parse_bytes(&spec.size) {
        Ok(0) => c.push("spec.size", "must be greater than zero"),
        Ok(bytes) if bytes % BLOCK_SIZE != 0 => {
            c.push("spec.size", format!("{} ({bytes} bytes) is not a multiple of 4 KiB", spec.size.0))
        }
        Ok(_) => {}
        Err(e) => c.push("spec.size", e.to_string()),
    }
    if spec.backing.len() != 2 {
        c.push("spec.backing", format!("one backing entry per group node (two), found {}", spec.backing.len()));
    }
    let mut nodes = BTreeSet::new();
    for (i, b) in spec.backing.iter().enumerate() {
        let path = format!("spec.backing[{i}]");
        if !nodes.insert(b.node.as_str()) {
            c.push(format!("{path}.node"), format!("duplicate backing for node {:?}", b.node));
        }
        if !b.path.starts_with('/') {
            c.push(format!("{path}.path"), format!("{:?} must be an absolute path", b.path));
        }
        if b.metadata != "internal" && !b.metadata.starts_with('/') {
            c.push(format!("{path}.metadata"), format!("{:?} must be \"internal\" or an absolute path", b.metadata));
        }
        if b.metadata == b.path {
            c.push(format!("{path}.metadata"), "external metadata must not be the data path; use \"internal\"");
        }
        if let Some(address) = &b.address
            && address.parse::<IpAddr>().is_err()
        {
            c.push(format!("{path}.address"), format!("{address:?} is not an IP address"));
        }
    }
    if let Some(rate) = &spec.resync_rate {
        match parse_bytes(rate) {
            Ok(0) => c.push("spec.resyncRate", "must be greater than zero (omit it for unlimited)"),
            Ok(_) => {}
            Err(e) => c.push("spec.resyncRate", e.to_string()),
        }
    }
    if spec.port == 0 {
        c.push("spec.port", "must be between 1 and 65535");
    }
    c.finish()
}

/// Cross-object rules between a group and the volumes in its namespace.
///
/// `volumes` maps volume name to spec for every ReplicatedVolume in the group's namespace.
pub fn validate_references(
    group_name: &str,
    group: &HaGroupSpec,
    volumes: &BTreeMap<String, ReplicatedVolumeSpec>,
) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    let group_nodes: BTreeSet<&str> = group.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut check_ref = |path: String, name: &str| match volumes.get(name) {
        None => c.push(path, format!("no ReplicatedVolume named {name:?} in the group's namespace")),
        Some(v) if v.group != group_name => {
            c.push(path, format!("ReplicatedVolume {name:?} belongs to group {:?}, not {group_name:?}", v.group))
        }
        Some(v) => {
            let volume_nodes: BTreeSet<&str> = v.backing.iter().map(|b| b.node.as_str()).collect();
            if volume_nodes != group_nodes {
                c.push(
                    path,
                    format!(
                        "ReplicatedVolume {name:?} has backing on {volume_nodes:?} but the group's nodes are {group_nodes:?}"
                    ),
                );
            }
        }
    };
    for (i, step) in group.flow.iter().enumerate() {
        if let Some(v) = &step.volume {
            check_ref(format!("spec.flow[{i}].volume.volumeRef"), &v.volume_ref);
        }
    }
    for (i, monitor) in group.monitors.iter().enumerate() {
        if let Some(r) = &monitor.replication {
            check_ref(format!("spec.monitors[{i}].replication.volumeRef"), &r.volume_ref);
        }
    }
    c.finish()
}

/// The volume side of the cross-object rules: its group exists and its nodes match.
pub fn validate_volume_group(
    volume: &ReplicatedVolumeSpec,
    group: Option<&HaGroupSpec>,
) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    match group {
        None => c.push("spec.group", format!("no HaGroup named {:?} in the volume's namespace", volume.group)),
        Some(g) => {
            let group_nodes: BTreeSet<&str> = g.nodes.iter().map(|n| n.name.as_str()).collect();
            for (i, b) in volume.backing.iter().enumerate() {
                if !group_nodes.contains(b.node.as_str()) {
                    c.push(
                        format!("spec.backing[{i}].node"),
                        format!("{:?} is not a node of group {:?} (nodes: {group_nodes:?})", b.node, volume.group),
                    );
                }
            }
        }
    }
    c.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn group_with_monitor(monitor: &str) -> HaGroupSpec {
        let text = format!(
            "nodes:\n  - name: a\n    heartbeatAddresses: [198.18.1.1]\n  - name: b\n    heartbeatAddresses: [198.18.1.2]\n\
             monitors:\n  - name: load\n    action: alert\n    {monitor}\n"
        );
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn a_load_threshold_that_can_never_fire_is_refused() {
        for kind in ["cpu", "memory"] {
            let accepted = [1, 50, 99];
            for percent in accepted {
                let spec = group_with_monitor(&format!("{kind}: {{thresholdPercent: {percent}}}"));
                assert!(validate_group(&spec).is_ok(), "{kind} {percent}: {:?}", validate_group(&spec));
            }
            let spec = group_with_monitor(&format!("{kind}: {{thresholdPercent: 100}}"));
            let errors = validate_group(&spec).err().map(|e| e.to_string()).unwrap_or_default();
            assert_eq!(
                errors,
                format!(
                    "spec.monitors[0].{kind}.thresholdPercent: must be between 1 and 99: 100 % can never be exceeded"
                )
            );
            for percent in [0, 101] {
                let spec = group_with_monitor(&format!("{kind}: {{thresholdPercent: {percent}}}"));
                let errors = validate_group(&spec).err().map(|e| e.to_string()).unwrap_or_default();
                assert_eq!(
                    errors,
                    format!("spec.monitors[0].{kind}.thresholdPercent: must be between 1 and 99, not {percent}")
                );
            }
        }
    }
}
