//! `kubectl-hapair`, also installed as `hapair` (a symlink `hapair -> kubectl-hapair`; the
//! binary looks at the name it was started under only to word its help). As a kubectl
//! plugin it runs as `kubectl hapair …`.
//!
//! `validate` works on local files; `status`, `describe` and the admin actions talk to a
//! controller through a [`transport::Transport`]: the standalone controller's admin API with
//! the admin certificate, or a cluster's API server ([`kube_transport`]).
//!
//! Which one, in this order:
//! 1. `--kubeconfig` or `--context`: the cluster;
//! 2. `--config`, `--controller`, `--ca`, `--cert` or `--key`: a standalone controller (both
//!    kinds of flags at once is an error);
//! 3. `HAPAIR_CONFIG` set: that standalone controller;
//! 4. a kubeconfig (`$KUBECONFIG`, `~/.kube/config`) or an in-cluster service account: the
//!    cluster;
//! 5. otherwise an error that names both ways.
//!
//! Output goes through a locked stdout and every write is checked: a full disk or a closed
//! pipe ends the command with an error, never a panic, and nothing is printed unescaped
//! ([`terminal`]).

pub mod kube_transport;
pub mod render;
pub mod terminal;
pub mod transport;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use hapair_crds::manifest::DEFAULT_NAMESPACE;
use hapair_crds::nodeapi::{ActionOutcome, AdminActionKind, GroupKey};

use crate::controller::views::ActionRequest;
use crate::desired::catalog::Catalog;
use kube_transport::KubeTransport;
use transport::{CliError, ConnectionFlags, HttpsTransport, Transport};

/// Exit code when an action got no final outcome in time.
pub const EXIT_TIMEOUT: u8 = 3;

/// Exit code when stdout is a pipe nobody reads any more (`hapair status | head -1`): what
/// a shell reports for a program killed by SIGPIPE, so pipelines see the usual status, and
/// without a message, as other tools end there.
pub const EXIT_BROKEN_PIPE: u8 = 141;

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
    /// Namespace of a GROUP given without one and without `-n` (the kubeconfig's, against a
    /// cluster); `default` when unset.
    #[arg(skip)]
    pub default_namespace: Option<String>,
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
    /// Kubeconfig of the cluster the operator runs in (selects Kubernetes).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (selects Kubernetes).
    #[arg(long, global = true)]
    pub context: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchArgs {
    /// Keep asking and show each change (redrawn in place on a terminal) until Ctrl-C.
    #[arg(short, long)]
    pub watch: bool,
    /// How often --watch asks the controller.
    #[arg(long, default_value = "1s", requires = "watch")]
    pub interval: hapair_crds::Duration,
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
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// One group in detail: nodes, hardware, links, probes, flow steps, recent events.
    Describe {
        /// `name`, or `namespace/name`.
        group: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        watch: WatchArgs,
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
    /// ReplicatedVolume operations.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// One-time enrollment tokens (against a cluster; on a standalone controller host use
    /// `hapair-operator token create --state DIR`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Online verify: the primary compares its blocks' digests with the standby's while the
    /// volume stays in use, marks what differs out of sync and resyncs it from itself. The
    /// findings go into the volume's status (`lastVerify`) and events.
    Verify {
        /// `name`, or `namespace/name`.
        volume: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Issue a token with which one node's agent can enroll, and print the command to run
    /// on the node.
    Create {
        #[arg(long)]
        node: String,
        /// Lifetime, e.g. 30m, 1h, 24h (at most 168h).
        #[arg(long, default_value = "1h")]
        ttl: hapair_crds::Duration,
        /// Namespace the operator runs in [default: found by the label on its Secrets].
        #[arg(long)]
        operator_namespace: Option<String>,
    },
}

/// Which kind of controller the CLI talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Standalone,
    Kubernetes,
}

/// The precedence documented at the top of this module, as a pure function of what was
/// given: Kubernetes flags, standalone flags, `HAPAIR_CONFIG`, and whether a kubeconfig or
/// in-cluster config can be found.
pub fn choose_backend(
    kube_flags: bool,
    standalone_flags: bool,
    config_env: bool,
    kube_available: bool,
) -> Result<Backend, CliError> {
    match (kube_flags, standalone_flags) {
        (true, true) => Err(CliError::Config(
            "--kubeconfig/--context select a cluster, --config/--controller/--ca/--cert/--key a standalone controller; pass one kind".into(),
        )),
        (true, false) => Ok(Backend::Kubernetes),
        (false, true) => Ok(Backend::Standalone),
        (false, false) if config_env => Ok(Backend::Standalone),
        (false, false) if kube_available => Ok(Backend::Kubernetes),
        (false, false) => Err(CliError::Config(
            "no controller: pass --config (hapair-admin.json of a standalone controller, or set HAPAIR_CONFIG), or have a kubeconfig for the cluster the operator runs in ($KUBECONFIG, ~/.kube/config, --kubeconfig)".into(),
        )),
    }
}

/// `name` or `namespace/name`, with `-n` as the default namespace.
pub fn parse_group(text: &str, namespace: Option<&str>) -> Result<GroupKey, CliError> {
    parse_group_or(text, namespace, DEFAULT_NAMESPACE)
}

/// Like [`parse_group`], with `default` for a bare name without `-n`.
pub fn parse_group_or(text: &str, namespace: Option<&str>, default: &str) -> Result<GroupKey, CliError> {
    parse_namespaced("GROUP", text, namespace, default)
}

/// The object the command-line argument `argument` names: `name` or `namespace/name`,
/// with `-n`, else `default`, as the namespace of a bare name.
fn parse_namespaced(argument: &str, text: &str, namespace: Option<&str>, default: &str) -> Result<GroupKey, CliError> {
    if text.matches('/').count() > 1 {
        return Err(CliError::Config(format!("{argument} {text:?}: expected NAME or NAMESPACE/NAME")));
    }
    if text.contains('/') {
        let key: GroupKey = text.parse().map_err(|e| CliError::Config(format!("{argument}: {e}")))?;
        if let Some(ns) = namespace
            && ns != key.namespace
        {
            return Err(CliError::Config(format!("{argument} {text} contradicts --namespace {ns}")));
        }
        return Ok(key);
    }
    if text.is_empty() {
        return Err(CliError::Config(format!("{argument} must not be empty")));
    }
    Ok(GroupKey::new(namespace.unwrap_or(default), text))
}

/// Writes `text`, escaped for the terminal, to `out`.
fn emit(out: &mut dyn Write, text: &str) -> Result<(), CliError> {
    out.write_all(terminal::printable_lines(text).as_bytes()).map_err(CliError::Output)
}

/// Writes one line to stderr, escaped to stay one line: an error quoting a hostile name or
/// controller message must not forge further lines. A stderr that cannot be written
/// (closed pipe, full disk) leaves nowhere to report that, so the failure is dropped; the
/// exit code still tells.
fn warn(text: &str) {
    let _ = writeln!(std::io::stderr(), "{}", terminal::printable(text));
}

fn validate(files: &[PathBuf], out: &mut dyn Write) -> Result<ExitCode, CliError> {
    let mut sources = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => sources.push((file.display().to_string(), text)),
            Err(e) => return Err(CliError::Config(format!("{}: {e}", file.display()))),
        }
    }
    let catalog = Catalog::from_sources(sources.iter().map(|(f, t)| (f.as_str(), t.as_str())));
    for (key, (_, origin)) in &catalog.groups {
        emit(out, &format!("valid: HaGroup {key} ({})\n", terminal::printable(&origin.file)))?;
    }
    for (key, (_, origin)) in &catalog.volumes {
        emit(out, &format!("valid: ReplicatedVolume {key} ({})\n", terminal::printable(&origin.file)))?;
    }
    // The valid ones first and complete, then the refusals on stderr.
    out.flush().map_err(CliError::Output)?;
    for error in &catalog.errors {
        warn(&format!("invalid: {error}"));
    }
    Ok(if catalog.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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
    let shown_key = key.to_string();
    let shown_key = terminal::printable(&shown_key);
    emit(
        out,
        &format!("{words} on {shown_key} requested as {}; waiting for the agents\n", terminal::printable(&view.id)),
    )?;
    // A timeout too large for the clock (`--timeout 99999999999999999s`) is no deadline:
    // that is what such a timeout means, and `Instant + Duration` would panic on it.
    let deadline = Instant::now().checked_add(timeout);
    while !view.outcome.is_final() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            emit(out, &render::action(&view))?;
            emit(
                out,
                &format!(
                    "no final outcome within {}s; the action stays queued (see `describe {shown_key}`)\n",
                    timeout.as_secs()
                ),
            )?;
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        view = transport.action(key, &view.id).await?;
    }
    emit(out, &render::action(&view))?;
    Ok(if view.outcome == ActionOutcome::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs a command that needs a controller.
pub async fn run<T: Transport>(cli: &Cli, transport: &T, out: &mut dyn Write) -> Result<ExitCode, CliError> {
    let ns = cli.namespace.as_deref();
    let default_ns = cli.default_namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let parse_group = |text: &str, namespace: Option<&str>| parse_group_or(text, namespace, default_ns);
    let timeout = cli.timeout.as_std();
    match &cli.command {
        Command::Validate { files } => validate(files, out),
        Command::Status { output, watch } => {
            let frame = async || {
                let overview = transport.groups().await?;
                match output {
                    Output::Table => Ok(render::status(&overview)),
                    other => encode(*other, &overview),
                }
            };
            show(frame, *watch, *output, out).await
        }
        Command::Describe { group, output, watch } => {
            let key = parse_group(group, ns)?;
            let frame = async || {
                let view = transport.group(&key).await?;
                match output {
                    Output::Table => Ok(render::describe(&view)),
                    other => encode(*other, &view),
                }
            };
            show(frame, *watch, *output, out).await
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
        Command::Volume { command: VolumeCommand::Verify { volume } } => {
            let volume_key = parse_namespaced("VOLUME", volume, ns, default_ns)?;
            let overview = transport.groups().await?;
            let group = overview
                .groups
                .iter()
                .find(|g| g.key.namespace == volume_key.namespace && g.volumes.iter().any(|v| v.name == volume_key.name))
                .map(|g| g.key.clone())
                .ok_or_else(|| {
                    CliError::Config(format!("VOLUME: no HaGroup uses a ReplicatedVolume {volume_key}"))
                })?;
            let kind = AdminActionKind::Verify { volume: volume_key.name.clone() };
            act(transport, &group, kind, timeout, out).await
        }
        Command::Token { .. } => Err(CliError::Config(
            "token create works against a cluster; on a standalone controller's host run `hapair-operator token create --state DIR --node NODE`".into(),
        )),
    }
}

/// The kube client for `--kubeconfig` / `--context`, or the inferred one.
async fn kube_client(connection: &ConnectionArgs) -> Result<kube::Client, CliError> {
    let options = kube::config::KubeConfigOptions { context: connection.context.clone(), ..Default::default() };
    let config = match &connection.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| CliError::Config(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| CliError::Config(e.to_string()))?
        }
        None if connection.context.is_some() => {
            kube::Config::from_kubeconfig(&options).await.map_err(|e| CliError::Config(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| CliError::Config(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| CliError::Config(format!("Kubernetes client: {e}")))
}

fn from_command_line(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

async fn run_against_cluster(cli: &mut Cli, out: &mut dyn Write) -> Result<ExitCode, CliError> {
    let client = kube_client(&cli.connection).await?;
    let transport = KubeTransport::new(client);
    cli.default_namespace = Some(transport.default_namespace().to_string());
    if let Command::Token { command: TokenCommand::Create { node, ttl, operator_namespace } } = &cli.command {
        if ttl.is_zero() {
            return Err(CliError::Config("--ttl must be greater than zero".into()));
        }
        let text = transport.create_token(node, ttl.as_std(), operator_namespace.as_deref()).await?;
        emit(out, &text)?;
        return Ok(ExitCode::SUCCESS);
    }
    run(cli, &transport, out).await
}

/// Pretty JSON with DEL, C1 and the other characters [`terminal`] will not show written as
/// JSON escapes: the same document, safe on a terminal (and passed through [`emit`]
/// unchanged, having no other controls).
/// `value` as `-o json` or `-o yaml` prints it.
fn encode<T: serde::Serialize>(format: Output, value: &T) -> Result<String, CliError> {
    match format {
        Output::Yaml => {
            serde_yaml::to_string(value).map_err(|e| CliError::Config(format!("encoding the answer as YAML: {e}")))
        }
        _ => to_json(value),
    }
}

/// Prints one frame, or with `--watch` a frame each time it changes until Ctrl-C.
async fn show(
    mut frame: impl AsyncFnMut() -> Result<String, CliError>,
    watch: WatchArgs,
    output: Output,
    out: &mut dyn Write,
) -> Result<ExitCode, CliError> {
    if !watch.watch {
        emit(out, &frame().await?)?;
        return Ok(ExitCode::SUCCESS);
    }
    use std::io::IsTerminal;
    let redraw = output == Output::Table && std::io::stdout().is_terminal();
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    watch_frames(&mut frame, watch.interval.as_std(), redraw, output, out, &mut stop).await
}

/// The loop of `--watch`, ended by `stop`. A failed ask (the controller restarting) is shown
/// as a frame and asked again, as `watch` would.
async fn watch_frames<S: std::future::Future + Unpin>(
    frame: &mut impl AsyncFnMut() -> Result<String, CliError>,
    interval: Duration,
    redraw: bool,
    output: Output,
    out: &mut dyn Write,
    stop: &mut S,
) -> Result<ExitCode, CliError> {
    let mut last: Option<String> = None;
    loop {
        let text = match frame().await {
            Ok(text) => text,
            Err(e) => {
                format!("cannot ask the controller ({e}); retrying every {}\n", hapair_crds::Duration::from(interval))
            }
        };
        if last.as_ref() != Some(&text) {
            if redraw {
                // Home and clear, then the frame: the table redrawn in place.
                out.write_all(b"\x1b[H\x1b[2J").map_err(CliError::Output)?;
            } else if last.is_some() {
                let separator: &[u8] = if output == Output::Yaml { b"---\n" } else { b"\n" };
                out.write_all(separator).map_err(CliError::Output)?;
            }
            emit(out, &text)?;
            out.flush().map_err(CliError::Output)?;
            last = Some(text);
        }
        tokio::select! {
            _ = &mut *stop => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Config(format!("encoding the answer as JSON: {e}")))?;
    let mut text = terminal::printable_json(&text).into_owned();
    text.push('\n');
    Ok(text)
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
    let matches = match Cli::command().name(name).bin_name(name).try_get_matches() {
        Ok(matches) => matches,
        Err(e) => return clap_exit(name, &e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return clap_exit(name, &e),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Flushed here, not at exit: std drops a failed final flush silently.
    let result =
        dispatch(&matches, cli, &mut out).and_then(|code| out.flush().map(|()| code).map_err(CliError::Output));
    match result {
        Ok(code) => code,
        Err(e) => fail(name, &e),
    }
}

/// Reports `error` on stderr, and the exit code that goes with it.
fn fail(name: &str, error: &CliError) -> ExitCode {
    if let CliError::Output(e) = error
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        return ExitCode::from(EXIT_BROKEN_PIPE);
    }
    warn(&format!("{name}: {error}"));
    ExitCode::FAILURE
}

/// Ends on a clap answer: a usage error on stderr, `--help` and `--version` on stdout,
/// where failing to write is an error like any other output's.
fn clap_exit(name: &str, error: &clap::Error) -> ExitCode {
    use std::io::IsTerminal;
    let code = ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1));
    let text = error.render();
    if error.use_stderr() {
        let stderr = std::io::stderr();
        let styled = if stderr.is_terminal() { text.ansi().to_string() } else { text.to_string() };
        let _ = write!(stderr.lock(), "{styled}");
        return code;
    }
    let stdout = std::io::stdout();
    let styled = if stdout.is_terminal() { text.ansi().to_string() } else { text.to_string() };
    let mut out = stdout.lock();
    match out.write_all(styled.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => code,
        Err(e) => fail(name, &CliError::Output(e)),
    }
}

/// Picks the controller and runs the command, writing to `out`.
fn dispatch(matches: &ArgMatches, mut cli: Cli, out: &mut dyn Write) -> Result<ExitCode, CliError> {
    if let Command::Validate { files } = &cli.command {
        return validate(files, out);
    }
    let flags = ConnectionFlags {
        config: cli.connection.config.clone(),
        controller: cli.connection.controller.clone(),
        ca: cli.connection.ca.clone(),
        cert: cli.connection.cert.clone(),
        key: cli.connection.key.clone(),
    };
    let kube_flags = cli.connection.kubeconfig.is_some() || cli.connection.context.is_some();
    let standalone_flags = ["controller", "ca", "cert", "key"].iter().any(|id| from_command_line(matches, id))
        || from_command_line(matches, "config");
    let config_env = matches.value_source("config") == Some(ValueSource::EnvVariable);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Config(format!("starting the runtime: {e}")))?;
    // Only look for a kubeconfig when nothing else decides.
    let kube_available =
        !kube_flags && !standalone_flags && !config_env && runtime.block_on(kube::Config::infer()).is_ok();
    match choose_backend(kube_flags, standalone_flags, config_env, kube_available)? {
        Backend::Standalone => {
            let transport = HttpsTransport::new(&flags.resolve()?)?;
            runtime.block_on(run(&cli, &transport, out))
        }
        Backend::Kubernetes => runtime.block_on(run_against_cluster(&mut cli, out)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::controller::views::{ActionView, GroupsOverview, NodeActionResult};

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
    fn the_backend_follows_the_documented_precedence() {
        use Backend::*;
        let choose = |k, s, e, a| choose_backend(k, s, e, a).map_err(|e| e.to_string());
        assert_eq!(choose(true, false, true, false), Ok(Kubernetes), "a flag beats HAPAIR_CONFIG");
        assert!(choose(true, true, false, true).is_err_and(|e| e.contains("pass one kind")));
        assert_eq!(choose(false, true, false, true), Ok(Standalone));
        assert_eq!(choose(false, false, true, true), Ok(Standalone), "HAPAIR_CONFIG beats a kubeconfig");
        assert_eq!(choose(false, false, false, true), Ok(Kubernetes));
        assert!(
            choose(false, false, false, false).is_err_and(|e| e.contains("HAPAIR_CONFIG") && e.contains("kubeconfig"))
        );
    }

    #[test]
    fn a_bare_group_name_takes_the_given_default_namespace() {
        assert_eq!(parse_group_or("pg", None, "db").map_err(|e| e.to_string()), Ok(GroupKey::new("db", "pg")));
        assert_eq!(parse_group_or("pg", Some("x"), "db").map_err(|e| e.to_string()), Ok(GroupKey::new("x", "pg")));
        let cli = Cli::try_parse_from(["hapair", "token", "create", "--node", "db1", "--ttl", "30m"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(cli.command, Command::Token { command: TokenCommand::Create { ref node, .. } } if node == "db1")
        );
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

    #[test]
    fn huge_timeouts_parse_up_to_the_largest_duration_and_are_refused_beyond_naming_the_flag() {
        let cli = Cli::try_parse_from(["hapair", "--timeout", "18446744073709551615s", "status"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.timeout.as_std(), Duration::from_secs(u64::MAX));
        for (text, why) in [
            ("18446744073709551616s", "is too large"),
            ("1e30s", "expected a number followed by a unit"),
            ("18446744073709551615", "expected a number followed by a unit"),
        ] {
            let error = Cli::try_parse_from(["hapair", "status", "--timeout", text]).err().map(|e| e.to_string());
            let error = error.unwrap_or_default();
            assert!(error.contains(&format!("invalid value '{text}' for '--timeout <TIMEOUT>'")), "{error}");
            assert!(error.contains(why), "{error}");
        }
    }

    /// Answers an action as pending `pending` times, then as succeeded.
    struct Fake {
        pending: Cell<u32>,
    }

    impl Fake {
        fn view(&self, outcome: ActionOutcome) -> ActionView {
            ActionView {
                id: "a-1".into(),
                group: GroupKey::new("db", "pg"),
                kind: AdminActionKind::Maintenance { enabled: true },
                outcome,
                message: "applied".into(),
                submitted: "t".into(),
                finished: None,
                results: vec![NodeActionResult { node: "db1".into(), outcome, message: "ok".into() }],
            }
        }
    }

    impl Transport for Fake {
        async fn groups(&self) -> Result<GroupsOverview, CliError> {
            Ok(GroupsOverview::default())
        }

        async fn submit(&self, _: &GroupKey, _: &ActionRequest) -> Result<ActionView, CliError> {
            Ok(self.view(ActionOutcome::Pending))
        }

        async fn action(&self, _: &GroupKey, _: &str) -> Result<ActionView, CliError> {
            let left = self.pending.get();
            self.pending.set(left.saturating_sub(1));
            Ok(self.view(if left == 0 { ActionOutcome::Succeeded } else { ActionOutcome::Pending }))
        }
    }

    /// A writer on a full disk.
    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn maintenance() -> AdminActionKind {
        AdminActionKind::Maintenance { enabled: true }
    }

    #[tokio::test]
    async fn an_action_with_the_largest_timeout_waits_for_its_outcome() {
        let key = GroupKey::new("db", "pg");
        let fake = Fake { pending: Cell::new(1) };
        let mut out = Vec::new();
        let code = act(&fake, &key, maintenance(), Duration::MAX, &mut out).await.map_err(|e| e.to_string());
        assert_eq!(code, Ok(ExitCode::SUCCESS));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "maintenance on on db/pg requested as a-1; waiting for the agents\n\
             maintenance on (a-1) on db/pg: Succeeded: applied\n  db1: Succeeded ok\n"
        );
        // A zero timeout gives up at once, with its own exit code.
        let fake = Fake { pending: Cell::new(u32::MAX) };
        let mut out = Vec::new();
        let code = act(&fake, &key, maintenance(), Duration::ZERO, &mut out).await.map_err(|e| e.to_string());
        assert_eq!(code, Ok(ExitCode::from(EXIT_TIMEOUT)));
        assert!(
            String::from_utf8_lossy(&out)
                .ends_with("no final outcome within 0s; the action stays queued (see `describe db/pg`)\n")
        );
    }

    #[tokio::test]
    async fn output_that_cannot_be_written_is_an_error() {
        let key = GroupKey::new("db", "pg");
        let fake = Fake { pending: Cell::new(0) };
        let error = act(&fake, &key, maintenance(), Duration::MAX, &mut Full).await.err().map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("writing output: No space left on device"));
        let cli = Cli::try_parse_from(["hapair", "status"]).unwrap_or_else(|e| panic!("{e}"));
        let error = run(&cli, &fake, &mut Full).await.err().map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("writing output: No space left on device"));
    }

    #[tokio::test(start_paused = true)]
    async fn watch_prints_each_change_once_and_keeps_going_through_errors() {
        let answers = std::cell::RefCell::new(vec![
            Ok("a\n".to_string()),
            Ok("a\n".to_string()),
            Err(CliError::Config("refused".into())),
            Ok("b\n".to_string()),
        ]);
        let mut frame = async || answers.borrow_mut().remove(0);
        let mut out = Vec::new();
        // Stops after the fourth ask (the asks are a second apart, on the paused clock).
        let mut stop = std::pin::pin!(tokio::time::sleep(Duration::from_millis(3500)));
        let code = watch_frames(&mut frame, Duration::from_secs(1), false, Output::Table, &mut out, &mut stop).await;
        assert_eq!(code.map_err(|e| e.to_string()), Ok(ExitCode::SUCCESS));
        assert_eq!(String::from_utf8_lossy(&out), "a\n\ncannot ask the controller (refused); retrying every 1s\n\nb\n");
        // On a terminal the table is redrawn in place.
        let answers = std::cell::RefCell::new(vec![Ok("x\n".to_string()), Ok("y\n".to_string())]);
        let mut frame = async || answers.borrow_mut().remove(0);
        let mut out = Vec::new();
        let mut stop = std::pin::pin!(tokio::time::sleep(Duration::from_millis(1500)));
        watch_frames(&mut frame, Duration::from_secs(1), true, Output::Table, &mut out, &mut stop).await.ok();
        assert_eq!(String::from_utf8_lossy(&out), "\x1b[H\x1b[2Jx\n\x1b[H\x1b[2Jy\n");
    }

    #[tokio::test]
    async fn yaml_is_the_same_document_as_json() {
        let overview = GroupsOverview { errors: vec!["bad: x".into()], ..GroupsOverview::default() };
        let yaml: serde_json::Value = serde_yaml::from_str(&encode(Output::Yaml, &overview).unwrap()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&encode(Output::Json, &overview).unwrap()).unwrap();
        assert_eq!(yaml, json);
    }

    #[test]
    fn a_broken_pipe_exits_quietly_and_other_write_errors_fail() {
        let broken = CliError::Output(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(fail("hapair", &broken), ExitCode::from(EXIT_BROKEN_PIPE));
        let full = CliError::Output(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(fail("hapair", &full), ExitCode::FAILURE);
    }
}
