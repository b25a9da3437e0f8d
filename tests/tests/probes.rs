//! Each probe kind against real things: processes, a veth, a gateway namespace, procfs
//! load figures and a tmpfs mount.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hapair_agent::iface::Netlink;
use hapair_agent::probe::{MonitorState, Observation, Probe, ProcPaths, Transition};
use hapair_crds::hagroup::{MonitorAction, MonitorSpec, NodeSpec};
use hapair_tests::netns::{Mount, Netns, unique_name};
use hapair_tests::topology::{B0, TwoServersAndClient};

fn node() -> NodeSpec {
    serde_json::from_value(serde_json::json!({"name": "a", "heartbeatAddresses": ["198.18.1.1"]})).unwrap()
}

fn monitor(detector: serde_json::Value) -> MonitorSpec {
    let mut m = serde_json::json!({"name": "m", "action": "failover", "interval": "1s", "failureThreshold": 1});
    m.as_object_mut().unwrap().extend(detector.as_object().unwrap().clone());
    serde_json::from_value(m).unwrap()
}

fn probe(detector: serde_json::Value) -> Probe {
    Probe::from_spec(&monitor(detector), &node()).unwrap()
}

/// Observes inside `ns` (or the test's own namespace).
fn observe(ns: Option<&Netns>, probe: &mut Probe) -> Observation {
    let run = move || async move {
        let netlink = Netlink::connect().unwrap();
        probe.observe(&netlink, &ProcPaths::default(), Instant::now()).await
    };
    match ns {
        Some(ns) => ns.block_on(run),
        None => tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run()),
    }
}

#[test]
fn process_probes_by_name_and_pidfile() {
    // A copy of sleep under a unique name, so no other process on the machine matches.
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("slp");
    let program = dir.path().join(&name);
    std::fs::copy("/bin/sleep", &program).unwrap();
    let mut child = Command::new(&program).arg("300").stdin(Stdio::null()).spawn().unwrap();
    let pidfile = dir.path().join("pid");
    std::fs::write(&pidfile, format!("{}\n", child.id())).unwrap();

    let mut by_name = probe(serde_json::json!({"process": {"name": name}}));
    let mut by_pidfile = probe(serde_json::json!({"process": {"pidFile": pidfile.display().to_string()}}));
    // Bounded waits rather than one look: on a loaded machine the child may not have
    // finished exec (and taken its name) when spawn returns to us.
    let seen = |probe: &mut Probe| {
        hapair_tests::netns::wait_for(Duration::from_secs(5), || Some(observe(None, probe)).filter(|o| o.healthy))
    };
    assert!(seen(&mut by_name).is_some(), "{:?}", observe(None, &mut by_name));
    assert!(seen(&mut by_pidfile).is_some(), "{:?}", observe(None, &mut by_pidfile));

    child.kill().unwrap();
    // Not reaped yet: a zombie is not alive (the kill takes a moment to land).
    let zombie = hapair_tests::netns::wait_for(Duration::from_secs(5), || {
        Some(observe(None, &mut by_pidfile)).filter(|o| !o.healthy)
    });
    assert!(zombie.as_ref().is_some_and(|z| z.message.contains("zombie")), "{zombie:?}");
    assert!(!observe(None, &mut by_name).healthy);
    child.wait().unwrap();
    let gone = observe(None, &mut by_pidfile);
    assert!(!gone.healthy && gone.message.contains("is not running"), "{gone:?}");
    std::fs::write(&pidfile, "garbage").unwrap();
    assert!(!observe(None, &mut by_pidfile).healthy);
}

#[test]
fn link_probe_follows_the_operational_state() {
    let topo = TwoServersAndClient::build().unwrap();
    let mut link = probe(serde_json::json!({"link": {"interface": "eth1"}}));
    let up = observe(Some(&topo.a), &mut link);
    assert!(up.healthy, "{up:?}");
    // Taking the far end down leaves eth1 administratively up but without carrier.
    topo.switch.ip(&["link", "set", "a1", "down"]).unwrap();
    let down = observe(Some(&topo.a), &mut link);
    assert!(!down.healthy && down.message.starts_with("eth1 is "), "{down:?}");
    let mut missing = probe(serde_json::json!({"link": {"interface": "nosuchdev"}}));
    let m = observe(Some(&topo.a), &mut missing);
    assert!(!m.healthy && m.message.contains("does not exist"), "{m:?}");
}

#[test]
fn gateway_probes_by_icmp_and_arp() {
    let topo = TwoServersAndClient::build().unwrap();
    let mut icmp = probe(serde_json::json!({"gateway": {"address": B0, "timeout": "1s"}}));
    let mut arp =
        probe(serde_json::json!({"gateway": {"address": B0, "method": "arp", "interface": "eth0", "timeout": "1s"}}));
    let ok = observe(Some(&topo.a), &mut icmp);
    assert!(ok.healthy, "{ok:?}");
    let ok = observe(Some(&topo.a), &mut arp);
    assert!(ok.healthy, "{ok:?}");
    assert!(ok.message.contains(&topo.b.mac("eth0").unwrap()), "{ok:?}");

    topo.b.ip(&["link", "set", "eth0", "down"]).unwrap();
    let lost = observe(Some(&topo.a), &mut icmp);
    assert!(!lost.healthy && lost.message.contains("did not answer ICMP"), "{lost:?}");
    let lost = observe(Some(&topo.a), &mut arp);
    assert!(!lost.healthy && lost.message.contains("did not answer ARP"), "{lost:?}");
}

#[test]
fn memory_and_cpu_probes_read_procfs() {
    let mut low = probe(serde_json::json!({"memory": {"thresholdPercent": 1, "sustained": "0s"}}));
    let mut high = probe(serde_json::json!({"memory": {"thresholdPercent": 100, "sustained": "0s"}}));
    let fired = observe(None, &mut low);
    assert!(!fired.healthy && fired.message.starts_with("memory use"), "{fired:?}");
    assert!(observe(None, &mut high).healthy);

    // One core kept busy: the machine's CPU use is then well above 1%.
    let mut busy = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
    let mut cpu = probe(serde_json::json!({"cpu": {"thresholdPercent": 1, "sustained": "0s"}}));
    let mut relaxed = probe(serde_json::json!({"cpu": {"thresholdPercent": 100, "sustained": "0s"}}));
    assert!(observe(None, &mut cpu).message.contains("first CPU sample"));
    observe(None, &mut relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let hot = observe(None, &mut cpu);
    let calm = observe(None, &mut relaxed);
    busy.kill().unwrap();
    busy.wait().unwrap();
    assert!(!hot.healthy && hot.message.starts_with("CPU use"), "{hot:?}");
    assert!(calm.healthy, "{calm:?}");
}

#[test]
fn mount_probe_sees_presence_and_writability() {
    let mut mount = Mount::tmpfs().unwrap();
    let path = mount.path().display().to_string();
    let mut p = probe(serde_json::json!({"mount": {"path": path}}));
    let ok = observe(None, &mut p);
    assert!(ok.healthy && ok.message.ends_with("mounted and writable"), "{ok:?}");
    assert_eq!(std::fs::read_dir(mount.path()).unwrap().count(), 0, "the probe file was removed");

    mount.set_read_only(true).unwrap();
    let ro = observe(None, &mut p);
    assert!(!ro.healthy && ro.message.contains("not writable"), "{ro:?}");
    let mut presence_only = probe(serde_json::json!({"mount": {"path": path, "writable": false}}));
    assert!(observe(None, &mut presence_only).healthy);

    mount.unmount().unwrap();
    let gone = observe(None, &mut p);
    assert!(!gone.healthy && gone.message.ends_with("is not mounted"), "{gone:?}");
}

#[test]
fn a_failing_probe_fires_its_monitor_with_the_configured_action() {
    let spec = monitor(
        serde_json::json!({"process": {"name": unique_name("none")}, "action": "restart", "restartStep": "app"}),
    );
    let mut state = MonitorState::new(&spec);
    let mut p = Probe::from_spec(&spec, &node()).unwrap();
    let t = Instant::now();
    match state.observe(t, observe(None, &mut p)) {
        Some(Transition::Fired { action, restart_step, reason, .. }) => {
            assert_eq!(action, MonitorAction::Restart);
            assert_eq!(restart_step.as_deref(), Some("app"));
            assert!(reason.contains("no running process named"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
