//! `replica-harness`: runs one node's replica of a volume as its own process, driven over
//! stdin/stdout, so the multi-host tests can place replicas in network namespaces, change
//! their roles and kill them like real nodes. It stands in for the agent runtime, which
//! will drive the same library calls from its engine.
//!
//! Commands, one per line on stdin; each is answered by one JSON line on stdout:
//! `status`, `promote EPOCH [force]`, `demote [force]`, `epoch EPOCH`, `verify`,
//! `resolve discard|keep`, `shutdown`. The first stdout line is `{"ready":true,...}` or,
//! when the replica cannot be opened, `{"ok":false,"error":...}` (exit status 2).
//! Replica events go to stderr as `EVENT {json}` lines, next to the logs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hapair_agent::replication::replica::{Replica, ReplicaOptions, Timing};
use hapair_agent::replication::wire::Resolution;
use hapair_crds::nodeapi::VolumeConfig;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser, Debug)]
#[command(name = "replica-harness", about = "Run one replica of a ReplicatedVolume, driven over stdin")]
struct Args {
    /// The volume as delivered to a node (`VolumeConfig` JSON).
    #[arg(long)]
    volume: PathBuf,
    #[arg(long)]
    node: String,
    #[arg(long)]
    nbd_socket: PathBuf,
    #[arg(long)]
    nbd_tcp: Option<SocketAddr>,
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long)]
    peer: Option<SocketAddr>,
    #[arg(long)]
    dial: Option<bool>,
    #[arg(long, default_value_t = 200)]
    ping_interval_ms: u64,
    #[arg(long, default_value_t = 1500)]
    ping_timeout_ms: u64,
    #[arg(long)]
    seed: Option<u64>,
    /// Refuse to create a missing backing or initialise blank metadata.
    #[arg(long)]
    no_create: bool,
}

fn reply(v: serde_json::Value) {
    println!("{v}");
}

fn result(r: Result<(), impl std::fmt::Display>) {
    match r {
        Ok(()) => reply(json!({"ok": true})),
        Err(e) => reply(json!({"ok": false, "error": e.to_string()})),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.volume).with_context(|| format!("reading {}", args.volume.display()))?;
    let volume: VolumeConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", args.volume.display()))?;
    let mut opts = ReplicaOptions::new(&args.nbd_socket);
    opts.nbd_tcp = args.nbd_tcp;
    opts.listen = args.listen;
    opts.peer = args.peer;
    opts.dial = args.dial;
    opts.seed = args.seed;
    opts.create_missing = !args.no_create;
    opts.initialize_blank = !args.no_create;
    opts.timing = Timing {
        ping_interval: Duration::from_millis(args.ping_interval_ms),
        ping_timeout: Duration::from_millis(args.ping_timeout_ms),
        ..Timing::default()
    };
    let replica = match Replica::open(&volume, &args.node, opts).await {
        Ok(r) => r,
        Err(e) => {
            reply(json!({"ok": false, "error": e.to_string()}));
            std::process::exit(2);
        }
    };
    let mut events = replica.events();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            eprintln!("EVENT {}", serde_json::to_string(&e).unwrap_or_default());
        }
    });
    reply(json!({"ready": true, "status": replica.status()}));

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => reply(json!({"ok": true, "status": replica.status()})),
            ["promote", epoch, rest @ ..] => match epoch.parse::<u64>() {
                Ok(e) => result(replica.promote(e, rest.contains(&"force")).await),
                Err(_) => reply(json!({"ok": false, "error": format!("bad epoch {epoch:?}")})),
            },
            ["demote", rest @ ..] => result(replica.demote(rest.contains(&"force")).await),
            ["epoch", epoch] => match epoch.parse::<u64>() {
                Ok(e) => {
                    replica.observe_epoch(e);
                    reply(json!({"ok": true}));
                }
                Err(_) => reply(json!({"ok": false, "error": format!("bad epoch {epoch:?}")})),
            },
            ["verify"] => result(replica.start_verify().await),
            ["resolve", which] => {
                let res = match *which {
                    "discard" => Resolution::DiscardLocal,
                    "keep" => Resolution::KeepLocal,
                    other => {
                        reply(json!({"ok": false, "error": format!("resolve discard|keep, not {other:?}")}));
                        continue;
                    }
                };
                result(replica.resolve_split_brain(res).await);
            }
            ["shutdown"] => {
                result(replica.shutdown().await);
                return Ok(());
            }
            _ => reply(json!({"ok": false, "error": format!("unknown command {line:?}")})),
        }
    }
    replica.shutdown().await.context("shutting down")?;
    Ok(())
}
