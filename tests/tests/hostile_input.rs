//! Careless and hostile input, for real: the fixtures under `tests/fixtures/hostile/`.
//!
//! - Every file of `names/` and `parse/` is refused by `kubectl-hapair validate` (the real
//!   binary) with the field and the reason its header names, escaped for the terminal,
//!   and quickly even when it is a nesting bomb.
//! - A standalone controller and two enrolled agents run `pair.yaml` (a group and its
//!   `deletionPolicy: Wipe` volume in one file). Each file of `typos/` then replaces it in
//!   turn, the controller restarts while one is in place, and the file becomes a FIFO and
//!   a 200 KB nesting bomb: through all of it no node's desired config says `deleting` or
//!   holds a wipe, and the pair keeps its roles. Removing the file for real does delete,
//!   which shows the desired configs being read are the live ones.
//!
//! Cleanup (even on failure): the agents' and controller's guards, the nbdfuse attachments
//! under the test's directory, then the namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hapair_tests::agents::{Agent, GROUP, binary, group, role, status, write_file};
use hapair_tests::controller::{Controller, enroll, unenrolled_config};
use hapair_tests::mounts::{AttachDirCleanup, attach_script};
use hapair_tests::netns::{require_root, wait_for};
use hapair_tests::topology::{C0, TwoServersAndClient};

const UP: Duration = Duration::from_secs(60);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hostile")
}

fn fixture_files(sub: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures().join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {sub}/");
    files
}

/// A fixture's `# key: value` header line.
fn header(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
        .unwrap_or_else(|| panic!("no `# {key}:` header"))
        .to_string()
}

#[test]
fn every_hostile_manifest_is_refused_with_the_field_named_and_escaped() {
    for file in fixture_files("names").into_iter().chain(fixture_files("parse")) {
        let text = std::fs::read_to_string(&file).unwrap();
        let started = Instant::now();
        let out = std::process::Command::new(binary("kubectl-hapair")).arg("validate").arg(&file).output().unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(!out.status.success(), "{name} was accepted: {stderr}");
        assert!(out.stdout.is_empty(), "{name}: {}", String::from_utf8_lossy(&out.stdout));
        let field = header(&text, "field");
        if field != "-" {
            assert!(stderr.contains(&format!(": {field}: ")), "{name} does not name {field}: {stderr}");
        }
        assert!(stderr.contains(&header(&text, "says")), "{name}: {stderr}");
        assert!(
            !out.stderr.contains(&0x1b) && !out.stderr.contains(&0x07),
            "{name} reached the terminal raw: {stderr:?}"
        );
        println!("{name}: refused in {took:?}: {}", stderr.trim());
    }
}

/// A node's cached desired config (the agent writes every bundle it takes there).
fn desired(home: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(home.join("state/desired-config.json")).unwrap_or_default();
    let body = text.split_once('\n').map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// What the desired config says about the group: (present, deleting, wipes).
fn verdict(home: &Path) -> (bool, bool, usize) {
    let config = desired(home);
    let group = config["groups"].as_array().and_then(|g| g.iter().find(|g| g["key"] == GROUP)).cloned();
    let wipes = config["wipes"].as_array().map_or(0, Vec::len);
    (group.is_some(), group.is_some_and(|g| g["deleting"] == true), wipes)
}

#[test]
fn a_typo_a_fifo_or_a_bomb_in_a_running_pairs_file_neither_deletes_nor_wipes() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let attach_dir = dir.join("attach");
    std::fs::create_dir_all(&attach_dir).unwrap();
    let _attached = AttachDirCleanup(attach_dir.clone());
    let helper =
        format!("HAPAIR_ATTACH_DIR={} {}", attach_dir.display(), attach_script().canonicalize().unwrap().display());
    let with_dir = |text: String| text.replace("@DIR@", &dir.display().to_string()).replace("@ATTACH@", &helper);
    let pair = with_dir(std::fs::read_to_string(fixtures().join("pair.yaml")).unwrap());
    let topo = TwoServersAndClient::build().unwrap();
    let mut controller = Controller::start(&topo.client, C0, &dir, &pair);
    let web = controller.manifests.join("web.yaml");

    let mut agents = Vec::new();
    let homes = [dir.join("a"), dir.join("b")];
    for ((node, ns), home) in [("a", &topo.a), ("b", &topo.b)].into_iter().zip(&homes) {
        std::fs::create_dir_all(home).unwrap();
        std::fs::write(home.join("agent.yaml"), unenrolled_config(home)).unwrap();
        enroll(ns, &controller, node, home);
        let mut agent = Agent::with_config(node, home);
        agent.start(ns);
        agents.push(agent);
    }
    let roles = || Some((role(&topo.a, GROUP)?, role(&topo.b, GROUP)?));
    let running = wait_for(UP, || roles().filter(|(a, b)| (a == "Primary") != (b == "Primary")));
    let running =
        running.unwrap_or_else(|| panic!("the pair did not form: a {:?}\nb {:?}", status(&topo.a), status(&topo.b)));
    assert!(homes.iter().all(|h| verdict(h) == (true, false, 0)), "{:?}", homes.map(|h| desired(&h)));

    // After each bad file: the controller has seen it (its log says so, or its API still
    // answers), a few polls pass, and nothing anywhere reads as deletion.
    let log = controller.log.clone();
    let refusals = || std::fs::read_to_string(&log).unwrap_or_default().matches("manifest refused").count();
    let check = |what: &str, controller: &Controller| {
        std::thread::sleep(Duration::from_secs(3));
        let overview = controller.overview(&topo.client);
        let overview = overview.unwrap_or_else(|| panic!("{what}: the controller's API does not answer"));
        let view = overview.groups.iter().find(|g| g.key.to_string() == GROUP);
        assert!(view.is_some_and(|v| !v.deleting), "{what}: the controller deletes the group: {view:?}");
        for home in &homes {
            assert_eq!(verdict(home), (true, false, 0), "{what}: {}", desired(home));
        }
        assert_eq!(roles().as_ref(), Some(&running), "{what}: the pair changed roles");
    };
    for typo in fixture_files("typos") {
        let name = typo.file_name().unwrap().to_string_lossy().into_owned();
        let seen = refusals();
        write_file(&web, &with_dir(std::fs::read_to_string(&typo).unwrap()));
        assert!(wait_for(UP, || (refusals() > seen).then_some(())).is_some(), "{name} was not refused");
        check(&name, &controller);
        if name == "kind.yaml" {
            controller.restart(&topo.client);
            check("a restart with kind.yaml in place", &controller);
        }
    }

    std::fs::remove_file(&web).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(&web).status().unwrap().success());
    check("a FIFO in place of the file", &controller);
    std::fs::remove_file(&web).unwrap();
    write_file(&web, &"[".repeat(200_000));
    let started = Instant::now();
    check("a 200 KB nesting bomb", &controller);
    println!("the bomb's polls left the API answering within {:?}", started.elapsed());

    // The file really goes: now, and only now, the group is deleted on both nodes.
    std::fs::remove_file(&web).unwrap();
    let deleted =
        wait_for(UP, || homes.iter().all(|h| matches!(verdict(h), (false, _, _) | (true, true, _))).then_some(()));
    assert!(deleted.is_some(), "removing the file did not delete: {:?}", homes.map(|h| desired(&h)));
    // The agents stop the flow (the detach lets go of the loop device and nbdfuse) before
    // they go: one killed mid-detach would leave its attachment half torn down.
    let released = |ns| status(ns).is_some_and(|s| group(&s, GROUP).is_none_or(|g| g["cleanedUp"] == true));
    let stopped = wait_for(UP, || (released(&topo.a) && released(&topo.b)).then_some(()));
    assert!(
        stopped.is_some(),
        "the deleted group's flow did not stop: a {:?}\nb {:?}",
        status(&topo.a),
        status(&topo.b)
    );
    drop(agents);
}
