//! Health checks of flow steps: a command exits 0, a TCP port accepts, an HTTP GET answers
//! below a status.

use std::collections::BTreeMap;
use std::time::Duration;

use hapair_crds::hagroup::{CheckSpec, HttpCheck, TcpCheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Outcome;
use super::command::{self, Exit};

/// Largest HTTP response read; health endpoints answer small.
const HTTP_RESPONSE_LIMIT: usize = 1024 * 1024;

/// Runs one check once.
pub async fn run(check: &CheckSpec, env: &BTreeMap<String, String>) -> Outcome {
    let timeout = check.timeout.as_std();
    if let Some(exec) = &check.exec {
        let r = command::run_shell(&exec.command, env, timeout).await;
        return match r.exit {
            Exit::Code(0) => Outcome::Ok { detail: r.output },
            Exit::TimedOut => Outcome::TimedOut { after: timeout, detail: r.output },
            Exit::Code(code) => {
                Outcome::Failed { reason: format!("check command exited with {code}"), detail: r.output }
            }
            Exit::Signal(sig) => {
                Outcome::Failed { reason: format!("check command died from signal {sig}"), detail: r.output }
            }
            Exit::SpawnFailed(e) => {
                Outcome::Failed { reason: format!("check command did not start: {e}"), detail: String::new() }
            }
        };
    }
    if let Some(tcp) = &check.tcp {
        return tcp_check(tcp, timeout).await;
    }
    if let Some(http) = &check.http {
        return http_check(http, timeout).await;
    }
    Outcome::Failed { reason: "check sets none of exec, tcp or http".into(), detail: String::new() }
}

async fn tcp_check(tcp: &TcpCheck, timeout: Duration) -> Outcome {
    let host = tcp.host.as_deref().unwrap_or("127.0.0.1");
    let target = format!("{}:{}", bracket(host), tcp.port);
    match tokio::time::timeout(timeout, TcpStream::connect(&target)).await {
        Ok(Ok(_)) => Outcome::Ok { detail: format!("connected to {target}") },
        Ok(Err(e)) => Outcome::Failed { reason: format!("connecting to {target}: {e}"), detail: String::new() },
        Err(_) => Outcome::TimedOut { after: timeout, detail: format!("connecting to {target}") },
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() }
}

async fn http_check(http: &HttpCheck, timeout: Duration) -> Outcome {
    match http_get(&http.url, timeout).await {
        Ok(r) if r.status < http.max_status => Outcome::Ok { detail: format!("GET {}: {}", http.url, r.status) },
        Ok(r) => Outcome::Failed {
            reason: format!("GET {} answered {} (healthy below {})", http.url, r.status, http.max_status),
            detail: String::from_utf8_lossy(&r.body).chars().take(512).collect(),
        },
        Err(HttpError::TimedOut) => Outcome::TimedOut { after: timeout, detail: format!("GET {}", http.url) },
        Err(e) => Outcome::Failed { reason: format!("GET {}: {e}", http.url), detail: String::new() },
    }
}

/// Why an HTTP GET failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("only http:// URLs are supported: {0:?}")]
    BadUrl(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within the timeout")]
    TimedOut,
    #[error("malformed response: {0}")]
    BadResponse(String),
}

/// A response's status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A plain HTTP/1.1 GET with `Connection: close`, bounded by `timeout` overall.
pub async fn http_get(url: &str, timeout: Duration) -> Result<HttpResponse, HttpError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| HttpError::BadUrl(url.to_string()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(HttpError::BadUrl(url.to_string()));
    }
    let has_port =
        authority.rsplit_once(':').is_some_and(|(h, p)| !p.is_empty() && (!h.contains(':') || h.ends_with(']')));
    let target = if has_port { authority.to_string() } else { format!("{authority}:80") };
    let exchange = async {
        let mut stream = TcpStream::connect(&target).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: hapair-agent\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(u64::try_from(HTTP_RESPONSE_LIMIT).unwrap_or(u64::MAX)).read_to_end(&mut response).await?;
        Ok::<_, HttpError>(response)
    };
    let response = tokio::time::timeout(timeout, exchange).await.map_err(|_| HttpError::TimedOut)??;
    parse_response(&response)
}

fn parse_response(bytes: &[u8]) -> Result<HttpResponse, HttpError> {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| HttpError::BadResponse("no end of headers".into()))?;
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| HttpError::BadResponse("headers are not text".into()))?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::BadResponse(format!("status line {status_line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::BadResponse(format!("status line {status_line:?}")));
    }
    let status = code.parse::<u16>().map_err(|_| HttpError::BadResponse(format!("status line {status_line:?}")))?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let raw = &bytes[end + 4..];
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    Ok(HttpResponse { status, body })
}

/// Best-effort chunked decoding; a health check only needs the status, the body is shown
/// in events.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = std::str::from_utf8(&raw[..eol]).unwrap_or("0");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        raw = &raw[eol + 2..];
        if size == 0 || raw.len() < size {
            break;
        }
        body.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or_default();
    }
    body
}

#[cfg(test)]
mod tests {
    use hapair_crds::hagroup::ExecCheck;
    use tokio::net::TcpListener;

    use super::*;

    fn spec() -> CheckSpec {
        serde_json::from_value(serde_json::json!({"timeout": "2s"})).unwrap_or_else(|e| panic!("{e}"))
    }

    async fn serve_once(answer: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let task = tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else { return String::new() };
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let _ = s.write_all(answer.as_bytes()).await;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_checks_compare_the_status() {
        let (port, server) = serve_once("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").await;
        let mut check = spec();
        check.http = Some(HttpCheck { url: format!("http://127.0.0.1:{port}/health?x=1"), max_status: 400 });
        assert!(run(&check, &BTreeMap::new()).await.is_ok());
        let request = server.await.unwrap_or_default();
        assert!(request.starts_with("GET /health?x=1 HTTP/1.1\r\nHost: 127.0.0.1:"), "{request}");

        let (port, _server) =
            serve_once("HTTP/1.1 503 Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndown\r\n0\r\n\r\n").await;
        check.http = Some(HttpCheck { url: format!("http://127.0.0.1:{port}/"), max_status: 400 });
        match run(&check, &BTreeMap::new()).await {
            Outcome::Failed { reason, detail } => {
                assert!(reason.ends_with("answered 503 (healthy below 400)"), "{reason}");
                assert_eq!(detail, "down");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tcp_checks_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut check = spec();
        check.tcp = Some(TcpCheck { host: None, port });
        assert!(run(&check, &BTreeMap::new()).await.is_ok());
        drop(listener);
        // A bound socket that never listens refuses connections and keeps the port from
        // being handed to a concurrent test, which a merely closed port would not.
        let closed =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap_or_else(|e| panic!("{e}"));
        let any_port: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
        closed.bind(&any_port.into()).unwrap_or_else(|e| panic!("{e}"));
        let closed_port =
            closed.local_addr().ok().and_then(|a| a.as_socket()).map(|a| a.port()).unwrap_or_else(|| panic!("no port"));
        check.tcp = Some(TcpCheck { host: None, port: closed_port });
        assert!(matches!(run(&check, &BTreeMap::new()).await, Outcome::Failed { .. }));
    }

    #[tokio::test]
    async fn exec_checks_use_the_exit_status_and_the_timeout() {
        let mut check = spec();
        check.exec = Some(ExecCheck { command: "test \"$X\" = yes".into() });
        let env = BTreeMap::from([("X".to_string(), "yes".to_string())]);
        assert!(run(&check, &env).await.is_ok());
        assert!(matches!(run(&check, &BTreeMap::new()).await, Outcome::Failed { .. }));
        check.exec = Some(ExecCheck { command: "sleep 30".into() });
        check.timeout = hapair_crds::duration::Duration::from_millis(200);
        assert!(matches!(run(&check, &env).await, Outcome::TimedOut { .. }));
    }

    #[test]
    fn urls_other_than_http_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
        for url in ["https://x/", "ftp://x", "http://", "http://user@host/"] {
            assert!(matches!(rt.block_on(http_get(url, Duration::from_secs(1))), Err(HttpError::BadUrl(_))), "{url}");
        }
    }

    #[test]
    fn garbage_responses_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let _ = parse_response(bad);
        }
        assert_eq!(parse_response(b"HTTP/1.0 200 OK\r\n\r\nhi").map(|r| r.status).ok(), Some(200));
    }
}
