//! Virtual IPs: adding and removing the group's addresses with rtnetlink, and announcing a
//! takeover to the neighbours.
//!
//! Addresses the agent adds carry its `IFA_PROTO` mark ([`PROTOCOL`]), so even after an
//! agent restart it can tell its own addresses from identical ones someone else configured.
//! Such a foreign address is reported and left alone: never taken over, never deleted.

pub mod announce;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use hapair_crds::hagroup::{GarpSpec, NodeSpec, VirtualIpSpec};
use ipnet::IpNet;
use tokio::task::JoinHandle;

use crate::iface::{IfaceError, Netlink};

/// `IFA_PROTO` value marking addresses added by hapair (the kernel uses 0–3).
pub const PROTOCOL: u8 = 0x68;

/// Why a virtual IP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("virtual IP {name}: address {address:?} is not a CIDR address")]
    BadAddress { name: String, address: String },
    #[error("virtual IP {name}: {source}")]
    Interface { name: String, source: IfaceError },
    #[error("virtual IP {name}: announcing {address} on {device}: {source}")]
    Announce { name: String, address: IpAddr, device: String, source: std::io::Error },
    #[error("virtual IP {name}: interface {device} has no MAC address to announce")]
    NoMac { name: String, device: String },
}

/// A virtual IP resolved for this node: the real device name and the parsed address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedVip {
    pub name: String,
    pub address: IpAddr,
    pub prefix_len: u8,
    pub device: String,
    pub garp: GarpSpec,
}

impl std::fmt::Display for ResolvedVip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}/{} on {})", self.name, self.address, self.prefix_len, self.device)
    }
}

/// Applies the node's interface overrides (`NodeSpec.interfaces`) to a group virtual IP.
pub fn resolve(spec: &VirtualIpSpec, node: &NodeSpec) -> Result<ResolvedVip, VipError> {
    let net: IpNet = spec
        .address
        .parse()
        .map_err(|_| VipError::BadAddress { name: spec.name.clone(), address: spec.address.clone() })?;
    let device = node.interfaces.get(&spec.interface).cloned().unwrap_or_else(|| spec.interface.clone());
    Ok(ResolvedVip {
        name: spec.name.clone(),
        address: net.addr(),
        prefix_len: net.prefix_len(),
        device,
        garp: spec.garp.clone(),
    })
}

/// What adding a virtual IP found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    Added,
    /// Already there, added by hapair (this run or a previous one).
    AlreadyOurs,
    /// Already there from another source: reported, left alone, not announced.
    Foreign,
}

/// What removing a virtual IP found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoveOutcome {
    Removed,
    /// Not on the interface (already removed, or never added).
    Absent,
    /// Present but not ours: left in place.
    Foreign,
}

/// Whether a virtual IP is on its interface, and whose it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    Absent,
    Ours,
    Foreign,
}

/// Adds, removes and announces virtual IPs in the network namespace it was created in.
#[derive(Debug)]
pub struct VipManager {
    netlink: Netlink,
    /// (interface index, address) pairs added by this process: removal needs no lookup.
    ours: Mutex<BTreeSet<(u32, IpAddr)>>,
    refreshers: Mutex<BTreeMap<String, JoinHandle<()>>>,
}

impl Drop for VipManager {
    fn drop(&mut self) {
        if let Ok(mut r) = self.refreshers.lock() {
            for (_, task) in std::mem::take(&mut *r) {
                task.abort();
            }
        }
    }
}

impl VipManager {
    /// Opens a netlink connection in the calling thread's network namespace.
    pub fn new() -> Result<Self, IfaceError> {
        Ok(VipManager {
            netlink: Netlink::connect()?,
            ours: Mutex::new(BTreeSet::new()),
            refreshers: Mutex::new(BTreeMap::new()),
        })
    }

    fn err(vip: &ResolvedVip) -> impl FnOnce(IfaceError) -> VipError + '_ {
        move |source| VipError::Interface { name: vip.name.clone(), source }
    }

    /// Whether the address is on its interface, and whose it is.
    pub async fn presence(&self, vip: &ResolvedVip) -> Result<Presence, VipError> {
        let iface = self.netlink.interface(&vip.device).await.map_err(Self::err(vip))?;
        let found = self.netlink.addresses(iface.index).await.map_err(Self::err(vip))?;
        Ok(match found.iter().find(|a| a.address == vip.address) {
            None => Presence::Absent,
            Some(a) if a.protocol == PROTOCOL => Presence::Ours,
            Some(_) => Presence::Foreign,
        })
    }

    /// Adds the address (IPv6 without DAD). Does not announce.
    pub async fn add(&self, vip: &ResolvedVip) -> Result<AddOutcome, VipError> {
        let iface = self.netlink.interface(&vip.device).await.map_err(Self::err(vip))?;
        let found = self.netlink.addresses(iface.index).await.map_err(Self::err(vip))?;
        if let Some(existing) = found.iter().find(|a| a.address == vip.address) {
            if existing.protocol == PROTOCOL {
                self.remember(iface.index, vip.address);
                return Ok(AddOutcome::AlreadyOurs);
            }
            tracing::warn!(vip = %vip, "address already present from another source; leaving it alone");
            return Ok(AddOutcome::Foreign);
        }
        let added = self
            .netlink
            .add_address(iface.index, vip.address, vip.prefix_len, PROTOCOL)
            .await
            .map_err(Self::err(vip))?;
        if !added {
            // Someone added it between the listing and our request: look again at whose it is.
            return match self.presence(vip).await? {
                Presence::Ours => {
                    self.remember(iface.index, vip.address);
                    Ok(AddOutcome::AlreadyOurs)
                }
                _ => Ok(AddOutcome::Foreign),
            };
        }
        self.remember(iface.index, vip.address);
        tracing::info!(vip = %vip, "virtual IP added");
        Ok(AddOutcome::Added)
    }

    fn remember(&self, index: u32, address: IpAddr) {
        if let Ok(mut ours) = self.ours.lock() {
            ours.insert((index, address));
        }
    }

    /// Takeover: add the address, announce it `garp.count` times `garp.interval` apart,
    /// then keep re-announcing every `garp.refresh` (when set) until removed.
    pub async fn take_over(&self, vip: &ResolvedVip) -> Result<AddOutcome, VipError> {
        let outcome = self.add(vip).await?;
        if outcome == AddOutcome::Foreign {
            return Ok(outcome);
        }
        let iface = self.netlink.interface(&vip.device).await.map_err(Self::err(vip))?;
        let mac = iface.mac.ok_or_else(|| VipError::NoMac { name: vip.name.clone(), device: vip.device.clone() })?;
        let announce_err = |source| VipError::Announce {
            name: vip.name.clone(),
            address: vip.address,
            device: vip.device.clone(),
            source,
        };
        let count = vip.garp.count.max(1);
        for i in 0..count {
            if i > 0 {
                tokio::time::sleep(vip.garp.interval.as_std()).await;
            }
            announce::announce_once(iface.index, mac, vip.address).await.map_err(announce_err)?;
        }
        if !vip.garp.refresh.is_zero() {
            self.start_refresh(vip, iface.index, mac, vip.garp.refresh.as_std());
        }
        Ok(outcome)
    }

    fn start_refresh(&self, vip: &ResolvedVip, index: u32, mac: [u8; 6], every: Duration) {
        let (address, name) = (vip.address, vip.name.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = announce::announce_once(index, mac, address).await {
                    tracing::warn!(vip = %name, error = %e, "periodic announcement failed");
                }
            }
        });
        if let Ok(mut r) = self.refreshers.lock()
            && let Some(previous) = r.insert(vip.name.clone(), task)
        {
            previous.abort();
        }
    }

    /// Stops announcing and removes the address if it is ours. The first thing a demotion
    /// does, so an address this process added is deleted without any lookup first.
    pub async fn remove(&self, vip: &ResolvedVip) -> Result<RemoveOutcome, VipError> {
        if let Ok(mut r) = self.refreshers.lock()
            && let Some(task) = r.remove(&vip.name)
        {
            task.abort();
        }
        let known = self.ours.lock().ok().and_then(|ours| ours.iter().find(|(_, a)| *a == vip.address).copied());
        let index = match known {
            Some((index, _)) => index,
            None => match self.presence(vip).await? {
                Presence::Absent => return Ok(RemoveOutcome::Absent),
                Presence::Foreign => return Ok(RemoveOutcome::Foreign),
                Presence::Ours => self.netlink.interface(&vip.device).await.map_err(Self::err(vip))?.index,
            },
        };
        let removed = self.netlink.delete_address(index, vip.address, vip.prefix_len).await.map_err(Self::err(vip))?;
        if let Ok(mut ours) = self.ours.lock() {
            ours.remove(&(index, vip.address));
        }
        tracing::info!(vip = %vip, removed, "virtual IP removed");
        Ok(if removed { RemoveOutcome::Removed } else { RemoveOutcome::Absent })
    }

    /// Whether a periodic re-announcement is running for `name`.
    pub fn refreshing(&self, name: &str) -> bool {
        self.refreshers.lock().map(|r| r.get(name).is_some_and(|t| !t.is_finished())).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_applies_the_node_interface_override() {
        let spec: VirtualIpSpec = serde_json::from_value(serde_json::json!({
            "name": "web", "address": "2001:db8::100/64", "interface": "public"
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut node: NodeSpec = serde_json::from_value(serde_json::json!({
            "name": "a", "heartbeatAddresses": ["198.18.0.1"]
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resolve(&spec, &node).map(|v| v.device).ok().as_deref(), Some("public"));
        node.interfaces.insert("public".into(), "ens3".into());
        let vip = resolve(&spec, &node).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((vip.device.as_str(), vip.prefix_len), ("ens3", 64));
        assert_eq!(vip.to_string(), "web (2001:db8::100/64 on ens3)");
        let mut bad = spec.clone();
        bad.address = "nope".into();
        assert!(matches!(resolve(&bad, &node), Err(VipError::BadAddress { .. })));
    }
}
