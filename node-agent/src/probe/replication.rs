//! The `replication` monitor: this node's replica of a volume must be connected to its peer
//! with both disks UpToDate. It reads the state the group's replicas publish
//! ([`VolumeStates`]) rather than asking the replica, so an observation never waits on a
//! busy replication link.
//!
//! Validation allows it only with `action: alert`: a broken replication link is the
//! peer's problem as much as this node's, so moving or restarting the service cannot cure
//! it, and the engine already refuses to promote a replica that is not UpToDate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hapair_crds::nodeapi::VolumeReport;
use hapair_crds::volume::{ConnectionState, DiskState};

use super::Observation;

/// The latest state of each of a group's replicas on this node, by volume name.
#[derive(Clone, Debug, Default)]
pub struct VolumeStates(Arc<Mutex<BTreeMap<String, VolumeReport>>>);

impl VolumeStates {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VolumeReport>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, report: VolumeReport) {
        self.lock().insert(report.name.clone(), report);
    }

    pub fn get(&self, volume: &str) -> Option<VolumeReport> {
        self.lock().get(volume).cloned()
    }
}

/// One look at `volume`'s replica.
pub fn observe(volume: &str, states: &VolumeStates) -> Observation {
    let Some(v) = states.get(volume) else {
        return Observation::unhealthy(format!("volume {volume}: the replica is not open on this node"));
    };
    let peer = v.peer_disk_state.map_or_else(|| "unknown".to_string(), |d| format!("{d:?}"));
    let text = format!("volume {volume}: {:?}, disk {:?}, peer's disk {peer}", v.connection, v.disk_state);
    // An online verify runs over a connected, in-sync pair.
    let connected = matches!(
        v.connection,
        ConnectionState::Connected | ConnectionState::VerifySource | ConnectionState::VerifyTarget
    );
    let healthy = connected && v.disk_state == DiskState::UpToDate && v.peer_disk_state == Some(DiskState::UpToDate);
    if healthy {
        Observation::healthy(text)
    } else if v.out_of_sync_bytes > 0 {
        Observation::unhealthy(format!("{text}, {} bytes out of sync", v.out_of_sync_bytes))
    } else {
        Observation::unhealthy(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::volume::VolumeRole;

    fn report(connection: ConnectionState, disk: DiskState, peer: Option<DiskState>, out_of_sync: u64) -> VolumeReport {
        VolumeReport {
            name: "data".into(),
            disk_state: disk,
            role: VolumeRole::Primary,
            connection,
            out_of_sync_bytes: out_of_sync,
            sync: None,
            peer_disk_state: peer,
            last_verify: None,
            storage: None,
        }
    }

    #[test]
    fn healthy_only_when_connected_with_both_disks_up_to_date() {
        let states = VolumeStates::default();
        let missing = observe("data", &states);
        assert_eq!(missing, Observation::unhealthy("volume data: the replica is not open on this node"));

        let up = Some(DiskState::UpToDate);
        states.set(report(ConnectionState::Connected, DiskState::UpToDate, up, 0));
        assert_eq!(
            observe("data", &states),
            Observation::healthy("volume data: Connected, disk UpToDate, peer's disk UpToDate")
        );

        states.set(report(ConnectionState::Connecting, DiskState::UpToDate, None, 4096));
        assert_eq!(
            observe("data", &states),
            Observation::unhealthy(
                "volume data: Connecting, disk UpToDate, peer's disk unknown, 4096 bytes out of sync"
            )
        );
        states.set(report(ConnectionState::VerifySource, DiskState::UpToDate, up, 0));
        assert!(observe("data", &states).healthy, "a verify runs over an in-sync pair");
        states.set(report(ConnectionState::SyncSource, DiskState::UpToDate, Some(DiskState::Inconsistent), 0));
        assert!(!observe("data", &states).healthy);
        states.set(report(ConnectionState::Connected, DiskState::Outdated, up, 0));
        assert!(!observe("data", &states).healthy);
        assert!(!observe("other", &states).healthy, "another volume's state says nothing");
    }
}
