//! The agent's controller source for real: a `hapair-operator standalone` process in the
//! client's namespace (198.18.0.10), two `hapair-agent run --config` processes started
//! before they are enrolled, enrolled with `hapair-agent enroll`, taking their bundles from
//! the controller, reporting to it, failing over through its witness, and running on
//! their cached bundles once it is killed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use hapair_operator::controller::views::GroupsOverview;
use hapair_tests::agents::{Agent, GROUP, get, group, group_manifest, role, status};
use hapair_tests::controller::{Controller, enroll, unenrolled_config};
use hapair_tests::netns::{Netns, require_root, wait_for};
use hapair_tests::topology::{C0, TwoServersAndClient};

const UP: Duration = Duration::from_secs(30);

/// The HaGroup the bundles' group is made from, as a manifest.
fn manifest(flow_log: &Path) -> String {
    let flow = format!(
        "      flow:\n        - name: app\n          exec:\n            start: 'echo \"$HAPAIR_NODE start\" >> {log}'\n            stop: 'echo \"$HAPAIR_NODE stop\" >> {log}'\n",
        log = flow_log.display()
    );
    group_manifest("controller", &flow)
}

fn report_role(overview: &GroupsOverview, node: &str) -> Option<String> {
    let view = overview.groups.iter().find(|g| g.key.to_string() == GROUP)?;
    let detail = view.node_details.iter().find(|d| d.node == node)?;
    Some(detail.report.as_ref()?.role.as_str().to_string())
}

fn has_vip(ns: &Netns) -> bool {
    ns.ip(&["-o", "addr", "show", "dev", "eth0"]).unwrap_or_default().contains(" 198.18.0.100/")
}

fn epoch(ns: &Netns) -> Option<u64> {
    group(&status(ns)?, GROUP)?["epoch"].as_u64()
}

#[test]
fn agents_take_their_config_from_the_controller_report_and_outlive_it() {
    require_root();
    let topo = TwoServersAndClient::build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let flow_log = dir.join("flow.log");
    let mut controller = Controller::start(&topo.client, C0, dir, &manifest(&flow_log));

    // Started before enrollment: up, answering /healthz, saying why it does nothing.
    let mut agents = Vec::new();
    for (node, ns) in [("a", &topo.a), ("b", &topo.b)] {
        let home = dir.join(node);
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("agent.yaml"), unenrolled_config(&home)).unwrap();
        let mut agent = Agent::with_config(node, &home);
        agent.start(ns);
        agents.push(agent);
    }
    for ns in [&topo.a, &topo.b] {
        let waiting = wait_for(UP, || {
            let s = status(ns)?;
            (get(ns, "/healthz")?.0 == 200 && s["configError"].as_str()?.contains("not enrolled")).then_some(())
        });
        assert!(waiting.is_some(), "an unenrolled agent does not say so: {:?}", status(ns));
    }

    for (node, ns) in [("a", &topo.a), ("b", &topo.b)] {
        enroll(ns, &controller, node, &dir.join(node));
    }
    // The agents notice the enrollment, fetch their bundles and form the pair.
    let pair = wait_for(UP, || match (role(&topo.a, GROUP)?.as_str(), role(&topo.b, GROUP)?.as_str()) {
        ("Primary", "Standby") => Some(()),
        _ => None,
    });
    assert!(pair.is_some(), "no pair: a {:?}\nb {:?}", status(&topo.a), status(&topo.b));
    assert!(agents.iter_mut().all(Agent::running));
    // Their reports reach the controller's group status.
    let reported = wait_for(UP, || {
        let o = controller.overview(&topo.client)?;
        (report_role(&o, "a")? == "Primary" && report_role(&o, "b")? == "Standby").then_some(o)
    });
    let overview =
        reported.unwrap_or_else(|| panic!("reports not in the controller: {:?}", controller.overview(&topo.client)));
    let view = overview.groups.iter().find(|g| g.key.to_string() == GROUP).unwrap();
    assert!(view.node_details.iter().all(|d| d.applied_revision == Some(d.desired_revision)), "{view:?}");

    // a loses both links (and with them the witness): it fences itself, and b takes over
    // once the witness grants it the lease.
    let before = epoch(&topo.b).unwrap();
    topo.a.ip(&["link", "set", "eth0", "down"]).unwrap();
    topo.a.ip(&["link", "set", "eth1", "down"]).unwrap();
    let took_over = wait_for(UP, || (role(&topo.b, GROUP)? == "Primary" && has_vip(&topo.b)).then_some(()));
    assert!(took_over.is_some(), "b did not take over: {:?}", status(&topo.b));
    assert!(epoch(&topo.b).unwrap() > before);
    assert!(!has_vip(&topo.a), "a kept the VIP without a lease");
    let b_events = group(&status(&topo.b).unwrap(), GROUP).unwrap()["events"].to_string();
    assert!(b_events.contains("(witness grant)"), "b did not act through the witness: {b_events}");
    topo.a.ip(&["link", "set", "eth0", "up"]).unwrap();
    topo.a.ip(&["link", "set", "eth1", "up"]).unwrap();
    assert!(
        wait_for(UP, || (role(&topo.a, GROUP)? == "Standby").then_some(())).is_some(),
        "a did not come back as standby: {:?}",
        status(&topo.a)
    );

    // The controller goes away: nothing changes for the pair, and b restarted meanwhile
    // runs its cached bundle and keeps serving.
    controller.kill();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(role(&topo.b, GROUP).as_deref(), Some("Primary"));
    assert_eq!(role(&topo.a, GROUP).as_deref(), Some("Standby"));
    agents[1].kill();
    agents[1].start(&topo.b);
    let back = wait_for(UP, || {
        let s = status(&topo.b)?;
        (s["configRevision"].as_u64().is_some() && group(&s, GROUP)?["role"] == "Primary").then_some(())
    });
    assert!(back.is_some(), "b did not come back on its cached bundle: {:?}", status(&topo.b));
    assert!(has_vip(&topo.b));
    let log = agents[1].log_tail(400);
    assert!(log.contains("running the cached desired config"), "{log}");
}
