//! The NBD server: accepts clients on a Unix socket (and optionally loopback TCP), runs
//! each one's [`Session`] and executes its commands against a [`BlockExport`].
//!
//! Commands of one client run concurrently (up to [`MAX_IN_FLIGHT`]) and are answered in
//! completion order, as the protocol allows. A client that breaks the protocol loses its
//! connection; the server and other clients carry on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::export::{BlockExport, ExportError};
use super::proto::{self, Action, Command, Errno, ExportInfo, Op, Session};

/// Commands one client may have in flight.
pub const MAX_IN_FLIGHT: usize = 64;
/// Largest zero/trim handed to the export at once.
const ZERO_CHUNK: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("NBD socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD TCP address {0} is not a loopback address")]
    NotLoopback(SocketAddr),
}

/// A running server; dropping it (or calling [`NbdServer::stop`]) stops accepting and
/// closes client connections.
#[derive(Debug)]
pub struct NbdServer {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl NbdServer {
    /// Serves `export` on a Unix socket at `path` (replacing a stale socket file) and,
    /// when given, on a loopback TCP address.
    pub async fn start<E: BlockExport>(
        export: Arc<E>,
        path: &Path,
        tcp: Option<SocketAddr>,
    ) -> Result<NbdServer, ServeError> {
        let (stop, stop_rx) = watch::channel(false);
        let bind_err = |source| ServeError::Bind { path: path.display().to_string(), source };
        if path.exists() {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        let unix = UnixListener::bind(path).map_err(bind_err)?;
        let mut tasks = Vec::new();
        let (e, rx) = (export.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move { accept_unix(unix, e, rx).await }));
        if let Some(addr) = tcp {
            if !addr.ip().is_loopback() {
                return Err(ServeError::NotLoopback(addr));
            }
            let listener =
                TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { path: addr.to_string(), source })?;
            let (e, rx) = (export.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move { accept_tcp(listener, e, rx).await }));
        }
        info!(socket = %path.display(), "NBD export listening");
        Ok(NbdServer { stop, tasks, socket: Some(path.to_path_buf()) })
    }

    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(path) = self.socket.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_unix<E: BlockExport>(listener: UnixListener, export: Arc<E>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_client(stream, export.clone(), stop.clone(), "unix".into()),
                Err(e) => {
                    warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn accept_tcp<E: BlockExport>(listener: TcpListener, export: Arc<E>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    spawn_client(stream, export.clone(), stop.clone(), peer.to_string());
                }
                Err(e) => {
                    warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

fn spawn_client<S, E>(stream: S, export: Arc<E>, mut stop: watch::Receiver<bool>, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    E: BlockExport,
{
    tokio::spawn(async move {
        tokio::select! {
            r = serve_client(stream, export) => match r {
                Ok(()) => debug!(%peer, "NBD client disconnected"),
                Err(e) => warn!(%peer, error = %e, "NBD client dropped"),
            },
            _ = stop.changed() => {}
        }
    });
}

/// Counts a client as attached for as long as it is in the transmission phase.
struct Attached<'a, E: BlockExport>(&'a E);

impl<E: BlockExport> Drop for Attached<'_, E> {
    fn drop(&mut self) {
        self.0.client_detached();
    }
}

/// Serves one client until it disconnects or breaks the protocol.
pub async fn serve_client<S, E>(stream: S, export: Arc<E>) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    E: BlockExport,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Bytes>>();
    let writer = tokio::spawn(write_replies(wr, rx));
    let info = ExportInfo {
        name: export.name(),
        description: format!("hapair volume {}", export.name()),
        size: export.size(),
        read_only: export.read_only(),
    };
    let mut session = Session::new(info);
    let _ = tx.send(vec![Session::greeting()]);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = BytesMut::with_capacity(256 << 10);
    let mut actions = Vec::new();
    let mut attached: Option<Attached<'_, E>> = None;
    let result = 'conn: loop {
        if buf.capacity() - buf.len() < 64 << 10 {
            buf.reserve(256 << 10);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(format!("read: {e}")),
        }
        if let Err(e) = session.feed(&mut buf, &mut actions) {
            // Send what was already answered, then drop the connection.
            flush_actions(&mut actions, &tx);
            break Err(e.to_string());
        }
        if attached.is_none() && session.in_transmission() {
            export.client_attached();
            attached = Some(Attached(&export));
        }
        for action in actions.drain(..) {
            match action {
                Action::Send(bytes) => {
                    let _ = tx.send(vec![bytes]);
                }
                Action::Execute(cmd) => {
                    let Ok(permit) = slots.clone().acquire_owned().await else { break 'conn Ok(()) };
                    let (export, tx, structured) = (export.clone(), tx.clone(), session.structured());
                    tokio::spawn(async move {
                        let reply = execute(&*export, cmd, structured).await;
                        let _ = tx.send(reply);
                        drop(permit);
                    });
                }
                Action::Disconnect => {
                    // Finish everything in flight before closing.
                    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
                    break 'conn Ok(());
                }
                Action::Close(reason) => {
                    debug!(%reason, "NBD negotiation ended");
                    break 'conn Ok(());
                }
            }
        }
    };
    drop(attached);
    drop(tx);
    let _ = writer.await;
    result
}

fn flush_actions(actions: &mut Vec<Action>, tx: &mpsc::UnboundedSender<Vec<Bytes>>) {
    for a in actions.drain(..) {
        if let Action::Send(b) = a {
            let _ = tx.send(vec![b]);
        }
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>) {
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    while let Some(parts) = rx.recv().await {
        for p in parts {
            if w.write_all(&p).await.is_err() {
                return;
            }
        }
        // Coalesce whatever else is ready before paying for a flush.
        while let Ok(parts) = rx.try_recv() {
            for p in parts {
                if w.write_all(&p).await.is_err() {
                    return;
                }
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn execute<E: BlockExport>(export: &E, cmd: Command, structured: bool) -> Vec<Bytes> {
    let cookie = cmd.cookie;
    let result: Result<Option<(u64, Bytes)>, ExportError> = match cmd.op {
        Op::Read { offset, len } => export.read(offset, len).await.map(|d| Some((offset, d))),
        Op::Write { offset, data, fua } => export.write(offset, data, fua).await.map(|()| None),
        Op::Flush => export.flush().await.map(|()| None),
        Op::Trim { offset, len, fua } => zero_chunked(export, offset, u64::from(len), true, fua).await.map(|()| None),
        Op::WriteZeroes { offset, len, fua, may_trim } => {
            zero_chunked(export, offset, u64::from(len), may_trim, fua).await.map(|()| None)
        }
    };
    match result {
        Ok(Some((offset, data))) => vec![proto::read_reply_header(structured, cookie, offset, data.len()), data],
        Ok(None) => vec![proto::ok_reply(structured, cookie)],
        Err(e) => vec![proto::error_reply(structured, cookie, e.errno, &e.message)],
    }
}

async fn zero_chunked<E: BlockExport>(
    export: &E,
    offset: u64,
    len: u64,
    may_trim: bool,
    fua: bool,
) -> Result<(), ExportError> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        export.zero(offset + done, n, may_trim, fua && done + n == len).await?;
        done += n;
    }
    Ok(())
}

/// The errno an I/O error maps to.
pub fn errno_of(e: &std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => Errno::NoSpc,
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => Errno::Perm,
        _ => Errno::Io,
    }
}
