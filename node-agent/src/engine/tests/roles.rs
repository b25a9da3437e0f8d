//! Role transitions: startup, granting, failover through the witness, peer consent,
//! serving, self-fencing, stepping down, refusals, restarts, monitors, failback.

use std::time::Duration;

use hapair_crds::hagroup::{NodeHealth, NodeRole};
use hapair_crds::nodeapi::StepState;
use hapair_crds::volume::DiskState;

use super::*;
use crate::engine::{Event, PersistedState, Role, StepOp, WitnessAnswer};

/// A standby that heard primary `b` in epoch 1 at 50 ms and granted its heartbeat at
/// 100 ms (so it promised not to act before 50 + 808 = 858 ms).
fn granting(extra: &str) -> H {
    granting_with(setup(extra))
}

fn granting_with(setup: Setup) -> H {
    let mut h = setup.standby();
    h.expect(50, peer(1, Role::Primary, 1).event(), &["event Normal PeerFound", "persist e1 f1 peer#3"]);
    h.expect(100, tick(), &["hb #2 Standby e1 f1 grant 3#1 800ms"]);
    h
}

/// `granting`, then the primary falls silent: at 1050 ms the standby becomes a witness
/// candidate proposing epoch 2, and at 1060 ms the witness grants it: it acts.
fn failed_over(extra: &str) -> H {
    failed_over_with(setup(extra))
}

fn failed_over_with(setup: Setup) -> H {
    let mut h = granting_with(setup);
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
            "promote data e2",
            "hb #4 Promoting e2 f2 holding",
        ],
    );
    h
}

/// `failed_over` with the flow up at 1073 ms: primary in epoch 2 on a witness lease
/// until 1850 ms.
fn serving(extra: &str) -> H {
    serving_with(setup(extra))
}

fn serving_with(setup: Setup) -> H {
    let mut h = failed_over_with(setup);
    h.flow_up(1070, &["event Normal Promoted", "hb #5 Primary e2 f2 holding"]);
    h
}

/// `serving`, and `b` restarted (incarnation 4) as a standby acknowledging heartbeat #5
/// at 1080 ms: peer lease until 1873 ms.
fn serving_with_standby(extra: &str) -> H {
    serving_with_standby_from(setup(extra))
}

fn serving_with_standby_from(setup: Setup) -> H {
    let mut h = serving_with(setup);
    h.expect(
        1080,
        peer(1, Role::Standby, 2).incarnation(4).grant(5).event(),
        &["event Normal PeerRestarted", "watchdog 1873ms", "event Normal PeerFound", "persist e2 f2 peer#4"],
    );
    h
}

#[test]
fn startup_brings_everything_down_vip_first() {
    let mut h = H::new("");
    // The disk state is not known yet either.
    assert_eq!(h.startup, ["remove-vip 2:svc", "hb #1 Standby e0 f0 holding Unknown"]);
    assert!(h.e.holding());
    h.expect(1, stop_done(2), &["stop 1:app"]);
    h.expect(2, stop_done(1), &["stop 0:data"]);
    h.expect(3, stop_done(0), &["demote data"]);
    // A previous run may have left the watchdog armed: disarmed once everything is down.
    h.expect(4, demote_done(), &["watchdog off"]);
    assert!(!h.e.holding());
    h.expect(100, tick(), &["hb #2 Standby e0 f0 Unknown"]);
}

#[test]
fn a_restarted_node_proposes_above_its_persisted_floor() {
    let state = PersistedState { epoch: 4, floor: 6, peer_incarnation: 3, ..PersistedState::default() };
    let mut h = setup("").state(state).standby();
    // Nothing heard since the start: after deadAfter, a witness candidate above floor 6.
    h.expect(
        1000,
        tick(),
        &["event Warning Promoting", "witness #1 Acquire e7 800ms", "persist e4 f7 peer#3", "hb #2 Promoting e4 f7"],
    );
}

#[test]
fn standby_grants_the_primary_a_lease_from_its_heartbeat() {
    let mut h = granting("");
    // Re-acknowledging the same heartbeat moves neither the lease nor the promise.
    h.expect(200, tick(), &["hb #3 Standby e1 f1 grant 3#1 800ms"]);
    h.expect(250, peer(2, Role::Primary, 1).event(), &[]);
    h.expect(300, tick(), &["hb #4 Standby e1 f1 grant 3#2 800ms"]);
}

#[test]
fn heartbeats_from_an_older_epoch_are_refused() {
    let state = PersistedState { epoch: 5, floor: 5, peer_incarnation: 3, ..PersistedState::default() };
    let mut h = setup("").state(state).standby();
    h.expect(50, peer(1, Role::Primary, 4).event(), &["event Warning StaleEpoch", "event Normal PeerFound"]);
    // No grant for a primary of an older epoch.
    h.expect(100, tick(), &["hb #2 Standby e5 f5"]);
}

#[test]
fn standby_grants_nothing_to_a_standby_peer() {
    let mut h = H::standby("");
    h.expect(50, peer(1, Role::Standby, 0).event(), &["event Normal PeerFound", "persist e0 f0 peer#3"]);
    h.expect(100, tick(), &["hb #2 Standby e0 f0"]);
}

#[test]
fn failover_needs_silence_the_witness_and_the_promise() {
    let mut h = failed_over("");
    h.flow_up(1070, &["event Normal Promoted", "hb #5 Primary e2 f2 holding"]);
    let status = h.e.status(at(1073));
    assert!(status.serving);
    assert_eq!((status.epoch, status.report_role), (2, NodeRole::Primary));
    assert_eq!(status.watchdog, Some(at(1850)));
    assert_eq!(status.witness_lease_until, Some(at(1850)));
    assert_eq!(status.last_failover.map(|f| (f.reason, f.took.as_millis())), Some(("failover".to_string(), 23)));
}

#[test]
fn a_failover_records_when_each_phase_ended_from_the_last_heartbeat_heard() {
    let mut h = failed_over("");
    h.flow_up(1070, &["event Normal Promoted", "hb #5 Primary e2 f2 holding"]);
    let failover = h.e.status(at(1073)).last_failover.unwrap_or_else(|| panic!("no failover recorded"));
    let phases: Vec<(String, u128)> = failover.phases.into_iter().map(|p| (p.phase, p.after.as_millis())).collect();
    // Last heard at 50 ms; the grant to the old primary (800 ms from that heartbeat,
    // stretched by the 1 % drift bound) ran out before the silence was noticed.
    let expected = [
        ("old lease ended", 808),
        ("link 0 silent", 1000),
        ("silence detected", 1000),
        ("witness lease requested", 1000),
        ("witness lease granted", 1010),
        ("term taken", 1010),
        ("volume data promoted", 1020),
        ("step data attached and mounted", 1021),
        ("step app started", 1022),
        ("step svc-ip VIP added, first ARP/NA sent", 1023),
        ("serving", 1023),
    ];
    let expected: Vec<(String, u128)> = expected.iter().map(|(p, ms)| (p.to_string(), *ms)).collect();
    assert_eq!(phases, expected);
}

#[test]
fn a_checked_steps_first_passing_check_after_serving_joins_the_failovers_phases() {
    let mut h = failed_over("");
    h.flow_up(1070, &["event Normal Promoted", "hb #5 Primary e2 f2 holding"]);
    let check = |healthy| Event::StepCheck { step: 1, healthy, message: None };
    let phases = |h: &H| -> Vec<(String, u128)> {
        let f = h.e.status(at(1200)).last_failover.unwrap_or_else(|| panic!("no failover recorded"));
        f.phases.into_iter().map(|p| (p.phase, p.after.as_millis())).collect()
    };
    let before = phases(&h);
    assert_eq!(before.last().map(|(p, _)| p.as_str()), Some("serving"));
    // The threshold is 1, so a failed check fails the step; only a pass is a phase.
    h.step(1100, check(true));
    h.step(1150, check(true));
    let after = phases(&h);
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    // Last heartbeat at 50 ms: the first pass, at 1100 ms, ended 1050 ms into the failover.
    assert_eq!(after.last(), Some(&("step app first healthy".to_string(), 1050)));
    assert_eq!(after[..before.len()], before[..]);
}

#[test]
fn no_candidacy_while_the_primary_is_heard_on_any_link() {
    let mut h = granting("");
    for (i, t) in (150..1550).step_by(100).enumerate() {
        h.step(t, peer(2 + i as u64, Role::Primary, 1).event());
    }
    h.expect(1600, tick(), &["hb #16 Standby e1 f1 grant 3#15 800ms"]);
    assert_eq!(h.e.role(), Role::Standby);
}

#[test]
fn a_standby_that_is_not_up_to_date_never_promotes_by_itself() {
    let mut h = granting("");
    h.expect(500, volume(DiskState::Inconsistent), &["hb #3 Standby e1 f1 Inconsistent grant 3#1 800ms"]);
    h.expect(1050, tick(), &["event Warning PeerLost", "hb #4 Standby e1 f1 Inconsistent grant 3#1 800ms"]);
    let status = h.e.status(at(1050));
    assert_eq!(status.role, Role::Standby);
    assert!(status.role_reason.contains("disk Inconsistent"), "{}", status.role_reason);
    // Back in sync, it is eligible again.
    h.expect(
        1100,
        volume(DiskState::UpToDate),
        &["event Warning Promoting", "witness #1 Acquire e2 800ms", "persist e1 f2 peer#3", "hb #5 Promoting e1 f2"],
    );
}

#[test]
fn a_failed_failover_monitor_keeps_a_standby_from_promoting() {
    let mut h = granting("");
    let gw = |healthy| Event::Probe { monitor: "gw".into(), healthy, message: None };
    h.expect(300, gw(false), &["hb #3 Standby e1 f1 grant 3#1 800ms"]);
    h.expect(400, gw(false), &["event Warning ProbeFailed", "hb #4 Standby e1 f1 Failed grant 3#1 800ms"]);
    h.expect(1050, tick(), &["event Warning PeerLost", "hb #5 Standby e1 f1 Failed grant 3#1 800ms"]);
    h.expect(
        1060,
        gw(true),
        &[
            "event Normal ProbeRecovered",
            "event Warning Promoting",
            "witness #1 Acquire e2 800ms",
            "persist e1 f2 peer#3",
            "hb #6 Promoting e1 f2",
        ],
    );
}

#[test]
fn a_witness_denial_is_retried_after_the_delay_it_asks_for() {
    let mut h = granting("");
    h.step(1050, tick());
    h.expect(1060, witness(1, denied("b")), &["event Normal WitnessDenied"]);
    assert!(h.e.status(at(1060)).role_reason.contains("held by b"));
    h.expect(1150, tick(), &["hb #4 Promoting e1 f2"]);
    // retry_after 300 ms: the next request goes out at 1360 ms, not before.
    h.expect(1359, tick(), &["hb #5 Promoting e1 f2"]);
    h.expect(1360, tick(), &["witness #2 Acquire e2 800ms"]);
    // Denied again: noted once per candidacy.
    h.expect(1370, witness(2, denied("b")), &[]);
}

#[test]
fn a_witness_timeout_is_retried_at_once_and_a_failure_after_an_interval() {
    let mut h = granting("");
    h.step(1050, tick());
    // The first failure is an event and the reason the node is not serving...
    h.expect(
        1100,
        Event::Witness { request_id: 1, answer: WitnessAnswer::Timeout },
        &["event Warning WitnessUnreachable", "witness #2 Acquire e2 800ms"],
    );
    assert_eq!(h.e.status(at(1100)).role_reason, "waiting for witness: witness unreachable: no answer in time");
    // ...noted once per candidacy, the reason kept current. A refusal is quick, so the
    // next request waits one heartbeat interval (100 ms).
    h.expect(
        1150,
        Event::Witness { request_id: 2, answer: WitnessAnswer::Failed("connection refused".into()) },
        &["hb #4 Promoting e1 f2"],
    );
    assert_eq!(h.e.status(at(1150)).role_reason, "waiting for witness: witness unreachable: connection refused");
    h.expect(1249, tick(), &[]);
    h.expect(1250, tick(), &["witness #3 Acquire e2 800ms", "hb #5 Promoting e1 f2"]);
    // Without any answer, the engine gives up on a request after L/2 and asks again.
    h.expect(1650, tick(), &["witness #4 Acquire e2 800ms", "hb #6 Promoting e1 f2"]);
}

#[test]
fn a_candidate_abandons_when_the_serving_peer_returns_before_acting() {
    let mut h = granting("");
    h.step(1050, tick());
    // The primary is back: a stops being a candidate, gives back whatever the witness may
    // grant for its proposal, and grants the primary again.
    h.expect(
        1060,
        peer(2, Role::Primary, 1).event(),
        &[
            "event Normal PeerFound",
            "witness #2 Release e2 800ms",
            "event Normal Candidacy",
            "hb #4 Standby e1 f2 grant 3#2 800ms",
        ],
    );
    // The grant for the forgotten request arrives anyway: handed straight back.
    h.expect(1070, witness(1, granted(2)), &["witness #3 Release e2 800ms"]);
}

#[test]
fn once_acting_a_stale_primary_is_refused() {
    let mut h = failed_over("");
    h.expect(1065, peer(2, Role::Primary, 1).event(), &["event Warning StaleEpoch", "event Normal PeerFound"]);
    assert_eq!(h.e.role(), Role::Promoting);
}

#[test]
fn a_serving_node_renews_with_the_witness_and_fences_itself_in_time() {
    let mut h = serving("");
    h.expect(1300, tick(), &["hb #6 Primary e2 f2 holding"]);
    // Witness lease until 1850 ms, renewed once less than 2L/3 (533 ms) is left.
    h.expect(1317, tick(), &["witness #2 Renew e2 800ms"]);
    h.expect(1320, witness(2, granted(2)), &["watchdog 2117ms"]);
    // No answers any more: renewed at 1584 ms; fenced at 2117 - 200 = 1917 ms, VIP first,
    // the watchdog left at 2117 ms.
    h.expect(1584, tick(), &["witness #3 Renew e2 800ms", "hb #7 Primary e2 f2 holding"]);
    h.expect(1917, tick(), &["event Warning SelfFenced", "remove-vip 2:svc", "hb #8 Fenced e2 f2 holding"]);
    assert_eq!(h.e.status(at(1917)).watchdog, Some(at(2117)));
    // Everything down at 1923 ms: the witness lease is given back, the watchdog disarmed;
    // the peer is still silent, so it tries the witness again for a new term.
    h.flow_down(
        1920,
        &[
            "witness #4 Release e2 800ms",
            "watchdog off",
            "event Warning Promoting",
            "witness #5 Acquire e3 800ms",
            "persist e2 f3 peer#3",
            "hb #9 Promoting e2 f3",
        ],
    );
}

#[test]
fn a_fenced_node_stands_by_once_it_hears_its_peer() {
    let mut h = serving("");
    h.expect(1650, tick(), &["event Warning SelfFenced", "remove-vip 2:svc", "hb #6 Fenced e2 f2 holding"]);
    h.expect(1660, peer(2, Role::Primary, 3).event(), &["event Normal PeerFound", "persist e3 f3 peer#3"]);
    // Down at 1664 ms: the witness lease (until 1850 ms) is given back for the peer.
    h.flow_down(1661, &["witness #2 Release e2 800ms", "watchdog off", "hb #7 Standby e3 f3 grant 3#2 800ms"]);
}

#[test]
fn after_a_stall_the_lease_is_checked_before_anything_else() {
    let mut h = serving("");
    // The process stalls past its lease; the first event after it is an acknowledgement
    // from the peer, which must not revive the lease.
    h.expect(
        1900,
        peer(2, Role::Standby, 2).grant(5).event(),
        &["event Warning SelfFenced", "event Normal PeerFound", "remove-vip 2:svc", "hb #6 Fenced e2 f2 holding"],
    );
    assert_eq!(h.e.status(at(1900)).peer_lease_until, None);
}

#[test]
fn acknowledgements_extend_the_peer_lease_from_send_times_and_move_the_watchdog() {
    let mut h = serving_with_standby("");
    h.expect(1173, tick(), &["hb #6 Primary e2 f2 holding"]);
    h.expect(1180, peer(2, Role::Standby, 2).incarnation(4).grant(6).event(), &["watchdog 1973ms"]);
    // A late acknowledgement of an older heartbeat moves nothing.
    h.expect(1190, peer(3, Role::Standby, 2).incarnation(4).grant(5).event(), &[]);
    // An acknowledgement for another incarnation of a moves nothing either.
    let mut other = peer(4, Role::Standby, 2).incarnation(4).grant(6);
    other.0.grant = other.0.grant.map(|g| crate::engine::LeaseGrant { incarnation: 6, ..g });
    h.expect(1195, other.event(), &[]);
    assert_eq!(h.e.status(at(1195)).peer_lease_until, Some(at(1973)));
}

#[test]
fn a_primary_steps_down_for_a_peer_serving_in_a_newer_epoch() {
    let mut h = serving("");
    h.expect(
        1100,
        peer(2, Role::Primary, 3).event(),
        &[
            "event Warning NewerPrimary",
            "event Normal Demoting",
            "event Normal PeerFound",
            "remove-vip 2:svc",
            "persist e3 f3 peer#3",
            "hb #6 Demoting e3 f3 holding",
        ],
    );
    // Down: the witness lease goes back, and the new primary gets a's grant.
    h.flow_down(
        1101,
        &["witness #2 Release e2 800ms", "watchdog off", "event Normal Demoted", "hb #7 Standby e3 f3 grant 3#2 800ms"],
    );
}

/// After a partition without a witness both nodes served; the old primary learns the
/// newer epoch from this node's heartbeat and demotes in it. Its heartbeats (same epoch,
/// still holding, Demoting) must not make this node yield as well, even though the peer
/// outranks it: only a peer acting as Primary or Promoting in the same epoch does.
#[test]
fn a_demoting_peer_in_the_same_epoch_is_no_rival() {
    let mut h = serving_with(setup("").prefer_b());
    h.expect(1100, peer(2, Role::Demoting, 2).event(), &["event Normal PeerFound"]);
    assert_eq!(h.e.status(at(1100)).role, Role::Primary);
    h.expect(
        1110,
        peer(3, Role::Primary, 2).event(),
        &["event Warning NewerPrimary", "event Normal Demoting", "remove-vip 2:svc", "hb #6 Demoting e2 f2 holding"],
    );
}

#[test]
fn bootstrap_by_peer_consent_when_both_stand_by() {
    let mut h = H::standby("");
    h.expect(50, peer(1, Role::Standby, 0).event(), &["event Normal PeerFound", "persist e0 f0 peer#3"]);
    h.expect(340, peer(2, Role::Standby, 0).event(), &["hb #2 Standby e0 f0"]);
    // Both stood by for 3 intervals; a (smaller name, nobody preferred) proposes epoch 1.
    h.expect(350, tick(), &["event Normal Promoting", "persist e0 f1 peer#3", "hb #3 Promoting e0 f1"]);
    // b consents by acknowledging heartbeat #3 (its floor is now 1).
    h.expect(
        360,
        peer(3, Role::Standby, 0).floor(1).grant(3).event(),
        &[
            "event Normal Acting",
            "watchdog 1150ms",
            "persist e1 f1 peer#3",
            "promote data e1",
            "hb #4 Promoting e1 f1 holding",
        ],
    );
    h.flow_up(370, &["event Normal Promoted", "hb #5 Primary e1 f1 holding"]);
}

#[test]
fn bootstrap_is_left_to_a_preferred_peer_which_gets_the_grant() {
    let mut h = setup("").prefer_b().standby();
    h.step(50, peer(1, Role::Standby, 0).event());
    h.expect(400, peer(2, Role::Standby, 0).event(), &["hb #2 Standby e0 f0"]);
    h.expect(500, tick(), &["hb #3 Standby e0 f0"]);
    // The preferred peer proposes epoch 1: a's floor rises to it, durably, before the grant.
    h.expect(510, peer(3, Role::Promoting, 0).floor(1).event(), &[]);
    h.expect(600, tick(), &["persist e0 f1 peer#3", "hb #4 Standby e0 f1 grant 3#3 800ms"]);
}

#[test]
fn a_standby_refuses_a_proposal_at_or_below_its_floor() {
    let state = PersistedState { epoch: 2, floor: 4, peer_incarnation: 3, ..PersistedState::default() };
    let mut h = setup("").state(state).standby();
    h.step(50, peer(1, Role::Promoting, 2).floor(4).event());
    h.expect(100, tick(), &["hb #2 Standby e2 f4"]);
    h.expect(150, peer(2, Role::Promoting, 2).floor(5).event(), &[]);
    h.expect(200, tick(), &["persist e2 f5 peer#3", "hb #3 Standby e2 f5 grant 3#2 800ms"]);
}

#[test]
fn a_candidate_proposes_again_above_a_floor_it_learns() {
    let mut h = H::standby("");
    h.step(50, peer(1, Role::Standby, 0).event());
    h.step(340, peer(2, Role::Standby, 0).event());
    h.expect(350, tick(), &["event Normal Promoting", "persist e0 f1 peer#3", "hb #3 Promoting e0 f1"]);
    // b had promised epoch 3 elsewhere: a proposes 4, and a grant of its old proposal
    // counts for nothing.
    h.expect(
        360,
        peer(3, Role::Standby, 0).floor(3).grant(3).event(),
        &["persist e0 f4 peer#3", "hb #4 Promoting e0 f4"],
    );
    h.expect(
        370,
        peer(4, Role::Standby, 0).floor(4).grant(4).event(),
        &[
            "event Normal Acting",
            "watchdog 1160ms",
            "persist e4 f4 peer#3",
            "promote data e4",
            "hb #5 Promoting e4 f4 holding",
        ],
    );
}

#[test]
fn of_two_candidates_the_lower_ranked_backs_off() {
    let mut h = setup("").prefer_b().standby();
    h.expect(
        1000,
        tick(),
        &["event Warning Promoting", "witness #1 Acquire e1 800ms", "persist e0 f1 peer#0", "hb #2 Promoting e0 f1"],
    );
    // b, preferred, is a candidate too: a backs off and gives back what it asked for.
    h.expect(
        1010,
        peer(1, Role::Promoting, 0).floor(1).event(),
        &[
            "event Normal PeerFound",
            "witness #2 Release e1 800ms",
            "event Normal Candidacy",
            "persist e0 f1 peer#3",
            "hb #3 Standby e0 f1",
        ],
    );
}

#[test]
fn a_handover_waits_until_the_target_is_in_sync() {
    let mut h = H::standby("");
    h.step(20, volume(DiskState::Inconsistent));
    h.expect(
        50,
        peer(1, Role::Standby, 1).handover(None, false).event(),
        &["event Normal PeerFound", "persist e1 f1 peer#3"],
    );
    h.expect(100, tick(), &["hb #2 Standby e1 f1 Inconsistent"]);
    assert!(h.e.status(at(100)).role_reason.contains("waiting for local data"));
    // In sync: it takes the offer and proposes epoch 2.
    h.expect(
        150,
        volume(DiskState::UpToDate),
        &["event Normal Promoting", "persist e1 f2 peer#3", "hb #3 Promoting e1 f2"],
    );
}

#[test]
fn witness_mode_none_promotes_on_silence_alone_without_a_watchdog() {
    let mut h = granting("witness: {mode: none}\n");
    h.expect(
        1050,
        tick(),
        &[
            "event Warning PeerLost",
            "event Warning Promoting",
            "event Normal Acting",
            "persist e2 f2 peer#3",
            "promote data e2",
            "hb #3 Promoting e2 f2 holding",
        ],
    );
    h.flow_up(1060, &["event Normal Promoted", "hb #4 Primary e2 f2 holding"]);
    // No lease to lose: still serving long after.
    h.expect(5000, tick(), &["hb #5 Primary e2 f2 holding"]);
    assert_eq!(h.e.status(at(5000)).watchdog, None);
}

#[test]
fn without_witness_two_primaries_in_one_epoch_end_with_the_lower_ranked_stepping_down() {
    let mut h = granting_with(setup("witness: {mode: none}\n").prefer_b());
    h.step(1050, tick());
    h.flow_up(1060, &["event Normal Promoted", "hb #4 Primary e2 f2 holding"]);
    h.expect(
        2000,
        peer(5, Role::Primary, 2).event(),
        &[
            "event Warning NewerPrimary",
            "event Normal Demoting",
            "event Normal PeerFound",
            "remove-vip 2:svc",
            "hb #5 Demoting e2 f2 holding",
        ],
    );
}

#[test]
fn a_failed_step_is_restarted_locally_then_failed_over() {
    let mut h = serving_with_standby("");
    let check = |healthy| Event::StepCheck { step: 1, healthy, message: Some("exit 1".into()) };
    let restarted = || Event::StepDone { step: 1, op: StepOp::Restart, result: Ok(()) };
    h.expect(1100, check(false), &["event Warning StepFailed", "restart 1:app", "event Warning StepRestarted"]);
    h.expect(1110, restarted(), &[]);
    h.expect(1120, check(false), &["event Warning StepFailed", "restart 1:app", "event Warning StepRestarted"]);
    h.expect(1130, restarted(), &[]);
    // Third failure within a minute: past the limit (2); b stands by in sync, so a hands
    // the service over.
    h.expect(
        1140,
        check(false),
        &[
            "event Warning StepFailed",
            "event Warning StepFailed",
            "event Normal Demoting",
            "remove-vip 2:svc",
            "hb #6 Demoting e2 f2 holding Degraded",
        ],
    );
    h.flow_down(
        1141,
        &["witness #2 Release e2 800ms", "watchdog off", "event Normal Demoted", "hb #7 Standby e2 f2 handover->b"],
    );
    assert_eq!(h.e.status(at(1144)).steps[1].restarts, 2);
}

#[test]
fn a_failed_check_while_stabilizing_restarts_the_clock_before_the_next_step() {
    // `app` must stay healthy for 200 ms before the virtual IP goes up; 3 failed checks in
    // a row fail it.
    let mut h = failed_over_with(setup("").app_stabilization(Duration::from_millis(200), 3));
    let check = |healthy| Event::StepCheck { step: 1, healthy, message: Some("exit 1".into()) };
    h.expect(1070, promote_done(), &["start 0:data"]);
    h.expect(1071, start_done(0), &["start 1:app"]);
    h.expect(1072, start_done(1), &[]);
    // A failure short of the threshold: healthy again only from 1150 + 200 ms.
    h.expect(1150, check(false), &[]);
    h.expect(1200, check(true), &["hb #5 Promoting e2 f2 holding"]);
    // Where the first period would have ended: still stabilizing.
    h.expect(1272, tick(), &[]);
    assert_eq!(h.e.status(at(1272)).steps[1].state, StepState::Stabilizing);
    assert_eq!(h.e.role(), Role::Promoting);
    h.expect(1349, tick(), &["witness #2 Renew e2 800ms", "hb #6 Promoting e2 f2 holding"]);
    h.expect(1350, tick(), &["add-vip 2:svc"]);
    h.expect(1351, start_done(2), &["event Normal Promoted", "hb #7 Primary e2 f2 holding"]);
    assert_eq!(h.e.status(at(1351)).steps[1].state, StepState::Running);
}

#[test]
fn a_step_that_fails_to_start_is_restarted() {
    let mut h = failed_over("");
    h.expect(1070, promote_done(), &["start 0:data"]);
    h.expect(
        1071,
        Event::StepDone { step: 0, op: StepOp::Start, result: Err("mount failed".into()) },
        &["event Warning StepFailed", "restart 0:data", "event Warning StepRestarted"],
    );
    h.expect(1072, Event::StepDone { step: 0, op: StepOp::Restart, result: Ok(()) }, &["start 1:app"]);
}

#[test]
fn monitors_restart_fail_over_or_alert() {
    let mut h = serving_with_standby("");
    let probe = |m: &str, healthy| Event::Probe { monitor: m.into(), healthy, message: Some("x".into()) };
    h.expect(1100, probe("log", false), &["event Warning ProbeFailed"]);
    h.expect(1110, probe("log", true), &["event Normal ProbeRecovered"]);
    h.expect(1120, probe("web", false), &["event Warning ProbeFailed", "restart 1:app", "event Warning StepRestarted"]);
    h.expect(1130, Event::StepDone { step: 1, op: StepOp::Restart, result: Ok(()) }, &[]);
    // gw fires after two failed observations: a failover to the ready peer.
    h.expect(1140, probe("gw", false), &[]);
    h.expect(
        1150,
        probe("gw", false),
        &[
            "event Warning ProbeFailed",
            "event Warning StepFailed",
            "event Normal Demoting",
            "remove-vip 2:svc",
            "hb #6 Demoting e2 f2 holding Failed",
        ],
    );
}

#[test]
fn a_wanted_failover_waits_for_a_ready_peer_and_ends_when_the_monitor_recovers() {
    let mut h = serving("");
    let probe = |healthy| Event::Probe { monitor: "gw".into(), healthy, message: None };
    h.step(1100, probe(false));
    // The peer is not reachable: nothing to fail over to.
    h.expect(
        1110,
        probe(false),
        &["event Warning ProbeFailed", "event Warning StepFailed", "event Warning FailoverBlocked"],
    );
    assert_eq!(h.e.status(at(1110)).health, NodeHealth::Failed);
    h.expect(1120, probe(true), &["event Normal ProbeRecovered"]);
    assert_eq!(h.e.status(at(1120)).health, NodeHealth::Healthy);
    assert_eq!(h.e.role(), Role::Primary);
}

#[test]
fn failback_auto_hands_back_after_the_stabilization_time() {
    let mut h = serving_with_standby_from(setup("failback: {mode: auto, stabilization: 2s}\n").prefer_b());
    // b stands by, healthy, in sync from 1080 ms on, acknowledging every heartbeat.
    for (i, t) in (1180..3080).step_by(100).enumerate() {
        h.step(t - 7, tick());
        let sent = h.sent;
        h.step(t, peer(2 + i as u64, Role::Standby, 2).incarnation(4).grant(sent).event());
    }
    h.expect(3073, tick(), &["hb #25 Primary e2 f2 holding"]);
    h.expect(3080, tick(), &["event Normal Failback", "remove-vip 2:svc", "hb #26 Demoting e2 f2 holding"]);
    // The witness lease of the failover ran out long ago: nothing to give back.
    h.flow_down(3081, &["watchdog off", "event Normal Demoted", "hb #27 Standby e2 f2 handover->b"]);
}

#[test]
fn maintenance_in_the_spec_freezes_automatic_promotion() {
    let mut h = H::standby("maintenance: true\n");
    h.expect(50, peer(1, Role::Primary, 1).event(), &["event Normal PeerFound", "persist e1 f1 peer#3"]);
    h.expect(100, tick(), &["hb #2 Standby e1 f1 maintenance grant 3#1 800ms"]);
    h.expect(1050, tick(), &["event Warning PeerLost", "hb #3 Standby e1 f1 maintenance grant 3#1 800ms"]);
    let status = h.e.status(at(1050));
    assert_eq!((status.role, status.report_role), (Role::Standby, NodeRole::Maintenance));
    assert!(status.role_reason.contains("maintenance"));
}

#[test]
fn next_deadline_is_the_next_decision() {
    let mut h = granting("");
    assert_eq!(h.e.next_deadline(), at(200));
    h.step(1000, tick());
    // The primary counts as dead at 50 + 1000 ms, before the next heartbeat at 1100 ms.
    assert_eq!(h.e.next_deadline(), at(1050));
    h.step(1050, tick());
    // Next: the heartbeat at 1150 ms (the witness request times out at 1450 ms).
    assert_eq!(h.e.next_deadline(), at(1150));
}

#[test]
fn a_refused_volume_promotion_abandons_the_promotion() {
    let mut h = failed_over("");
    h.expect(
        1070,
        Event::VolumeDone {
            volume: "data".into(),
            op: crate::engine::VolumeOp::Promote,
            result: Err("not UpToDate".into()),
        },
        &["event Warning StepFailed", "event Normal Demoting", "demote data", "hb #5 Demoting e2 f2 holding"],
    );
    h.expect(
        1075,
        demote_done(),
        &["witness #2 Release e2 800ms", "watchdog off", "event Normal Demoted", "hb #6 Standby e2 f2"],
    );
    // No immediate retry: the next automatic candidacy waits deadAfter (or a new volume
    // state).
    h.expect(1500, tick(), &["hb #7 Standby e2 f2"]);
    assert!(h.e.status(at(1500)).role_reason.contains("refused promotion"));
    h.expect(
        2070,
        tick(),
        &["event Warning Promoting", "witness #3 Acquire e3 800ms", "persist e2 f3 peer#3", "hb #8 Promoting e2 f3"],
    );
}

#[test]
fn a_demotion_that_outlives_its_lease_becomes_a_fence() {
    let mut h = serving_with_standby("");
    // A failover is wanted; b is ready: a starts demoting while its lease runs to 1873 ms.
    let probe = |healthy| Event::Probe { monitor: "gw".into(), healthy, message: None };
    h.step(1090, probe(false));
    h.expect(
        1100,
        probe(false),
        &[
            "event Warning ProbeFailed",
            "event Warning StepFailed",
            "event Normal Demoting",
            "remove-vip 2:svc",
            "hb #6 Demoting e2 f2 holding Failed",
        ],
    );
    h.expect(1101, stop_done(2), &["stop 1:app"]);
    // The application takes its time stopping and b stops acknowledging: at 1873 - 200 ms
    // the demotion turns into a fence, the watchdog left at the lease's end.
    h.expect(1673, tick(), &["event Warning SelfFenced", "hb #7 Fenced e2 f2 holding Failed"]);
    assert_eq!(h.e.status(at(1673)).watchdog, Some(at(1873)));
    h.expect(1700, stop_done(1), &["stop 0:data"]);
}

#[test]
fn a_step_that_fails_to_stop_leaves_the_watchdog_armed() {
    let mut h = serving("");
    h.expect(1650, tick(), &["event Warning SelfFenced", "remove-vip 2:svc", "hb #6 Fenced e2 f2 holding"]);
    h.expect(1651, stop_done(2), &["stop 1:app"]);
    h.expect(
        1652,
        Event::StepDone { step: 1, op: StepOp::Stop, result: Err("still running after timeout".into()) },
        &["event Warning StopFailed", "stop 0:data"],
    );
    h.expect(1653, stop_done(0), &["demote data"]);
    // Nothing more to try: no disarm, so the machine is reset at the lease's end; the
    // witness lease is not given back early (the peer must not get it before the reset);
    // until then the node says it may hold resources, and grants nothing.
    h.expect(1654, demote_done(), &["event Warning StopFailed"]);
    let status = h.e.status(at(1654));
    assert_eq!((status.role, status.holding, status.watchdog), (Role::Fenced, true, Some(at(1850))));
    h.expect(1700, peer(2, Role::Primary, 3).event(), &["event Normal PeerFound", "persist e3 f3 peer#3"]);
    h.expect(1750, tick(), &["hb #7 Fenced e3 f3 holding Degraded"]);
    assert_eq!(h.e.role(), Role::Fenced);
}
