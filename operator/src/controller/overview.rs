//! The overview `status` and `describe` show: every group with its plan, status, nodes,
//! volumes and recent events, read from the controller's memory in one pass; and the
//! nodes' CPU and memory history the console charts.

use super::*;
use crate::controller::views::VirtualIpView;
use crate::status::usage::UsageSample;

impl<S: Store> Controller<S> {
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
                let virtual_ips = plan.config.as_ref().map(|c| VirtualIpView::of_spec(&c.spec)).unwrap_or_default();
                GroupView {
                    key: key.clone(),
                    virtual_ips,
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

impl<S: Store> Controller<S> {
    /// CPU and memory use of every node that reported, over the last hour, and the bytes
    /// that history holds.
    pub async fn usage_history(&self) -> (BTreeMap<String, Vec<UsageSample>>, usize) {
        let core = self.core.lock().await;
        let nodes = core.reports.keys().map(|n| (n.clone(), core.usage.node(n))).collect();
        (nodes, core.usage.bytes())
    }
}
