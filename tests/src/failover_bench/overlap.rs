//! Who held the virtual IP when, from each server's own kernel: a thread inside each
//! server's network namespace samples, every [`SAMPLE_EVERY`], whether the VIP is a local
//! address there (`/proc/thread-self/net/fib_trie`) on an interface that is up (the
//! interface flags, through a socket of that namespace). A killed server's address stays
//! configured, but with its link down it answers nobody, so it no longer holds the VIP.
//!
//! The overlap of a run is every sample instant at which both servers held it; for any
//! implementation that keeps its promise it is zero.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Node, Testbed, VIP};

/// How often each server's state is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(2);
const INTERFACE: &str = "eth0";

/// One server's record: the instants at which its holding changed, starting with its
/// state at the first sample.
type Record = Vec<(Instant, bool)>;

/// What the two records say together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overlap {
    /// Time during which both servers held the VIP.
    pub both: Duration,
    /// Separate stretches of it.
    pub episodes: usize,
    /// Samples taken per server.
    pub samples: usize,
}

/// The sampling threads of one run; [`VipWatch::finish`] stops them and compares.
#[derive(Debug)]
pub struct VipWatch {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<(Record, usize)>>,
}

impl VipWatch {
    pub fn start(bed: &Testbed) -> VipWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = Node::BOTH
            .iter()
            .map(|&node| {
                let (path, stop) = (bed.ns(node).path(), Arc::clone(&stop));
                std::thread::spawn(move || sample(path, &stop))
            })
            .collect();
        VipWatch { stop, threads }
    }

    pub fn finish(mut self) -> Overlap {
        self.stop.store(true, Ordering::SeqCst);
        let records: Vec<(Record, usize)> = self.threads.drain(..).filter_map(|t| t.join().ok()).collect();
        match records.as_slice() {
            [(a, samples), (b, _)] => {
                let mut overlap = overlap(a, b, Instant::now());
                overlap.samples = *samples;
                overlap
            }
            _ => Overlap::default(),
        }
    }
}

impl Drop for VipWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn sample(netns: PathBuf, stop: &AtomicBool) -> (Record, usize) {
    let mut record = Record::new();
    let Ok(file) = File::open(&netns) else { return (record, 0) };
    // SAFETY: setns on a valid namespace descriptor affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return (record, 0);
    }
    // Created after setns: its ioctls ask this namespace.
    let Ok(socket) = std::net::UdpSocket::bind("127.0.0.1:0") else { return (record, 0) };
    let mut samples = 0;
    while !stop.load(Ordering::SeqCst) {
        let held = interface_up(&socket) && vip_is_local();
        if record.last().is_none_or(|(_, last)| *last != held) {
            record.push((Instant::now(), held));
        }
        samples += 1;
        std::thread::sleep(SAMPLE_EVERY);
    }
    (record, samples)
}

fn interface_up(socket: &std::net::UdpSocket) -> bool {
    // SAFETY: ifreq is plain data; zeroed is a valid value for it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(INTERFACE.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own, on a socket we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } != 0 {
        return false;
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = i32::from(unsafe { request.ifr_ifru.ifru_flags });
    flags & libc::IFF_UP != 0
}

/// Whether the local routing table has the VIP as a host address of this namespace.
fn vip_is_local() -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/fib_trie") else { return false };
    let needle = format!("|-- {VIP}");
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim_end().ends_with(&needle) && lines.next().is_some_and(|next| next.trim() == "/32 host LOCAL") {
            return true;
        }
    }
    false
}

/// Time both records say "held", up to `end`.
fn overlap(a: &[(Instant, bool)], b: &[(Instant, bool)], end: Instant) -> Overlap {
    let intervals = |r: &[(Instant, bool)]| -> Vec<(Instant, Instant)> {
        r.iter()
            .enumerate()
            .filter(|(_, (_, held))| *held)
            .map(|(i, (from, _))| (*from, r.get(i + 1).map_or(end, |(to, _)| *to)))
            .collect()
    };
    let mut result = Overlap::default();
    for (a_from, a_to) in intervals(a) {
        for (b_from, b_to) in intervals(b) {
            let (from, to) = (a_from.max(b_from), a_to.min(b_to));
            if to > from {
                result.both += to - from;
                result.episodes += 1;
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_the_time_both_records_say_held() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // a holds 0..100 then 300..end; b holds 90..310.
        let a = [(at(0), true), (at(100), false), (at(300), true)];
        let b = [(at(0), false), (at(90), true), (at(310), false)];
        let o = overlap(&a, &b, at(400));
        assert_eq!((o.both, o.episodes), (Duration::from_millis(20), 2));
        // A handover with a gap: nothing.
        let b = [(at(0), false), (at(120), true), (at(290), false)];
        assert_eq!(overlap(&a, &b, at(400)).both, Duration::ZERO);
    }
}
