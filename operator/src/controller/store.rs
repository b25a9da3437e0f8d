//! What reconcile reads and writes outside itself, as a trait: the standalone controller
//! keeps it in a state directory ([`crate::standalone::file_store::FileStore`]); the Kubernetes operator
//! keeps it in the API server ([`crate::k8s::store::KubeStore`]: objects, status
//! subresources, Events, state Secrets).
//!
//! Reconcile = dereference ([`Store::snapshot`]) → validate and build (pure) → publish
//! ([`crate::controller::publish::Publisher`]) → write status ([`Store::write_group_status`]). Nothing
//! else in the reconcile path touches a client.

use std::collections::BTreeMap;
use std::future::Future;

use hapair_crds::nodeapi::GroupKey;
use hapair_crds::{HaGroupStatus, ReplicatedVolumeStatus};
use serde::{Deserialize, Serialize};

use crate::desired::catalog::{Catalog, CatalogError};
use crate::desired::state::ControllerState;
use crate::status::events::{EventRing, GroupEvent};
use crate::support::atomic_file::FileError;

/// Why the store could not be read or written. Reconcile keeps the last good state in
/// force and retries; none of these is about a bad manifest (those are in the snapshot).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Backend(String),
}

/// Every status the controller last wrote; reloaded at start so condition transition
/// times and epochs continue instead of restarting.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Statuses {
    #[serde(default)]
    pub groups: BTreeMap<GroupKey, HaGroupStatus>,
    #[serde(default)]
    pub volumes: BTreeMap<GroupKey, ReplicatedVolumeStatus>,
}

impl Statuses {
    /// Sets (or with `None` removes) a group's status; whether anything changed.
    pub fn set_group(&mut self, key: &GroupKey, status: Option<&HaGroupStatus>) -> bool {
        replace(&mut self.groups, key, status)
    }

    /// Sets (or with `None` removes) a volume's status; whether anything changed.
    pub fn set_volume(&mut self, key: &GroupKey, status: Option<&ReplicatedVolumeStatus>) -> bool {
        replace(&mut self.volumes, key, status)
    }
}

fn replace<T: Clone + PartialEq>(map: &mut BTreeMap<GroupKey, T>, key: &GroupKey, value: Option<&T>) -> bool {
    match value {
        Some(v) => map.insert(key.clone(), v.clone()).as_ref() != Some(v),
        None => map.remove(key).is_some(),
    }
}

/// The controller's view of the outside world. Methods take `&self`: implementations do
/// their own locking so the node API can serve while a reconcile runs.
pub trait Store: Send + Sync + 'static {
    /// Dereference: every HaGroup, ReplicatedVolume and Secret in scope, validated, with
    /// refused objects as errors naming file/object/field. `metadata.generation` is set.
    fn snapshot(&self) -> impl Future<Output = Result<Catalog, StoreError>> + Send;

    fn load_state(&self) -> impl Future<Output = Result<ControllerState, StoreError>> + Send;

    /// Persists the controller's state durably before returning: bundles built from it may
    /// be served as soon as this returns.
    fn save_state(&self, state: &ControllerState) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn load_statuses(&self) -> impl Future<Output = Result<Statuses, StoreError>> + Send;

    /// Writes (or with `None` removes) a group's status. May be buffered until [`Store::flush`].
    /// `None` means the group is gone: its recorded events go with it.
    fn write_group_status(
        &self,
        key: &GroupKey,
        status: Option<&HaGroupStatus>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn write_volume_status(
        &self,
        key: &GroupKey,
        status: Option<&ReplicatedVolumeStatus>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records one event of a group. May be buffered until [`Store::flush`].
    fn record_event(&self, key: &GroupKey, event: &GroupEvent) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records one event about a ReplicatedVolume (its spec refused). Only the Kubernetes
    /// store has a place for those; elsewhere the log line the controller writes is it.
    fn record_volume_event(
        &self,
        key: &GroupKey,
        event: &GroupEvent,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (key, event);
        async { Ok(()) }
    }

    /// Events recorded before a restart, for `describe`.
    fn load_events(&self) -> impl Future<Output = Result<EventRing, StoreError>> + Send;

    /// Makes buffered status and event writes durable.
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every node of a deleted group confirmed its cleanup: nothing of the group runs any
    /// more. The Kubernetes store lets the object go (removes its finalizer) here; a
    /// directory of manifests has nothing left to release.
    fn group_released(&self, key: &GroupKey) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = key;
        async { Ok(()) }
    }
}
