//! Online verify finds a single corrupted block on the secondary, marks it out of sync,
//! and the primary resyncs it. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use hapair_tests::nbd_client::NbdClient;
use hapair_tests::replica_proc::{ReplicaPair, VolumeSpec, in_sync};
use rand::{RngCore, SeedableRng};

const HARNESS: &str = env!("CARGO_BIN_EXE_replica-harness");

fn block_of(path: &std::path::Path, b: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, b * 4096).unwrap();
    buf
}

#[test]
fn verify_finds_an_injected_single_block_corruption() {
    let mut pair = ReplicaPair::start(HARNESS, &VolumeSpec { size: "32Mi".into(), ..VolumeSpec::default() });
    pair.a.promote(1).unwrap();
    let mut data = vec![0u8; 8 << 20];
    rand_chacha::ChaCha8Rng::seed_from_u64(3).fill_bytes(&mut data);
    let mut c = NbdClient::connect(&pair.volume.socket("a"), true).unwrap();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        c.write((i as u64) << 20, chunk, false).unwrap();
    }
    c.flush().unwrap();
    pair.b.wait("replication", Duration::from_secs(10), in_sync);

    // Silent corruption of one block on the secondary's disk.
    let bad = 1234u64;
    let f = std::fs::OpenOptions::new().write(true).open(pair.volume.backing("b")).unwrap();
    f.write_all_at(b"bit rot!", bad * 4096 + 100).unwrap();
    drop(f);
    assert_ne!(block_of(&pair.volume.backing("a"), bad), block_of(&pair.volume.backing("b"), bad));

    pair.a.verify().unwrap();
    let s = pair.a.wait("verify", Duration::from_secs(60), |s| s["counters"]["verifiesCompleted"] == 1);
    assert_eq!(s["lastVerifyMismatches"], serde_json::json!([[bad * 4096, 4096]]), "{s:#}");
    // The primary resyncs what verify marked.
    pair.a.wait("repair", Duration::from_secs(30), in_sync);
    pair.b.wait("repair", Duration::from_secs(30), in_sync);
    assert_eq!(block_of(&pair.volume.backing("a"), bad), block_of(&pair.volume.backing("b"), bad));
    pair.a.verify().unwrap();
    let s = pair.a.wait("second verify", Duration::from_secs(60), |s| s["counters"]["verifiesCompleted"] == 2);
    assert_eq!(s["lastVerifyMismatches"], serde_json::json!([]), "{s:#}");
}
