//! Tests of the replica state machine: one per handler asserting the exact outputs, and a
//! deterministic two-replica simulation (in-memory disks, an in-order wire) for the flows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;

use bytes::Bytes;
use hapair_crds::volume::{ConnectionState, DiskState};

use super::*;
use crate::replication::activity_log::ring_len_for;
use crate::replication::bitmap::page_count;
use crate::replication::generation::Generations;
use crate::replication::geometry::block_count;
use crate::replication::metadata::{StoredDisk, flags, metadata_len};
use crate::replication::verify::block_digests;
use crate::replication::wire::Envelope;

const SIZE: u64 = 64 << 20;

fn layout() -> Layout {
    Layout::ending_at(SIZE + metadata_len(SIZE, 7), page_count(block_count(SIZE)), ring_len_for(7)).unwrap()
}

fn config(node: &str, peer: &str) -> MachineConfig {
    MachineConfig {
        node: node.into(),
        peer: peer.into(),
        protocol: WireProtocol::C,
        policy: WirePolicy::Manual,
        resync: ResyncLimits::default(),
        ping_interval_ms: 500,
        ping_timeout_ms: 2000,
        handshake_timeout_ms: 2000,
        bitmap_flush_interval_ms: 1000,
        layout: layout(),
        speaks: crate::protocol::Range { min: 1, max: 2 },
    }
}

fn superblock(gens: Generations, disk: StoredDisk, format_id: u64) -> Superblock {
    Superblock {
        seq: 1,
        volume_uuid: [9; 16],
        data_size: SIZE,
        format_id,
        gens,
        disk,
        flags: 0,
        al_slots: 7,
        al_ring_len: ring_len_for(7),
        bitmap_pages: page_count(block_count(SIZE)),
        promoted_epoch: 0,
        promoted_at_ms: 0,
        known_epoch: 1,
    }
}

fn machine_with(cfg: MachineConfig, gens: Generations, disk: StoredDisk, format_id: u64) -> Machine {
    let sb = superblock(gens, disk, format_id);
    let al = ActivityLog::new(format_id, 7, ring_len_for(7));
    Machine::new(cfg, sb, Bitmap::new(block_count(SIZE)), al, 0, format_id)
}

fn uptodate(node: &str, peer: &str) -> Machine {
    let g = Generations { current: 0x1000, bitmap: 0, history: [0, 0] };
    machine_with(config(node, peer), g, StoredDisk::UpToDate, node.len() as u64 * 31 + 7)
}

fn promoted(node: &str, peer: &str) -> Machine {
    let mut m = uptodate(node, peer);
    m.handle(0, Input::Promote { req: 900, epoch: 2, force: false, wall_ms: 1 });
    m.handle(0, Input::IoDone { tag: IoTag::Meta(MetaPurpose::Promote(900)), result: Ok(IoOutput::Done) });
    m
}

fn sb_write(m: &Machine, seq: u64) -> MetaStep {
    let mut sb = m.sb.clone();
    sb.seq = seq;
    MetaStep::Write { offset: m.cfg.layout.superblock_offset((seq % 2) as usize), bytes: sb.encode() }
}

/// The flags of every superblock an output list writes.
fn persisted_flags(out: &[Output]) -> Vec<u32> {
    let mut found = Vec::new();
    for o in out {
        if let Output::Io(IoOp::Meta { steps, .. }) = o {
            for step in steps {
                if let MetaStep::Write { bytes, .. } = step
                    && let crate::replication::metadata::SlotContent::Valid(sb) = Superblock::decode(bytes)
                {
                    found.push(sb.flags);
                }
            }
        }
    }
    found
}

/// A fence: the superseded flag made durable, then the event.
fn assert_fenced(out: &[Output], epoch: u64, reason: &str) {
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(&out[0], Output::Io(IoOp::Meta { tag: None, .. })), "{out:?}");
    assert!(persisted_flags(out).iter().all(|f| f & flags::SUPERSEDED != 0), "{out:?}");
    assert_eq!(out[1], Output::Event(ReplicaEvent::Fenced { epoch, reason: reason.into() }));
}

fn ok(req: ReqId) -> Output {
    Output::Complete { req, result: Ok(()) }
}

fn refused(out: &[Output]) -> Refusal {
    match out {
        [Output::Complete { result: Err(e), .. }] => e.clone(),
        other => panic!("expected one refusal, got {other:?}"),
    }
}

// ----- per-handler tests ---------------------------------------------------------------------

#[test]
fn writes_on_a_secondary_are_refused() {
    let mut m = uptodate("a", "b");
    let out = m.handle(0, Input::Write { req: 1, offset: 0, data: Bytes::from_static(&[1; 512]), fua: false });
    let e = refused(&out);
    assert_eq!(e.code, ErrorCode::NotPermitted);
    assert!(e.message.contains("secondary"), "{e}");
}

#[test]
fn promotion_is_durable_before_it_completes() {
    let mut m = uptodate("a", "b");
    let out = m.handle(5, Input::Promote { req: 1, epoch: 3, force: false, wall_ms: 77 });
    assert_eq!(m.sb.promoted_epoch, 3);
    assert_eq!(m.sb.known_epoch, 3);
    assert!(m.sb.has(flags::PRIMARY));
    assert_eq!(
        out,
        vec![
            Output::Io(IoOp::Meta { tag: Some(IoTag::Meta(MetaPurpose::Promote(1))), steps: vec![sb_write(&m, 2)] }),
            Output::Event(ReplicaEvent::Promoted { epoch: 3, forced: false }),
        ]
    );
    let out = m.handle(6, Input::IoDone { tag: IoTag::Meta(MetaPurpose::Promote(1)), result: Ok(IoOutput::Done) });
    assert_eq!(out, vec![ok(1)]);
    assert!(m.snapshot().writes_allowed);
}

#[test]
fn promotion_needs_uptodate_data_a_current_epoch_or_force() {
    let g = Generations { current: 0x1000, bitmap: 0, history: [0, 0] };
    let mut m = machine_with(config("a", "b"), g, StoredDisk::Inconsistent, 3);
    let e = refused(&m.handle(0, Input::Promote { req: 1, epoch: 2, force: false, wall_ms: 0 }));
    assert!(e.message.contains("Inconsistent"), "{e}");
    let e = refused(&m.handle(0, Input::Promote { req: 2, epoch: 0, force: true, wall_ms: 0 }));
    assert!(e.message.contains("older than"), "{e}");
    let out = m.handle(0, Input::Promote { req: 3, epoch: 2, force: true, wall_ms: 0 });
    assert!(out.contains(&Output::Event(ReplicaEvent::Promoted { epoch: 2, forced: true })));
    assert_eq!(m.sb.disk, StoredDisk::UpToDate);
    assert_eq!(m.sb.gens.history[0], 0x1000, "the old data history is kept so the peer gets a full sync");
}

#[test]
fn degraded_write_covers_its_extent_rotates_generations_then_writes() {
    let mut m = promoted("a", "b");
    let data = Bytes::from(vec![7u8; 4096]);
    let out = m.handle(10, Input::Write { req: 5, offset: 8192, data: data.clone(), fua: true });
    let [
        Output::Io(IoOp::Meta { tag: Some(IoTag::Meta(MetaPurpose::ActivityLog)), steps: al }),
        Output::Io(IoOp::Meta { tag: None, steps: sb }),
        Output::Io(write),
    ] = out.as_slice()
    else {
        panic!("unexpected outputs {out:?}")
    };
    assert!(matches!(al.as_slice(), [MetaStep::Write { offset, .. }] if *offset == m.cfg.layout.al_block_offset(1)));
    assert_eq!(sb, &vec![sb_write(&m, m.sb.seq)]);
    assert_eq!(m.sb.gens.bitmap, 0x1000, "tracking since the peer's last generation");
    assert_ne!(m.sb.gens.current, 0x1000);
    assert_eq!(write, &IoOp::Write { tag: IoTag::App(5), offset: 8192, data, fua: true });
    assert_eq!(m.snapshot().out_of_sync_bytes, 4096);
    let out = m.handle(11, Input::IoDone { tag: IoTag::App(5), result: Ok(IoOutput::Done) });
    assert_eq!(out, vec![ok(5)]);
    // A second write to the same extent needs neither an activity-log update nor a rotation.
    let out = m.handle(12, Input::Write { req: 6, offset: 0, data: Bytes::from(vec![1u8; 512]), fua: false });
    assert_eq!(
        out,
        vec![Output::Io(IoOp::Write { tag: IoTag::App(6), offset: 0, data: Bytes::from(vec![1u8; 512]), fua: false })]
    );
}

fn connect_in_sync(m: &mut Machine, peer: &str, conn: ConnId) {
    let out = m.handle(0, Input::Connected { conn });
    assert!(matches!(out.as_slice(), [Output::Send { frame: Frame::Hello(_), .. }]), "{out:?}");
    let mut hello = m.hello();
    hello.node = peer.into();
    hello.role = WireRole::Secondary;
    hello.format_id ^= 1;
    let out = m.handle(0, Input::Frame { conn, env: Envelope { epoch: 1, frame: Frame::Hello(Box::new(hello)) } });
    assert_eq!(out, vec![Output::Event(ReplicaEvent::Connected { peer: peer.into() })]);
}

/// A secondary connected to a primary peer (promoted in epoch 1), the link established at 0 ms.
fn following_a_primary(conn: ConnId) -> Machine {
    let mut m = uptodate("b", "a");
    let out = m.handle(0, Input::Connected { conn });
    assert!(matches!(out.as_slice(), [Output::Send { frame: Frame::Hello(_), .. }]), "{out:?}");
    let mut hello = m.hello();
    hello.node = "a".into();
    hello.role = WireRole::Primary;
    hello.promoted_epoch = 1;
    hello.format_id ^= 1;
    m.handle(0, Input::Frame { conn, env: Envelope { epoch: 1, frame: Frame::Hello(Box::new(hello)) } });
    assert_eq!(m.link.as_ref().map(|l| l.peer_role), Some(WireRole::Primary));
    m
}

#[test]
fn a_promotion_closes_the_link_to_a_primary_gone_silent_but_not_to_one_still_heard() {
    // Heard 600 ms ago (pings every 500 ms): alive on this link, so not promoted.
    let mut m = following_a_primary(1);
    m.handle(400, Input::Frame { conn: 1, env: Envelope { epoch: 1, frame: Frame::Ping } });
    let e = refused(&m.handle(1000, Input::Promote { req: 2, epoch: 2, force: false, wall_ms: 0 }));
    assert!(e.message.contains("peer a is primary and was heard on the replication link 600 ms ago"), "{e}");
    // Silent for 900 ms, and the engine's epoch 2 is above the peer's 1: the link goes, the
    // promotion proceeds.
    let mut m = following_a_primary(1);
    let out = m.handle(900, Input::Promote { req: 2, epoch: 2, force: false, wall_ms: 0 });
    let reason = "peer a lost: silent here for 900 ms, and epoch 2 supersedes its 1";
    assert_eq!(
        out[0],
        Output::Send { conn: 1, frame: Frame::Goodbye { reason: reason.into() }, epoch: 1, notify_sent: false }
    );
    assert!(out.contains(&Output::Close { conn: 1, reason: reason.into(), retry_after_ms: RETRY_SOON_MS }), "{out:?}");
    assert!(out.contains(&Output::Event(ReplicaEvent::Promoted { epoch: 2, forced: false })), "{out:?}");
    // An engine epoch that does not supersede the peer's closes nothing.
    let mut m = following_a_primary(1);
    let e = refused(&m.handle(900, Input::Promote { req: 2, epoch: 1, force: false, wall_ms: 0 }));
    assert!(e.message.contains("peer a is primary"), "{e}");
}

#[test]
fn protocol_c_write_completes_after_local_and_peer() {
    let mut m = promoted("a", "b");
    connect_in_sync(&mut m, "b", 1);
    let data = Bytes::from(vec![3u8; 4096]);
    let out = m.handle(1, Input::Write { req: 8, offset: 4096, data: data.clone(), fua: false });
    assert_eq!(out.len(), 2);
    assert!(
        matches!(&out[0], Output::Io(IoOp::Meta { tag: Some(IoTag::Meta(MetaPurpose::ActivityLog)), .. })),
        "activity log first"
    );
    assert_eq!(out[1], Output::Io(IoOp::Write { tag: IoTag::App(8), offset: 4096, data: data.clone(), fua: false }));
    // The peer gets the write once the extent is recorded.
    let out = m.handle(1, Input::IoDone { tag: IoTag::Meta(MetaPurpose::ActivityLog), result: Ok(IoOutput::Done) });
    assert_eq!(
        out,
        vec![Output::Send {
            conn: 1,
            frame: Frame::Data { seq: 1, offset: 4096, fua: false, data },
            epoch: 2,
            notify_sent: false
        }]
    );
    // The peer acknowledges before the local write finishes: still not complete.
    let ack = Envelope { epoch: 2, frame: Frame::Ack { seq: 1, ok: true } };
    assert_eq!(m.handle(2, Input::Frame { conn: 1, env: ack }), vec![]);
    assert_eq!(m.handle(3, Input::IoDone { tag: IoTag::App(8), result: Ok(IoOutput::Done) }), vec![ok(8)]);
    assert!(m.bitmap.is_empty());
    assert_eq!(m.sb.gens.bitmap, 0, "no tracking while replicating");
}

#[test]
fn protocol_a_write_completes_once_sent_but_stays_tracked_until_acked() {
    let mut cfg = config("a", "b");
    cfg.protocol = WireProtocol::A;
    let g = Generations { current: 0x1000, bitmap: 0, history: [0, 0] };
    let mut m = machine_with(cfg, g, StoredDisk::UpToDate, 5);
    m.handle(0, Input::Promote { req: 900, epoch: 2, force: false, wall_ms: 1 });
    m.handle(0, Input::IoDone { tag: IoTag::Meta(MetaPurpose::Promote(900)), result: Ok(IoOutput::Done) });
    let out = m.handle(0, Input::Connected { conn: 1 });
    let Output::Send { frame: Frame::Hello(h), .. } = &out[0] else { panic!("{out:?}") };
    let mut peer = (**h).clone();
    peer.node = "b".into();
    peer.role = WireRole::Secondary;
    m.handle(0, Input::Frame { conn: 1, env: Envelope { epoch: 2, frame: Frame::Hello(Box::new(peer)) } });
    m.handle(1, Input::Write { req: 8, offset: 0, data: Bytes::from(vec![1u8; 4096]), fua: false });
    let out = m.handle(1, Input::IoDone { tag: IoTag::Meta(MetaPurpose::ActivityLog), result: Ok(IoOutput::Done) });
    assert!(out.iter().any(|o| matches!(o, Output::Send { notify_sent: true, frame: Frame::Data { seq: 1, .. }, .. })));
    assert_eq!(m.handle(2, Input::IoDone { tag: IoTag::App(8), result: Ok(IoOutput::Done) }), vec![]);
    assert_eq!(m.handle(3, Input::Sent { conn: 1, seq: 1 }), vec![ok(8)]);
    // Lost before the ack: the block is marked out of sync even though the client saw success.
    m.handle(4, Input::Disconnected { conn: 1, reason: "reset".into() });
    assert_eq!(m.snapshot().out_of_sync_bytes, 4096);
}

#[test]
fn nothing_reaches_the_peer_before_the_activity_log_records_the_extent() {
    let mut m = promoted("a", "b");
    connect_in_sync(&mut m, "b", 1);
    let data = Bytes::from(vec![5u8; 4096]);
    // A write to a cold extent, then one to the same extent and a flush behind it.
    let out = m.handle(1, Input::Write { req: 8, offset: 0, data: data.clone(), fua: false });
    assert!(!out.iter().any(|o| matches!(o, Output::Send { .. })), "{out:?}");
    let out = m.handle(2, Input::Write { req: 9, offset: 4096, data: data.clone(), fua: false });
    assert_eq!(out, vec![Output::Io(IoOp::Write { tag: IoTag::App(9), offset: 4096, data: data.clone(), fua: false })]);
    let out = m.handle(3, Input::Flush { req: 10 });
    assert_eq!(out, vec![Output::Io(IoOp::Flush { tag: IoTag::AppFlush(10) })]);
    // Durable: everything held goes out, in the order it was meant to.
    let out = m.handle(4, Input::IoDone { tag: IoTag::Meta(MetaPurpose::ActivityLog), result: Ok(IoOutput::Done) });
    let frames: Vec<&Frame> = out
        .iter()
        .map(|o| match o {
            Output::Send { conn: 1, frame, .. } => frame,
            other => panic!("only sends expected, got {other:?}"),
        })
        .collect();
    assert_eq!(
        frames,
        [
            &Frame::Data { seq: 1, offset: 0, fua: false, data: data.clone() },
            &Frame::Data { seq: 2, offset: 4096, fua: false, data },
            &Frame::Flush { seq: 3 },
        ]
    );
}

#[test]
fn an_activity_log_that_cannot_be_written_keeps_the_write_from_the_peer() {
    let mut m = promoted("a", "b");
    connect_in_sync(&mut m, "b", 1);
    m.handle(1, Input::Write { req: 8, offset: 0, data: Bytes::from(vec![5u8; 4096]), fua: false });
    let out = m.handle(2, Input::IoDone { tag: IoTag::Meta(MetaPurpose::ActivityLog), result: Err("EIO".into()) });
    assert!(
        !out.iter().any(|o| matches!(o, Output::Send { frame: Frame::Data { .. }, .. })),
        "the held write must not go out: {out:?}"
    );
    assert!(out.iter().any(|o| matches!(o, Output::Close { conn: 1, .. })), "{out:?}");
    // The write is now only here, and marked so.
    let out = m.handle(3, Input::IoDone { tag: IoTag::App(8), result: Ok(IoOutput::Done) });
    assert_eq!(out, vec![ok(8)]);
    assert_eq!(m.snapshot().out_of_sync_bytes, 4096);
}

#[test]
fn losing_the_peer_completes_pending_writes_degraded_and_marks_them() {
    let mut m = promoted("a", "b");
    connect_in_sync(&mut m, "b", 1);
    m.handle(1, Input::Write { req: 8, offset: 1 << 20, data: Bytes::from(vec![3u8; 8192]), fua: false });
    m.handle(2, Input::IoDone { tag: IoTag::App(8), result: Ok(IoOutput::Done) });
    let out = m.handle(3, Input::Disconnected { conn: 1, reason: "connection reset".into() });
    assert!(out.contains(&ok(8)), "{out:?}");
    assert!(out.contains(&Output::Event(ReplicaEvent::Disconnected { reason: "connection reset".into() })));
    assert_eq!(m.snapshot().out_of_sync_bytes, 8192);
    assert_eq!(m.sb.gens.bitmap, 0x1000);
    assert_eq!(m.snapshot().connection, ConnectionState::Connecting);
}

#[test]
fn secondary_applies_peer_writes_in_order_and_acknowledges() {
    let mut m = uptodate("b", "a");
    connect_in_sync(&mut m, "a", 4);
    let d1 = Bytes::from(vec![1u8; 4096]);
    let out = m.handle(
        1,
        Input::Frame {
            conn: 4,
            env: Envelope { epoch: 2, frame: Frame::Data { seq: 1, offset: 0, fua: true, data: d1.clone() } },
        },
    );
    assert_eq!(
        out,
        vec![Output::Io(IoOp::Write { tag: IoTag::PeerWrite { conn: 4, seq: 1 }, offset: 0, data: d1, fua: true })]
    );
    let out = m.handle(2, Input::IoDone { tag: IoTag::PeerWrite { conn: 4, seq: 1 }, result: Ok(IoOutput::Done) });
    assert_eq!(
        out,
        vec![Output::Send { conn: 4, frame: Frame::Ack { seq: 1, ok: true }, epoch: 2, notify_sent: false }]
    );
    let out = m.handle(3, Input::Frame { conn: 4, env: Envelope { epoch: 2, frame: Frame::Flush { seq: 2 } } });
    assert_eq!(out, vec![Output::Io(IoOp::Flush { tag: IoTag::PeerFlush { conn: 4, seq: 2 } })]);
}

#[test]
fn writes_from_a_superseded_epoch_close_the_connection() {
    let mut m = uptodate("b", "a");
    connect_in_sync(&mut m, "a", 4);
    m.handle(1, Input::ObserveEpoch { epoch: 7 });
    let out = m.handle(
        2,
        Input::Frame {
            conn: 4,
            env: Envelope {
                epoch: 6,
                frame: Frame::Data { seq: 1, offset: 0, fua: false, data: Bytes::from_static(&[0; 512]) },
            },
        },
    );
    assert!(matches!(out.last(), Some(Output::Close { conn: 4, reason, .. }) if reason.contains("epoch 6")), "{out:?}");
    assert!(!out.iter().any(|o| matches!(o, Output::Io(_))), "nothing written");
}

#[test]
fn a_primary_learning_a_newer_epoch_fences_itself() {
    let mut m = promoted("a", "b");
    let out = m.handle(1, Input::ObserveEpoch { epoch: 3 });
    assert_eq!(
        out,
        vec![Output::Event(ReplicaEvent::Fenced { epoch: 3, reason: "the engine reported a newer epoch".into() })]
    );
    assert!(!m.snapshot().superseded, "a primary that learns of a newer epoch served alongside it");
    let e = refused(&m.handle(2, Input::Write { req: 1, offset: 0, data: Bytes::from_static(&[0; 512]), fua: false }));
    assert!(e.message.contains("fenced"), "{e}");
}

#[test]
fn malformed_peer_behaviour_closes_with_a_reason_naming_the_peer() {
    let mut m = uptodate("b", "a");
    m.handle(0, Input::Connected { conn: 2 });
    let out = m.handle(1, Input::Frame { conn: 2, env: Envelope { epoch: 1, frame: Frame::Ack { seq: 1, ok: true } } });
    assert!(
        matches!(out.last(), Some(Output::Close { reason, .. }) if reason.contains("peer a sent ack before its hello")),
        "{out:?}"
    );
    connect_in_sync(&mut m, "a", 3);
    let out = m.handle(
        1,
        Input::Frame {
            conn: 3,
            env: Envelope {
                epoch: 1,
                frame: Frame::Data { seq: 1, offset: SIZE, fua: false, data: Bytes::from_static(&[0; 512]) },
            },
        },
    );
    assert!(
        matches!(out.last(), Some(Output::Close { reason, .. }) if reason.contains("outside the volume")),
        "{out:?}"
    );
}

#[test]
fn demotion_refuses_with_attached_clients_then_flushes_both_sides_and_persists() {
    let mut m = promoted("a", "b");
    connect_in_sync(&mut m, "b", 1);
    let e = refused(&m.handle(1, Input::Demote { req: 2, force: false, open_clients: 1 }));
    assert!(e.message.contains("1 NBD client"), "{e}");
    let out = m.handle(2, Input::Demote { req: 3, force: false, open_clients: 0 });
    assert_eq!(
        out,
        vec![
            Output::Send { conn: 1, frame: Frame::Flush { seq: 1 }, epoch: 2, notify_sent: false },
            Output::Io(IoOp::Flush { tag: IoTag::DemoteFlush }),
        ]
    );
    assert!(!m.snapshot().writes_allowed);
    assert_eq!(m.handle(3, Input::IoDone { tag: IoTag::DemoteFlush, result: Ok(IoOutput::Done) }), vec![]);
    let out =
        m.handle(4, Input::Frame { conn: 1, env: Envelope { epoch: 2, frame: Frame::FlushAck { seq: 1, ok: true } } });
    let [Output::Io(IoOp::Meta { tag: Some(IoTag::Meta(MetaPurpose::Demote(3))), steps })] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(steps.first(), Some(&MetaStep::SyncData));
    assert!(!m.sb.has(flags::PRIMARY));
    let out = m.handle(5, Input::IoDone { tag: IoTag::Meta(MetaPurpose::Demote(3)), result: Ok(IoOutput::Done) });
    assert_eq!(
        out,
        vec![
            Output::Event(ReplicaEvent::Demoted),
            Output::Send {
                conn: 1,
                frame: Frame::State { role: WireRole::Secondary, disk: WireDisk::UpToDate },
                epoch: 2,
                notify_sent: false
            },
            ok(3),
        ]
    );
    assert_eq!(m.role(), Role::Secondary);
}

#[test]
fn silent_peer_times_out_and_pings_are_sent_on_schedule() {
    let mut m = uptodate("a", "b");
    connect_in_sync(&mut m, "b", 1);
    let out = m.handle(500, Input::Tick);
    assert_eq!(out, vec![Output::Send { conn: 1, frame: Frame::Ping, epoch: 1, notify_sent: false }]);
    let out = m.handle(2100, Input::Tick);
    assert!(matches!(out.last(), Some(Output::Close { reason, .. }) if reason.contains("silent")), "{out:?}");
}

// ----- simulation ------------------------------------------------------------------------------

struct Node {
    m: Machine,
    disk: Vec<u8>,
    io: VecDeque<IoOp>,
    done: Vec<(ReqId, Result<(), Refusal>)>,
    events: Vec<ReplicaEvent>,
}

impl Node {
    fn new(m: Machine) -> Self {
        Node { m, disk: vec![0; SIZE as usize], io: VecDeque::new(), done: Vec::new(), events: Vec::new() }
    }
}

struct Sim {
    nodes: [Node; 2],
    conn: Option<ConnId>,
    wire: [VecDeque<Envelope>; 2],
    now: u64,
    next_conn: ConnId,
    next_req: ReqId,
    sent_bytes: [u64; 2],
}

impl Sim {
    fn new(a: Machine, b: Machine) -> Self {
        Sim {
            nodes: [Node::new(a), Node::new(b)],
            conn: None,
            wire: [VecDeque::new(), VecDeque::new()],
            now: 0,
            next_conn: 1,
            next_req: 1,
            sent_bytes: [0, 0],
        }
    }

    fn input(&mut self, i: usize, input: Input) {
        let out = self.nodes[i].m.handle(self.now, input);
        self.apply(i, out);
    }

    fn apply(&mut self, i: usize, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Io(op) => self.nodes[i].io.push_back(op),
                Output::Send { conn, frame, epoch, notify_sent } => {
                    if self.conn == Some(conn) {
                        self.sent_bytes[i] += frame.wire_len() as u64;
                        let seq = match (&frame, notify_sent) {
                            (Frame::Data { seq, .. } | Frame::Flush { seq }, true) => Some(*seq),
                            _ => None,
                        };
                        self.wire[i].push_back(Envelope { epoch, frame });
                        if let Some(seq) = seq {
                            let out = self.nodes[i].m.handle(self.now, Input::Sent { conn, seq });
                            self.apply(i, out);
                        }
                    }
                }
                Output::Complete { req, result } => self.nodes[i].done.push((req, result)),
                Output::Close { conn, reason, .. } => {
                    if self.conn == Some(conn) {
                        // Like TCP: what the closer already sent still arrives, then EOF.
                        let pending: Vec<Envelope> = self.wire[i].drain(..).collect();
                        for env in pending {
                            let out = self.nodes[1 - i].m.handle(self.now, Input::Frame { conn, env });
                            self.apply(1 - i, out);
                        }
                        if self.conn == Some(conn) {
                            self.conn = None;
                            self.wire = [VecDeque::new(), VecDeque::new()];
                            let out = self.nodes[1 - i].m.handle(self.now, Input::Disconnected { conn, reason });
                            self.apply(1 - i, out);
                        }
                    }
                }
                Output::Event(e) => self.nodes[i].events.push(e),
            }
        }
    }

    fn connect(&mut self) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conn = Some(conn);
        self.input(0, Input::Connected { conn });
        self.input(1, Input::Connected { conn });
    }

    fn cut(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.wire = [VecDeque::new(), VecDeque::new()];
            for i in 0..2 {
                self.input(i, Input::Disconnected { conn, reason: "link cut".into() });
            }
        }
    }

    fn exec_io(&mut self, i: usize) -> bool {
        let Some(op) = self.nodes[i].io.pop_front() else { return false };

        let disk = &mut self.nodes[i].disk;
        let (tag, result) = match op {
            IoOp::Write { tag, offset, data, .. } => {
                disk[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                (Some(tag), IoOutput::Done)
            }
            IoOp::Zero { tag, offset, len, .. } => {
                disk[offset as usize..(offset + len) as usize].fill(0);
                (Some(tag), IoOutput::Done)
            }
            IoOp::Read { tag, offset, len } => (
                Some(tag),
                IoOutput::Data(Bytes::copy_from_slice(&disk[offset as usize..offset as usize + len as usize])),
            ),
            IoOp::Digest { tag, offset, len } => {
                (Some(tag), IoOutput::Digests(block_digests(&disk[offset as usize..offset as usize + len as usize])))
            }
            IoOp::Flush { tag } => (Some(tag), IoOutput::Done),
            IoOp::Meta { tag, .. } => (tag, IoOutput::Done),
        };
        if let Some(tag) = tag {
            self.input(i, Input::IoDone { tag, result: Ok(result) });
        }
        true
    }

    /// Delivers one frame: `None` when there was none, else whether it was more than a
    /// keepalive.
    fn deliver_one(&mut self, from: usize) -> Option<bool> {
        let (Some(conn), Some(env)) = (self.conn, self.wire[from].pop_front()) else { return None };
        let keepalive = matches!(env.frame, Frame::Ping | Frame::PingAck);
        self.input(1 - from, Input::Frame { conn, env });
        Some(!keepalive)
    }

    fn deliver(&mut self, from: usize) -> bool {
        self.deliver_one(from).is_some()
    }

    /// Runs until nothing moves for a while, advancing time 10 ms per idle round.
    fn settle(&mut self) {
        let mut idle = 0;
        let mut rounds = 0;
        while idle < 300 {
            rounds += 1;
            assert!(rounds < 1_000_000, "simulation did not settle");
            let mut moved = false;
            for i in 0..2 {
                while self.exec_io(i) {
                    moved = true;
                }
                while let Some(progress) = self.deliver_one(i) {
                    moved |= progress;
                }
            }
            if moved {
                idle = 0;
            } else {
                idle += 1;
                self.now += 10;
                self.input(0, Input::Tick);
                self.input(1, Input::Tick);
            }
        }
    }

    fn req(&mut self) -> ReqId {
        self.next_req += 1;
        self.next_req
    }

    fn promote(&mut self, i: usize, epoch: u64) {
        let req = self.req();
        let wall = self.now;
        self.input(i, Input::Promote { req, epoch, force: false, wall_ms: wall });
        self.settle();
        assert_eq!(self.result(i, req), Ok(()), "promote node {i}");
    }

    fn demote(&mut self, i: usize) {
        let req = self.req();
        self.input(i, Input::Demote { req, force: false, open_clients: 0 });
        self.settle();
        assert_eq!(self.result(i, req), Ok(()), "demote node {i}");
    }

    fn write(&mut self, i: usize, offset: u64, fill: u8, len: usize) {
        let req = self.req();
        self.input(i, Input::Write { req, offset, data: Bytes::from(vec![fill; len]), fua: false });
    }

    fn result(&self, i: usize, req: ReqId) -> Result<(), Refusal> {
        self.nodes[i]
            .done
            .iter()
            .find(|(r, _)| *r == req)
            .map(|(_, res)| res.clone())
            .unwrap_or_else(|| panic!("request {req} on node {i} never completed"))
    }

    fn same_data(&self) -> bool {
        self.nodes[0].disk == self.nodes[1].disk
    }

    fn snap(&self, i: usize) -> Snapshot {
        self.nodes[i].m.snapshot()
    }
}

fn fresh_pair() -> Sim {
    let g = Generations::just_created();
    let mut a = machine_with(config("a", "b"), g, StoredDisk::Inconsistent, 11);
    let mut b = machine_with(config("b", "a"), g, StoredDisk::Inconsistent, 22);
    a.sb.set_flag(flags::DATA_ZEROED, true);
    b.sb.set_flag(flags::DATA_ZEROED, true);
    let mut sim = Sim::new(a, b);
    sim.connect();
    sim.settle();
    sim
}

#[test]
fn sim_fresh_zeroed_pair_is_uptodate_without_a_sync_and_replicates() {
    let mut sim = fresh_pair();
    for i in 0..2 {
        let s = sim.snap(i);
        assert_eq!((s.disk, s.connection), (DiskState::UpToDate, ConnectionState::Connected), "node {i}");
    }
    assert_eq!(sim.snap(0).generations, sim.snap(1).generations);
    sim.promote(0, 1);
    sim.write(0, 4096 * 10, 0xaa, 8192);
    sim.settle();
    assert!(sim.same_data());
    assert!(sim.sent_bytes[0] > 8192);
}

#[test]
fn sim_disconnected_writes_resync_only_the_dirty_blocks() {
    let mut sim = fresh_pair();
    sim.promote(0, 1);
    sim.cut();
    for k in 0..50u64 {
        sim.write(0, k * 997 * 4096 % (SIZE - 8192), (k % 250) as u8 + 1, 4096);
    }
    sim.settle();
    let dirty = sim.snap(0).out_of_sync_bytes;
    assert!(dirty > 0 && dirty <= 50 * 2 * 4096);
    assert_eq!(sim.snap(0).generations.bitmap, sim.snap(1).generations.current);
    let before = sim.sent_bytes[0];
    sim.connect();
    sim.settle();
    assert!(sim.same_data());
    let resent = sim.sent_bytes[0] - before;
    assert!(resent >= dirty && resent < dirty + 8192, "resent {resent} for {dirty} dirty bytes");
    for i in 0..2 {
        let s = sim.snap(i);
        assert_eq!((s.disk, s.connection, s.out_of_sync_bytes), (DiskState::UpToDate, ConnectionState::Connected, 0));
    }
    assert_eq!(sim.snap(0).generations, sim.snap(1).generations);
    assert!(sim.nodes[1].events.iter().any(|e| matches!(e, ReplicaEvent::SyncFinished { source: false, .. })));
}

#[test]
fn sim_sync_target_is_inconsistent_and_cannot_be_promoted_until_done() {
    let mut sim = fresh_pair();
    sim.promote(0, 1);
    sim.cut();
    sim.write(0, 0, 5, 1 << 20);
    sim.settle();
    sim.connect();
    // Run just far enough for the target to persist its merged bitmap.
    for _ in 0..6 {
        sim.deliver(0);
        sim.deliver(1);
        sim.exec_io(1);
    }
    assert_eq!(sim.snap(1).disk, DiskState::Inconsistent);
    assert_eq!(sim.snap(1).connection, ConnectionState::SyncTarget);
    let req = sim.req();
    sim.input(1, Input::Promote { req, epoch: 5, force: true, wall_ms: 0 });
    assert!(sim.result(1, req).is_err());
    assert!(
        sim.nodes[1]
            .events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::DiskStateChanged { to: DiskState::Inconsistent, .. }))
    );
    sim.settle();
    assert_eq!(sim.snap(1).disk, DiskState::UpToDate);
}

#[test]
fn sim_failover_then_old_primary_returns_as_sync_target() {
    let mut sim = fresh_pair();
    sim.promote(0, 1);
    sim.write(0, 0, 1, 4096);
    sim.settle();
    sim.cut();
    // The peer fails over and writes; the old primary is gone (demoted here).
    sim.demote(0);
    sim.promote(1, 2);
    sim.write(1, 8 << 20, 2, 4096);
    sim.settle();
    sim.connect();
    sim.settle();
    assert!(sim.same_data());
    assert_eq!(sim.nodes[0].disk[8 << 20], 2);
    assert!(sim.nodes[0].events.iter().any(|e| matches!(e, ReplicaEvent::SyncFinished { source: false, .. })));
}

fn split_brain(policy: WirePolicy, a_writes: u64, b_writes: u64) -> Sim {
    let g = Generations { current: 0x1000, bitmap: 0, history: [0, 0] };
    let mut ca = config("a", "b");
    let mut cb = config("b", "a");
    ca.policy = policy;
    cb.policy = policy;
    let a = machine_with(ca, g, StoredDisk::UpToDate, 11);
    let b = machine_with(cb, g, StoredDisk::UpToDate, 22);
    let mut sim = Sim::new(a, b);
    sim.connect();
    sim.settle();
    sim.promote(0, 1);
    sim.cut();
    sim.now += 1000;
    sim.promote(1, 2);
    for k in 0..a_writes {
        sim.write(0, k * 4096, 0xa0, 4096);
    }
    for k in 0..b_writes {
        sim.write(1, (100 + k) * 4096, 0xb0, 4096);
    }
    sim.settle();
    sim.demote(0);
    sim.demote(1);
    sim.connect();
    sim.settle();
    sim
}

#[test]
fn sim_split_brain_manual_waits_then_operator_resolution_discards_the_loser() {
    let mut sim = split_brain(WirePolicy::Manual, 3, 2);
    for i in 0..2 {
        assert_eq!(sim.snap(i).connection, ConnectionState::SplitBrain);
    }
    assert!(!sim.same_data());
    let req = sim.req();
    sim.input(1, Input::ResolveSplitBrain { req, resolution: Resolution::DiscardLocal });
    sim.connect();
    sim.settle();
    assert!(sim.same_data());
    assert_eq!(sim.nodes[1].disk[0], 0xa0, "a's changes win");
    assert_eq!(sim.nodes[1].disk[100 * 4096], 0, "b's change was discarded");
    let record = sim.snap(1).last_discard.unwrap();
    assert!(record.local_discarded);
    assert_eq!(record.resolved_by, "operator");
    assert_eq!(record.ranges, vec![(0, 3 * 4096), (100 * 4096, 2 * 4096)]);
}

#[test]
fn sim_split_brain_discard_younger_primary() {
    let sim = split_brain(WirePolicy::DiscardYoungerPrimary, 1, 5);
    assert!(sim.same_data());
    assert_eq!(sim.nodes[1].disk[100 * 4096], 0, "b was promoted later and loses");
    assert_eq!(sim.snap(1).last_discard.map(|d| d.local_discarded), Some(true));
    assert_eq!(sim.snap(0).last_discard.map(|d| d.local_discarded), Some(false));
}

#[test]
fn sim_split_brain_discard_least_changes() {
    let sim = split_brain(WirePolicy::DiscardLeastChanges, 1, 5);
    assert!(sim.same_data());
    assert_eq!(sim.nodes[0].disk[0], 0, "a changed fewer blocks and loses");
    assert_eq!(sim.nodes[0].disk[100 * 4096], 0xb0);
}

#[test]
fn sim_verify_finds_a_corrupted_block_and_the_primary_repairs_it() {
    let mut sim = fresh_pair();
    sim.promote(0, 1);
    sim.write(0, 0, 9, 1 << 20);
    sim.settle();
    sim.nodes[1].disk[123 * 4096 + 17] ^= 0xff;
    let req = sim.req();
    sim.input(0, Input::StartVerify { req });
    sim.settle();
    assert_eq!(sim.result(0, req), Ok(()));
    let found = sim.nodes[0].events.iter().find_map(|e| match e {
        ReplicaEvent::VerifyFinished { mismatched, .. } => Some(mismatched.clone()),
        _ => None,
    });
    assert_eq!(found, Some(vec![(123 * 4096, 4096)]));
    assert!(sim.same_data(), "the primary resynced the mismatched block");
    assert_eq!(sim.snap(1).out_of_sync_bytes, 0);
}

#[test]
fn a_fenced_primary_that_loses_its_peer_fails_the_writes_the_peer_never_acknowledged() {
    let mut m = promoted("a", "b");
    connect_in_sync(&mut m, "b", 1);
    m.handle(1, Input::Write { req: 8, offset: 1 << 20, data: Bytes::from(vec![3u8; 8192]), fua: false });
    m.handle(2, Input::IoDone { tag: IoTag::App(8), result: Ok(IoOutput::Done) });
    let reason = "the engine self-fenced: its lease ends unrenewed";
    let out = m.handle(3, Input::LeaseLost { reason: reason.into() });
    assert_fenced(&out[..2], 2, reason);
    // The peer may serve in a newer epoch from now on: the write fails at once, without
    // waiting for the link to time out.
    let e = refused(&out[2..]);
    assert!(e.message.contains("fenced (its lease ended) before the peer acknowledged"), "{e}");
    let out = m.handle(4, Input::Disconnected { conn: 1, reason: "peer b silent for 3000 ms".into() });
    assert!(!out.iter().any(|o| matches!(o, Output::Complete { req: 8, .. })), "answered twice: {out:?}");
    // New writes are refused outright.
    let e = refused(&m.handle(5, Input::Write { req: 9, offset: 0, data: Bytes::from_static(&[0; 512]), fua: false }));
    assert!(e.message.contains("fenced"), "{e}");
}

#[test]
fn sim_an_isolated_primary_resyncs_from_the_newer_one_and_records_what_it_discarded() {
    let mut sim = fresh_pair();
    sim.promote(0, 1);
    sim.write(0, 0, 1, 4096);
    sim.settle();
    // The write in flight when every link dies: it lands on a's disk, never on b's.
    let lost = sim.req();
    sim.input(0, Input::Write { req: lost, offset: 4 << 20, data: Bytes::from(vec![0xa1; 4096]), fua: false });
    while sim.exec_io(0) {}
    sim.input(0, Input::LeaseLost { reason: "lease ended unrenewed".into() });
    sim.cut();
    assert!(sim.result(0, lost).is_err(), "a fenced primary acknowledged a write its peer never had");
    assert_eq!(sim.nodes[0].disk[4 << 20], 0xa1);
    sim.demote(0);
    assert!(sim.snap(0).superseded, "the fence is remembered across the demotion");
    sim.promote(1, 2);
    sim.write(1, 8 << 20, 2, 4096);
    sim.settle();
    sim.connect();
    sim.settle();
    assert!(sim.same_data(), "a took b's data back");
    assert_eq!(sim.nodes[0].disk[4 << 20], 0, "the refused write is gone");
    assert_eq!(sim.nodes[0].disk[8 << 20], 2);
    assert_eq!(sim.snap(0).split_brain, None);
    assert!(!sim.snap(0).superseded, "in sync again: nothing superseded is left");
    assert_eq!(sim.snap(0).protocol_version, Some(2));
    let record = sim.nodes[0].events.iter().find_map(|e| match e {
        ReplicaEvent::Discarded(d) => Some(d.clone()),
        _ => None,
    });
    let record = record.unwrap_or_else(|| panic!("no discard record: {:?}", sim.nodes[0].events));
    assert!(record.local_discarded);
    assert_eq!(record.resolved_by, crate::replication::handshake::SUPERSEDED_LABEL);
    assert!(record.ranges.iter().any(|&(off, len)| off <= 4 << 20 && (4 << 20) < off + len), "{record:?}");
    assert_eq!(ReplicaEvent::Discarded(record).reason(), ("SupersededWritesDiscarded", true));
}

fn zeroed_pair(a: MachineConfig, b: MachineConfig) -> Sim {
    let g = Generations::just_created();
    let mut a = machine_with(a, g, StoredDisk::Inconsistent, 11);
    let mut b = machine_with(b, g, StoredDisk::Inconsistent, 22);
    a.sb.set_flag(flags::DATA_ZEROED, true);
    b.sb.set_flag(flags::DATA_ZEROED, true);
    Sim::new(a, b)
}

#[test]
fn sim_a_replica_of_the_previous_release_makes_its_peer_step_down_to_version_1() {
    let mut old = config("b", "a");
    old.speaks = crate::protocol::Range::V1;
    let mut sim = zeroed_pair(config("a", "b"), old);
    // Even a peer known to speak version 2 may have been rolled back.
    sim.nodes[0].m.peer_speaks = Some(crate::protocol::Range { min: 1, max: 2 });
    // a writes version 2, which b refuses as the previous release's decoder does: without
    // a goodbye. a takes that as the answer.
    sim.connect();
    sim.settle();
    let refusal = sim.nodes[1].events.iter().find_map(|e| match e {
        ReplicaEvent::PeerRefused { reason } => Some(reason.clone()),
        _ => None,
    });
    let refusal = refusal.unwrap_or_else(|| panic!("b accepted a version 2 hello: {:?}", sim.nodes[1].events));
    assert!(
        refusal.contains("peer a sent a version 2 handshake; this replica speaks replication protocol versions 1 to 1"),
        "{refusal}"
    );
    assert_eq!(sim.nodes[0].m.peer_speaks, Some(crate::protocol::Range::V1));
    assert!(sim.snap(0).generations.is_just_created(), "a decided nothing on the doomed connection");
    // The next connection is in version 1 from both sides.
    sim.connect();
    sim.settle();
    assert_eq!(sim.snap(0).protocol_version, Some(1));
    assert_eq!(sim.snap(1).protocol_version, Some(1));
    assert_eq!(sim.snap(0).connection, ConnectionState::Connected);
}

#[test]
fn sim_an_upgraded_peer_is_met_in_version_2_after_one_renegotiation() {
    let mut sim = zeroed_pair(config("a", "b"), config("b", "a"));
    // b remembers a from before a's upgrade; a, restarted, knows nothing of b.
    sim.nodes[1].m.peer_speaks = Some(crate::protocol::Range::V1);
    sim.connect();
    sim.settle();
    assert!(
        sim.nodes[1]
            .events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::Disconnected { reason } if reason.contains("renegotiating"))),
        "{:?}",
        sim.nodes[1].events
    );
    assert_eq!(sim.nodes[0].m.peer_speaks, None, "a goodbye is not a refusal: a does not step down");
    sim.connect();
    sim.settle();
    assert_eq!(sim.snap(0).protocol_version, Some(2));
    assert_eq!(sim.snap(1).protocol_version, Some(2));
    assert_eq!(sim.snap(0).connection, ConnectionState::Connected);
}
