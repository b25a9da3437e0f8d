//! A client that keeps connecting to the service on the virtual IP from its namespace, one
//! attempt started every 5 ms (attempts overlap, see [`crate::failover_bench::probe`]), and
//! records who answered and when: the outages of a test are the gaps in its answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::failover_bench::probe::{self, DEFAULT_PACE};
use crate::failover_bench::service_address;
use crate::netns::Netns;

/// The running client; [`ClientLoop::finish`] returns its answers as (finished, answering
/// node), in time order.
#[derive(Debug)]
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Instant, String)>>>,
}

impl ClientLoop {
    pub fn start(client: &Netns) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = client.path();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            // SAFETY: setns on a valid namespace descriptor affects only this thread.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("a runtime for the client: {e}"));
            runtime.block_on(async move {
                let mut answers = Vec::new();
                let mut attempts = tokio::task::JoinSet::new();
                let mut ticks = tokio::time::interval(DEFAULT_PACE.every);
                while !flag.load(Ordering::SeqCst) {
                    tokio::select! {
                        _ = ticks.tick() => {
                            attempts.spawn(async move {
                                let answer = probe::ask(service_address(), DEFAULT_PACE.attempt_timeout).await.map(|a| a.server);
                                (Instant::now(), answer)
                            });
                        }
                        Some(Ok((at, Some(answer)))) = attempts.join_next(), if !attempts.is_empty() => {
                            answers.push((at, answer));
                        }
                    }
                }
                answers
            })
        });
        ClientLoop { stop, thread: Some(thread) }
    }

    pub fn finish(mut self) -> Vec<(Instant, String)> {
        self.stop.store(true, Ordering::SeqCst);
        let joined = self.thread.take().map(|t| t.join().unwrap_or_else(|_| panic!("the client thread panicked")));
        let mut answers = joined.unwrap_or_default();
        answers.sort_by_key(|(at, _)| *at);
        answers
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
