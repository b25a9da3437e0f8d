//! Tests of the replication codec: round trips, hostile headers and payloads, the
//! handshake layouts of each protocol version, and random bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use rand::{Rng, SeedableRng};

pub(crate) fn sample_hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        speaks: crate::protocol::Range::ours(),
        node: "node-a".into(),
        volume_uuid: [3; 16],
        size: 1 << 30,
        gens: Generations { current: 10, bitmap: 9, history: [8, 7] },
        disk: WireDisk::UpToDate,
        role: WireRole::Primary,
        crashed_primary: true,
        data_zeroed: false,
        superseded: true,
        dirty_blocks: 12,
        promoted_epoch: 4,
        promoted_at_ms: 99,
        format_id: 1234,
        policy: WirePolicy::DiscardLeastChanges,
        protocol: WireProtocol::C,
        resolution: Some(Resolution::KeepLocal),
    }
}

/// The hello the previous release sends: layout version 1.
fn v1_hello() -> Hello {
    Hello { version: 1, speaks: crate::protocol::Range::V1, superseded: false, ..sample_hello() }
}

pub(crate) fn samples() -> Vec<Frame> {
    vec![
        Frame::Hello(Box::new(sample_hello())),
        Frame::Hello(Box::new(v1_hello())),
        Frame::Data { seq: 1, offset: 4096, fua: true, data: Bytes::from(vec![7u8; 8192]) },
        Frame::Ack { seq: 1, ok: true },
        Frame::Ack { seq: 2, ok: false },
        Frame::Flush { seq: 3 },
        Frame::FlushAck { seq: 3, ok: true },
        Frame::Zero { seq: 4, offset: 0, len: 1 << 20, fua: false, punch: true },
        Frame::ResyncRequest { offset: 1 << 20, len: 65536 },
        Frame::ResyncReply { offset: 1 << 20, data: Bytes::from(vec![1u8; 4096]), zero_len: 0 },
        Frame::ResyncReply { offset: 0, data: Bytes::new(), zero_len: 65536 },
        Frame::ResyncAck { offset: 1 << 20, len: 65536 },
        Frame::SyncDone { gens: Generations { current: 5, bitmap: 0, history: [4, 0] } },
        Frame::Bitmap { start: 0, last: true, runs: Bytes::from_static(&[3, 4]) },
        Frame::Ping,
        Frame::PingAck,
        Frame::VerifyRequest { offset: 0, len: 8192 },
        Frame::VerifyReply { offset: 0, digests: vec![1, u128::MAX] },
        Frame::OutOfSync { offset: 4096, len: 4096 },
        Frame::State { role: WireRole::Secondary, disk: WireDisk::Inconsistent },
        Frame::StartResync,
        Frame::Goodbye { reason: "split brain".into() },
    ]
}

#[test]
fn every_frame_round_trips_with_its_epoch() {
    for frame in samples() {
        let mut codec = FrameCodec { epoch: 42 };
        let mut buf = BytesMut::new();
        codec.encode(frame.clone(), &mut buf).unwrap();
        assert_eq!(buf.len(), frame.wire_len());
        let got = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(got, Envelope { epoch: 42, frame });
        assert!(buf.is_empty());
    }
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let mut codec = FrameCodec::default();
    let mut full = BytesMut::new();
    codec.encode(Frame::Flush { seq: 9 }, &mut full).unwrap();
    let mut buf = BytesMut::new();
    for (i, byte) in full.iter().enumerate() {
        buf.put_u8(*byte);
        let got = decode_frame(&mut buf).unwrap();
        assert_eq!(got.is_some(), i == full.len() - 1);
    }
}

fn header(kind: u8, flags: u8, len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(MAGIC);
    b.put_u8(kind);
    b.put_u8(flags);
    b.put_u16(0);
    b.put_u64(1);
    b.put_u32(len);
    b
}

#[test]
fn hostile_headers_are_refused_before_buffering() {
    let mut b = header(2, 0, u32::MAX);
    assert_eq!(decode_frame(&mut b), Err(WireError::Oversized { len: u32::MAX as usize, max: MAX_PAYLOAD }));
    let mut b = header(99, 0, 0);
    assert_eq!(decode_frame(&mut b), Err(WireError::UnknownKind(99)));
    let mut b = header(12, 1, 0);
    assert_eq!(decode_frame(&mut b), Err(WireError::BadFlags { kind: 12, flags: 1 }));
    let mut b = header(12, 0, 0);
    b[0] = 0;
    assert!(matches!(decode_frame(&mut b), Err(WireError::BadMagic(_))));
    let mut b = header(12, 0, 0);
    b[7] = 1;
    assert_eq!(decode_frame(&mut b), Err(WireError::Reserved));
}

#[test]
fn malformed_payloads_are_refused() {
    let mut b = header(3, 0, 4);
    b.put_u32(0);
    assert!(matches!(decode_frame(&mut b), Err(WireError::BadLength { kind: "ack", .. })));
    let mut b = header(7, 0, 12);
    b.put_u64(0);
    b.put_u32(100);
    assert!(matches!(decode_frame(&mut b), Err(WireError::BadField { kind: "resync-request", .. })));
    let mut b = header(17, 0, 2);
    b.put_u8(9);
    b.put_u8(1);
    assert!(matches!(decode_frame(&mut b), Err(WireError::BadField { kind: "state", .. })));
    let mut b = header(19, 0, 2);
    b.put_slice(&[0xff, 0xfe]);
    assert!(matches!(decode_frame(&mut b), Err(WireError::BadField { kind: "goodbye", .. })));
    // A hello claiming a longer name than it carries.
    let mut hello = BytesMut::new();
    let bulk = Frame::Hello(Box::new(sample_hello())).encode_head(0, &mut hello);
    assert!(bulk.is_none());
    hello[HEADER_LEN + 5] = 200;
    assert!(matches!(decode_frame(&mut hello), Err(WireError::BadLength { kind: "hello", .. })));
}

fn encoded(h: Hello) -> BytesMut {
    let mut b = BytesMut::new();
    FrameCodec::default().encode(Frame::Hello(Box::new(h)), &mut b).unwrap();
    b
}

#[test]
fn a_version_1_hello_is_the_previous_release_layout() {
    let v1 = encoded(v1_hello());
    let v2 = encoded(sample_hello());
    // Version 2 appends exactly the announced range; everything before it is unchanged,
    // apart from the version number and the flag only version 2 defines.
    assert_eq!(v2.len(), v1.len() + 8);
    assert_eq!(&v1[HEADER_LEN..HEADER_LEN + 4], &1u32.to_be_bytes());
    assert_eq!(&v2[v2.len() - 8..], &[0, 0, 0, 1, 0, 0, 0, 2]);
    // A version 1 hello never carries the version 2 flag, even when the replica is
    // superseded: the previous release would refuse the whole hello for it.
    let superseded_v1 = encoded(Hello { superseded: true, ..v1_hello() });
    assert_eq!(superseded_v1, v1);
}

#[test]
fn hellos_in_versions_this_side_does_not_speak_are_refused_naming_both() {
    for version in [0u32, PROTOCOL_VERSION + 1] {
        let mut b = encoded(sample_hello());
        b[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&version.to_be_bytes());
        let Err(WireError::BadField { kind: "hello", reason }) = decode_frame(&mut b) else {
            panic!("version {version} was accepted")
        };
        assert!(reason.contains(&format!("protocol version {version}")), "{reason}");
        assert!(reason.contains(&format!("speaks 1 to {PROTOCOL_VERSION}")), "{reason}");
    }
}

#[test]
fn a_version_1_hello_with_the_version_2_flag_or_trailer_is_refused() {
    let mut b = encoded(v1_hello());
    let flags_at = b.len() - 3 - 32 - 1;
    b[flags_at] |= 4;
    let Err(WireError::BadField { reason, .. }) = decode_frame(&mut b) else { panic!("flag 4 accepted in v1") };
    assert!(reason.contains("undefined flags 0x05 for version 1"), "{reason}");
    // A version 2 layout labelled version 1 has the wrong length for it.
    let mut b = encoded(sample_hello());
    b[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&1u32.to_be_bytes());
    assert!(matches!(decode_frame(&mut b), Err(WireError::BadLength { kind: "hello", .. })));
    // A version 2 hello must speak its own version.
    let mut b = encoded(sample_hello());
    let n = b.len();
    b[n - 4..].copy_from_slice(&1u32.to_be_bytes());
    let Err(WireError::BadField { reason, .. }) = decode_frame(&mut b) else { panic!("range 1..1 accepted in v2") };
    assert!(reason.contains("a version 2 hello announcing versions 1 to 1"), "{reason}");
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let valid: Vec<BytesMut> = samples()
        .into_iter()
        .map(|f| {
            let mut b = BytesMut::new();
            FrameCodec::default().encode(f, &mut b).unwrap();
            b
        })
        .collect();
    for _ in 0..20_000 {
        let mut data = valid[rng.random_range(0..valid.len())].to_vec();
        for _ in 0..rng.random_range(1..6) {
            let i = rng.random_range(0..data.len());
            data[i] = rng.random();
        }
        if rng.random_bool(0.3) {
            data.truncate(rng.random_range(0..data.len()));
        }
        let (frames, _) = decode_all(&data);
        for env in frames {
            let mut again = encode_envelope(&env);
            assert_eq!(decode_frame(&mut again), Ok(Some(env)));
        }
    }
}
