//! The Kubernetes store's writes, off the controller's lock: status applies, Events and
//! finalizer releases go through a queue that background workers drain.
//!
//! A status queued for an object that already has one queued replaces it in place (the
//! latest status wins, once), so a burst of changes to one group costs one write. Failed
//! status writes and releases are retried with backoff until they succeed or the object is
//! gone; an Event that cannot be recorded is retried a few times and then dropped (and
//! counted), because losing an Event must never hold up the statuses behind it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hapair_crds::nodeapi::{EventType, GroupKey};
use hapair_crds::{HaGroup, HaGroupStatus, ReplicatedVolume, ReplicatedVolumeStatus};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use kube::{Api, Client, Resource};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::controller::metrics::Metrics;
use crate::k8s::finalizer::{FINALIZER, remove_finalizer};
use crate::status::events::GroupEvent;

/// The field manager of every status the operator applies.
pub const FIELD_MANAGER: &str = "hapair-operator";

/// Longest Event note the API accepts (events.k8s.io/v1 limits `note` to 1 kB).
const MAX_NOTE: usize = 1000;

/// Attempts at recording one Event.
const EVENT_ATTEMPTS: u32 = 3;

/// Longest wait between retries of a failed write.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq)]
enum Job {
    GroupStatus(GroupKey),
    VolumeStatus(GroupKey),
    /// An Event regarding the object `about`.
    Event {
        about: Target,
        event: GroupEvent,
        attempt: u32,
    },
    Release(GroupKey),
}

/// The object a status job writes, or an Event is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Group(GroupKey),
    Volume(GroupKey),
}

impl Job {
    fn target(&self) -> Option<Target> {
        match self {
            Job::GroupStatus(key) => Some(Target::Group(key.clone())),
            Job::VolumeStatus(key) => Some(Target::Volume(key.clone())),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<Job>,
    groups: BTreeMap<GroupKey, HaGroupStatus>,
    volumes: BTreeMap<GroupKey, ReplicatedVolumeStatus>,
    /// Objects whose status is being written right now: a newer status of the same object
    /// waits for that write, or two workers could land them in the wrong order and leave the
    /// older one in the API.
    busy: std::collections::BTreeSet<Target>,
    /// Queued plus in flight.
    outstanding: usize,
}

impl Queue {
    /// The first job whose object is not being written already.
    fn take(&mut self) -> Option<Job> {
        let index = self.jobs.iter().position(|job| job.target().is_none_or(|t| !self.busy.contains(&t)))?;
        let job = self.jobs.remove(index)?;
        if let Some(target) = job.target() {
            self.busy.insert(target);
        }
        Some(job)
    }
}

struct Shared {
    client: Client,
    reporter: Reporter,
    groups: Cache<HaGroup>,
    volumes: Cache<ReplicatedVolume>,
    queue: Mutex<Queue>,
    wake: Notify,
    idle: watch::Sender<usize>,
    metrics: Arc<Metrics>,
}

/// The queue and its workers. Dropping it stops the workers.
#[derive(Debug)]
pub struct Writer {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.abort();
        }
    }
}

impl Writer {
    /// Starts `workers` workers (at least one). With one worker writes happen in the order
    /// they were queued. `instance` names this replica in Events.
    pub fn start(
        client: Client,
        groups: Cache<HaGroup>,
        volumes: Cache<ReplicatedVolume>,
        instance: &str,
        workers: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(instance.to_string()) };
        let shared = Arc::new(Shared {
            reporter,
            client,
            groups,
            volumes,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            idle: watch::channel(0).0,
            metrics,
        });
        let workers = (0..workers.max(1))
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move { shared.work().await })
            })
            .collect();
        Writer { shared, workers }
    }

    pub fn group_status(&self, key: &GroupKey, status: HaGroupStatus) {
        self.shared.push(|q| {
            let fresh = q.groups.insert(key.clone(), status).is_none();
            fresh.then(|| Job::GroupStatus(key.clone()))
        });
    }

    pub fn volume_status(&self, key: &GroupKey, status: ReplicatedVolumeStatus) {
        self.shared.push(|q| {
            let fresh = q.volumes.insert(key.clone(), status).is_none();
            fresh.then(|| Job::VolumeStatus(key.clone()))
        });
    }

    /// Forgets a queued status of a group that no longer exists.
    pub fn forget_group(&self, key: &GroupKey) {
        self.shared.lock().groups.remove(key);
    }

    pub fn event(&self, key: &GroupKey, event: GroupEvent) {
        self.shared.push(|_| Some(Job::Event { about: Target::Group(key.clone()), event, attempt: 0 }));
    }

    /// Records an Event regarding the ReplicatedVolume `key`.
    pub fn volume_event(&self, key: &GroupKey, event: GroupEvent) {
        self.shared.push(|_| Some(Job::Event { about: Target::Volume(key.clone()), event, attempt: 0 }));
    }

    /// Removes the operator's finalizer from the HaGroup `key`.
    pub fn release(&self, key: &GroupKey) {
        self.shared.push(|_| Some(Job::Release(key.clone())));
    }

    /// Waits until every queued write is done, at most `timeout`. Returns how many are
    /// still outstanding (0: all done).
    pub async fn flush(&self, timeout: Duration) -> usize {
        let mut idle = self.shared.idle.subscribe();
        let _ = tokio::time::timeout(timeout, idle.wait_for(|outstanding| *outstanding == 0)).await;
        *idle.borrow()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("queue", &self.queue).finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, add: impl FnOnce(&mut Queue) -> Option<Job>) {
        let mut queue = self.lock();
        if let Some(job) = add(&mut queue) {
            queue.jobs.push_back(job);
            queue.outstanding += 1;
            self.idle.send_replace(queue.outstanding);
            drop(queue);
            self.wake.notify_one();
        }
    }

    fn done(&self) {
        let mut queue = self.lock();
        queue.outstanding = queue.outstanding.saturating_sub(1);
        self.idle.send_replace(queue.outstanding);
    }

    async fn work(self: Arc<Self>) {
        let mut failures: u32 = 0;
        loop {
            let next = self.lock().take();
            let Some(job) = next else {
                self.wake.notified().await;
                continue;
            };
            let result = self.execute(&job).await;
            if let Some(target) = job.target() {
                self.lock().busy.remove(&target);
                // A newer status of the same object may be waiting for this one.
                self.wake.notify_one();
            }
            match result {
                Ok(()) => {
                    failures = 0;
                    self.done();
                }
                Err(retry) => {
                    failures = failures.saturating_add(1);
                    let backoff = Duration::from_millis(200u64.saturating_mul(1 << failures.min(8))).min(MAX_BACKOFF);
                    tokio::time::sleep(backoff).await;
                    match retry {
                        Some(job) => {
                            // Back of the queue: other objects' writes are not held up.
                            self.lock().jobs.push_back(job);
                            self.wake.notify_one();
                        }
                        None => self.done(),
                    }
                }
            }
        }
    }

    /// `Err(Some(job))`: retry `job`; `Err(None)`: failed for good.
    async fn execute(&self, job: &Job) -> Result<(), Option<Job>> {
        match job {
            Job::GroupStatus(key) => {
                let Some(status) = self.lock().groups.remove(key) else { return Ok(()) };
                let api: Api<HaGroup> = Api::namespaced(self.client.clone(), &key.namespace);
                let body = serde_json::json!({
                    "apiVersion": HaGroup::api_version(&()),
                    "kind": HaGroup::kind(&()),
                    "status": status,
                });
                match api.patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await
                {
                    Ok(_) => {
                        self.metrics.kube_write("status");
                        Ok(())
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => {
                        self.metrics.error("status");
                        warn!(group = %key, error = %e, "cannot write the status; will retry");
                        // A newer status queued meanwhile supersedes this one.
                        let mut queue = self.lock();
                        let superseded = queue.groups.contains_key(key);
                        if !superseded {
                            queue.groups.insert(key.clone(), status);
                        }
                        Err((!superseded).then(|| job.clone()))
                    }
                }
            }
            Job::VolumeStatus(key) => {
                let Some(status) = self.lock().volumes.remove(key) else { return Ok(()) };
                let api: Api<ReplicatedVolume> = Api::namespaced(self.client.clone(), &key.namespace);
                let body = serde_json::json!({
                    "apiVersion": ReplicatedVolume::api_version(&()),
                    "kind": ReplicatedVolume::kind(&()),
                    "status": status,
                });
                match api.patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await
                {
                    Ok(_) => {
                        self.metrics.kube_write("status");
                        Ok(())
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => {
                        self.metrics.error("status");
                        warn!(volume = %key, error = %e, "cannot write the status; will retry");
                        let mut queue = self.lock();
                        let superseded = queue.volumes.contains_key(key);
                        if !superseded {
                            queue.volumes.insert(key.clone(), status);
                        }
                        Err((!superseded).then(|| job.clone()))
                    }
                }
            }
            Job::Event { about, event, attempt } => {
                let (key, regarding) = match about {
                    Target::Group(key) => (
                        key,
                        self.groups.get(&ObjectRef::new(&key.name).within(&key.namespace)).map(|g| g.object_ref(&())),
                    ),
                    Target::Volume(key) => (
                        key,
                        self.volumes.get(&ObjectRef::new(&key.name).within(&key.namespace)).map(|v| v.object_ref(&())),
                    ),
                };
                let Some(regarding) = regarding else {
                    debug!(object = %key, reason = %event.event.reason, "no object to attach the event to");
                    return Ok(());
                };
                // A recorder per event: kube's Recorder folds every later event with the same
                // type and reason into a series of the first, note included, so "Degraded ->
                // Healthy" would be shown again where "Down -> Healthy" happened. The core
                // already drops exact repeats.
                let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
                match recorder.publish(&to_kube_event(event), &regarding).await {
                    Ok(()) => {
                        self.metrics.kube_write("event");
                        Ok(())
                    }
                    Err(e) => {
                        self.metrics.error("event");
                        warn!(object = %key, reason = %event.event.reason, error = %e, "cannot record the event");
                        let next = attempt + 1;
                        Err((next < EVENT_ATTEMPTS).then(|| Job::Event {
                            about: about.clone(),
                            event: event.clone(),
                            attempt: next,
                        }))
                    }
                }
            }
            Job::Release(key) => match release(&self.client, key).await {
                Ok(()) => {
                    self.metrics.kube_write("finalizer");
                    Ok(())
                }
                Err(e) => {
                    self.metrics.error("finalizer");
                    warn!(group = %key, error = %e, "cannot remove the finalizer; will retry");
                    Err(Some(job.clone()))
                }
            },
        }
    }
}

/// Removes the operator's finalizer from the HaGroup, reading it fresh so the patch names
/// the finalizer's current position. Done when the object or the finalizer is gone.
async fn release(client: &Client, key: &GroupKey) -> Result<(), kube::Error> {
    let api: Api<HaGroup> = Api::namespaced(client.clone(), &key.namespace);
    let Some(group) = api.get_opt(&key.name).await? else { return Ok(()) };
    match remove_finalizer(&api, &group, FINALIZER).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// A group event as a Kubernetes Event: what the agent or controller said, with the node in
/// front when an agent said it.
pub fn to_kube_event(event: &GroupEvent) -> Event {
    let mut note = match &event.node {
        Some(node) => format!("{node}: {}", event.event.message),
        None => event.event.message.clone(),
    };
    if event.event.epoch > 0 {
        note.push_str(&format!(" (epoch {})", event.event.epoch));
    }
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    Event {
        type_: match event.event.type_ {
            EventType::Normal => KubeEventType::Normal,
            EventType::Warning => KubeEventType::Warning,
        },
        reason: event.event.reason.clone(),
        note: Some(note),
        action: if event.node.is_some() { "AgentReport".into() } else { "Reconcile".into() },
        secondary: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use hapair_crds::hagroup::GroupPhase;
    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::reflector;

    #[tokio::test]
    async fn a_newer_status_waits_for_the_write_of_the_older_one() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (groups, _writer) = reflector::store::<HaGroup>();
        let (volumes, _volumes_writer) = reflector::store::<ReplicatedVolume>();
        let writer = Writer::start(client, groups, volumes, "test", 4, Arc::new(Metrics::new()));
        let key = GroupKey::new("ns", "g");
        let other = GroupKey::new("ns", "h");
        let status = |phase| HaGroupStatus { phase: Some(phase), ..HaGroupStatus::default() };
        writer.group_status(&key, status(GroupPhase::Degraded));
        let (first, reply_first) = handle.next_request().await.unwrap();
        assert!(first.uri().path().ends_with("/hagroups/g/status"));
        // While that write is in flight, a newer status of g and one of h are queued.
        writer.group_status(&key, status(GroupPhase::Healthy));
        writer.group_status(&other, status(GroupPhase::Pending));
        let (second, reply_second) =
            tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await.unwrap().unwrap();
        assert!(second.uri().path().ends_with("/hagroups/h/status"), "h goes ahead; g's second write waits");
        let nothing = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
        assert!(nothing.is_err(), "no second write of g while the first is in flight");
        let object =
            br#"{"apiVersion":"hapair.dev/v1alpha1","kind":"HaGroup","metadata":{"name":"g"},"spec":{"nodes":[]}}"#;
        let ok = || Response::builder().body(Body::from(object.to_vec())).unwrap();
        reply_first.send_response(ok());
        reply_second.send_response(ok());
        let (third, reply_third) =
            tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await.unwrap().unwrap();
        assert!(third.uri().path().ends_with("/hagroups/g/status"));
        let body: serde_json::Value =
            serde_json::from_slice(&third.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["status"]["phase"], serde_json::json!("Healthy"));
        reply_third.send_response(ok());
        assert_eq!(writer.flush(Duration::from_secs(5)).await, 0);
    }
}
