//! Admin actions: switchover, force-active, resolve-split-brain, maintenance, verify; and their
//! idempotency.

use hapair_crds::nodeapi::AdminActionKind;
use hapair_crds::volume::DiskState;

use super::*;
use crate::engine::{Event, Role};

fn switchover(to: &str) -> AdminActionKind {
    AdminActionKind::Switchover { to: to.into() }
}

fn force(node: &str) -> AdminActionKind {
    AdminActionKind::ForceActive { node: node.into() }
}

fn resolve(winner: &str) -> AdminActionKind {
    AdminActionKind::ResolveSplitBrain { winner: winner.into() }
}

fn maintenance(enabled: bool) -> AdminActionKind {
    AdminActionKind::Maintenance { enabled }
}

/// a serves in epoch 1 (bootstrap by consent at 360 ms, flow up at 373 ms) and b stands
/// by, acknowledging heartbeat #5 at 380 ms.
fn primary() -> H {
    let mut h = H::standby("");
    h.step(50, peer(1, Role::Standby, 0).event());
    h.step(340, peer(2, Role::Standby, 0).event());
    h.expect(350, tick(), &["event Normal Promoting", "persist e0 f1 peer#3", "hb #3 Promoting e0 f1"]);
    h.step(360, peer(3, Role::Standby, 0).floor(1).grant(3).event());
    h.flow_up(370, &["event Normal Promoted", "hb #5 Primary e1 f1 holding"]);
    h.expect(380, peer(4, Role::Standby, 1).grant(5).event(), &["watchdog 1173ms"]);
    h
}

/// a stands by for primary b (epoch 1), acknowledging b's heartbeat at 100 ms.
fn standby() -> H {
    let mut h = H::standby("");
    h.expect(50, peer(1, Role::Primary, 1).event(), &["event Normal PeerFound", "persist e1 f1 peer#3"]);
    h.expect(100, tick(), &["hb #2 Standby e1 f1 grant 3#1 800ms"]);
    h
}

#[test]
fn switchover_from_the_primary_stops_everything_then_offers_the_service() {
    let mut h = primary();
    h.expect(
        400,
        admin("s1", switchover("b")),
        &["event Normal Switchover", "remove-vip 2:svc", "hb #6 Demoting e1 f1 holding"],
    );
    // The lease holds while demoting: b keeps acknowledging.
    h.expect(405, peer(5, Role::Standby, 1).grant(6).event(), &["watchdog 1200ms"]);
    h.flow_down(410, &["watchdog off", "event Normal Demoted", "hb #7 Standby e1 f1 handover->b s1"]);
    // b proposes epoch 2: a consents (floor first), and b serves.
    h.expect(420, peer(6, Role::Promoting, 1).floor(2).event(), &[]);
    h.expect(513, tick(), &["persist e1 f2 peer#3", "hb #8 Standby e1 f2 grant 3#6 800ms handover->b s1"]);
    h.expect(530, peer(7, Role::Primary, 2).event(), &["result s1 Succeeded", "persist e2 f2 peer#3 done=s1"]);
    h.expect(613, tick(), &["hb #9 Standby e2 f2 grant 3#7 800ms"]);
}

#[test]
fn switchover_is_refused_when_the_target_is_not_in_sync() {
    let mut h = primary();
    h.step(390, peer(5, Role::Standby, 1).disk(DiskState::Inconsistent).grant(5).event());
    h.expect(
        400,
        admin("s1", switchover("b")),
        &["event Warning ActionRejected", "result s1 Rejected", "persist e1 f1 peer#3 done=s1"],
    );
    assert_eq!(h.e.role(), Role::Primary);
}

#[test]
fn switchover_to_itself_asks_the_primary_and_promotes_once_handed_over() {
    let mut h = standby();
    h.expect(
        150,
        admin("s1", switchover("a")),
        &["result s1 Pending", "hb #3 Standby e1 f1 grant 3#1 800ms takeover s1"],
    );
    // b demotes and offers the service: a proposes epoch 2.
    h.expect(
        300,
        peer(2, Role::Standby, 1).handover(Some("s1"), false).event(),
        &["event Normal Promoting", "persist e1 f2 peer#3", "hb #4 Promoting e1 f2 takeover s1"],
    );
    h.expect(
        310,
        peer(3, Role::Standby, 1).floor(2).handover(Some("s1"), false).grant(4).event(),
        &[
            "event Normal Acting",
            "watchdog 1100ms",
            "persist e2 f2 peer#3",
            "promote data e2",
            "hb #5 Promoting e2 f2 holding takeover s1",
        ],
    );
    h.flow_up(
        320,
        &[
            "event Normal Switchover",
            "result s1 Succeeded",
            "persist e2 f2 peer#3 done=s1",
            "hb #6 Primary e2 f2 holding",
        ],
    );
    // Delivered again (the controller retries until it sees the result): ignored.
    h.expect(330, admin("s1", switchover("a")), &[]);
}

#[test]
fn switchover_to_itself_is_refused_without_up_to_date_data() {
    let mut h = standby();
    h.step(120, volume(DiskState::Outdated));
    h.expect(
        150,
        admin("s1", switchover("a")),
        &["event Warning ActionRejected", "result s1 Rejected", "persist e1 f1 peer#3 done=s1"],
    );
}

#[test]
fn switchover_to_an_unknown_node_is_refused() {
    let mut h = primary();
    h.expect(
        400,
        admin("s1", switchover("c")),
        &["event Warning ActionRejected", "result s1 Rejected", "persist e1 f1 peer#3 done=s1"],
    );
}

#[test]
fn the_primary_answers_a_takeover_request_in_the_peers_heartbeat() {
    let mut h = primary();
    // The switchover reached b only: b asks through its heartbeat.
    h.expect(
        400,
        peer(5, Role::Standby, 1).takeover(Some("s9"), false).grant(5).event(),
        &["event Normal Switchover", "remove-vip 2:svc", "hb #6 Demoting e1 f1 holding"],
    );
    h.flow_down(410, &["watchdog off", "event Normal Demoted", "hb #7 Standby e1 f1 handover->b s9"]);
}

#[test]
fn force_active_skips_health_and_sync_but_waits_out_the_granted_lease() {
    let mut h = standby();
    h.step(120, volume(DiskState::Inconsistent));
    h.expect(
        400,
        admin("f1", force("a")),
        &[
            "event Warning ForceActive",
            "result f1 Pending",
            "event Normal Promoting",
            "witness #1 Acquire e2 800ms",
            "persist e1 f2 peer#3",
            "hb #3 Promoting e1 f2 Inconsistent takeover force f1",
        ],
    );
    // The witness grants at once (b holds no witness lease), but a granted b a lease for
    // its heartbeat received at 50 ms: it waits until 50 + 808 ms.
    h.expect(410, witness(1, granted(2)), &[]);
    h.expect(500, tick(), &["hb #4 Promoting e1 f2 Inconsistent takeover force f1"]);
    // Acting with 342 ms of witness lease left (below 2L/3): renewed at once.
    h.expect(
        858,
        tick(),
        &[
            "event Normal Acting",
            "watchdog 1200ms",
            "witness #2 Renew e2 800ms",
            "persist e2 f2 peer#3",
            "promote data e2 force",
            "hb #5 Promoting e2 f2 holding Inconsistent takeover force f1",
        ],
    );
}

#[test]
fn force_active_of_the_peer_demotes_the_primary_without_checks() {
    let mut h = primary();
    h.step(390, peer(5, Role::Standby, 1).disk(DiskState::Inconsistent).grant(5).event());
    h.expect(
        400,
        admin("f1", force("b")),
        &["event Normal ForceActive", "remove-vip 2:svc", "hb #6 Demoting e1 f1 holding"],
    );
    h.flow_down(410, &["watchdog off", "event Normal Demoted", "hb #7 Standby e1 f1 handover->b force f1"]);
}

#[test]
fn force_active_of_the_serving_node_succeeds_at_once() {
    let mut h = primary();
    h.expect(400, admin("f1", force("a")), &["result f1 Succeeded", "persist e1 f1 peer#3 done=f1"]);
}

#[test]
fn resolve_split_brain_the_serving_loser_demotes_then_discards() {
    let mut h = primary();
    h.expect(
        400,
        admin("r1", resolve("b")),
        &[
            "event Warning SplitBrainResolved",
            "event Normal SplitBrainResolved",
            "remove-vip 2:svc",
            "hb #6 Demoting e1 f1 holding",
        ],
    );
    h.flow_down(
        410,
        &[
            "watchdog off",
            "resolve data discard",
            "result r1 Succeeded",
            "event Normal Demoted",
            "persist e1 f1 peer#3 done=r1",
            "hb #7 Standby e1 f1 handover->b force r1",
        ],
    );
}

#[test]
fn resolve_split_brain_a_standing_by_loser_discards_at_once() {
    let mut h = standby();
    h.expect(
        150,
        admin("r1", resolve("b")),
        &[
            "event Warning SplitBrainResolved",
            "resolve data discard",
            "result r1 Succeeded",
            "persist e1 f1 peer#3 done=r1",
        ],
    );
}

#[test]
fn resolve_split_brain_the_winner_keeps_its_data_and_takes_over() {
    let mut h = standby();
    h.expect(
        150,
        admin("r1", resolve("a")),
        &[
            "resolve data keep",
            "event Warning SplitBrainResolved",
            "result r1 Pending",
            "event Normal Promoting",
            "witness #1 Acquire e2 800ms",
            "persist e1 f2 peer#3",
            "hb #3 Promoting e1 f2 takeover force r1",
        ],
    );
}

#[test]
fn maintenance_freezes_automatic_actions_until_switched_off() {
    let mut h = standby();
    h.expect(
        150,
        admin("m1", maintenance(true)),
        &["event Normal Maintenance", "result m1 Succeeded", "persist e1 f1 peer#3 maintenance=true done=m1"],
    );
    // The primary dies: no failover while frozen.
    h.expect(1050, tick(), &["event Warning PeerLost", "hb #3 Standby e1 f1 maintenance grant 3#1 800ms"]);
    h.expect(
        1100,
        admin("m2", maintenance(false)),
        &[
            "event Normal Maintenance",
            "result m2 Succeeded",
            "event Warning Promoting",
            "witness #1 Acquire e2 800ms",
            "persist e1 f2 peer#3 maintenance=false done=m1,m2",
            "hb #4 Promoting e1 f2",
        ],
    );
}

#[test]
fn maintenance_freezes_local_restarts_but_not_self_fencing() {
    let mut h = primary();
    h.step(390, admin("m1", maintenance(true)));
    h.expect(
        400,
        crate::engine::Event::StepCheck { step: 1, healthy: false, message: None },
        &["event Warning StepFailed", "event Warning FailoverBlocked"],
    );
    // b stops acknowledging: the lease (until 1173 ms) still fences a at 973 ms.
    h.expect(
        973,
        tick(),
        &["event Warning SelfFenced", "remove-vip 2:svc", "hb #6 Fenced e1 f1 holding maintenance Degraded"],
    );
}

#[test]
fn action_ids_are_handled_once_and_bad_ones_refused() {
    let mut h = standby();
    h.expect(
        150,
        admin("m1", maintenance(true)),
        &["event Normal Maintenance", "result m1 Succeeded", "persist e1 f1 peer#3 maintenance=true done=m1"],
    );
    h.expect(160, admin("m1", maintenance(false)), &[]);
    h.expect(170, admin("", maintenance(false)), &["event Warning ActionRejected"]);
    let long = "x".repeat(200);
    let got = h.step(180, admin(&long, maintenance(false)));
    assert_eq!(got[0], "event Warning ActionRejected");
    assert!(got[1].starts_with(&format!("result {} Rejected", "x".repeat(128))), "{got:?}");
}

#[test]
fn actions_arrive_inside_the_config_too() {
    let mut cfg = setup("").config();
    cfg.actions.push(hapair_crds::nodeapi::AdminAction { id: "m1".into(), kind: maintenance(true) });
    let mut h = H::standby("");
    h.expect(
        150,
        crate::engine::Event::Config(Box::new(cfg)),
        &[
            "event Normal ConfigApplied",
            "event Normal Maintenance",
            "result m1 Succeeded",
            "persist e0 f0 peer#0 maintenance=true done=m1",
            "hb #2 Standby e0 f0 maintenance",
        ],
    );
}

fn verify(volume: &str) -> AdminActionKind {
    AdminActionKind::Verify { volume: volume.into() }
}

fn verify_started(action: &str, result: Result<(), String>) -> Event {
    Event::VerifyStarted { action: action.into(), volume: "data".into(), result }
}

#[test]
fn verify_on_the_serving_node_starts_the_replicas_verify_and_succeeds_once_it_runs() {
    let mut h = primary();
    h.expect(400, admin("v1", verify("data")), &["verify data v1", "result v1 Pending"]);
    h.expect(
        410,
        verify_started("v1", Ok(())),
        &["event Normal Verify", "result v1 Succeeded", "persist e1 f1 peer#3 done=v1"],
    );
    // A second answer for a finished action changes nothing.
    h.expect(420, verify_started("v1", Ok(())), &[]);
}

#[test]
fn verify_refused_by_the_replica_fails_the_action() {
    let mut h = primary();
    h.expect(400, admin("v1", verify("data")), &["verify data v1", "result v1 Pending"]);
    h.expect(
        410,
        verify_started("v1", Err("the replicas are not in sync yet".into())),
        &["event Warning ActionFailed", "result v1 Failed", "persist e1 f1 peer#3 done=v1"],
    );
}

#[test]
fn verify_on_the_standby_defers_to_the_serving_peer() {
    let mut h = standby();
    h.expect(150, admin("v1", verify("data")), &["result v1 Succeeded", "persist e1 f1 peer#3 done=v1"]);
}

#[test]
fn verify_of_a_volume_outside_the_flow_or_with_no_node_serving_is_refused() {
    let mut h = standby();
    h.expect(
        150,
        admin("v1", verify("logs")),
        &["event Warning ActionRejected", "result v1 Rejected", "persist e1 f1 peer#3 done=v1"],
    );
    let mut alone = H::standby("");
    alone.expect(
        50,
        admin("v2", verify("data")),
        &["event Warning ActionRejected", "result v2 Rejected", "persist e0 f0 peer#0 done=v2"],
    );
}
