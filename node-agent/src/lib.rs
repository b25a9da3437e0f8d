//! The hapair node agent: the daemon that runs on each server of a pair.
//!
//! The agent is split the way the design asks: a pure decision engine that turns events
//! into commands, and I/O adapters that execute those commands and turn the world back
//! into events.
//!
//! - [`runtime`]: `hapair-agent run`, the daemon: config sources (controller long-poll or
//!   bundle file), one task per group owning its engine and executing its commands with
//!   the adapters below, local state, reports to the controller, endpoints; configured by
//!   [`agent_config`] (`/etc/hapair/agent.yaml`).
//! - [`bundle`]: checking a desired-config bundle before anything acts on it.
//! - [`enroll`]: `hapair-agent enroll`, trading a one-time token for the node's client
//!   certificate and writing the controller connection settings.
//! - I/O adapters the runtime drives for the engine: [`heartbeat`] (authenticated UDP
//!   envelopes per link, drop reasons, per-link loss), [`vip`] (rtnetlink addresses,
//!   gratuitous ARP / unsolicited NA, built on [`iface`] and [`arp`]), [`flow`] (exec,
//!   systemd and virtual-IP step executors and checks),
//!   [`probe`] (process, link, gateway, CPU/memory, mount detectors and monitor state),
//!   [`state`] (atomic, checksummed state directory), [`metrics`] and [`endpoints`]
//!   (`/healthz`, `/metrics`, `/v1/status`).
//! - [`engine`]: the failover decision engine (sans-IO): who is primary, leases, epochs,
//!   self-fencing, flow order, restarts, failback and admin actions; plus the heartbeat
//!   message the engines exchange.
//! - [`replication`]: DRBD-style block replication of a `ReplicatedVolume` (sans-IO state
//!   machine, metadata, wire protocol, and the [`replication::replica::Replica`] driver).
//! - [`protocol`]: the wire-protocol versions this agent speaks and how two sides agree
//!   on one (see docs/upgrades.md, "Version skew policy").
//! - [`nbd`]: the NBD export the primary serves its replicated volume on.
//! - [`volume_step`]: attach, filesystem and mount pieces of the `volume` flow step.
//!
//! The engine never touches a socket, a clock or a file; the adapters never decide who is
//! primary. Talking to Kubernetes is not this crate's business: the agent only speaks the
//! node API (`hapair_crds::nodeapi`) to a controller.

pub mod agent_config;
pub mod arp;
pub mod bundle;
pub mod endpoints;
pub mod engine;
pub mod enroll;
pub mod flow;
pub mod heartbeat;
pub mod iface;
pub mod metrics;
pub mod nbd;
pub mod probe;
pub mod protocol;
pub mod replication;
pub mod runtime;
pub mod state;
pub mod vip;
pub mod volume_step;
