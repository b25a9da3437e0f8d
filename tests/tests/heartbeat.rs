//! Heartbeats between two namespaces on two links: genuine ones are accepted, crafted bad
//! ones are dropped and counted by reason, and a dead link is noticed on its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::time::{Duration, Instant};

use hapair_agent::heartbeat::envelope::{Header, seal};
use hapair_agent::heartbeat::{
    DropReason, GroupId, HeartbeatReceiver, HeartbeatSender, HmacKey, LinkEndpoints, NodeId, TransportConfig,
    from_sockets,
};
use hapair_crds::nodeapi::GroupKey;
use hapair_tests::netns::Netns;
use hapair_tests::topology::{A0, A1, B0, B1, C0, TwoServersAndClient};

const PORT: u16 = 7405;
const INCARNATION: u64 = 100;
const EPOCH: u64 = 5;

fn key(byte: u8) -> HmacKey {
    HmacKey::from_bytes(vec![byte; 32], "test").unwrap()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

fn bind_in(ns: &Netns, at: SocketAddr) -> StdUdpSocket {
    ns.run(move || {
        let s = StdUdpSocket::bind(at).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    })
}

struct Pair {
    a_tx: HeartbeatSender,
    _a_rx: HeartbeatReceiver,
    _b_tx: HeartbeatSender,
    b_rx: HeartbeatReceiver,
}

/// Both nodes' transports; the sockets are bound inside the namespaces, then driven from
/// the test's runtime.
fn pair(topo: &TwoServersAndClient) -> Pair {
    let a_links = [
        LinkEndpoints { index: 0, local: addr(A0, PORT), peer: addr(B0, PORT) },
        LinkEndpoints { index: 1, local: addr(A1, PORT), peer: addr(B1, PORT) },
    ];
    let b_links = a_links.map(|l| LinkEndpoints { index: l.index, local: l.peer, peer: l.local });
    let config = |me: &str, peer: &str| TransportConfig {
        group: GroupKey::new("db", "pg"),
        local_node: me.into(),
        peer_node: peer.into(),
        incarnation: INCARNATION,
        interval: Duration::from_millis(50),
        loss_window: Duration::from_millis(500),
        key: key(1),
    };
    let sockets = |ns: &Netns, links: &[LinkEndpoints]| {
        links.iter().map(|l| (*l, tokio::net::UdpSocket::from_std(bind_in(ns, l.local)).unwrap())).collect::<Vec<_>>()
    };
    let (a_tx, a_rx) = from_sockets(config("a", "b"), sockets(&topo.a, &a_links));
    let (b_tx, b_rx) = from_sockets(config("b", "a"), sockets(&topo.b, &b_links));
    Pair { a_tx, _a_rx: a_rx, _b_tx: b_tx, b_rx }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn header(link: u8, sequence: u64, epoch: u64) -> Header {
    Header {
        link,
        group: GroupId::of(&GroupKey::new("db", "pg")),
        sender: NodeId::of("a"),
        incarnation: INCARNATION,
        sequence,
        epoch,
    }
}

#[test]
fn bad_heartbeats_are_dropped_and_counted_by_reason() {
    let topo = TwoServersAndClient::build().unwrap();
    let rt = runtime();
    let _guard = rt.enter();
    let mut p = pair(&topo);
    rt.block_on(async {
        // Genuine traffic first: sequences 1..=3 on both links.
        for _ in 0..3 {
            assert!(p.a_tx.send(EPOCH, b"state").await.unwrap().is_empty());
        }
        for _ in 0..6 {
            let hb = tokio::time::timeout(Duration::from_secs(5), p.b_rx.recv(EPOCH)).await.unwrap().unwrap();
            assert_eq!((hb.header.sender, hb.payload.as_slice()), (NodeId::of("a"), &b"state"[..]));
        }
        assert_eq!(p.b_rx.drops().total(), 0);
    });

    // An attacker on A's address (other port) and one on the client crafts datagrams.
    let from_a = bind_in(&topo.a, addr(A0, 0));
    let from_client = bind_in(&topo.client, addr(C0, 0));
    let target = addr(B0, PORT);
    let send = |socket: &StdUdpSocket, bytes: &[u8]| {
        socket.send_to(bytes, target).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    };
    let genuine = seal(&key(1), &header(0, 1000, EPOCH), b"state").unwrap();
    send(&from_a, &seal(&key(1), &header(0, 1, EPOCH), b"state").unwrap()); // replay of sequence 1
    send(&from_a, &seal(&key(2), &header(0, 1001, EPOCH), b"state").unwrap()); // wrong key
    let mut tampered = genuine.clone();
    let last_payload_byte = tampered.len() - 33;
    tampered[last_payload_byte] ^= 1;
    send(&from_a, &tampered); // forged: payload changed after signing
    let mut other_group = header(0, 1002, EPOCH);
    other_group.group = GroupId::of(&GroupKey::new("db", "other"));
    send(&from_a, &seal(&key(1), &other_group, b"state").unwrap());
    send(&from_a, &genuine[..30]); // truncated
    send(&from_a, &seal(&key(1), &header(0, 1003, EPOCH - 1), b"state").unwrap()); // stale epoch
    send(&from_client, &seal(&key(1), &header(0, 1004, EPOCH), b"state").unwrap()); // not the peer's address
    send(&from_a, b"definitely not a heartbeat, just some bytes that are long enough to parse......");
    // A genuine sentinel: once it is through, everything sent before it has been judged.
    send(&from_a, &genuine);
    rt.block_on(async {
        let hb = tokio::time::timeout(Duration::from_secs(5), p.b_rx.recv(EPOCH)).await.unwrap().unwrap();
        assert_eq!(hb.header.sequence, 1000);
    });
    let drops = p.b_rx.drops();
    let expected = [
        (DropReason::Replayed, 1),
        (DropReason::Forged, 2),
        (DropReason::WrongGroup, 1),
        (DropReason::Truncated, 1),
        (DropReason::StaleEpoch, 1),
        (DropReason::UnknownSender, 1),
        (DropReason::BadMagic, 1),
    ];
    for (reason, n) in expected {
        assert_eq!(drops.get(reason), n, "{reason:?}: {drops:?}");
    }
    assert_eq!(drops.total(), 8);

    // And the metrics see the same counts.
    let metrics = hapair_agent::metrics::AgentMetrics::new();
    metrics.record_heartbeat_drops("db/pg", drops);
    assert!(metrics.encode().contains("hapair_agent_heartbeat_dropped_total{group=\"db/pg\",reason=\"forged\"} 2"));
}

#[test]
fn losing_one_link_is_detected_on_that_link_only() {
    let topo = TwoServersAndClient::build().unwrap();
    let rt = runtime();
    let _guard = rt.enter();
    let Pair { a_tx, _a_rx, _b_tx, mut b_rx } = pair(&topo);
    let sender = rt.spawn(async move {
        loop {
            let _ = a_tx.send(EPOCH, b"state").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let dead_after = Duration::from_millis(300);
    let mut receive_for = |how_long: Duration| {
        rt.block_on(async {
            let until = Instant::now() + how_long;
            while let Ok(Ok(_)) =
                tokio::time::timeout(until.saturating_duration_since(Instant::now()), b_rx.recv(EPOCH)).await
            {
            }
        });
        b_rx.link_reports(Instant::now(), dead_after)
    };
    let before = receive_for(Duration::from_millis(800));
    assert!(before.iter().all(|l| l.up), "{before:?}");
    assert!(before.iter().all(|l| l.loss_percent < 50), "{before:?}");

    topo.a.ip(&["link", "set", "eth1", "down"]).unwrap();
    let after = receive_for(Duration::from_millis(1000));
    assert!(after[0].up && after[0].loss_percent < 50, "link 0 must stay healthy: {after:?}");
    assert!(!after[1].up, "link 1 must be down: {after:?}");
    assert!(after[1].loss_percent >= 90, "link 1 must show the loss: {after:?}");
    assert_eq!(after[1].local_address, format!("{B1}:{PORT}"));
    sender.abort();
}
