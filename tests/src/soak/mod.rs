//! The chaos soak: a pair with a protocol C replicated volume and the standalone
//! controller as its witness, a client writing through the volume's export, and a seeded
//! sequence of faults (a node killed, one heartbeat link cut, all of them, the primary
//! isolated, the witness down and back, an agent restarted, the controller restarted).
//! After each fault is healed the pair must be healthy again within a bound, every
//! acknowledged write must read back from the current primary, and no instant may have
//! two nodes provably holding the virtual IP or both accepting volume writes.
//!
//! - [`faults`]: the faults, their schedule, injection and healing.
//! - [`writer`]: the client's write path (raw 4 KiB FUA writes over NBD, following the
//!   primary) and the lost-write checker.
//! - [`roles`]: which node's agent claims the primary role, polled continuously.
//! - [`watch`]: the samplers of VIP presence and volume writability, and the overlap
//!   analysis.
//!
//! Run by `bash scripts/soak.sh` (the `soak` binary) and, briefly, by `tests/soak.rs`.

pub mod faults;
pub mod roles;
pub mod watch;
pub mod writer;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::{Rng, SeedableRng};

use crate::enrolled_pair::{EnrolledPair, PairOptions, other};
use faults::{Fault, KINDS};
use watch::Watch;
use writer::{Writer, WriterTotals};

/// The probe blocks (one per node), far from the writer's data blocks.
const PROBE_BLOCK: [u64; 2] = [2000, 2001];

#[derive(Clone, Debug)]
pub struct Config {
    pub faults: usize,
    pub seed: u64,
    /// Heartbeat interval, deadAfter, leaseTTL.
    pub timing: (Duration, Duration, Duration),
    /// How long the pair may take to be healthy again after a fault is healed.
    pub heal_timeout: Duration,
    /// Heal an isolated primary only once its replica has demoted.
    pub heal_isolated_after_demotion: bool,
    /// The fault kinds to draw from (indices into [`faults::KINDS`]).
    pub kinds: Vec<usize>,
}

impl Config {
    pub fn new(faults: usize, seed: u64) -> Config {
        Config {
            faults,
            seed,
            timing: (Duration::from_millis(100), Duration::from_millis(1000), Duration::from_millis(700)),
            heal_timeout: Duration::from_secs(60),
            heal_isolated_after_demotion: true,
            kinds: (0..KINDS.len()).collect(),
        }
    }
}

/// What happened with one fault.
#[derive(Clone, Debug)]
pub struct FaultRecord {
    pub fault: Fault,
    pub description: String,
    pub primary_before: &'static str,
    pub primary_after: &'static str,
    /// From the injection to the new primary holding the VIP, for a failover.
    pub vip_up: Option<Duration>,
    /// From the injection to the writer's first acknowledged write on the new primary.
    pub writes_resumed: Option<Duration>,
    /// From the heal to the pair healthy again.
    pub recovered: Duration,
    pub blocks_checked: usize,
}

#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub faults: Vec<FaultRecord>,
    /// (fault index, overlap) where both nodes provably held the VIP.
    pub dual_vip: Vec<(usize, Duration)>,
    /// (fault index, overlap) where both nodes' exports provably accepted writes.
    pub dual_writable: Vec<(usize, Duration)>,
    /// (fault index, node) of each write a node acknowledged while the other provably held
    /// the VIP.
    pub acked_by_old: Vec<(usize, &'static str)>,
    pub lost: Vec<String>,
    pub writer: WriterTotals,
    pub samples: (usize, usize),
    pub elapsed: Duration,
    /// Set when the run stopped early: why.
    pub aborted: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.dual_vip.is_empty()
            && self.dual_writable.is_empty()
            && self.acked_by_old.is_empty()
            && self.lost.is_empty()
            && self.aborted.is_none()
    }

    pub fn history(&self) -> String {
        let mut out = String::new();
        for (i, f) in self.faults.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {:>3}. {} (primary {} -> {})",
                i + 1,
                f.description,
                f.primary_before,
                f.primary_after
            );
        }
        out
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

/// min / p50 / p90 / max in ms.
fn spread(times: &[Duration]) -> String {
    if times.is_empty() {
        return "none".into();
    }
    let mut t = times.to_vec();
    t.sort();
    let q = |p: f64| t[((t.len() - 1) as f64 * p).round() as usize];
    format!(
        "min {} / p50 {} / p90 {} / max {} ms (n={})",
        ms(t[0]),
        ms(q(0.5)),
        ms(q(0.9)),
        ms(t[t.len() - 1]),
        t.len()
    )
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "chaos soak, seed {}: {} faults in {:.1} min",
            self.seed,
            self.faults.len(),
            self.elapsed.as_secs_f64() / 60.0
        )?;
        let mut kinds: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for r in &self.faults {
            let k = KINDS.iter().position(|k| *k == r.fault.kind()).unwrap_or(0);
            let e = kinds.entry(k).or_default();
            e.0 += 1;
            e.1 += usize::from(r.primary_before != r.primary_after);
        }
        writeln!(f, "  faults per kind (failovers):")?;
        for (k, (n, fo)) in &kinds {
            writeln!(f, "    {:<22} {n:>3} ({fo})", KINDS[*k])?;
        }
        let failovers: Vec<&FaultRecord> = self.faults.iter().filter(|r| r.primary_before != r.primary_after).collect();
        let vip: Vec<Duration> = failovers.iter().filter_map(|r| r.vip_up).collect();
        let writes: Vec<Duration> = failovers.iter().filter_map(|r| r.writes_resumed).collect();
        writeln!(f, "  failovers: {}", failovers.len())?;
        writeln!(f, "    fault to VIP on the new primary:       {}", spread(&vip))?;
        writeln!(f, "    fault to first write acked by it:      {}", spread(&writes))?;
        for kind in KINDS {
            let v: Vec<Duration> =
                failovers.iter().filter(|r| r.fault.kind() == kind).filter_map(|r| r.writes_resumed).collect();
            if !v.is_empty() {
                writeln!(f, "      {kind:<22} writes resumed {}", spread(&v))?;
            }
        }
        let recovered: Vec<Duration> = self.faults.iter().map(|r| r.recovered).collect();
        writeln!(f, "  heal to healthy pair (in sync):          {}", spread(&recovered))?;
        let w = &self.writer;
        writeln!(
            f,
            "  writer: {} writes acknowledged ({} attempts, {} refused or cut off, {} connections), {} distinct blocks; \
             {} block reads checked",
            w.acked,
            w.attempts,
            w.failures,
            w.reconnects,
            w.blocks,
            self.faults.iter().map(|r| r.blocks_checked).sum::<usize>()
        )?;
        writeln!(f, "  VIP samples {} , writability samples {}", self.samples.0, self.samples.1)?;
        writeln!(f, "  instants with two nodes holding the VIP:       {}", self.dual_vip.len())?;
        writeln!(f, "  instants with both exports accepting writes:   {}", self.dual_writable.len())?;
        writeln!(f, "  writes acked by a node while the other held the VIP: {}", self.acked_by_old.len())?;
        for (i, n) in &self.acked_by_old {
            writeln!(f, "    fault {}: a write acknowledged by {n} while the other node held the VIP", i + 1)?;
        }
        writeln!(f, "  lost acknowledged writes:                      {}", self.lost.len())?;
        for (i, d) in &self.dual_vip {
            writeln!(f, "    dual VIP during fault {} for {} ms", i + 1, ms(*d))?;
        }
        for (i, d) in &self.dual_writable {
            writeln!(f, "    dual writable during fault {} for {} ms", i + 1, ms(*d))?;
        }
        for l in &self.lost {
            writeln!(f, "    {l}")?;
        }
        if let Some(why) = &self.aborted {
            writeln!(f, "  ABORTED: {why}")?;
        }
        Ok(())
    }
}

/// The node that is primary of a healthy pair: it serves the client on the VIP, the
/// other stands by hearing it, and both replicas are UpToDate and connected.
fn healthy_primary(p: &EnrolledPair) -> Option<&'static str> {
    let primary = ["a", "b"].into_iter().find(|n| p.role(n).as_deref() == Some("Primary"))?;
    let standby = other(primary);
    let (g, vs, vp) = (p.report(standby)?, p.volume(standby)?, p.volume(primary)?);
    let ok = g["role"] == "Standby"
        && g["peerReachable"] == true
        && vs["diskState"] == "UpToDate"
        && vs["connection"] == "Connected"
        && vp["diskState"] == "UpToDate"
        && vp["connection"] == "Connected"
        && p.has_vip(primary)
        && !p.has_vip(standby);
    (ok && p.ask()? == primary).then_some(primary)
}

fn serving(p: &EnrolledPair, node: &str) -> bool {
    p.role(node).as_deref() == Some("Primary") && p.has_vip(node)
}

fn log_tails(p: &EnrolledPair) -> String {
    format!(
        "---- agent a ----\n{}\n---- agent b ----\n{}\n---- controller ----\n{}\n---- status ----\n{}",
        p.agents[0].log_tail(40),
        p.agents[1].log_tail(40),
        p.controller.log_tail(30),
        p.describe()
    )
}

/// Stops the role pollers however the run ends.
struct StopRoles(roles::Roles);

impl Drop for StopRoles {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Copies the agents' and the controller's whole logs out of the run's temporary
/// directory (removed with the pair), so a failed run can be studied.
fn keep_logs(p: &EnrolledPair, seed: u64) {
    let dir = std::env::temp_dir().join(format!("hapair-soak-{seed}-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let logs = [
        ("agent-a.log", p.agents[0].log_path()),
        ("agent-b.log", p.agents[1].log_path()),
        ("controller.log", p.controller.log.clone()),
    ];
    for (name, from) in logs {
        let _ = std::fs::copy(from, dir.join(name));
    }
    eprintln!("full logs kept in {}", dir.display());
}

/// Runs the soak. An `Err` is a run that could not be carried out (the pair never came
/// up); a run whose checks failed returns a [`Report`] that is not [`Report::ok`].
pub fn run(config: &Config) -> anyhow::Result<Report> {
    println!("chaos soak: seed {} ({} faults); reproduce with --seed {}", config.seed, config.faults, config.seed);
    let started = Instant::now();
    let options = PairOptions { witness: "controller", volume: true, timing: config.timing, ..PairOptions::default() };
    let mut pair = std::panic::catch_unwind(|| EnrolledPair::start(options))
        .map_err(|_| anyhow::anyhow!("the pair did not start (see the logs above)"))?;
    let vip_cidr = pair.options.vip_cidr();
    let roles = roles::Roles::start([pair.topo.a.name(), pair.topo.b.name()]);
    let _stop_roles = StopRoles(roles.clone());
    let mut vip = [Watch::vip(pair.topo.a.name(), vip_cidr), Watch::vip(pair.topo.b.name(), vip_cidr)];
    let mut writable = [
        Watch::writable(pair.nbd_socket("a"), PROBE_BLOCK[0], roles.clone(), 0),
        Watch::writable(pair.nbd_socket("b"), PROBE_BLOCK[1], roles.clone(), 1),
    ];
    let writer = Writer::start([("a", pair.nbd_socket("a")), ("b", pair.nbd_socket("b"))], config.seed, roles.clone());
    let writing = crate::netns::wait_for(Duration::from_secs(20), || (writer.acks_since(started) > 0).then_some(()));
    anyhow::ensure!(writing.is_some(), "the writer got no write acknowledged by a healthy pair:\n{}", log_tails(&pair));
    println!("pair up and written to after {:.1} s", started.elapsed().as_secs_f64());

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed);
    let mut report = Report {
        seed: config.seed,
        faults: Vec::new(),
        dual_vip: Vec::new(),
        dual_writable: Vec::new(),
        acked_by_old: Vec::new(),
        lost: Vec::new(),
        writer: WriterTotals::default(),
        samples: (0, 0),
        elapsed: Duration::ZERO,
        aborted: None,
    };
    let mut primary: &'static str = "a";
    let mut window = Instant::now();
    for (i, kind) in faults::schedule(&mut rng, &config.kinds, config.faults).into_iter().enumerate() {
        let fault = faults::draw(&mut rng, kind, primary);
        let description = fault.describe(primary);
        println!("fault {}/{}: {description}", i + 1, config.faults);
        match one_fault(&mut pair, &writer, &vip, config, &mut rng, fault, primary) {
            Ok(mut record) => {
                record.description = description;
                let socket = pair.nbd_socket(record.primary_after);
                match writer.verify(&socket) {
                    Ok(n) => record.blocks_checked = n,
                    Err(problems) => {
                        eprintln!(
                            "LOST WRITES after fault {} (seed {}):\n{}\n{}",
                            i + 1,
                            config.seed,
                            problems.join("\n"),
                            log_tails(&pair)
                        );
                        report.lost.extend(problems.into_iter().map(|p| format!("after fault {}: {p}", i + 1)));
                    }
                }
                primary = record.primary_after;
                report.faults.push(record);
            }
            Err(e) => {
                let why = format!("fault {} ({description}): {e:#}", i + 1);
                eprintln!("{why}\n{}", log_tails(&pair));
                report.faults.push(FaultRecord {
                    fault,
                    description,
                    primary_before: primary,
                    primary_after: "?",
                    vip_up: None,
                    writes_resumed: None,
                    recovered: Duration::ZERO,
                    blocks_checked: 0,
                });
                report.aborted = Some(why);
            }
        }
        let now = Instant::now();
        for (d, watches) in [(&mut report.dual_vip, &vip), (&mut report.dual_writable, &writable)] {
            for (from, to) in watch::overlaps(&watches[0].since(window), &watches[1].since(window)) {
                eprintln!("BOTH NODES ACTIVE during fault {} for {} ms (seed {})", i + 1, ms(to - from), config.seed);
                d.push((i, to - from));
            }
        }
        // A write acknowledged by one node while the other provably serves on the VIP is a
        // second active node too, seen from the client.
        let held = [watch::surely_held(&vip[0].since(window)), watch::surely_held(&vip[1].since(window))];
        for ack in writer.acks_after(window) {
            let other_side = usize::from(ack.node == "a");
            if held[other_side].iter().any(|&(from, to)| from <= ack.at && ack.at <= to) {
                eprintln!(
                    "WRITE ACKNOWLEDGED BY {} WHILE THE OTHER NODE HELD THE VIP during fault {} (seed {})",
                    ack.node,
                    i + 1,
                    config.seed
                );
                report.acked_by_old.push((i, ack.node));
            }
        }
        window = now;
        if report.aborted.is_some() {
            break;
        }
    }
    report.samples = (vip[0].count() + vip[1].count(), writable[0].count() + writable[1].count());
    report.writer = writer.finish();
    for w in vip.iter_mut().chain(writable.iter_mut()) {
        w.stop();
    }
    report.elapsed = started.elapsed();
    if !report.ok() {
        eprintln!("fault history (seed {}):\n{}", config.seed, report.history());
        keep_logs(&pair, config.seed);
    }
    Ok(report)
}

/// Injects, holds and heals one fault, waits for a healthy pair and measures the failover.
fn one_fault(
    p: &mut EnrolledPair,
    writer: &Writer,
    vip: &[Watch; 2],
    config: &Config,
    rng: &mut impl Rng,
    fault: Fault,
    primary: &'static str,
) -> anyhow::Result<FaultRecord> {
    let t0 = Instant::now();
    faults::inject(p, fault).context("injecting")?;
    if fault.removes_primary(primary) {
        // Held until the other node has taken over, so that the fault, not its healing,
        // is what the failover answers.
        let took = crate::netns::wait_for(config.heal_timeout, || serving(p, other(primary)).then_some(()));
        anyhow::ensure!(took.is_some(), "{} did not take over within {:?}", other(primary), config.heal_timeout);
        if matches!(fault, Fault::IsolatePrimary(_)) && config.heal_isolated_after_demotion {
            // Reconnecting the old primary while its replica is still primary (its volume
            // step's flush waits for the lost peer) ends in a split brain; see the README.
            let demoted =
                crate::netns::wait_for(config.heal_timeout, || (p.volume(primary)?["role"] != "Primary").then_some(()));
            anyhow::ensure!(demoted.is_some(), "the isolated {primary} did not demote its replica");
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..800)));
    } else {
        std::thread::sleep(Duration::from_millis(rng.random_range(1000..3000)));
    }
    faults::heal(p, fault).context("healing")?;
    let healed = Instant::now();
    let after = crate::netns::wait_for(config.heal_timeout, || healthy_primary(p));
    let after =
        after.ok_or_else(|| anyhow::anyhow!("the pair was not healthy {:?} after the heal", config.heal_timeout))?;
    let recovered = healed.elapsed();
    let (mut vip_up, mut writes_resumed) = (None, None);
    if after != primary {
        let i = usize::from(after != "a");
        vip_up = watch::first_held(&vip[i].since(t0), t0).map(|at| at - t0);
        // The writer moves over on its own once the old primary refuses it.
        writes_resumed =
            crate::netns::wait_for(Duration::from_secs(30), || writer.first_ack_after(after, t0)).map(|at| at - t0);
        anyhow::ensure!(writes_resumed.is_some(), "the writer got no write acknowledged by the new primary {after}");
    } else {
        let resumed = crate::netns::wait_for(Duration::from_secs(30), || (writer.acks_since(healed) > 0).then_some(()));
        anyhow::ensure!(resumed.is_some(), "the writer got no write acknowledged after the heal");
    }
    Ok(FaultRecord {
        fault,
        description: String::new(),
        primary_before: primary,
        primary_after: after,
        vip_up,
        writes_resumed,
        recovered,
        blocks_checked: 0,
    })
}
