//! The NBD export: the fixed-newstyle protocol ([`proto`], sans-IO), the server that runs
//! it on Unix and loopback TCP sockets ([`server`]), and what it serves ([`export`]).

pub mod export;
pub mod proto;
pub mod server;
