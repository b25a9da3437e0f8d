//! The service every HA implementation under test keeps reachable on the virtual IP: a TCP
//! listener that answers each connection with its node's name and closes it, so the client
//! can tell which server answered. It is a separate process (`bench-failover serve`), so
//! killing a node kills it with everything else in that namespace.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("binding 0.0.0.0:{port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("accepting a connection: {0}")]
    Accept(std::io::Error),
    #[error("going to the background: {0}")]
    Fork(nix::Error),
    #[error("writing the pid file {path}: {source}")]
    PidFile { path: String, source: std::io::Error },
}

/// Binds the service port on every address of the namespace, the virtual IP included
/// whenever it arrives.
pub fn bind(port: u16) -> Result<TcpListener, ServiceError> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|source| ServiceError::Bind { port, source })
}

/// Answers every connection with `name` and a newline, forever.
pub fn serve(listener: &TcpListener, name: &str) -> Result<(), ServiceError> {
    let reply = format!("{name}\n");
    loop {
        match listener.accept() {
            // A client that gave up already is no reason to stop serving the others.
            Ok((mut stream, _)) => {
                let _ = stream.write_all(reply.as_bytes());
            }
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(ServiceError::Accept(e)),
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}

/// Continues in a background child process that owns `listener`; the calling process
/// writes the child's pid to `pid_file` and returns, so whoever started it (a flow step's
/// start command) knows the port is bound by the time it exits.
///
/// Must be called while the process has a single thread.
pub fn daemonize(listener: &TcpListener, name: &str, pid_file: &Path) -> Result<(), ServiceError> {
    use nix::unistd::{ForkResult, fork, setsid};
    // SAFETY: the caller guarantees the process is single-threaded, so the child's copy of
    // the address space is consistent and it may allocate freely.
    match unsafe { fork() }.map_err(ServiceError::Fork)? {
        ForkResult::Parent { child } => {
            let temporary = pid_file.with_extension("tmp");
            let path = pid_file.display().to_string();
            std::fs::write(&temporary, format!("{child}\n"))
                .and_then(|()| std::fs::rename(&temporary, pid_file))
                .map_err(|source| ServiceError::PidFile { path, source })
        }
        ForkResult::Child => {
            // Out of the starter's session, so the step's process group ending leaves it be.
            let _ = setsid();
            serve(listener, name)
        }
    }
}
