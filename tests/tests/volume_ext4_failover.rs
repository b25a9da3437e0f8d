//! A real ext4 filesystem on the replicated volume, attached with `nbdfuse` and a loop
//! device (`scripts/nbd-attach-fuse.sh`), survives killing the primary: on the new primary
//! the filesystem checks clean and every file whose fsync returned before the kill is
//! intact. Also the volume step's pieces in-process: mkfs on first use only when asked,
//! and demotion only after unmount and detach. Needs root, /dev/fuse and loop devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hapair_agent::replication::replica::{Replica, ReplicaOptions};
use hapair_agent::volume_step::attach::{self, AttachMethod};
use hapair_agent::volume_step::{self, Stage, StepPlan, filesystem};
use hapair_crds::nodeapi::VolumeConfig;
use hapair_tests::mounts::{FuseAttachGuard, MountGuard, is_mounted};
use hapair_tests::netns::require_root;
use hapair_tests::replica_proc::{ReplicaPair, VolumeSpec};
use rand::{Rng, RngCore, SeedableRng};

const HARNESS: &str = env!("CARGO_BIN_EXE_replica-harness");

fn script() -> String {
    hapair_tests::mounts::attach_script().display().to_string()
}

fn fuse_attach() -> AttachMethod {
    AttachMethod::Command { attach: format!("{} attach", script()), detach: Some(format!("{} detach", script())) }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn digest(path: &Path) -> u128 {
    xxhash_rust::xxh3::xxh3_128(&std::fs::read(path).unwrap())
}

#[test]
fn ext4_on_the_volume_survives_killing_the_primary() {
    let rt = runtime();
    let mut pair = ReplicaPair::start(HARNESS, &VolumeSpec { size: "256Mi".into(), ..VolumeSpec::default() });
    pair.a.promote(1).unwrap();
    let mnt_dir = tempfile::tempdir().unwrap();
    let mnt_a = mnt_dir.path().join("a");

    let dev_a = rt.block_on(attach::attach(&fuse_attach(), &pair.volume.socket("a"), Duration::from_secs(60))).unwrap();
    let attached_a = FuseAttachGuard::new(&dev_a.display().to_string());
    assert!(rt.block_on(filesystem::ensure(&dev_a, "ext4", true)).unwrap(), "a blank volume gets its filesystem");
    rt.block_on(filesystem::mount(&dev_a, &mnt_a, "ext4", &[])).unwrap();
    let mounted_a = MountGuard(mnt_a.clone());

    // Files whose fsync returned are recorded; their contents must survive.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut synced: Vec<(PathBuf, u128)> = Vec::new();
    for i in 0..40 {
        let path = mnt_a.join(format!("synced-{i}.bin"));
        let mut data = vec![0u8; rng.random_range(1..300) * 1024];
        rng.fill_bytes(&mut data);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        std::fs::File::open(&mnt_a).unwrap().sync_all().unwrap();
        synced.push((path.file_name().map(PathBuf::from).unwrap(), xxhash_rust::xxh3::xxh3_128(&data)));
    }
    // Writes still in flight when the node dies may be lost, but must not break anything.
    for i in 0..10 {
        let mut data = vec![0u8; 512 << 10];
        rng.fill_bytes(&mut data);
        std::fs::write(mnt_a.join(format!("unsynced-{i}.bin")), &data).unwrap();
    }
    pair.a.kill();
    drop(mounted_a);
    drop(attached_a);

    pair.b.wait("the primary's loss", Duration::from_secs(10), |s| s["connection"] != "Connected");
    pair.b.promote(2).unwrap();
    let dev_b = rt.block_on(attach::attach(&fuse_attach(), &pair.volume.socket("b"), Duration::from_secs(60))).unwrap();
    let attached_b = FuseAttachGuard::new(&dev_b.display().to_string());
    assert!(
        !rt.block_on(filesystem::ensure(&dev_b, "ext4", true)).unwrap(),
        "the existing filesystem is detected and never recreated"
    );
    let mnt_b = mnt_dir.path().join("b");
    // Mounting replays the journal; then every fsynced file must be intact.
    rt.block_on(filesystem::mount(&dev_b, &mnt_b, "ext4", &[])).unwrap();
    let mounted_b = MountGuard(mnt_b.clone());
    for (name, sum) in &synced {
        let p = mnt_b.join(name);
        assert!(p.exists(), "{} was fsynced before the kill but is gone", name.display());
        assert_eq!(digest(&p), *sum, "{} was fsynced before the kill but changed", name.display());
    }
    rt.block_on(filesystem::unmount(&mnt_b, Duration::from_secs(30))).unwrap();
    drop(mounted_b);
    let fsck = std::process::Command::new("fsck.ext4").args(["-n", "-f"]).arg(&dev_b).output().unwrap();
    assert!(
        fsck.status.success(),
        "fsck -n is not clean ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    rt.block_on(attach::detach(&fuse_attach(), &dev_b, Duration::from_secs(60))).unwrap();
    attached_b.disarm();
    assert!(!is_mounted(&mnt_b));
}

fn single_replica_volume(dir: &Path) -> VolumeConfig {
    serde_json::from_value(serde_json::json!({
        "name": "step",
        "uuid": "0c7d1e2f-3a4b-4c5d-9e6f-7a8b9c0d1e2f",
        "generation": 1,
        "spec": {
            "group": "g",
            "size": "128Mi",
            "backing": [
                {"node": "a", "path": dir.join("a.img")},
                {"node": "b", "path": dir.join("b.img")},
            ],
            "activityLogExtents": 7,
        },
    }))
    .unwrap()
}

#[test]
fn volume_step_creates_the_filesystem_only_when_asked_and_demotes_after_unmounting() {
    require_root();
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let rt = runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = ReplicaOptions::new(dir.path().join("a.sock"));
        // The peer never answers here: the volume runs degraded, which is all the step needs.
        opts.peer = Some("127.0.0.1:9".parse().unwrap());
        opts.dial = Some(true);
        let replica = Replica::open(&single_replica_volume(dir.path()), "a", opts).await.unwrap();
        let mut plan = StepPlan {
            mount_path: Some(dir.path().join("mnt")),
            fs_type: "ext4".into(),
            mount_options: vec!["noatime".into()],
            mkfs: false,
            attach: fuse_attach(),
            timeout: Duration::from_secs(60),
        };
        // A new replica is Inconsistent: the step may not promote it.
        let err = volume_step::activate(&replica, &plan, 1).await.unwrap_err();
        assert_eq!(err.stage, Stage::Promote, "{err}");
        // The operator forces the first primary (what a forced activation does).
        replica.promote(1, true).await.unwrap();
        replica.demote(false).await.unwrap();

        let err = volume_step::activate(&replica, &plan, 2).await.unwrap_err();
        assert_eq!(err.stage, Stage::Filesystem, "{err}");
        assert!(err.message.contains("mkfs was not requested"), "{err}");
        assert_eq!(replica.status().role, hapair_crds::volume::VolumeRole::Secondary, "rolled back");

        plan.mkfs = true;
        let active = volume_step::activate(&replica, &plan, 3).await.unwrap();
        let guard = FuseAttachGuard::new(&active.device.display().to_string());
        assert!(active.created_filesystem);
        let mnt = dir.path().join("mnt");
        std::fs::write(mnt.join("kept"), b"first use").unwrap();
        let err = replica.demote(false).await.unwrap_err();
        assert!(err.to_string().contains("NBD client"), "demotion waits for the step to detach: {err}");
        volume_step::deactivate(&replica, active, Duration::from_secs(60)).await.unwrap();
        guard.disarm();
        assert!(!is_mounted(&mnt));
        assert_eq!(replica.status().role, hapair_crds::volume::VolumeRole::Secondary);

        let active = volume_step::activate(&replica, &plan, 4).await.unwrap();
        let guard = FuseAttachGuard::new(&active.device.display().to_string());
        assert!(!active.created_filesystem, "second use keeps the filesystem");
        assert_eq!(std::fs::read(mnt.join("kept")).unwrap(), b"first use");
        volume_step::deactivate(&replica, active, Duration::from_secs(60)).await.unwrap();
        guard.disarm();

        // Another filesystem type asked for, mkfs allowed: the mount fails, and the probe
        // after it refuses to format over the ext4 that is there.
        plan.fs_type = "xfs".into();
        let err = volume_step::activate(&replica, &plan, 5).await.unwrap_err();
        assert_eq!(err.stage, Stage::Filesystem, "{err}");
        assert!(err.message.contains("ext4"), "{err}");
        plan.fs_type = "ext4".into();
        let active = volume_step::activate(&replica, &plan, 6).await.unwrap();
        let guard = FuseAttachGuard::new(&active.device.display().to_string());
        assert_eq!(std::fs::read(mnt.join("kept")).unwrap(), b"first use", "nothing was formatted");
        volume_step::deactivate(&replica, active, Duration::from_secs(60)).await.unwrap();
        guard.disarm();
        replica.shutdown().await.unwrap();
    });
}
