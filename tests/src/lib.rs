//! Cross-crate scenarios for hapair: the seeded simulation of the failover protocol, the
//! multi-host tests that build real hosts out of network namespaces, and the benchmarks.
//!
//! Nothing here ships; it drives the product crates from outside, as users and the network
//! would.
//!
//! - [`netns`]: hosts made of network namespaces, and drop guards for everything tests
//!   create (namespaces, links, processes, mounts, loop devices).
//! - [`replica_proc`]: replicated-volume nodes as `replica-harness` processes.
//! - [`nbd_client`]: a minimal NBD client for exact, and deliberately invalid, requests.

pub mod nbd_client;
pub mod netns;
pub mod replica_proc;
