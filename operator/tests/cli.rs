//! The real `kubectl-hapair` binary (and its `hapair` name) against a real standalone
//! controller: status, describe, and admin actions answered by simulated agent reports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use hapair_crds::hagroup::NodeRole;
use hapair_crds::nodeapi::{ActionOutcome, DesiredConfig, GroupKey, paths};

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-hapair");

async fn run(h: &Harness, args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(60), cli(h, args).output()).await.unwrap().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until `node` sees an action in its bundle, then answers it with `outcome`.
async fn answer(h: &Harness, node_client: &reqwest::Client, node: &str, role: NodeRole, outcome: ActionOutcome) {
    let g = GroupKey::new("default", "g");
    let url = h.url(&paths::config(node));
    let action = eventually(Duration::from_secs(20), || async {
        let bundle: DesiredConfig = node_client.get(&url).send().await.ok()?.json().await.ok()?;
        bundle.groups.first()?.actions.first().cloned()
    })
    .await
    .expect("the action reaches the node");
    let mut group = group_report(&g, role, 2);
    group.actions = vec![result(&action.id, outcome, &format!("{node} says {outcome:?}"))];
    let response =
        node_client.post(h.url(&paths::report(node))).json(&report(node, 2, vec![group])).send().await.unwrap();
    assert_eq!(response.status(), 204);
}

#[tokio::test]
async fn status_describe_and_actions_through_the_real_binary() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let g = GroupKey::new("default", "g");
    let (a, b) = (h.enroll("a").await, h.enroll("b").await);
    for (client, node, role) in [(&a, "a", NodeRole::Primary), (&b, "b", NodeRole::Standby)] {
        let response = client
            .post(h.url(&paths::report(node)))
            .json(&report(node, 1, vec![group_report(&g, role, 2)]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
    }

    let (code, out, err) = run(&h, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("GROUP"), "{out}");
    assert!(lines[1].starts_with("default/g   Healthy   a        2       a:Primary b:Standby   -"), "{out}");

    let (code, out, err) = run(&h, &["describe", "g"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Active:      a"), "{out}");
    assert!(out.contains("Node b:\n  Role:        Standby\n  Health:      Healthy"), "{out}");
    assert!(out.contains("Hardware:    - / - (2 CPUs, 1024 MiB)"), "{out}");
    let (code, _, err) = run(&h, &["describe", "other/g"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no HaGroup other/g (known: default/g)"), "{err}");

    // maintenance on: both reporting nodes must apply it.
    let child = cli(&h, &["maintenance", "g", "on", "--timeout", "30s"]).spawn().unwrap();
    answer(&h, &a, "a", NodeRole::Maintenance, ActionOutcome::Succeeded).await;
    answer(&h, &b, "b", NodeRole::Maintenance, ActionOutcome::Succeeded).await;
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{out}{}", String::from_utf8_lossy(&output.stderr));
    assert!(out.contains("maintenance on (a-"), "{out}");
    assert!(out.contains("on default/g: Succeeded: applied on a, b"), "{out}");

    // A rejected switchover exits non-zero with the node's reason.
    let child = cli(&h, &["switchover", "default/g", "--to", "b"]).spawn().unwrap();
    answer(&h, &b, "b", NodeRole::Standby, ActionOutcome::Rejected).await;
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("switchover to b ("), "{out}");
    assert!(out.contains("Rejected: b: b says Rejected"), "{out}");

    // Dangerous actions need --yes and are refused before contacting anyone.
    let (code, _, err) = run(&h, &["force-active", "g", "b"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("re-run with --yes"), "{err}");
    let (code, _, err) = run(&h, &["switchover", "g", "--to", "nobody"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("controller answered 400: to: \"nobody\" is not a node of HaGroup default/g"), "{err}");

    // Nobody answers: the CLI gives up after its timeout with its own exit code.
    let (code, out, _) = run(&h, &["resolve-split-brain", "g", "--winner", "a", "--yes", "--timeout", "1s"]).await;
    assert_eq!(code, i32::from(hapair_operator::cli::EXIT_TIMEOUT), "{out}");
    assert!(out.contains("no final outcome within 1s"), "{out}");
    h.shutdown().await;
}

#[tokio::test]
async fn the_binary_answers_to_hapair_and_reads_hapair_config() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("hapair");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let output = tokio::process::Command::new(&link).arg("--help").output().await.unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("Usage: hapair [OPTIONS] <COMMAND>"), "{help}");
    let output = tokio::process::Command::new(BIN).arg("--help").output().await.unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("Usage: kubectl hapair"));

    let output = tokio::process::Command::new(&link)
        .args(["status", "-o", "json"])
        .env("HAPAIR_CONFIG", state_dir(&h).join(hapair_operator::controller::views::CLI_CONFIG_FILE))
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let overview: hapair_operator::controller::views::GroupsOverview = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(overview.groups[0].key, GroupKey::new("default", "g"));

    let output =
        tokio::process::Command::new(&link).args(["status"]).env_remove("HAPAIR_CONFIG").output().await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("pass --config"));
    h.shutdown().await;
}
