//! Kubernetes-style status conditions.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One aspect of an object's state, in the shape `kubectl` and tooling expect
/// (`type`, `status`, `reason`, `message`, `lastTransitionTime`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// CamelCase machine-readable reason.
    pub reason: String,
    pub message: String,
    /// RFC 3339 time the status last changed.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// Condition types used on HaGroup and ReplicatedVolume.
pub mod types {
    pub const READY: &str = "Ready";
    pub const VALID: &str = "Valid";
    pub const DEGRADED: &str = "Degraded";
    pub const SYNCED: &str = "Synced";
    pub const SPLIT_BRAIN: &str = "SplitBrain";
    pub const MAINTENANCE: &str = "Maintenance";
    pub const QUORUM_RISK: &str = "QuorumRisk";
    pub const IN_USE: &str = "InUse";
    /// A ReplicatedVolume's deletion waits because a group still uses it.
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
}

/// Sets `new` into `conditions`, keeping `lastTransitionTime` when the status did not change
/// so that an unchanged condition never causes a status write.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition_time = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *existing = Condition { last_transition_time: transition_time, ..new };
        }
        None => conditions.push(new),
    }
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(status: ConditionStatus, time: &str, message: &str) -> Condition {
        Condition {
            type_: types::READY.into(),
            status,
            reason: "Test".into(),
            message: message.into(),
            last_transition_time: time.into(),
            observed_generation: None,
        }
    }

    #[test]
    fn keeps_transition_time_when_status_unchanged() {
        let mut conditions = vec![cond(ConditionStatus::True, "t1", "a")];
        set_condition(&mut conditions, cond(ConditionStatus::True, "t2", "b"));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, "t1");
        assert_eq!(conditions[0].message, "b");
        set_condition(&mut conditions, cond(ConditionStatus::False, "t3", "c"));
        assert_eq!(conditions[0].last_transition_time, "t3");
    }
}
