//! Which wire-protocol versions this agent speaks, and the negotiation every protocol
//! shares: each side announces the highest version it speaks and the lowest it accepts,
//! and two sides talk at the lower of their highest versions when each accepts it.
//!
//! Version 2 of each protocol exists to carry that announcement; version 1 is what the
//! previous release speaks, byte for byte. A process option
//! (`hapair-agent run --protocol-version 1`, or `HAPAIR_PROTOCOL_VERSION=1`) makes this
//! binary speak only version 1, so a rolling upgrade can be rehearsed with one build.

use std::sync::OnceLock;

/// The highest version this build speaks.
pub const CURRENT: u8 = 2;
/// The lowest version this build accepts: one behind, the supported skew.
pub const OLDEST: u8 = CURRENT - 1;
pub const ENV: &str = "HAPAIR_PROTOCOL_VERSION";

static FORCED: OnceLock<u8> = OnceLock::new();

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol version {0} is not one this agent speaks ({OLDEST} to {CURRENT})")]
pub struct Unsupported(pub u8);

/// Makes the whole process speak at most `version`. Only the first call counts: the
/// option is read once at start-up, before any protocol runs.
pub fn force(version: u8) -> Result<(), Unsupported> {
    if !(OLDEST..=CURRENT).contains(&version) {
        return Err(Unsupported(version));
    }
    let _ = FORCED.set(version);
    Ok(())
}

/// Reads [`ENV`] when no flag set the version; a value that is not a supported version is
/// an error rather than silently ignored.
pub fn force_from_env() -> Result<(), String> {
    match std::env::var(ENV) {
        Ok(value) => {
            let version: u8 = value.trim().parse().map_err(|_| format!("{ENV}={value} is not a version number"))?;
            force(version).map_err(|e| format!("{ENV}: {e}"))
        }
        Err(_) => Ok(()),
    }
}

/// The highest version this process speaks: [`CURRENT`] unless forced lower.
pub fn highest() -> u8 {
    FORCED.get().copied().unwrap_or(CURRENT)
}

/// A peer's announced range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub min: u8,
    pub max: u8,
}

impl Range {
    /// Version 1 has no announcement: a version 1 message means "1 only".
    pub const V1: Range = Range { min: 1, max: 1 };

    pub fn ours() -> Range {
        Range { min: OLDEST, max: highest() }
    }
}

/// Why two sides cannot talk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer speaks protocol versions {} to {}, this agent {} to {}", peer.min, peer.max, ours.min, ours.max)]
pub struct Mismatch {
    pub peer: Range,
    pub ours: Range,
}

/// The version two sides use: the lower of their highest, when both accept it.
pub fn negotiate(ours: Range, peer: Range) -> Result<u8, Mismatch> {
    let version = ours.max.min(peer.max);
    if version < ours.min || version < peer.min || peer.min > peer.max {
        return Err(Mismatch { peer, ours });
    }
    Ok(version)
}

/// What one peer has announced, and so the version to send it. Keyed on the peer's
/// incarnation: a range belongs to one run of the peer's binary, and a version 1 message
/// from a run that announced more only means that run is still being careful.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerVersion {
    heard: Option<(u64, Range)>,
}

impl PeerVersion {
    /// A message in `version`, announcing `range`, from the peer's run `incarnation`.
    pub fn heard(&mut self, incarnation: u64, version: u8, range: Range) {
        match self.heard {
            Some((known, _)) if incarnation < known => {}
            Some((known, _)) if incarnation == known && version < 2 => {}
            _ => self.heard = Some((incarnation, range)),
        }
    }

    /// The version to send in. Until the peer has said anything this is our highest:
    /// a peer of the previous release drops those few messages and answers in its own
    /// version, which is enough to step down; starting low instead would leave two new
    /// nodes waiting for each other to announce.
    pub fn send_version(&self, ours: Range) -> u8 {
        match self.heard {
            None => ours.max,
            Some((_, peer)) => negotiate(ours, peer).unwrap_or(ours.min),
        }
    }

    /// The agreed version once the peer has been heard.
    pub fn agreed(&self, ours: Range) -> Option<u8> {
        self.heard.and_then(|(_, peer)| negotiate(ours, peer).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_lower_highest_version_both_accept() {
        let new = Range { min: 1, max: 2 };
        assert_eq!(negotiate(new, new), Ok(2));
        assert_eq!(negotiate(new, Range::V1), Ok(1));
        assert_eq!(negotiate(Range::V1, new), Ok(1));
        let future = Range { min: 3, max: 4 };
        let err = negotiate(new, future).err();
        assert_eq!(err, Some(Mismatch { peer: future, ours: new }));
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("the peer speaks protocol versions 3 to 4, this agent 1 to 2")
        );
        assert!(negotiate(new, Range { min: 0, max: 0 }).is_err());
        assert!(negotiate(new, Range { min: 2, max: 1 }).is_err());
    }

    #[test]
    fn follows_the_peer_through_a_rolling_upgrade() {
        let new = Range { min: 1, max: 2 };
        let mut peer = PeerVersion::default();
        assert_eq!((peer.send_version(new), peer.agreed(new)), (2, None));
        // The peer still runs the previous release.
        peer.heard(10, 1, Range::V1);
        assert_eq!((peer.send_version(new), peer.agreed(new)), (1, Some(1)));
        // It restarts upgraded and announces 1..2.
        peer.heard(11, 2, new);
        assert_eq!((peer.send_version(new), peer.agreed(new)), (2, Some(2)));
        // Its version 1 messages sent before it heard us do not step us down again.
        peer.heard(11, 1, Range::V1);
        assert_eq!(peer.send_version(new), 2);
        // Nor does a replay from its previous run.
        peer.heard(10, 1, Range::V1);
        assert_eq!(peer.send_version(new), 2);
        // A rollback to the previous release is followed.
        peer.heard(12, 1, Range::V1);
        assert_eq!(peer.agreed(new), Some(1));
        // Forced to version 1 ourselves, we stay there whatever the peer says.
        assert_eq!(peer.send_version(Range { min: 1, max: 1 }), 1);
        peer.heard(13, 2, new);
        assert_eq!(peer.send_version(Range { min: 1, max: 1 }), 1);
    }

    #[test]
    fn only_supported_versions_can_be_forced() {
        assert_eq!(force(0), Err(Unsupported(0)));
        assert_eq!(force(3), Err(Unsupported(3)));
    }
}
