//! One group on this node: a task that owns the group's [`Engine`], feeds it everything
//! that happens, and carries out its commands.
//!
//! Inputs: authenticated heartbeats (decoded from the envelope payload; an undecodable
//! payload is counted, never fatal), a tick at the engine's next deadline, monitor
//! observations on each monitor's interval, health checks of running steps on each check's
//! interval, results of step operations and witness requests (each runs as its own task),
//! config updates and removal from the bundle.
//!
//! Commands run in the order given. `Persist` is written (fsync, rename, fsync) before
//! the next command runs; should that fail, nothing that would act on the unsaved state
//! runs until a retry succeeds (starts, VIP additions, heartbeats and witness requests
//! are answered as failed or dropped), while everything that takes resources down still
//! does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hapair_crds::hagroup::{FailoverPhase, FailoverRecord, MonitorSpec, NodeRole, NodeSpec};
use hapair_crds::nodeapi::{EventType, GroupConfig, GroupKey, GroupReport, LeaseOp, StepState};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::clock;
use super::host::HeartbeatAddress;
use super::inbox::Input;
use super::node_api::WitnessPath;
use super::records::GroupFile;
use super::report::{Board, record};
use super::steps::{FlowSpec, StepExecutor};
use super::volumes::{GroupVolumes, VolumeContext};
use super::watchdog::Watchdog;
use crate::engine::config::{EngineConfig, PlannedKind};
use crate::engine::{Command, Engine, Event, Identity, Notice, PersistedState, Role, StepOp, VolumeOp, WitnessAnswer};
use crate::heartbeat::{HeartbeatReceiver, HeartbeatSender, HmacKey, LinkEndpoints, TransportConfig};
use crate::iface::Netlink;
use crate::metrics::AgentMetrics;
use crate::probe::replication::VolumeStates;
use crate::probe::{MonitorState, Probe, ProcPaths};
use crate::replication::tls::TlsMaterial;
use crate::state::StateStore;
use crate::vip::{Presence, VipManager};

/// Window over which heartbeat loss per link is reported.
const LOSS_WINDOW: Duration = Duration::from_secs(10);
/// Published state is refreshed at least this often (and at once on role changes).
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// What every group task of the node shares.
#[derive(Debug)]
pub struct NodeContext {
    pub node: String,
    pub incarnation: u64,
    pub boot_id: String,
    pub store: StateStore,
    pub vip_manager: Arc<VipManager>,
    pub netlink: Netlink,
    pub watchdog: Arc<Watchdog>,
    pub metrics: Arc<AgentMetrics>,
    pub witness: WitnessPath,
    pub board: Arc<Board>,
    /// Where the volumes' NBD sockets live.
    pub runtime_dir: PathBuf,
    /// The node's certificate for replication links that enable TLS.
    pub volume_tls: Option<TlsMaterial>,
}

/// The supervisor's handle on a running group task.
#[derive(Debug)]
pub struct GroupHandle {
    pub tx: UnboundedSender<Input>,
    pub config: GroupConfig,
    pub task: JoinHandle<()>,
    /// The group left the bundle and its task was told to finish ([`Input::Remove`]).
    /// Distinct from `config.deleting`: a group the controller delivers as deleting stops
    /// its flow but keeps running (sockets, replicas) until it leaves the bundle.
    pub removed: bool,
}

/// Starts the task for `config`; it tells `exits` when it ends.
pub fn spawn(ctx: Arc<NodeContext>, config: GroupConfig, exits: UnboundedSender<GroupKey>) -> GroupHandle {
    let (tx, rx) = unbounded_channel();
    let key = config.key.clone();
    let span = tracing::info_span!("group", group = %key, node = %ctx.node);
    let task = tokio::spawn(
        {
            let (config, tx) = (config.clone(), tx.clone());
            async move {
                run(ctx, config, tx, rx).await;
                let _ = exits.send(key);
            }
        }
        .instrument(span),
    );
    GroupHandle { tx, config, task, removed: false }
}

struct Transport {
    sender: HeartbeatSender,
    receiver: HeartbeatReceiver,
    endpoints: Vec<LinkEndpoints>,
    key: HmacKey,
}

async fn bind(ctx: &NodeContext, config: &GroupConfig) -> Result<Transport, String> {
    let key = HmacKey::load(&config.heartbeat_key).map_err(|e| e.to_string())?;
    let (peer, endpoints) = crate::heartbeat::link_endpoints(&config.spec, &ctx.node).map_err(|e| e.to_string())?;
    let transport = TransportConfig {
        group: config.key.clone(),
        local_node: ctx.node.clone(),
        peer_node: peer,
        incarnation: ctx.incarnation,
        interval: config.spec.heartbeat.interval.as_std(),
        loss_window: LOSS_WINDOW,
        key: key.clone(),
    };
    let (sender, receiver) = crate::heartbeat::bind(transport, &endpoints).await.map_err(|e| e.to_string())?;
    Ok(Transport { sender, receiver, endpoints, key })
}

struct MonitorRun {
    spec: MonitorSpec,
    /// `None` while an observation is out.
    probe: Option<Probe>,
    state: MonitorState,
    generation: u64,
}

struct CheckRun {
    next_due: std::time::Instant,
    in_flight: bool,
    generation: u64,
    /// The run made the moment the step started, before its first interval: a pass is
    /// reported at once (the failover's "first healthy"), but a failure is not, because a
    /// service may need a moment to come up and `failureThreshold` counts from the run one
    /// interval after the start, as it always has.
    early: bool,
}

struct GroupTask {
    ctx: Arc<NodeContext>,
    key: GroupKey,
    config: GroupConfig,
    engine: Engine,
    file: GroupFile,
    transport: Transport,
    steps: StepExecutor,
    volumes: GroupVolumes,
    volume_ctx: VolumeContext,
    monitors: Vec<MonitorRun>,
    checks: BTreeMap<usize, CheckRun>,
    generation: u64,
    inbox: UnboundedReceiver<Input>,
    tx: UnboundedSender<Input>,
    /// A persisted state that could not be written yet.
    undurable: Option<PersistedState>,
    removing: bool,
    /// The heartbeat version the peer speaks, so ours can match.
    peer_version: crate::protocol::PeerVersion,
    /// The last unsupported heartbeat version logged, so a peer out of skew is logged once.
    refused_version: Option<u8>,
    published: Option<(NodeRole, u64)>,
    last_publish: std::time::Instant,
    last_failover: Option<(u64, FailoverRecord)>,
}

fn me<'a>(config: &'a GroupConfig, node: &str) -> Option<&'a NodeSpec> {
    config.spec.nodes.iter().find(|n| n.name == node)
}

fn monitor_runs(
    config: &GroupConfig,
    node: &str,
    keep: &mut Vec<MonitorRun>,
    generation: u64,
    volumes: &VolumeStates,
) -> Vec<MonitorRun> {
    let Some(me) = me(config, node) else { return vec![] };
    config
        .spec
        .monitors
        .iter()
        .filter_map(|spec| {
            if let Some(i) = keep.iter().position(|m| &m.spec == spec) {
                return Some(keep.swap_remove(i));
            }
            match Probe::from_spec(spec, me) {
                Ok(probe) => Some(MonitorRun {
                    spec: spec.clone(),
                    probe: Some(probe.with_volume_states(volumes)),
                    state: MonitorState::new(spec),
                    generation,
                }),
                Err(e) => {
                    tracing::warn!(monitor = %spec.name, error = %e, "monitor cannot run");
                    None
                }
            }
        })
        .collect()
}

/// Whether every virtual IP a serving record covers is still on its interface and ours:
/// only then may the previous run's role be taken up again.
async fn vips_still_held(ctx: &NodeContext, config: &GroupConfig, spec: &FlowSpec) -> Result<(), String> {
    let plan = EngineConfig::from_group(config, &ctx.node).map_err(|e| e.to_string())?.flow;
    for step in &plan.steps {
        if let PlannedKind::VirtualIp { vip } = &step.kind {
            let resolved = spec.vip(vip).ok_or_else(|| format!("virtual IP {vip} is not defined"))?;
            match ctx.vip_manager.presence(resolved).await {
                Ok(Presence::Ours) => {}
                Ok(other) => return Err(format!("virtual IP {resolved} is {other:?}")),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok(())
}

async fn run(
    ctx: Arc<NodeContext>,
    mut config: GroupConfig,
    tx: UnboundedSender<Input>,
    mut inbox: UnboundedReceiver<Input>,
) {
    let key = config.key.clone();
    let board = Arc::clone(&ctx.board);
    let warn = |reason: &str, message: String| {
        tracing::warn!(reason, "{message}");
        board.event(&key, record(EventType::Warning, reason, message, 0));
    };
    // Heartbeat sockets first: an engine that cannot hear its peer must not run (it would
    // take the silence for a dead peer).
    let mut reported = None;
    let transport = loop {
        match bind(&ctx, &config).await {
            Ok(t) => break t,
            Err(e) => {
                if reported.as_ref() != Some(&e) {
                    warn("HeartbeatUnavailable", format!("cannot set up heartbeats: {e}; retrying every second"));
                    reported = Some(e.clone());
                }
                let mut waiting = super::report::placeholder(&key);
                waiting.role_reason = Some(format!("cannot set up heartbeats: {e}"));
                board.publish(waiting, vec![]);
                match tokio::time::timeout(Duration::from_secs(1), inbox.recv()).await {
                    Ok(None) | Ok(Some(Input::Remove)) => {
                        board.finished(&key);
                        return;
                    }
                    Ok(Some(Input::Config(c))) => config = *c,
                    Ok(Some(_)) | Err(_) => {}
                }
            }
        }
    };
    let spec = match FlowSpec::new(&key, &config.spec, &ctx.node, &ctx.vip_manager) {
        Ok(s) => s,
        Err(e) => {
            warn("ConfigRejected", format!("the flow cannot run here: {e}"));
            board.finished(&key);
            return;
        }
    };
    let file = GroupFile::new(&ctx.store, &key, &ctx.boot_id);
    let mut restored = match file.load() {
        Ok(r) => r,
        Err(e) => {
            warn("StateUnreadable", format!("reading {}: {e}; starting without it", file.name()));
            Default::default()
        }
    };
    if let Some((reason, moved_to)) = &restored.corrupt {
        warn(
            "StateCorrupt",
            format!("state file {} is corrupt ({reason}); set aside as {moved_to}; starting as standby", file.name()),
        );
    }
    if restored.lease_from_other_boot {
        tracing::info!("the recorded serving lease is from another boot: starting as standby");
    }
    if let Some(state) = &mut restored.state
        && state.serving.is_some()
    {
        // A replica always opens as secondary, so a role that holds volumes cannot be taken
        // up again as it was: the group starts as standby and is promoted afresh.
        let held = if config.volumes.is_empty() {
            vips_still_held(&ctx, &config, &spec).await
        } else {
            Err("its volumes are reopened as secondary".to_string())
        };
        if let Err(why) = held {
            tracing::info!("not resuming the previous run's role: {why}");
            state.serving = None;
        }
    }
    let identity = Identity { node: ctx.node.clone(), incarnation: ctx.incarnation };
    let (engine, startup) = match Engine::new(identity, &config, restored.state, clock::now()) {
        Ok(x) => x,
        Err(e) => {
            warn("ConfigRejected", e.to_string());
            board.finished(&key);
            return;
        }
    };
    let steps = StepExecutor::new(spec, Arc::clone(&ctx.vip_manager), ctx.netlink.clone(), tx.clone());
    let volume_ctx = VolumeContext {
        node: ctx.node.clone(),
        key: key.clone(),
        runtime_dir: ctx.runtime_dir.clone(),
        tls: ctx.volume_tls.clone(),
        board: Arc::clone(&ctx.board),
        inbox: tx.clone(),
        metrics: Arc::clone(&ctx.metrics),
    };
    let volumes = GroupVolumes::open(&volume_ctx, &config);
    let mut keep = Vec::new();
    let monitors = monitor_runs(&config, &ctx.node, &mut keep, 0, volumes.states());
    let mut task = GroupTask {
        key: key.clone(),
        config,
        engine,
        file,
        transport,
        steps,
        volumes,
        volume_ctx,
        monitors,
        checks: BTreeMap::new(),
        generation: 0,
        inbox,
        tx,
        undurable: None,
        removing: false,
        peer_version: crate::protocol::PeerVersion::default(),
        refused_version: None,
        published: None,
        last_publish: std::time::Instant::now(),
        last_failover: None,
        ctx,
    };
    if task.engine.status(clock::now()).serving {
        task.resumed();
    }
    let span = tracing::info_span!("term", epoch = task.engine.epoch());
    task.execute(startup).instrument(span).await;
    task.after_engine();
    task.run().await;
    task.ctx.watchdog.disarm(&key.to_string());
    task.publish(true);
    task.volumes.shutdown().await;
    // A group that is gone leaves no volume series behind to alert on.
    for volume in &task.config.volumes {
        task.ctx.metrics.forget_volume(&task.group(), &volume.name);
    }
    task.ctx.board.finished(&key);
}

fn std_deadline(at: crate::engine::Instant) -> tokio::time::Instant {
    tokio::time::Instant::now() + clock::until(at)
}

impl GroupTask {
    fn group(&self) -> String {
        self.key.to_string()
    }

    /// The engine took up serving again after an agent restart: the steps were started by
    /// the previous run; remember them so they can be checked and stopped.
    fn resumed(&mut self) {
        let plan = self.engine.config().flow.clone();
        for (i, step) in plan.steps.iter().enumerate() {
            match &step.kind {
                PlannedKind::VirtualIp { vip } => self.steps.resume_vip(i, vip),
                _ => {
                    self.steps.resume_step(i, &step.name);
                    self.schedule_check(i);
                }
            }
        }
    }

    async fn run(&mut self) {
        let mut last_tick = clock::now();
        loop {
            let deadline = self.engine.next_deadline();
            // An engine whose deadline did not move is not ticked in a busy loop.
            let wake = if deadline <= last_tick {
                std_deadline(last_tick) + Duration::from_millis(1)
            } else {
                std_deadline(deadline)
            };
            let probe_at = self.next_probe();
            let check_at = self.next_check();
            tokio::select! {
                biased;
                input = self.inbox.recv() => match input {
                    Some(input) => self.on_input(input).await,
                    None => return,
                },
                datagram = self.transport.receiver.recv(0) => match datagram {
                    Ok(hb) => self.on_datagram(hb).await,
                    Err(e) => {
                        tracing::error!(error = %e, "heartbeat transport stopped");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = tokio::time::sleep_until(wake) => {
                    last_tick = clock::now();
                    self.feed(Event::Tick).await;
                }
                () = sleep_until_opt(probe_at) => self.start_probes(),
                () = sleep_until_opt(check_at) => self.start_checks(),
            }
            if self.removing && self.engine.status(clock::now()).cleaned_up {
                return;
            }
        }
    }

    async fn feed(&mut self, event: Event) {
        // Everything logged while handling one event carries the term it started in.
        let span = tracing::info_span!("term", epoch = self.engine.epoch());
        let commands = span.in_scope(|| self.engine.handle(clock::now(), event));
        self.volumes.observe_epoch(self.engine.epoch());
        if self.engine.role() == crate::engine::Role::Fenced {
            self.volumes.lease_lost("the engine self-fenced: its lease ends unrenewed");
        }
        self.execute(commands).instrument(span).await;
        self.after_engine();
    }

    async fn on_datagram(&mut self, hb: crate::heartbeat::Heartbeat) {
        match crate::engine::Heartbeat::decode_versioned(&hb.payload) {
            Ok((message, version, range)) => {
                self.peer_version.heard(message.incarnation, version, range);
                if let Some(agreed) = self.peer_version.agreed(crate::protocol::Range::ours()) {
                    self.ctx.metrics.set_peer_protocol_version(&self.group(), "heartbeat", agreed);
                }
                self.feed(Event::Heartbeat { link: usize::from(hb.header.link), message }).await;
            }
            Err(crate::engine::heartbeat::DecodeError::Version(version)) => {
                self.ctx.metrics.record_unsupported_heartbeat(&self.group());
                if self.refused_version != Some(version) {
                    self.refused_version = Some(version);
                    tracing::warn!(
                        version,
                        oldest = crate::protocol::OLDEST,
                        newest = crate::protocol::highest(),
                        "the peer sends heartbeats in a version this agent does not speak: it is more than one \
                         version away, outside the supported skew (docs/upgrades.md)"
                    );
                }
            }
            Err(e) => {
                self.ctx.metrics.record_undecodable(&self.group());
                tracing::debug!(link = hb.header.link, error = %e, "authenticated heartbeat payload does not decode");
            }
        }
    }

    async fn on_input(&mut self, input: Input) {
        match input {
            Input::Config(config) => {
                if !config.deleting {
                    // Put back into the bundle while it was being removed.
                    self.removing = false;
                }
                self.reconfigure(*config).await;
            }
            Input::Remove => {
                self.removing = true;
                let mut config = self.config.clone();
                config.deleting = true;
                self.reconfigure(config).await;
            }
            Input::StepDone { step, op, result } => {
                self.steps.finished(step, op);
                match op {
                    StepOp::Start | StepOp::Restart if result.is_ok() => self.schedule_check(step),
                    StepOp::Stop => {
                        self.checks.remove(&step);
                    }
                    _ => {}
                }
                self.feed(Event::StepDone { step, op, result }).await;
            }
            Input::VolumeDone { volume, op, result } => self.feed(Event::VolumeDone { volume, op, result }).await,
            Input::VerifyStarted { action, volume, result } => {
                self.feed(Event::VerifyStarted { action, volume, result }).await;
            }
            Input::VolumeVerified { volume, report } => self.volumes.verified(volume, *report),
            Input::VolumeOpened { volume, replica } => {
                self.steps.set_replica(&volume, (*replica).clone());
                self.volumes.opened(&self.volume_ctx, volume, *replica);
            }
            Input::VolumeStatus { volume, status } => {
                self.ctx.metrics.set_volume(&self.group(), &status);
                let change = self.volumes.status_changed(volume, *status);
                if let Some((volume, disk, connection)) = change.engine {
                    tracing::info!(volume, disk = disk.as_str(), ?connection, "volume state");
                    self.feed(Event::Volume { volume, disk, connection }).await;
                }
                if change.shown {
                    self.publish(false);
                }
            }
            Input::Witness { request_id, answer } => self.feed(Event::Witness { request_id, answer }).await,
            Input::Observed { generation, index, probe, observation, at } => {
                let Some(run) = self.monitors.get_mut(index).filter(|m| m.generation == generation) else { return };
                run.probe = Some(*probe);
                run.state.observe(at, observation.clone());
                let name = run.spec.name.clone();
                self.feed(Event::Probe {
                    monitor: name,
                    healthy: observation.healthy,
                    message: Some(observation.message),
                })
                .await;
            }
            Input::Checked { step, generation, healthy, message } => {
                let Some(run) = self.checks.get_mut(&step).filter(|c| c.generation == generation) else { return };
                run.in_flight = false;
                if std::mem::take(&mut run.early) && !healthy {
                    tracing::debug!(step, ?message, "the check right after the start failed; not counted");
                    return;
                }
                self.feed(Event::StepCheck { step, healthy, message }).await;
            }
        }
    }

    async fn reconfigure(&mut self, config: GroupConfig) {
        if config == self.config {
            return;
        }
        if config.spec != self.config.spec {
            match FlowSpec::new(&self.key, &config.spec, &self.ctx.node, &self.ctx.vip_manager) {
                Ok(spec) => self.steps.replace_spec(spec),
                // The supervisor checked the bundle; this would be a bug, not an input.
                Err(e) => tracing::error!(error = %e, "new flow cannot run; steps keep the previous definition"),
            }
            self.generation += 1;
            let mut keep = std::mem::take(&mut self.monitors);
            self.monitors = monitor_runs(&config, &self.ctx.node, &mut keep, self.generation, self.volumes.states());
        }
        self.rebind(&config).await;
        self.config = config.clone();
        self.feed(Event::Config(Box::new(config))).await;
    }

    /// New heartbeat addresses or port need new sockets; a new key only a new MAC.
    async fn rebind(&mut self, config: &GroupConfig) {
        let key = match HmacKey::load(&config.heartbeat_key) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "new heartbeat key unusable; keeping the previous one");
                return;
            }
        };
        let endpoints = crate::heartbeat::link_endpoints(&config.spec, &self.ctx.node).map(|(_, e)| e);
        if endpoints.as_ref().is_ok_and(|e| *e != self.transport.endpoints) {
            match bind(&self.ctx, config).await {
                Ok(t) => self.transport = t,
                Err(e) => {
                    tracing::error!(error = %e, "new heartbeat links cannot be set up; keeping the previous ones")
                }
            }
        } else if key != self.transport.key {
            self.transport.sender.set_key(key.clone());
            self.transport.receiver.set_key(key.clone());
            self.transport.key = key;
        }
    }

    fn schedule_check(&mut self, step: usize) {
        if self.steps.check_of(step).is_some() {
            self.generation += 1;
            self.checks.insert(
                step,
                CheckRun {
                    // The first check runs at once: its pass is a phase of a failover
                    // (first healthy), and waiting an interval would only delay it.
                    next_due: std::time::Instant::now(),
                    in_flight: false,
                    generation: self.generation,
                    early: true,
                },
            );
        }
    }

    fn next_probe(&self) -> Option<tokio::time::Instant> {
        self.monitors
            .iter()
            .filter(|m| m.probe.is_some())
            .map(|m| m.state.next_due().map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std))
            .min()
    }

    fn next_check(&self) -> Option<tokio::time::Instant> {
        self.checks.values().filter(|c| !c.in_flight).map(|c| tokio::time::Instant::from_std(c.next_due)).min()
    }

    fn start_probes(&mut self) {
        let now = std::time::Instant::now();
        for (index, run) in self.monitors.iter_mut().enumerate() {
            if !run.state.due(now) {
                continue;
            }
            let Some(mut probe) = run.probe.take() else { continue };
            let (tx, netlink, generation) = (self.tx.clone(), self.ctx.netlink.clone(), run.generation);
            tokio::spawn(
                async move {
                    let at = std::time::Instant::now();
                    let observation = probe.observe(&netlink, &ProcPaths::default(), at).await;
                    let _ = tx.send(Input::Observed { generation, index, probe: Box::new(probe), observation, at });
                }
                .in_current_span(),
            );
        }
    }

    fn start_checks(&mut self) {
        let now = std::time::Instant::now();
        let states = self.engine.status(clock::now()).steps;
        for (step, run) in &mut self.checks {
            if run.in_flight || run.next_due > now {
                continue;
            }
            let Some((runner, index, check)) = self.steps.check_of(*step) else { continue };
            run.next_due = now + check.interval.as_std();
            let running =
                states.get(*step).is_some_and(|s| matches!(s.state, StepState::Running | StepState::Stabilizing));
            if !running {
                run.early = false;
                continue;
            }
            run.in_flight = true;
            let (tx, step, generation) = (self.tx.clone(), *step, run.generation);
            tokio::spawn(
                async move {
                    let outcome = runner.check_step(index).await;
                    let (healthy, message) = match outcome {
                        Some(o) if o.is_ok() => (true, None),
                        Some(o) => (false, Some(o.summary())),
                        None => (true, None),
                    };
                    let _ = tx.send(Input::Checked { step, generation, healthy, message });
                }
                .in_current_span(),
            );
        }
    }

    /// Writes the pending persisted state if there is one; whether everything the engine
    /// asked to persist is durable.
    async fn durable(&mut self) -> bool {
        let Some(state) = self.undurable.clone() else { return true };
        let file = self.file.clone();
        let saved = tokio::task::spawn_blocking(move || file.save(&state)).await;
        match saved {
            Ok(Ok(())) => {
                self.undurable = None;
                true
            }
            Ok(Err(e)) => {
                self.runtime_event(
                    EventType::Warning,
                    "StateNotSaved",
                    format!("{e}: nothing that depends on it runs until it is saved"),
                );
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "state writer task failed");
                false
            }
        }
    }

    fn refuse_step(&self, step: usize, op: StepOp) {
        let _ = self.tx.send(Input::StepDone { step, op, result: Err("the group's state could not be saved".into()) });
    }

    async fn execute(&mut self, commands: Vec<Command>) {
        for command in commands {
            match command {
                Command::Persist(state) => {
                    self.undurable = Some(state);
                    self.durable().await;
                }
                Command::SendHeartbeat(hb) => {
                    if !self.durable().await {
                        continue;
                    }
                    let ours = crate::protocol::Range::ours();
                    match hb.encode_as(self.peer_version.send_version(ours), ours) {
                        Ok(payload) => match self.transport.sender.send(hb.epoch, &payload).await {
                            Ok(failures) => {
                                for (link, e) in failures.0 {
                                    tracing::debug!(link, error = %e, "heartbeat not sent");
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "heartbeat not sent"),
                        },
                        Err(e) => tracing::error!(error = %e, "heartbeat cannot be encoded"),
                    }
                }
                Command::Witness { request_id, request } => {
                    if request.op != LeaseOp::Release && !self.durable().await {
                        let answer = WitnessAnswer::Failed("the group's state could not be saved".into());
                        let _ = self.tx.send(Input::Witness { request_id, answer });
                        continue;
                    }
                    let (tx, witness) = (self.tx.clone(), self.ctx.witness.clone());
                    let timeout = self.engine.config().timing.witness_timeout.max(Duration::from_millis(100));
                    tokio::spawn(
                        async move {
                            let answer = witness.ask(&request, timeout).await;
                            let _ = tx.send(Input::Witness { request_id, answer });
                        }
                        .in_current_span(),
                    );
                }
                Command::StartStep { step, name } => {
                    if self.durable().await {
                        self.steps.start_step(step, &name);
                    } else {
                        self.refuse_step(step, StepOp::Start);
                    }
                }
                Command::RestartStep { step, name } => {
                    if self.durable().await {
                        self.steps.restart_step(step, &name);
                    } else {
                        self.refuse_step(step, StepOp::Restart);
                    }
                }
                Command::AddVip { step, vip } => {
                    if self.durable().await {
                        self.steps.add_vip(step, &vip);
                    } else {
                        self.refuse_step(step, StepOp::Start);
                    }
                }
                Command::StopStep { step, name } => {
                    self.checks.remove(&step);
                    self.steps.stop_step(step, &name);
                }
                Command::RemoveVip { step, vip } => self.steps.remove_vip(step, &vip),
                Command::PromoteVolume { volume, epoch, force } => {
                    if self.durable().await {
                        self.volumes.run(&self.tx, &volume, VolumeOp::Promote, epoch, force);
                    } else {
                        let result = Err("the group's state could not be saved".to_string());
                        let _ = self.tx.send(Input::VolumeDone { volume, op: VolumeOp::Promote, result });
                    }
                }
                Command::DemoteVolume { volume } => self.volumes.run(&self.tx, &volume, VolumeOp::Demote, 0, false),
                Command::ResolveSplitBrain { volume, keep_local } => {
                    let epoch = self.engine.epoch();
                    self.volumes.resolve_split_brain(&self.ctx.board, &self.key, &volume, keep_local, epoch);
                }
                Command::StartVerify { volume, action } => self.volumes.start_verify(&self.tx, &volume, action),
                Command::ArmWatchdog { deadline } => {
                    if let Some(risk) = self.ctx.watchdog.arm(&self.group(), deadline, clock::now()) {
                        self.runtime_event(EventType::Warning, "WatchdogRisk", risk);
                    }
                }
                Command::DisarmWatchdog => self.ctx.watchdog.disarm(&self.group()),
                Command::Emit(notice) => self.emit(notice),
                Command::ActionResult(r) => {
                    tracing::info!(action = %r.id, outcome = ?r.outcome, "admin action: {}", r.message);
                }
            }
        }
    }

    fn emit(&self, notice: Notice) {
        if notice.type_ == EventType::Warning {
            tracing::warn!(reason = notice.reason.as_str(), "{}", notice.message);
        }
        self.ctx
            .board
            .event(&self.key, record(notice.type_, notice.reason.as_str(), notice.message, self.engine.epoch()));
    }

    fn runtime_event(&self, type_: EventType, reason: &str, message: String) {
        match type_ {
            EventType::Warning => tracing::warn!(reason, "{message}"),
            EventType::Normal => tracing::info!(reason, "{message}"),
        }
        self.ctx.board.event(&self.key, record(type_, reason, message, self.engine.epoch()));
    }

    /// Metrics and the published state after the engine ran.
    fn after_engine(&mut self) {
        let status = self.engine.status(clock::now());
        let now = (status.report_role, status.epoch);
        let changed = self.published != Some(now);
        // A new role (the first one included: until then the controller shows the node
        // without the group) goes out at once, after it is on the board.
        let urgent = changed && self.published.is_none_or(|(role, _)| role != status.report_role);
        if changed || self.last_publish.elapsed() >= PUBLISH_EVERY {
            self.publish(false);
        }
        if urgent {
            self.ctx.board.urgent.notify_one();
        }
    }

    fn publish(&mut self, finished: bool) {
        let now = clock::now();
        let status = self.engine.status(now);
        let group = self.group();
        let m = &self.ctx.metrics;
        m.set_role(&group, &self.ctx.node, status.report_role);
        m.set_epoch(&group, status.epoch);
        m.record_heartbeat_drops(&group, self.transport.receiver.drops());
        let dead_after = self.engine.config().timing.dead_after;
        let links = self.transport.receiver.link_reports(std::time::Instant::now(), dead_after);
        for link in &links {
            m.set_link(&group, link.index, link.up, link.loss_percent);
        }
        for monitor in &status.monitors {
            m.set_probe(&group, &monitor.name, monitor.healthy);
        }
        for step in &status.steps {
            m.set_step(&group, &step.name, step.state, step.restarts);
        }
        if let Some(f) = &status.last_failover {
            // The same failover gains phases after serving (first healthy checks): only
            // those are new to the histogram, and the record keeps its time.
            let known = self.last_failover.as_ref().filter(|(epoch, _)| *epoch == f.epoch).map(|(_, r)| r);
            if known.is_none_or(|r| r.phases.len() != f.phases.len()) {
                let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                match known {
                    None => m.record_failover(&group, f.took, &f.phases),
                    Some(r) => {
                        let new: Vec<_> =
                            f.phases.iter().filter(|p| !r.phases.iter().any(|k| k.phase == p.phase)).cloned().collect();
                        m.record_phases(&group, &new);
                    }
                }
                let record = FailoverRecord {
                    time: known.map_or_else(clock::rfc3339_now, |r| r.time.clone()),
                    from: f.from.clone(),
                    to: f.to.clone(),
                    reason: f.reason.clone(),
                    duration_ms: millis(f.took),
                    phases: f
                        .phases
                        .iter()
                        .map(|p| FailoverPhase { phase: p.phase.clone(), at_ms: millis(p.after) })
                        .collect(),
                };
                self.last_failover = Some((f.epoch, record));
            }
        }
        let unix = clock::unix_millis();
        let heartbeat = self
            .transport
            .endpoints
            .iter()
            .zip(&links)
            .map(|(e, l)| HeartbeatAddress {
                link: u32::from(e.index),
                local: e.local.ip(),
                loss_percent: l.loss_percent,
            })
            .collect();
        let report = GroupReport {
            key: self.key.clone(),
            role: status.report_role,
            epoch: status.epoch,
            health: status.health,
            role_reason: Some(status.role_reason.clone()),
            peer_reachable: status.peer_reachable,
            last_peer_heartbeat: status.last_peer_heartbeat.map(|t| clock::rfc3339(clock::wall_millis(t, now, unix))),
            heartbeat_links: links,
            steps: status.steps.clone(),
            monitors: status.monitors.clone(),
            volumes: self.volumes.reports(),
            last_failover: self.last_failover.as_ref().map(|(_, r)| r.clone()),
            actions: status.actions.clone(),
            events: vec![],
            cleaned_up: status.cleaned_up || (finished && status.role == Role::Standby && !status.holding),
        };
        self.ctx.board.publish(report, heartbeat);
        self.published = Some((status.report_role, status.epoch));
        self.last_publish = std::time::Instant::now();
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
