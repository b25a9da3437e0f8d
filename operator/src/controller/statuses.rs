//! Statuses: every group's and volume's status recomputed from the latest reports and
//! plans, the changes written through the store, and the events those changes deserve
//! recorded after them.

use super::*;

impl<S: Store> Controller<S> {
    /// Recomputes statuses: of every group, or with `only` of those groups (a report's).
    pub(super) async fn refresh_statuses(
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
            let status = group::group_status(&previous, &inputs);
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
            phases.extend(status.phase);
            events
                .extend(transitions::group_events(key, &previous, &status, now).into_iter().map(|e| (key.clone(), e)));
            if status != previous {
                group_writes.push((key.clone(), Some(status)));
            }
            if let Some(config) = &plan.config {
                for volume in &config.volumes {
                    let vkey = GroupKey::new(&key.namespace, &volume.name);
                    live_volumes.insert(vkey.clone());
                    let previous = core.statuses.volumes.get(&vkey).cloned().unwrap_or_default();
                    let mut status = self.volume_status(core, key, &nodes, volume, &previous, now);
                    volume::set_volume_validity(
                        &mut status,
                        refused_volumes.get(&vkey).map(String::as_str),
                        volume_generation(&vkey, Some(volume.generation)),
                        now,
                    );
                    events.extend(
                        transitions::volume_event(key, &volume.name, &previous, &status, now).map(|e| (key.clone(), e)),
                    );
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
                volume::set_volume_validity(&mut status, why, volume_generation(vkey, None), now);
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
        self.write_statuses(core, group_writes, volume_writes, events).await
    }

    /// Writes the changed statuses (`None` removes one) and records the events, in that
    /// order, so an event never names a status the store does not have yet.
    async fn write_statuses(
        &self,
        core: &mut Core,
        group_writes: Vec<(GroupKey, Option<HaGroupStatus>)>,
        volume_writes: Vec<(GroupKey, Option<ReplicatedVolumeStatus>)>,
        events: Vec<(GroupKey, GroupEvent)>,
    ) -> Result<(), StoreError> {
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

    /// A volume's status from what the group's nodes last said of it.
    fn volume_status(
        &self,
        core: &Core,
        key: &GroupKey,
        nodes: &[String],
        volume: &hapair_crds::nodeapi::VolumeConfig,
        previous: &ReplicatedVolumeStatus,
        now: UnixMillis,
    ) -> ReplicatedVolumeStatus {
        let per_node: Vec<(&str, Option<&hapair_crds::nodeapi::VolumeReport>, bool)> = nodes
            .iter()
            .map(|n| {
                let seen = core.reports.get(n);
                let fresh =
                    seen.is_some_and(|(_, t)| crate::support::timestamp::age(now, *t) < self.settings.stale_after);
                let report = seen
                    .and_then(|(r, _)| r.groups.iter().find(|g| g.key == *key))
                    .and_then(|g| g.volumes.iter().find(|v| v.name == volume.name));
                (n.as_str(), report, fresh)
            })
            .collect();
        volume::volume_status(previous, Some(volume.generation), &per_node, now)
    }
}
