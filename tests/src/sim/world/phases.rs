//! After the chaos: liveness (exactly one primary once everything healed) and bounded
//! failover (crash the primary, the standby must serve within the bound). On replicated
//! controllers the leadership may move at the crash or during the failover: that failover's
//! bound grows by what the takeover costs (`Params::takeover_extension`); every other
//! schedule keeps the plain bound.

use hapair_agent::engine::Role;
use hapair_crds::nodeapi::GroupKey;
use std::time::Duration;

use super::super::params::NODES;
use super::{Ev, Failure, Phase, World, nanos};

impl World {
    /// The one node serving, when the pair has settled: one Primary holding everything,
    /// one Standby holding nothing, in the same epoch, neither stalled.
    fn settled_primary(&self) -> Option<usize> {
        let mut primary = None;
        for (i, n) in self.nodes.iter().enumerate() {
            let engine = n.engine.as_ref()?;
            if n.paused.is_some() {
                return None;
            }
            match engine.role() {
                Role::Primary if n.holds_all() && primary.is_none() => primary = Some(i),
                Role::Standby if !n.holds() && !engine.holding() => {}
                _ => return None,
            }
        }
        let p = primary?;
        let epochs: Vec<u64> = self.nodes.iter().filter_map(|n| n.engine.as_ref().map(|e| e.epoch())).collect();
        (epochs.first() == epochs.last()).then_some(p)
    }

    pub(super) fn check_convergence(&mut self) -> Result<(), Failure> {
        let Phase::Converging { since, stable_since } = self.phase else { return Ok(()) };
        let d = nanos(self.p.timings.dead_after);
        let timeout = 30 * d + nanos(Duration::from_secs(15));
        let settled = self.settled_primary();
        match (settled, stable_since) {
            (Some(_), None) => self.phase = Phase::Converging { since, stable_since: Some(self.now) },
            (Some(_), Some(stable)) if self.now - stable >= 3 * d => {
                self.push(self.now, 9, Ev::Crash);
                return Ok(());
            }
            (Some(_), Some(_)) => {}
            (None, _) => {
                self.phase = Phase::Converging { since, stable_since: None };
                if self.now - since > timeout {
                    return Err(self.fail(format!(
                        "liveness: no single primary {:.1} s after everything healed",
                        (self.now - since) as f64 / 1e9
                    )));
                }
            }
        }
        self.push(self.now + d / 2, 9, Ev::Check);
        Ok(())
    }

    /// Crashes the primary once the witness holds no lease for it (the standby would
    /// otherwise have to wait that lease out, which the bound does not cover).
    pub(super) fn crash_primary(&mut self) -> Result<(), Failure> {
        let Some(primary) = self.settled_primary() else {
            self.phase = match self.phase {
                Phase::Converging { since, .. } => Phase::Converging { since, stable_since: None },
                other => other,
            };
            self.push(self.now, 9, Ev::Check);
            return Ok(());
        };
        let group: GroupKey = self.p.group_key();
        let witness_local = Duration::from_nanos(self.witness.clock.local(self.now));
        let held = self.witness.witness.as_ref().and_then(|w| w.holder(&group, witness_local)).map(str::to_string);
        if held.as_deref() == Some(NODES[primary]) {
            let d = nanos(self.p.timings.dead_after);
            self.push(self.now + d / 4, 9, Ev::Crash);
            return Ok(());
        }
        trace!(self, "CRASH primary {}", NODES[primary]);
        self.reset_machine(primary);
        self.phase = Phase::Failover { crashed: primary, at: self.now };
        self.outcome.bound_ns += self.failover_change();
        let give_up = self.now + 3 * self.outcome.bound_ns;
        self.push(give_up, 9, Ev::GiveUp);
        Ok(())
    }

    /// After a failover in a schedule that delivers first health checks: the new
    /// primary's timeline names the checked step's first pass, no earlier than that
    /// step's start, and lists every phase in the order it ended.
    pub(super) fn check_timeline(&mut self, node: usize) -> Result<(), Failure> {
        if self.phase != Phase::Settling {
            return Ok(());
        }
        self.phase = Phase::Done;
        let n = &self.nodes[node];
        let Some(engine) = n.engine.as_ref() else { return Ok(()) };
        let Some(f) = engine.status(n.local(self.now)).last_failover else {
            return Err(self.fail(format!("timeline: {} serves after the crash but recorded no failover", NODES[node])));
        };
        let shown: Vec<String> = f.phases.iter().map(|p| format!("{} at {:?}", p.phase, p.after)).collect();
        let at = |name: &str| f.phases.iter().find(|p| p.phase == name).map(|p| p.after);
        let (started, healthy) = (at("step app started"), at("step app first healthy"));
        if healthy.is_none() || healthy < started {
            return Err(self.fail(format!(
                "timeline: the first passing check of step app is missing or before its start: {shown:?}"
            )));
        }
        if !f.phases.windows(2).all(|w| w[0].after <= w[1].after) {
            return Err(self.fail(format!("timeline: phases out of order: {shown:?}")));
        }
        Ok(())
    }
}
