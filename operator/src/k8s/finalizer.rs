//! The operator's finalizer on HaGroups and ReplicatedVolumes, shared by the reconcilers
//! that add it and by the two paths that release it: the group reconciler once nothing of
//! the group runs on any node, and the status writer once the nodes confirm the cleanup.
//!
//! Every change is a JSON patch that first tests the list as it was read, so a concurrent
//! edit makes the patch fail (and the reconcile retry) instead of being overwritten.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The finalizer the operator puts on HaGroups (until their nodes cleaned up) and
/// ReplicatedVolumes (until no group uses them).
pub const FINALIZER: &str = "hapair.dev/cleanup";

pub(super) fn json_patch(operations: serde_json::Value) -> Result<Patch<()>, kube::Error> {
    let patch: json_patch::Patch = serde_json::from_value(operations).map_err(kube::Error::SerdeError)?;
    Ok(Patch::Json(patch))
}

pub fn has_finalizer(meta: &ObjectMeta, finalizer: &str) -> bool {
    meta.finalizers.iter().flatten().any(|f| f == finalizer)
}

/// Adds `finalizer` to `object`. The JSON patch first tests the finalizer list as read, so
/// a concurrent change to it fails the patch (and the reconcile is retried) instead of
/// being overwritten; the API server does not deduplicate finalizers.
pub async fn add_finalizer<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let operations = match &object.meta().finalizers {
        None => serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]},
        ]),
        Some(current) => serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer},
        ]),
    };
    api.patch(&name, &PatchParams::default(), &json_patch(operations)?).await
}

/// Adds the operator's finalizer to an object the cache shows without it. The cache may lag
/// behind the operator's own earlier patch (a watch event from before it arrives after
/// it): when the patch's test fails, the object is read afresh, and if it already carries
/// the finalizer there is nothing to do. Returns whether a patch was written.
pub async fn ensure_finalizer<K>(api: &Api<K>, object: &K) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    match add_finalizer(api, object, FINALIZER).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 422 => {
            let name = object.meta().name.clone().unwrap_or_default();
            let fresh = api.get(&name).await?;
            if has_finalizer(fresh.meta(), FINALIZER) {
                Ok(false)
            } else {
                add_finalizer(api, &fresh, FINALIZER).await.map(|_| true)
            }
        }
        Err(e) => Err(e),
    }
}

/// Removes `finalizer` from `object` by position, testing first that the position still
/// holds it. Returns `Ok(None)` when the object does not carry it.
pub async fn remove_finalizer<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<Option<K>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let Some(index) = object.meta().finalizers.iter().flatten().position(|f| f == finalizer) else {
        return Ok(None);
    };
    let name = object.meta().name.clone().unwrap_or_default();
    let path = format!("/metadata/finalizers/{index}");
    let operations = serde_json::json!([
        {"op": "test", "path": path, "value": finalizer},
        {"op": "remove", "path": path},
    ]);
    api.patch(&name, &PatchParams::default(), &json_patch(operations)?).await.map(Some)
}
