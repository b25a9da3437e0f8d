//! Standalone controllers replicated on a real etcd: three etcd members and three
//! `hapair-operator standalone --etcd` controllers, each in its own namespace on the LAN
//! of a real pair of agents enrolled against all three.
//!
//! - The leading controller and the primary die at the same moment: the standby is
//!   promoted through a surviving controller within deadAfter + leaseTTL + one controller
//!   failover; the failover time is printed next to a failover with every controller up.
//! - A controller restart (all of them) keeps every group's epoch and event history.
//! - A leader cut off from etcd stops leading and serving the witness; the pair fails over
//!   through the new leader.
//! - Without an etcd quorum nobody leads: the standby is not promoted, says why, and is
//!   promoted once the quorum is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hapair_tests::agents::{Agent, GROUP, group, group_manifest, role, status};
use hapair_tests::controller::{Controller, enroll_with, unenrolled_config};
use hapair_tests::etcd::EtcdCluster;
use hapair_tests::netns::{Netns, require_root, wait_for};
use hapair_tests::topology::TwoServersAndClient;

const UP: Duration = Duration::from_secs(40);
/// The test group's timing (agents' `TIMING`) and the controllers' leader lease.
const DEAD_AFTER: Duration = Duration::from_secs(2);
const LEASE_TTL: Duration = Duration::from_millis(1500);
const LEADER_TTL: Duration = Duration::from_secs(2);
const ETCD: [&str; 3] = ["198.18.0.31", "198.18.0.32", "198.18.0.33"];
const CONTROLLERS: [&str; 3] = ["198.18.0.21", "198.18.0.22", "198.18.0.23"];

struct Setup {
    agents: Vec<Agent>,
    controllers: Vec<Controller>,
    etcd: EtcdCluster,
    topo: TwoServersAndClient,
    _tmp: tempfile::TempDir,
}

impl Setup {
    fn etcd_host(&self, i: usize) -> &Netns {
        &self.topo.extra[i]
    }

    fn controller_host(&self, i: usize) -> &Netns {
        &self.topo.extra[3 + i]
    }

    /// The index of the controller named in the leader key.
    fn leader(&self) -> Option<usize> {
        let value = self.etcd.get(self.etcd_host(0), "/hapair/leader")?;
        let record: serde_json::Value = serde_json::from_str(&value).ok()?;
        let id = record["id"].as_str()?;
        (0..3).find(|i| format!("c{i}") == id)
    }

    /// The index of a controller whose admin API answers (only the leader does).
    fn serving(&self) -> Option<usize> {
        (0..3).find(|&i| self.controllers[i].overview(self.controller_host(i)).is_some())
    }

    fn node(&self, i: usize) -> &Netns {
        if i == 0 { &self.topo.a } else { &self.topo.b }
    }

    /// The node is gone: off both links, its agent killed.
    fn kill_node(&mut self, i: usize) {
        for link in ["eth0", "eth1"] {
            self.node(i).ip(&["link", "set", link, "down"]).unwrap();
        }
        self.agents[i].kill();
    }

    fn revive_node(&mut self, i: usize) {
        for link in ["eth0", "eth1"] {
            self.node(i).ip(&["link", "set", link, "up"]).unwrap();
        }
        let ns = if i == 0 { &self.topo.a } else { &self.topo.b };
        self.agents[i].start(ns);
        let back = wait_for(UP, || (role(ns, GROUP)? == "Standby").then_some(()));
        assert!(back.is_some(), "node {i} did not come back as standby: {:?}", status(ns));
    }
}

fn has_vip(ns: &Netns) -> bool {
    ns.ip(&["-o", "addr", "show", "dev", "eth0"]).unwrap_or_default().contains(" 198.18.0.100/")
}

fn epoch(ns: &Netns) -> Option<u64> {
    group(&status(ns)?, GROUP)?["epoch"].as_u64()
}

/// Three etcd members, three controllers, and the pair enrolled against all three with
/// `a` primary.
fn setup() -> Setup {
    require_root();
    let mut topo = TwoServersAndClient::build().unwrap();
    for (i, ip) in ETCD.iter().enumerate() {
        topo.add_host(&format!("e{i}"), ip).unwrap();
    }
    for (i, ip) in CONTROLLERS.iter().enumerate() {
        topo.add_host(&format!("k{i}"), ip).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let hosts: Vec<(&Netns, &str)> = (0..3).map(|i| (&topo.extra[i], ETCD[i])).collect();
    let etcd = EtcdCluster::start(&hosts, &dir);
    let urls: Vec<String> = CONTROLLERS.iter().map(|ip| format!("https://{ip}:7443")).collect();
    let manifest = group_manifest("controller", "");
    let controllers: Vec<Controller> = (0..3)
        .map(|i| {
            let ns = &topo.extra[3 + i];
            Controller::start_on_etcd(ns, CONTROLLERS[i], &dir, &manifest, &etcd.endpoints(), &format!("c{i}"), &urls)
        })
        .collect();
    let mut agents = Vec::new();
    for (node, ns) in [("a", &topo.a), ("b", &topo.b)] {
        let home = dir.join(node);
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("agent.yaml"), unenrolled_config(&home)).unwrap();
        enroll_with(ns, &controllers[0], &urls, node, &home);
        let written = std::fs::read_to_string(home.join("agent.yaml")).unwrap();
        assert!(
            urls.iter().all(|u| written.contains(u.as_str())),
            "enrollment did not record every controller:\n{written}"
        );
        let mut agent = Agent::with_config(node, &home);
        // Start a first, so that it is the primary.
        agent.start(ns);
        if node == "a" {
            assert!(wait_for(UP, || (role(ns, GROUP)? == "Primary").then_some(())).is_some(), "{:?}", status(ns));
        }
        agents.push(agent);
    }
    let setup = Setup { agents, controllers, etcd, topo, _tmp: tmp };
    let pair = wait_for(UP, || match (role(&setup.topo.a, GROUP)?.as_str(), role(&setup.topo.b, GROUP)?.as_str()) {
        ("Primary", "Standby") => Some(()),
        _ => None,
    });
    assert!(pair.is_some(), "no pair: a {:?}\nb {:?}", status(&setup.topo.a), status(&setup.topo.b));
    setup
}

/// How long until node `to` serves (primary with the VIP) after `from` was killed.
fn time_failover(s: &mut Setup, from: usize, to: usize, also: impl FnOnce(&mut Setup)) -> Duration {
    let start = Instant::now();
    also(s);
    s.kill_node(from);
    let target = s.node(to);
    let served = wait_for(UP, || (role(target, GROUP)? == "Primary" && has_vip(target)).then_some(Instant::now()));
    let at = served.unwrap_or_else(|| panic!("node {to} was not promoted: {:?}", status(target)));
    at - start
}

#[test]
fn the_standby_is_promoted_through_a_surviving_controller_and_restarts_keep_history() {
    let mut s = setup();
    let leader = wait_for(UP, || s.leader()).expect("no controller leads");

    // The leading controller and the primary die together.
    let with_controller = time_failover(&mut s, 0, 1, |s| s.controllers[leader].kill());
    let b_events = group(&status(&s.topo.b).unwrap(), GROUP).unwrap()["events"].to_string();
    assert!(b_events.contains("(witness grant)"), "b did not act through the witness: {b_events}");
    let successor = s.leader().expect("nobody leads after the leader died");
    assert_ne!(successor, leader);
    // deadAfter + the lease + one controller failover (the leader lease running out, and
    // the new term starting), with room for two busy cores.
    let bound = DEAD_AFTER + LEASE_TTL + LEADER_TTL + Duration::from_secs(3);
    assert!(with_controller <= bound, "failover took {with_controller:?}, over {bound:?}");

    // The same failover with every surviving controller up, for comparison.
    s.controllers[leader].restart(&s.topo.extra[3 + leader]);
    s.revive_node(0);
    let single = time_failover(&mut s, 1, 0, |_| {});
    println!(
        "failover (witness mode, HaGroup with deadAfter 2s and leaseTTL 1.5s, dev build, one kill each): \
         {:.0} ms with the leading controller killed at the same moment (leader lease 2 s), \
         {:.0} ms with the controllers up",
        with_controller.as_secs_f64() * 1000.0,
        single.as_secs_f64() * 1000.0
    );
    s.revive_node(1);

    // Every controller restarts: epochs and the event history are read back from etcd.
    let epoch_before = epoch(&s.topo.a).unwrap();
    let serving = wait_for(UP, || s.serving()).expect("no controller serves");
    let history_before = {
        let overview = s.controllers[serving].overview(s.controller_host(serving)).unwrap();
        let view = overview.groups.into_iter().find(|g| g.key.to_string() == GROUP).unwrap();
        assert!(view.status.epoch >= epoch_before, "{:?}", view.status);
        serde_json::to_value(&view).unwrap()["events"].as_array().cloned().unwrap_or_default()
    };
    assert!(!history_before.is_empty(), "no events recorded before the restart");
    for i in 0..3 {
        s.controllers[i].stop();
    }
    for i in 0..3 {
        s.controllers[i].restart(&s.topo.extra[3 + i]);
    }
    let overview = wait_for(UP, || s.serving().and_then(|i| s.controllers[i].overview(s.controller_host(i))))
        .expect("no controller serves after the restart");
    let view = overview.groups.into_iter().find(|g| g.key.to_string() == GROUP).unwrap();
    assert!(view.status.epoch >= epoch_before, "epoch went back: {:?}", view.status);
    let history_after = serde_json::to_value(&view).unwrap()["events"].as_array().cloned().unwrap_or_default();
    for event in &history_before {
        assert!(history_after.contains(event), "event lost across the restart: {event}\nafter: {history_after:?}");
    }
}

#[test]
fn a_controller_cut_off_from_etcd_or_without_quorum_grants_nothing() {
    let mut s = setup();
    let leader = wait_for(UP, || s.leader()).expect("no controller leads");

    // The leader loses etcd (packets dropped, connections hang) but not the agents.
    for ip in ETCD {
        s.controller_host(leader).ip(&["route", "add", "blackhole", &format!("{ip}/32")]).unwrap();
    }
    let moved = wait_for(UP, || s.leader().filter(|l| *l != leader));
    assert!(moved.is_some(), "no other controller took the lead");
    let stepped_down =
        wait_for(UP, || s.controllers[leader].overview(s.controller_host(leader)).is_none().then_some(()));
    assert!(stepped_down.is_some(), "the controller cut off from etcd still serves the admin API");
    let failed_over = time_failover(&mut s, 0, 1, |_| {});
    println!("failover with the former leader cut off from etcd: {:.0} ms", failed_over.as_secs_f64() * 1000.0);
    let log = std::fs::read_to_string(&s.controllers[leader].log).unwrap_or_default();
    let after_cut = log.split("lost the leadership").nth(1).expect("the cut-off leader never logged losing the lead");
    assert!(!after_cut.contains("Granted"), "the cut-off controller granted a lease after stepping down:\n{after_cut}");
    for ip in ETCD {
        s.controller_host(leader).ip(&["route", "del", "blackhole", &format!("{ip}/32")]).unwrap();
    }
    s.revive_node(0);

    // Two of three etcd members go: no quorum, nobody may lead, nobody is promoted.
    s.etcd.kill_member(1);
    s.etcd.kill_member(2);
    let nobody = wait_for(UP, || s.serving().is_none().then_some(()));
    assert!(nobody.is_some(), "a controller still serves without an etcd quorum");
    s.kill_node(1);
    std::thread::sleep(DEAD_AFTER + LEASE_TTL + Duration::from_secs(4));
    // Still waiting for the witness, holding nothing: not primary, no VIP.
    let waiting = role(&s.topo.a, GROUP);
    assert_ne!(waiting.as_deref(), Some("Primary"), "promoted without a witness: {:?}", status(&s.topo.a));
    assert!(!has_vip(&s.topo.a));
    let why = group(&status(&s.topo.a).unwrap(), GROUP).unwrap()["roleReason"].as_str().unwrap_or_default().to_string();
    assert!(why.starts_with("waiting for witness"), "the standby does not say it waits for the witness: {why}");

    // The quorum returns: a controller leads again and the standby is promoted.
    s.etcd.start_member(1, &s.topo.extra[1]);
    s.etcd.start_member(2, &s.topo.extra[2]);
    let promoted = wait_for(Duration::from_secs(60), || {
        (role(&s.topo.a, GROUP)? == "Primary" && has_vip(&s.topo.a)).then_some(())
    });
    assert!(promoted.is_some(), "not promoted after the quorum came back: {:?}", status(&s.topo.a));
}

#[test]
fn a_single_controllers_state_moves_into_etcd() {
    require_root();
    let mut topo = TwoServersAndClient::build().unwrap();
    topo.add_host("e0", ETCD[0]).unwrap();
    topo.add_host("k0", CONTROLLERS[0]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let etcd = EtcdCluster::start(&[(&topo.extra[0], ETCD[0])], dir);
    let manifest = group_manifest("controller", "");
    let mut single = Controller::start(&topo.client, hapair_tests::topology::C0, dir, &manifest);
    let listed = wait_for(UP, || {
        let overview = single.overview(&topo.client)?;
        overview.groups.into_iter().find(|g| g.key.to_string() == GROUP && g.status.phase.is_some())
    });
    let before = listed.expect("the single controller does not list the group with a status");
    // Issued by the single controller, redeemed after the move.
    let (token, fingerprint) = single.token("a");
    single.stop();

    let migrate = |prefix_args: &[&str]| {
        let state = single.state.display().to_string();
        let endpoints = etcd.endpoints();
        let mut args = vec![hapair_tests::agents::binary("hapair-operator").display().to_string(), "migrate".into()];
        args.extend(["--state", &state, "--to-etcd", &endpoints].map(String::from));
        args.extend(prefix_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        topo.extra[1].exec(&args).unwrap()
    };
    let moved = migrate(&[]);
    let said = String::from_utf8_lossy(&moved.stdout).into_owned();
    assert!(moved.status.success(), "migrate failed: {}", String::from_utf8_lossy(&moved.stderr));
    assert!(said.contains("migrated") && said.contains(&fingerprint), "{said}");
    let again = migrate(&[]);
    let refusal = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(!again.status.success() && refusal.contains("refusing to overwrite"), "a second migration: {refusal}");

    let url = format!("https://{}:7443", CONTROLLERS[0]);
    let on_etcd = Controller::start_on_etcd(
        &topo.extra[1],
        CONTROLLERS[0],
        dir,
        &manifest,
        &etcd.endpoints(),
        "c0",
        std::slice::from_ref(&url),
    );
    assert_eq!(on_etcd.admin.ca_pem, single.admin.ca_pem, "the CA did not move");
    let after = wait_for(UP, || {
        let overview = on_etcd.overview(&topo.extra[1])?;
        overview.groups.into_iter().find(|g| g.key.to_string() == GROUP)
    })
    .expect("the controller on etcd does not list the group");
    assert_eq!((after.status.epoch, &after.status.phase), (before.status.epoch, &before.status.phase));
    for event in &before.events {
        assert!(after.events.contains(event), "event lost in the move: {event:?}");
    }

    let home = dir.join("a");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("agent.yaml"), unenrolled_config(&home)).unwrap();
    let exe = hapair_tests::agents::binary("hapair-agent").display().to_string();
    let home_arg = home.display().to_string();
    let args = [
        exe.as_str(),
        "enroll",
        "--controller",
        &url,
        "--node",
        "a",
        "--token",
        &token,
        "--ca-fingerprint",
        &fingerprint,
        "--dir",
        &home_arg,
    ];
    let enrolled = topo.a.exec(&args).unwrap();
    assert!(
        enrolled.status.success(),
        "the migrated token was not accepted: {}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
}
