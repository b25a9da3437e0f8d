//! The replication wire protocol: frames and their codec.
//!
//! Every frame is a 20-byte header followed by a payload:
//!
//! ```text
//! magic u32 "HPR1" | kind u8 | flags u8 | reserved u16 (zero) | epoch u64 | length u32
//! ```
//!
//! All integers are big-endian. The epoch is the sender's highest known engine epoch; the
//! receiver refuses writes from an older one. The decoder is the peer-facing attack
//! surface: it checks the magic, kind, flags and reserved bits, refuses payloads above
//! [`MAX_PAYLOAD`] before buffering them, and requires every payload to have exactly the
//! length its kind implies. Any violation is a [`WireError`] that ends the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::generation::Generations;

pub const MAGIC: u32 = 0x4850_5231; // "HPR1"
pub const HEADER_LEN: usize = 20;
/// Largest payload accepted: one 4 MiB extent of data plus its fixed fields.
pub const MAX_PAYLOAD: usize = (4 << 20) + 256;
/// Largest data carried by a single data, resync-reply or verify range.
pub const MAX_DATA: u32 = 4 << 20;
/// The newest handshake layout this build reads and writes (see [`Hello`]).
pub const PROTOCOL_VERSION: u32 = crate::protocol::CURRENT as u32;
/// The oldest one it still reads: the previous release's.
pub const OLDEST_PROTOCOL_VERSION: u32 = crate::protocol::OLDEST as u32;
const MAX_NAME: usize = 253;
const MAX_REASON: usize = 1024;

const FLAG_FUA: u8 = 1;
const FLAG_ZERO: u8 = 2;
const FLAG_LAST: u8 = 4;
const FLAG_OK: u8 = 8;
const FLAG_PUNCH: u8 = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame kind {kind} has undefined flags {flags:#04x}")]
    BadFlags { kind: u8, flags: u8 },
    #[error("frame header reserved bits are set")]
    Reserved,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    Oversized { len: usize, max: usize },
    #[error("{kind} frame has a {len}-byte payload; {expected}")]
    BadLength { kind: &'static str, len: usize, expected: String },
    #[error("{kind} frame: {reason}")]
    BadField { kind: &'static str, reason: String },
}

/// A replica's role as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireRole {
    Primary,
    Secondary,
}

/// A disk state as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDisk {
    UpToDate,
    Inconsistent,
    Outdated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WirePolicy {
    Manual,
    DiscardYoungerPrimary,
    DiscardLeastChanges,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireProtocol {
    A,
    C,
}

/// An operator's split-brain verdict, announced in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    DiscardLocal,
    KeepLocal,
}

/// What each side announces when a connection opens.
///
/// `version` is the layout the hello is written in. Version 1 is the previous release's,
/// byte for byte; version 2 appends the range of versions the sender speaks and may set
/// the `superseded` flag. Both sides use the fields only the newer layout carries only
/// when both hellos are in it, so the two decisions stay mirrored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    /// The versions the sender speaks; a version 1 hello implies `1..=1`.
    pub speaks: crate::protocol::Range,
    pub node: String,
    pub volume_uuid: [u8; 16],
    pub size: u64,
    pub gens: Generations,
    pub disk: WireDisk,
    pub role: WireRole,
    pub crashed_primary: bool,
    pub data_zeroed: bool,
    /// The replica was fenced while primary in `promoted_epoch` because its engine's lease
    /// ran out, and has not served since: what it holds that a newer primary lacks was
    /// refused to its writers. Version 2 and later.
    pub superseded: bool,
    pub dirty_blocks: u64,
    pub promoted_epoch: u64,
    pub promoted_at_ms: u64,
    pub format_id: u64,
    pub policy: WirePolicy,
    pub protocol: WireProtocol,
    pub resolution: Option<Resolution>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Box<Hello>),
    /// An application write, replicated.
    Data {
        seq: u64,
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    /// The peer applied (or failed) write or zero `seq`.
    Ack {
        seq: u64,
        ok: bool,
    },
    /// Everything before this is to be made durable.
    Flush {
        seq: u64,
    },
    FlushAck {
        seq: u64,
        ok: bool,
    },
    /// Zero a range (`punch`: deallocate as well), replicated like a write.
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    },
    ResyncRequest {
        offset: u64,
        len: u32,
    },
    /// Resync data; `data` is empty and `zero_len` set when the range reads as zeroes.
    ResyncReply {
        offset: u64,
        data: Bytes,
        zero_len: u32,
    },
    ResyncAck {
        offset: u64,
        len: u32,
    },
    /// The sync target is up to date; carries the identifiers both now share.
    SyncDone {
        gens: Generations,
    },
    /// A run-length-encoded slice of the sender's bitmap, starting at block `start`.
    Bitmap {
        start: u64,
        last: bool,
        runs: Bytes,
    },
    Ping,
    PingAck,
    VerifyRequest {
        offset: u64,
        len: u32,
    },
    VerifyReply {
        offset: u64,
        digests: Vec<u128>,
    },
    /// Blocks the sender found different; the receiver marks them too.
    OutOfSync {
        offset: u64,
        len: u64,
    },
    State {
        role: WireRole,
        disk: WireDisk,
    },
    /// The sender becomes sync source for what both bitmaps hold; bitmaps follow.
    StartResync,
    Goodbye {
        reason: String,
    },
}

impl Frame {
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Data { .. } => 2,
            Frame::Ack { .. } => 3,
            Frame::Flush { .. } => 4,
            Frame::FlushAck { .. } => 5,
            Frame::Zero { .. } => 6,
            Frame::ResyncRequest { .. } => 7,
            Frame::ResyncReply { .. } => 8,
            Frame::ResyncAck { .. } => 9,
            Frame::SyncDone { .. } => 10,
            Frame::Bitmap { .. } => 11,
            Frame::Ping => 12,
            Frame::PingAck => 13,
            Frame::VerifyRequest { .. } => 14,
            Frame::VerifyReply { .. } => 15,
            Frame::OutOfSync { .. } => 16,
            Frame::State { .. } => 17,
            Frame::StartResync => 18,
            Frame::Goodbye { .. } => 19,
        }
    }

    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// Payload bytes carried by reference rather than copied into the header buffer.
    fn bulk(&self) -> Option<&Bytes> {
        match self {
            Frame::Data { data, .. } | Frame::ResyncReply { data, .. } => Some(data),
            Frame::Bitmap { runs, .. } => Some(runs),
            _ => None,
        }
    }

    /// Encodes the header and fixed fields into `buf`, returning the bulk payload (if any)
    /// that must follow them on the wire. Splitting them lets the sender write large data
    /// without copying it.
    pub fn encode_head(&self, epoch: u64, buf: &mut BytesMut) -> Option<Bytes> {
        let mut fixed = BytesMut::with_capacity(64);
        let mut flags = 0u8;
        match self {
            Frame::Hello(h) => encode_hello(h, &mut fixed),
            Frame::Data { seq, offset, fua, .. } => {
                fixed.put_u64(*seq);
                fixed.put_u64(*offset);
                if *fua {
                    flags |= FLAG_FUA;
                }
            }
            Frame::Ack { seq, ok } | Frame::FlushAck { seq, ok } => {
                fixed.put_u64(*seq);
                if *ok {
                    flags |= FLAG_OK;
                }
            }
            Frame::Flush { seq } => fixed.put_u64(*seq),
            Frame::Zero { seq, offset, len, fua, punch } => {
                fixed.put_u64(*seq);
                fixed.put_u64(*offset);
                fixed.put_u64(*len);
                if *fua {
                    flags |= FLAG_FUA;
                }
                if *punch {
                    flags |= FLAG_PUNCH;
                }
            }
            Frame::ResyncRequest { offset, len }
            | Frame::ResyncAck { offset, len }
            | Frame::VerifyRequest { offset, len } => {
                fixed.put_u64(*offset);
                fixed.put_u32(*len);
            }
            Frame::ResyncReply { offset, data, zero_len } => {
                fixed.put_u64(*offset);
                if data.is_empty() {
                    flags |= FLAG_ZERO;
                    fixed.put_u32(*zero_len);
                }
            }
            Frame::SyncDone { gens } => put_gens(&mut fixed, gens),
            Frame::Bitmap { start, last, .. } => {
                fixed.put_u64(*start);
                if *last {
                    flags |= FLAG_LAST;
                }
            }
            Frame::Ping | Frame::PingAck | Frame::StartResync => {}
            Frame::VerifyReply { offset, digests } => {
                fixed.put_u64(*offset);
                for d in digests {
                    fixed.put_u128(*d);
                }
            }
            Frame::OutOfSync { offset, len } => {
                fixed.put_u64(*offset);
                fixed.put_u64(*len);
            }
            Frame::State { role, disk } => {
                fixed.put_u8(role_code(*role));
                fixed.put_u8(disk_code(*disk));
            }
            Frame::Goodbye { reason } => {
                let r = truncate_utf8(reason, MAX_REASON);
                fixed.put_slice(r.as_bytes());
            }
        }
        let bulk = self.bulk().filter(|b| !b.is_empty()).cloned();
        let len = fixed.len() + bulk.as_ref().map_or(0, |b| b.len());
        buf.reserve(HEADER_LEN + fixed.len());
        buf.put_u32(MAGIC);
        buf.put_u8(self.kind());
        buf.put_u8(flags);
        buf.put_u16(0);
        buf.put_u64(epoch);
        buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        buf.put_slice(&fixed);
        bulk
    }

    /// Total bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        let mut buf = BytesMut::new();
        let bulk = self.encode_head(0, &mut buf);
        buf.len() + bulk.map_or(0, |b| b.len())
    }
}

/// A decoded frame with the epoch its sender stamped on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub epoch: u64,
    pub frame: Frame,
}

/// The tokio codec for [`Envelope`]s. Encoding stamps `epoch`.
#[derive(Debug, Default, Clone)]
pub struct FrameCodec {
    pub epoch: u64,
}

impl Decoder for FrameCodec {
    type Item = Envelope;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Envelope>, CodecError> {
        Ok(decode_frame(src)?)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        if let Some(bulk) = frame.encode_head(self.epoch, dst) {
            dst.extend_from_slice(&bulk);
        }
        Ok(())
    }
}

/// Transport errors and protocol violations, as a codec needs both.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decodes one frame from the front of `src`, or returns `Ok(None)` until enough bytes
/// have arrived. Never buffers more than a header before validating the length.
pub fn decode_frame(src: &mut BytesMut) -> Result<Option<Envelope>, WireError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut h = &src[..HEADER_LEN];
    let magic = h.get_u32();
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let kind = h.get_u8();
    let flags = h.get_u8();
    let reserved = h.get_u16();
    let epoch = h.get_u64();
    let len = h.get_u32() as usize;
    if kind == 0 || kind > 19 {
        return Err(WireError::UnknownKind(kind));
    }
    let allowed = allowed_flags(kind);
    if flags & !allowed != 0 {
        return Err(WireError::BadFlags { kind, flags });
    }
    if reserved != 0 {
        return Err(WireError::Reserved);
    }
    if len > MAX_PAYLOAD {
        return Err(WireError::Oversized { len, max: MAX_PAYLOAD });
    }
    if src.len() < HEADER_LEN + len {
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let payload = src.split_to(len).freeze();
    let frame = decode_payload(kind, flags, payload)?;
    Ok(Some(Envelope { epoch, frame }))
}

fn allowed_flags(kind: u8) -> u8 {
    match kind {
        2 => FLAG_FUA,
        3 | 5 => FLAG_OK,
        6 => FLAG_FUA | FLAG_PUNCH,
        8 => FLAG_ZERO,
        11 => FLAG_LAST,
        _ => 0,
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "hello",
        2 => "data",
        3 => "ack",
        4 => "flush",
        5 => "flush-ack",
        6 => "zero",
        7 => "resync-request",
        8 => "resync-reply",
        9 => "resync-ack",
        10 => "sync-done",
        11 => "bitmap",
        12 => "ping",
        13 => "ping-ack",
        14 => "verify-request",
        15 => "verify-reply",
        16 => "out-of-sync",
        17 => "state",
        18 => "start-resync",
        19 => "goodbye",
        _ => "unknown",
    }
}

fn exact(kind: u8, p: &Bytes, n: usize) -> Result<(), WireError> {
    if p.len() == n {
        Ok(())
    } else {
        Err(WireError::BadLength { kind: kind_name(kind), len: p.len(), expected: format!("expected {n}") })
    }
}

fn at_least(kind: u8, p: &Bytes, n: usize) -> Result<(), WireError> {
    if p.len() >= n {
        Ok(())
    } else {
        Err(WireError::BadLength { kind: kind_name(kind), len: p.len(), expected: format!("expected at least {n}") })
    }
}

fn bad(kind: u8, reason: impl Into<String>) -> WireError {
    WireError::BadField { kind: kind_name(kind), reason: reason.into() }
}

fn checked_len(kind: u8, len: u32) -> Result<u32, WireError> {
    if len == 0 || len > MAX_DATA || !len.is_multiple_of(512) {
        return Err(bad(kind, format!("range length {len} is not a non-zero multiple of 512 up to {MAX_DATA}")));
    }
    Ok(len)
}

fn decode_payload(kind: u8, flags: u8, mut p: Bytes) -> Result<Frame, WireError> {
    let frame = match kind {
        1 => Frame::Hello(Box::new(decode_hello(&mut p)?)),
        2 => {
            at_least(kind, &p, 17)?;
            let seq = p.get_u64();
            let offset = p.get_u64();
            if p.len() > MAX_DATA as usize {
                return Err(bad(kind, "more than one extent of data"));
            }
            Frame::Data { seq, offset, fua: flags & FLAG_FUA != 0, data: p }
        }
        3 | 5 => {
            exact(kind, &p, 8)?;
            let seq = p.get_u64();
            let ok = flags & FLAG_OK != 0;
            if kind == 3 { Frame::Ack { seq, ok } } else { Frame::FlushAck { seq, ok } }
        }
        4 => {
            exact(kind, &p, 8)?;
            Frame::Flush { seq: p.get_u64() }
        }
        6 => {
            exact(kind, &p, 24)?;
            let seq = p.get_u64();
            let offset = p.get_u64();
            let len = p.get_u64();
            if len == 0 || len > u64::from(MAX_DATA) {
                return Err(bad(kind, format!("zero length {len} outside 1..={MAX_DATA}")));
            }
            Frame::Zero { seq, offset, len, fua: flags & FLAG_FUA != 0, punch: flags & FLAG_PUNCH != 0 }
        }
        7 | 9 | 14 => {
            exact(kind, &p, 12)?;
            let offset = p.get_u64();
            let len = checked_len(kind, p.get_u32())?;
            match kind {
                7 => Frame::ResyncRequest { offset, len },
                9 => Frame::ResyncAck { offset, len },
                _ => Frame::VerifyRequest { offset, len },
            }
        }
        8 => {
            if flags & FLAG_ZERO != 0 {
                exact(kind, &p, 12)?;
                let offset = p.get_u64();
                let zero_len = checked_len(kind, p.get_u32())?;
                Frame::ResyncReply { offset, data: Bytes::new(), zero_len }
            } else {
                at_least(kind, &p, 8 + 512)?;
                let offset = p.get_u64();
                checked_len(kind, u32::try_from(p.len()).unwrap_or(u32::MAX))?;
                Frame::ResyncReply { offset, data: p, zero_len: 0 }
            }
        }
        10 => {
            exact(kind, &p, 32)?;
            Frame::SyncDone { gens: get_gens(&mut p) }
        }
        11 => {
            at_least(kind, &p, 8)?;
            let start = p.get_u64();
            if p.len() > 64 << 10 {
                return Err(bad(kind, "bitmap chunk larger than 64 KiB"));
            }
            Frame::Bitmap { start, last: flags & FLAG_LAST != 0, runs: p }
        }
        12 | 13 | 18 => {
            exact(kind, &p, 0)?;
            match kind {
                12 => Frame::Ping,
                13 => Frame::PingAck,
                _ => Frame::StartResync,
            }
        }
        15 => {
            at_least(kind, &p, 8)?;
            let offset = p.get_u64();
            if !p.len().is_multiple_of(16) || p.is_empty() || p.len() / 16 > (MAX_DATA / 4096) as usize {
                return Err(bad(kind, format!("{} digest bytes is not 1..=1024 digests", p.len())));
            }
            let digests = (0..p.len() / 16).map(|_| p.get_u128()).collect();
            Frame::VerifyReply { offset, digests }
        }
        16 => {
            exact(kind, &p, 16)?;
            let offset = p.get_u64();
            let len = p.get_u64();
            if len == 0 {
                return Err(bad(kind, "empty range"));
            }
            Frame::OutOfSync { offset, len }
        }
        17 => {
            exact(kind, &p, 2)?;
            let role = role_from(p.get_u8()).ok_or_else(|| bad(kind, "unknown role"))?;
            let disk = disk_from(p.get_u8()).ok_or_else(|| bad(kind, "unknown disk state"))?;
            Frame::State { role, disk }
        }
        19 => {
            if p.len() > MAX_REASON {
                return Err(bad(kind, "reason longer than 1024 bytes"));
            }
            let reason = std::str::from_utf8(&p).map_err(|_| bad(kind, "reason is not UTF-8"))?.to_string();
            Frame::Goodbye { reason }
        }
        other => return Err(WireError::UnknownKind(other)),
    };
    Ok(frame)
}

fn encode_hello(h: &Hello, b: &mut BytesMut) {
    b.put_u32(h.version);
    let name = truncate_utf8(&h.node, MAX_NAME);
    b.put_u16(name.len() as u16);
    b.put_slice(name.as_bytes());
    b.put_slice(&h.volume_uuid);
    b.put_u64(h.size);
    put_gens(b, &h.gens);
    b.put_u8(disk_code(h.disk));
    b.put_u8(role_code(h.role));
    let superseded = h.version >= 2 && h.superseded;
    b.put_u8(u8::from(h.crashed_primary) | (u8::from(h.data_zeroed) << 1) | (u8::from(superseded) << 2));
    b.put_u64(h.dirty_blocks);
    b.put_u64(h.promoted_epoch);
    b.put_u64(h.promoted_at_ms);
    b.put_u64(h.format_id);
    b.put_u8(match h.policy {
        WirePolicy::Manual => 1,
        WirePolicy::DiscardYoungerPrimary => 2,
        WirePolicy::DiscardLeastChanges => 3,
    });
    b.put_u8(match h.protocol {
        WireProtocol::A => 1,
        WireProtocol::C => 3,
    });
    b.put_u8(match h.resolution {
        None => 0,
        Some(Resolution::DiscardLocal) => 1,
        Some(Resolution::KeepLocal) => 2,
    });
    if h.version >= 2 {
        b.put_u32(u32::from(h.speaks.min));
        b.put_u32(u32::from(h.speaks.max));
    }
}

fn decode_hello(p: &mut Bytes) -> Result<Hello, WireError> {
    const K: u8 = 1;
    at_least(K, p, 6)?;
    let version = p.get_u32();
    if !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(bad(
            K,
            format!("protocol version {version}, this side speaks {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"),
        ));
    }
    let name_len = p.get_u16() as usize;
    if name_len == 0 || name_len > MAX_NAME {
        return Err(bad(K, format!("node name of {name_len} bytes")));
    }
    let trailer = if version >= 2 { 8 } else { 0 };
    let rest = name_len + 16 + 8 + 32 + 3 + 32 + 3 + trailer;
    if p.len() != rest {
        return Err(WireError::BadLength {
            kind: "hello",
            len: p.len() + 6,
            expected: format!("expected {} for version {version}", rest + 6),
        });
    }
    let node = std::str::from_utf8(&p.split_to(name_len)).map_err(|_| bad(K, "node name is not UTF-8"))?.to_string();
    let mut volume_uuid = [0u8; 16];
    p.copy_to_slice(&mut volume_uuid);
    let size = p.get_u64();
    let gens = get_gens(p);
    let disk = disk_from(p.get_u8()).ok_or_else(|| bad(K, "unknown disk state"))?;
    let role = role_from(p.get_u8()).ok_or_else(|| bad(K, "unknown role"))?;
    let fl = p.get_u8();
    let defined = if version >= 2 { 7 } else { 3 };
    if fl & !defined != 0 {
        return Err(bad(K, format!("undefined flags {fl:#04x} for version {version}")));
    }
    let dirty_blocks = p.get_u64();
    let promoted_epoch = p.get_u64();
    let promoted_at_ms = p.get_u64();
    let format_id = p.get_u64();
    let policy = match p.get_u8() {
        1 => WirePolicy::Manual,
        2 => WirePolicy::DiscardYoungerPrimary,
        3 => WirePolicy::DiscardLeastChanges,
        other => return Err(bad(K, format!("unknown split-brain policy {other}"))),
    };
    let protocol = match p.get_u8() {
        1 => WireProtocol::A,
        3 => WireProtocol::C,
        other => return Err(bad(K, format!("unknown replication protocol {other}"))),
    };
    let resolution = match p.get_u8() {
        0 => None,
        1 => Some(Resolution::DiscardLocal),
        2 => Some(Resolution::KeepLocal),
        other => return Err(bad(K, format!("unknown resolution {other}"))),
    };
    let speaks = if version >= 2 {
        let (min, max) = (p.get_u32(), p.get_u32());
        // A sender speaks the version it writes in.
        if min > version || max < version {
            return Err(bad(K, format!("a version {version} hello announcing versions {min} to {max}")));
        }
        let small = |v: u32| u8::try_from(v).map_err(|_| bad(K, format!("protocol version {v} out of range")));
        crate::protocol::Range { min: small(min)?, max: small(max)? }
    } else {
        crate::protocol::Range::V1
    };
    Ok(Hello {
        version,
        speaks,
        node,
        volume_uuid,
        size,
        gens,
        disk,
        role,
        crashed_primary: fl & 1 != 0,
        data_zeroed: fl & 2 != 0,
        superseded: fl & 4 != 0,
        dirty_blocks,
        promoted_epoch,
        promoted_at_ms,
        format_id,
        policy,
        protocol,
        resolution,
    })
}

fn put_gens(b: &mut BytesMut, g: &Generations) {
    b.put_u64(g.current);
    b.put_u64(g.bitmap);
    b.put_u64(g.history[0]);
    b.put_u64(g.history[1]);
}

fn get_gens(p: &mut Bytes) -> Generations {
    Generations { current: p.get_u64(), bitmap: p.get_u64(), history: [p.get_u64(), p.get_u64()] }
}

fn role_code(r: WireRole) -> u8 {
    match r {
        WireRole::Primary => 1,
        WireRole::Secondary => 2,
    }
}

fn role_from(c: u8) -> Option<WireRole> {
    match c {
        1 => Some(WireRole::Primary),
        2 => Some(WireRole::Secondary),
        _ => None,
    }
}

fn disk_code(d: WireDisk) -> u8 {
    match d {
        WireDisk::UpToDate => 1,
        WireDisk::Inconsistent => 2,
        WireDisk::Outdated => 3,
    }
}

fn disk_from(c: u8) -> Option<WireDisk> {
    match c {
        1 => Some(WireDisk::UpToDate),
        2 => Some(WireDisk::Inconsistent),
        3 => Some(WireDisk::Outdated),
        _ => None,
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Runs the decoder over arbitrary bytes until it stops making progress: the frames that
/// decoded, and the error that stopped it (if any). The fuzz target and the corpus test
/// drive the decoder through this, and check that every decoded frame re-encodes to itself.
pub fn decode_all(data: &[u8]) -> (Vec<Envelope>, Option<WireError>) {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    loop {
        match decode_frame(&mut buf) {
            Ok(Some(env)) => out.push(env),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Encodes an envelope back to bytes (the inverse of [`decode_frame`]).
pub fn encode_envelope(env: &Envelope) -> BytesMut {
    let mut buf = BytesMut::new();
    if let Some(bulk) = env.frame.encode_head(env.epoch, &mut buf) {
        buf.extend_from_slice(&bulk);
    }
    buf
}

#[cfg(test)]
mod tests;
