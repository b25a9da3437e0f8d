//! The paths an operator takes in an emergency, end to end: `kubectl-hapair` talks to a
//! real standalone controller, which relays the action to two real enrolled agents in
//! network namespaces, which act on a real protocol C volume, a real service and a real
//! virtual IP. Also the monitors whose action is not an alert (a gateway monitor that
//! fails the service over, a process monitor that restarts its step in place), a whole
//! failover on an IPv6 virtual IP, a volume resize that is refused up front, and an online
//! verify that finds a corrupted block on the standby and has it repaired.
//!
//! Heartbeats run at 100 ms with deadAfter 1.5 s; every wait is bounded by
//! [`hapair_tests::enrolled_pair::UP`] and is a condition, never a timed assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hapair_tests::agents::GROUP;
use hapair_tests::enrolled_pair::{EnrolledPair, GATEWAY, PairOptions, UP};
use hapair_tests::nbd_client::NbdClient;
use hapair_tests::netns::{require_root, wait_for};

const BLOCK: u64 = 4096;

/// Writes `fill` into each of `blocks` through `node`'s export, then flushes: acknowledged
/// and durable on every replica connected at the time.
fn write_blocks(p: &EnrolledPair, node: &str, blocks: &[u64], fill: u8) {
    let mut c = NbdClient::connect(&p.nbd_socket(node), true)
        .unwrap_or_else(|e| panic!("connecting to {node}'s export: {e}\n{}", p.describe()));
    for &b in blocks {
        c.write(b * BLOCK, &[fill; BLOCK as usize], false)
            .unwrap_or_else(|e| panic!("writing block {b} on {node}: {e}"));
    }
    c.flush().unwrap_or_else(|e| panic!("flushing {node}'s export: {e}"));
    c.disconnect();
}

/// Block `b` as `node`'s export serves it.
fn read_block(p: &EnrolledPair, node: &str, b: u64) -> Vec<u8> {
    let mut c = NbdClient::connect(&p.nbd_socket(node), true).unwrap();
    let data = c.read(b * BLOCK, BLOCK as u32).unwrap();
    c.disconnect();
    data
}

/// Block `b` as it lies in `node`'s backing file (the data area starts at offset 0).
fn backing_block(p: &EnrolledPair, node: &str, b: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p.backing(node)).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    f.read_exact_at(&mut buf, b * BLOCK).unwrap();
    buf
}

fn with_volume(witness: &'static str) -> PairOptions {
    PairOptions { witness, volume: true, ..PairOptions::default() }
}

/// Holds for `hold`, failing if `node` ever serves or takes the VIP meanwhile.
fn stays_out(p: &EnrolledPair, node: &str, hold: Duration, why: &str) {
    let end = Instant::now() + hold;
    while Instant::now() < end {
        assert_ne!(p.role(node).as_deref(), Some("Primary"), "{node} promoted {why}:\n{}", p.describe());
        assert!(!p.has_vip(node), "{node} took the VIP {why}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_split_brain_resolved_from_the_cli_keeps_the_winners_data_and_records_the_losers() {
    require_root();
    let p = EnrolledPair::start(with_volume("none"));
    let before = [0u64, 1, 2, 3];
    write_blocks(&p, "a", &before, 0x11);

    // A full partition in two-node mode: b promotes on heartbeat loss alone, and both
    // sides write to their own replica.
    p.cut_heartbeats(true);
    let both = wait_for(UP, || {
        (p.role("b")? == "Primary" && p.volume("b")?["role"] == "Primary" && p.role("a")? == "Primary").then_some(())
    });
    assert!(both.is_some(), "the partition did not make both primary:\n{}", p.describe());
    let (a_blocks, b_blocks) = ([1u64, 10, 11, 12], [2u64, 20, 21, 22, 23]);
    write_blocks(&p, "a", &a_blocks, 0xa0);
    write_blocks(&p, "b", &b_blocks, 0xb0);
    p.cut_heartbeats(false);

    // On reconnection the replicas find two histories and, under `manual`, wait.
    let detected = wait_for(UP, || {
        (p.volume("a")?["connection"] == "SplitBrain" && p.volume("b")?["connection"] == "SplitBrain").then_some(())
    });
    assert!(detected.is_some(), "the split brain was not detected:\n{}", p.describe());
    let shown = wait_for(UP, || {
        let status = p.hapair(&["status"]);
        status.contains("SplitBrain").then_some(status)
    });
    let shown = shown.unwrap_or_else(|| panic!("`status` does not show the split brain: {}", p.hapair(&["status"])));
    println!("split brain detected; kubectl-hapair status:\n{shown}");
    let refused = p.hapair_output(&["resolve-split-brain", GROUP, "--winner", "a"]);
    assert!(!refused.status.success(), "resolve-split-brain without --yes went ahead");

    let out = p.hapair(&["resolve-split-brain", GROUP, "--winner", "a", "--yes", "--timeout", "60s"]);
    println!("resolve-split-brain: {}", out.trim());
    p.wait_pair("a");
    let synced = wait_for(UP, || {
        let (va, vb) = (p.volume("a")?, p.volume("b")?);
        (va["outOfSyncBytes"] == 0 && vb["diskState"] == "UpToDate" && vb["connection"] == "Connected").then_some(())
    });
    assert!(synced.is_some(), "the pair is not in sync after the resolution:\n{}", p.describe());

    // The winner's data everywhere; the loser's divergent blocks are gone from both.
    let zero = vec![0u8; BLOCK as usize];
    for b in before.iter().chain(&a_blocks).chain(&b_blocks) {
        let want = if a_blocks.contains(b) {
            vec![0xa0; BLOCK as usize]
        } else if before.contains(b) {
            vec![0x11; BLOCK as usize]
        } else {
            zero.clone()
        };
        assert_eq!(read_block(&p, "a", *b), want, "block {b} on the winner's export");
        assert_eq!(backing_block(&p, "b", *b), want, "block {b} on the loser's disk after the resync");
    }
    // The loser recorded what it discarded, as an event and in its log.
    let events = p.events("b");
    assert!(events.contains("SplitBrainDiscarded"), "b's events do not record the discard: {events}");
    let log = std::fs::read_to_string(p.agents[1].log_path()).unwrap();
    assert!(log.contains("split brain resolved") && log.contains("ranges"), "b's log does not record the discard");
}

#[test]
fn force_active_hands_the_service_over_by_peer_consent_while_the_witness_is_down() {
    require_root();
    // A slow service shutdown keeps the handover going long after the action arrived, so
    // the witness is provably gone before b may act.
    let mut p = EnrolledPair::start(PairOptions { stop_delay: Duration::from_secs(3), ..with_volume("controller") });
    let blocks = [5u64, 6, 7];
    write_blocks(&p, "a", &blocks, 0x5a);
    let epoch = p.epoch("a").unwrap();

    let config = p.controller.admin_config_path();
    let exe = hapair_tests::agents::binary("kubectl-hapair");
    let cli = std::thread::spawn({
        let mut cmd = p.topo.client.command(exe);
        cmd.args(["force-active", GROUP, "b", "--yes", "--timeout", "60s"]).env("HAPAIR_CONFIG", config);
        move || cmd.output().unwrap()
    });
    let demoting = wait_for(UP, || (p.role("a")? != "Primary").then_some(()));
    assert!(demoting.is_some(), "a did not start handing over:\n{}", p.describe());
    p.controller.kill();
    assert_ne!(p.role("b").as_deref(), Some("Primary"), "b served before the witness went down");
    let _ = cli.join();

    p.wait_pair("b");
    assert!(p.epoch("b").unwrap() > epoch);
    let events = p.events("b");
    assert!(events.contains("ForceActive"), "b's events do not say it was forced: {events}");
    assert!(events.contains("peer consent"), "b did not act on the peer's consent: {events}");
    for b in blocks {
        assert_eq!(read_block(&p, "b", b), vec![0x5a; BLOCK as usize], "block {b} on the new primary");
    }
    // The witness returns to a pair that does not need it.
    p.controller.restart(&p.topo.client);
    std::thread::sleep(Duration::from_secs(1));
    p.wait_pair("b");
}

#[test]
fn maintenance_on_freezes_failover_and_off_lets_the_standby_take_over() {
    require_root();
    let mut p = EnrolledPair::start(PairOptions::default());
    p.hapair(&["maintenance", GROUP, "on"]);
    let frozen = wait_for(UP, || {
        let d = p.hapair(&["describe", GROUP]);
        d.lines().any(|l| l.trim_start().starts_with("Maintenance ") && l.contains("True")).then_some(d)
    });
    assert!(frozen.is_some(), "describe does not show maintenance: {}", p.hapair(&["describe", GROUP]));
    let noted = wait_for(UP, || p.events("b").contains("maintenance on").then_some(()));
    assert!(noted.is_some(), "b did not hear of the maintenance: {}", p.events("b"));

    p.power_off("a");
    let why = wait_for(UP, || {
        let g = p.report("b")?;
        (g["peerReachable"] == false && g["roleReason"].as_str()?.contains("maintenance")).then_some(())
    });
    assert!(why.is_some(), "b does not say maintenance holds it back:\n{}", p.describe());
    let (_, dead_after, _) = p.options.timing;
    stays_out(&p, "b", dead_after * 3, "during maintenance");

    p.hapair(&["maintenance", GROUP, "off"]);
    p.wait_serving("b");
    let d = p.hapair(&["describe", GROUP]);
    assert!(
        d.lines().any(|l| l.trim_start().starts_with("Maintenance ") && l.contains("False")),
        "maintenance still shown after off: {d}"
    );
}

#[test]
fn a_gateway_monitor_with_action_failover_moves_the_service_off_a_node_that_lost_its_gateway() {
    require_root();
    let monitors = serde_json::json!([{
        "name": "gw",
        "gateway": {"address": GATEWAY, "timeout": "300ms"},
        "action": "failover",
        "interval": "200ms",
        "failureThreshold": 3,
    }]);
    let p = EnrolledPair::start(PairOptions { gateway: true, monitors, ..PairOptions::default() });
    let healthy = wait_for(UP, || {
        let m = p.report("a")?["monitors"].as_array()?.iter().find(|m| m["name"] == "gw").cloned()?;
        (m["healthy"] == true).then_some(())
    });
    assert!(healthy.is_some(), "the gateway monitor is not healthy on a:\n{}", p.describe());
    let epoch = p.epoch("a").unwrap();

    // a alone loses its gateway; everything else (the peer, the controller) stays reachable.
    let route = format!("{GATEWAY}/32");
    p.ns("a").ip(&["route", "add", "blackhole", &route]).unwrap();
    let started = Instant::now();
    p.wait_serving("b");
    println!("gateway lost on a: b serves {:.0} ms later", started.elapsed().as_secs_f64() * 1e3);
    assert!(p.epoch("b").unwrap() > epoch);
    let events = p.events("a");
    assert!(events.contains("monitor gw failed"), "a's events do not name the monitor: {events}");
    p.ns("a").ip(&["route", "del", "blackhole", &route]).unwrap();
    p.wait_pair("b");
}

#[test]
fn a_process_monitor_with_action_restart_restarts_the_step_in_place() {
    require_root();
    // Only one node runs the service at a time and both see every process (the namespaces
    // share one pid namespace), so a's pid file is what the monitor watches on both.
    let monitors = serde_json::json!([{
        "name": "svc",
        "process": {"pidFile": "{dir}/a-service.pid"},
        "action": "restart",
        "restartStep": "service",
        "interval": "200ms",
        "failureThreshold": 2,
    }]);
    let p = EnrolledPair::start(PairOptions { monitors, ..PairOptions::default() });
    let watching = wait_for(UP, || {
        let m = p.report("a")?["monitors"].as_array()?.iter().find(|m| m["name"] == "svc").cloned()?;
        (m["healthy"] == true).then_some(())
    });
    assert!(watching.is_some(), "the process monitor does not run on a:\n{}", p.describe());
    let (epoch, old) = (p.epoch("a").unwrap(), p.service_pid("a").unwrap());

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGKILL).unwrap();
    let restarted = wait_for(UP, || p.service_pid("a").filter(|pid| *pid != old));
    assert!(restarted.is_some(), "the service was not restarted on a:\n{}", p.describe());
    p.wait_serving("a");
    assert_eq!(p.epoch("a"), Some(epoch), "a restart in place is not a failover");
    assert_eq!(p.role("b").as_deref(), Some("Standby"));
    let recorded = wait_for(UP, || {
        let events = p.events("a");
        (events.contains("StepRestarted") && events.contains("monitor svc")).then_some(())
    });
    assert!(recorded.is_some(), "a's events do not record the restart: {}", p.events("a"));
}

#[test]
fn a_full_failover_on_an_ipv6_virtual_ip() {
    require_root();
    let mut p = EnrolledPair::start(PairOptions { ipv6: true, ..PairOptions::default() });
    assert!(p.options.vip().is_ipv6());
    let epoch = p.epoch("b").unwrap();
    // kill -9 of everything on a; its links stay up, so its stale VIP stays on the wire
    // and the client must follow b's unsolicited neighbour advertisements.
    let started = Instant::now();
    let left = p.ns("a").kill_processes(Duration::from_secs(5)).unwrap();
    assert!(left.is_empty(), "{left:?}");
    p.agent("a").kill();
    p.wait_serving("b");
    println!("IPv6 VIP: b answers the client {:.0} ms after a was killed", started.elapsed().as_secs_f64() * 1e3);
    assert!(p.epoch("b").unwrap() > epoch);
    // a comes back as the standby and clears the address it left behind.
    p.agents[0].start(&p.topo.a);
    p.wait_pair("b");
}

#[test]
fn a_resize_edit_is_refused_up_front_and_the_volume_runs_on_at_its_size_across_an_agent_restart() {
    require_root();
    let mut p = EnrolledPair::start(with_volume("controller"));
    write_blocks(&p, "a", &[0, 1], 0x5a);
    let revision =
        |p: &EnrolledPair, node: &str| hapair_tests::agents::status(p.ns(node)).map(|s| s["configRevision"].clone());
    let before = (revision(&p, "a"), revision(&p, "b"));
    let path = p.controller.manifests.join("web.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    let shrunk = good.replace("\"16Mi\"", "\"8Mi\"");
    assert_ne!(shrunk, good, "the manifest has no 16Mi volume to shrink");
    hapair_tests::agents::write_file(&path, &shrunk);

    let reported = wait_for(UP, || {
        let out = p.hapair_output(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("spec.size").then_some(text)
    });
    let text = reported.unwrap_or_else(|| panic!("`status` does not report the shrink: {}", p.hapair(&["status"])));
    println!("kubectl-hapair status:\n{text}");
    let line = text.lines().find(|l| l.contains("spec.size")).unwrap();
    for part in ["default/web", "ReplicatedVolume default/data", "8Mi", "is smaller than the volume's 16Mi"] {
        assert!(line.contains(part), "the error does not name {part:?}: {line}");
    }

    // Nothing reached the nodes, and a restarted agent opens its replica at the size it has.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!((revision(&p, "a"), revision(&p, "b")), before, "a refused edit changed the nodes' config");
    p.restart_agent("b");
    p.wait_pair("a");
    assert_eq!(read_block(&p, "a", 1), vec![0x5a; BLOCK as usize]);
    assert_eq!(backing_block(&p, "b", 1), vec![0x5a; BLOCK as usize], "the standby resynced at its size");

    // Put back, the error is gone.
    hapair_tests::agents::write_file(&path, &good);
    let cleared = wait_for(UP, || {
        let out = p.hapair_output(&["status"]);
        (!String::from_utf8_lossy(&out.stdout).contains("spec.size")).then_some(())
    });
    assert!(cleared.is_some(), "the error stays after the edit is undone: {}", p.hapair(&["status"]));
}

/// What `describe -o json` shows of `node`'s last verify of the volume.
fn last_verify(p: &EnrolledPair, node: &str) -> Option<serde_json::Value> {
    let view: serde_json::Value = serde_json::from_str(&p.hapair(&["describe", GROUP, "-o", "json"])).ok()?;
    let volume = view["volumes"].as_array()?.iter().find(|v| v["name"] == "data")?.clone();
    let replica = volume["status"]["nodes"].as_array()?.iter().find(|n| n["node"] == node)?.clone();
    Some(replica["lastVerify"].clone()).filter(|v| !v.is_null())
}

#[test]
fn a_verify_from_the_cli_finds_a_block_corrupted_on_the_standby_and_the_resync_repairs_it() {
    require_root();
    let p = EnrolledPair::start(with_volume("controller"));
    write_blocks(&p, "a", &[3, 4, 5], 0x5a);
    let good = vec![0x5a; BLOCK as usize];
    assert_eq!(backing_block(&p, "b", 4), good, "protocol C acknowledged a write the standby does not hold");
    // Rot on the standby's disk, behind the replica's back: nothing marks it out of sync.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(p.backing("b")).unwrap();
        f.write_all_at(&[0xff; 512], 4 * BLOCK + 1024).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(p.volume("a").unwrap()["outOfSyncBytes"], 0, "{}", p.describe());

    let out = p.hapair(&["volume", "verify", "default/data"]);
    println!("kubectl-hapair volume verify default/data:\n{out}");
    assert!(out.contains("verify of volume data") && out.contains("Succeeded"), "{out}");
    let found = wait_for(UP, || last_verify(&p, "a"));
    let found = found.unwrap_or_else(|| panic!("no verify in the volume's status: {}", p.describe()));
    println!("lastVerify on a: {found}");
    assert_eq!(found["mismatchedBytes"], BLOCK, "{found}");
    assert_eq!(found["mismatchedRanges"], serde_json::json!([format!("{}+{BLOCK}", 4 * BLOCK)]), "{found}");
    assert_eq!(found["checkedBytes"], 16 << 20, "the whole volume is checked: {found}");
    assert!(found["finished"].as_str().is_some_and(|t| t.ends_with('Z')), "{found}");
    assert_eq!(last_verify(&p, "b"), None, "the standby ran a verify of its own");
    let events = p.events("a");
    assert!(events.contains("VerifyMismatch") && events.contains(&format!("{}+{BLOCK}", 4 * BLOCK)), "{events}");

    // The primary resyncs what differs from itself, and only that.
    let repaired = wait_for(UP, || (backing_block(&p, "b", 4) == good).then_some(()));
    assert!(repaired.is_some(), "the corrupted block was not repaired: {}", p.describe());
    assert_eq!(backing_block(&p, "b", 5), good);
    assert_eq!(read_block(&p, "a", 4), good, "the primary's copy changed");
    let synced = wait_for(UP, || (p.volume("a")?["outOfSyncBytes"] == 0).then_some(()));
    assert!(synced.is_some(), "the pair stays out of sync: {}", p.describe());

    // A volume no group uses is refused before anything is queued, naming it.
    let refused = p.hapair_output(&["volume", "verify", "default/logs"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a verify of an unknown volume was accepted");
    assert!(stderr.contains("no HaGroup uses a ReplicatedVolume default/logs"), "{stderr}");
}
