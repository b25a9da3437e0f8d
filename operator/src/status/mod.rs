//! What the agents report, turned into what users read.
//!
//! In: the node reports the agents send (role, epoch, links, flow steps, volumes, events)
//! and the plan the reconcile produced. [`aggregate`] folds them into each group's and
//! volume's status (phase, active node, sync, conditions, last failover), as a pure
//! function; [`events`] keeps each group's recent events, bounded in number and size.
//! Out: statuses and events, which the controller writes through its store.

pub mod aggregate;
pub mod events;
