//! What this node knows about its peer: liveness per link, and the peer's latest word.
//!
//! Heartbeats are filtered by `(incarnation, seq)`. An older incarnation is a replay and is
//! dropped. Within one incarnation, a heartbeat counts for a link's liveness when it is
//! newer than the last one seen *on that link*, and updates the peer's state only when it
//! is newer than the last one seen on *any* link: the same message arrives once per link,
//! and a delayed copy must not roll the peer's state back.

use std::time::Duration;

use super::heartbeat::Heartbeat;
use super::time::Instant;

#[derive(Clone, Debug, Default)]
struct LinkSeen {
    incarnation: u64,
    seq: u64,
    last_heard: Option<Instant>,
}

/// The newest heartbeat from the peer and when it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub heartbeat: Heartbeat,
    pub received_at: Instant,
}

/// What one arriving heartbeat turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Newer than anything seen: the peer's state was updated.
    Newest { new_incarnation: bool },
    /// A copy of an already-seen heartbeat on another link: liveness only.
    LinkOnly,
    /// Old, duplicated or replayed: ignored.
    Stale,
}

#[derive(Clone, Debug)]
pub struct PeerTracker {
    incarnation: u64,
    seq: u64,
    links: Vec<LinkSeen>,
    last_heard: Option<Instant>,
    latest: Option<PeerView>,
}

impl PeerTracker {
    pub fn new(links: usize, known_incarnation: u64) -> PeerTracker {
        PeerTracker {
            incarnation: known_incarnation,
            seq: 0,
            links: vec![LinkSeen::default(); links.max(1)],
            last_heard: None,
            latest: None,
        }
    }

    /// Adapts to a changed link count, keeping what is known of the remaining links.
    pub fn resize_links(&mut self, links: usize) {
        self.links.resize(links.max(1), LinkSeen::default());
    }

    pub fn observe(&mut self, link: usize, hb: Heartbeat, now: Instant) -> Arrival {
        if hb.incarnation < self.incarnation {
            return Arrival::Stale;
        }
        let new_incarnation = hb.incarnation > self.incarnation;
        if new_incarnation {
            self.incarnation = hb.incarnation;
            self.seq = 0;
        }
        let Some(seen) = self.links.get_mut(link) else {
            return Arrival::Stale;
        };
        let link_fresh = seen.incarnation < hb.incarnation || (seen.incarnation == hb.incarnation && hb.seq > seen.seq);
        if !link_fresh {
            return Arrival::Stale;
        }
        seen.incarnation = hb.incarnation;
        seen.seq = hb.seq;
        seen.last_heard = Some(now);
        self.last_heard = Some(self.last_heard.map_or(now, |t| t.max(now)));
        if hb.seq <= self.seq {
            return Arrival::LinkOnly;
        }
        self.seq = hb.seq;
        self.latest = Some(PeerView { heartbeat: hb, received_at: now });
        Arrival::Newest { new_incarnation }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// The link's last fresh arrival.
    pub fn link_heard(&self, link: usize) -> Option<Instant> {
        self.links.get(link).and_then(|l| l.last_heard)
    }

    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Heard on some link within `dead_after`.
    pub fn reachable(&self, now: Instant, dead_after: Duration) -> bool {
        self.last_heard.is_some_and(|t| now.since(t) < dead_after)
    }

    /// The peer's latest word, if it is recent enough to act on.
    pub fn fresh(&self, now: Instant, dead_after: Duration) -> Option<&Heartbeat> {
        if self.reachable(now, dead_after) { self.latest.as_ref().map(|v| &v.heartbeat) } else { None }
    }

    /// The peer's latest word however old.
    pub fn latest(&self) -> Option<&PeerView> {
        self.latest.as_ref()
    }
}
