//! The controller loop around the pure core: it takes snapshots from a [`Store`], runs
//! [`reconcile`], publishes bundles, folds the agents' reports and admin actions in, and
//! writes statuses and events back.
//!
//! One lock serializes every change, so a report, an action and a manifest change are each
//! applied whole. Long-polls never take it: they wait on the [`BundleBoard`].

pub mod metrics;
pub mod publish;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hapair_crds::hagroup::{ActionRecord, GroupPhase};
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
use crate::desired::actions::{self, Refusal, Target};
use crate::desired::catalog::Catalog;
use crate::desired::reconcile::{Reconciled, note_cleaned_up, reconcile};
use crate::desired::resolve::group_named_by;
use crate::desired::retire::{Retirement, note_wipe_answer};
use crate::desired::state::{ActionEntry, ControllerState};
use crate::server::adminapi::{
    ActionRequest, ActionView, GroupView, GroupsOverview, NodeActionResult, NodeDetail, VolumeView,
};
use crate::status::aggregate::{self, GroupInputs, Observation};
use crate::status::events::{EventRing, GroupEvent};
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
            stale_after: aggregate::DEFAULT_STALE_AFTER,
            action_timeout: actions::DEFAULT_ACTION_TIMEOUT,
            startup_grace: aggregate::DEFAULT_STALE_AFTER,
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
    statuses: Statuses,
    events: EventRing,
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
                known_errors: BTreeSet::new(),
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

    /// Recomputes statuses: of every group, or with `only` of those groups (a report's).
    async fn refresh_statuses(
        &self,
        core: &mut Core,
        now: UnixMillis,
        only: Option<&BTreeSet<GroupKey>>,
    ) -> Result<(), StoreError> {
        let mut phases = Vec::new();
        let mut group_writes: Vec<(GroupKey, Option<HaGroupStatus>)> = Vec::new();
        let mut volume_writes: Vec<(GroupKey, Option<ReplicatedVolumeStatus>)> = Vec::new();
        let mut events = Vec::new();
        let mut live_volumes = BTreeSet::new();
        // Why each refused volume is refused: a running group may still deliver one (its
        // last good config), and its status must say the edit was not taken.
        let refused_volumes: BTreeMap<GroupKey, String> = core
            .reconciled
            .errors
            .iter()
            .filter_map(|e| Some((crate::desired::catalog::refused_object(e, "ReplicatedVolume")?, e.to_string())))
            .collect();
        let volume_generation =
            |key: &GroupKey, fallback: Option<i64>| core.catalog.volume_generations.get(key).copied().or(fallback);
        let in_grace = crate::support::timestamp::age(now, core.started) < self.settings.startup_grace;
        for (key, plan) in &core.reconciled.groups {
            if only.is_some_and(|o| !o.contains(key)) {
                phases.extend(core.statuses.groups.get(key).and_then(|s| s.phase));
                continue;
            }
            let nodes = plan.nodes();
            let observations: Vec<Observation<'_>> = nodes
                .iter()
                .map(|n| {
                    let report = core.reports.get(n);
                    Observation { node: n, report: report.map(|r| &r.0), received: report.map(|r| r.1) }
                })
                .collect();
            let previous = core.statuses.groups.get(key).cloned().unwrap_or_default();
            let inputs = GroupInputs {
                key,
                plan,
                observations,
                last_action: last_action(&core.state.actions, key),
                now,
                stale_after: self.settings.stale_after,
            };
            let status = aggregate::group_status(&previous, &inputs);
            let unheard = nodes.iter().all(|n| !core.reports.contains_key(n));
            let validity = |s: &HaGroupStatus| {
                hapair_crds::condition::find(&s.conditions, hapair_crds::condition::types::VALID)
                    .map(|c| (c.status, c.message.clone()))
            };
            if in_grace
                && unheard
                && previous != HaGroupStatus::default()
                && previous.observed_generation == status.observed_generation
                && validity(&previous) == validity(&status)
            {
                // Nothing new to say yet: keep what is there (see `Settings::startup_grace`).
                phases.extend(previous.phase);
                if let Some(config) = &plan.config {
                    live_volumes.extend(config.volumes.iter().map(|v| GroupKey::new(&key.namespace, &v.name)));
                }
                continue;
            }
            if let (Some(from), Some(to)) = (&previous.active_node, &status.active_node)
                && from != to
            {
                let why = status.last_failover.as_ref().map(|f| format!(" ({})", f.reason)).unwrap_or_default();
                info!(group = %key, epoch = status.epoch, "active node {from} -> {to}{why}");
                events.push((
                    key.clone(),
                    GroupEvent::controller(
                        format_millis(now),
                        EventType::Normal,
                        "ActiveNodeChanged",
                        format!("{from} -> {to} in epoch {}{why}", status.epoch),
                    ),
                ));
            }
            if let Some(phase) = status.phase {
                phases.push(phase);
                // Entering Invalid already has its InvalidManifest event, with the reason.
                if (previous.phase.is_some_and(|p| p != phase)
                    || previous.phase.is_none() && phase != GroupPhase::Pending)
                    && phase != GroupPhase::Invalid
                {
                    let from = previous.phase.map(|p| p.as_str()).unwrap_or("none");
                    let why = phase_reason(&status);
                    let type_ = if matches!(phase, GroupPhase::Healthy | GroupPhase::Maintenance) {
                        EventType::Normal
                    } else {
                        EventType::Warning
                    };
                    let reason = if phase == GroupPhase::SplitBrain { "SplitBrain" } else { "PhaseChanged" };
                    info!(group = %key, epoch = status.epoch, active = status.active_node.as_deref().unwrap_or(""), "phase {from} -> {}", phase.as_str());
                    events.push((
                        key.clone(),
                        GroupEvent::controller(
                            format_millis(now),
                            type_,
                            reason,
                            format!("{from} -> {}{why}", phase.as_str()),
                        ),
                    ));
                }
            }
            if status != previous {
                group_writes.push((key.clone(), Some(status)));
            }
            if let Some(config) = &plan.config {
                for volume in &config.volumes {
                    let vkey = GroupKey::new(&key.namespace, &volume.name);
                    live_volumes.insert(vkey.clone());
                    let per_node: Vec<(&str, Option<&hapair_crds::nodeapi::VolumeReport>, bool)> = nodes
                        .iter()
                        .map(|n| {
                            let seen = core.reports.get(n);
                            let fresh = seen.is_some_and(|(_, t)| {
                                crate::support::timestamp::age(now, *t) < self.settings.stale_after
                            });
                            let report = seen
                                .and_then(|(r, _)| r.groups.iter().find(|g| g.key == *key))
                                .and_then(|g| g.volumes.iter().find(|v| v.name == volume.name));
                            (n.as_str(), report, fresh)
                        })
                        .collect();
                    let previous = core.statuses.volumes.get(&vkey).cloned().unwrap_or_default();
                    let mut status = aggregate::volume_status(&previous, Some(volume.generation), &per_node, now);
                    aggregate::set_volume_validity(
                        &mut status,
                        refused_volumes.get(&vkey).map(String::as_str),
                        volume_generation(&vkey, Some(volume.generation)),
                        now,
                    );
                    if let Some((type_, reason, message)) =
                        resync_transition(previous.sync_state.as_deref(), status.sync_state.as_deref())
                    {
                        info!(group = %key, volume = %volume.name, "{reason}: {message}");
                        events.push((
                            key.clone(),
                            GroupEvent::controller(
                                format_millis(now),
                                type_,
                                reason,
                                format!("volume {}: {message}", volume.name),
                            ),
                        ));
                    }
                    if status != previous {
                        volume_writes.push((vkey, Some(status)));
                    }
                }
            }
        }
        if only.is_none() {
            // Volumes no group delivers still say whether their spec was taken: a refused
            // one why, an accepted one (perhaps refused before) that it now is.
            let accepted = core.catalog.volumes.keys().map(|k| (k, None));
            let refused = refused_volumes.iter().map(|(k, why)| (k, Some(why.as_str())));
            for (vkey, why) in refused.chain(accepted) {
                if !live_volumes.insert(vkey.clone()) {
                    continue;
                }
                let previous = core.statuses.volumes.get(vkey).cloned().unwrap_or_default();
                let mut status = previous.clone();
                aggregate::set_volume_validity(&mut status, why, volume_generation(vkey, None), now);
                if status != previous {
                    volume_writes.push((vkey.clone(), Some(status)));
                }
            }
        }
        for key in core.statuses.groups.keys() {
            if only.is_none() && !core.reconciled.groups.contains_key(key) {
                group_writes.push((key.clone(), None));
            }
        }
        // Events kept from before a restart of a group that has since gone (no status to
        // remove) are dropped the same way, or they would stay for ever.
        for key in core.events.groups() {
            if only.is_none() && !core.reconciled.groups.contains_key(key) && !core.statuses.groups.contains_key(key) {
                group_writes.push((key.clone(), None));
            }
        }
        for key in core.statuses.volumes.keys() {
            if only.is_none() && !live_volumes.contains(key) {
                volume_writes.push((key.clone(), None));
            }
        }
        self.metrics.set_groups(phases);
        for (key, status) in group_writes {
            self.store.write_group_status(&key, status.as_ref()).await?;
            match status {
                Some(s) => {
                    core.statuses.groups.insert(key, s);
                }
                None => {
                    core.statuses.groups.remove(&key);
                    core.events.forget(&key);
                }
            }
        }
        for (key, status) in volume_writes {
            self.store.write_volume_status(&key, status.as_ref()).await?;
            match status {
                Some(s) => core.statuses.volumes.insert(key, s),
                None => core.statuses.volumes.remove(&key),
            };
        }
        for (key, event) in events {
            self.record_event(core, &key, event).await;
        }
        Ok(())
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

    /// Applies a node's report. `node` is the authenticated node the report was posted for.
    pub async fn accept_report(&self, node: &str, report: NodeReport) -> Result<(), ReportRefusal> {
        if report.node != node {
            return Err(ReportRefusal::NodeMismatch { path: node.to_string(), found: report.node.clone() });
        }
        let mut core = self.core.lock().await;
        for group in &report.groups {
            if let Some(plan) = core.reconciled.groups.get(&group.key)
                && !plan.nodes().iter().any(|n| n == node)
            {
                return Err(ReportRefusal::NotAMember { node: node.to_string(), group: group.key.to_string() });
            }
        }
        let now = crate::support::timestamp::now_millis();
        let mut events = Vec::new();
        let mut groups = BTreeSet::new();
        // Whether the report touches what bundles are built from (action answers, cleanup),
        // or could decide a pending action; otherwise only statuses need recomputing.
        let mut rebuild = false;
        for group in &report.groups {
            if !core.reconciled.groups.contains_key(&group.key) {
                // A group the controller no longer knows: nothing in it can matter.
                continue;
            }
            groups.insert(group.key.clone());
            if actions::record_results(&mut core.state.actions, &group.key, node, &group.actions) {
                core.unsaved = true;
                rebuild = true;
            }
            rebuild |= core.state.actions.values().any(|a| a.group == group.key && !a.is_final());
            if group.cleaned_up && note_cleaned_up(&mut core.state, &group.key, node) {
                info!(group = %group.key, node, "node cleaned up a deleted group");
                core.unsaved = true;
                rebuild = true;
            }
            for event in &group.events {
                let _span = info_span!("group", group = %group.key, node, epoch = event.epoch).entered();
                info!(reason = %event.reason, "{}", event.message);
                events.push((group.key.clone(), GroupEvent { node: Some(node.to_string()), event: event.clone() }));
            }
        }
        let mut volume_events = Vec::new();
        let previous = core.reports.get(node).map(|(r, _)| r.wipes.clone()).unwrap_or_default();
        for answer in &report.wipes {
            let news = if answer.outcome.is_final() {
                note_wipe_answer(&mut core.state, node, answer)
            } else {
                core.state.wiping.get(&answer.volume).is_some_and(|w| w.uuid == answer.uuid)
                    && !previous.contains(answer)
            };
            if !news {
                continue;
            }
            if answer.outcome.is_final() {
                core.unsaved = true;
                rebuild = true;
            }
            let (type_, reason) = wipe_reason(answer.outcome);
            let _span = info_span!("volume", volume = %answer.volume, node).entered();
            if type_ == EventType::Warning {
                warn!(reason, "{}", answer.message);
            } else {
                info!(reason, "{}", answer.message);
            }
            let event = GroupEvent {
                node: Some(node.to_string()),
                event: hapair_crds::nodeapi::EventRecord {
                    time: format_millis(now),
                    type_,
                    reason: reason.to_string(),
                    message: answer.message.clone(),
                    epoch: 0,
                },
            };
            volume_events.push((answer.volume.clone(), event));
        }
        if let Some(error) = &report.config_error {
            warn!(node, revision = report.applied_revision, "agent refused its desired config: {error}");
        }
        core.reports.insert(node.to_string(), (report, now));
        for (key, event) in events {
            self.record_event(&mut core, &key, event).await;
        }
        for (key, event) in volume_events {
            if let Err(e) = self.store.record_volume_event(&key, &event).await {
                self.metrics.error("store");
                warn!(volume = %key, error = %e, "cannot record an event");
            }
        }
        let result = if rebuild {
            let catalog = core.catalog.clone();
            self.apply(&mut core, catalog).await
        } else {
            self.refresh_statuses(&mut core, now, Some(&groups)).await
        };
        if let Err(e) = result {
            // The report itself is recorded; the store is retried on the next tick.
            warn!(node, error = %e, "cannot persist after a report");
        }
        Ok(())
    }

    /// Checks a lease request from the node `cert` and returns the group's lease rules.
    pub async fn admit_lease(&self, cert: &str, request: &LeaseRequest) -> Result<LeaseParams, LeaseRefusal> {
        let core = self.core.lock().await;
        let plan = core.reconciled.groups.get(&request.group);
        let spec = plan.and_then(|p| p.config.as_ref()).map(|c| &c.spec);
        admit(cert, request, spec, plan.is_some_and(|p| p.deleting))
    }

    /// Queues an admin action for the group's agents.
    pub async fn submit_action(&self, key: &GroupKey, request: ActionRequest) -> Result<ActionView, Refusal> {
        let mut core = self.core.lock().await;
        let id = match &request.id {
            Some(id) => id.clone(),
            None => {
                let mut bytes = [0u8; 6];
                core.rng.fill_bytes(&mut bytes);
                format!("a-{}", crate::desired::revision::hex(&bytes))
            }
        };
        let target = core
            .reconciled
            .groups
            .get(key)
            .and_then(|p| p.config.as_ref().map(|c| Target { spec: &c.spec, deleting: p.deleting }));
        if let Some(existing) = actions::check(key, &id, &request.kind, target, &core.state.actions)? {
            return Ok(view(existing));
        }
        let now = crate::support::timestamp::now_millis();
        let entry = actions::queue(key, &id, request.kind.clone(), now);
        let message = format!("{} {id} requested{}", request.kind.label(), describe_kind(&request.kind));
        info!(group = %key, action = %id, "{message}");
        core.state.actions.insert(id.clone(), entry);
        core.unsaved = true;
        self.record_event(
            &mut core,
            key,
            GroupEvent::controller(format_millis(now), EventType::Normal, "ActionRequested", message),
        )
        .await;
        let catalog = core.catalog.clone();
        if let Err(e) = self.apply(&mut core, catalog).await {
            core.state.actions.remove(&id);
            self.metrics.error("action");
            return Err(Refusal::Conflict(format!("cannot record the action: {e}")));
        }
        core.state.actions.get(&id).map(view).ok_or_else(|| Refusal::NotFound(format!("action {id} vanished")))
    }

    /// Records a request that was refused before it could be queued, so that its outcome
    /// shows in the group's `status.lastAction` like any other: the Kubernetes operator
    /// answers an admin-action annotation nowhere else. An `id` already in use is left as it
    /// is and its entry returned.
    pub async fn reject_action(
        &self,
        key: &GroupKey,
        id: &str,
        kind: AdminActionKind,
        message: String,
    ) -> Result<ActionView, StoreError> {
        let mut core = self.core.lock().await;
        if let Some(existing) = core.state.actions.get(id) {
            return Ok(view(existing));
        }
        let now = crate::support::timestamp::now_millis();
        let mut entry = actions::queue(key, id, kind, now);
        entry.outcome = hapair_crds::nodeapi::ActionOutcome::Rejected;
        entry.message = message;
        entry.finished = Some(now);
        let text = format!("{} {id} refused: {}", entry.action.kind.label(), entry.message);
        warn!(group = %key, action = %id, "{text}");
        let recorded = view(&entry);
        core.state.actions.insert(id.to_string(), entry);
        core.unsaved = true;
        self.record_event(
            &mut core,
            key,
            GroupEvent::controller(format_millis(now), EventType::Warning, "ActionRejected", text),
        )
        .await;
        let catalog = core.catalog.clone();
        if let Err(e) = self.apply(&mut core, catalog).await {
            core.state.actions.remove(id);
            return Err(e);
        }
        Ok(recorded)
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

    pub async fn action(&self, key: &GroupKey, id: &str) -> Option<ActionView> {
        let core = self.core.lock().await;
        core.state.actions.get(id).filter(|a| a.group == *key).map(view)
    }

    /// Everything `status` and `describe` show.
    pub async fn overview(&self) -> GroupsOverview {
        let core = self.core.lock().await;
        let groups = core
            .reconciled
            .groups
            .iter()
            .map(|(key, plan)| {
                let nodes = plan.nodes();
                let node_details = nodes
                    .iter()
                    .map(|n| {
                        let report = core.reports.get(n).map(|r| &r.0);
                        NodeDetail {
                            node: n.clone(),
                            desired_revision: core.state.nodes.get(n).map(|r| r.revision).unwrap_or(0),
                            applied_revision: report.map(|r| r.applied_revision),
                            config_error: report.and_then(|r| r.config_error.clone()),
                            report: report.and_then(|r| r.groups.iter().find(|g| g.key == *key).cloned()),
                        }
                    })
                    .collect();
                let volumes = plan
                    .config
                    .iter()
                    .flat_map(|c| &c.volumes)
                    .filter_map(|v| {
                        let status = core.statuses.volumes.get(&GroupKey::new(&key.namespace, &v.name))?;
                        Some(VolumeView { name: v.name.clone(), status: status.clone() })
                    })
                    .collect();
                GroupView {
                    key: key.clone(),
                    nodes,
                    witness: plan.config.as_ref().map(|c| c.spec.witness.mode).unwrap_or_default(),
                    error: plan.error.as_ref().map(|e| e.to_string()),
                    deleting: plan.deleting,
                    status: core.statuses.groups.get(key).cloned().unwrap_or_default(),
                    volumes,
                    node_details,
                    events: core.events.recent(key),
                }
            })
            .collect();
        let deleting_volumes = core
            .state
            .wiping
            .iter()
            .map(|(key, wiping)| {
                format!(
                    "{key}: erasing the replicas (deletionPolicy: Wipe); waiting for {}",
                    waiting_on(&core, key, wiping).join("; ")
                )
            })
            .collect();
        GroupsOverview {
            groups,
            errors: core.reconciled.errors.iter().map(|e| e.to_string()).collect(),
            deleting_volumes,
        }
    }
}

/// The event a volume's sync state change deserves, if any: a resync starting, finishing,
/// or stopping before it finished.
fn resync_transition(from: Option<&str>, to: Option<&str>) -> Option<(EventType, &'static str, String)> {
    let syncing = |s: Option<&str>| s.is_some_and(|s| s.starts_with("Syncing"));
    let (from_text, to_text) = (from.unwrap_or("Unknown"), to.unwrap_or("Unknown"));
    match (syncing(from), syncing(to)) {
        (false, true) => Some((EventType::Normal, "ResyncStarted", format!("resync started ({to_text})"))),
        (true, false) if to == Some("UpToDate") => {
            Some((EventType::Normal, "ResyncFinished", "resync finished; both replicas are up to date".into()))
        }
        (true, false) => {
            Some((EventType::Warning, "ResyncInterrupted", format!("resync stopped at {from_text}: now {to_text}")))
        }
        _ => None,
    }
}

fn describe_kind(kind: &AdminActionKind) -> String {
    match kind {
        AdminActionKind::Switchover { to } => format!(": move the service to {to}"),
        AdminActionKind::ForceActive { node } => format!(": force {node} active"),
        AdminActionKind::ResolveSplitBrain { winner } => format!(": {winner} keeps its data"),
        AdminActionKind::Maintenance { enabled } => format!(": maintenance {}", if *enabled { "on" } else { "off" }),
    }
}

fn phase_reason(status: &HaGroupStatus) -> String {
    let interesting = ["Degraded", "Ready", "Valid", "SplitBrain"];
    status
        .conditions
        .iter()
        .filter(|c| interesting.contains(&c.type_.as_str()))
        .find(|c| {
            (c.type_ == "Ready" || c.type_ == "Valid") && c.status != hapair_crds::condition::ConditionStatus::True
                || (c.type_ == "Degraded" || c.type_ == "SplitBrain")
                    && c.status == hapair_crds::condition::ConditionStatus::True
        })
        .map(|c| format!(" ({})", c.message))
        .unwrap_or_default()
}

fn last_action(actions: &BTreeMap<String, ActionEntry>, key: &GroupKey) -> Option<ActionRecord> {
    actions.values().filter(|a| a.group == *key).max_by_key(|a| (a.submitted, a.action.id.clone())).map(|a| {
        ActionRecord {
            id: a.action.id.clone(),
            action: a.action.kind.label().to_string(),
            outcome: a.outcome,
            message: a.message.clone(),
            time: format_millis(a.finished.unwrap_or(a.submitted)),
        }
    })
}

fn view(entry: &ActionEntry) -> ActionView {
    ActionView {
        id: entry.action.id.clone(),
        group: entry.group.clone(),
        kind: entry.action.kind.clone(),
        outcome: entry.outcome,
        message: entry.message.clone(),
        submitted: format_millis(entry.submitted),
        finished: entry.finished.map(format_millis),
        results: entry
            .results
            .iter()
            .map(|(node, r)| NodeActionResult { node: node.clone(), outcome: r.outcome, message: r.message.clone() })
            .collect(),
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
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A store in memory that counts snapshots and can be slowed down.
    #[derive(Default)]
    struct CountingStore {
        snapshots: AtomicUsize,
        saves: AtomicUsize,
        statuses: std::sync::Mutex<Vec<GroupKey>>,
        released: std::sync::Mutex<Vec<GroupKey>>,
        manifests: std::sync::Mutex<Vec<(String, String)>>,
    }

    impl Store for Arc<CountingStore> {
        async fn snapshot(&self) -> Result<Catalog, StoreError> {
            self.snapshots.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let sources = self.manifests.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Ok(Catalog::from_sources(sources.iter().map(|(n, t)| (n.as_str(), t.as_str()))))
        }
        async fn load_state(&self) -> Result<ControllerState, StoreError> {
            Ok(ControllerState::default())
        }
        async fn save_state(&self, _state: &ControllerState) -> Result<(), StoreError> {
            self.saves.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn load_statuses(&self) -> Result<Statuses, StoreError> {
            Ok(Statuses::default())
        }
        async fn write_group_status(&self, key: &GroupKey, _s: Option<&HaGroupStatus>) -> Result<(), StoreError> {
            self.statuses.lock().unwrap_or_else(|p| p.into_inner()).push(key.clone());
            Ok(())
        }
        async fn write_volume_status(
            &self,
            _k: &GroupKey,
            _s: Option<&ReplicatedVolumeStatus>,
        ) -> Result<(), StoreError> {
            Ok(())
        }
        async fn record_event(&self, _k: &GroupKey, _e: &GroupEvent) -> Result<(), StoreError> {
            Ok(())
        }
        async fn load_events(&self) -> Result<EventRing, StoreError> {
            Ok(EventRing::default())
        }
        async fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn group_released(&self, key: &GroupKey) -> Result<(), StoreError> {
            self.released.lock().unwrap_or_else(|p| p.into_inner()).push(key.clone());
            Ok(())
        }
    }

    const GROUP: &str = "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {name: g, namespace: ns}\nspec:\n  nodes:\n    - {name: a, heartbeatAddresses: [198.18.1.1]}\n    - {name: b, heartbeatAddresses: [198.18.1.2]}\n";

    #[tokio::test]
    async fn concurrent_callers_share_full_reconciles() {
        let store = Arc::new(CountingStore::default());
        let controller = Arc::new(
            Controller::start(store.clone(), Settings::default(), Arc::new(Metrics::new()))
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let before = store.snapshots.load(Ordering::SeqCst);
        let callers: Vec<_> = (0..200)
            .map(|_| {
                let c = controller.clone();
                tokio::spawn(async move { c.reconcile_coalesced().await })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
        }
        let runs = store.snapshots.load(Ordering::SeqCst) - before;
        // The first caller runs alone; everyone arriving during its run shares the next.
        assert!((1..=3).contains(&runs), "{runs} full reconciles for 200 callers");
        // A caller after those sees its own, fresh run: a change made before it is picked up.
        store.manifests.lock().unwrap_or_else(|p| p.into_inner()).push(("g.yaml".into(), GROUP.into()));
        controller.reconcile_coalesced().await.unwrap_or_else(|e| panic!("{e}"));
        assert!(controller.current_config("a").is_some());
    }

    #[tokio::test]
    async fn a_deleted_group_is_released_once_both_nodes_cleaned_up_and_the_confirmations_are_saved() {
        let store = Arc::new(CountingStore::default());
        store.manifests.lock().unwrap_or_else(|p| p.into_inner()).push(("g.yaml".into(), GROUP.into()));
        let controller = Controller::start(store.clone(), Settings::default(), Arc::new(Metrics::new()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        store.manifests.lock().unwrap_or_else(|p| p.into_inner()).clear();
        controller.reconcile().await.unwrap_or_else(|e| panic!("{e}"));
        let key = GroupKey::new("ns", "g");
        assert!(controller.cleanup_pending(&key).await);
        let report = |node: &str| NodeReport {
            node: node.into(),
            applied_revision: 2,
            config_error: None,
            agent_version: "t".into(),
            os: "t".into(),
            uptime_seconds: 1,
            hardware: Default::default(),
            links: vec![],
            wipes: vec![],
            groups: vec![hapair_crds::nodeapi::GroupReport {
                key: key.clone(),
                role: hapair_crds::hagroup::NodeRole::Standby,
                epoch: 0,
                health: hapair_crds::hagroup::NodeHealth::Healthy,
                role_reason: None,
                peer_reachable: true,
                last_peer_heartbeat: None,
                heartbeat_links: vec![],
                steps: vec![],
                monitors: vec![],
                volumes: vec![],
                last_failover: None,
                actions: vec![],
                events: vec![],
                cleaned_up: true,
            }],
        };
        let saves = store.saves.load(Ordering::SeqCst);
        controller.accept_report("a", report("a")).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.saves.load(Ordering::SeqCst), saves + 1, "a's confirmation is saved");
        assert!(store.released.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
        controller.accept_report("b", report("b")).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(*store.released.lock().unwrap_or_else(|p| p.into_inner()), std::slice::from_ref(&key));
        assert!(!controller.cleanup_pending(&key).await);
    }

    #[test]
    fn resync_events_mark_start_finish_and_interruption() {
        let t = |from: Option<&str>, to: Option<&str>| resync_transition(from, to);
        assert_eq!(
            t(Some("Disconnected"), Some("Syncing 3%")),
            Some((EventType::Normal, "ResyncStarted", "resync started (Syncing 3%)".into()))
        );
        assert_eq!(t(Some("Syncing 3%"), Some("Syncing 40%")), None);
        assert_eq!(
            t(Some("Syncing 99%"), Some("UpToDate")),
            Some((EventType::Normal, "ResyncFinished", "resync finished; both replicas are up to date".into()))
        );
        assert_eq!(
            t(Some("Syncing 40%"), Some("Disconnected")),
            Some((EventType::Warning, "ResyncInterrupted", "resync stopped at Syncing 40%: now Disconnected".into()))
        );
        assert_eq!(t(None, Some("UpToDate")), None);
    }
}
