//! Small pieces the stages share and that belong to none of them.
//!
//! [`atomic_file`] writes JSON files that a crash never leaves half-written,
//! [`timestamp`] formats wall-clock times for statuses and events, [`hex`] spells digests,
//! and [`allocator`] keeps
//! the C allocator's arenas from tripling the controller's resident set. None of them knows
//! about groups, nodes or manifests.

pub mod allocator;
pub mod atomic_file;
pub mod hex;
pub mod timestamp;
