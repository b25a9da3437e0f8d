//! Telling the neighbours that an address moved: gratuitous ARP for IPv4, unsolicited
//! neighbour advertisements for IPv6.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::arp::{ArpOp, ArpPacket, ArpSocket, BROADCAST};

/// ICMPv6 neighbour advertisement, override flag set, with the target link-layer address
/// option. The kernel fills in the checksum of ICMPv6 raw sockets.
pub fn neighbour_advertisement(target: Ipv6Addr, mac: [u8; 6]) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136; // type: neighbour advertisement
    p[4] = 0x20; // flags: Override (not Router, not Solicited)
    p[8..24].copy_from_slice(&target.octets());
    p[24] = 2; // option: target link-layer address
    p[25] = 1; // length in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

/// Sends one round of announcements for `address` out of interface `ifindex`.
pub async fn announce_once(ifindex: u32, mac: [u8; 6], address: IpAddr) -> io::Result<()> {
    match address {
        IpAddr::V4(ip) => send_garp(ifindex, mac, ip).await,
        IpAddr::V6(ip) => send_unsolicited_na(ifindex, mac, ip),
    }
}

async fn send_garp(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    let socket = ArpSocket::open(ifindex, false)?;
    socket.send(&ArpPacket::gratuitous(ArpOp::Request, mac, ip), BROADCAST).await?;
    socket.send(&ArpPacket::gratuitous(ArpOp::Reply, mac, ip), BROADCAST).await
}

fn send_unsolicited_na(ifindex: u32, mac: [u8; 6], ip: Ipv6Addr) -> io::Result<()> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    // Receivers drop neighbour discovery that crossed a router: hop limit must be 255.
    socket.set_multicast_hops_v6(255)?;
    socket.set_unicast_hops_v6(255)?;
    socket.set_multicast_if_v6(ifindex)?;
    // Sent from the address itself, which was added without DAD and so is usable at once.
    socket.bind(&SockAddr::from(SocketAddrV6::new(ip, 0, 0, 0)))?;
    let all_nodes = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, ifindex);
    socket.send_to(&neighbour_advertisement(ip, mac), &SockAddr::from(all_nodes))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_layout() {
        let target: Ipv6Addr = "2001:db8::100".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let p = neighbour_advertisement(target, [2, 0, 0, 0, 0, 9]);
        assert_eq!(p[0], 136);
        assert_eq!(p[4] & 0xe0, 0x20, "override only");
        assert_eq!(&p[8..24], &target.octets());
        assert_eq!(&p[24..], &[2, 1, 2, 0, 0, 0, 0, 9]);
    }
}
