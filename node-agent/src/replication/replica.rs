//! A running replica: one node's side of a ReplicatedVolume.
//!
//! [`Replica::open`] loads (or creates) the backing and its metadata, starts the disk
//! worker, the replication link (listening or dialing the peer, optionally over TLS), the
//! NBD export, and the core task that feeds everything through the sans-IO
//! [`Machine`](super::machine::Machine) and executes its outputs. The handle is what the
//! agent's `volume` flow step and the engine use:
//!
//! - [`Replica::promote`] / [`Replica::demote`]: role changes, refused unless safe;
//! - [`Replica::status`], [`Replica::watch`], [`Replica::events`]: disk state, connection,
//!   out-of-sync bytes, sync progress (convertible with [`ReplicaStatus::report`]);
//! - [`Replica::observe_epoch`]: the engine's current epoch (a primary learning of a newer
//!   one fences itself);
//! - [`Replica::start_verify`], [`Replica::resolve_split_brain`];
//! - [`Replica::nbd_socket`]: where to attach while primary.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hapair_crds::nodeapi::{VolumeConfig, VolumeReport};
use hapair_crds::quantity::parse_bytes;
use hapair_crds::volume::{BackingSpec, ReplicatedVolumeSpec, ReplicationProtocol, SplitBrainPolicy, VolumeRole};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, error, info, warn};

use super::disk::{Completion, DiskWorker};
use super::geometry::EXTENT_SIZE;
use super::link::{self, BoxStream, DialState, LinkEvent, LinkHandle, WireCounters};
use super::machine::{ConnId, ErrorCode, Input, Machine, MachineConfig, Output, Refusal, ReplicaEvent, ReqId};
use super::metadata::Layout;
use super::observer::{IoKind, IoObserver};
use super::resync::ResyncLimits;
use super::status::ReplicaStatus;
use super::store::{self, BackingFiles, BackingPlan, MetaLocation, MetadataError};
use super::tls::{self, LinkTls, TlsError, TlsMaterial};
use super::wire::{Resolution, WirePolicy, WireProtocol};
use crate::nbd::export::{BlockExport, ExportError};
use crate::nbd::proto::Errno;
use crate::nbd::server::{NbdServer, ServeError};

/// Timers of the replication link and metadata housekeeping.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub tick: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub handshake_timeout: Duration,
    pub bitmap_flush: Duration,
    pub connect_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            tick: Duration::from_millis(10),
            ping_interval: Duration::from_millis(500),
            ping_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            bitmap_flush: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// How to run a replica beyond what the volume spec says.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Unix socket of the NBD export.
    pub nbd_socket: PathBuf,
    /// Optional loopback TCP address of the NBD export.
    pub nbd_tcp: Option<SocketAddr>,
    /// Replication listen address; defaults to this node's `backing.address` and `port`.
    pub listen: Option<SocketAddr>,
    /// The peer's replication address; defaults to its `backing.address` and `port`.
    pub peer: Option<SocketAddr>,
    /// Whether this node dials (the other listens); defaults to the node whose name sorts
    /// first.
    pub dial: Option<bool>,
    /// Required when the spec enables TLS.
    pub tls: Option<TlsMaterial>,
    pub create_missing: bool,
    pub initialize_blank: bool,
    pub timing: Timing,
    /// Seed for generation identifiers; random when absent.
    pub seed: Option<u64>,
    /// Told of every request to the export (the agent's metrics).
    pub observer: Option<Arc<dyn IoObserver>>,
}

impl ReplicaOptions {
    pub fn new(nbd_socket: impl Into<PathBuf>) -> Self {
        ReplicaOptions {
            nbd_socket: nbd_socket.into(),
            nbd_tcp: None,
            listen: None,
            peer: None,
            dial: None,
            tls: None,
            create_missing: true,
            initialize_blank: true,
            timing: Timing::default(),
            seed: None,
            observer: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("volume {volume}: node {node:?} has no entry in spec.backing")]
    NotAMember { volume: String, node: String },
    #[error("volume {volume}: {field}: {reason}")]
    Spec { volume: String, field: &'static str, reason: String },
    #[error("volume {volume}: no replication address for node {node}: set spec.backing[].address or pass one")]
    NoAddress { volume: String, node: String },
    #[error("volume {volume}: {source}")]
    Metadata {
        volume: String,
        #[source]
        source: MetadataError,
    },
    #[error("volume {volume}: TLS: {source}")]
    Tls {
        volume: String,
        #[source]
        source: TlsError,
    },
    #[error("volume {volume}: replication listen address {addr}: {source}")]
    Listen {
        volume: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: {source}")]
    Nbd {
        volume: String,
        #[source]
        source: ServeError,
    },
    #[error("volume {volume}: {message}")]
    Refused { volume: String, code: ErrorCode, message: String },
    #[error("volume {volume}: the replica has stopped")]
    Stopped { volume: String },
    #[error("volume {volume}: {message}")]
    Io { volume: String, message: String },
}

enum Cmd {
    Request { make: Box<dyn FnOnce(ReqId) -> Input + Send>, reply: oneshot::Sender<Result<(), Refusal>> },
    ObserveEpoch(u64),
    LeaseLost(String),
    Stop(oneshot::Sender<()>),
}

struct Shared {
    volume: String,
    node: String,
    size: u64,
    /// Cleared at shutdown so the backing (and its lock) is released.
    files: std::sync::RwLock<Option<Arc<BackingFiles>>>,
    cmd: mpsc::Sender<Cmd>,
    status: watch::Receiver<ReplicaStatus>,
    events: broadcast::Sender<ReplicaEvent>,
    writable: AtomicBool,
    readable: AtomicBool,
    nbd_clients: AtomicUsize,
    nbd_socket: PathBuf,
    observer: Option<Arc<dyn IoObserver>>,
}

impl Shared {
    async fn request(&self, make: impl FnOnce(ReqId) -> Input + Send + 'static) -> Result<(), Refusal> {
        let (reply, rx) = oneshot::channel();
        let stopped = || Refusal { code: ErrorCode::Io, message: "the replica has stopped".into() };
        self.cmd.send(Cmd::Request { make: Box::new(make), reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

struct Tasks {
    core: Option<JoinHandle<()>>,
    transport: Vec<JoinHandle<()>>,
    nbd: Option<NbdServer>,
}

/// A handle to a running replica; cheap to clone.
#[derive(Clone)]
pub struct Replica {
    shared: Arc<Shared>,
    tasks: Arc<std::sync::Mutex<Tasks>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("volume", &self.shared.volume).field("node", &self.shared.node).finish()
    }
}

fn spec_err(volume: &str, field: &'static str, reason: impl Into<String>) -> ReplicaError {
    ReplicaError::Spec { volume: volume.to_string(), field, reason: reason.into() }
}

fn address(volume: &str, node: &str, addr: Option<&String>, port: u16) -> Result<Option<SocketAddr>, ReplicaError> {
    match addr {
        None => Ok(None),
        Some(a) => {
            let ip: IpAddr = a.parse().map_err(|_| {
                spec_err(volume, "spec.backing[].address", format!("{a:?} for node {node} is not an IP address"))
            })?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
    }
}

/// What `Replica::open` takes from the volume spec and the options, all checked before
/// anything touches the disk or the network, so a bad spec leaves nothing half started.
struct Settings<'a> {
    name: String,
    own: &'a BackingSpec,
    peer: &'a BackingSpec,
    size: u64,
    rate: Option<u64>,
    listen: Option<SocketAddr>,
    peer_addr: Option<SocketAddr>,
    dial: bool,
    tls: Option<LinkTls>,
}

/// Reads this node's and the peer's backing, the size, the resync rate, the addresses,
/// which side dials, and the link's TLS from the spec, the options overriding it.
fn configure<'a>(volume: &'a VolumeConfig, node: &str, opts: &ReplicaOptions) -> Result<Settings<'a>, ReplicaError> {
    let name = volume.name.clone();
    let spec = &volume.spec;
    let own = spec
        .backing
        .iter()
        .find(|b| b.node == node)
        .ok_or_else(|| ReplicaError::NotAMember { volume: name.clone(), node: node.to_string() })?;
    let peer = spec
        .backing
        .iter()
        .find(|b| b.node != node)
        .ok_or_else(|| spec_err(&name, "spec.backing", "needs an entry for the peer node"))?;
    let size = parse_bytes(&spec.size).map_err(|e| spec_err(&name, "spec.size", e.to_string()))?;
    if size == 0 || size % super::geometry::BLOCK_SIZE != 0 {
        return Err(spec_err(&name, "spec.size", format!("{size} bytes is not a positive multiple of 4 KiB")));
    }
    let rate = match &spec.resync_rate {
        Some(q) => Some(parse_bytes(q).map_err(|e| spec_err(&name, "spec.resyncRate", e.to_string()))?),
        None => None,
    };
    let listen = match opts.listen {
        Some(a) => Some(a),
        None => address(&name, node, own.address.as_ref(), spec.port)?,
    };
    let peer_addr = match opts.peer {
        Some(a) => Some(a),
        None => address(&name, &peer.node, peer.address.as_ref(), spec.port)?,
    };
    let dial = opts.dial.unwrap_or(node < peer.node.as_str());
    let tls = if spec.tls.enabled {
        let material = opts
            .tls
            .as_ref()
            .ok_or_else(|| spec_err(&name, "spec.tls.enabled", "TLS is enabled but this node has no certificate"))?;
        Some(tls::link_tls(material, &peer.node).map_err(|source| ReplicaError::Tls { volume: name.clone(), source })?)
    } else {
        None
    };
    Ok(Settings { name, own, peer, size, rate, listen, peer_addr, dial, tls })
}

/// The machine's fixed parameters; apart from the rest of the configuration because the
/// layout is known only once the metadata is open.
fn machine_config(
    node: &str,
    peer: &str,
    spec: &ReplicatedVolumeSpec,
    rate: Option<u64>,
    timing: &Timing,
    layout: Layout,
) -> MachineConfig {
    let ms = |d: Duration| d.as_millis() as u64;
    MachineConfig {
        node: node.to_string(),
        peer: peer.to_string(),
        protocol: match spec.protocol {
            ReplicationProtocol::A => WireProtocol::A,
            ReplicationProtocol::C => WireProtocol::C,
        },
        policy: match spec.split_brain_policy {
            SplitBrainPolicy::Manual => WirePolicy::Manual,
            SplitBrainPolicy::DiscardYoungerPrimary => WirePolicy::DiscardYoungerPrimary,
            SplitBrainPolicy::DiscardLeastChanges => WirePolicy::DiscardLeastChanges,
        },
        resync: ResyncLimits { rate, ..ResyncLimits::default() },
        ping_interval_ms: ms(timing.ping_interval),
        ping_timeout_ms: ms(timing.ping_timeout),
        handshake_timeout_ms: ms(timing.handshake_timeout),
        bitmap_flush_interval_ms: ms(timing.bitmap_flush),
        layout,
        speaks: crate::protocol::Range::ours(),
    }
}

impl Replica {
    /// Opens this node's replica of `volume` and starts replicating with the peer.
    pub async fn open(volume: &VolumeConfig, node: &str, opts: ReplicaOptions) -> Result<Replica, ReplicaError> {
        let Settings { name, own, peer, size, rate, listen, peer_addr, dial, tls } = configure(volume, node, &opts)?;
        let spec = &volume.spec;

        let plan = BackingPlan {
            data_path: PathBuf::from(&own.path),
            meta: MetaLocation::from_spec(&own.metadata),
            volume_uuid: store::volume_uuid_bytes(&volume.uuid),
            size,
            al_slots: spec.activity_log_extents,
            create_missing: opts.create_missing,
            initialize_blank: opts.initialize_blank,
        };
        let seed = opts.seed.unwrap_or_else(rand::random);
        let opened = tokio::task::spawn_blocking(move || store::open(&plan, seed))
            .await
            .map_err(|e| ReplicaError::Io { volume: name.clone(), message: e.to_string() })?
            .map_err(|source| ReplicaError::Metadata { volume: name.clone(), source })?;
        let span = tracing::info_span!("replica", group = %spec.group, volume = %name, node = %node);
        {
            let _g = span.enter();
            if opened.created {
                info!(path = %opened.files.data_path.display(), "created replica metadata");
            }
            if let Some(extents) = &opened.crash_extents {
                warn!(
                    extents = extents.len(),
                    "replica had crashed as primary: its activity-log extents are out of sync"
                );
            }
            if !opened.untrusted_pages.is_empty() {
                warn!(pages = ?opened.untrusted_pages, "torn bitmap pages: their blocks are marked out of sync");
            }
        }
        let timing = opts.timing;
        let cfg = machine_config(node, &peer.node, spec, rate, &timing, opened.layout);
        let files = Arc::new(opened.files);
        let machine = Machine::new(cfg, opened.sb, opened.bitmap, opened.al, 0, seed);
        let (io_tx, io_rx) = mpsc::unbounded_channel::<Completion>();
        let disk = DiskWorker::spawn(files.clone(), io_tx, opts.observer.clone()).map_err(|e| ReplicaError::Io {
            volume: name.clone(),
            message: format!("starting the disk worker: {e}"),
        })?;

        let initial = ReplicaStatus::new(&name, node, &peer.node, machine.snapshot());
        let (status_tx, status_rx) = watch::channel(initial);
        let (events_tx, _) = broadcast::channel(1024);
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>(4096);
        let shared = Arc::new(Shared {
            volume: name.clone(),
            node: node.to_string(),
            size,
            files: std::sync::RwLock::new(Some(files)),
            cmd: cmd_tx,
            status: status_rx,
            events: events_tx.clone(),
            writable: AtomicBool::new(false),
            readable: AtomicBool::new(false),
            nbd_clients: AtomicUsize::new(0),
            nbd_socket: opts.nbd_socket.clone(),
            observer: opts.observer.clone(),
        });

        let (stream_tx, stream_rx) = mpsc::channel::<BoxStream>(4);
        let (link_tx, link_rx) = mpsc::channel::<LinkEvent>(4096);
        let now = tokio::time::Instant::now();
        let (dial_tx, dial_rx) = watch::channel(DialState { connected: false, not_before: now });
        let mut transport = Vec::new();
        if dial {
            let addr =
                peer_addr.ok_or_else(|| ReplicaError::NoAddress { volume: name.clone(), node: peer.node.clone() })?;
            transport.push(link::spawn_dialer(addr, tls.clone(), timing.connect_timeout, stream_tx.clone(), dial_rx));
        } else {
            let addr =
                listen.ok_or_else(|| ReplicaError::NoAddress { volume: name.clone(), node: node.to_string() })?;
            let listener =
                bind_reuse(addr).map_err(|source| ReplicaError::Listen { volume: name.clone(), addr, source })?;
            transport.push(link::spawn_listener(listener, tls.clone(), stream_tx.clone()));
        }

        let export = Arc::new(ReplicaExport(shared.clone()));
        let nbd = NbdServer::start(export, &opts.nbd_socket, opts.nbd_tcp)
            .await
            .map_err(|source| ReplicaError::Nbd { volume: name.clone(), source })?;

        let core = Core {
            machine,
            disk,
            links: HashMap::new(),
            next_conn: 1,
            replies: HashMap::new(),
            next_req: 1,
            start: Instant::now(),
            status: status_tx,
            events: events_tx,
            dial: dial_tx,
            shared: shared.clone(),
            wire: Arc::new(WireCounters::default()),
            link_tx,
            last_publish: Instant::now(),
        };
        let handle = tokio::spawn(core.run(cmd_rx, stream_rx, link_rx, io_rx, timing.tick).instrument(span));
        Ok(Replica {
            shared,
            tasks: Arc::new(std::sync::Mutex::new(Tasks { core: Some(handle), transport, nbd: Some(nbd) })),
        })
    }

    fn refused(&self, r: Refusal) -> ReplicaError {
        if r.message == "the replica has stopped" {
            return ReplicaError::Stopped { volume: self.shared.volume.clone() };
        }
        ReplicaError::Refused { volume: self.shared.volume.clone(), code: r.code, message: r.message }
    }

    /// Makes this replica primary at `epoch`. Refused unless the local data is UpToDate
    /// (or `force`), the epoch is current, and the peer is not primary.
    pub async fn promote(&self, epoch: u64, force: bool) -> Result<(), ReplicaError> {
        let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.shared.request(move |req| Input::Promote { req, epoch, force, wall_ms }).await.map_err(|r| self.refused(r))
    }

    /// Makes this replica secondary once writes in flight are done and both replicas have
    /// flushed. Refused while NBD clients are attached, unless `force`.
    pub async fn demote(&self, force: bool) -> Result<(), ReplicaError> {
        let shared = self.shared.clone();
        self.shared
            .request(move |req| Input::Demote { req, force, open_clients: shared.nbd_clients.load(Ordering::SeqCst) })
            .await
            .map_err(|r| self.refused(r))
    }

    /// Tells the replica the engine's current epoch.
    pub fn observe_epoch(&self, epoch: u64) {
        let _ = self.shared.cmd.try_send(Cmd::ObserveEpoch(epoch));
    }

    /// The engine self-fenced: this primary may be superseded once its lease runs out.
    pub fn lease_lost(&self, reason: &str) {
        let _ = self.shared.cmd.try_send(Cmd::LeaseLost(reason.to_string()));
    }

    /// Starts an online verify from this node; progress and results appear in the status.
    pub async fn start_verify(&self) -> Result<(), ReplicaError> {
        self.shared.request(|req| Input::StartVerify { req }).await.map_err(|r| self.refused(r))
    }

    /// Records an operator's split-brain verdict for this node and renegotiates.
    pub async fn resolve_split_brain(&self, resolution: Resolution) -> Result<(), ReplicaError> {
        self.shared.request(move |req| Input::ResolveSplitBrain { req, resolution }).await.map_err(|r| self.refused(r))
    }

    pub fn status(&self) -> ReplicaStatus {
        self.shared.status.borrow().clone()
    }

    pub fn report(&self) -> VolumeReport {
        self.status().report()
    }

    /// Status updates; a change of role, disk state or connection is published at once.
    pub fn watch(&self) -> watch::Receiver<ReplicaStatus> {
        self.shared.status.clone()
    }

    pub fn events(&self) -> broadcast::Receiver<ReplicaEvent> {
        self.shared.events.subscribe()
    }

    /// The NBD socket to attach, while this replica is primary.
    pub fn nbd_socket(&self) -> Option<PathBuf> {
        (self.shared.status.borrow().role == VolumeRole::Primary).then(|| self.shared.nbd_socket.clone())
    }

    /// The export, for serving it on further sockets.
    pub fn export(&self) -> Arc<impl BlockExport> {
        Arc::new(ReplicaExport(self.shared.clone()))
    }

    /// Waits until `cond` holds for the status, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        cond: impl Fn(&ReplicaStatus) -> bool,
    ) -> Result<ReplicaStatus, ReplicaStatus> {
        let mut rx = self.watch();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = rx.borrow_and_update().clone();
            if cond(&s) {
                return Ok(s);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(s);
            }
        }
    }

    /// Stops cleanly: demotes if primary, makes the metadata durable, closes the link and
    /// the export.
    pub async fn shutdown(&self) -> Result<(), ReplicaError> {
        if let Some(nbd) = self.lock_tasks().nbd.as_mut() {
            nbd.stop();
        }
        let mut result = Ok(());
        if self.status().role == VolumeRole::Primary {
            result = self.demote(true).await;
        }
        if let Err(r) = self.shared.request(|req| Input::Checkpoint { req }).await {
            result = result.and(Err(self.refused(r)));
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.cmd.send(Cmd::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let (core, transport) = {
            let mut t = self.lock_tasks();
            (t.core.take(), std::mem::take(&mut t.transport))
        };
        for t in transport {
            t.abort();
        }
        if let Some(core) = core {
            let _ = core.await;
        }
        result
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Binds with `SO_REUSEADDR` so a restarted replica can listen again at once.
fn bind_reuse(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(16)?;
    TcpListener::from_std(socket.into())
}

struct Core {
    machine: Machine,
    disk: DiskWorker,
    links: HashMap<ConnId, LinkHandle>,
    next_conn: ConnId,
    replies: HashMap<ReqId, oneshot::Sender<Result<(), Refusal>>>,
    next_req: ReqId,
    start: Instant,
    status: watch::Sender<ReplicaStatus>,
    events: broadcast::Sender<ReplicaEvent>,
    dial: watch::Sender<DialState>,
    shared: Arc<Shared>,
    wire: Arc<WireCounters>,
    link_tx: mpsc::Sender<LinkEvent>,
    last_publish: Instant,
}

impl Core {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut streams: mpsc::Receiver<BoxStream>,
        mut links: mpsc::Receiver<LinkEvent>,
        mut io: mpsc::UnboundedReceiver<Completion>,
        tick: Duration,
    ) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop_reply = None;
        loop {
            tokio::select! {
                Some((tag, result)) = io.recv() => self.feed(Input::IoDone { tag, result }),
                Some(ev) = links.recv() => match ev {
                    LinkEvent::Frame(conn, env) => self.feed(Input::Frame { conn, env }),
                    LinkEvent::Sent(conn, seq) => self.feed(Input::Sent { conn, seq }),
                    LinkEvent::Closed(conn, reason) => {
                        if let Some(l) = self.links.remove(&conn) {
                            l.close();
                            self.feed(Input::Disconnected { conn, reason });
                            self.set_dial(200);
                        }
                    }
                },
                Some(stream) = streams.recv() => {
                    let conn = self.next_conn;
                    self.next_conn += 1;
                    let handle = link::spawn_link(conn, stream, self.link_tx.clone(), self.wire.clone(), self.shared.observer.clone());
                    self.links.insert(conn, handle);
                    self.set_dial(0);
                    self.feed(Input::Connected { conn });
                }
                cmd = cmds.recv() => match cmd {
                    None => break,
                    Some(Cmd::Request { make, reply }) => {
                        let req = self.next_req;
                        self.next_req += 1;
                        self.replies.insert(req, reply);
                        self.feed(make(req));
                    }
                    Some(Cmd::ObserveEpoch(epoch)) => self.feed(Input::ObserveEpoch { epoch }),
                    Some(Cmd::LeaseLost(reason)) => self.feed(Input::LeaseLost { reason }),
                    Some(Cmd::Stop(reply)) => {
                        stop_reply = Some(reply);
                        break;
                    }
                },
                _ = ticker.tick() => {
                    self.feed(Input::Tick);
                    self.publish(false);
                }
            }
        }
        for (_, l) in self.links.drain() {
            l.close();
        }
        self.publish(true);
        *self.shared.files.write().unwrap_or_else(|p| p.into_inner()) = None;
        let disk = self.disk;
        let _ = tokio::task::spawn_blocking(move || disk.join()).await;
        if let Some(r) = stop_reply {
            let _ = r.send(());
        }
    }

    fn set_dial(&self, retry_ms: u64) {
        let connected = !self.links.is_empty();
        let not_before = tokio::time::Instant::now() + Duration::from_millis(retry_ms);
        self.dial.send_replace(DialState { connected, not_before });
    }

    fn feed(&mut self, input: Input) {
        let now = self.start.elapsed().as_millis() as u64;
        let outputs = self.machine.handle(now, input);
        let mut changed = false;
        // Callers learn of completions only after the status reflects them.
        let mut completions = Vec::new();
        for o in outputs {
            match o {
                Output::Io(op) => {
                    if !self.disk.submit(op) {
                        error!("the disk worker has stopped");
                    }
                }
                Output::Send { conn, frame, epoch, notify_sent } => {
                    if let Some(l) = self.links.get(&conn) {
                        let seq = match (&frame, notify_sent) {
                            (
                                super::wire::Frame::Data { seq, .. }
                                | super::wire::Frame::Zero { seq, .. }
                                | super::wire::Frame::Flush { seq },
                                true,
                            ) => Some(*seq),
                            _ => None,
                        };
                        l.send(frame, epoch, seq);
                    }
                }
                Output::Complete { req, result } => completions.push((req, result)),
                Output::Close { conn, reason, retry_after_ms } => {
                    if let Some(l) = self.links.remove(&conn) {
                        info!(%reason, "closing the replication connection");
                        l.close();
                        self.set_dial(retry_after_ms);
                    }
                }
                Output::Event(e) => {
                    changed = true;
                    log_event(&e, self.machine.snapshot_epoch());
                    let _ = self.events.send(e);
                }
            }
        }
        self.publish(changed || !completions.is_empty());
        for (req, result) in completions {
            if let Some(reply) = self.replies.remove(&req) {
                let _ = reply.send(result);
            }
        }
    }

    fn publish(&mut self, force: bool) {
        let snap = self.machine.snapshot();
        self.shared.writable.store(snap.writes_allowed, Ordering::SeqCst);
        self.shared.readable.store(snap.reads_allowed, Ordering::SeqCst);
        let key_changed = {
            let cur = self.status.borrow();
            cur.role != snap.role
                || cur.disk != snap.disk
                || cur.connection != snap.connection
                || cur.fenced != snap.fenced
                || cur.peer_disk != snap.peer_disk
                || cur.peer_role != snap.peer_role
        };
        if !(force || key_changed || self.last_publish.elapsed() >= Duration::from_millis(100)) {
            return;
        }
        self.last_publish = Instant::now();
        let mut s = ReplicaStatus::new(&self.shared.volume, &self.shared.node, &self.status.borrow().peer, snap);
        s.wire_sent_bytes = self.wire.sent.load(Ordering::Relaxed);
        s.wire_received_bytes = self.wire.received.load(Ordering::Relaxed);
        s.wire_connections = self.wire.connections.load(Ordering::Relaxed);
        s.nbd_clients = self.shared.nbd_clients.load(Ordering::Relaxed);
        s.nbd_socket = (s.role == VolumeRole::Primary).then(|| self.shared.nbd_socket.display().to_string());
        self.status.send_if_modified(|cur| {
            if *cur == s {
                false
            } else {
                *cur = s;
                true
            }
        });
    }
}

fn log_event(e: &ReplicaEvent, epoch: u64) {
    let _epoch = tracing::info_span!("epoch", epoch).entered();
    let (reason, warning) = e.reason();
    match e {
        ReplicaEvent::Discarded(d) => warn!(
            reason,
            resolved_by = %d.resolved_by,
            local_discarded = d.local_discarded,
            bytes = d.bytes,
            ranges = ?d.ranges,
            "split brain resolved: these byte ranges are overwritten on the losing replica"
        ),
        _ if warning => warn!(reason, event = ?e, "replica event"),
        _ => info!(reason, event = ?e, "replica event"),
    }
}

/// The replica as the NBD server sees it.
struct ReplicaExport(Arc<Shared>);

impl ReplicaExport {
    /// Runs `request`, telling the observer (if any) when it started and how long it took.
    async fn timed<T>(
        &self,
        kind: IoKind,
        request: impl std::future::Future<Output = Result<T, ExportError>>,
    ) -> Result<T, ExportError> {
        let Some(observer) = &self.0.observer else { return request.await };
        let started = Instant::now();
        observer.started(kind);
        let result = request.await;
        observer.finished(kind, started.elapsed(), result.is_ok());
        result
    }
}

fn export_err(r: Refusal) -> ExportError {
    let errno = match r.code {
        ErrorCode::NotPermitted => Errno::Perm,
        ErrorCode::OutOfRange => Errno::NoSpc,
        ErrorCode::Io | ErrorCode::Busy => Errno::Io,
    };
    ExportError::new(errno, r.message)
}

/// Splits `[offset, offset + len)` at activity-log extent boundaries, so every piece needs
/// one extent (and one log slot) only.
fn extent_pieces(offset: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let next = ((pos / EXTENT_SIZE) + 1) * EXTENT_SIZE;
        let piece_end = next.min(end);
        out.push((pos, piece_end - pos));
        pos = piece_end;
    }
    out
}

impl BlockExport for ReplicaExport {
    fn name(&self) -> String {
        self.0.volume.clone()
    }

    fn size(&self) -> u64 {
        self.0.size
    }

    fn read_only(&self) -> bool {
        !self.0.writable.load(Ordering::SeqCst)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.timed(IoKind::Read, self.read_now(offset, len)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.timed(IoKind::Write, self.write_now(offset, data, fua)).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.timed(IoKind::Flush, async { self.0.request(|req| Input::Flush { req }).await.map_err(export_err) }).await
    }

    async fn zero(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<(), ExportError> {
        self.timed(IoKind::Zero, self.zero_now(offset, len, may_trim, fua)).await
    }

    fn client_attached(&self) {
        self.0.nbd_clients.fetch_add(1, Ordering::SeqCst);
    }

    fn client_detached(&self) {
        self.0.nbd_clients.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ReplicaExport {
    async fn read_now(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        if !self.0.readable.load(Ordering::SeqCst) {
            return Err(ExportError::new(Errno::Io, "this replica's data is inconsistent (resync in progress)"));
        }
        let files = self.0.files.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(files) = files else { return Err(ExportError::new(Errno::Shutdown, "the replica has stopped")) };
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; len as usize];
            files.data().read_exact_at(&mut buf, offset).map(|()| Bytes::from(buf))
        })
        .await
        .map_err(|e| ExportError::new(Errno::Io, e.to_string()))?
        .map_err(|e| ExportError::new(crate::nbd::server::errno_of(&e), e.to_string()))
    }

    async fn write_now(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let pieces = extent_pieces(offset, data.len() as u64);
        let futs = pieces.into_iter().map(|(o, l)| {
            let d = data.slice((o - offset) as usize..(o - offset + l) as usize);
            self.0.request(move |req| Input::Write { req, offset: o, data: d, fua })
        });
        for r in futures::future::join_all(futs).await {
            r.map_err(export_err)?;
        }
        Ok(())
    }

    async fn zero_now(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<(), ExportError> {
        let futs = extent_pieces(offset, len)
            .into_iter()
            .map(|(o, l)| self.0.request(move |req| Input::Zero { req, offset: o, len: l, fua, punch: may_trim }));
        for r in futures::future::join_all(futs).await {
            r.map_err(export_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_never_cross_an_extent() {
        assert_eq!(extent_pieces(0, 4096), vec![(0, 4096)]);
        let e = EXTENT_SIZE;
        assert_eq!(extent_pieces(e - 512, 1024), vec![(e - 512, 512), (e, 512)]);
        assert_eq!(extent_pieces(e, 2 * e), vec![(e, e), (2 * e, e)]);
    }
}
