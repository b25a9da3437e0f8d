//! The faults the soak injects into a running pair, and how each is healed. Every fault
//! is undone by its own heal; the soak then waits for the whole pair to be healthy again
//! before the next one.

use std::time::Duration;

use rand::Rng;
use rand::seq::SliceRandom;

use crate::enrolled_pair::{EnrolledPair, other};
use crate::topology::{A0, A1, B0, B1};

/// One fault. Nodes are `a` or `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Power failure: links down, every process on the node killed; boots again on heal.
    KillNode(&'static str),
    /// Heartbeats (and, on link 1, replication) blackholed between the servers on one link.
    CutLink(u8),
    /// Both links blackholed between the servers; both still reach the witness on link 0.
    CutAllLinks,
    /// The primary's switch ports down: it loses peer and witness at once.
    IsolatePrimary(&'static str),
    /// The controller (witness) killed, started again on heal.
    WitnessDown,
    /// The agent stopped with SIGTERM and started again at once (a service restart).
    AgentRestart(&'static str),
    /// The controller killed and started again at once.
    ControllerRestart,
}

/// The kinds, in report order.
pub const KINDS: [&str; 7] = [
    "node killed",
    "one link cut",
    "all links cut",
    "primary isolated",
    "witness down",
    "agent restarted",
    "controller restarted",
];

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillNode(_) => KINDS[0],
            Fault::CutLink(_) => KINDS[1],
            Fault::CutAllLinks => KINDS[2],
            Fault::IsolatePrimary(_) => KINDS[3],
            Fault::WitnessDown => KINDS[4],
            Fault::AgentRestart(_) => KINDS[5],
            Fault::ControllerRestart => KINDS[6],
        }
    }

    pub fn describe(&self, primary: &str) -> String {
        let role = |n: &str| if n == primary { "primary" } else { "standby" };
        match self {
            Fault::KillNode(n) => format!("node {n} ({}) killed", role(n)),
            Fault::CutLink(k) => format!("heartbeat link {k} cut"),
            Fault::CutAllLinks => "all heartbeat links cut".into(),
            Fault::IsolatePrimary(n) => format!("primary {n} isolated"),
            Fault::WitnessDown => "witness down".into(),
            Fault::AgentRestart(n) => format!("agent of {n} ({}) restarted", role(n)),
            Fault::ControllerRestart => "controller restarted".into(),
        }
    }

    /// Whether the fault itself forces a failover (the primary can no longer serve).
    pub fn removes_primary(&self, primary: &str) -> bool {
        matches!(self, Fault::KillNode(n) | Fault::IsolatePrimary(n) if *n == primary)
    }
}

/// The fault schedule for `count` faults of `kinds`: every kind once in a shuffled order first (so a
/// short run still covers them all), then kinds at random. Targets are drawn when the
/// fault is injected, from the roles at that moment.
pub fn schedule(rng: &mut impl Rng, kinds: &[usize], count: usize) -> Vec<usize> {
    let mut first = kinds.to_vec();
    first.shuffle(rng);
    let mut out: Vec<usize> = first.into_iter().take(count).collect();
    while out.len() < count && !kinds.is_empty() {
        out.push(kinds[rng.random_range(0..kinds.len())]);
    }
    out
}

/// The kind called `name` (as in [`KINDS`], spaces or dashes).
pub fn kind_index(name: &str) -> Option<usize> {
    KINDS.iter().position(|k| k.replace(' ', "-") == name.replace(' ', "-"))
}

/// The concrete fault of kind `kind` given the current primary.
pub fn draw(rng: &mut impl Rng, kind: usize, primary: &'static str) -> Fault {
    // Two in three node faults hit the primary: those are the ones that test failover.
    let node = if rng.random_bool(2.0 / 3.0) { primary } else { other(primary) };
    match kind {
        0 => Fault::KillNode(node),
        1 => Fault::CutLink(u8::from(rng.random_bool(0.5))),
        2 => Fault::CutAllLinks,
        3 => Fault::IsolatePrimary(primary),
        4 => Fault::WitnessDown,
        5 => Fault::AgentRestart(node),
        _ => Fault::ControllerRestart,
    }
}

fn blackhole(p: &EnrolledPair, link: Option<u8>, add: bool) -> anyhow::Result<()> {
    let verb = if add { "add" } else { "del" };
    for (node, peers) in [("a", [B0, B1]), ("b", [A0, A1])] {
        for (k, peer) in peers.iter().enumerate() {
            if link.is_some_and(|l| usize::from(l) != k) {
                continue;
            }
            p.ns(node).ip(&["route", verb, "blackhole", &format!("{peer}/32")])?;
        }
    }
    Ok(())
}

/// Injects `fault`.
pub fn inject(p: &mut EnrolledPair, fault: Fault) -> anyhow::Result<()> {
    match fault {
        Fault::KillNode(n) => {
            for dev in ["eth0", "eth1"] {
                p.ns(n).ip(&["link", "set", dev, "down"])?;
            }
            let left = p.ns(n).kill_processes(Duration::from_secs(5))?;
            anyhow::ensure!(left.is_empty(), "processes survived on {n}: {left:?}");
            p.agent(n).kill();
        }
        Fault::CutLink(k) => blackhole(p, Some(k), true)?,
        Fault::CutAllLinks => blackhole(p, None, true)?,
        Fault::IsolatePrimary(n) => {
            for port in [format!("{n}0"), format!("{n}1")] {
                p.topo.switch.ip(&["link", "set", &port, "down"])?;
            }
        }
        Fault::WitnessDown => p.controller.kill(),
        Fault::AgentRestart(n) => {
            stop_agent(p, n)?;
            let ns = if n == "a" { &p.topo.a } else { &p.topo.b };
            p.agents[usize::from(n != "a")].start(ns);
        }
        Fault::ControllerRestart => restart_controller(p)?,
    }
    Ok(())
}

/// Undoes `fault`.
pub fn heal(p: &mut EnrolledPair, fault: Fault) -> anyhow::Result<()> {
    match fault {
        Fault::KillNode(n) => {
            // A machine that lost power boots without the address it held.
            let vip = p.options.vip_cidr();
            if p.ns(n).ip(&["-o", "-4", "addr", "show", "dev", "eth0"])?.contains(&format!(" {vip} ")) {
                p.ns(n).ip(&["addr", "del", vip, "dev", "eth0"])?;
            }
            for dev in ["eth0", "eth1"] {
                p.ns(n).ip(&["link", "set", dev, "up"])?;
            }
            let ns = if n == "a" { &p.topo.a } else { &p.topo.b };
            p.agents[usize::from(n != "a")].start(ns);
        }
        Fault::CutLink(k) => blackhole(p, Some(k), false)?,
        Fault::CutAllLinks => blackhole(p, None, false)?,
        Fault::IsolatePrimary(n) => {
            for port in [format!("{n}0"), format!("{n}1")] {
                p.topo.switch.ip(&["link", "set", &port, "up"])?;
            }
        }
        Fault::WitnessDown => restart_controller(p)?,
        Fault::AgentRestart(_) | Fault::ControllerRestart => {}
    }
    Ok(())
}

/// SIGTERM, as a service manager stops it; SIGKILL if it has not exited within 20 s.
fn stop_agent(p: &mut EnrolledPair, n: &str) -> anyhow::Result<()> {
    let agent = p.agent(n);
    let pid = agent.pid().ok_or_else(|| anyhow::anyhow!("agent {n} is not running"))?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let gone = crate::netns::wait_for(Duration::from_secs(20), || (!agent.running()).then_some(()));
    if gone.is_none() {
        agent.kill();
        anyhow::bail!("agent {n} did not stop within 20 s of SIGTERM:\n{}", agent.log_tail(30));
    }
    Ok(())
}

fn restart_controller(p: &mut EnrolledPair) -> anyhow::Result<()> {
    let EnrolledPair { controller, topo, .. } = p;
    // Controller::restart panics when the controller does not come up; that is a failed
    // heal, reported with its log.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| controller.restart(&topo.client)))
        .map_err(|_| anyhow::anyhow!("the controller did not start again:\n{}", controller.log_tail(30)))
}
