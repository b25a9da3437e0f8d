//! `deletionPolicy: Wipe` for real: a standalone controller (`hapair-operator standalone`
//! in the client's namespace) and two enrolled agents run a group whose flow mounts a
//! replicated volume (nbdfuse + loop through `scripts/nbd-attach-fuse.sh`, ext4) and writes
//! a marker file on it. Once both replicas hold the marker, the HaGroup and the
//! ReplicatedVolume manifests are deleted: the agents stop the flow and demote, the
//! controller then asks both nodes to wipe, and both backing files end up all zeroes, with
//! their size kept and their space freed. The controller forgets the volume's UUID and logs
//! the outcome; a ReplicatedVolume with the default `Retain` stays untouched in the same
//! run, which is the other half of "no data is wiped unless Wipe".
//!
//! A second test wipes a replica kept on a block device (a loop device standing in for an
//! LVM volume or a disk partition): the discard goes through `fallocate` on the device.
//!
//! Cleanup (even on failure): agents and controller first (their guards), then every
//! nbdfuse process and loop device whose files live under this test's directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hapair_agent::replication::store::{self, BackingPlan, MetaLocation, volume_uuid_bytes};
use hapair_agent::replication::wipe::{Wiped, wipe};
use hapair_tests::agents::{Agent, GROUP, group_manifest, role, status, volume_report};
use hapair_tests::controller::{Controller, enroll, unenrolled_config};
use hapair_tests::mounts::{AttachDirCleanup, LoopGuard, attach_script};
use hapair_tests::netns::{require_root, wait_for};
use hapair_tests::topology::{C0, TwoServersAndClient};

const UP: Duration = Duration::from_secs(60);
/// Written on the volume, so that it can be found in the raw backing files.
const MARKER: &str = "hapair-wipe-test-marker";
const UUID_KEY: &str = "default/data";

fn manifest(dir: &Path) -> String {
    let attach_dir = dir.join("attach");
    let helper =
        format!("HAPAIR_ATTACH_DIR={} {}", attach_dir.display(), attach_script().canonicalize().unwrap().display());
    let mount = dir.join("mnt");
    let written = dir.join("written");
    // Once, on the first primary: a 1 MiB file of markers, fsynced, then a flag file.
    let writer = format!(
        "[ -e {w} ] || {{ yes {MARKER} | head -c 1048576 > {m}/marker && sync {m}/marker && touch {w}; }}",
        w = written.display(),
        m = mount.display()
    );
    let flow = format!(
        "      flow:\n        - name: data\n          volume: {{volumeRef: data, mountPath: {m}, mkfs: true, attachCommand: '{helper} attach', detachCommand: '{helper} detach'}}\n          timeout: 60s\n        - name: writer\n          exec: {{start: '{writer}', stop: 'true'}}\n          timeout: 30s\n",
        m = mount.display()
    );
    group_manifest("controller", &flow)
}

fn volume_manifest(dir: &Path, name: &str, port: u16, policy: &str) -> String {
    format!(
        "apiVersion: hapair.dev/v1alpha1\nkind: ReplicatedVolume\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  group: web\n  size: 64Mi\n  port: {port}\n  deletionPolicy: {policy}\n  backing:\n    - {{node: a, path: {a}, address: 198.18.1.1}}\n    - {{node: b, path: {b}, address: 198.18.1.2}}\n",
        a = dir.join(format!("{name}-a.img")).display(),
        b = dir.join(format!("{name}-b.img")).display()
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn state_file(controller: &Controller) -> serde_json::Value {
    let text = std::fs::read_to_string(controller.state.join("state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn deleting_a_volume_with_deletion_policy_wipe_erases_both_replicas_and_retain_keeps_data() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let attach_dir = dir.join("attach");
    std::fs::create_dir_all(&attach_dir).unwrap();
    std::fs::create_dir_all(dir.join("mnt")).unwrap();
    let _attached = AttachDirCleanup(attach_dir.clone());
    let topo = TwoServersAndClient::build().unwrap();

    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("data.yaml"), volume_manifest(&dir, "data", 7790, "Wipe")).unwrap();
    let mut controller = Controller::start(&topo.client, C0, &dir, &manifest(&dir));

    let mut agents = Vec::new();
    for (node, ns) in [("a", &topo.a), ("b", &topo.b)] {
        let home = dir.join(node);
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("agent.yaml"), unenrolled_config(&home)).unwrap();
        enroll(ns, &controller, node, &home);
        let mut agent = Agent::with_config(node, &home);
        agent.start(ns);
        agents.push(agent);
    }
    let ns_of = |node: &str| if node == "a" { &topo.a } else { &topo.b };

    // The pair runs; the marker is written through the primary and replicated (protocol C).
    let primary = wait_for(UP, || ["a", "b"].into_iter().find(|n| role(ns_of(n), GROUP).as_deref() == Some("Primary")));
    let primary =
        primary.unwrap_or_else(|| panic!("nobody took the service: a {:?}, b {:?}", status(&topo.a), status(&topo.b)));
    let standby = if primary == "a" { "b" } else { "a" };
    assert!(
        wait_for(UP, || dir.join("written").exists().then_some(())).is_some(),
        "the writer step did not run: {:?}",
        status(ns_of(primary))
    );
    let synced = wait_for(UP, || {
        let v = volume_report(ns_of(standby))?;
        (v["diskState"] == "UpToDate" && v["connection"] == "Connected").then_some(())
    });
    assert!(synced.is_some(), "the standby's replica is not in sync: {:?}", volume_report(ns_of(standby)));
    let images = [dir.join("data-a.img"), dir.join("data-b.img")];
    let sizes: Vec<u64> = images.iter().map(|i| std::fs::metadata(i).unwrap().len()).collect();
    for image in &images {
        assert!(contains(&std::fs::read(image).unwrap(), MARKER.as_bytes()), "{} lacks the marker", image.display());
    }
    let uuid = state_file(&controller)["volumeUuids"][UUID_KEY].as_str().map(str::to_string);
    assert!(uuid.is_some(), "the controller gave the volume no UUID: {}", state_file(&controller));

    // A Retain volume nobody uses, with data of its own at its backing paths: deleting it
    // must leave them alone. (The controller never delivered it, so it has no UUID.)
    for node in ["a", "b"] {
        std::fs::write(dir.join(format!("keep-{node}.img")), MARKER.repeat(1000)).unwrap();
    }
    std::fs::write(manifests.join("keep.yaml"), volume_manifest(&dir, "keep", 7791, "Retain")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    std::fs::remove_file(manifests.join("keep.yaml")).unwrap();

    // Delete the group and the volume: the flow stops, the replicas close, both are wiped.
    std::fs::remove_file(manifests.join("web.yaml")).unwrap();
    std::fs::remove_file(manifests.join("data.yaml")).unwrap();
    let wiped = wait_for(UP, || {
        images.iter().all(|i| std::fs::read(i).is_ok_and(|bytes| bytes.iter().all(|b| *b == 0))).then_some(())
    });
    assert!(
        wiped.is_some(),
        "the replicas were not wiped: a {:?}\nb {:?}\ncontroller state {}",
        status(&topo.a),
        status(&topo.b),
        state_file(&controller)
    );
    for (image, size) in images.iter().zip(&sizes) {
        let meta = std::fs::metadata(image).unwrap();
        assert_eq!(meta.len(), *size, "{} changed size", image.display());
        assert!(meta.blocks() * 512 < 1 << 20, "{} still holds {} bytes", image.display(), meta.blocks() * 512);
    }
    let forgotten = wait_for(UP, || {
        let state = state_file(&controller);
        (state["volumeUuids"].get(UUID_KEY).is_none() && state["wiping"].as_object().is_none_or(|w| w.is_empty()))
            .then_some(())
    });
    assert!(forgotten.is_some(), "the controller did not finish the wipe: {}", state_file(&controller));
    let log = controller.log_tail(400);
    assert!(log.contains("Wiping") && log.contains("every replica answered"), "{log}");
    for agent in &agents {
        let log = agent.log_tail(2000);
        assert!(log.contains("VolumeWiped") && log.contains("discarded"), "{log}");
    }
    for node in ["a", "b"] {
        let kept = std::fs::read(dir.join(format!("keep-{node}.img"))).unwrap();
        assert_eq!(kept, MARKER.repeat(1000).into_bytes(), "a Retain volume's backing was touched");
    }
    assert!(agents.iter_mut().all(Agent::running));
    controller.kill();
    drop(agents);
}

#[test]
fn a_replica_on_a_block_device_is_discarded_and_its_metadata_blanked() {
    require_root();
    const SIZE: u64 = 16 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("disk.img");
    // A device with room for the data and the internal metadata, all zeroes like a new LV.
    let len = SIZE + store_metadata_len(SIZE);
    std::fs::File::create(&file).unwrap().set_len(len).unwrap();
    let out = hapair_tests::netns::run("losetup", &["--find", "--show", &file.display().to_string()]).unwrap();
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(device.starts_with("/dev/loop"), "losetup said {device:?}");
    let _loop = LoopGuard(device.clone());
    let uuid = volume_uuid_bytes("3d0c1f8e-2a4b-4c6d-8e0f-1a2b3c4d5e6f");
    let plan = BackingPlan {
        data_path: PathBuf::from(&device),
        meta: MetaLocation::Internal,
        volume_uuid: uuid,
        size: SIZE,
        al_slots: 7,
        create_missing: false,
        initialize_blank: true,
    };
    drop(store::open(&plan, 1).unwrap());
    {
        use std::os::unix::fs::FileExt;
        let dev = std::fs::OpenOptions::new().write(true).open(&device).unwrap();
        dev.write_all_at(&MARKER.repeat(SIZE as usize / MARKER.len()).into_bytes(), 0).unwrap();
        dev.sync_all().unwrap();
    }
    assert!(contains(&std::fs::read(&device).unwrap(), MARKER.as_bytes()));

    let other = volume_uuid_bytes("5b1e0f6a-93c2-4d7e-8a1f-0c2d3e4f5a6b");
    let refused = wipe(Path::new(&device), &MetaLocation::Internal, other).unwrap_err();
    assert!(refused.is_final(), "{refused}");
    assert!(contains(&std::fs::read(&device).unwrap(), MARKER.as_bytes()), "a refused wipe touched the device");

    let done = wipe(Path::new(&device), &MetaLocation::Internal, uuid).unwrap();
    assert!(matches!(done, Wiped::Erased { data_bytes: SIZE, .. }), "{done:?}");
    let bytes = std::fs::read(&device).unwrap();
    assert_eq!(bytes.len() as u64, len);
    assert!(bytes.iter().all(|b| *b == 0), "the device still holds data after the wipe");
    // What the device showed is what its backing file holds.
    assert!(std::fs::read(&file).unwrap().iter().all(|b| *b == 0));
}

/// The metadata area a volume of `size` bytes needs with 7 activity-log slots.
fn store_metadata_len(size: u64) -> u64 {
    hapair_agent::replication::metadata::metadata_len(size, 7)
}
