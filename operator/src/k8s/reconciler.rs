//! The per-object reconcilers that kube-runtime's `Controller`s call for every HaGroup and
//! ReplicatedVolume: what is particular to one Kubernetes object (its finalizer, its
//! admin-action annotations, a blocked deletion) is handled here; everything else is the
//! shared core's job, reached through [`Controller::reconcile_coalesced`].
//!
//! Why not one core run per object: the core works on the whole desired state at once
//! (bundles are per node, and a node may run several groups; a Secret or a volume change
//! touches groups that did not change), exactly as in standalone mode. Coalescing lets a
//! thousand objects changing together cost a few full runs, and keeps one code path for
//! both modes. An object whose generation, deletion, finalizer and annotations are as they
//! were at its last reconcile (a status write echoing back) does not run the core at all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hapair_crds::nodeapi::{EventType, GroupKey};
use hapair_crds::{HaGroup, ReplicatedVolume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PatchParams;
use kube::runtime::controller::Action;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use crate::controller::metrics::Metrics;
use crate::controller::store::StoreError;
use crate::controller::{Controller, VolumeRetirement};
use crate::desired::resolve::referenced_volumes;
use crate::k8s::annotations::{self, AnnotatedAction};
use crate::k8s::finalizer::{FINALIZER, ensure_finalizer, has_finalizer, json_patch, remove_finalizer};
use crate::k8s::store::{DeletionHold, KubeStore};
use crate::support::timestamp::parse_millis;

/// Why one object's reconcile failed; kube-runtime retries it after [`error_policy`]'s delay.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the operator's term ended")]
    Stopped,
}

impl ReconcileError {
    /// The `category` label of the errors metric.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Kube { .. } => "kube",
            ReconcileError::Store(_) => "store",
            ReconcileError::Stopped => "stopped",
        }
    }
}

fn kube_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Kube { what, source }
}

/// What makes an object worth another look by the core; a change to anything else (its
/// status, mostly) is an echo of the operator's own writes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    generation: Option<i64>,
    deleting: bool,
    finalizers: Vec<String>,
    annotations: Vec<(String, String)>,
}

impl Fingerprint {
    fn of(meta: &ObjectMeta) -> Self {
        let annotations = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| annotations::ALL.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Fingerprint {
            generation: meta.generation,
            deleting: meta.deletion_timestamp.is_some(),
            finalizers: meta.finalizers.clone().unwrap_or_default(),
            annotations,
        }
    }
}

/// Shared by every reconcile of one term.
pub struct Context {
    client: Client,
    core: watch::Receiver<Option<Arc<Controller<KubeStore>>>>,
    metrics: Arc<Metrics>,
    seen: Mutex<BTreeMap<(&'static str, GroupKey), Fingerprint>>,
    /// How often an object with a pending admin action is looked at again.
    pub action_poll: Duration,
    /// How often a volume whose deletion is blocked is looked at again.
    pub blocked_poll: Duration,
}

impl Context {
    /// `core` becomes `Some` once the term's caches are filled and the core has started;
    /// reconciles wait for it.
    pub fn new(
        client: Client,
        core: watch::Receiver<Option<Arc<Controller<KubeStore>>>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Context {
            client,
            core,
            metrics,
            seen: Mutex::new(BTreeMap::new()),
            action_poll: Duration::from_secs(1),
            blocked_poll: Duration::from_secs(10),
        }
    }

    async fn core(&self) -> Result<Arc<Controller<KubeStore>>, ReconcileError> {
        let mut rx = self.core.clone();
        let ready = rx.wait_for(Option::is_some).await.map_err(|_| ReconcileError::Stopped)?;
        ready.clone().ok_or(ReconcileError::Stopped)
    }

    fn unchanged(&self, kind: &'static str, key: &GroupKey, fingerprint: &Fingerprint) -> bool {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(&(kind, key.clone())) == Some(fingerprint)
    }

    fn remember(&self, kind: &'static str, key: &GroupKey, fingerprint: Option<Fingerprint>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match fingerprint {
            Some(f) => seen.insert((kind, key.clone()), f),
            None => seen.remove(&(kind, key.clone())),
        };
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("action_poll", &self.action_poll).finish_non_exhaustive()
    }
}

fn key_of(meta: &ObjectMeta) -> GroupKey {
    GroupKey::new(
        meta.namespace.as_deref().unwrap_or(hapair_crds::manifest::DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// JSON-pointer form of an annotation key (`/` is escaped as `~1`).
fn annotation_path(annotation: &str) -> String {
    format!("/metadata/annotations/{}", annotation.replace('~', "~0").replace('/', "~1"))
}

/// Removes a handled admin-action annotation, but only if it still holds the request that
/// was handled: a newer request written meanwhile stays.
async fn remove_annotation(api: &Api<HaGroup>, name: &str, annotation: &str, value: &str) -> Result<(), kube::Error> {
    let path = annotation_path(annotation);
    let operations = serde_json::json!([
        {"op": "test", "path": path, "value": value},
        {"op": "remove", "path": path},
    ]);
    match api.patch(name, &PatchParams::default(), &json_patch(operations)?).await {
        Ok(_) => Ok(()),
        // The test failed: someone replaced the request; it will be handled on its own.
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reconciles one HaGroup.
pub async fn reconcile_group(group: Arc<HaGroup>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let key = key_of(&group.metadata);
    let span = info_span!("reconcile", group = %key, generation = group.metadata.generation.unwrap_or(0));
    reconcile_group_inner(&group, &ctx, &key).instrument(span).await
}

async fn reconcile_group_inner(group: &HaGroup, ctx: &Context, key: &GroupKey) -> Result<Action, ReconcileError> {
    let core = ctx.core().await?;
    let api: Api<HaGroup> = Api::namespaced(ctx.client.clone(), &key.namespace);
    if group.metadata.deletion_timestamp.is_some() {
        if !has_finalizer(&group.metadata, FINALIZER) {
            ctx.remember("HaGroup", key, None);
            return Ok(Action::await_change());
        }
        // The snapshot leaves a deleting group out: the core starts its cleanup on the nodes
        // and releases it (removes the finalizer) once both confirmed.
        core.reconcile_coalesced().await?;
        if !core.cleanup_pending(key).await {
            remove_finalizer(&api, group, FINALIZER).await.map_err(kube_error("removing the finalizer"))?;
            ctx.metrics.kube_write("finalizer");
            info!("nothing of the group runs on any node; finalizer removed");
        }
        return Ok(Action::await_change());
    }
    let mut fingerprint = Fingerprint::of(&group.metadata);
    if !has_finalizer(&group.metadata, FINALIZER) {
        if ensure_finalizer(&api, group).await.map_err(kube_error("adding the finalizer"))? {
            ctx.metrics.kube_write("finalizer");
        }
        fingerprint.finalizers.push(FINALIZER.to_string());
    }
    if !ctx.unchanged("HaGroup", key, &fingerprint) {
        core.reconcile_coalesced().await?;
    }
    let mut pending = false;
    let found = group.metadata.annotations.clone().unwrap_or_default();
    for parsed in annotations::actions_in(&found) {
        let done = match parsed {
            Ok(action) => handle_action(&core, group, key, &action).await?,
            Err(error) => {
                warn!("{error}");
                core.note_event(
                    key,
                    EventType::Warning,
                    "InvalidAnnotation",
                    format!("{error}; the annotation is removed"),
                )
                .await;
                let value = found.get(&error.annotation).cloned().unwrap_or_default();
                remove_annotation(&api, &key.name, &error.annotation, &value)
                    .await
                    .map_err(kube_error("removing an invalid annotation"))?;
                ctx.metrics.kube_write("annotation");
                continue;
            }
        };
        match done {
            Some(action) => {
                remove_annotation(&api, &key.name, action.annotation, &action.value)
                    .await
                    .map_err(kube_error("removing a handled annotation"))?;
                ctx.metrics.kube_write("annotation");
                info!(action = %action.id, "admin action finished; annotation {} removed", action.annotation);
            }
            None => pending = true,
        }
    }
    ctx.remember("HaGroup", key, Some(fingerprint));
    Ok(if pending { Action::requeue(ctx.action_poll) } else { Action::await_change() })
}

/// Hands an annotated action to the core (idempotent by id). Returns the action once its
/// final outcome is in the group's status as the API server has it, so the annotation can
/// go; `None` while it is still running or its outcome not yet written.
async fn handle_action(
    core: &Controller<KubeStore>,
    group: &HaGroup,
    key: &GroupKey,
    action: &AnnotatedAction,
) -> Result<Option<AnnotatedAction>, ReconcileError> {
    let view = match core.submit_action(key, action.request(), "the HaGroup annotation").await {
        Ok(view) => view,
        Err(refusal) => core.reject_action(key, &action.id, action.kind.clone(), refusal.to_string()).await?,
    };
    if !view.outcome.is_final() {
        return Ok(None);
    }
    let last = group.status.as_ref().and_then(|s| s.last_action.as_ref());
    let recorded = last.is_some_and(|a| a.id == action.id && a.outcome.is_final());
    // Another action's outcome overwrote this one's: nobody can see it any more, so there
    // is no point waiting.
    let finished = view.finished.as_deref().and_then(parse_millis);
    let superseded = last.is_some_and(|a| {
        a.id != action.id && finished.zip(parse_millis(&a.time)).is_some_and(|(mine, theirs)| theirs >= mine)
    });
    Ok((recorded || superseded).then(|| action.clone()))
}

/// Reconciles one ReplicatedVolume.
pub async fn reconcile_volume(volume: Arc<ReplicatedVolume>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let key = key_of(&volume.metadata);
    let span = info_span!("reconcile", volume = %key, generation = volume.metadata.generation.unwrap_or(0));
    reconcile_volume_inner(&volume, &ctx, &key).instrument(span).await
}

async fn reconcile_volume_inner(
    volume: &ReplicatedVolume,
    ctx: &Context,
    key: &GroupKey,
) -> Result<Action, ReconcileError> {
    let core = ctx.core().await?;
    let api: Api<ReplicatedVolume> = Api::namespaced(ctx.client.clone(), &key.namespace);
    if volume.metadata.deletion_timestamp.is_some() {
        if !has_finalizer(&volume.metadata, FINALIZER) {
            ctx.remember("ReplicatedVolume", key, None);
            return Ok(Action::await_change());
        }
        core.reconcile_coalesced().await?;
        let users = volume_users(&core, key).await;
        if !users.is_empty() {
            let message = format!(
                "deletion waits: used by {}; remove it from their flow and monitors (or delete them) first",
                users.join(", ")
            );
            core.store().block_volume_deletion(key, Some(DeletionHold { reason: "InUse", message }));
            return Ok(Action::requeue(ctx.blocked_poll));
        }
        match core.volume_retirement(key).await {
            VolumeRetirement::Gone => {
                core.store().forget_volume(key);
                remove_finalizer(&api, volume, FINALIZER).await.map_err(kube_error("removing the finalizer"))?;
                ctx.metrics.kube_write("finalizer");
                info!(policy = ?volume.spec.deletion_policy, "no group uses the volume and nothing is left to do on its nodes; finalizer removed");
                return Ok(Action::await_change());
            }
            VolumeRetirement::Wiping { waiting_on } => {
                let message = format!(
                    "deletion waits: erasing the replicas (deletionPolicy: Wipe); waiting for {}",
                    waiting_on.join("; ")
                );
                core.store().block_volume_deletion(key, Some(DeletionHold { reason: "Wiping", message }));
            }
            VolumeRetirement::Known => {}
        }
        return Ok(Action::requeue(ctx.blocked_poll));
    }
    let mut fingerprint = Fingerprint::of(&volume.metadata);
    if !has_finalizer(&volume.metadata, FINALIZER) {
        if ensure_finalizer(&api, volume).await.map_err(kube_error("adding the finalizer"))? {
            ctx.metrics.kube_write("finalizer");
        }
        fingerprint.finalizers.push(FINALIZER.to_string());
    }
    if !ctx.unchanged("ReplicatedVolume", key, &fingerprint) {
        core.reconcile_coalesced().await?;
    }
    ctx.remember("ReplicatedVolume", key, Some(fingerprint));
    Ok(Action::await_change())
}

/// Who keeps a volume from going: groups whose running (or cleaning-up) config delivers
/// it, and groups whose spec names it, valid or not.
async fn volume_users(core: &Controller<KubeStore>, key: &GroupKey) -> Vec<String> {
    let mut users: Vec<GroupKey> = core.volume_users(key).await;
    for group in core.store().caches().groups.state() {
        let group_key = key_of(&group.metadata);
        if group_key.namespace == key.namespace
            && group.metadata.deletion_timestamp.is_none()
            && referenced_volumes(&group).contains(&key.name)
        {
            users.push(group_key);
        }
    }
    users.sort();
    users.dedup();
    users.into_iter().map(|g| format!("HaGroup {g}")).collect()
}

/// Retries a failed reconcile after a pause, counting the error by category. An invalid
/// spec is not an error (it is reported in the status and waits for a change), so this
/// only sees API and store failures.
pub fn error_policy<K>(_object: Arc<K>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.category());
    warn!(error = %error, "reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}
