//! `bench-volume`: figures for replicated volumes, printed side by side in one run, all on
//! backing files in the same filesystem.
//!
//! 1. Writes through the NBD export: 4 KiB random FUA writes, one at a time (latency p50
//!    and p99), and 1 MiB sequential writes with 16 in flight followed by a FLUSH
//!    (throughput), for: a replicated pair with protocol C, the same with protocol A, our
//!    export with the peer down (unreplicated), our NBD server over the plain file, and
//!    `nbdkit file` on that same file.
//! 2. Resync after writing 16 MiB and 256 MiB scattered on a 4 GiB volume while
//!    disconnected: time and bytes on the replication socket, against `rsync --inplace`
//!    (delta transfer over the same link) bringing a copy of the stale image up to date.
//!
//! Targets (reported, not asserted): protocol C throughput of at least 85% of nbdkit file,
//! and resync bytes within 5% of the dirty bytes. Needs root; run it through
//! `scripts/bench-volume.sh`, which installs nbdkit, libnbd-bin, qemu-utils and rsync.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hapair_agent::nbd::export::FileExport;
use hapair_agent::nbd::server::NbdServer;
use hapair_tests::nbd_client::{NbdClient, write_stream};
use hapair_tests::netns::{ChildGuard, Netns};
use hapair_tests::replica_proc::{ReplicaPair, ReplicaProc, TestVolume, VolumeSpec, in_sync};
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(name = "bench-volume", about = "Replicated volume benchmark")]
struct Args {
    /// Volume size for the write benchmarks.
    #[arg(long, default_value = "1Gi")]
    size: String,
    #[arg(long, default_value_t = 2000)]
    latency_ops: usize,
    #[arg(long, default_value_t = 512)]
    throughput_mib: u64,
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// Dirty MiB for the resync runs.
    #[arg(long, value_delimiter = ',', default_value = "16,256")]
    resync_mib: Vec<u64>,
    #[arg(long)]
    skip_resync: bool,
}

const MIB: u64 = 1 << 20;

struct WriteRow {
    name: String,
    p50_us: f64,
    p99_us: f64,
    acked_mibs: f64,
    flushed_mibs: f64,
}

fn measure(name: &str, socket: &Path, args: &Args) -> Result<WriteRow> {
    let total = args.throughput_mib * MIB;
    let t =
        write_stream(socket, 0, total, 1 << 20, args.depth).with_context(|| format!("{name}: sequential writes"))?;
    let mut c = NbdClient::connect(socket, true).with_context(|| format!("{name}: connecting"))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let buf = vec![0x3cu8; 4096];
    let mut samples = Vec::with_capacity(args.latency_ops);
    for _ in 0..args.latency_ops {
        let off = rng.random_range(0..total / 4096) * 4096;
        let start = Instant::now();
        c.write(off, &buf, true).with_context(|| format!("{name}: FUA write"))?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    c.disconnect();
    samples.sort_by(f64::total_cmp);
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    let mib = args.throughput_mib as f64;
    Ok(WriteRow {
        name: name.to_string(),
        p50_us: pct(50),
        p99_us: pct(99),
        acked_mibs: mib / t.acked.as_secs_f64(),
        flushed_mibs: mib / t.flushed.as_secs_f64(),
    })
}

fn wait_for_socket(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} never accepted connections", path.display())
}

fn write_benchmarks(harness: &str, args: &Args) -> Result<Vec<WriteRow>> {
    let mut rows = Vec::new();
    for protocol in ["C", "A"] {
        let spec = VolumeSpec { size: args.size.clone(), protocol, al_extents: 257, ..VolumeSpec::default() };
        let mut pair = ReplicaPair::start(harness, &spec);
        pair.a.promote(1).map_err(anyhow::Error::msg)?;
        pair.b.wait("peer is primary", Duration::from_secs(10), |s| s["peerRole"] == "Primary");
        rows.push(measure(&format!("replicated, protocol {protocol}"), &pair.volume.socket("a"), args)?);
    }

    // The same export with its peer unreachable: no replication, same code path.
    let ns = Netns::new("hbn").map_err(anyhow::Error::msg)?;
    let dir = tempfile::Builder::new().prefix("hapair-bench").tempdir()?;
    let spec = VolumeSpec { size: args.size.clone(), al_extents: 257, ..VolumeSpec::default() };
    let vol = TestVolume::new(dir.path(), &spec, "198.18.0.1".parse()?, "198.18.0.2".parse()?);
    let mut solo =
        ReplicaProc::start(harness, Some(&ns), &vol.path, "a", &vol.socket("a"), &[]).map_err(anyhow::Error::msg)?;
    solo.promote_forced(1).map_err(anyhow::Error::msg)?;
    rows.push(measure("unreplicated, our export (peer down)", &vol.socket("a"), args)?);
    solo.shutdown();

    // Our NBD server over the plain file, then nbdkit on the very same file.
    let backing = vol.backing("a");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let sock = dir.path().join("file.sock");
    let export = Arc::new(FileExport::open("file", &backing)?);
    let server = rt.block_on(NbdServer::start(export, &sock, None))?;
    rows.push(measure("our NBD server, plain file", &sock, args)?);
    drop(server);

    let sock = dir.path().join("nbdkit.sock");
    let child = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(&backing)
        .stdout(Stdio::null())
        .spawn()
        .context("starting nbdkit (install the nbdkit package)")?;
    let _nbdkit = ChildGuard::new(child, "nbdkit");
    wait_for_socket(&sock)?;
    rows.push(measure("nbdkit file", &sock, args)?);
    Ok(rows)
}

struct ResyncRow {
    dirty_mib: u64,
    resync_ms: u64,
    resync_wall_ms: u64,
    resync_bytes: u64,
    rsync_ms: u64,
    rsync_bytes: u64,
}

fn stat(text: &str, label: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
    line.split(':').nth(1)?.split_whitespace().next()?.replace(',', "").parse().ok()
}

fn resync_benchmark(harness: &str, dirty_mib: u64) -> Result<ResyncRow> {
    let spec = VolumeSpec { size: "4Gi".into(), al_extents: 257, ..VolumeSpec::default() };
    let mut pair = ReplicaPair::start(harness, &spec);
    pair.a.promote(1).map_err(anyhow::Error::msg)?;
    pair.net.cut().map_err(anyhow::Error::msg)?;
    pair.a.wait("disconnection", Duration::from_secs(10), |s| s["connection"] != "Connected");
    pair.b.wait("disconnection", Duration::from_secs(10), |s| s["connection"] != "Connected");
    let chunk = 64 << 10;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(dirty_mib);
    let mut slots = BTreeSet::new();
    while (slots.len() as u64) < dirty_mib * MIB / chunk {
        slots.insert(rng.random_range(0..(4 << 30) / chunk));
    }
    let mut c = NbdClient::connect(&pair.volume.socket("a"), true)?;
    let data = vec![0x6du8; chunk as usize];
    for &s in &slots {
        c.write(s * chunk, &data, false)?;
    }
    c.flush()?;
    c.disconnect();
    let dirty = slots.len() as u64 * chunk;
    let s = pair.a.wait("tracked changes", Duration::from_secs(10), |s| s["outOfSyncBytes"] == dirty);
    let before = s["wireSentBytes"].as_u64().unwrap_or(0);

    // rsync's starting point: the stale replica as it is now.
    let stale = pair.volume.dir.join("rsync-target.img");
    let out = Command::new("cp").arg("--sparse=always").arg(pair.volume.backing("b")).arg(&stale).output()?;
    if !out.status.success() {
        bail!("copying the stale image: {}", String::from_utf8_lossy(&out.stderr));
    }

    let start = Instant::now();
    pair.net.heal().map_err(anyhow::Error::msg)?;
    let a = pair.a.wait("resync", Duration::from_secs(600), in_sync);
    pair.b.wait("resync", Duration::from_secs(600), in_sync);
    let resync_wall_ms = start.elapsed().as_millis() as u64;
    let resync_bytes = a["wireSentBytes"].as_u64().unwrap_or(0) - before;
    let resync_ms = a["counters"]["lastSyncMs"].as_u64().unwrap_or(0);

    // rsync --inplace over the same link: a daemon on b, the client on a.
    let conf = pair.volume.dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "[vol]\n path = {}\n read only = false\n use chroot = false\n uid = root\n gid = root\n",
            pair.volume.dir.display()
        ),
    )?;
    let daemon = pair
        .net
        .b
        .command("rsync")
        .args(["--daemon", "--no-detach", "--address=198.18.0.2", "--port=8873"])
        .arg(format!("--config={}", conf.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _daemon = ChildGuard::new(daemon, "rsync daemon");
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let out = pair
        .net
        .a
        .command("rsync")
        .args(["--inplace", "--no-whole-file", "--stats"])
        .arg(pair.volume.backing("a"))
        .arg("rsync://198.18.0.2:8873/vol/rsync-target.img")
        .output()?;
    let rsync_ms = start.elapsed().as_millis() as u64;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("rsync failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    let rsync_bytes = stat(&text, "Total bytes sent").unwrap_or(0) + stat(&text, "Total bytes received").unwrap_or(0);
    Ok(ResyncRow { dirty_mib, resync_ms, resync_wall_ms, resync_bytes, rsync_ms, rsync_bytes })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-volume builds network namespaces: run it as root (scripts/bench-volume.sh)");
    }
    let harness: PathBuf = std::env::current_exe()?.with_file_name("replica-harness");
    if !harness.exists() {
        bail!("{} is missing: build it with cargo build --release -p hapair-tests", harness.display());
    }
    let harness = harness.display().to_string();

    println!(
        "== writes through the NBD export ({} volume; sync writes: 4 KiB FUA, one at a time, {} ops; sequential: 1 MiB x {} in flight, {} MiB then FLUSH)",
        args.size, args.latency_ops, args.depth, args.throughput_mib
    );
    let rows = write_benchmarks(&harness, &args)?;
    let nbdkit = rows.iter().find(|r| r.name == "nbdkit file").map_or(0.0, |r| r.flushed_mibs);
    println!(
        "{:<38} {:>10} {:>10} {:>14} {:>16} {:>10}",
        "configuration", "p50 us", "p99 us", "acked MiB/s", "+flush MiB/s", "vs nbdkit"
    );
    for r in &rows {
        println!(
            "{:<38} {:>10.0} {:>10.0} {:>14.1} {:>16.1} {:>9.0}%",
            r.name,
            r.p50_us,
            r.p99_us,
            r.acked_mibs,
            r.flushed_mibs,
            100.0 * r.flushed_mibs / nbdkit.max(f64::MIN_POSITIVE)
        );
    }
    if let Some(c) = rows.iter().find(|r| r.name.ends_with("protocol C")) {
        println!(
            "target: protocol C >= 85% of nbdkit file throughput: {:.0}% ({})",
            100.0 * c.flushed_mibs / nbdkit.max(f64::MIN_POSITIVE),
            if c.flushed_mibs >= 0.85 * nbdkit { "met" } else { "NOT met" }
        );
    }

    if !args.skip_resync {
        println!();
        println!("== resync after scattered writes on a 4 GiB volume while disconnected (64 KiB chunks)");
        println!(
            "{:>10} {:>12} {:>12} {:>16} {:>10} {:>12} {:>16}",
            "dirty MiB", "resync ms", "(wall ms)", "resync bytes", "x dirty", "rsync ms", "rsync bytes"
        );
        for &mib in &args.resync_mib {
            let r = resync_benchmark(&harness, mib)?;
            let dirty = (r.dirty_mib * MIB) as f64;
            println!(
                "{:>10} {:>12} {:>12} {:>16} {:>10.4} {:>12} {:>16}",
                r.dirty_mib,
                r.resync_ms,
                r.resync_wall_ms,
                r.resync_bytes,
                r.resync_bytes as f64 / dirty,
                r.rsync_ms,
                r.rsync_bytes
            );
            println!(
                "target: resync bytes within 5% of the dirty bytes: {}",
                if (r.resync_bytes as f64) <= dirty * 1.05 { "met" } else { "NOT met" }
            );
        }
    }
    Ok(())
}
