//! The simulated world: two engines, a witness, heartbeat links, a witness path and true
//! time, driven by one seeded random generator.
//!
//! Everything a real deployment does to the engines is modelled, honestly where it
//! matters for safety:
//!
//! - **Commands take time.** A resource counts as held from the moment its start command
//!   is issued until its stop command *completes* (removing a VIP takes a little while),
//!   and operations on one step run one after the other.
//! - **A paused agent holds what it held.** While the process is stalled, its VIP, flow
//!   and primary volume stay; packets, timers and results queue up and are delivered on
//!   resume, after which the engine sees a jump in time.
//! - **The watchdog resets the machine** at the deadline the engine armed, unless it was
//!   moved or disarmed in time: everything held is gone at that instant.
//! - **Crashes** reset the machine (everything released, clock restarted) or kill only the
//!   agent (resources and watchdog stay; the restarted agent must clean up).
//! - **The network** has several heartbeat links and a witness path per node, each
//!   partitionable on its own (links per direction), with loss, duplication, delay and
//!   reordering; heartbeats travel encoded and are decoded on arrival.
//! - **Clocks drift** within the configured bound (see `clock`).
//! - **The witness** is the real `hapair_operator::witness::Witness`, on its own clock; it
//!   can crash and restart (forgetting holders, keeping epochs the way the operator
//!   persists them). In some schedules it runs on replicated controllers whose leadership
//!   moves, the successor resuming from the records etcd holds (see `leaders`).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use hapair_agent::engine::{
    Command, Engine, Event, Heartbeat, Identity, Instant, PersistedState, Reason, Role, StepOp, VolumeOp, WitnessAnswer,
};
use hapair_crds::hagroup::WitnessMode;
use hapair_crds::nodeapi::{ActionOutcome, AdminAction, AdminActionKind, GroupConfig, LeaseRequest, LeaseResponse};
use hapair_crds::volume::{ConnectionState, DiskState};
use hapair_operator::witness::{LeaseParams, Witness};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::clock::SimClock;
use super::params::{APP_STEP, MONITOR, NODES, Params, VOLUME};

/// Records a trace line, formatting it only when tracing.
macro_rules! trace {
    ($world:expr, $($arg:tt)*) => {
        if $world.trace.is_some() {
            let line = format!($($arg)*);
            $world.push_trace(line);
        }
    };
}

mod faults;
mod leaders;
mod phases;

pub use leaders::TakeoverMutation;

/// How a run is observed.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Keep a trace of everything (for printing a failing seed).
    pub trace: bool,
    /// Called on every engine right after it is created (e.g. to install a mutation).
    pub engine_hook: Option<fn(&mut Engine)>,
    /// Breaks the controllers' takeover (to prove the checker catches it).
    pub takeover_mutation: Option<TakeoverMutation>,
}

/// What a successful run measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// From the primary's crash to the standby serving, true nanoseconds.
    pub failover_ns: Option<u64>,
    pub bound_ns: u64,
    pub stats: Stats,
    /// Everything that happened, when tracing.
    pub trace: Vec<String>,
}

/// What happened during a run, to show the schedules exercise the protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub faults: u64,
    pub terms: u64,
    pub self_fenced: u64,
    pub watchdog_resets: u64,
    pub witness_denials: u64,
    pub admin_actions: u64,
    pub exempt_overlaps: u64,
    pub local_restarts: u64,
    pub failed_stops: u64,
    pub leader_changes: u64,
    /// Grants and releases a deposed leader decided, denied because etcd refused the write.
    pub refused_writes: u64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.events += other.events;
        self.faults += other.faults;
        self.terms += other.terms;
        self.self_fenced += other.self_fenced;
        self.watchdog_resets += other.watchdog_resets;
        self.witness_denials += other.witness_denials;
        self.admin_actions += other.admin_actions;
        self.exempt_overlaps += other.exempt_overlaps;
        self.local_restarts += other.local_restarts;
        self.failed_stops += other.failed_stops;
        self.leader_changes += other.leader_changes;
        self.refused_writes += other.refused_writes;
    }
}

/// A broken invariant (or a run that could not finish), with what led to it.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    /// True time of the failure, nanoseconds.
    pub at: u64,
    pub what: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seed {}: at {:.6}s: {}", self.seed, self.at as f64 / 1e9, self.what)
    }
}

const TRACE_KEPT: usize = 3_000;
const BUFFER_KEPT: usize = 1_024;
const EVENT_BUDGET: u64 = 3_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Volume(VolumeOp),
    Step(usize, StepOp),
}

#[derive(Clone, Debug)]
enum Admin {
    Switchover(usize),
    ForceActive(usize),
    Resolve(usize),
    Maintenance(bool),
}

#[derive(Clone, Debug)]
enum Ev {
    Tick {
        node: usize,
    },
    Deliver {
        node: usize,
        link: usize,
        bytes: Vec<u8>,
    },
    WitnessArrive {
        from: usize,
        agent: u64,
        id: u64,
        request: LeaseRequest,
    },
    WitnessReply {
        node: usize,
        agent: u64,
        id: u64,
        response: LeaseResponse,
    },
    HttpTimeout {
        node: usize,
        agent: u64,
        id: u64,
    },
    OpDone {
        node: usize,
        machine: u64,
        agent: u64,
        op: Op,
        ok: bool,
    },
    Watchdog {
        node: usize,
        generation: u64,
    },
    Resume {
        node: usize,
        generation: u64,
    },
    Restart {
        node: usize,
        generation: u64,
    },
    WitnessRestart {
        generation: u64,
    },
    Leaders(leaders::LeaderEv),
    AdminArrive {
        era: u64,
        node: usize,
        action: AdminAction,
    },
    Fault,
    Heal {
        era: u64,
        heal: Heal,
    },
    ChaosEnd,
    Check,
    Crash,
    GiveUp,
    /// The checked step's first health check passes (see [`Params::first_checks`]).
    CheckPasses {
        node: usize,
        machine: u64,
        agent: u64,
    },
    /// The failover's late phases have had time to arrive: check its timeline.
    Timeline {
        node: usize,
    },
}

#[derive(Clone, Copy, Debug)]
enum Heal {
    Link { link: usize, dir: usize },
    WitnessPath { node: usize },
    Loss { generation: u64 },
    Dup { generation: u64 },
    Delay { generation: u64 },
    Disk { node: usize },
    Probe { node: usize },
}

struct Queued {
    at: u64,
    prio: u8,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.prio, self.seq).cmp(&(other.at, other.prio, other.seq))
    }
}

struct Node {
    clock: SimClock,
    rate: u64,
    engine: Option<Engine>,
    /// Bumped by every machine reset: results of operations started before are void.
    machine: u64,
    /// Bumped by every agent start: results addressed to an older agent are lost.
    agent: u64,
    persisted: Option<PersistedState>,
    paused: Option<u64>,
    pause_gen: u64,
    buffer: Vec<Event>,
    buffered_tick: bool,
    tick_at: Option<u64>,
    watchdog: Option<(u64, u64)>,
    watchdog_gen: u64,
    down_gen: u64,
    down: bool,
    held_volume: bool,
    held_steps: Vec<bool>,
    /// Per resource (volume = last index): true time the executor is busy until.
    busy_until: Vec<u64>,
    /// Per resource: an operation of the current agent is outstanding.
    outstanding: Vec<bool>,
    http: Vec<u64>,
    disk: DiskState,
    /// The disk state the engine was last told (what its decisions can rest on).
    disk_known: DiskState,
    probe_failing: bool,
    /// True time of the last heartbeat newer than any before on its link.
    last_peer_delivery: Option<u64>,
    /// Per link: `(incarnation, seq)` of the newest heartbeat delivered.
    newest_on_link: Vec<(u64, u64)>,
    max_epoch: u64,
    term_start: Option<u64>,
    term_exempt: bool,
    forced_until: u64,
}

impl Node {
    fn holds(&self) -> bool {
        self.held_volume || self.held_steps.iter().any(|h| *h)
    }

    fn holds_all(&self) -> bool {
        self.held_volume && self.held_steps.iter().all(|h| *h)
    }

    fn local(&self, at: u64) -> Instant {
        Instant::from_nanos(self.clock.local(at))
    }
}

struct WitnessSim {
    witness: Option<Witness>,
    clock: SimClock,
    generation: u64,
    /// What the operator persisted (status.epoch): restored after a restart.
    durable_epoch: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Chaos,
    Converging {
        since: u64,
        stable_since: Option<u64>,
    },
    Failover {
        crashed: usize,
        at: u64,
    },
    /// Serving after the crash; waiting for the first health check to join the timeline.
    Settling,
    Done,
}

pub struct World {
    p: Params,
    opts: Options,
    config: GroupConfig,
    lease: LeaseParams,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: Vec<Node>,
    witness: WitnessSim,
    /// The replicated controllers, in schedules with [`Params::leaders`].
    leaders: Option<leaders::Controllers>,
    /// Active partitions per link and direction (0: node 0 → 1, 1: node 1 → 0).
    link_cuts: Vec<[u32; 2]>,
    witness_cuts: [u32; 2],
    loss: f64,
    loss_gen: u64,
    dup: f64,
    dup_gen: u64,
    extra_delay: u64,
    delay_gen: u64,
    era: u64,
    action_seq: u64,
    maintenance_used: bool,
    last_term_epoch: Option<u64>,
    phase: Phase,
    outcome: Outcome,
    trace: Option<VecDeque<String>>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World").field("seed", &self.p.seed).field("now", &self.now).field("phase", &self.phase).finish()
    }
}

impl World {
    pub fn new(p: Params, opts: Options) -> World {
        let config = p.group_config();
        let lease = LeaseParams { ttl: p.timings.lease, max_clock_drift_ppm: p.timings.drift_ppm };
        let steps = config.spec.flow.len();
        let node = |rate: u64| Node {
            clock: SimClock::new(0, 0, rate),
            rate,
            engine: None,
            machine: 0,
            agent: 0,
            persisted: None,
            paused: None,
            pause_gen: 0,
            buffer: Vec::new(),
            buffered_tick: false,
            tick_at: None,
            watchdog: None,
            watchdog_gen: 0,
            down_gen: 0,
            down: true,
            held_volume: false,
            held_steps: vec![false; steps],
            busy_until: vec![0; steps + 1],
            outstanding: vec![false; steps + 1],
            http: Vec::new(),
            disk: DiskState::UpToDate,
            disk_known: DiskState::Unknown,
            probe_failing: false,
            last_peer_delivery: None,
            newest_on_link: vec![(0, 0); p.links],
            max_epoch: 0,
            term_start: None,
            term_exempt: false,
            forced_until: 0,
        };
        let nodes = vec![node(p.rates[0]), node(p.rates[1])];
        let first =
            if p.leaders.is_some() { leaders::Controllers::first_witness() } else { Witness::new(Duration::ZERO) };
        let witness = WitnessSim {
            witness: Some(first),
            clock: SimClock::new(0, 0, p.rates[2]),
            generation: 0,
            durable_epoch: 0,
        };
        let rng = ChaCha8Rng::seed_from_u64(p.seed ^ 0x9e37_79b9_7f4a_7c15);
        let trace = opts.trace.then(VecDeque::new);
        World {
            link_cuts: vec![[0, 0]; p.links],
            config,
            lease,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            witness,
            leaders: p.leaders.map(leaders::Controllers::new),
            witness_cuts: [0, 0],
            loss: 0.0,
            loss_gen: 0,
            dup: 0.0,
            dup_gen: 0,
            extra_delay: 0,
            delay_gen: 0,
            era: 0,
            action_seq: 0,
            maintenance_used: false,
            last_term_epoch: None,
            phase: Phase::Chaos,
            outcome: Outcome { bound_ns: p.failover_bound(), ..Outcome::default() },
            trace,
            opts,
            p,
        }
    }
}

impl World {
    /// Runs the schedule to its end: chaos, healing and convergence, then a crash of the
    /// primary and the failover it must cause.
    pub fn run(mut self) -> Result<Outcome, Failure> {
        let d = self.p.timings.dead_after;
        for i in 0..2 {
            let jitter = self.rng.random_range(0..=self.p.timings.interval.as_nanos() as u64);
            self.push(jitter, 5, Ev::Restart { node: i, generation: 0 });
        }
        if self.p.chaos.is_zero() {
            self.phase = Phase::Converging { since: 0, stable_since: None };
            self.push(nanos(d), 9, Ev::Check);
        } else {
            let start = nanos(d * 2);
            let first = start + self.gap();
            self.push(first, 8, Ev::Fault);
            self.push(start + nanos(self.p.chaos), 8, Ev::ChaosEnd);
        }
        while let Some(Reverse(q)) = self.queue.pop() {
            self.now = q.at;
            self.outcome.stats.events += 1;
            if self.outcome.stats.events > EVENT_BUDGET {
                return Err(self.fail("event budget exceeded (an engine keeps waking itself up?)"));
            }
            self.dispatch(q.ev)?;
            if self.phase == Phase::Done {
                self.outcome.trace = self.trace.take().map(Vec::from).unwrap_or_default();
                return Ok(self.outcome);
            }
        }
        Err(self.fail("ran out of events"))
    }

    fn push(&mut self, at: u64, prio: u8, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued { at, prio, seq: self.seq, ev }));
    }

    fn gap(&mut self) -> u64 {
        let mean = nanos(self.p.fault_gap);
        self.rng.random_range(0..=2 * mean)
    }

    fn push_trace(&mut self, line: String) {
        let now = self.now;
        if let Some(t) = &mut self.trace {
            if t.len() == TRACE_KEPT {
                t.pop_front();
            }
            t.push_back(format!("{:>12.6} {line}", now as f64 / 1e9));
        }
    }

    fn fail(&self, what: impl Into<String>) -> Failure {
        let mut what = what.into();
        what.push_str(&format!("\n  state: {}", self.describe()));
        Failure {
            seed: self.p.seed,
            at: self.now,
            what,
            trace: self.trace.as_ref().map(|t| t.iter().cloned().collect()).unwrap_or_default(),
        }
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let engine = match &n.engine {
                Some(e) => {
                    let status = e.status(n.local(self.now));
                    format!(
                        "{} e{} floor {}{} health {:?}{} ({})",
                        e.role().as_str(),
                        e.epoch(),
                        e.floor(),
                        if e.holding() { " holding" } else { "" },
                        status.health,
                        if status.maintenance { " maintenance" } else { "" },
                        status.role_reason
                    )
                }
                None => "down".into(),
            };
            parts.push(format!(
                "{}: {engine}{}{} held[vol={} steps={:?}] disk={}",
                NODES[i],
                if n.paused.is_some() { " PAUSED" } else { "" },
                if n.watchdog.is_some() { " watchdog" } else { "" },
                n.held_volume,
                n.held_steps,
                n.disk.as_str()
            ));
        }
        parts.push(format!("witness: {}", if self.witness.witness.is_some() { "up" } else { "down" }));
        parts.extend(self.leaders.as_ref().map(|c| c.describe()));
        parts.push(format!("params: {:?}", self.p));
        parts.join("; ")
    }

    fn dispatch(&mut self, ev: Ev) -> Result<(), Failure> {
        match ev {
            Ev::Tick { node } => {
                if self.nodes[node].tick_at == Some(self.now) {
                    self.nodes[node].tick_at = None;
                    self.deliver(node, Event::Tick)?;
                }
            }
            Ev::Deliver { node, link, bytes } => {
                let message =
                    Heartbeat::decode(&bytes).map_err(|e| self.fail(format!("heartbeat failed to decode: {e}")))?;
                if !self.nodes[node].down {
                    trace!(self, "{} <- link {link}: {}", NODES[node], brief(&message));
                    self.deliver(node, Event::Heartbeat { link, message })?;
                }
            }
            Ev::WitnessArrive { from, agent, id, request } => self.witness_arrive(from, agent, id, request),
            Ev::WitnessReply { node, agent, id, response } => {
                let n = &mut self.nodes[node];
                if n.agent == agent
                    && !n.down
                    && let Some(i) = n.http.iter().position(|h| *h == id)
                {
                    n.http.remove(i);
                    if matches!(response, LeaseResponse::Denied { .. }) {
                        self.outcome.stats.witness_denials += 1;
                    }
                    trace!(self, "{} <- witness #{id}: {response:?}", NODES[node]);
                    self.deliver(node, Event::Witness { request_id: id, answer: WitnessAnswer::Response(response) })?;
                }
            }
            Ev::HttpTimeout { node, agent, id } => {
                let n = &mut self.nodes[node];
                if n.agent == agent
                    && !n.down
                    && let Some(i) = n.http.iter().position(|h| *h == id)
                {
                    n.http.remove(i);
                    self.deliver(node, Event::Witness { request_id: id, answer: WitnessAnswer::Timeout })?;
                }
            }
            Ev::OpDone { node, machine, agent, op, ok } => self.op_done(node, machine, agent, op, ok)?,
            Ev::Watchdog { node, generation } => {
                if self.nodes[node].watchdog.is_some_and(|(_, g)| g == generation) {
                    self.outcome.stats.watchdog_resets += 1;
                    trace!(self, "{}: WATCHDOG RESET", NODES[node]);
                    self.reset_machine(node);
                    let down = nanos(self.p.timings.dead_after) * 2;
                    self.schedule_restart(node, down);
                }
            }
            Ev::Resume { node, generation } => {
                if self.nodes[node].pause_gen == generation && self.nodes[node].paused.is_some() {
                    self.resume(node)?;
                }
            }
            Ev::Restart { node, generation } => {
                if self.nodes[node].down_gen == generation && self.nodes[node].down {
                    self.start_agent(node)?;
                }
            }
            Ev::WitnessRestart { generation } => {
                if self.witness.generation == generation && self.witness.witness.is_none() {
                    self.restart_witness();
                }
            }
            Ev::Leaders(ev) => self.leader_event(ev)?,
            Ev::AdminArrive { era, node, action } => {
                if era == self.era && !self.nodes[node].down {
                    trace!(self, "{} <- admin {:?}", NODES[node], action);
                    self.deliver(node, Event::Admin(action))?;
                }
            }
            Ev::Fault => {
                if self.phase == Phase::Chaos {
                    self.inject_fault()?;
                    let next = self.now + self.gap();
                    self.push(next, 8, Ev::Fault);
                }
            }
            Ev::Heal { era, heal } => {
                if era == self.era {
                    self.heal(heal)?;
                }
            }
            Ev::ChaosEnd => self.heal_all()?,
            Ev::Check => self.check_convergence()?,
            Ev::Crash => self.crash_primary()?,
            Ev::CheckPasses { node, machine, agent } => {
                let n = &self.nodes[node];
                if n.machine == machine && n.agent == agent {
                    self.deliver(node, Event::StepCheck { step: APP_STEP, healthy: true, message: None })?;
                }
            }
            Ev::Timeline { node } => self.check_timeline(node)?,
            Ev::GiveUp => {
                if let Phase::Failover { crashed, at } = self.phase {
                    let bound = self.outcome.bound_ns;
                    return Err(self.fail(format!(
                        "bounded failover: {} crashed at {:.6}s and {} was not serving {:.1} ms later (bound {:.3} ms)",
                        NODES[crashed],
                        at as f64 / 1e9,
                        NODES[1 - crashed],
                        (self.now - at) as f64 / 1e6,
                        bound as f64 / 1e6
                    )));
                }
            }
        }
        Ok(())
    }

    /// Hands an event to a node's engine, or queues it while the agent is paused.
    fn deliver(&mut self, node: usize, event: Event) -> Result<(), Failure> {
        let n = &mut self.nodes[node];
        if n.engine.is_none() {
            return Ok(());
        }
        if n.paused.is_some() {
            match event {
                Event::Tick => n.buffered_tick = true,
                other if n.buffer.len() < BUFFER_KEPT => n.buffer.push(other),
                _ => {}
            }
            return Ok(());
        }
        if let Event::Volume { disk, .. } = &event {
            n.disk_known = *disk;
        }
        if let Event::Heartbeat { link, message } = &event
            && let Some(newest) = n.newest_on_link.get_mut(*link)
            && (message.incarnation, message.seq) > *newest
        {
            *newest = (message.incarnation, message.seq);
            n.last_peer_delivery = Some(self.now);
        }
        let now = n.local(self.now);
        let Some(engine) = n.engine.as_mut() else { return Ok(()) };
        let commands = engine.handle(now, event);
        let epoch = engine.epoch();
        if epoch < n.max_epoch {
            let max = n.max_epoch;
            return Err(self.fail(format!("epoch of {} went back from {max} to {epoch}", NODES[node])));
        }
        n.max_epoch = epoch;
        self.execute(node, commands)?;
        self.schedule_tick(node)?;
        self.after_handle(node)
    }

    fn schedule_tick(&mut self, node: usize) -> Result<(), Failure> {
        let n = &mut self.nodes[node];
        let Some(engine) = &n.engine else { return Ok(()) };
        let deadline = engine.next_deadline();
        if deadline <= n.local(self.now) {
            return Err(self.fail(format!("contract: {} asked to be woken at {deadline}, not after now", NODES[node])));
        }
        let at = n.clock.true_at(deadline.as_nanos()).max(self.now + 1);
        if n.tick_at != Some(at) {
            n.tick_at = Some(at);
            self.push(at, 6, Ev::Tick { node });
        }
        Ok(())
    }

    fn after_handle(&mut self, node: usize) -> Result<(), Failure> {
        if let Phase::Failover { crashed, at } = self.phase
            && node != crashed
            && self.nodes[node].engine.as_ref().is_some_and(|e| e.role() == Role::Primary)
        {
            let took = self.now - at;
            self.outcome.failover_ns = Some(took);
            self.phase = if self.p.first_checks {
                self.push(self.now + 2 * self.p.latencies.step.max, 9, Ev::Timeline { node });
                Phase::Settling
            } else {
                Phase::Done
            };
            if took > self.outcome.bound_ns {
                let bound = self.outcome.bound_ns;
                return Err(self.fail(format!(
                    "bounded failover: {} served {:.3} ms after {} crashed, bound {:.3} ms",
                    NODES[node],
                    took as f64 / 1e6,
                    NODES[crashed],
                    bound as f64 / 1e6
                )));
            }
        }
        Ok(())
    }

    fn execute(&mut self, node: usize, commands: Vec<Command>) -> Result<(), Failure> {
        for command in commands {
            trace!(self, "{} -> {}", NODES[node], brief_command(&command));
            match command {
                Command::SendHeartbeat(hb) => self.send_heartbeat(node, &hb)?,
                Command::Witness { request_id, request } => self.send_witness(node, request_id, request),
                Command::PromoteVolume { force, .. } => {
                    self.acquire(node)?;
                    self.nodes[node].held_volume = true;
                    // The volume layer refuses to make a stale replica primary unless forced.
                    let ok = force || self.nodes[node].disk == DiskState::UpToDate;
                    self.start_op_result(node, Op::Volume(VolumeOp::Promote), ok)?;
                }
                Command::DemoteVolume { .. } => {
                    let ok = self.stop_succeeds(self.nodes[node].held_volume);
                    self.start_op_result(node, Op::Volume(VolumeOp::Demote), ok)?
                }
                Command::StartStep { step, .. } | Command::AddVip { step, .. } => {
                    self.acquire(node)?;
                    if let Some(h) = self.nodes[node].held_steps.get_mut(step) {
                        *h = true;
                    }
                    self.start_op(node, Op::Step(step, StepOp::Start))?;
                }
                Command::StopStep { step, .. } | Command::RemoveVip { step, .. } => {
                    let held = self.nodes[node].held_steps.get(step).copied().unwrap_or(false);
                    let ok = self.stop_succeeds(held);
                    self.start_op_result(node, Op::Step(step, StepOp::Stop), ok)?
                }
                Command::RestartStep { step, .. } => {
                    self.outcome.stats.local_restarts += 1;
                    self.acquire(node)?;
                    if let Some(h) = self.nodes[node].held_steps.get_mut(step) {
                        *h = true;
                    }
                    self.start_op(node, Op::Step(step, StepOp::Restart))?;
                }
                // The simulated volumes hold no data to resolve or verify.
                Command::ResolveSplitBrain { .. } | Command::StartVerify { .. } => {}
                Command::ArmWatchdog { deadline } => {
                    let n = &mut self.nodes[node];
                    n.watchdog_gen += 1;
                    let at = n.clock.true_at(deadline.as_nanos());
                    n.watchdog = Some((at, n.watchdog_gen));
                    let generation = n.watchdog_gen;
                    self.push(at, 0, Ev::Watchdog { node, generation });
                }
                Command::DisarmWatchdog => {
                    let n = &mut self.nodes[node];
                    n.watchdog = None;
                    n.watchdog_gen += 1;
                }
                Command::Persist(state) => {
                    let n = &mut self.nodes[node];
                    if n.persisted.as_ref().is_some_and(|p| state.epoch < p.epoch) {
                        return Err(self.fail(format!("{} persisted an older epoch {}", NODES[node], state.epoch)));
                    }
                    n.persisted = Some(state);
                }
                Command::Emit(notice) => {
                    if notice.reason == Reason::SelfFenced {
                        self.outcome.stats.self_fenced += 1;
                    }
                }
                Command::ActionResult(result) => {
                    if result.outcome.is_final() && result.outcome != ActionOutcome::Succeeded {
                        trace!(self, "{}: action {} {:?}: {}", NODES[node], result.id, result.outcome, result.message);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether stopping a resource works; only a held one can fail to stop.
    fn stop_succeeds(&mut self, held: bool) -> bool {
        let fails = held && self.p.stop_failure > 0.0 && self.rng.random_bool(self.p.stop_failure);
        if fails {
            self.outcome.stats.failed_stops += 1;
        }
        !fails
    }

    /// A command that takes a resource: checks the invariants when it starts a term.
    fn acquire(&mut self, node: usize) -> Result<(), Failure> {
        let other = 1 - node;
        if !self.nodes[node].holds() {
            let epoch = self.nodes[node].engine.as_ref().map_or(0, |e| e.epoch());
            let n = &self.nodes[node];
            let silent =
                n.last_peer_delivery.is_none_or(|t| self.now - t + 1_000 >= self.p.true_min(self.p.timings.dead_after));
            let exempt = self.p.witness == WitnessMode::None && silent;
            let forced = self.now < n.forced_until;
            let disk = n.disk_known;
            self.outcome.stats.terms += 1;
            trace!(
                self,
                "{} starts a term in epoch {epoch}{}",
                NODES[node],
                if exempt { " (no witness, peer silent)" } else { "" }
            );
            if self.p.witness == WitnessMode::Controller {
                if let Some(last) = self.last_term_epoch
                    && epoch <= last
                {
                    return Err(self.fail(format!(
                        "epochs: {} started a term in epoch {epoch}, not above the previous term's {last}",
                        NODES[node]
                    )));
                }
                self.last_term_epoch = Some(epoch);
            }
            if disk != DiskState::UpToDate && !forced {
                return Err(self.fail(format!(
                    "{} promoted automatically while it knew its data was {} (not UpToDate)",
                    NODES[node],
                    disk.as_str()
                )));
            }
            let n = &mut self.nodes[node];
            n.term_start = Some(self.now);
            n.term_exempt = exempt;
        }
        if self.nodes[other].holds() {
            let mine = self.nodes[node].term_start.unwrap_or(0);
            let theirs = self.nodes[other].term_start.unwrap_or(0);
            let later = if mine >= theirs { node } else { other };
            if self.nodes[later].term_exempt {
                self.outcome.stats.exempt_overlaps += 1;
            } else {
                return Err(self.fail(format!("SAFETY: {} and {} both act as primary", NODES[node], NODES[other])));
            }
        }
        Ok(())
    }

    fn start_op(&mut self, node: usize, op: Op) -> Result<(), Failure> {
        self.start_op_result(node, op, true)
    }

    /// Starts an operation that completes after its latency, successfully or not.
    fn start_op_result(&mut self, node: usize, op: Op, ok: bool) -> Result<(), Failure> {
        let l = self.p.latencies;
        let steps = self.nodes[node].held_steps.len();
        let (slot, latency) = match op {
            Op::Volume(_) => (steps, l.volume.sample(&mut self.rng)),
            Op::Step(step, _) if step + 1 == steps => (step, l.vip.sample(&mut self.rng)),
            Op::Step(step, _) => (step, l.step.sample(&mut self.rng)),
        };
        let n = &mut self.nodes[node];
        if slot >= n.busy_until.len() {
            return Err(self.fail(format!("{} named an unknown step in {op:?}", NODES[node])));
        }
        if n.outstanding[slot] {
            return Err(self.fail(format!(
                "contract: {} issued {op:?} while its previous operation was outstanding",
                NODES[node]
            )));
        }
        n.outstanding[slot] = true;
        let done = n.busy_until[slot].max(self.now) + latency;
        n.busy_until[slot] = done;
        let (machine, agent) = (n.machine, n.agent);
        self.push(done, 3, Ev::OpDone { node, machine, agent, op, ok });
        Ok(())
    }

    fn op_done(&mut self, node: usize, machine: u64, agent: u64, op: Op, ok: bool) -> Result<(), Failure> {
        trace!(self, "{} done {op:?}{}", NODES[node], if ok { "" } else { " FAILED" });
        let steps = self.nodes[node].held_steps.len();
        let n = &mut self.nodes[node];
        if n.machine != machine {
            return Ok(());
        }
        match op {
            Op::Volume(VolumeOp::Demote) if ok => n.held_volume = false,
            Op::Volume(VolumeOp::Promote) if !ok => n.held_volume = false,
            Op::Step(step, StepOp::Stop) if ok => {
                if let Some(h) = n.held_steps.get_mut(step) {
                    *h = false;
                }
            }
            _ => {}
        }
        if n.agent != agent {
            return Ok(());
        }
        let slot = match op {
            Op::Volume(_) => steps,
            Op::Step(step, _) => step,
        };
        n.outstanding[slot] = false;
        if !n.holds() {
            n.term_start = None;
            n.term_exempt = false;
        }
        let result = match (ok, op) {
            (true, _) => Ok(()),
            (false, Op::Volume(VolumeOp::Promote)) => Err("replica is not UpToDate; promotion refused".to_string()),
            (false, _) => Err("still running after the stop timeout".to_string()),
        };
        let event = match op {
            Op::Volume(op) => Event::VolumeDone { volume: VOLUME.into(), op, result },
            Op::Step(step, op) => Event::StepDone { step, op, result },
        };
        self.deliver(node, event)?;
        if self.p.first_checks && ok && matches!(op, Op::Step(APP_STEP, StepOp::Start | StepOp::Restart)) {
            let at = self.now + self.p.latencies.step.sample(&mut self.rng);
            self.push(at, 3, Ev::CheckPasses { node, machine, agent });
        }
        Ok(())
    }

    fn send_heartbeat(&mut self, from: usize, hb: &Heartbeat) -> Result<(), Failure> {
        let bytes = hb.encode().map_err(|e| self.fail(format!("heartbeat failed to encode: {e}")))?;
        let to = 1 - from;
        for link in 0..self.p.links {
            if self.link_cuts[link][from] > 0 {
                continue;
            }
            let copies = if self.rng.random_bool(self.dup) { 2 } else { 1 };
            for _ in 0..copies {
                if self.loss > 0.0 && self.rng.random_bool(self.loss) {
                    continue;
                }
                let delay = self.p.latencies.heartbeat.sample(&mut self.rng) + self.spike();
                self.push(self.now + delay, 4, Ev::Deliver { node: to, link, bytes: bytes.clone() });
            }
        }
        Ok(())
    }

    fn spike(&mut self) -> u64 {
        if self.extra_delay == 0 { 0 } else { self.rng.random_range(0..=self.extra_delay) }
    }

    fn witness_delay(&mut self) -> Option<u64> {
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return None;
        }
        Some(self.p.latencies.witness.sample(&mut self.rng) + self.spike())
    }

    fn send_witness(&mut self, node: usize, id: u64, request: LeaseRequest) {
        let agent = self.nodes[node].agent;
        if request.op != hapair_crds::nodeapi::LeaseOp::Release {
            self.nodes[node].http.push(id);
            let timeout = nanos(self.p.timings.lease / 3);
            self.push(self.now + timeout, 5, Ev::HttpTimeout { node, agent, id });
        }
        if self.witness_cuts[node] > 0 {
            return;
        }
        if self.leaders.is_some() {
            self.broadcast(node, agent, id, &request);
            return;
        }
        let copies = if self.rng.random_bool(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            if let Some(delay) = self.witness_delay() {
                self.push(self.now + delay, 4, Ev::WitnessArrive { from: node, agent, id, request: request.clone() });
            }
        }
    }

    fn witness_arrive(&mut self, from: usize, agent: u64, id: u64, request: LeaseRequest) {
        let Some(w) = self.witness.witness.as_mut() else { return };
        let local = Duration::from_nanos(self.witness.clock.local(self.now));
        let response = w.handle(local, &request, self.lease);
        if let LeaseResponse::Granted { epoch, .. } = &response {
            self.witness.durable_epoch = self.witness.durable_epoch.max(*epoch);
        }
        trace!(self, "witness <- {} #{id} {:?} e{}: {response:?}", NODES[from], request.op, request.epoch);
        if self.witness_cuts[from] > 0 {
            return;
        }
        if let Some(delay) = self.witness_delay() {
            self.push(self.now + delay, 4, Ev::WitnessReply { node: from, agent, id, response });
        }
    }

    fn restart_witness(&mut self) {
        let local = Duration::from_nanos(self.witness.clock.local(self.now));
        let mut w = Witness::new(local);
        w.restore_epoch(&self.p.group_key(), self.witness.durable_epoch);
        self.witness.witness = Some(w);
        trace!(self, "witness restarted");
    }

    /// Starts (or restarts) a node's agent; after a machine reset its clock starts over.
    fn start_agent(&mut self, node: usize) -> Result<(), Failure> {
        let n = &mut self.nodes[node];
        n.down = false;
        n.agent += 1;
        n.outstanding.iter_mut().for_each(|o| *o = false);
        n.http.clear();
        n.paused = None;
        n.buffer.clear();
        n.buffered_tick = false;
        n.tick_at = None;
        let identity = Identity { node: NODES[node].to_string(), incarnation: n.agent };
        let now = n.local(self.now);
        let (mut engine, commands) = Engine::new(identity, &self.config, n.persisted.clone(), now).map_err(|e| {
            Failure { seed: self.p.seed, at: self.now, what: format!("engine refused the config: {e}"), trace: vec![] }
        })?;
        if let Some(hook) = self.opts.engine_hook {
            hook(&mut engine);
        }
        if engine.epoch() < n.max_epoch {
            let (epoch, max) = (engine.epoch(), n.max_epoch);
            return Err(self.fail(format!("{} restarted in epoch {epoch}, below {max}", NODES[node])));
        }
        n.engine = Some(engine);
        let incarnation = self.nodes[node].agent;
        trace!(self, "{} agent started (incarnation {incarnation})", NODES[node]);
        self.execute(node, commands)?;
        let disk = self.nodes[node].disk;
        self.deliver(node, Event::Volume { volume: VOLUME.into(), disk, connection: ConnectionState::Connected })?;
        if self.nodes[node].probe_failing {
            self.deliver(
                node,
                Event::Probe { monitor: MONITOR.into(), healthy: false, message: Some("gateway lost".into()) },
            )?;
        }
        self.schedule_tick(node)
    }

    /// The machine resets: everything held is gone at once, the agent with it.
    fn reset_machine(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.engine = None;
        n.down = true;
        n.down_gen += 1;
        n.machine += 1;
        n.held_volume = false;
        n.held_steps.iter_mut().for_each(|h| *h = false);
        n.busy_until.iter_mut().for_each(|b| *b = 0);
        n.watchdog = None;
        n.watchdog_gen += 1;
        n.paused = None;
        n.buffer.clear();
        n.term_start = None;
        n.term_exempt = false;
        n.clock = SimClock::new(self.now, 0, n.rate);
        // A new boot: the recorded lease end was on the old clock. The agent's runtime
        // drops it when the machine's boot id changed; so does the simulation.
        if let Some(p) = &mut n.persisted {
            p.serving = None;
        }
    }

    /// Only the agent process dies: the kernel keeps the VIP, units keep running, the
    /// watchdog keeps counting.
    fn kill_agent(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.engine = None;
        n.down = true;
        n.down_gen += 1;
        n.paused = None;
        n.buffer.clear();
    }

    fn schedule_restart(&mut self, node: usize, after: u64) {
        let generation = self.nodes[node].down_gen;
        self.push(self.now + after, 5, Ev::Restart { node, generation });
    }

    fn resume(&mut self, node: usize) -> Result<(), Failure> {
        let n = &mut self.nodes[node];
        n.paused = None;
        let buffered = std::mem::take(&mut n.buffer);
        let tick = std::mem::take(&mut n.buffered_tick);
        trace!(self, "{} resumes", NODES[node]);
        for event in buffered {
            self.deliver(node, event)?;
        }
        if tick {
            self.deliver(node, Event::Tick)?;
        }
        self.deliver(node, Event::Tick)
    }

    fn send_admin(&mut self, target: Admin) {
        self.action_seq += 1;
        let id = format!("act-{}", self.action_seq);
        let kind = match target {
            Admin::Switchover(n) => AdminActionKind::Switchover { to: NODES[n].into() },
            Admin::ForceActive(n) => AdminActionKind::ForceActive { node: NODES[n].into() },
            Admin::Resolve(n) => AdminActionKind::ResolveSplitBrain { winner: NODES[n].into() },
            Admin::Maintenance(on) => AdminActionKind::Maintenance { enabled: on },
        };
        if let Admin::ForceActive(n) | Admin::Resolve(n) = target {
            let t = hapair_agent::engine::Timing::new(
                self.p.timings.interval,
                self.p.timings.dead_after,
                self.p.timings.lease,
                self.p.timings.drift_ppm,
            );
            let window = self.p.true_max(t.action_timeout + t.handover_timeout + t.dead_after * 2);
            self.nodes[n].forced_until = self.nodes[n].forced_until.max(self.now + window);
        }
        self.outcome.stats.admin_actions += 1;
        let action = AdminAction { id, kind };
        let d = nanos(self.p.timings.dead_after);
        for node in 0..2 {
            if self.rng.random_bool(0.85) {
                let delay = self.rng.random_range(0..=d);
                let era = self.era;
                self.push(self.now + delay, 7, Ev::AdminArrive { era, node, action: action.clone() });
            }
        }
    }
}

/// Nanoseconds of a duration.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn brief(hb: &Heartbeat) -> String {
    let mut s = format!("#{} {} e{}", hb.seq, hb.role.as_str(), hb.epoch);
    if hb.holding {
        s.push_str(" holding");
    }
    if let Some(g) = &hb.grant {
        s.push_str(&format!(" grant#{}", g.seq));
    }
    if let Some(h) = &hb.handover {
        s.push_str(&format!(" handover->{}{}", h.to, if h.force { " force" } else { "" }));
    }
    if let Some(t) = &hb.takeover {
        s.push_str(&format!(" takeover{}", if t.force { " force" } else { "" }));
    }
    s
}

fn brief_command(c: &Command) -> String {
    match c {
        Command::SendHeartbeat(hb) => format!("heartbeat {}", brief(hb)),
        Command::Witness { request_id, request } => {
            format!("witness #{request_id} {:?} e{}", request.op, request.epoch)
        }
        Command::Emit(n) => format!("event {:?} {}: {}", n.type_, n.reason.as_str(), n.message),
        Command::ActionResult(r) => format!("action {} {:?}: {}", r.id, r.outcome, r.message),
        other => format!("{other:?}"),
    }
}
