//! What a replica tells whoever watches its I/O (the agent's metrics), without knowing
//! who that is: each request to its export as it starts and as it ends, with how long it
//! took as the NBD client sees it. For protocol C a write's time includes the peer's
//! acknowledgement; for protocol A, only the local disk.

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

/// Told of every export request. Called on the request's path: must not block.
pub trait IoObserver: Send + Sync + std::fmt::Debug {
    fn started(&self, kind: IoKind);
    fn finished(&self, kind: IoKind, took: Duration, ok: bool);
}
