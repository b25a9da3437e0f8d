//! Carrying out the engine's flow commands: each step operation runs as its own task and
//! reports back with a `StepDone`; at most one operation per step runs at a time.
//!
//! Which executor runs a step is decided by the step's kind ([`Target`]): commands and
//! systemd units through [`FlowRunner`], virtual IPs through [`VipManager`] plus the
//! announcements, volume steps through [`crate::volume_step`] on the group's replica
//! (attach its NBD socket, create the filesystem on first use when asked, mount; in
//! reverse unmount, flush, detach). Promoting and demoting the replica itself are separate
//! engine commands, run before the volume step starts and after it stopped.
//!
//! A step is stopped the way it was started: the target used for a start is remembered
//! per step, so a config change that arrives while the old flow still runs (the engine
//! swaps plans only once everything is down) never stops an old step with a new
//! definition. Commands address steps by their index in the engine's plan and carry the
//! step's (or virtual IP's) name, which is how a target is found in the current spec.
//!
//! A virtual IP counts as up once the address is on the interface and the first
//! announcement is out; the remaining announcements (`garp.count`, `garp.interval`) and
//! the periodic refresh run in the background until the address is removed — removal
//! cancels them first, so nothing announces an address this node no longer holds.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use hapair_crds::hagroup::{CheckSpec, FlowStep, HaGroupSpec, StepKind, VolumeStep};
use hapair_crds::nodeapi::GroupKey;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::inbox::Input;
use crate::engine::StepOp;
use crate::flow::runner::FlowError;
use crate::flow::systemd::Systemctl;
use crate::flow::{FlowRunner, Outcome};
use crate::iface::Netlink;
use crate::replication::replica::Replica;
use crate::vip::{self, AddOutcome, ResolvedVip, VipManager, announce};
use crate::volume_step::{self, ActiveVolume, StepPlan};

/// One group's flow definition as this node runs it.
#[derive(Clone, Debug)]
pub struct FlowSpec {
    runner: Arc<FlowRunner>,
    flow: Vec<FlowStep>,
    vips: BTreeMap<String, ResolvedVip>,
}

impl FlowSpec {
    /// Resolves `spec` for `node` (interfaces, VIP addresses); refuses what cannot run.
    pub fn new(
        group: &GroupKey,
        spec: &HaGroupSpec,
        node: &str,
        vips: &Arc<VipManager>,
    ) -> Result<FlowSpec, FlowError> {
        let runner = FlowRunner::new(group.clone(), spec, node, Some(Arc::clone(vips)), Systemctl::default())?;
        let me = spec.nodes.iter().find(|n| n.name == node).ok_or_else(|| FlowError::NotAMember(node.to_string()))?;
        let mut resolved = BTreeMap::new();
        for v in &spec.virtual_ips {
            resolved.insert(v.name.clone(), vip::resolve(v, me)?);
        }
        Ok(FlowSpec { runner: Arc::new(runner), flow: spec.flow.clone(), vips: resolved })
    }

    pub fn vip(&self, name: &str) -> Option<&ResolvedVip> {
        self.vips.get(name)
    }
}

/// How one step is carried out.
#[derive(Clone, Debug)]
pub enum Target {
    /// An exec or systemd step: index `index` of `runner`'s flow.
    Runner {
        runner: Arc<FlowRunner>,
        index: usize,
        check: Option<CheckSpec>,
    },
    Vip(ResolvedVip),
    /// A volume step on the replica of `step.volume_ref` (if it is open by then).
    Volume(Box<VolumeStep>),
    /// Nothing by that name in the spec.
    Missing(String),
}

/// One group's running step operations.
#[derive(Debug)]
pub struct StepExecutor {
    spec: FlowSpec,
    vip_manager: Arc<VipManager>,
    netlink: Netlink,
    inbox: UnboundedSender<Input>,
    /// How each step of the engine's plan was last started.
    started: BTreeMap<usize, Target>,
    /// The operation running per step.
    busy: BTreeMap<usize, StepOp>,
    /// Operations that arrived while another one ran for the same step (the engine never
    /// does that; if it ever did, order is kept rather than racing).
    waiting: BTreeMap<usize, VecDeque<(StepOp, Target)>>,
    announcers: BTreeMap<String, JoinHandle<()>>,
    /// The group's open replicas, by volume name.
    replicas: BTreeMap<String, Replica>,
    /// What each running volume step attached and mounted, to be undone by its stop.
    active: Arc<Mutex<BTreeMap<usize, ActiveVolume>>>,
}

impl Drop for StepExecutor {
    fn drop(&mut self) {
        for (_, task) in std::mem::take(&mut self.announcers) {
            task.abort();
        }
    }
}

fn summary(outcome: &Outcome) -> String {
    let mut text = outcome.summary();
    let detail = match outcome {
        Outcome::Ok { .. } => "",
        Outcome::Failed { detail, .. } | Outcome::TimedOut { detail, .. } => detail.trim(),
    };
    if let Some(last) = detail.lines().last().filter(|l| !l.is_empty()) {
        text.push_str(": ");
        text.extend(last.chars().take(200));
    }
    text
}

fn result(outcome: Outcome) -> Result<(), String> {
    if outcome.is_ok() { Ok(()) } else { Err(summary(&outcome)) }
}

impl StepExecutor {
    pub fn new(spec: FlowSpec, vip_manager: Arc<VipManager>, netlink: Netlink, inbox: UnboundedSender<Input>) -> Self {
        StepExecutor {
            spec,
            vip_manager,
            netlink,
            inbox,
            started: BTreeMap::new(),
            busy: BTreeMap::new(),
            waiting: BTreeMap::new(),
            announcers: BTreeMap::new(),
            replicas: BTreeMap::new(),
            active: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// The replica of `volume` is open; volume steps on it can run.
    pub fn set_replica(&mut self, volume: &str, replica: Replica) {
        self.replicas.insert(volume.to_string(), replica);
    }

    /// A new definition for steps started from now on.
    pub fn replace_spec(&mut self, spec: FlowSpec) {
        self.spec = spec;
    }

    pub fn spec(&self) -> &FlowSpec {
        &self.spec
    }

    /// The target of step `name` in the current spec.
    fn resolve(&self, name: &str) -> Target {
        match self.spec.flow.iter().position(|s| s.name == name) {
            Some(index) => match self.spec.flow[index].kind() {
                Some(StepKind::Exec(_) | StepKind::Systemd(_)) => Target::Runner {
                    runner: Arc::clone(&self.spec.runner),
                    index,
                    check: self.spec.flow[index].check.clone(),
                },
                Some(StepKind::VirtualIp(v)) => match self.spec.vips.get(&v.name) {
                    Some(vip) => Target::Vip(vip.clone()),
                    None => Target::Missing(format!("virtual IP {:?} is not defined", v.name)),
                },
                Some(StepKind::Volume(v)) => Target::Volume(Box::new(v.clone())),
                None => Target::Missing(format!("step {name:?} sets no single kind")),
            },
            None => Target::Missing(format!("no flow step named {name:?}")),
        }
    }

    fn resolve_vip(&self, vip: &str) -> Target {
        match self.spec.vips.get(vip) {
            Some(v) => Target::Vip(v.clone()),
            None => Target::Missing(format!("virtual IP {vip:?} is not defined")),
        }
    }

    /// How step `step` was started, if it still matches `name`; otherwise the current spec.
    fn started_or(&self, step: usize, matches: impl Fn(&Target) -> bool, fallback: impl FnOnce() -> Target) -> Target {
        match self.started.get(&step) {
            Some(t) if matches(t) => t.clone(),
            _ => fallback(),
        }
    }

    pub fn start_step(&mut self, step: usize, name: &str) {
        let target = self.resolve(name);
        self.run(step, StepOp::Start, target);
    }

    pub fn stop_step(&mut self, step: usize, name: &str) {
        let runner_name = |t: &Target| match t {
            Target::Runner { runner, index, .. } => runner.steps().get(*index).is_some_and(|s| s.name == name),
            _ => false,
        };
        let target = self.started_or(step, runner_name, || self.resolve(name));
        self.run(step, StepOp::Stop, target);
    }

    pub fn restart_step(&mut self, step: usize, name: &str) {
        let same = |t: &Target| match t {
            Target::Runner { runner, index, .. } => runner.steps().get(*index).is_some_and(|s| s.name == name),
            Target::Vip(_) => true,
            _ => false,
        };
        let target = self.started_or(step, same, || self.resolve(name));
        self.run(step, StepOp::Restart, target);
    }

    pub fn add_vip(&mut self, step: usize, vip: &str) {
        let target = self.resolve_vip(vip);
        self.run(step, StepOp::Start, target);
    }

    /// Cancels the address's announcements at once, then removes it.
    pub fn remove_vip(&mut self, step: usize, vip: &str) {
        if let Some(task) = self.announcers.remove(vip) {
            task.abort();
        }
        let same = |t: &Target| matches!(t, Target::Vip(v) if v.name == vip);
        let target = self.started_or(step, same, || self.resolve_vip(vip));
        self.run(step, StepOp::Stop, target);
    }

    /// A serving engine resumed after an agent restart: step `step` was started by the
    /// previous run, with the current definition.
    pub fn resume_step(&mut self, step: usize, name: &str) {
        let target = self.resolve(name);
        self.started.insert(step, target);
    }

    /// A serving engine resumed after an agent restart: its virtual IPs are on the
    /// interfaces; keep re-announcing those that ask for it, as the previous run did.
    pub fn resume_vip(&mut self, step: usize, vip: &str) {
        let Some(resolved) = self.spec.vips.get(vip).cloned() else { return };
        self.started.insert(step, Target::Vip(resolved.clone()));
        if !resolved.garp.refresh.is_zero() {
            let netlink = self.netlink.clone();
            let task = tokio::spawn(
                async move {
                    refresh(&netlink, &resolved).await;
                }
                .in_current_span(),
            );
            if let Some(old) = self.announcers.insert(vip.to_string(), task) {
                old.abort();
            }
        }
    }

    /// The check of step `step`, if it was started with one.
    pub fn check_of(&self, step: usize) -> Option<(Arc<FlowRunner>, usize, CheckSpec)> {
        match self.started.get(&step)? {
            Target::Runner { runner, index, check: Some(check) } => Some((Arc::clone(runner), *index, check.clone())),
            _ => None,
        }
    }

    /// An operation finished; the next waiting one for the step (if any) starts.
    pub fn finished(&mut self, step: usize, op: StepOp) {
        if self.busy.get(&step) == Some(&op) {
            self.busy.remove(&step);
        }
        if op == StepOp::Stop {
            self.started.remove(&step);
        }
        let next = self.waiting.get_mut(&step).and_then(VecDeque::pop_front);
        if self.waiting.get(&step).is_some_and(VecDeque::is_empty) {
            self.waiting.remove(&step);
        }
        if let Some((op, target)) = next {
            self.run(step, op, target);
        }
    }

    fn run(&mut self, step: usize, op: StepOp, target: Target) {
        if let Some(running) = self.busy.get(&step) {
            tracing::warn!(
                step,
                running = running.as_str(),
                queued = op.as_str(),
                "a second operation for one step; queued"
            );
            self.waiting.entry(step).or_default().push_back((op, target));
            return;
        }
        self.busy.insert(step, op);
        if matches!(op, StepOp::Start | StepOp::Restart) {
            self.started.insert(step, target.clone());
        }
        let inbox = self.inbox.clone();
        let done = move |result: Result<(), String>| {
            let _ = inbox.send(Input::StepDone { step, op, result });
        };
        match target {
            Target::Runner { runner, index, .. } => {
                tokio::spawn(
                    async move {
                        let outcome = match op {
                            StepOp::Start => runner.start_step(index).await,
                            StepOp::Stop => runner.stop_step(index).await,
                            StepOp::Restart => {
                                let stopped = runner.stop_step(index).await;
                                if stopped.is_ok() { runner.start_step(index).await } else { stopped }
                            }
                        };
                        done(result(outcome));
                    }
                    .in_current_span(),
                );
            }
            Target::Vip(vip) => {
                let (manager, netlink) = (Arc::clone(&self.vip_manager), self.netlink.clone());
                let name = vip.name.clone();
                let task = tokio::spawn(
                    async move {
                        if op != StepOp::Start {
                            let removed = manager.remove(&vip).await.map(|_| ()).map_err(|e| e.to_string());
                            if op == StepOp::Stop || removed.is_err() {
                                done(removed);
                                return;
                            }
                        }
                        match take_over(&manager, &netlink, &vip).await {
                            Ok(announced) => {
                                done(Ok(()));
                                if let Some((index, mac)) = announced {
                                    announce_rest(index, mac, &vip).await;
                                    refresh(&netlink, &vip).await;
                                }
                            }
                            Err(e) => done(Err(e)),
                        }
                    }
                    .in_current_span(),
                );
                if op == StepOp::Stop {
                    // Removal is short; nothing to cancel later.
                    drop(task);
                } else if let Some(old) = self.announcers.insert(name, task) {
                    old.abort();
                }
            }
            Target::Volume(spec) => {
                let replica = self.replicas.get(&spec.volume_ref).cloned();
                let active = Arc::clone(&self.active);
                tokio::spawn(
                    async move {
                        done(volume_op(step, op, &spec, replica, &active).await);
                    }
                    .in_current_span(),
                );
            }
            Target::Missing(why) => done(Err(why)),
        }
    }
}

fn take_active(active: &Mutex<BTreeMap<usize, ActiveVolume>>, step: usize) -> Option<ActiveVolume> {
    active.lock().unwrap_or_else(|p| p.into_inner()).remove(&step)
}

/// Starts, stops or restarts volume step `step`. A stop undoes what this run's start did;
/// one that finds nothing recorded (the start failed and undid itself) has nothing to do.
async fn volume_op(
    step: usize,
    op: StepOp,
    spec: &VolumeStep,
    replica: Option<Replica>,
    active: &Mutex<BTreeMap<usize, ActiveVolume>>,
) -> Result<(), String> {
    let plan = StepPlan::from_step(spec).map_err(|e| format!("volume {}: {e}", spec.volume_ref))?;
    if matches!(op, StepOp::Stop | StepOp::Restart)
        && let Some(was) = take_active(active, step)
    {
        let device = was.device.display().to_string();
        let fenced = replica.as_ref().is_some_and(|r| r.status().fenced);
        volume_step::take_down(was, plan.timeout, fenced)
            .await
            .map_err(|e| format!("volume {}: {e}", spec.volume_ref))?;
        tracing::info!(volume = %spec.volume_ref, device, "volume step stopped: unmounted, flushed, detached");
    }
    if op == StepOp::Stop {
        return Ok(());
    }
    let replica = replica.ok_or_else(|| format!("volume {}: the replica is not open on this node", spec.volume_ref))?;
    let up = volume_step::bring_up(&replica, &plan).await.map_err(|e| format!("volume {}: {e}", spec.volume_ref))?;
    tracing::info!(
        volume = %spec.volume_ref,
        device = %up.device.display(),
        mounted = ?up.mounted,
        created_filesystem = up.created_filesystem,
        "volume step started"
    );
    active.lock().unwrap_or_else(|p| p.into_inner()).insert(step, up);
    Ok(())
}

/// Adds the address and sends the first announcement; returns where to send the rest
/// (`None` for an address that was already there and needs none).
async fn take_over(
    manager: &VipManager,
    netlink: &Netlink,
    vip: &ResolvedVip,
) -> Result<Option<(u32, [u8; 6])>, String> {
    match manager.add(vip).await.map_err(|e| e.to_string())? {
        AddOutcome::Foreign => {
            return Err(format!(
                "{vip} is already configured on the interface by something other than hapair; it is left alone"
            ));
        }
        AddOutcome::Added | AddOutcome::AlreadyOurs => {}
    }
    let iface = netlink.interface(&vip.device).await.map_err(|e| format!("virtual IP {}: {e}", vip.name))?;
    let mac =
        iface.mac.ok_or_else(|| format!("virtual IP {}: interface {} has no MAC address", vip.name, vip.device))?;
    announce::announce_once(iface.index, mac, vip.address)
        .await
        .map_err(|e| format!("virtual IP {}: announcing {} on {}: {e}", vip.name, vip.address, vip.device))?;
    Ok(Some((iface.index, mac)))
}

async fn announce_rest(index: u32, mac: [u8; 6], vip: &ResolvedVip) {
    for _ in 1..vip.garp.count.max(1) {
        tokio::time::sleep(vip.garp.interval.as_std()).await;
        if let Err(e) = announce::announce_once(index, mac, vip.address).await {
            tracing::warn!(vip = %vip, error = %e, "announcement failed");
        }
    }
}

/// Re-announces every `garp.refresh` (when set) until cancelled.
async fn refresh(netlink: &Netlink, vip: &ResolvedVip) {
    let every = vip.garp.refresh.as_std();
    if every.is_zero() {
        return;
    }
    loop {
        tokio::time::sleep(every).await;
        let sent = match netlink.interface(&vip.device).await {
            Ok(iface) => match iface.mac {
                Some(mac) => announce::announce_once(iface.index, mac, vip.address).await.map_err(|e| e.to_string()),
                None => Err(format!("interface {} has no MAC address", vip.device)),
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            tracing::warn!(vip = %vip, error = %e, "periodic announcement failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_the_last_line_of_output() {
        let outcome =
            Outcome::Failed { reason: "start exited with 3".into(), detail: "starting\nport 80 in use\n".into() };
        assert_eq!(summary(&outcome), "start exited with 3: port 80 in use");
        assert_eq!(result(Outcome::Ok { detail: "x".into() }), Ok(()));
        let timed_out = Outcome::TimedOut { after: std::time::Duration::from_secs(1), detail: String::new() };
        assert_eq!(result(timed_out), Err("timed out after 1s".into()));
    }
}
