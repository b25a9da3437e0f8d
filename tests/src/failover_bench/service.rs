//! The service every HA implementation under test keeps reachable on the virtual IP: a TCP
//! listener that answers each connection with its node's name and closes it, so the client
//! can tell which server answered. It is a separate process (`bench-failover serve`), so
//! killing a node kills it with everything else in that namespace.
//!
//! Given a counter file (on the replicated volume, in the full-stack rows) the service also
//! writes: each connection increments the counter, and the answer, `NAME N`, is sent only
//! once the new value is durable (file and directory fsynced). Every answer the client
//! receives is therefore an acknowledged write, and the survivor's first answer tells
//! whether any of them was lost.

use std::fs::File;
use std::io::Write;
use std::net::{Ipv6Addr, TcpListener};
use std::path::Path;

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("binding [::]:{port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("accepting a connection: {0}")]
    Accept(std::io::Error),
    #[error("going to the background: {0}")]
    Fork(nix::Error),
    #[error("writing the pid file {path}: {source}")]
    PidFile { path: String, source: std::io::Error },
}

/// Binds the service port on every address of the namespace, IPv4 and IPv6 (a dual-stack
/// socket: Linux's default `bindv6only=0`), the virtual IP included whenever it arrives.
pub fn bind(port: u16) -> Result<TcpListener, ServiceError> {
    TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).map_err(|source| ServiceError::Bind { port, source })
}

/// Answers every connection with `name` and a newline, forever; with a `counter`, with
/// `name`, the counter's new value and a newline, after making that value durable. A
/// connection whose write fails is closed unanswered: it was not acknowledged.
pub fn serve(listener: &TcpListener, name: &str, counter: Option<&Path>) -> Result<(), ServiceError> {
    loop {
        match listener.accept() {
            // A client that gave up already is no reason to stop serving the others.
            Ok((mut stream, _)) => {
                let reply = match counter {
                    None => Some(format!("{name}\n")),
                    Some(path) => increment(path).ok().map(|n| format!("{name} {n}\n")),
                };
                if let Some(reply) = reply {
                    let _ = stream.write_all(reply.as_bytes());
                }
            }
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(ServiceError::Accept(e)),
        }
    }
}

/// Adds one to the number in `path` (0 when there is none yet) and returns the new value
/// once it is durable: written to a temporary file, fsynced, renamed over `path`, and the
/// directory fsynced.
pub fn increment(path: &Path) -> std::io::Result<u64> {
    let current = match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let next = current + 1;
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary)?;
    file.write_all(format!("{next}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(next)
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
pub fn daemonize(
    listener: &TcpListener,
    name: &str,
    counter: Option<&Path>,
    pid_file: &Path,
) -> Result<(), ServiceError> {
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
            serve(listener, name, counter)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_starts_at_one_counts_up_and_refuses_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("visits");
        assert_eq!(increment(&path).unwrap(), 1);
        assert_eq!(increment(&path).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "2\n");
        std::fs::write(&path, "two\n").unwrap();
        let error = increment(&path).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n", "a refused value is left as it was");
    }
}
