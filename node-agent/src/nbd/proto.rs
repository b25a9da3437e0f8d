//! The NBD protocol, server side, without I/O: the fixed-newstyle handshake with option
//! haggling, and the transmission phase's request parsing and validation.
//!
//! A [`Session`] consumes the bytes a client sends and produces [`Action`]s: bytes to send
//! back, validated commands to execute, or the end of the session. Invalid requests are
//! answered with the protocol's error reply right here and the session continues; only a
//! request the server cannot frame (bad magic, an option too large to skip) ends it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

/// Block sizes this server advertises: the minimum is enforced for clients that asked for
/// block sizes (they must honour them); others may send any alignment.
pub const MIN_BLOCK: u32 = 512;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 32 << 20;
/// Options longer than this are not buffered.
pub const MAX_OPTION: usize = 64 << 10;
const HEADER_LEN: usize = 28;

/// NBD error numbers (the protocol's fixed values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// What the session needs to know about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

/// A validated command for the server to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub cookie: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool, may_trim: bool },
}

impl Op {
    /// Bytes of data the command carries (a write's payload) or brings back (a read's):
    /// what it holds in memory until its reply is sent. Zeroing and trimming carry none.
    pub fn data_len(&self) -> u64 {
        match self {
            Op::Read { len, .. } => u64::from(*len),
            Op::Write { data, .. } => data.len() as u64,
            Op::Flush | Op::Trim { .. } | Op::WriteZeroes { .. } => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Bytes),
    Execute(Command),
    /// The client asked to disconnect: finish the commands in flight, then close.
    Disconnect,
    /// Option haggling ended without transmission (abort, or an export that cannot be
    /// entered); close once the bytes sent so far are out.
    Close(String),
}

/// A client error the session cannot recover from: the connection ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("client option magic {0:#018x} is wrong")]
    OptionMagic(u64),
    #[error("client option of {0} bytes is too large")]
    OptionTooLarge(u32),
    #[error("request magic {0:#010x} is wrong")]
    RequestMagic(u32),
    #[error("client sent data after disconnecting")]
    AfterDisconnect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Transmission,
    Done,
}

#[derive(Debug)]
pub struct Session {
    export: ExportInfo,
    phase: Phase,
    no_zeroes: bool,
    structured: bool,
    enforce_block_size: bool,
    /// Bytes of an oversized write still to skip.
    discard: u64,
}

impl Session {
    pub fn new(export: ExportInfo) -> Self {
        Session {
            export,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            structured: false,
            enforce_block_size: false,
            discard: 0,
        }
    }

    /// The server's opening bytes.
    pub fn greeting() -> Bytes {
        let mut b = BytesMut::with_capacity(18);
        b.put_u64(NBDMAGIC);
        b.put_u64(IHAVEOPT);
        b.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        b.freeze()
    }

    pub fn structured(&self) -> bool {
        self.structured
    }

    pub fn in_transmission(&self) -> bool {
        self.phase == Phase::Transmission
    }

    pub fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN;
        if self.export.read_only {
            f |= TFLAG_READ_ONLY;
        }
        if self.structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }

    /// Consumes complete messages from `buf`, appending what to do to `out`.
    pub fn feed(&mut self, buf: &mut BytesMut, out: &mut Vec<Action>) -> Result<(), ProtocolError> {
        loop {
            let progressed = match self.phase {
                Phase::ClientFlags => self.client_flags(buf)?,
                Phase::Options => self.option(buf, out)?,
                Phase::Transmission => self.request(buf, out)?,
                Phase::Done => {
                    if !buf.is_empty() {
                        return Err(ProtocolError::AfterDisconnect);
                    }
                    false
                }
            };
            if !progressed {
                return Ok(());
            }
        }
    }

    fn client_flags(&mut self, buf: &mut BytesMut) -> Result<bool, ProtocolError> {
        if buf.len() < 4 {
            return Ok(false);
        }
        let flags = buf.get_u32();
        if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(ProtocolError::ClientFlags(flags));
        }
        self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
        self.phase = Phase::Options;
        Ok(true)
    }

    fn option(&mut self, buf: &mut BytesMut, out: &mut Vec<Action>) -> Result<bool, ProtocolError> {
        if self.discard > 0 {
            let n = (self.discard as usize).min(buf.len());
            buf.advance(n);
            self.discard -= n as u64;
            return Ok(n > 0 && self.discard == 0);
        }
        if buf.len() < 16 {
            return Ok(false);
        }
        let mut h = &buf[..16];
        let magic = h.get_u64();
        let option = h.get_u32();
        let len = h.get_u32();
        if magic != IHAVEOPT {
            return Err(ProtocolError::OptionMagic(magic));
        }
        if len as usize > MAX_OPTION {
            if len > (1 << 20) {
                return Err(ProtocolError::OptionTooLarge(len));
            }
            buf.advance(16);
            self.discard = u64::from(len);
            out.push(Action::Send(option_reply(option, REP_ERR_TOO_BIG, b"option data too large")));
            return Ok(true);
        }
        if buf.len() < 16 + len as usize {
            buf.reserve(16 + len as usize - buf.len());
            return Ok(false);
        }
        buf.advance(16);
        let data = buf.split_to(len as usize).freeze();
        self.handle_option(option, data, out);
        Ok(true)
    }

    fn handle_option(&mut self, option: u32, mut data: Bytes, out: &mut Vec<Action>) {
        let invalid = |msg: &str| Action::Send(option_reply(option, REP_ERR_INVALID, msg.as_bytes()));
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !self.export_matches(&name) {
                    // The protocol leaves no way to refuse but to hang up.
                    self.phase = Phase::Done;
                    out.push(Action::Close(format!("client asked for unknown export {name:?}")));
                    return;
                }
                let mut b = BytesMut::with_capacity(134);
                b.put_u64(self.export.size);
                b.put_u16(self.transmission_flags());
                if !self.no_zeroes {
                    b.put_bytes(0, 124);
                }
                out.push(Action::Send(b.freeze()));
                self.phase = Phase::Transmission;
            }
            OPT_ABORT => {
                out.push(Action::Send(option_reply(option, REP_ACK, &[])));
                self.phase = Phase::Done;
                out.push(Action::Close("client aborted the negotiation".into()));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    out.push(invalid("NBD_OPT_LIST takes no data"));
                    return;
                }
                let mut b = BytesMut::new();
                b.put_u32(self.export.name.len() as u32);
                b.put_slice(self.export.name.as_bytes());
                b.put_slice(self.export.description.as_bytes());
                out.push(Action::Send(option_reply(option, REP_SERVER, &b)));
                out.push(Action::Send(option_reply(option, REP_ACK, &[])));
            }
            OPT_STARTTLS => {
                out.push(Action::Send(option_reply(option, REP_ERR_POLICY, b"TLS is not offered on this socket")));
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(&mut data) else {
                    out.push(invalid("malformed NBD_OPT_INFO/NBD_OPT_GO data"));
                    return;
                };
                if !self.export_matches(&name) {
                    let msg = format!("no export named {name:?}");
                    out.push(Action::Send(option_reply(option, REP_ERR_UNKNOWN, msg.as_bytes())));
                    return;
                }
                let mut b = BytesMut::new();
                b.put_u16(INFO_EXPORT);
                b.put_u64(self.export.size);
                b.put_u16(self.transmission_flags());
                out.push(Action::Send(option_reply(option, REP_INFO, &b)));
                let mut b = BytesMut::new();
                b.put_u16(INFO_BLOCK_SIZE);
                b.put_u32(MIN_BLOCK);
                b.put_u32(PREFERRED_BLOCK);
                b.put_u32(MAX_BLOCK);
                out.push(Action::Send(option_reply(option, REP_INFO, &b)));
                if requests.contains(&INFO_NAME) {
                    let mut b = BytesMut::new();
                    b.put_u16(INFO_NAME);
                    b.put_slice(self.export.name.as_bytes());
                    out.push(Action::Send(option_reply(option, REP_INFO, &b)));
                }
                if requests.contains(&INFO_DESCRIPTION) {
                    let mut b = BytesMut::new();
                    b.put_u16(INFO_DESCRIPTION);
                    b.put_slice(self.export.description.as_bytes());
                    out.push(Action::Send(option_reply(option, REP_INFO, &b)));
                }
                out.push(Action::Send(option_reply(option, REP_ACK, &[])));
                if option == OPT_GO {
                    self.enforce_block_size = requests.contains(&INFO_BLOCK_SIZE);
                    self.phase = Phase::Transmission;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    out.push(invalid("NBD_OPT_STRUCTURED_REPLY takes no data"));
                } else {
                    self.structured = true;
                    out.push(Action::Send(option_reply(option, REP_ACK, &[])));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !self.structured {
                    out.push(invalid("metadata contexts need structured replies first"));
                } else if !valid_meta_request(&mut data) {
                    out.push(invalid("malformed metadata context request"));
                } else {
                    // No metadata contexts are offered: the empty answer is a bare ACK.
                    out.push(Action::Send(option_reply(option, REP_ACK, &[])));
                }
            }
            other => {
                let msg = format!("option {other} is not supported");
                out.push(Action::Send(option_reply(other, REP_ERR_UNSUP, msg.as_bytes())));
            }
        }
    }

    fn export_matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.export.name
    }

    fn request(&mut self, buf: &mut BytesMut, out: &mut Vec<Action>) -> Result<bool, ProtocolError> {
        if self.discard > 0 {
            let n = (self.discard as usize).min(buf.len());
            buf.advance(n);
            self.discard -= n as u64;
            return Ok(n > 0);
        }
        if buf.len() < HEADER_LEN {
            return Ok(false);
        }
        let mut h = &buf[..HEADER_LEN];
        let magic = h.get_u32();
        let flags = h.get_u16();
        let kind = h.get_u16();
        let cookie = h.get_u64();
        let offset = h.get_u64();
        let len = h.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::RequestMagic(magic));
        }
        if kind == CMD_WRITE {
            if len > MAX_BLOCK {
                // Too large to buffer: skip the payload and answer with an error.
                buf.advance(HEADER_LEN);
                self.discard = u64::from(len);
                out.push(Action::Send(self.error_reply(cookie, Errno::Inval, "write larger than 32 MiB")));
                return Ok(true);
            }
            if buf.len() < HEADER_LEN + len as usize {
                buf.reserve(HEADER_LEN + len as usize - buf.len());
                return Ok(false);
            }
        }
        buf.advance(HEADER_LEN);
        let data = if kind == CMD_WRITE { buf.split_to(len as usize).freeze() } else { Bytes::new() };
        match self.validate(flags, kind, offset, len, data) {
            Ok(Some(op)) => out.push(Action::Execute(Command { cookie, op })),
            Ok(None) => {
                self.phase = Phase::Done;
                out.push(Action::Disconnect);
            }
            Err((errno, msg)) => out.push(Action::Send(self.error_reply(cookie, errno, msg))),
        }
        Ok(true)
    }

    /// Checks a request against the export; `Ok(None)` is a disconnect.
    fn validate(
        &self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        data: Bytes,
    ) -> Result<Option<Op>, (Errno, &'static str)> {
        let allowed = match kind {
            CMD_READ => CMD_FLAG_FUA | if self.structured { CMD_FLAG_DF } else { 0 },
            CMD_WRITE | CMD_TRIM | CMD_FLUSH | CMD_DISC => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            _ => return Err((Errno::Inval, "unknown command")),
        };
        if flags & !allowed != 0 {
            return Err((Errno::Inval, "command flag not valid for this command"));
        }
        let fua = flags & CMD_FLAG_FUA != 0;
        match kind {
            CMD_DISC => return Ok(None),
            CMD_FLUSH => {
                if offset != 0 || len != 0 {
                    return Err((Errno::Inval, "flush offset and length must be zero"));
                }
                return Ok(Some(Op::Flush));
            }
            _ => {}
        }
        let writes = kind != CMD_READ;
        if writes && self.export.read_only {
            return Err((Errno::Perm, "the export is read-only"));
        }
        if len == 0 {
            return Err((Errno::Inval, "zero-length request"));
        }
        if offset.checked_add(u64::from(len)).is_none_or(|end| end > self.export.size) {
            return Err(if writes {
                (Errno::NoSpc, "request beyond the end of the export")
            } else {
                (Errno::Inval, "read beyond the end of the export")
            });
        }
        if self.enforce_block_size && (!offset.is_multiple_of(u64::from(MIN_BLOCK)) || !len.is_multiple_of(MIN_BLOCK)) {
            return Err((Errno::Inval, "request not aligned to the 512-byte minimum block size"));
        }
        if matches!(kind, CMD_READ | CMD_WRITE) && len > MAX_BLOCK {
            return Err((Errno::Inval, "request larger than the 32 MiB maximum block size"));
        }
        Ok(Some(match kind {
            CMD_READ => Op::Read { offset, len },
            CMD_WRITE => Op::Write { offset, data, fua },
            CMD_TRIM => Op::Trim { offset, len, fua },
            _ => {
                if flags & CMD_FLAG_FAST_ZERO != 0 {
                    // Zeroing is never faster than writing here only by accident; the
                    // protocol allows refusing fast-zero requests outright.
                    return Err((Errno::NotSup, "fast zero is not supported"));
                }
                Op::WriteZeroes { offset, len, fua, may_trim: flags & CMD_FLAG_NO_HOLE == 0 }
            }
        }))
    }

    /// The reply for a failed command, in whichever form was negotiated.
    pub fn error_reply(&self, cookie: u64, errno: Errno, message: &str) -> Bytes {
        error_reply(self.structured, cookie, errno, message)
    }
}

fn parse_info_request(data: &mut Bytes) -> Option<(String, Vec<u16>)> {
    if data.len() < 6 {
        return None;
    }
    let name_len = data.get_u32() as usize;
    if name_len > data.len().saturating_sub(2) {
        return None;
    }
    let name = String::from_utf8(data.split_to(name_len).to_vec()).ok()?;
    let n = data.get_u16() as usize;
    if data.len() != n * 2 {
        return None;
    }
    Some((name, (0..n).map(|_| data.get_u16()).collect()))
}

fn valid_meta_request(data: &mut Bytes) -> bool {
    if data.len() < 8 {
        return false;
    }
    let name_len = data.get_u32() as usize;
    if name_len > data.len().saturating_sub(4) {
        return false;
    }
    data.advance(name_len);
    let n = data.get_u32();
    for _ in 0..n {
        if data.len() < 4 {
            return false;
        }
        let q = data.get_u32() as usize;
        if q > data.len() {
            return false;
        }
        data.advance(q);
    }
    data.is_empty()
}

pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPTION_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(reply);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// A successful reply without data.
pub fn ok_reply(structured: bool, cookie: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(20);
    if structured {
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(REPLY_FLAG_DONE);
        b.put_u16(REPLY_TYPE_NONE);
        b.put_u64(cookie);
        b.put_u32(0);
    } else {
        b.put_u32(SIMPLE_REPLY_MAGIC);
        b.put_u32(0);
        b.put_u64(cookie);
    }
    b.freeze()
}

/// The header preceding read data; the data follows it unchanged on the wire.
pub fn read_reply_header(structured: bool, cookie: u64, offset: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(28);
    if structured {
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(REPLY_FLAG_DONE);
        b.put_u16(REPLY_TYPE_OFFSET_DATA);
        b.put_u64(cookie);
        b.put_u32((8 + len) as u32);
        b.put_u64(offset);
    } else {
        b.put_u32(SIMPLE_REPLY_MAGIC);
        b.put_u32(0);
        b.put_u64(cookie);
    }
    b.freeze()
}

pub fn error_reply(structured: bool, cookie: u64, errno: Errno, message: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(32 + message.len());
    if structured {
        let msg = &message.as_bytes()[..message.len().min(4096)];
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(REPLY_FLAG_DONE);
        b.put_u16(REPLY_TYPE_ERROR);
        b.put_u64(cookie);
        b.put_u32(6 + msg.len() as u32);
        b.put_u32(errno as u32);
        b.put_u16(msg.len() as u16);
        b.put_slice(msg);
    } else {
        b.put_u32(SIMPLE_REPLY_MAGIC);
        b.put_u32(errno as u32);
        b.put_u64(cookie);
    }
    b.freeze()
}

/// Runs a session over arbitrary client bytes (the fuzz target's and corpus test's entry
/// point): returns the actions produced until the input ends or the session fails.
pub fn run_session(data: &[u8]) -> (Vec<Action>, Option<ProtocolError>) {
    let mut s =
        Session::new(ExportInfo { name: "vol".into(), description: "fuzz".into(), size: 1 << 20, read_only: false });
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    // Feed in uneven pieces so partial-message paths are exercised too.
    for chunk in data.chunks(7) {
        buf.extend_from_slice(chunk);
        if let Err(e) = s.feed(&mut buf, &mut out) {
            return (out, Some(e));
        }
    }
    (out, None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn session() -> Session {
        Session::new(ExportInfo { name: "vol".into(), description: "test".into(), size: 1 << 20, read_only: false })
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(option);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        b.to_vec()
    }

    fn go(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(infos.len() as u16);
        for i in infos {
            d.put_u16(*i);
        }
        opt(OPT_GO, &d)
    }

    fn req(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(flags);
        b.put_u16(kind);
        b.put_u64(cookie);
        b.put_u64(offset);
        b.put_u32(len);
        b.to_vec()
    }

    fn feed(s: &mut Session, bytes: &[u8]) -> Vec<Action> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        s.feed(&mut buf, &mut out).unwrap();
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        out
    }

    fn reply_types(actions: &[Action]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(b) if b.len() >= 20 && b[..8] == OPTION_REPLY_MAGIC.to_be_bytes() => {
                    Some(u32::from_be_bytes([b[12], b[13], b[14], b[15]]))
                }
                _ => None,
            })
            .collect()
    }

    fn into_transmission(s: &mut Session, structured: bool, block_size: bool) {
        feed(s, &3u32.to_be_bytes());
        if structured {
            assert_eq!(reply_types(&feed(s, &opt(OPT_STRUCTURED_REPLY, &[]))), vec![REP_ACK]);
        }
        let infos: &[u16] = if block_size { &[INFO_BLOCK_SIZE] } else { &[] };
        assert_eq!(reply_types(&feed(s, &go("vol", infos))), vec![REP_INFO, REP_INFO, REP_ACK]);
        assert!(s.in_transmission());
    }

    #[test]
    fn greeting_is_fixed_newstyle() {
        assert_eq!(&Session::greeting()[..], &[b"NBDMAGIC".as_slice(), b"IHAVEOPT", &[0, 3]].concat()[..]);
    }

    #[test]
    fn unknown_client_flags_end_the_session() {
        let mut s = session();
        let mut buf = BytesMut::from(&8u32.to_be_bytes()[..]);
        assert_eq!(s.feed(&mut buf, &mut Vec::new()), Err(ProtocolError::ClientFlags(8)));
    }

    #[test]
    fn option_haggling_answers_errors_and_continues() {
        let mut s = session();
        feed(&mut s, &3u32.to_be_bytes());
        assert_eq!(reply_types(&feed(&mut s, &opt(OPT_LIST, b"x"))), vec![REP_ERR_INVALID]);
        assert_eq!(reply_types(&feed(&mut s, &opt(OPT_LIST, &[]))), vec![REP_SERVER, REP_ACK]);
        assert_eq!(reply_types(&feed(&mut s, &opt(OPT_STARTTLS, &[]))), vec![REP_ERR_POLICY]);
        assert_eq!(reply_types(&feed(&mut s, &opt(99, b"abc"))), vec![REP_ERR_UNSUP]);
        assert_eq!(reply_types(&feed(&mut s, &opt(OPT_SET_META_CONTEXT, &[0; 8]))), vec![REP_ERR_INVALID]);
        assert_eq!(reply_types(&feed(&mut s, &go("other", &[]))), vec![REP_ERR_UNKNOWN]);
        assert_eq!(reply_types(&feed(&mut s, &opt(OPT_GO, &[0, 0, 0, 9, 1]))), vec![REP_ERR_INVALID]);
        let mut big = opt(OPT_INFO, &vec![0; MAX_OPTION + 1]);
        big.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        assert_eq!(reply_types(&feed(&mut s, &big)), vec![REP_ERR_TOO_BIG, REP_ACK]);
        assert!(!s.in_transmission());
        assert_eq!(reply_types(&feed(&mut s, &opt(OPT_SET_META_CONTEXT, &[0; 8]))), vec![REP_ACK]);
    }

    #[test]
    fn export_name_enters_transmission_with_flags() {
        let mut s = session();
        feed(&mut s, &1u32.to_be_bytes());
        let out = feed(&mut s, &opt(OPT_EXPORT_NAME, b""));
        let [Action::Send(b)] = out.as_slice() else { panic!("{out:?}") };
        assert_eq!(b.len(), 8 + 2 + 124);
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 1 << 20);
        let flags = u16::from_be_bytes([b[8], b[9]]);
        assert_eq!(flags & TFLAG_READ_ONLY, 0);
        assert_ne!(flags & TFLAG_SEND_FUA, 0);
        assert!(s.in_transmission());
    }

    #[test]
    fn requests_are_validated_with_the_protocols_errors() {
        let mut s = session();
        into_transmission(&mut s, false, true);
        let errno = |a: &[Action]| match a {
            [Action::Send(b)] if b.len() == 16 => u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            other => panic!("{other:?}"),
        };
        assert_eq!(errno(&feed(&mut s, &req(42, 0, 1, 0, 512))), Errno::Inval as u32, "unknown command");
        assert_eq!(errno(&feed(&mut s, &req(CMD_READ, 0, 2, 1 << 20, 512))), Errno::Inval as u32, "read past the end");
        let mut w = req(CMD_WRITE, 0, 3, (1 << 20) - 512, 1024);
        w.extend(vec![0u8; 1024]);
        assert_eq!(errno(&feed(&mut s, &w)), Errno::NoSpc as u32, "write past the end");
        assert_eq!(errno(&feed(&mut s, &req(CMD_READ, 0, 4, 100, 512))), Errno::Inval as u32, "misaligned");
        assert_eq!(errno(&feed(&mut s, &req(CMD_FLUSH, 0, 5, 8, 0))), Errno::Inval as u32, "flush with offset");
        assert_eq!(errno(&feed(&mut s, &req(CMD_READ, 0x40, 6, 0, 512))), Errno::Inval as u32, "unknown flag");
        let mut w = req(CMD_WRITE, CMD_FLAG_FUA, 7, 4096, 512);
        w.extend(vec![9u8; 512]);
        assert_eq!(
            feed(&mut s, &w),
            vec![Action::Execute(Command {
                cookie: 7,
                op: Op::Write { offset: 4096, data: Bytes::from(vec![9u8; 512]), fua: true }
            })]
        );
        assert_eq!(feed(&mut s, &req(CMD_DISC, 0, 8, 0, 0)), vec![Action::Disconnect]);
    }

    #[test]
    fn oversized_writes_are_skipped_and_answered() {
        let mut s = session();
        into_transmission(&mut s, true, false);
        let mut bytes = req(CMD_WRITE, 0, 1, 0, MAX_BLOCK + 512);
        bytes.extend(vec![0u8; (MAX_BLOCK + 512) as usize]);
        bytes.extend(req(CMD_FLUSH, 0, 2, 0, 0));
        let out = feed(&mut s, &bytes);
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0], Action::Send(b) if u16::from_be_bytes([b[6], b[7]]) == REPLY_TYPE_ERROR));
        assert_eq!(out[1], Action::Execute(Command { cookie: 2, op: Op::Flush }));
    }

    #[test]
    fn read_only_exports_refuse_writes_with_eperm() {
        let mut s =
            Session::new(ExportInfo { name: "vol".into(), description: String::new(), size: 1 << 20, read_only: true });
        into_transmission(&mut s, false, false);
        let out = feed(&mut s, &req(CMD_TRIM, 0, 1, 0, 4096));
        assert!(
            matches!(out.as_slice(), [Action::Send(b)] if u32::from_be_bytes([b[4], b[5], b[6], b[7]]) == Errno::Perm as u32)
        );
        // Clients that did not ask for block sizes may use any alignment.
        assert!(matches!(feed(&mut s, &req(CMD_READ, 0, 2, 3, 5)).as_slice(), [Action::Execute(_)]));
    }

    #[test]
    fn data_len_is_what_a_command_holds_until_answered() {
        assert_eq!(Op::Read { offset: 0, len: 4096 }.data_len(), 4096);
        assert_eq!(Op::Write { offset: 0, data: Bytes::from(vec![0; 512]), fua: false }.data_len(), 512);
        assert_eq!(Op::Flush.data_len(), 0);
        assert_eq!(Op::Trim { offset: 0, len: 1 << 20, fua: false }.data_len(), 0);
        assert_eq!(Op::WriteZeroes { offset: 0, len: 1 << 20, fua: false, may_trim: true }.data_len(), 0);
    }

    #[test]
    fn bad_request_magic_ends_the_session() {
        let mut s = session();
        into_transmission(&mut s, false, false);
        let mut bytes = req(CMD_READ, 0, 1, 0, 512);
        bytes[0] = 0;
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(s.feed(&mut buf, &mut Vec::new()), Err(ProtocolError::RequestMagic(_))));
    }

    #[test]
    fn random_client_bytes_never_panic() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut base = 3u32.to_be_bytes().to_vec();
        base.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        base.extend(go("vol", &[INFO_BLOCK_SIZE, INFO_NAME]));
        base.extend(req(CMD_READ, 0, 1, 0, 4096));
        let mut w = req(CMD_WRITE, 1, 2, 512, 1024);
        w.extend(vec![1u8; 1024]);
        base.extend(w);
        for _ in 0..20_000 {
            let mut data = base.clone();
            for _ in 0..rng.random_range(1..5) {
                let i = rng.random_range(0..data.len());
                data[i] = rng.random();
            }
            let _ = run_session(&data);
        }
    }
}
