//! Split-brain resolution: which replica's changes are discarded when both changed.
//!
//! Both replicas evaluate the same rules on the same two handshakes, so they reach the same
//! verdict without another round trip. An operator's explicit choice (announced in the
//! handshake) comes first; then the volume's policy. A verdict that would discard the
//! changes of a replica that is currently primary is not applied: the engine has to demote
//! it first, because its data is in use.

use super::wire::{Hello, Resolution, WirePolicy, WireRole};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The local replica's changes are discarded; it becomes the sync target.
    LocalLoses {
        by: ResolvedBy,
    },
    PeerLoses {
        by: ResolvedBy,
    },
    /// No automatic decision; the replicas stay disconnected until someone decides.
    Undecided {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedBy {
    Operator,
    DiscardYoungerPrimary,
    DiscardLeastChanges,
}

impl ResolvedBy {
    pub fn label(&self) -> &'static str {
        match self {
            ResolvedBy::Operator => "operator",
            ResolvedBy::DiscardYoungerPrimary => "discard-younger-primary",
            ResolvedBy::DiscardLeastChanges => "discard-least-changes",
        }
    }
}

impl Verdict {
    pub fn mirror(self) -> Verdict {
        match self {
            Verdict::LocalLoses { by } => Verdict::PeerLoses { by },
            Verdict::PeerLoses { by } => Verdict::LocalLoses { by },
            other => other,
        }
    }
}

/// Decides who loses a detected split brain.
pub fn resolve(local: &Hello, peer: &Hello) -> Verdict {
    let verdict = pick(local, peer);
    let loser_is_primary = match &verdict {
        Verdict::LocalLoses { .. } => local.role == WireRole::Primary,
        Verdict::PeerLoses { .. } => peer.role == WireRole::Primary,
        Verdict::Undecided { .. } => false,
    };
    if loser_is_primary {
        let who = if matches!(verdict, Verdict::LocalLoses { .. }) { &local.node } else { &peer.node };
        return Verdict::Undecided {
            reason: format!("the losing replica {who} is primary; demote it to discard its changes"),
        };
    }
    verdict
}

fn pick(local: &Hello, peer: &Hello) -> Verdict {
    let local_loses =
        local.resolution == Some(Resolution::DiscardLocal) || peer.resolution == Some(Resolution::KeepLocal);
    let peer_loses =
        peer.resolution == Some(Resolution::DiscardLocal) || local.resolution == Some(Resolution::KeepLocal);
    match (local_loses, peer_loses) {
        (true, false) => return Verdict::LocalLoses { by: ResolvedBy::Operator },
        (false, true) => return Verdict::PeerLoses { by: ResolvedBy::Operator },
        (true, true) => {
            return Verdict::Undecided {
                reason: "the operator's choices on the two nodes contradict each other".into(),
            };
        }
        (false, false) => {}
    }
    if local.policy != peer.policy {
        let (x, y) = if local.node <= peer.node { (local, peer) } else { (peer, local) };
        return Verdict::Undecided {
            reason: format!(
                "the nodes disagree on the split-brain policy ({}: {:?}, {}: {:?})",
                x.node, x.policy, y.node, y.policy
            ),
        };
    }
    match local.policy {
        WirePolicy::Manual => Verdict::Undecided { reason: "split-brain policy is manual".into() },
        WirePolicy::DiscardYoungerPrimary => younger_primary(local, peer).unwrap_or_else(|| Verdict::Undecided {
            reason: "both replicas were promoted at the same epoch and time".into(),
        }),
        WirePolicy::DiscardLeastChanges => match local.dirty_blocks.cmp(&peer.dirty_blocks) {
            std::cmp::Ordering::Less => Verdict::LocalLoses { by: ResolvedBy::DiscardLeastChanges },
            std::cmp::Ordering::Greater => Verdict::PeerLoses { by: ResolvedBy::DiscardLeastChanges },
            std::cmp::Ordering::Equal => younger_primary(local, peer).unwrap_or_else(|| Verdict::Undecided {
                reason: "both replicas changed as many blocks and were promoted together".into(),
            }),
        },
    }
}

/// The replica promoted last (higher epoch, then later time) loses.
fn younger_primary(local: &Hello, peer: &Hello) -> Option<Verdict> {
    let l = (local.promoted_epoch, local.promoted_at_ms);
    let p = (peer.promoted_epoch, peer.promoted_at_ms);
    match l.cmp(&p) {
        std::cmp::Ordering::Greater => Some(Verdict::LocalLoses { by: ResolvedBy::DiscardYoungerPrimary }),
        std::cmp::Ordering::Less => Some(Verdict::PeerLoses { by: ResolvedBy::DiscardYoungerPrimary }),
        std::cmp::Ordering::Equal => None,
    }
}
