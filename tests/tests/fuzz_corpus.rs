//! Runs the fuzz targets' checks (`fuzz/fuzz_targets`) over every committed corpus file,
//! so the corpus of the decoders and of the manifest parser is exercised by every CI run
//! without nightly Rust. With `HAPAIR_WRITE_FUZZ_SEEDS=1` the seed inputs are (re)written
//! first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use hapair_agent::nbd::proto::{Action, Op, run_session};
use hapair_agent::replication::generation::Generations;
use hapair_agent::replication::wire::{
    Envelope, Frame, HEADER_LEN, Hello, PROTOCOL_VERSION, Resolution, WireDisk, WirePolicy, WireProtocol, WireRole,
    decode_all, decode_frame, encode_envelope,
};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    out.sort();
    out
}

fn seed_frames() -> Vec<Frame> {
    // The previous release's layout (version 1) first, so its seed file keeps its bytes.
    let hello = Hello {
        version: 1,
        speaks: hapair_agent::protocol::Range::V1,
        node: "node-a".into(),
        volume_uuid: [7; 16],
        size: 64 << 20,
        gens: Generations { current: 0x1234, bitmap: 0x1000, history: [0x900, 0] },
        disk: WireDisk::UpToDate,
        role: WireRole::Primary,
        crashed_primary: false,
        data_zeroed: true,
        superseded: false,
        dirty_blocks: 3,
        promoted_epoch: 2,
        promoted_at_ms: 1_700_000_000_000,
        format_id: 99,
        policy: WirePolicy::DiscardYoungerPrimary,
        protocol: WireProtocol::C,
        resolution: Some(Resolution::DiscardLocal),
    };
    let hello_v2 = Hello {
        version: PROTOCOL_VERSION,
        speaks: hapair_agent::protocol::Range { min: 1, max: 2 },
        superseded: true,
        role: WireRole::Secondary,
        ..hello.clone()
    };
    vec![
        Frame::Hello(Box::new(hello)),
        Frame::Data { seq: 1, offset: 4096, fua: true, data: Bytes::from(vec![0xab; 4096]) },
        Frame::Ack { seq: 1, ok: true },
        Frame::Flush { seq: 2 },
        Frame::FlushAck { seq: 2, ok: true },
        Frame::Zero { seq: 3, offset: 0, len: 65536, fua: false, punch: true },
        Frame::ResyncRequest { offset: 1 << 20, len: 262_144 },
        Frame::ResyncReply { offset: 1 << 20, data: Bytes::from(vec![5; 4096]), zero_len: 0 },
        Frame::ResyncReply { offset: 0, data: Bytes::new(), zero_len: 8192 },
        Frame::ResyncAck { offset: 1 << 20, len: 4096 },
        Frame::SyncDone { gens: Generations { current: 0x1234, bitmap: 0, history: [0x1000, 0x900] } },
        Frame::Bitmap { start: 0, last: true, runs: Bytes::from_static(&[10, 4, 100, 1]) },
        Frame::Ping,
        Frame::PingAck,
        Frame::VerifyRequest { offset: 0, len: 1 << 20 },
        Frame::VerifyReply { offset: 0, digests: vec![1, 2, 3] },
        Frame::OutOfSync { offset: 8192, len: 4096 },
        Frame::State { role: WireRole::Secondary, disk: WireDisk::Inconsistent },
        Frame::StartResync,
        Frame::Goodbye { reason: "split brain".into() },
        Frame::Hello(Box::new(hello_v2)),
    ]
}

fn write_frame_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut stream = Vec::new();
    for (i, f) in seed_frames().into_iter().enumerate() {
        let bytes = encode_envelope(&Envelope { epoch: 3, frame: f }).to_vec();
        std::fs::write(dir.join(format!("seed-{i:02}")), &bytes).unwrap();
        stream.extend_from_slice(&bytes);
    }
    std::fs::write(dir.join("seed-stream"), &stream).unwrap();
    std::fs::write(dir.join("seed-truncated"), &stream[..stream.len() / 2]).unwrap();
    let mut oversized = encode_envelope(&Envelope { epoch: 1, frame: Frame::Ping }).to_vec();
    oversized[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(dir.join("seed-oversized"), oversized).unwrap();
    // Hellos in versions no release speaks: the decoder must refuse them, not misread them.
    let hello = encode_envelope(&Envelope { epoch: 1, frame: seed_frames().swap_remove(0) }).to_vec();
    for version in [0u32, 3] {
        let mut bytes = hello.clone();
        bytes[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&version.to_be_bytes());
        std::fs::write(dir.join(format!("seed-hello-version-{version}")), bytes).unwrap();
    }
}

fn nbd_seed(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    [b"IHAVEOPT".as_slice(), &option.to_be_bytes(), &(data.len() as u32).to_be_bytes(), data].concat()
}

fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Vec<u8> {
    [
        &0x2560_9513u32.to_be_bytes()[..],
        &flags.to_be_bytes(),
        &kind.to_be_bytes(),
        &7u64.to_be_bytes(),
        &offset.to_be_bytes(),
        &len.to_be_bytes(),
    ]
    .concat()
}

fn write_nbd_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let flags = 3u32.to_be_bytes();
    let go = opt(7, &[0, 0, 0, 0, 0, 1, 0, 3]);
    let structured = opt(8, &[]);
    let mut write = req(1, 1, 4096, 512);
    write.extend([0x55; 512]);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("go-read", nbd_seed(&[&flags, &go, &req(0, 0, 0, 4096)])),
        ("structured-write-flush", nbd_seed(&[&flags, &structured, &go, &write, &req(3, 0, 0, 0), &req(2, 0, 0, 0)])),
        ("export-name", nbd_seed(&[&flags, &opt(1, b""), &req(4, 0, 0, 65536), &req(6, 2, 8192, 4096)])),
        (
            "options",
            nbd_seed(&[
                &flags,
                &opt(3, &[]),
                &opt(5, &[]),
                &opt(6, &[0, 0, 0, 3, b'v', b'o', b'l', 0, 0]),
                &opt(99, b"x"),
            ]),
        ),
        ("invalid-requests", nbd_seed(&[&flags, &go, &req(42, 0, 0, 512), &req(0, 0, 1 << 20, 512), &req(0, 0, 3, 5)])),
        (
            "meta-context",
            nbd_seed(&[
                &flags,
                &structured,
                &opt(10, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15]),
                &opt(10, b"base:allocation"),
            ]),
        ),
        ("abort", nbd_seed(&[&flags, &opt(2, &[])])),
    ];
    for (name, data) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    }
}

#[test]
fn frame_decoder_corpus_decodes_without_panics_and_round_trips() {
    let dir = corpus("frame_decoder");
    if std::env::var_os("HAPAIR_WRITE_FUZZ_SEEDS").is_some() {
        write_frame_seeds(&dir);
    }
    let inputs = files(&dir);
    assert!(inputs.len() >= 20, "the frame decoder corpus has only {} files", inputs.len());
    let mut decoded = 0;
    for (path, data) in inputs {
        let (frames, _) = decode_all(&data);
        for env in frames {
            let mut again = encode_envelope(&env);
            assert_eq!(decode_frame(&mut again), Ok(Some(env)), "{} does not round-trip", path.display());
            decoded += 1;
        }
    }
    assert!(decoded >= 20, "only {decoded} frames decoded from the corpus");
}

#[test]
fn the_previous_release_hello_in_the_corpus_still_decodes_as_version_1() {
    // seed-00 was written by the release before replication protocol version 2.
    let data = std::fs::read(corpus("frame_decoder").join("seed-00")).unwrap();
    let (frames, err) = decode_all(&data);
    assert_eq!(err, None);
    let [Envelope { frame: Frame::Hello(h), .. }] = frames.as_slice() else { panic!("{frames:?}") };
    assert_eq!((h.version, h.speaks, h.superseded), (1, hapair_agent::protocol::Range::V1, false));
    assert_eq!(h.node, "node-a");
}

#[test]
fn hellos_in_unspoken_versions_are_refused() {
    for version in [0, 3] {
        let data = std::fs::read(corpus("frame_decoder").join(format!("seed-hello-version-{version}"))).unwrap();
        let (frames, err) = decode_all(&data);
        assert!(frames.is_empty(), "version {version}: {frames:?}");
        let reason = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(reason.contains(&format!("protocol version {version}, this side speaks 1 to 2")), "{reason}");
    }
}

#[test]
fn nbd_request_corpus_parses_without_panics_and_stays_in_bounds() {
    let dir = corpus("nbd_request");
    if std::env::var_os("HAPAIR_WRITE_FUZZ_SEEDS").is_some() {
        write_nbd_seeds(&dir);
    }
    let inputs = files(&dir);
    assert!(inputs.len() >= 7, "the NBD corpus has only {} files", inputs.len());
    let mut commands = 0;
    for (path, data) in inputs {
        let (actions, _) = run_session(&data);
        for a in actions {
            if let Action::Execute(cmd) = a {
                let (offset, len) = match cmd.op {
                    Op::Read { offset, len } | Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
                        (offset, u64::from(len))
                    }
                    Op::Write { offset, data, .. } => (offset, data.len() as u64),
                    Op::Flush => (0, 0),
                };
                assert!(offset + len <= 1 << 20, "{}: command outside the export", path.display());
                commands += 1;
            }
        }
    }
    assert!(commands >= 5, "only {commands} commands parsed from the corpus");
}

/// The manifest seeds: every example, every invalid-manifest fixture and every hostile one.
fn write_manifest_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [
        "../examples",
        "fixtures/invalid",
        "fixtures/hostile",
        "fixtures/hostile/typos",
        "fixtures/hostile/names",
        "fixtures/hostile/parse",
    ];
    for source in sources {
        for (path, data) in files(&root.join(source)) {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let tag = source.trim_start_matches("../").replace('/', "-");
            std::fs::write(dir.join(format!("seed-{tag}-{name}")), data).unwrap();
        }
    }
}

#[test]
fn manifest_parse_corpus_parses_without_panics_and_accepts_only_valid_names() {
    use hapair_crds::manifest::parse_documents;
    use hapair_crds::validation::{check_namespace, check_object_name};

    let dir = corpus("manifest_parse");
    if std::env::var_os("HAPAIR_WRITE_FUZZ_SEEDS").is_some() {
        write_manifest_seeds(&dir);
    }
    let inputs = files(&dir);
    assert!(inputs.len() >= 30, "the manifest corpus has only {} files", inputs.len());
    let (mut accepted, mut refused) = (0, 0);
    for (path, data) in inputs {
        let Ok(text) = std::str::from_utf8(&data) else { continue };
        let (documents, errors) = parse_documents("fuzz.yaml", text);
        for doc in &documents {
            assert!(check_object_name(doc.object.name()).is_ok(), "{}", path.display());
            assert!(check_namespace(doc.object.namespace()).is_ok(), "{}", path.display());
        }
        assert!(errors.iter().all(|e| e.file == "fuzz.yaml"), "{}", path.display());
        accepted += documents.len();
        refused += errors.len();
    }
    // The corpus holds both kinds, so both paths are exercised.
    assert!(accepted >= 5 && refused >= 20, "accepted {accepted}, refused {refused}");
}
