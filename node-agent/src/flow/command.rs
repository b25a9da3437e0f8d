//! Running a command the way flow steps and checks need: in its own process group, with
//! a deadline after which the whole group is terminated, and with its output captured.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Output kept per command; the rest is read and discarded so the writer never blocks.
pub const OUTPUT_LIMIT: usize = 16 * 1024;
/// Between SIGTERM and SIGKILL for a command past its deadline.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with a code (0 is success).
    Code(i32),
    /// Died from a signal it did not get from us.
    Signal(i32),
    /// Ran past its deadline; its process group was terminated.
    TimedOut,
    /// Could not be started at all.
    SpawnFailed(String),
}

/// A finished command: how it ended and what it printed (stdout and stderr interleaved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandResult {
    pub exit: Exit,
    pub output: String,
}

impl CommandResult {
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }
}

/// Runs `/bin/sh -c <script>`.
pub async fn run_shell(script: &str, env: &BTreeMap<String, String>, timeout: Duration) -> CommandResult {
    run(&["/bin/sh".to_string(), "-c".to_string(), script.to_string()], env, timeout).await
}

/// Runs `argv` in a new process group with `env` added to the agent's environment.
///
/// Processes the command leaves running in the background (a daemon it started) are left
/// alone when it exits in time; only a command that overruns `timeout` has its whole group
/// terminated: SIGTERM, then SIGKILL after [`KILL_GRACE`].
pub async fn run(argv: &[String], env: &BTreeMap<String, String>, timeout: Duration) -> CommandResult {
    let Some((program, args)) = argv.split_first() else {
        return CommandResult { exit: Exit::SpawnFailed("empty command".into()), output: String::new() };
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return CommandResult { exit: Exit::SpawnFailed(format!("{program}: {e}")), output: String::new() },
    };
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(drain(out, Arc::clone(&output))));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(drain(err, Arc::clone(&output))));
    }
    let group = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    let exit = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => Exit::Code(-1),
            }
        }
        Ok(Err(e)) => Exit::SpawnFailed(format!("{program}: waiting: {e}")),
        Err(_) => {
            if let Some(group) = group {
                terminate_group(group, &mut child).await;
            }
            Exit::TimedOut
        }
    };
    // Background processes may hold the pipes open for ever: give the readers a moment to
    // reach end of file, then take what they have. They keep draining in the background.
    let _ = tokio::time::timeout(Duration::from_millis(100), futures::future::join_all(readers)).await;
    let bytes = output.lock().map(|b| b.clone()).unwrap_or_default();
    CommandResult { exit, output: String::from_utf8_lossy(&bytes).into_owned() }
}

async fn terminate_group(group: Pid, child: &mut tokio::process::Child) {
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
        tracing::warn!(pgid = group.as_raw(), "command ignored SIGTERM; killing its process group");
    }
    // Members other than the leader may still run (or have ignored SIGTERM): the group
    // must be gone entirely.
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait().await;
}

async fn drain(mut from: impl AsyncRead + Unpin, into: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut out) = into.lock() {
                    let room = OUTPUT_LIMIT.saturating_sub(out.len());
                    out.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([("GREETING".to_string(), "hi".to_string())])
    }

    #[tokio::test]
    async fn captures_output_and_exit_code() {
        let r = run_shell("echo $GREETING; echo oops >&2; exit 3", &env(), Duration::from_secs(10)).await;
        assert_eq!(r.exit, Exit::Code(3));
        assert!(r.output.contains("hi\n") && r.output.contains("oops\n"), "{:?}", r.output);
        assert!(run_shell("true", &env(), Duration::from_secs(10)).await.success());
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_failure() {
        let r = run(&["/nonexistent/program".into()], &env(), Duration::from_secs(1)).await;
        assert!(matches!(r.exit, Exit::SpawnFailed(ref m) if m.starts_with("/nonexistent/program")), "{r:?}");
    }

    #[tokio::test]
    async fn a_background_daemon_does_not_hold_the_command_up() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; echo started", pidfile.display());
        let t0 = Instant::now();
        let r = run_shell(&script, &env(), Duration::from_secs(10)).await;
        assert!(r.success(), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "waited for the daemon's pipe");
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap_or_default().trim().parse().unwrap_or(0);
        assert!(pid > 0);
        assert!(nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok(), "the daemon was killed");
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
