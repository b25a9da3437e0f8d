//! The timeline of one promotion: when each phase of a failover or switchover ended, on
//! this node's clock, so that a slow failover says where its time went.
//!
//! A failover's timeline starts at the last heartbeat heard from the old primary (the
//! closest this node can know to the moment it died); any other promotion starts at the
//! decision. Phases are marked as the engine sees them end: each link's silence, the
//! decision, the witness lease asked for and granted, the old lease known to be over,
//! the term taken, each volume promoted, each flow step started (a volume step's start
//! includes the mount and its journal replay; a VIP step's, the address and the first
//! gratuitous ARP or unsolicited NA), serving, and each health-checked step's first
//! passing check, which may come after serving: the timeline stays open for those
//! ([`Settling`]) and the failover's summary grows when they arrive.

use std::time::Duration;

use super::time::Instant;

/// Phase names, shared by the engine, the reports and the metric's `phase` label.
pub mod phase {
    pub const DECIDED: &str = "decided";
    pub const SILENCE_DETECTED: &str = "silence detected";
    pub const WITNESS_REQUESTED: &str = "witness lease requested";
    pub const WITNESS_GRANTED: &str = "witness lease granted";
    pub const OLD_LEASE_ENDED: &str = "old lease ended";
    pub const ACTING: &str = "term taken";
    pub const SERVING: &str = "serving";

    pub fn link_silent(link: usize) -> String {
        format!("link {link} silent")
    }

    pub fn volume_promoted(volume: &str) -> String {
        format!("volume {volume} promoted")
    }

    pub fn step_started(step: &str) -> String {
        format!("step {step} started")
    }

    /// A volume step is up once the promoted replica is attached and its filesystem
    /// mounted, journal replay included.
    pub fn volume_mounted(step: &str) -> String {
        format!("step {step} attached and mounted")
    }

    /// A VIP step is up once its address is on the interface and the first gratuitous
    /// ARP (IPv4) or unsolicited neighbour advertisement (IPv6) has gone out; the phase
    /// says so instead of a bare "started".
    pub fn vip_announced(step: &str) -> String {
        format!("step {step} VIP added, first ARP/NA sent")
    }

    pub fn step_healthy(step: &str) -> String {
        format!("step {step} first healthy")
    }
}

/// One phase's end, as an offset from the timeline's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseTime {
    pub phase: String,
    pub after: Duration,
}

/// A promotion that is serving while some health-checked steps have not passed a check
/// yet; their first healthy check still belongs on the timeline of `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settling {
    pub epoch: u64,
    pub timeline: Timeline,
    /// Steps (by index) still waiting for their first passing check.
    pub pending: std::collections::BTreeSet<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeline {
    start: Instant,
    marks: Vec<(String, Instant)>,
}

impl Timeline {
    pub fn new(start: Instant) -> Timeline {
        Timeline { start, marks: Vec::new() }
    }

    /// Records that `phase` ended at `at`. Only the first end counts: a witness asked
    /// twice was first asked at the first request.
    pub fn mark(&mut self, phase: impl Into<String>, at: Instant) {
        let phase = phase.into();
        if !self.marks.iter().any(|(p, _)| *p == phase) {
            self.marks.push((phase, at.max(self.start)));
        }
    }

    pub fn has(&self, phase: &str) -> bool {
        self.marks.iter().any(|(p, _)| p == phase)
    }

    /// The phases in the order they ended.
    pub fn phases(&self) -> Vec<PhaseTime> {
        let mut marks: Vec<(usize, &(String, Instant))> = self.marks.iter().enumerate().collect();
        // Stable by time; marks at the same instant keep the order they were made in.
        marks.sort_by_key(|(i, (_, at))| (*at, *i));
        marks
            .into_iter()
            .map(|(_, (phase, at))| PhaseTime { phase: phase.clone(), after: at.since(self.start) })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn phases_come_in_time_order_from_the_start_and_only_the_first_end_counts() {
        let mut t = Timeline::new(at(1_000));
        t.mark(phase::SILENCE_DETECTED, at(1_600));
        t.mark(phase::link_silent(1), at(1_550));
        t.mark(phase::WITNESS_REQUESTED, at(1_600));
        t.mark(phase::WITNESS_REQUESTED, at(1_900));
        // Nothing ends before the start.
        t.mark(phase::OLD_LEASE_ENDED, at(400));
        let phases: Vec<(String, u128)> = t.phases().into_iter().map(|p| (p.phase, p.after.as_millis())).collect();
        assert_eq!(
            phases,
            [
                ("old lease ended".to_string(), 0),
                ("link 1 silent".to_string(), 550),
                ("silence detected".to_string(), 600),
                ("witness lease requested".to_string(), 600),
            ]
        );
    }
}
