//! The real `kubectl-hapair` binary when its output cannot be written (a full disk, a pipe
//! nobody reads, a closed descriptor), with absurd `--timeout` values, and with hostile
//! text from the controller: it must end with a clear exit code and never panic.
//!
//! Most cases need no controller: `validate`, `--help` and `--version` write to stdout on
//! their own, and a controller on a closed port of 127.0.0.1 makes the error path write to
//! stderr. The rest run against a real standalone controller.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use hapair_crds::hagroup::NodeRole;
use hapair_crds::nodeapi::{ActionOutcome, DesiredConfig, GroupKey, MonitorReport, paths};
use hapair_operator::cli::EXIT_BROKEN_PIPE;

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-hapair");

const ENOSPC_MESSAGE: &str = "kubectl hapair: writing output: No space left on device\n";

/// The binary with nothing inherited that would pick a controller for it.
fn hapair(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("HAPAIR_CONFIG").env_remove("KUBECONFIG").stdin(Stdio::null());
    command
}

fn dev_full() -> Stdio {
    Stdio::from(File::options().write(true).open("/dev/full").expect("/dev/full"))
}

/// The write end of a pipe whose read end is already closed: the first write fails with
/// EPIPE, as in `hapair status | head -0` once `head` has exited.
fn widowed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

/// Runs `command` with whatever of stdout and stderr was not redirected captured.
fn run(command: &mut Command) -> Output {
    command.output().unwrap()
}

/// Runs `args` through `sh` with the given redirections appended, e.g. `>&-` to start the
/// binary with its stdout closed, which `Command` cannot express.
fn run_in_shell(args: &[&str], redirections: &str) -> Output {
    let script = format!("exec \"$0\" \"$@\" {redirections}");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(BIN)
        .args(args)
        .env_remove("HAPAIR_CONFIG")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[track_caller]
fn assert_no_panic(output: &Output) {
    let err = stderr(output);
    assert!(!err.contains("panicked"), "{err}");
    // A panic exits 101 (and a panic while panicking aborts with a signal, no code).
    assert_ne!(output.status.code(), Some(101), "{err}");
    assert!(output.status.code().is_some(), "killed by a signal: {:?} {err}", output.status);
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_no_panic(output);
    assert_eq!(output.status.code(), Some(code), "stdout: {}\nstderr: {}", stdout(output), stderr(output));
}

fn manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/minimal-pair.yaml")
}

/// Connection flags for a standalone controller on a port nothing listens on, with
/// certificate files good enough for the client to be built and try to connect.
struct Unreachable {
    _dir: tempfile::TempDir,
    flags: Vec<String>,
}

impl Unreachable {
    fn new() -> Unreachable {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.path().join("admin.crt"), dir.path().join("admin.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        // Bound and released: nothing listens there for the length of the test.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let path = |p: &Path| p.display().to_string();
        let flags = vec![
            "--controller".into(),
            format!("https://127.0.0.1:{port}"),
            "--ca".into(),
            path(&cert_file),
            "--cert".into(),
            path(&cert_file),
            "--key".into(),
            path(&key_file),
        ];
        Unreachable { _dir: dir, flags }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = hapair(args);
        command.args(&self.flags);
        command
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        args.iter().copied().chain(self.flags.iter().map(String::as_str)).collect()
    }
}

#[test]
fn a_full_disk_is_an_error_with_a_message_and_a_non_zero_exit() {
    let file = manifest();
    let file = file.to_str().unwrap();
    let output = run(hapair(&["validate", file]).stdout(Stdio::piped()));
    assert_exit(&output, 0);
    assert!(stdout(&output).starts_with("valid: HaGroup default/web"), "{}", stdout(&output));

    for args in [&["validate", file][..], &["--help"], &["--version"], &["status", "--help"]] {
        let output = run(hapair(args).stdout(dev_full()));
        assert_exit(&output, 1);
        assert_eq!(stderr(&output), ENOSPC_MESSAGE, "{args:?}");
    }
}

#[test]
fn a_pipe_nobody_reads_ends_quietly_with_the_sigpipe_status() {
    let file = manifest();
    let file = file.to_str().unwrap();
    for args in [&["validate", file][..], &["--help"], &["--version"]] {
        let output = run(hapair(args).stdout(widowed_pipe()));
        assert_exit(&output, i32::from(EXIT_BROKEN_PIPE));
        assert_eq!(stderr(&output), "", "{args:?}");
    }
}

#[test]
fn a_closed_stdout_or_stderr_does_not_panic() {
    let file = manifest();
    let file = file.to_str().unwrap();
    // std opens /dev/null in place of a closed standard descriptor before main, so the
    // output is lost, as the caller asked, and the command's own status stands.
    let output = run_in_shell(&["validate", file], ">&-");
    assert_exit(&output, 0);
    let output = run_in_shell(&["validate", file], ">&- 2>&-");
    assert_exit(&output, 0);

    let unreachable = Unreachable::new();
    let output = run_in_shell(&unreachable.args(&["status"]), ">&- 2>&-");
    assert_exit(&output, 1);
    let output = run_in_shell(&unreachable.args(&["status"]), ">&-");
    assert_exit(&output, 1);
    assert!(stderr(&output).contains("cannot reach the controller at https://127.0.0.1:"), "{}", stderr(&output));
}

#[test]
fn an_error_that_cannot_be_written_still_exits_non_zero() {
    let unreachable = Unreachable::new();
    let output = run(unreachable.command(&["status"]).stdout(Stdio::piped()).stderr(Stdio::piped()));
    assert_exit(&output, 1);
    assert!(stderr(&output).starts_with("kubectl hapair: cannot reach the controller at https://127.0.0.1:"));
    assert_eq!(stdout(&output), "");

    let output = run(unreachable.command(&["status"]).stdout(dev_full()).stderr(dev_full()));
    assert_exit(&output, 1);
    let output = run(unreachable.command(&["describe", "g"]).stdout(widowed_pipe()).stderr(widowed_pipe()));
    assert_exit(&output, 1);
    // A usage error on an unwritable stderr keeps clap's status.
    let output = run(hapair(&["no-such-command"]).stderr(dev_full()));
    assert_exit(&output, 2);
}

#[test]
fn huge_timeouts_wait_without_a_deadline_or_are_refused_naming_the_flag() {
    let unreachable = Unreachable::new();
    // The largest a duration holds: accepted (as no deadline), and the command goes on to
    // the controller, which is not there.
    for timeout in ["18446744073709551615s", "5124095576030431h", "18446744073709551615s999ms"] {
        let output = run(&mut unreachable.command(&["--timeout", timeout, "switchover", "g", "--to", "b"]));
        assert_exit(&output, 1);
        assert!(stderr(&output).contains("cannot reach the controller"), "{timeout}: {}", stderr(&output));
    }
    for (timeout, why) in [
        ("18446744073709551616s", "is too large"),
        ("99999999999999999999999999999999999999h", "is too large"),
        ("1e30s", "expected a number followed by a unit"),
        ("18446744073709551615", "expected a number followed by a unit"),
        ("-1s", "expected a number followed by a unit"),
    ] {
        // `--timeout=…` so that `-1s` is a value, not a flag.
        let flag = format!("--timeout={timeout}");
        let output = run(&mut unreachable.command(&["switchover", "g", "--to", "b", &flag]));
        assert_exit(&output, 2);
        let err = stderr(&output);
        assert!(err.contains(&format!("invalid value '{timeout}' for '--timeout <TIMEOUT>'")), "{timeout}: {err}");
        assert!(err.contains(why), "{timeout}: {err}");
    }
}

/// Runs `command` to its end. Not `Command::output`, which tokio makes capture stdout
/// and stderr whatever they were set to.
async fn output_of(mut command: tokio::process::Command) -> Output {
    let child = command.spawn().unwrap();
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.unwrap().unwrap()
}

#[tokio::test]
async fn against_a_controller_hostile_text_is_escaped_and_output_errors_are_reported() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let g = GroupKey::new("default", "g");
    let (a, b) = (h.enroll("a").await, h.enroll("b").await);
    let mut hostile = group_report(&g, NodeRole::Primary, 2);
    hostile.role_reason = Some("\x1b]0;owned\x07\x1b[2J".into());
    hostile.monitors =
        vec![MonitorReport { name: "http".into(), healthy: false, message: Some("down\nNode b:\u{9b}1A".into()) }];
    for (client, node, group) in [(&a, "a", hostile), (&b, "b", group_report(&g, NodeRole::Standby, 2))] {
        let response =
            client.post(h.url(&paths::report(node))).json(&report(node, 1, vec![group])).send().await.unwrap();
        assert_eq!(response.status(), 204);
    }

    let output = output_of(cli(&h, &["describe", "g"])).await;
    assert_exit(&output, 0);
    let out = stdout(&output);
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    assert!(out.contains("  Role:        Primary (\\x1b]0;owned\\x07\\x1b[2J)\n"), "{out}");
    assert!(out.contains("    http FAILING: down\\nNode b:\\u{9b}1A\n"), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("Node b:")).count(), 1, "{out}");
    // JSON stays JSON, with the same strings.
    let output = output_of(cli(&h, &["describe", "g", "-o", "json"])).await;
    assert_exit(&output, 0);
    assert!(!stdout(&output).chars().any(|c| c.is_control() && c != '\n'));
    let view: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(view["nodeDetails"][0]["report"]["monitors"][0]["message"], "down\nNode b:\u{9b}1A", "{view}");

    for args in [&["status"][..], &["describe", "g"], &["status", "-o", "json"]] {
        let mut command = cli(&h, args);
        command.stdout(dev_full());
        let output = output_of(command).await;
        assert_exit(&output, 1);
        assert_eq!(stderr(&output), ENOSPC_MESSAGE, "{args:?}");

        let mut command = cli(&h, args);
        command.stdout(widowed_pipe());
        let output = output_of(command).await;
        assert_exit(&output, i32::from(EXIT_BROKEN_PIPE));
        assert_eq!(stderr(&output), "", "{args:?}");
    }

    // An action with the largest timeout there is waits for its outcome like any other.
    let child = cli(&h, &["switchover", "g", "--to", "b", "--timeout", "18446744073709551615s"]).spawn().unwrap();
    let url = h.url(&paths::config("b"));
    let action = eventually(Duration::from_secs(20), || async {
        let bundle: DesiredConfig = b.get(&url).send().await.ok()?.json().await.ok()?;
        bundle.groups.first()?.actions.first().cloned()
    })
    .await
    .expect("the action reaches b");
    let mut answer = group_report(&g, NodeRole::Primary, 3);
    answer.actions = vec![result(&action.id, ActionOutcome::Succeeded, "b is active")];
    let response = b.post(h.url(&paths::report("b"))).json(&report("b", 2, vec![answer])).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert_exit(&output, 0);
    assert!(stdout(&output).contains("switchover to b ("), "{}", stdout(&output));
    h.shutdown().await;
}
