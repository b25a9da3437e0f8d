//! Cross-crate scenarios for hapair: the seeded simulation of the failover protocol, the
//! multi-host tests that build real hosts out of network namespaces, and the benchmarks.
//!
//! Nothing here ships; it drives the product crates from outside, as users and the network
//! would.
//!
//! - [`netns`]: drop guards for network namespaces, veth pairs, bridges, addresses, child
//!   processes and mounts, with unique names per test process; code under test runs inside
//!   a namespace on a thread that joined it.
//! - [`topology`]: ready-made networks such as two servers with two links and a client.
//! - [`fake_kube`]: an in-process stand-in for the Kubernetes API server (the one thing
//!   tests may mock), for the operator's scale benchmark.

pub mod fake_kube;
pub mod netns;
pub mod topology;
