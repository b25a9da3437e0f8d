//! Cross-crate scenarios for hapair: the seeded simulation of the failover protocol, the
//! multi-host tests that build real hosts out of network namespaces, and the benchmarks.
//!
//! Nothing here ships; it drives the product crates from outside, as users and the network
//! would.
//!
//! - [`sim`]: the deterministic simulation of two failover engines and the witness on a
//!   faulty network and drifting clocks, with its safety, liveness and bounded-failover
//!   checks (run by `tests/simulation.rs`, measured by `bench-failover-sim`).

pub mod sim;
