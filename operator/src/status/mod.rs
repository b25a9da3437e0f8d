//! What the agents report, turned into what users read.
//!
//! In: the node reports the agents send (role, epoch, links, flow steps, volumes, events)
//! and the plan the reconcile produced. [`group`] and [`volume`] fold them into each
//! group's and volume's status (phase, active node, sync, conditions, last failover), as
//! pure functions; [`transitions`] says which changes between two statuses deserve an event;
//! [`events`] keeps each group's recent events, bounded in number and size.
//! [`usage`] keeps each node's CPU and memory use over the last hour for the console.
//! Out: statuses and events, which the controller writes through its store.

pub mod events;
pub mod group;
pub mod transitions;
pub mod usage;
pub mod volume;
