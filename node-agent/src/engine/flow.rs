//! Driving the service flow: which step to start or stop next, one command at a time.
//!
//! Bringing the flow up: promote every volume of the flow, then start the steps in order,
//! each after the previous one is up and has stayed healthy for its stabilization time.
//! *Stayed* healthy: a failed health check while a step stabilizes restarts its
//! stabilization clock (and counts toward `failureThreshold`), and the step only counts as
//! running once the clock has run out with no failure pending, so a flapping service never
//! lets the next step (e.g. its virtual IP) start. Once running, failed checks only count
//! toward the threshold.
//!
//! Bringing it down (demotion, fencing, startup cleanup): **remove every virtual IP
//! first** — the address is what clients reach, and it must be gone before anything else
//! so that a node losing its lease stops being reachable first — then stop the other
//! steps in reverse order, then demote the volumes.
//!
//! At most one command is outstanding per step or volume; the flow waits for its result.
//! A step that failed to stop is left alone (`StopFailed`) and the flow is no longer
//! *clean*: the engine then keeps the watchdog armed so the machine is reset rather than
//! left half-stopped.

use hapair_crds::nodeapi::{StepReport, StepState};

use super::command::Command;
use super::config::{FlowPlan, PlannedKind, PlannedStep};
use super::event::{StepOp, VolumeOp};
use super::restart::RestartWindow;
use super::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPhase {
    /// Left over from before a restart: may be running.
    Unknown,
    Stopped,
    Starting,
    /// Started; becomes Running at the instant given if its last health check (if any)
    /// passed. A failed check moves the instant to a full stabilization time later.
    Stabilizing(Instant),
    Running,
    Restarting,
    Stopping,
    /// Failed to start, or its health check failed: may still be running.
    Failed,
    /// Failed to stop: may still be running, nothing more is tried.
    StopFailed,
}

#[derive(Clone, Debug)]
pub struct StepRun {
    pub phase: StepPhase,
    pub in_flight: Option<StepOp>,
    pub restarts: RestartWindow,
    /// Consecutive failed health checks since the last pass or (re)start.
    pub check_failures: u32,
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumePhase {
    Unknown,
    Secondary,
    Promoting,
    Primary,
    Demoting,
    Failed,
    DemoteFailed,
}

#[derive(Clone, Debug)]
pub struct VolumeRun {
    pub name: String,
    pub phase: VolumePhase,
    pub in_flight: Option<VolumeOp>,
}

/// How far bringing the flow up got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    Done,
    Working,
    /// Step `n` failed (and may be restarted).
    StepFailed(usize),
    /// A volume refused promotion; the flow cannot come up here.
    VolumeFailed(String),
}

/// What a command result meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
    /// Not the answer to an outstanding command (e.g. from before a restart): ignored.
    Unexpected,
}

#[derive(Clone, Debug)]
pub struct Flow {
    plan: FlowPlan,
    steps: Vec<StepRun>,
    volumes: Vec<VolumeRun>,
}

impl Flow {
    /// A flow whose state is unknown (the engine just started): everything must be stopped
    /// before anything can start.
    pub fn unknown(plan: FlowPlan) -> Flow {
        let steps = plan
            .steps
            .iter()
            .map(|_| StepRun {
                phase: StepPhase::Unknown,
                in_flight: None,
                restarts: RestartWindow::default(),
                check_failures: 0,
                message: None,
            })
            .collect();
        let volumes = plan
            .volumes
            .iter()
            .map(|v| VolumeRun { name: v.clone(), phase: VolumePhase::Unknown, in_flight: None })
            .collect();
        Flow { plan, steps, volumes }
    }

    /// The flow a serving node left up when its agent restarted: every step running.
    pub fn resumed(plan: FlowPlan) -> Flow {
        let mut flow = Flow::unknown(plan);
        for s in &mut flow.steps {
            s.phase = StepPhase::Running;
        }
        for v in &mut flow.volumes {
            v.phase = VolumePhase::Primary;
        }
        flow
    }

    pub fn plan(&self) -> &FlowPlan {
        &self.plan
    }

    pub fn step(&self, i: usize) -> Option<(&PlannedStep, &StepRun)> {
        Some((self.plan.steps.get(i)?, self.steps.get(i)?))
    }

    /// Replaces the plan; only allowed while everything is cleanly stopped.
    pub fn replace_plan(&mut self, plan: FlowPlan) -> bool {
        if !self.is_clean_idle() {
            return false;
        }
        let mut fresh = Flow::unknown(plan);
        for s in &mut fresh.steps {
            s.phase = StepPhase::Stopped;
        }
        for v in &mut fresh.volumes {
            v.phase = VolumePhase::Secondary;
        }
        *self = fresh;
        true
    }

    /// Nothing held and nothing in flight (stop failures count as "nothing more to do").
    pub fn is_idle(&self) -> bool {
        self.steps
            .iter()
            .all(|s| matches!(s.phase, StepPhase::Stopped | StepPhase::StopFailed) && s.in_flight.is_none())
            && self
                .volumes
                .iter()
                .all(|v| matches!(v.phase, VolumePhase::Secondary | VolumePhase::DemoteFailed) && v.in_flight.is_none())
    }

    /// Idle, and every stop succeeded.
    pub fn is_clean_idle(&self) -> bool {
        self.is_idle()
            && self.steps.iter().all(|s| s.phase == StepPhase::Stopped)
            && self.volumes.iter().all(|v| v.phase == VolumePhase::Secondary)
    }

    pub fn is_up(&self) -> bool {
        self.volumes.iter().all(|v| v.phase == VolumePhase::Primary)
            && self.steps.iter().all(|s| s.phase == StepPhase::Running && s.in_flight.is_none())
    }

    /// Brings the flow up one command at a time; `wake` receives the end of a
    /// stabilization period.
    pub fn drive_up(
        &mut self,
        now: Instant,
        epoch: u64,
        force: bool,
        out: &mut Vec<Command>,
        wake: &mut impl FnMut(Instant),
    ) -> Progress {
        let mut volumes_ready = true;
        for v in &mut self.volumes {
            match v.phase {
                VolumePhase::Primary => {}
                VolumePhase::Failed => return Progress::VolumeFailed(v.name.clone()),
                VolumePhase::Secondary if v.in_flight.is_none() => {
                    v.phase = VolumePhase::Promoting;
                    v.in_flight = Some(VolumeOp::Promote);
                    out.push(Command::PromoteVolume { volume: v.name.clone(), epoch, force });
                    volumes_ready = false;
                }
                _ => volumes_ready = false,
            }
        }
        if !volumes_ready {
            return Progress::Working;
        }
        for (i, (plan, run)) in self.plan.steps.iter().zip(self.steps.iter_mut()).enumerate() {
            if run.in_flight.is_some() {
                return Progress::Working;
            }
            match run.phase {
                StepPhase::Running => continue,
                StepPhase::Stabilizing(until) if now >= until && run.check_failures == 0 => {
                    run.phase = StepPhase::Running;
                    continue;
                }
                // The time is up but the last check failed: the next check decides (a
                // pass makes it running, a failure restarts the clock or fails it).
                StepPhase::Stabilizing(until) if now >= until => return Progress::Working,
                StepPhase::Stabilizing(until) => {
                    wake(until);
                    return Progress::Working;
                }
                StepPhase::Stopped => {
                    run.phase = StepPhase::Starting;
                    run.in_flight = Some(StepOp::Start);
                    run.message = None;
                    out.push(start_command(i, plan));
                    return Progress::Working;
                }
                StepPhase::Failed => return Progress::StepFailed(i),
                StepPhase::Unknown
                | StepPhase::Starting
                | StepPhase::Restarting
                | StepPhase::Stopping
                | StepPhase::StopFailed => return Progress::Working,
            }
        }
        Progress::Done
    }

    /// Brings the flow down one command at a time (virtual IPs first, then the other steps
    /// in reverse, then the volumes unless `keep_volumes`); true once there is nothing
    /// left to do.
    pub fn drive_down(&mut self, keep_volumes: bool, out: &mut Vec<Command>) -> bool {
        let mut vips_down = true;
        for (i, (plan, run)) in self.plan.steps.iter().zip(self.steps.iter_mut()).enumerate() {
            let PlannedKind::VirtualIp { vip } = &plan.kind else { continue };
            if matches!(run.phase, StepPhase::Stopped | StepPhase::StopFailed) {
                continue;
            }
            vips_down = false;
            if run.in_flight.is_none() {
                run.phase = StepPhase::Stopping;
                run.in_flight = Some(StepOp::Stop);
                out.push(Command::RemoveVip { step: i, vip: vip.clone() });
            }
        }
        if !vips_down {
            return false;
        }
        for (i, (plan, run)) in self.plan.steps.iter().zip(self.steps.iter_mut()).enumerate().rev() {
            if matches!(run.phase, StepPhase::Stopped | StepPhase::StopFailed) {
                continue;
            }
            if run.in_flight.is_none() {
                run.phase = StepPhase::Stopping;
                run.in_flight = Some(StepOp::Stop);
                out.push(Command::StopStep { step: i, name: plan.name.clone() });
            }
            return false;
        }
        if keep_volumes {
            return true;
        }
        let mut done = true;
        for v in &mut self.volumes {
            if matches!(v.phase, VolumePhase::Secondary | VolumePhase::DemoteFailed) {
                continue;
            }
            done = false;
            if v.in_flight.is_none() {
                v.phase = VolumePhase::Demoting;
                v.in_flight = Some(VolumeOp::Demote);
                out.push(Command::DemoteVolume { volume: v.name.clone() });
            }
        }
        done
    }

    /// Restarts step `i` locally.
    pub fn restart(&mut self, i: usize, out: &mut Vec<Command>) -> bool {
        let (Some(plan), Some(run)) = (self.plan.steps.get(i), self.steps.get_mut(i)) else { return false };
        if run.in_flight.is_some() {
            return false;
        }
        run.phase = StepPhase::Restarting;
        run.in_flight = Some(StepOp::Restart);
        run.check_failures = 0;
        out.push(Command::RestartStep { step: i, name: plan.name.clone() });
        true
    }

    pub fn restarts_mut(&mut self, i: usize) -> Option<(&PlannedStep, &mut RestartWindow)> {
        Some((self.plan.steps.get(i)?, &mut self.steps.get_mut(i)?.restarts))
    }

    pub fn on_step_done(&mut self, i: usize, op: StepOp, result: Result<(), String>, now: Instant) -> Outcome {
        let (Some(plan), Some(run)) = (self.plan.steps.get(i), self.steps.get_mut(i)) else {
            return Outcome::Unexpected;
        };
        if run.in_flight != Some(op) {
            return Outcome::Unexpected;
        }
        run.in_flight = None;
        match (op, result) {
            (StepOp::Start | StepOp::Restart, Ok(())) => {
                run.check_failures = 0;
                run.message = None;
                run.phase = if plan.stabilization.is_zero() {
                    StepPhase::Running
                } else {
                    StepPhase::Stabilizing(now + plan.stabilization)
                };
                Outcome::Ok
            }
            (StepOp::Stop, Ok(())) => {
                run.phase = StepPhase::Stopped;
                run.message = None;
                Outcome::Ok
            }
            (StepOp::Start | StepOp::Restart, Err(e)) => {
                run.phase = StepPhase::Failed;
                run.message = Some(e.clone());
                Outcome::Failed(e)
            }
            (StepOp::Stop, Err(e)) => {
                run.phase = StepPhase::StopFailed;
                run.message = Some(e.clone());
                Outcome::Failed(e)
            }
        }
    }

    pub fn on_volume_done(&mut self, name: &str, op: VolumeOp, result: Result<(), String>) -> Outcome {
        let Some(v) = self.volumes.iter_mut().find(|v| v.name == name) else { return Outcome::Unexpected };
        if v.in_flight != Some(op) {
            return Outcome::Unexpected;
        }
        v.in_flight = None;
        match (op, result) {
            (VolumeOp::Promote, Ok(())) => {
                v.phase = VolumePhase::Primary;
                Outcome::Ok
            }
            (VolumeOp::Demote, Ok(())) => {
                v.phase = VolumePhase::Secondary;
                Outcome::Ok
            }
            (VolumeOp::Promote, Err(e)) => {
                v.phase = VolumePhase::Failed;
                Outcome::Failed(e)
            }
            (VolumeOp::Demote, Err(e)) => {
                v.phase = VolumePhase::DemoteFailed;
                Outcome::Failed(e)
            }
        }
    }

    /// A health-check observation at `now`; true when it makes the step count as failed
    /// (`failureThreshold` failures in a row). A failure short of that while the step
    /// stabilizes restarts its stabilization clock: the step must *stay* healthy for the
    /// whole period.
    pub fn on_check(&mut self, now: Instant, i: usize, healthy: bool, message: Option<String>) -> bool {
        let (Some(plan), Some(run)) = (self.plan.steps.get(i), self.steps.get_mut(i)) else { return false };
        let Some(threshold) = plan.check_threshold else { return false };
        if run.in_flight.is_some() || !matches!(run.phase, StepPhase::Running | StepPhase::Stabilizing(_)) {
            return false;
        }
        if healthy {
            run.check_failures = 0;
            return false;
        }
        run.check_failures = run.check_failures.saturating_add(1);
        if run.check_failures >= threshold {
            run.phase = StepPhase::Failed;
            run.message = message.or_else(|| Some("health check failed".into()));
            return true;
        }
        if let StepPhase::Stabilizing(_) = run.phase {
            run.phase = StepPhase::Stabilizing(now + plan.stabilization);
        }
        false
    }

    /// Whether a health check of step `i` counts now: the step has a check and is up, with
    /// no start or stop of it in flight.
    pub fn check_counts(&self, i: usize) -> bool {
        match (self.plan.steps.get(i), self.steps.get(i)) {
            (Some(plan), Some(run)) => {
                plan.check_threshold.is_some()
                    && run.in_flight.is_none()
                    && matches!(run.phase, StepPhase::Running | StepPhase::Stabilizing(_))
            }
            _ => false,
        }
    }

    /// The steps that have a health check: index and name.
    pub fn checked_steps(&self) -> impl Iterator<Item = (usize, &str)> {
        self.plan
            .steps
            .iter()
            .enumerate()
            .filter(|(_, p)| p.check_threshold.is_some())
            .map(|(i, p)| (i, p.name.as_str()))
    }

    pub fn reports(&self) -> Vec<StepReport> {
        self.plan
            .steps
            .iter()
            .zip(&self.steps)
            .map(|(plan, run)| StepReport {
                name: plan.name.clone(),
                state: match run.phase {
                    StepPhase::Unknown | StepPhase::Stopping => StepState::Stopping,
                    StepPhase::Stopped => StepState::Stopped,
                    StepPhase::Starting => StepState::Starting,
                    StepPhase::Stabilizing(_) => StepState::Stabilizing,
                    StepPhase::Running => StepState::Running,
                    StepPhase::Restarting => StepState::Restarting,
                    StepPhase::Failed | StepPhase::StopFailed => StepState::Failed,
                },
                restarts: run.restarts.total(),
                message: run.message.clone(),
            })
            .collect()
    }
}

fn start_command(i: usize, plan: &PlannedStep) -> Command {
    match &plan.kind {
        PlannedKind::VirtualIp { vip } => Command::AddVip { step: i, vip: vip.clone() },
        _ => Command::StartStep { step: i, name: plan.name.clone() },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const S: u64 = 1_000;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn exec_step(name: &str, stabilization: Duration, check_threshold: Option<u32>) -> PlannedStep {
        PlannedStep {
            name: name.into(),
            kind: PlannedKind::Exec,
            stabilization,
            restart_limit: 2,
            restart_window: Duration::from_secs(60),
            check_threshold,
        }
    }

    /// `app` (checked, `failureThreshold` 3, the given stabilization) then `next`, all
    /// stopped.
    fn stopped(stabilization: Duration) -> Flow {
        let plan = FlowPlan {
            steps: vec![exec_step("app", stabilization, Some(3)), exec_step("next", Duration::ZERO, None)],
            volumes: vec![],
        };
        let mut flow = Flow::unknown(plan);
        for s in &mut flow.steps {
            s.phase = StepPhase::Stopped;
        }
        flow
    }

    /// Drives the flow up at `now`: its progress, the commands and the wake-up asked for.
    fn up(flow: &mut Flow, now: Instant) -> (Progress, Vec<Command>, Option<Instant>) {
        let (mut out, mut wake) = (Vec::new(), None);
        let progress = flow.drive_up(now, 1, false, &mut out, &mut |t| wake = Some(t));
        (progress, out, wake)
    }

    fn start(i: usize, name: &str) -> Vec<Command> {
        vec![Command::StartStep { step: i, name: name.into() }]
    }

    /// `app` started at t = 0 and stabilizing for `stabilization`.
    fn app_started(stabilization: Duration) -> Flow {
        let mut flow = stopped(stabilization);
        assert_eq!(up(&mut flow, at(0)), (Progress::Working, start(0, "app"), None));
        assert_eq!(flow.on_step_done(0, StepOp::Start, Ok(()), at(0)), Outcome::Ok);
        flow
    }

    fn phase(flow: &Flow, i: usize) -> StepPhase {
        flow.steps[i].phase
    }

    #[test]
    fn a_step_runs_only_after_its_stabilization_period() {
        let mut flow = app_started(Duration::from_secs(10));
        assert_eq!(phase(&flow, 0), StepPhase::Stabilizing(at(10 * S)));
        assert!(!flow.on_check(at(5 * S), 0, true, None));
        assert_eq!(up(&mut flow, at(5 * S)), (Progress::Working, vec![], Some(at(10 * S))));
        assert_eq!(up(&mut flow, at(10 * S)), (Progress::Working, start(1, "next"), None));
        assert_eq!(phase(&flow, 0), StepPhase::Running);
    }

    #[test]
    fn a_failed_check_restarts_the_stabilization_clock() {
        let mut flow = app_started(Duration::from_secs(10));
        assert!(!flow.on_check(at(8 * S), 0, false, Some("refused".into())), "1 of 3 failures");
        assert_eq!(phase(&flow, 0), StepPhase::Stabilizing(at(18 * S)));
        assert!(!flow.on_check(at(12 * S), 0, true, None));
        // The original end of the period no longer counts.
        assert_eq!(up(&mut flow, at(10 * S)), (Progress::Working, vec![], Some(at(18 * S))));
        assert_eq!(up(&mut flow, at(18 * S - 1)), (Progress::Working, vec![], Some(at(18 * S))));
        assert_eq!(up(&mut flow, at(18 * S)), (Progress::Working, start(1, "next"), None));
        assert_eq!(phase(&flow, 0), StepPhase::Running);
    }

    #[test]
    fn every_failed_check_while_stabilizing_restarts_the_clock() {
        let mut flow = app_started(Duration::from_secs(10));
        assert!(!flow.on_check(at(4 * S), 0, false, None));
        assert!(!flow.on_check(at(5 * S), 0, true, None), "a pass resets the count");
        assert!(!flow.on_check(at(9 * S), 0, false, None));
        assert!(!flow.on_check(at(13 * S), 0, false, None), "2 of 3 failures in a row");
        assert_eq!(phase(&flow, 0), StepPhase::Stabilizing(at(23 * S)));
    }

    #[test]
    fn a_step_whose_last_check_failed_waits_for_a_passing_check() {
        let mut flow = app_started(Duration::from_secs(10));
        assert!(!flow.on_check(at(8 * S), 0, false, None));
        // The clock ran out with a failure pending (checks are rarer than the period): no
        // wake-up, the next check decides.
        assert_eq!(up(&mut flow, at(20 * S)), (Progress::Working, vec![], None));
        assert_eq!(phase(&flow, 0), StepPhase::Stabilizing(at(18 * S)));
        assert!(!flow.on_check(at(23 * S), 0, true, None));
        assert_eq!(up(&mut flow, at(23 * S)), (Progress::Working, start(1, "next"), None));
    }

    #[test]
    fn the_threshold_counts_consecutive_failures() {
        let mut flow = app_started(Duration::ZERO);
        assert_eq!(phase(&flow, 0), StepPhase::Running);
        assert_eq!(up(&mut flow, at(0)), (Progress::Working, start(1, "next"), None));
        assert_eq!(flow.on_step_done(1, StepOp::Start, Ok(()), at(0)), Outcome::Ok);
        assert!(flow.is_up());
        assert!(!flow.on_check(at(S), 0, false, None));
        assert!(!flow.on_check(at(2 * S), 0, false, None));
        assert!(!flow.on_check(at(3 * S), 0, true, None), "a pass resets the count");
        assert!(!flow.on_check(at(4 * S), 0, false, None));
        // A running step is not sent back to stabilizing by a failure short of the
        // threshold: the steps after it already run.
        assert_eq!(phase(&flow, 0), StepPhase::Running);
        assert!(!flow.on_check(at(5 * S), 0, false, None));
        assert!(flow.on_check(at(6 * S), 0, false, Some("connection refused".into())));
        assert_eq!(phase(&flow, 0), StepPhase::Failed);
        assert_eq!(flow.steps[0].message.as_deref(), Some("connection refused"));
        assert!(!flow.on_check(at(7 * S), 0, true, None), "the failure sticks until a restart");
        assert_eq!(phase(&flow, 0), StepPhase::Failed);
        assert_eq!(up(&mut flow, at(7 * S)), (Progress::StepFailed(0), vec![], None));
    }

    #[test]
    fn a_restart_clears_the_failures_and_stabilizes_again() {
        let mut flow = app_started(Duration::from_secs(10));
        for t in [S, 2 * S] {
            assert!(!flow.on_check(at(t), 0, false, None));
        }
        assert!(flow.on_check(at(3 * S), 0, false, None));
        let mut out = Vec::new();
        assert!(flow.restart(0, &mut out));
        assert_eq!(out, vec![Command::RestartStep { step: 0, name: "app".into() }]);
        assert_eq!(flow.on_step_done(0, StepOp::Restart, Ok(()), at(4 * S)), Outcome::Ok);
        assert_eq!(phase(&flow, 0), StepPhase::Stabilizing(at(14 * S)));
        assert_eq!(flow.steps[0].check_failures, 0);
        assert_eq!(up(&mut flow, at(14 * S)), (Progress::Working, start(1, "next"), None));
    }

    #[test]
    fn a_step_without_a_check_ignores_check_results() {
        let mut flow = app_started(Duration::ZERO);
        assert_eq!(up(&mut flow, at(0)), (Progress::Working, start(1, "next"), None));
        assert_eq!(flow.on_step_done(1, StepOp::Start, Ok(()), at(0)), Outcome::Ok);
        for t in 1..5 {
            assert!(!flow.on_check(at(t * S), 1, false, None));
        }
        assert_eq!(phase(&flow, 1), StepPhase::Running);
    }
}
