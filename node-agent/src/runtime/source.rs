//! Where desired-config bundles come from, behind one trait ([`ConfigSource`]): the
//! controller's long-poll ([`ControllerSource`]), or a local bundle file re-read on SIGHUP
//! and whenever its modification time changes ([`BundleFileSource`]). Either way the
//! supervisor receives whole bundles (or why one could not be read) and decides; the
//! engines never know which source is in use, so another source needs no change there.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hapair_crds::nodeapi::DesiredConfig;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use super::node_api::NodeApiClient;

/// How long one long-poll waits at the controller.
pub const POLL_WAIT: Duration = Duration::from_secs(30);
/// How often the bundle file's modification time is looked at.
pub const FILE_POLL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum SourceEvent {
    Bundle(Box<DesiredConfig>),
    /// The bundle file could not be read or decoded (the previous bundle stays in force).
    Unreadable(String),
    /// The controller answered again after failing.
    ControllerBack,
    /// The controller cannot be reached (reported once per outage).
    ControllerDown(String),
}

/// A producer of desired-config bundles for one node.
pub trait ConfigSource: Send + 'static {
    /// What the source is, for logs (`controller https://…`, `bundle file /etc/…`).
    fn describe(&self) -> String;

    /// Sends every bundle (and every failure to get one) to `tx` until `tx` is closed.
    fn run(self: Box<Self>, tx: UnboundedSender<SourceEvent>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Runs `source` as its own task.
pub fn spawn(source: Box<dyn ConfigSource>, tx: UnboundedSender<SourceEvent>) -> JoinHandle<()> {
    tracing::info!(source = %source.describe(), "desired config source");
    tokio::spawn(source.run(tx))
}

/// The controller's node API: long-polls by revision, starting from `have` (the cached
/// bundle's, so an unchanged config is not fetched again after a restart).
#[derive(Debug)]
pub struct ControllerSource {
    pub client: NodeApiClient,
    pub have: Option<u64>,
}

impl ConfigSource for ControllerSource {
    fn describe(&self) -> String {
        match self.client.endpoints() {
            [one] => format!("controller {one}"),
            all => format!("controllers {}", all.join(", ")),
        }
    }

    fn run(self: Box<Self>, tx: UnboundedSender<SourceEvent>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(controller(self.client, self.have, tx))
    }
}

/// A bundle file on this machine, re-read on `reload` (SIGHUP) and when it changes.
#[derive(Debug)]
pub struct BundleFileSource {
    pub path: PathBuf,
    pub reload: Arc<Notify>,
}

impl ConfigSource for BundleFileSource {
    fn describe(&self) -> String {
        format!("bundle file {}", self.path.display())
    }

    fn run(self: Box<Self>, tx: UnboundedSender<SourceEvent>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(file(self.path, self.reload, tx))
    }
}

async fn controller(client: NodeApiClient, mut have: Option<u64>, tx: UnboundedSender<SourceEvent>) {
    let mut failing = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        match client.poll_config(have, POLL_WAIT).await {
            Ok(answer) => {
                if std::mem::replace(&mut failing, false) {
                    let _ = tx.send(SourceEvent::ControllerBack);
                }
                backoff = Duration::from_millis(500);
                if let Some(bundle) = answer {
                    // Remembered even if the supervisor refuses it, so a refused
                    // bundle is not fetched again and again.
                    have = Some(bundle.revision);
                    if tx.send(SourceEvent::Bundle(Box::new(bundle))).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    let _ = tx.send(SourceEvent::ControllerDown(e.to_string()));
                } else {
                    tracing::debug!(error = %e, "controller still unreachable");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read(path: &Path) -> SourceEvent {
    match crate::bundle::read_file(path) {
        Ok(bundle) => SourceEvent::Bundle(Box::new(bundle)),
        Err(e) => SourceEvent::Unreadable(e),
    }
}

/// Reads `path` now, on every `reload` (SIGHUP) and when its modification time changes.
async fn file(path: PathBuf, reload: Arc<Notify>, tx: UnboundedSender<SourceEvent>) {
    let mut seen = modified(&path);
    if tx.send(read(&path)).is_err() {
        return;
    }
    loop {
        tokio::select! {
            () = reload.notified() => {}
            () = tokio::time::sleep(FILE_POLL) => {
                let now = modified(&path);
                if now == seen {
                    continue;
                }
            }
        }
        seen = modified(&path);
        if tx.send(read(&path)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUNDLE: &str = "node: a\nrevision: 1\ngroups: []\n";

    #[tokio::test]
    async fn the_file_is_reread_on_change_and_on_reload() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bundle.yaml");
        std::fs::write(&path, BUNDLE)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let reload = Arc::new(Notify::new());
        let task = spawn(Box::new(BundleFileSource { path: path.clone(), reload: Arc::clone(&reload) }), tx);
        let next = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<SourceEvent>| {
            tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.ok().flatten()
        };
        assert!(matches!(next(&mut rx).await, Some(SourceEvent::Bundle(b)) if b.revision == 1));
        // A later modification time is noticed by the poll.
        std::fs::write(&path, BUNDLE.replace("revision: 1", "revision: 2"))?;
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path)?.set_modified(later)?;
        assert!(matches!(next(&mut rx).await, Some(SourceEvent::Bundle(b)) if b.revision == 2));
        // A reload reads it whatever the time says; garbage is reported, not applied.
        std::fs::write(&path, "revision: [")?;
        std::fs::File::options().write(true).open(&path)?.set_modified(later)?;
        reload.notify_one();
        assert!(matches!(next(&mut rx).await, Some(SourceEvent::Unreadable(e)) if e.contains("bundle.yaml")));
        task.abort();
        Ok(())
    }
}
