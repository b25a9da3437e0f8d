//! The NBD export of a replicated volume, exercised with real clients (`nbdinfo`,
//! `qemu-io`, `nbdcopy`) and with deliberately invalid requests, on a pair of replica
//! processes in two network namespaces. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hapair_tests::nbd_client::{self, NbdClient};
use hapair_tests::replica_proc::{ReplicaPair, VolumeSpec};
use rand::{RngCore, SeedableRng};

const HARNESS: &str = env!("CARGO_BIN_EXE_replica-harness");
const SIZE: u64 = 64 << 20;

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .arg("120")
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_file(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn real_clients_read_write_flush_trim_and_the_peer_has_every_byte() {
    let mut pair = ReplicaPair::start(HARNESS, &VolumeSpec::default());
    pair.a.promote(1).unwrap();
    pair.b.wait("peer is primary", Duration::from_secs(10), |s| s["peerRole"] == "Primary");
    let sock = pair.volume.socket("a");

    let info: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &uri(&sock)])).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], SIZE, "{info:#}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(export[flag], true, "{flag} in {info:#}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_minimum"], 512);
    assert_eq!(export["block_size_preferred"], 4096);

    let patterns = [
        "write -P 0xab 0 1M",
        "write -f -P 0xcd 1M 64k",
        "flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 64k",
        "write -z 2M 128k",
        "read -P 0 2M 128k",
        "write -P 0x5a 3M 64k",
        "discard 3M 64k",
        "read -P 0 3M 64k",
        "aio_write -P 0x11 4M 64k",
        "aio_write -P 0x22 5M 64k",
        "aio_flush",
        "read -P 0x11 4M 64k",
        "read -P 0x22 5M 64k",
        "write -P 0x33 7M 512",
        "read -P 0x33 7M 512",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for p in &patterns {
        args.extend(["-c", p]);
    }
    let u = uri(&sock);
    args.push(&u);
    let out = ok("qemu-io", &args);
    assert!(!out.contains("fail") && !out.contains("error"), "qemu-io reported a problem:\n{out}");

    // nbdcopy: an image in, the export out again (multi-connection, flushed at the end).
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let mut data = vec![0u8; SIZE as usize];
    rand_chacha::ChaCha8Rng::seed_from_u64(1).fill_bytes(&mut data[8 << 20..24 << 20]);
    data[40 << 20..41 << 20].fill(0x77);
    std::fs::write(&src, &data).unwrap();
    ok("nbdcopy", &[src.to_str().unwrap(), &uri(&sock)]);
    ok("nbdcopy", &[&uri(&sock), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data, "what nbdcopy read back differs from what it wrote");

    // The secondary has every byte, on its own disk.
    assert!(read_file(&pair.volume.backing("b"), 0, SIZE as usize) == data, "the peer's backing differs");
    let s = pair.a.status();
    assert_eq!((s["outOfSyncBytes"].as_u64(), s["peerDisk"].as_str()), (Some(0), Some("UpToDate")));
}

#[test]
fn the_secondary_refuses_writes_and_invalid_requests_get_error_replies() {
    let mut pair = ReplicaPair::start(HARNESS, &VolumeSpec::default());
    pair.a.promote(1).unwrap();
    pair.b.wait("peer is primary", Duration::from_secs(10), |s| s["peerRole"] == "Primary");

    // The secondary serves reads, refuses writes, and stays up.
    let sb = pair.volume.socket("b");
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri(&sb)]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() || text.contains("Operation not permitted") || text.contains("read-only"), "{text}");
    let info: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &uri(&sb)])).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    let mut c = NbdClient::connect(&sb, false).unwrap();
    assert_eq!(nbd_client::errno(&c.request(nbd_client::CMD_WRITE, 0, 0, 512, &[0; 512])), Some(nbd_client::EPERM));
    assert_eq!(c.read(0, 4096).unwrap().len(), 4096);

    // On the primary: each invalid request gets the protocol's error and the next works.
    let sa = pair.volume.socket("a");
    let mut c = NbdClient::connect(&sa, true).unwrap();
    assert_eq!(c.size, SIZE);
    assert_eq!(nbd_client::errno(&c.request(42, 0, 0, 512, &[])), Some(nbd_client::EINVAL), "unknown command");
    assert_eq!(nbd_client::errno(&c.read(SIZE, 512)), Some(nbd_client::EINVAL), "read past the end");
    assert_eq!(
        nbd_client::errno(&c.request(nbd_client::CMD_WRITE, 0, SIZE - 512, 1024, &[0; 1024])),
        Some(nbd_client::ENOSPC),
        "write past the end"
    );
    assert_eq!(
        nbd_client::errno(&c.read(100, 512)),
        Some(nbd_client::EINVAL),
        "misaligned for a client that asked for block sizes"
    );
    assert_eq!(nbd_client::errno(&c.request(nbd_client::CMD_FLUSH, 0, 4096, 0, &[])), Some(nbd_client::EINVAL));
    c.write(8192, &[0x42; 4096], true).unwrap();
    assert_eq!(c.read(8192, 4096).unwrap(), vec![0x42; 4096]);

    // A request with a bad magic ends that connection only.
    let mut bad = NbdClient::connect(&sa, false).unwrap();
    bad.send_raw(&[0u8; 28]).unwrap();
    assert!(bad.closed_within(Duration::from_secs(5)));
    assert_eq!(c.read(8192, 4096).unwrap(), vec![0x42; 4096], "other clients carry on");
    let mut again = NbdClient::connect(&sa, false).unwrap();
    assert_eq!(again.read(8192, 512).unwrap(), vec![0x42; 512]);
    again.disconnect();
    assert!(NbdClient::connect(&sa, false).is_ok(), "the server keeps accepting");
}
