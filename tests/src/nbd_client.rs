//! A small synchronous NBD client for tests that need exact control over requests (invalid
//! ones included) or a writer that knows precisely which writes were acknowledged.
//! Conformance is checked with the real clients (`qemu-io`, `nbdinfo`, `nbdcopy`); this
//! one speaks fixed newstyle with `NBD_OPT_GO` and simple replies only.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("server answered with error {0}")]
    Errno(u32),
    #[error("protocol: {0}")]
    Protocol(String),
}

#[derive(Debug)]
pub struct NbdClient {
    stream: UnixStream,
    next: u64,
    pub size: u64,
    pub flags: u16,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[..8]);
    u64::from_be_bytes(x)
}

impl NbdClient {
    /// Connects and negotiates with `NBD_OPT_GO`, asking for block sizes when
    /// `block_sizes` (which obliges this client to honour them).
    pub fn connect(socket: &Path, block_sizes: bool) -> Result<NbdClient, NbdError> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        if &greeting[..8] != b"NBDMAGIC" || &greeting[8..16] != b"IHAVEOPT" {
            return Err(NbdError::Protocol("not a newstyle NBD server".into()));
        }
        stream.write_all(&3u32.to_be_bytes())?;
        let mut data = Vec::new();
        data.extend(0u32.to_be_bytes());
        let infos: &[u16] = if block_sizes { &[3] } else { &[] };
        data.extend((infos.len() as u16).to_be_bytes());
        for i in infos {
            data.extend(i.to_be_bytes());
        }
        let mut opt = Vec::new();
        opt.extend(b"IHAVEOPT");
        opt.extend(7u32.to_be_bytes());
        opt.extend((data.len() as u32).to_be_bytes());
        opt.extend(data);
        stream.write_all(&opt)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut h = [0u8; 20];
            stream.read_exact(&mut h)?;
            let reply = be_u32(&h[12..]);
            let len = be_u32(&h[16..]) as usize;
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body)?;
            match reply {
                1 => break,
                3 if len >= 12 && be_u16(&body) == 0 => {
                    size = be_u64(&body[2..]);
                    flags = be_u16(&body[10..]);
                }
                3 => {}
                other => {
                    return Err(NbdError::Protocol(format!(
                        "NBD_OPT_GO failed with {other:#x}: {}",
                        String::from_utf8_lossy(&body)
                    )));
                }
            }
        }
        Ok(NbdClient { stream, next: 1, size, flags })
    }

    /// Sends one request and reads its simple reply: `Ok(data)` or the server's errno.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, NbdError> {
        let cookie = self.next;
        self.next += 1;
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend(0x2560_9513u32.to_be_bytes());
        h.extend(flags.to_be_bytes());
        h.extend(kind.to_be_bytes());
        h.extend(cookie.to_be_bytes());
        h.extend(offset.to_be_bytes());
        h.extend(len.to_be_bytes());
        h.extend_from_slice(payload);
        self.stream.write_all(&h)?;
        if kind == CMD_DISC {
            return Ok(Vec::new());
        }
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r)?;
        if be_u32(&r) != 0x6744_6698 || be_u64(&r[8..]) != cookie {
            return Err(NbdError::Protocol(format!("unexpected reply header {r:02x?}")));
        }
        let errno = be_u32(&r[4..]);
        if errno != 0 {
            return Err(NbdError::Errno(errno));
        }
        let mut data = Vec::new();
        if kind == CMD_READ {
            data = vec![0u8; len as usize];
            self.stream.read_exact(&mut data)?;
        }
        Ok(data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(CMD_READ, 0, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        self.request(CMD_WRITE, if fua { FLAG_FUA } else { 0 }, offset, data.len() as u32, data).map(|_| ())
    }

    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(CMD_TRIM, 0, offset, len, &[]).map(|_| ())
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }

    /// Writes raw bytes (for malformed requests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Whether the server has closed the connection (reads EOF within `timeout`).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(timeout));
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

/// The errno a failed request got, if it failed with one.
pub fn errno(r: &Result<Vec<u8>, NbdError>) -> Option<u32> {
    match r {
        Err(NbdError::Errno(e)) => Some(*e),
        _ => None,
    }
}

/// Timings of a pipelined sequential write.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    /// Until every write was acknowledged.
    pub acked: Duration,
    /// Until the final FLUSH was acknowledged too.
    pub flushed: Duration,
}

/// Writes `total` bytes sequentially from `offset` in `chunk`-byte writes, keeping `depth`
/// requests in flight on one connection, then flushes.
pub fn write_stream(
    socket: &Path,
    offset: u64,
    total: u64,
    chunk: u32,
    depth: usize,
) -> Result<StreamTiming, NbdError> {
    let mut client = NbdClient::connect(socket, true)?;
    let acked = pipelined(&mut client, CMD_WRITE, offset, total, chunk, depth)?;
    let start = std::time::Instant::now();
    client.flush()?;
    Ok(StreamTiming { acked, flushed: acked + start.elapsed() })
}

/// Reads `total` bytes sequentially from `offset` in `chunk`-byte reads, keeping `depth`
/// requests in flight on one connection; returns how long that took.
pub fn read_stream(socket: &Path, offset: u64, total: u64, chunk: u32, depth: usize) -> Result<Duration, NbdError> {
    let mut client = NbdClient::connect(socket, true)?;
    pipelined(&mut client, CMD_READ, offset, total, chunk, depth)
}

/// Sends `kind` requests covering `[offset, offset + total)` with `depth` in flight while a
/// second thread takes the replies, so the server always has work queued.
fn pipelined(
    client: &mut NbdClient,
    kind: u16,
    offset: u64,
    total: u64,
    chunk: u32,
    depth: usize,
) -> Result<Duration, NbdError> {
    let mut reader = client.stream.try_clone()?;
    let count = total.div_ceil(u64::from(chunk));
    let first = client.next;
    let (slots, freed) = std::sync::mpsc::sync_channel::<()>(depth);
    let replies = std::thread::spawn(move || -> Result<(), NbdError> {
        let mut data = vec![0u8; chunk as usize];
        for _ in 0..count {
            let mut r = [0u8; 16];
            reader.read_exact(&mut r)?;
            let errno = be_u32(&r[4..]);
            if errno != 0 {
                return Err(NbdError::Errno(errno));
            }
            if kind == CMD_READ {
                reader.read_exact(&mut data)?;
            }
            let _ = freed.recv();
        }
        Ok(())
    });
    let payload = if kind == CMD_WRITE { vec![0xa5u8; chunk as usize] } else { Vec::new() };
    let start = std::time::Instant::now();
    for i in 0..count {
        if slots.send(()).is_err() {
            break;
        }
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend(0x2560_9513u32.to_be_bytes());
        h.extend(0u16.to_be_bytes());
        h.extend(kind.to_be_bytes());
        h.extend((first + i).to_be_bytes());
        h.extend((offset + i * u64::from(chunk)).to_be_bytes());
        h.extend(chunk.to_be_bytes());
        h.extend_from_slice(&payload);
        client.stream.write_all(&h)?;
    }
    replies.join().map_err(|_| NbdError::Protocol("reply reader panicked".into()))??;
    client.next = first + count;
    Ok(start.elapsed())
}
