//! Ready-made test networks built from [`crate::netns`] guards.

use std::net::IpAddr;

use crate::netns::{Address, Bridge, Netns, Result, Veth, unique_name};

/// Two servers (`a`, `b`) with two links each and a client (`c`), all in their own
/// namespaces, cabled through bridges in a fourth ("switch") namespace:
///
/// ```text
///   a:eth0 ─┐                       ┌─ a:eth1
///   b:eth0 ─┼─ br0 (link 0, LAN)    ├─ br1 (link 1, heartbeat only) ─ b:eth1
///   c:eth0 ─┘                       │
/// ```
///
/// Link 0 is 198.18.0.0/24 and 2001:db8::/64 (a = .1/::1, b = .2/::2, c = .10/::10);
/// link 1 is 198.18.1.0/24 and 2001:db8:1::/64 (a = .1, b = .2). Inside the server and
/// client namespaces the devices are simply `eth0`/`eth1`: the namespaces are private, so
/// only namespace names need to be unique.
#[derive(Debug)]
pub struct TwoServersAndClient {
    // Drop order: addresses, links, bridges, then namespaces.
    _addresses: Vec<Address>,
    _veths: Vec<Veth>,
    _bridges: Vec<Bridge>,
    pub a: Netns,
    pub b: Netns,
    pub client: Netns,
    pub switch: Netns,
    /// Hosts added on link 0 with [`TwoServersAndClient::add_host`].
    pub extra: Vec<Netns>,
}

/// Link 0 address of a host, IPv4.
pub const A0: &str = "198.18.0.1";
pub const B0: &str = "198.18.0.2";
pub const C0: &str = "198.18.0.10";
pub const A1: &str = "198.18.1.1";
pub const B1: &str = "198.18.1.2";
pub const A0_V6: &str = "2001:db8::1";
pub const B0_V6: &str = "2001:db8::2";
pub const C0_V6: &str = "2001:db8::10";

impl TwoServersAndClient {
    pub fn build() -> Result<Self> {
        let switch = Netns::new("sw")?;
        let a = Netns::new("a")?;
        let b = Netns::new("b")?;
        let client = Netns::new("c")?;
        let bridges = vec![Bridge::new(&switch, "br0")?, Bridge::new(&switch, "br1")?];
        let mut veths = Vec::new();
        for (host, port) in [(&a, "a0"), (&b, "b0"), (&client, "c0")] {
            veths.push(Veth::new(host, "eth0", &switch, port)?);
            bridges[0].attach(port)?;
        }
        for (host, port) in [(&a, "a1"), (&b, "b1")] {
            veths.push(Veth::new(host, "eth1", &switch, port)?);
            bridges[1].attach(port)?;
        }
        let mut addresses = Vec::new();
        for (host, v4, v6) in [(&a, A0, A0_V6), (&b, B0, B0_V6), (&client, C0, C0_V6)] {
            addresses.push(Address::new(host, "eth0", &format!("{v4}/24"))?);
            addresses.push(Address::new(host, "eth0", &format!("{v6}/64"))?);
        }
        addresses.push(Address::new(&a, "eth1", &format!("{A1}/24"))?);
        addresses.push(Address::new(&b, "eth1", &format!("{B1}/24"))?);
        Ok(TwoServersAndClient {
            _addresses: addresses,
            _veths: veths,
            _bridges: bridges,
            a,
            b,
            client,
            switch,
            extra: Vec::new(),
        })
    }

    /// One more host on link 0 (its `eth0`) at `v4` (a 198.18.0.0/24 address), e.g. a
    /// controller or an etcd member; returns its index in [`Self::extra`].
    pub fn add_host(&mut self, tag: &str, v4: &str) -> Result<usize> {
        let host = Netns::new(tag)?;
        let port = unique_name("x");
        self._veths.push(Veth::new(&host, "eth0", &self.switch, &port)?);
        self._bridges[0].attach(&port)?;
        self._addresses.push(Address::new(&host, "eth0", &format!("{v4}/24"))?);
        host.ip(&["link", "set", "lo", "up"])?;
        self.extra.push(host);
        Ok(self.extra.len() - 1)
    }

    /// The namespace names, for checking cleanup.
    pub fn namespace_names(&self) -> Vec<String> {
        [&self.a, &self.b, &self.client, &self.switch]
            .into_iter()
            .chain(&self.extra)
            .map(|n| n.name().to_string())
            .collect()
    }
}

/// Two hosts joined by one link: `a` at 198.18.0.1/24, `b` at 198.18.0.2/24. The volume
/// tests cut and heal the link to disconnect the replicas.
#[derive(Debug)]
pub struct Pair {
    // Declared before the namespaces so it is deleted first.
    _veth: Veth,
    dev_a: String,
    dev_b: String,
    pub a: Netns,
    pub b: Netns,
    pub addr_a: IpAddr,
    pub addr_b: IpAddr,
}

impl Pair {
    pub fn new() -> Result<Pair> {
        let a = Netns::new("pa")?;
        let b = Netns::new("pb")?;
        let (dev_a, dev_b) = (unique_name("va"), unique_name("vb"));
        let veth = Veth::new(&a, &dev_a, &b, &dev_b)?;
        a.ip(&["addr", "add", "198.18.0.1/24", "dev", &dev_a])?;
        b.ip(&["addr", "add", "198.18.0.2/24", "dev", &dev_b])?;
        let addr_a = IpAddr::from([198, 18, 0, 1]);
        let addr_b = IpAddr::from([198, 18, 0, 2]);
        Ok(Pair { _veth: veth, dev_a, dev_b, a, b, addr_a, addr_b })
    }

    /// Takes the link down on both ends: packets stop, connections hang (no reset).
    pub fn cut(&self) -> Result<()> {
        self.a.ip(&["link", "set", &self.dev_a, "down"])?;
        self.b.ip(&["link", "set", &self.dev_b, "down"]).map(|_| ())
    }

    pub fn heal(&self) -> Result<()> {
        self.a.ip(&["link", "set", &self.dev_a, "up"])?;
        self.b.ip(&["link", "set", &self.dev_b, "up"]).map(|_| ())
    }
}
