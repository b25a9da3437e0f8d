//! `hapair-agent`: the node agent daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rustls_pki_types::pem::PemObject;

#[derive(Parser, Debug)]
#[command(name = "hapair-agent", version, about = "hapair node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: take the desired config from the controller (or a bundle file), run
    /// every group's failover engine, flows, heartbeats and probes, and report.
    Run {
        /// The agent's configuration (kind AgentConfig). A missing file means "not
        /// enrolled yet": the agent serves /healthz and waits for `hapair-agent enroll`.
        #[arg(long, default_value = hapair_agent::agent_config::DEFAULT_PATH)]
        config: PathBuf,
        /// Run this desired-config bundle file (JSON or YAML) instead of the controller's,
        /// ignoring --config; re-read on SIGHUP and when it changes.
        #[arg(long, requires_all = ["node", "state_dir"])]
        bundle: Option<PathBuf>,
        /// This node's name (with --bundle).
        #[arg(long, requires = "bundle")]
        node: Option<String>,
        /// State directory (with --bundle).
        #[arg(long, requires = "bundle")]
        state_dir: Option<PathBuf>,
        /// Address of /healthz, /metrics and /v1/status, in place of endpoints.listen of
        /// --config (the Kubernetes DaemonSet sets it from the chart's values); default
        /// 127.0.0.1:9464.
        #[arg(long)]
        listen: Option<String>,
        /// Watchdog device, e.g. /dev/watchdog (with --bundle).
        #[arg(long, requires = "bundle")]
        watchdog: Option<PathBuf>,
        /// Where the volumes' NBD sockets live (with --bundle; default /run/hapair).
        #[arg(long, requires = "bundle")]
        runtime_dir: Option<PathBuf>,
        /// Speak only this wire-protocol version (a test aid for rehearsing rolling
        /// upgrades; see docs/upgrades.md). Also HAPAIR_PROTOCOL_VERSION.
        #[arg(long, hide = true)]
        protocol_version: Option<u8>,
    },
    /// Check a desired-config bundle file for this node and print what it would run.
    CheckConfig {
        /// Node-API desired-config bundle (JSON or YAML).
        #[arg(long)]
        config: PathBuf,
        /// This node's name; defaults to the bundle's node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Enroll this node with a controller: trade a one-time token (from
    /// `hapair-operator token create`) for a client certificate.
    Enroll {
        /// Controller base URL, e.g. https://ctl.example:7443. Replicated controllers: all of
        /// them, comma-separated or the flag repeated, the preferred first; they are tried in
        /// order until one (the leader) takes the enrollment.
        #[arg(long, required = true, value_delimiter = ',', value_name = "URL[,URL...]")]
        controller: Vec<String>,
        /// The one-time token.
        #[arg(long, env = "HAPAIR_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// This node's name, as in the HaGroup's spec.nodes.
        #[arg(long)]
        node: String,
        /// Where to write node.key, node.crt and ca.crt, and the agent.yaml to complete.
        #[arg(long, default_value = "/etc/hapair")]
        dir: PathBuf,
        /// SHA-256 fingerprint of the controller CA (printed by `token create`).
        #[arg(long)]
        ca_fingerprint: Option<String>,
        /// The controller CA certificate, obtained out of band.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Replace an existing enrollment.
        #[arg(long)]
        force: bool,
    },
}

fn init_logging(log: &hapair_agent::agent_config::LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match log.format {
        hapair_agent::agent_config::LogFormat::Text => builder.init(),
        hapair_agent::agent_config::LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).init()
        }
    }
}

fn run(options: hapair_agent::runtime::RunOptions) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    init_logging(&options.config.log);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let reload = std::sync::Arc::new(tokio::sync::Notify::new());
        let on_hangup = std::sync::Arc::clone(&reload);
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reading the bundle file again");
                on_hangup.notify_one();
            }
        });
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        };
        hapair_agent::runtime::run(options, shutdown, reload).await.map_err(anyhow::Error::from)
    })
}

fn main() -> std::process::ExitCode {
    // One line naming the problem (the file and field of a bad config), as the operator's
    // binary does; no backtrace dump for an input error.
    match command(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hapair-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn command(cli: Cli) -> anyhow::Result<()> {
    if let Command::Run { protocol_version, .. } = &cli.command {
        match protocol_version {
            Some(v) => hapair_agent::protocol::force(*v).map_err(|e| anyhow::anyhow!("--protocol-version: {e}"))?,
            None => hapair_agent::protocol::force_from_env().map_err(anyhow::Error::msg)?,
        }
    }
    match cli.command {
        Command::Run { config, bundle: Some(bundle), node, state_dir, listen, watchdog, runtime_dir, .. } => {
            use hapair_agent::agent_config::{AgentConfig, Endpoints, WatchdogSettings};
            let config = AgentConfig {
                node: node.unwrap_or_default(),
                bundle_file: Some(std::path::absolute(&bundle).unwrap_or(bundle)),
                state_dir: state_dir.unwrap_or_else(|| config.with_file_name("state")),
                endpoints: Endpoints {
                    listen: listen.unwrap_or_else(|| hapair_agent::agent_config::DEFAULT_LISTEN.into()),
                },
                watchdog: WatchdogSettings { device: watchdog },
                runtime_dir: runtime_dir
                    .map_or_else(|| AgentConfig::default().runtime_dir, |d| std::path::absolute(&d).unwrap_or(d)),
                ..AgentConfig::default()
            };
            if let Err(e) = config.listen_addr() {
                anyhow::bail!("--listen {e}");
            }
            run(hapair_agent::runtime::RunOptions { config, config_path: None })
        }
        Command::Run { config: path, listen, .. } => {
            let (mut config, found) = hapair_agent::agent_config::AgentConfig::load(&path)?;
            if !found {
                eprintln!("hapair-agent: {} does not exist yet; waiting for `hapair-agent enroll`", path.display());
            }
            // The endpoints are bound once, at start, from this config: re-reading the file
            // later (while waiting for enrollment) never moves them.
            if let Some(listen) = listen {
                config.endpoints.listen = listen;
                if let Err(e) = config.listen_addr() {
                    anyhow::bail!("--listen {e}");
                }
            }
            run(hapair_agent::runtime::RunOptions { config, config_path: Some(path) })
        }
        Command::CheckConfig { config, node } => {
            let bundle = hapair_agent::bundle::read_file(&config).map_err(anyhow::Error::msg)?;
            let node = node.unwrap_or_else(|| bundle.node.clone());
            hapair_agent::bundle::check(&bundle, &node).with_context(|| config.display().to_string())?;
            println!("{}: revision {} for node {node}", config.display(), bundle.revision);
            for group in &bundle.groups {
                let steps: Vec<_> = group.spec.flow.iter().map(|s| s.name.as_str()).collect();
                println!("  group {}: {} flow steps [{}]", group.key, steps.len(), steps.join(", "));
            }
            Ok(())
        }
        Command::Enroll { controller, token, node, dir, ca_fingerprint, ca_file, force } => {
            use hapair_agent::enroll::{EnrollOptions, Trust, enroll, fingerprint, normalize_fingerprint};
            let pinned = ca_fingerprint.as_deref().map(normalize_fingerprint).transpose()?;
            let trust = match (pinned, ca_file) {
                (None, None) => anyhow::bail!(
                    "refusing to trust the controller blindly: pass --ca-fingerprint (printed by `hapair-operator token create`) or --ca-file"
                ),
                (pinned, Some(file)) => {
                    let pem = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                        .with_context(|| format!("{} is not a PEM certificate", file.display()))?;
                    if let Some(pin) = pinned
                        && fingerprint(&der) != pin
                    {
                        anyhow::bail!("{} does not match --ca-fingerprint", file.display());
                    }
                    Trust::CaPem(pem)
                }
                (Some(pin), None) => Trust::Fingerprint(pin),
            };
            let options = EnrollOptions { controllers: controller, token, node: node.clone(), dir, trust, force };
            // Warnings only (a controller list entry left out); the outcome is printed below.
            let _ = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
                .without_time()
                .try_init();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let config = runtime.block_on(enroll(&options))?;
            println!("enrolled node {node}; controller settings in {}", config.display());
            Ok(())
        }
    }
}
