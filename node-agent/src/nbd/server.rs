//! The NBD server: accepts clients on a Unix socket (and optionally loopback TCP), runs
//! each one's [`Session`] and executes its commands against a [`BlockExport`].
//!
//! Commands of one client run concurrently and are answered in completion order, as the
//! protocol allows. What one client has in flight — commands executing, and replies not yet
//! written to its socket — is bounded both in number ([`MAX_IN_FLIGHT`]) and in data bytes
//! ([`MAX_IN_FLIGHT_BYTES`]); a client that does not read its replies stops having its
//! requests taken, and the socket pushes back on it. A client that breaks the protocol loses
//! its connection; the server and other clients carry on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::export::{BlockExport, ExportError};
use super::proto::{self, Action, Command, Errno, ExportInfo, Op, Session};

/// Commands one client may have in flight, from the moment its request is taken until its
/// reply has been written to the socket (replies the session sends by itself, such as
/// errors for invalid requests, count too).
pub const MAX_IN_FLIGHT: usize = 64;
/// Data bytes (read data and write payloads) one client may have in flight, counted the
/// same way. Without this bound a client that sends reads but never reads the socket makes
/// the server read and queue their data without limit: 100 reads of 32 MiB would be 3.2 GiB
/// of memory. Like nbdkit and qemu-nbd, the server instead stops taking that client's
/// requests until replies drain, so TCP pushes back on the client. A reply holds its share
/// until it is wholly written, so the budget must cover requests being read from disk while
/// others are on the wire: 128 MiB holds four of the largest ([`proto::MAX_BLOCK`]). With
/// room for only two, a client reading 32 MiB at a time, four deep, lost ~10% of its
/// throughput. Smaller requests meet [`MAX_IN_FLIGHT`] first (64 of 1 MiB are 64 MiB). A
/// request larger than the budget takes all of it and runs alone.
///
/// Beyond the budget a client holds only what one read from its socket brought in and is
/// not yet taken (at most about one largest write), and the writer's 64 KiB buffer.
pub const MAX_IN_FLIGHT_BYTES: u32 = 128 << 20;
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

/// What one client may have in flight; by default [`MAX_IN_FLIGHT`] and
/// [`MAX_IN_FLIGHT_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Commands and replies in flight (0 counts as 1).
    pub commands: u32,
    /// Data bytes in flight (0 counts as 1: one data command at a time); a command
    /// needing more takes all of them.
    pub bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { commands: MAX_IN_FLIGHT as u32, bytes: MAX_IN_FLIGHT_BYTES }
    }
}

/// Reply bytes (headers and data) produced for a server's clients but not yet written to
/// their sockets, summed over the clients, and the most there ever were at once.
#[derive(Debug, Default)]
pub struct ReplyQueue {
    bytes: AtomicU64,
    peak: AtomicU64,
}

impl ReplyQueue {
    /// Reply bytes queued now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The most reply bytes ever queued at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn add(&self, n: u64) {
        let now = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, n: u64) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A running server; dropping it (or calling [`NbdServer::stop`]) stops accepting and
/// closes client connections.
#[derive(Debug)]
pub struct NbdServer {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
    queue: Arc<ReplyQueue>,
}

impl NbdServer {
    /// Serves `export` on a Unix socket at `path` (replacing a stale socket file) and,
    /// when given, on a loopback TCP address, with the default [`Limits`] per client.
    pub async fn start<E: BlockExport>(
        export: Arc<E>,
        path: &Path,
        tcp: Option<SocketAddr>,
    ) -> Result<NbdServer, ServeError> {
        NbdServer::start_with_limits(export, path, tcp, Limits::default()).await
    }

    /// [`NbdServer::start`], holding each client to `limits`.
    pub async fn start_with_limits<E: BlockExport>(
        export: Arc<E>,
        path: &Path,
        tcp: Option<SocketAddr>,
        limits: Limits,
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
        let queue = Arc::new(ReplyQueue::default());
        let mut tasks = Vec::new();
        let (e, rx, q) = (export.clone(), stop_rx.clone(), queue.clone());
        tasks.push(tokio::spawn(async move { accept_unix(unix, e, rx, limits, q).await }));
        if let Some(addr) = tcp {
            if !addr.ip().is_loopback() {
                return Err(ServeError::NotLoopback(addr));
            }
            let listener =
                TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { path: addr.to_string(), source })?;
            let (e, rx, q) = (export.clone(), stop_rx.clone(), queue.clone());
            tasks.push(tokio::spawn(async move { accept_tcp(listener, e, rx, limits, q).await }));
        }
        info!(socket = %path.display(), "NBD export listening");
        Ok(NbdServer { stop, tasks, socket: Some(path.to_path_buf()), queue })
    }

    /// The replies queued for this server's clients.
    pub fn reply_queue(&self) -> &ReplyQueue {
        &self.queue
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

async fn accept_unix<E: BlockExport>(
    listener: UnixListener,
    export: Arc<E>,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    queue: Arc<ReplyQueue>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_client(stream, export.clone(), stop.clone(), limits, queue.clone(), "unix".into()),
                Err(e) => {
                    warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn accept_tcp<E: BlockExport>(
    listener: TcpListener,
    export: Arc<E>,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    queue: Arc<ReplyQueue>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    spawn_client(stream, export.clone(), stop.clone(), limits, queue.clone(), peer.to_string());
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

fn spawn_client<S, E>(
    stream: S,
    export: Arc<E>,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
    queue: Arc<ReplyQueue>,
    peer: String,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    E: BlockExport,
{
    tokio::spawn(async move {
        tokio::select! {
            r = serve(stream, export, limits, queue) => match r {
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
    serve(stream, export, Limits::default(), Arc::new(ReplyQueue::default())).await
}

/// A client's share of its [`Limits`], held by a command from the moment its request is
/// taken until its reply has been written.
struct Held {
    _command: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// A reply on its way to the socket. It is counted in the [`ReplyQueue`] and holds its
/// command's share of the limits until dropped, after it has been written (or when the
/// connection is gone).
struct Reply {
    parts: Vec<Bytes>,
    len: u64,
    queue: Arc<ReplyQueue>,
    _held: Option<Held>,
}

impl Reply {
    fn new(parts: Vec<Bytes>, held: Option<Held>, queue: &Arc<ReplyQueue>) -> Reply {
        let len = parts.iter().map(|p| p.len() as u64).sum();
        queue.add(len);
        Reply { parts, len, queue: queue.clone(), _held: held }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.queue.sub(self.len);
    }
}

/// Aborts the reply writer when the client's future is dropped (the server stopping), so a
/// writer stuck on a client that does not read does not outlive it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves one client within `limits`, counting its queued replies in `queue`.
async fn serve<S, E>(stream: S, export: Arc<E>, limits: Limits, queue: Arc<ReplyQueue>) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    E: BlockExport,
{
    let (mut rd, wr) = tokio::io::split(stream);
    // Unbounded as a channel, but what is in it is bounded: every reply sent while
    // commands are taken holds a share of the limits until the writer has written it.
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let mut writer = AbortOnDrop(tokio::spawn(write_replies(wr, rx)));
    let info = ExportInfo {
        name: export.name(),
        description: format!("hapair volume {}", export.name()),
        size: export.size(),
        read_only: export.read_only(),
    };
    let mut session = Session::new(info);
    // A zero limit would let nothing (or, for bytes, everything) through; neither may
    // exceed what a semaphore holds (which only matters on 32-bit targets).
    let most = u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
    let commands = limits.commands.clamp(1, most);
    let budget_bytes = limits.bytes.clamp(1, most);
    let slots = Arc::new(Semaphore::new(commands as usize));
    let budget = Arc::new(Semaphore::new(budget_bytes as usize));
    // Waits for room for one more command (or reply) needing `bytes` of data; `None` only
    // if the semaphores were closed, which they never are.
    let take = async |bytes: u64| -> Option<Held> {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX).min(budget_bytes);
        let command = slots.clone().acquire_owned().await.ok()?;
        let bytes = budget.clone().acquire_many_owned(bytes).await.ok()?;
        Some(Held { _command: command, _bytes: bytes })
    };
    let _ = tx.send(Reply::new(vec![Session::greeting()], None, &queue));
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
            flush_actions(&mut actions, &tx, &queue);
            break Err(e.to_string());
        }
        if attached.is_none() && session.in_transmission() {
            export.client_attached();
            attached = Some(Attached(&export));
        }
        for action in actions.drain(..) {
            // Waiting here for room stops reading requests: the back-pressure.
            match action {
                Action::Send(bytes) => {
                    let Some(held) = take(0).await else { break 'conn Ok(()) };
                    let _ = tx.send(Reply::new(vec![bytes], Some(held), &queue));
                }
                Action::Execute(cmd) => {
                    let Some(held) = take(cmd.op.data_len()).await else { break 'conn Ok(()) };
                    let (export, tx, queue, structured) =
                        (export.clone(), tx.clone(), queue.clone(), session.structured());
                    tokio::spawn(async move {
                        let reply = execute(&*export, cmd, structured).await;
                        let _ = tx.send(Reply::new(reply, Some(held), &queue));
                    });
                }
                Action::Disconnect => {
                    // Finish everything in flight, replies written, before closing.
                    let _ = slots.acquire_many(commands).await;
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
    let _ = (&mut writer.0).await;
    result
}

fn flush_actions(actions: &mut Vec<Action>, tx: &mpsc::UnboundedSender<Reply>, queue: &Arc<ReplyQueue>) {
    for a in actions.drain(..) {
        if let Action::Send(b) = a {
            let _ = tx.send(Reply::new(vec![b], None, queue));
        }
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<Reply>) {
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    while let Some(reply) = rx.recv().await {
        if write_reply(&mut w, reply).await.is_err() {
            return;
        }
        // Coalesce whatever else is ready before paying for a flush.
        while let Ok(reply) = rx.try_recv() {
            if write_reply(&mut w, reply).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// Writes one reply, then drops it: its data is freed and its share of the limits returns
/// (what stays in the writer's buffer is at most its 64 KiB).
async fn write_reply<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, reply: Reply) -> std::io::Result<()> {
    for p in &reply.parts {
        w.write_all(p).await?;
    }
    Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    use super::*;
    use crate::nbd::proto::{CMD_FLUSH, CMD_READ, IHAVEOPT, OPT_GO, REP_ACK, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC};

    /// An in-memory export whose byte at `i` is `i % 251`, so misplaced data shows.
    struct Pattern;

    fn byte_at(i: u64) -> u8 {
        (i % 251) as u8
    }

    impl BlockExport for Pattern {
        fn name(&self) -> String {
            "vol".into()
        }
        fn size(&self) -> u64 {
            64 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
            Ok((offset..offset + u64::from(len)).map(byte_at).collect())
        }
        async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), ExportError> {
            Ok(())
        }
        async fn flush(&self) -> Result<(), ExportError> {
            Ok(())
        }
        async fn zero(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), ExportError> {
            Ok(())
        }
    }

    fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend(0u16.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b
    }

    type Client = (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>);

    /// Starts `serve` on an in-memory pipe holding at most 16 KiB each way, and takes the
    /// client through `NBD_OPT_GO` (simple replies).
    async fn connect(limits: Limits, queue: &Arc<ReplyQueue>) -> (Client, JoinHandle<Result<(), String>>) {
        let (client, server) = tokio::io::duplex(16 << 10);
        let task = tokio::spawn(serve(server, Arc::new(Pattern), limits, queue.clone()));
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut greeting = [0u8; 18];
        rd.read_exact(&mut greeting).await.unwrap();
        let mut hello = 3u32.to_be_bytes().to_vec();
        hello.extend(IHAVEOPT.to_be_bytes());
        hello.extend(OPT_GO.to_be_bytes());
        hello.extend(6u32.to_be_bytes());
        hello.extend([0; 6]); // the default export, no information requests
        wr.write_all(&hello).await.unwrap();
        loop {
            let mut h = [0u8; 20];
            rd.read_exact(&mut h).await.unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            rd.read_exact(&mut body).await.unwrap();
            if u32::from_be_bytes(h[12..16].try_into().unwrap()) == REP_ACK {
                break;
            }
        }
        ((rd, wr), task)
    }

    /// Waits until the server has done what it will without the client reading: until what
    /// is queued has not changed for 100 ms.
    async fn settle(queue: &ReplyQueue) -> u64 {
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = queue.bytes();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// Reads `n` simple replies to reads of `len` bytes at `offset(cookie)`, checking each
    /// one's data; returns the cookies in the order they came.
    async fn read_replies(
        rd: &mut ReadHalf<DuplexStream>,
        n: usize,
        len: u32,
        offset: impl Fn(u64) -> u64,
    ) -> Vec<u64> {
        let mut cookies = Vec::new();
        let mut data = vec![0u8; len as usize];
        for _ in 0..n {
            let mut h = [0u8; 16];
            rd.read_exact(&mut h).await.unwrap();
            assert_eq!(h[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
            assert_eq!(h[4..8], [0; 4], "error reply");
            let cookie = u64::from_be_bytes(h[8..].try_into().unwrap());
            rd.read_exact(&mut data).await.unwrap();
            let start = offset(cookie);
            assert!(data.iter().zip(start..).all(|(b, i)| *b == byte_at(i)), "reply {cookie} data");
            cookies.push(cookie);
        }
        cookies
    }

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_held_to_the_byte_budget() {
        let queue = Arc::new(ReplyQueue::default());
        let limits = Limits { commands: 64, bytes: 1 << 20 };
        let ((mut rd, mut wr), task) = connect(limits, &queue).await;
        let len = 256 << 10;
        let mut reqs = Vec::new();
        for i in 0..40 {
            reqs.extend(request(CMD_READ, i, i * u64::from(len), len));
        }
        wr.write_all(&reqs).await.unwrap();
        let queued = settle(&queue).await;
        // Four reads fill the budget; the pipe took at most 16 KiB of a fifth reply.
        let bound = u64::from(limits.bytes) + 4 * 16;
        assert!(queue.peak() <= bound, "peak {} > {bound}", queue.peak());
        assert!(queued >= 3 * u64::from(len), "only {queued} bytes queued: stalled below the budget");
        // Then everything arrives.
        let cookies = read_replies(&mut rd, 40, len, |c| c * u64::from(len)).await;
        assert_eq!(sorted(cookies), (0..40).collect::<Vec<_>>());
        assert!(queue.peak() <= bound, "peak {} > {bound}", queue.peak());
        wr.shutdown().await.unwrap(); // the end of the requests, as a closing client
        task.await.unwrap().unwrap();
        assert_eq!(queue.bytes(), 0);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_runs_alone() {
        let queue = Arc::new(ReplyQueue::default());
        let limits = Limits { commands: 64, bytes: 64 << 10 };
        let ((mut rd, mut wr), task) = connect(limits, &queue).await;
        let len = 1 << 20;
        let mut reqs = Vec::new();
        for i in 0..3 {
            reqs.extend(request(CMD_READ, i, i * 4096, len));
        }
        wr.write_all(&reqs).await.unwrap();
        settle(&queue).await;
        // One reply (and its header) at a time, rather than a deadlock waiting for more
        // of the budget than there is.
        assert!(queue.peak() <= u64::from(len) + 16, "peak {}", queue.peak());
        let cookies = read_replies(&mut rd, 3, len, |c| c * 4096).await;
        assert_eq!(cookies, [0, 1, 2], "taken one at a time, so answered in order");
        assert!(queue.peak() <= u64::from(len) + 16, "peak {}", queue.peak());
        wr.shutdown().await.unwrap(); // the end of the requests, as a closing client
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn replies_without_data_are_bounded_in_number_and_push_back_on_the_client() {
        let queue = Arc::new(ReplyQueue::default());
        let limits = Limits { commands: 4, bytes: 1 << 20 };
        let ((mut rd, mut wr), task) = connect(limits, &queue).await;
        // Flushes and invalid requests (answered by the session itself, with an error)
        // alternate: 20,000 replies of 16 bytes, far more than the pipe, the writer's
        // buffer and the four slots together hold.
        let n = 20_000u64;
        let mut reqs = Vec::new();
        for i in 0..n {
            reqs.extend(if i % 2 == 0 { request(CMD_FLUSH, i, 0, 0) } else { request(42, i, 0, 0) });
        }
        let sender = tokio::spawn(async move {
            wr.write_all(&reqs).await.unwrap();
            wr
        });
        let queued = settle(&queue).await;
        // Four replies at once, ever: here 16 bytes each, in the handshake at most 34.
        assert!(queue.peak() <= 4 * 34, "peak {}", queue.peak());
        assert_eq!(queued, 4 * 16, "the slots are all taken by unwritten replies");
        assert!(!sender.is_finished(), "the server kept taking requests nobody reads answers to");
        let mut seen = Vec::new();
        for _ in 0..n {
            let mut h = [0u8; 16];
            rd.read_exact(&mut h).await.unwrap();
            let (errno, cookie) =
                (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..].try_into().unwrap()));
            assert_eq!(errno, if cookie % 2 == 0 { 0 } else { Errno::Inval as u32 }, "reply {cookie}");
            seen.push(cookie);
        }
        assert_eq!(sorted(seen), (0..n).collect::<Vec<_>>());
        sender.await.unwrap().shutdown().await.unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(queue.bytes(), 0);
    }

    #[tokio::test]
    async fn dropping_a_stuck_client_frees_its_queued_replies() {
        let queue = Arc::new(ReplyQueue::default());
        let limits = Limits { commands: 64, bytes: 1 << 20 };
        let ((_rd, mut wr), task) = connect(limits, &queue).await;
        let mut reqs = Vec::new();
        for i in 0..8 {
            reqs.extend(request(CMD_READ, i, 0, 256 << 10));
        }
        wr.write_all(&reqs).await.unwrap();
        assert!(settle(&queue).await >= 3 * (256 << 10));
        // As when the server stops: the client's future is dropped, its writer (stuck on
        // the full pipe) with it, and nothing stays queued.
        task.abort();
        let _ = task.await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while queue.bytes() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn zero_limits_still_serve() {
        let queue = Arc::new(ReplyQueue::default());
        let ((mut rd, mut wr), task) = connect(Limits { commands: 0, bytes: 0 }, &queue).await;
        let mut reqs = Vec::new();
        for i in 0..3 {
            reqs.extend(request(CMD_READ, i, i, 4096));
        }
        wr.write_all(&reqs).await.unwrap();
        assert_eq!(read_replies(&mut rd, 3, 4096, |c| c).await, [0, 1, 2]);
        wr.shutdown().await.unwrap(); // the end of the requests, as a closing client
        task.await.unwrap().unwrap();
    }
}
