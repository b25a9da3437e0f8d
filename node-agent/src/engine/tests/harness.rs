//! The test harness: a config, an engine at a chosen time, peer heartbeats, and the
//! compact rendering of commands.

use hapair_crds::hagroup::NodeHealth;
use hapair_crds::nodeapi::{AdminAction, AdminActionKind, GroupConfig, GroupKey, HeartbeatKey, LeaseResponse};
use hapair_crds::volume::{ConnectionState, DiskState};

use crate::engine::{
    Command, Engine, Event, Handover, Heartbeat, Identity, Instant, LeaseGrant, PersistedState, Role, StepOp, Takeover,
    VolumeOp, WitnessAnswer,
};

pub const BASE: &str = r#"
nodes:
  - {name: a, heartbeatAddresses: [198.18.0.1]}
  - {name: b, heartbeatAddresses: [198.18.0.2]}
virtualIPs:
  - {name: svc, address: 198.18.0.100/24, interface: eth0}
flow:
  - {name: data, volume: {volumeRef: data}}
  - {name: app, exec: {start: "true", stop: "true"}, restart: {limit: 2, window: 60s}, check: {exec: {command: "true"}, failureThreshold: 1}}
  - {name: svc-ip, virtualIP: {name: svc}}
monitors:
  - {name: gw, gateway: {address: 198.18.0.254}, action: failover, failureThreshold: 2}
  - {name: web, gateway: {address: 198.18.0.253}, action: restart, restartStep: app, failureThreshold: 1}
  - {name: log, gateway: {address: 198.18.0.252}, action: alert, failureThreshold: 1}
"#;

pub const ME: u64 = 7;
pub const PEER: u64 = 3;

/// `BASE` with extra top-level YAML appended (keys `BASE` does not set).
pub fn config(extra: &str) -> GroupConfig {
    let yaml = format!("{BASE}{extra}");
    let spec = serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    GroupConfig {
        key: GroupKey::new("ns", "g"),
        generation: 1,
        spec,
        volumes: vec![],
        heartbeat_key: HeartbeatKey::Inline(String::new()),
        actions: vec![],
        deleting: false,
    }
}

pub fn at(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

/// How the engine under test is set up.
#[derive(Default)]
pub struct Setup {
    extra: String,
    prefer_b: bool,
    links: Option<usize>,
    state: Option<PersistedState>,
    /// `stabilization` and check `failureThreshold` of step `app`.
    app_stabilization: Option<(std::time::Duration, u32)>,
}

pub fn setup(extra: &str) -> Setup {
    Setup { extra: extra.to_string(), ..Setup::default() }
}

impl Setup {
    /// Marks the peer `b` preferred (it outranks `a`).
    pub fn prefer_b(mut self) -> Setup {
        self.prefer_b = true;
        self
    }

    /// Gives both nodes `n` heartbeat links.
    pub fn links(mut self, n: usize) -> Setup {
        self.links = Some(n);
        self
    }

    /// Gives step `app` a stabilization time and its check a `failureThreshold`.
    pub fn app_stabilization(mut self, stabilization: std::time::Duration, failure_threshold: u32) -> Setup {
        self.app_stabilization = Some((stabilization, failure_threshold));
        self
    }

    /// Restores persisted state.
    pub fn state(mut self, state: PersistedState) -> Setup {
        self.state = Some(state);
        self
    }

    /// The config, checked against the shared validation.
    pub fn config(&self) -> GroupConfig {
        let c = self.config_unchecked();
        hapair_crds::validation::validate_group(&c.spec).unwrap_or_else(|e| panic!("{e}"));
        c
    }

    pub fn config_unchecked(&self) -> GroupConfig {
        let mut c = config(&self.extra);
        c.spec.nodes[1].preferred = self.prefer_b;
        if let Some((stabilization, threshold)) = self.app_stabilization {
            let app = &mut c.spec.flow[1];
            app.stabilization = stabilization.into();
            if let Some(check) = &mut app.check {
                check.failure_threshold = threshold;
            }
        }
        if let Some(n) = self.links {
            for (i, node) in c.spec.nodes.iter_mut().enumerate() {
                node.heartbeat_addresses = (0..n).map(|l| format!("198.18.{l}.{}", i + 1)).collect();
            }
        }
        c
    }

    /// A fresh engine for node `a` at t = 0.
    pub fn fresh(self) -> H {
        let identity = Identity { node: "a".into(), incarnation: ME };
        let (e, startup) =
            Engine::new(identity, &self.config(), self.state, Instant::ZERO).unwrap_or_else(|e| panic!("{e}"));
        let sent = last_heartbeat(&startup).unwrap_or(0);
        H { e, startup: render(&startup), sent, recorded: 0 }
    }

    /// A fresh engine that has finished its startup cleanup (at 4 ms) and learnt its
    /// volume is UpToDate (at 10 ms): standing by, holding nothing.
    pub fn standby(self) -> H {
        let mut h = self.fresh();
        h.expect(1, stop_done(2), &["stop 1:app"]);
        h.expect(2, stop_done(1), &["stop 0:data"]);
        h.expect(3, stop_done(0), &["demote data"]);
        h.expect(4, demote_done(), &["watchdog off"]);
        h.expect(10, volume(DiskState::UpToDate), &[]);
        assert_eq!(h.e.role(), Role::Standby);
        assert!(!h.e.holding());
        h
    }
}

/// The engine under test.
pub struct H {
    pub e: Engine,
    /// The commands `Engine::new` returned.
    pub startup: Vec<String>,
    /// Sequence number of the last heartbeat `a` sent.
    pub sent: u64,
    /// Expectations printed instead of checked (`ENGINE_TEST_RECORD`).
    pub recorded: usize,
}

/// A test that recorded instead of asserting checked nothing, so it must not pass: left set
/// by accident (in CI or a shell), `ENGINE_TEST_RECORD` would otherwise turn every engine
/// test green whatever the engine does.
impl Drop for H {
    fn drop(&mut self) {
        if self.recorded > 0 && !std::thread::panicking() {
            panic!("ENGINE_TEST_RECORD is set: recorded {} expectations, assertions were not checked", self.recorded);
        }
    }
}

impl H {
    pub fn new(extra: &str) -> H {
        setup(extra).fresh()
    }

    pub fn standby(extra: &str) -> H {
        setup(extra).standby()
    }

    pub fn step(&mut self, ms: u64, event: Event) -> Vec<String> {
        let commands = self.e.handle(at(ms), event);
        if let Some(seq) = last_heartbeat(&commands) {
            self.sent = seq;
        }
        render(&commands)
    }

    /// Handles `event` at `ms` and asserts the exact commands. With `ENGINE_TEST_RECORD`
    /// set, prints what was emitted instead (for writing new tests); the test then fails
    /// when `H` is dropped, so a recording run is never mistaken for a passing one.
    #[track_caller]
    pub fn expect(&mut self, ms: u64, event: Event, expected: &[&str]) {
        let what = format!("{event:?}");
        let got = self.step(ms, event);
        if std::env::var_os("ENGINE_TEST_RECORD").is_some() {
            let line = std::panic::Location::caller().line();
            println!("RECORD line {line} at {ms}: {got:?}{}", if got == expected { "" } else { "   <-- differs" });
            self.recorded += 1;
            return;
        }
        assert_eq!(got, expected, "at {ms} ms after {what}");
    }

    /// Brings the flow up after an `Acting` step at `ms` (promote done, steps started).
    #[track_caller]
    pub fn flow_up(&mut self, ms: u64, last: &[&str]) {
        self.expect(ms, promote_done(), &["start 0:data"]);
        self.expect(ms + 1, start_done(0), &["start 1:app"]);
        self.expect(ms + 2, start_done(1), &["add-vip 2:svc"]);
        self.expect(ms + 3, start_done(2), last);
        assert_eq!(self.e.role(), Role::Primary);
    }

    /// Brings the flow down after its first command (VIP removal) at `ms - 1`.
    #[track_caller]
    pub fn flow_down(&mut self, ms: u64, last: &[&str]) {
        self.expect(ms, stop_done(2), &["stop 1:app"]);
        self.expect(ms + 1, stop_done(1), &["stop 0:data"]);
        self.expect(ms + 2, stop_done(0), &["demote data"]);
        self.expect(ms + 3, demote_done(), last);
    }
}

pub fn tick() -> Event {
    Event::Tick
}

pub fn stop_done(step: usize) -> Event {
    Event::StepDone { step, op: StepOp::Stop, result: Ok(()) }
}

pub fn start_done(step: usize) -> Event {
    Event::StepDone { step, op: StepOp::Start, result: Ok(()) }
}

pub fn promote_done() -> Event {
    Event::VolumeDone { volume: "data".into(), op: VolumeOp::Promote, result: Ok(()) }
}

pub fn demote_done() -> Event {
    Event::VolumeDone { volume: "data".into(), op: VolumeOp::Demote, result: Ok(()) }
}

pub fn volume(disk: DiskState) -> Event {
    Event::Volume { volume: "data".into(), disk, connection: ConnectionState::Connected }
}

pub fn admin(id: &str, kind: AdminActionKind) -> Event {
    Event::Admin(AdminAction { id: id.into(), kind })
}

pub fn witness(id: u64, response: LeaseResponse) -> Event {
    Event::Witness { request_id: id, answer: WitnessAnswer::Response(response) }
}

pub fn granted(epoch: u64) -> LeaseResponse {
    LeaseResponse::Granted { holder: "a".into(), ttl_ms: 800, epoch }
}

pub fn denied(holder: &str) -> LeaseResponse {
    LeaseResponse::Denied { holder: Some(holder.into()), retry_after_ms: 300, reason: format!("held by {holder}") }
}

/// A heartbeat of peer `b` (incarnation 3) with sequence `seq`, in `role` and `epoch`.
pub fn peer(seq: u64, role: Role, epoch: u64) -> Hb {
    Hb(Heartbeat {
        sender: "b".into(),
        incarnation: PEER,
        seq,
        epoch,
        floor: epoch,
        role,
        holding: matches!(role, Role::Primary | Role::Demoting),
        maintenance: false,
        health: NodeHealth::Healthy,
        disk: DiskState::UpToDate,
        grant: None,
        handover: None,
        takeover: None,
    })
}

/// Builder for peer heartbeats.
pub struct Hb(pub Heartbeat);

impl Hb {
    /// Grants a lease for heartbeat `seq` of node `a`.
    pub fn grant(mut self, seq: u64) -> Hb {
        self.0.grant = Some(LeaseGrant { incarnation: ME, seq, ttl_ms: 800 });
        self
    }

    /// Grants a lease for heartbeat `seq` of incarnation `incarnation` of node `a`.
    pub fn grant_for(mut self, incarnation: u64, seq: u64) -> Hb {
        self.0.grant = Some(LeaseGrant { incarnation, seq, ttl_ms: 800 });
        self
    }

    pub fn floor(mut self, floor: u64) -> Hb {
        self.0.floor = floor;
        self
    }

    pub fn disk(mut self, disk: DiskState) -> Hb {
        self.0.disk = disk;
        self
    }

    pub fn incarnation(mut self, incarnation: u64) -> Hb {
        self.0.incarnation = incarnation;
        self
    }

    pub fn handover(mut self, action: Option<&str>, force: bool) -> Hb {
        self.0.handover = Some(Handover { to: "a".into(), action: action.map(str::to_string), force });
        self
    }

    pub fn takeover(mut self, action: Option<&str>, force: bool) -> Hb {
        self.0.takeover = Some(Takeover { action: action.map(str::to_string), force });
        self
    }

    pub fn on(self, link: usize) -> Event {
        Event::Heartbeat { link, message: self.0 }
    }

    pub fn event(self) -> Event {
        self.on(0)
    }
}

fn last_heartbeat(commands: &[Command]) -> Option<u64> {
    commands.iter().rev().find_map(|c| match c {
        Command::SendHeartbeat(h) => Some(h.seq),
        _ => None,
    })
}

/// One line per command, every field but event message text.
pub fn render(commands: &[Command]) -> Vec<String> {
    commands.iter().map(render_one).collect()
}

fn render_one(c: &Command) -> String {
    match c {
        Command::SendHeartbeat(h) => {
            let mut s = format!("hb #{} {} e{} f{}", h.seq, h.role.as_str(), h.epoch, h.floor);
            if h.holding {
                s.push_str(" holding");
            }
            if h.maintenance {
                s.push_str(" maintenance");
            }
            if h.health != NodeHealth::Healthy {
                s.push_str(&format!(" {:?}", h.health));
            }
            if h.disk != DiskState::UpToDate {
                s.push_str(&format!(" {}", h.disk.as_str()));
            }
            if let Some(g) = &h.grant {
                s.push_str(&format!(" grant {}#{} {}ms", g.incarnation, g.seq, g.ttl_ms));
            }
            if let Some(o) = &h.handover {
                s.push_str(&format!(" handover->{}", o.to));
                if o.force {
                    s.push_str(" force");
                }
                if let Some(a) = &o.action {
                    s.push_str(&format!(" {a}"));
                }
            }
            if let Some(t) = &h.takeover {
                s.push_str(" takeover");
                if t.force {
                    s.push_str(" force");
                }
                if let Some(a) = &t.action {
                    s.push_str(&format!(" {a}"));
                }
            }
            assert_eq!(h.sender, "a");
            assert!(h.incarnation >= ME);
            s
        }
        Command::Witness { request_id, request } => {
            assert_eq!((request.group.to_string().as_str(), request.node.as_str()), ("ns/g", "a"));
            format!("witness #{request_id} {:?} e{} {}ms", request.op, request.epoch, request.ttl_ms)
        }
        Command::PromoteVolume { volume, epoch, force } => {
            format!("promote {volume} e{epoch}{}", if *force { " force" } else { "" })
        }
        Command::DemoteVolume { volume } => format!("demote {volume}"),
        Command::StartStep { step, name } => format!("start {step}:{name}"),
        Command::StopStep { step, name } => format!("stop {step}:{name}"),
        Command::RestartStep { step, name } => format!("restart {step}:{name}"),
        Command::AddVip { step, vip } => format!("add-vip {step}:{vip}"),
        Command::RemoveVip { step, vip } => format!("remove-vip {step}:{vip}"),
        Command::ResolveSplitBrain { volume, keep_local } => {
            format!("resolve {volume} {}", if *keep_local { "keep" } else { "discard" })
        }
        Command::StartVerify { volume, action } => format!("verify {volume} {action}"),
        Command::ArmWatchdog { deadline } => format!("watchdog {}ms", deadline.as_nanos() / 1_000_000),
        Command::DisarmWatchdog => "watchdog off".into(),
        Command::Persist(p) => {
            let mut s = format!("persist e{} f{} peer#{}", p.epoch, p.floor, p.peer_incarnation);
            if let Some(m) = p.maintenance {
                s.push_str(&format!(" maintenance={m}"));
            }
            if !p.finished_actions.is_empty() {
                s.push_str(&format!(" done={}", p.finished_actions.join(",")));
            }
            if let Some(v) = &p.serving {
                s.push_str(&format!(" serving e{} until {}ms", v.epoch, v.lease_end_nanos / 1_000_000));
            }
            s
        }
        Command::Emit(n) => format!("event {:?} {}", n.type_, n.reason.as_str()),
        Command::ActionResult(r) => format!("result {} {:?}", r.id, r.outcome),
    }
}
