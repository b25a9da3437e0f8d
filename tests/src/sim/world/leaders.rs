//! Replicated controllers behind the witness, and their changes of leadership.
//!
//! In schedules with [`Leaders`], the witness runs on several controllers sharing etcd, one
//! of them leading, as `hapair-operator standalone --etcd` does:
//!
//! - **Agents broadcast.** Each witness request goes to every controller at once, each over
//!   its own path; the first answer that is not a 503 is the answer, and only when every
//!   controller refused (503, or unreachable) does the agent hear `Failed`. A lost message
//!   leaves the agent waiting until its timeout.
//! - **The leader records before answering.** After a decision that grants or releases, the
//!   leader writes the group's `LeaseRecord` to etcd in a transaction fenced by its
//!   leadership, its writes one after the other; the answer goes out once the write
//!   committed. A write that commits after the leadership moved is refused, and its answer
//!   is answered 503 ("not leader"), as the node API answers a failed journal write.
//!   Denials write nothing and go out at once.
//! - **Leadership moves at any moment** (never relying on the etcd lease's expiry to leave
//!   a gap): requests in flight may be decided by the old leader before the change (their
//!   records committed or refused by the time the change comes), by the old leader after it
//!   (it does not know yet, until a random moment within the takeover delay and a round
//!   trip: its writes are refused), or by the successor. The successor answers after a
//!   takeover delay (zero at times), during which it and every other controller answer
//!   503. It then resumes on its own new clock with `Witness::resume` from what etcd holds
//!   (and the group's persisted epoch), and leads.
//! - **A crashed leader** (the witness-crash fault of these schedules) answers nothing any
//!   more (its connections are refused), while the writes it had sent may still commit; the
//!   leadership moves within two writes' time. A blank, waiting-out restart that kept
//!   writing records would be a controller the product never runs (an etcd controller
//!   always resumes from the records); and one that did could overwrite a live holder's
//!   record, by answering a release during its wait-out, with none. Blank restarts stay
//!   in the schedules of a single standalone controller, unchanged.

use std::time::Duration;

use hapair_agent::engine::{Event, WitnessAnswer};
use hapair_crds::nodeapi::{LeaseRequest, LeaseResponse};
use hapair_operator::witness::{LeaseRecord, Witness};
use rand::Rng;

use super::super::clock::SimClock;
use super::super::params::FailoverChange;
use super::super::params::{Leaders, NODES};
use super::{Ev, Failure, World};

/// A broken takeover, for the mutation tests: the checker must catch each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeoverMutation {
    /// The successor resumes from records whose holders were dropped.
    ForgetRecordedHolders,
    /// A deposed leader sends the answer it decided although etcd refused to record it.
    DeposedLeaderAnswers,
}

/// One controller's copy of one witness request: where its answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Call {
    controller: usize,
    node: usize,
    /// The agent that asked: an answer to an agent since restarted is lost.
    agent: u64,
    id: u64,
}

#[derive(Clone, Debug)]
pub(super) enum LeaderEv {
    /// The leadership moves to another controller, which answers after `delay`.
    Change { era: u64, delay: u64 },
    /// The successor of leadership `term` has read the records and starts answering.
    Takeover { term: u64 },
    /// A copy of a witness request reaches its controller.
    Arrive { call: Call, request: LeaseRequest },
    /// The etcd write of a decision made under leadership `term` by `instance` is done.
    Commit { term: u64, instance: u64, call: Call, record: Box<LeaseRecord>, response: LeaseResponse },
    /// One controller's 503 (or connection refused) reaches the agent.
    Refused { call: Call },
}

/// A leader that lost its leadership and may not know it yet.
#[derive(Debug)]
struct Deposed {
    controller: usize,
    instance: u64,
    term: u64,
    witness: Witness,
    clock: SimClock,
    /// True time it learns it no longer leads and answers 503 from then on.
    until: u64,
    last_commit: u64,
}

/// The controllers, their leadership and what etcd holds.
#[derive(Debug)]
pub(super) struct Controllers {
    cfg: Leaders,
    /// The controller leading, or about to once its takeover is done.
    leader: usize,
    /// The leader's witness instance, while it answers (the instance itself is the world's
    /// `witness.witness`); `None` while it takes over or after it crashed.
    instance: Option<u64>,
    next_instance: u64,
    /// Bumped by every change: etcd refuses the writes of older terms.
    term: u64,
    /// The term whose takeover has not happened yet.
    pending: Option<u64>,
    /// When the leader's latest write commits (its writes commit in decision order).
    last_commit: u64,
    deposed: Vec<Deposed>,
    /// The group's record as etcd holds it: the last write that committed.
    record: Option<LeaseRecord>,
    /// Per request still awaiting an answer, `(node, agent, id, controllers that refused)`.
    refusals: Vec<(usize, u64, u64, u32)>,
}

impl Controllers {
    pub(super) fn new(cfg: Leaders) -> Controllers {
        Controllers {
            cfg,
            leader: 0,
            instance: Some(0),
            next_instance: 1,
            term: 0,
            pending: None,
            last_commit: 0,
            deposed: Vec::new(),
            record: None,
            refusals: Vec::new(),
        }
    }

    /// The first leader's witness: it starts its term, like every term, by resuming from
    /// the records (none yet).
    pub(super) fn first_witness() -> Witness {
        Witness::resume(Duration::ZERO, Vec::new())
    }

    pub(super) fn describe(&self) -> String {
        let state = match (self.instance, self.pending) {
            (Some(_), _) => "leads",
            (None, Some(_)) => "takes over",
            (None, None) => "crashed",
        };
        format!(
            "controllers: {} of {} {state} in term {}, {} deposed, etcd record {:?}",
            self.leader,
            self.cfg.controllers,
            self.term,
            self.deposed.len(),
            self.record
        )
    }
}

impl World {
    /// Sends a witness request to every controller (the witness path is the node's: a cut
    /// reaches none of them).
    pub(super) fn broadcast(&mut self, node: usize, agent: u64, id: u64, request: &LeaseRequest) {
        let Some(count) = self.leaders.as_ref().map(|c| c.cfg.controllers) else { return };
        for controller in 0..count {
            let copies = if self.rng.random_bool(self.dup) { 2 } else { 1 };
            for _ in 0..copies {
                if let Some(delay) = self.witness_delay() {
                    let call = Call { controller, node, agent, id };
                    let ev = LeaderEv::Arrive { call, request: request.clone() };
                    self.push(self.now + delay, 4, Ev::Leaders(ev));
                }
            }
        }
    }

    pub(super) fn leader_event(&mut self, ev: LeaderEv) -> Result<(), Failure> {
        match ev {
            LeaderEv::Change { era, delay } => {
                if era == self.era {
                    self.change_leader(delay);
                }
            }
            LeaderEv::Takeover { term } => {
                if self.leaders.as_ref().is_some_and(|c| c.pending == Some(term)) {
                    self.take_over();
                }
            }
            LeaderEv::Arrive { call, request } => self.controller_arrive(call, &request),
            LeaderEv::Commit { term, instance, call, record, response } => {
                self.commit(term, instance, call, *record, response)
            }
            LeaderEv::Refused { call } => self.refused(call)?,
        }
        Ok(())
    }

    /// The leadership moves now: the leader (if it was answering) is deposed without
    /// knowing it yet, and another controller takes over after `delay`.
    pub(super) fn change_leader(&mut self, delay: u64) {
        let Some(cfg) = self.leaders.as_ref().map(|c| c.cfg) else { return };
        self.outcome.stats.leader_changes += 1;
        let notice = self.rng.random_range(0..=delay + 2 * self.p.latencies.witness.max);
        let step = self.rng.random_range(1..cfg.controllers.max(2));
        let old = self.witness.witness.take();
        let clock = self.witness.clock;
        let now = self.now;
        // A pending restart belongs to the old instance.
        self.witness.generation += 1;
        let Some(c) = self.leaders.as_mut() else { return };
        if let (Some(witness), Some(instance)) = (old, c.instance.take()) {
            let (controller, term, last_commit) = (c.leader, c.term, c.last_commit);
            c.deposed.push(Deposed { controller, instance, term, witness, clock, until: now + notice, last_commit });
        }
        c.term += 1;
        c.leader = (c.leader + step) % cfg.controllers;
        c.pending = Some(c.term);
        let (term, leader) = (c.term, c.leader);
        trace!(self, "LEADER change: controller {leader} leads term {term} after {:.1} ms", delay as f64 / 1e6);
        if delay == 0 {
            self.take_over();
        } else {
            self.push(now + delay, 4, Ev::Leaders(LeaderEv::Takeover { term }));
        }
    }

    /// The successor has read what etcd holds: it resumes from it on its own new clock.
    fn take_over(&mut self) {
        let group = self.p.group_key();
        let rate = self.p.rates[self.rng.random_range(0..self.p.rates.len())];
        let forget = self.opts.takeover_mutation == Some(TakeoverMutation::ForgetRecordedHolders);
        let now = self.now;
        let Some(c) = self.leaders.as_mut() else { return };
        let mut record = c.record.clone();
        if forget && let Some(r) = &mut record {
            r.holder = None;
        }
        let mut witness = Witness::resume(Duration::ZERO, record.clone().map(|r| (group.clone(), r)));
        witness.restore_epoch(&group, self.witness.durable_epoch);
        let leader = c.leader;
        // A controller ends its old term before it starts a new one.
        c.deposed.retain(|d| d.controller != leader);
        c.instance = Some(c.next_instance);
        c.next_instance += 1;
        c.pending = None;
        c.last_commit = now;
        self.witness.witness = Some(witness);
        self.witness.clock = SimClock::new(now, 0, rate);
        trace!(self, "LEADER controller {leader} took over, resuming from {record:?}");
    }

    /// The leader's process dies (the witness-crash fault of these schedules).
    pub(super) fn crash_leader(&mut self) {
        let Some(c) = self.leaders.as_mut() else { return };
        if c.instance.take().is_none() {
            return;
        }
        let write = c.cfg.write.max;
        let cfg = c.cfg;
        self.witness.witness = None;
        self.witness.generation += 1;
        // Its etcd session ends soon: writes it sent meanwhile may still commit.
        let at = self.now + self.rng.random_range(0..=2 * write);
        let delay = cfg.takeover_delay(&mut self.rng);
        let era = self.era;
        self.push(at, 4, Ev::Leaders(LeaderEv::Change { era, delay }));
        trace!(self, "FAULT leader controller crashed");
    }

    /// At the end of the chaos: the deposed leaders have noticed, and a leader answers.
    pub(super) fn heal_leaders(&mut self) {
        let Some(c) = self.leaders.as_mut() else { return };
        c.deposed.clear();
        if c.pending.is_some() {
            self.take_over();
        } else if c.instance.is_none() {
            self.change_leader(0);
        }
    }

    fn controller_arrive(&mut self, call: Call, request: &LeaseRequest) {
        let Call { controller, node: from, id, .. } = call;
        let now = self.now;
        let group = self.p.group_key();
        let Some(c) = self.leaders.as_mut() else { return };
        let decided = if let Some(d) = c.deposed.iter_mut().find(|d| d.controller == controller && now < d.until) {
            let local = Duration::from_nanos(d.clock.local(now));
            let response = d.witness.handle(local, request, self.lease);
            Some((response, d.witness.record(&group), d.term, d.instance, &mut d.last_commit, "deposed "))
        } else if controller == c.leader
            && let (Some(instance), Some(w)) = (c.instance, self.witness.witness.as_mut())
        {
            let local = Duration::from_nanos(self.witness.clock.local(now));
            let response = w.handle(local, request, self.lease);
            Some((response, w.record(&group), c.term, instance, &mut c.last_commit, ""))
        } else {
            None
        };
        let Some((response, record, term, instance, last_commit, who)) = decided else {
            self.controller_reply(call, None);
            return;
        };
        let record = match (&response, record) {
            (LeaseResponse::Denied { .. }, _) | (_, None) => None,
            (_, Some(record)) => Some(record),
        };
        let write = record.as_ref().map(|_| c.cfg.write);
        let commit_at = write.map(|w| {
            let at = (*last_commit).max(now) + w.sample(&mut self.rng);
            *last_commit = at;
            at
        });
        trace!(
            self,
            "{who}controller {controller} <- {} #{id} {:?} e{}: {response:?}", NODES[from], request.op, request.epoch
        );
        match (record, commit_at) {
            (Some(record), Some(at)) => {
                let record = Box::new(record);
                let ev = LeaderEv::Commit { term, instance, call, record, response };
                self.push(at, 4, Ev::Leaders(ev));
            }
            _ => self.controller_reply(call, Some(response)),
        }
    }

    /// A decision's etcd write is done: committed while its leadership still held, or
    /// refused; the deciding controller answers (if its process still lives).
    fn commit(&mut self, term: u64, instance: u64, call: Call, record: LeaseRecord, response: LeaseResponse) {
        let Call { controller, node: from, id, .. } = call;
        let answers_anyway = self.opts.takeover_mutation == Some(TakeoverMutation::DeposedLeaderAnswers);
        let Some(c) = self.leaders.as_mut() else { return };
        let alive = c.instance == Some(instance) || c.deposed.iter().any(|d| d.instance == instance);
        let answer = if term == c.term {
            c.record = Some(record);
            if let LeaseResponse::Granted { epoch, .. } = &response {
                self.witness.durable_epoch = self.witness.durable_epoch.max(*epoch);
            }
            trace!(self, "etcd: controller {controller} recorded #{id} of {}", NODES[from]);
            Some(response)
        } else if answers_anyway {
            Some(response)
        } else {
            // The node API answers a decision it could not record with 503, as a controller
            // that does not lead: the agent's broadcast then takes the successor's answer.
            self.outcome.stats.refused_writes += 1;
            trace!(self, "etcd: refused the write of controller {controller} for #{id} (term {term} is over)");
            None
        };
        self.controller_reply(call, answer.filter(|_| alive));
    }

    /// One controller's answer (`None`: a 503 or a refused connection) on its way back.
    fn controller_reply(&mut self, call: Call, answer: Option<LeaseResponse>) {
        let Call { node, agent, id, .. } = call;
        if self.witness_cuts[node] > 0 {
            return;
        }
        let Some(delay) = self.witness_delay() else { return };
        let ev = match answer {
            Some(response) => Ev::WitnessReply { node, agent, id, response },
            None => Ev::Leaders(LeaderEv::Refused { call }),
        };
        self.push(self.now + delay, 4, ev);
    }

    /// A refusal reached the agent: the request fails once every controller refused it.
    fn refused(&mut self, call: Call) -> Result<(), Failure> {
        let Call { controller, node, agent, id } = call;
        let nodes = &self.nodes;
        let Some(c) = self.leaders.as_mut() else { return Ok(()) };
        let waiting = |n: usize, a: u64, i: u64| {
            let n = &nodes[n];
            n.agent == a && !n.down && n.http.contains(&i)
        };
        if !waiting(node, agent, id) {
            return Ok(());
        }
        c.refusals.retain(|&(n, a, i, _)| waiting(n, a, i));
        let all = (1u32 << c.cfg.controllers) - 1;
        let at = match c.refusals.iter().position(|&(n, a, i, _)| (n, a, i) == (node, agent, id)) {
            Some(at) => at,
            None => {
                c.refusals.push((node, agent, id, 0));
                c.refusals.len() - 1
            }
        };
        c.refusals[at].3 |= 1 << controller;
        if c.refusals[at].3 != all {
            return Ok(());
        }
        c.refusals.swap_remove(at);
        self.nodes[node].http.retain(|h| *h != id);
        trace!(self, "{} <- witness #{id}: every controller refused", NODES[node]);
        let why = "no controller answered but with 503 (not the leader) or a refused connection".to_string();
        self.deliver(node, Event::Witness { request_id: id, answer: WitnessAnswer::Failed(why) })
    }

    /// The failover phase's change of leadership, if the schedule has one: at the crash, or
    /// at a random moment of the failover. Returns what it adds to the failover bound.
    pub(super) fn failover_change(&mut self) -> u64 {
        let Some(cfg) = self.p.leaders else { return 0 };
        let Some(when) = cfg.at_failover else { return 0 };
        let delay = cfg.takeover_delay(&mut self.rng);
        match when {
            FailoverChange::AtCrash => self.change_leader(delay),
            FailoverChange::During => {
                let at = self.now + self.rng.random_range(0..=self.outcome.bound_ns);
                let era = self.era;
                self.push(at, 4, Ev::Leaders(LeaderEv::Change { era, delay }));
            }
        }
        self.p.takeover_extension(delay)
    }
}
