//! Inputs that must be filtered: replayed, duplicated or foreign heartbeats, stray
//! command results, bad or changed configs; and deleting a group.

use hapair_crds::nodeapi::{GroupKey, HeartbeatKey};

use super::*;
use crate::engine::{ConfigError, Engine, Event, Identity, Instant, Role, StepOp, VolumeOp};

fn two_links() -> Setup {
    setup("").links(2)
}

#[test]
fn replayed_duplicated_and_reordered_heartbeats_are_dropped() {
    let mut h = two_links().standby();
    h.expect(50, peer(5, Role::Primary, 1).event(), &["event Normal PeerFound", "persist e1 f1 peer#3"]);
    // The same heartbeat again on the same link, an older one, an older incarnation.
    h.expect(60, peer(5, Role::Primary, 1).event(), &[]);
    h.expect(70, peer(4, Role::Demoting, 1).event(), &[]);
    h.expect(80, peer(9, Role::Standby, 1).incarnation(2).event(), &[]);
    let status = h.e.status(at(80));
    assert_eq!(status.last_peer_heartbeat, Some(at(50)));
    assert!(!status.links[1].up);
    // The copy on the second link proves that link alive, and changes nothing else.
    h.expect(90, peer(5, Role::Primary, 1).on(1), &[]);
    let status = h.e.status(at(90));
    assert!(status.links[1].up);
    assert_eq!(status.last_peer_heartbeat, Some(at(90)));
    h.expect(100, tick(), &["hb #2 Standby e1 f1 grant 3#5 800ms"]);
}

#[test]
fn heartbeats_from_a_stranger_or_an_unknown_link_are_dropped() {
    let mut h = H::standby("");
    let mut stranger = peer(1, Role::Primary, 1);
    stranger.0.sender = "c".into();
    h.expect(50, stranger.event(), &[]);
    h.expect(60, peer(1, Role::Primary, 1).on(3), &[]);
    assert!(!h.e.status(at(60)).peer_reachable);
}

#[test]
fn a_new_peer_incarnation_is_noticed_and_remembered() {
    let mut h = H::standby("");
    h.step(50, peer(5, Role::Standby, 0).event());
    h.expect(
        60,
        peer(1, Role::Standby, 0).incarnation(4).event(),
        &["event Normal PeerRestarted", "persist e0 f0 peer#4"],
    );
}

#[test]
fn stray_results_are_ignored() {
    let mut h = H::standby("");
    h.expect(20, Event::StepDone { step: 1, op: StepOp::Stop, result: Err("late".into()) }, &[]);
    h.expect(21, Event::StepDone { step: 9, op: StepOp::Start, result: Ok(()) }, &[]);
    h.expect(22, Event::VolumeDone { volume: "other".into(), op: VolumeOp::Promote, result: Ok(()) }, &[]);
    // A grant nobody asked for is handed back, naming its epoch.
    h.expect(23, witness(42, granted(9)), &["witness #1 Release e9 800ms"]);
    assert!(!h.e.holding());
}

#[test]
fn a_config_that_fails_validation_is_refused_whole() {
    let mut h = H::standby("");
    let bad = setup("heartbeat: {interval: 100ms, deadAfter: 1s, leaseTTL: 2s}\n").config_unchecked();
    h.expect(20, Event::Config(Box::new(bad)), &["event Warning ConfigRejected"]);
    let mut other = setup("").config();
    other.key = GroupKey::new("ns", "other");
    h.expect(30, Event::Config(Box::new(other)), &["event Warning ConfigRejected"]);
    assert_eq!(h.e.config().timing.lease_ttl, std::time::Duration::from_millis(800));
}

/// The flow without its `app` step (and the monitor restarting it).
fn without_app() -> hapair_crds::nodeapi::GroupConfig {
    let mut c = setup("").config();
    c.spec.flow.remove(1);
    c.spec.monitors.retain(|m| m.restart_step.is_none());
    c
}

/// a serves in epoch 1 (bootstrap by consent), flow up at 373 ms.
fn primary() -> H {
    let mut h = H::standby("");
    h.step(50, peer(1, Role::Standby, 0).event());
    h.step(340, peer(2, Role::Standby, 0).event());
    h.step(350, tick());
    h.step(360, peer(3, Role::Standby, 0).floor(1).grant(3).event());
    h.flow_up(370, &["event Normal Promoted", "hb #5 Primary e1 f1 holding"]);
    h
}

#[test]
fn a_flow_change_waits_until_the_flow_is_down() {
    let mut h = primary();
    let shorter = without_app();
    h.expect(380, Event::Config(Box::new(shorter)), &["event Normal ConfigApplied"]);
    // Still running (and stopping) what was started.
    assert_eq!(h.e.status(at(380)).steps.len(), 3);
    h.expect(
        390,
        peer(4, Role::Primary, 2).event(),
        &[
            "event Warning NewerPrimary",
            "event Normal Demoting",
            "remove-vip 2:svc",
            "persist e2 f2 peer#3",
            "hb #6 Demoting e2 f2 holding",
        ],
    );
    h.flow_down(400, &["watchdog off", "event Normal Demoted", "hb #7 Standby e2 f2 grant 3#4 800ms"]);
    assert_eq!(h.e.status(at(403)).steps.len(), 2);
}

#[test]
fn a_new_config_applies_its_timing_and_an_idle_flow_change_at_once() {
    let mut h = H::standby("");
    let faster = setup("heartbeat: {interval: 50ms, deadAfter: 500ms, leaseTTL: 400ms}\n").config();
    h.expect(20, Event::Config(Box::new(faster)), &["event Normal ConfigApplied"]);
    // The next heartbeat moves up to the new interval.
    assert_eq!(h.e.next_deadline(), at(70));
    // Standing by, nothing held: a changed flow applies at once.
    let shorter = without_app();
    h.expect(30, Event::Config(Box::new(shorter)), &["event Normal ConfigApplied"]);
    assert_eq!(h.e.status(at(30)).steps.len(), 2);
}

#[test]
fn engine_new_refuses_a_node_outside_the_group() {
    let identity = Identity { node: "c".into(), incarnation: 1 };
    let err = Engine::new(identity, &setup("").config(), None, Instant::ZERO).err();
    assert_eq!(err, Some(ConfigError::NotAMember { group: "ns/g".into(), node: "c".into() }));
}

#[test]
fn deleting_the_group_stops_a_serving_node_and_reports_it_clean() {
    let mut h = primary();
    let mut deleting = setup("").config();
    deleting.deleting = true;
    h.expect(
        400,
        Event::Config(Box::new(deleting)),
        &["event Normal ConfigApplied", "event Normal Demoting", "remove-vip 2:svc", "hb #6 Demoting e1 f1 holding"],
    );
    h.flow_down(410, &["watchdog off", "event Normal Demoted", "event Normal CleanedUp", "hb #7 Standby e1 f1"]);
    assert!(h.e.status(at(413)).cleaned_up);
    // Never promotes again, whatever happens.
    h.expect(5000, tick(), &["event Warning PeerLost", "hb #8 Standby e1 f1"]);
}

#[test]
fn the_key_of_an_inline_heartbeat_secret_never_reaches_the_engine_config() {
    let mut c = setup("").config();
    c.heartbeat_key = HeartbeatKey::Inline("c2VjcmV0".into());
    let identity = Identity { node: "a".into(), incarnation: 1 };
    let (e, _) = Engine::new(identity, &c, None, Instant::ZERO).unwrap_or_else(|e| panic!("{e}"));
    assert!(!format!("{:?}", e.config()).contains("c2VjcmV0"));
}
