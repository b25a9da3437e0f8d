//! The hapair API vocabulary, shared by the controller and the node agents.
//!
//! This crate defines what users write and what the two halves of the system say to each
//! other, and nothing that performs I/O:
//!
//! - [`hagroup`] and [`volume`]: the `HaGroup` and `ReplicatedVolume` custom resources
//!   (API group `hapair.dev`, version `v1alpha1`), their status types and defaults;
//! - [`drift`]: the clock-drift bound `L·(1+δ)`, which the agents and the witness must
//!   compute alike;
//! - [`validation`]: the semantic rules a schema cannot express, run by the controller
//!   and again by every agent;
//! - [`manifest`]: reading YAML manifests with API-server strictness, for standalone mode
//!   and for tests;
//! - [`nodeapi`]: the desired-config bundle, node report, witness lease and admin-action
//!   messages of the node API;
//! - [`crd`]: CRD generation (the `crdgen` binary writes them into the Helm chart);
//! - [`reference`]: the Markdown field reference generated from the CRD schemas
//!   (`crdgen --docs` writes it into `docs/reference/`);
//! - [`regular_file`]: the one piece of I/O here, reading a file a user points us at
//!   (a manifest, a bundle) without blocking on a FIFO or reading without bound, so the
//!   controller and the agents refuse such files alike.
//!
//! Reconciling, serving and deciding live elsewhere: in `hapair-operator` and `hapair-agent`.

pub mod condition;
pub mod crd;
pub mod drift;
pub mod duration;
pub mod hagroup;
pub mod manifest;
pub mod nodeapi;
pub mod quantity;
pub mod reference;
pub mod regular_file;
pub mod validation;
pub mod volume;

pub use duration::Duration;
pub use hagroup::{HaGroup, HaGroupSpec, HaGroupStatus};
pub use nodeapi::GroupKey;
pub use volume::{ReplicatedVolume, ReplicatedVolumeSpec, ReplicatedVolumeStatus};
