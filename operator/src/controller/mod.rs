//! The controller loop around the pure core: it takes snapshots from a [`Store`], runs
//! [`reconcile`], publishes bundles, folds the agents' reports and admin actions in, and
//! writes statuses and events back.
//!
//! One lock serializes every change, so a report, an action and a manifest change are each
//! applied whole. Long-polls never take it: they wait on the [`BundleBoard`].
//!
//! In: manifest snapshots from the [`store::Store`], node reports (`reports`), admin
//! actions (`admin_actions`). Out: bundles on the board ([`publish`]), statuses and events
//! through the store (`statuses`), the `overview` the CLI shows ([`views`]), and the
//! [`metrics`]. Reconciling stays in this file, since every path ends in it.

mod admin_actions;
pub mod metrics;
mod overview;
pub mod publish;
mod reports;
mod statuses;
pub mod store;
pub mod views;

use admin_actions::last_action;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hapair_crds::hagroup::ActionRecord;
use hapair_crds::manifest::ManifestError;
use hapair_crds::nodeapi::{
    AdminActionKind, DesiredConfig, EventType, GroupKey, LeaseRequest, NodeReport, WipeOutcome,
};
use hapair_crds::{HaGroupStatus, ReplicatedVolumeStatus};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::sync::Mutex;
use tracing::{info, info_span, warn};

use crate::controller::metrics::Metrics;
use crate::controller::publish::{BundleBoard, Poll, Publisher};
use crate::controller::store::{Statuses, Store, StoreError};
use crate::controller::views::{
    ActionRequest, ActionView, GroupView, GroupsOverview, NodeActionResult, NodeDetail, VolumeView,
};
use crate::desired::actions::{self, Refusal, Target};
use crate::desired::catalog::Catalog;
use crate::desired::reconcile::{Reconciled, note_cleaned_up, reconcile};
use crate::desired::resolve::group_named_by;
use crate::desired::retire::{Retirement, note_wipe_answer};
use crate::desired::state::{ActionEntry, ControllerState};
use crate::status::events::{EventRing, GroupEvent};
use crate::status::group::{self, GroupInputs, Observation};
use crate::status::usage::UsageHistory;
use crate::status::{transitions, volume};
use crate::support::timestamp::{UnixMillis, format_millis};
use crate::witness::lease::{LeaseParams, LeaseRefusal, admit};

/// Tunables of the controller loop.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A node whose last report is older than this reads as health Unknown.
    pub stale_after: Duration,
    /// An admin action without a final outcome after this is declared failed.
    pub action_timeout: Duration,
    /// For this long after start, a group none of whose nodes has reported yet keeps the
    /// status it had: the agents have not had a chance to reach this controller, and
    /// rewriting every group as Pending after each restart (or operator failover) would be
    /// both false and a burst of writes.
    pub startup_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stale_after: group::DEFAULT_STALE_AFTER,
            action_timeout: actions::DEFAULT_ACTION_TIMEOUT,
            startup_grace: group::DEFAULT_STALE_AFTER,
        }
    }
}

/// Where a deleted volume stands, as far as its nodes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeRetirement {
    /// Still remembered as a live volume: not retired (yet).
    Known,
    /// Its replicas are being erased; the nodes that have not answered, with their latest
    /// word.
    Wiping { waiting_on: Vec<String> },
    /// Nothing of it is left to do on any node.
    Gone,
}

/// Why a node's report was refused; nothing of it was applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefusal {
    #[error("report is for node {found:?} but was posted for {path:?}")]
    NodeMismatch { path: String, found: String },
    #[error("node {node:?} is not a node of HaGroup {group}")]
    NotAMember { node: String, group: String },
}

struct Core {
    state: ControllerState,
    /// Changed outside a reconcile (a node's cleanup confirmation, an action's results, a
    /// new action) and not saved yet: the next reconcile saves it even if it changes
    /// nothing itself. A flag rather than a copy of the last saved state, which would double
    /// the largest thing the controller holds.
    unsaved: bool,
    catalog: Catalog,
    reconciled: Reconciled,
    reports: BTreeMap<String, (NodeReport, UnixMillis)>,
    /// The node-API version each node spoke in its latest report.
    node_api: BTreeMap<String, u8>,
    statuses: Statuses,
    events: EventRing,
    /// Each node's CPU and memory use over the last hour, for the console.
    usage: UsageHistory,
    /// Manifest errors already logged, so each is reported once, not every second.
    known_errors: BTreeSet<String>,
    rng: StdRng,
    started: UnixMillis,
}

/// Bookkeeping of coalesced reconciles: requests are numbered, and a run covers every
/// request numbered before it read the desired state.
#[derive(Debug, Default)]
struct Runs {
    completed: u64,
    last_error: Option<String>,
}

/// The running controller.
pub struct Controller<S: Store> {
    store: S,
    board: BundleBoard,
    metrics: Arc<Metrics>,
    settings: Settings,
    core: Mutex<Core>,
    requested: AtomicU64,
    runs: Mutex<Runs>,
}

impl<S: Store> std::fmt::Debug for Controller<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// A catalog that refuses nothing new but names every file the last good configs came
/// from as unreadable: reconciling it keeps every group running as it was.
fn hold_everything(state: &ControllerState, why: &str) -> Catalog {
    let files: BTreeSet<&str> = state.last_good.values().map(|s| s.origin.file.as_str()).collect();
    Catalog {
        errors: files
            .into_iter()
            .map(|file| ManifestError {
                file: file.to_string(),
                index: 0,
                object: None,
                field: None,
                message: why.to_string(),
            })
            .collect(),
        ..Catalog::default()
    }
}

impl<S: Store> Controller<S> {
    /// Loads what the store remembers and runs a first reconcile. When the desired state
    /// cannot be read, the last good configs are served until it can.
    pub async fn start(store: S, settings: Settings, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let state = store.load_state().await?;
        let statuses = store.load_statuses().await?;
        let events = store.load_events().await?;
        let catalog = hold_everything(&state, "desired state not read yet");
        let controller = Controller {
            store,
            board: BundleBoard::default(),
            metrics,
            settings,
            core: Mutex::new(Core {
                unsaved: false,
                state,
                catalog,
                reconciled: Reconciled::default(),
                reports: BTreeMap::new(),
                statuses,
                events,
                usage: UsageHistory::default(),
                known_errors: BTreeSet::new(),
                node_api: BTreeMap::new(),
                rng: StdRng::from_rng(&mut rand::rng()),
                started: crate::support::timestamp::now_millis(),
            }),
            requested: AtomicU64::new(0),
            runs: Mutex::new(Runs::default()),
        };
        if let Err(e) = controller.reconcile().await {
            warn!(error = %e, "cannot read the desired state; serving the last good configs");
            let mut core = controller.core.lock().await;
            let catalog = hold_everything(&core.state, &format!("desired state unreadable: {e}"));
            controller.apply(&mut core, catalog).await?;
        }
        Ok(controller)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Reads the desired state and applies it. On a store error nothing changes.
    pub async fn reconcile(&self) -> Result<(), StoreError> {
        let catalog = match self.store.snapshot().await {
            Ok(c) => c,
            Err(e) => {
                self.metrics.error("store");
                return Err(e);
            }
        };
        let mut core = self.core.lock().await;
        self.apply(&mut core, catalog).await
    }

    /// Like [`Controller::reconcile`], for many callers at once: a caller returns after a
    /// reconcile that read the desired state after it called, but concurrent callers share
    /// one such run. The Kubernetes operator calls this from every object's reconcile, so a
    /// burst of a thousand changed objects costs a few full reconciles, not a thousand.
    pub async fn reconcile_coalesced(&self) -> Result<(), StoreError> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut runs = self.runs.lock().await;
        if runs.completed >= ticket {
            return match &runs.last_error {
                None => Ok(()),
                Some(e) => Err(StoreError::Backend(e.clone())),
            };
        }
        let covers = self.requested.load(Ordering::SeqCst);
        let result = self.reconcile().await;
        runs.completed = covers;
        runs.last_error = result.as_ref().err().map(|e| e.to_string());
        result
    }

    /// Re-evaluates time-dependent state (stale reports, action timeouts) without reading
    /// the desired state, and makes buffered writes durable.
    pub async fn tick(&self) -> Result<(), StoreError> {
        {
            let mut core = self.core.lock().await;
            let catalog = core.catalog.clone();
            self.apply(&mut core, catalog).await?;
        }
        self.store.flush().await
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }

    async fn apply(&self, core: &mut Core, catalog: Catalog) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.apply_inner(core, catalog).await;
        self.metrics.reconcile_duration(started.elapsed());
        result
    }

    async fn apply_inner(&self, core: &mut Core, catalog: Catalog) -> Result<(), StoreError> {
        let now = crate::support::timestamp::now_millis();
        let before = core.state.clone();
        let mut events: Vec<(GroupKey, GroupEvent)> = Vec::new();
        let mut volume_events: Vec<(GroupKey, GroupEvent)> = Vec::new();

        self.settle_actions(core, now, &mut events);
        let Core { state, rng, .. } = &mut *core;
        let reconciled = reconcile(&catalog, state, now, rng);
        self.metrics.reconciled();

        let mut current_errors = BTreeSet::new();
        for error in &reconciled.errors {
            let text = error.to_string();
            if !core.known_errors.contains(&text) {
                warn!(file = %error.file, object = error.object.as_deref().unwrap_or(""), field = error.field.as_deref().unwrap_or(""), "manifest refused: {text}");
                self.metrics.error("manifest");
                if let Some(key) = group_named_by(error) {
                    let kept = reconciled.groups.get(&key).is_some_and(|p| p.config.is_some());
                    let message =
                        if kept { format!("{text}; the last good config stays in force") } else { text.clone() };
                    events.push((
                        key,
                        GroupEvent::controller(format_millis(now), EventType::Warning, "InvalidManifest", message),
                    ));
                } else if let Some(key) = crate::desired::catalog::refused_object(error, "ReplicatedVolume") {
                    volume_events.push((
                        key,
                        GroupEvent::controller(format_millis(now), EventType::Warning, "InvalidManifest", text.clone()),
                    ));
                }
            }
            current_errors.insert(text);
        }
        core.known_errors = current_errors;
        for key in &reconciled.deletion_started {
            events.push((
                key.clone(),
                GroupEvent::controller(
                    format_millis(now),
                    EventType::Normal,
                    "Deleting",
                    "removed from the desired state; waiting for both nodes to clean up".into(),
                ),
            ));
        }
        for key in &reconciled.deletion_finished {
            info!(group = %key, "both nodes cleaned up; group removed");
        }
        volume_events.extend(retirement_events(&reconciled.volumes, &core.state, now));

        // Serving bundles the store could not record would let revisions repeat after a
        // restart: on failure keep the old state and bundles instead.
        if core.unsaved || core.state != before {
            if let Err(e) = self.store.save_state(&core.state).await {
                self.metrics.error("store");
                core.state = before;
                core.unsaved = true;
                return Err(e);
            }
            core.unsaved = false;
        }
        for bundle in reconciled.bundles.values() {
            if reconciled.changed.contains(&bundle.node) {
                info!(node = %bundle.node, revision = bundle.revision, groups = bundle.groups.len(), "publishing desired config");
            }
            self.board.publish(bundle);
        }
        for key in &reconciled.deletion_finished {
            if let Err(e) = self.store.group_released(key).await {
                self.metrics.error("store");
                warn!(group = %key, error = %e, "cannot release a deleted group");
            }
        }
        core.catalog = catalog;
        core.reconciled = reconciled;
        for (key, event) in events {
            self.record_event(core, &key, event).await;
        }
        for (key, event) in volume_events {
            if let Err(e) = self.store.record_volume_event(&key, &event).await {
                self.metrics.error("store");
                warn!(volume = %key, error = %e, "cannot record an event");
            }
        }
        self.refresh_statuses(core, now, None).await
    }

    fn settle_actions(&self, core: &mut Core, now: UnixMillis, events: &mut Vec<(GroupKey, GroupEvent)>) {
        let reporting = self.reporting_members(core, now);
        for entry in core.state.actions.values_mut() {
            let members = reporting.get(&entry.group).cloned().unwrap_or_default();
            let was_final = entry.is_final();
            if actions::settle(entry, &members, now, self.settings.action_timeout) && !was_final && entry.is_final() {
                let type_ = if entry.outcome == hapair_crds::nodeapi::ActionOutcome::Succeeded {
                    EventType::Normal
                } else {
                    EventType::Warning
                };
                let reason = format!("Action{:?}", entry.outcome);
                let message = format!("{} {}: {}", entry.action.kind.label(), entry.action.id, entry.message);
                let _span = info_span!("group", group = %entry.group).entered();
                info!(action = %entry.action.id, outcome = ?entry.outcome, "{message}");
                events.push((entry.group.clone(), GroupEvent::controller(format_millis(now), type_, &reason, message)));
            }
        }
        actions::prune(&mut core.state.actions, now, actions::FINISHED_RETENTION);
    }

    /// Per group, the members whose reports are fresh.
    fn reporting_members(&self, core: &Core, now: UnixMillis) -> BTreeMap<GroupKey, BTreeSet<String>> {
        core.reconciled
            .groups
            .iter()
            .map(|(key, plan)| {
                let fresh = plan
                    .nodes()
                    .into_iter()
                    .filter(|n| {
                        core.reports
                            .get(n)
                            .is_some_and(|(_, t)| crate::support::timestamp::age(now, *t) < self.settings.stale_after)
                    })
                    .collect();
                (key.clone(), fresh)
            })
            .collect()
    }

    async fn record_event(&self, core: &mut Core, key: &GroupKey, event: GroupEvent) {
        if core.events.push(key, event.clone())
            && let Err(e) = self.store.record_event(key, &event).await
        {
            self.metrics.error("store");
            warn!(group = %key, error = %e, "cannot record event");
        }
    }

    /// Whether the controller has a bundle for `node` (it is, or was, in some group).
    pub fn knows_node(&self, node: &str) -> bool {
        self.board.knows(node)
    }

    /// Long-poll for the node's bundle; see [`BundleBoard::poll`].
    pub async fn poll_config(&self, node: &str, have: Option<u64>, wait: Duration) -> Poll {
        self.board.poll(node, have, wait).await
    }

    pub fn current_config(&self, node: &str) -> Option<Arc<DesiredConfig>> {
        self.board.current(node)
    }

    /// Checks a lease request from the node `cert` and returns the group's lease rules.
    pub async fn admit_lease(&self, cert: &str, request: &LeaseRequest) -> Result<LeaseParams, LeaseRefusal> {
        let core = self.core.lock().await;
        let plan = core.reconciled.groups.get(&request.group);
        let spec = plan.and_then(|p| p.config.as_ref()).map(|c| &c.spec);
        admit(cert, request, spec, plan.is_some_and(|p| p.deleting))
    }

    /// Records an event about a group on behalf of the layer around the controller (for
    /// example an admin-action annotation that cannot be read).
    pub async fn note_event(&self, key: &GroupKey, type_: EventType, reason: &str, message: String) {
        let mut core = self.core.lock().await;
        let event =
            GroupEvent::controller(format_millis(crate::support::timestamp::now_millis()), type_, reason, message);
        self.record_event(&mut core, key, event).await;
    }

    /// Whether the group's nodes may still be running it: it has a config (current or last
    /// good) or is being cleaned up. A group for which this is false can be let go at once.
    pub async fn cleanup_pending(&self, key: &GroupKey) -> bool {
        let core = self.core.lock().await;
        core.state.last_good.contains_key(key) || core.state.deleting.contains_key(key)
    }

    /// The groups whose running or deleting config delivers the volume `volume` (same
    /// namespace): while there are any, the volume must not go away.
    pub async fn volume_users(&self, volume: &GroupKey) -> Vec<GroupKey> {
        let core = self.core.lock().await;
        let uses = |source: &crate::desired::state::GroupSource| {
            source.volumes.iter().any(|v| v.metadata.name.as_deref() == Some(volume.name.as_str()))
        };
        let live = core.state.last_good.iter();
        let deleting = core.state.deleting.iter().map(|(k, d)| (k, &d.source));
        let mut users: Vec<GroupKey> = live
            .chain(deleting)
            .filter(|(k, s)| k.namespace == volume.namespace && uses(s))
            .map(|(k, _)| k.clone())
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Where the deletion of volume `key` stands on its nodes.
    pub async fn volume_retirement(&self, key: &GroupKey) -> VolumeRetirement {
        let core = self.core.lock().await;
        if let Some(wiping) = core.state.wiping.get(key) {
            return VolumeRetirement::Wiping { waiting_on: waiting_on(&core, key, wiping) };
        }
        if core.state.volume_specs.contains_key(key) {
            return VolumeRetirement::Known;
        }
        VolumeRetirement::Gone
    }
}

/// The backing nodes that have not answered a wipe, each with its latest word.
fn waiting_on(core: &Core, key: &GroupKey, wiping: &crate::desired::state::Wiping) -> Vec<String> {
    wiping
        .pending()
        .into_iter()
        .map(|node| {
            let answer = core
                .reports
                .get(&node)
                .and_then(|(r, _)| r.wipes.iter().find(|w| w.volume == *key && w.uuid == wiping.uuid));
            match answer {
                Some(a) => format!("{node} ({})", a.message),
                None => format!("{node} (no answer yet)"),
            }
        })
        .collect()
}

/// The event type and reason of a node's answer to a wipe.
fn wipe_reason(outcome: WipeOutcome) -> (EventType, &'static str) {
    match outcome {
        WipeOutcome::Wiped => (EventType::Normal, "VolumeWiped"),
        WipeOutcome::NothingToWipe => (EventType::Normal, "NothingToWipe"),
        WipeOutcome::Waiting => (EventType::Normal, "WipeWaiting"),
        WipeOutcome::Refused => (EventType::Warning, "WipeRefused"),
        WipeOutcome::Failed => (EventType::Warning, "WipeFailed"),
    }
}

/// Events (and log lines) for what a reconcile decided about deleted volumes.
fn retirement_events(retirement: &Retirement, state: &ControllerState, now: UnixMillis) -> Vec<(GroupKey, GroupEvent)> {
    let event =
        |type_, reason: &str, message: String| GroupEvent::controller(format_millis(now), type_, reason, message);
    let mut events = Vec::new();
    for key in &retirement.retained {
        info!(volume = %key, reason = "Retained", "volume deleted; its replicas' data stays on the nodes (deletionPolicy: Retain)");
    }
    for key in &retirement.wipe_started {
        let nodes = state.wiping.get(key).map(|w| w.pending().join(", ")).unwrap_or_default();
        let message = format!("volume deleted with deletionPolicy: Wipe; erasing its replicas on {nodes}");
        info!(volume = %key, reason = "Wiping", "{message}");
        events.push((key.clone(), event(EventType::Normal, "Wiping", message)));
    }
    for key in &retirement.wipe_cancelled {
        let message =
            "volume created again before its wipe finished; the replicas not wiped yet keep their data".to_string();
        warn!(volume = %key, reason = "WipeCancelled", "{message}");
        events.push((key.clone(), event(EventType::Warning, "WipeCancelled", message)));
    }
    for (key, wiping) in &retirement.wipe_finished {
        let refused = wiping.answers.values().any(|a| a.outcome == WipeOutcome::Refused);
        let outcomes: Vec<String> = wiping.answers.iter().map(|(node, a)| format!("{node}: {:?}", a.outcome)).collect();
        let message = format!("every replica answered ({}); the volume is gone", outcomes.join(", "));
        let (type_, reason) =
            if refused { (EventType::Warning, "WipeIncomplete") } else { (EventType::Normal, "Wiped") };
        info!(volume = %key, reason, "{message}");
        events.push((key.clone(), event(type_, reason, message)));
    }
    events
}

#[cfg(test)]
mod tests;
