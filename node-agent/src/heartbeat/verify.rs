//! Deciding whether a received datagram is a genuine, fresh heartbeat from the peer.
//!
//! Checks run cheapest first, so junk costs no HMAC; the replay window only moves for
//! authenticated packets, so a forger cannot push it forward.

use std::net::IpAddr;

use super::envelope::{self, GroupId, Header, NodeId, ParseError};
use super::key::HmacKey;
use super::replay::ReplayGuard;

/// Why a datagram was dropped. Every drop has exactly one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than a header and trailer, or than its declared payload.
    Truncated,
    /// Longer than declared or otherwise inconsistent.
    Malformed,
    /// Not a hapair heartbeat at all.
    BadMagic,
    UnsupportedVersion,
    /// A heartbeat of another group (for example two groups sharing a port by mistake).
    WrongGroup,
    /// Not from the configured peer node or not from its address on that link.
    UnknownSender,
    /// Claims another link than the one it arrived on.
    WrongLink,
    /// The HMAC does not match: wrong key or tampered.
    Forged,
    /// Seen before, or from an older sender incarnation.
    Replayed,
    /// Authentic, but from an epoch older than the caller's minimum.
    StaleEpoch,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::BadMagic,
        DropReason::UnsupportedVersion,
        DropReason::WrongGroup,
        DropReason::UnknownSender,
        DropReason::WrongLink,
        DropReason::Forged,
        DropReason::Replayed,
        DropReason::StaleEpoch,
    ];

    /// Metric label value.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::BadMagic => "bad_magic",
            DropReason::UnsupportedVersion => "unsupported_version",
            DropReason::WrongGroup => "wrong_group",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::WrongLink => "wrong_link",
            DropReason::Forged => "forged",
            DropReason::Replayed => "replayed",
            DropReason::StaleEpoch => "stale_epoch",
        }
    }

    fn index(&self) -> usize {
        DropReason::ALL.iter().position(|r| r == self).unwrap_or(0)
    }
}

impl From<ParseError> for DropReason {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Truncated => DropReason::Truncated,
            ParseError::BadMagic => DropReason::BadMagic,
            ParseError::UnsupportedVersion(_) => DropReason::UnsupportedVersion,
            ParseError::Malformed => DropReason::Malformed,
        }
    }
}

/// Drop counts by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Every reason with its count, zeros included, for metrics.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    fn bump(&mut self, reason: DropReason) {
        self.0[reason.index()] += 1;
    }
}

/// Who we accept heartbeats from.
#[derive(Clone, Debug)]
pub struct Expectation {
    pub group: GroupId,
    pub peer: NodeId,
    /// The peer's address on each link, by link index.
    pub peer_addresses: Vec<IpAddr>,
}

/// An accepted heartbeat.
#[derive(Debug, PartialEq, Eq)]
pub struct Accepted<'a> {
    pub header: Header,
    pub payload: &'a [u8],
}

/// The receiving side's verdicts and memory (replay windows, counters). Sans-IO.
#[derive(Debug)]
pub struct Verifier {
    expect: Expectation,
    key: HmacKey,
    replay: ReplayGuard,
    drops: DropCounts,
}

impl Verifier {
    pub fn new(expect: Expectation, key: HmacKey) -> Self {
        Verifier { expect, key, replay: ReplayGuard::new(), drops: DropCounts::default() }
    }

    /// Checks a datagram that arrived on `link` from `source`; counts it when dropped.
    pub fn verify<'a>(
        &mut self,
        bytes: &'a [u8],
        link: u8,
        source: IpAddr,
        min_epoch: u64,
    ) -> Result<Accepted<'a>, DropReason> {
        let verdict = self.check(bytes, link, source, min_epoch);
        if let Err(reason) = verdict {
            self.drops.bump(reason);
        }
        verdict
    }

    fn check<'a>(
        &mut self,
        bytes: &'a [u8],
        link: u8,
        source: IpAddr,
        min_epoch: u64,
    ) -> Result<Accepted<'a>, DropReason> {
        let packet = envelope::parse(bytes)?;
        let h = packet.header;
        if h.group != self.expect.group {
            return Err(DropReason::WrongGroup);
        }
        let expected_source = self.expect.peer_addresses.get(usize::from(link));
        if h.sender != self.expect.peer || expected_source != Some(&source) {
            return Err(DropReason::UnknownSender);
        }
        if h.link != link {
            return Err(DropReason::WrongLink);
        }
        if !packet.authentic(&self.key) {
            return Err(DropReason::Forged);
        }
        if !self.replay.is_fresh(h.incarnation, h.link, h.sequence) {
            return Err(DropReason::Replayed);
        }
        if h.epoch < min_epoch {
            return Err(DropReason::StaleEpoch);
        }
        self.replay.record(h.incarnation, h.link, h.sequence);
        Ok(Accepted { header: h, payload: packet.payload })
    }

    pub fn drops(&self) -> DropCounts {
        self.drops
    }

    /// Replaces the key (the controller rotated it) without forgetting replay state.
    pub fn set_key(&mut self, key: HmacKey) {
        self.key = key;
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hapair_crds::nodeapi::GroupKey;

    use super::super::envelope::seal;
    use super::*;

    const PEER0: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const PEER1: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));

    fn key(b: u8) -> HmacKey {
        HmacKey::from_bytes(vec![b; 16], "test").unwrap_or_else(|e| panic!("{e}"))
    }

    fn verifier() -> Verifier {
        Verifier::new(
            Expectation {
                group: GroupId::of(&GroupKey::new("db", "pg")),
                peer: NodeId::of("b"),
                peer_addresses: vec![PEER0, PEER1],
            },
            key(1),
        )
    }

    fn header(link: u8, seq: u64, epoch: u64) -> Header {
        Header {
            link,
            group: GroupId::of(&GroupKey::new("db", "pg")),
            sender: NodeId::of("b"),
            incarnation: 100,
            sequence: seq,
            epoch,
        }
    }

    fn sealed(k: u8, h: Header) -> Vec<u8> {
        seal(&key(k), &h, b"hb").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn each_kind_of_bad_packet_is_dropped_with_its_reason() {
        let mut v = verifier();
        let good = sealed(1, header(0, 1, 5));
        assert_eq!(v.verify(&good, 0, PEER0, 5).map(|a| a.payload), Ok(&b"hb"[..]));
        assert_eq!(v.verify(&good, 0, PEER0, 5), Err(DropReason::Replayed));
        assert_eq!(v.verify(&good[..20], 0, PEER0, 5), Err(DropReason::Truncated));
        assert_eq!(v.verify(&sealed(2, header(0, 2, 5)), 0, PEER0, 5), Err(DropReason::Forged));
        let mut other_group = header(0, 3, 5);
        other_group.group = GroupId::of(&GroupKey::new("db", "other"));
        assert_eq!(v.verify(&sealed(1, other_group), 0, PEER0, 5), Err(DropReason::WrongGroup));
        let mut stranger = header(0, 4, 5);
        stranger.sender = NodeId::of("c");
        assert_eq!(v.verify(&sealed(1, stranger), 0, PEER0, 5), Err(DropReason::UnknownSender));
        assert_eq!(v.verify(&sealed(1, header(0, 5, 5)), 0, PEER1, 5), Err(DropReason::UnknownSender));
        assert_eq!(v.verify(&sealed(1, header(1, 6, 5)), 0, PEER0, 5), Err(DropReason::WrongLink));
        assert_eq!(v.verify(&sealed(1, header(0, 7, 4)), 0, PEER0, 5), Err(DropReason::StaleEpoch));
        assert_eq!(
            v.verify(
                b"GET / HTTP/1.1\r\n\r\n________________________________________________________________________",
                0,
                PEER0,
                5
            ),
            Err(DropReason::BadMagic)
        );
        let counts = v.drops();
        for (reason, n) in [
            (DropReason::Replayed, 1),
            (DropReason::Truncated, 1),
            (DropReason::Forged, 1),
            (DropReason::WrongGroup, 1),
            (DropReason::UnknownSender, 2),
            (DropReason::WrongLink, 1),
            (DropReason::StaleEpoch, 1),
            (DropReason::BadMagic, 1),
        ] {
            assert_eq!(counts.get(reason), n, "{reason:?}");
        }
        assert_eq!(counts.total(), 9);
    }

    #[test]
    fn a_forged_packet_does_not_advance_the_replay_window() {
        let mut v = verifier();
        assert_eq!(v.verify(&sealed(2, header(0, 1000, 5)), 0, PEER0, 0), Err(DropReason::Forged));
        assert!(v.verify(&sealed(1, header(0, 1, 5)), 0, PEER0, 0).is_ok());
    }

    #[test]
    fn a_stale_epoch_packet_can_be_accepted_once_the_minimum_drops() {
        let mut v = verifier();
        let old = sealed(1, header(0, 1, 3));
        assert_eq!(v.verify(&old, 0, PEER0, 4), Err(DropReason::StaleEpoch));
        assert!(v.verify(&old, 0, PEER0, 3).is_ok(), "refusing for epoch must not burn the sequence number");
    }
}
