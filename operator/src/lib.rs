//! The hapair controller: reconciles `HaGroup` and `ReplicatedVolume` manifests into
//! per-node desired configs, and serves them to the node agents.
//!
//! The same reconcile code runs against two stores: the Kubernetes API (operator mode) and
//! a directory of manifests (standalone mode, the embedded default). Deciding who is
//! primary is not done here; the agents do that, and the witness only arbitrates leases.
//!
//! Each folder is one stage of the data flow, in the order data moves through them:
//!
//! - [`desired`]: the pure pipeline from manifests and the controller's memory to one
//!   desired-config bundle per node (catalog → resolve → bundle → revision);
//! - [`controller`]: the loop around it, with its [`controller::store::Store`] interface,
//!   the published bundles the agents long-poll, and the Prometheus metrics;
//! - [`status`]: the agents' reports folded into group and volume statuses and events;
//! - [`server`]: the node API and the admin API over HTTPS with mutual TLS;
//! - [`console`]: the web console on the same listener, for people signed in with a token;
//! - [`witness`]: the pure lease state machine that breaks ties while a pair's heartbeats
//!   fail, and [`witness::lease`], the seam through which the server reaches it;
//! - [`pki`]: the controller's CA, certificates and one-time enrollment tokens;
//! - [`standalone`]: `hapair-operator standalone`, a manifest directory and a file store;
//! - [`etcd`]: `hapair-operator standalone --etcd`, several standalone controllers sharing
//!   etcd, one leading, with fenced writes and a witness its successor honours;
//! - [`k8s`]: `hapair-operator run`, the Kubernetes operator: the same core with the API
//!   server as its store, kube-runtime controllers, leader election and the fenced witness;
//! - [`cli`]: `kubectl-hapair` / `hapair`;
//! - [`support`]: atomic files, timestamps and the allocator setting the others share.

pub mod cli;
pub mod console;
pub mod controller;
pub mod desired;
pub mod etcd;
pub mod k8s;
pub mod pki;
pub mod server;
pub mod standalone;
pub mod status;
pub mod support;
pub mod witness;
