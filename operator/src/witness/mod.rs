//! The witness: a pure state machine granting each group's lease to one node at a time.
//!
//! The witness is consulted only while a pair's heartbeats fail, so one instance serves
//! thousands of groups; per group it keeps a holder, an expiry and two epochs (a few
//! dozen bytes). The HTTP endpoint (`POST /v1/witness/lease`) passes each
//! [`LeaseRequest`] with the group's [`LeaseParams`] and the current monotonic time.
//!
//! # Rules
//!
//! - **One holder at a time.** A grant runs `ttl` for the holder, measured on the
//!   holder's clock from when it *sent* the request. The witness considers it held for
//!   `ttl·(1+δ)` on its own clock from when it *answered*: later in real time, and at
//!   least as long under the drift bound, so the holder's lease is over before anyone
//!   else can be granted.
//! - **Renew** extends the caller's lease, or grants it if nobody else holds one (a
//!   primary that served on the peer lease asks the witness only once acknowledgements
//!   fail); it keeps the caller's epoch.
//! - **Acquire** starts a new term: it grants epoch `max(requested, highest seen + 1)`,
//!   so the epochs of successive grants strictly increase.
//! - **Release** frees the lease at once, but only up to the grant it names (holder, and
//!   an epoch no lower than the holder's latest grant): a delayed release can never free
//!   a newer grant to the same node, and a delayed renew of an older term never lowers
//!   the holder's grant epoch.
//! - **Restart.** A witness that (re)starts may have forgotten a holder: it grants nothing
//!   until `ttl·(1+δ)` has passed since it started.
//! - **Takeover.** A witness whose predecessor wrote a [`LeaseRecord`] durably before each
//!   answer that granted or released (the etcd-backed controllers do) forgets nothing, so it
//!   [resumes](Witness::resume) instead: it holds each recorded holder's lease for that
//!   grant's stretched ttl from the takeover, and grants free groups at once. The wait-out
//!   is thereby kept per group: the predecessor answered before the takeover, so its holder's
//!   lease ends before the successor's copy of it does.
//! - **No absurd epochs.** A request whose epoch is more than [`MAX_EPOCH_LEAP`] above the
//!   highest epoch the witness has seen for the group is refused and changes nothing.
//!
//! # Epochs across witness restarts
//!
//! The witness's memory is volatile. Safety never depends on it remembering epochs
//! (leases alone exclude two primaries), but to keep epochs strictly increasing across
//! its restarts the server should persist the epoch of each grant (e.g. in the HaGroup's
//! `status.epoch`) and call [`Witness::restore_epoch`] after a restart.

pub mod lease;

use std::collections::HashMap;
use std::time::Duration;

use hapair_crds::nodeapi::{GroupKey, LeaseOp, LeaseRequest, LeaseResponse};
use serde::{Deserialize, Serialize};

/// How far above the highest epoch the witness has seen for a group a request may name.
///
/// Legitimate epochs do run ahead of the witness's: they rise by one per term, and a pair
/// starts most terms (switchovers, failovers while the heartbeats still work) over its peer
/// lease without asking the witness, which sees only what it grants and what
/// [`Witness::restore_epoch`] tells it (nothing, when a group's status was lost). So the
/// gap is the number of terms since the witness last heard from the group: 2^32 of them is
/// 136 years at one term a second, more than any pair lives through.
///
/// Beyond that the epoch is no term a node can have reached but a bug, a damaged state file
/// or a hostile node, and granting it would spend the epoch space: at `u64::MAX`,
/// `highest + 1` saturates and every later term would get the same epoch as the one before,
/// which breaks the strictly increasing order fencing relies on. With leaps this size,
/// burning the space from 0 still takes 2^32 consecutive maximal grants.
pub const MAX_EPOCH_LEAP: u64 = 1 << 32;

/// A group's lease settings, from its `spec.heartbeat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseParams {
    /// `leaseTTL`: the longest lease granted.
    pub ttl: std::time::Duration,
    /// `maxClockDriftPpm`.
    pub max_clock_drift_ppm: u32,
}

impl LeaseParams {
    /// `d·(1+δ)`, rounded up.
    fn stretch(&self, d: Duration) -> Duration {
        hapair_crds::drift::stretch(d, self.max_clock_drift_ppm)
    }
}

/// What a successor must know of one group's lease to honour it. It is written durably
/// after every decision that grants or releases, before the answer is sent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// The node holding the lease; `None` once released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Highest epoch granted to `holder`.
    #[serde(default)]
    pub holder_epoch: u64,
    /// Highest epoch granted or renewed for the group.
    #[serde(default)]
    pub epoch: u64,
    /// How long the holder's longest live grant is held on the witness's clock (its ttl
    /// stretched for drift), in milliseconds: a successor holds it that long from takeover.
    #[serde(default)]
    pub held_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct GroupLease {
    holder: Option<String>,
    /// Witness time until which `holder` holds the lease.
    expires: Duration,
    /// The longest stretched ttl among the holder's grants since it last became holder.
    held: Duration,
    /// Highest epoch granted to the current holder (a release must name at least this).
    holder_epoch: u64,
    /// Highest epoch granted or renewed.
    epoch: u64,
}

#[derive(Debug)]
pub struct Witness {
    /// When the witness (re)started and must wait out forgotten holders; `None` when it
    /// resumed from durable records and forgot nothing.
    started: Option<Duration>,
    groups: HashMap<GroupKey, GroupLease>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Witness {
    /// A witness that just (re)started at `now` and must wait out L·(1+drift) before granting.
    pub fn new(now: std::time::Duration) -> Self {
        Witness { started: Some(now), groups: HashMap::new() }
    }

    /// A witness taking over at `now` from a predecessor that recorded every grant and
    /// release durably before answering: each recorded holder keeps the lease for its
    /// grant's stretched ttl from `now`, every other group may be granted at once.
    pub fn resume(now: Duration, records: impl IntoIterator<Item = (GroupKey, LeaseRecord)>) -> Self {
        let groups = records
            .into_iter()
            .map(|(group, record)| {
                let held = Duration::from_millis(record.held_ms);
                let expires = if record.holder.is_some() { now + held } else { now };
                let lease = GroupLease {
                    holder: record.holder,
                    expires,
                    held,
                    holder_epoch: record.holder_epoch,
                    epoch: record.epoch,
                };
                (group, lease)
            })
            .collect();
        Witness { started: None, groups }
    }

    /// What must be recorded of `group` after a decision, for a successor to honour it.
    pub fn record(&self, group: &GroupKey) -> Option<LeaseRecord> {
        self.groups.get(group).map(|g| LeaseRecord {
            holder: g.holder.clone(),
            holder_epoch: g.holder_epoch,
            epoch: g.epoch,
            // Rounded up: a successor must hold the lease no shorter than this witness would.
            held_ms: if g.holder.is_some() { millis(g.held + Duration::from_nanos(999_999)) } else { 0 },
        })
    }

    /// Raises the group's highest epoch to at least `epoch` (after a restart, from the
    /// persisted group status).
    pub fn restore_epoch(&mut self, group: &GroupKey, epoch: u64) {
        let entry = self.groups.entry(group.clone()).or_default();
        entry.epoch = entry.epoch.max(epoch);
    }

    /// Forgets a deleted group.
    pub fn remove_group(&mut self, group: &GroupKey) {
        self.groups.remove(group);
    }

    /// The highest epoch the witness has seen for `group`.
    pub fn epoch(&self, group: &GroupKey) -> Option<u64> {
        self.groups.get(group).map(|g| g.epoch)
    }

    /// The node holding `group`'s lease at `now` on the witness's clock, if any.
    pub fn holder(&self, group: &GroupKey, now: Duration) -> Option<&str> {
        self.groups.get(group).filter(|g| now < g.expires).and_then(|g| g.holder.as_deref())
    }

    /// Groups with state kept.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    pub fn handle(&mut self, now: std::time::Duration, request: &LeaseRequest, params: LeaseParams) -> LeaseResponse {
        let deny = |holder: Option<String>, retry: Duration, reason: String| LeaseResponse::Denied {
            holder,
            retry_after_ms: millis(retry).max(1),
            reason,
        };
        if request.node.is_empty() {
            return deny(None, params.ttl, "node: must name the requesting node".into());
        }
        // Checked before anything is recorded, releases included: a refused request must
        // leave the group exactly as it was.
        let highest = self.groups.get(&request.group).map_or(0, |g| g.epoch);
        if request.epoch > highest.saturating_add(MAX_EPOCH_LEAP) {
            return deny(
                None,
                params.ttl,
                format!(
                    "epoch: {} from node {:?} is more than {MAX_EPOCH_LEAP} above the highest epoch of HaGroup {} ({highest}); refused",
                    request.epoch, request.node, request.group
                ),
            );
        }
        if request.op == LeaseOp::Release {
            if let Some(entry) = self.groups.get_mut(&request.group)
                && entry.holder.as_deref() == Some(request.node.as_str())
                && request.epoch >= entry.holder_epoch
            {
                entry.holder = None;
                entry.expires = now;
                entry.held = Duration::ZERO;
            }
            return LeaseResponse::Released;
        }
        if request.ttl_ms == 0 {
            return deny(None, params.ttl, "ttlMs: must be greater than zero".into());
        }
        if let Some(started) = self.started
            && let quiet_until = started + params.stretch(params.ttl)
            && now < quiet_until
        {
            return deny(
                None,
                quiet_until - now,
                "witness restarted: waiting out any lease it may have forgotten".into(),
            );
        }
        let ttl = params.ttl.min(Duration::from_millis(request.ttl_ms));
        let held_until = now + params.stretch(ttl);
        let entry = self.groups.entry(request.group.clone()).or_default();
        if let Some(holder) = entry.holder.as_ref()
            && holder != &request.node
            && now < entry.expires
        {
            let holder = holder.clone();
            return deny(Some(holder.clone()), entry.expires - now, format!("held by {holder}"));
        }
        let epoch = match request.op {
            LeaseOp::Acquire => request.epoch.max(entry.epoch.saturating_add(1)),
            _ => request.epoch,
        };
        let still_held = entry.holder.as_deref() == Some(request.node.as_str()) && now < entry.expires;
        entry.holder_epoch = if still_held { entry.holder_epoch.max(epoch) } else { epoch };
        entry.held = if still_held { entry.held.max(params.stretch(ttl)) } else { params.stretch(ttl) };
        entry.holder = Some(request.node.clone());
        entry.expires = entry.expires.max(held_until);
        entry.epoch = entry.epoch.max(epoch);
        LeaseResponse::Granted { holder: request.node.clone(), ttl_ms: millis(ttl), epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: LeaseParams = LeaseParams { ttl: Duration::from_millis(800), max_clock_drift_ppm: 10_000 };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn req(node: &str, op: LeaseOp, epoch: u64) -> LeaseRequest {
        LeaseRequest { group: GroupKey::new("ns", "g"), node: node.into(), op, epoch, ttl_ms: 800 }
    }

    fn granted(node: &str, epoch: u64) -> LeaseResponse {
        LeaseResponse::Granted { holder: node.into(), ttl_ms: 800, epoch }
    }

    /// A witness that started long ago.
    fn ready() -> Witness {
        Witness::new(Duration::ZERO)
    }

    const T0: u64 = 10_000;

    #[test]
    fn grants_one_holder_until_its_stretched_ttl_expires() {
        let mut w = ready();
        assert_eq!(w.handle(ms(T0), &req("a", LeaseOp::Acquire, 1), PARAMS), granted("a", 1));
        // 800 ms · 1.01 = 808 ms on the witness's clock.
        match w.handle(ms(T0 + 807), &req("b", LeaseOp::Acquire, 1), PARAMS) {
            LeaseResponse::Denied { holder, retry_after_ms, .. } => {
                assert_eq!(holder.as_deref(), Some("a"));
                assert_eq!(retry_after_ms, 1);
            }
            other => panic!("expected a denial, got {other:?}"),
        }
        assert_eq!(w.handle(ms(T0 + 808), &req("b", LeaseOp::Acquire, 1), PARAMS), granted("b", 2));
    }

    #[test]
    fn renew_extends_and_keeps_the_epoch() {
        let mut w = ready();
        assert_eq!(w.handle(ms(T0), &req("a", LeaseOp::Acquire, 5), PARAMS), granted("a", 5));
        assert_eq!(w.handle(ms(T0 + 500), &req("a", LeaseOp::Renew, 5), PARAMS), granted("a", 5));
        assert!(matches!(
            w.handle(ms(T0 + 1000), &req("b", LeaseOp::Acquire, 6), PARAMS),
            LeaseResponse::Denied { .. }
        ));
        assert_eq!(w.handle(ms(T0 + 1308), &req("b", LeaseOp::Acquire, 6), PARAMS), granted("b", 6));
        // A renew by the former holder while b holds is refused.
        assert!(matches!(w.handle(ms(T0 + 1400), &req("a", LeaseOp::Renew, 5), PARAMS), LeaseResponse::Denied { .. }));
    }

    #[test]
    fn renew_grants_a_free_lease_without_lowering_the_epoch() {
        let mut w = ready();
        assert_eq!(w.handle(ms(T0), &req("b", LeaseOp::Acquire, 9), PARAMS), granted("b", 9));
        assert_eq!(w.handle(ms(T0 + 1), &req("b", LeaseOp::Release, 9), PARAMS), LeaseResponse::Released);
        // a served in epoch 8 on the peer lease and now needs the witness.
        assert_eq!(w.handle(ms(T0 + 2), &req("a", LeaseOp::Renew, 8), PARAMS), granted("a", 8));
        assert_eq!(w.epoch(&GroupKey::new("ns", "g")), Some(9));
        w.handle(ms(T0 + 3), &req("a", LeaseOp::Release, 8), PARAMS);
        assert_eq!(w.handle(ms(T0 + 4), &req("b", LeaseOp::Acquire, 9), PARAMS), granted("b", 10));
    }

    #[test]
    fn acquire_epochs_strictly_increase() {
        let mut w = ready();
        assert_eq!(w.handle(ms(T0), &req("a", LeaseOp::Acquire, 3), PARAMS), granted("a", 3));
        // A duplicate of the same request starts another term; harmless, epochs still rise.
        assert_eq!(w.handle(ms(T0 + 1), &req("a", LeaseOp::Acquire, 3), PARAMS), granted("a", 4));
        assert_eq!(w.handle(ms(T0 + 1000), &req("b", LeaseOp::Acquire, 2), PARAMS), granted("b", 5));
    }

    #[test]
    fn release_frees_only_the_named_grant() {
        let mut w = ready();
        assert_eq!(w.handle(ms(T0), &req("a", LeaseOp::Acquire, 1), PARAMS), granted("a", 1));
        assert_eq!(w.handle(ms(T0 + 1), &req("a", LeaseOp::Acquire, 1), PARAMS), granted("a", 2));
        // A release of epoch 1 arriving late does not free the newer grant.
        assert_eq!(w.handle(ms(T0 + 2), &req("a", LeaseOp::Release, 1), PARAMS), LeaseResponse::Released);
        assert!(matches!(w.handle(ms(T0 + 3), &req("b", LeaseOp::Acquire, 3), PARAMS), LeaseResponse::Denied { .. }));
        // Nor does a release by another node.
        w.handle(ms(T0 + 4), &req("b", LeaseOp::Release, 2), PARAMS);
        assert!(matches!(w.handle(ms(T0 + 5), &req("b", LeaseOp::Acquire, 3), PARAMS), LeaseResponse::Denied { .. }));
        w.handle(ms(T0 + 6), &req("a", LeaseOp::Release, 2), PARAMS);
        assert_eq!(w.handle(ms(T0 + 7), &req("b", LeaseOp::Acquire, 3), PARAMS), granted("b", 3));
    }

    #[test]
    fn a_late_renew_of_an_older_term_does_not_let_a_late_release_free_the_newer_grant() {
        let mut w = ready();
        assert_eq!(w.handle(ms(T0), &req("a", LeaseOp::Acquire, 3), PARAMS), granted("a", 3));
        // Sent before the acquire (old term 2), delivered after it.
        assert_eq!(w.handle(ms(T0 + 70), &req("a", LeaseOp::Renew, 2), PARAMS), granted("a", 2));
        assert_eq!(w.handle(ms(T0 + 100), &req("a", LeaseOp::Release, 2), PARAMS), LeaseResponse::Released);
        assert!(matches!(w.handle(ms(T0 + 300), &req("b", LeaseOp::Acquire, 3), PARAMS), LeaseResponse::Denied { .. }));
        w.handle(ms(T0 + 400), &req("a", LeaseOp::Release, 3), PARAMS);
        assert_eq!(w.handle(ms(T0 + 401), &req("b", LeaseOp::Acquire, 3), PARAMS), granted("b", 4));
    }

    #[test]
    fn a_restarted_witness_waits_out_the_stretched_ttl() {
        let mut w = Witness::new(ms(T0));
        match w.handle(ms(T0 + 807), &req("a", LeaseOp::Acquire, 1), PARAMS) {
            LeaseResponse::Denied { holder: None, retry_after_ms: 1, reason } => assert!(reason.contains("restarted")),
            other => panic!("expected a denial, got {other:?}"),
        }
        assert!(matches!(w.handle(ms(T0 + 100), &req("a", LeaseOp::Renew, 1), PARAMS), LeaseResponse::Denied { .. }));
        assert_eq!(w.handle(ms(T0 + 808), &req("a", LeaseOp::Acquire, 1), PARAMS), granted("a", 1));
    }

    #[test]
    fn restored_epochs_keep_terms_increasing() {
        let mut w = Witness::new(ms(T0));
        let g = GroupKey::new("ns", "g");
        w.restore_epoch(&g, 41);
        assert_eq!(w.handle(ms(T0 + 900), &req("a", LeaseOp::Acquire, 3), PARAMS), granted("a", 42));
    }

    #[test]
    fn grants_never_exceed_the_group_ttl_and_refuse_bad_requests() {
        let mut w = ready();
        let mut long = req("a", LeaseOp::Acquire, 1);
        long.ttl_ms = 60_000;
        assert_eq!(w.handle(ms(T0), &long, PARAMS), granted("a", 1));
        let mut zero = req("b", LeaseOp::Acquire, 1);
        zero.ttl_ms = 0;
        assert!(
            matches!(w.handle(ms(T0), &zero, PARAMS), LeaseResponse::Denied { reason, .. } if reason.starts_with("ttlMs"))
        );
        let nameless = req("", LeaseOp::Acquire, 1);
        assert!(
            matches!(w.handle(ms(T0), &nameless, PARAMS), LeaseResponse::Denied { reason, .. } if reason.starts_with("node"))
        );
        // Shorter requests get shorter leases, and are held for their stretched ttl only.
        let mut short = req("c", LeaseOp::Acquire, 1);
        short.group = GroupKey::new("ns", "other");
        short.ttl_ms = 100;
        assert!(matches!(w.handle(ms(T0), &short, PARAMS), LeaseResponse::Granted { ttl_ms: 100, .. }));
        let mut d = req("d", LeaseOp::Acquire, 1);
        d.group = GroupKey::new("ns", "other");
        assert!(matches!(w.handle(ms(T0 + 101), &d, PARAMS), LeaseResponse::Granted { .. }));
    }

    #[test]
    fn absurd_epochs_are_refused_naming_the_field_and_the_node_and_change_nothing() {
        let mut w = ready();
        let g = GroupKey::new("ns", "g");
        let refused = |epoch: u64, highest: u64| LeaseResponse::Denied {
            holder: None,
            retry_after_ms: 800,
            reason: format!(
                "epoch: {epoch} from node \"b\" is more than 4294967296 above the highest epoch of HaGroup ns/g ({highest}); refused"
            ),
        };
        // A group the witness has never seen: nothing is recorded for it.
        for op in [LeaseOp::Acquire, LeaseOp::Renew, LeaseOp::Release] {
            assert_eq!(w.handle(ms(T0), &req("b", op, u64::MAX), PARAMS), refused(u64::MAX, 0), "{op:?}");
        }
        assert_eq!((w.group_count(), w.epoch(&g)), (0, None));

        assert_eq!(w.handle(ms(T0), &req("a", LeaseOp::Acquire, 7), PARAMS), granted("a", 7));
        let before = w.groups.clone();
        for (op, epoch) in [
            (LeaseOp::Acquire, u64::MAX),
            (LeaseOp::Acquire, 7 + MAX_EPOCH_LEAP + 1),
            (LeaseOp::Renew, u64::MAX),
            (LeaseOp::Release, u64::MAX),
        ] {
            assert_eq!(w.handle(ms(T0 + 900), &req("b", op, epoch), PARAMS), refused(epoch, 7), "{op:?}");
        }
        // a's lease, holder epoch and the group's epoch are untouched, even by a release
        // from the holder itself.
        let mut from_holder = req("a", LeaseOp::Release, u64::MAX);
        from_holder.ttl_ms = 0;
        assert!(matches!(
            w.handle(ms(T0 + 1), &from_holder, PARAMS),
            LeaseResponse::Denied { reason, .. } if reason.starts_with("epoch: 18446744073709551615 from node \"a\"")
        ));
        assert_eq!(w.groups, before);
        assert_eq!(w.holder(&g, ms(T0 + 1)), Some("a"));

        // The bound itself is a leap a group may take.
        let edge = 7 + MAX_EPOCH_LEAP;
        assert_eq!(w.handle(ms(T0 + 900), &req("b", LeaseOp::Acquire, edge), PARAMS), granted("b", edge));
        assert_eq!(w.epoch(&g), Some(edge));
    }

    #[test]
    fn epochs_restored_after_a_restart_raise_the_bound() {
        let mut w = Witness::new(ms(T0));
        let g = GroupKey::new("ns", "g");
        w.restore_epoch(&g, u64::MAX - 1);
        assert_eq!(w.handle(ms(T0 + 900), &req("a", LeaseOp::Acquire, u64::MAX), PARAMS), granted("a", u64::MAX));
    }

    #[test]
    fn a_successor_honours_recorded_holders_and_grants_free_groups_at_once() {
        let mut old = ready();
        let held = GroupKey::new("ns", "g");
        let free = GroupKey::new("ns", "free");
        assert_eq!(old.handle(ms(T0), &req("a", LeaseOp::Acquire, 4), PARAMS), granted("a", 4));
        let mut other = req("b", LeaseOp::Acquire, 6);
        other.group = free.clone();
        assert_eq!(old.handle(ms(T0), &other, PARAMS), granted("b", 6));
        other.op = LeaseOp::Release;
        assert_eq!(old.handle(ms(T0 + 1), &other, PARAMS), LeaseResponse::Released);
        let records = [held.clone(), free.clone()].map(|g| (g.clone(), old.record(&g).unwrap_or_default()));
        assert_eq!(records[0].1, LeaseRecord { holder: Some("a".into()), holder_epoch: 4, epoch: 4, held_ms: 808 });
        assert_eq!(records[1].1, LeaseRecord { holder: None, holder_epoch: 6, epoch: 6, held_ms: 0 });

        // The successor takes over on its own clock, which started at zero.
        let takeover = ms(50);
        let mut new = Witness::resume(takeover, records);
        let mut to_free = req("c", LeaseOp::Acquire, 1);
        to_free.group = free.clone();
        assert_eq!(new.handle(takeover, &to_free, PARAMS), granted("c", 7), "a free group waits for nothing");
        match new.handle(takeover + ms(807), &req("b", LeaseOp::Acquire, 5), PARAMS) {
            LeaseResponse::Denied { holder, retry_after_ms: 1, .. } => assert_eq!(holder.as_deref(), Some("a")),
            other => panic!("the recorded holder's lease must be honoured: {other:?}"),
        }
        // The holder itself renews at once, in its epoch.
        assert_eq!(new.handle(takeover + ms(1), &req("a", LeaseOp::Renew, 4), PARAMS), granted("a", 4));
        assert_eq!(new.handle(takeover + ms(1), &req("a", LeaseOp::Release, 4), PARAMS), LeaseResponse::Released);
        assert_eq!(new.handle(takeover + ms(2), &req("b", LeaseOp::Acquire, 5), PARAMS), granted("b", 5));
    }

    #[test]
    fn records_carry_the_longest_live_grant_and_reset_on_release() {
        let mut w = ready();
        let g = GroupKey::new("ns", "g");
        let mut short = req("a", LeaseOp::Acquire, 1);
        short.ttl_ms = 100;
        w.handle(ms(T0), &req("a", LeaseOp::Acquire, 1), PARAMS);
        w.handle(ms(T0 + 1), &LeaseRequest { op: LeaseOp::Renew, ..short.clone() }, PARAMS);
        assert_eq!(w.record(&g).map(|r| r.held_ms), Some(808), "a shorter renew does not shorten what is held");
        w.handle(ms(T0 + 2), &req("a", LeaseOp::Release, 1), PARAMS);
        assert_eq!(w.record(&g).map(|r| (r.holder, r.held_ms)), Some((None, 0)));
        w.handle(ms(T0 + 3), &short, PARAMS);
        assert_eq!(w.record(&g).map(|r| r.held_ms), Some(101));
        assert_eq!(w.record(&GroupKey::new("ns", "unknown")), None);
    }

    #[test]
    fn groups_are_independent() {
        let mut w = ready();
        for i in 0..1000 {
            let mut r = req("a", LeaseOp::Acquire, 1);
            r.group = GroupKey::new("ns", format!("g{i}"));
            assert_eq!(w.handle(ms(T0), &r, PARAMS), granted("a", 1));
        }
        assert_eq!(w.group_count(), 1000);
    }
}
