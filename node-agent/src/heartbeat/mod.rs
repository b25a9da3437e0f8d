//! Heartbeat transport: authenticated UDP envelopes on every link.
//!
//! The engine decides what a heartbeat says; this module only carries it. Each datagram
//! is an [`envelope`] (fixed header + the engine's opaque payload + HMAC-SHA256 trailer),
//! checked on arrival by a [`verify::Verifier`] that classifies every drop, with per-link
//! [`loss`] accounting so a dead link is noticed even while the other one carries on.

pub mod envelope;
pub mod key;
pub mod loss;
pub mod replay;
pub mod transport;
pub mod verify;

pub use envelope::{GroupId, Header, NodeId};
pub use key::{HmacKey, KeyError};
pub use transport::{
    Heartbeat, HeartbeatReceiver, HeartbeatSender, LinkEndpoints, TransportConfig, TransportError, bind, from_sockets,
    link_endpoints, next_incarnation,
};
pub use verify::{DropCounts, DropReason};
