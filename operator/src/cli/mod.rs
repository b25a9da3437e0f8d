//! `kubectl-hapair`, also installed as `hapair` (a symlink `hapair -> kubectl-hapair`; the
//! binary looks at the name it was started under only to word its help). As a kubectl
//! plugin it runs as `kubectl hapair …`.
//!
//! `validate` works on local files; `status`, `describe` and the admin actions talk to a
//! controller through a [`transport::Transport`] (today: the standalone controller's admin
//! API with the admin certificate).

pub mod render;
pub mod transport;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use hapair_crds::manifest::DEFAULT_NAMESPACE;
use hapair_crds::nodeapi::{ActionOutcome, AdminActionKind, GroupKey};

use crate::adminapi::ActionRequest;
use crate::catalog::Catalog;
use transport::{CliError, ConnectionFlags, HttpsTransport, Transport};

/// Exit code when an action got no final outcome in time.
pub const EXIT_TIMEOUT: u8 = 3;

#[derive(Parser, Debug)]
#[command(name = "kubectl-hapair", version, about = "hapair command-line client: status, describe and admin actions")]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Namespace of GROUP when it is given without one.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// How long an action may take before giving up (it keeps running on the nodes).
    #[arg(long, global = true, default_value = "120s")]
    pub timeout: hapair_crds::Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ConnectionArgs {
    /// Admin config file (hapair-admin.json from the standalone controller's state directory).
    #[arg(long, env = "HAPAIR_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Controller base URL, e.g. https://ctl.example:7443 (overrides the config file).
    #[arg(long, global = true)]
    pub controller: Option<String>,
    /// Controller CA certificate (PEM).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Admin client certificate (PEM).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Admin client key (PEM).
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check manifest files the way the API server and the controller would.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Every group: phase, active node, epoch, roles, sync state, last failover.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// One group in detail: nodes, hardware, links, probes, flow steps, recent events.
    Describe {
        /// `name`, or `namespace/name`.
        group: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Move the service gracefully to NODE (no data loss; refused if NODE is not in sync).
    Switchover {
        group: String,
        #[arg(long)]
        to: String,
    },
    /// Make NODE active regardless of health and sync state.
    ForceActive {
        group: String,
        node: String,
        /// Confirm: NODE may serve out-of-date data.
        #[arg(long)]
        yes: bool,
    },
    /// End a split brain: WINNER keeps its data and becomes active, the other node's
    /// divergent writes are discarded (with a record of which blocks).
    ResolveSplitBrain {
        group: String,
        #[arg(long)]
        winner: String,
        /// Confirm: the other node's divergent changes are discarded.
        #[arg(long)]
        yes: bool,
    },
    /// Freeze (on) or resume (off) automatic failover, restarts and failback.
    Maintenance {
        group: String,
        #[arg(value_enum)]
        state: OnOff,
    },
}

/// `name` or `namespace/name`, with `-n` as the default namespace.
pub fn parse_group(text: &str, namespace: Option<&str>) -> Result<GroupKey, CliError> {
    if text.contains('/') {
        let key: GroupKey = text.parse().map_err(|e| CliError::Config(format!("GROUP: {e}")))?;
        if let Some(ns) = namespace
            && ns != key.namespace
        {
            return Err(CliError::Config(format!("GROUP {text} contradicts --namespace {ns}")));
        }
        return Ok(key);
    }
    if text.is_empty() {
        return Err(CliError::Config("GROUP must not be empty".into()));
    }
    Ok(GroupKey::new(namespace.unwrap_or(DEFAULT_NAMESPACE), text))
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut sources = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => sources.push((file.display().to_string(), text)),
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let catalog = Catalog::from_sources(sources.iter().map(|(f, t)| (f.as_str(), t.as_str())));
    for (key, (_, origin)) in &catalog.groups {
        println!("valid: HaGroup {key} ({})", origin.file);
    }
    for (key, (_, origin)) in &catalog.volumes {
        println!("valid: ReplicatedVolume {key} ({})", origin.file);
    }
    for error in &catalog.errors {
        eprintln!("invalid: {error}");
    }
    if catalog.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Runs an admin action and waits for its final outcome.
pub async fn act<T: Transport>(
    transport: &T,
    key: &GroupKey,
    kind: AdminActionKind,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<ExitCode, CliError> {
    let words = render::action_words(&kind);
    let mut view = transport.submit(key, &ActionRequest { id: None, kind }).await?;
    let _ = writeln!(out, "{words} on {key} requested as {}; waiting for the agents", view.id);
    let deadline = Instant::now() + timeout;
    while !view.outcome.is_final() {
        if Instant::now() >= deadline {
            let _ = write!(out, "{}", render::action(&view));
            let _ = writeln!(
                out,
                "no final outcome within {}s; the action stays queued (see `describe {key}`)",
                timeout.as_secs()
            );
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        view = transport.action(key, &view.id).await?;
    }
    let _ = write!(out, "{}", render::action(&view));
    Ok(if view.outcome == ActionOutcome::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs a command that needs a controller.
pub async fn run<T: Transport>(cli: &Cli, transport: &T, out: &mut dyn Write) -> Result<ExitCode, CliError> {
    let ns = cli.namespace.as_deref();
    let timeout = cli.timeout.as_std();
    match &cli.command {
        Command::Validate { files } => Ok(validate(files)),
        Command::Status { output } => {
            let overview = transport.groups().await?;
            let text = match output {
                Output::Table => render::status(&overview),
                Output::Json => to_json(&overview),
            };
            let _ = write!(out, "{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe { group, output } => {
            let key = parse_group(group, ns)?;
            let overview = transport.groups().await?;
            let Some(view) = overview.groups.iter().find(|g| g.key == key) else {
                let known: Vec<String> = overview.groups.iter().map(|g| g.key.to_string()).collect();
                return Err(CliError::Config(format!("no HaGroup {key} (known: {})", known.join(", "))));
            };
            let text = match output {
                Output::Table => render::describe(view),
                Output::Json => to_json(view),
            };
            let _ = write!(out, "{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Switchover { group, to } => {
            act(transport, &parse_group(group, ns)?, AdminActionKind::Switchover { to: to.clone() }, timeout, out).await
        }
        Command::ForceActive { group, node, yes } => {
            if !yes {
                return Err(CliError::Config(format!(
                    "force-active makes {node} active even if it is unhealthy or its data is out of date; re-run with --yes"
                )));
            }
            act(transport, &parse_group(group, ns)?, AdminActionKind::ForceActive { node: node.clone() }, timeout, out)
                .await
        }
        Command::ResolveSplitBrain { group, winner, yes } => {
            if !yes {
                return Err(CliError::Config(format!(
                    "resolve-split-brain discards the changes the other node made since the split; {winner} wins. Re-run with --yes"
                )));
            }
            let kind = AdminActionKind::ResolveSplitBrain { winner: winner.clone() };
            act(transport, &parse_group(group, ns)?, kind, timeout, out).await
        }
        Command::Maintenance { group, state } => {
            let kind = AdminActionKind::Maintenance { enabled: *state == OnOff::On };
            act(transport, &parse_group(group, ns)?, kind, timeout, out).await
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// The name the binary was started as: `hapair` or `kubectl hapair`.
fn invoked_as() -> &'static str {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let base = std::path::Path::new(&argv0).file_name().and_then(|n| n.to_str()).unwrap_or("");
    if base == "hapair" { "hapair" } else { "kubectl hapair" }
}

/// Entry point of the `kubectl-hapair` / `hapair` binary.
pub fn main() -> ExitCode {
    let name = invoked_as();
    let matches = Cli::command().name(name).bin_name(name).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Command::Validate { files } = &cli.command {
        return validate(files);
    }
    let flags = ConnectionFlags {
        config: cli.connection.config.clone(),
        controller: cli.connection.controller.clone(),
        ca: cli.connection.ca.clone(),
        cert: cli.connection.cert.clone(),
        key: cli.connection.key.clone(),
    };
    let result = (|| {
        let transport = HttpsTransport::new(&flags.resolve()?)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::Config(format!("starting the runtime: {e}")))?;
        runtime.block_on(run(&cli, &transport, &mut std::io::stdout()))
    })();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_default_to_the_namespace_flag_or_default() {
        let key = |t, ns| parse_group(t, ns).map_err(|e| e.to_string());
        assert_eq!(key("pg", None), Ok(GroupKey::new("default", "pg")));
        assert_eq!(key("pg", Some("db")), Ok(GroupKey::new("db", "pg")));
        assert_eq!(key("db/pg", None), Ok(GroupKey::new("db", "pg")));
        assert_eq!(key("db/pg", Some("db")), Ok(GroupKey::new("db", "pg")));
        assert!(key("db/pg", Some("other")).is_err());
        assert!(key("a/b/c", None).is_err());
    }

    #[test]
    fn commands_parse_as_documented() {
        let cli = Cli::try_parse_from(["hapair", "-n", "db", "switchover", "pg", "--to", "db2"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(cli.command, Command::Switchover { ref group, ref to } if group == "pg" && to == "db2"));
        let cli =
            Cli::try_parse_from(["hapair", "force-active", "db/pg", "db1", "--yes"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(cli.command, Command::ForceActive { yes: true, .. }));
        let cli = Cli::try_parse_from(["hapair", "maintenance", "pg", "off"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(cli.command, Command::Maintenance { state: OnOff::Off, .. }));
        assert!(Cli::try_parse_from(["hapair", "maintenance", "pg", "maybe"]).is_err());
    }
}
