//! The heartbeat wire format: a fixed header, the engine's opaque payload, and an
//! HMAC-SHA256 trailer over both.
//!
//! ```text
//!  0      4   5    6        8        16        24             32         40      48
//!  magic  ver link payload  group id sender id incarnation    sequence   epoch   payload… mac[32]
//!  "HPHB"  1       len u16  u64      u64       u64            u64        u64
//! ```
//!
//! All integers are big-endian. The group and node ids are the first eight bytes of a
//! SHA-256 over the name, so the header stays fixed-size while names stay free-form; the
//! names themselves are known to both ends from the desired config.

use hapair_crds::nodeapi::GroupKey;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::key::HmacKey;

pub const MAGIC: [u8; 4] = *b"HPHB";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 48;
pub const MAC_LEN: usize = 32;
/// Keeps a whole datagram under the IPv6 minimum MTU, so heartbeats never fragment.
pub const MAX_PAYLOAD: usize = 1024;

/// Identifies a group on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupId(pub u64);

impl GroupId {
    pub fn of(key: &GroupKey) -> Self {
        GroupId(name_hash("group", &key.to_string()))
    }
}

/// Identifies a node on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub u64);

impl NodeId {
    pub fn of(name: &str) -> Self {
        NodeId(name_hash("node", name))
    }
}

fn name_hash(domain: &str, name: &str) -> u64 {
    let digest =
        Sha256::new().chain_update(b"hapair-").chain_update(domain).chain_update(b":").chain_update(name).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Everything in the fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub link: u8,
    pub group: GroupId,
    pub sender: NodeId,
    /// Chosen by the sender at start-up, larger at every restart; see
    /// [`super::next_incarnation`].
    pub incarnation: u64,
    /// Per link, per incarnation; starts at 1.
    pub sequence: u64,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("heartbeat payload is {len} bytes, more than the {MAX_PAYLOAD} a datagram carries")]
pub struct PayloadTooLarge {
    pub len: usize,
}

/// Builds an authenticated datagram.
pub fn seal(key: &HmacKey, header: &Header, payload: &[u8]) -> Result<Vec<u8>, PayloadTooLarge> {
    if payload.len() > MAX_PAYLOAD {
        return Err(PayloadTooLarge { len: payload.len() });
    }
    let len = u16::try_from(payload.len()).map_err(|_| PayloadTooLarge { len: payload.len() })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(header.link);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&header.group.0.to_be_bytes());
    out.extend_from_slice(&header.sender.0.to_be_bytes());
    out.extend_from_slice(&header.incarnation.to_be_bytes());
    out.extend_from_slice(&header.sequence.to_be_bytes());
    out.extend_from_slice(&header.epoch.to_be_bytes());
    out.extend_from_slice(payload);
    let tag = mac(key).chain_update(&out).finalize().into_bytes();
    out.extend_from_slice(&tag);
    Ok(out)
}

fn mac(key: &HmacKey) -> Hmac<Sha256> {
    // HMAC takes keys of any length; the error arm cannot happen, but a panic is not an option.
    <Hmac<Sha256> as Mac>::new_from_slice(key.bytes())
        .unwrap_or_else(|_| <Hmac<Sha256> as Mac>::new(&Default::default()))
}

/// Why a datagram failed to parse (before any authentication).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    Truncated,
    BadMagic,
    UnsupportedVersion(u8),
    /// The declared payload length disagrees with the datagram length.
    Malformed,
}

/// A datagram split into its parts, not yet authenticated.
#[derive(Debug)]
pub struct Unverified<'a> {
    pub header: Header,
    pub payload: &'a [u8],
    signed: &'a [u8],
    tag: &'a [u8],
}

impl Unverified<'_> {
    /// Constant-time check of the trailer.
    pub fn authentic(&self, key: &HmacKey) -> bool {
        mac(key).chain_update(self.signed).verify_slice(self.tag).is_ok()
    }
}

/// Splits a datagram. Never panics, whatever the bytes.
pub fn parse(bytes: &[u8]) -> Result<Unverified<'_>, ParseError> {
    if bytes.len() < HEADER_LEN + MAC_LEN {
        return Err(if bytes.len() >= 4 && bytes[..4] != MAGIC { ParseError::BadMagic } else { ParseError::Truncated });
    }
    if bytes[..4] != MAGIC {
        return Err(ParseError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(ParseError::UnsupportedVersion(bytes[4]));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let payload_len = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
    let expected = HEADER_LEN + payload_len + MAC_LEN;
    if bytes.len() < expected {
        return Err(ParseError::Truncated);
    }
    if bytes.len() > expected || payload_len > MAX_PAYLOAD {
        return Err(ParseError::Malformed);
    }
    let header = Header {
        link: bytes[5],
        group: GroupId(u64_at(8)),
        sender: NodeId(u64_at(16)),
        incarnation: u64_at(24),
        sequence: u64_at(32),
        epoch: u64_at(40),
    };
    let signed_len = HEADER_LEN + payload_len;
    Ok(Unverified {
        header,
        payload: &bytes[HEADER_LEN..signed_len],
        signed: &bytes[..signed_len],
        tag: &bytes[signed_len..],
    })
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn key(byte: u8) -> HmacKey {
        HmacKey::from_bytes(vec![byte; 32], "test").unwrap_or_else(|e| panic!("{e}"))
    }

    fn header() -> Header {
        Header {
            link: 1,
            group: GroupId::of(&GroupKey::new("db", "pg")),
            sender: NodeId::of("a"),
            incarnation: 10,
            sequence: 3,
            epoch: 7,
        }
    }

    #[test]
    fn seal_then_parse_round_trips() {
        let bytes = seal(&key(1), &header(), b"hello").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bytes.len(), HEADER_LEN + 5 + MAC_LEN);
        let parsed = parse(&bytes).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(parsed.header, header());
        assert_eq!(parsed.payload, b"hello");
        assert!(parsed.authentic(&key(1)));
        assert!(!parsed.authentic(&key(2)));
    }

    #[test]
    fn every_flipped_bit_breaks_the_mac_or_the_parse() {
        let bytes = seal(&key(1), &header(), b"payload").unwrap_or_else(|e| panic!("{e}"));
        for i in 0..bytes.len() * 8 {
            let mut copy = bytes.clone();
            copy[i / 8] ^= 1 << (i % 8);
            if let Ok(p) = parse(&copy) {
                assert!(!p.authentic(&key(1)), "bit {i} flipped yet authentic");
            }
        }
    }

    #[test]
    fn length_errors_are_classified() {
        let bytes = seal(&key(1), &header(), b"abc").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parse(&bytes[..bytes.len() - 1]).err(), Some(ParseError::Truncated));
        assert_eq!(parse(&bytes[..10]).err(), Some(ParseError::Truncated));
        assert_eq!(parse(b"").err(), Some(ParseError::Truncated));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(parse(&longer).err(), Some(ParseError::Malformed));
        let mut other = bytes.clone();
        other[4] = 9;
        assert_eq!(parse(&other).err(), Some(ParseError::UnsupportedVersion(9)));
        other[0] = b'X';
        assert_eq!(parse(&other).err(), Some(ParseError::BadMagic));
        assert!(seal(&key(1), &header(), &[0u8; MAX_PAYLOAD + 1]).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x4850_4842);
        let valid = seal(&key(1), &header(), b"payload").unwrap_or_else(|e| panic!("{e}"));
        for round in 0..20_000 {
            let len = rng.random_range(0..200);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            // Half the inputs keep a valid prefix so the deeper checks get exercised too.
            if round % 2 == 0 {
                let keep = len.min(valid.len());
                bytes[..keep].copy_from_slice(&valid[..keep]);
                if let Some(b) = bytes.get_mut(rng.random_range(0..len.max(1))) {
                    *b = rng.random();
                }
            }
            if let Ok(p) = parse(&bytes) {
                let _ = p.authentic(&key(1));
            }
        }
    }
}
