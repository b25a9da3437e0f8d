//! Lease accounting: the leases this node holds, and the promise it made by granting one.
//!
//! # The peer lease
//!
//! A node that wants to serve (roles Promoting, Primary, Demoting) remembers when it sent
//! each heartbeat. The standby acknowledges the newest heartbeat it received with a
//! [`LeaseGrant`]; an acknowledgement of heartbeat `N` gives the sender a lease until
//! `send_time(N) + L` on the *sender's* clock, however late the acknowledgement arrives.
//!
//! The granting standby, in exchange, promises not to act as primary until
//! `receive_time(N) + L·(1+δ)` on *its* clock. `receive_time(N)` is after `send_time(N)`
//! in real time, and `L·(1+δ)` on the standby's clock lasts at least as long as `L` on the
//! primary's (drift bound), so the promise outlives the lease. Re-acknowledging the same
//! `N` does not move either end. A node that stops granting (it wants to promote) can
//! therefore act, as far as the peer lease goes, once [`LeaseBook::promise_kept`].
//!
//! The promise can also be released early: a peer whose heartbeat says it is Standby or
//! Fenced and holds nothing has forgotten the send times of all its earlier heartbeats
//! ([`LeaseBook::void`]), so no acknowledgement of those can ever give it a lease again.
//!
//! A restarted node holds no lease and does not know what it granted before; it starts
//! with a full promise (`now + L·(1+δ)`).
//!
//! # The witness lease
//!
//! Granted by the witness for `L` measured from when the request was *sent*; the witness
//! itself lets `L·(1+δ)` pass on its own clock before anyone else can have it.
//!
//! # Acting
//!
//! A node may hold resources only while `now < expiry()` (the later of both leases); it
//! starts demoting itself `fence_margin` earlier, and arms the watchdog at `expiry()`.

use std::collections::VecDeque;
use std::time::Duration;

use super::heartbeat::LeaseGrant;
use super::time::Instant;

/// Send times kept for acknowledgement; older acknowledgements are worthless anyway
/// (their lease would be over) unless `L` exceeds this many heartbeat intervals.
const SENT_KEPT: usize = 256;

#[derive(Clone, Debug, Default)]
pub struct LeaseBook {
    /// `(seq, send time)` of heartbeats sent while wanting a lease.
    sent: VecDeque<(u64, Instant)>,
    peer_expiry: Option<Instant>,
    witness_expiry: Option<Instant>,
    /// Epoch of the witness lease held (or last granted).
    witness_epoch: Option<u64>,
    /// This node will not act before this instant (promise made by its grants).
    promise_until: Instant,
    /// The peer heartbeat last granted, as `(incarnation, seq)`.
    last_granted: Option<(u64, u64)>,
}

impl LeaseBook {
    /// A fresh book for a node that may have granted a lease just before `now`.
    pub fn new(now: Instant, lease_wait: Duration) -> LeaseBook {
        LeaseBook { promise_until: now + lease_wait, ..LeaseBook::default() }
    }

    /// Remembers that heartbeat `seq` left at `at` and may earn a lease.
    pub fn record_sent(&mut self, seq: u64, at: Instant) {
        if self.sent.len() == SENT_KEPT {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, at));
    }

    /// Whether heartbeat `seq` was sent (and remembered) since the last [`LeaseBook::void`].
    pub fn has_sent(&self, seq: u64) -> bool {
        self.sent.iter().any(|(s, _)| *s == seq)
    }

    /// Forgets every lease and every send time: no acknowledgement of an earlier
    /// heartbeat can extend a lease any more. Called when the node stops wanting one.
    pub fn void(&mut self) {
        self.sent.clear();
        self.peer_expiry = None;
        self.void_witness();
    }

    /// Forgets the witness lease (after releasing it, or when it was refused).
    pub fn void_witness(&mut self) {
        self.witness_expiry = None;
        self.witness_epoch = None;
    }

    /// Applies an acknowledgement from the peer; returns the new peer-lease expiry when it
    /// moved. `ttl` caps the grant's own ttl with this node's `L`.
    pub fn on_grant(&mut self, grant: &LeaseGrant, my_incarnation: u64, ttl: Duration) -> Option<Instant> {
        if grant.incarnation != my_incarnation {
            return None;
        }
        let sent_at = self.sent.iter().find(|(seq, _)| *seq == grant.seq).map(|(_, at)| *at)?;
        let ttl = ttl.min(Duration::from_millis(u64::from(grant.ttl_ms)));
        let expiry = sent_at + ttl;
        if self.peer_expiry.is_none_or(|e| expiry > e) {
            self.peer_expiry = Some(expiry);
            return Some(expiry);
        }
        None
    }

    /// Applies a witness grant for a request sent at `sent_at`.
    pub fn on_witness_grant(&mut self, sent_at: Instant, ttl: Duration, epoch: u64) -> Instant {
        let expiry = sent_at + ttl;
        if self.witness_expiry.is_none_or(|e| expiry > e) {
            self.witness_expiry = Some(expiry);
        }
        self.witness_epoch = Some(epoch);
        self.witness_expiry.unwrap_or(expiry)
    }

    pub fn peer_expiry(&self) -> Option<Instant> {
        self.peer_expiry
    }

    pub fn witness_expiry(&self) -> Option<Instant> {
        self.witness_expiry
    }

    pub fn witness_epoch(&self) -> Option<u64> {
        self.witness_epoch
    }

    /// When the later of both leases ends.
    pub fn expiry(&self) -> Option<Instant> {
        match (self.peer_expiry, self.witness_expiry) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time left on the peer lease.
    pub fn peer_left(&self, now: Instant) -> Duration {
        self.peer_expiry.map_or(Duration::ZERO, |e| e.since(now))
    }

    /// Time left on the witness lease.
    pub fn witness_left(&self, now: Instant) -> Duration {
        self.witness_expiry.map_or(Duration::ZERO, |e| e.since(now))
    }

    /// Grants the peer a lease for its heartbeat `(incarnation, seq)` received at
    /// `received_at`; returns whether this is a new grant (not a repeat).
    pub fn grant(&mut self, incarnation: u64, seq: u64, received_at: Instant, lease_wait: Duration) -> bool {
        let until = received_at + lease_wait;
        if until > self.promise_until {
            self.promise_until = until;
        }
        let new = self.last_granted != Some((incarnation, seq));
        self.last_granted = Some((incarnation, seq));
        new
    }

    /// Whether every lease this node ever granted is over.
    pub fn promise_kept(&self, now: Instant) -> bool {
        now >= self.promise_until
    }

    pub fn promise_until(&self) -> Instant {
        self.promise_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Duration = Duration::from_millis(800);

    #[test]
    fn acknowledgement_counts_from_send_time() {
        let mut book = LeaseBook::new(Instant::ZERO, L);
        book.record_sent(1, Instant::from_millis(100));
        book.record_sent(2, Instant::from_millis(200));
        let grant = |seq| LeaseGrant { incarnation: 9, seq, ttl_ms: 800 };
        assert_eq!(book.on_grant(&grant(2), 9, L), Some(Instant::from_millis(1000)));
        // An older acknowledgement arriving late never shortens or extends further.
        assert_eq!(book.on_grant(&grant(1), 9, L), None);
        assert_eq!(book.expiry(), Some(Instant::from_millis(1000)));
        // Another incarnation's acknowledgement, or an unknown seq, is ignored.
        assert_eq!(book.on_grant(&grant(2), 8, L), None);
        assert_eq!(book.on_grant(&grant(3), 9, L), None);
    }

    #[test]
    fn grant_ttl_is_capped_by_both_sides() {
        let mut book = LeaseBook::new(Instant::ZERO, L);
        book.record_sent(1, Instant::from_millis(100));
        let short = LeaseGrant { incarnation: 1, seq: 1, ttl_ms: 300 };
        assert_eq!(book.on_grant(&short, 1, L), Some(Instant::from_millis(400)));
    }

    #[test]
    fn void_forgets_send_times() {
        let mut book = LeaseBook::new(Instant::ZERO, L);
        book.record_sent(1, Instant::from_millis(100));
        book.void();
        assert_eq!(book.on_grant(&LeaseGrant { incarnation: 1, seq: 1, ttl_ms: 800 }, 1, L), None);
        assert_eq!(book.expiry(), None);
    }

    #[test]
    fn promise_runs_from_receive_time() {
        let wait = Duration::from_millis(808);
        let mut book = LeaseBook::new(Instant::ZERO, wait);
        assert!(!book.promise_kept(Instant::from_millis(807)));
        assert!(book.grant(1, 5, Instant::from_millis(1000), wait));
        assert!(!book.grant(1, 5, Instant::from_millis(1000), wait));
        assert!(!book.promise_kept(Instant::from_millis(1807)));
        assert!(book.promise_kept(Instant::from_millis(1808)));
    }
}
