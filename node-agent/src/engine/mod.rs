//! The failover decision engine: a pure state machine deciding who is primary.
//!
//! Events in ([`Event`]), commands out ([`Command`]); no I/O, no clock, no randomness.
//! The runtime feeds it:
//!
//! ```text
//! let (mut engine, startup) = Engine::new(identity, &group_config, restored, now)?;
//! execute(startup);
//! loop {
//!     let event = next event, or Event::Tick at engine.next_deadline();
//!     execute(engine.handle(now, event));
//! }
//! ```
//!
//! # The protocol (see DESIGN.md, "The failover protocol")
//!
//! *Safety*: a node holds resources (VIP, flow, primary volume) only while it holds a lease
//! (see [`lease`]): the **peer lease**, earned by the standby's acknowledgements of its
//! heartbeats, or the **witness lease**. It starts demoting itself `L/4` before its lease
//! ends (virtual IPs first, see [`flow`]), and keeps the watchdog armed at the lease's end
//! so that a stalled process is reset before anyone else can act. A node that wants to
//! promote first stops granting, then needs one of:
//!
//! - a peer lease (the peer, standing by, consents: bootstrap, switchover, failback), or
//! - a witness grant, `deadAfter` of silence on every link, and `L·(1+δ)` since it last
//!   granted the peer a lease (or the peer's word that it holds nothing);
//!
//! in witness mode `none`, silence and the `L·(1+δ)` wait alone suffice (a full partition
//! then makes both nodes primary, by design).
//!
//! *Epochs*: every promotion takes a new epoch. A candidate proposes `floor + 1`, above
//! every epoch it has proposed, granted or seen; a standby consents only to a proposal
//! above its own floor and makes that floor durable before its grant leaves; the witness
//! hands out epochs above every one it granted. So no epoch ever serves two terms, and
//! each term's epoch is above the previous one's. Heartbeats from an older epoch are
//! refused, and a node serving in an older epoch than its peer knows steps down.
//!
//! *Policy*: a standby whose data is not UpToDate, or whose failover monitor fires, never
//! promotes automatically; maintenance freezes automatic promotion, restarts, failover and
//! failback (never self-fencing); failback `auto` hands the service back to the preferred
//! node after it has been healthy and in sync for the stabilization time; failed steps are
//! restarted locally (restart policy) before a failover is asked for.
//!
//! *Admin actions*: switchover, force-active, resolve-split-brain and maintenance
//! ([`admin`]).

pub mod admin;
pub mod candidacy;
pub mod command;
pub mod config;
pub mod event;
pub mod failback;
pub mod flow;
pub mod heartbeat;
pub mod lease;
pub mod monitor;
pub mod mutation;
pub mod peer;
pub mod persist;
pub mod receive;
pub mod restart;
pub mod role;
pub mod serving;
pub mod status;
pub mod time;
pub mod timeline;
pub mod witness_client;

use std::collections::{BTreeMap, VecDeque};

use hapair_crds::hagroup::{NodeHealth, WitnessMode};
use hapair_crds::nodeapi::{ActionOutcome, ActionResult, EventType, GroupConfig};
use hapair_crds::volume::{ConnectionState, DiskState};

pub use command::{Command, Notice, Reason};
pub use config::{ConfigError, EngineConfig, Timing};
pub use event::{Event, StepOp, VolumeOp, WitnessAnswer};
pub use heartbeat::{Handover, Heartbeat, LeaseGrant, Takeover};
pub use persist::PersistedState;
pub use role::Role;
pub use status::Status;
pub use time::Instant;

use candidacy::{Candidacy, Promotion};
use flow::Flow;
use lease::LeaseBook;
use monitor::Monitors;
use peer::PeerTracker;
use restart::RestartWindow;
use serving::{Demotion, HandoverOffer, TakeoverAsk};
use witness_client::WitnessClient;

/// Who this engine is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// This node's name in the group.
    pub node: String,
    /// Strictly greater than every earlier incarnation of this node's agent (the runtime
    /// derives it from a persisted counter and the wall clock, e.g.
    /// `max(persisted + 1, unix_time_ms)`); peers refuse heartbeats of older incarnations.
    pub incarnation: u64,
}

/// Results of admin actions kept for reports.
const RESULTS_KEPT: usize = 16;

/// The failover engine of one node for one group. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    incarnation: u64,
    role: Role,
    /// Highest epoch anyone is known to have acted in; the current term's while acting.
    epoch: u64,
    /// Highest epoch proposed, granted or acted in (never handed out twice).
    floor: u64,
    /// The peer proposal last granted, as `(incarnation, epoch)`.
    granted_proposal: Option<(u64, u64)>,
    /// Resources may be held under a lease (from the first promote command until the flow
    /// is down again).
    acting: bool,
    /// The lease was given up (fencing): no renewals, the watchdog deadline stays fixed.
    lease_abandoned: bool,
    /// Bringing everything down (startup cleanup, fencing) until `finished_down`.
    stopping: bool,
    /// Witness grant (by epoch) to release once the flow is down after fencing.
    release_after_stop: Option<u64>,
    maintenance_override: Option<bool>,
    seq: u64,
    next_heartbeat: Instant,
    heartbeat_now: bool,
    peer: PeerTracker,
    lease: LeaseBook,
    witness: WitnessClient,
    flow: Flow,
    pending_plan: Option<config::FlowPlan>,
    candidacy: Option<Candidacy>,
    promotion: Option<Promotion>,
    demotion: Option<Demotion>,
    handover: Option<HandoverOffer>,
    takeover: Option<TakeoverAsk>,
    /// Takeover requests of the peer already answered, by action id.
    answered_takeover: Option<Option<String>>,
    flow_restart: bool,
    flow_restarts: RestartWindow,
    /// A failover is wanted, with its cause and the reason.
    failover_wanted: Option<(serving::FailoverCause, String)>,
    failover_blocked_noted: bool,
    volumes: BTreeMap<String, (DiskState, ConnectionState)>,
    /// A volume refused promotion: no automatic candidacy before this instant (or until a
    /// volume reports a new state), so a refusal does not turn into a loop.
    promotion_refused_until: Option<Instant>,
    monitors: Monitors,
    results: VecDeque<ActionResult>,
    finished_actions: VecDeque<String>,
    pending_actions: Vec<String>,
    watchdog: Option<Instant>,
    /// A previous run may have left the watchdog armed.
    watchdog_unknown: bool,
    peer_ready_since: Option<Instant>,
    both_idle_since: Option<Instant>,
    peer_was_reachable: bool,
    stale_epoch_noted: Option<u64>,
    last_failover: Option<status::FailoverSummary>,
    settling: Option<timeline::Settling>,
    started_at: Instant,
    last_now: Instant,
    out: Vec<Command>,
    wake: Option<Instant>,
    role_reason: String,
    cleaned_up: bool,
    persisted: PersistedState,
    #[cfg(feature = "sim-mutations")]
    mutation: mutation::Mutation,
}

impl Engine {
    /// An engine for `identity` in the group of `config`, restoring what the node
    /// persisted (`None` on first start). Returns the startup commands: the engine cannot
    /// know what a previous run left behind, so it starts by bringing everything down
    /// (virtual IPs first) and holds nothing until that is done — unless the previous run
    /// was serving and its recorded lease still runs ([`PersistedState::serving`]): then
    /// it resumes as primary in the same epoch, with the flow taken as up.
    pub fn new(
        identity: Identity,
        config: &GroupConfig,
        restored: Option<PersistedState>,
        now: Instant,
    ) -> Result<(Engine, Vec<Command>), ConfigError> {
        let cfg = EngineConfig::from_group(config, &identity.node)?;
        let restored = restored.unwrap_or_default();
        let resume = restored.serving.clone().filter(|s| resumable(s, &restored, &cfg, now));
        let mut engine = Engine {
            incarnation: identity.incarnation,
            role: Role::Standby,
            epoch: restored.epoch,
            floor: restored.floor.max(restored.epoch),
            granted_proposal: None,
            acting: false,
            lease_abandoned: false,
            stopping: true,
            release_after_stop: None,
            maintenance_override: restored.maintenance,
            seq: 0,
            next_heartbeat: now,
            heartbeat_now: false,
            peer: PeerTracker::new(cfg.links, restored.peer_incarnation),
            lease: LeaseBook::new(now, cfg.timing.lease_wait),
            witness: WitnessClient::default(),
            flow: Flow::unknown(cfg.flow.clone()),
            pending_plan: None,
            candidacy: None,
            promotion: None,
            demotion: None,
            handover: None,
            takeover: None,
            answered_takeover: None,
            flow_restart: false,
            flow_restarts: RestartWindow::default(),
            failover_wanted: None,
            failover_blocked_noted: false,
            volumes: BTreeMap::new(),
            promotion_refused_until: None,
            monitors: Monitors::new(cfg.monitors.clone()),
            results: VecDeque::new(),
            finished_actions: restored.finished_actions.iter().cloned().collect(),
            pending_actions: Vec::new(),
            watchdog: None,
            watchdog_unknown: true,
            peer_ready_since: None,
            both_idle_since: None,
            peer_was_reachable: false,
            stale_epoch_noted: None,
            last_failover: None,
            settling: None,
            started_at: now,
            last_now: now,
            out: Vec::new(),
            wake: None,
            role_reason: "starting: stopping whatever a previous run left".into(),
            cleaned_up: false,
            persisted: restored,
            cfg,
            #[cfg(feature = "sim-mutations")]
            mutation: mutation::Mutation::None,
        };
        if let Some(serving) = resume {
            engine.resume(&serving);
        }
        let actions = config.actions.clone();
        for action in actions {
            engine.on_admin(now, action);
        }
        engine.evaluate(now);
        engine.persist_if_changed();
        let out = std::mem::take(&mut engine.out);
        Ok((engine, out))
    }

    /// Takes up serving again after an agent restart within the lease (see
    /// [`PersistedState::serving`]): the flow was left up and the lease still runs, so
    /// stopping and restarting everything would only flap the service. The flow is taken
    /// as up; its health checks and monitors tell otherwise.
    fn resume(&mut self, serving: &persist::ServingLease) {
        let until = Instant::from_nanos(serving.lease_end_nanos);
        self.role = Role::Primary;
        self.acting = true;
        self.stopping = false;
        self.flow = Flow::resumed(self.cfg.flow.clone());
        self.lease.resume(until);
        self.heartbeat_now = true;
        self.role_reason = format!("serving in epoch {}, resumed after an agent restart within the lease", self.epoch);
        self.notice(
            EventType::Normal,
            Reason::Resumed,
            format!("agent restarted within the lease (until {until}): still serving in epoch {}", self.epoch),
        );
        self.feed_watchdog();
    }

    /// Handles one event at `now` (local monotonic time) and returns the commands to run,
    /// in order.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Command> {
        let now = now.max(self.last_now);
        self.last_now = now;
        // Safety first: after a stall, the first thing is to check the lease against the
        // current time, before any input can make this node act as primary.
        self.check_lease(now);
        match event {
            Event::Tick => {}
            Event::Heartbeat { link, message } => self.on_heartbeat(now, link, message),
            Event::Witness { request_id, answer } => self.on_witness(now, request_id, answer),
            Event::Probe { monitor, healthy, message } => self.on_probe(now, &monitor, healthy, message),
            Event::StepCheck { step, healthy, message } => self.on_step_check(now, step, healthy, message),
            Event::StepDone { step, op, result } => self.on_step_done(now, step, op, result),
            Event::VolumeDone { volume, op, result } => self.on_volume_done(now, &volume, op, result),
            Event::VerifyStarted { action, volume, result } => self.on_verify_started(action, &volume, result),
            Event::Volume { volume, disk, connection } => {
                self.volumes.insert(volume, (disk, connection));
                self.promotion_refused_until = None;
            }
            Event::Admin(action) => self.on_admin(now, action),
            Event::Config(config) => self.on_config(now, &config),
        }
        self.evaluate(now);
        self.persist_if_changed();
        std::mem::take(&mut self.out)
    }

    /// When the engine next needs a [`Event::Tick`] if nothing else happens.
    pub fn next_deadline(&self) -> Instant {
        self.wake.unwrap_or(self.next_heartbeat)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The epoch of the current (or latest known) term.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The highest epoch this node proposed, granted or acted in.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Whether this node may hold resources right now (acting as primary, or still
    /// bringing the flow down).
    pub fn holding(&self) -> bool {
        self.acting || !self.flow.is_clean_idle()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Installs a deliberate protocol bug, for proving that the simulation's checker
    /// catches it. Only compiled with the `sim-mutations` feature, which only the test
    /// crate enables; no configuration can reach it.
    #[cfg(feature = "sim-mutations")]
    pub fn set_mutation(&mut self, mutation: mutation::Mutation) {
        self.mutation = mutation;
    }

    /// Whether mutation `m` is installed; constant `false` without the feature.
    fn mutated(&self, m: mutation::Mutation) -> bool {
        #[cfg(feature = "sim-mutations")]
        {
            self.mutation == m
        }
        #[cfg(not(feature = "sim-mutations"))]
        {
            let _ = m;
            false
        }
    }

    fn maintenance(&self) -> bool {
        self.maintenance_override.unwrap_or(self.cfg.maintenance)
    }

    /// Worst disk state of the local volumes (UpToDate without volumes).
    fn disk(&self) -> DiskState {
        let mut worst = DiskState::UpToDate;
        for volume in &self.cfg.flow.volumes {
            let disk = self.volumes.get(volume).map_or(DiskState::Unknown, |(d, _)| *d);
            if disk_rank(disk) > disk_rank(worst) {
                worst = disk;
            }
        }
        worst
    }

    fn health(&self) -> NodeHealth {
        let monitors = self.monitors.health();
        if monitors == NodeHealth::Failed || self.failover_wanted.is_some() {
            NodeHealth::Failed
        } else if monitors == NodeHealth::Degraded
            || self.flow.reports().iter().any(|s| s.state == hapair_crds::nodeapi::StepState::Failed)
        {
            NodeHealth::Degraded
        } else {
            NodeHealth::Healthy
        }
    }

    /// Data and health allow an automatic promotion here.
    fn eligible_auto(&self) -> bool {
        !self.cfg.deleting
            && self.disk() == DiskState::UpToDate
            && self.health() != NodeHealth::Failed
            && self.promotion_refused_until.is_none_or(|t| self.last_now >= t)
    }

    fn controller_witness(&self) -> bool {
        self.cfg.witness == WitnessMode::Controller
    }

    fn notice(&mut self, type_: EventType, reason: Reason, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(group = %self.cfg.group, node = %self.cfg.me, epoch = self.epoch, reason = reason.as_str(), "{message}");
        self.out.push(Command::Emit(Notice { type_, reason, message }));
    }

    fn set_role(&mut self, role: Role, reason: impl Into<String>) {
        let reason = reason.into();
        if role != self.role {
            tracing::info!(group = %self.cfg.group, node = %self.cfg.me, epoch = self.epoch, from = self.role.as_str(), to = role.as_str(), "{reason}");
            self.heartbeat_now = true;
        }
        self.role = role;
        self.role_reason = reason;
    }

    fn wake_at(&mut self, at: Instant) {
        if at > self.last_now {
            self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
        }
    }

    fn action_result(&mut self, id: Option<String>, outcome: ActionOutcome, message: impl Into<String>) {
        let Some(id) = id else { return };
        let result = ActionResult { id: id.clone(), outcome, message: message.into() };
        if outcome.is_final() {
            self.pending_actions.retain(|p| p != &id);
            if !self.finished_actions.contains(&id) {
                if self.finished_actions.len() == persist::FINISHED_ACTIONS_KEPT {
                    self.finished_actions.pop_front();
                }
                self.finished_actions.push_back(id);
            }
        }
        if self.results.len() == RESULTS_KEPT {
            self.results.pop_front();
        }
        self.results.push_back(result.clone());
        self.out.push(Command::ActionResult(result));
    }

    fn persist_if_changed(&mut self) {
        let serving = self.serving_record();
        let state = PersistedState {
            epoch: self.epoch,
            floor: self.floor,
            peer_incarnation: self.peer.incarnation(),
            maintenance: self.maintenance_override,
            finished_actions: self.finished_actions.iter().cloned().collect(),
            serving,
        };
        if state == self.persisted {
            return;
        }
        let previous = std::mem::replace(&mut self.persisted, state.clone());
        let shrunk = match (&previous.serving, &state.serving) {
            (Some(old), Some(new)) => {
                new.epoch != old.epoch || new.steps != old.steps || new.lease_end_nanos < old.lease_end_nanos
            }
            (Some(_), None) => true,
            (None, _) => false,
        };
        let only_extended = !shrunk
            && PersistedState { serving: None, ..previous.clone() }
                == PersistedState { serving: None, ..state.clone() };
        let at = if shrunk {
            // A restarted agent must never rely on a lease this node stopped serving
            // under: durable before anything is taken down or said to the peer.
            0
        } else if only_extended {
            // A longer lease is only an optimisation for a restart; it need not delay
            // anything.
            self.out.len()
        } else {
            // An epoch must be durable before the node acts in it, and a floor before a
            // heartbeat proposes or grants it: Persist goes before those commands.
            self.out
                .iter()
                .position(|c| {
                    matches!(
                        c,
                        Command::PromoteVolume { .. }
                            | Command::StartStep { .. }
                            | Command::AddVip { .. }
                            | Command::SendHeartbeat(_)
                    )
                })
                .unwrap_or(self.out.len())
        };
        self.out.insert(at, Command::Persist(state));
    }

    /// What a restarted agent may rely on: set while serving with the whole flow up. The
    /// recorded lease end moves forward only in steps of the fence margin, so the state
    /// file is not rewritten for every acknowledgement; an older end is a safe
    /// under-estimate.
    fn serving_record(&self) -> Option<persist::ServingLease> {
        let plan = self.flow.plan();
        let serving = self.acting
            && !self.lease_abandoned
            && self.role == Role::Primary
            && self.demotion.is_none()
            && !self.flow_restart
            && plan.volumes.is_empty()
            && self.flow.is_up();
        if !serving {
            return None;
        }
        let end = self.lease.expiry()?;
        let steps: Vec<String> = plan.steps.iter().map(|s| s.name.clone()).collect();
        if let Some(old) = &self.persisted.serving
            && old.epoch == self.epoch
            && old.steps == steps
            && end.as_nanos() >= old.lease_end_nanos
            && Instant::from_nanos(end.as_nanos()).since(Instant::from_nanos(old.lease_end_nanos))
                < self.cfg.timing.fence_margin
        {
            return Some(old.clone());
        }
        Some(persist::ServingLease { epoch: self.epoch, lease_end_nanos: end.as_nanos(), steps })
    }

    /// Runs the role machine until it settles, sends a heartbeat when due, and computes
    /// the next deadline.
    fn evaluate(&mut self, now: Instant) {
        self.wake = None;
        for _ in 0..8 {
            let before =
                (self.role, self.acting, self.candidacy.is_some(), self.demotion.is_some(), self.flow.is_idle());
            self.step(now);
            let after =
                (self.role, self.acting, self.candidacy.is_some(), self.demotion.is_some(), self.flow.is_idle());
            if before == after {
                break;
            }
        }
        self.send_heartbeat_if_due(now);
        self.collect_wakes();
    }

    fn step(&mut self, now: Instant) {
        self.check_lease(now);
        self.track_peer(now);
        self.expire_offers(now);
        match self.role {
            Role::Standby | Role::Fenced => self.step_idle(now),
            Role::Promoting => self.step_promoting(now),
            Role::Primary => self.step_primary(now),
            Role::Demoting => self.step_demoting(now),
        }
        self.witness_upkeep(now);
    }

    fn send_heartbeat_if_due(&mut self, now: Instant) {
        if !(self.heartbeat_now || now >= self.next_heartbeat) {
            return;
        }
        self.heartbeat_now = false;
        self.next_heartbeat = now + self.cfg.timing.interval;
        self.seq += 1;
        let grant = self.grant();
        let offer = |until: Instant| until > now;
        let message = Heartbeat {
            sender: self.cfg.me.clone(),
            incarnation: self.incarnation,
            seq: self.seq,
            epoch: self.epoch,
            floor: self.floor,
            role: self.role,
            holding: self.holding(),
            maintenance: self.maintenance(),
            health: self.health(),
            disk: self.disk(),
            grant,
            handover: self.handover.as_ref().filter(|h| offer(h.until)).map(|h| Handover {
                to: self.cfg.peer.clone(),
                action: h.action.clone(),
                force: h.force,
            }),
            takeover: self
                .takeover
                .as_ref()
                .filter(|t| offer(t.until))
                .map(|t| Takeover { action: t.action.clone(), force: t.force }),
        };
        if self.role.wants_lease() && !self.lease_abandoned {
            self.lease.record_sent(self.seq, now);
        }
        self.out.push(Command::SendHeartbeat(message));
    }

    /// The lease grant to put in the next heartbeat: only while this node holds nothing
    /// and is not trying to promote, to a peer that wants a lease, is not from an older
    /// epoch and — if it is a candidate — proposes an epoch above this node's floor (which
    /// then rises to it, durably, before the grant is sent).
    fn grant(&mut self) -> Option<LeaseGrant> {
        let grantable =
            matches!(self.role, Role::Standby | Role::Fenced) && !self.holding() && self.candidacy.is_none();
        if !grantable {
            return None;
        }
        let view = self.peer.latest()?;
        let hb = &view.heartbeat;
        if !hb.role.wants_lease() || hb.epoch < self.epoch {
            return None;
        }
        if hb.role == Role::Promoting && !hb.holding {
            let proposal = (hb.incarnation, hb.floor);
            if hb.floor <= self.floor && self.granted_proposal != Some(proposal) {
                return None;
            }
            self.floor = self.floor.max(hb.floor);
            self.granted_proposal = Some(proposal);
        }
        let (incarnation, seq, received_at) = (hb.incarnation, hb.seq, view.received_at);
        self.lease.grant(incarnation, seq, received_at, self.cfg.timing.lease_wait);
        let ttl_ms = u32::try_from(self.cfg.timing.lease_ttl.as_millis()).unwrap_or(u32::MAX);
        Some(LeaseGrant { incarnation, seq, ttl_ms })
    }

    fn collect_wakes(&mut self) {
        let t = self.cfg.timing.clone();
        self.wake_at(self.next_heartbeat);
        match self.peer.last_heard() {
            Some(heard) => self.wake_at(heard + t.dead_after),
            None => self.wake_at(self.started_at + t.dead_after),
        }
        if self.acting && !self.lease_abandoned {
            if let Some(expiry) = self.lease.expiry() {
                self.wake_at(expiry - t.fence_margin);
            }
            if let Some(peer) = self.lease.peer_expiry() {
                self.wake_at(peer - t.witness_below);
            }
        }
        if let Some(w) = self.lease.witness_expiry() {
            self.wake_at(w - t.witness_renew_below);
            self.wake_at(w - t.fence_margin);
        }
        if self.candidacy.is_some() {
            self.wake_at(self.lease.promise_until());
        }
        self.wake_at(self.witness.retry_at());
        let timeouts: Vec<Instant> =
            self.witness.outstanding().iter().filter(|o| !o.given_up).map(|o| o.sent_at + t.witness_timeout).collect();
        for at in timeouts {
            self.wake_at(at);
        }
        if let Some(since) = self.both_idle_since {
            self.wake_at(since + t.bootstrap_settle);
        }
        if let Some(until) = self.promotion_refused_until {
            self.wake_at(until);
        }
        if let Some(since) = self.peer_ready_since {
            self.wake_at(since + self.cfg.failback_stabilization);
        }
        let deadlines: Vec<Instant> = [
            self.handover.as_ref().map(|h| h.until),
            self.takeover.as_ref().map(|t| t.until),
            self.candidacy.as_ref().and_then(|c| c.deadline),
        ]
        .into_iter()
        .flatten()
        .collect();
        for d in deadlines {
            self.wake_at(d);
        }
    }
}

#[cfg(test)]
mod tests;

/// Whether a restarted engine may take up serving under `serving`: the same term, the same
/// flow (without volumes, whose replicas do not outlive the agent), not being deleted, and
/// enough lease left that it would not fence itself at once.
fn resumable(serving: &persist::ServingLease, restored: &PersistedState, cfg: &EngineConfig, now: Instant) -> bool {
    let steps: Vec<&str> = cfg.flow.steps.iter().map(|s| s.name.as_str()).collect();
    serving.epoch > 0
        && serving.epoch == restored.epoch
        && cfg.flow.volumes.is_empty()
        && !cfg.deleting
        && serving.steps.iter().map(String::as_str).eq(steps)
        && now + cfg.timing.fence_margin < Instant::from_nanos(serving.lease_end_nanos)
}

fn disk_rank(disk: DiskState) -> u8 {
    match disk {
        DiskState::UpToDate => 0,
        DiskState::Outdated => 1,
        DiskState::Inconsistent => 2,
        DiskState::Unknown => 3,
        DiskState::Diskless => 4,
    }
}
