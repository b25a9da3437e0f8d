//! The NBD server over loopback TCP facing a client that sends many large reads and does
//! not read the replies: the replies queued in the server stay within the per-client byte
//! budget (and the process's memory with them), and once the client reads, every reply
//! arrives intact.
//!
//! The server runs in this process, so its memory is this process's: without the budget,
//! 100 reads of 32 MiB would grow it by 3.2 GiB while the client is not reading.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hapair_agent::nbd::export::FileExport;
use hapair_agent::nbd::proto::{
    CMD_DISC, CMD_READ, IHAVEOPT, INFO_EXPORT, MAX_BLOCK, NBDMAGIC, OPT_GO, REP_ACK, REP_INFO, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
};
use hapair_agent::nbd::server::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUESTS: u64 = 100;
const LEN: u32 = MAX_BLOCK;
/// Memory the process may grow by beyond the budget: the runtime, the allocator's
/// rounding, the test's own buffers. Far below the 3.2 GiB an unbounded server reaches.
const SLACK: u64 = 64 << 20;

/// A memory figure of this process from /proc/self/status (`VmRSS:`, `VmHWM:`), in bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kb: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().unwrap();
    kb * 1024
}

/// Fixed newstyle with `NBD_OPT_GO` and simple replies; returns the export size. (The
/// workspace's `hapair_tests::nbd_client` is synchronous and Unix-only, and that crate
/// depends on this one, so it cannot serve here.)
async fn handshake(s: &mut TcpStream) -> u64 {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting[..16], [NBDMAGIC.to_be_bytes(), IHAVEOPT.to_be_bytes()].concat());
    s.write_all(&3u32.to_be_bytes()).await.unwrap(); // fixed newstyle, no zeroes
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend(OPT_GO.to_be_bytes());
    opt.extend(6u32.to_be_bytes());
    opt.extend(0u32.to_be_bytes()); // the default export
    opt.extend(0u16.to_be_bytes()); // no information requests
    s.write_all(&opt).await.unwrap();
    let mut size = 0;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut body = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut body).await.unwrap();
        match reply {
            REP_ACK => return size,
            REP_INFO if body.len() >= 12 && body[..2] == INFO_EXPORT.to_be_bytes() => {
                size = u64::from_be_bytes(body[2..10].try_into().unwrap());
            }
            REP_INFO => {}
            other => panic!("NBD_OPT_GO failed with {other:#x}: {}", String::from_utf8_lossy(&body)),
        }
    }
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend(0u16.to_be_bytes());
    b.extend(kind.to_be_bytes());
    b.extend(cookie.to_be_bytes());
    b.extend(offset.to_be_bytes());
    b.extend(len.to_be_bytes());
    b
}

/// What region `i` of the backing file starts and ends with; the rest of it is a hole, so
/// a reply with another region's data, or shifted data, is told apart.
fn marks(i: u64) -> ([u8; 8], [u8; 8]) {
    ((i + 1).to_be_bytes(), (!i).to_be_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_replies_to_a_client_that_does_not_read_stay_within_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(REQUESTS * u64::from(LEN)).unwrap();
    for i in 0..REQUESTS {
        let (head, tail) = marks(i);
        file.write_all_at(&head, i * u64::from(LEN)).unwrap();
        file.write_all_at(&tail, (i + 1) * u64::from(LEN) - 8).unwrap();
    }
    drop(file);
    let export = Arc::new(FileExport::open("disk", &path).unwrap());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = NbdServer::start(export, &dir.path().join("disk.sock"), Some(addr)).await.unwrap();

    let rss_before = proc_status_bytes("VmRSS:");
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(handshake(&mut s).await, REQUESTS * u64::from(LEN));
    let mut requests = Vec::new();
    for i in 0..REQUESTS {
        requests.extend(request(CMD_READ, i, i * u64::from(LEN), LEN));
    }
    // 2.8 KB: the socket takes all of it, whether or not the server reads it.
    s.write_all(&requests).await.unwrap();

    // Let the server do all it will without the client reading: at least one reply
    // queued, then time for an unbounded server to queue far more than the budget (it
    // reads ~1 GiB/s from the page cache here).
    let queue = server.reply_queue();
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.bytes() < u64::from(LEN) {
        assert!(Instant::now() < deadline, "no reply was ever queued ({} bytes)", queue.bytes());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (queued, peak) = (queue.bytes(), queue.peak());
    let (rss_now, rss_peak) = (proc_status_bytes("VmRSS:"), proc_status_bytes("VmHWM:"));
    let grown = rss_peak.saturating_sub(rss_before);
    eprintln!(
        "replies queued {queued} B (peak {peak} B, budget {MAX_IN_FLIGHT_BYTES} B); \
         RSS {} MiB before, {} MiB now, {} MiB peak: grown by {} MiB",
        rss_before >> 20,
        rss_now >> 20,
        rss_peak >> 20,
        grown >> 20
    );
    // The budget bounds the data; each reply adds its 16-byte header.
    let bound = u64::from(MAX_IN_FLIGHT_BYTES) + MAX_IN_FLIGHT as u64 * 16;
    assert!(peak <= bound, "{peak} reply bytes were queued at once, more than {bound}");
    // The server did work up to the budget (as many whole reads as it holds) rather than
    // stalling early.
    let fill = u64::from((MAX_IN_FLIGHT_BYTES / LEN).max(1)) * u64::from(LEN);
    assert!(queued >= fill, "only {queued} reply bytes queued, less than {fill}");
    let rss_bound = u64::from(MAX_IN_FLIGHT_BYTES) + SLACK;
    assert!(grown <= rss_bound, "the process grew by {} MiB, more than {} MiB", grown >> 20, rss_bound >> 20);

    // Now read: every reply arrives, once, with its region's data.
    let mut seen = HashSet::new();
    let mut data = vec![0u8; LEN as usize];
    let hole = vec![0u8; LEN as usize - 16];
    for _ in 0..REQUESTS {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(h[..4], SIMPLE_REPLY_MAGIC.to_be_bytes(), "simple reply");
        assert_eq!(h[4..8], [0; 4], "no error");
        let cookie = u64::from_be_bytes(h[8..].try_into().unwrap());
        assert!(cookie < REQUESTS && seen.insert(cookie), "cookie {cookie} unknown or repeated");
        s.read_exact(&mut data).await.unwrap();
        let (head, tail) = marks(cookie);
        let n = data.len();
        assert_eq!(data[..8], head, "region {cookie} start");
        assert_eq!(data[n - 8..], tail, "region {cookie} end");
        assert!(data[8..n - 8] == hole[..], "region {cookie} middle");
    }
    assert_eq!(seen.len() as u64, REQUESTS);
    s.write_all(&request(CMD_DISC, REQUESTS, 0, 0)).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty(), "{} stray bytes", rest.len());
    assert_eq!(queue.bytes(), 0, "replies still counted as queued after all were read");
}
