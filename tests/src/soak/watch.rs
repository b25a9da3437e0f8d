//! Continuous observation of what each node holds, on the process's monotonic clock: the
//! virtual IP on an interface that is up (a powered-off node's address on a downed link
//! serves nobody), and whether its volume export accepts a write (a FUA write of a probe
//! block that belongs to that node alone, so the probes never touch the writer's data).
//! Each sample records when it started and finished, so overlaps are judged on bounds,
//! never on guesses.
//!
//! The export refuses to demote its replica while any NBD client is attached (as it must
//! under a mounted filesystem), so the writer and the probes behave like an application the
//! flow stops first: they use a node's export only while its agent says it is the group's
//! primary ([`Roles`](crate::soak::roles::Roles)), and let go as soon as it does not. A node that does not claim to be
//! primary is therefore not probed (it counts as not writable); the lost-write checker
//! covers what it might have accepted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::nbd_client::NbdClient;
use crate::soak::roles::Roles;
use crate::soak::writer::BLOCK;

/// One observation: started, finished, whether the node held the resource.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub before: Instant,
    pub after: Instant,
    pub held: bool,
}

/// A thread sampling one thing about one node until stopped.
#[derive(Debug)]
pub struct Watch {
    pub samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    fn spawn(mut sample: impl FnMut() -> Option<bool> + Send + 'static, pace: Duration) -> Watch {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, flag) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let before = Instant::now();
                let held = sample();
                let after = Instant::now();
                if let Some(held) = held {
                    out.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Sample { before, after, held });
                }
                std::thread::sleep(pace);
            }
        });
        Watch { samples, stop, thread: Some(thread) }
    }

    /// Polls `ip -o addr show dev eth0 up` in namespace `ns` for the address `vip_cidr`.
    pub fn vip(ns: &str, vip_cidr: &str) -> Watch {
        let (ns, want) = (ns.to_string(), format!(" {vip_cidr} "));
        Watch::spawn(
            move || {
                let out = std::process::Command::new("ip")
                    .args(["-n", &ns, "-o", "-4", "addr", "show", "dev", "eth0", "up"])
                    .output()
                    .ok()?;
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).replace('\n', " ").contains(&want))
            },
            Duration::from_millis(5),
        )
    }

    /// While `roles` says node `index` is primary: connects to `socket`, writes probe block
    /// `block` with FUA and disconnects; held means the write was accepted.
    pub fn writable(socket: PathBuf, block: u64, roles: Roles, index: usize) -> Watch {
        let mut n = 0u64;
        Watch::spawn(
            move || {
                if !roles.primary(index) {
                    return Some(false);
                }
                let Ok(mut c) = NbdClient::connect(&socket, true) else { return Some(false) };
                n += 1;
                let mut data = vec![0xa5u8; BLOCK as usize];
                data[..8].copy_from_slice(&n.to_le_bytes());
                let accepted = c.write(block * BLOCK, &data, true).is_ok();
                c.disconnect();
                Some(accepted)
            },
            Duration::from_millis(20),
        )
    }

    /// The samples that started at or after `since`.
    pub fn since(&self, since: Instant) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = samples.partition_point(|s| s.before < since);
        samples[start..].to_vec()
    }

    pub fn count(&self) -> usize {
        self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The stretches in which the node provably held the resource: from the end of the first
/// sample of a run of held samples to the start of its last. A single held sample proves
/// nothing about any instant (it held at some unknown point within it) and yields none.
pub fn surely_held(samples: &[Sample]) -> Vec<(Instant, Instant)> {
    let mut out = Vec::new();
    let mut run: Option<(Instant, Instant)> = None;
    for s in samples {
        match (&mut run, s.held) {
            (None, true) => run = Some((s.after, s.before)),
            (Some(r), true) => r.1 = s.before,
            (Some(_), false) => {
                if let Some((from, to)) = run.take()
                    && from < to
                {
                    out.push((from, to));
                }
            }
            (None, false) => {}
        }
    }
    if let Some((from, to)) = run
        && from < to
    {
        out.push((from, to));
    }
    out
}

/// The instants both nodes provably held the resource: each overlap of their held
/// stretches, as (from, to).
pub fn overlaps(a: &[Sample], b: &[Sample]) -> Vec<(Instant, Instant)> {
    let (ha, hb) = (surely_held(a), surely_held(b));
    let mut out = Vec::new();
    for &(fa, ta) in &ha {
        for &(fb, tb) in &hb {
            let (from, to) = (fa.max(fb), ta.min(tb));
            if from < to {
                out.push((from, to));
            }
        }
    }
    out
}

/// The first sample at or after `since` in which the node held the resource: its end.
pub fn first_held(samples: &[Sample], since: Instant) -> Option<Instant> {
    samples.iter().find(|s| s.before >= since && s.held).map(|s| s.after)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn s(t0: Instant, from: u64, to: u64, held: bool) -> Sample {
        Sample { before: at(t0, from), after: at(t0, to), held }
    }

    #[test]
    fn only_provable_overlaps_count() {
        let t0 = Instant::now();
        let a = [s(t0, 0, 1, true), s(t0, 10, 11, true), s(t0, 20, 21, false)];
        // b takes over between a's last held sample and its first released one: unprovable.
        let b = [s(t0, 5, 6, false), s(t0, 15, 16, true), s(t0, 25, 26, true)];
        assert!(overlaps(&a, &b).is_empty());
        let b = [s(t0, 2, 3, true), s(t0, 8, 9, true)];
        assert_eq!(overlaps(&a, &b), vec![(at(t0, 3), at(t0, 8))]);
    }
}
