//! `bench-failover-sim`: the simulated failover-time distribution.
//!
//! For each timing setting, runs many clean crash measurements: the pair boots, settles
//! (one primary, one UpToDate standby, the witness reachable), the primary's machine
//! crashes, and the time until the standby serves (volume promoted, flow up, VIP added)
//! is recorded in true simulated time. Clock rates (within the drift bound), heartbeat
//! and witness latencies and command durations are random per run.
//!
//! Run with `cargo run --release -p hapair-tests --bin bench-failover-sim`.

use anyhow::{Context, bail};
use clap::Parser;
use hapair_crds::hagroup::WitnessMode;
use hapair_tests::sim::{AGGRESSIVE_TIMINGS, DEFAULT_TIMINGS, Options, Params, Timings, World};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Parser, Debug)]
#[command(about = "Simulated failover-time distribution at default and aggressive timings")]
struct Cli {
    /// Crash measurements per timing setting.
    #[arg(long, default_value_t = 2_000)]
    runs: u64,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

struct Figures {
    p50: f64,
    p99: f64,
    max: f64,
}

fn measure(name: &str, timings: Timings, cli: &Cli) -> anyhow::Result<Figures> {
    let mut times = Vec::with_capacity(usize::try_from(cli.runs).unwrap_or(0));
    for i in 0..cli.runs {
        let seed = cli.seed.wrapping_add(i);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let params = Params::failover_only(seed, &mut rng, timings);
        let outcome = World::new(params, Options::default())
            .run()
            .map_err(|f| anyhow::anyhow!("{name}: {f}"))
            .with_context(|| format!("seed {seed}"))?;
        // The simulation already failed the run if it exceeded its own exact bound.
        let Some(ns) = outcome.failover_ns else { bail!("{name}: seed {seed} measured no failover") };
        times.push(ns as f64 / 1e6);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    Ok(Figures { p50: at(0.5), p99: at(0.99), max: at(1.0) })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.runs == 0 {
        bail!("--runs must be at least 1");
    }
    println!("simulated failover: primary machine crash -> standby serving (true time)");
    println!(
        "latencies: heartbeat 0.05-1.5 ms one way, witness 0.3-4 ms one way, volume 1-5 ms, steps 1-8 ms, VIP 0.2-2 ms"
    );
    println!(
        "{:<11} {:>30} {:>6} {:>9} {:>9} {:>9} {:>15} {:>16}",
        "setting", "heartbeat/deadAfter/lease", "runs", "p50 ms", "p99 ms", "max ms", "exact bound ms", "D+RTT+L ms"
    );
    for (name, timings) in [("default", DEFAULT_TIMINGS), ("aggressive", AGGRESSIVE_TIMINGS)] {
        let f = measure(name, timings, &cli)?;
        let bound = Params::worst_failover_bound(&timings, WitnessMode::Controller) as f64 / 1e6;
        let rtt = 2.0 * hapair_tests::sim::params::LATENCIES.witness.max as f64 / 1e6;
        let loose = (timings.dead_after + timings.lease).as_secs_f64() * 1e3 + rtt;
        println!(
            "{name:<11} {:>30} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>15.1} {:>16.1}",
            format!(
                "{} ms/{} ms/{} ms",
                timings.interval.as_millis(),
                timings.dead_after.as_millis(),
                timings.lease.as_millis()
            ),
            cli.runs,
            f.p50,
            f.p99,
            f.max,
            bound,
            loose
        );
        let within = if f.p99 <= bound { "within" } else { "OUTSIDE" };
        println!("  p99 {:.1} ms is {within} the exact bound {bound:.1} ms (drift {} ppm)", f.p99, timings.drift_ppm);
    }
    println!(
        "exact bound = max heartbeat delay + max(deadAfter, L*(1+drift)) on the slowest clock allowed \
         + max witness RTT + flow start (volume + 2 steps + VIP); every run is also checked against its own bound"
    );
    Ok(())
}
