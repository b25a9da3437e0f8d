//! [`KubeStore`]: the [`Store`] of Kubernetes mode. The reconcile core is the same as in
//! standalone mode; only where things are read from and written to differs.
//!
//! - **Dereference** ([`Store::snapshot`]) reads the operator's caches of HaGroups and
//!   ReplicatedVolumes (kept by kube-runtime reflectors, so no request per reconcile) and
//!   the heartbeat-key Secrets the groups reference. Secrets are watched by metadata only,
//!   and only in the namespaces the operator is given ([`SecretCaches`]; its RBAC grants
//!   no more): a referenced Secret's data is fetched when its `resourceVersion` changes,
//!   so the operator never holds every Secret of the cluster in memory. A Secret it may not
//!   read refuses its group with a status error naming it, like a missing one.
//! - **State** ([`Store::save_state`]) goes to the sharded state Secrets in the operator's
//!   namespace ([`crate::k8s::state_secrets`]).
//! - **Statuses** are applied with server-side apply under the field manager
//!   `hapair-operator` by the [`Writer`], and only when something besides telemetry
//!   changed: report times, uptimes, CPU and memory use and heartbeat loss ride along with
//!   the next real change instead of causing a write per agent report.
//! - **Events** become Kubernetes Events on the group, or on a refused volume (kube's
//!   `Recorder`).
//! - **Release** of a deleted group removes its finalizer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hapair_crds::condition::{Condition, ConditionStatus, set_condition, types};
use hapair_crds::nodeapi::GroupKey;
use hapair_crds::volume::SyncProgress;
use hapair_crds::{HaGroup, HaGroupStatus, ReplicatedVolume, ReplicatedVolumeStatus};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use kube::{Api, Client, ResourceExt};

use crate::controller::metrics::Metrics;
use crate::controller::store::{Statuses, Store, StoreError};
use crate::desired::catalog::Catalog;
use crate::desired::state::ControllerState;
use crate::k8s::state_secrets::StateSecrets;
use crate::k8s::writer::Writer;
use crate::status::events::{EventRing, GroupEvent};

/// How long [`Store::flush`] waits for queued writes.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The operator's caches, filled by the term's reflectors.
#[derive(Clone, Debug)]
pub struct Caches {
    pub groups: Cache<HaGroup>,
    pub volumes: Cache<ReplicatedVolume>,
    pub secrets: SecretCaches,
    /// Set once every reflector has listed everything. Not kube's `wait_until_ready`: its
    /// future wakes only the latest of several waiters, and the controllers wait on it too.
    pub synced: Arc<AtomicBool>,
}

impl Caches {
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
}

/// Secret metadata, one cache per namespace the operator reads Secrets in: its own and those
/// it is told (`--secret-namespace`). Never all namespaces: reading every Secret of the
/// cluster would need a ClusterRole on Secrets, which the chart does not grant.
#[derive(Clone, Debug, Default)]
pub struct SecretCaches {
    namespaces: BTreeMap<String, NamespaceSecrets>,
}

/// The Secret metadata of one namespace.
#[derive(Clone, Debug)]
pub struct NamespaceSecrets {
    pub cache: Cache<PartialObjectMeta<Secret>>,
    /// The API server's refusal to list Secrets here, while it refuses (missing RBAC).
    pub denied: Arc<Mutex<Option<String>>>,
}

/// What the metadata caches know of one Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretMeta {
    /// It exists, at this `resourceVersion`.
    Present(String),
    Absent,
    /// The operator cannot see it; why, for the group's status.
    Unreadable(String),
}

impl SecretCaches {
    pub fn insert(&mut self, namespace: &str, secrets: NamespaceSecrets) {
        self.namespaces.insert(namespace.to_string(), secrets);
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }

    pub fn lookup(&self, key: &GroupKey) -> SecretMeta {
        let Some(namespace) = self.namespaces.get(&key.namespace) else {
            let watched: Vec<&str> = self.namespaces().collect();
            return SecretMeta::Unreadable(format!(
                "the operator reads Secrets only in namespaces {watched:?}; add {:?} to the chart's \
                 rbac.secretNamespaces (hapair-operator run --secret-namespace)",
                key.namespace
            ));
        };
        if let Some(why) = namespace.denied.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return SecretMeta::Unreadable(format!(
                "the operator may not list Secrets in namespace {:?} ({why}); grant it with the chart's \
                 rbac.secretNamespaces",
                key.namespace
            ));
        }
        match namespace.cache.get(&ObjectRef::new(&key.name).within(&key.namespace)) {
            Some(meta) => SecretMeta::Present(meta.resource_version().unwrap_or_default()),
            None => SecretMeta::Absent,
        }
    }
}

/// A referenced Secret, as [`KubeStore`] found it.
enum Lookup {
    Found(Box<Secret>),
    Missing,
    Unreadable(String),
}

fn key_of(meta: &ObjectMeta) -> GroupKey {
    GroupKey::new(
        meta.namespace.as_deref().unwrap_or(hapair_crds::manifest::DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// Only what the core needs of an object's metadata: anything that changes without the
/// spec changing (resourceVersion, managed fields, annotations, finalizers) would make the
/// controller's remembered last good config look different at every status write.
fn core_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        generation: meta.generation,
        ..ObjectMeta::default()
    }
}

/// A group status without the fields that change with every agent report. Two statuses
/// that agree here are not worth a write.
pub fn significant_group(status: &HaGroupStatus) -> HaGroupStatus {
    let mut s = status.clone();
    for node in &mut s.nodes {
        node.last_heartbeat = None;
        node.last_report = None;
        node.uptime_seconds = 0;
        if let Some(hardware) = &mut node.hardware {
            hardware.cpu_percent = 0;
            hardware.memory_percent = 0;
        }
        for link in &mut node.links {
            link.heartbeat_loss_percent = None;
        }
    }
    s
}

/// A volume status with resync progress rounded to whole percent and rates left out.
pub fn significant_volume(status: &ReplicatedVolumeStatus) -> ReplicatedVolumeStatus {
    let mut s = status.clone();
    for node in &mut s.nodes {
        node.out_of_sync_bytes = u64::from(node.out_of_sync_bytes > 0);
        node.sync = node.sync.as_ref().map(|p| SyncProgress {
            done_bytes: p.percent(),
            total_bytes: 100,
            bytes_per_second: 0,
            eta_seconds: None,
        });
    }
    s
}

#[derive(Debug, Default)]
struct Written {
    groups: BTreeMap<GroupKey, HaGroupStatus>,
    /// The full last status of each volume, to re-apply it with a changed condition.
    volumes: BTreeMap<GroupKey, ReplicatedVolumeStatus>,
    /// Volumes whose deletion waits, and why.
    blocked: BTreeMap<GroupKey, DeletionHold>,
    /// Referenced Secrets' data, by `resourceVersion`.
    secrets: BTreeMap<GroupKey, (String, Secret)>,
}

/// The store of Kubernetes mode.
pub struct KubeStore {
    client: Client,
    caches: Caches,
    state: StateSecrets,
    writer: Writer,
    written: Mutex<Written>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore").field("state", &self.state).finish_non_exhaustive()
    }
}

impl KubeStore {
    pub fn new(client: Client, caches: Caches, state: StateSecrets, writer: Writer, metrics: Arc<Metrics>) -> Self {
        KubeStore { client, caches, state, writer, written: Mutex::new(Written::default()), metrics }
    }

    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    fn lock(&self) -> MutexGuard<'_, Written> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The referenced Secret `key`, from the data cache while its `resourceVersion` is the
    /// one the metadata watch last saw, else read afresh (a namespaced `get` by name).
    async fn secret(&self, key: &GroupKey) -> Result<Lookup, StoreError> {
        let version = match self.caches.secrets.lookup(key) {
            SecretMeta::Present(version) => version,
            SecretMeta::Absent => {
                self.lock().secrets.remove(key);
                return Ok(Lookup::Missing);
            }
            SecretMeta::Unreadable(why) => {
                self.lock().secrets.remove(key);
                return Ok(Lookup::Unreadable(why));
            }
        };
        if let Some((cached, secret)) = self.lock().secrets.get(key)
            && *cached == version
        {
            return Ok(Lookup::Found(Box::new(secret.clone())));
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &key.namespace);
        let fetched = match api.get_opt(&key.name).await {
            Ok(fetched) => fetched,
            // Missing RBAC is this group's problem, reported on it; the others reconcile.
            Err(kube::Error::Api(status)) if status.is_forbidden() => {
                self.lock().secrets.remove(key);
                return Ok(Lookup::Unreadable(format!(
                    "the operator may not read it ({status}); grant it with the chart's rbac.secretNamespaces"
                )));
            }
            Err(e) => return Err(StoreError::Backend(format!("reading Secret {key}: {e}"))),
        };
        match fetched {
            Some(mut secret) => {
                secret.metadata = core_meta(&secret.metadata);
                self.lock().secrets.insert(key.clone(), (version, secret.clone()));
                Ok(Lookup::Found(Box::new(secret)))
            }
            None => {
                self.lock().secrets.remove(key);
                Ok(Lookup::Missing)
            }
        }
    }

    /// Forgets a volume about to disappear (its finalizer is being removed): nothing more is
    /// written about it.
    pub fn forget_volume(&self, key: &GroupKey) {
        let mut written = self.lock();
        written.blocked.remove(key);
        written.volumes.remove(key);
    }

    /// Marks a volume's deletion as waiting for `why` (or, with `None`, no longer waiting),
    /// and writes its status with the `DeletionBlocked` condition.
    pub fn block_volume_deletion(&self, key: &GroupKey, why: Option<DeletionHold>) {
        let status = {
            let mut written = self.lock();
            let changed = match &why {
                Some(hold) => written.blocked.insert(key.clone(), hold.clone()).as_ref() != Some(hold),
                None => written.blocked.remove(key).is_some(),
            };
            if !changed {
                return;
            }
            let previous = written.volumes.get(key).cloned().unwrap_or_default();
            with_blocked(previous, why.as_ref())
        };
        self.lock().volumes.insert(key.clone(), status.clone());
        self.writer.volume_status(key, status);
    }
}

/// Why a volume's deletion waits: the `DeletionBlocked` condition's reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletionHold {
    /// `InUse` (a group still uses it) or `Wiping` (its nodes are erasing the data).
    pub reason: &'static str,
    pub message: String,
}

/// `status` with the `DeletionBlocked` condition set (or cleared to False).
fn with_blocked(mut status: ReplicatedVolumeStatus, why: Option<&DeletionHold>) -> ReplicatedVolumeStatus {
    let now = crate::support::timestamp::format_millis(crate::support::timestamp::now_millis());
    let had = hapair_crds::condition::find(&status.conditions, types::DELETION_BLOCKED).is_some();
    let condition = match why {
        Some(hold) => Condition {
            type_: types::DELETION_BLOCKED.into(),
            status: ConditionStatus::True,
            reason: hold.reason.into(),
            message: hold.message.clone(),
            last_transition_time: now,
            observed_generation: status.observed_generation,
        },
        None if had => Condition {
            type_: types::DELETION_BLOCKED.into(),
            status: ConditionStatus::False,
            reason: "NotInUse".into(),
            message: "no group uses the volume".into(),
            last_transition_time: now,
            observed_generation: status.observed_generation,
        },
        None => return status,
    };
    set_condition(&mut status.conditions, condition);
    status
}

impl Store for KubeStore {
    async fn snapshot(&self) -> Result<Catalog, StoreError> {
        // Never reconcile a half-filled cache: groups missing from it would be deleted.
        if !self.caches.is_synced() {
            return Err(StoreError::Backend("the operator's caches are not filled yet".into()));
        }
        let groups: Vec<HaGroup> = self
            .caches
            .groups
            .state()
            .iter()
            // A group being deleted is out of the desired state: its nodes clean up.
            .filter(|g| g.metadata.deletion_timestamp.is_none())
            .map(|g| HaGroup { metadata: core_meta(&g.metadata), spec: g.spec.clone(), status: None })
            .collect();
        let volumes: Vec<ReplicatedVolume> = self
            .caches
            .volumes
            .state()
            .iter()
            // A volume being deleted stays while groups use it (its finalizer holds it); its
            // deletion mark tells the core when to carry out its deletionPolicy.
            .map(|v| {
                let mut metadata = core_meta(&v.metadata);
                metadata.deletion_timestamp.clone_from(&v.metadata.deletion_timestamp);
                ReplicatedVolume { metadata, spec: v.spec.clone(), status: None }
            })
            .collect();
        let mut referenced: Vec<GroupKey> = groups
            .iter()
            .filter_map(|g| {
                let reference = g.spec.heartbeat.key_secret_ref.as_ref()?;
                Some(GroupKey::new(key_of(&g.metadata).namespace, &reference.name))
            })
            .collect();
        referenced.sort();
        referenced.dedup();
        let mut secrets = Vec::with_capacity(referenced.len());
        let mut unreadable = BTreeMap::new();
        for key in &referenced {
            match self.secret(key).await? {
                Lookup::Found(secret) => secrets.push(*secret),
                Lookup::Missing => {}
                Lookup::Unreadable(why) => {
                    unreadable.insert(key.clone(), why);
                }
            }
        }
        let mut catalog = Catalog::from_objects(groups, volumes, secrets);
        catalog.unreadable_secrets = unreadable;
        Ok(catalog)
    }

    async fn load_state(&self) -> Result<ControllerState, StoreError> {
        self.state.load().await
    }

    async fn save_state(&self, state: &ControllerState) -> Result<(), StoreError> {
        self.state.save(state).await
    }

    async fn load_statuses(&self) -> Result<Statuses, StoreError> {
        let mut statuses = Statuses::default();
        let mut written = self.lock();
        for group in self.caches.groups.state() {
            if let Some(status) = &group.status {
                let key = key_of(&group.metadata);
                written.groups.insert(key.clone(), significant_group(status));
                statuses.groups.insert(key, status.clone());
            }
        }
        for volume in self.caches.volumes.state() {
            if let Some(status) = &volume.status {
                let key = key_of(&volume.metadata);
                written.volumes.insert(key.clone(), status.clone());
                statuses.volumes.insert(key, status.clone());
            }
        }
        Ok(statuses)
    }

    async fn write_group_status(&self, key: &GroupKey, status: Option<&HaGroupStatus>) -> Result<(), StoreError> {
        let Some(status) = status else {
            // The group is gone; there is no status left to write.
            self.lock().groups.remove(key);
            self.writer.forget_group(key);
            return Ok(());
        };
        let significant = significant_group(status);
        {
            let mut written = self.lock();
            if written.groups.get(key) == Some(&significant) {
                return Ok(());
            }
            written.groups.insert(key.clone(), significant);
        }
        self.writer.group_status(key, status.clone());
        Ok(())
    }

    async fn write_volume_status(
        &self,
        key: &GroupKey,
        status: Option<&ReplicatedVolumeStatus>,
    ) -> Result<(), StoreError> {
        let Some(status) = status else {
            self.lock().volumes.remove(key);
            return Ok(());
        };
        let status = {
            let mut written = self.lock();
            let blocked = written.blocked.get(key).cloned();
            let status = with_blocked(status.clone(), blocked.as_ref());
            if written.volumes.get(key).map(significant_volume) == Some(significant_volume(&status)) {
                return Ok(());
            }
            written.volumes.insert(key.clone(), status.clone());
            status
        };
        self.writer.volume_status(key, status);
        Ok(())
    }

    async fn record_event(&self, key: &GroupKey, event: &GroupEvent) -> Result<(), StoreError> {
        self.writer.event(key, event.clone());
        Ok(())
    }

    async fn record_volume_event(&self, key: &GroupKey, event: &GroupEvent) -> Result<(), StoreError> {
        self.writer.volume_event(key, event.clone());
        Ok(())
    }

    async fn load_events(&self) -> Result<EventRing, StoreError> {
        // Kubernetes keeps the Events; `kubectl hapair describe` reads them from there.
        Ok(EventRing::default())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        match self.writer.flush(FLUSH_WAIT).await {
            0 => Ok(()),
            pending => {
                self.metrics.error("status");
                Err(StoreError::Backend(format!("{pending} writes to the Kubernetes API are still pending")))
            }
        }
    }

    async fn group_released(&self, key: &GroupKey) -> Result<(), StoreError> {
        self.writer.release(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::hagroup::{Hardware, LinkStatus, NodeRole, NodeStatus};
    use hapair_crds::volume::{ConnectionState, DiskState, VolumeNodeStatus};

    #[test]
    fn telemetry_alone_is_not_a_change() {
        let node = |report: &str, uptime: u64, cpu: u32| NodeStatus {
            name: "a".into(),
            role: Some(NodeRole::Primary),
            last_report: Some(report.into()),
            last_heartbeat: Some(report.into()),
            uptime_seconds: uptime,
            hardware: Some(Hardware { cpus: 4, cpu_percent: cpu, ..Hardware::default() }),
            links: vec![LinkStatus {
                interface: "eth0".into(),
                up: true,
                heartbeat_loss_percent: Some(cpu),
                ..LinkStatus::default()
            }],
            ..NodeStatus::default()
        };
        let a = HaGroupStatus { epoch: 3, nodes: vec![node("t1", 10, 5)], ..HaGroupStatus::default() };
        let b = HaGroupStatus { epoch: 3, nodes: vec![node("t2", 20, 50)], ..HaGroupStatus::default() };
        assert_eq!(significant_group(&a), significant_group(&b));
        let mut c = b.clone();
        c.nodes[0].role = Some(NodeRole::Standby);
        assert_ne!(significant_group(&a), significant_group(&c));
    }

    #[test]
    fn resync_progress_counts_in_whole_percent() {
        let volume = |done: u64, rate: u64| ReplicatedVolumeStatus {
            sync_state: Some("Syncing 10%".into()),
            nodes: vec![VolumeNodeStatus {
                node: "b".into(),
                disk_state: DiskState::Inconsistent,
                role: None,
                connection: ConnectionState::SyncTarget,
                out_of_sync_bytes: 1000 - done,
                sync: Some(SyncProgress {
                    done_bytes: done,
                    total_bytes: 1000,
                    bytes_per_second: rate,
                    eta_seconds: Some(rate),
                }),
                last_verify: None,
                storage: None,
            }],
            ..ReplicatedVolumeStatus::default()
        };
        assert_eq!(significant_volume(&volume(101, 5)), significant_volume(&volume(109, 7)));
        assert_ne!(significant_volume(&volume(101, 5)), significant_volume(&volume(111, 5)));
    }

    #[test]
    fn a_blocked_deletion_is_a_condition_that_clears() {
        let hold = DeletionHold { reason: "InUse", message: "used by HaGroup ns/g".into() };
        let blocked = with_blocked(ReplicatedVolumeStatus::default(), Some(&hold));
        let condition = hapair_crds::condition::find(&blocked.conditions, types::DELETION_BLOCKED).cloned();
        assert_eq!(
            condition.map(|c| (c.status, c.message)),
            Some((ConditionStatus::True, "used by HaGroup ns/g".into()))
        );
        let cleared = with_blocked(blocked, None);
        let condition = hapair_crds::condition::find(&cleared.conditions, types::DELETION_BLOCKED).cloned();
        assert_eq!(condition.map(|c| c.status), Some(ConditionStatus::False));
        assert_eq!(with_blocked(ReplicatedVolumeStatus::default(), None), ReplicatedVolumeStatus::default());
    }
}
