//! Replicated volumes in the agent runtime, for real: two `hapair-agent run --bundle`
//! processes in network namespaces replicate a 64 MiB volume (sparse backing files) over
//! the topology's second link, watched by a `replication` monitor (healthy while the pair
//! is in sync, alerting once the primary is gone). The flow is volume (nbdfuse + loop device through
//! `scripts/nbd-attach-fuse.sh`, mkfs ext4 on first use, mount) then an exec step writing
//! files with fsync. The primary's agent is killed with SIGKILL; the standby promotes,
//! mounts, and every fsynced file is intact; its status shows the volume's state. Removing
//! the group then unmounts, flushes, detaches and demotes, and `e2fsck -n` finds the
//! standby's copy clean.
//!
//! The agents mount inside their own mount namespaces (`ip netns exec` makes one), so the
//! test looks at the mount through `nsenter` into the agent's. Cleanup (even on failure):
//! agents first, then every nbdfuse process and loop device whose files live under this
//! test's directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use hapair_tests::agents::{
    Agent, BundleSpec, GROUP, bundle, group, metric, status, volume_report, wait_role, write_file,
};
use hapair_tests::mounts::{AttachDirCleanup, attach_script};
use hapair_tests::netns::{Netns, require_root, wait_for};
use hapair_tests::topology::TwoServersAndClient;

const UP: Duration = Duration::from_secs(30);
const FILES: usize = 12;

/// Runs `sh -c script` in the mount namespace of process `pid`.
fn in_mounts_of(pid: u32, script: &str) -> (bool, String) {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--", "sh", "-c", script])
        .output()
        .unwrap_or_else(|e| panic!("nsenter: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn monitor_report(ns: &Netns) -> Option<serde_json::Value> {
    group(&status(ns)?, GROUP)?["monitors"].as_array()?.iter().find(|m| m["name"] == "repl").cloned()
}

#[test]
fn the_standby_promotes_the_replicated_volume_and_every_fsynced_file_survives_the_primary() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let attach_dir = dir.join("attach");
    std::fs::create_dir_all(&attach_dir).unwrap();
    let _attached = AttachDirCleanup(attach_dir.clone());
    let topo = TwoServersAndClient::build().unwrap();

    let mount = dir.join("mnt");
    std::fs::create_dir_all(&mount).unwrap();
    let sums = dir.join("sums");
    let helper =
        format!("HAPAIR_ATTACH_DIR={} {}", attach_dir.display(), attach_script().canonicalize().unwrap().display());
    // Writes once (the first primary): each file fsynced, then the list of checksums.
    let writer = format!(
        "[ -e {sums} ] || {{ for i in $(seq 1 {FILES}); do head -c 300000 /dev/urandom > {m}/f$i && sync {m}/f$i || exit 1; done; (cd {m} && sha256sum f*) > {sums}.tmp && mv {sums}.tmp {sums}; }}",
        sums = sums.display(),
        m = mount.display()
    );
    let flow = format!(
        "      monitors:\n        - {{name: repl, replication: {{volumeRef: data}}, action: alert, interval: 500ms, failureThreshold: 1}}\n      flow:\n        - name: data\n          volume: {{volumeRef: data, mountPath: {m}, mkfs: true, attachCommand: '{helper} attach', detachCommand: '{helper} detach'}}\n          timeout: 60s\n        - name: writer\n          exec: {{start: '{writer}', stop: 'true'}}\n          timeout: 30s\n",
        m = mount.display()
    );
    let spec = BundleSpec { spec_extra: flow, ..BundleSpec::default() };
    let volume = format!(
        "    volumes:\n      - name: data\n        uuid: 3d0c1f8e-2a4b-4c6d-8e0f-1a2b3c4d5e6f\n        spec: {{group: web, size: 64Mi, port: 7790, backing: [{{node: a, path: {}, address: 198.18.1.1}}, {{node: b, path: {}, address: 198.18.1.2}}]}}\n    spec:\n",
        dir.join("a.img").display(),
        dir.join("b.img").display()
    );
    let mut agents = Vec::new();
    for (node, ns) in [("a", &topo.a), ("b", &topo.b)] {
        let home = dir.join(node);
        std::fs::create_dir_all(&home).unwrap();
        let mut agent = Agent::with_bundle(node, &home);
        agent.arg("--runtime-dir");
        agent.arg(&home.join("run").display().to_string());
        write_file(&agent.bundle_path(), &bundle(node, &spec).replace("    spec:\n", &volume));
        agent.start(ns);
        agents.push(agent);
    }
    let ns_of = |node: &str| if node == "a" { &topo.a } else { &topo.b };

    // One primary with the files written; the standby's replica UpToDate and connected.
    let primary = wait_for(UP, || {
        ["a", "b"].into_iter().find(|n| wait_role(ns_of(n), GROUP, "Primary", Duration::from_millis(1)))
    })
    .unwrap_or_else(|| panic!("nobody took the service: a {:?}, b {:?}", status(&topo.a), status(&topo.b)));
    let standby = if primary == "a" { "b" } else { "a" };
    let written = wait_for(UP, || sums.exists().then_some(()));
    assert!(written.is_some(), "the writer step did not run: {:?}", status(ns_of(primary)));
    let synced = wait_for(UP, || {
        let v = volume_report(ns_of(standby))?;
        (v["diskState"] == "UpToDate" && v["connection"] == "Connected" && v["role"] == "Secondary").then_some(v)
    });
    assert!(synced.is_some(), "the standby's replica is not in sync: {:?}", volume_report(ns_of(standby)));
    // The replication monitor sees the pair in sync on both nodes.
    for node in [primary, standby] {
        let healthy = wait_for(UP, || (monitor_report(ns_of(node))?["healthy"] == true).then_some(()));
        assert!(healthy.is_some(), "{node}: replication monitor not healthy: {:?}", monitor_report(ns_of(node)));
    }
    let p = volume_report(ns_of(primary)).unwrap();
    assert_eq!((p["role"].as_str(), p["diskState"].as_str()), (Some("Primary"), Some("UpToDate")), "{p}");
    assert_eq!(p["outOfSyncBytes"], 0, "{p}");
    // The same, on /metrics: the states of both replicas, and the written files replicated.
    let series = |labels: &str| format!("group=\"{GROUP}\",volume=\"data\",{labels}");
    let expected = [
        (primary, "hapair_agent_volume_role", series("role=\"Primary\"")),
        (standby, "hapair_agent_volume_role", series("role=\"Secondary\"")),
        (primary, "hapair_agent_volume_connection", series("state=\"Connected\"")),
        (standby, "hapair_agent_volume_disk_state", series("replica=\"local\",state=\"UpToDate\"")),
        (primary, "hapair_agent_volume_disk_state", series("replica=\"peer\",state=\"UpToDate\"")),
    ];
    for (node, name, labels) in &expected {
        let one = wait_for(Duration::from_secs(2), || (metric(ns_of(node), name, labels)? == 1.0).then_some(()));
        assert!(one.is_some(), "{node}: {name}{{{labels}}} is {:?}, not 1", metric(ns_of(node), name, labels));
    }
    let base = series("").trim_end_matches(',').to_string();
    assert_eq!(metric(ns_of(primary), "hapair_agent_volume_out_of_sync_bytes", &base), Some(0.0));
    // nbdfuse opens several connections to the export.
    let clients = metric(ns_of(primary), "hapair_agent_volume_nbd_clients", &base);
    assert!(clients.is_some_and(|n| n >= 1.0), "NBD clients of the mounted export: {clients:?}");
    let replicated =
        metric(ns_of(primary), "hapair_agent_volume_replication_bytes_total", &series("direction=\"sent\""));
    let written = (FILES * 300_000) as f64;
    assert!(replicated.is_some_and(|b| b >= written), "{replicated:?} bytes replicated for {written} written");
    for op in ["write", "flush"] {
        let timed = metric(ns_of(primary), "hapair_agent_volume_io_seconds_count", &series(&format!("op=\"{op}\"")));
        assert!(timed.is_some_and(|n| n > 0.0), "{op} requests timed on the primary's export: {timed:?}");
    }
    // Each half of the replicated writes is timed apart: the local disk and the peer.
    for stage in ["local", "peer"] {
        let name = "hapair_agent_volume_io_stage_seconds_count";
        let timed = metric(ns_of(primary), name, &series(&format!("stage=\"{stage}\"")));
        assert!(timed.is_some_and(|n| n > 0.0), "{stage} halves timed on the primary: {timed:?}");
    }

    // The primary's agent dies; the standby promotes, mounts, and finds every file.
    let (primary_index, standby_index) = if primary == "a" { (0, 1) } else { (1, 0) };
    agents[primary_index].kill();
    assert!(
        wait_role(ns_of(standby), GROUP, "Primary", UP),
        "the standby did not take over: {:?}",
        status(ns_of(standby))
    );
    let pid = agents[standby_index].pid().unwrap();
    let check = format!("cd {} && sha256sum -c {}", mount.display(), sums.display());
    let verified = wait_for(UP, || {
        let (ok, text) = in_mounts_of(pid, &check);
        ok.then_some(text)
    });
    let verified = verified
        .unwrap_or_else(|| panic!("the files are not intact on the new primary: {}", in_mounts_of(pid, &check).1));
    assert_eq!(verified.lines().filter(|l| l.ends_with(": OK")).count(), FILES, "{verified}");
    // The replica's status reaches the report on its own path, a moment after the role.
    let promoted = wait_for(Duration::from_secs(2), || {
        let v = volume_report(ns_of(standby))?;
        (v["role"] == "Primary").then_some(v)
    });
    let v =
        promoted.unwrap_or_else(|| panic!("the volume is not reported Primary: {:?}", volume_report(ns_of(standby))));
    assert_eq!(v["diskState"], "UpToDate", "{v}");
    assert_ne!(v["connection"], "Connected", "the peer is dead: {v}");
    // Serving alone: the replication monitor alerts (and nothing else happens).
    let alerting = wait_for(UP, || {
        let m = monitor_report(ns_of(standby))?;
        (m["healthy"] == false && m["message"].as_str()?.starts_with("volume data: ")).then_some(m)
    });
    assert!(
        alerting.is_some(),
        "the replication monitor did not notice the lost peer: {:?}",
        monitor_report(ns_of(standby))
    );
    assert_eq!(hapair_tests::agents::role(ns_of(standby), GROUP).as_deref(), Some("Primary"));

    // Removing the group unmounts, flushes, detaches and demotes; the copy is clean.
    let empty = BundleSpec { revision: 2, empty: true, ..BundleSpec::default() };
    write_file(&agents[standby_index].bundle_path(), &bundle(standby, &empty));
    let stopped = wait_for(UP, || {
        let (mounted, _) = in_mounts_of(pid, &format!("mountpoint -q {}", mount.display()));
        let s = status(ns_of(standby))?;
        let demoted = group(&s, GROUP)
            .is_none_or(|g| g["volumes"].as_array().is_some_and(|v| v.iter().all(|v| v["role"] == "Secondary")));
        (!mounted && demoted).then_some(())
    });
    assert!(stopped.is_some(), "the group did not stop: {:?}", status(ns_of(standby)));
    agents[standby_index].kill();
    let image = dir.join(format!("{standby}.img")).display().to_string();
    let fsck = Command::new("e2fsck").args(["-f", "-n", &image]).output().unwrap_or_else(|e| panic!("e2fsck: {e}"));
    assert!(
        fsck.status.success(),
        "e2fsck -n: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    drop(agents);
}
