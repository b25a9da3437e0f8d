//! `bench-volume`: figures for replicated volumes, printed side by side in one run, all on
//! backing files in the same filesystem.
//!
//! 1. Through the NBD export, for a replicated pair with protocol C, the same with
//!    protocol A, our export with the peer down (unreplicated), our NBD server over the
//!    plain file, and `nbdkit file` on that same file, each measured with this program's
//!    own client and with an independent one, fio's `nbd` engine:
//!    - 1 MiB sequential writes, 8 in flight, then a FLUSH (throughput until the flush is
//!      acknowledged);
//!    - 4 KiB random writes, each followed by a FLUSH, one at a time (IOPS; latency p50 and
//!      p99 of the pair from our client);
//!    - 1 MiB sequential reads, 8 in flight;
//!    - the peak RSS of each replica process.
//! 2. Resync after writing 16 MiB and 256 MiB scattered on a 4 GiB volume while
//!    disconnected: time and bytes on the replication socket, against `rsync --inplace`
//!    (delta transfer over the same link) bringing a copy of the stale image up to date.
//!
//! Targets (reported as met or not, never asserted), as shares of `nbdkit file`: protocol
//! C sequential writes 90%, sync-write IOPS 75%; protocol A 95% on both; reads 95%; resync
//! bytes within 5% of the dirty bytes. Needs root; run it through `scripts/bench-volume.sh`,
//! which installs nbdkit, libnbd-bin, qemu-utils, rsync and fio.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hapair_agent::nbd::export::FileExport;
use hapair_agent::nbd::server::NbdServer;
use hapair_tests::nbd_client::{NbdClient, read_stream, write_stream};
use hapair_tests::netns::{ChildGuard, Netns};
use hapair_tests::replica_proc::{ReplicaPair, ReplicaProc, TestVolume, VolumeSpec, in_sync};
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(name = "bench-volume", about = "Replicated volume benchmark")]
struct Args {
    /// Volume size for the write benchmarks.
    #[arg(long, default_value = "1Gi")]
    size: String,
    /// 4 KiB write + flush pairs for the sync-write figures.
    #[arg(long, default_value_t = 2000)]
    latency_ops: usize,
    /// MiB written (and then read) sequentially in 1 MiB requests.
    #[arg(long, default_value_t = 512)]
    throughput_mib: u64,
    /// Requests in flight for the sequential runs.
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// Dirty MiB for the resync runs.
    #[arg(long, value_delimiter = ',', default_value = "16,256")]
    resync_mib: Vec<u64>,
    #[arg(long)]
    skip_resync: bool,
    /// Leave out the fio runs (for machines without the fio package).
    #[arg(long)]
    skip_fio: bool,
}

const MIB: u64 = 1 << 20;

/// One client's figures for one configuration.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    /// 1 MiB sequential writes, `depth` in flight, until the final flush is acknowledged.
    write_mibs: f64,
    /// 4 KiB random writes, each followed by a flush, one at a time.
    sync_iops: f64,
    sync_p50_us: f64,
    sync_p99_us: f64,
    /// 1 MiB sequential reads, `depth` in flight.
    read_mibs: f64,
}

struct Row {
    name: String,
    ours: Figures,
    fio: Option<Figures>,
    /// Peak RSS of the primary's and the peer's replica process, KiB.
    peak_rss_kib: Option<(u64, u64)>,
}

fn percentile(sorted: &[f64], p: usize) -> f64 {
    sorted.get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0.0)
}

fn measure_ours(name: &str, socket: &Path, args: &Args) -> Result<Figures> {
    let total = args.throughput_mib * MIB;
    let t =
        write_stream(socket, 0, total, 1 << 20, args.depth).with_context(|| format!("{name}: sequential writes"))?;
    let read =
        read_stream(socket, 0, total, 1 << 20, args.depth).with_context(|| format!("{name}: sequential reads"))?;
    let mut c = NbdClient::connect(socket, true).with_context(|| format!("{name}: connecting"))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let buf = vec![0x3cu8; 4096];
    let mut samples = Vec::with_capacity(args.latency_ops);
    let all = Instant::now();
    for _ in 0..args.latency_ops {
        let off = rng.random_range(0..total / 4096) * 4096;
        let start = Instant::now();
        c.write(off, &buf, false).with_context(|| format!("{name}: 4 KiB write"))?;
        c.flush().with_context(|| format!("{name}: flush"))?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let sync_iops = args.latency_ops as f64 / all.elapsed().as_secs_f64();
    c.disconnect();
    samples.sort_by(f64::total_cmp);
    let mib = args.throughput_mib as f64;
    Ok(Figures {
        write_mibs: mib / t.flushed.as_secs_f64(),
        sync_iops,
        sync_p50_us: percentile(&samples, 50),
        sync_p99_us: percentile(&samples, 99),
        read_mibs: mib / read.as_secs_f64(),
    })
}

/// Runs one fio job through its `nbd` engine and returns the parsed JSON report's job.
fn fio_job(socket: &Path, options: &[String]) -> Result<serde_json::Value> {
    let out = Command::new("fio")
        .arg("--output-format=json")
        .arg("--name=bench")
        .arg("--ioengine=nbd")
        .arg(format!("--uri=nbd+unix:///?socket={}", socket.display()))
        .args(options)
        .output()
        .context("running fio (install the fio package)")?;
    if !out.status.success() {
        bail!(
            "fio {options:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let json = text.find('{').map_or("", |i| &text[i..]);
    let report: serde_json::Value = serde_json::from_str(json).context("parsing fio's JSON report")?;
    let job = report["jobs"][0].clone();
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio {options:?} reported error {}", job["error"]);
    }
    Ok(job)
}

fn measure_fio(socket: &Path, args: &Args) -> Result<Figures> {
    let size = format!("--size={}m", args.throughput_mib);
    let depth = format!("--iodepth={}", args.depth);
    let seq = |rw: &str| vec![format!("--rw={rw}"), "--bs=1m".into(), depth.clone(), size.clone()];
    let mut write = seq("write");
    write.push("--end_fsync=1".into());
    let write = fio_job(socket, &write)?;
    let read = fio_job(socket, &seq("read"))?;
    let sync = fio_job(
        socket,
        &[
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=1".into(),
            "--fsync=1".into(),
            size.clone(),
            format!("--number_ios={}", args.latency_ops),
        ],
    )?;
    let kib = |v: &serde_json::Value| v["bw"].as_f64().unwrap_or(0.0) / 1024.0;
    Ok(Figures {
        write_mibs: kib(&write["write"]),
        sync_iops: sync["write"]["iops"].as_f64().unwrap_or(0.0),
        // fio times the write and the flush apart; the pair's latency comes from our client.
        sync_p50_us: f64::NAN,
        sync_p99_us: f64::NAN,
        read_mibs: kib(&read["read"]),
    })
}

fn measure(name: &str, socket: &Path, args: &Args) -> Result<(Figures, Option<Figures>)> {
    let ours = measure_ours(name, socket, args)?;
    let fio =
        if args.skip_fio { None } else { Some(measure_fio(socket, args).with_context(|| format!("{name}: fio"))?) };
    Ok((ours, fio))
}

/// Writes back and drops the page cache, so every row starts from the same cold cache
/// instead of inheriting the previous row's dirty pages and writeback.
fn cold_cache() {
    let _ = Command::new("sync").status();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("warning: could not drop the page cache ({e}); rows may see each other's cache");
    }
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

fn write_benchmarks(harness: &str, args: &Args) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for protocol in ["C", "A"] {
        let spec = VolumeSpec { size: args.size.clone(), protocol, al_extents: 257, ..VolumeSpec::default() };
        let mut pair = ReplicaPair::start(harness, &spec);
        cold_cache();
        pair.a.promote(1).map_err(anyhow::Error::msg)?;
        pair.b.wait("peer is primary", Duration::from_secs(10), |s| s["peerRole"] == "Primary");
        let name = format!("replicated, protocol {protocol}");
        let (ours, fio) = measure(&name, &pair.volume.socket("a"), args)?;
        let peak_rss_kib = pair.a.peak_rss_kib().zip(pair.b.peak_rss_kib());
        rows.push(Row { name, ours, fio, peak_rss_kib });
    }

    // The same export with its peer unreachable: no replication, same code path.
    let ns = Netns::new("hbn").map_err(anyhow::Error::msg)?;
    let dir = tempfile::Builder::new().prefix("hapair-bench").tempdir()?;
    let spec = VolumeSpec { size: args.size.clone(), al_extents: 257, ..VolumeSpec::default() };
    let vol = TestVolume::new(dir.path(), &spec, "198.18.0.1".parse()?, "198.18.0.2".parse()?);
    let mut solo =
        ReplicaProc::start(harness, Some(&ns), &vol.path, "a", &vol.socket("a"), &[]).map_err(anyhow::Error::msg)?;
    solo.promote_forced(1).map_err(anyhow::Error::msg)?;
    cold_cache();
    let name = "unreplicated, our export (peer down)".to_string();
    let (ours, fio) = measure(&name, &vol.socket("a"), args)?;
    rows.push(Row { name, ours, fio, peak_rss_kib: solo.peak_rss_kib().map(|a| (a, 0)) });
    solo.shutdown();

    // Our NBD server over a plain file, then nbdkit on another one of the same size and
    // filesystem. Each row gets files of its own: writing over pages already in the page
    // cache is much cheaper than filling new ones, and a row reusing the previous row's
    // file would be measured against a warm cache.
    let size = std::fs::metadata(vol.backing("a"))?.len();
    let plain = |name: &str| -> Result<PathBuf> {
        let path = dir.path().join(name);
        std::fs::File::create_new(&path)?.set_len(size)?;
        Ok(path)
    };
    let backing = plain("plain.img")?;
    cold_cache();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let sock = dir.path().join("file.sock");
    let export = Arc::new(FileExport::open("file", &backing)?);
    let server = rt.block_on(NbdServer::start(export, &sock, None))?;
    let name = "our NBD server, plain file".to_string();
    let (ours, fio) = measure(&name, &sock, args)?;
    rows.push(Row { name, ours, fio, peak_rss_kib: None });
    drop(server);

    let sock = dir.path().join("nbdkit.sock");
    let backing = plain("nbdkit.img")?;
    cold_cache();
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
    let name = "nbdkit file".to_string();
    let (ours, fio) = measure(&name, &sock, args)?;
    rows.push(Row { name, ours, fio, peak_rss_kib: None });
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

/// The filesystem type holding `dir`, for the header: the figures depend on it.
fn filesystem_of(dir: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "an unknown filesystem".into())
}

fn print_rows(rows: &[Row]) {
    println!(
        "{:<38} {:>8} {:>12} {:>9} {:>9} {:>9} {:>12} {:>9} {:>9} {:>18}",
        "configuration",
        "seq MB/s",
        "fio seq MB/s",
        "sync IOPS",
        "fio IOPS",
        "p50 us",
        "p99 us",
        "read MB/s",
        "fio read",
        "peak RSS MiB (a/b)"
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
    for r in rows {
        let rss = r.peak_rss_kib.map_or_else(
            || "-".to_string(),
            |(a, b)| if b == 0 { format!("{}", a / 1024) } else { format!("{} / {}", a / 1024, b / 1024) },
        );
        println!(
            "{:<38} {:>8.0} {:>12} {:>9.0} {:>9} {:>9.0} {:>12.0} {:>9.0} {:>9} {:>18}",
            r.name,
            r.ours.write_mibs,
            opt(r.fio.map(|f| f.write_mibs)),
            r.ours.sync_iops,
            opt(r.fio.map(|f| f.sync_iops)),
            r.ours.sync_p50_us,
            r.ours.sync_p99_us,
            r.ours.read_mibs,
            opt(r.fio.map(|f| f.read_mibs)),
            rss
        );
    }
    println!(
        "(MB/s here are MiB/s. Peak RSS is each replica process's VmHWM; what one NBD client can hold \
         in flight is bounded at {} MiB of data, {} requests.)",
        hapair_agent::nbd::server::MAX_IN_FLIGHT_BYTES >> 20,
        hapair_agent::nbd::server::MAX_IN_FLIGHT
    );
}

/// Prints each target of the replication work as met or not, per client.
fn print_targets(rows: &[Row]) {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let Some(base) = find("nbdkit file") else { return };
    println!();
    println!("targets, as a share of nbdkit file on the same backing:");
    let check = |what: &str, row: &str, target: f64, figure: fn(&Figures) -> f64| {
        let Some(r) = find(row) else { return };
        let clients: Vec<(&str, Figures, Figures)> = std::iter::once(("own client", r.ours, base.ours))
            .chain(r.fio.zip(base.fio).map(|(f, b)| ("fio", f, b)))
            .collect();
        for (client, f, b) in clients {
            let share = figure(&f) / figure(&b).max(f64::MIN_POSITIVE);
            println!(
                "  {what:<52} {client:<10} {:>5.0}% (target {:.0}%): {}",
                100.0 * share,
                100.0 * target,
                if share >= target { "met" } else { "NOT met" }
            );
        }
    };
    let c = "replicated, protocol C";
    let a = "replicated, protocol A";
    check("protocol C, 1 MiB sequential writes + flush", c, 0.90, |f| f.write_mibs);
    check("protocol C, 4 KiB write + flush, one at a time (IOPS)", c, 0.75, |f| f.sync_iops);
    check("protocol A, 1 MiB sequential writes + flush", a, 0.95, |f| f.write_mibs);
    check("protocol A, 4 KiB write + flush, one at a time (IOPS)", a, 0.95, |f| f.sync_iops);
    check("protocol C, 1 MiB sequential reads", c, 0.95, |f| f.read_mibs);
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
        "== through the NBD export ({} volume, backings on {}): sequential: 1 MiB x {} in flight, {} MiB, then FLUSH; \
         reads: the same, 1 MiB x {}; sync: 4 KiB random write + FLUSH, one at a time, {} pairs",
        args.size,
        filesystem_of(&std::env::temp_dir()),
        args.depth,
        args.throughput_mib,
        args.depth,
        args.latency_ops,
    );
    let rows = write_benchmarks(&harness, &args)?;
    print_rows(&rows);
    print_targets(&rows);

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
