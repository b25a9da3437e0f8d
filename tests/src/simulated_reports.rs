//! Node reports of a healthy, settled pair, for the benchmarks that stand in for agents by
//! handing reports straight to the controller (`bench-operator-scale`, `bench-console`).

use hapair_crds::hagroup::{Hardware, NodeHealth, NodeRole};
use hapair_crds::nodeapi::{GroupKey, GroupReport, NodeReport, VolumeReport};
use hapair_crds::volume::{ConnectionState, DiskState, VolumeRole};

/// `node`'s report on group `key`: Primary or Standby in epoch 1, healthy, the peer heard,
/// and `volume` (if any) UpToDate and connected on both sides.
pub fn settled_report(
    node: &str,
    key: GroupKey,
    primary: bool,
    volume: Option<String>,
    hardware: Hardware,
    uptime_seconds: u64,
) -> NodeReport {
    let volumes = volume
        .map(|name| VolumeReport {
            name,
            disk_state: DiskState::UpToDate,
            role: if primary { VolumeRole::Primary } else { VolumeRole::Secondary },
            connection: ConnectionState::Connected,
            out_of_sync_bytes: 0,
            sync: None,
            peer_disk_state: Some(DiskState::UpToDate),
            last_verify: None,
            storage: None,
        })
        .into_iter()
        .collect();
    let group = GroupReport {
        key,
        role: if primary { NodeRole::Primary } else { NodeRole::Standby },
        epoch: 1,
        health: NodeHealth::Healthy,
        role_reason: None,
        peer_reachable: true,
        last_peer_heartbeat: None,
        heartbeat_links: vec![],
        steps: vec![],
        monitors: vec![],
        volumes,
        last_failover: None,
        actions: vec![],
        events: vec![],
        cleaned_up: false,
    };
    NodeReport {
        node: node.to_string(),
        applied_revision: 1,
        config_error: None,
        agent_version: "bench".into(),
        os: "Debian GNU/Linux 12".into(),
        uptime_seconds,
        hardware,
        links: vec![],
        groups: vec![group],
        wipes: vec![],
    }
}
