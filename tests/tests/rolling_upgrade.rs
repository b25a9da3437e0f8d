//! A rolling upgrade across protocol versions: both agents start speaking only the
//! previous protocol version (`--protocol-version 1`, byte for byte what the previous
//! release sends), `a` active. The standby `b` is upgraded (restarted without the flag),
//! the service switched over to it, then `a` is upgraded. After every step both agents
//! hear each other, the standby stands by, and each reports the heartbeat version they
//! agreed on; a client connecting every 5 ms sees answers throughout, with one outage:
//! the switchover's. Each agent also reports the node-API version the controller answered
//! it in. The group has a protocol C volume: after every step the standby's
//! replica is UpToDate and connected, in the replication version both agents speak.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use hapair_tests::agents::{Agent, GROUP, group, metric, role, status, volume_report};
use hapair_tests::client_loop::ClientLoop;
use hapair_tests::controller::{Controller, enroll, unenrolled_config};
use hapair_tests::enrolled_pair::{volume_manifest, volume_step};
use hapair_tests::failover_bench::probe;
use hapair_tests::failover_bench::{SERVICE_PORT, service_address};
use hapair_tests::mounts::AttachDirCleanup;
use hapair_tests::netns::{Netns, require_root, wait_for};
use hapair_tests::topology::{A0, A1, B0, B1, C0, TwoServersAndClient};

const BENCH: &str = env!("CARGO_BIN_EXE_bench-failover");
const VIP: &str = "198.18.0.100";
const INTERVAL: Duration = Duration::from_millis(50);
const DEAD_AFTER: Duration = Duration::from_millis(800);
const LEASE: Duration = Duration::from_millis(600);
const DRIFT_PPM: u32 = 500;
const UP: Duration = Duration::from_secs(30);
/// Longest silence the client may see outside the switchover.
const MAX_GAP: Duration = Duration::from_secs(5);

fn manifest(dir: &Path) -> String {
    let pid_file = format!("'{}'/\"$HAPAIR_NODE\"-service.pid", dir.display());
    let start = format!(
        "'{BENCH}' serve --name \"$HAPAIR_NODE\" --port {SERVICE_PORT} --daemon --pid-file {pid_file} </dev/null >/dev/null 2>&1"
    );
    let stop = format!("f={pid_file}; if [ -f \"$f\" ]; then kill \"$(cat \"$f\")\"; rm -f \"$f\"; fi");
    let failback = serde_json::json!({"mode": "manual"});
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let group = serde_json::json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "HaGroup",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "nodes": [
                {"name": "a", "heartbeatAddresses": [A0, A1], "preferred": false},
                {"name": "b", "heartbeatAddresses": [B0, B1]},
            ],
            "heartbeat": {"interval": ms(INTERVAL), "deadAfter": ms(DEAD_AFTER), "leaseTTL": ms(LEASE), "maxClockDriftPpm": DRIFT_PPM},
            "witness": {"mode": "controller"},
            "failback": failback,
            "virtualIPs": [{"name": "www", "address": format!("{VIP}/24"), "interface": "eth0", "garp": {"count": 3, "interval": "100ms"}}],
            "flow": [
                volume_step(dir),
                {"name": "service", "exec": {"start": start, "stop": stop}},
                {"name": "service-ip", "virtualIP": {"name": "www"}},
            ],
        },
    });
    let volume = volume_manifest(dir);
    format!("{group}\n---\n{volume}\n")
}

fn has_vip(ns: &Netns) -> bool {
    ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"]).unwrap_or_default().contains(&format!(" {VIP}/"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// An agent of the previous protocol version, or of this one.
fn agent(node: &str, home: &Path, old: bool) -> Agent {
    let mut agent = Agent::with_config(node, home);
    if old {
        agent.arg("--protocol-version");
        agent.arg("1");
    }
    agent
}

fn describe(topo: &TwoServersAndClient) -> String {
    format!("a: {:?}\nb: {:?}", status(&topo.a), status(&topo.b))
}

fn ask(topo: &TwoServersAndClient) -> Option<String> {
    topo.client.block_on(|| probe::ask(service_address(), Duration::from_millis(500))).map(|a| a.server)
}

/// `primary` serves, the other stands by in sync; both hear each other and agree on
/// `version` of the heartbeat and of replication.
fn check_pair(topo: &TwoServersAndClient, primary: &str, version: f64, step: &str) {
    let (p, s) = if primary == "a" { (&topo.a, &topo.b) } else { (&topo.b, &topo.a) };
    let ok = wait_for(UP, || {
        let pg = group(&status(p)?, GROUP)?;
        let sg = group(&status(s)?, GROUP)?;
        let agreed = |ns: &Netns| {
            metric(ns, "hapair_agent_peer_protocol_version", "group=\"default/web\",protocol=\"heartbeat\"")
        };
        let replicating = |ns: &Netns| {
            metric(
                ns,
                "hapair_agent_peer_protocol_version",
                "group=\"default/web\",volume=\"data\",protocol=\"replication\"",
            )
        };
        let v = volume_report(s)?;
        (pg["role"] == "Primary"
            && has_vip(p)
            && pg["peerReachable"] == true
            && sg["role"] == "Standby"
            && sg["peerReachable"] == true
            && !has_vip(s)
            && agreed(p)? == version
            && agreed(s)? == version
            && v["diskState"] == "UpToDate"
            && v["connection"] == "Connected"
            && replicating(p)? == version
            && replicating(s)? == version
            && ask(topo)? == primary)
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "{step}: {primary} does not serve with its peer standing by at version {version}:\n{}",
        describe(topo)
    );
    println!("{step}: {primary} primary, peer standby in sync, heartbeat and replication version {version}");
}

/// Each agent reports the node-API version the controller answered it in: 1 for an agent
/// speaking the previous version (it sends no header, so gets none back), 2 for an
/// upgraded one.
fn check_controller_versions(topo: &TwoServersAndClient, a: f64, b: f64, step: &str) {
    let version = |ns: &Netns| status(ns)?["controllerProtocolVersion"].as_f64();
    let ok = wait_for(UP, || (version(&topo.a)? == a && version(&topo.b)? == b).then_some(()));
    assert!(
        ok.is_some(),
        "{step}: the agents do not report node API versions {a} and {b}: a {:?}, b {:?}",
        version(&topo.a),
        version(&topo.b)
    );
}

/// The longest gap between two answers within [from, to).
fn longest_gap(answers: &[(Instant, String)], from: Instant, to: Instant) -> Duration {
    let times: Vec<Instant> = answers.iter().map(|(at, _)| *at).filter(|at| *at >= from && *at < to).collect();
    times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(Duration::ZERO)
}

#[test]
fn a_rolling_upgrade_from_the_previous_protocol_version_has_only_the_switchover_outage() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // Dropped after the network, which kills what the agents left in the namespaces.
    let _attached = AttachDirCleanup(dir.path().join("attach"));
    std::fs::create_dir_all(dir.path().join("attach")).unwrap();
    let topo = TwoServersAndClient::build().unwrap();
    let controller = Controller::start(&topo.client, C0, dir.path(), &manifest(dir.path()));
    let mut homes = Vec::new();
    for (node, ns) in [("a", &topo.a), ("b", &topo.b)] {
        let home = dir.path().join(node);
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("agent.yaml"), unenrolled_config(&home)).unwrap();
        enroll(ns, &controller, node, &home);
        homes.push(home);
    }
    let mut a = agent("a", &homes[0], true);
    let mut b = agent("b", &homes[1], true);
    // Both at once: a new volume is UpToDate only once both replicas have met. Then a,
    // first by name, takes the service.
    a.start(&topo.a);
    b.start(&topo.b);
    let up = wait_for(UP, || (role(&topo.a, GROUP)? == "Primary" && ask(&topo)? == "a").then_some(()));
    assert!(up.is_some(), "a does not serve:\n{}", describe(&topo));
    check_pair(&topo, "a", 1.0, "both old");
    check_controller_versions(&topo, 1.0, 1.0, "both old");

    let client = ClientLoop::start(&topo.client);
    let started = Instant::now();

    // 1. Upgrade the standby.
    b.kill();
    let mut b = agent("b", &homes[1], false);
    b.start(&topo.b);
    check_pair(&topo, "a", 1.0, "b upgraded");
    check_controller_versions(&topo, 1.0, 2.0, "b upgraded");
    let standby_upgraded = Instant::now();

    // 2. Switch over to it.
    let out = controller.kubectl(&topo.client, &["switchover", GROUP, "--to", "b", "--timeout", "30s"]);
    assert!(
        out.status.success(),
        "switchover to b: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    check_pair(&topo, "b", 1.0, "switched over");
    let switched = Instant::now();

    // 3. Upgrade the other node, now standby; the pair moves to version 2.
    a.kill();
    let mut a = agent("a", &homes[0], false);
    a.start(&topo.a);
    check_pair(&topo, "b", 2.0, "a upgraded");
    check_controller_versions(&topo, 2.0, 2.0, "a upgraded");
    std::thread::sleep(Duration::from_millis(500));
    let finished = Instant::now();
    let answers = client.finish();
    drop((a, b));

    let before = longest_gap(&answers, started, standby_upgraded);
    let during = longest_gap(&answers, standby_upgraded, switched);
    let after = longest_gap(&answers, switched, finished);
    println!(
        "client: {} answers; longest gap: {:.0} ms while the standby was upgraded, {:.0} ms around the switchover, {:.0} ms while the other node was upgraded",
        answers.len(),
        ms(before),
        ms(during),
        ms(after)
    );
    assert!(before < MAX_GAP && after < MAX_GAP, "an outage outside the switchover");
    // Restarting a standby must not disturb the primary at all: gaps there are the
    // client's own pace (every 5 ms) plus scheduling, not an outage.
    let outage = Duration::from_millis(500);
    assert!(before < outage, "upgrading the standby b interrupted the service for {:.0} ms", ms(before));
    assert!(after < outage, "upgrading the standby a interrupted the service for {:.0} ms", ms(after));
    assert!(answers.iter().any(|(at, who)| *at < standby_upgraded && who == "a"));
    assert!(answers.iter().any(|(at, who)| *at > switched && who == "b"));
    drop(controller);
}
