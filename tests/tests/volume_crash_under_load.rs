//! Safety at full speed: the primary is killed while fio (an independent NBD client, its
//! `nbd` engine) writes as fast as it can, four jobs at once, 4 KiB random writes and 1 MiB
//! sequential ones, a FLUSH every 16 writes, every block stamped with a crc32c. fio saves,
//! when its server vanishes, which writes had completed; after the failover fio reads back
//! every one of them from the new primary and checks each block's checksum and identity.
//! Protocol C acknowledges a write only once the peer has it, so every completed write must
//! be there, flushed or not. Three kills, alternating the primary; the killed node returns
//! as secondary and is resynced before the next round. Needs root and fio
//! (`scripts/test.sh` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use hapair_tests::replica_proc::{ReplicaPair, VolumeSpec, in_sync};
use rand::{Rng, SeedableRng};

const HARNESS: &str = env!("CARGO_BIN_EXE_replica-harness");

/// The fio job file: the same jobs write, and later verify what they wrote.
fn job_file(socket: &Path, phase: &str) -> String {
    format!(
        "[global]
ioengine=nbd
uri=nbd+unix:///?socket={socket}
iodepth=1
verify=crc32c
fsync=16
{phase}

[small]
rw=randwrite
bs=4k
size=32m
numjobs=2
offset=0
offset_increment=32m

[large]
rw=write
bs=1m
size=384m
numjobs=2
offset=64m
offset_increment=384m
",
        socket = socket.display()
    )
}

fn fio(dir: &Path, name: &str, job: &str) -> Output {
    let path = dir.join(name);
    std::fs::write(&path, job).unwrap();
    Command::new("fio")
        .arg(&path)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running fio ({e}): scripts/test.sh installs the fio package"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn every_write_fio_completed_reads_back_intact_after_a_kill_under_load() {
    let mut pair = ReplicaPair::start(HARNESS, &VolumeSpec { size: "1Gi".into(), ..VolumeSpec::default() });
    let seed = 7;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut primary, mut secondary) = ("a", "b");
    pair.node(primary).promote(1).unwrap();
    for round in 0..3u64 {
        let dir = tempfile::Builder::new().prefix("hapair-fio").tempdir().unwrap();
        let socket = pair.volume.socket(primary);
        let job = job_file(&socket, "verify_state_save=1\ndo_verify=0");
        let writer = {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || fio(&dir, "write.fio", &job))
        };
        let after = rng.random_range(400..900);
        std::thread::sleep(Duration::from_millis(after));
        pair.node(primary).kill();
        let wrote = writer.join().unwrap();
        let wrote_text = text(&wrote);
        assert!(
            !wrote.status.success(),
            "round {round}: fio finished before the kill {after} ms in, so nothing was tested:\n{wrote_text}"
        );
        let states = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with("verify.state")))
            .count();
        assert_eq!(states, 4, "round {round}: fio saved no verify state for every job:\n{wrote_text}");

        pair.node(secondary).wait("the primary's loss", Duration::from_secs(10), |s| s["connection"] != "Connected");
        pair.node(secondary).promote(round + 2).unwrap();
        let verify = job_file(&pair.volume.socket(secondary), "verify_only=1\nverify_state_load=1");
        let checked = fio(dir.path(), "verify.fio", &verify);
        let checked_text = text(&checked);
        assert!(
            checked.status.success() && !checked_text.contains("verify:"),
            "round {round} (seed {seed}): a write fio completed before the kill did not read back intact \
             from the new primary:\n{checked_text}\n--- write phase:\n{wrote_text}"
        );
        let read = checked_text.lines().find(|l| l.contains("READ:")).unwrap_or("").trim().to_string();
        assert!(!read.is_empty(), "round {round}: the verify phase read nothing:\n{checked_text}");
        eprintln!("round {round}: killed {after} ms into the load; verified on {secondary}: {read}");

        pair.restart(primary);
        pair.node(primary).wait("resync of the returning node", Duration::from_secs(120), in_sync);
        pair.node(secondary).wait("resync of the returning node", Duration::from_secs(120), in_sync);
        std::mem::swap(&mut primary, &mut secondary);
    }
}
