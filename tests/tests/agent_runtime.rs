//! The agent runtime for real: `hapair-agent run` processes in network namespaces, two
//! heartbeat links each, running exec flows and a virtual IP that a client in a third
//! namespace uses. Nothing is simulated: links are taken down with `ip link`, agents are
//! killed with SIGKILL, and the client's neighbour cache is never flushed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use hapair_agent::engine::{Heartbeat, Role};
use hapair_agent::heartbeat::envelope::{Header, seal};
use hapair_agent::heartbeat::{GroupId, HmacKey, NodeId};
use hapair_crds::hagroup::NodeHealth;
use hapair_crds::nodeapi::{GroupKey, HeartbeatKey};
use hapair_crds::volume::DiskState;
use hapair_tests::agents::{
    Agent, BundleSpec, GROUP, HEARTBEAT_KEY, bundle, group, metric, role, spawn_logged, status, wait_role, write_file,
};
use hapair_tests::netns::{Netns, require_root, wait_for};
use hapair_tests::topology::TwoServersAndClient;

const VIP: &str = "198.18.0.100";
const UP: Duration = Duration::from_secs(20);

/// An exec step that logs `<node> start|stop <step>` into `log`.
fn logging_step(name: &str, log: &Path, extra: &str) -> String {
    format!(
        "        - name: {name}\n          exec:\n            start: 'echo \"$HAPAIR_NODE start $HAPAIR_STEP\" >> {log}'\n            stop: 'echo \"$HAPAIR_NODE stop $HAPAIR_STEP\" >> {log}'\n          timeout: 5s\n{extra}",
        log = log.display()
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

fn neighbour_mac(client: &Netns, address: &str) -> Option<String> {
    let text = client.ip(&["neigh", "show", address, "dev", "eth0"]).ok()?;
    text.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(str::to_string)
}

fn ping(client: &Netns, address: &str) -> bool {
    client.exec(&["ping", "-c", "1", "-W", "1", address]).map(|o| o.status.success()).unwrap_or(false)
}

fn has_vip(ns: &Netns) -> bool {
    ns.ip(&["-o", "addr", "show", "dev", "eth0"]).unwrap_or_default().contains(&format!(" {VIP}/"))
}

fn events(ns: &Netns) -> Vec<String> {
    status(ns)
        .and_then(|s| group(&s, GROUP))
        .and_then(|g| g["events"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

/// Two agents on the topology's servers, both running `spec`.
struct Pair {
    // Agents before the topology: processes go before their namespaces.
    a: Agent,
    b: Agent,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    topo: TwoServersAndClient,
}

impl Pair {
    fn start(spec: &BundleSpec) -> Pair {
        Pair::start_nodes(spec, &["a", "b"])
    }

    /// Both agents configured, only `nodes` started.
    fn start_nodes(spec: &BundleSpec, nodes: &[&str]) -> Pair {
        require_root();
        let topo = TwoServersAndClient::build().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut agents = Vec::new();
        for node in ["a", "b"] {
            let home = dir.join(node);
            std::fs::create_dir_all(&home).unwrap();
            let agent = Agent::with_bundle(node, &home);
            write_file(&agent.bundle_path(), &bundle(node, spec));
            agents.push(agent);
        }
        let b = agents.pop().unwrap();
        let a = agents.pop().unwrap();
        let mut pair = Pair { a, b, _dir: tmp, dir, topo };
        for node in nodes {
            pair.restart(node);
        }
        pair
    }

    fn ns(&self, node: &str) -> &Netns {
        if node == "a" { &self.topo.a } else { &self.topo.b }
    }

    fn agent(&mut self, node: &str) -> &mut Agent {
        if node == "a" { &mut self.a } else { &mut self.b }
    }

    /// Starts the node's agent again (after a kill).
    fn restart(&mut self, node: &str) {
        let (agent, ns) = if node == "a" { (&mut self.a, &self.topo.a) } else { (&mut self.b, &self.topo.b) };
        agent.start(ns);
    }

    /// Waits for one Primary and one Standby that hears it; returns (primary, standby).
    fn wait_up(&self) -> (&'static str, &'static str) {
        let up = wait_for(UP, || {
            let roles = (role(&self.topo.a, GROUP), role(&self.topo.b, GROUP));
            match (roles.0.as_deref(), roles.1.as_deref()) {
                (Some("Primary"), Some("Standby")) => Some(("a", "b")),
                (Some("Standby"), Some("Primary")) => Some(("b", "a")),
                _ => None,
            }
        });
        let (primary, standby) = up.unwrap_or_else(|| {
            panic!("the pair did not come up: a {:?}, b {:?}", status(&self.topo.a), status(&self.topo.b))
        });
        let heard = wait_for(UP, || {
            let s = status(self.ns(standby))?;
            (group(&s, GROUP)?["peerReachable"] == true).then_some(())
        });
        assert!(heard.is_some(), "the standby does not hear the primary: {:?}", status(self.ns(standby)));
        (primary, standby)
    }
}

/// Link 1 down: no failover. Both links down (`witness: none`): the standby promotes and
/// the client reaches the VIP there through the announcements alone. Back on the network
/// the old primary steps down. Then the new primary's agent is killed and restarted within
/// its lease (no VIP flap), and once more with a corrupt state file (set aside, reported,
/// back as standby).
#[test]
fn failover_over_two_links_restart_within_the_lease_and_a_corrupt_state_file() {
    let flow_log = tempfile::NamedTempFile::new().unwrap();
    // Link 1's state is watched on each node, for an alert only.
    let monitor = "      monitors:\n        - {name: hb-link, link: {interface: eth1}, action: alert, interval: 200ms, failureThreshold: 1}\n";
    let flow = format!("      flow:\n{}{monitor}", logging_step("app", flow_log.path(), ""));
    let mut pair = Pair::start(&BundleSpec { spec_extra: flow, ..BundleSpec::default() });
    let (first, second) = pair.wait_up();
    assert_eq!(first, "a", "a starts first and is the designated node");
    let (mac_first, mac_second) = (pair.ns(first).mac("eth0").unwrap(), pair.ns(second).mac("eth0").unwrap());
    let client = &pair.topo.client;
    assert!(
        wait_for(Duration::from_secs(10), || ping(client, VIP).then_some(())).is_some(),
        "client cannot reach the VIP"
    );
    assert_eq!(neighbour_mac(client, VIP).as_deref(), Some(mac_first.as_str()));

    // Link 1 (the heartbeat-only link) fails: the standby sees it, nothing fails over.
    pair.ns(first).ip(&["link", "set", "eth1", "down"]).unwrap();
    let link1_down = wait_for(Duration::from_secs(10), || {
        let g = group(&status(pair.ns(second))?, GROUP)?;
        let links = g["heartbeatLinks"].as_array()?.clone();
        (links.len() == 2 && links[0]["up"] == true && links[1]["up"] == false).then_some(())
    });
    assert!(link1_down.is_some(), "the standby did not notice link 1: {:?}", status(pair.ns(second)));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(role(pair.ns(first), GROUP).as_deref(), Some("Primary"));
    assert_eq!(role(pair.ns(second), GROUP).as_deref(), Some("Standby"));
    let loss = metric(pair.ns(second), "hapair_agent_heartbeat_loss_percent", &format!("group=\"{GROUP}\",link=\"1\""));
    assert!(loss.is_some_and(|l| l > 0.0), "link 1 loss not in the metrics: {loss:?}");
    // The primary's link monitor saw its own eth1 go down: an alert, nothing more.
    let probe =
        |ns: &Netns| metric(ns, "hapair_agent_probe_healthy", &format!("group=\"{GROUP}\",monitor=\"hb-link\""));
    assert_eq!(probe(pair.ns(second)), Some(1.0));
    assert!(wait_for(Duration::from_secs(5), || (probe(pair.ns(first)) == Some(0.0)).then_some(())).is_some());
    assert!(events(pair.ns(first)).contains(&"ProbeFailed".to_string()), "{:?}", events(pair.ns(first)));

    // Both links fail: the standby takes over, and its announcements repoint the client.
    let t0 = Instant::now();
    pair.ns(first).ip(&["link", "set", "eth0", "down"]).unwrap();
    assert!(wait_role(pair.ns(second), GROUP, "Primary", UP), "no failover: {:?}", status(pair.ns(second)));
    let took = t0.elapsed();
    let moved = wait_for(Duration::from_secs(10), || neighbour_mac(client, VIP).filter(|m| *m == mac_second));
    assert!(moved.is_some(), "client still has {:?} for the VIP; {second} is {mac_second}", neighbour_mac(client, VIP));
    assert!(ping(client, VIP), "client cannot reach the VIP on {second}");
    eprintln!("failover after both links failed: {took:?}");
    let failovers = metric(pair.ns(second), "hapair_agent_failovers_total", &format!("group=\"{GROUP}\""));
    assert_eq!(failovers, Some(1.0));

    // Back on the network, the old primary sees the newer epoch and steps down.
    pair.ns(first).ip(&["link", "set", "eth0", "up"]).unwrap();
    pair.ns(first).ip(&["link", "set", "eth1", "up"]).unwrap();
    assert!(
        wait_role(pair.ns(first), GROUP, "Standby", UP),
        "old primary did not step down: {:?}",
        status(pair.ns(first))
    );
    assert!(wait_for(UP, || (!has_vip(pair.ns(first))).then_some(())).is_some(), "old primary kept the VIP");
    let log = lines(flow_log.path());
    assert_eq!(log.iter().filter(|l| *l == &format!("{second} start app")).count(), 1, "{log:?}");
    assert!(log.contains(&format!("{first} stop app")), "{log:?}");
    let epoch = |ns: &Netns| group(&status(ns).unwrap(), GROUP).unwrap()["epoch"].as_u64().unwrap();
    let serving_epoch = epoch(pair.ns(second));
    assert!(wait_for(UP, || (epoch(pair.ns(first)) == serving_epoch).then_some(())).is_some());
    let (_, standby_heard) = pair.wait_up();
    assert_eq!(standby_heard, first);

    // kill -9 the primary's agent and start it again at once: it resumes under its lease.
    let monitor_log = pair.dir.join("addresses.log");
    let _monitor = spawn_logged(pair.ns(second), &["ip", "monitor", "address"], &monitor_log).unwrap();
    let ping_log = pair.dir.join("ping.log");
    let mut pinger =
        spawn_logged(client, &["ping", "-n", "-i", "0.05", "-c", "60", "-W", "1", VIP], &ping_log).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = lines(flow_log.path()).len();
    pair.agent(second).kill();
    pair.restart(second);
    assert!(pinger.wait(Duration::from_secs(15)).is_some(), "ping did not finish");
    let pinged = std::fs::read_to_string(&ping_log).unwrap_or_default();
    assert!(pinged.contains("60 packets transmitted, 60 received"), "the client lost the VIP:\n{pinged}");
    let addresses = std::fs::read_to_string(&monitor_log).unwrap_or_default();
    assert!(!addresses.lines().any(|l| l.starts_with("Deleted") && l.contains(VIP)), "the VIP flapped:\n{addresses}");
    assert_eq!(role(pair.ns(second), GROUP).as_deref(), Some("Primary"));
    assert_eq!(epoch(pair.ns(second)), serving_epoch, "resumed in the same term");
    assert!(events(pair.ns(second)).contains(&"Resumed".to_string()), "{:?}", events(pair.ns(second)));
    assert_eq!(role(pair.ns(first), GROUP).as_deref(), Some("Standby"));
    assert_eq!(lines(flow_log.path()).len(), before, "the flow was touched: {:?}", lines(flow_log.path()));

    // Once more, with the group's state file corrupted while the agent is down.
    pair.agent(second).kill();
    let state_dir = pair.agent(second).state_dir();
    let state_file = state_dir.join("group-default-web.json");
    let mut bytes = std::fs::read(&state_file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&state_file, bytes).unwrap();
    pair.restart(second);
    let reported = wait_for(UP, || events(pair.ns(second)).contains(&"StateCorrupt".to_string()).then_some(()));
    assert!(reported.is_some(), "corrupt state not reported: {:?}", events(pair.ns(second)));
    let aside = std::fs::read_dir(&state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("group-default-web.json.corrupt-"));
    assert!(aside, "the corrupt file was not set aside");
    // Without a trustworthy record it came back as standby (VIP taken down); the
    // designated node takes the service back.
    assert!(wait_role(pair.ns(first), GROUP, "Primary", UP), "{:?}", status(pair.ns(first)));
    assert_eq!(role(pair.ns(second), GROUP).as_deref(), Some("Standby"));
    assert!(!has_vip(pair.ns(second)));
    assert!(lines(flow_log.path()).contains(&format!("{second} stop app")), "{:?}", lines(flow_log.path()));
}

/// An exec step that logs `<node> start|stop <step> vip=<0|1> <ns since epoch>` into `log`
/// (whether the VIP was on eth0 when the command ran, and when it ran); `start_tail` and
/// `stop_tail` run after the line is written.
fn traced_step(name: &str, log: &Path, start_tail: &str, stop_tail: &str, extra: &str) -> String {
    let line = |what: &str| {
        format!(
            "echo \"$HAPAIR_NODE {what} $HAPAIR_STEP vip=$(ip -o addr show dev eth0 | grep -c \"inet {VIP}/\") $(date +%s%N)\" >> {}",
            log.display()
        )
    };
    format!(
        "        - name: {name}\n          exec:\n            start: '{}{start_tail}'\n            stop: '{}{stop_tail}'\n          timeout: 2s\n{extra}",
        line("start"),
        line("stop"),
    )
}

/// `(node, action, step, vip, nanos)` of every line a [`traced_step`] wrote.
fn traced(log: &Path) -> Vec<(String, String, String, bool, u128)> {
    lines(log)
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [node, action, step, vip, at] = f.as_slice() else { return None };
            Some((node.to_string(), action.to_string(), step.to_string(), *vip == "vip=1", at.parse().ok()?))
        })
        .collect()
}

fn actions_of(log: &Path, node: &str) -> Vec<String> {
    traced(log).into_iter().filter(|t| t.0 == node).map(|t| format!("{} {}", t.1, t.2)).collect()
}

/// A heartbeat from `b` as its agent would send it on link `link`, sealed with `key`.
fn datagram(key: &HmacKey, link: u8, seq: u64, epoch: u64, role: Role) -> Vec<u8> {
    let message = Heartbeat {
        sender: "b".into(),
        incarnation: 7,
        seq,
        epoch,
        floor: epoch,
        role,
        holding: role == Role::Primary,
        maintenance: false,
        health: NodeHealth::Healthy,
        disk: DiskState::UpToDate,
        grant: None,
        handover: None,
        takeover: None,
    };
    let (ns, name) = GROUP.split_once('/').unwrap();
    let header = Header {
        link,
        group: GroupId::of(&GroupKey::new(ns, name)),
        sender: NodeId::of("b"),
        incarnation: 7,
        sequence: seq,
        epoch,
    };
    seal(key, &header, &message.encode().unwrap()).unwrap()
}

/// Sends `bytes` from `from` (an address of `ns`, port 7405) to a's heartbeat port on
/// link 0.
fn send_from(ns: &Netns, from: &str, bytes: &[u8]) {
    let from: std::net::SocketAddr = format!("{from}:7405").parse().unwrap();
    let bytes = bytes.to_vec();
    ns.run(move || {
        let socket = std::net::UdpSocket::bind(from).unwrap();
        socket.send_to(&bytes, "198.18.0.1:7405").unwrap();
    });
}

/// Only `a` runs; the test speaks for `b` from b's own address. A genuine heartbeat is
/// heard; the same datagram again, one sealed with another key, one altered in flight and
/// one from the client's address are dropped and counted by reason on /metrics, and the
/// epoch the forgeries claim is never adopted.
#[test]
fn forged_replayed_and_wrong_key_heartbeats_are_dropped_and_counted() {
    let pair = Pair::start_nodes(&BundleSpec::default(), &["a"]);
    let a = &pair.topo.a;
    assert!(wait_for(UP, || status(a).and_then(|s| group(&s, GROUP))).is_some(), "a does not run the group");
    let dropped = |reason: &str| {
        metric(a, "hapair_agent_heartbeat_dropped_total", &format!("group=\"{GROUP}\",reason=\"{reason}\""))
            .unwrap_or(0.0)
    };
    let key = HmacKey::load(&HeartbeatKey::Inline(HEARTBEAT_KEY.into())).unwrap();
    let genuine = datagram(&key, 0, 1, 0, Role::Standby);
    send_from(&pair.topo.b, "198.18.0.2", &genuine);
    let heard = wait_for(Duration::from_secs(5), || {
        let g = group(&status(a)?, GROUP)?;
        (!g["lastPeerHeartbeat"].is_null()).then_some(())
    });
    assert!(heard.is_some(), "the genuine heartbeat was not heard: {:?}", status(a));

    // The very same datagram again.
    send_from(&pair.topo.b, "198.18.0.2", &genuine);
    // Another key, claiming a far newer epoch.
    let other_key = HmacKey::from_bytes(vec![7; 32], "test").unwrap();
    send_from(&pair.topo.b, "198.18.0.2", &datagram(&other_key, 0, 2, 50, Role::Primary));
    // The right key, altered in flight: the epoch in the header raised.
    let mut altered = datagram(&key, 0, 3, 0, Role::Standby);
    altered[45] ^= 0x40;
    send_from(&pair.topo.b, "198.18.0.2", &altered);
    // Right key, right node, from the client's address.
    send_from(&pair.topo.client, "198.18.0.10", &datagram(&key, 0, 4, 60, Role::Primary));

    let counted = wait_for(Duration::from_secs(10), || {
        (dropped("replayed") >= 1.0 && dropped("forged") >= 2.0 && dropped("unknown_sender") >= 1.0).then_some(())
    });
    assert!(
        counted.is_some(),
        "replayed {}, forged {}, unknown_sender {}",
        dropped("replayed"),
        dropped("forged"),
        dropped("unknown_sender")
    );
    let epoch = group(&status(a).unwrap(), GROUP).unwrap()["epoch"].as_u64().unwrap();
    assert!(epoch < 50, "a forged epoch was adopted: {epoch}");

    // Alone, a takes the service after deadAfter; removing the group from the bundle
    // takes the VIP down and the group is gone.
    assert!(wait_role(a, GROUP, "Primary", UP), "a alone did not take the service: {:?}", status(a));
    assert!(wait_for(Duration::from_secs(10), || has_vip(a).then_some(())).is_some());
    write_file(&pair.a.bundle_path(), &bundle("a", &BundleSpec { revision: 2, empty: true, ..BundleSpec::default() }));
    let gone = wait_for(UP, || {
        let s = status(a)?;
        (s["configRevision"] == 2 && group(&s, GROUP).is_none_or(|g| g["cleanedUp"] == true)).then_some(())
    });
    assert!(gone.is_some(), "the group was not cleaned up: {:?}", status(a));
    assert!(!has_vip(a), "the VIP stayed");
}

/// `second`'s check fails on a only: a restarts it `limit` times, then gives the service
/// up, stopping the flow in reverse order (VIP first), and b takes over.
#[test]
fn a_failing_check_restarts_the_step_then_the_flow_moves_stopping_in_reverse() {
    let flow_log = tempfile::NamedTempFile::new().unwrap();
    let limit: u32 = 2;
    let check = format!(
        "          check: {{exec: {{command: 'test \"$HAPAIR_NODE\" != a'}}, interval: 300ms, timeout: 2s, failureThreshold: 1}}\n          restart: {{limit: {limit}, window: 60s}}\n"
    );
    let flow = format!(
        "      flow:\n{}{}",
        traced_step("first", flow_log.path(), "", "", ""),
        traced_step("second", flow_log.path(), "", "", &check)
    );
    let pair = Pair::start(&BundleSpec { spec_extra: flow, ..BundleSpec::default() });
    let moved = wait_for(Duration::from_secs(40), || {
        (role(&pair.topo.b, GROUP).as_deref() == Some("Primary") && has_vip(&pair.topo.b)).then_some(())
    });
    assert!(moved.is_some(), "b did not take over: a {:?}\nb {:?}", status(&pair.topo.a), status(&pair.topo.b));
    let a = actions_of(flow_log.path(), "a");
    // An agent starts by stopping whatever a previous run may have left, in reverse order.
    let mut expected: Vec<String> =
        ["stop second", "stop first", "start first", "start second"].map(String::from).to_vec();
    for _ in 0..limit {
        expected.extend(["stop second".to_string(), "start second".to_string()]);
    }
    expected.extend(["stop second".to_string(), "stop first".to_string()]);
    assert_eq!(a, expected, "a's commands, in the order they ran");
    // The VIP left a before its steps were stopped.
    let last_stops: Vec<_> =
        traced(flow_log.path()).into_iter().filter(|t| t.0 == "a").skip(4 + 2 * limit as usize).collect();
    assert!(last_stops.iter().all(|t| !t.3), "VIP still on a while stopping: {last_stops:?}");
    assert_eq!(actions_of(flow_log.path(), "b"), ["stop second", "stop first", "start first", "start second"]);
    let restarts =
        metric(&pair.topo.a, "hapair_agent_flow_step_restarts", &format!("group=\"{GROUP}\",step=\"second\""));
    assert!(restarts.is_some_and(|r| r >= f64::from(limit)), "restarts on /metrics: {restarts:?}");
    let reasons = events(&pair.topo.a);
    assert!(reasons.contains(&"StepRestarted".to_string()), "{reasons:?}");
}

/// A check that fails right after the start, while the service comes up, is not held
/// against the step: the run made at the start can only report it healthy early, and
/// `failureThreshold: 1` counts from the run one interval later, which passes.
#[test]
fn a_check_failing_only_while_the_service_comes_up_is_not_counted() {
    let flow_log = tempfile::NamedTempFile::new().unwrap();
    let up = flow_log.path().with_extension("up");
    let runs = flow_log.path().with_extension("runs");
    let check = format!(
        "          check: {{exec: {{command: 'echo run >> {runs}; test $(( $(date +%s) - $(stat -c %Y {up}) )) -ge 1'}}, interval: 2s, timeout: 2s, failureThreshold: 1}}\n",
        runs = runs.display(),
        up = up.display()
    );
    let flow = format!(
        "      flow:\n{}",
        traced_step("svc", flow_log.path(), &format!("; touch {}", up.display()), "", &check)
    );
    let pair = Pair::start_nodes(&BundleSpec { spec_extra: flow, ..BundleSpec::default() }, &["a"]);
    let a = &pair.topo.a;
    assert!(wait_role(a, GROUP, "Primary", UP), "a alone did not take the service: {:?}", status(a));
    let two_runs =
        wait_for(Duration::from_secs(10), || (std::fs::read_to_string(&runs).ok()?.lines().count() >= 2).then_some(()));
    assert!(two_runs.is_some(), "the check did not run at the start and one interval later");
    assert_eq!(actions_of(flow_log.path(), "a"), ["stop svc", "start svc"], "the step was restarted");
    let reasons = events(a);
    assert!(!reasons.iter().any(|r| r == "StepRestarted" || r == "StepFailed"), "{reasons:?}");
}

/// The group leaves the bundle: the VIP goes first, then the steps in reverse order; the
/// last step's stop hangs (with a child in its process group) and is killed after its
/// timeout, and the stop carries on with the first step.
#[test]
fn removing_the_group_stops_the_flow_in_reverse_and_kills_a_hanging_stop() {
    let flow_log = tempfile::NamedTempFile::new().unwrap();
    let pid_file = flow_log.path().with_extension("pid");
    let started = flow_log.path().with_extension("started");
    // Hangs only once started (the agent's start-up stop must not hang).
    let hang =
        format!("; if [ -e {} ]; then sleep 600 & echo $! > {}; wait; fi", started.display(), pid_file.display());
    let flow = format!(
        "      flow:\n{}{}",
        traced_step("first", flow_log.path(), "", "", ""),
        traced_step("hang", flow_log.path(), &format!("; touch {}", started.display()), &hang, "")
    );
    let spec = BundleSpec { spec_extra: flow, ..BundleSpec::default() };
    let pair = Pair::start_nodes(&spec, &["a"]);
    let a = &pair.topo.a;
    assert!(wait_role(a, GROUP, "Primary", UP), "a alone did not take the service: {:?}", status(a));
    assert!(wait_for(Duration::from_secs(10), || has_vip(a).then_some(())).is_some());

    // A bundle whose group is invalid (a replication monitor may only alert) is refused as
    // a whole, naming the field; the running config stays.
    let with_volume = bundle(
        "a",
        &BundleSpec { revision: 2, spec_extra: format!("{}        - {{name: data, volume: {{volumeRef: data}}}}\n      monitors:\n        - {{name: repl, replication: {{volumeRef: data}}, action: failover}}\n", spec.spec_extra), ..spec.clone() },
    )
    .replace(
        "    spec:\n",
        "    volumes:\n      - name: data\n        uuid: 6f1c2a9e-5b7d-4c1e-9a0b-3d2f1e0c9b8a\n        spec: {group: web, size: 16Mi, backing: [{node: a, path: /srv/data, address: 198.18.1.1}, {node: b, path: /srv/data, address: 198.18.1.2}]}\n    spec:\n",
    );
    write_file(&pair.a.bundle_path(), &with_volume);
    let refused = wait_for(UP, || status(a)?["configError"].as_str().map(str::to_string));
    let refused = refused.unwrap_or_else(|| panic!("the invalid monitor was not refused: {:?}", status(a)));
    assert!(refused.contains("revision 2") && refused.contains("spec.monitors[0].action"), "{refused}");
    let s = status(a).unwrap();
    assert_eq!((s["configRevision"].as_u64(), role(a, GROUP).as_deref()), (Some(1), Some("Primary")));

    write_file(&pair.a.bundle_path(), &bundle("a", &BundleSpec { revision: 3, empty: true, ..spec.clone() }));
    let step_state = |g: &serde_json::Value, name: &str| {
        g["steps"].as_array().and_then(|s| s.iter().find(|s| s["name"] == name)).map(|s| s["state"].clone())
    };
    let stopped = wait_for(UP, || {
        let g = group(&status(a)?, GROUP)?;
        (step_state(&g, "first")? == "Stopped" && step_state(&g, "hang")? == "Failed").then_some(g)
    });
    let g = stopped.unwrap_or_else(|| panic!("the flow was not stopped: {:?}", status(a)));
    assert!(!has_vip(a), "the VIP stayed");
    // A stop that failed may have left something running: the group is not reported as
    // cleaned up, and the failure is an event.
    assert_eq!(g["cleanedUp"], false);
    assert!(events(a).contains(&"StopFailed".to_string()), "{:?}", events(a));
    let log = traced(flow_log.path());
    let order: Vec<String> = log.iter().map(|t| format!("{} {}", t.1, t.2)).collect();
    // The start-up stop (reverse order), the start, and the stop for the removal.
    assert_eq!(order, ["stop hang", "stop first", "start first", "start hang", "stop hang", "stop first"]);
    assert!(!log[4].3 && !log[5].3, "the VIP was still up while stopping: {log:?}");
    let waited = std::time::Duration::from_nanos(u64::try_from(log[5].4 - log[4].4).unwrap());
    assert!(waited >= Duration::from_millis(1900), "the hanging stop was not given its 2 s: {waited:?}");
    assert!(waited < Duration::from_secs(20), "the hanging stop was not killed: {waited:?}");
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.split_whitespace().nth(2).is_none_or(|state| state != "Z"))
        .unwrap_or(false);
    assert!(!alive, "the stop command's child {pid} survived its process group");
}
