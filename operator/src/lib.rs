//! The hapair controller: reconciles `HaGroup` and `ReplicatedVolume` manifests into
//! per-node desired configs, and serves them to the node agents.
//!
//! The same reconcile code runs against two stores: the Kubernetes API (operator mode) and
//! a directory of manifests (standalone mode, the embedded default). This crate is the glue
//! around that core: loading and cross-checking manifests ([`catalog`]), describing what
//! they ask for ([`plan`]), and the witness that breaks ties while a pair's heartbeats fail
//! ([`witness`], a pure state machine the node API serves). Deciding who is primary is not
//! done here; the agents do that, and the witness only arbitrates leases.

pub mod catalog;
pub mod plan;
pub mod witness;
