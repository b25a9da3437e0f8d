//! The replication link's transport: dialing or accepting the peer (optionally over TLS)
//! and one reader and one writer task per connection, which turn the byte stream into
//! frames for the replica core and back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tracing::{debug, warn};

use super::machine::ConnId;
use super::observer::{IoObserver, IoStage};
use super::tls::{LinkTls, certificate_names};
use super::wire::{Envelope, Frame, FrameCodec};

pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// Bytes that crossed the replication socket, for status and benchmarks.
#[derive(Debug, Default)]
pub struct WireCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub connections: AtomicU64,
}

/// What a link tells the core.
#[derive(Debug)]
pub enum LinkEvent {
    Frame(ConnId, Envelope),
    Sent(ConnId, u64),
    Closed(ConnId, String),
}

struct Outgoing {
    frame: Frame,
    epoch: u64,
    notify_seq: Option<u64>,
}

/// One live connection's tasks.
#[derive(Debug)]
pub struct LinkHandle {
    pub conn: ConnId,
    tx: mpsc::UnboundedSender<Outgoing>,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.frame.name())
    }
}

impl LinkHandle {
    pub fn send(&self, frame: Frame, epoch: u64, notify_seq: Option<u64>) {
        let _ = self.tx.send(Outgoing { frame, epoch, notify_seq });
    }

    /// Stops reading at once; the writer sends what is queued (a goodbye, typically) and
    /// then shuts the socket down.
    pub fn close(self) {
        self.reader.abort();
    }
}

struct Counting<R> {
    inner: R,
    counters: Arc<WireCounters>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counters.received.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

/// When each application write, zero or flush left for the peer, until its
/// acknowledgement comes back: the peer's half of the request's time.
#[derive(Debug)]
struct PeerTimer {
    observer: Arc<dyn IoObserver>,
    sent: Mutex<HashMap<u64, Instant>>,
}

impl PeerTimer {
    fn sent(&self, frame: &Frame) {
        if let Frame::Data { seq, .. } | Frame::Zero { seq, .. } | Frame::Flush { seq } = frame
            && let Ok(mut sent) = self.sent.lock()
        {
            sent.insert(*seq, Instant::now());
        }
    }

    fn received(&self, frame: &Frame) {
        if let Frame::Ack { seq, .. } | Frame::FlushAck { seq, .. } = frame
            && let Some(at) = self.sent.lock().ok().and_then(|mut s| s.remove(seq))
        {
            self.observer.stage(IoStage::Peer, at.elapsed());
        }
    }
}

pub fn spawn_link(
    conn: ConnId,
    stream: BoxStream,
    events: mpsc::Sender<LinkEvent>,
    counters: Arc<WireCounters>,
    observer: Option<Arc<dyn IoObserver>>,
) -> LinkHandle {
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    counters.connections.fetch_add(1, Ordering::Relaxed);
    let timer = observer.map(|observer| Arc::new(PeerTimer { observer, sent: Mutex::new(HashMap::new()) }));
    let ev = events.clone();
    let c = counters.clone();
    let write_timer = timer.clone();
    tokio::spawn(async move {
        let reason = write_frames(wr, rx, &ev, conn, &c, write_timer.as_deref()).await;
        if let Err(reason) = reason {
            let _ = ev.send(LinkEvent::Closed(conn, reason)).await;
        }
    });
    let reader = tokio::spawn(async move {
        let mut frames = FramedRead::with_capacity(Counting { inner: rd, counters }, FrameCodec::default(), 1 << 20);
        let reason = loop {
            match frames.next().await {
                Some(Ok(env)) => {
                    if let Some(t) = &timer {
                        t.received(&env.frame);
                    }
                    if events.send(LinkEvent::Frame(conn, env)).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => break format!("replication stream from the peer is invalid: {e}"),
                None => break "the peer closed the replication connection".to_string(),
            }
        };
        let _ = events.send(LinkEvent::Closed(conn, reason)).await;
    });
    LinkHandle { conn, tx, reader }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    events: &mpsc::Sender<LinkEvent>,
    conn: ConnId,
    counters: &WireCounters,
    timer: Option<&PeerTimer>,
) -> Result<(), String> {
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    let mut head = BytesMut::with_capacity(4096);
    let mut sent_seqs = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            head.clear();
            // Before the write: the acknowledgement cannot come back before it is known.
            if let Some(t) = timer {
                t.sent(&out.frame);
            }
            let bulk = out.frame.encode_head(out.epoch, &mut head);
            let mut n = head.len();
            w.write_all(&head).await.map_err(|e| format!("writing to the peer: {e}"))?;
            if let Some(bulk) = bulk {
                n += bulk.len();
                w.write_all(&bulk).await.map_err(|e| format!("writing to the peer: {e}"))?;
            }
            counters.sent.fetch_add(n as u64, Ordering::Relaxed);
            sent_seqs.extend(out.notify_seq);
            next = rx.try_recv().ok();
        }
        w.flush().await.map_err(|e| format!("writing to the peer: {e}"))?;
        for seq in sent_seqs.drain(..) {
            if events.send(LinkEvent::Sent(conn, seq)).await.is_err() {
                return Ok(());
            }
        }
    }
    let _ = w.shutdown().await;
    Ok(())
}

/// Where the link listens and dials, and with what TLS.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub listen: Option<SocketAddr>,
    pub dial: Option<SocketAddr>,
    pub tls: Option<LinkTls>,
    pub connect_timeout: Duration,
}

/// When the dialer may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialState {
    pub connected: bool,
    pub not_before: tokio::time::Instant,
}

pub fn spawn_listener(listener: TcpListener, tls: Option<LinkTls>, streams: mpsc::Sender<BoxStream>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let streams = streams.clone();
            tokio::spawn(async move {
                match wrap_server(tcp, tls.as_ref()).await {
                    Ok(s) => {
                        let _ = streams.send(s).await;
                    }
                    Err(e) => warn!(%peer, error = %e, "refused a replication connection"),
                }
            });
        }
    })
}

async fn wrap_server(tcp: TcpStream, tls: Option<&LinkTls>) -> Result<BoxStream, String> {
    let Some(tls) = tls else { return Ok(Box::new(tcp)) };
    let s = tokio::time::timeout(Duration::from_secs(5), tls.acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let named =
        s.get_ref().1.peer_certificates().and_then(|c| c.first()).is_some_and(|c| certificate_names(c, &tls.peer_node));
    if !named {
        return Err(format!("client certificate does not name the peer {}", tls.peer_node));
    }
    Ok(Box::new(s))
}

pub fn spawn_dialer(
    addr: SocketAddr,
    tls: Option<LinkTls>,
    timeout: Duration,
    streams: mpsc::Sender<BoxStream>,
    mut state: watch::Receiver<DialState>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // Wait until disconnected and the back-off has passed.
            let not_before = loop {
                let s = *state.borrow_and_update();
                if !s.connected {
                    break s.not_before;
                }
                if state.changed().await.is_err() {
                    return;
                }
            };
            tokio::time::sleep_until(not_before).await;
            if state.borrow().connected {
                continue;
            }
            match dial(addr, tls.as_ref(), timeout).await {
                Ok(s) => {
                    if streams.send(s).await.is_err() {
                        return;
                    }
                    // Give the core a moment to register the connection before re-checking.
                    let _ = tokio::time::timeout(Duration::from_secs(1), state.changed()).await;
                }
                Err(e) => {
                    debug!(%addr, error = %e, "replication dial failed");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    })
}

async fn dial(addr: SocketAddr, tls: Option<&LinkTls>, timeout: Duration) -> Result<BoxStream, String> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else { return Ok(Box::new(tcp)) };
    let s = tokio::time::timeout(timeout, tls.connector.connect(tls.peer_name.clone(), tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    Ok(Box::new(s))
}
