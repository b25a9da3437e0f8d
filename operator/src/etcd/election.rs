//! Who leads among the controllers: one leader key, created only if absent and attached to
//! the creator's etcd lease, the pattern of etcd's own `concurrency` package.
//!
//! - **Winning** is a transaction `create_revision(leader) == 0 → put(leader, lease)`: of
//!   several controllers racing, exactly one creates the key. Its create revision is the
//!   winner's [`Fence`], which guards every later write.
//! - **Holding** is keeping the lease alive. A leader counts itself leader only until
//!   `deadline` after it *sent* its last acknowledged keep-alive (and, at first, the lease
//!   grant); etcd keeps the lease for the full `ttl` after *receiving* it, so the leader
//!   stops acting before anyone else can win. Writes are fenced by revision regardless.
//! - **Standing by** is watching the leader key; when it goes (the leader resigned or its
//!   lease expired) everyone campaigns again at once.
//! - **Resigning** (on shutdown) revokes the lease, which deletes the key, so a successor
//!   need not wait out the ttl.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{EtcdError, Fence, Keys, encode};
use crate::controller::metrics::Metrics;
use crate::k8s::election::Leadership;

/// What the leader key holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaderRecord {
    /// The controller's name (`--name`, the host name by default).
    pub id: String,
    /// Base URL of its node API, given to agents and the CLI as the leader's address.
    pub url: String,
}

/// The election's clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElectionTiming {
    /// The etcd lease's ttl, whole seconds (etcd's unit), at least 2.
    pub ttl: Duration,
    /// How long after sending an acknowledged keep-alive the leader still acts as leader.
    pub deadline: Duration,
    /// How often the leader sends keep-alives.
    pub renew_every: Duration,
}

impl ElectionTiming {
    /// The timing for a lease of `ttl_secs`: keep-alives every third of it, leadership
    /// held for two thirds after each.
    pub fn from_ttl(ttl_secs: u64) -> Result<Self, EtcdError> {
        if !(2..=3600).contains(&ttl_secs) {
            return Err(EtcdError::Config(format!(
                "--leader-ttl {ttl_secs}s: must be between 2s and 3600s (etcd leases count whole seconds)"
            )));
        }
        let ttl = Duration::from_secs(ttl_secs);
        Ok(ElectionTiming { ttl, deadline: ttl * 2 / 3, renew_every: ttl / 3 })
    }
}

/// What every part of a controller needs to know about the election.
#[derive(Debug, Default)]
pub struct ElectionState {
    /// Whether this controller leads, with its deadline.
    pub leadership: Leadership,
    fence: Mutex<Option<Fence>>,
    leader: Mutex<Option<LeaderRecord>>,
}

impl ElectionState {
    /// This controller's fence while it leads.
    pub fn fence(&self) -> Option<Fence> {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader as last seen (this controller, while it leads).
    pub fn leader(&self) -> Option<LeaderRecord> {
        self.leader.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_leader(&self, leader: Option<LeaderRecord>) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader;
    }

    fn lead(&self, fence: Fence, until: Instant, me: &LeaderRecord) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(fence);
        self.set_leader(Some(me.clone()));
        self.leadership.set(Some(until), Instant::now());
    }

    fn step_down(&self) {
        self.leadership.set(None, Instant::now());
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.set_leader(None);
    }
}

/// Pause after a failed campaign before the next (etcd unreachable, and the like).
const CAMPAIGN_RETRY: Duration = Duration::from_millis(500);

/// Campaigns until `stop` turns true, then resigns. Publishes every change on `state`.
pub async fn run_election(
    client: Client,
    keys: Keys,
    me: LeaderRecord,
    timing: ElectionTiming,
    state: Arc<ElectionState>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            break;
        }
        // Every wait inside a campaign also watches `stop`, so it ends promptly and resigns.
        let outcome = campaign(&client, &keys, &me, timing, &state, &metrics, &mut stop).await;
        state.step_down();
        if let Err(e) = outcome {
            metrics.error("election");
            warn!(error = %e, "election: retrying");
            tokio::select! {
                _ = tokio::time::sleep(CAMPAIGN_RETRY) => {}
                _ = stop.changed() => {}
            }
        }
    }
    state.step_down();
}

/// One round: win and hold the key until it is lost, or see who holds it and wait for it
/// to go. Returns `Ok` when it is time for another round.
async fn campaign(
    client: &Client,
    keys: &Keys,
    me: &LeaderRecord,
    timing: ElectionTiming,
    state: &ElectionState,
    metrics: &Metrics,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), EtcdError> {
    let mut c = client.clone();
    let granted_at = Instant::now();
    let ttl = i64::try_from(timing.ttl.as_secs()).unwrap_or(i64::MAX);
    let lease = c.lease_grant(ttl, None).await.map_err(EtcdError::request("granting the leader lease"))?.id();
    let txn = Txn::new()
        .when([Compare::create_revision(keys.leader(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(keys.leader(), encode(me), Some(PutOptions::new().with_lease(lease)))])
        .or_else([TxnOp::get(keys.leader(), None)]);
    let response = match c.txn(txn).await {
        Ok(response) => response,
        Err(e) => {
            let _ = c.lease_revoke(lease).await;
            return Err(EtcdError::request("campaigning for the leader key")(e));
        }
    };
    if response.succeeded() {
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        let fence = Fence { revision };
        state.lead(fence, granted_at + timing.deadline, me);
        metrics.set_leader(true);
        info!(id = %me.id, fence = revision, "elected leader of the controllers");
        let held = hold(&mut c, lease, timing, state, stop).await;
        metrics.set_leader(false);
        // Resigning: revoking the lease deletes the key, so nobody waits out the ttl. It
        // may fail (etcd unreachable): then the lease runs out by itself.
        state.step_down();
        if let Err(e) = c.lease_revoke(lease).await {
            warn!(error = %e, "could not revoke the leader lease; it expires by itself");
        }
        return held;
    }
    let _ = c.lease_revoke(lease).await;
    let (leader, revision) = response
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(get) => {
                get.kvs().first().map(|kv| (super::decode::<LeaderRecord>(kv), kv.mod_revision()))
            }
            _ => None,
        })
        .unwrap_or((Err(EtcdError::Decode { key: keys.leader(), message: "vanished".into() }), 0));
    match leader {
        Ok(leader) => {
            if state.leader().as_ref() != Some(&leader) {
                info!(leader = %leader.id, url = %leader.url, "another controller leads; standing by");
            }
            state.set_leader(Some(leader));
        }
        Err(e) => warn!(error = %e, "the leader key does not decode; waiting for it to go"),
    }
    if revision == 0 {
        // Deleted between the compare and the get: campaign again at once.
        return Ok(());
    }
    wait_for_vacancy(&mut c, keys, revision, stop).await
}

/// Keeps the lease alive until a keep-alive goes unanswered past the deadline, etcd says
/// the lease is gone, or `stop`.
async fn hold(
    c: &mut Client,
    lease: i64,
    timing: ElectionTiming,
    state: &ElectionState,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), EtcdError> {
    let (mut keeper, mut answers) =
        c.lease_keep_alive(lease).await.map_err(EtcdError::request("keeping the leader lease alive"))?;
    let mut ticker = tokio::time::interval(timing.renew_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        let sent = Instant::now();
        keeper.keep_alive().await.map_err(EtcdError::request("sending a keep-alive"))?;
        // An answer that comes after the deadline is no use: leadership has lapsed.
        let left = (sent + timing.deadline).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, answers.message()).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                let until = sent + timing.deadline;
                state.leadership.set(Some(until), Instant::now());
            }
            Ok(Ok(_)) => {
                warn!("etcd says the leader lease is gone: stepping down");
                return Ok(());
            }
            Ok(Err(e)) => return Err(EtcdError::request("keeping the leader lease alive")(e)),
            Err(_) => {
                warn!(
                    deadline_ms = timing.deadline.as_millis() as u64,
                    "no keep-alive answer before the deadline: stepping down"
                );
                return Ok(());
            }
        }
    }
}

/// Waits until the leader key, last changed at `revision`, is deleted.
async fn wait_for_vacancy(
    c: &mut Client,
    keys: &Keys,
    revision: i64,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), EtcdError> {
    let mut stream = c
        .watch(keys.leader(), Some(WatchOptions::new().with_start_revision(revision + 1)))
        .await
        .map_err(EtcdError::request("watching the leader key"))?;
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = stop.changed() => return Ok(()),
        };
        match message {
            Ok(Some(response)) => {
                if response.canceled() || response.events().iter().any(|e| e.event_type() == EventType::Delete) {
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(EtcdError::request("watching the leader key")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_keeps_the_deadline_inside_the_ttl() {
        let t = ElectionTiming::from_ttl(3).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (t.ttl, t.deadline, t.renew_every),
            (Duration::from_secs(3), Duration::from_secs(2), Duration::from_secs(1))
        );
        assert!(ElectionTiming::from_ttl(1).is_err_and(|e| e.to_string().starts_with("--leader-ttl 1s")));
        assert!(ElectionTiming::from_ttl(4000).is_err());
    }
}
