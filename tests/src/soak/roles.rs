//! Which node claims to be the group's primary right now, as its own agent reports it: the
//! writer and the probes use a node's export only while it does (see [`crate::soak::watch`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether each node's agent currently reports itself the group's primary, polled every
/// ~20 ms from inside each node's namespace (an agent that does not answer is not).
#[derive(Clone, Debug)]
pub struct Roles {
    primary: Arc<[AtomicBool; 2]>,
    stop: Arc<AtomicBool>,
}

impl Roles {
    /// Starts one poller per namespace name in `namespaces` (a, b).
    pub fn start(namespaces: [&str; 2]) -> Roles {
        let roles = Roles {
            primary: Arc::new([AtomicBool::new(false), AtomicBool::new(false)]),
            stop: Arc::new(AtomicBool::new(false)),
        };
        for (i, ns) in namespaces.into_iter().enumerate() {
            let (r, path) = (roles.clone(), PathBuf::from("/var/run/netns").join(ns));
            std::thread::spawn(move || r.poll(i, &path));
        }
        roles
    }

    fn poll(&self, i: usize, netns: &std::path::Path) {
        let Ok(file) = std::fs::File::open(netns) else { return };
        // SAFETY: setns on a valid namespace descriptor affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        if rc != 0 {
            return;
        }
        let url = format!("http://{}/v1/status", crate::agents::ENDPOINTS);
        while !self.stop.load(Ordering::SeqCst) {
            let status = runtime.block_on(hapair_agent::flow::check::http_get(&url, Duration::from_millis(500)));
            let primary =
                status.ok().and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok()).is_some_and(|s| {
                    crate::agents::group(&s, crate::agents::GROUP).is_some_and(|g| g["role"] == "Primary")
                });
            self.primary[i].store(primary, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn primary(&self, i: usize) -> bool {
        self.primary[i].load(Ordering::SeqCst)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
