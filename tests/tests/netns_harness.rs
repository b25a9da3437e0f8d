//! The namespace harness cleans up after itself, also when a test panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use hapair_tests::netns::{ChildGuard, Netns, Veth, run, unique_name};
use hapair_tests::topology::TwoServersAndClient;

#[test]
fn names_are_unique_and_fit_an_interface_name() {
    let a = unique_name("link");
    let b = unique_name("link");
    assert_ne!(a, b);
    assert!(a.len() <= 15, "{a}");
    assert!(unique_name("toolongtag").len() <= 15);
}

#[test]
fn everything_is_removed_after_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let topo = TwoServersAndClient::build().unwrap();
        let sleeper: ChildGuard = topo.a.spawn(&["sleep", "300"]).unwrap();
        tx.send((topo.namespace_names(), sleeper.id())).unwrap();
        panic!("test failure inside a topology");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let (names, pid) = rx.recv().unwrap();
    assert_eq!(names.len(), 4);
    for name in &names {
        assert!(!Netns::exists(name), "namespace {name} survived the panic");
    }
    let listed = String::from_utf8_lossy(&run("ip", &["netns", "list"]).unwrap().stdout).into_owned();
    assert!(names.iter().all(|n| !listed.contains(n.as_str())), "{listed}");
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        .unwrap_or(false);
    assert!(!alive, "process {pid} spawned in the namespace survived");
}

#[test]
fn a_veth_guard_removes_its_pair() {
    let a = Netns::new("va").unwrap();
    let b = Netns::new("vb").unwrap();
    {
        let _veth = Veth::new(&a, "x0", &b, "y0").unwrap();
        assert!(b.ip(&["link", "show", "y0"]).is_ok());
    }
    assert!(a.ip(&["link", "show", "x0"]).is_err());
    assert!(b.ip(&["link", "show", "y0"]).is_err(), "deleting one end removes the peer");
}

#[test]
fn code_runs_inside_the_namespace() {
    let ns = Netns::new("in").unwrap();
    let peer = Netns::new("ip").unwrap();
    let name = unique_name("dev");
    let _veth = Veth::new(&ns, &name, &peer, "eth0").unwrap();
    let found = ns.block_on(|| async {
        let netlink = hapair_agent::iface::Netlink::connect().unwrap();
        netlink.interface(&name).await.map(|i| i.name)
    });
    assert_eq!(found.ok().as_deref(), Some(name.as_str()));
    let outside = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let netlink = hapair_agent::iface::Netlink::connect().unwrap();
        netlink.interface(&name).await.is_ok()
    });
    assert!(!outside, "the device must not be visible outside the namespace");
}
