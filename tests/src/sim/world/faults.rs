//! Fault injection during the chaos phase, and healing.
//!
//! Every fault has a random duration (0.2 to 6 `deadAfter`) and heals on its own; at the
//! end of the chaos phase everything heals at once: partitions close, bursts stop,
//! crashed agents and the witness restart, stalled agents resume, replicas resync,
//! monitors recover and maintenance is switched off. On replicated controllers the
//! leadership moves too (a fault of its own, heard of by the deposed leader only later),
//! and a crashed witness is a crashed leader; at the end a leader answers, and no deposed
//! one does.

use hapair_crds::volume::DiskState;
use rand::Rng;

use super::super::params::{APP_STEP, MONITOR, NODES, VOLUME};
use super::{Admin, Ev, Failure, Heal, Phase, World, nanos};
use hapair_agent::engine::Event;
use hapair_crds::volume::ConnectionState;

/// The share of faults that move the leadership, in schedules with replicated controllers.
const LEADER_CHANGES: f64 = 0.08;

impl World {
    pub(super) fn inject_fault(&mut self) -> Result<(), Failure> {
        self.outcome.stats.faults += 1;
        let d = nanos(self.p.timings.dead_after);
        let duration = self.rng.random_range(d / 5..=6 * d);
        let until = self.now + duration;
        let era = self.era;
        let node = self.rng.random_range(0..2);
        if let Some(leaders) = self.p.leaders
            && self.rng.random_bool(LEADER_CHANGES)
        {
            let delay = leaders.takeover_delay(&mut self.rng);
            trace!(self, "FAULT leadership moves");
            self.change_leader(delay);
            return Ok(());
        }
        match self.rng.random_range(0..17) {
            0 | 1 => {
                let link = self.rng.random_range(0..self.p.links);
                let dirs: &[usize] = match self.rng.random_range(0..3) {
                    0 => &[0],
                    1 => &[1],
                    _ => &[0, 1],
                };
                for &dir in dirs {
                    self.link_cuts[link][dir] += 1;
                    self.push(until, 2, Ev::Heal { era, heal: Heal::Link { link, dir } });
                }
                trace!(self, "FAULT link {link} cut {dirs:?} for {:.0} ms", duration as f64 / 1e6);
            }
            2 | 3 => {
                for link in 0..self.p.links {
                    for dir in 0..2 {
                        self.link_cuts[link][dir] += 1;
                        self.push(until, 2, Ev::Heal { era, heal: Heal::Link { link, dir } });
                    }
                }
                trace!(self, "FAULT all heartbeat links cut for {:.0} ms", duration as f64 / 1e6);
            }
            4 => {
                self.witness_cuts[node] += 1;
                self.push(until, 2, Ev::Heal { era, heal: Heal::WitnessPath { node } });
                trace!(self, "FAULT witness path of {} cut for {:.0} ms", NODES[node], duration as f64 / 1e6);
            }
            5 if self.leaders.is_some() => self.crash_leader(),
            5 => {
                if self.witness.witness.take().is_some() {
                    self.witness.generation += 1;
                    let generation = self.witness.generation;
                    self.push(until, 5, Ev::WitnessRestart { generation });
                    trace!(self, "FAULT witness crashed for {:.0} ms", duration as f64 / 1e6);
                }
            }
            6 => {
                if !self.nodes[node].down {
                    trace!(self, "FAULT {} machine crash for {:.0} ms", NODES[node], duration as f64 / 1e6);
                    self.reset_machine(node);
                    self.schedule_restart(node, duration);
                }
            }
            7 => {
                if !self.nodes[node].down {
                    let after = duration / 10;
                    trace!(self, "FAULT {} agent crash, restart after {:.0} ms", NODES[node], after as f64 / 1e6);
                    self.kill_agent(node);
                    self.schedule_restart(node, after);
                }
            }
            8 | 9 => {
                let n = &mut self.nodes[node];
                if !n.down && n.paused.is_none() {
                    let lease = nanos(self.p.timings.lease);
                    let stall =
                        if self.rng.random_bool(0.5) { self.rng.random_range(lease / 20..=lease) } else { duration };
                    let n = &mut self.nodes[node];
                    n.paused = Some(self.now + stall);
                    n.pause_gen += 1;
                    let generation = n.pause_gen;
                    self.push(self.now + stall, 5, Ev::Resume { node, generation });
                    trace!(self, "FAULT {} paused for {:.0} ms", NODES[node], stall as f64 / 1e6);
                }
            }
            10 => {
                self.loss = self.rng.random_range(0.2..0.95);
                self.loss_gen += 1;
                let generation = self.loss_gen;
                self.push(until, 2, Ev::Heal { era, heal: Heal::Loss { generation } });
                let loss = self.loss;
                trace!(self, "FAULT loss {loss:.2} for {:.0} ms", duration as f64 / 1e6);
            }
            11 => {
                self.dup = self.rng.random_range(0.1..0.6);
                self.dup_gen += 1;
                let generation = self.dup_gen;
                self.push(until, 2, Ev::Heal { era, heal: Heal::Dup { generation } });
                let dup = self.dup;
                trace!(self, "FAULT duplication {dup:.2} for {:.0} ms", duration as f64 / 1e6);
            }
            12 => {
                let interval = nanos(self.p.timings.interval);
                self.extra_delay = self.rng.random_range(interval..=d / 2);
                self.delay_gen += 1;
                let generation = self.delay_gen;
                self.push(until, 2, Ev::Heal { era, heal: Heal::Delay { generation } });
                let extra = self.extra_delay;
                trace!(self, "FAULT delays up to {:.0} ms for {:.0} ms", extra as f64 / 1e6, duration as f64 / 1e6);
            }
            13 => {
                // A replica resyncs: only ever the one not holding the service.
                if !self.nodes[node].holds() && self.nodes[node].disk == DiskState::UpToDate {
                    self.set_disk(node, DiskState::Inconsistent)?;
                    self.push(until, 2, Ev::Heal { era, heal: Heal::Disk { node } });
                    trace!(self, "FAULT {} resyncing (Inconsistent) for {:.0} ms", NODES[node], duration as f64 / 1e6);
                }
            }
            14 => {
                if !self.nodes[node].probe_failing {
                    self.set_probe(node, false)?;
                    self.push(until, 2, Ev::Heal { era, heal: Heal::Probe { node } });
                    trace!(self, "FAULT {} gateway monitor failing for {:.0} ms", NODES[node], duration as f64 / 1e6);
                }
            }
            15 => {
                // The application's health check fails once: a local restart, or past
                // the restart limit a failover.
                trace!(self, "FAULT {} application health check fails", NODES[node]);
                let event = Event::StepCheck { step: APP_STEP, healthy: false, message: Some("exit status 1".into()) };
                self.deliver(node, event)?;
            }
            _ => {
                let target = match self.rng.random_range(0..10) {
                    0..=3 => Admin::Switchover(node),
                    4 | 5 => Admin::ForceActive(node),
                    6 => Admin::Resolve(node),
                    7 | 8 => {
                        self.maintenance_used = true;
                        Admin::Maintenance(true)
                    }
                    _ => Admin::Maintenance(false),
                };
                trace!(self, "FAULT admin {target:?}");
                self.send_admin(target);
            }
        }
        Ok(())
    }

    pub(super) fn heal(&mut self, heal: Heal) -> Result<(), Failure> {
        match heal {
            Heal::Link { link, dir } => self.link_cuts[link][dir] = self.link_cuts[link][dir].saturating_sub(1),
            Heal::WitnessPath { node } => self.witness_cuts[node] = self.witness_cuts[node].saturating_sub(1),
            Heal::Loss { generation } if generation == self.loss_gen => self.loss = 0.0,
            Heal::Dup { generation } if generation == self.dup_gen => self.dup = 0.0,
            Heal::Delay { generation } if generation == self.delay_gen => self.extra_delay = 0,
            Heal::Disk { node } => self.set_disk(node, DiskState::UpToDate)?,
            Heal::Probe { node } => self.set_probe(node, true)?,
            _ => {}
        }
        Ok(())
    }

    fn set_disk(&mut self, node: usize, disk: DiskState) -> Result<(), Failure> {
        self.nodes[node].disk = disk;
        self.deliver(node, Event::Volume { volume: VOLUME.into(), disk, connection: ConnectionState::Connected })
    }

    fn set_probe(&mut self, node: usize, healthy: bool) -> Result<(), Failure> {
        self.nodes[node].probe_failing = !healthy;
        let message = (!healthy).then(|| "gateway lost".to_string());
        self.deliver(node, Event::Probe { monitor: MONITOR.into(), healthy, message })
    }

    /// The end of chaos: every fault heals now.
    pub(super) fn heal_all(&mut self) -> Result<(), Failure> {
        trace!(self, "HEAL everything");
        self.era += 1;
        self.link_cuts.iter_mut().for_each(|c| *c = [0, 0]);
        self.witness_cuts = [0, 0];
        self.loss = 0.0;
        self.dup = 0.0;
        self.extra_delay = 0;
        if self.leaders.is_some() {
            self.heal_leaders();
        } else if self.witness.witness.is_none() {
            self.restart_witness();
        }
        for node in 0..2 {
            if self.nodes[node].paused.is_some() {
                self.resume(node)?;
            }
            if self.nodes[node].down {
                self.start_agent(node)?;
            }
            if self.nodes[node].disk != DiskState::UpToDate {
                self.set_disk(node, DiskState::UpToDate)?;
            }
            if self.nodes[node].probe_failing {
                self.set_probe(node, true)?;
            }
        }
        if self.maintenance_used {
            self.action_seq += 1;
            let action = hapair_crds::nodeapi::AdminAction {
                id: format!("act-{}", self.action_seq),
                kind: hapair_crds::nodeapi::AdminActionKind::Maintenance { enabled: false },
            };
            for node in 0..2 {
                self.deliver(node, Event::Admin(action.clone()))?;
            }
        }
        self.phase = Phase::Converging { since: self.now, stable_since: None };
        let half = nanos(self.p.timings.dead_after) / 2;
        self.push(self.now + half, 9, Ev::Check);
        Ok(())
    }
}
