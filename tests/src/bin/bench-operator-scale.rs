//! `bench-operator-scale`: the Kubernetes operator at a thousand groups.
//!
//! The operator's leader term (kube-runtime controllers, the shared reconcile core, the
//! Kubernetes store, the node API router with the fenced witness) runs against a fake API
//! server (`hapair_tests::fake_kube`) holding 1000 HaGroups (every tenth with a
//! ReplicatedVolume). The fake is served over HTTP by this program started again as a
//! child process, so its copy of every object is not counted as the operator's memory.
//! Agents are simulated by handing reports straight to the core, as the node API would.
//! Printed:
//!
//! 1. the time to reconcile every group (finalizer added, state saved, status applied);
//! 2. the time to take in the first round of reports from the 2000 agents, which then keep
//!    reporting every few seconds as real agents do;
//! 3. the steady-state request rate to the API while agents keep reporting an unchanged
//!    state (target: zero writes);
//! 4. peak memory of the operator's process (VmHWM; target: under 150 MiB), next to the
//!    heap actually in use, counted by a global allocator wrapper, so that allocator slack
//!    and real growth can be told apart;
//! 5. the witness under 1000 groups failing over at once: grants per second and latency
//!    percentiles through the node API router and the `LeaseAuthority` seam.
//!
//! `cargo run --release -p hapair-tests --bin bench-operator-scale`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hapair_crds::hagroup::Hardware;
use hapair_crds::nodeapi::{GroupKey, LeaseOp, LeaseRequest, LeaseResponse, NodeReport, paths};
use hapair_operator::controller::metrics::Metrics;
use hapair_operator::k8s::election::{FencedAuthority, Leadership};
use hapair_operator::k8s::term::{Term, TermConfig};
use hapair_operator::pki::Ca;
use hapair_operator::server::Peer;
use hapair_operator::server::identity::PeerIdentity;
use hapair_operator::witness::Witness;
use hapair_tests::fake_kube::{Counts, FakeApi, Tally, control};
use hapair_tests::simulated_reports::settled_report;
use serde_json::{Value, json};
use tower::ServiceExt;

#[derive(Parser, Debug)]
#[command(about = "Operator scale benchmark: reconcile, steady-state API traffic, memory and witness throughput")]
struct Args {
    /// HaGroups to create.
    #[arg(long, default_value_t = 1000)]
    groups: usize,
    /// Length of the steady-state window.
    #[arg(long, default_value_t = 20)]
    steady_seconds: u64,
    /// How often every simulated agent reports during the steady state.
    #[arg(long, default_value_t = 5)]
    report_every_seconds: u64,
    /// Internal: be the fake API server (the benchmark starts itself with this), holding the
    /// objects for `--groups`, and print the port it listens on.
    #[arg(long, hide = true)]
    serve_fake_api: bool,
}

const NAMESPACES: usize = 20;

fn node_names(i: usize) -> (String, String) {
    (format!("n{i}-a"), format!("n{i}-b"))
}

fn address(n: usize) -> String {
    format!("198.18.{}.{}", n / 250, n % 250 + 1)
}

fn key(i: usize) -> GroupKey {
    GroupKey::new(format!("ns{}", i % NAMESPACES), format!("g{i}"))
}

fn has_volume(i: usize) -> bool {
    i.is_multiple_of(10)
}

fn group(i: usize) -> Value {
    let (a, b) = node_names(i);
    let key = key(i);
    let mut spec = json!({
        "nodes": [
            {"name": a, "heartbeatAddresses": [address(2 * i)]},
            {"name": b, "heartbeatAddresses": [address(2 * i + 1)]},
        ],
        "virtualIPs": [{"name": "www", "address": format!("198.19.{}.{}/16", i / 250, i % 250 + 1), "interface": "eth0"}],
    });
    if has_volume(i) {
        spec["flow"] = json!([{"name": "data", "volume": {"volumeRef": format!("data{i}"), "mountPath": "/srv"}}]);
    }
    json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "HaGroup",
        "metadata": {"name": key.name, "namespace": key.namespace},
        "spec": spec,
    })
}

fn volume(i: usize) -> Value {
    let (a, b) = node_names(i);
    let key = key(i);
    json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "ReplicatedVolume",
        "metadata": {"name": format!("data{i}"), "namespace": key.namespace},
        "spec": {"group": key.name, "size": "1Gi", "backing": [{"node": a, "path": "/srv/data.img"}, {"node": b, "path": "/srv/data.img"}]},
    })
}

fn report(i: usize, primary: bool, uptime: u64) -> (String, NodeReport) {
    let (a, b) = node_names(i);
    let node = if primary { a } else { b };
    let volume = has_volume(i).then(|| format!("data{i}"));
    let hardware =
        Hardware { cpus: 8, cpu_percent: (uptime % 100) as u32, memory_bytes: 16 << 30, ..Hardware::default() };
    let report = settled_report(&node, key(i), primary, volume, hardware, uptime);
    (node, report)
}

/// Counts the bytes the program has allocated and not freed, and their peak: the heap the
/// program really uses, apart from what the allocator keeps around (fragmentation across
/// its per-thread arenas), which RSS also counts.
struct CountingAllocator;

static HEAP_NOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static HEAP_PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: every call is passed on unchanged to the system allocator; only counters change.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY: same contract as our caller's.
        let ptr = unsafe { std::alloc::System.alloc(layout) };
        if !ptr.is_null() {
            let now = HEAP_NOW.fetch_add(layout.size(), Relaxed) + layout.size();
            HEAP_PEAK.fetch_max(now, Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        HEAP_NOW.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// A `/proc/self/status` figure in KiB (`VmHWM`: peak resident set, `VmRSS`: current).
fn proc_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn peak_rss_kib() -> Option<u64> {
    proc_kib("VmHWM:")
}

fn memory_line() -> String {
    let mib = |kib: Option<u64>| kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "?".into());
    let heap = |bytes: usize| format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
    format!(
        "RSS now {}, peak {}; heap in use {}, peak {}",
        mib(proc_kib("VmRSS:")),
        mib(proc_kib("VmHWM:")),
        heap(HEAP_NOW.load(std::sync::atomic::Ordering::Relaxed)),
        heap(HEAP_PEAK.load(std::sync::atomic::Ordering::Relaxed)),
    )
}

/// The fake API server in a process of its own, so that this process's memory is the
/// operator's (plus the simulated agents'), not also a second copy of every object.
struct FakeApiProcess {
    child: std::process::Child,
    base: String,
    http: reqwest::Client,
}

impl FakeApiProcess {
    fn start(groups: usize) -> anyhow::Result<FakeApiProcess> {
        let exe = std::env::current_exe().context("finding this program")?;
        let mut child = std::process::Command::new(exe)
            .args(["--serve-fake-api", "--groups", &groups.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the fake API server process")?;
        let stdout = child.stdout.take().context("the fake API server's stdout")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .context("reading the fake API server's port")?;
        let port: u16 = line.trim().parse().with_context(|| format!("the fake API server said {line:?}"))?;
        Ok(FakeApiProcess { child, base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() })
    }

    fn client(&self) -> anyhow::Result<kube::Client> {
        let config = kube::Config::new(self.base.parse().context("the fake API server's URL")?);
        kube::Client::try_from(config).context("a client of the fake API server")
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.http.get(format!("{}{path}", self.base)).send().await?.error_for_status()?;
        Ok(response.json().await?)
    }

    async fn counts(&self) -> anyhow::Result<Counts> {
        self.get(control::COUNTS).await
    }

    async fn writes_by(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        self.get(control::WRITES).await
    }

    async fn groups(&self) -> anyhow::Result<Tally> {
        self.get(&format!("{}hagroups?finalizer=hapair.dev/cleanup", control::TALLY)).await
    }

    /// Peak resident set of the fake API server's process.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for FakeApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--serve-fake-api`: holds the objects, prints the port, serves until stdin closes (the
/// benchmark ended, however it ended).
async fn serve_fake_api(groups: usize) -> anyhow::Result<()> {
    let api = FakeApi::new();
    for i in 0..groups {
        api.insert("hagroups", group(i));
        if has_volume(i) {
            api.insert("replicatedvolumes", volume(i));
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    tokio::select! {
        served = api.serve(listener) => served?,
        _ = tokio::io::AsyncReadExt::read_to_end(&mut stdin, &mut sink) => {}
    }
    Ok(())
}

async fn all_reconciled(api: &FakeApiProcess, groups: usize) -> anyhow::Result<bool> {
    let tally = api.groups().await?;
    let with_status = tally.objects - tally.phases.get("none").copied().unwrap_or(0);
    Ok(tally.objects == groups && tally.finalized == groups && with_status == groups)
}

async fn all_healthy(api: &FakeApiProcess) -> anyhow::Result<bool> {
    let tally = api.groups().await?;
    Ok(tally.phases.get("Healthy").copied().unwrap_or(0) == tally.objects)
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while !done().await? {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn print_counts(label: &str, counts: &Counts, seconds: f64) {
    let rate = |n: u64| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
    println!(
        "  {label}: {} reads ({:.1}/s), {} writes ({:.1}/s) [creates {}, replaces {}, patches {}, status applies {}], {} watches opened",
        counts.reads(),
        rate(counts.reads()),
        counts.writes(),
        rate(counts.writes()),
        counts.creates,
        counts.replaces,
        counts.patches,
        counts.status_applies,
        counts.watches,
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    // As hapair-operator's main does, before any thread exists.
    let arenas = hapair_operator::support::allocator::limit_arenas();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.serve_fake_api {
        return runtime.block_on(serve_fake_api(args.groups));
    }
    runtime.block_on(bench(args, arenas))
}

async fn bench(args: Args, arenas: bool) -> anyhow::Result<()> {
    // Quiet by default; RUST_LOG=info shows what the operator does.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let groups = args.groups;
    println!("operator-scale: {groups} HaGroups in {NAMESPACES} namespaces, every tenth with a ReplicatedVolume");
    println!(
        "  API server: a fake (list/watch/get/create/replace/patch/apply) in a process of its own, over HTTP, counted per request"
    );
    println!(
        "  allocator: glibc limited to {} arenas as in hapair-operator ({})",
        hapair_operator::support::allocator::MALLOC_ARENAS,
        if arenas { "accepted" } else { "refused" }
    );

    let api = FakeApiProcess::start(groups)?;
    let client = api.client()?;
    println!("  objects in the fake API server; this process: {}", memory_line());
    let metrics = Arc::new(Metrics::new());
    let (ca, _) = Ca::generate().context("creating a CA")?;
    let leadership = Leadership::new();
    let now = Instant::now();
    leadership.set(Some(now + Duration::from_secs(3600)), now);
    let witness =
        FencedAuthority::new(Box::new(Witness::new(Duration::ZERO)), leadership.clone(), Duration::from_secs(2));
    let config = TermConfig::new("hapair-system", "bench-0", "hapair-state", "hapair-tokens");

    // 1. Reconcile everything.
    let started = Instant::now();
    let term = Term::start(client, Arc::new(ca), &config, Some(Box::new(witness)), metrics.clone())
        .await
        .context("starting the term")?;
    let term_ready = started.elapsed();
    println!("  term started; {}", memory_line());
    wait_for("every group reconciled", Duration::from_secs(600), || all_reconciled(&api, groups)).await?;
    term.core().flush().await.context("flushing status writes")?;
    let reconciled = started.elapsed();
    let after_reconcile = api.counts().await?;
    println!();
    println!("1. reconcile all");
    println!(
        "  caches filled and first full reconcile done after {:.2}s; every group with finalizer and status after {:.2}s",
        term_ready.as_secs_f64(),
        reconciled.as_secs_f64()
    );
    println!(
        "  full core reconciles: {} for {} objects (per-object reconciles coalesce into shared full runs)",
        metrics.reconcile_count(),
        groups + groups / 10
    );
    print_counts("API requests", &after_reconcile, reconciled.as_secs_f64());
    let writes_after_reconcile = api.writes_by().await?;
    println!("  writes by resource: {writes_after_reconcile:?}");
    println!("  {}", memory_line());

    // 2. The agents start reporting (every few seconds, as they do) and keep at it.
    let core = term.core().clone();
    let every = Duration::from_secs(args.report_every_seconds.max(1));
    let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reports_started = Instant::now();
    let first_round = Arc::new(tokio::sync::Notify::new());
    let agents = {
        let (core, rounds, first_round) = (core.clone(), rounds.clone(), first_round.clone());
        tokio::spawn(async move {
            let mut uptime = 100;
            loop {
                let round_started = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..groups {
                    for primary in [true, false] {
                        let core = core.clone();
                        tasks.spawn(async move {
                            let (node, report) = report(i, primary, uptime);
                            core.accept_report(&node, report, hapair_crds::nodeapi::NODE_API_VERSION)
                                .await
                                .map_err(|e| anyhow::anyhow!("{e}"))
                        });
                    }
                }
                while let Some(done) = tasks.join_next().await {
                    done??;
                }
                if rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    first_round.notify_one();
                }
                uptime += every.as_secs();
                tokio::time::sleep(every.saturating_sub(round_started.elapsed())).await;
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    };
    first_round.notified().await;
    let reports_taken = reports_started.elapsed();
    if let Err(e) = wait_for("every group Healthy", Duration::from_secs(120), || all_healthy(&api)).await {
        let phases = api.groups().await.map(|t| t.phases).unwrap_or_default();
        println!("  phases in the API: {phases:?}; agents finished: {}", agents.is_finished());
        println!("  rounds of reports: {}", rounds.load(std::sync::atomic::Ordering::SeqCst));
        return Err(e);
    }
    core.flush().await.context("flushing status writes")?;
    let reports_written = reports_started.elapsed();
    let after_reports = api.counts().await?;
    println!();
    println!("2. agents report (each of {} agents every {}s)", 2 * groups, every.as_secs());
    println!(
        "  first round of {} reports taken in {:.2}s ({:.0} reports/s); every status Healthy in the API after {:.2}s",
        2 * groups,
        reports_taken.as_secs_f64(),
        (2 * groups) as f64 / reports_taken.as_secs_f64(),
        reports_written.as_secs_f64()
    );
    print_counts("API requests", &after_reports.since(&after_reconcile), reports_written.as_secs_f64());
    let delta: BTreeMap<String, u64> = api
        .writes_by()
        .await?
        .into_iter()
        .map(|(k, v)| {
            let before = writes_after_reconcile.get(&k).copied().unwrap_or(0);
            (k, v - before)
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    println!("  writes by resource: {delta:?}");
    println!("  {}", memory_line());

    // 3. Steady state: agents keep reporting, nothing changes.
    let window = Duration::from_secs(args.steady_seconds);
    let rounds_before = rounds.load(std::sync::atomic::Ordering::SeqCst);
    let steady_started = Instant::now();
    tokio::time::sleep(window).await;
    if agents.is_finished() {
        agents.await??;
        bail!("the simulated agents stopped");
    }
    agents.abort();
    let steady = api.counts().await?.since(&after_reports);
    let seconds = steady_started.elapsed().as_secs_f64();
    let steady_rounds = rounds.load(std::sync::atomic::Ordering::SeqCst) - rounds_before;
    println!();
    println!(
        "3. steady state: {:.0}s, {} reports ({} rounds of one report per agent), periodic reconciles every 2s",
        seconds,
        steady_rounds * 2 * groups as u64,
        steady_rounds
    );
    print_counts("API requests", &steady, seconds);
    println!("  {}", memory_line());
    println!(
        "  target: zero writes when nothing changes -> {} (leader-election renewals, 1 write per 2s, are outside the term and not counted here)",
        if steady.writes() == 0 { "met" } else { "NOT met" }
    );

    // 4. Memory.
    println!();
    match peak_rss_kib() {
        Some(kib) => println!(
            "4. peak RSS (VmHWM) of the operator's process: {:.1} MiB (target under 150 MiB; the simulated agents' reports are built here too) -> {}",
            kib as f64 / 1024.0,
            if kib < 150 * 1024 { "met" } else { "NOT met" }
        ),
        None => println!("4. peak RSS: /proc/self/status has no VmHWM"),
    }
    println!(
        "  heap peak (bytes allocated and not yet freed, without the allocator's own slack): {:.1} MiB",
        HEAP_PEAK.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
    );
    if let Some(kib) = api.peak_rss_kib() {
        println!("  (the fake API server's own process, not counted: peak RSS {:.1} MiB)", kib as f64 / 1024.0);
    }

    // 5. The witness: every group's standby asks for the lease at once.
    let router = term.router();
    let ttl = 800;
    let wave = |round: &'static str, primary: bool| {
        let router = router.clone();
        async move {
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..groups {
                let router = router.clone();
                tasks.spawn(async move {
                    let (a, b) = node_names(i);
                    let node = if primary { a } else { b };
                    let request =
                        LeaseRequest { group: key(i), node: node.clone(), op: LeaseOp::Acquire, epoch: 2, ttl_ms: ttl };
                    let mut http = http::Request::builder()
                        .method("POST")
                        .uri(paths::LEASE)
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(serde_json::to_vec(&request).unwrap_or_default()))
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let addr: SocketAddr = "127.0.0.1:40000".parse().map_err(|e| anyhow::anyhow!("{e}"))?;
                    http.extensions_mut().insert(Peer { identity: PeerIdentity::Node(node), addr });
                    let sent = Instant::now();
                    let response = router.oneshot(http).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    let status = response.status();
                    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let took = sent.elapsed();
                    if !status.is_success() {
                        bail!("lease request answered {status}: {}", String::from_utf8_lossy(&body));
                    }
                    let answer: LeaseResponse = serde_json::from_slice(&body)?;
                    Ok::<_, anyhow::Error>((took, matches!(answer, LeaseResponse::Granted { .. })))
                });
            }
            let mut latencies = Vec::with_capacity(groups);
            let mut granted = 0usize;
            while let Some(done) = tasks.join_next().await {
                let (took, grant) = done??;
                latencies.push(took);
                granted += usize::from(grant);
            }
            let wall = started.elapsed();
            latencies.sort();
            println!(
                "  {round}: {granted} granted, {} denied in {:.1} ms -> {:.0} answers/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                groups - granted,
                wall.as_secs_f64() * 1000.0,
                groups as f64 / wall.as_secs_f64(),
                percentile(&latencies, 50.0).as_secs_f64() * 1000.0,
                percentile(&latencies, 99.0).as_secs_f64() * 1000.0,
                latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
            );
            Ok::<_, anyhow::Error>(granted)
        }
    };
    println!();
    println!(
        "5. witness: {groups} groups failing over at once, through the node API router and the fenced LeaseAuthority seam"
    );
    println!("  (authority: the real witness state machine, fenced by leadership, its restart wait-out long over)");
    let granted = wave("standbys acquire", false).await?;
    let denied_wave = wave("old primaries retry while the standbys hold", true).await?;
    println!(
        "  witness decisions counted by the operator's metrics: {} granted, {} denied",
        metrics.witness_decisions("granted"),
        metrics.witness_decisions("denied")
    );
    if granted != groups || denied_wave != 0 {
        bail!("the witness must grant every standby once and deny every retrying old primary");
    }
    term.stop();
    Ok(())
}
