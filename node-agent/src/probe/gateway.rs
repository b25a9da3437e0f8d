//! Gateway reachability: an ICMP echo, or an ARP request on a given interface.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::Observation;
use crate::arp::{ArpOp, ArpPacket, ArpSocket, BROADCAST};
use crate::iface::Netlink;

/// Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0xffff)
}

/// An echo request; ICMPv6 checksums are filled in by the kernel.
pub fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"hapair-gateway-probe");
    if !v6 {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// Whether `packet` (an IPv4 datagram with header for v4, the bare ICMPv6 message for v6)
/// is the echo reply to (`id`, `seq`).
pub fn is_echo_reply(v6: bool, packet: &[u8], id: u16, seq: u16) -> bool {
    let icmp = if v6 {
        packet
    } else {
        let header_len = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
        packet.get(header_len..).unwrap_or_default()
    };
    let reply_type = if v6 { 129 } else { 0 };
    icmp.len() >= 8
        && icmp[0] == reply_type
        && icmp[1] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// Pings `gateway` once (from `device` when given) and waits up to `timeout` for the reply.
pub async fn icmp(gateway: IpAddr, device: Option<String>, timeout: Duration) -> Observation {
    let result = tokio::task::spawn_blocking(move || ping_blocking(gateway, device.as_deref(), timeout)).await;
    match result {
        Ok(Ok(true)) => Observation::healthy(format!("gateway {gateway} answered ICMP echo")),
        Ok(Ok(false)) => {
            Observation::unhealthy(format!("gateway {gateway} did not answer ICMP echo within {timeout:?}"))
        }
        Ok(Err(e)) => Observation::unhealthy(format!("pinging gateway {gateway}: {e}")),
        Err(e) => Observation::unhealthy(format!("pinging gateway {gateway}: {e}")),
    }
}

fn ping_blocking(gateway: IpAddr, device: Option<&str>, timeout: Duration) -> io::Result<bool> {
    let v6 = gateway.is_ipv6();
    let socket = if v6 {
        Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?
    } else {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?
    };
    if let Some(device) = device {
        socket.bind_device(Some(device.as_bytes()))?;
    }
    // Distinguishes our replies from other pings on the host.
    let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(0) ^ rand::random::<u16>();
    let seq = rand::random::<u16>();
    let target = SockAddr::from(SocketAddr::new(gateway, 0));
    socket.send_to(&echo_request(v6, id, seq), &target)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                // SAFETY: recv_from initialised the first `n` bytes.
                let bytes: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                if from.as_socket().map(|s| s.ip()) == Some(gateway) && is_echo_reply(v6, &bytes, id, seq) {
                    return Ok(true);
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Asks for `gateway`'s MAC on `device` and waits up to `timeout` for the answer.
pub async fn arp(netlink: &Netlink, gateway: Ipv4Addr, device: &str, timeout: Duration) -> Observation {
    let iface = match netlink.interface(device).await {
        Ok(i) => i,
        Err(e) => return Observation::unhealthy(format!("ARP to gateway {gateway}: {e}")),
    };
    let Some(mac) = iface.mac else {
        return Observation::unhealthy(format!("ARP to gateway {gateway}: {device} has no MAC address"));
    };
    // Ask from one of our own IPv4 addresses; without one, an RFC 5227 probe (sender 0.0.0.0).
    let sender_ip = netlink
        .addresses(iface.index)
        .await
        .ok()
        .and_then(|list| {
            list.iter().find_map(|a| match a.address {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let socket = match ArpSocket::open(iface.index, true) {
        Ok(s) => s,
        Err(e) => return Observation::unhealthy(format!("ARP to gateway {gateway} on {device}: {e}")),
    };
    let request = ArpPacket { op: ArpOp::Request, sender_mac: mac, sender_ip, target_mac: [0; 6], target_ip: gateway };
    if let Err(e) = socket.send(&request, BROADCAST).await {
        return Observation::unhealthy(format!("ARP to gateway {gateway} on {device}: {e}"));
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match socket.recv(left).await {
            Ok(Some(p)) if p.op == ArpOp::Reply && p.sender_ip == gateway => {
                let m = p.sender_mac;
                return Observation::healthy(format!(
                    "gateway {gateway} is at {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} on {device}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Observation::unhealthy(format!(
                    "gateway {gateway} did not answer ARP on {device} within {timeout:?}"
                ));
            }
            Err(e) => return Observation::unhealthy(format!("ARP to gateway {gateway} on {device}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let p = echo_request(false, 0x1234, 7);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        let mut reply = vec![0x45u8];
        reply.extend_from_slice(&[0; 19]);
        let mut icmp = p.clone();
        icmp[0] = 0;
        reply.extend_from_slice(&icmp);
        assert!(is_echo_reply(false, &reply, 0x1234, 7));
        assert!(!is_echo_reply(false, &reply, 0x1234, 8));
        assert!(!is_echo_reply(false, &reply[..22], 0x1234, 7));
        assert!(!is_echo_reply(true, &[], 1, 1));
    }
}
