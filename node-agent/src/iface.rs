//! Network interfaces and their addresses, read and changed over rtnetlink.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, State};
use rtnetlink::Handle;

/// Why an interface operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("opening a netlink socket: {0}")]
    Open(std::io::Error),
    #[error("interface {0:?} does not exist")]
    NotFound(String),
    #[error("interface {device}: {message}")]
    Netlink { device: String, message: String },
}

/// An interface as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// RFC 2863 operational state as the kernel names it (`UP`, `DOWN`, `LOWERLAYERDOWN`, …).
    pub oper_state: String,
    /// Operationally up: `UP`, or `UNKNOWN` (virtual devices without carrier reporting)
    /// with the administrative and lower-layer flags up.
    pub running: bool,
}

/// One address on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub address: IpAddr,
    pub prefix_len: u8,
    /// `IFA_PROTO`: who added the address (0 when unspecified, as `ip addr add` does).
    pub protocol: u8,
}

/// A route netlink connection (its driver task runs on the current tokio runtime). The
/// socket belongs to the network namespace of the thread that created it.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    pub fn connect() -> Result<Self, IfaceError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(IfaceError::Open)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Looks an interface up by name.
    pub async fn interface(&self, name: &str) -> Result<Interface, IfaceError> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        let message = match links.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(IfaceError::NotFound(name.to_string())),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Err(IfaceError::NotFound(name.to_string()));
            }
            Err(e) => return Err(IfaceError::Netlink { device: name.to_string(), message: e.to_string() }),
        };
        let mut mac = None;
        let mut state = State::Unknown;
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(bytes);
                    mac = Some(m);
                }
                LinkAttribute::OperState(s) => state = *s,
                _ => {}
            }
        }
        let flags = message.header.flags;
        let running = match state {
            State::Up => true,
            State::Unknown => flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
            _ => false,
        };
        Ok(Interface {
            index: message.header.index,
            name: name.to_string(),
            mac,
            oper_state: state.to_string(),
            running,
        })
    }

    /// Every address on the interface with index `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<InterfaceAddress>, IfaceError> {
        let mut stream = self.handle.address().get().set_link_index_filter(index).execute();
        let mut out = Vec::new();
        loop {
            match stream.try_next().await {
                Ok(Some(message)) => out.extend(describe(&message)),
                Ok(None) => return Ok(out),
                Err(e) => return Err(IfaceError::Netlink { device: format!("index {index}"), message: e.to_string() }),
            }
        }
    }

    /// Adds an address marked with `protocol`; IPv6 addresses skip duplicate address
    /// detection so they are usable at once. Returns `false` when it already existed.
    pub async fn add_address(
        &self,
        index: u32,
        address: IpAddr,
        prefix_len: u8,
        protocol: u8,
    ) -> Result<bool, IfaceError> {
        let mut request = self.handle.address().add(index, address, prefix_len);
        let message = request.message_mut();
        message.attributes.push(AddressAttribute::Protocol(AddressProtocol::from(protocol)));
        if address.is_ipv6() {
            message.header.flags |= AddressHeaderFlags::Nodad;
            message.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(false),
            Err(e) => Err(IfaceError::Netlink { device: format!("index {index}"), message: e.to_string() }),
        }
    }

    /// Deletes an address without listing first. Returns `false` when it was not there.
    pub async fn delete_address(&self, index: u32, address: IpAddr, prefix_len: u8) -> Result<bool, IfaceError> {
        let message = match address {
            IpAddr::V4(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv4Addr>::new()
                .index(index)
                .address(a, prefix_len)
                .build(),
            IpAddr::V6(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                .index(index)
                .address(a, prefix_len)
                .build(),
        };
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::EADDRNOTAVAIL
                    || e.raw_code() == -libc::ENOENT
                    || e.raw_code() == -libc::ESRCH =>
            {
                Ok(false)
            }
            Err(e) => Err(IfaceError::Netlink { device: format!("index {index}"), message: e.to_string() }),
        }
    }
}

fn describe(message: &AddressMessage) -> Option<InterfaceAddress> {
    let mut address = None;
    let mut local = None;
    let mut protocol = 0;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Protocol(p) => protocol = u8::from(*p),
            _ => {}
        }
    }
    // For point-to-point IPv4 addresses IFA_ADDRESS is the peer; IFA_LOCAL is ours.
    local.or(address).map(|address| InterfaceAddress { address, prefix_len: message.header.prefix_len, protocol })
}
