//! The agent runtime: `hapair-agent run`.
//!
//! ```text
//!   source (controller long-poll | bundle file) ──bundles──▶ supervisor ──config──▶ group task ×N
//!                                                              │  check, cache        │ engine + I/O
//!   cached bundle (state dir) ────────────────────────────────┘                       ▼
//!   reporter ◀── board (group states, events) ◀──────────────────────────────── publish
//!     │ NodeReport every 2 s / on role change          /healthz /metrics /v1/status
//! ```
//!
//! - The **supervisor** accepts a bundle only after checking all of it (the shared
//!   validation, features this agent supports, keys, addresses, flow and monitor
//!   definitions); a refused bundle is reported (`configError`, an event) and the previous
//!   one stays in force. An accepted bundle is cached in the state directory first, so a
//!   restarted agent (or one whose controller is down) runs on it.
//! - One **group task** per group owns its engine ([`group`]), with its own heartbeat
//!   sockets, step executors ([`steps`]), probes, checks and state file ([`records`]).
//!   Groups are independent; a group gone from the bundle is stopped (VIP first) and
//!   reported `cleanedUp`.
//! - Deleted volumes listed for wiping are erased once no group of the bundle uses them
//!   ([`wipes`]); the answers go out with the node's report.
//! - Engine time is `CLOCK_BOOTTIME` ([`clock`]); the incarnation is
//!   `max(previous + 1, unix ms)`, recorded before anything else.
//! - The [`watchdog`] is node-wide; without a device, its absence is reported as a risk.

pub mod clock;
pub mod group;
pub mod host;
pub mod inbox;
pub mod node_api;
pub mod records;
pub mod report;
pub mod source;
pub mod steps;
pub mod storage;
pub mod volumes;
pub mod watchdog;
pub mod wipes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hapair_crds::nodeapi::{DesiredConfig, EventType, GroupKey};
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::watch;

use crate::agent_config::{AgentConfig, Source};
use crate::endpoints::{self, StatusSnapshot};
use crate::engine::EngineConfig;
use crate::enroll::ControllerConfig;
use crate::heartbeat::HmacKey;
use crate::iface::{IfaceError, Netlink};
use crate::metrics::AgentMetrics;
use crate::probe::Probe;
use crate::state::{Loaded, StateError, StateStore};
use crate::vip::VipManager;
use group::{GroupHandle, NodeContext};
use inbox::Input;
use node_api::{NodeApiClient, WitnessPath};
use report::{Board, NodeState, record};
use source::{BundleFileSource, ConfigSource, ControllerSource, SourceEvent};
use steps::FlowSpec;

/// How often an agent that is not enrolled (or cannot use its enrollment) looks again.
pub const WAIT_FOR_ENROLLMENT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("endpoints: {0}")]
    Listen(String),
    #[error(transparent)]
    Netlink(#[from] IfaceError),
}

/// What `hapair-agent run` was given.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: AgentConfig,
    /// The file `config` came from, re-read while waiting for enrollment.
    pub config_path: Option<PathBuf>,
}

/// Runs the agent until `shutdown` resolves. `reload` (SIGHUP) re-reads a bundle file.
pub async fn run(
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
    reload: Arc<Notify>,
) -> Result<(), RuntimeError> {
    let started = std::time::Instant::now();
    let metrics = Arc::new(AgentMetrics::new());
    let (status_tx, status_rx) = watch::channel(StatusSnapshot::default());
    let listen = options.config.listen_addr().map_err(RuntimeError::Listen)?;
    let server = endpoints::serve(listen, Arc::clone(&metrics), status_rx)
        .await
        .map_err(|e| RuntimeError::Listen(format!("{listen}: {e}")))?;
    tracing::info!(address = %server.local_addr(), "serving /healthz, /metrics and /v1/status");
    tokio::pin!(shutdown);

    let ready = tokio::select! {
        ready = wait_until_runnable(options, &status_tx, started) => ready,
        () = &mut shutdown => None,
    };
    let Some((config, node, client)) = ready else {
        return Ok(());
    };

    let store = StateStore::open(&config.state_dir)?;
    let (incarnation, corrupt) = records::take_incarnation(&store, clock::unix_millis())?;
    if let Some(why) = corrupt {
        tracing::warn!("agent state file was corrupt ({why}); the incarnation starts from the clock");
    }
    let boot_id = clock::boot_id();
    tracing::info!(node = %node, incarnation, boot_id = %boot_id, state_dir = %config.state_dir.display(), "agent starting");
    let watchdog = watchdog::Watchdog::new(config.watchdog.device.clone());
    let _feeder = watchdog.spawn_feeder();
    let board = Arc::new(Board::default());
    let ctx = Arc::new(NodeContext {
        node: node.clone(),
        incarnation,
        boot_id,
        store: store.clone(),
        vip_manager: Arc::new(VipManager::new()?),
        netlink: Netlink::connect()?,
        watchdog,
        metrics,
        witness: client.clone().map_or(WitnessPath::Absent, WitnessPath::Controller),
        board: Arc::clone(&board),
        runtime_dir: config.runtime_dir.clone(),
        volume_tls: volume_tls(&config),
    });
    let state = Arc::new(Mutex::new(NodeState { node: node.clone(), ..NodeState::default() }));
    let (exits_tx, mut exits) = unbounded_channel();
    let mut supervisor = Supervisor {
        ctx: Arc::clone(&ctx),
        groups: BTreeMap::new(),
        applied: None,
        state: Arc::clone(&state),
        exits: exits_tx,
        wipes: wipes::Wipes::new(&node, Arc::clone(&state), Arc::clone(&board)),
    };

    match records::load_bundle(&store) {
        Ok(Loaded::Found(bundle)) if bundle.node == node => {
            tracing::info!(revision = bundle.revision, "running the cached desired config until the source answers");
            supervisor.apply(bundle, true);
        }
        Ok(Loaded::Found(bundle)) => {
            tracing::warn!(cached_for = %bundle.node, "the cached desired config is for another node; ignored");
        }
        Ok(Loaded::Missing) => {}
        Ok(Loaded::Corrupt { reason, moved_to }) => {
            tracing::warn!(%reason, moved_to = %moved_to.display(), "the cached desired config was corrupt; set aside");
        }
        Err(e) => tracing::warn!(error = %e, "reading the cached desired config"),
    }

    let (source_tx, mut sources) = unbounded_channel();
    let desired: Box<dyn ConfigSource> = match (&client, config.source()) {
        (Some(client), _) => Box::new(ControllerSource { client: client.clone(), have: supervisor.applied_revision() }),
        (None, Source::BundleFile { path, .. }) => Box::new(BundleFileSource { path, reload: Arc::clone(&reload) }),
        // wait_until_runnable returns without a client only for a bundle file.
        (None, _) => Box::new(BundleFileSource { path: PathBuf::new(), reload: Arc::clone(&reload) }),
    };
    let _source = source::spawn(desired, source_tx);
    let _status =
        tokio::spawn(status_loop(Arc::clone(&board), Arc::clone(&state), status_tx, started, client.is_none()));
    let _reporter =
        client.map(|c| tokio::spawn(report_loop(Arc::clone(&board), Arc::clone(&state), c, ctx.netlink.clone())));

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(event) = sources.recv() => supervisor.on_source(event),
            Some(key) = exits.recv() => supervisor.exited(&key),
        }
    }
    tracing::info!("agent stopping; the flows and virtual IPs stay as they are");
    for handle in supervisor.groups.values() {
        handle.task.abort();
    }
    Ok(())
}

/// The enrollment certificate, for replication links with TLS; absent (and such volumes
/// refused with a message saying so) when the node has none.
fn volume_tls(config: &AgentConfig) -> Option<crate::replication::tls::TlsMaterial> {
    let tls = &config.tls;
    if !tls.cert_file.exists() {
        return None;
    }
    crate::replication::tls::TlsMaterial::from_files(&tls.cert_file, &tls.key_file, &tls.ca_file)
        .inspect_err(|e| tracing::warn!(error = %e, "the enrollment certificate cannot secure replication links"))
        .ok()
}

/// Waits until the configuration names a source this agent can use: an enrollment whose
/// files work, or a bundle file (whose node, when not configured, the bundle names).
async fn wait_until_runnable(
    mut options: RunOptions,
    status: &watch::Sender<StatusSnapshot>,
    started: std::time::Instant,
) -> Option<(AgentConfig, String, Option<NodeApiClient>)> {
    let mut noted = None;
    loop {
        let problem = match options.config.source() {
            Source::Controller { node, .. } => {
                match ControllerConfig::from_agent_config(&options.config).map(|c| NodeApiClient::new(&c)) {
                    Some(Ok(client)) => return Some((options.config, node, Some(client))),
                    Some(Err(e)) => format!("cannot use the enrollment: {e}"),
                    None => "not enrolled".to_string(),
                }
            }
            Source::BundleFile { node, .. } if !node.is_empty() => return Some((options.config, node, None)),
            Source::BundleFile { path, .. } => match crate::bundle::read_file(&path) {
                Ok(bundle) if !bundle.node.is_empty() => return Some((options.config, bundle.node, None)),
                Ok(_) => format!("{}: the bundle names no node and none is configured", path.display()),
                Err(e) => e,
            },
            Source::NotEnrolled => "not enrolled: run `hapair-agent enroll` (or configure bundleFile)".to_string(),
        };
        if noted.as_ref() != Some(&problem) {
            tracing::warn!("{problem}; waiting (looking again every {}s)", WAIT_FOR_ENROLLMENT.as_secs());
            noted = Some(problem.clone());
        }
        status.send_replace(StatusSnapshot {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: started.elapsed().as_secs(),
            config_error: Some(problem),
            ..StatusSnapshot::default()
        });
        tokio::time::sleep(WAIT_FOR_ENROLLMENT).await;
        if let Some(path) = &options.config_path {
            match AgentConfig::load(path) {
                Ok((config, _)) => options.config = config,
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}

struct Supervisor {
    ctx: Arc<NodeContext>,
    groups: BTreeMap<GroupKey, GroupHandle>,
    applied: Option<DesiredConfig>,
    state: Arc<Mutex<NodeState>>,
    exits: UnboundedSender<GroupKey>,
    wipes: wipes::Wipes,
}

impl Supervisor {
    fn state(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn applied_revision(&self) -> Option<u64> {
        self.applied.as_ref().map(|b| b.revision)
    }

    fn on_source(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Bundle(bundle) => self.apply(*bundle, false),
            SourceEvent::Unreadable(why) => self.refuse(why),
            SourceEvent::ControllerDown(why) => tracing::warn!(
                revision = ?self.applied_revision(),
                "controller unreachable ({why}); running on the last accepted config"
            ),
            SourceEvent::ControllerBack => tracing::info!("controller reachable again"),
        }
    }

    /// Everything a group needs, checked before anything of the bundle is applied.
    fn check(&self, bundle: &DesiredConfig) -> Result<(), String> {
        let node = &self.ctx.node;
        crate::bundle::check(bundle, node).map_err(|e| e.to_string())?;
        for g in &bundle.groups {
            let group = |e: &dyn std::fmt::Display| format!("group {}: {e}", g.key);
            EngineConfig::from_group(g, node).map_err(|e| e.to_string())?;
            HmacKey::load(&g.heartbeat_key).map_err(|e| group(&e))?;
            crate::heartbeat::link_endpoints(&g.spec, node).map_err(|e| group(&e))?;
            FlowSpec::new(&g.key, &g.spec, node, &self.ctx.vip_manager).map_err(|e| group(&e))?;
            let me = g.spec.nodes.iter().find(|n| &n.name == node).ok_or_else(|| group(&"not a member"))?;
            for m in &g.spec.monitors {
                Probe::from_spec(m, me).map_err(|e| group(&e))?;
            }
        }
        Ok(())
    }

    fn refuse(&mut self, why: String) {
        tracing::warn!("desired config refused, the previous one stays in force: {why}");
        self.ctx.board.event_all(&record(
            EventType::Warning,
            "ConfigRejected",
            format!("desired config refused; the previous one stays in force: {why}"),
            0,
        ));
        self.state().config_error = Some(why);
    }

    fn apply(&mut self, bundle: DesiredConfig, cached: bool) {
        if let Err(why) = self.check(&bundle) {
            let why = format!("revision {}: {why}", bundle.revision);
            if cached {
                tracing::warn!("the cached desired config is not usable: {why}");
            } else {
                self.refuse(why);
            }
            return;
        }
        if self.applied.as_ref() == Some(&bundle) {
            self.state().config_error = None;
            return;
        }
        if !cached && let Err(e) = records::save_bundle(&self.ctx.store, &bundle) {
            tracing::warn!(error = %e, "caching the desired config failed; a restart would run the previous one");
        }
        for config in &bundle.groups {
            match self.groups.get_mut(&config.key) {
                Some(handle) if !handle.task.is_finished() => {
                    if (handle.config != *config || handle.removed)
                        && handle.tx.send(Input::Config(Box::new(config.clone()))).is_ok()
                    {
                        handle.config = config.clone();
                        handle.removed = false;
                    }
                }
                _ => {
                    tracing::info!(group = %config.key, "starting group");
                    let handle = group::spawn(Arc::clone(&self.ctx), config.clone(), self.exits.clone());
                    self.groups.insert(config.key.clone(), handle);
                }
            }
        }
        for (key, handle) in &mut self.groups {
            if !bundle.groups.iter().any(|g| &g.key == key) && !handle.removed {
                tracing::info!(group = %key, "group removed from the desired config: stopping it here");
                let _ = handle.tx.send(Input::Remove);
                handle.config.deleting = true;
                handle.removed = true;
            }
        }
        self.wipes.apply(&bundle.wipes, &bundle.groups);
        tracing::info!(revision = bundle.revision, groups = bundle.groups.len(), "desired config applied");
        {
            let mut state = self.state();
            state.applied_revision = Some(bundle.revision);
            state.config_error = None;
        }
        self.applied = Some(bundle);
        // The controller learns the new revision (and the groups' first states) now
        // rather than at the next periodic report, when status would still show the
        // node without its groups.
        self.ctx.board.urgent.notify_one();
    }

    fn exited(&mut self, key: &GroupKey) {
        if self.groups.get(key).is_some_and(|h| h.task.is_finished() || h.removed) {
            tracing::info!(group = %key, "group stopped");
            self.groups.remove(key);
        }
    }
}

async fn status_loop(
    board: Arc<Board>,
    state: Arc<Mutex<NodeState>>,
    status: watch::Sender<StatusSnapshot>,
    started: std::time::Instant,
    standalone: bool,
) {
    let mut rounds = 0u32;
    loop {
        let node = state.lock().map(|s| s.clone()).unwrap_or_default();
        status.send_replace(report::status_snapshot(&node, &board, started.elapsed()));
        rounds += 1;
        // Without a controller nobody acknowledges final reports: let them age out.
        if standalone && rounds.is_multiple_of(4) {
            board.status_round();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn report_loop(board: Arc<Board>, state: Arc<Mutex<NodeState>>, client: NodeApiClient, netlink: Netlink) {
    let mut sampler = host::HostSampler::default();
    let mut failing = false;
    loop {
        let node = state.lock().map(|s| s.clone()).unwrap_or_default();
        let (groups, newest) = board.for_report();
        let links = host::links(&netlink, &board.heartbeat_addresses()).await;
        let report = report::node_report(&node, sampler.hardware(), links, groups);
        match client.post_report(&report).await {
            Ok(()) => {
                board.delivered(&newest);
                if let Ok(mut s) = state.lock() {
                    s.controller_protocol_version = client.agreed_version();
                }
                if std::mem::replace(&mut failing, false) {
                    tracing::info!("reports reach the controller again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "report not delivered; retrying");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(report::REPORT_EVERY) => {}
            () = board.urgent.notified() => {}
        }
    }
}
