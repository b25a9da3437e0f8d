//! The seam between the node API and the witness: the `/v1/witness/lease` endpoint checks
//! who is asking and for which group, then hands the request to a [`LeaseAuthority`].
//!
//! The authority (the witness state machine) decides grants; it is pure, with the monotonic
//! time since the controller started as input, and it waits out `L·(1+drift)` after a
//! restart because it may have forgotten a holder.

use std::time::Duration;

use hapair_crds::HaGroupSpec;
use hapair_crds::hagroup::WitnessMode;
use hapair_crds::nodeapi::{LeaseOp, LeaseRequest, LeaseResponse};

pub use crate::witness::LeaseParams;

impl LeaseParams {
    /// The lease rules of one group, from its spec.
    pub fn from_spec(spec: &HaGroupSpec) -> Self {
        LeaseParams { ttl: spec.heartbeat.lease_ttl.as_std(), max_clock_drift_ppm: spec.heartbeat.max_clock_drift_ppm }
    }
}

/// Decides lease requests for every group (one witness serves them all).
pub trait LeaseAuthority: Send {
    /// `now` is monotonic time since the authority was created.
    fn handle(&mut self, now: Duration, request: &LeaseRequest, params: LeaseParams) -> LeaseResponse;

    /// Raises a group's highest epoch after a restart, from its persisted status, so a
    /// restarted authority never grants an epoch that already served.
    fn restore_epoch(&mut self, _group: &hapair_crds::GroupKey, _epoch: u64) {}

    /// What a successor must know of `group` after a decision (see
    /// [`crate::witness::LeaseRecord`]); `None` when the authority keeps nothing for it.
    fn record(&self, _group: &hapair_crds::GroupKey) -> Option<crate::witness::LeaseRecord> {
        None
    }
}

impl LeaseAuthority for crate::witness::Witness {
    fn handle(&mut self, now: Duration, request: &LeaseRequest, params: LeaseParams) -> LeaseResponse {
        crate::witness::Witness::handle(self, now, request, params)
    }

    fn restore_epoch(&mut self, group: &hapair_crds::GroupKey, epoch: u64) {
        crate::witness::Witness::restore_epoch(self, group, epoch)
    }

    fn record(&self, group: &hapair_crds::GroupKey) -> Option<crate::witness::LeaseRecord> {
        crate::witness::Witness::record(self, group)
    }
}

/// Where the node API records each grant and release before answering it, so that a
/// successor controller honours it ([`crate::witness::Witness::resume`]).
pub trait LeaseJournal: Send + Sync {
    /// Durably records `record` as `group`'s lease, or fails (this controller may no
    /// longer lead); the answer waits for it.
    fn write<'a>(
        &'a self,
        group: &'a hapair_crds::GroupKey,
        record: &'a crate::witness::LeaseRecord,
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;
}

/// Why a lease request is not handed to the authority at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRefusal {
    #[error("node {cert:?} cannot ask for a lease on behalf of {requested:?}")]
    OtherNode { cert: String, requested: String },
    #[error("no HaGroup {0}")]
    UnknownGroup(String),
    #[error("node {node:?} is not a node of HaGroup {group}")]
    NotAMember { node: String, group: String },
    #[error("HaGroup {0} has witness mode none: it fails over without a witness")]
    NoWitness(String),
    #[error("HaGroup {0} is being deleted")]
    Deleting(String),
}

/// Checks that the caller (certificate name `cert`) may ask for this lease, and returns the
/// group's lease parameters.
pub fn admit(
    cert: &str,
    request: &LeaseRequest,
    spec: Option<&HaGroupSpec>,
    deleting: bool,
) -> Result<LeaseParams, LeaseRefusal> {
    if request.node != cert {
        return Err(LeaseRefusal::OtherNode { cert: cert.to_string(), requested: request.node.clone() });
    }
    let group = request.group.to_string();
    let Some(spec) = spec else { return Err(LeaseRefusal::UnknownGroup(group)) };
    if !spec.nodes.iter().any(|n| n.name == cert) {
        return Err(LeaseRefusal::NotAMember { node: cert.to_string(), group });
    }
    if spec.witness.mode == WitnessMode::None {
        return Err(LeaseRefusal::NoWitness(group));
    }
    // Giving a lease back is always allowed: a node cleaning up a deleted group does it.
    if deleting && request.op != LeaseOp::Release {
        return Err(LeaseRefusal::Deleting(group));
    }
    Ok(LeaseParams::from_spec(spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapair_crds::nodeapi::GroupKey;

    fn spec(witness: &str) -> HaGroupSpec {
        serde_yaml::from_str(&format!(
            "nodes: [{{name: a, heartbeatAddresses: [198.18.1.1]}}, {{name: b, heartbeatAddresses: [198.18.1.2]}}]\nwitness: {{mode: {witness}}}\nheartbeat: {{leaseTTL: 600ms, maxClockDriftPpm: 500}}"
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn request(node: &str) -> LeaseRequest {
        LeaseRequest {
            group: GroupKey::new("default", "g"),
            node: node.into(),
            op: LeaseOp::Acquire,
            epoch: 2,
            ttl_ms: 600,
        }
    }

    #[test]
    fn params_come_from_the_heartbeat_spec() {
        let params = admit("a", &request("a"), Some(&spec("controller")), false);
        assert_eq!(params, Ok(LeaseParams { ttl: Duration::from_millis(600), max_clock_drift_ppm: 500 }));
    }

    #[test]
    fn refuses_impersonation_strangers_unknown_groups_and_witnessless_groups() {
        let s = spec("controller");
        assert!(matches!(admit("a", &request("b"), Some(&s), false), Err(LeaseRefusal::OtherNode { .. })));
        assert!(matches!(admit("c", &request("c"), Some(&s), false), Err(LeaseRefusal::NotAMember { .. })));
        assert!(matches!(admit("a", &request("a"), None, false), Err(LeaseRefusal::UnknownGroup(_))));
        assert!(matches!(admit("a", &request("a"), Some(&spec("none")), false), Err(LeaseRefusal::NoWitness(_))));
        assert!(matches!(admit("a", &request("a"), Some(&s), true), Err(LeaseRefusal::Deleting(_))));
        let release = LeaseRequest { op: LeaseOp::Release, ..request("a") };
        assert!(admit("a", &release, Some(&s), true).is_ok());
    }

    #[test]
    fn an_admitted_request_with_an_absurd_epoch_is_refused_by_the_witness() {
        // Admission knows members, not epochs: the authority behind it refuses.
        let absurd = LeaseRequest { epoch: u64::MAX, ..request("a") };
        let params = admit("a", &absurd, Some(&spec("controller")), false).unwrap_or_else(|e| panic!("{e}"));
        let mut authority: Box<dyn LeaseAuthority> = Box::new(crate::witness::Witness::new(Duration::ZERO));
        authority.restore_epoch(&absurd.group, 41);
        assert_eq!(
            authority.handle(Duration::from_secs(10), &absurd, params),
            LeaseResponse::Denied {
                holder: None,
                retry_after_ms: 600,
                reason: "epoch: 18446744073709551615 from node \"a\" is more than 4294967296 above the highest epoch of HaGroup default/g (41); refused".into(),
            }
        );
        let sane = LeaseRequest { epoch: 2, ..request("a") };
        assert_eq!(
            authority.handle(Duration::from_secs(10), &sane, params),
            LeaseResponse::Granted { holder: "a".into(), ttl_ms: 600, epoch: 42 }
        );
    }
}
