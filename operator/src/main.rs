//! `hapair-operator`: the hapair controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use hapair_operator::adminapi::{AdminConfig, CLI_CONFIG_FILE};
use hapair_operator::catalog::Catalog;
use hapair_operator::pki::{CA_CERT_FILE, fingerprint};
use hapair_operator::standalone::{Standalone, StandaloneConfig};
use hapair_operator::timestamp::{format_millis, now_millis};
use hapair_operator::tokens::TokenFile;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Parser, Debug)]
#[command(name = "hapair-operator", version, about = "hapair controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a directory of manifests and print what it would run.
    Plan {
        #[arg(long)]
        manifests: PathBuf,
    },
    /// Run the controller on a directory of manifests, without Kubernetes.
    Standalone {
        /// Directory of HaGroup, ReplicatedVolume and Secret YAML (watched for changes).
        #[arg(long)]
        manifests: PathBuf,
        /// Directory for the CA, certificates, tokens, state and status (created, mode 0700).
        #[arg(long)]
        state: PathBuf,
        /// Address the node API listens on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Name or IP agents use to reach the controller (repeatable); goes into the server
        /// certificate.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Base URL written into the CLI config (default: https://<first server name>:<port>).
        #[arg(long)]
        advertise: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Manage one-time enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Issue a token with which one node's agent can enroll (`hapair-agent enroll`).
    Create {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        node: String,
        /// Lifetime, e.g. 30m, 1h, 24h (at most 168h).
        #[arg(long, default_value = "1h")]
        ttl: hapair_crds::Duration,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

async fn standalone(config: StandaloneConfig) -> anyhow::Result<()> {
    // The witness's clock starts with the node API: `NodeApi` measures `now` from its own
    // creation, so a fresh witness waits out L·(1+drift) after every controller start.
    let witness = hapair_operator::witness::Witness::new(std::time::Duration::ZERO);
    let controller =
        Standalone::start(config, Some(Box::new(witness))).await.context("starting the standalone controller")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    controller.shutdown().await;
    Ok(())
}

fn token_create(state: PathBuf, node: String, ttl: hapair_crds::Duration) -> anyhow::Result<()> {
    let ca_path = state.join(CA_CERT_FILE);
    let ca_pem = std::fs::read(&ca_path).with_context(|| {
        format!("reading {} (start the standalone controller once to create the CA)", ca_path.display())
    })?;
    let ca = CertificateDer::from_pem_slice(&ca_pem)
        .with_context(|| format!("{} is not a PEM certificate", ca_path.display()))?;
    let now = now_millis();
    let token = TokenFile::new(&state).create(&node, ttl.as_std(), now)?;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let controller = std::fs::read(state.join(CLI_CONFIG_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<AdminConfig>(&bytes).ok())
        .map(|c| c.controller)
        .unwrap_or_else(|| "https://CONTROLLER:7443".into());
    let fp = fingerprint(&ca);
    println!("token:          {token}");
    println!("node:           {node}");
    println!("expires:        {}", format_millis(now.saturating_add(ttl_ms)));
    println!("ca fingerprint: {fp}");
    println!();
    println!("On {node}, run once:");
    println!(
        "  hapair-agent enroll --controller {controller} --node {node} --token {token} --ca-fingerprint {fp} --dir /etc/hapair"
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan { manifests } => match Catalog::load_dir(&manifests) {
            Ok(catalog) => {
                print!("{}", hapair_operator::plan::render(&catalog));
                return if catalog.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
            }
            Err(e) => Err(e.into()),
        },
        Command::Standalone { manifests, state, listen, server_names, advertise, log_format } => {
            init_logging(log_format);
            let mut config = StandaloneConfig::new(&manifests, &state, listen);
            config.server_names = server_names;
            config.advertise = advertise;
            match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime.block_on(standalone(config)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Token { command: TokenCommand::Create { state, node, ttl } } => {
            if ttl.is_zero() {
                Err(anyhow::anyhow!("--ttl must be greater than zero"))
            } else {
                token_create(state, node, ttl)
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hapair-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
