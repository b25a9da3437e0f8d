//! Node reports: what each agent says about its groups, volumes and wipes, taken in,
//! checked against the node that sent it, and turned into events and statuses.

use super::*;

impl<S: Store> Controller<S> {
    /// Applies a node's report. `node` is the authenticated node the report was posted for.
    pub async fn accept_report(&self, node: &str, report: NodeReport, node_api: u8) -> Result<(), ReportRefusal> {
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
        core.usage.record(node, now, &report.hardware);
        core.reports.insert(node.to_string(), (report, now));
        core.node_api.insert(node.to_string(), node_api);
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
}
