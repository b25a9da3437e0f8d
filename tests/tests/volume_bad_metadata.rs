//! A replica refuses foreign or damaged metadata with a clear error and leaves the data
//! area untouched: a wrong volume UUID, a size mismatch, a truncated backing, checksum
//! failures and foreign magic. Runs the harness as a real process (inside a namespace so
//! its replication port is its own). Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use hapair_tests::netns::{Netns, require_root};
use hapair_tests::replica_proc::{ReplicaProc, TestVolume, VolumeSpec};

const HARNESS: &str = env!("CARGO_BIN_EXE_replica-harness");
const SIZE: u64 = 16 << 20;

fn data_digest(path: &Path) -> u128 {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    xxhash_rust::xxh3::xxh3_128(&buf)
}

#[test]
fn foreign_or_damaged_metadata_is_refused_and_data_is_untouched() {
    require_root();
    let ns = Netns::new("hmd").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = VolumeSpec { size: "16Mi".into(), ..VolumeSpec::default() };
    let vol = TestVolume::new(dir.path(), &spec, "127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
    let start = |config: &Path| ReplicaProc::start(HARNESS, Some(&ns), config, "a", &vol.socket("a"), &["--no-create"]);
    let create = ReplicaProc::start(HARNESS, Some(&ns), &vol.path, "a", &vol.socket("a"), &[]);
    let mut p = create.unwrap();
    p.shutdown();
    let backing = vol.backing("a");
    std::fs::OpenOptions::new().write(true).open(&backing).unwrap().write_all_at(&[0x5a; 65536], 4 << 20).unwrap();
    let digest = data_digest(&backing);
    assert!(start(&vol.path).is_ok(), "the volume's own metadata is accepted");

    let other_uuid = vol.variant("uuid.json", |c| c["uuid"] = "9f0e8d7c-6b5a-4948-8372-615243342516".into());
    let err = start(&other_uuid).unwrap_err();
    assert!(err.contains("belongs to volume") && err.contains("9f0e8d7c-6b5a-4948-8372-615243342516"), "{err}");

    let smaller = vol.variant("small.json", |c| c["spec"]["size"] = "8Mi".into());
    let err = start(&smaller).unwrap_err();
    assert!(err.contains("16777216-byte volume") && err.contains("8388608"), "{err}");
    let bigger = vol.variant("big.json", |c| c["spec"]["size"] = "32Mi".into());
    let err = start(&bigger).unwrap_err();
    assert!(err.contains("truncated or too small"), "{err}");
    assert_eq!(data_digest(&backing), digest);

    // Both superblock copies fail their checksums.
    let len = std::fs::metadata(&backing).unwrap().len();
    let damaged = dir.path().join("damaged.img");
    std::fs::copy(&backing, &damaged).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&damaged).unwrap();
    for slot in 1..=2u64 {
        f.write_all_at(&[0xff], len - slot * 4096 + 70).unwrap();
    }
    drop(f);
    std::fs::rename(&backing, dir.path().join("good.img")).unwrap();
    std::fs::rename(&damaged, &backing).unwrap();
    let err = start(&vol.path).unwrap_err();
    assert!(err.contains("checksum"), "{err}");
    assert_eq!(data_digest(&backing), digest);

    // Foreign magic where the superblocks belong.
    let f = std::fs::OpenOptions::new().write(true).open(&backing).unwrap();
    for slot in 1..=2u64 {
        f.write_all_at(b"XFSB....", len - slot * 4096).unwrap();
    }
    drop(f);
    let err = start(&vol.path).unwrap_err();
    assert!(err.contains("no hapair metadata") && err.contains("XFSB"), "{err}");
    assert_eq!(data_digest(&backing), digest);

    // A truncated backing.
    std::fs::rename(dir.path().join("good.img"), &backing).unwrap();
    std::fs::OpenOptions::new().write(true).open(&backing).unwrap().set_len(SIZE + 4096).unwrap();
    let err = start(&vol.path).unwrap_err();
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(data_digest(&backing), digest, "the data area is never touched");
}
