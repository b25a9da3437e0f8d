//! Cross-crate scenarios for hapair: the seeded simulation of the failover protocol, the
//! multi-host tests that build real hosts out of network namespaces, and the benchmarks.
//!
//! Nothing here ships; it drives the product crates from outside, as users and the network
//! would.
