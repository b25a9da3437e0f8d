//! The little the engine must remember across restarts.
//!
//! Only what safety or idempotency needs survives a restart: the highest epoch seen (a
//! restarted node never acts in, nor accepts, an older epoch), the highest epoch it
//! proposed or granted (it never proposes or grants the same epoch twice), the peer's incarnation
//! (replayed heartbeats of an older incarnation stay refused), an admin maintenance
//! override, and the ids of finished admin actions (an action redelivered after a restart
//! is not executed twice). Leases are *not* persisted: a restarted engine holds none, and
//! behaves as if it had granted the peer a lease just before it went down.

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
}
