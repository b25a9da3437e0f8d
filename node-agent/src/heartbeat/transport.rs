//! UDP sockets carrying heartbeat envelopes: one socket per link, bound to this node's
//! address on that link, sending to the peer's address on the same link.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hapair_crds::hagroup::HaGroupSpec;
use hapair_crds::nodeapi::{GroupKey, HeartbeatLinkReport};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::envelope::{self, GroupId, Header, NodeId};
use super::key::HmacKey;
use super::loss::LinkLoss;
use super::verify::{DropCounts, Expectation, Verifier};

/// One heartbeat link as seen from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkEndpoints {
    pub index: u8,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Why the transport could not be set up or stopped working.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("node {0:?} is not a node of the group")]
    NotAMember(String),
    #[error("the group has no second node to send heartbeats to")]
    NoPeer,
    #[error("{node}: heartbeat address {index} ({address:?}) is not an IP address")]
    BadAddress { node: String, index: usize, address: String },
    #[error("{0} heartbeat links configured; at most 255 are supported")]
    TooManyLinks(usize),
    #[error("link {index}: binding {local}: {source}")]
    Bind { index: u8, local: SocketAddr, source: std::io::Error },
    #[error("every heartbeat socket has stopped")]
    Closed,
}

/// The group's heartbeat links for `local_node`, from the nodes' addresses and the port.
pub fn link_endpoints(spec: &HaGroupSpec, local_node: &str) -> Result<(String, Vec<LinkEndpoints>), TransportError> {
    let me = spec
        .nodes
        .iter()
        .find(|n| n.name == local_node)
        .ok_or_else(|| TransportError::NotAMember(local_node.into()))?;
    let peer = spec.nodes.iter().find(|n| n.name != local_node).ok_or(TransportError::NoPeer)?;
    let parse = |node: &str, index: usize, address: &str| {
        address.parse::<IpAddr>().map_err(|_| TransportError::BadAddress {
            node: node.to_string(),
            index,
            address: address.to_string(),
        })
    };
    let mut links = Vec::new();
    for (i, (mine, theirs)) in me.heartbeat_addresses.iter().zip(&peer.heartbeat_addresses).enumerate() {
        let index = u8::try_from(i).map_err(|_| TransportError::TooManyLinks(me.heartbeat_addresses.len()))?;
        links.push(LinkEndpoints {
            index,
            local: SocketAddr::new(parse(&me.name, i, mine)?, spec.heartbeat.port),
            peer: SocketAddr::new(parse(&peer.name, i, theirs)?, spec.heartbeat.port),
        });
    }
    Ok((peer.name.clone(), links))
}

/// A start-up incarnation strictly larger than the previous one, even if the wall clock
/// went backwards across the restart.
pub fn next_incarnation(previous: Option<u64>, now_unix_micros: u64) -> u64 {
    match previous {
        Some(p) => now_unix_micros.max(p.saturating_add(1)),
        None => now_unix_micros.max(1),
    }
}

/// Who is talking and how.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub group: GroupKey,
    pub local_node: String,
    pub peer_node: String,
    pub incarnation: u64,
    /// The group's heartbeat interval, which is also the peer's: loss is measured against it.
    pub interval: Duration,
    /// Window over which loss is reported.
    pub loss_window: Duration,
    pub key: HmacKey,
}

/// Binds one UDP socket per link.
pub async fn bind(
    config: TransportConfig,
    links: &[LinkEndpoints],
) -> Result<(HeartbeatSender, HeartbeatReceiver), TransportError> {
    let mut sockets = Vec::with_capacity(links.len());
    for link in links {
        let socket = UdpSocket::bind(link.local).await.map_err(|source| TransportError::Bind {
            index: link.index,
            local: link.local,
            source,
        })?;
        sockets.push((*link, socket));
    }
    Ok(from_sockets(config, sockets))
}

/// Uses sockets bound elsewhere, e.g. inside another network namespace. Must be called
/// within a tokio runtime: each link gets a reader task there.
pub fn from_sockets(
    config: TransportConfig,
    sockets: Vec<(LinkEndpoints, UdpSocket)>,
) -> (HeartbeatSender, HeartbeatReceiver) {
    let now = Instant::now();
    let (tx, rx) = mpsc::channel(1024);
    let mut tasks = JoinSet::new();
    let mut send_links = Vec::new();
    let mut recv_links = Vec::new();
    for (link, socket) in sockets {
        let socket = Arc::new(socket);
        tasks.spawn(read_link(link.index, Arc::clone(&socket), tx.clone()));
        send_links.push(SenderLink { endpoints: link, socket, sequence: AtomicU64::new(0) });
        recv_links
            .push(ReceiverLink { endpoints: link, loss: LinkLoss::new(config.interval, config.loss_window, now) });
    }
    let expect = Expectation {
        group: GroupId::of(&config.group),
        peer: NodeId::of(&config.peer_node),
        peer_addresses: recv_links.iter().map(|l| l.endpoints.peer.ip()).collect(),
    };
    let sender = HeartbeatSender {
        group: GroupId::of(&config.group),
        me: NodeId::of(&config.local_node),
        incarnation: config.incarnation,
        key: config.key.clone(),
        links: send_links,
    };
    let receiver =
        HeartbeatReceiver { verifier: Verifier::new(expect, config.key), links: recv_links, rx, _tasks: tasks };
    (sender, receiver)
}

struct Datagram {
    link: u8,
    from: SocketAddr,
    bytes: Vec<u8>,
    at: Instant,
}

async fn read_link(link: u8, socket: Arc<UdpSocket>, tx: mpsc::Sender<Datagram>) {
    let mut buf = vec![0u8; 2048];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let datagram = Datagram { link, from, bytes: buf[..n].to_vec(), at: Instant::now() };
                if tx.send(datagram).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(link, error = %e, "heartbeat receive error");
                // Errors such as ICMP-reported refusals are transient; avoid a busy loop.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[derive(Debug)]
struct SenderLink {
    endpoints: LinkEndpoints,
    socket: Arc<UdpSocket>,
    sequence: AtomicU64,
}

/// Sends the engine's heartbeat payload on every link.
#[derive(Debug)]
pub struct HeartbeatSender {
    group: GroupId,
    me: NodeId,
    incarnation: u64,
    key: HmacKey,
    links: Vec<SenderLink>,
}

/// Links a heartbeat could not be sent on. Sending on the other links went ahead.
#[derive(Debug, Default)]
pub struct SendFailures(pub Vec<(u8, std::io::Error)>);

impl SendFailures {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl HeartbeatSender {
    /// Seals `payload` for `epoch` and sends it on every link.
    pub async fn send(&self, epoch: u64, payload: &[u8]) -> Result<SendFailures, envelope::PayloadTooLarge> {
        let mut failures = SendFailures::default();
        for link in &self.links {
            let header = Header {
                link: link.endpoints.index,
                group: self.group,
                sender: self.me,
                incarnation: self.incarnation,
                sequence: link.sequence.fetch_add(1, Ordering::Relaxed) + 1,
                epoch,
            };
            let datagram = envelope::seal(&self.key, &header, payload)?;
            if let Err(e) = link.socket.send_to(&datagram, link.endpoints.peer).await {
                failures.0.push((link.endpoints.index, e));
            }
        }
        Ok(failures)
    }

    pub fn set_key(&mut self, key: HmacKey) {
        self.key = key;
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
}

#[derive(Debug)]
struct ReceiverLink {
    endpoints: LinkEndpoints,
    loss: LinkLoss,
}

/// A heartbeat that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub header: Header,
    pub payload: Vec<u8>,
    pub received_at: Instant,
}

/// Receives, verifies and accounts heartbeats from all links.
#[derive(Debug)]
pub struct HeartbeatReceiver {
    verifier: Verifier,
    links: Vec<ReceiverLink>,
    rx: mpsc::Receiver<Datagram>,
    /// Reader tasks; dropping the receiver stops them.
    _tasks: JoinSet<()>,
}

impl HeartbeatReceiver {
    /// The next accepted heartbeat with an epoch of at least `min_epoch`. Everything else
    /// is dropped and counted on the way.
    pub async fn recv(&mut self, min_epoch: u64) -> Result<Heartbeat, TransportError> {
        loop {
            let datagram = self.rx.recv().await.ok_or(TransportError::Closed)?;
            match self.verifier.verify(&datagram.bytes, datagram.link, datagram.from.ip(), min_epoch) {
                Ok(accepted) => {
                    let header = accepted.header;
                    let payload = accepted.payload.to_vec();
                    if let Some(link) = self.links.iter_mut().find(|l| l.endpoints.index == datagram.link) {
                        link.loss.on_receive(datagram.at);
                    }
                    return Ok(Heartbeat { header, payload, received_at: datagram.at });
                }
                Err(reason) => {
                    tracing::debug!(link = datagram.link, from = %datagram.from, reason = reason.label(), "heartbeat dropped");
                }
            }
        }
    }

    pub fn drops(&self) -> DropCounts {
        self.verifier.drops()
    }

    /// Per-link state at `now`: up while a heartbeat arrived within `dead_after`.
    pub fn link_reports(&self, now: Instant, dead_after: Duration) -> Vec<HeartbeatLinkReport> {
        self.links
            .iter()
            .map(|l| HeartbeatLinkReport {
                index: u32::from(l.endpoints.index),
                local_address: l.endpoints.local.to_string(),
                peer_address: l.endpoints.peer.to_string(),
                up: l.loss.is_up(now, dead_after),
                loss_percent: l.loss.loss_percent(now),
            })
            .collect()
    }

    /// When each link last delivered an accepted heartbeat, by link index.
    pub fn last_received(&self) -> Vec<(u8, Option<Instant>)> {
        self.links.iter().map(|l| (l.endpoints.index, l.loss.last_received())).collect()
    }

    pub fn set_key(&mut self, key: HmacKey) {
        self.verifier.set_key(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HaGroupSpec {
        serde_json::from_value(serde_json::json!({
            "nodes": [
                {"name": "a", "heartbeatAddresses": ["198.18.0.1", "198.18.1.1"]},
                {"name": "b", "heartbeatAddresses": ["198.18.0.2", "198.18.1.2"]}
            ],
            "heartbeat": {"port": 7000}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn endpoints_pair_the_nth_addresses() {
        let (peer, links) = link_endpoints(&spec(), "b").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(peer, "a");
        assert_eq!(links.len(), 2);
        assert_eq!(links[1].local.to_string(), "198.18.1.2:7000");
        assert_eq!(links[1].peer.to_string(), "198.18.1.1:7000");
        assert!(matches!(link_endpoints(&spec(), "z"), Err(TransportError::NotAMember(_))));
    }

    #[test]
    fn incarnations_only_grow() {
        assert_eq!(next_incarnation(None, 1000), 1000);
        assert_eq!(next_incarnation(Some(5000), 1000), 5001, "clock went backwards");
        assert_eq!(next_incarnation(Some(5000), 9000), 9000);
    }

    #[tokio::test]
    async fn two_transports_exchange_heartbeats_over_loopback() {
        let key = HmacKey::from_bytes(vec![9; 32], "test").unwrap_or_else(|e| panic!("{e}"));
        let sa = UdpSocket::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let sb = UdpSocket::bind("127.0.0.2:0").await.unwrap_or_else(|e| panic!("{e}"));
        let (la, lb) =
            (sa.local_addr().unwrap_or_else(|e| panic!("{e}")), sb.local_addr().unwrap_or_else(|e| panic!("{e}")));
        let config = |me: &str, peer: &str| TransportConfig {
            group: GroupKey::new("db", "pg"),
            local_node: me.into(),
            peer_node: peer.into(),
            incarnation: 1,
            interval: Duration::from_millis(100),
            loss_window: Duration::from_secs(1),
            key: key.clone(),
        };
        let (a_tx, _a_rx) = from_sockets(config("a", "b"), vec![(LinkEndpoints { index: 0, local: la, peer: lb }, sa)]);
        let (_b_tx, mut b_rx) =
            from_sockets(config("b", "a"), vec![(LinkEndpoints { index: 0, local: lb, peer: la }, sb)]);
        let failures = a_tx.send(3, b"state").await.unwrap_or_else(|e| panic!("{e}"));
        assert!(failures.is_empty());
        let hb = tokio::time::timeout(Duration::from_secs(5), b_rx.recv(0))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((hb.header.epoch, hb.header.sequence, hb.payload.as_slice()), (3, 1, &b"state"[..]));
        let reports = b_rx.link_reports(Instant::now(), Duration::from_secs(1));
        assert!(reports[0].up);
    }
}
