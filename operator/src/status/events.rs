//! Each group's recent events: what its agents reported and what the controller decided,
//! newest last, bounded so a flapping group cannot grow the controller without limit.
//!
//! In Kubernetes mode these also become Events; in standalone mode this ring is what
//! `describe` shows.

use std::collections::{BTreeMap, VecDeque};

use hapair_crds::nodeapi::{EventRecord, EventType, GroupKey};
use serde::{Deserialize, Serialize};

/// Events kept per group.
pub const DEFAULT_CAPACITY: usize = 100;

/// An event and who raised it (`None`: the controller).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(flatten)]
    pub event: EventRecord,
}

impl GroupEvent {
    /// An event raised by the controller itself.
    pub fn controller(time: String, type_: EventType, reason: &str, message: String) -> Self {
        GroupEvent { node: None, event: EventRecord { time, type_, reason: reason.to_string(), message, epoch: 0 } }
    }
}

/// Longest event message kept, in bytes. Agents quote probe output and command errors;
/// a kilobyte says what went wrong, and a hostile or broken agent cannot fill the ring's
/// memory and `events.json` with megabytes per event.
pub const MAX_MESSAGE: usize = 1024;

/// Longest reason, node name or time kept, in bytes (they are short words by design).
pub const MAX_WORD: usize = 253;

impl GroupEvent {
    /// The event with every text field cut to its limit, marked where it was cut.
    fn bounded(mut self) -> GroupEvent {
        truncate(&mut self.event.message, MAX_MESSAGE);
        truncate(&mut self.event.reason, MAX_WORD);
        truncate(&mut self.event.time, MAX_WORD);
        if let Some(node) = &mut self.node {
            truncate(node, MAX_WORD);
        }
        self
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, ending in "…".
fn truncate(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    const MARK: &str = "…";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
}

/// Bounded per-group event history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EventRing {
    capacity: usize,
    groups: BTreeMap<GroupKey, VecDeque<GroupEvent>>,
}

impl Default for EventRing {
    fn default() -> Self {
        EventRing::new(DEFAULT_CAPACITY)
    }
}

impl EventRing {
    pub fn new(capacity: usize) -> Self {
        EventRing { capacity: capacity.max(1), groups: BTreeMap::new() }
    }

    /// Appends `event` unless the very same event is already among the recent ones (an agent
    /// re-sending a report whose reply it lost). Returns whether it was added.
    pub fn push(&mut self, key: &GroupKey, event: GroupEvent) -> bool {
        let event = event.bounded();
        let ring = self.groups.entry(key.clone()).or_default();
        if ring.iter().rev().take(self.capacity).any(|e| *e == event) {
            return false;
        }
        ring.push_back(event);
        while ring.len() > self.capacity {
            ring.pop_front();
        }
        true
    }

    /// The group's events, oldest first.
    pub fn recent(&self, key: &GroupKey) -> Vec<GroupEvent> {
        self.groups.get(key).map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }

    /// Drops a group's events; whether it had any.
    pub fn forget(&mut self, key: &GroupKey) -> bool {
        self.groups.remove(key).is_some()
    }

    /// The groups that have events.
    pub fn groups(&self) -> impl Iterator<Item = &GroupKey> {
        self.groups.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32) -> GroupEvent {
        GroupEvent::controller(format!("t{n}"), EventType::Normal, "Test", format!("event {n}"))
    }

    #[test]
    fn keeps_the_newest_events_up_to_capacity() {
        let key = GroupKey::new("default", "g");
        let mut ring = EventRing::new(3);
        for n in 0..5 {
            assert!(ring.push(&key, event(n)));
        }
        let messages: Vec<String> = ring.recent(&key).into_iter().map(|e| e.event.message).collect();
        assert_eq!(messages, ["event 2", "event 3", "event 4"]);
        assert!(ring.recent(&GroupKey::new("default", "other")).is_empty());
    }

    #[test]
    fn a_resent_event_is_kept_once() {
        let key = GroupKey::new("default", "g");
        let mut ring = EventRing::new(10);
        let mut from_node = event(1);
        from_node.node = Some("a".into());
        assert!(ring.push(&key, from_node.clone()));
        assert!(!ring.push(&key, from_node));
        assert!(ring.push(&key, event(1)), "the same record from another source is distinct");
        assert_eq!(ring.recent(&key).len(), 2);
    }

    #[test]
    fn round_trips_through_json() {
        let key = GroupKey::new("default", "g");
        let mut ring = EventRing::new(2);
        ring.push(&key, event(1));
        let json = serde_json::to_string(&ring).unwrap_or_default();
        let back: EventRing = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(back, ring);
    }

    #[test]
    fn long_fields_are_cut_on_a_character_boundary() {
        let key = GroupKey::new("default", "g");
        let mut ring = EventRing::new(2);
        let mut huge =
            GroupEvent::controller("t".into(), EventType::Warning, &"R".repeat(10_000), "é".repeat(1_000_000));
        huge.node = Some("n".repeat(10_000));
        assert!(ring.push(&key, huge));
        let kept = &ring.recent(&key)[0];
        assert!(kept.event.message.len() <= MAX_MESSAGE && kept.event.message.ends_with('…'));
        assert!(kept.event.message.starts_with("éé"));
        assert!(kept.event.reason.len() <= MAX_WORD);
        assert!(kept.node.as_ref().is_some_and(|n| n.len() <= MAX_WORD));
        let mut short = "abc".to_string();
        truncate(&mut short, 3);
        assert_eq!(short, "abc");
    }
}
