//! Handing built bundles to the node API, where agents long-poll them.
//!
//! The board holds each node's latest bundle in a watch channel: publishing replaces it and
//! wakes every long-poll waiting on that node, and only that node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hapair_crds::nodeapi::DesiredConfig;
use tokio::sync::watch;

/// Where reconcile sends bundles. Publishing is idempotent: a bundle whose revision the
/// node already has changes nothing.
pub trait Publisher: Send + Sync {
    fn publish(&self, bundle: &DesiredConfig);
}

type Slot = watch::Sender<Option<Arc<DesiredConfig>>>;

/// The in-process publisher behind the node API's `GET /v1/nodes/{node}/config`.
#[derive(Debug, Default)]
pub struct BundleBoard {
    slots: Mutex<BTreeMap<String, Slot>>,
}

/// What a long-poll ended with.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    /// The node's bundle, whose revision differs from the one the agent has.
    Changed(Arc<DesiredConfig>),
    /// Nothing new within the wait.
    Unchanged,
    /// The controller has no bundle for this node.
    Unknown,
}

impl BundleBoard {
    fn slots(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn subscribe(&self, node: &str) -> watch::Receiver<Option<Arc<DesiredConfig>>> {
        self.slots().entry(node.to_string()).or_insert_with(|| watch::channel(None).0).subscribe()
    }

    /// The node's current bundle, if it has one.
    pub fn current(&self, node: &str) -> Option<Arc<DesiredConfig>> {
        self.slots().get(node).and_then(|slot| slot.borrow().clone())
    }

    /// Whether the controller has ever published a bundle for `node`.
    pub fn knows(&self, node: &str) -> bool {
        self.current(node).is_some()
    }

    /// Waits up to `wait` for the node's bundle to have a revision other than `have`, and
    /// returns it; returns at once when it already does. "Other", not "greater": an agent
    /// that kept a revision from a controller whose state was wiped must still get the new
    /// bundle rather than wait forever.
    pub async fn poll(&self, node: &str, have: Option<u64>, wait: Duration) -> Poll {
        let mut rx = self.subscribe(node);
        let differs = |b: &Option<Arc<DesiredConfig>>| b.as_ref().is_some_and(|b| Some(b.revision) != have);
        let changed = match tokio::time::timeout(wait, rx.wait_for(differs)).await {
            Ok(Ok(bundle)) => (*bundle).clone(),
            _ => None,
        };
        match changed {
            Some(bundle) => Poll::Changed(bundle),
            None if rx.borrow().is_none() => Poll::Unknown,
            None => Poll::Unchanged,
        }
    }
}

impl Publisher for BundleBoard {
    fn publish(&self, bundle: &DesiredConfig) {
        let mut slots = self.slots();
        let slot = slots.entry(bundle.node.clone()).or_insert_with(|| watch::channel(None).0);
        slot.send_if_modified(|current| {
            if current.as_ref().is_some_and(|c| c.revision == bundle.revision) {
                return false;
            }
            *current = Some(Arc::new(bundle.clone()));
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(node: &str, revision: u64) -> DesiredConfig {
        DesiredConfig { node: node.into(), revision, groups: vec![], wipes: vec![] }
    }

    #[tokio::test]
    async fn poll_returns_at_once_when_newer_and_waits_otherwise() {
        let board = BundleBoard::default();
        assert_eq!(board.poll("a", None, Duration::ZERO).await, Poll::Unknown);
        board.publish(&bundle("a", 1));
        assert!(matches!(board.poll("a", None, Duration::ZERO).await, Poll::Changed(b) if b.revision == 1));
        assert_eq!(board.poll("a", Some(1), Duration::from_millis(20)).await, Poll::Unchanged);
        // A revision the controller never issued (state wiped) is answered at once too.
        assert!(matches!(board.poll("a", Some(9), Duration::ZERO).await, Poll::Changed(b) if b.revision == 1));
    }

    #[tokio::test]
    async fn publishing_wakes_a_waiting_poll_of_that_node_only() {
        let board = Arc::new(BundleBoard::default());
        board.publish(&bundle("a", 1));
        board.publish(&bundle("b", 1));
        let waiter = {
            let board = board.clone();
            tokio::spawn(async move { board.poll("a", Some(1), Duration::from_secs(10)).await })
        };
        let other = {
            let board = board.clone();
            tokio::spawn(async move { board.poll("b", Some(1), Duration::from_millis(200)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        board.publish(&bundle("a", 2));
        let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(woken, Ok(Ok(Poll::Changed(b))) if b.revision == 2));
        assert!(matches!(other.await, Ok(Poll::Unchanged)));
    }
}
