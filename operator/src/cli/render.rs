//! Turning admin-API answers into the text `status`, `describe` and the actions print.
//! Pure, so the layouts are tested without a controller.
//!
//! Everything in these views came from users, manifests, agents or the controller, so each
//! renderer passes its text through [`super::terminal`] before returning it: every field and
//! table cell as a single line (a newline in a message must not forge a line of the
//! report), then the whole report keeping only its own line breaks.

use std::fmt::Write;

use hapair_crds::condition::{ConditionStatus, find, types};
use hapair_crds::hagroup::{NodeHealth, WitnessMode};
use hapair_crds::nodeapi::{AdminActionKind, EventType};

use crate::cli::terminal::{printable, printable_lines};
use crate::controller::views::{ActionView, GroupView, GroupsOverview};

fn table(rows: &[Vec<String>]) -> String {
    // Escaped before measuring, so the columns line up with what the terminal shows.
    let rows: Vec<Vec<std::borrow::Cow<'_, str>>> =
        rows.iter().map(|r| r.iter().map(|cell| printable(cell)).collect()).collect();
    let columns = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}   ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One field of a report, escaped to a single line (see [`printable`]).
fn field(text: &str) -> std::borrow::Cow<'_, str> {
    printable(text)
}

fn or_dash(text: Option<&str>) -> String {
    field(text.filter(|t| !t.is_empty()).unwrap_or("-")).into_owned()
}

/// The group's replication state in a few words.
fn sync_summary(group: &GroupView) -> String {
    match find(&group.status.conditions, types::SYNCED) {
        Some(c) if c.reason == "NoVolumes" => "-".into(),
        Some(c) if c.status == ConditionStatus::True => "UpToDate".into(),
        _ if !group.volumes.is_empty() => group
            .volumes
            .iter()
            .map(|v| format!("{}:{}", v.name, v.status.sync_state.as_deref().unwrap_or("Unknown")))
            .collect::<Vec<_>>()
            .join(" "),
        Some(c) => c.reason.clone(),
        None => "-".into(),
    }
}

fn roles(group: &GroupView) -> String {
    if group.nodes.is_empty() {
        return "-".into();
    }
    group
        .nodes
        .iter()
        .map(|n| {
            let node = group.status.nodes.iter().find(|s| s.name == *n);
            let role = node.and_then(|s| s.role).map(|r| r.as_str());
            let unknown = node.and_then(|s| s.health).is_none_or(|h| h == NodeHealth::Unknown);
            match role {
                None => format!("{n}:Unknown"),
                Some(role) if unknown => format!("{n}:{role}(stale)"),
                Some(role) => format!("{n}:{role}"),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `status`: one line per group.
pub fn status(overview: &GroupsOverview) -> String {
    let mut rows =
        vec![["GROUP", "PHASE", "ACTIVE", "EPOCH", "ROLES", "SYNC", "LAST FAILOVER"].map(String::from).to_vec()];
    for group in &overview.groups {
        let s = &group.status;
        let last_failover = s
            .last_failover
            .as_ref()
            .map(|f| format!("{} -> {} ({})", f.time, f.to, f.reason))
            .unwrap_or_else(|| "-".into());
        let mut phase = s.phase.map(|p| p.as_str().to_string()).unwrap_or_else(|| "Unknown".into());
        if group.deleting {
            phase.push_str(",Deleting");
        }
        rows.push(vec![
            group.key.to_string(),
            phase,
            or_dash(s.active_node.as_deref()),
            s.epoch.to_string(),
            roles(group),
            sync_summary(group),
            last_failover,
        ]);
    }
    let mut out = if overview.groups.is_empty() { "No HaGroups.\n".to_string() } else { table(&rows) };
    if !overview.errors.is_empty() {
        out.push_str("\nRefused manifests (the last good config of each group stays in force):\n");
        for error in &overview.errors {
            let _ = writeln!(out, "  {}", printable(error));
        }
    }
    if !overview.deleting_volumes.is_empty() {
        out.push_str("\nVolumes being deleted:\n");
        for volume in &overview.deleting_volumes {
            let _ = writeln!(out, "  {}", printable(volume));
        }
    }
    printable_lines(&out).into_owned()
}

/// `describe GROUP`: everything the controller knows about one group.
pub fn describe(group: &GroupView) -> String {
    let s = &group.status;
    let mut out = String::new();
    let _ = writeln!(out, "Name:        {}", field(&group.key.name));
    let _ = writeln!(out, "Namespace:   {}", field(&group.key.namespace));
    let _ = writeln!(out, "Phase:       {}", s.phase.map(|p| p.as_str()).unwrap_or("Unknown"));
    let _ = writeln!(out, "Active:      {}", or_dash(s.active_node.as_deref()));
    let _ = writeln!(out, "Epoch:       {}", s.epoch);
    let witness = match group.witness {
        WitnessMode::Controller => "controller",
        WitnessMode::None => "none (two-node mode: a full partition can make both nodes active)",
    };
    let _ = writeln!(out, "Witness:     {witness}");
    if let Some(generation) = s.observed_generation {
        let _ = writeln!(out, "Generation:  {generation}");
    }
    if group.deleting {
        let _ = writeln!(out, "Deleting:    waiting for both nodes to clean up");
    }
    if let Some(error) = &group.error {
        let _ = writeln!(out, "Invalid:     {}", field(error));
        let _ = writeln!(out, "             (the last good config stays in force)");
    }
    match &s.last_failover {
        Some(f) => {
            let from = f.from.as_deref().map(|n| format!("{} -> ", field(n))).unwrap_or_default();
            let _ = writeln!(
                out,
                "Last failover: {} {from}{} ({}, {} ms)",
                field(&f.time),
                field(&f.to),
                field(&f.reason),
                f.duration_ms
            );
            // Where the time went: when each phase ended, and how long after the one before.
            let mut previous = 0;
            for p in &f.phases {
                let _ = writeln!(
                    out,
                    "  {:>7} ms  (+{:>5} ms)  {}",
                    p.at_ms,
                    p.at_ms.saturating_sub(previous),
                    field(&p.phase)
                );
                previous = p.at_ms;
            }
        }
        None => {
            let _ = writeln!(out, "Last failover: -");
        }
    }
    if let Some(a) = &s.last_action {
        let _ = writeln!(
            out,
            "Last action: {} {} {:?} at {}: {}",
            field(&a.action),
            field(&a.id),
            a.outcome,
            field(&a.time),
            field(&a.message)
        );
    }
    if !s.conditions.is_empty() {
        let _ = writeln!(out, "Conditions:");
        let mut rows = vec![["  TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"].map(String::from).to_vec()];
        for c in &s.conditions {
            rows.push(vec![
                format!("  {}", c.type_),
                format!("{:?}", c.status),
                c.reason.clone(),
                c.last_transition_time.clone(),
                c.message.clone(),
            ]);
        }
        out.push_str(&table(&rows));
    }
    for name in &group.nodes {
        let status = s.nodes.iter().find(|n| n.name == *name);
        let detail = group.node_details.iter().find(|d| d.node == *name);
        let report = detail.and_then(|d| d.report.as_ref());
        let role = status.and_then(|n| n.role).map(|r| r.as_str()).unwrap_or("Unknown");
        let health = status.and_then(|n| n.health).map(|h| format!("{h:?}")).unwrap_or_else(|| "Unknown".into());
        let _ = writeln!(out, "Node {}:", field(name));
        let reason =
            report.and_then(|r| r.role_reason.as_deref()).map(|r| format!(" ({})", field(r))).unwrap_or_default();
        let _ = writeln!(out, "  Role:        {role}{reason}");
        let _ = writeln!(out, "  Health:      {health}");
        if let Some(d) = detail {
            let applied = d.applied_revision.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(out, "  Config:      revision {} desired, {applied} applied", d.desired_revision);
            if let Some(e) = &d.config_error {
                let _ = writeln!(out, "  Config error: {}", field(e));
            }
        }
        if let Some(n) = status {
            let _ = writeln!(out, "  Last report: {}", or_dash(n.last_report.as_deref()));
            let _ = writeln!(out, "  Heard by peer: {}", or_dash(n.last_heartbeat.as_deref()));
            if let Some(version) = &n.agent_version {
                let _ = writeln!(
                    out,
                    "  Agent:       {} on {}, up {}s",
                    field(version),
                    or_dash(n.os.as_deref()),
                    n.uptime_seconds
                );
            }
            if let Some(h) = &n.hardware {
                let _ = writeln!(
                    out,
                    "  Hardware:    {} / {} ({} CPUs, {} MiB), CPU {}%, memory {}%, kernel {}",
                    or_dash(h.model.as_deref()),
                    or_dash(h.cpu_model.as_deref()),
                    h.cpus,
                    h.memory_bytes / (1024 * 1024),
                    h.cpu_percent,
                    h.memory_percent,
                    or_dash(h.kernel.as_deref())
                );
            }
            for link in &n.links {
                let hb = link.heartbeat_link.map(|i| format!(" heartbeat link {i}")).unwrap_or_default();
                let loss = link.heartbeat_loss_percent.map(|l| format!(", {l}% loss")).unwrap_or_default();
                let speed = link.speed_mbps.map(|s| format!(", {s} Mb/s")).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  Link {}:{hb} {} [{}]{speed}{loss}",
                    field(&link.interface),
                    if link.up { "up" } else { "DOWN" },
                    field(&link.addresses.join(", "))
                );
            }
        }
        if let Some(r) = report {
            let _ = writeln!(out, "  Peer reachable: {}", if r.peer_reachable { "yes" } else { "NO" });
            for l in &r.heartbeat_links {
                let _ = writeln!(
                    out,
                    "  Heartbeat link {}: {} -> {} {} ({}% loss)",
                    l.index,
                    field(&l.local_address),
                    field(&l.peer_address),
                    if l.up { "up" } else { "DOWN" },
                    l.loss_percent
                );
            }
            if !r.steps.is_empty() {
                let _ = writeln!(out, "  Flow:");
                for (i, step) in r.steps.iter().enumerate() {
                    let restarts =
                        if step.restarts > 0 { format!(", {} restarts", step.restarts) } else { String::new() };
                    let message = step.message.as_deref().map(|m| format!(": {}", field(m))).unwrap_or_default();
                    let _ = writeln!(out, "    {}. {} {:?}{restarts}{message}", i + 1, field(&step.name), step.state);
                }
            }
            if !r.monitors.is_empty() {
                let _ = writeln!(out, "  Probes:");
                for m in &r.monitors {
                    let message = m.message.as_deref().map(|m| format!(": {}", field(m))).unwrap_or_default();
                    let _ =
                        writeln!(out, "    {} {}{message}", field(&m.name), if m.healthy { "ok" } else { "FAILING" });
                }
            }
            for v in &r.volumes {
                let sync = v.sync.as_ref().map(|s| format!(", syncing {}%", s.percent())).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  Volume {}: {:?} {} {:?}, {} bytes out of sync{sync}",
                    field(&v.name),
                    v.role,
                    v.disk_state.as_str(),
                    v.connection,
                    v.out_of_sync_bytes
                );
            }
        } else {
            let _ = writeln!(out, "  (no report of this group from the node yet)");
        }
    }
    for v in &group.volumes {
        let _ =
            writeln!(out, "Volume {}: {}", field(&v.name), field(v.status.sync_state.as_deref().unwrap_or("Unknown")));
    }
    let _ = writeln!(out, "Events:");
    if group.events.is_empty() {
        let _ = writeln!(out, "  <none>");
    } else {
        let mut rows = vec![["  TIME", "TYPE", "REASON", "FROM", "MESSAGE"].map(String::from).to_vec()];
        for e in group.events.iter().rev().take(20).rev() {
            let type_ = match e.event.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            };
            let from = e.node.clone().unwrap_or_else(|| "controller".into());
            rows.push(vec![
                format!("  {}", e.event.time),
                type_.into(),
                e.event.reason.clone(),
                from,
                e.event.message.clone(),
            ]);
        }
        out.push_str(&table(&rows));
    }
    printable_lines(&out).into_owned()
}

/// What an action asked for, in words.
pub fn action_words(kind: &AdminActionKind) -> String {
    match kind {
        AdminActionKind::Switchover { to } => format!("switchover to {}", field(to)),
        AdminActionKind::ForceActive { node } => format!("force-active {}", field(node)),
        AdminActionKind::ResolveSplitBrain { winner } => format!("resolve-split-brain, winner {}", field(winner)),
        AdminActionKind::Maintenance { enabled } => format!("maintenance {}", if *enabled { "on" } else { "off" }),
        AdminActionKind::Verify { volume } => format!("verify of volume {}", field(volume)),
    }
}

/// An action's outcome, one line plus one line per node that answered.
pub fn action(view: &ActionView) -> String {
    let mut out = format!(
        "{} ({}) on {}: {:?}: {}\n",
        action_words(&view.kind),
        field(&view.id),
        field(&view.group.to_string()),
        view.outcome,
        field(&view.message)
    );
    for r in &view.results {
        let _ = writeln!(out, "  {}: {:?} {}", field(&r.node), r.outcome, field(&r.message));
    }
    printable_lines(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::views::{NodeActionResult, NodeDetail, VolumeView};
    use crate::status::events::GroupEvent;
    use hapair_crds::hagroup::{FailoverPhase, FailoverRecord, GroupPhase, NodeRole, NodeStatus};
    use hapair_crds::nodeapi::{ActionOutcome, GroupKey, GroupReport};
    use hapair_crds::{HaGroupStatus, ReplicatedVolumeStatus};

    fn group() -> GroupView {
        GroupView {
            key: GroupKey::new("db", "pg"),
            nodes: vec!["db1".into(), "db2".into()],
            witness: WitnessMode::Controller,
            error: None,
            deleting: false,
            status: HaGroupStatus {
                phase: Some(GroupPhase::Degraded),
                active_node: Some("db1".into()),
                epoch: 7,
                last_failover: Some(FailoverRecord {
                    time: "2025-01-01T10:00:00Z".into(),
                    from: Some("db2".into()),
                    to: "db1".into(),
                    reason: "peer dead".into(),
                    duration_ms: 1100,
                    phases: vec![
                        FailoverPhase { phase: "silence detected".into(), at_ms: 600 },
                        FailoverPhase { phase: "witness lease granted".into(), at_ms: 640 },
                        FailoverPhase { phase: "serving".into(), at_ms: 1340 },
                    ],
                }),
                nodes: vec![
                    NodeStatus {
                        name: "db1".into(),
                        role: Some(NodeRole::Primary),
                        health: Some(NodeHealth::Healthy),
                        ..NodeStatus::default()
                    },
                    NodeStatus {
                        name: "db2".into(),
                        role: Some(NodeRole::Standby),
                        health: Some(NodeHealth::Unknown),
                        ..NodeStatus::default()
                    },
                ],
                ..HaGroupStatus::default()
            },
            volumes: vec![VolumeView {
                name: "data".into(),
                status: ReplicatedVolumeStatus {
                    sync_state: Some("Syncing 40%".into()),
                    ..ReplicatedVolumeStatus::default()
                },
            }],
            virtual_ips: vec![],
            node_details: vec![],
            events: vec![GroupEvent::controller(
                "2025-01-01T10:00:01Z".into(),
                EventType::Warning,
                "PhaseChanged",
                "Healthy -> Degraded".into(),
            )],
        }
    }

    #[test]
    fn status_is_a_table_with_roles_epoch_and_sync() {
        let overview = GroupsOverview {
            groups: vec![group()],
            errors: vec!["g.yaml (document 1), HaGroup db/x: spec: bad".into()],
            deleting_volumes: vec![
                "db/old: erasing the replicas (deletionPolicy: Wipe); waiting for db2 (no answer yet)".into(),
            ],
        };
        let text = status(&overview);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("GROUP   PHASE      ACTIVE   EPOCH   ROLES"), "{text}");
        assert_eq!(
            lines[1],
            "db/pg   Degraded   db1      7       db1:Primary db2:Standby(stale)   data:Syncing 40%   2025-01-01T10:00:00Z -> db1 (peer dead)"
        );
        assert!(text.contains("Refused manifests"), "{text}");
        assert!(text.contains("  g.yaml (document 1), HaGroup db/x: spec: bad"), "{text}");
        assert!(
            text.ends_with("\nVolumes being deleted:\n  db/old: erasing the replicas (deletionPolicy: Wipe); waiting for db2 (no answer yet)\n"),
            "{text}"
        );
        assert_eq!(status(&GroupsOverview::default()), "No HaGroups.\n");
    }

    #[test]
    fn describe_shows_nodes_failover_and_events() {
        let text = describe(&group());
        assert!(text.contains("Active:      db1"), "{text}");
        assert!(text.contains("Last failover: 2025-01-01T10:00:00Z db2 -> db1 (peer dead, 1100 ms)"), "{text}");
        assert!(text.contains("\n      600 ms  (+  600 ms)  silence detected\n"), "{text}");
        assert!(text.contains("\n      640 ms  (+   40 ms)  witness lease granted\n"), "{text}");
        assert!(text.contains("\n     1340 ms  (+  700 ms)  serving\n"), "{text}");
        assert!(text.contains("Node db2:\n  Role:        Standby\n  Health:      Unknown"), "{text}");
        assert!(text.contains("Volume data: Syncing 40%"), "{text}");
        assert!(text.contains("Warning   PhaseChanged   controller   Healthy -> Degraded"), "{text}");
    }

    #[test]
    fn action_outcomes_name_the_nodes() {
        let view = ActionView {
            id: "a-1".into(),
            group: GroupKey::new("db", "pg"),
            kind: AdminActionKind::Switchover { to: "db2".into() },
            outcome: ActionOutcome::Rejected,
            message: "db2: out of sync".into(),
            submitted: "t".into(),
            finished: Some("t".into()),
            results: vec![NodeActionResult {
                node: "db2".into(),
                outcome: ActionOutcome::Rejected,
                message: "out of sync".into(),
            }],
        };
        assert_eq!(
            action(&view),
            "switchover to db2 (a-1) on db/pg: Rejected: db2: out of sync\n  db2: Rejected out of sync\n"
        );
    }

    /// Every character a terminal would act on, other than the report's own line breaks.
    fn steering(text: &str) -> Vec<char> {
        text.chars().filter(|c| c.is_control() && *c != '\n').collect()
    }

    fn hostile_report() -> GroupReport {
        use hapair_crds::nodeapi::MonitorReport;
        GroupReport {
            key: GroupKey::new("db", "pg"),
            role: NodeRole::Primary,
            epoch: 7,
            health: NodeHealth::Healthy,
            role_reason: Some("because\r\x1b[1A".into()),
            peer_reachable: true,
            last_peer_heartbeat: None,
            heartbeat_links: vec![],
            steps: vec![],
            monitors: vec![MonitorReport {
                name: "http\u{9b}2J".into(),
                healthy: false,
                message: Some("down\nNode db9:".into()),
            }],
            volumes: vec![],
            last_failover: None,
            actions: vec![],
            events: vec![],
            cleaned_up: false,
        }
    }

    #[test]
    fn describe_escapes_every_field_from_the_controller_and_the_agents() {
        let mut g = group();
        g.status.active_node = Some("db1\x1b]0;owned\x07".into());
        g.error = Some("bad\nDeleting:    yes".into());
        g.events.push(GroupEvent::controller(
            "2025-01-01T10:00:02Z".into(),
            EventType::Normal,
            "Odd\x7f",
            "line one\nNode evil:\x1b[2J".into(),
        ));
        g.node_details = vec![NodeDetail {
            node: "db1".into(),
            desired_revision: 1,
            applied_revision: None,
            config_error: Some("x\ny".into()),
            report: Some(hostile_report()),
        }];
        let text = describe(&g);
        assert_eq!(steering(&text), Vec::<char>::new(), "{text}");
        // Newlines inside one field are shown, so no field forges a line of its own.
        for forged in ["Deleting:", "Node evil:", "Node db9:", "y"] {
            assert!(!text.lines().any(|l| l.trim_start().starts_with(forged)), "{forged}: {text}");
        }
        assert!(text.contains("Active:      db1\\x1b]0;owned\\x07\n"), "{text}");
        assert!(text.contains("Invalid:     bad\\nDeleting:    yes\n"), "{text}");
        assert!(text.contains("  Role:        Primary (because\\r\\x1b[1A)\n"), "{text}");
        assert!(text.contains("  Config error: x\\ny\n"), "{text}");
        assert!(text.contains("    http\\u{9b}2J FAILING: down\\nNode db9:\n"), "{text}");
        assert!(text.contains("Normal    Odd\\x7f        controller   line one\\nNode evil:\\x1b[2J\n"), "{text}");
    }

    #[test]
    fn status_and_actions_escape_names_and_messages() {
        let mut g = group();
        g.status.active_node = Some("db1\n\x1b[31m".into());
        let overview = GroupsOverview {
            groups: vec![g],
            errors: vec!["g.yaml: bad\ndb/pg   Healthy".into()],
            deleting_volumes: vec!["db/old\x1b[2K".into()],
        };
        let text = status(&overview);
        assert_eq!(steering(&text), Vec::<char>::new(), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("db/pg")).count(), 1, "{text}");
        assert!(text.contains("   db1\\n\\x1b[31m   "), "{text}");
        assert!(text.contains("  g.yaml: bad\\ndb/pg   Healthy\n"), "{text}");
        assert!(text.contains("  db/old\\x1b[2K\n"), "{text}");

        let view = ActionView {
            id: "a-1\x1b[1A".into(),
            group: GroupKey::new("db", "pg"),
            kind: AdminActionKind::Switchover { to: "db2\u{9b}".into() },
            outcome: ActionOutcome::Failed,
            message: "boom\nSucceeded".into(),
            submitted: "t".into(),
            finished: Some("t".into()),
            results: vec![NodeActionResult {
                node: "db2\r".into(),
                outcome: ActionOutcome::Failed,
                message: "no\x07".into(),
            }],
        };
        assert_eq!(
            action(&view),
            "switchover to db2\\u{9b} (a-1\\x1b[1A) on db/pg: Failed: boom\\nSucceeded\n  db2\\r: Failed no\\x07\n"
        );
    }
}
