//! Per-handler tests of the engine, in the engine-test style: drive it with events at
//! chosen instants and assert the exact commands it emits.
//!
//! Commands are compared in a compact text form ([`render`]) that spells out every field
//! except the free text of event messages (type and reason are compared). The node under
//! test is `a` (incarnation 7); its peer is `b` (incarnation 3). Unless a test says
//! otherwise: heartbeat 100 ms, deadAfter 1 s, lease 800 ms, drift 1 % (so the wait after
//! a grant is 808 ms and the fence margin 200 ms), one link, the controller witness, and
//! the flow `data` (volume `data`), `app` (exec, checked, 2 restarts per minute),
//! `svc-ip` (the virtual IP).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod harness;
mod roles;
mod wire;

pub(super) use harness::*;
