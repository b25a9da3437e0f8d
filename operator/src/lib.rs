//! The hapair controller: reconciles `HaGroup` and `ReplicatedVolume` manifests into
//! per-node desired configs, and serves them to the node agents.
//!
//! The same reconcile code runs against two stores: the Kubernetes API (operator mode) and
//! a directory of manifests (standalone mode, the embedded default). Deciding who is
//! primary is not done here; the agents do that, and the witness only arbitrates leases.
//!
//! - [`catalog`] and [`plan`]: loading and cross-checking manifests, and describing what
//!   they ask for;
//! - [`reconcile`]: the pure core (with [`resolve`], [`build`], [`revision`]): a snapshot
//!   and the controller's [`state`] in, one desired-config bundle per node out;
//! - [`aggregate`]: the pure status aggregation from the agents' reports; [`events`] keeps
//!   each group's recent events and [`actions`] the admin actions' bookkeeping;
//! - [`store`] (trait, with the standalone [`file_store`]) and [`publish`]: the only places
//!   reconcile touches the outside world; [`controller`] runs the loop around them;
//! - [`pki`] and [`tokens`]: the controller's CA, certificates and one-time enrollment
//!   tokens; [`lease`]: the seam to the witness;
//! - [`witness`]: the pure lease state machine that breaks ties while a pair's heartbeats
//!   fail;
//! - [`server`]: the node API over HTTPS with mutual TLS, and [`metrics`];
//! - [`standalone`]: `hapair-operator standalone`, watching a manifest directory;
//! - [`k8s`]: `hapair-operator run`, the Kubernetes operator: the same core with the API
//!   server as its store, kube-runtime controllers, leader election and the fenced witness;
//! - [`cli`] and [`adminapi`]: `kubectl-hapair` / `hapair` and the admin API it speaks;
//! - [`allocator`]: keeping the C allocator's arenas from tripling the resident set.

pub mod actions;
pub mod adminapi;
pub mod aggregate;
pub mod allocator;
pub mod atomic_file;
pub mod build;
pub mod catalog;
pub mod cli;
pub mod controller;
pub mod events;
pub mod file_store;
pub mod k8s;
pub mod lease;
pub mod metrics;
pub mod pki;
pub mod plan;
pub mod publish;
pub mod reconcile;
pub mod resolve;
pub mod retire;
pub mod revision;
pub mod server;
pub mod standalone;
pub mod state;
pub mod store;
pub mod timestamp;
pub mod tokens;
pub mod witness;
