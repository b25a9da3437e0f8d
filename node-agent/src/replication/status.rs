//! What a replica reports: [`ReplicaStatus`], and its conversion into the node API's
//! [`VolumeReport`].

use hapair_crds::nodeapi::VolumeReport;
use hapair_crds::volume::{ConnectionState, DiskState, SyncProgress, VERIFY_RANGES_SHOWN, VerifyReport, VolumeRole};
use serde::Serialize;

use super::generation::Generations;
use super::machine::{Counters, DiscardRecord, ReplicaEvent, Snapshot};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub volume: String,
    pub node: String,
    pub peer: String,
    pub role: VolumeRole,
    pub disk: DiskState,
    pub connection: ConnectionState,
    pub peer_disk: Option<DiskState>,
    pub peer_role: Option<VolumeRole>,
    pub out_of_sync_bytes: u64,
    pub sync: Option<SyncProgress>,
    pub verify: Option<SyncProgress>,
    pub epoch: u64,
    pub fenced: bool,
    pub split_brain: Option<String>,
    pub refused: Option<String>,
    pub crashed_primary: bool,
    pub superseded: bool,
    /// The replication protocol version agreed with the peer on the current connection.
    pub protocol_version: Option<u32>,
    pub writes_allowed: bool,
    pub reads_allowed: bool,
    pub generations: Generations,
    pub last_discard: Option<DiscardRecord>,
    pub last_verify_mismatches: Option<Vec<(u64, u64)>>,
    pub counters: Counters,
    pub wire_sent_bytes: u64,
    pub wire_received_bytes: u64,
    pub wire_connections: u64,
    pub nbd_clients: usize,
    /// The NBD socket to attach while this replica is primary.
    pub nbd_socket: Option<String>,
}

impl ReplicaStatus {
    pub fn new(volume: &str, node: &str, peer: &str, s: Snapshot) -> Self {
        ReplicaStatus {
            volume: volume.to_string(),
            node: node.to_string(),
            peer: peer.to_string(),
            role: s.role,
            disk: s.disk,
            connection: s.connection,
            peer_disk: s.peer_disk,
            peer_role: s.peer_role,
            out_of_sync_bytes: s.out_of_sync_bytes,
            sync: s.sync,
            verify: s.verify,
            epoch: s.epoch,
            fenced: s.fenced,
            split_brain: s.split_brain,
            refused: s.refused,
            crashed_primary: s.crashed_primary,
            superseded: s.superseded,
            protocol_version: s.protocol_version,
            writes_allowed: s.writes_allowed,
            reads_allowed: s.reads_allowed,
            generations: s.generations,
            last_discard: s.last_discard,
            last_verify_mismatches: s.last_verify_mismatches,
            counters: s.counters,
            wire_sent_bytes: 0,
            wire_received_bytes: 0,
            wire_connections: 0,
            nbd_clients: 0,
            nbd_socket: None,
        }
    }

    /// The node API's view of this replica.
    pub fn report(&self) -> VolumeReport {
        VolumeReport {
            name: self.volume.clone(),
            disk_state: self.disk,
            role: self.role,
            connection: self.connection,
            out_of_sync_bytes: self.out_of_sync_bytes,
            sync: self.sync.clone(),
            peer_disk_state: self.peer_disk,
            last_verify: None,
            storage: None,
        }
    }

    /// The one-word summary `kubectl get` shows (`UpToDate`, `Syncing 42%`, …).
    pub fn summary(&self) -> String {
        match (&self.connection, &self.sync) {
            (ConnectionState::SplitBrain, _) => "SplitBrain".into(),
            (ConnectionState::SyncSource | ConnectionState::SyncTarget, Some(p)) => format!("Syncing {}%", p.percent()),
            (ConnectionState::Connecting | ConnectionState::StandAlone, _) => {
                format!("Disconnected ({})", self.disk.as_str())
            }
            _ => self.disk.as_str().to_string(),
        }
    }
}

/// How many mismatched ranges a verify's event names.
const VERIFY_RANGES_IN_EVENT: usize = 64;

impl ReplicaEvent {
    /// What a finished verify found, as status shows it, stamped `finished` (RFC 3339).
    pub fn verify_report(&self, finished: String) -> Option<VerifyReport> {
        let ReplicaEvent::VerifyFinished { mismatched, checked_bytes, elapsed_ms } = self else { return None };
        Some(VerifyReport {
            finished,
            duration_seconds: elapsed_ms.div_ceil(1000),
            checked_bytes: *checked_bytes,
            mismatched_bytes: mismatched.iter().map(|(_, len)| len).sum(),
            mismatched_ranges: mismatched.iter().take(VERIFY_RANGES_SHOWN).map(|(o, l)| format!("{o}+{l}")).collect(),
        })
    }

    /// The event's message: plain words where an operator reads them.
    pub fn message(&self) -> String {
        match self {
            ReplicaEvent::VerifyFinished { mismatched, checked_bytes, elapsed_ms } => {
                let took = format!("{:.1} s", *elapsed_ms as f64 / 1000.0);
                if mismatched.is_empty() {
                    return format!("verify finished in {took}: {checked_bytes} bytes checked, both replicas match");
                }
                let bytes: u64 = mismatched.iter().map(|(_, len)| len).sum();
                // An event stays readable however much differs; the bitmap holds the rest.
                let mut ranges: Vec<String> =
                    mismatched.iter().take(VERIFY_RANGES_IN_EVENT).map(|(o, l)| format!("{o}+{l}")).collect();
                if mismatched.len() > VERIFY_RANGES_IN_EVENT {
                    ranges.push(format!("and {} more", mismatched.len() - VERIFY_RANGES_IN_EVENT));
                }
                format!(
                    "verify finished in {took}: {checked_bytes} bytes checked, {bytes} bytes in {} ranges differ from \
                     the peer (offset+length: {}); marked out of sync, the primary resyncs them",
                    mismatched.len(),
                    ranges.join(", ")
                )
            }
            other => format!("{other:?}"),
        }
    }

    /// The Kubernetes-style reason for this event (CamelCase) and whether it is a warning.
    pub fn reason(&self) -> (&'static str, bool) {
        match self {
            ReplicaEvent::Promoted { .. } => ("VolumePromoted", false),
            ReplicaEvent::Demoted => ("VolumeDemoted", false),
            ReplicaEvent::Fenced { .. } => ("VolumeFenced", true),
            ReplicaEvent::Connected { .. } => ("ReplicationConnected", false),
            ReplicaEvent::Disconnected { .. } => ("ReplicationDisconnected", true),
            ReplicaEvent::PeerRefused { .. } => ("ReplicationRefused", true),
            ReplicaEvent::SplitBrain { .. } => ("SplitBrain", true),
            ReplicaEvent::SyncStarted { .. } => ("ResyncStarted", false),
            ReplicaEvent::SyncFinished { .. } => ("ResyncFinished", false),
            ReplicaEvent::Discarded(d) if d.resolved_by == super::handshake::SUPERSEDED_LABEL => {
                ("SupersededWritesDiscarded", true)
            }
            ReplicaEvent::Discarded(_) => ("SplitBrainDiscarded", true),
            ReplicaEvent::VerifyFinished { mismatched, .. } => {
                if mismatched.is_empty() {
                    ("VerifyClean", false)
                } else {
                    ("VerifyMismatch", true)
                }
            }
            ReplicaEvent::DiskStateChanged { .. } => ("DiskStateChanged", false),
            ReplicaEvent::IoError { .. } => ("VolumeIoError", true),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::replication::machine::Snapshot;

    /// A sync target a quarter through its resync; other tests adjust the fields they need.
    pub(crate) fn snapshot() -> Snapshot {
        Snapshot {
            role: VolumeRole::Secondary,
            disk: DiskState::Inconsistent,
            connection: ConnectionState::SyncTarget,
            peer_disk: Some(DiskState::UpToDate),
            peer_role: Some(VolumeRole::Primary),
            out_of_sync_bytes: 3 << 20,
            sync: Some(SyncProgress {
                done_bytes: 1 << 20,
                total_bytes: 4 << 20,
                bytes_per_second: 1 << 20,
                eta_seconds: Some(3),
            }),
            verify: None,
            epoch: 4,
            fenced: false,
            split_brain: None,
            refused: None,
            crashed_primary: false,
            superseded: false,
            protocol_version: Some(2),
            generations: Generations::default(),
            last_discard: None,
            last_verify_mismatches: None,
            counters: Counters::default(),
            writes_allowed: false,
            reads_allowed: false,
        }
    }

    #[test]
    fn a_sync_target_reports_inconsistent_with_progress() {
        let s = ReplicaStatus::new("pgdata", "b", "a", snapshot());
        let r = s.report();
        assert_eq!(r.name, "pgdata");
        assert_eq!(r.disk_state, DiskState::Inconsistent);
        assert_eq!(r.connection, ConnectionState::SyncTarget);
        assert_eq!(r.out_of_sync_bytes, 3 << 20);
        assert_eq!(r.peer_disk_state, Some(DiskState::UpToDate));
        assert_eq!(r.sync.as_ref().map(|p| p.percent()), Some(25));
        assert_eq!(s.summary(), "Syncing 25%");
    }

    #[test]
    fn event_reasons_flag_warnings() {
        assert_eq!(ReplicaEvent::Demoted.reason(), ("VolumeDemoted", false));
        assert_eq!(ReplicaEvent::SplitBrain { reason: "x".into() }.reason(), ("SplitBrain", true));
        let clean = ReplicaEvent::VerifyFinished { mismatched: vec![], checked_bytes: 1, elapsed_ms: 1 };
        assert_eq!(clean.reason(), ("VerifyClean", false));
    }
}
