//! The little the engine must remember across restarts.
//!
//! Only what safety or idempotency needs survives a restart: the highest epoch seen (a
//! restarted node never acts in, nor accepts, an older epoch), the highest epoch it
//! proposed or granted (it never proposes or grants the same epoch twice), the peer's incarnation
//! (replayed heartbeats of an older incarnation stay refused), an admin maintenance
//! override, and the ids of finished admin actions (an action redelivered after a restart
//! is not executed twice).
//!
//! Leases are persisted only as a lower bound, for one purpose: an agent that restarts
//! (crash, upgrade) while the machine keeps running must not flap the service it serves.
//! [`ServingLease`] records, while the flow is up, the epoch and (a lower bound of) the
//! end of the lease it serves under, on the local monotonic clock. A restarted engine
//! given such a record resumes as primary when the lease is still good (see
//! `Engine::new`); otherwise it holds none and behaves as if it had granted the peer a
//! lease just before it went down. The instants are meaningful only within one boot of
//! the machine: the runtime drops the record when the boot changed.

use serde::{Deserialize, Serialize};

/// How many finished admin action ids are remembered.
pub const FINISHED_ACTIONS_KEPT: usize = 32;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PersistedState {
    /// Highest epoch in which this node, or its peer, is known to have acted (the term).
    #[serde(default)]
    pub epoch: u64,
    /// Highest epoch this node proposed, granted a proposal for, or acted in (≥ `epoch`).
    #[serde(default)]
    pub floor: u64,
    /// The peer's newest incarnation seen.
    #[serde(default)]
    pub peer_incarnation: u64,
    /// Maintenance set by an admin action; `None` follows `spec.maintenance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<bool>,
    /// Admin actions already finished here, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finished_actions: Vec<String>,
    /// Set while this node serves with its flow up; cleared (durably) before it starts
    /// taking anything down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<ServingLease>,
}

/// A serving node's lease, as far as a restarted agent may rely on it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServingLease {
    /// The epoch the node serves in.
    pub epoch: u64,
    /// No later than the end of the lease it serves under, in nanoseconds on the local
    /// monotonic clock (the engine's `Instant`). The lease only ever moves forward while
    /// the node serves, so an older record is a safe under-estimate.
    pub lease_end_nanos: u64,
    /// The flow's steps in order; a restarted engine with another flow does not resume.
    pub steps: Vec<String>,
}
