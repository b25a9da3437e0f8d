//! End to end: two real `hapair-agent` processes enrolled against a real standalone
//! controller (their witness) in network namespaces, a service started by the group's
//! flow behind the virtual IP, and a client in a third namespace, driven through crashes,
//! partitions, witness outages, switchovers, failback and a bad manifest.
//!
//! The group runs fast heartbeats (50 ms, deadAfter 800 ms, lease 600 ms) so that the
//! suite stays short; the timing assertions are the protocol's own bounds and orderings,
//! never speed targets. VIP appearances and disappearances are recorded by watchers
//! polling each server's addresses on the shared monotonic clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hapair_tests::agents::{Agent, GROUP, group, role, status};
use hapair_tests::client_loop::ClientLoop;
use hapair_tests::controller::{Controller, enroll, unenrolled_config};
use hapair_tests::failover_bench::probe::{self, DEFAULT_PACE};
use hapair_tests::failover_bench::{SERVICE_PORT, service_address};
use hapair_tests::netns::{Netns, require_root, wait_for};
use hapair_tests::topology::{A0, A1, B0, B1, C0, TwoServersAndClient};

const BENCH: &str = env!("CARGO_BIN_EXE_bench-failover");
const VIP: &str = "198.18.0.100";
const INTERVAL: Duration = Duration::from_millis(50);
const DEAD_AFTER: Duration = Duration::from_millis(800);
const LEASE: Duration = Duration::from_millis(600);
/// The group's drift bound (the default), in parts per million.
const DRIFT_PPM: u32 = 500;
/// Bound on every wait for something that must happen (a start, a takeover).
const UP: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
struct Options {
    /// `failback: {mode: auto, stabilization: …}` with `a` preferred.
    failback_auto: Option<Duration>,
}

fn manifest(dir: &Path, options: Options) -> String {
    let pid_file = format!("'{}'/\"$HAPAIR_NODE\"-service.pid", dir.display());
    let start = format!(
        "'{BENCH}' serve --name \"$HAPAIR_NODE\" --port {SERVICE_PORT} --daemon --pid-file {pid_file} </dev/null >/dev/null 2>&1"
    );
    let stop = format!("f={pid_file}; if [ -f \"$f\" ]; then kill \"$(cat \"$f\")\"; rm -f \"$f\"; fi");
    let failback = match options.failback_auto {
        Some(stabilization) => {
            serde_json::json!({"mode": "auto", "stabilization": format!("{}ms", stabilization.as_millis())})
        }
        None => serde_json::json!({"mode": "manual"}),
    };
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    serde_json::json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "HaGroup",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "nodes": [
                {"name": "a", "heartbeatAddresses": [A0, A1], "preferred": options.failback_auto.is_some()},
                {"name": "b", "heartbeatAddresses": [B0, B1]},
            ],
            "heartbeat": {"interval": ms(INTERVAL), "deadAfter": ms(DEAD_AFTER), "leaseTTL": ms(LEASE), "maxClockDriftPpm": DRIFT_PPM},
            "witness": {"mode": "controller"},
            "failback": failback,
            "virtualIPs": [{"name": "www", "address": format!("{VIP}/24"), "interface": "eth0", "garp": {"count": 3, "interval": "100ms"}}],
            "flow": [
                {"name": "service", "exec": {"start": start, "stop": stop}},
                {"name": "service-ip", "virtualIP": {"name": "www"}},
            ],
        },
    })
    .to_string()
}

/// The pair, its controller and the client. Fields drop in order: agents, controller,
/// then the network (which kills whatever is left in the namespaces), then the files.
struct Cluster {
    agents: Vec<Agent>,
    controller: Controller,
    topo: TwoServersAndClient,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Controller up, both agents enrolled, `a` started first so that it becomes the
    /// primary, then `b`; returns once `a` serves the client and `b` stands by.
    fn start(options: Options) -> Cluster {
        let topo = TwoServersAndClient::build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let controller = Controller::start(&topo.client, C0, dir.path(), &manifest(dir.path(), options));
        let mut agents = Vec::new();
        for (node, ns) in [("a", &topo.a), ("b", &topo.b)] {
            let home = dir.path().join(node);
            std::fs::create_dir_all(&home).unwrap();
            std::fs::write(home.join("agent.yaml"), unenrolled_config(&home)).unwrap();
            enroll(ns, &controller, node, &home);
            agents.push(Agent::with_config(node, &home));
        }
        let mut cluster = Cluster { agents, controller, topo, _dir: dir };
        cluster.agents[0].start(&cluster.topo.a);
        cluster.wait_serving("a");
        cluster.agents[1].start(&cluster.topo.b);
        cluster.wait_pair("a");
        cluster
    }

    fn ns(&self, node: &str) -> &Netns {
        match node {
            "a" => &self.topo.a,
            _ => &self.topo.b,
        }
    }

    fn agent(&mut self, node: &str) -> &mut Agent {
        &mut self.agents[usize::from(node != "a")]
    }

    fn describe(&self) -> String {
        format!("a: {:?}\nb: {:?}", status(&self.topo.a), status(&self.topo.b))
    }

    /// Waits until `node` is Primary, holds the VIP and answers the client.
    fn wait_serving(&self, node: &str) {
        let ns = self.ns(node);
        let ok = wait_for(UP, || (role(ns, GROUP)? == "Primary" && has_vip(ns) && self.ask()? == node).then_some(()));
        assert!(ok.is_some(), "{node} does not serve:\n{}", self.describe());
    }

    /// Waits until `primary` serves and the other node stands by, hearing it.
    fn wait_pair(&self, primary: &str) {
        self.wait_serving(primary);
        let standby = self.ns(other(primary));
        let ok = wait_for(UP, || {
            let g = group(&status(standby)?, GROUP)?;
            (g["role"] == "Standby" && g["peerReachable"] == true && !has_vip(standby)).then_some(())
        });
        assert!(ok.is_some(), "{} does not stand by:\n{}", other(primary), self.describe());
    }

    /// One connection to the VIP: who answered.
    fn ask(&self) -> Option<String> {
        self.topo.client.block_on(|| probe::ask(service_address(), Duration::from_millis(500))).map(|a| a.server)
    }

    /// A power failure of `node`: links down, every process in it killed (agent, service).
    fn power_off(&mut self, node: &str) {
        let ns = self.ns(node);
        for dev in ["eth0", "eth1"] {
            ns.ip(&["link", "set", dev, "down"]).unwrap();
        }
        assert!(ns.kill_processes(Duration::from_secs(5)).unwrap().is_empty());
        self.agent(node).kill();
    }

    /// Boots a powered-off `node` again: no VIP left, links up, agent started.
    fn power_on(&mut self, node: &str) {
        let ns = self.ns(node);
        if has_vip(ns) {
            ns.ip(&["addr", "del", &format!("{VIP}/24"), "dev", "eth0"]).unwrap();
        }
        for dev in ["eth0", "eth1"] {
            ns.ip(&["link", "set", dev, "up"]).unwrap();
        }
        let i = usize::from(node != "a");
        self.agents[i].start(if i == 0 { &self.topo.a } else { &self.topo.b });
    }
}

fn other(node: &str) -> &'static str {
    if node == "a" { "b" } else { "a" }
}

fn has_vip(ns: &Netns) -> bool {
    ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"]).unwrap_or_default().contains(&format!(" {VIP}/"))
}

fn epoch(ns: &Netns) -> Option<u64> {
    group(&status(ns)?, GROUP)?["epoch"].as_u64()
}

/// One poll of a server's addresses: started, finished, VIP present.
#[derive(Clone, Copy, Debug)]
struct Sample {
    before: Instant,
    after: Instant,
    held: bool,
}

/// A thread polling `ip -o addr` of one server every ~5 ms.
struct VipWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Sample>>>,
}

impl VipWatch {
    fn start(ns: &Netns) -> VipWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let name = ns.name().to_string();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let before = Instant::now();
                let out = std::process::Command::new("ip")
                    .args(["-n", &name, "-o", "-4", "addr", "show", "dev", "eth0"])
                    .output();
                let after = Instant::now();
                if let Ok(out) = out
                    && out.status.success()
                {
                    let held = String::from_utf8_lossy(&out.stdout).contains(&format!(" {VIP}/"));
                    samples.push(Sample { before, after, held });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            samples
        });
        VipWatch { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map(|t| t.join().unwrap()).unwrap_or_default()
    }
}

impl Drop for VipWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The changes of VIP presence in `samples`: (no later than / no earlier than) bounds of
/// each change and the new state, as (earliest, latest, held).
fn changes(samples: &[Sample]) -> Vec<(Instant, Instant, bool)> {
    samples.windows(2).filter(|w| w[0].held != w[1].held).map(|w| (w[0].before, w[1].after, w[1].held)).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The engine's failover bound for a crashed primary (see `sim::Params::failover_bound`):
/// the last heartbeat may have left just before the crash (one interval), the standby
/// waits `max(deadAfter, L·(1+δ))`, then one witness round trip and the flow start. On
/// two loaded cores the witness round trip is a fresh mutual-TLS connection to a debug
/// build of the controller (hundreds of ms when the machine is busy), and the flow start
/// forks a shell that starts the service, then adds the VIP and sends GARPs: 1 s and 2 s
/// respectively leave room for scheduling delays without hiding a missed deadline.
fn crash_bound() -> Duration {
    let lease_wait = LEASE + LEASE * DRIFT_PPM / 1_000_000;
    INTERVAL + DEAD_AFTER.max(lease_wait) + Duration::from_secs(1) + Duration::from_secs(2)
}

#[test]
fn kill_9_of_the_primary_moves_the_service_within_the_bound() {
    require_root();
    let mut c = Cluster::start(Options { failback_auto: None });
    let before = epoch(&c.topo.b).unwrap();
    let bound = crash_bound();
    // Agent and service die at once; the links stay up, so the stale VIP stays on a's
    // interface (nobody is left to remove it) and the client must follow b's GARPs.
    let (t0, answered) = std::thread::scope(|scope| {
        let t0 = Instant::now();
        let client = &c.topo.client;
        let probe = scope.spawn(move || {
            client.block_on(|| probe::first_answer_from(service_address(), "b", DEFAULT_PACE, t0 + bound * 3, || false))
        });
        let left = c.topo.a.kill_processes(Duration::from_secs(5)).unwrap();
        assert!(left.is_empty(), "processes survived on a: {left:?}");
        (t0, probe.join().unwrap())
    });
    c.agent("a").kill();
    let took = answered.map(|first| first.at.duration_since(t0));
    println!(
        "kill -9 of the primary: client answered by b after {} ms (bound {} ms)",
        took.map_or("never".into(), |d| format!("{:.1}", ms(d))),
        ms(bound)
    );
    let took = took.unwrap_or_else(|| panic!("b never answered:\n{}", c.describe()));
    assert!(took <= bound, "failover took {took:?}, over the bound {bound:?}:\n{}", c.describe());
    // The client may be answered a moment before b's status says it serves.
    c.wait_serving("b");
    assert!(epoch(&c.topo.b).unwrap() > before);

    // a's agent restarts: it comes back as the standby and clears the VIP it left behind.
    c.agents[0].start(&c.topo.a);
    c.wait_pair("b");
}

#[test]
fn an_isolated_primary_drops_the_vip_before_the_standby_takes_it() {
    require_root();
    let c = Cluster::start(Options { failback_auto: None });
    let (watch_a, watch_b) = (VipWatch::start(&c.topo.a), VipWatch::start(&c.topo.b));
    std::thread::sleep(Duration::from_millis(200));
    // a's cables are pulled on the switch side: it loses the peer on both links and the
    // witness with them.
    let t0 = Instant::now();
    for port in ["a0", "a1"] {
        c.topo.switch.ip(&["link", "set", port, "down"]).unwrap();
    }
    let took_over = wait_for(UP, || (role(&c.topo.b, GROUP)? == "Primary" && has_vip(&c.topo.b)).then_some(()));
    assert!(took_over.is_some(), "b did not take over:\n{}", c.describe());
    let gone = wait_for(UP, || (!has_vip(&c.topo.a)).then_some(()));
    assert!(gone.is_some(), "a kept the VIP:\n{}", c.describe());
    std::thread::sleep(Duration::from_millis(100));
    let (samples_a, samples_b) = (watch_a.finish(), watch_b.finish());
    let (changes_a, changes_b) = (changes(&samples_a), changes(&samples_b));
    assert!(samples_a.first().is_some_and(|s| s.held), "a did not hold the VIP when the watch began");
    assert!(samples_b.first().is_some_and(|s| !s.held), "b held the VIP when the watch began");
    let [(_, a_gone_by, false)] = changes_a[..] else { panic!("a's VIP changes: {changes_a:?}") };
    let [(b_not_before, b_by, true)] = changes_b[..] else { panic!("b's VIP changes: {changes_b:?}") };
    println!(
        "isolated primary: a's VIP gone within {:.1} ms of the cut, b's VIP appeared between {:.1} and {:.1} ms: \
         a gap of at least {:.1} ms",
        ms(a_gone_by - t0),
        ms(b_not_before - t0),
        ms(b_by - t0),
        ms(b_not_before.saturating_duration_since(a_gone_by))
    );
    assert!(a_gone_by <= b_not_before, "both held the VIP at once:\na {changes_a:?}\nb {changes_b:?}");
    assert_eq!(role(&c.topo.a, GROUP).as_deref().map(|r| r != "Primary"), Some(true), "{}", c.describe());

    for port in ["a0", "a1"] {
        c.topo.switch.ip(&["link", "set", port, "up"]).unwrap();
    }
    c.wait_pair("b");
}

/// Blackhole routes between the servers' addresses: no heartbeat on either link, while
/// both still reach the controller on link 0.
fn cut_heartbeats(c: &Cluster, add: bool) {
    let verb = if add { "add" } else { "del" };
    for (ns, peers) in [(&c.topo.a, [B0, B1]), (&c.topo.b, [A0, A1])] {
        for peer in peers {
            ns.ip(&["route", verb, "blackhole", &format!("{peer}/32")]).unwrap();
        }
    }
}

#[test]
fn cut_heartbeat_links_with_the_witness_reachable_keep_one_primary_without_flapping() {
    require_root();
    let c = Cluster::start(Options { failback_auto: None });
    let before = epoch(&c.topo.a).unwrap();
    let (watch_a, watch_b) = (VipWatch::start(&c.topo.a), VipWatch::start(&c.topo.b));
    cut_heartbeats(&c, true);
    let deaf = wait_for(UP, || (group(&status(&c.topo.b)?, GROUP)?["peerReachable"] == false).then_some(()));
    assert!(deaf.is_some(), "b still hears a:\n{}", c.describe());
    // Both ask the witness; it keeps granting to the primary and refuses the standby.
    let end = Instant::now() + Duration::from_secs(4);
    let mut polls = 0;
    while Instant::now() < end {
        let roles = (role(&c.topo.a, GROUP), role(&c.topo.b, GROUP));
        assert_eq!(
            (roles.0.as_deref(), roles.1.as_deref().map(|r| r == "Primary")),
            (Some("Primary"), Some(false)),
            "not exactly one primary:\n{}",
            c.describe()
        );
        polls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.ask().as_deref(), Some("a"));
    let (samples_a, samples_b) = (watch_a.finish(), watch_b.finish());
    let (changes_a, changes_b) = (changes(&samples_a), changes(&samples_b));
    println!(
        "heartbeats cut for 4 s: {polls} role polls, {} / {} VIP samples on a / b, VIP changes a {} b {}",
        samples_a.len(),
        samples_b.len(),
        changes_a.len(),
        changes_b.len()
    );
    assert!(samples_a.len() > 100 && samples_b.len() > 100, "the watchers did not sample");
    assert!(samples_a.iter().all(|s| s.held), "a's VIP flapped: {changes_a:?}");
    assert!(samples_b.iter().all(|s| !s.held), "b took the VIP: {changes_b:?}");
    assert_eq!(epoch(&c.topo.a), Some(before));
    let reason = group(&status(&c.topo.b).unwrap(), GROUP).unwrap()["roleReason"].to_string();
    println!("standby's reason while cut off: {reason}");

    cut_heartbeats(&c, false);
    c.wait_pair("a");
}

#[test]
fn without_the_witness_the_standby_waits_and_promotes_when_it_returns() {
    require_root();
    let mut c = Cluster::start(Options { failback_auto: None });
    let before = epoch(&c.topo.a).unwrap();
    let (watch_a, watch_b) = (VipWatch::start(&c.topo.a), VipWatch::start(&c.topo.b));
    c.controller.kill();
    // A healthy pair does not need its witness: nothing changes.
    std::thread::sleep(Duration::from_secs(3));
    let (samples_a, samples_b) = (watch_a.finish(), watch_b.finish());
    assert!(samples_a.iter().all(|s| s.held) && samples_b.iter().all(|s| !s.held), "the VIP moved without a witness");
    c.wait_pair("a");
    assert_eq!(epoch(&c.topo.a), Some(before));

    // Now the primary dies: the standby may not know it is dead rather than cut off, so
    // it must not promote without the witness, and must say why.
    c.power_off("a");
    let silent_since = Instant::now();
    let reason = wait_for(UP, || {
        let g = group(&status(&c.topo.b)?, GROUP)?;
        let reason = g["roleReason"].as_str()?.to_string();
        (g["peerReachable"] == false && reason.contains("witness unreachable")).then_some(reason)
    });
    let reason = reason.unwrap_or_else(|| panic!("b does not say it waits for the witness:\n{}", c.describe()));
    // Well past the time it would have promoted with a witness.
    let hold = crash_bound() + Duration::from_secs(1);
    while silent_since.elapsed() < hold {
        assert_ne!(role(&c.topo.b, GROUP).as_deref(), Some("Primary"), "b promoted without the witness");
        assert!(!has_vip(&c.topo.b), "b took the VIP without the witness");
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = group(&status(&c.topo.b).unwrap(), GROUP).unwrap()["events"].to_string();
    assert!(events.contains("WitnessUnreachable"), "no event says the witness is unreachable: {events}");
    println!("witness down, primary dead: b stays standby, reason: {reason}");

    let restarted = Instant::now();
    c.controller.restart(&c.topo.client);
    c.wait_serving("b");
    println!("witness back: b serves {:.1} ms after the controller restart began", ms(restarted.elapsed()));
    assert!(epoch(&c.topo.b).unwrap() > before);
    let events = group(&status(&c.topo.b).unwrap(), GROUP).unwrap()["events"].to_string();
    assert!(events.contains("witness grant"), "b did not promote through the witness: {events}");
}

/// (min, p50, max) of `times`.
fn spread(times: &[Duration]) -> (Duration, Duration, Duration) {
    let mut sorted = times.to_vec();
    sorted.sort();
    (sorted[0], sorted[(sorted.len() - 1) / 2], sorted[sorted.len() - 1])
}

#[test]
fn twenty_switchovers_with_a_connected_client() {
    require_root();
    let c = Cluster::start(Options { failback_auto: None });
    let client = ClientLoop::start(&c.topo.client);
    let mut switches = Vec::new();
    let mut current = "a";
    for i in 1..=20 {
        let to = other(current);
        let started = Instant::now();
        let out = c.controller.kubectl(&c.topo.client, &["switchover", GROUP, "--to", to, "--timeout", "30s"]);
        assert!(
            out.status.success(),
            "switchover {i} to {to}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_pair(to);
        switches.push((started, current, to));
        current = to;
    }
    std::thread::sleep(Duration::from_millis(200));
    let answers = client.finish();
    // The outage of a switch: from the old primary's last answer to the new one's first.
    let mut outages = Vec::new();
    for (started, from, to) in &switches {
        let first_new = answers.iter().find(|(at, who)| at >= started && who == to).map(|(at, _)| *at);
        let first_new = first_new.unwrap_or_else(|| panic!("the client never reached {to} after the switch"));
        let last_old = answers.iter().rev().find(|(at, who)| *at < first_new && who == from).map(|(at, _)| *at);
        outages.push(first_new - last_old.unwrap_or(*started));
    }
    let (min, p50, max) = spread(&outages);
    let list: Vec<String> = outages.iter().map(|d| format!("{:.0}", ms(*d))).collect();
    println!(
        "20 switchovers: client outage per switch min {:.1} ms, p50 {:.1} ms, max {:.1} ms ({} ms)",
        ms(min),
        ms(p50),
        ms(max),
        list.join(" ")
    );
}

#[test]
fn failback_auto_returns_to_the_preferred_node_after_stabilization() {
    require_root();
    let stabilization = Duration::from_secs(2);
    let mut c = Cluster::start(Options { failback_auto: Some(stabilization) });
    c.power_off("a");
    c.wait_serving("b");
    c.power_on("a");
    let standby = wait_for(UP, || {
        let g = group(&status(&c.topo.a)?, GROUP)?;
        (g["role"] == "Standby" && g["peerReachable"] == true).then(Instant::now)
    });
    let standby = standby.unwrap_or_else(|| panic!("a did not come back as standby:\n{}", c.describe()));
    let back = wait_for(UP, || (role(&c.topo.a, GROUP)? == "Primary").then(Instant::now));
    let back = back.unwrap_or_else(|| panic!("no failback to a:\n{}", c.describe()));
    c.wait_pair("a");
    println!(
        "failback auto: a primary again {:.1} ms after it was seen standing by (stabilization {} ms)",
        ms(back - standby),
        stabilization.as_millis()
    );
    // Seen standby no earlier than it stood by, seen primary no later than 100 ms after.
    assert!(back - standby + Duration::from_millis(100) >= stabilization, "failback before the stabilization time");
    let events = group(&status(&c.topo.b).unwrap(), GROUP).unwrap()["events"].to_string();
    assert!(events.contains("failback to preferred node a"), "b's events do not say why it handed back: {events}");
}

#[test]
fn a_bad_manifest_is_reported_and_leaves_the_running_group_alone() {
    require_root();
    let c = Cluster::start(Options { failback_auto: None });
    let before = (epoch(&c.topo.a).unwrap(), status(&c.topo.a).unwrap()["configRevision"].clone());
    let good = std::fs::read_to_string(c.controller.manifests.join("web.yaml")).unwrap();
    let bad = good.replace(&format!("\"{VIP}/24\""), "\"198.18.0.300/24\"");
    assert_ne!(bad, good);
    hapair_tests::agents::write_file(&c.controller.manifests.join("web.yaml"), &bad);
    std::fs::write(c.controller.manifests.join("broken.yaml"), "kind: HaGroup\nspec: [unclosed\n").unwrap();

    let reported = wait_for(UP, || {
        let out = c.controller.kubectl(&c.topo.client, &["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("web.yaml") && text.contains("broken.yaml")).then_some(text)
    });
    let text = reported.unwrap_or_else(|| {
        panic!(
            "kubectl-hapair status does not report the bad manifests: {:?}\n{}",
            c.controller.overview(&c.topo.client),
            c.controller.log_tail(30)
        )
    });
    println!("kubectl-hapair status:\n{text}");
    let line = text.lines().find(|l| l.contains("web.yaml")).unwrap();
    for part in ["default/web", "virtualIPs[0].address", "198.18.0.300"] {
        assert!(line.contains(part), "the error does not name {part}: {line}");
    }
    assert!(text.lines().any(|l| l.contains("broken.yaml") && l.contains("line")), "{text}");

    // The last good config keeps running: same primary, same epoch, same revision.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(role(&c.topo.a, GROUP).as_deref(), Some("Primary"));
    assert_eq!(role(&c.topo.b, GROUP).as_deref(), Some("Standby"));
    let after = (epoch(&c.topo.a).unwrap(), status(&c.topo.a).unwrap()["configRevision"].clone());
    assert_eq!(after, before);
    assert_eq!(c.ask().as_deref(), Some("a"));
    assert!(has_vip(&c.topo.a) && !has_vip(&c.topo.b));
}
