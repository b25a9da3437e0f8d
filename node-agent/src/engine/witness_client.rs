//! The engine's side of the witness conversation: numbered requests and their send times.
//!
//! A witness grant is worth `ttl` from the moment its request was *sent*, so the engine
//! keeps the send time of every request it may still get an answer to. Answers to
//! requests it no longer knows (forgotten on release, on a role change, or too old to be
//! worth anything) are ignored: a late grant can never extend a lease the node already
//! gave up.

use std::time::Duration;

use hapair_crds::nodeapi::{GroupKey, LeaseOp, LeaseRequest};

use super::time::{Instant, millis_u64};

/// Requests remembered at most (the oldest is forgotten first).
const OUTSTANDING_KEPT: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outstanding {
    pub id: u64,
    pub op: LeaseOp,
    pub epoch: u64,
    pub sent_at: Instant,
    pub ttl: Duration,
    /// No answer expected any more (timed out or failed); a late one is still honoured.
    pub given_up: bool,
}

#[derive(Clone, Debug, Default)]
pub struct WitnessClient {
    next_id: u64,
    outstanding: Vec<Outstanding>,
    /// No new acquire/renew before this (witness asked to retry later).
    retry_at: Instant,
}

impl WitnessClient {
    /// Builds a request and remembers it.
    pub fn request(
        &mut self,
        now: Instant,
        group: &GroupKey,
        node: &str,
        op: LeaseOp,
        epoch: u64,
        ttl: Duration,
    ) -> (u64, LeaseRequest) {
        self.next_id += 1;
        let id = self.next_id;
        if op != LeaseOp::Release {
            if self.outstanding.len() == OUTSTANDING_KEPT {
                self.outstanding.remove(0);
            }
            self.outstanding.push(Outstanding { id, op, epoch, sent_at: now, ttl, given_up: false });
        }
        let request = LeaseRequest { group: group.clone(), node: node.to_string(), op, epoch, ttl_ms: millis_u64(ttl) };
        (id, request)
    }

    /// The request an answer belongs to, forgotten once answered.
    pub fn take(&mut self, id: u64) -> Option<Outstanding> {
        let i = self.outstanding.iter().position(|o| o.id == id)?;
        Some(self.outstanding.remove(i))
    }

    pub fn give_up(&mut self, id: u64) {
        if let Some(o) = self.outstanding.iter_mut().find(|o| o.id == id) {
            o.given_up = true;
        }
    }

    /// Forgets every request: their answers will be ignored.
    pub fn forget(&mut self) {
        self.outstanding.clear();
        self.retry_at = Instant::ZERO;
    }

    /// Drops requests whose grant could no longer be worth anything.
    pub fn expire(&mut self, now: Instant) {
        self.outstanding.retain(|o| o.sent_at + o.ttl > now);
    }

    /// The latest request still awaiting an answer within `timeout`, if any.
    pub fn in_flight(&self, now: Instant, timeout: Duration) -> Option<&Outstanding> {
        self.outstanding.iter().rev().find(|o| !o.given_up && now < o.sent_at + timeout)
    }

    pub fn outstanding(&self) -> &[Outstanding] {
        &self.outstanding
    }

    pub fn retry_at(&self) -> Instant {
        self.retry_at
    }

    pub fn set_retry_at(&mut self, at: Instant) {
        self.retry_at = at;
    }
}
