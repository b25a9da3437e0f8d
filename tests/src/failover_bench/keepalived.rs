//! keepalived (the Debian package) as the HA implementation: VRRPv3 multicast on the LAN
//! link, the service running on both servers all the time (as is usual with keepalived:
//! only the address moves).
//!
//! Multicast, keepalived's default, rather than unicast: a unicast master whose neighbour
//! entry for the peer failed while the peer was dead needs up to a second of ARP retries
//! before its adverts reach the rebooted peer, which meanwhile times out and takes over.
//!
//! Both instances start as BACKUP with the same priority and `nopreempt`, so a restored
//! server stays the backup, like hapair's default manual failback. Each server's notify
//! script writes its VRRP state to a file in its run directory; the pair has settled when
//! the primary reports MASTER and the other BACKUP for longer than the master-down
//! interval. GARP settings stay at the package defaults.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use super::{BenchError, HaPair, Node, PerNode, Result, Testbed, VIP, VIP_PREFIX_LEN, io_error};
use crate::netns::ChildGuard;

/// keepalived on both servers with one advertisement interval.
#[derive(Debug)]
pub struct Keepalived {
    advert_int: Duration,
    virtual_router_id: u8,
    program: PathBuf,
    running: PerNode<Vec<ChildGuard>>,
}

const PRIORITY: u32 = 100;

impl Keepalived {
    /// `program` is the keepalived binary. The virtual router id is derived from this
    /// process's id so that concurrent runs never share one, should they ever share a
    /// segment (each testbed has its own bridge).
    pub fn new(program: PathBuf, advert_int: Duration) -> Self {
        let virtual_router_id = u8::try_from(std::process::id() % 254 + 1).unwrap_or(1);
        Keepalived { advert_int, virtual_router_id, program, running: PerNode::default() }
    }

    /// The master-down interval of RFC 5798: three advertisements plus the skew for our
    /// priority. A backup that hears nothing for this long becomes master.
    pub fn master_down_interval(&self) -> Duration {
        self.advert_int * 3 + self.advert_int.mul_f64(f64::from(256 - PRIORITY) / 256.0)
    }

    fn advert_text(&self) -> String {
        let seconds = self.advert_int.as_secs_f64();
        format!("{seconds}")
    }

    /// The configuration of `node`, reporting its state through `notify`.
    pub fn config(&self, node: Node, notify: &str) -> String {
        format!(
            "global_defs {{
    router_id bench_{name}
    vrrp_version 3
    # The notify script runs as root; it lives in a private root-owned directory.
    script_user root
}}

vrrp_instance bench {{
    state BACKUP
    nopreempt
    interface eth0
    virtual_router_id {vrid}
    priority {PRIORITY}
    advert_int {advert}
    virtual_ipaddress {{
        {VIP}/{VIP_PREFIX_LEN} dev eth0
    }}
    notify \"{notify}\"
}}
",
            name = node.name(),
            vrid = self.virtual_router_id,
            advert = self.advert_text(),
        )
    }

    fn state_file(bed: &Testbed, node: Node) -> PathBuf {
        bed.run_dir(node).join("vrrp-state")
    }

    fn state(bed: &Testbed, node: Node) -> Option<String> {
        std::fs::read_to_string(Self::state_file(bed, node)).ok().map(|s| s.trim().to_string())
    }

    /// Writes the notify script and the configuration to `node`'s disk; returns the
    /// configuration's path.
    fn install(&self, bed: &Testbed, node: Node) -> Result<PathBuf> {
        let disk = bed.disk_dir(node);
        let notify = disk.join("notify.sh");
        let state = Self::state_file(bed, node);
        // keepalived runs it as `notify.sh INSTANCE <name> <state> <priority>`.
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$3\" > '{tmp}' && mv '{tmp}' '{state}'\n",
            tmp = state.with_extension("tmp").display(),
            state = state.display()
        );
        std::fs::write(&notify, script)
            .and_then(|()| std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o700)))
            .map_err(io_error(format!("writing {}", notify.display())))?;
        let config = disk.join("keepalived.conf");
        std::fs::write(&config, self.config(node, &notify.display().to_string()))
            .map_err(io_error(format!("writing {}", config.display())))?;
        Ok(config)
    }
}

impl HaPair for Keepalived {
    fn label(&self) -> String {
        format!("keepalived advert_int {}s", self.advert_text())
    }

    fn parameters(&self) -> String {
        format!(
            "VRRPv3 multicast on the LAN link, advert_int {}s, priority {PRIORITY} on both, nopreempt, \
             master-down interval {:.0} ms, package GARP defaults; service always running on both servers",
            self.advert_text(),
            self.master_down_interval().as_secs_f64() * 1e3
        )
    }

    fn failover_bound(&self) -> Duration {
        self.master_down_interval() * 3 + Duration::from_secs(5)
    }

    fn settle_time(&self) -> Duration {
        self.master_down_interval() + self.advert_int + Duration::from_millis(100)
    }

    fn start_node(&mut self, bed: &Testbed, node: Node) -> Result<()> {
        let config = self.install(bed, node)?;
        let run = bed.run_dir(node);
        let service = bed.spawn_service(node)?;
        let (config, program) = (config.display().to_string(), self.program.display().to_string());
        let pid = |name: &str| run.join(name).display().to_string();
        let (main_pid, vrrp_pid, checkers_pid) = (pid("keepalived.pid"), pid("vrrp.pid"), pid("checkers.pid"));
        let args = [
            program.as_str(),
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--no-syslog",
            "--vrrp",
            "--use-file",
            &config,
            "--pid",
            &main_pid,
            "--vrrp_pid",
            &vrrp_pid,
            "--checkers_pid",
            &checkers_pid,
        ];
        let daemon = bed.spawn(node, &args, &bed.disk_dir(node).join("keepalived.log"))?;
        *self.running.get_mut(node) = vec![service, daemon];
        Ok(())
    }

    fn settled(&mut self, bed: &Testbed, primary: Node) -> bool {
        // A daemon that died on its own would make every later figure meaningless.
        let alive = Node::BOTH.iter().all(|&n| self.running.get_mut(n).iter_mut().all(|child| !child.exited()));
        alive
            && Self::state(bed, primary).as_deref() == Some("MASTER")
            && Self::state(bed, primary.other()).as_deref() == Some("BACKUP")
    }

    fn node_killed(&mut self, node: Node) {
        self.running.get_mut(node).clear();
    }
}

/// The keepalived binary on this machine, or why there is none.
pub fn find_program() -> Result<PathBuf> {
    ["/usr/sbin/keepalived", "/sbin/keepalived", "/usr/local/sbin/keepalived"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            BenchError::Setup(
                "keepalived is not installed (scripts/bench-failover.sh installs the Debian package)".into(),
            )
        })
}
