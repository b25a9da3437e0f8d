//! The roles a node moves through, and how they are reported.
//!
//! ```text
//!            peer silent ≥ D + witness grant + L·(1+δ) since last grant
//!            or peer consent (bootstrap, switchover, failback)
//!  Standby ───────────────────────────────▶ Promoting ──flow up──▶ Primary
//!     ▲  ▲                                    │  (candidate until it acts)  │
//!     │  └──────── candidacy aborted ─────────┘                             │
//!     │                                                                     │
//!     ├─── flow down ◀── Demoting ◀── switchover / failback / newer epoch ──┤
//!     │                                                                     │
//!     └─── peer heard ◀── Fenced ◀── lease (nearly) expired ────────────────┘
//! ```
//!
//! Maintenance is not a role of its own inside the engine: it freezes automatic actions
//! whatever the role, and a node in maintenance keeps serving if it was serving. Reports
//! show `Maintenance` ([`report_role`]) so the pair's state reads at a glance.

use hapair_crds::hagroup::NodeRole;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Holds nothing; grants the peer its lease while the peer serves.
    Standby,
    /// Wants to serve: no longer grants, waits for a lease (and, once it has one, starts
    /// the flow).
    Promoting,
    /// Serves: holds a lease, the volumes, the flow and the virtual IPs.
    Primary,
    /// Stops serving on purpose (switchover, failback, newer primary), keeping its lease
    /// until everything is down.
    Demoting,
    /// Lost its lease: stops (or has stopped) everything and waits to hear from the peer
    /// or the witness.
    Fenced,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        self.node_role().as_str()
    }

    /// The role in the node-API vocabulary.
    pub fn node_role(&self) -> NodeRole {
        match self {
            Role::Standby => NodeRole::Standby,
            Role::Promoting => NodeRole::Promoting,
            Role::Primary => NodeRole::Primary,
            Role::Demoting => NodeRole::Demoting,
            Role::Fenced => NodeRole::Fenced,
        }
    }

    /// Roles whose heartbeats the peer acknowledges as lease grants.
    pub fn wants_lease(&self) -> bool {
        matches!(self, Role::Promoting | Role::Primary | Role::Demoting)
    }
}

/// The role to report: `Maintenance` while automatic actions are frozen.
pub fn report_role(role: Role, maintenance: bool) -> NodeRole {
    if maintenance { NodeRole::Maintenance } else { role.node_role() }
}
