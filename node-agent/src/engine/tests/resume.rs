//! Resuming after an agent restart: the serving record, its ordering, and what a restarted
//! engine does with it inside and outside the lease.

use hapair_crds::nodeapi::GroupConfig;

use super::*;
use crate::engine::{Command, Engine, Event, Identity, Instant, PersistedState, Role, StepOp};

/// The harness's pair with a flow the agent can resume: a command and the virtual IP.
const SPEC: &str = r#"
nodes:
  - {name: a, heartbeatAddresses: [198.18.0.1]}
  - {name: b, heartbeatAddresses: [198.18.0.2]}
virtualIPs:
  - {name: svc, address: 198.18.0.100/24, interface: eth0}
flow:
  - {name: app, exec: {start: "true", stop: "true"}}
  - {name: svc-ip, virtualIP: {name: svc}}
"#;

fn group(spec: &str) -> GroupConfig {
    let mut c = config("");
    c.spec = serde_yaml::from_str(spec).unwrap_or_else(|e| panic!("{e}"));
    hapair_crds::validation::validate_group(&c.spec).unwrap_or_else(|e| panic!("{e}"));
    c
}

fn start(config: &GroupConfig, state: Option<PersistedState>, incarnation: u64, ms: u64) -> (H, Vec<Command>) {
    let identity = Identity { node: "a".into(), incarnation };
    let (e, startup) = Engine::new(identity, config, state, at(ms)).unwrap_or_else(|e| panic!("{e}"));
    let rendered = render(&startup);
    (H { e, startup: rendered, sent: 0, recorded: 0 }, startup)
}

fn last_persisted(commands: &[Command]) -> Option<PersistedState> {
    commands.iter().rev().find_map(|c| match c {
        Command::Persist(p) => Some(p.clone()),
        _ => None,
    })
}

fn done(step: usize, op: StepOp) -> Event {
    Event::StepDone { step, op, result: Ok(()) }
}

/// Node `a` fails over to itself through the witness (epoch 2, lease until 1850 ms) and
/// brings `app` and the VIP up at 1071 ms; returns the engine and the persisted state.
fn serving() -> (H, PersistedState) {
    let (mut h, startup) = start(&group(SPEC), None, ME, 0);
    assert_eq!(h.startup, ["remove-vip 1:svc", "hb #1 Standby e0 f0 holding"]);
    let mut state = last_persisted(&startup).unwrap_or_default();
    h.expect(1, done(1, StepOp::Stop), &["stop 0:app"]);
    h.expect(2, done(0, StepOp::Stop), &["watchdog off"]);
    h.expect(50, peer(1, Role::Primary, 1).event(), &["event Normal PeerFound", "persist e1 f1 peer#3"]);
    h.expect(100, tick(), &["hb #2 Standby e1 f1 grant 3#1 800ms"]);
    h.expect(
        1050,
        tick(),
        &[
            "event Warning PeerLost",
            "event Warning Promoting",
            "witness #1 Acquire e2 800ms",
            "persist e1 f2 peer#3",
            "hb #3 Promoting e1 f2",
        ],
    );
    h.expect(
        1060,
        witness(1, granted(2)),
        &[
            "event Normal Acting",
            "watchdog 1850ms",
            "persist e2 f2 peer#3",
            "start 0:app",
            "hb #4 Promoting e2 f2 holding",
        ],
    );
    h.expect(1070, done(0, StepOp::Start), &["add-vip 1:svc"]);
    let commands = h.e.handle(at(1071), done(1, StepOp::Start));
    // Serving with the flow up: the lease end is recorded, after everything else.
    assert_eq!(
        render(&commands),
        ["event Normal Promoted", "hb #5 Primary e2 f2 holding", "persist e2 f2 peer#3 serving e2 until 1850ms"]
    );
    if let Some(p) = last_persisted(&commands) {
        state = p;
    }
    assert_eq!(h.e.status(at(1071)).role, Role::Primary);
    (h, state)
}

#[test]
fn the_lease_end_is_recorded_in_steps_of_the_fence_margin() {
    let (mut h, _) = serving();
    // b comes back as a standby and acknowledges #5 (sent at 1071): lease until 1871 ms,
    // less than the fence margin (200 ms) beyond the record, which stays as it was.
    h.expect(
        1080,
        peer(1, Role::Standby, 2).incarnation(4).grant(5).event(),
        &[
            "event Normal PeerRestarted",
            "watchdog 1871ms",
            "event Normal PeerFound",
            "persist e2 f2 peer#4 serving e2 until 1850ms",
        ],
    );
    h.expect(1171, tick(), &["hb #6 Primary e2 f2 holding"]);
    h.expect(1180, peer(2, Role::Standby, 2).incarnation(4).grant(6).event(), &["watchdog 1971ms"]);
    h.expect(1271, tick(), &["hb #7 Primary e2 f2 holding"]);
    // 2071 ms is 221 ms beyond the record: written, after the watchdog moved.
    h.expect(
        1280,
        peer(3, Role::Standby, 2).incarnation(4).grant(7).event(),
        &["watchdog 2071ms", "persist e2 f2 peer#4 serving e2 until 2071ms"],
    );
}

#[test]
fn an_agent_restarted_within_the_lease_keeps_serving_without_touching_the_flow() {
    let (_, state) = serving();
    let (h, _) = start(&group(SPEC), Some(state), ME + 1, 1400);
    // No stop, no VIP removal: the watchdog is re-armed at the recorded lease end, the peer
    // hears a primary in the same epoch, and with 450 ms of lease left the witness is
    // asked at once, as for any primary whose acknowledgements are late.
    assert_eq!(
        h.startup,
        ["event Normal Resumed", "watchdog 1850ms", "witness #1 Renew e2 800ms", "hb #1 Primary e2 f2 holding"]
    );
    let status = h.e.status(at(1400));
    assert_eq!((status.role, status.epoch, status.serving), (Role::Primary, 2, true));
    assert!(status.steps.iter().all(|s| s.state == hapair_crds::nodeapi::StepState::Running), "{:?}", status.steps);
}

#[test]
fn the_resumed_lease_is_renewed_by_the_standby_and_otherwise_fenced() {
    let (_, state) = serving();
    let (mut h, _) = start(&group(SPEC), Some(state.clone()), ME + 1, 1400);
    // The standby acknowledges the new incarnation's first heartbeat (sent at 1400 ms).
    h.expect(
        1410,
        peer(5, Role::Standby, 2).incarnation(4).grant_for(ME + 1, 1).event(),
        &[
            "event Normal PeerRestarted",
            "watchdog 2200ms",
            "event Normal PeerFound",
            "persist e2 f2 peer#4 serving e2 until 2200ms",
        ],
    );

    // Without acknowledgements, the resumed lease runs out like any other: the witness is
    // asked, then the node fences itself, the record cleared first.
    let (mut h, _) = start(&group(SPEC), Some(state), ME + 1, 1400);
    h.expect(1500, tick(), &["hb #2 Primary e2 f2 holding"]);
    let commands = h.step(1650, tick());
    assert_eq!(commands.first().map(String::as_str), Some("persist e2 f2 peer#3"), "{commands:?}");
    assert!(commands.contains(&"remove-vip 1:svc".to_string()), "{commands:?}");
    assert_eq!(h.e.role(), Role::Fenced);
}

#[test]
fn an_agent_restarted_after_its_lease_comes_back_as_standby() {
    let (_, state) = serving();
    // 1650 ms + the fence margin is past 1850 ms: the record is cleared before the
    // startup cleanup takes the VIP down.
    let (h, _) = start(&group(SPEC), Some(state), ME + 1, 1650);
    assert_eq!(h.startup, ["persist e2 f2 peer#3", "remove-vip 1:svc", "hb #1 Standby e2 f2 holding"]);
    assert_eq!(h.e.role(), Role::Standby);
}

#[test]
fn a_changed_flow_or_a_volume_never_resumes() {
    let (_, state) = serving();
    let changed = SPEC.replace("name: app,", "name: web,");
    let (h, _) = start(&group(&changed), Some(state.clone()), ME + 1, 1400);
    assert_eq!(h.startup[0], "persist e2 f2 peer#3");
    assert_eq!(h.e.role(), Role::Standby);
    // Another epoch than the record's (the node learnt of a newer term) never resumes.
    let newer = PersistedState { epoch: 3, floor: 3, ..state };
    let (h, _) = start(&group(SPEC), Some(newer), ME + 1, 1400);
    assert_eq!(h.e.role(), Role::Standby);
    // The harness's flow has a volume: its records never carry a lease.
    let mut h = H::standby("");
    h.expect(50, peer(1, Role::Primary, 1).event(), &["event Normal PeerFound", "persist e1 f1 peer#3"]);
}

#[test]
fn a_demotion_clears_the_record_before_the_vip_goes() {
    let (mut h, _) = serving();
    // The peer serves in a newer epoch: stepping down starts with the durable record.
    let commands = h.step(1100, peer(1, Role::Primary, 3).incarnation(4).event());
    assert_eq!(commands.first().map(String::as_str), Some("persist e3 f3 peer#4"), "{commands:?}");
    let vip = commands.iter().position(|c| c == "remove-vip 1:svc");
    assert!(vip.is_some_and(|i| i > 0), "{commands:?}");
    let _ = Instant::ZERO;
}
