//! The agent runtime for real: `hapair-agent run` processes in network namespaces, two
//! heartbeat links each, running exec flows and a virtual IP that a client in a third
//! namespace uses. Nothing is simulated: links are taken down with `ip link`, agents are
//! killed with SIGKILL, and the client's neighbour cache is never flushed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use hapair_tests::agents::{
    Agent, BundleSpec, GROUP, bundle, group, metric, role, spawn_logged, status, wait_role, write_file,
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
        pair.a.start(&pair.topo.a);
        pair.b.start(&pair.topo.b);
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
    let flow = format!("      flow:\n{}", logging_step("app", flow_log.path(), ""));
    let mut pair = Pair::start(&BundleSpec { spec_extra: flow, ..BundleSpec::default() });
    let (first, second) = pair.wait_up();
    assert_eq!(first, "a", "a starts first and is the designated node");
    let (mac_first, mac_second) = (pair.ns(first).mac("eth0").unwrap(), pair.ns(second).mac("eth0").unwrap());
    let client = &pair.topo.client;
    assert!(wait_for(Duration::from_secs(10), || ping(client, VIP).then_some(())).is_some(), "client cannot reach the VIP");
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
    assert!(wait_role(pair.ns(first), GROUP, "Standby", UP), "old primary did not step down: {:?}", status(pair.ns(first)));
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
    let mut pinger = spawn_logged(client, &["ping", "-n", "-i", "0.05", "-c", "60", "-W", "1", VIP], &ping_log).unwrap();
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
