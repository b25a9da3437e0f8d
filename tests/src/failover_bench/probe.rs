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

/// The longest answer read; the service sends a node name, maybe a count, and a newline.
const ANSWER_LIMIT: u64 = 64;

/// What the service said: which server, and the write it acknowledged if it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub server: String,
    pub write: Option<u64>,
}

impl Answer {
    /// `NAME` or `NAME N`; anything else is no answer.
    pub fn parse(text: &str) -> Option<Answer> {
        let mut words = text.split_whitespace();
        let server = words.next()?.to_string();
        let write = match words.next() {
            Some(n) => Some(n.parse().ok()?),
            None => None,
        };
        words.next().is_none().then_some(Answer { server, write })
    }
}

/// Connects once and returns the answer, if one came in time.
pub async fn ask(target: SocketAddr, timeout: Duration) -> Option<Answer> {
    let attempt = async {
        let stream = TcpStream::connect(target).await.ok()?;
        let mut answer = String::new();
        stream.take(ANSWER_LIMIT).read_to_string(&mut answer).await.ok()?;
        Answer::parse(&answer)
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

/// The first answer from the expected server, and the writes acknowledged before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstAnswer {
    pub at: Instant,
    /// The write the expected server acknowledged in that answer.
    pub write: Option<u64>,
    /// The highest write any other server acknowledged before it.
    pub acknowledged_before: Option<u64>,
}

impl FirstAnswer {
    /// Acknowledged writes the expected server does not have: its first write should be
    /// the one after the highest acknowledged before.
    pub fn lost_writes(&self) -> Option<u64> {
        let (first, acknowledged) = (self.write?, self.acknowledged_before?);
        Some(acknowledged.saturating_sub(first.saturating_sub(1)))
    }
}

/// Starts an attempt every `pace.every` until one is answered by `expected`, and returns
/// when that answer arrived; `None` once `deadline` passes or `stop()` says so. Answers
/// from any other server only count for the writes they acknowledged.
pub async fn first_answer_from(
    target: SocketAddr,
    expected: &str,
    pace: Pace,
    deadline: Instant,
    stop: impl Fn() -> bool,
) -> Option<FirstAnswer> {
    let mut acknowledged_before: Option<u64> = None;
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
                if let Ok((Some(answer), at)) = done {
                    if answer.server == expected {
                        return Some(FirstAnswer { at, write: answer.write, acknowledged_before });
                    }
                    acknowledged_before = acknowledged_before.max(answer.write);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_the_server_and_maybe_the_write() {
        assert_eq!(Answer::parse("a\n"), Some(Answer { server: "a".into(), write: None }));
        assert_eq!(Answer::parse("b 17\n"), Some(Answer { server: "b".into(), write: Some(17) }));
        for garbage in ["", "\n", "a x", "a 1 2", "a -1"] {
            assert_eq!(Answer::parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn a_write_acknowledged_by_the_old_server_and_missing_on_the_new_one_is_lost() {
        let at = Instant::now();
        let first = |write, acknowledged_before| FirstAnswer { at, write, acknowledged_before };
        assert_eq!(first(Some(11), Some(10)).lost_writes(), Some(0), "the next write after the last acknowledged");
        assert_eq!(first(Some(12), Some(10)).lost_writes(), Some(0), "an unacknowledged write that survived");
        assert_eq!(first(Some(9), Some(10)).lost_writes(), Some(2), "10 and 9 were acknowledged and are gone");
        assert_eq!(first(Some(1), None).lost_writes(), None, "nothing acknowledged before");
        assert_eq!(first(None, Some(3)).lost_writes(), None, "a service that does not write");
    }
}
