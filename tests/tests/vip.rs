//! Virtual IPs on real interfaces in network namespaces: add/remove, foreign addresses,
//! and neighbours following a moved address through GARP / unsolicited NA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use hapair_agent::flow::systemd::Systemctl;
use hapair_agent::flow::{FlowRunner, Outcome};
use hapair_agent::vip::{AddOutcome, Presence, RemoveOutcome, ResolvedVip, VipManager};
use hapair_crds::hagroup::GarpSpec;
use hapair_crds::nodeapi::GroupKey;
use hapair_tests::netns::{Address, Netns, wait_for};
use hapair_tests::topology::{C0, C0_V6, TwoServersAndClient};

fn vip(address: &str, prefix_len: u8, count: u32) -> ResolvedVip {
    ResolvedVip {
        name: "web".into(),
        address: address.parse().unwrap(),
        prefix_len,
        device: "eth0".into(),
        garp: GarpSpec {
            count,
            interval: hapair_crds::duration::Duration::from_millis(50),
            refresh: hapair_crds::duration::Duration::ZERO,
        },
    }
}

fn has_address(ns: &Netns, address: &str) -> bool {
    ns.ip(&["-o", "addr", "show", "dev", "eth0"])
        .unwrap()
        .split_whitespace()
        .any(|w| w.split('/').next() == Some(address))
}

fn take_over(ns: &Netns, v: &ResolvedVip) -> AddOutcome {
    let v = v.clone();
    ns.block_on(|| async move { VipManager::new().unwrap().take_over(&v).await.unwrap() })
}

fn remove(ns: &Netns, v: &ResolvedVip) -> RemoveOutcome {
    let v = v.clone();
    ns.block_on(|| async move { VipManager::new().unwrap().remove(&v).await.unwrap() })
}

#[test]
fn ipv4_and_ipv6_addresses_are_added_and_removed() {
    let topo = TwoServersAndClient::build().unwrap();
    for (address, prefix) in [("198.18.0.100", 24), ("2001:db8::100", 64)] {
        let v = vip(address, prefix, 1);
        assert_eq!(take_over(&topo.a, &v), AddOutcome::Added);
        assert!(has_address(&topo.a, address), "{address} missing after add");
        let flags = topo.a.ip(&["-o", "addr", "show", "dev", "eth0"]).unwrap();
        let line = flags.lines().find(|l| l.contains(&format!("{address}/"))).unwrap_or_default().to_string();
        // iproute2 6.1 does not print IFA_PROTO; a fresh manager reads it from the kernel.
        let presence = {
            let v = v.clone();
            topo.a.block_on(|| async move { VipManager::new().unwrap().presence(&v).await.unwrap() })
        };
        assert_eq!(presence, Presence::Ours, "not marked as hapair's: {line}");
        if address.contains(':') {
            assert!(!line.contains("tentative"), "IPv6 VIP must be usable at once: {line}");
        }
        assert_eq!(take_over(&topo.a, &v), AddOutcome::AlreadyOurs, "a second takeover is idempotent");
        // A new manager (as after an agent restart) still recognises the address as ours.
        assert_eq!(remove(&topo.a, &v), RemoveOutcome::Removed);
        assert!(!has_address(&topo.a, address), "{address} still present after removal");
        assert_eq!(remove(&topo.a, &v), RemoveOutcome::Absent);
    }
}

#[test]
fn a_foreign_address_is_reported_and_survives_removal() {
    let topo = TwoServersAndClient::build().unwrap();
    let _theirs = Address::new(&topo.a, "eth0", "198.18.0.200/24").unwrap();
    let v = vip("198.18.0.200", 24, 1);
    assert_eq!(take_over(&topo.a, &v), AddOutcome::Foreign);
    let presence = {
        let v = v.clone();
        topo.a.block_on(|| async move { VipManager::new().unwrap().presence(&v).await.unwrap() })
    };
    assert_eq!(presence, Presence::Foreign);
    assert_eq!(remove(&topo.a, &v), RemoveOutcome::Foreign);
    assert!(has_address(&topo.a, "198.18.0.200"), "the foreign address was deleted");
}

fn neighbour_mac(client: &Netns, address: &str) -> Option<String> {
    let text = client.ip(&["neigh", "show", address, "dev", "eth0"]).ok()?;
    text.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(str::to_string)
}

fn ping(client: &Netns, address: &str) -> bool {
    client.exec(&["ping", "-c", "1", "-W", "2", address]).map(|o| o.status.success()).unwrap_or(false)
}

/// The client learns the VIP at A's MAC, the VIP moves to B, and B's announcements alone
/// (no flush on the client) repoint the client's neighbour entry.
fn neighbours_follow_the_move(address: &str, prefix_len: u8) {
    let topo = TwoServersAndClient::build().unwrap();
    let (mac_a, mac_b) = (topo.a.mac("eth0").unwrap(), topo.b.mac("eth0").unwrap());
    let v = vip(address, prefix_len, 3);
    assert_eq!(take_over(&topo.a, &v), AddOutcome::Added);
    assert!(
        wait_for(Duration::from_secs(5), || ping(&topo.client, address).then_some(())).is_some(),
        "client cannot reach the VIP on A"
    );
    assert_eq!(neighbour_mac(&topo.client, address).as_deref(), Some(mac_a.as_str()), "client learnt A's MAC");

    assert_eq!(remove(&topo.a, &v), RemoveOutcome::Removed);
    assert_eq!(take_over(&topo.b, &v), AddOutcome::Added);
    let moved = wait_for(Duration::from_secs(5), || neighbour_mac(&topo.client, address).filter(|m| *m == mac_b));
    assert!(moved.is_some(), "client still has {:?} for {address}, B is {mac_b}", neighbour_mac(&topo.client, address));
    assert!(ping(&topo.client, address), "client cannot reach the VIP on B");
    // The answer really came from B: A no longer has the address.
    assert!(!has_address(&topo.a, address));
    let _ = (C0, C0_V6);
}

#[test]
fn gratuitous_arp_moves_the_clients_neighbour_entry() {
    neighbours_follow_the_move("198.18.0.100", 24);
}

#[test]
fn unsolicited_neighbour_advertisement_moves_the_clients_neighbour_entry() {
    neighbours_follow_the_move("2001:db8::100", 64);
}

#[test]
fn periodic_refresh_runs_until_removal() {
    let topo = TwoServersAndClient::build().unwrap();
    let mut v = vip("198.18.0.100", 24, 1);
    v.garp.refresh = hapair_crds::duration::Duration::from_millis(100);
    topo.a.block_on(|| async move {
        let manager = VipManager::new().unwrap();
        manager.take_over(&v).await.unwrap();
        assert!(manager.refreshing("web"));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(manager.refreshing("web"), "refresh task died");
        assert_eq!(manager.remove(&v).await.unwrap(), RemoveOutcome::Removed);
        assert!(!manager.refreshing("web"));
    });
}

#[test]
fn a_virtual_ip_flow_step_starts_checks_and_stops() {
    let topo = TwoServersAndClient::build().unwrap();
    let spec: hapair_crds::hagroup::HaGroupSpec = serde_json::from_value(serde_json::json!({
        "nodes": [
            {"name": "a", "heartbeatAddresses": ["198.18.1.1"], "interfaces": {"public": "eth0"}},
            {"name": "b", "heartbeatAddresses": ["198.18.1.2"]}
        ],
        "virtualIPs": [{"name": "web", "address": "198.18.0.100/24", "interface": "public", "garp": {"count": 1}}],
        "flow": [{"name": "ip", "virtualIP": {"name": "web"}}]
    }))
    .unwrap();
    let outcomes = topo.a.block_on(|| async move {
        let manager = Arc::new(VipManager::new().unwrap());
        let runner =
            FlowRunner::new(GroupKey::new("db", "pg"), &spec, "a", Some(manager), Systemctl::default()).unwrap();
        let started = runner.start_step(0).await;
        let checked = runner.check_step(0).await;
        let stopped = runner.stop_step(0).await;
        let checked_after = runner.check_step(0).await;
        (started, checked, stopped, checked_after)
    });
    assert!(outcomes.0.is_ok(), "{:?}", outcomes.0);
    assert!(outcomes.1.as_ref().is_some_and(Outcome::is_ok), "{:?}", outcomes.1);
    assert!(outcomes.2.is_ok(), "{:?}", outcomes.2);
    assert!(
        matches!(outcomes.3, Some(Outcome::Failed { ref reason, .. }) if reason.ends_with("is missing")),
        "{:?}",
        outcomes.3
    );
    assert!(!has_address(&topo.a, "198.18.0.100"));
}
