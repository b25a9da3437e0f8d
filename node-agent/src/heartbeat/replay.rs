//! Replay protection: per sender incarnation, a sliding window of sequence numbers per link.

use std::collections::BTreeMap;

/// How far behind the newest sequence number a late (reordered) packet may still arrive.
pub const WINDOW: u64 = 64;

/// The sequence numbers seen on one link, as a bitmap ending at the highest one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SeqWindow {
    highest: u64,
    /// Bit `i` is set when `highest - i` has been seen.
    seen: u64,
}

impl SeqWindow {
    fn would_accept(&self, seq: u64) -> bool {
        if seq > self.highest {
            return true;
        }
        let behind = self.highest - seq;
        behind < WINDOW && self.seen & (1 << behind) == 0
    }

    fn record(&mut self, seq: u64) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= WINDOW { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = seq;
        } else {
            self.seen |= 1 << (self.highest - seq);
        }
    }
}

/// Accepts each (incarnation, link, sequence) at most once.
///
/// A sender that restarts picks a larger incarnation and starts its sequences again; an
/// older incarnation is always a replay, so a recording of a previous run cannot be played
/// back after the sender restarted.
#[derive(Clone, Debug, Default)]
pub struct ReplayGuard {
    incarnation: Option<u64>,
    windows: BTreeMap<u8, SeqWindow>,
}

impl ReplayGuard {
    pub fn new() -> Self {
        ReplayGuard::default()
    }

    /// Whether the packet is fresh. Does not record it.
    pub fn is_fresh(&self, incarnation: u64, link: u8, sequence: u64) -> bool {
        match self.incarnation {
            None => true,
            Some(current) if incarnation > current => true,
            Some(current) if incarnation < current => false,
            Some(_) => self.windows.get(&link).is_none_or(|w| w.would_accept(sequence)),
        }
    }

    /// Records an authenticated, fresh packet.
    pub fn record(&mut self, incarnation: u64, link: u8, sequence: u64) {
        if self.incarnation != Some(incarnation) {
            self.incarnation = Some(incarnation);
            self.windows.clear();
        }
        self.windows.entry(link).or_default().record(sequence);
    }

    /// The sender incarnation currently accepted, if any packet was accepted yet.
    pub fn incarnation(&self) -> Option<u64> {
        self.incarnation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(g: &mut ReplayGuard, inc: u64, link: u8, seq: u64) -> bool {
        let fresh = g.is_fresh(inc, link, seq);
        if fresh {
            g.record(inc, link, seq);
        }
        fresh
    }

    #[test]
    fn duplicates_are_refused_per_link() {
        let mut g = ReplayGuard::new();
        assert!(accept(&mut g, 1, 0, 1));
        assert!(!accept(&mut g, 1, 0, 1));
        assert!(accept(&mut g, 1, 1, 1), "links have their own windows");
        assert!(accept(&mut g, 1, 0, 3));
        assert!(accept(&mut g, 1, 0, 2), "late but inside the window");
        assert!(!accept(&mut g, 1, 0, 2));
    }

    #[test]
    fn packets_older_than_the_window_are_refused() {
        let mut g = ReplayGuard::new();
        assert!(accept(&mut g, 1, 0, 100));
        assert!(accept(&mut g, 1, 0, 100 - WINDOW + 1));
        assert!(!accept(&mut g, 1, 0, 100 - WINDOW));
        assert!(accept(&mut g, 1, 0, 100 + 1000));
        assert!(!accept(&mut g, 1, 0, 101));
    }

    #[test]
    fn only_newer_incarnations_reset_the_windows() {
        let mut g = ReplayGuard::new();
        assert!(accept(&mut g, 5, 0, 50));
        assert!(!accept(&mut g, 4, 0, 51), "an older incarnation is a replay");
        assert!(accept(&mut g, 6, 0, 1), "a restarted sender starts again at 1");
        assert!(!accept(&mut g, 5, 0, 52));
        assert_eq!(g.incarnation(), Some(6));
    }
}
