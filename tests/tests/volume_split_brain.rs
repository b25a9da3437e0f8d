//! Split brain under `quorum: none`: the link is cut, both nodes act as primary and write,
//! then the link heals. The replicas detect the split brain from their generation
//! identifiers and resolve it by the volume's policy, or wait for an operator's
//! resolve-split-brain. The losing replica records (and logs) the ranges it overwrote.
//! Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use hapair_tests::nbd_client::NbdClient;
use hapair_tests::replica_proc::{ReplicaPair, VolumeSpec, in_sync};

const HARNESS: &str = env!("CARGO_BIN_EXE_replica-harness");

fn write_blocks(pair: &ReplicaPair, node: &str, blocks: &[u64], fill: u8) {
    let mut c = NbdClient::connect(&pair.volume.socket(node), true).unwrap();
    for &b in blocks {
        c.write(b * 4096, &[fill; 4096], false).unwrap();
    }
    c.flush().unwrap();
}

fn block_of(pair: &ReplicaPair, node: &str, b: u64) -> Vec<u8> {
    let f = std::fs::File::open(pair.volume.backing(node)).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, b * 4096).unwrap();
    buf
}

/// Builds the split brain: a and b both primary and writing while cut off, then both
/// demoted and the link healed.
fn split_brain(policy: &'static str, a_blocks: &[u64], b_blocks: &[u64]) -> ReplicaPair {
    let mut pair = ReplicaPair::start(HARNESS, &VolumeSpec { size: "16Mi".into(), policy, ..VolumeSpec::default() });
    pair.a.promote(1).unwrap();
    pair.b.wait("peer is primary", Duration::from_secs(10), |s| s["peerRole"] == "Primary");
    pair.net.cut().unwrap();
    pair.b.wait("the peer's loss", Duration::from_secs(10), |s| s["connection"] != "Connected");
    // Without a witness the standby promotes itself: now both are primary.
    pair.b.promote(2).unwrap();
    write_blocks(&pair, "a", a_blocks, 0xa0);
    write_blocks(&pair, "b", b_blocks, 0xb0);
    pair.a.demote().unwrap();
    pair.b.demote().unwrap();
    pair.net.heal().unwrap();
    pair
}

fn converged_to(pair: &mut ReplicaPair, winner: &str, loser: &str, a_blocks: &[u64], b_blocks: &[u64], by: &str) {
    pair.a.wait("resolution", Duration::from_secs(30), in_sync);
    pair.b.wait("resolution", Duration::from_secs(30), in_sync);
    for &blk in a_blocks.iter().chain(b_blocks) {
        assert_eq!(block_of(pair, "a", blk), block_of(pair, "b", blk), "block {blk} differs after the resolution");
    }
    let (win_blocks, fill) = if winner == "a" { (a_blocks, 0xa0) } else { (b_blocks, 0xb0) };
    for &blk in win_blocks {
        assert_eq!(block_of(pair, loser, blk), vec![fill; 4096], "the winner {winner}'s block {blk} was not kept");
    }
    let s = pair.node(loser).status();
    let record = &s["lastDiscard"];
    assert_eq!(record["localDiscarded"], true, "{s:#}");
    assert_eq!(record["resolvedBy"], by);
    let covered = |blk: u64| {
        record["ranges"].as_array().unwrap().iter().any(|r| {
            let (o, l) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
            o <= blk * 4096 && blk * 4096 < o + l
        })
    };
    for &blk in a_blocks.iter().chain(b_blocks) {
        assert!(covered(blk), "the discard record misses block {blk}: {record:#}");
    }
    let log = pair.node(loser).log_text();
    assert!(log.contains("split brain resolved") && log.contains("ranges"), "the discard is not logged:\n{log}");
}

#[test]
fn discard_younger_primary_keeps_the_first_primarys_data() {
    let (a, b) = ([1u64, 2, 3], [100u64, 101, 102, 103, 104, 2]);
    let mut pair = split_brain("discard-younger-primary", &a, &b);
    converged_to(&mut pair, "a", "b", &a, &b, "discard-younger-primary");
}

#[test]
fn discard_least_changes_keeps_the_busier_replica() {
    let (a, b) = ([1u64, 2], [100u64, 101, 102, 103, 104, 2]);
    let mut pair = split_brain("discard-least-changes", &a, &b);
    converged_to(&mut pair, "b", "a", &a, &b, "discard-least-changes");
}

#[test]
fn manual_policy_waits_for_resolve_split_brain() {
    let (a, b) = ([1u64, 2, 3], [100u64, 2]);
    let mut pair = split_brain("manual", &a, &b);
    for node in ["a", "b"] {
        pair.node(node).wait("split brain detection", Duration::from_secs(30), |s| s["connection"] == "SplitBrain");
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pair.a.status()["connection"], "SplitBrain", "nothing happens without an operator");
    assert_ne!(block_of(&pair, "a", 2), block_of(&pair, "b", 2));
    // resolve-split-brain with a as the winner: b discards its changes.
    pair.b.resolve("discard").unwrap();
    converged_to(&mut pair, "a", "b", &a, &b, "operator");
}
