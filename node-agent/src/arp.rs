//! ARP over Ethernet: building and parsing frames, and an `AF_PACKET` socket bound to one
//! interface to send and receive them. Used for gratuitous ARP on takeover and for the
//! ARP flavour of the gateway probe.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

pub const ETH_P_ARP: u16 = 0x0806;
pub const BROADCAST: [u8; 6] = [0xff; 6];
const FRAME_LEN: usize = 42;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpOp {
    Request,
    Reply,
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpPacket {
    pub op: ArpOp,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

impl ArpPacket {
    /// A gratuitous ARP for `ip` at `mac`: sender and target IP are both the address, so
    /// every neighbour that has an entry for it overrides the entry's MAC. Requests go with
    /// an empty target MAC; replies repeat the sender MAC (some stacks only heed replies).
    pub fn gratuitous(op: ArpOp, mac: [u8; 6], ip: Ipv4Addr) -> Self {
        let target_mac = match op {
            ArpOp::Request => [0; 6],
            ArpOp::Reply => mac,
        };
        ArpPacket { op, sender_mac: mac, sender_ip: ip, target_mac, target_ip: ip }
    }

    /// The Ethernet frame carrying this packet to `destination`.
    pub fn frame(&self, destination: [u8; 6]) -> [u8; FRAME_LEN] {
        let mut f = [0u8; FRAME_LEN];
        f[0..6].copy_from_slice(&destination);
        f[6..12].copy_from_slice(&self.sender_mac);
        f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        f[18] = 6;
        f[19] = 4;
        let op: u16 = match self.op {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
        };
        f[20..22].copy_from_slice(&op.to_be_bytes());
        f[22..28].copy_from_slice(&self.sender_mac);
        f[28..32].copy_from_slice(&self.sender_ip.octets());
        f[32..38].copy_from_slice(&self.target_mac);
        f[38..42].copy_from_slice(&self.target_ip.octets());
        f
    }

    /// Parses an Ethernet frame; `None` for anything that is not Ethernet/IPv4 ARP.
    pub fn parse(frame: &[u8]) -> Option<Self> {
        if frame.len() < FRAME_LEN || frame[12..14] != ETH_P_ARP.to_be_bytes() {
            return None;
        }
        if frame[14..16] != [0, 1] || frame[16..18] != [8, 0] || frame[18] != 6 || frame[19] != 4 {
            return None;
        }
        let op = match u16::from_be_bytes([frame[20], frame[21]]) {
            1 => ArpOp::Request,
            2 => ArpOp::Reply,
            _ => return None,
        };
        let mac = |at: usize| {
            let mut m = [0u8; 6];
            m.copy_from_slice(&frame[at..at + 6]);
            m
        };
        let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
        Some(ArpPacket { op, sender_mac: mac(22), sender_ip: ip(28), target_mac: mac(32), target_ip: ip(38) })
    }
}

/// A raw `AF_PACKET` socket for ARP frames on one interface.
#[derive(Debug)]
pub struct ArpSocket {
    fd: AsyncFd<OwnedFd>,
    ifindex: i32,
}

impl ArpSocket {
    /// Opens a socket on interface `ifindex` that receives ARP frames (when `receive`) and
    /// can send them. Needs CAP_NET_RAW; must be called within a tokio runtime.
    pub fn open(ifindex: u32, receive: bool) -> io::Result<Self> {
        let ifindex = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let protocol = if receive { ETH_P_ARP.to_be() } else { 0 };
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if receive {
            let addr = link_address(ifindex, protocol, [0; 6]);
            // SAFETY: `addr` is a valid sockaddr_ll and the length matches its type.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                    socklen::<libc::sockaddr_ll>(),
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd takes ownership of `fd`, so it stays open and the same for
        // the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(ArpSocket { fd, ifindex })
    }

    /// Sends an ARP packet to `destination` (a MAC, usually [`BROADCAST`]).
    pub async fn send(&self, packet: &ArpPacket, destination: [u8; 6]) -> io::Result<()> {
        let frame = packet.frame(destination);
        let addr = link_address(self.ifindex, ETH_P_ARP.to_be(), destination);
        loop {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: `frame` and `addr` outlive the call; lengths match the buffers.
                let rc = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                        socklen::<libc::sockaddr_ll>(),
                    )
                };
                if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
            if let Ok(r) = result {
                return r;
            }
        }
    }

    /// The next ARP packet seen on the interface, or `None` after `timeout`.
    pub async fn recv(&self, timeout: Duration) -> io::Result<Option<ArpPacket>> {
        let receive = async {
            let mut buf = [0u8; 1514];
            loop {
                let mut guard = self.fd.readable().await?;
                let result = guard.try_io(|fd| {
                    // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
                    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                    usize::try_from(n).map_err(|_| io::Error::last_os_error())
                });
                match result {
                    Ok(Ok(n)) => {
                        if let Some(p) = ArpPacket::parse(&buf[..n]) {
                            return Ok(p);
                        }
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => continue,
                }
            }
        };
        match tokio::time::timeout(timeout, receive).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }
}

fn link_address(ifindex: i32, protocol_be: u16, mac: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = libc::sockaddr_ll {
        sll_family: u16::try_from(libc::AF_PACKET).unwrap_or(17),
        sll_protocol: protocol_be,
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    addr.sll_addr[..6].copy_from_slice(&mac);
    addr
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_frames_round_trip() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip = Ipv4Addr::new(198, 18, 0, 100);
        for op in [ArpOp::Request, ArpOp::Reply] {
            let p = ArpPacket::gratuitous(op, mac, ip);
            let frame = p.frame(BROADCAST);
            assert_eq!(&frame[..6], &BROADCAST);
            assert_eq!(ArpPacket::parse(&frame), Some(p));
            assert_eq!((p.sender_ip, p.target_ip), (ip, ip));
        }
    }

    #[test]
    fn other_frames_are_not_arp() {
        let mut frame = ArpPacket::gratuitous(ArpOp::Request, [2; 6], Ipv4Addr::LOCALHOST).frame(BROADCAST);
        assert!(ArpPacket::parse(&frame[..41]).is_none());
        frame[12] = 0x86;
        assert!(ArpPacket::parse(&frame).is_none());
    }
}
