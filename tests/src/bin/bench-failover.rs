//! `bench-failover`: failover time of real pairs in network namespaces, hapair next to
//! keepalived, in one run on the same topology with the same client.
//!
//! For each implementation the primary is killed N times (default 30; `--kills` or
//! `HAPAIR_BENCH_KILLS`, `--quick` for 3) and the time from the kill to the first TCP
//! connection to the virtual IP answered by the other server is measured; the table shows
//! p50, p99 and max per implementation, the time both servers held the VIP at once, and for
//! hapair the mean and p99 of each phase of the takeover. See `hapair_tests::failover_bench`
//! for what a kill and a restore are. Needs root; `scripts/bench-failover.sh` installs keepalived, builds
//! and runs it.
//!
//! `bench-failover serve` is the service the pairs keep reachable (internal).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hapair_tests::failover_bench::hapair::{Hapair, Stack};
use hapair_tests::failover_bench::keepalived::{self, Keepalived};
use hapair_tests::failover_bench::probe::{DEFAULT_PACE, Pace};
use hapair_tests::failover_bench::report::{Row, render};
use hapair_tests::failover_bench::{
    HaPair, KILL_JITTER, Measured, Testbed, interrupt, interrupted, measure, service, service_address,
};
use hapair_tests::sim::{AGGRESSIVE_TIMINGS, DEFAULT_TIMINGS};

#[derive(Parser, Debug)]
#[command(name = "bench-failover", about = "Failover time of hapair and keepalived pairs in network namespaces")]
struct Cli {
    #[command(subcommand)]
    command: Option<Internal>,
    /// Kills of the primary per implementation.
    #[arg(long, env = "HAPAIR_BENCH_KILLS", default_value_t = 30)]
    kills: usize,
    /// Three kills per implementation: checks the harness quickly.
    #[arg(long)]
    quick: bool,
    /// Only these implementations (comma-separated): hapair-witness, hapair-full,
    /// hapair-full-aggressive, hapair-nowitness, hapair-nowitness-aggressive,
    /// keepalived-1s, keepalived-0.1s.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The hapair-agent binary; defaults to the one next to this program.
    #[arg(long, env = "HAPAIR_AGENT")]
    agent: Option<PathBuf>,
    /// Keep each testbed's work directory (configurations, daemon logs) and print its path.
    #[arg(long)]
    keep_work: bool,
}

#[derive(Subcommand, Debug)]
enum Internal {
    /// Answer every TCP connection on PORT with NAME (the benchmark's service).
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        /// Bind, then continue in the background and write the server's pid to --pid-file.
        #[arg(long, requires = "pid_file")]
        daemon: bool,
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Increment the number in this file, durably, on every connection, and answer
        /// with NAME and the new number.
        #[arg(long)]
        counter: Option<PathBuf>,
    },
}

const IMPLEMENTATIONS: [&str; 7] = [
    "hapair-witness",
    "hapair-full",
    "hapair-full-aggressive",
    "hapair-nowitness",
    "hapair-nowitness-aggressive",
    "keepalived-1s",
    "keepalived-0.1s",
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before anything starts a thread: the daemon forks.
    if let Some(Internal::Serve { name, port, daemon, pid_file, counter }) = &cli.command {
        let listener = service::bind(*port)?;
        let counter = counter.as_deref();
        return match pid_file {
            Some(pid_file) if *daemon => Ok(service::daemonize(&listener, name, counter, pid_file)?),
            _ => Ok(service::serve(&listener, name, counter)?),
        };
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-failover builds network namespaces and must run as root");
    }
    let kills = if cli.quick { 3 } else { cli.kills };
    if kills == 0 {
        bail!("--kills must be at least 1");
    }
    for name in &cli.only {
        if !IMPLEMENTATIONS.contains(&name.as_str()) {
            bail!("--only: unknown implementation {name:?} (expected one of {})", IMPLEMENTATIONS.join(", "));
        }
    }
    catch_interrupts()?;

    let program = std::env::current_exe().context("locating this program")?;
    let agent = cli.agent.clone().unwrap_or_else(|| program.with_file_name("hapair-agent"));
    let selected: Vec<&str> =
        IMPLEMENTATIONS.into_iter().filter(|id| cli.only.is_empty() || cli.only.iter().any(|o| o == id)).collect();
    let keepalived = if selected.iter().any(|id| id.starts_with("keepalived")) {
        keepalived::find_program()?
    } else {
        PathBuf::new()
    };
    if selected.iter().any(|id| id.starts_with("hapair")) && !agent.exists() {
        bail!("{} not found: build it with `cargo build -p hapair-agent` (or pass --agent)", agent.display());
    }
    let pace = DEFAULT_PACE;

    println!("failover benchmark: {kills} kills of the primary per implementation");
    println!(
        "kill: after a random pause of up to {} ms, both links of the primary go down, then every process in its \
         namespace gets SIGKILL; measured until the first TCP connection from the client to {} is answered by the \
         other server",
        KILL_JITTER.as_millis(),
        service_address()
    );
    println!(
        "client: a new connection attempt every {} ms, each given up after {} ms",
        pace.every.as_millis(),
        pace.attempt_timeout.as_millis()
    );
    println!(
        "restore: the killed server reboots (VIP, neighbour cache and run directory gone, links up), restarts its HA \
         software and must settle as the standby while the survivor keeps the service; roles alternate"
    );

    let mut rows = Vec::new();
    for id in selected {
        if interrupted() {
            break;
        }
        let mut pair: Box<dyn HaPair> = match id {
            "hapair-witness" => Box::new(Hapair::new("witness", DEFAULT_TIMINGS, true, Stack::Service, agent.clone())),
            "hapair-full" => Box::new(Hapair::new("full", DEFAULT_TIMINGS, true, Stack::Volume, agent.clone())),
            "hapair-full-aggressive" => {
                Box::new(Hapair::new("full aggressive", AGGRESSIVE_TIMINGS, true, Stack::Volume, agent.clone()))
            }
            "hapair-nowitness" => {
                Box::new(Hapair::new("no-witness (unsafe)", DEFAULT_TIMINGS, false, Stack::Service, agent.clone()))
            }
            "hapair-nowitness-aggressive" => Box::new(Hapair::new(
                "no-witness aggressive (unsafe)",
                AGGRESSIVE_TIMINGS,
                false,
                Stack::Service,
                agent.clone(),
            )),
            "keepalived-1s" => Box::new(Keepalived::new(keepalived.clone(), Duration::from_secs(1))),
            _ => Box::new(Keepalived::new(keepalived.clone(), Duration::from_millis(100))),
        };
        let (label, parameters) = (pair.label(), pair.parameters());
        let result = run_one(pair.as_mut(), &program, kills, pace, cli.keep_work);
        drop(pair);
        rows.push(Row { label, parameters, result });
    }
    println!();
    print!("{}", render(&rows));
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Measures one implementation on a testbed of its own, removed before returning (after
/// `pair` has stopped its processes).
fn run_one(pair: &mut dyn HaPair, program: &Path, kills: usize, pace: Pace, keep_work: bool) -> Measured {
    let bed = match Testbed::build_keeping(program.to_path_buf(), keep_work) {
        Ok(bed) => bed,
        Err(e) => return Measured { error: Some(format!("building the testbed: {e}")), ..Measured::default() },
    };
    eprintln!("{}: testbed namespaces: {}", pair.label(), bed.namespace_names().join(" "));
    if keep_work {
        eprintln!("{}: work directory (kept): {}", pair.label(), bed.work_dir().display());
    }
    let measured = measure(pair, &bed, kills, pace, &mut |line| eprintln!("{line}"));
    // The implementation's processes go first, then the namespaces.
    for node in hapair_tests::failover_bench::Node::BOTH {
        pair.node_killed(node);
    }
    drop(bed);
    measured
}

/// Ctrl-C, SIGTERM and SIGHUP stop the run at the next wait, so every guard cleans up.
fn catch_interrupts() -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    // Blocked here, in the main thread, before any other thread exists: every thread
    // inherits the mask, so only the waiter below ever sees these signals. Children get
    // a clean mask from std's spawn.
    signals.thread_block().context("blocking signals")?;
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            eprintln!("{signal}: stopping and cleaning up");
            interrupt();
        }
    });
    Ok(())
}
