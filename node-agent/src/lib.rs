//! The hapair node agent: the daemon that runs on each server of a pair.
//!
//! The agent is split the way the design asks: a pure decision engine that turns events
//! into commands, and I/O adapters that execute those commands and turn the world back
//! into events.
//!
//! - [`bundle`]: checking a desired-config bundle before anything acts on it.
//! - [`replication`]: DRBD-style block replication of a `ReplicatedVolume` (sans-IO state
//!   machine, metadata, wire protocol, and the [`replication::replica::Replica`] driver).
//! - [`nbd`]: the NBD export the primary serves its replicated volume on.
//! - [`volume_step`]: attach, filesystem and mount pieces of the `volume` flow step.
//!
//! The engine never touches a socket, a clock or a file; the adapters never decide who is
//! primary. Talking to Kubernetes is not this crate's business: the agent only speaks the
//! node API (`hapair_crds::nodeapi`) to a controller.

pub mod bundle;
pub mod nbd;
pub mod replication;
pub mod volume_step;
