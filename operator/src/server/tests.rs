//! The node API server on a real socket with real TLS: connection limits and the
//! handshake, idle, head and body deadlines. Limits and deadlines are small so the tests
//! run fast. Every wait has a generous bound, and timing is only asserted from below (a
//! deadline must not fire early), which a loaded machine cannot break.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::routing::{get, post};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use super::body::ApiJson;
use super::*;
use crate::pki::Ca;

/// How long any single step may take before the test gives up on it.
const BOUND: Duration = Duration::from_secs(10);

struct Fixture {
    server: Option<Server>,
    metrics: Arc<Metrics>,
    client: Arc<rustls::ClientConfig>,
    connector: tokio_rustls::TlsConnector,
}

fn test_router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/echo", post(|ApiJson(value): ApiJson<serde_json::Value>| async move { Json(value) }))
        // A long-poll: answers well after the head and body deadlines of the tests.
        .route(
            "/poll",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "changed\n"
            }),
        )
        // Works for a while before it reads the body.
        .route(
            "/late-reader",
            post(|request: Request| async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                ApiJson::<serde_json::Value>::from_request(request, &()).await.map(|ApiJson(value)| Json(value))
            }),
        )
}

impl Fixture {
    async fn start(settings: ApiSettings) -> Fixture {
        let (ca, _) = Ca::generate().unwrap();
        let serving = ca.issue_server(&["localhost".to_string()]).unwrap();
        let (tls, auth) = identity::server_config(ca.cert_der(), &serving.cert_pem, &serving.key_pem).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let (_, routes) = watch::channel(test_router());
        let server = Server::start_routed_with(listener, tls, auth, routes, metrics.clone(), &settings).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = Arc::new(client);
        let connector = tokio_rustls::TlsConnector::from(client.clone());
        Fixture { server: Some(server), metrics, client, connector }
    }

    fn addr(&self) -> SocketAddr {
        self.server.as_ref().map(Server::local_addr).unwrap()
    }

    /// A TCP connection from `source` (an address on the loopback interface).
    async fn tcp_from(&self, source: [u8; 4]) -> io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        socket.connect(self.addr()).await
    }

    /// A TLS connection from `source`, handshake done.
    async fn tls_from(&self, source: [u8; 4]) -> io::Result<TlsStream<TcpStream>> {
        let tcp = self.tcp_from(source).await?;
        let name = ServerName::try_from("localhost").unwrap();
        match tokio::time::timeout(BOUND, self.connector.connect(name, tcp)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "handshake took too long")),
        }
    }

    async fn tls(&self) -> io::Result<TlsStream<TcpStream>> {
        self.tls_from([127, 0, 0, 1]).await
    }

    /// Whether a new connection from `source` gets an answer to `GET /healthz`.
    async fn answers_from(&self, source: [u8; 4]) -> bool {
        match self.tls_from(source).await {
            Ok(mut stream) => matches!(http_get(&mut stream, "/healthz").await, Ok((200, _))),
            Err(_) => false,
        }
    }

    async fn answers(&self) -> bool {
        self.answers_from([127, 0, 0, 1]).await
    }

    /// Polls `check` until it holds, for at most [`BOUND`].
    async fn eventually<F, Fut>(&self, mut check: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            if check().await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// The bytes of a ClientHello for this server, as a real client would send them.
    fn client_hello(&self) -> Vec<u8> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(self.client.clone(), name).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        assert!(hello.len() > 100, "not a ClientHello: {} bytes", hello.len());
        hello
    }
}

/// Deadlines long enough never to fire within a test, so that each test sees only the one
/// it sets short.
const LONG: Duration = Duration::from_secs(120);

fn settings() -> ApiSettings {
    ApiSettings {
        rate: ratelimit::RateSettings { burst: 1000, per_second: 1000.0 },
        handshake_timeout: LONG,
        idle_timeout: LONG,
        header_timeout: LONG,
        body_timeout: LONG,
        ..ApiSettings::default()
    }
}

/// The pause between two bytes of a trickling client: far below every short deadline of
/// the tests, so an inactivity timer (reset by each byte) would never fire.
const TRICKLE: Duration = Duration::from_millis(20);

/// Writes `bytes` to `stream` one at a time, [`TRICKLE`] apart, until they run out (then
/// stays silent) or the server closes the connection. Returns how many were written.
fn trickle<W, I>(mut stream: W, bytes: I) -> tokio::task::JoinHandle<usize>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    I: IntoIterator<Item = u8> + Send + 'static,
    I::IntoIter: Send,
{
    tokio::spawn(async move {
        let mut written = 0;
        for byte in bytes {
            if stream.write_all(&[byte]).await.is_err() || stream.flush().await.is_err() {
                return written;
            }
            written += 1;
            tokio::time::sleep(TRICKLE).await;
        }
        // Keep the write half (and so the connection) open: only the server may end it.
        std::future::pending::<()>().await;
        written
    })
}

/// A request head that never ends: a request line, then one header after another.
fn endless_head() -> impl Iterator<Item = u8> + Send {
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n".iter().copied().chain(b"X-Slow: a\r\n".iter().copied().cycle())
}

/// Reads one HTTP/1.1 response (with a `Content-Length` body) from `stream`.
async fn read_response<R: AsyncRead + Unpin>(stream: &mut R) -> io::Result<(u16, String)> {
    let read = async {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before an answer"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status = head.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = buf[head_end..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Ok((status, String::from_utf8_lossy(&body).to_string()))
    };
    tokio::time::timeout(BOUND, read)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")))
}

async fn http_get<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
) -> io::Result<(u16, String)> {
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    stream.flush().await?;
    read_response(stream).await
}

/// Sends a complete `POST /echo` of `body` and reads the answer.
async fn post_echo<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    body: &str,
) -> io::Result<(u16, String)> {
    let request = format!(
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    read_response(stream).await
}

/// Sends the head of a POST announcing 100 bytes of JSON and only the first few of them.
async fn start_slow_post<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S) -> io::Result<()> {
    let head =
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    stream.write_all(format!("{head}{{\"node\":").as_bytes()).await?;
    stream.flush().await
}

/// Whether the server closes `stream` (EOF or a reset) within [`BOUND`].
async fn closed_by_server<R: AsyncRead + Unpin>(stream: &mut R) -> bool {
    let drain = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(BOUND, drain).await.is_ok()
}

// ---------------------------------------------------------------------------------------
// Connection caps

#[tokio::test]
async fn server_refuses_connections_over_the_per_client_limit_until_one_closes() {
    let f = Fixture::start(ApiSettings { max_connections_per_client: 3, max_connections: 100, ..settings() }).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = f.tls().await.unwrap();
        assert_eq!(http_get(&mut stream, "/healthz").await.unwrap().0, 200);
        held.push(stream);
    }
    assert_eq!(f.metrics.api_connections(), 3);

    // The fourth from the same address is closed at accept, before any TLS.
    assert!(!f.answers().await, "a connection over the per-client limit was served");
    assert!(!f.answers().await, "a connection over the per-client limit was served");
    assert_eq!(f.metrics.api_connections_refused("client_limit"), 2);
    assert_eq!(f.metrics.api_connections(), 3, "a refused connection took a slot");
    // The held ones still work, and another address is another client.
    assert_eq!(http_get(&mut held[0], "/healthz").await.unwrap().0, 200);
    assert!(f.answers_from([127, 0, 0, 2]).await, "another client address was refused");

    // Once one closes, a new connection gets in again.
    drop(held.pop());
    assert!(f.eventually(|| f.answers()).await, "no connection was admitted after one closed");
    assert_eq!(f.metrics.api_connections_refused("total_limit"), 0);
    drop(held);
    assert!(f.eventually(|| async { f.metrics.api_connections() == 0 }).await, "slots were not freed");
    f.shutdown().await;
}

/// The reported attack: one address opening slow POSTs without end. Its connections over
/// the cap are closed at once, and other clients are served throughout.
#[tokio::test]
async fn server_caps_slow_posts_from_one_client_and_serves_the_others() {
    let f = Fixture::start(ApiSettings { max_connections_per_client: 8, max_connections: 100, ..settings() }).await;
    let mut slow = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        // A refused connection is closed before the server's first TLS byte, so the
        // handshake fails.
        match f.tls().await {
            Ok(mut stream) => {
                start_slow_post(&mut stream).await.unwrap();
                slow.push(stream);
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!(slow.len(), 8, "connections beyond the per-client limit were kept");
    assert_eq!(refused, 12);
    assert_eq!(f.metrics.api_connections_refused("client_limit"), 12);
    assert_eq!(f.metrics.api_connections(), 8);

    let mut other = f.tls_from([127, 0, 0, 2]).await.unwrap();
    assert_eq!(post_echo(&mut other, r#"{"node":"b"}"#).await.unwrap(), (200, r#"{"node":"b"}"#.to_string()));
    assert!(!f.answers().await, "the capped address got another connection");
    // The slow ones are still there, waiting for their bodies: the cap, not a timeout,
    // refused the others.
    assert_eq!(f.metrics.api_timeouts("body"), 0);
    drop(slow);
    assert!(f.eventually(|| f.answers()).await, "the address was not admitted again after its connections closed");
    f.shutdown().await;
}

#[tokio::test]
async fn server_refuses_connections_over_the_total_limit() {
    let f = Fixture::start(ApiSettings { max_connections: 2, max_connections_per_client: 0, ..settings() }).await;
    let mut a = f.tls_from([127, 0, 0, 1]).await.unwrap();
    let mut b = f.tls_from([127, 0, 0, 2]).await.unwrap();
    assert_eq!(http_get(&mut a, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(&mut b, "/healthz").await.unwrap().0, 200);
    assert!(!f.answers_from([127, 0, 0, 3]).await, "a connection over the total limit was served");
    assert_eq!(f.metrics.api_connections_refused("total_limit"), 1);
    assert_eq!(f.metrics.api_connections_refused("client_limit"), 0);
    // The admitted ones are unaffected.
    assert_eq!(http_get(&mut a, "/healthz").await.unwrap().0, 200);
    drop(a);
    assert!(f.eventually(|| f.answers_from([127, 0, 0, 3])).await, "no connection was admitted after one closed");
    drop(b);
    f.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Deadlines

#[tokio::test]
async fn server_cuts_off_a_handshake_sent_byte_by_byte() {
    let handshake_timeout = Duration::from_millis(400);
    let f = Fixture::start(ApiSettings { handshake_timeout, ..settings() }).await;
    let hello = f.client_hello();
    let tcp = f.tcp_from([127, 0, 0, 1]).await.unwrap();
    let started = std::time::Instant::now();
    let (mut read, write) = tcp.into_split();
    let writer = trickle(write, hello.clone());
    assert!(closed_by_server(&mut read).await, "a trickled handshake was never cut off");
    let took = started.elapsed();
    assert!(took >= handshake_timeout, "cut off after {took:?}, before the deadline");
    assert_eq!(f.metrics.api_timeouts("handshake"), 1);
    writer.abort();
    assert!(f.eventually(|| async { f.metrics.api_connections() == 0 }).await, "the slot was not freed");
    assert!(f.answers().await, "the server did not answer after the slow handshake");
    f.shutdown().await;
}

#[tokio::test]
async fn server_cuts_off_a_request_head_sent_byte_by_byte() {
    let header_timeout = Duration::from_millis(400);
    let f = Fixture::start(ApiSettings { header_timeout, ..settings() }).await;
    let stream = f.tls().await.unwrap();
    let started = std::time::Instant::now();
    let (mut read, write) = tokio::io::split(stream);
    let writer = trickle(write, endless_head());
    assert!(closed_by_server(&mut read).await, "a trickled request head was never cut off");
    let took = started.elapsed();
    assert!(took >= header_timeout, "cut off after {took:?}, before the deadline");
    let sent = writer.await.unwrap();
    assert!(sent > 3, "the client sent only {sent} bytes: not a trickle");
    assert_eq!(f.metrics.api_timeouts("header"), 1);
    assert_eq!(f.metrics.api_timeouts("idle"), 0, "the idle timer cut the head off");
    assert!(f.eventually(|| async { f.metrics.api_connections() == 0 }).await, "the slot was not freed");
    assert!(f.answers().await, "the server did not answer after the slow head");
    f.shutdown().await;
}

#[tokio::test]
async fn server_answers_a_body_sent_byte_by_byte_with_408_at_the_deadline() {
    let body_timeout = Duration::from_millis(400);
    let f = Fixture::start(ApiSettings { body_timeout, ..settings() }).await;
    let mut stream = f.tls().await.unwrap();
    let started = std::time::Instant::now();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
        )
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let (mut read, write) = tokio::io::split(stream);
    let body = std::iter::once(b'[').chain(b"1,".iter().copied().cycle());
    let writer = trickle(write, body);
    let (status, answer) = read_response(&mut read).await.expect("a trickled body got no answer");
    let took = started.elapsed();
    assert_eq!(status, 408, "{answer}");
    assert!(answer.contains("request body was not received within 400ms"), "{answer}");
    assert!(took >= body_timeout, "answered after {took:?}, before the deadline");
    assert!(closed_by_server(&mut read).await, "the connection of a slow body stayed open");
    let sent = writer.await.unwrap();
    assert!(sent > 3, "the client sent only {sent} bytes: not a trickle");
    assert_eq!(f.metrics.api_timeouts("body"), 1);
    assert!(f.eventually(|| async { f.metrics.api_connections() == 0 }).await, "the slot was not freed");
    f.shutdown().await;
}

#[tokio::test]
async fn server_answers_stalled_bodies_with_408_and_frees_their_connections() {
    let body_timeout = Duration::from_millis(500);
    let f = Fixture::start(ApiSettings { body_timeout, max_connections_per_client: 4, ..settings() }).await;
    // Slow clients take every slot this address has.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut stream = f.tls().await.unwrap();
        start_slow_post(&mut stream).await.unwrap();
        slow.push(stream);
    }
    for stream in &mut slow {
        let (status, body) = read_response(stream).await.expect("a slow body got no answer");
        assert_eq!(status, 408, "{body}");
        assert!(body.contains("request body was not received within 500ms"), "{body}");
        assert!(closed_by_server(stream).await, "the connection of a slow body stayed open");
    }
    assert_eq!(f.metrics.api_timeouts("body"), 4);
    // Their slots are free again: a normal request is served.
    assert!(f.eventually(|| f.answers()).await, "the server did not answer after the slow bodies");
    let mut stream = f.tls().await.unwrap();
    let body = r#"{"node":"a"}"#;
    assert_eq!(post_echo(&mut stream, body).await.unwrap(), (200, body.to_string()));
    f.shutdown().await;
}

#[tokio::test]
async fn server_closes_a_kept_alive_connection_left_idle() {
    let idle_timeout = Duration::from_millis(1000);
    let f = Fixture::start(ApiSettings { idle_timeout, ..settings() }).await;
    let mut stream = f.tls().await.unwrap();
    // Requests well within the idle timeout of each other keep the connection, for longer
    // than the idle timeout in all: it limits the pauses, not the connection's life.
    for _ in 0..6 {
        assert_eq!(http_get(&mut stream, "/healthz").await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(f.metrics.api_timeouts("idle"), 0);
    let started = std::time::Instant::now();
    assert_eq!(http_get(&mut stream, "/healthz").await.unwrap().0, 200);
    assert!(closed_by_server(&mut stream).await, "an idle connection stayed open");
    let took = started.elapsed();
    assert!(took >= idle_timeout, "closed after {took:?}, before the idle timeout");
    assert_eq!(f.metrics.api_timeouts("idle"), 1);
    assert_eq!(f.metrics.api_timeouts("header"), 0);
    // A connection that never sends a request is idle from the handshake on.
    let mut silent = f.tls().await.unwrap();
    assert!(closed_by_server(&mut silent).await, "a connection without requests stayed open");
    assert_eq!(f.metrics.api_timeouts("idle"), 2);
    assert!(f.eventually(|| async { f.metrics.api_connections() == 0 }).await, "slots were not freed");
    f.shutdown().await;
}

#[tokio::test]
async fn server_closes_connections_whose_handshake_or_head_stalls() {
    let short = Duration::from_millis(300);
    let f = Fixture::start(ApiSettings { handshake_timeout: short, header_timeout: short, ..settings() }).await;
    // TCP only, never a ClientHello.
    let mut tcp = f.tcp_from([127, 0, 0, 1]).await.unwrap();
    assert!(closed_by_server(&mut tcp).await, "a connection without a handshake stayed open");
    assert_eq!(f.metrics.api_timeouts("handshake"), 1);
    // Half a request head.
    let mut stream = f.tls().await.unwrap();
    stream.write_all(b"POST /echo HTTP/1.1\r\nHost: loc").await.unwrap();
    stream.flush().await.unwrap();
    assert!(closed_by_server(&mut stream).await, "a connection with an unfinished head stayed open");
    assert_eq!(f.metrics.api_timeouts("header"), 1);
    assert!(f.eventually(|| async { f.metrics.api_connections() == 0 }).await, "slots were not freed");
    f.shutdown().await;
}

#[tokio::test]
async fn server_keeps_answering_while_slow_clients_are_connected() {
    // All deadlines LONG: the slow clients stay connected throughout.
    let f = Fixture::start(ApiSettings { max_connections_per_client: 32, ..settings() }).await;
    let mut bodies = Vec::new();
    for _ in 0..8 {
        let mut stream = f.tls().await.unwrap();
        start_slow_post(&mut stream).await.unwrap();
        bodies.push(stream);
    }
    let mut heads = Vec::new();
    for _ in 0..4 {
        let mut stream = f.tls().await.unwrap();
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHo").await.unwrap();
        stream.flush().await.unwrap();
        heads.push(stream);
    }
    let mut handshakes = Vec::new();
    for _ in 0..4 {
        handshakes.push(f.tcp_from([127, 0, 0, 1]).await.unwrap());
    }
    assert!(
        f.eventually(|| async { f.metrics.api_connections() == 16 }).await,
        "the slow clients were not all admitted"
    );
    for _ in 0..3 {
        assert!(f.answers().await, "a normal request went unanswered while slow clients were connected");
    }
    // The normal requests' connections close on their own; the slow ones must remain.
    assert!(f.eventually(|| async { f.metrics.api_connections() == 16 }).await, "a slow client was dropped");
    assert_eq!(f.metrics.api_connections_refused("client_limit"), 0);
    drop((bodies, heads, handshakes));
    assert!(f.eventually(|| async { f.metrics.api_connections() == 0 }).await, "slots were not freed");
    f.shutdown().await;
}

#[tokio::test]
async fn server_lets_a_long_poll_outlast_the_request_deadlines() {
    let short = Duration::from_millis(300);
    let f =
        Fixture::start(ApiSettings { idle_timeout: short, header_timeout: short, body_timeout: short, ..settings() })
            .await;
    let mut stream = f.tls().await.unwrap();
    // The handler takes five times the deadlines to answer.
    assert_eq!(http_get(&mut stream, "/poll").await.unwrap(), (200, "changed\n".to_string()));
    // And the connection is still good for the next request.
    assert_eq!(http_get(&mut stream, "/healthz").await.unwrap().0, 200);
    // The body clock starts when the handler reads the body, not when the head arrived.
    let body = r#"{"n":1}"#;
    let request = format!(
        "POST /late-reader HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream).await.unwrap(), (200, body.to_string()));
    for phase in ["idle", "header", "body"] {
        assert_eq!(f.metrics.api_timeouts(phase), 0, "{phase}");
    }
    f.shutdown().await;
}

/// Records what it is given, or fails while `failing` is set (etcd refusing a deposed
/// leader's write).
#[derive(Default)]
struct TestJournal {
    failing: std::sync::atomic::AtomicBool,
    written: Mutex<Vec<(GroupKey, crate::witness::LeaseRecord)>>,
}

impl LeaseJournal for TestJournal {
    fn write<'a>(
        &'a self,
        group: &'a GroupKey,
        record: &'a crate::witness::LeaseRecord,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("refused, this controller no longer leads".into());
            }
            self.written.lock().unwrap().push((group.clone(), record.clone()));
            Ok(())
        })
    }
}

/// The node API of a standalone controller with one group `default/g` (nodes a and b),
/// its witness journal, and the directories it lives in.
async fn node_api_with_one_group() -> (Router, Arc<TestJournal>, [tempfile::TempDir; 2]) {
    use crate::standalone::file_store::FileStore;
    let manifests = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(
        manifests.path().join("g.yaml"),
        "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {name: g}\nspec:\n  nodes:\n    - {name: a, heartbeatAddresses: [198.18.1.1]}\n    - {name: b, heartbeatAddresses: [198.18.1.2]}\n  heartbeat: {leaseTTL: 600ms, maxClockDriftPpm: 500}\n",
    )
    .unwrap();
    let store = FileStore::open(manifests.path(), state.path()).unwrap();
    let controller = Arc::new(
        Controller::start(store, crate::controller::Settings::default(), Arc::new(Metrics::new())).await.unwrap(),
    );
    controller.reconcile().await.unwrap();
    let journal = Arc::new(TestJournal::default());
    let witness = crate::witness::Witness::resume(Duration::ZERO, []);
    let api = NodeApi::new(
        controller,
        Arc::new(Ca::generate().unwrap().0),
        crate::pki::tokens::TokenFile::new(state.path()),
        Some(Box::new(witness)),
        ApiSettings::default(),
    )
    .with_journal(journal.clone());
    (router(Arc::new(api)), journal, [manifests, state])
}

#[tokio::test]
async fn the_node_api_version_is_echoed_to_a_peer_that_announced_it_and_one_out_of_skew_gets_a_400() {
    let (app, _journal, _dirs) = node_api_with_one_group().await;
    let ask = |header: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut request = axum::http::Request::get("/healthz");
            if let Some(v) = header {
                request = request.header(PROTOCOL_HEADER, v);
            }
            let mut request = request.body(axum::body::Body::empty()).unwrap();
            let addr: SocketAddr = "198.18.1.1:40000".parse().unwrap();
            request.extensions_mut().insert(Peer { identity: PeerIdentity::Node("a".into()), addr });
            let response = app.oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let echoed = response.headers().get(PROTOCOL_HEADER).map(|v| v.to_str().unwrap().to_string());
            let bytes = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
            (status, echoed, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    // The previous release sends no header and must never see one.
    assert_eq!(ask(None).await, (200, None, "ok\n".into()));
    assert_eq!(ask(Some("1")).await, (200, Some("1".into()), "ok\n".into()));
    assert_eq!(ask(Some("2")).await, (200, Some("2".into()), "ok\n".into()));
    for bad in ["3", "0", "two"] {
        let (status, echoed, body) = ask(Some(bad)).await;
        assert_eq!((status, echoed), (400, None), "{bad}: {body}");
        let error: hapair_crds::nodeapi::ApiError = serde_json::from_str(&body).unwrap();
        assert!(error.error.contains(&format!("node API protocol version {bad:?} is not supported")), "{body}");
        assert!(error.error.contains("this controller speaks 1 to 2"), "{body}");
    }
}

#[tokio::test]
async fn grants_are_recorded_before_they_are_answered_and_unrecorded_ones_answered_503() {
    let (app, journal, _dirs) = node_api_with_one_group().await;
    let ask = |op: &str| {
        let app = app.clone();
        let body = format!(r#"{{"group":"default/g","node":"a","op":"{op}","epoch":3,"ttlMs":600}}"#);
        async move {
            let mut request = axum::http::Request::post(paths::LEASE)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .unwrap();
            let addr: SocketAddr = "198.18.1.1:40000".parse().unwrap();
            request.extensions_mut().insert(Peer { identity: PeerIdentity::Node("a".into()), addr });
            let response = app.oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let bytes = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let (status, answer) = ask("acquire").await;
    assert_eq!(status, 200);
    let granted: LeaseResponse = serde_json::from_str(&answer).unwrap();
    assert_eq!(granted, LeaseResponse::Granted { holder: "a".into(), ttl_ms: 600, epoch: 3 });
    let written = journal.written.lock().unwrap().clone();
    let record = crate::witness::LeaseRecord { holder: Some("a".into()), holder_epoch: 3, epoch: 3, held_ms: 601 };
    assert_eq!(written, vec![(GroupKey::new("default", "g"), record)]);

    journal.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, answer) = ask("renew").await;
    assert_eq!(status, 503, "an unrecorded grant must not be answered: {answer}");
    assert!(answer.contains("could not record its witness decision (refused"), "{answer}");
    assert_eq!(journal.written.lock().unwrap().len(), 1);
}
