//! Carrying out one flow step operation: start, stop or check step `i`.

use std::collections::BTreeMap;
use std::sync::Arc;

use hapair_crds::hagroup::{FlowStep, HaGroupSpec, StepKind};
use hapair_crds::nodeapi::GroupKey;
use tracing::Instrument;

use super::command::{self, CommandResult, Exit};
use super::systemd::{Systemctl, UnitAction};
use super::{Outcome, check};
use crate::vip::{self, AddOutcome, Presence, RemoveOutcome, ResolvedVip, VipError, VipManager};

/// Why a flow cannot be run on this node.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("node {0:?} is not a node of the group")]
    NotAMember(String),
    #[error("flow step {step:?}: {message}")]
    BadStep { step: String, message: String },
    #[error(transparent)]
    Vip(#[from] VipError),
    #[error("flow step {step:?} needs virtual IPs but the runner has no VIP manager")]
    NoVipManager { step: String },
}

/// Executes the steps of one group's flow on this node.
#[derive(Debug)]
pub struct FlowRunner {
    group: GroupKey,
    node: String,
    steps: Vec<FlowStep>,
    vips: BTreeMap<String, ResolvedVip>,
    vip_manager: Option<Arc<VipManager>>,
    systemctl: Systemctl,
}

impl FlowRunner {
    /// Prepares `spec`'s flow for `node`.
    pub fn new(
        group: GroupKey,
        spec: &HaGroupSpec,
        node: &str,
        vip_manager: Option<Arc<VipManager>>,
        systemctl: Systemctl,
    ) -> Result<Self, FlowError> {
        let me = spec.nodes.iter().find(|n| n.name == node).ok_or_else(|| FlowError::NotAMember(node.to_string()))?;
        let mut vips = BTreeMap::new();
        for v in &spec.virtual_ips {
            vips.insert(v.name.clone(), vip::resolve(v, me)?);
        }
        for step in &spec.flow {
            match step.kind() {
                Some(StepKind::VirtualIp(v)) => {
                    if !vips.contains_key(&v.name) {
                        return Err(FlowError::BadStep {
                            step: step.name.clone(),
                            message: format!("names virtual IP {:?}, which the group does not define", v.name),
                        });
                    }
                    if vip_manager.is_none() {
                        return Err(FlowError::NoVipManager { step: step.name.clone() });
                    }
                }
                Some(_) => {}
                None => {
                    return Err(FlowError::BadStep {
                        step: step.name.clone(),
                        message: "set exactly one of volume, virtualIP, systemd or exec".into(),
                    });
                }
            }
        }
        Ok(FlowRunner { group, node: node.to_string(), steps: spec.flow.clone(), vips, vip_manager, systemctl })
    }

    pub fn steps(&self) -> &[FlowStep] {
        &self.steps
    }

    /// The resolved virtual IP named `name`.
    pub fn vip(&self, name: &str) -> Option<&ResolvedVip> {
        self.vips.get(name)
    }

    fn env(&self, step: &FlowStep, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut env = extra.clone();
        env.insert("HAPAIR_GROUP".into(), self.group.to_string());
        env.insert("HAPAIR_NODE".into(), self.node.clone());
        env.insert("HAPAIR_STEP".into(), step.name.clone());
        env
    }

    fn step(&self, i: usize) -> Result<&FlowStep, Outcome> {
        self.steps.get(i).ok_or_else(|| Outcome::Failed {
            reason: format!("no flow step {i} (the flow has {})", self.steps.len()),
            detail: String::new(),
        })
    }

    /// Starts step `i`.
    pub async fn start_step(&self, i: usize) -> Outcome {
        let step = match self.step(i) {
            Ok(s) => s,
            Err(o) => return o,
        };
        let span = tracing::info_span!("flow", group = %self.group, node = %self.node, step = %step.name);
        self.start(step).instrument(span).await
    }

    async fn start(&self, step: &FlowStep) -> Outcome {
        let timeout = step.timeout.as_std();
        let outcome = match step.kind() {
            Some(StepKind::Exec(e)) => {
                from_command(command::run_shell(&e.start, &self.env(step, &e.env), timeout).await, timeout, "start")
            }
            Some(StepKind::Systemd(s)) => {
                from_command(self.systemctl.run(UnitAction::Start, &s.unit, timeout).await, timeout, "systemctl start")
            }
            Some(StepKind::VirtualIp(v)) => self.start_vip(&v.name, timeout).await,
            Some(StepKind::Volume(_)) | None => unsupported(step),
        };
        tracing::info!(outcome = %outcome.summary(), "step started");
        outcome
    }

    /// Stops step `i`.
    pub async fn stop_step(&self, i: usize) -> Outcome {
        let step = match self.step(i) {
            Ok(s) => s,
            Err(o) => return o,
        };
        let span = tracing::info_span!("flow", group = %self.group, node = %self.node, step = %step.name);
        self.stop(step).instrument(span).await
    }

    async fn stop(&self, step: &FlowStep) -> Outcome {
        let timeout = step.timeout.as_std();
        let outcome = match step.kind() {
            Some(StepKind::Exec(e)) => {
                from_command(command::run_shell(&e.stop, &self.env(step, &e.env), timeout).await, timeout, "stop")
            }
            Some(StepKind::Systemd(s)) => {
                from_command(self.systemctl.run(UnitAction::Stop, &s.unit, timeout).await, timeout, "systemctl stop")
            }
            Some(StepKind::VirtualIp(v)) => self.stop_vip(&v.name).await,
            Some(StepKind::Volume(_)) | None => unsupported(step),
        };
        tracing::info!(outcome = %outcome.summary(), "step stopped");
        outcome
    }

    /// Checks step `i` once: its configured check, or for steps without one the implied
    /// check (`systemctl is-active`, the virtual IP still being ours). `None` when there is
    /// nothing to check (an exec step without a check).
    pub async fn check_step(&self, i: usize) -> Option<Outcome> {
        let step = match self.step(i) {
            Ok(s) => s,
            Err(o) => return Some(o),
        };
        let extra = match step.kind() {
            Some(StepKind::Exec(e)) => e.env.clone(),
            _ => BTreeMap::new(),
        };
        if let Some(c) = &step.check {
            return Some(check::run(c, &self.env(step, &extra)).await);
        }
        let timeout = step.timeout.as_std();
        match step.kind() {
            Some(StepKind::Systemd(s)) => Some(from_command(
                self.systemctl.run(UnitAction::IsActive, &s.unit, timeout).await,
                timeout,
                "systemctl is-active",
            )),
            Some(StepKind::VirtualIp(v)) => Some(self.check_vip(&v.name).await),
            Some(StepKind::Exec(_)) => None,
            Some(StepKind::Volume(_)) | None => Some(unsupported(step)),
        }
    }

    fn manager_and_vip(&self, name: &str) -> Result<(&VipManager, &ResolvedVip), Outcome> {
        match (self.vip_manager.as_deref(), self.vips.get(name)) {
            (Some(m), Some(v)) => Ok((m, v)),
            _ => {
                Err(Outcome::Failed { reason: format!("virtual IP {name:?} is not available"), detail: String::new() })
            }
        }
    }

    async fn start_vip(&self, name: &str, timeout: std::time::Duration) -> Outcome {
        let (manager, vip) = match self.manager_and_vip(name) {
            Ok(x) => x,
            Err(o) => return o,
        };
        match tokio::time::timeout(timeout, manager.take_over(vip)).await {
            Err(_) => Outcome::TimedOut { after: timeout, detail: format!("taking over {vip}") },
            Ok(Ok(AddOutcome::Added)) => Outcome::Ok { detail: format!("added and announced {vip}") },
            Ok(Ok(AddOutcome::AlreadyOurs)) => Outcome::Ok { detail: format!("{vip} was already ours; announced") },
            Ok(Ok(AddOutcome::Foreign)) => Outcome::Failed {
                reason: format!(
                    "{vip} is already configured on the interface by something other than hapair; it is left alone"
                ),
                detail: String::new(),
            },
            Ok(Err(e)) => Outcome::Failed { reason: e.to_string(), detail: String::new() },
        }
    }

    async fn stop_vip(&self, name: &str) -> Outcome {
        let (manager, vip) = match self.manager_and_vip(name) {
            Ok(x) => x,
            Err(o) => return o,
        };
        match manager.remove(vip).await {
            Ok(RemoveOutcome::Removed) => Outcome::Ok { detail: format!("removed {vip}") },
            Ok(RemoveOutcome::Absent) => Outcome::Ok { detail: format!("{vip} was not present") },
            Ok(RemoveOutcome::Foreign) => {
                Outcome::Ok { detail: format!("{vip} is configured by something other than hapair; left in place") }
            }
            Err(e) => Outcome::Failed { reason: e.to_string(), detail: String::new() },
        }
    }

    async fn check_vip(&self, name: &str) -> Outcome {
        let (manager, vip) = match self.manager_and_vip(name) {
            Ok(x) => x,
            Err(o) => return o,
        };
        match manager.presence(vip).await {
            Ok(Presence::Ours) => Outcome::Ok { detail: format!("{vip} present") },
            Ok(Presence::Absent) => Outcome::Failed { reason: format!("{vip} is missing"), detail: String::new() },
            Ok(Presence::Foreign) => Outcome::Failed {
                reason: format!("{vip} is configured by something other than hapair"),
                detail: String::new(),
            },
            Err(e) => Outcome::Failed { reason: e.to_string(), detail: String::new() },
        }
    }
}

fn unsupported(step: &FlowStep) -> Outcome {
    Outcome::Failed { reason: format!("flow step {:?} cannot run on this agent", step.name), detail: String::new() }
}

fn from_command(r: CommandResult, timeout: std::time::Duration, what: &str) -> Outcome {
    match r.exit {
        Exit::Code(0) => Outcome::Ok { detail: r.output },
        Exit::Code(code) => Outcome::Failed { reason: format!("{what} exited with {code}"), detail: r.output },
        Exit::Signal(sig) => Outcome::Failed { reason: format!("{what} died from signal {sig}"), detail: r.output },
        Exit::TimedOut => Outcome::TimedOut { after: timeout, detail: r.output },
        Exit::SpawnFailed(e) => Outcome::Failed { reason: format!("{what} did not start: {e}"), detail: String::new() },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use nix::sys::signal::kill;
    use nix::unistd::Pid;

    use super::*;
    use crate::engine::restart::RestartWindow;

    fn spec(flow: serde_json::Value) -> HaGroupSpec {
        serde_json::from_value(serde_json::json!({
            "nodes": [
                {"name": "a", "heartbeatAddresses": ["198.18.0.1"]},
                {"name": "b", "heartbeatAddresses": ["198.18.0.2"]}
            ],
            "flow": flow
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn runner(flow: serde_json::Value) -> FlowRunner {
        FlowRunner::new(GroupKey::new("db", "pg"), &spec(flow), "a", None, Systemctl::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// An exec step that appends `<verb> <name>` to `log`.
    fn logging_step(name: &str, log: &Path, check: Option<&str>) -> serde_json::Value {
        let mut step = serde_json::json!({
            "name": name,
            "exec": {
                "start": format!("echo \"start $HAPAIR_STEP\" >> {}", log.display()),
                "stop": format!("echo \"stop $HAPAIR_STEP\" >> {}", log.display()),
            },
            "timeout": "5s",
        });
        if let Some(c) = check {
            step["check"] = serde_json::json!({"exec": {"command": c}, "timeout": "2s", "failureThreshold": 1});
        }
        step
    }

    fn read(log: &Path) -> Vec<String> {
        std::fs::read_to_string(log).unwrap_or_default().lines().map(str::to_string).collect()
    }

    #[tokio::test]
    async fn steps_report_their_commands_output_and_environment() {
        let r = runner(serde_json::json!([{
            "name": "env",
            "exec": {"start": "echo $HAPAIR_GROUP $HAPAIR_NODE $HAPAIR_STEP $EXTRA", "stop": "exit 4", "env": {"EXTRA": "x"}}
        }]));
        assert_eq!(r.start_step(0).await, Outcome::Ok { detail: "db/pg a env x\n".into() });
        assert_eq!(
            r.stop_step(0).await,
            Outcome::Failed { reason: "stop exited with 4".into(), detail: String::new() }
        );
        assert_eq!(r.check_step(0).await, None, "an exec step without a check has nothing to check");
        assert!(
            matches!(r.start_step(7).await, Outcome::Failed { reason, .. } if reason == "no flow step 7 (the flow has 1)")
        );
    }

    /// Plays the engine's part (start in order, restart a failing step within its limit,
    /// with the engine's restart window, then stop everything in reverse) to show the
    /// runner and the engine's rules compose; the ordering itself is the engine's and is
    /// tested there.
    #[tokio::test]
    async fn a_failing_check_is_restarted_n_times_then_the_flow_stops_in_reverse() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = dir.path().join("log");
        let mut flow = vec![
            logging_step("first", &log, None),
            logging_step("second", &log, Some("false")),
            logging_step("third", &log, None),
        ];
        flow[1]["restart"] = serde_json::json!({"limit": 2, "window": "1m"});
        let r = runner(serde_json::Value::Array(flow));
        let step = &r.steps()[1];
        let (limit, window) = (step.restart.limit, step.restart.window.as_std());
        let mut restarts = RestartWindow::default();
        let t0 = Instant::now();
        let now = || crate::engine::Instant::from_duration(t0.elapsed());

        assert!(r.start_step(0).await.is_ok());
        assert!(r.start_step(1).await.is_ok());
        loop {
            // `failureThreshold: 1`: every failed check fails the step.
            let result = r.check_step(1).await.unwrap_or_else(|| panic!("step 1 has a check"));
            assert!(!result.is_ok(), "check `false` cannot pass: {result:?}");
            if !restarts.try_restart(now(), limit, window) {
                assert_eq!(restarts.count(now(), window), 2);
                break;
            }
            assert!(r.stop_step(1).await.is_ok());
            assert!(r.start_step(1).await.is_ok());
        }
        for i in (0..2).rev() {
            assert!(r.stop_step(i).await.is_ok());
        }
        assert_eq!(
            read(&log),
            [
                "start first",
                "start second",
                "stop second",
                "start second",
                "stop second",
                "start second",
                "stop second",
                "stop first"
            ]
        );
    }

    fn gone(pid: i32) -> bool {
        // A zombie still answers kill(0); its state letter in /proc says it is dead.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => {
                stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'))
                    || kill(Pid::from_raw(pid), None).is_err()
            }
        }
    }

    #[tokio::test]
    async fn a_hanging_stop_command_is_killed_with_its_process_group() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pids = dir.path().join("pids");
        // The stop command starts a grandchild that ignores SIGTERM, then hangs itself.
        let stop = format!(
            "sh -c 'trap \"\" TERM; echo $$ >> {p}; sleep 300' & echo $$ >> {p}; sleep 300",
            p = pids.display()
        );
        let r = runner(serde_json::json!([{
            "name": "hang", "exec": {"start": "true", "stop": stop}, "timeout": "500ms"
        }]));
        let t0 = Instant::now();
        let outcome = r.stop_step(0).await;
        assert!(
            matches!(outcome, Outcome::TimedOut { after, .. } if after == Duration::from_millis(500)),
            "{outcome:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10));
        let recorded: Vec<i32> =
            std::fs::read_to_string(&pids).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect();
        assert_eq!(recorded.len(), 2, "both the command and its grandchild ran: {recorded:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !recorded.iter().all(|p| gone(*p)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for pid in recorded {
            assert!(gone(pid), "process {pid} of the timed-out command survived");
        }
    }

    #[test]
    fn volume_steps_are_accepted_for_the_runtime_to_carry_out() {
        let flow = serde_json::json!([{"name": "data", "volume": {"volumeRef": "pgdata"}}]);
        let runner = FlowRunner::new(GroupKey::new("db", "pg"), &spec(flow), "a", None, Systemctl::default());
        assert!(runner.is_ok(), "{:?}", runner.err());
    }

    #[test]
    fn virtual_ip_steps_need_a_defined_vip_and_a_manager() {
        let mut s = spec(serde_json::json!([{"name": "ip", "virtualIP": {"name": "web"}}]));
        let err = FlowRunner::new(GroupKey::new("db", "pg"), &s, "a", None, Systemctl::default())
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("flow step \"ip\": names virtual IP \"web\", which the group does not define"));
        s.virtual_ips = vec![
            serde_json::from_value(
                serde_json::json!({"name": "web", "address": "198.18.0.100/24", "interface": "eth0"}),
            )
            .unwrap_or_else(|e| panic!("{e}")),
        ];
        let err = FlowRunner::new(GroupKey::new("db", "pg"), &s, "a", None, Systemctl::default())
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("flow step \"ip\" needs virtual IPs but the runner has no VIP manager"));
    }
}
