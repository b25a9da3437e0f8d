//! Leader election among the operator replicas, on a `coordination.k8s.io/v1` Lease, and
//! the fence that keeps a replica that is not (or no longer) the leader from granting
//! witness leases.
//!
//! The rules are client-go's, written as a pure [`Elector`] (observed Lease and the time in,
//! the write to attempt out) and a thin loop ([`run_election`]) that does the reads and
//! writes:
//!
//! - Writes are compare-and-swap: `replace` carries the `resourceVersion` that was read, so
//!   of two replicas racing for an expired Lease exactly one wins.
//! - Whether another holder's Lease has expired is judged on this replica's monotonic clock,
//!   from the moment it first saw that exact record, never from the `renewTime` written by
//!   the other replica's wall clock.
//! - A leader counts itself leader only until `renewDeadline` after it *sent* its last
//!   successful renewal. A rival can only take over `leaseDuration` after it saw that
//!   renewal, which is later still; `renewDeadline < leaseDuration` leaves the margin. This
//!   is the fence: [`FencedAuthority`] consults it on every witness request, so even a
//!   leader whose renewals hang stops granting before anyone else may start.
//!
//! Only `get`, `create` and `update` are used on the Lease (the chart's Role grants exactly
//! those, restricted to the Lease's name).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hapair_crds::nodeapi::{LeaseRequest, LeaseResponse};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::controller::metrics::Metrics;
use crate::witness::lease::{LeaseAuthority, LeaseParams};

/// The election's clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElectionTiming {
    /// How long a Lease nobody renews stays someone's.
    pub lease_duration: Duration,
    /// How long after sending its last successful renewal a leader still acts as leader.
    pub renew_deadline: Duration,
    /// How often the leader renews and the others look.
    pub retry_period: Duration,
}

impl Default for ElectionTiming {
    fn default() -> Self {
        ElectionTiming {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl ElectionTiming {
    /// The fence only holds when a leader gives up before a rival may start, and renews
    /// several times before it gives up.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period.saturating_mul(2) > self.renew_deadline {
            return Err(format!(
                "retry period ({:?}) must be positive and at most half the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// The write an [`Elector`] wants next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// No Lease exists: create it with this replica as holder.
    Create(Lease),
    /// Replace the Lease (its `resourceVersion` is the one read): renew it, or take it over
    /// because it expired or was released.
    Replace(Lease),
    /// Someone else holds a live Lease.
    Wait { holder: String },
}

/// One replica's view of the election. Pure: time comes in as arguments.
#[derive(Clone, Debug)]
pub struct Elector {
    name: String,
    identity: String,
    timing: ElectionTiming,
    /// The `resourceVersion` last seen and when (this replica's clock) it was first seen.
    observed: Option<(String, Instant)>,
    /// Until when this replica acts as leader.
    valid_until: Option<Instant>,
}

fn micro(wall: Timestamp) -> Option<MicroTime> {
    Some(MicroTime(wall))
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl Elector {
    pub fn new(name: &str, identity: &str, timing: ElectionTiming) -> Self {
        Elector { name: name.to_string(), identity: identity.to_string(), timing, observed: None, valid_until: None }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timing(&self) -> ElectionTiming {
        self.timing
    }

    /// Until when this replica may act as leader, if it is leading.
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    pub fn is_leader(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }

    fn lease(&self, resource_version: Option<String>, acquired: Timestamp, transitions: i32, wall: Timestamp) -> Lease {
        Lease {
            metadata: ObjectMeta { name: Some(self.name.clone()), resource_version, ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(seconds(self.timing.lease_duration)),
                acquire_time: micro(acquired),
                renew_time: micro(wall),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    /// What to do about the Lease as just read (`None`: it does not exist), at `now` on this
    /// replica's monotonic clock and `wall` on its wall clock (written for people only).
    pub fn decide(&mut self, now: Instant, wall: Timestamp, current: Option<&Lease>) -> Step {
        let Some(lease) = current else {
            self.observed = None;
            return Step::Create(self.lease(None, wall, 0, wall));
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != version) {
            self.observed = Some((version.clone(), now));
        }
        let seen_at = self.observed.as_ref().map(|(_, at)| *at).unwrap_or(now);
        let spec = lease.spec.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .unwrap_or(self.timing.lease_duration);
        match spec.holder_identity.filter(|h| !h.is_empty()) {
            Some(holder) if holder == self.identity => {
                let acquired = spec.acquire_time.map(|t| t.0).unwrap_or(wall);
                Step::Replace(self.lease(Some(version), acquired, transitions, wall))
            }
            Some(holder) => {
                // Someone else's record: whatever this replica believed, it is not leading.
                self.valid_until = None;
                if now < seen_at + duration {
                    Step::Wait { holder }
                } else {
                    Step::Replace(self.lease(Some(version), wall, transitions.saturating_add(1), wall))
                }
            }
            None => Step::Replace(self.lease(Some(version), wall, transitions.saturating_add(1), wall)),
        }
    }

    /// The write decided at `sent_at` (taken before it was sent) was accepted.
    pub fn succeeded(&mut self, sent_at: Instant, written: &Lease) {
        self.valid_until = Some(sent_at + self.timing.renew_deadline);
        if let Some(version) = written.metadata.resource_version.clone() {
            self.observed = Some((version, sent_at));
        }
    }

    /// The Lease with the holder cleared, to hand leadership over at shutdown; `None` when
    /// this replica does not hold it.
    pub fn release(&mut self, current: &Lease) -> Option<Lease> {
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return None;
        }
        self.valid_until = None;
        let mut released = current.clone();
        released.metadata.managed_fields = None;
        released.spec = Some(LeaseSpec { holder_identity: None, lease_duration_seconds: Some(1), ..spec });
        Some(released)
    }
}

/// Whether this replica leads, shared between the election loop, the operator's term and
/// the witness fence.
#[derive(Clone, Debug)]
pub struct Leadership {
    valid_until: Arc<Mutex<Option<Instant>>>,
    leading: Arc<watch::Sender<bool>>,
}

impl Default for Leadership {
    fn default() -> Self {
        Leadership::new()
    }
}

impl Leadership {
    pub fn new() -> Self {
        Leadership { valid_until: Arc::new(Mutex::new(None)), leading: Arc::new(watch::channel(false).0) }
    }

    pub fn is_leader(&self, now: Instant) -> bool {
        self.valid_until.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|until| now < until)
    }

    /// Records the elector's deadline and tells subscribers when leading starts or stops.
    pub fn set(&self, valid_until: Option<Instant>, now: Instant) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = valid_until;
        let leading = valid_until.is_some_and(|until| now < until);
        self.leading.send_if_modified(|current| std::mem::replace(current, leading) != leading);
    }

    /// Changes of leadership (`true` while leading).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }
}

/// The witness as served by an operator replica: it answers only while the replica leads.
///
/// Every replica that becomes leader builds a new one around a fresh authority, so the
/// authority's restart wait-out (it grants nothing for `L·(1+drift)` after creation) runs
/// from the takeover. Between a lost leadership and the end of the term (which switches the
/// node API to 503) this fence denies every request.
pub struct FencedAuthority {
    inner: Box<dyn LeaseAuthority>,
    leadership: Leadership,
    retry_after: Duration,
}

impl std::fmt::Debug for FencedAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FencedAuthority").field("leadership", &self.leadership).finish_non_exhaustive()
    }
}

impl FencedAuthority {
    pub fn new(inner: Box<dyn LeaseAuthority>, leadership: Leadership, retry_after: Duration) -> Self {
        FencedAuthority { inner, leadership, retry_after }
    }
}

impl LeaseAuthority for FencedAuthority {
    fn handle(&mut self, now: Duration, request: &LeaseRequest, params: LeaseParams) -> LeaseResponse {
        // The real clock, not `now`: the deadline belongs to the election, whose clock it is.
        if !self.leadership.is_leader(Instant::now()) {
            return LeaseResponse::Denied {
                holder: None,
                retry_after_ms: u64::try_from(self.retry_after.as_millis()).unwrap_or(u64::MAX),
                reason: "this operator replica is not the leader".into(),
            };
        }
        self.inner.handle(now, request, params)
    }

    fn restore_epoch(&mut self, group: &hapair_crds::nodeapi::GroupKey, epoch: u64) {
        self.inner.restore_epoch(group, epoch);
    }

    fn record(&self, group: &hapair_crds::nodeapi::GroupKey) -> Option<crate::witness::LeaseRecord> {
        self.inner.record(group)
    }
}

/// Campaigns for (and keeps) the Lease until `stop` turns true, then hands it over.
/// Publishes every change of leadership on `leadership`.
pub async fn run_election(
    api: Api<Lease>,
    mut elector: Elector,
    leadership: Leadership,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let timing = elector.timing();
    // The Lease as last written by this replica, so a leader renews without re-reading.
    let mut last: Option<Lease> = None;
    loop {
        let round = tokio::time::timeout(timing.retry_period, election_round(&api, &mut elector, &mut last, &metrics));
        match round.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                metrics.error("leader-election");
                warn!(error = %e, lease = %api_name(&elector), "leader election request failed");
                last = None;
            }
            Err(_) => {
                metrics.error("leader-election");
                warn!(lease = %api_name(&elector), "leader election request timed out");
                last = None;
            }
        }
        let now = Instant::now();
        let was = leadership.is_leader(now);
        leadership.set(elector.valid_until(), now);
        let is = leadership.is_leader(now);
        metrics.set_leader(is);
        if is != was {
            info!(identity = %elector.identity(), leading = is, "leadership changed");
        }
        tokio::select! {
            _ = tokio::time::sleep(timing.retry_period) => {}
            _ = stop.changed() => break,
        }
    }
    // Hand over at once rather than make the other replica wait out the lease.
    let now = Instant::now();
    leadership.set(None, now);
    metrics.set_leader(false);
    let current = match tokio::time::timeout(timing.retry_period, api.get_opt(&api_name(&elector))).await {
        Ok(Ok(current)) => current,
        _ => None,
    };
    if let Some(released) = current.as_ref().and_then(|c| elector.release(c)) {
        let replaced = tokio::time::timeout(
            timing.retry_period,
            api.replace(&api_name(&elector), &PostParams::default(), &released),
        )
        .await;
        match replaced {
            Ok(Ok(_)) => {
                metrics.kube_write("lease");
                info!(identity = %elector.identity(), "released the leader lease");
            }
            _ => warn!(identity = %elector.identity(), "could not release the leader lease; it expires on its own"),
        }
    }
}

fn api_name(elector: &Elector) -> String {
    elector.name.clone()
}

async fn election_round(
    api: &Api<Lease>,
    elector: &mut Elector,
    last: &mut Option<Lease>,
    metrics: &Metrics,
) -> Result<(), kube::Error> {
    let now = Instant::now();
    let current = match last.take() {
        Some(mine) if elector.is_leader(now) => Some(mine),
        _ => api.get_opt(&api_name(elector)).await?,
    };
    let sent_at = Instant::now();
    let written = match elector.decide(sent_at, Timestamp::now(), current.as_ref()) {
        Step::Wait { .. } => return Ok(()),
        Step::Create(lease) => api.create(&PostParams::default(), &lease).await,
        Step::Replace(lease) => api.replace(&api_name(elector), &PostParams::default(), &lease).await,
    };
    match written {
        Ok(lease) => {
            metrics.kube_write("lease");
            elector.succeeded(sent_at, &lease);
            *last = Some(lease);
            Ok(())
        }
        // Another replica wrote first: read again next round.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::nodeapi::{GroupKey, LeaseOp};

    fn timing() -> ElectionTiming {
        ElectionTiming::default()
    }

    /// A Lease store with the API server's compare-and-swap on `resourceVersion`.
    #[derive(Default)]
    struct FakeApi {
        lease: Option<Lease>,
        version: u64,
    }

    impl FakeApi {
        fn write(&mut self, step: Step) -> Option<Lease> {
            let (mut lease, expected) = match step {
                Step::Wait { .. } => return None,
                Step::Create(l) => (l, None),
                Step::Replace(l) => {
                    let v = l.metadata.resource_version.clone();
                    (l, v)
                }
            };
            let current = self.lease.as_ref().and_then(|l| l.metadata.resource_version.clone());
            if current != expected {
                return None;
            }
            self.version += 1;
            lease.metadata.resource_version = Some(self.version.to_string());
            self.lease = Some(lease.clone());
            Some(lease)
        }
    }

    fn wall(offset: Duration) -> Timestamp {
        Timestamp::UNIX_EPOCH + offset
    }

    #[test]
    fn timing_must_leave_room_for_the_fence() {
        assert_eq!(timing().check(), Ok(()));
        let bad = ElectionTiming { renew_deadline: Duration::from_secs(15), ..timing() };
        assert!(bad.check().is_err());
        let slow = ElectionTiming { retry_period: Duration::from_secs(6), ..timing() };
        assert!(slow.check().is_err());
    }

    #[test]
    fn creates_renews_and_is_leader_only_until_the_renew_deadline() {
        let t0 = Instant::now();
        let mut api = FakeApi::default();
        let mut a = Elector::new("l", "a", timing());
        let step = a.decide(t0, wall(Duration::ZERO), None);
        assert!(
            matches!(&step, Step::Create(l) if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some("a"))
        );
        let written = api.write(step).unwrap_or_else(|| panic!("created"));
        a.succeeded(t0, &written);
        assert!(a.is_leader(t0 + Duration::from_secs(9)));
        assert!(!a.is_leader(t0 + Duration::from_secs(10)), "the fence ends at the renew deadline");
        let t1 = t0 + Duration::from_secs(2);
        let step = a.decide(t1, wall(Duration::from_secs(2)), api.lease.as_ref());
        let Step::Replace(renewal) = &step else { panic!("renewal expected, got {step:?}") };
        let spec = renewal.spec.clone().unwrap_or_default();
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.acquire_time, Some(MicroTime(wall(Duration::ZERO))), "acquire time kept");
        let written = api.write(step).unwrap_or_else(|| panic!("renewed"));
        a.succeeded(t1, &written);
        assert!(a.is_leader(t0 + Duration::from_secs(11)));
    }

    #[test]
    fn a_rival_waits_a_full_lease_duration_on_its_own_clock_then_takes_over() {
        let t0 = Instant::now();
        let mut api = FakeApi::default();
        let mut a = Elector::new("l", "a", timing());
        let mut b = Elector::new("l", "b", timing());
        let step = a.decide(t0, wall(Duration::ZERO), None);
        let written = api.write(step).unwrap_or_else(|| panic!("created"));
        a.succeeded(t0, &written);
        // b first sees a's record 1s later; a then stops renewing. b's wall clock is far off,
        // which must not matter.
        let seen = t0 + Duration::from_secs(1);
        assert_eq!(
            b.decide(seen, wall(Duration::from_secs(99_999)), api.lease.as_ref()),
            Step::Wait { holder: "a".into() }
        );
        let almost = seen + Duration::from_secs(15) - Duration::from_millis(1);
        assert!(matches!(b.decide(almost, wall(Duration::ZERO), api.lease.as_ref()), Step::Wait { .. }));
        assert!(!a.is_leader(almost), "a stopped acting long before b may start");
        let expired = seen + Duration::from_secs(15);
        let step = b.decide(expired, wall(Duration::ZERO), api.lease.as_ref());
        let Step::Replace(takeover) = &step else { panic!("takeover expected, got {step:?}") };
        assert_eq!(takeover.spec.as_ref().and_then(|s| s.lease_transitions), Some(1));
        let written = api.write(step).unwrap_or_else(|| panic!("taken over"));
        b.succeeded(expired, &written);
        assert!(b.is_leader(expired));
        // a comes back and finds b's record: it is not leader and waits.
        assert_eq!(a.decide(expired, wall(Duration::ZERO), api.lease.as_ref()), Step::Wait { holder: "b".into() });
        assert!(!a.is_leader(expired));
    }

    #[test]
    fn of_two_racing_replicas_only_one_wins_the_write() {
        let t0 = Instant::now();
        let mut api = FakeApi::default();
        let mut a = Elector::new("l", "a", timing());
        let mut b = Elector::new("l", "b", timing());
        let step_a = a.decide(t0, wall(Duration::ZERO), None);
        let step_b = b.decide(t0, wall(Duration::ZERO), None);
        let won_a = api.write(step_a);
        let won_b = api.write(step_b);
        assert!(won_a.is_some() && won_b.is_none());
        // A released lease is taken over at once, by one of them.
        let mut api = FakeApi::default();
        let written = api.write(a.decide(t0, wall(Duration::ZERO), None)).unwrap_or_else(|| panic!("created"));
        a.succeeded(t0, &written);
        let released = a.release(&written).unwrap_or_else(|| panic!("a holds it"));
        assert!(!a.is_leader(t0));
        api.write(Step::Replace(released)).unwrap_or_else(|| panic!("released"));
        let step = b.decide(t0, wall(Duration::ZERO), api.lease.as_ref());
        assert!(matches!(step, Step::Replace(_)), "{step:?}");
        assert!(b.release(api.lease.as_ref().unwrap_or_else(|| panic!("lease"))).is_none(), "b does not hold it yet");
    }

    /// Two replicas in a seeded simulation with delays, lost writes and stalls: at no
    /// instant do both act as leader.
    #[test]
    fn never_two_leaders_at_once() {
        use rand::{Rng, SeedableRng};
        for seed in 0..20u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let t0 = Instant::now();
            let mut api = FakeApi::default();
            let mut electors = [Elector::new("l", "a", timing()), Elector::new("l", "b", timing())];
            let mut next = [Duration::ZERO, Duration::from_millis(700)];
            let mut clock = Duration::ZERO;
            while clock < Duration::from_secs(600) {
                let i = if next[0] <= next[1] { 0 } else { 1 };
                clock = next[i];
                let now = t0 + clock;
                for (j, e) in electors.iter().enumerate() {
                    assert!(
                        !(e.is_leader(now) && electors[1 - j].is_leader(now)),
                        "seed {seed}: two leaders at {clock:?}"
                    );
                }
                let step = electors[i].decide(now, wall(clock), api.lease.as_ref());
                // A write is lost on the way, or lands but its answer is lost, or succeeds.
                match rng.random_range(0..10) {
                    0 => {}
                    1 => {
                        api.write(step);
                    }
                    _ => {
                        if let Some(written) = api.write(step) {
                            electors[i].succeeded(now, &written);
                        }
                    }
                }
                // Sometimes a replica stalls for a long time (GC pause, network partition).
                let stall =
                    if rng.random_bool(0.05) { Duration::from_secs(rng.random_range(5..30)) } else { Duration::ZERO };
                next[i] = clock + Duration::from_secs(2) + stall;
            }
        }
    }

    struct Always;

    impl LeaseAuthority for Always {
        fn handle(&mut self, _now: Duration, request: &LeaseRequest, params: LeaseParams) -> LeaseResponse {
            LeaseResponse::Granted {
                holder: request.node.clone(),
                ttl_ms: u64::try_from(params.ttl.as_millis()).unwrap_or(0),
                epoch: request.epoch,
            }
        }
    }

    fn request() -> LeaseRequest {
        LeaseRequest {
            group: GroupKey::new("default", "g"),
            node: "a".into(),
            op: LeaseOp::Acquire,
            epoch: 3,
            ttl_ms: 800,
        }
    }

    fn params() -> LeaseParams {
        LeaseParams { ttl: Duration::from_millis(800), max_clock_drift_ppm: 10_000 }
    }

    #[test]
    fn a_non_leader_never_grants_a_lease() {
        let leadership = Leadership::new();
        let mut witness = FencedAuthority::new(Box::new(Always), leadership.clone(), Duration::from_secs(2));
        let denied = |answer: &LeaseResponse| matches!(answer, LeaseResponse::Denied { holder: None, retry_after_ms: 2000, reason } if reason.contains("not the leader"));
        // Never elected.
        assert!(denied(&witness.handle(Duration::ZERO, &request(), params())));
        // Elected: the authority decides.
        let now = Instant::now();
        leadership.set(Some(now + Duration::from_secs(60)), now);
        assert!(matches!(witness.handle(Duration::ZERO, &request(), params()), LeaseResponse::Granted { .. }));
        // The renew deadline passed without a renewal: denied, even though nobody told the
        // term yet.
        leadership.set(Some(now), now);
        assert!(denied(&witness.handle(Duration::from_secs(1), &request(), params())));
        // Leadership handed over.
        leadership.set(None, Instant::now());
        assert!(denied(&witness.handle(Duration::from_secs(2), &request(), params())));
    }

    #[test]
    fn leadership_changes_are_announced_once() {
        let leadership = Leadership::new();
        let mut changes = leadership.subscribe();
        let now = Instant::now();
        leadership.set(Some(now + Duration::from_secs(10)), now);
        assert!(changes.has_changed().unwrap_or(false));
        assert!(*changes.borrow_and_update());
        leadership.set(Some(now + Duration::from_secs(12)), now);
        assert!(!changes.has_changed().unwrap_or(true), "a renewal is not a change");
        leadership.set(None, now);
        assert!(!*changes.borrow_and_update());
    }
}
