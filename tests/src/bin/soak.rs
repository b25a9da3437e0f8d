//! The chaos soak (`scripts/soak.sh`): a real pair with a protocol C volume and the
//! controller as witness through `--faults` seeded random faults; prints the counts and
//! the failover distribution, and exits non-zero unless there were zero instants with two
//! active nodes and zero lost acknowledged writes. Needs root.

use anyhow::Context as _;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Chaos soak of a real hapair pair: randomized faults, dual-active and lost-write checks")]
struct Args {
    /// How many faults to inject.
    #[arg(long, default_value_t = 100)]
    faults: usize,
    /// The seed of the fault sequence (printed at start and on failure); random if absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Leave out a fault kind (repeatable): node-killed, one-link-cut, all-links-cut,
    /// primary-isolated, witness-down, agent-restarted, controller-restarted.
    #[arg(long)]
    without: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "the soak builds network namespaces and must run as root");
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut config = hapair_tests::soak::Config::new(args.faults, seed);
    for name in &args.without {
        let kind = hapair_tests::soak::faults::kind_index(name).with_context(|| format!("no fault kind {name}"))?;
        config.kinds.retain(|&k| k != kind);
    }
    if !args.without.is_empty() {
        println!("fault kinds left out: {}", args.without.join(", "));
    }
    let report = hapair_tests::soak::run(&config).with_context(|| format!("soak with seed {seed}"))?;
    println!("\n{report}");
    if !report.ok() {
        let without: String = args.without.iter().map(|w| format!(" --without {w}")).collect();
        anyhow::bail!(
            "the soak failed; reproduce with: bash scripts/soak.sh --faults {} --seed {seed}{without}",
            args.faults
        );
    }
    Ok(())
}
