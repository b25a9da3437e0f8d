//! Two replicas in one process, replicating over loopback TCP (plain and TLS): the driver
//! end to end, without namespaces. The multi-host scenarios live in the tests crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hapair_agent::nbd::export::BlockExport;
use hapair_agent::replication::replica::{Replica, ReplicaOptions, Timing};
use hapair_agent::replication::tls::TlsMaterial;
use hapair_crds::nodeapi::VolumeConfig;
use hapair_crds::volume::{ConnectionState, DiskState, ReplicatedVolumeSpec, VolumeRole};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn volume(dir: &Path, tls: bool) -> VolumeConfig {
    let spec: ReplicatedVolumeSpec = serde_json::from_value(serde_json::json!({
        "group": "g",
        "size": "32Mi",
        "backing": [
            {"node": "a", "path": dir.join("a.img").to_str().unwrap()},
            {"node": "b", "path": dir.join("b.img").to_str().unwrap()},
        ],
        "tls": {"enabled": tls},
        "activityLogExtents": 7,
    }))
    .unwrap();
    VolumeConfig { name: "vol".into(), uuid: "6f1c2d3e-4a5b-4c6d-8e7f-001122334455".into(), generation: 1, spec }
}

fn opts(dir: &Path, node: &str, listen: SocketAddr, tls: Option<TlsMaterial>) -> ReplicaOptions {
    let mut o = ReplicaOptions::new(dir.join(format!("{node}.sock")));
    o.listen = Some(listen);
    o.peer = Some(listen);
    o.tls = tls;
    o.seed = Some(if node == "a" { 1 } else { 2 });
    o.timing = Timing { ping_timeout: Duration::from_secs(2), ..Timing::default() };
    o
}

async fn pair(dir: &Path, tls: Option<(TlsMaterial, TlsMaterial)>) -> (Replica, Replica, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let vol = volume(dir, tls.is_some());
    let (ta, tb) = match tls {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    // "a" sorts first and dials; "b" listens on `addr`.
    let b = Replica::open(&vol, "b", opts(dir, "b", addr, tb)).await.unwrap();
    let a = Replica::open(&vol, "a", opts(dir, "a", addr, ta)).await.unwrap();
    (a, b, addr)
}

async fn wait(r: &Replica, what: &str, cond: impl Fn(&hapair_agent::replication::status::ReplicaStatus) -> bool) {
    if let Err(s) = r.wait_for(Duration::from_secs(20), cond).await {
        panic!("{what}: timed out in {s:#?}");
    }
}

fn read_backing(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

async fn replicate_and_check(dir: &Path, a: &Replica, b: &Replica) {
    for r in [a, b] {
        wait(r, "initial connection", |s| s.connection == ConnectionState::Connected && s.disk == DiskState::UpToDate)
            .await;
    }
    a.promote(1, false).await.unwrap();
    wait(b, "peer role", |s| s.peer_role == Some(VolumeRole::Primary)).await;
    let err = b.promote(1, false).await.unwrap_err();
    assert!(err.to_string().contains("peer a is primary"), "{err}");
    let export = a.export();
    let data: Vec<u8> = (0..(1 << 20) + 4096).map(|i| (i % 251) as u8).collect();
    export.write((4 << 20) - 4096, Bytes::from(data.clone()), false).await.unwrap();
    export.flush().await.unwrap();
    assert_eq!(export.read((4 << 20) - 4096, data.len() as u32).await.unwrap(), data);
    assert_eq!(read_backing(&dir.join("b.img"), (4 << 20) - 4096, data.len()), data, "replicated to b");
    let sb = b.export();
    assert!(sb.write(0, Bytes::from_static(&[1; 512]), false).await.is_err(), "the secondary refuses writes");
    assert_eq!(a.status().out_of_sync_bytes, 0);
    assert!(a.report().peer_disk_state == Some(DiskState::UpToDate));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_replicates_over_tcp_and_resyncs_after_the_peer_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, addr) = pair(dir.path(), None).await;
    replicate_and_check(dir.path(), &a, &b).await;

    // The peer goes away; writes continue degraded and are tracked.
    b.shutdown().await.unwrap();
    wait(&a, "peer loss", |s| s.connection == ConnectionState::Connecting).await;
    let export = a.export();
    export.write(8 << 20, Bytes::from(vec![0xee; 65536]), true).await.unwrap();
    wait(&a, "tracking", |s| s.out_of_sync_bytes == 65536 && s.generations.bitmap != 0).await;

    // It comes back and is resynced with just the changed blocks.
    let sent_before = a.status().wire_sent_bytes;
    drop(b);
    let b = Replica::open(&volume(dir.path(), false), "b", opts(dir.path(), "b", addr, None)).await.unwrap();
    for r in [&a, &b] {
        wait(r, "resync", |s| {
            s.connection == ConnectionState::Connected && s.disk == DiskState::UpToDate && s.out_of_sync_bytes == 0
        })
        .await;
    }
    assert_eq!(read_backing(&dir.path().join("b.img"), 8 << 20, 65536), vec![0xee; 65536]);
    let resent = a.status().wire_sent_bytes - sent_before;
    assert!((65536..65536 + 16384).contains(&resent), "resent {resent} bytes for 64 KiB of changes");
    assert_eq!(a.status().generations, b.status().generations);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_replicates_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let node = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &issuer).unwrap();
        TlsMaterial::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), ca.pem().as_bytes()).unwrap()
    };
    let (a, b, _) = pair(dir.path(), Some((node("a"), node("b")))).await;
    replicate_and_check(dir.path(), &a, &b).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(b.status().role, VolumeRole::Secondary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_oversized_frames_close_the_connection_and_the_replica_carries_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let vol = volume(dir.path(), false);
    let b = Replica::open(&vol, "b", opts(dir.path(), "b", addr, None)).await.unwrap();
    let attacks: [&[u8]; 3] = [
        // A header claiming a 4 GiB payload.
        &[0x48, 0x50, 0x52, 0x31, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff],
        // Wrong magic.
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        // A well-formed ping before any hello.
        &[0x48, 0x50, 0x52, 0x31, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
    ];
    for attack in attacks {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(attack).await.unwrap();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "the replica kept a connection open after {attack:?}");
    }
    assert_eq!(b.status().role, VolumeRole::Secondary);
    // A genuine peer still gets in.
    let a = Replica::open(&vol, "a", opts(dir.path(), "a", addr, None)).await.unwrap();
    for r in [&a, &b] {
        wait(r, "connection after the attacks", |s| s.connection == ConnectionState::Connected).await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
