//! The heartbeat message two engines exchange on every link, and its compact encoding.
//!
//! The transport (UDP on each link, HMAC-authenticated envelope) carries the bytes of
//! [`Heartbeat::encode`] as an opaque payload; this module only defines what the engines
//! say. A heartbeat is also the lease protocol's carrier: [`LeaseGrant`] acknowledges one
//! of the peer's heartbeats and thereby grants the peer a lease running `ttl` from the
//! moment the peer *sent* that heartbeat (see `lease`).
//!
//! Replays and reordering are filtered with `(incarnation, seq)`: the incarnation is
//! strictly greater after every restart of the sender, the sequence number grows with
//! every message of one incarnation. A receiver drops anything not newer than what it has
//! seen, per link for liveness and overall for state.
//!
//! Encoding (version 1, what the previous release speaks), all integers big-endian:
//!
//! ```text
//! u8 version=1 | str sender | u64 incarnation | u64 seq | u64 epoch | u64 floor | u8 role | u8 flags
//! | u8 health | u8 disk | opt grant{u64 incarnation, u64 seq, u32 ttl_ms}
//! | opt handover{str to, opt str action, u8 force} | opt takeover{opt str action, u8 force}
//! str = u8 length + UTF-8 bytes; opt = u8 0 (absent) or 1 (present) + value
//! ```
//!
//! Version 2 is version 1 with the sender's supported range after the version byte
//! (`u8 version=2 | u8 min | u8 max | …`), so a receiver learns what the sender could
//! speak and the pair settles on the highest both accept (see [`crate::protocol`]).
//!
//! Decoding checks every length, tag and flag and refuses trailing bytes: any byte
//! string gives a message or a [`DecodeError`] naming the field, never a panic.

use hapair_crds::hagroup::NodeHealth;
use hapair_crds::volume::DiskState;
use serde::{Deserialize, Serialize};

use super::role::Role;

pub const WIRE_VERSION: u8 = crate::protocol::CURRENT;
/// The oldest version decoded: the previous release's.
pub const OLDEST_WIRE_VERSION: u8 = crate::protocol::OLDEST;
/// Node names are DNS labels.
pub const MAX_NAME_LEN: usize = 63;
/// Admin action ids longer than this are refused by the engine before they reach a heartbeat.
pub const MAX_ACTION_ID_LEN: usize = 128;
/// Upper bound of an encoded heartbeat.
pub const MAX_ENCODED_LEN: usize = 3
    + (1 + MAX_NAME_LEN)
    + 32
    + 4
    + (1 + 20)
    + (1 + 1 + MAX_NAME_LEN + 2 + MAX_ACTION_ID_LEN + 1)
    + (1 + 2 + MAX_ACTION_ID_LEN + 1);

const FLAG_HOLDING: u8 = 1;
const FLAG_MAINTENANCE: u8 = 2;

/// One heartbeat, as sent on every link.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// The sending node's name.
    pub sender: String,
    /// Strictly greater after every restart of the sender's agent.
    pub incarnation: u64,
    /// Grows by one with every heartbeat of this incarnation (the same message goes out on
    /// every link).
    pub seq: u64,
    /// The highest epoch in which the sender knows someone acted as primary (its term's
    /// epoch while it holds resources). Anything from an older epoch is refused.
    pub epoch: u64,
    /// The highest epoch the sender proposed, granted or acted in (≥ `epoch`). A
    /// Promoting sender that holds nothing proposes this epoch for its term; a standby
    /// grants only proposals above its own floor, so no epoch serves two terms.
    pub floor: u64,
    pub role: Role,
    /// The sender may hold resources (VIP, flow, primary volume). A sender that says
    /// `false` in role Standby or Fenced has voided every lease its earlier heartbeats
    /// earned.
    pub holding: bool,
    /// Automatic actions are frozen on the sender.
    pub maintenance: bool,
    pub health: NodeHealth,
    /// The worst disk state of the sender's volumes (`UpToDate` when it has none).
    pub disk: DiskState,
    /// Acknowledges one of the receiver's heartbeats as a lease grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<LeaseGrant>,
    /// A demoted primary offers the service to the receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
    /// The sender asks the receiver to hand the service over (switchover, force-active,
    /// split-brain resolution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<Takeover>,
}

/// "I received your heartbeat `seq` of `incarnation`, and I will not act as primary for
/// `ttl·(1+δ)` after I received it": the receiver holds a lease until `send_time(seq) + ttl`
/// on its own clock.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseGrant {
    pub incarnation: u64,
    pub seq: u64,
    pub ttl_ms: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Handover {
    /// The node the service is offered to.
    pub to: String,
    /// The admin action that caused it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The receiver may take over without being in sync (force-active, split-brain winner).
    pub force: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Takeover {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Hand over without checking the sender's health and sync.
    pub force: bool,
}

/// Why bytes are not a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("heartbeat truncated in field {0}")]
    Truncated(&'static str),
    #[error("heartbeat version {0} is not supported (this agent speaks {OLDEST_WIRE_VERSION} to {WIRE_VERSION})")]
    Version(u8),
    #[error("heartbeat field {field}: invalid value {value}")]
    BadValue { field: &'static str, value: u8 },
    #[error("heartbeat field {field}: {len} bytes is longer than {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("heartbeat field {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("heartbeat has {0} trailing bytes")]
    Trailing(usize),
}

/// Why a heartbeat cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("heartbeat field {field}: {len} bytes is longer than {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
}

impl Heartbeat {
    /// The version 1 encoding, what the previous release sends.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.encode_as(1, crate::protocol::Range::V1)
    }

    /// Encodes in `version`; from version 2 on, announcing `range`.
    pub fn encode_as(&self, version: u8, range: crate::protocol::Range) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(64);
        out.push(version);
        if version >= 2 {
            out.push(range.min);
            out.push(range.max);
        }
        put_str(&mut out, "sender", &self.sender, MAX_NAME_LEN)?;
        out.extend_from_slice(&self.incarnation.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.floor.to_be_bytes());
        out.push(role_code(self.role));
        let mut flags = 0;
        if self.holding {
            flags |= FLAG_HOLDING;
        }
        if self.maintenance {
            flags |= FLAG_MAINTENANCE;
        }
        out.push(flags);
        out.push(health_code(self.health));
        out.push(disk_code(self.disk));
        match &self.grant {
            None => out.push(0),
            Some(g) => {
                out.push(1);
                out.extend_from_slice(&g.incarnation.to_be_bytes());
                out.extend_from_slice(&g.seq.to_be_bytes());
                out.extend_from_slice(&g.ttl_ms.to_be_bytes());
            }
        }
        match &self.handover {
            None => out.push(0),
            Some(h) => {
                out.push(1);
                put_str(&mut out, "handover.to", &h.to, MAX_NAME_LEN)?;
                put_opt_str(&mut out, "handover.action", h.action.as_deref())?;
                out.push(u8::from(h.force));
            }
        }
        match &self.takeover {
            None => out.push(0),
            Some(t) => {
                out.push(1);
                put_opt_str(&mut out, "takeover.action", t.action.as_deref())?;
                out.push(u8::from(t.force));
            }
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Heartbeat, DecodeError> {
        Self::decode_versioned(bytes).map(|(hb, _, _)| hb)
    }

    /// Decodes any supported version; also returns the version and the range the sender
    /// announced (version 1 announces nothing: it speaks only 1).
    pub fn decode_versioned(bytes: &[u8]) -> Result<(Heartbeat, u8, crate::protocol::Range), DecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8("version")?;
        if !(OLDEST_WIRE_VERSION..=WIRE_VERSION).contains(&version) {
            return Err(DecodeError::Version(version));
        }
        let range = if version >= 2 {
            let min = r.u8("min")?;
            let max = r.u8("max")?;
            // A sender always speaks the version it sends in.
            if min > version {
                return Err(DecodeError::BadValue { field: "min", value: min });
            }
            if max < version {
                return Err(DecodeError::BadValue { field: "max", value: max });
            }
            crate::protocol::Range { min, max }
        } else {
            crate::protocol::Range::V1
        };
        let sender = r.string("sender", MAX_NAME_LEN)?;
        let incarnation = r.u64("incarnation")?;
        let seq = r.u64("seq")?;
        let epoch = r.u64("epoch")?;
        let floor = r.u64("floor")?;
        let role = role_from(r.u8("role")?)?;
        let flags = r.u8("flags")?;
        if flags & !(FLAG_HOLDING | FLAG_MAINTENANCE) != 0 {
            return Err(DecodeError::BadValue { field: "flags", value: flags });
        }
        let health = health_from(r.u8("health")?)?;
        let disk = disk_from(r.u8("disk")?)?;
        let grant = if r.flag("grant")? {
            Some(LeaseGrant {
                incarnation: r.u64("grant.incarnation")?,
                seq: r.u64("grant.seq")?,
                ttl_ms: r.u32("grant.ttlMs")?,
            })
        } else {
            None
        };
        let handover = if r.flag("handover")? {
            Some(Handover {
                to: r.string("handover.to", MAX_NAME_LEN)?,
                action: r.opt_string("handover.action")?,
                force: r.flag("handover.force")?,
            })
        } else {
            None
        };
        let takeover = if r.flag("takeover")? {
            Some(Takeover { action: r.opt_string("takeover.action")?, force: r.flag("takeover.force")? })
        } else {
            None
        };
        let rest = bytes.len() - r.pos;
        if rest != 0 {
            return Err(DecodeError::Trailing(rest));
        }
        let hb = Heartbeat {
            sender,
            incarnation,
            seq,
            epoch,
            floor,
            role,
            holding: flags & FLAG_HOLDING != 0,
            maintenance: flags & FLAG_MAINTENANCE != 0,
            health,
            disk,
            grant,
            handover,
            takeover,
        };
        Ok((hb, version, range))
    }
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &str, max: usize) -> Result<(), EncodeError> {
    let len = s.len();
    if len > max {
        return Err(EncodeError::TooLong { field, len, max });
    }
    // max ≤ 255, so the length fits a byte.
    out.push(u8::try_from(len).map_err(|_| EncodeError::TooLong { field, len, max })?);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_opt_str(out: &mut Vec<u8>, field: &'static str, s: Option<&str>) -> Result<(), EncodeError> {
    match s {
        None => {
            out.push(0);
            Ok(())
        }
        Some(s) => {
            out.push(1);
            put_str(out, field, s, MAX_ACTION_ID_LEN)
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated(field))?;
        let slice = self.bytes.get(self.pos..end).ok_or(DecodeError::Truncated(field))?;
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(field, 1)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(field, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::BadValue { field, value }),
        }
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u8(field)?);
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        let bytes = self.take(field, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8(field))
    }

    fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, DecodeError> {
        if self.flag(field)? { Ok(Some(self.string(field, MAX_ACTION_ID_LEN)?)) } else { Ok(None) }
    }
}

fn role_code(role: Role) -> u8 {
    match role {
        Role::Standby => 0,
        Role::Promoting => 1,
        Role::Primary => 2,
        Role::Demoting => 3,
        Role::Fenced => 4,
    }
}

fn role_from(value: u8) -> Result<Role, DecodeError> {
    Ok(match value {
        0 => Role::Standby,
        1 => Role::Promoting,
        2 => Role::Primary,
        3 => Role::Demoting,
        4 => Role::Fenced,
        _ => return Err(DecodeError::BadValue { field: "role", value }),
    })
}

fn health_code(health: NodeHealth) -> u8 {
    match health {
        NodeHealth::Healthy => 0,
        NodeHealth::Degraded => 1,
        NodeHealth::Failed => 2,
        NodeHealth::Unknown => 3,
    }
}

fn health_from(value: u8) -> Result<NodeHealth, DecodeError> {
    Ok(match value {
        0 => NodeHealth::Healthy,
        1 => NodeHealth::Degraded,
        2 => NodeHealth::Failed,
        3 => NodeHealth::Unknown,
        _ => return Err(DecodeError::BadValue { field: "health", value }),
    })
}

fn disk_code(disk: DiskState) -> u8 {
    match disk {
        DiskState::UpToDate => 0,
        DiskState::Inconsistent => 1,
        DiskState::Outdated => 2,
        DiskState::Diskless => 3,
        DiskState::Unknown => 4,
    }
}

fn disk_from(value: u8) -> Result<DiskState, DecodeError> {
    Ok(match value {
        0 => DiskState::UpToDate,
        1 => DiskState::Inconsistent,
        2 => DiskState::Outdated,
        3 => DiskState::Diskless,
        4 => DiskState::Unknown,
        _ => return Err(DecodeError::BadValue { field: "disk", value }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Range;
    use rand::{Rng, SeedableRng};

    fn full() -> Heartbeat {
        Heartbeat {
            sender: "db1".into(),
            incarnation: 7,
            seq: 1234,
            epoch: 42,
            floor: 43,
            role: Role::Demoting,
            holding: true,
            maintenance: true,
            health: NodeHealth::Degraded,
            disk: DiskState::Inconsistent,
            grant: Some(LeaseGrant { incarnation: 3, seq: 99, ttl_ms: 800 }),
            handover: Some(Handover { to: "db2".into(), action: Some("act-1".into()), force: true }),
            takeover: Some(Takeover { action: None, force: false }),
        }
    }

    #[test]
    fn round_trips() {
        let hb = full();
        let bytes = hb.encode().unwrap_or_else(|e| panic!("{e}"));
        assert!(bytes.len() <= MAX_ENCODED_LEN);
        assert_eq!(Heartbeat::decode(&bytes), Ok(hb.clone()));
        let minimal = Heartbeat { grant: None, handover: None, takeover: None, ..hb };
        let bytes = minimal.encode().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Heartbeat::decode(&bytes), Ok(minimal));
    }

    /// Captured from the release that spoke only version 1, before version 2 existed: a
    /// node forced to version 1 must send exactly these bytes.
    const FULL_V1_HEX: &str = "0103646231000000000000000700000000000004d2000000000000002a000000000000002b03030101010000000000000003000000000000006300000320010364623201056163742d3101010000";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn version_1_bytes_are_unchanged() {
        let bytes = full().encode().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hex(&bytes), FULL_V1_HEX);
        // Forced to version 1, whatever range is at hand, nothing is announced.
        let bytes = full().encode_as(1, Range { min: 1, max: 2 }).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hex(&bytes), FULL_V1_HEX);
        assert_eq!(Heartbeat::decode_versioned(&bytes), Ok((full(), 1, Range::V1)));
    }

    #[test]
    fn version_2_announces_the_range_and_round_trips() {
        let range = Range { min: 1, max: 2 };
        let bytes = full().encode_as(2, range).unwrap_or_else(|e| panic!("{e}"));
        assert!(bytes.len() <= MAX_ENCODED_LEN);
        assert_eq!(hex(&bytes), format!("020102{}", &FULL_V1_HEX[2..]));
        assert_eq!(Heartbeat::decode_versioned(&bytes), Ok((full(), 2, range)));
        // A later release announcing more is still understood at version 2.
        let later = full().encode_as(2, Range { min: 2, max: 3 }).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Heartbeat::decode_versioned(&later), Ok((full(), 2, Range { min: 2, max: 3 })));
        let mut lying = bytes.clone();
        lying[1] = 3;
        assert_eq!(Heartbeat::decode(&lying), Err(DecodeError::BadValue { field: "min", value: 3 }));
        lying[1] = 1;
        lying[2] = 1;
        assert_eq!(Heartbeat::decode(&lying), Err(DecodeError::BadValue { field: "max", value: 1 }));
        for len in 0..bytes.len() {
            assert!(Heartbeat::decode(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
        }
        let err = Heartbeat::decode(&[3, 1, 3]).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("heartbeat version 3 is not supported (this agent speaks 1 to 2)"));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = full().encode().unwrap_or_else(|e| panic!("{e}"));
        for len in 0..bytes.len() {
            assert!(Heartbeat::decode(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Heartbeat::decode(&long), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn names_the_bad_field() {
        let mut bytes = full().encode().unwrap_or_else(|e| panic!("{e}"));
        // version, sender (1 + 3), incarnation, seq, epoch, floor, then role.
        let role_at = 1 + 4 + 32;
        bytes[role_at] = 9;
        assert_eq!(Heartbeat::decode(&bytes), Err(DecodeError::BadValue { field: "role", value: 9 }));
        bytes[role_at] = 0;
        bytes[role_at + 1] = 0x80;
        assert_eq!(Heartbeat::decode(&bytes), Err(DecodeError::BadValue { field: "flags", value: 0x80 }));
        assert_eq!(Heartbeat::decode(&[3]), Err(DecodeError::Version(3)));
        assert_eq!(Heartbeat::decode(&[0]), Err(DecodeError::Version(0)));
        assert_eq!(Heartbeat::decode(&[1, 200]), Err(DecodeError::TooLong { field: "sender", len: 200, max: 63 }));
        assert_eq!(Heartbeat::decode(&[1, 1, 0xff]), Err(DecodeError::NotUtf8("sender")));
    }

    #[test]
    fn refuses_to_encode_oversized_strings() {
        let hb = Heartbeat { sender: "x".repeat(64), ..full() };
        assert_eq!(hb.encode(), Err(EncodeError::TooLong { field: "sender", len: 64, max: 63 }));
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let good = full().encode().unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..20_000 {
            let len = rng.random_range(0..MAX_ENCODED_LEN + 8);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = Heartbeat::decode(&bytes);
            let mut mutated = good.clone();
            let i = rng.random_range(0..mutated.len());
            mutated[i] = rng.random();
            if let Ok((hb, version, range)) = Heartbeat::decode_versioned(&mutated) {
                // Whatever decodes must encode back to the same bytes.
                assert_eq!(hb.encode_as(version, range).ok(), Some(mutated));
            }
            let mut mutated = full().encode_as(2, Range { min: 1, max: 2 }).unwrap_or_else(|e| panic!("{e}"));
            let i = rng.random_range(0..mutated.len());
            mutated[i] = rng.random();
            if let Ok((hb, version, range)) = Heartbeat::decode_versioned(&mutated) {
                assert_eq!(hb.encode_as(version, range).ok(), Some(mutated));
            }
        }
    }
}
