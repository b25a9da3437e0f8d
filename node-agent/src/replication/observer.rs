//! What a replica tells whoever watches its I/O (the agent's metrics), without knowing
//! who that is: each request to its export as it starts and as it ends, with how long it
//! took as the NBD client sees it. For protocol C a write's time includes the peer's
//! acknowledgement; for protocol A, only the local disk. The two parts of a write are
//! timed apart too ([`IoStage`]), so a slow write says which side was slow.

use std::time::Duration;

/// The kinds of export request that are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Zero,
}

impl IoKind {
    pub const ALL: [IoKind; 4] = [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Zero];

    pub fn as_str(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Zero => "zero",
        }
    }
}

/// The two halves of a replicated write or flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStage {
    /// From its submission to the ordered disk thread until the local disk finished it
    /// (with the `fdatasync` for FUA writes and flushes): queueing behind earlier writes
    /// and activity-log updates included.
    Local,
    /// From the frame leaving for the peer until the peer's acknowledgement arrived: the
    /// network both ways and the peer's own disk.
    Peer,
}

impl IoStage {
    pub const ALL: [IoStage; 2] = [IoStage::Local, IoStage::Peer];

    pub fn as_str(self) -> &'static str {
        match self {
            IoStage::Local => "local",
            IoStage::Peer => "peer",
        }
    }
}

/// Told of every export request. Called on the request's path: must not block.
pub trait IoObserver: Send + Sync + std::fmt::Debug {
    fn started(&self, kind: IoKind);
    fn finished(&self, kind: IoKind, took: Duration, ok: bool);
    /// One half of an application write, zero or flush took `took`.
    fn stage(&self, stage: IoStage, took: Duration);
}
