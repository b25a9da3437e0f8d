//! No acknowledged write is lost by a failover (protocol C). A writer logs each write only
//! after its FUA (or a following FLUSH) completed; the primary replica process is killed at
//! random moments; after each failover every logged write must read back intact on the new
//! primary. Twenty kills over two runs, each run alternating the primary role: the killed
//! node restarts as secondary and is resynced before the next round. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hapair_tests::nbd_client::NbdClient;
use hapair_tests::replica_proc::{ReplicaPair, VolumeSpec, in_sync};
use rand::{Rng, RngCore, SeedableRng};

const HARNESS: &str = env!("CARGO_BIN_EXE_replica-harness");
const BLOCKS: u64 = (32 << 20) / 4096;

/// A block that says which write it is and checks itself.
fn block(block: u64, seq: u64) -> Vec<u8> {
    let mut data = vec![0u8; 4096];
    rand_chacha::ChaCha8Rng::seed_from_u64(seq ^ (block << 40)).fill_bytes(&mut data[32..]);
    data[..8].copy_from_slice(&seq.to_le_bytes());
    data[8..16].copy_from_slice(&block.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_128(&data[32..]);
    data[16..32].copy_from_slice(&sum.to_le_bytes());
    data
}

/// The write a block holds: `None` if never written, `Err` if it is not any write intact.
fn decode(b: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let seq = u64::from_le_bytes(data[..8].try_into().unwrap());
    if data == block(b, seq).as_slice() {
        Ok(Some(seq))
    } else {
        Err(format!("block {b} holds a torn or foreign write (claims seq {seq})"))
    }
}

#[derive(Default)]
struct Log {
    acked: Vec<(u64, u64)>,
    pending: Option<(u64, u64)>,
}

fn writer(socket: PathBuf, seed: u64, first_seq: u64, log: Arc<Mutex<Log>>, stop: Arc<AtomicBool>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let Ok(mut c) = NbdClient::connect(&socket, true) else { return };
    let mut seq = first_seq;
    while !stop.load(Ordering::SeqCst) {
        let b = rng.random_range(0..BLOCKS);
        seq += 1;
        log.lock().unwrap().pending = Some((b, seq));
        let fua = rng.random_bool(0.75);
        let done = c.write(b * 4096, &block(b, seq), fua).and_then(|()| if fua { Ok(()) } else { c.flush() });
        if done.is_err() {
            return;
        }
        let mut l = log.lock().unwrap();
        l.acked.push((b, seq));
        l.pending = None;
    }
}

fn run(seed: u64, kills: u64) {
    let mut pair = ReplicaPair::start(HARNESS, &VolumeSpec { size: "32Mi".into(), ..VolumeSpec::default() });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut expected: HashMap<u64, u64> = HashMap::new();
    let (mut primary, mut secondary) = ("a", "b");
    pair.node(primary).promote(1).unwrap();
    let mut next_seq = seed << 32;
    for round in 0..kills {
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let socket = pair.volume.socket(primary);
        let (l, s, first) = (log.clone(), stop.clone(), next_seq);
        let w = std::thread::spawn(move || writer(socket, seed + round, first, l, s));
        std::thread::sleep(Duration::from_millis(rng.random_range(50..600)));
        pair.node(primary).kill();
        stop.store(true, Ordering::SeqCst);
        w.join().unwrap();
        let log = std::mem::take(&mut *log.lock().unwrap());
        next_seq += 1 << 20;
        assert!(!log.acked.is_empty(), "round {round}: the writer never got a write acknowledged");
        eprintln!(
            "round {round}: {} writes acknowledged before the kill, one in flight: {:?}",
            log.acked.len(),
            log.pending
        );
        for &(b, s) in &log.acked {
            expected.insert(b, s);
        }

        // Fail over.
        pair.node(secondary).wait("the primary's loss", Duration::from_secs(10), |s| s["connection"] != "Connected");
        pair.node(secondary).promote(round + 2).unwrap();
        let mut reader = NbdClient::connect(&pair.volume.socket(secondary), true).unwrap();
        for (&b, &s) in &expected {
            let got = decode(b, &reader.read(b * 4096, 4096).unwrap()).unwrap_or_else(|e| panic!("round {round}: {e}"));
            let in_flight = log.pending.filter(|&(pb, _)| pb == b).map(|(_, ps)| ps);
            assert!(
                got == Some(s) || (got.is_some() && got == in_flight),
                "round {round}: acknowledged write {s} to block {b} lost after failover (found {got:?})"
            );
        }
        if let Some((b, s)) = log.pending {
            // The write in flight at the kill may or may not have landed; now it is settled.
            match decode(b, &reader.read(b * 4096, 4096).unwrap()).unwrap_or_else(|e| panic!("round {round}: {e}")) {
                Some(got) if got == s => {
                    expected.insert(b, s);
                }
                _ => {}
            }
        }
        reader.disconnect();

        // The crashed node returns as secondary and is resynced from the new primary.
        pair.restart(primary);
        pair.node(primary).wait("resync of the returning node", Duration::from_secs(60), in_sync);
        pair.node(secondary).wait("resync of the returning node", Duration::from_secs(60), in_sync);
        std::mem::swap(&mut primary, &mut secondary);
    }
    // Both replicas hold the same data at the end.
    let digest = |p: &std::path::Path| {
        let mut f = std::fs::File::open(p).unwrap();
        let mut data = vec![0u8; 32 << 20];
        std::io::Read::read_exact(&mut f, &mut data).unwrap();
        xxhash_rust::xxh3::xxh3_128(&data)
    };
    pair.a.shutdown();
    pair.b.shutdown();
    assert_eq!(digest(&pair.volume.backing("a")), digest(&pair.volume.backing("b")), "replicas differ after the runs");
}

#[test]
fn no_acknowledged_write_is_lost_across_ten_kills_first_run() {
    run(1, 10);
}

#[test]
fn no_acknowledged_write_is_lost_across_ten_kills_second_run() {
    run(2, 10);
}
