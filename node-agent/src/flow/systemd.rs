//! `systemd` flow steps: `systemctl start|stop|is-active <unit>`.
//!
//! The program that runs the commands is injectable, so tests can assert the exact argv
//! on machines without systemd; the real runner executes them as processes.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::command::{self, CommandResult};

/// Runs an argv with a deadline.
pub trait CommandRunner: Send + Sync + Debug {
    fn run<'a>(
        &'a self,
        argv: &'a [String],
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = CommandResult> + Send + 'a>>;
}

/// Runs commands as real processes (own process group, killed after the deadline).
#[derive(Clone, Debug, Default)]
pub struct ProcessRunner;

impl CommandRunner for ProcessRunner {
    fn run<'a>(
        &'a self,
        argv: &'a [String],
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = CommandResult> + Send + 'a>> {
        Box::pin(async move { command::run(argv, &BTreeMap::new(), timeout).await })
    }
}

/// What a systemd step asks of a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitAction {
    Start,
    Stop,
    IsActive,
}

impl UnitAction {
    pub fn verb(&self) -> &'static str {
        match self {
            UnitAction::Start => "start",
            UnitAction::Stop => "stop",
            UnitAction::IsActive => "is-active",
        }
    }
}

/// Drives units through `systemctl`.
#[derive(Clone, Debug)]
pub struct Systemctl {
    program: String,
    runner: Arc<dyn CommandRunner>,
}

impl Default for Systemctl {
    fn default() -> Self {
        Systemctl::new("systemctl", Arc::new(ProcessRunner))
    }
}

impl Systemctl {
    pub fn new(program: impl Into<String>, runner: Arc<dyn CommandRunner>) -> Self {
        Systemctl { program: program.into(), runner }
    }

    /// The exact command line for `action` on `unit`. `--` keeps a unit name that starts
    /// with a dash from being read as an option.
    pub fn argv(&self, action: UnitAction, unit: &str) -> Vec<String> {
        vec![self.program.clone(), action.verb().to_string(), "--".to_string(), unit.to_string()]
    }

    /// Runs `action`; success is exit status 0 (for `is-active`: the unit is active).
    pub async fn run(&self, action: UnitAction, unit: &str, timeout: Duration) -> CommandResult {
        let argv = self.argv(action, unit);
        self.runner.run(&argv, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::command::Exit;
    use super::*;

    /// Records every argv and answers with a fixed exit code.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<Vec<String>>>,
    }

    impl CommandRunner for Recorder {
        fn run<'a>(
            &'a self,
            argv: &'a [String],
            _: Duration,
        ) -> Pin<Box<dyn Future<Output = CommandResult> + Send + 'a>> {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(argv.to_vec());
            }
            Box::pin(async { CommandResult { exit: Exit::Code(0), output: String::new() } })
        }
    }

    #[tokio::test]
    async fn issues_start_stop_and_is_active() {
        let recorder = Arc::new(Recorder::default());
        let systemctl = Systemctl::new("systemctl", recorder.clone());
        let t = Duration::from_secs(1);
        for action in [UnitAction::Start, UnitAction::IsActive, UnitAction::Stop] {
            assert!(systemctl.run(action, "postgresql@16-main.service", t).await.success());
        }
        let calls = recorder.calls.lock().map(|c| c.clone()).unwrap_or_default();
        let expected: Vec<Vec<String>> = [
            ["systemctl", "start", "--", "postgresql@16-main.service"],
            ["systemctl", "is-active", "--", "postgresql@16-main.service"],
            ["systemctl", "stop", "--", "postgresql@16-main.service"],
        ]
        .iter()
        .map(|a| a.iter().map(|s| s.to_string()).collect())
        .collect();
        assert_eq!(calls, expected);
    }

    #[tokio::test]
    async fn the_process_runner_executes_the_program_with_that_argv() {
        // A stand-in `systemctl` script: systemd does not run on these machines, but the
        // runner must still execute a real program and report its exit status.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = dir.path().join("log");
        let program = dir.path().join("systemctl");
        let script = format!("#!/bin/sh\necho \"$@\" >> {}\n[ \"$1\" != is-active ]\n", log.display());
        std::fs::write(&program, script).unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap_or_else(|e| panic!("{e}"));
        let systemctl = Systemctl::new(program.display().to_string(), Arc::new(ProcessRunner));
        let t = Duration::from_secs(10);
        assert!(systemctl.run(UnitAction::Start, "web.service", t).await.success());
        assert_eq!(systemctl.run(UnitAction::IsActive, "web.service", t).await.exit, Exit::Code(1));
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(logged, "start -- web.service\nis-active -- web.service\n");
    }

    #[tokio::test]
    async fn the_default_runs_the_real_systemctl() {
        // Whatever this machine answers (systemd is not running here), the real program
        // must have been executed or reported as missing, never silently skipped.
        let result =
            Systemctl::default().run(UnitAction::IsActive, "hapair-test-none.service", Duration::from_secs(10)).await;
        match result.exit {
            Exit::SpawnFailed(msg) => assert!(msg.starts_with("systemctl:"), "{msg}"),
            Exit::Code(code) => assert_ne!(code, 0, "a unit that does not exist is not active"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
