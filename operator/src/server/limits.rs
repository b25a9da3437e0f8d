//! What keeps slow or numerous clients from exhausting the node API: a cap on open
//! connections, overall and per client address, enforced at accept; a [`ConnectionClock`]
//! that ends connections that sit idle or trickle a request head; and a deadline for
//! reading a request body ([`TimedBody`]).
//!
//! The TLS handshake deadline is applied where the connection is served
//! ([`super::Server`]). hyper's own `header_read_timeout` is not used: it runs from the end
//! of the previous answer, so it cannot tell an idle kept-alive connection from a client
//! trickling a head, and the two deserve different deadlines and separate counts.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use crate::controller::metrics::Metrics;

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The server holds as many connections as it may.
    TotalLimit,
    /// This client address holds as many connections as one address may.
    ClientLimit,
}

impl Refused {
    /// The `reason` label of `hapair_controller_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refused::TotalLimit => "total_limit",
            Refused::ClientLimit => "client_limit",
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Only addresses with open connections: an entry goes when its count reaches 0, so the
    /// table never holds more entries than there are connections.
    per_client: HashMap<IpAddr, usize>,
}

/// Counts open connections and refuses those over the limits (0 = no limit).
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_client: usize,
    open: Mutex<Open>,
    metrics: Arc<Metrics>,
    log: RefusalLog,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_client: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnectionLimiter {
            max_total,
            max_per_client,
            open: Mutex::new(Open::default()),
            metrics,
            log: RefusalLog::new(REFUSAL_LOG_INTERVAL),
        })
    }

    /// Counts and logs a connection from `addr` that [`ConnectionLimiter::admit`] refused.
    pub fn refused(&self, addr: SocketAddr, refused: Refused) {
        self.metrics.api_connection_refused(refused.label());
        let (open_total, open_from_client) = self.open(addr.ip());
        let limit = match refused {
            Refused::TotalLimit => self.max_total,
            Refused::ClientLimit => self.max_per_client,
        };
        match self.log.should_warn(Instant::now()) {
            Some(suppressed) => warn!(
                %addr,
                reason = refused.label(),
                limit,
                open_total,
                open_from_client,
                refused_since_last_warning = suppressed,
                "node API connection refused: over the connection limit"
            ),
            None => debug!(%addr, reason = refused.label(), limit, "node API connection refused"),
        }
    }

    /// A slot for a new connection from `ip`, held until the connection ends, or why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        // An IPv4 client on a dual-stack listener is the same client as over IPv4.
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if self.max_total != 0 && open.total >= self.max_total {
            return Err(Refused::TotalLimit);
        }
        let mine = open.per_client.get(&ip).copied().unwrap_or(0);
        if self.max_per_client != 0 && mine >= self.max_per_client {
            return Err(Refused::ClientLimit);
        }
        open.per_client.insert(ip, mine + 1);
        open.total += 1;
        self.metrics.set_api_connections(open.total);
        Ok(ConnectionSlot { limiter: self.clone(), ip })
    }

    fn release(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.per_client.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.per_client.remove(&ip);
            }
        }
        open.total = open.total.saturating_sub(1);
        self.metrics.set_api_connections(open.total);
    }

    /// Open connections now, overall and from `ip`.
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        (open.total, open.per_client.get(&ip.to_canonical()).copied().unwrap_or(0))
    }
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limiter.release(self.ip);
    }
}

/// How often a refused connection may be logged at `warn`; the others go to `debug`.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Picks which refusals are logged at `warn`. A flood of connections is exactly when the
/// caps refuse the most, and one warning per connection would turn it into a flood of log
/// lines; one every interval, with the count of those in between, says the same.
#[derive(Debug)]
struct RefusalLog {
    interval: Duration,
    /// When the last warning went out, and refusals since then.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    fn new(interval: Duration) -> Self {
        RefusalLog { interval, state: Mutex::new((None, 0)) }
    }

    /// `Some(refusals not warned about since the last warning)` if this one is to be a
    /// warning.
    fn should_warn(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, suppressed) = &mut *state;
        match last {
            Some(at) if now.saturating_duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }
}

/// What a connection waits for between requests, which decides the deadline that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// Nothing of the next request yet, since the handshake or the last answer.
    Idle(Instant),
    /// The rest of a request head, since its first byte.
    Head(Instant),
    /// A handler has the request. No connection deadline runs: the body has its own, and
    /// a long-poll may legitimately take as long as its `wait`.
    Handler,
}

/// Which connection deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// A kept-alive connection stayed idle for the idle timeout.
    Idle,
    /// A request head was not complete within the header timeout of its first byte.
    Head,
}

impl Stall {
    /// The `phase` label of `hapair_controller_api_timeouts_total`.
    pub fn label(self) -> &'static str {
        match self {
            Stall::Idle => "idle",
            Stall::Head => "header",
        }
    }
}

/// The idle and head deadlines of one HTTP/1 connection. The connection's IO
/// ([`ClockedIo`]) reports bytes, the service reports handlers ([`HandlerGuard`]), and
/// [`ConnectionClock::stalled`] resolves when a deadline passes.
#[derive(Clone, Debug)]
pub struct ConnectionClock {
    state: Arc<watch::Sender<Waiting>>,
}

impl ConnectionClock {
    /// A clock for a connection whose handshake just ended: idle from now.
    pub fn new() -> Self {
        ConnectionClock { state: Arc::new(watch::Sender::new(Waiting::Idle(Instant::now()))) }
    }

    fn bytes_read(&self) {
        self.state.send_if_modified(|waiting| match waiting {
            Waiting::Idle(_) => {
                *waiting = Waiting::Head(Instant::now());
                true
            }
            Waiting::Head(_) | Waiting::Handler => false,
        });
    }

    /// A handler took a request; the connection is idle again when the guard is dropped,
    /// i.e. when the handler has produced its answer.
    pub fn handler_started(&self) -> HandlerGuard {
        self.state.send_replace(Waiting::Handler);
        HandlerGuard { clock: self.clone() }
    }

    /// Resolves when the connection has been idle for `idle` or a request head has been
    /// arriving for `header`; pending while a handler runs.
    pub async fn stalled(&self, idle: Duration, header: Duration) -> Stall {
        let mut changes = self.state.subscribe();
        loop {
            let waiting = *changes.borrow_and_update();
            let (deadline, stall) = match waiting {
                Waiting::Idle(since) => (since + idle, Stall::Idle),
                Waiting::Head(since) => (since + header, Stall::Head),
                Waiting::Handler => {
                    // `self` holds the sender, so this only fails if the clock is gone.
                    if changes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    continue;
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    // Bytes that came in the same instant win: the client was not idle.
                    if !changes.has_changed().unwrap_or(false) {
                        return stall;
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

impl Default for ConnectionClock {
    fn default() -> Self {
        ConnectionClock::new()
    }
}

/// Held while a handler works on a request; see [`ConnectionClock::handler_started`].
#[derive(Debug)]
pub struct HandlerGuard {
    clock: ConnectionClock,
}

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        self.clock.state.send_replace(Waiting::Idle(Instant::now()));
    }
}

/// The connection's decrypted stream, telling its [`ConnectionClock`] when bytes arrive.
/// Plaintext rather than TCP bytes count, so that TLS records without data (empty
/// records, alerts) do not keep a connection alive.
#[derive(Debug)]
pub struct ClockedIo<T> {
    inner: T,
    clock: ConnectionClock,
}

impl<T> ClockedIo<T> {
    pub fn new(inner: T, clock: ConnectionClock) -> Self {
        ClockedIo { inner, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClockedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.bytes_read();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClockedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// File descriptors kept for everything but node API connections: the listeners, the
/// state directory and manifest watcher, the Kubernetes client, logs.
const FD_HEADROOM: u64 = 128;

/// What to do about `RLIMIT_NOFILE` for `wanted` connections: the soft limit to set (if it
/// must grow) and the connection cap that then fits. `wanted` 0 means no cap was asked for.
fn fd_plan(wanted: usize, soft: u64, hard: u64) -> (Option<u64>, usize) {
    if wanted == 0 {
        return (None, 0);
    }
    let needed = (wanted as u64).saturating_add(FD_HEADROOM);
    if needed <= soft {
        return (None, wanted);
    }
    let raised = needed.min(hard);
    let fits = usize::try_from(raised.saturating_sub(FD_HEADROOM)).unwrap_or(usize::MAX).clamp(1, wanted);
    (if raised > soft { Some(raised) } else { None }, fits)
}

/// The connection cap the process can honour: raises the soft `RLIMIT_NOFILE` (up to the
/// hard limit) when `wanted` connections would not fit, and lowers the cap if they still do
/// not. Without this a cap above the descriptor limit is fiction: `accept` fails with
/// EMFILE first (systemd's default soft limit is 1024) and nothing is refused cleanly.
pub fn fit_fd_limit(wanted: usize) -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return wanted;
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    let (raise, mut fits) = fd_plan(wanted, soft, hard);
    if let Some(raised) = raise {
        let new = libc::rlimit { rlim_cur: raised, rlim_max: hard };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            info!(from = soft, to = raised, "raised the open-file limit for node API connections");
        } else {
            fits = fd_plan(wanted, soft, soft).1;
        }
    }
    if fits < wanted {
        warn!(
            wanted,
            allowed = fits,
            soft_limit = soft,
            hard_limit = hard,
            "the open-file limit is too low for the configured node API connection limit; \
             lowering it (raise LimitNOFILE / ulimit -n)"
        );
    }
    fits
}

/// The client did not send the whole request body in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body was not received within {limit:?}")]
pub struct BodyTimeout {
    pub limit: Duration,
}

/// A request body that fails with [`BodyTimeout`] once `limit` has passed since it was first
/// read. The clock starts at the handler's first read, not at the request head, so work a
/// handler does before it reads (or a long-poll, which has no body) is not counted; a body
/// no handler reads is never timed, and hyper closes the connection after the answer
/// instead of reading the rest of it.
#[derive(Debug)]
pub struct TimedBody<B> {
    inner: B,
    limit: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    expired: bool,
    /// Set when the deadline passed, so the answer can close the connection.
    timed_out: Arc<AtomicBool>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, limit: Duration, timed_out: Arc<AtomicBool>) -> Self {
        TimedBody { inner, limit, deadline: None, expired: false, timed_out }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout { limit: this.limit }))));
        }
        let limit = this.limit;
        let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if this.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        // The deadline first: a client that keeps a byte ready at every read must not be
        // able to starve it.
        if deadline.as_mut().poll(cx).is_ready() {
            this.expired = true;
            this.timed_out.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout { limit }))));
        }
        Pin::new(&mut this.inner).poll_frame(cx).map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        !self.expired && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The [`BodyTimeout`] somewhere in `error`'s chain of sources.
pub fn find_body_timeout(error: &(dyn std::error::Error + 'static)) -> Option<BodyTimeout> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
            return Some(*timeout);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_connections_overall_and_per_client_and_frees_slots() {
        let metrics = Arc::new(Metrics::new());
        let limiter = ConnectionLimiter::new(3, 2, metrics.clone());
        let a = IpAddr::from([198, 18, 0, 1]);
        let b = IpAddr::from([198, 18, 0, 2]);
        let mapped = IpAddr::from(std::net::Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped());
        let a1 = limiter.admit(a);
        let a2 = limiter.admit(mapped);
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(limiter.admit(a).err(), Some(Refused::ClientLimit), "the mapped address is the same client");
        let b1 = limiter.admit(b);
        assert!(b1.is_ok());
        assert_eq!(limiter.admit(b).err(), Some(Refused::TotalLimit));
        assert_eq!(metrics.api_connections(), 3);
        drop(a1);
        assert_eq!(limiter.open(a), (2, 1));
        assert!(limiter.admit(a).is_ok(), "a freed slot is usable again");
        drop((a2, b1));
        assert_eq!(limiter.open(b), (0, 0));
        assert_eq!(metrics.api_connections(), 0);
        assert!(limiter.open.lock().map(|o| o.per_client.is_empty()).unwrap_or(false), "no entries are left over");
    }

    #[test]
    fn zero_means_no_limit() {
        let limiter = ConnectionLimiter::new(0, 0, Arc::new(Metrics::new()));
        let ip = IpAddr::from([127, 0, 0, 1]);
        let slots: Vec<_> = (0..100).map(|_| limiter.admit(ip)).collect();
        assert!(slots.iter().all(Result::is_ok));
    }

    #[test]
    fn warns_about_one_refusal_per_interval_and_counts_the_rest() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(log.should_warn(start), Some(0));
        assert_eq!(log.should_warn(start + Duration::from_secs(1)), None);
        assert_eq!(log.should_warn(start + Duration::from_secs(9)), None);
        assert_eq!(log.should_warn(start + Duration::from_secs(10)), Some(2));
        assert_eq!(log.should_warn(start + Duration::from_secs(11)), None);
        assert_eq!(log.should_warn(start + Duration::from_secs(30)), Some(1));
    }

    /// `None` if `stalled` is still pending after `after`, else which deadline passed.
    async fn stall_after(clock: &ConnectionClock, after: Duration) -> Option<Stall> {
        let idle = Duration::from_secs(30);
        let header = Duration::from_secs(10);
        tokio::time::timeout(after, clock.stalled(idle, header)).await.ok()
    }

    #[tokio::test(start_paused = true)]
    async fn clock_runs_the_idle_deadline_then_the_head_deadline_and_none_in_a_handler() {
        let clock = ConnectionClock::new();
        assert_eq!(stall_after(&clock, Duration::from_secs(29)).await, None);
        assert_eq!(stall_after(&clock, Duration::from_secs(2)).await, Some(Stall::Idle));

        let clock = ConnectionClock::new();
        tokio::time::advance(Duration::from_secs(25)).await;
        clock.bytes_read();
        // The head's own deadline from its first byte, however long the wait before it;
        // more bytes do not move it.
        tokio::time::advance(Duration::from_secs(9)).await;
        clock.bytes_read();
        assert_eq!(stall_after(&clock, Duration::from_millis(900)).await, None);
        assert_eq!(stall_after(&clock, Duration::from_millis(200)).await, Some(Stall::Head));

        let handling = clock.handler_started();
        assert_eq!(stall_after(&clock, Duration::from_secs(600)).await, None, "a handler was cut short");
        drop(handling);
        // Idle again from the answer on.
        assert_eq!(stall_after(&clock, Duration::from_secs(29)).await, None);
        assert_eq!(stall_after(&clock, Duration::from_secs(2)).await, Some(Stall::Idle));
    }

    #[test]
    fn fits_the_connection_cap_to_the_open_file_limit() {
        assert_eq!(fd_plan(1024, 65_536, 65_536), (None, 1024));
        assert_eq!(fd_plan(4096, 1024, 524_288), (Some(4096 + FD_HEADROOM), 4096), "the soft limit is raised");
        assert_eq!(fd_plan(4096, 1024, 2048), (Some(2048), 2048 - FD_HEADROOM as usize), "as far as it can go");
        assert_eq!(fd_plan(4096, 1024, 1024), (None, 1024 - FD_HEADROOM as usize));
        assert_eq!(fd_plan(4096, 64, 64), (None, 1), "never a cap of 0, which would mean no limit");
        assert_eq!(fd_plan(0, 1024, 1024), (None, 0));
    }
}
