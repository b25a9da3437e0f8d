//! What a node report says about the machine: OS, kernel, CPU, memory and network links,
//! read from procfs, sysfs and rtnetlink.

use std::net::IpAddr;
use std::path::Path;

use hapair_crds::hagroup::{Hardware, LinkStatus};

use crate::iface::Netlink;
use crate::probe::load::{CpuTimes, cpu_percent, parse_cpu, parse_memory_percent};

/// `PRETTY_NAME` of `/etc/os-release` (or `NAME VERSION`).
pub fn os_name(os_release: &str) -> Option<String> {
    let field = |key: &str| {
        os_release.lines().find_map(|l| {
            let value = l.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_string())
        })
    };
    field("PRETTY_NAME").filter(|s| !s.is_empty()).or_else(|| {
        let name = field("NAME")?;
        Some(match field("VERSION") {
            Some(v) => format!("{name} {v}"),
            None => name,
        })
    })
}

/// The `model name` of the first CPU in `/proc/cpuinfo`, and the number of CPUs listed.
pub fn cpu_info(cpuinfo: &str) -> (Option<String>, u32) {
    let model = cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    });
    let count = cpuinfo.lines().filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor")).count();
    (model, u32::try_from(count).unwrap_or(u32::MAX))
}

/// `MemTotal` in bytes.
pub fn memory_bytes(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib.saturating_mul(1024))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Seconds since the machine booted.
pub fn uptime_seconds() -> u64 {
    read("/proc/uptime").split_whitespace().next().and_then(|s| s.parse::<f64>().ok()).map_or(0, |s| s as u64)
}

pub fn os() -> String {
    os_name(&read("/etc/os-release")).unwrap_or_else(|| "Linux".to_string())
}

/// Samples CPU use between calls.
#[derive(Debug, Default)]
pub struct HostSampler {
    previous_cpu: Option<CpuTimes>,
}

impl HostSampler {
    pub fn hardware(&mut self) -> Hardware {
        let (cpu_model, cpus) = cpu_info(&read("/proc/cpuinfo"));
        let meminfo = read("/proc/meminfo");
        let cpu_percent = match parse_cpu(&read("/proc/stat")) {
            Some(now) => self.previous_cpu.replace(now).and_then(|before| cpu_percent(before, now)).unwrap_or(0),
            None => 0,
        };
        let model = read("/sys/class/dmi/id/product_name").trim().to_string();
        let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
        Hardware {
            model: (!model.is_empty()).then_some(model),
            cpu_model,
            cpus: if cpus == 0 {
                u32::try_from(std::thread::available_parallelism().map_or(1, |n| n.get())).unwrap_or(1)
            } else {
                cpus
            },
            cpu_percent,
            memory_bytes: memory_bytes(&meminfo).unwrap_or(0),
            memory_percent: parse_memory_percent(&meminfo).unwrap_or(0),
            kernel: (!kernel.is_empty()).then_some(kernel),
        }
    }
}

/// One heartbeat link of some group, to mark the interface carrying it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatAddress {
    pub link: u32,
    pub local: IpAddr,
    pub loss_percent: u32,
}

/// Every interface but loopback: addresses, speed, state, and the heartbeat link it
/// carries (if any).
pub async fn links(netlink: &Netlink, heartbeat: &[HeartbeatAddress]) -> Vec<LinkStatus> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    let mut out = Vec::new();
    for name in names.into_iter().filter(|n| n != "lo") {
        let Ok(iface) = netlink.interface(&name).await else { continue };
        let addresses = netlink.addresses(iface.index).await.unwrap_or_default();
        let carried = heartbeat.iter().find(|h| addresses.iter().any(|a| a.address == h.local));
        out.push(LinkStatus {
            heartbeat_link: carried.map(|h| h.link),
            interface: name.clone(),
            addresses: addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect(),
            speed_mbps: speed(&Path::new("/sys/class/net").join(&name).join("speed")),
            up: iface.running,
            heartbeat_loss_percent: carried.map(|h| h.loss_percent),
        });
    }
    out
}

/// Link speed in Mb/s; virtual devices report none (an error or -1).
fn speed(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()
        .and_then(|s| u32::try_from(s).ok())
        .filter(|s| *s > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_os_cpu_and_memory() {
        assert_eq!(
            os_name("NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(os_name("NAME=Alpine\nVERSION=3.20\n").as_deref(), Some("Alpine 3.20"));
        assert_eq!(os_name(""), None);
        let cpuinfo = "processor\t: 0\nmodel name\t: Xeon X\n\nprocessor\t: 1\nmodel name\t: Xeon X\n";
        assert_eq!(cpu_info(cpuinfo), (Some("Xeon X".into()), 2));
        assert_eq!(memory_bytes("MemTotal:       2048 kB\nMemFree: 1 kB\n"), Some(2 * 1024 * 1024));
    }

    #[test]
    fn this_machine_reports_something_plausible() {
        let mut sampler = HostSampler::default();
        let first = sampler.hardware();
        assert!(first.cpus >= 1 && first.memory_bytes > 0, "{first:?}");
        assert!(first.kernel.is_some());
        assert!(uptime_seconds() > 0);
        assert!(!os().is_empty());
    }
}
