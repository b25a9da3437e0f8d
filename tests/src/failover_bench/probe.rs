//! The client's side of the measurement: connection attempts to the virtual IP, started at
//! a fixed pace and each bounded by a short timeout, until one is answered by the expected
//! server.
//!
//! Attempts overlap instead of running one after another: a SYN sent while the address was
//! still unreachable is only retransmitted after a second, so a serial client would measure
//! its own retry timer rather than the moment the service became reachable again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// How the client tries.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// A new attempt starts this often.
    pub every: Duration,
    /// Each attempt (connect and read the answer) gives up after this.
    pub attempt_timeout: Duration,
}

pub const DEFAULT_PACE: Pace = Pace { every: Duration::from_millis(5), attempt_timeout: Duration::from_millis(250) };

/// The longest answer read; the service sends a node name and a newline.
const ANSWER_LIMIT: u64 = 64;

/// Connects once and returns who answered, if anyone did in time.
pub async fn ask(target: SocketAddr, timeout: Duration) -> Option<String> {
    let attempt = async {
        let stream = TcpStream::connect(target).await.ok()?;
        let mut answer = String::new();
        stream.take(ANSWER_LIMIT).read_to_string(&mut answer).await.ok()?;
        Some(answer.trim().to_string())
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

/// Starts an attempt every `pace.every` until one is answered by `expected`, and returns
/// the instant that answer arrived; `None` once `deadline` passes or `stop()` says so.
/// Answers from any other server are ignored.
pub async fn first_answer_from(
    target: SocketAddr,
    expected: &str,
    pace: Pace,
    deadline: Instant,
    stop: impl Fn() -> bool,
) -> Option<Instant> {
    let mut attempts = JoinSet::new();
    let mut ticks = tokio::time::interval(pace.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if Instant::now() >= deadline || stop() {
            return None;
        }
        tokio::select! {
            _ = ticks.tick() => {
                attempts.spawn(async move {
                    let answer = ask(target, pace.attempt_timeout).await;
                    (answer, Instant::now())
                });
            }
            Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                if let Ok((Some(answer), at)) = done
                    && answer == expected
                {
                    return Some(at);
                }
            }
        }
    }
}
