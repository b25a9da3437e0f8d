//! Cross-crate scenarios for hapair: the seeded simulation of the failover protocol, the
//! multi-host tests that build real hosts out of network namespaces, and the benchmarks.
//!
//! Nothing here ships; it drives the product crates from outside, as users and the network
//! would.
//!
//! - [`netns`]: drop guards for network namespaces, veth pairs, bridges, addresses and
//!   child processes, with unique names per test process; code under test runs inside a
//!   namespace on a thread that joined it.
//! - [`topology`]: ready-made networks: two servers with two links and a client, and a
//!   linked pair whose link can be cut and healed.
//! - [`agents`]: real `hapair-agent` processes in those namespaces (built binaries,
//!   bundles, `/v1/status` and `/metrics` read from inside the namespace).
//! - [`client_loop`]: a client connecting to the VIP every 5 ms, recording who answered.
//! - [`controller`]: the standalone controller (and witness) as a real process, agents
//!   enrolled against it, and its admin API and `kubectl-hapair` driven as a user would.
//! - [`enrolled_pair`]: a pair as an operator runs it (controller, enrolled agents, a
//!   service behind a VIP, optionally a replicated volume), driven with `kubectl-hapair`.
//! - [`etcd`]: a real etcd cluster, one member per namespace, for the controllers that
//!   share it (`standalone --etcd`).
//! - [`mounts`]: guards for mounts, loop devices and nbdfuse attachments.
//! - [`sim`]: the deterministic simulation of two failover engines and the witness on a
//!   faulty network and drifting clocks, with its safety, liveness and bounded-failover
//!   checks (run by `tests/simulation.rs`, measured by `bench-failover-sim`).
//! - [`replica_proc`]: replicated-volume nodes as `replica-harness` processes.
//! - [`nbd_client`]: a minimal NBD client for exact, and deliberately invalid, requests.
//! - [`failover_bench`]: the `failover` benchmark's harness (kill the primary of a real pair,
//!   time the client until the other server answers on the VIP), with hapair and
//!   keepalived behind one trait; run by `bench-failover`.
//! - [`simulated_reports`]: reports of a settled pair, for benchmarks that stand in for agents.
//! - [`fake_kube`]: an in-process stand-in for the Kubernetes API server (the one thing
//!   tests may mock), for the operator's scale benchmark and multi-replica tests.

pub mod agents;
pub mod client_loop;
pub mod controller;
pub mod enrolled_pair;
pub mod etcd;
pub mod failover_bench;
pub mod fake_kube;
pub mod mounts;
pub mod nbd_client;
pub mod netns;
pub mod replica_proc;
pub mod sim;
pub mod simulated_reports;
pub mod soak;
pub mod topology;
