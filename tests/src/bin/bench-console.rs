//! `bench-console`: the web console's server side at a hundred groups.
//!
//! A standalone controller (the file store, a temporary manifest directory) holds
//! `--groups` HaGroups, each with two nodes that report as real agents do, every tenth group
//! with a ReplicatedVolume. Requests go through the node API's router with a signed-in
//! session cookie, the way the page sends them. Printed:
//!
//! 1. the time the controller takes to answer `GET /ui/api/overview` (what the page renders
//!    the overview from) and to produce the stream's first event: median, p99 and max over
//!    `--requests` requests (target: under 200 ms);
//! 2. the memory of the CPU and memory charts' history after an hour of reports, next to
//!    its bound.
//!
//! `cargo run --release -p hapair-tests --bin bench-console`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::http::{Request, header};
use clap::Parser;
use hapair_crds::hagroup::Hardware;
use hapair_crds::nodeapi::{GroupKey, NodeReport};
use hapair_operator::console::Console;
use hapair_operator::console::session::{ConsoleKeys, ConsoleRole};
use hapair_operator::controller::metrics::Metrics;
use hapair_operator::controller::{Controller, Settings};
use hapair_operator::pki::Ca;
use hapair_operator::server::identity::PeerIdentity;
use hapair_operator::server::{ApiSettings, NodeApi, Peer, router};
use hapair_operator::standalone::file_store::FileStore;
use hapair_operator::status::usage::{SAMPLE_EVERY_MS, SAMPLES, UsageHistory};
use hapair_tests::simulated_reports::settled_report;
use http_body_util::BodyExt;
use tower::ServiceExt;

#[derive(Parser, Debug)]
#[command(about = "Console benchmark: overview answer time and chart memory")]
struct Args {
    #[arg(long, default_value_t = 100)]
    groups: usize,
    #[arg(long, default_value_t = 200)]
    requests: usize,
}

fn manifest(i: usize) -> String {
    let mut text = format!(
        "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {{name: g{i}}}\nspec:\n  nodes:\n    - {{name: n{i}a, heartbeatAddresses: [198.18.{}.{}]}}\n    - {{name: n{i}b, heartbeatAddresses: [198.19.{}.{}]}}\n  virtualIPs: [{{name: ip, address: 198.18.255.{}/24, interface: eth0}}]\n  flow: [{{name: ip, virtualIP: {{name: ip}}}}]\n",
        i / 250,
        i % 250 + 1,
        i / 250,
        i % 250 + 1,
        i % 250 + 1
    );
    if i.is_multiple_of(10) {
        text.push_str(&format!(
            "---\napiVersion: hapair.dev/v1alpha1\nkind: ReplicatedVolume\nmetadata: {{name: d{i}}}\nspec:\n  group: g{i}\n  size: 1Gi\n  backing: [{{node: n{i}a, path: /srv/d.img}}, {{node: n{i}b, path: /srv/d.img}}]\n"
        ));
    }
    text
}

fn report(i: usize, primary: bool) -> (String, NodeReport) {
    let node = format!("n{i}{}", if primary { "a" } else { "b" });
    let volume = i.is_multiple_of(10).then(|| format!("d{i}"));
    let hardware =
        Hardware { cpus: 8, cpu_percent: 30, memory_bytes: 16 << 30, memory_percent: 40, ..Hardware::default() };
    let report = settled_report(&node, GroupKey::new("default", format!("g{i}")), primary, volume, hardware, 1000);
    (node, report)
}

/// Sends `request` as from client number `client`: each from its own address, so the
/// per-client rate limit (which a browser never reaches) does not throttle the benchmark.
async fn send(app: &axum::Router, request: Request<Body>, client: usize) -> anyhow::Result<(u16, Vec<u8>, Duration)> {
    let mut request = request;
    let addr: SocketAddr = format!("198.19.{}.{}:50000", client / 250, client % 250 + 1).parse()?;
    request.extensions_mut().insert(Peer { identity: PeerIdentity::Anonymous, addr });
    let start = Instant::now();
    let response = app.clone().oneshot(request).await?;
    let status = response.status().as_u16();
    // The first frame is all a stream has at once; a plain answer is one frame.
    let first = response.into_body().frame().await.transpose()?;
    let elapsed = start.elapsed();
    let bytes = first.and_then(|f| f.into_data().ok()).map(|b| b.to_vec()).unwrap_or_default();
    Ok((status, bytes, elapsed))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let manifests = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    for i in 0..args.groups {
        std::fs::write(manifests.path().join(format!("g{i}.yaml")), manifest(i))?;
    }
    let store = FileStore::open(manifests.path(), state.path())?;
    let controller = Arc::new(Controller::start(store, Settings::default(), Arc::new(Metrics::new())).await?);
    controller.reconcile().await?;
    for i in 0..args.groups {
        for primary in [true, false] {
            let (node, report) = report(i, primary);
            controller.accept_report(&node, report, 2).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let ca = Ca::generate()?.0;
    let keys = ConsoleKeys::from_ca(&ca);
    let api = NodeApi::new(
        controller.clone(),
        Arc::new(ca),
        hapair_operator::pki::tokens::TokenFile::new(state.path()),
        None,
        ApiSettings::default(),
    )
    .with_routes(hapair_operator::console::router(Arc::new(Console::new(controller.clone(), keys.clone()))));
    let app = router(Arc::new(api));
    let now = hapair_operator::support::timestamp::now_millis();
    let (token, _) =
        keys.issue_token(ConsoleRole::Viewer, Some("bench"), Duration::from_secs(3600), now, &mut rand::rng())?;
    let sign_in = Request::post("/ui/api/session")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!(r#"{{"token":"{token}"}}"#)))?;
    let mut request = sign_in;
    request.extensions_mut().insert(Peer { identity: PeerIdentity::Anonymous, addr: "198.18.0.9:50000".parse()? });
    let answer = app.clone().oneshot(request).await?;
    let cookie = answer
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("no session cookie")?
        .to_string();

    println!(
        "console: {} HaGroups ({} with a ReplicatedVolume), {} nodes reporting; {} build",
        args.groups,
        args.groups.div_ceil(10),
        2 * args.groups,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    for (what, path) in [("GET /ui/api/overview", "/ui/api/overview"), ("stream's first event", "/ui/api/stream")] {
        let mut times = Vec::with_capacity(args.requests);
        let mut size = 0;
        for client in 0..args.requests {
            let request = Request::get(path).header(header::COOKIE, &cookie).body(Body::empty())?;
            let (status, body, elapsed) = send(&app, request, client).await?;
            anyhow::ensure!(status == 200, "{path} answered {status}: {}", String::from_utf8_lossy(&body));
            size = body.len();
            times.push(elapsed);
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let worst = times.last().copied().unwrap_or_default();
        println!(
            "1. {what}: median {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} requests ({} bytes){}",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(worst),
            args.requests,
            size,
            if worst < Duration::from_millis(200) {
                "; target under 200 ms: met"
            } else {
                "; target under 200 ms: NOT met"
            }
        );
    }

    // An hour of reports from every node, one every two seconds as agents send them.
    let mut history = UsageHistory::default();
    let hardware = Hardware { cpu_percent: 30, memory_percent: 40, ..Hardware::default() };
    for step in 0..1800 {
        for n in 0..2 * args.groups {
            history.record(&format!("n{n}"), step * 2000, &hardware);
        }
    }
    println!(
        "2. chart history after an hour: {} KiB for {} nodes ({} samples each, one per {} s); bound {} KiB",
        history.bytes() / 1024,
        2 * args.groups,
        SAMPLES,
        SAMPLE_EVERY_MS / 1000,
        UsageHistory::bound(2 * args.groups) / 1024
    );
    let (_, live) = controller.usage_history().await;
    println!("   the controller's own history now: {live} bytes (one sample per node so far)");
    Ok(())
}
