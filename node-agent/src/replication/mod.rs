//! DRBD-style block replication between the two nodes of a group.
//!
//! The decision logic is sans-IO and lives in small modules: [`generation`] (data
//! histories), [`handshake`] and [`split_brain`] (what a connection does), [`resync`] and
//! [`verify`] (planning), [`activity_log`] and [`bitmap`] (what may differ), all driven by
//! the state machine in [`machine`]. The on-disk format is [`metadata`], read and created
//! by [`store`]; [`wire`] is the replication protocol. [`observer`] is how the export's
//! requests are timed for metrics.

pub mod activity_log;
pub mod bitmap;
pub mod disk;
pub mod generation;
pub mod geometry;
pub mod handshake;
pub mod link;
pub mod machine;
pub mod metadata;
pub mod observer;
pub mod replica;
pub mod resync;
pub mod split_brain;
pub mod status;
pub mod store;
pub mod tls;
pub mod verify;
pub mod wipe;
pub mod wire;
