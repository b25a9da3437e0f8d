//! The hapair node agent: the daemon that runs on each server of a pair.
//!
//! The agent is split the way the design asks: a pure decision engine that turns events
//! into commands, and I/O adapters that execute those commands and turn the world back
//! into events.
//!
//! - [`bundle`]: checking a desired-config bundle before anything acts on it.
//!
//! The engine never touches a socket, a clock or a file; the adapters never decide who is
//! primary. Talking to Kubernetes is not this crate's business: the agent only speaks the
//! node API (`hapair_crds::nodeapi`) to a controller.

pub mod bundle;
pub mod nbd;
pub mod replication;
