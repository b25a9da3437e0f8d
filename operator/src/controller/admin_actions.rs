//! Admin actions (switchover, force-active, resolve-split-brain, maintenance, verify): queued for
//! the group's agents, refused when they cannot apply, and shown as they progress.

use super::*;

impl<S: Store> Controller<S> {
    /// Queues an admin action for the group's agents. `actor` says who asked (the admin
    /// certificate, an annotation, a console user) in the audit event.
    pub async fn submit_action(
        &self,
        key: &GroupKey,
        request: ActionRequest,
        actor: &str,
    ) -> Result<ActionView, Refusal> {
        let mut core = self.core.lock().await;
        let id = match &request.id {
            Some(id) => id.clone(),
            None => {
                let mut bytes = [0u8; 6];
                core.rng.fill_bytes(&mut bytes);
                format!("a-{}", crate::support::hex::encode(&bytes))
            }
        };
        let target = core.reconciled.groups.get(key).and_then(|p| {
            p.config.as_ref().map(|c| Target { spec: &c.spec, deleting: p.deleting, node_api: &core.node_api })
        });
        if let Some(existing) = actions::check(key, &id, &request.kind, target, &core.state.actions)? {
            return Ok(view(existing));
        }
        let now = crate::support::timestamp::now_millis();
        let entry = actions::queue(key, &id, request.kind.clone(), now);
        let message = format!("{} {id} requested by {actor}{}", request.kind.label(), describe_kind(&request.kind));
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

    pub async fn action(&self, key: &GroupKey, id: &str) -> Option<ActionView> {
        let core = self.core.lock().await;
        core.state.actions.get(id).filter(|a| a.group == *key).map(view)
    }
}

fn describe_kind(kind: &AdminActionKind) -> String {
    match kind {
        AdminActionKind::Switchover { to } => format!(": move the service to {to}"),
        AdminActionKind::ForceActive { node } => format!(": force {node} active"),
        AdminActionKind::ResolveSplitBrain { winner } => format!(": {winner} keeps its data"),
        AdminActionKind::Maintenance { enabled } => format!(": maintenance {}", if *enabled { "on" } else { "off" }),
        AdminActionKind::Verify { volume } => format!(": verify volume {volume}"),
    }
}

pub(super) fn last_action(actions: &BTreeMap<String, ActionEntry>, key: &GroupKey) -> Option<ActionRecord> {
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
