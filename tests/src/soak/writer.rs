//! The client's write path and the lost-write checker. The export is a Unix socket on each
//! node (served whatever the role, writable only on the primary), so the writer runs in
//! the host's namespace and follows the primary: it writes to the node whose agent says it
//! is the group's primary, and lets go of a node as soon as it no longer says so or a write
//! fails (see [`crate::soak::watch`] for why). Each write is one 4 KiB block with FUA; it
//! counts as acknowledged only once the server answered it without error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use crate::nbd_client::NbdClient;
use crate::soak::roles::Roles;

pub const BLOCK: u64 = 4096;
/// The blocks the writer overwrites at random: few enough that most are rewritten many
/// times, so a stale replica shows as an old sequence number rather than zeros.
pub const DATA_BLOCKS: u64 = 256;

/// A block that names its write (sequence, block, writer incarnation) and checks itself.
pub fn encode(block: u64, seq: u64, incarnation: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK as usize];
    rand_chacha::ChaCha8Rng::seed_from_u64(seq ^ (block << 40)).fill_bytes(&mut data[40..]);
    data[..8].copy_from_slice(&seq.to_le_bytes());
    data[8..16].copy_from_slice(&block.to_le_bytes());
    data[16..24].copy_from_slice(&incarnation.to_le_bytes());
    let sum = checksum(&data);
    data[24..40].copy_from_slice(&sum.to_le_bytes());
    data
}

fn checksum(data: &[u8]) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&data[..24]);
    h.update(&data[40..]);
    h.digest128()
}

/// The write a block holds: `None` if never written, `Err` if it is no intact write of ours.
pub fn decode(block: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let field = |r: std::ops::Range<usize>| u64::from_le_bytes(data[r].try_into().unwrap_or([0; 8]));
    let (seq, owner) = (field(0..8), field(8..16));
    let sum = u128::from_le_bytes(data[24..40].try_into().unwrap_or([0; 16]));
    if sum != checksum(data) || owner != block {
        return Err(format!("block {block} holds a torn or foreign write (claims seq {seq} of block {owner})"));
    }
    Ok(Some(seq))
}

/// What a block may hold: its last acknowledged write (`floor`), or any write sent after
/// it whose fate is unknown (`maybe`: failed or cut off before the answer).
#[derive(Debug, Default, Clone)]
struct BlockState {
    floor: Option<u64>,
    maybe: Vec<u64>,
}

/// One acknowledged write: when, and which node answered.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub at: Instant,
    pub node: &'static str,
}

#[derive(Debug, Default)]
struct Log {
    blocks: HashMap<u64, BlockState>,
    acks: Vec<Ack>,
    attempts: u64,
    failures: u64,
    reconnects: u64,
}

/// The writer thread and its record.
#[derive(Debug)]
pub struct Writer {
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Totals for the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterTotals {
    pub attempts: u64,
    pub acked: u64,
    pub failures: u64,
    pub reconnects: u64,
    pub blocks: usize,
}

impl Writer {
    /// Starts writing through `sockets` (node, export socket), beginning with the first.
    pub fn start(sockets: [(&'static str, PathBuf); 2], seed: u64, roles: Roles) -> Writer {
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (l, s, p, pd) = (log.clone(), stop.clone(), pause.clone(), paused.clone());
        let thread = std::thread::spawn(move || write_loop(&sockets, seed, &roles, &l, &s, &p, &pd));
        Writer { log, stop, pause, paused, thread: Some(thread) }
    }

    /// Acknowledged writes answered by `node` at or after `since`: the first one's time.
    pub fn first_ack_after(&self, node: &str, since: Instant) -> Option<Instant> {
        let log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        log.acks.iter().find(|a| a.at >= since && a.node == node).map(|a| a.at)
    }

    /// The acknowledgements received at or after `since`.
    pub fn acks_after(&self, since: Instant) -> Vec<Ack> {
        let log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = log.acks.partition_point(|a| a.at < since);
        log.acks[start..].to_vec()
    }

    pub fn acks_since(&self, since: Instant) -> usize {
        let log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        log.acks.iter().filter(|a| a.at >= since).count()
    }

    pub fn totals(&self) -> WriterTotals {
        let log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        WriterTotals {
            attempts: log.attempts,
            acked: log.acks.len() as u64,
            failures: log.failures,
            reconnects: log.reconnects,
            blocks: log.blocks.values().filter(|b| b.floor.is_some()).count(),
        }
    }

    /// Pauses the writer between two writes (a write in flight may take up to the NBD
    /// client's 30 s timeout against a node that lost its peer), runs `check` with the
    /// record, then resumes it.
    fn paused<T>(&self, check: impl FnOnce(&mut Log) -> T) -> Result<T, String> {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(40);
        while !self.paused.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                self.pause.store(false, Ordering::SeqCst);
                return Err("the writer did not pause within 40 s (a write hangs)".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = {
            let mut log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            check(&mut log)
        };
        self.pause.store(false, Ordering::SeqCst);
        Ok(out)
    }

    /// Reads every block ever acknowledged from `socket` (the current primary's export) and
    /// checks it holds its last acknowledged write or a later one of unknown fate. Returns
    /// the number of blocks checked, or every lost or corrupt block.
    pub fn verify(&self, socket: &std::path::Path) -> Result<usize, Vec<String>> {
        let result = self.paused(|log| {
            let mut reader = NbdClient::connect(socket, true)
                .map_err(|e| vec![format!("connecting to {} to verify: {e}", socket.display())])?;
            let mut problems = Vec::new();
            let mut checked = 0;
            let mut keys: Vec<u64> = log.blocks.keys().copied().collect();
            keys.sort_unstable();
            for b in keys {
                let data = reader.read(b * BLOCK, BLOCK as u32).map_err(|e| vec![format!("reading block {b}: {e}")])?;
                let state = log.blocks.entry(b).or_default();
                match decode(b, &data) {
                    Err(e) => problems.push(e),
                    Ok(got) if got == state.floor => {}
                    Ok(Some(s)) if state.maybe.contains(&s) => {
                        // A write of unknown fate landed: from now on it is the floor.
                        state.floor = Some(s);
                        state.maybe.retain(|&m| m > s);
                    }
                    Ok(got) => problems.push(format!(
                        "block {b}: acknowledged write {:?} lost, found {got:?} (unacknowledged candidates {:?})",
                        state.floor, state.maybe
                    )),
                }
                checked += usize::from(state.floor.is_some());
            }
            reader.disconnect();
            if problems.is_empty() { Ok(checked) } else { Err(problems) }
        });
        result.unwrap_or_else(|e| Err(vec![e]))
    }

    pub fn finish(mut self) -> WriterTotals {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.totals()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    sockets: &[(&'static str, PathBuf); 2],
    seed: u64,
    roles: &Roles,
    log: &Mutex<Log>,
    stop: &AtomicBool,
    pause: &AtomicBool,
    paused: &AtomicBool,
) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0fc1_1e47);
    let mut target = 0usize;
    let mut conn: Option<NbdClient> = None;
    let mut incarnation = 0u64;
    // Unique across runs of one seed's reproduction too: sequence numbers start at 1.
    let mut seq = 0u64;
    let lock = || log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    while !stop.load(Ordering::SeqCst) {
        if pause.load(Ordering::SeqCst) {
            paused.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        paused.store(false, Ordering::SeqCst);
        if !roles.primary(target) {
            conn = None;
            if roles.primary(1 - target) {
                target = 1 - target;
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        let (node, socket) = &sockets[target];
        let client = match conn.as_mut() {
            Some(c) => c,
            None => match NbdClient::connect(socket, true) {
                Ok(c) => {
                    incarnation += 1;
                    lock().reconnects += 1;
                    conn.insert(c)
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let b = rng.random_range(0..DATA_BLOCKS);
        seq += 1;
        {
            let mut l = lock();
            l.attempts += 1;
            l.blocks.entry(b).or_default().maybe.push(seq);
        }
        match client.write(b * BLOCK, &encode(b, seq, incarnation), true) {
            Ok(()) => {
                let at = Instant::now();
                let mut l = lock();
                let state = l.blocks.entry(b).or_default();
                state.floor = Some(seq);
                state.maybe.clear();
                l.acks.push(Ack { at, node });
            }
            Err(_) => {
                // Refused (no longer the primary) or cut off: the write's fate is unknown.
                lock().failures += 1;
                conn = None;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_block_decodes_to_its_write_and_a_torn_one_is_refused() {
        let data = encode(7, 42, 3);
        assert_eq!(decode(7, &data), Ok(Some(42)));
        assert!(decode(8, &data).is_err());
        let mut torn = data.clone();
        torn[2000] ^= 1;
        assert!(decode(7, &torn).is_err());
        assert_eq!(decode(7, &[0u8; 4096]), Ok(None));
    }
}
