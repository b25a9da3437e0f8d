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
//! - [`sim`]: the deterministic simulation of two failover engines and the witness on a
//!   faulty network and drifting clocks, with its safety, liveness and bounded-failover
//!   checks (run by `tests/simulation.rs`, measured by `bench-failover-sim`).

pub mod netns;
pub mod sim;
pub mod topology;
