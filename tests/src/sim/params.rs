//! What one simulated schedule looks like: timing, links, witness mode, clock rates,
//! latencies, how much chaos and whether the witness runs on replicated controllers whose
//! leadership moves, all drawn from the schedule's seed.

use std::time::Duration;

use hapair_crds::hagroup::WitnessMode;
use hapair_crds::nodeapi::{GroupConfig, GroupKey, HeartbeatKey};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::clock::{fastest_rate, slowest_rate};

pub const NODES: [&str; 2] = ["alpha", "beta"];
pub const VOLUME: &str = "data";
pub const MONITOR: &str = "gw";
/// The flow step whose health check the simulation can fail.
pub const APP_STEP: usize = 1;

/// The four timing knobs of `spec.heartbeat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub interval: Duration,
    pub dead_after: Duration,
    pub lease: Duration,
    pub drift_ppm: u32,
}

/// 100 ms heartbeats, 1 s deadAfter, 800 ms lease (the product defaults).
pub const DEFAULT_TIMINGS: Timings = Timings {
    interval: Duration::from_millis(100),
    dead_after: Duration::from_millis(1000),
    lease: Duration::from_millis(800),
    drift_ppm: 10_000,
};

/// 20 ms heartbeats, 200 ms deadAfter, 160 ms lease.
pub const AGGRESSIVE_TIMINGS: Timings = Timings {
    interval: Duration::from_millis(20),
    dead_after: Duration::from_millis(200),
    lease: Duration::from_millis(160),
    drift_ppm: 10_000,
};

impl Timings {
    pub fn lease_wait(&self) -> Duration {
        hapair_crds::drift::stretch(self.lease, self.drift_ppm)
    }
}

/// A uniform range of nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub min: u64,
    pub max: u64,
}

impl Span {
    pub const fn micros(min: u64, max: u64) -> Span {
        Span { min: min * 1_000, max: max * 1_000 }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> u64 {
        if self.max <= self.min { self.min } else { rng.random_range(self.min..=self.max) }
    }
}

/// How long things take when nothing goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latencies {
    /// One way, per heartbeat copy.
    pub heartbeat: Span,
    /// One way, node to witness or back.
    pub witness: Span,
    pub volume: Span,
    pub step: Span,
    pub vip: Span,
}

pub const LATENCIES: Latencies = Latencies {
    heartbeat: Span::micros(50, 1_500),
    witness: Span::micros(300, 4_000),
    volume: Span::micros(1_000, 5_000),
    step: Span::micros(1_000, 8_000),
    vip: Span::micros(200, 2_000),
};

#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub seed: u64,
    pub timings: Timings,
    pub links: usize,
    pub witness: WitnessMode,
    /// The preferred node, if any (failback auto needs one).
    pub preferred: Option<usize>,
    pub failback_auto: bool,
    /// Clock rates in ppb of true time: node 0, node 1, witness.
    pub rates: [u64; 3],
    /// Length of the fault-injection phase (zero: none).
    pub chaos: Duration,
    /// Mean gap between two faults.
    pub fault_gap: Duration,
    /// Probability that stopping a held resource fails (it stays held). Only with a
    /// witness: without one there is no watchdog to reset a node stuck that way.
    pub stop_failure: f64,
    pub latencies: Latencies,
    /// The agent runs a step's first health check as soon as the step has started; with
    /// this, each start of the checked step is followed by a passing check, which after a
    /// failover must join its timeline (`step app first healthy`), at or after the step's
    /// start, in order with every other phase.
    pub first_checks: bool,
    /// The witness runs on replicated controllers (on etcd) whose leadership moves, or, when
    /// `None`, on one standalone controller (whose restarts forget holders and wait out).
    pub leaders: Option<Leaders>,
}

/// How the replicated controllers behind the witness behave: agents broadcast each witness
/// request to every controller and take the first answer that is not a 503; the leader
/// records every grant and release in a fenced etcd write before answering; leadership moves
/// during the chaos (as a fault), and in some schedules at or after the primary's crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaders {
    /// Controllers the agents know (one leads at a time).
    pub controllers: usize,
    /// From a change of leadership until the successor answers, true nanoseconds: each
    /// change draws zero a quarter of the time, else from this span.
    pub takeover: Span,
    /// A fenced etcd write, from the leader's decision until it committed (or was refused).
    pub write: Span,
    /// Whether the leadership also moves during the bounded-failover phase, and when.
    pub at_failover: Option<FailoverChange>,
}

/// When the leadership moves in the failover phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverChange {
    /// At the very instant the primary crashes.
    AtCrash,
    /// At a random moment within the failover bound after the crash.
    During,
}

/// A fenced etcd transaction: one Raft round on a local network.
pub const ETCD_WRITE: Span = Span::micros(200, 3_000);

impl Leaders {
    fn random(rng: &mut ChaCha8Rng, dead_after: Duration) -> Leaders {
        let d = u64::try_from(dead_after.as_nanos()).unwrap_or(u64::MAX);
        let longest = match rng.random_range(0..4) {
            0 => 0,
            1 => d / 4,
            2 => d,
            _ => 2 * d,
        };
        let at_failover = match rng.random_range(0..5) {
            0 | 1 => Some(FailoverChange::AtCrash),
            2 | 3 => Some(FailoverChange::During),
            _ => None,
        };
        Leaders {
            controllers: rng.random_range(2..=3),
            takeover: Span { min: 0, max: longest },
            write: ETCD_WRITE,
            at_failover,
        }
    }

    /// One change's takeover delay.
    pub fn takeover_delay(&self, rng: &mut ChaCha8Rng) -> u64 {
        if rng.random_bool(0.25) { 0 } else { self.takeover.sample(rng) }
    }
}

impl Params {
    /// A random schedule: mostly default or aggressive timings, sometimes any valid ones;
    /// mostly with the controller witness, sometimes without.
    pub fn random(seed: u64, rng: &mut ChaCha8Rng) -> Params {
        let timings = match rng.random_range(0..10) {
            0..=3 => DEFAULT_TIMINGS,
            4..=7 => AGGRESSIVE_TIMINGS,
            _ => random_timings(rng),
        };
        let timings = Timings { drift_ppm: [0, 1_000, 10_000, 50_000][rng.random_range(0..4)], ..timings };
        let witness = if rng.random_range(0..100) < 15 { WitnessMode::None } else { WitnessMode::Controller };
        let failback_auto = rng.random_bool(0.3);
        let preferred = if failback_auto || rng.random_bool(0.3) { Some(rng.random_range(0..2)) } else { None };
        let d = timings.dead_after;
        Params {
            seed,
            timings,
            links: rng.random_range(1..=3),
            witness,
            preferred,
            failback_auto,
            rates: random_rates(rng, timings.drift_ppm),
            chaos: d * rng.random_range(10..=30),
            fault_gap: d / rng.random_range(1..=4),
            stop_failure: if witness == WitnessMode::Controller && rng.random_bool(0.3) { 0.03 } else { 0.0 },
            latencies: LATENCIES,
            first_checks: rng.random_bool(0.5),
            // Drawn last, so that the schedules without replicated controllers stay exactly
            // the ones they were before these existed.
            leaders: if witness == WitnessMode::Controller && rng.random_bool(0.25) {
                Some(Leaders::random(rng, d))
            } else {
                None
            },
        }
    }

    /// A clean crash measurement at the given timings: no chaos, random drift and latencies.
    pub fn failover_only(seed: u64, rng: &mut ChaCha8Rng, timings: Timings) -> Params {
        Params {
            seed,
            timings,
            links: 2,
            witness: WitnessMode::Controller,
            preferred: None,
            failback_auto: false,
            rates: random_rates(rng, timings.drift_ppm),
            chaos: Duration::ZERO,
            fault_gap: timings.dead_after,
            stop_failure: 0.0,
            latencies: LATENCIES,
            first_checks: true,
            leaders: None,
        }
    }

    pub fn group_key(&self) -> GroupKey {
        GroupKey::new("sim", "pair")
    }

    /// The group both engines run.
    pub fn group_config(&self) -> GroupConfig {
        let t = &self.timings;
        let addresses =
            |node: usize| (0..self.links).map(|l| format!("198.18.{l}.{}", node + 1)).collect::<Vec<_>>().join(", ");
        let preferred = |node: usize| self.preferred == Some(node);
        let yaml = format!(
            r#"
nodes:
  - {{name: {a}, heartbeatAddresses: [{aa}], preferred: {ap}}}
  - {{name: {b}, heartbeatAddresses: [{ba}], preferred: {bp}}}
heartbeat:
  interval: {i}ms
  deadAfter: {d}ms
  leaseTTL: {l}ms
  maxClockDriftPpm: {p}
witness: {{mode: {w}}}
failback: {{mode: {fb}, stabilization: {s}ms}}
virtualIPs:
  - {{name: svc, address: 198.18.9.100/24, interface: eth0}}
flow:
  - {{name: data, volume: {{volumeRef: {VOLUME}}}}}
  - {{name: app, exec: {{start: "true", stop: "true"}}, restart: {{limit: 2, window: 60s}}, check: {{exec: {{command: "true"}}, failureThreshold: 1}}}}
  - {{name: svc-ip, virtualIP: {{name: svc}}}}
monitors:
  - {{name: {MONITOR}, gateway: {{address: 198.18.9.254}}, action: failover, failureThreshold: 1}}
"#,
            a = NODES[0],
            b = NODES[1],
            aa = addresses(0),
            ba = addresses(1),
            ap = preferred(0),
            bp = preferred(1),
            i = t.interval.as_millis(),
            d = t.dead_after.as_millis(),
            l = t.lease.as_millis(),
            p = t.drift_ppm,
            w = if self.witness == WitnessMode::Controller { "controller" } else { "none" },
            fb = if self.failback_auto { "auto" } else { "manual" },
            s = (t.dead_after * 3).as_millis(),
        );
        let spec = serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("simulation group spec: {e}\n{yaml}"));
        GroupConfig {
            key: self.group_key(),
            generation: 1,
            spec,
            volumes: vec![],
            heartbeat_key: HeartbeatKey::Inline(String::new()),
            actions: vec![],
            deleting: false,
        }
    }

    /// Longest true duration of `d` measured on the slowest clock of this schedule.
    pub fn true_max(&self, d: Duration) -> u64 {
        let slowest = self.rates.iter().copied().min().unwrap_or(super::clock::PPB);
        let nanos = (d.as_nanos() * u128::from(super::clock::PPB)).div_ceil(u128::from(slowest));
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// Shortest true duration of `d` measured on the fastest clock.
    pub fn true_min(&self, d: Duration) -> u64 {
        let fastest = self.rates.iter().copied().max().unwrap_or(super::clock::PPB);
        u64::try_from(d.as_nanos() * u128::from(super::clock::PPB) / u128::from(fastest)).unwrap_or(0)
    }

    /// The failover bound this schedule must meet when the primary crashes and the
    /// standby (UpToDate) and the witness are connected, in true nanoseconds:
    ///
    /// `max heartbeat delay + max(deadAfter, L·(1+δ)) on the slowest clock
    ///  + witness round trip + flow start (volume, two steps, VIP)`
    ///
    /// (the witness round trip only with a witness). The last heartbeat reaches the
    /// standby at most one heartbeat delay after the crash; the standby notices the
    /// silence `deadAfter` later on its clock (its promise, `L·(1+δ)` after that
    /// heartbeat, ends no later when `L·(1+δ) ≤ deadAfter`); the witness answers within
    /// one round trip; then the flow starts. With every default this is below
    /// `deadAfter + witness RTT + leaseTTL`. On replicated controllers the round trip also
    /// holds the leader's etcd write, which comes before its answer.
    pub fn failover_bound(&self) -> u64 {
        let slowest = self.rates.iter().copied().min().unwrap_or(super::clock::PPB);
        let write = self.leaders.map_or(0, |l| l.write.max);
        bound(&self.timings, &self.latencies, self.witness, slowest) + write
    }

    /// What a change of leadership during the failover, with takeover delay `delay`, adds to
    /// [`Params::failover_bound`], in true nanoseconds:
    ///
    /// `delay + max(RTT + write + leaseTTL, L·(1+δ) + interval) (slowest clock) + RTT + write`
    ///
    /// and the flow start once more. Say the change comes just before the standby's grant
    /// would have been recorded. Until the successor is ready (`delay`), the deposed leader
    /// may still decide; its refused write is answered 503, as every other controller
    /// answers, and the engine asks again (the `leaseTTL` term is kept as a margin: it
    /// covered the denial such a write was answered with before). Once ready, the successor honours the lease its
    /// records name: if the crashed primary's last grant was never released, that is the
    /// grant's stretched ttl `L·(1+δ)` from the takeover, and the engine asks again within an
    /// interval of its end. Then one round trip with the successor's write grants the lease
    /// and the flow starts. None of this applies to schedules whose leadership stays put.
    pub fn takeover_extension(&self, delay: u64) -> u64 {
        let Some(leaders) = self.leaders else { return 0 };
        let l = &self.latencies;
        let rtt = 2 * l.witness.max + leaders.write.max;
        let retry = rtt + self.true_max(self.timings.lease);
        let held = self.true_max(self.timings.lease_wait() + self.timings.interval);
        delay + retry.max(held) + rtt + l.volume.max + 2 * l.step.max + l.vip.max
    }

    /// [`Params::failover_bound`] for the slowest clock the drift bound allows: the bound
    /// every schedule at these timings meets.
    pub fn worst_failover_bound(timings: &Timings, witness: WitnessMode) -> u64 {
        bound(timings, &LATENCIES, witness, slowest_rate(timings.drift_ppm))
    }
}

fn bound(timings: &Timings, l: &Latencies, witness: WitnessMode, slowest_ppb: u64) -> u64 {
    let wait = timings.dead_after.max(timings.lease_wait());
    let wait = (wait.as_nanos() * u128::from(super::clock::PPB)).div_ceil(u128::from(slowest_ppb));
    let wait = u64::try_from(wait).unwrap_or(u64::MAX);
    let witness = if witness == WitnessMode::Controller { 2 * l.witness.max } else { 0 };
    l.heartbeat.max + wait + witness + l.volume.max + 2 * l.step.max + l.vip.max
}

fn random_timings(rng: &mut ChaCha8Rng) -> Timings {
    let interval = rng.random_range(10..=150u64);
    let dead_after = interval * rng.random_range(8..=15u64);
    let lease = rng.random_range(5 * interval..=dead_after * 85 / 100);
    Timings {
        interval: Duration::from_millis(interval),
        dead_after: Duration::from_millis(dead_after),
        lease: Duration::from_millis(lease),
        drift_ppm: 10_000,
    }
}

fn random_rates(rng: &mut ChaCha8Rng, drift_ppm: u32) -> [u64; 3] {
    let lo = slowest_rate(drift_ppm);
    let hi = fastest_rate(lo, drift_ppm);
    let mut pick = || match rng.random_range(0..4) {
        0 => lo,
        1 => hi,
        _ => rng.random_range(lo..=hi),
    };
    [pick(), pick(), pick()]
}
