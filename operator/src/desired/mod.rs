//! The desired state, as a pure pipeline: manifests and the controller's memory in, one
//! desired-config bundle per node out.
//!
//! In: a snapshot of `HaGroup`, `ReplicatedVolume` and `Secret` objects (from a directory
//! or the API server) and the [`state::ControllerState`] kept across restarts. The
//! [`catalog`] checks each object and the set; [`resolve`] dereferences each group, falling
//! back to its last good config; [`bundle`] builds what each node of a group receives,
//! [`revision`] numbers it, [`retire`] decides what deleting a volume does to its
//! replicas, and [`actions`] carries admin actions to the agents. [`reconcile`] runs them
//! in that order. Out: the bundles, the errors with file, object and field, and the state
//! to save. [`describe`] is the human account of the same input (`hapair-operator plan`).
//!
//! Nothing here performs I/O except reading a manifest directory in [`catalog`]; time and
//! randomness are arguments.

pub mod actions;
pub mod bundle;
pub mod catalog;
pub mod describe;
pub mod reconcile;
pub mod resolve;
pub mod retire;
pub mod revision;
pub mod state;
