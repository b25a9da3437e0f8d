//! Resync cost is proportional to the change: on a 4 GiB sparse volume, 64 MiB written
//! while disconnected costs at most 1.05 × 64 MiB plus metadata of replication traffic to
//! resync (counted on the replication socket itself), and after a primary crash only the
//! activity-log extents are resent. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use hapair_tests::nbd_client::NbdClient;
use hapair_tests::replica_proc::{ReplicaPair, VolumeSpec, in_sync};
use rand::{Rng, SeedableRng};

const HARNESS: &str = env!("CARGO_BIN_EXE_replica-harness");
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;
const EXTENT: u64 = 4 * MIB;
const AL_SLOTS: u64 = 7;
/// Hello, bitmap and acknowledgement frames: a generous allowance for "plus metadata".
const METADATA_ALLOWANCE: u64 = MIB;

fn pattern(slot: u64) -> Vec<u8> {
    (0..CHUNK).map(|i| ((slot * 131 + i / 512) % 253) as u8 + 1).collect()
}

fn num(s: &serde_json::Value, field: &str) -> u64 {
    s[field].as_u64().unwrap_or_else(|| panic!("{field} missing in {s:#}"))
}

#[test]
fn resync_sends_only_dirty_blocks_and_after_a_crash_only_the_activity_log() {
    let mut pair = ReplicaPair::start(
        HARNESS,
        &VolumeSpec { size: "4Gi".into(), al_extents: AL_SLOTS as u32, ..VolumeSpec::default() },
    );
    pair.a.promote(1).unwrap();
    pair.b.wait("peer is primary", Duration::from_secs(10), |s| s["peerRole"] == "Primary");

    // Disconnect, then write 64 MiB scattered over the 4 GiB.
    pair.net.cut().unwrap();
    pair.a.wait("disconnection", Duration::from_secs(10), |s| s["connection"] != "Connected");
    pair.b.wait("disconnection", Duration::from_secs(10), |s| s["connection"] != "Connected");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut slots = BTreeSet::new();
    while slots.len() < 1024 {
        slots.insert(rng.random_range(0..(4 << 30) / CHUNK));
    }
    let dirty = slots.len() as u64 * CHUNK;
    let mut c = NbdClient::connect(&pair.volume.socket("a"), true).unwrap();
    for &slot in &slots {
        c.write(slot * CHUNK, &pattern(slot), false).unwrap();
    }
    c.flush().unwrap();
    let s = pair.a.wait("tracked changes", Duration::from_secs(10), |s| s["outOfSyncBytes"] == dirty);
    let sent_before = num(&s, "wireSentBytes");

    // Reconnect: only the dirty blocks travel.
    pair.net.heal().unwrap();
    let a = pair.a.wait("resync", Duration::from_secs(120), in_sync);
    pair.b.wait("resync", Duration::from_secs(120), in_sync);
    let resent = num(&a, "wireSentBytes") - sent_before;
    let synced = num(&a["counters"], "lastSyncBytes");
    eprintln!(
        "resync after {} MiB scattered writes: {resent} bytes on the wire ({:.4} x dirty), {synced} bytes of data, {} ms",
        dirty / MIB,
        resent as f64 / dirty as f64,
        num(&a["counters"], "lastSyncMs")
    );
    assert_eq!(synced, dirty, "the resync covered exactly the dirty blocks");
    assert!(resent >= dirty, "every dirty block must travel: {resent} < {dirty}");
    assert!(resent <= dirty + dirty / 20 + METADATA_ALLOWANCE, "resync sent {resent} bytes for {dirty} dirty bytes");
    let b_file = std::fs::File::open(pair.volume.backing("b")).unwrap();
    for &slot in &slots {
        let mut buf = vec![0u8; CHUNK as usize];
        b_file.read_exact_at(&mut buf, slot * CHUNK).unwrap();
        assert!(buf == pattern(slot), "slot {slot} differs on the peer after the resync");
    }

    // A primary crash: only the extents its activity log named are resent.
    let extents = [17u64, 300, 901];
    for (i, &e) in extents.iter().enumerate() {
        c.write(e * EXTENT + 4096, &[i as u8 + 1; 8192], true).unwrap();
    }
    pair.a.kill();
    pair.b.wait("the primary's loss", Duration::from_secs(10), |s| s["connection"] != "Connected");
    pair.restart("a");
    let a = pair.a.wait("resync after the crash", Duration::from_secs(120), in_sync);
    pair.b.wait("resync after the crash", Duration::from_secs(120), in_sync);
    let synced = num(&a["counters"], "lastSyncBytes");
    let sent = num(&a, "wireSentBytes");
    eprintln!(
        "resync after a primary crash: {synced} bytes of data ({} extents), {sent} bytes on the wire",
        synced / EXTENT
    );
    assert_eq!(synced, AL_SLOTS * EXTENT, "exactly the activity log's {AL_SLOTS} extents are resynced");
    assert!(sent <= synced + synced / 20 + METADATA_ALLOWANCE, "sent {sent} bytes to resync {synced}");
    assert!(synced < (4 << 30) / 100, "far less than the volume");
}

#[test]
fn a_rate_limited_resync_reports_progress_survives_interruption_and_resumes() {
    const RATE: u64 = 8 * MIB;
    let spec = VolumeSpec { size: "256Mi".into(), resync_rate: Some("8Mi".into()), ..VolumeSpec::default() };
    let mut pair = ReplicaPair::start(HARNESS, &spec);
    pair.a.promote(1).unwrap();
    pair.net.cut().unwrap();
    pair.a.wait("disconnection", Duration::from_secs(10), |s| s["connection"] != "Connected");
    pair.b.wait("disconnection", Duration::from_secs(10), |s| s["connection"] != "Connected");
    let dirty = 24 * MIB;
    let mut c = NbdClient::connect(&pair.volume.socket("a"), true).unwrap();
    for i in 0..dirty / CHUNK {
        c.write(i * 2 * CHUNK, &pattern(i), false).unwrap();
    }
    c.flush().unwrap();
    let s = pair.a.wait("tracked changes", Duration::from_secs(10), |s| s["outOfSyncBytes"] == dirty);
    let sent_before = num(&s, "wireSentBytes");

    // First attempt: watch it progress at the limited rate, then cut it off midway.
    pair.net.heal().unwrap();
    let s = pair.b.wait("resync progress", Duration::from_secs(30), |s| {
        s["connection"] == "SyncTarget" && s["sync"]["doneBytes"].as_u64().is_some_and(|d| d >= 4 * MIB)
    });
    let sync = &s["sync"];
    assert_eq!(s["disk"], "Inconsistent", "a sync target is inconsistent: {s:#}");
    assert!(num(sync, "doneBytes") < num(sync, "totalBytes"), "{s:#}");
    assert!(sync["etaSeconds"].as_u64().is_some(), "no ETA reported: {s:#}");
    assert!(num(sync, "bytesPerSecond") <= 2 * RATE, "the resync ignores its rate limit: {s:#}");
    pair.net.cut().unwrap();
    let s = pair.b.wait("interruption", Duration::from_secs(10), |s| s["connection"] != "SyncTarget");
    assert_eq!(s["disk"], "Inconsistent");
    let err = pair.b.promote(5).unwrap_err();
    assert!(err.contains("Inconsistent"), "an interrupted sync target must not be promoted: {err}");

    // Second attempt: it resumes from the bitmaps instead of starting over.
    pair.net.heal().unwrap();
    let a = pair.a.wait("resumed resync", Duration::from_secs(60), in_sync);
    pair.b.wait("resumed resync", Duration::from_secs(60), in_sync);
    let second = num(&a["counters"], "lastSyncBytes");
    let total = num(&a, "wireSentBytes") - sent_before;
    eprintln!(
        "interrupted resync: {total} bytes on the wire in two attempts for {dirty} dirty; second attempt {second} bytes"
    );
    assert!(second < dirty, "the second attempt resent everything ({second} bytes)");
    assert!(total < dirty + dirty / 4, "{total} bytes for {dirty} dirty bytes: not resumed");
    let b_file = std::fs::File::open(pair.volume.backing("b")).unwrap();
    for i in 0..dirty / CHUNK {
        let mut buf = vec![0u8; CHUNK as usize];
        b_file.read_exact_at(&mut buf, i * 2 * CHUNK).unwrap();
        assert!(buf == pattern(i), "chunk {i} differs after the resumed resync");
    }
}
