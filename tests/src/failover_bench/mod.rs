//! The `failover` benchmark: the primary of a real pair in network namespaces is killed
//! over and over, and a client in a third namespace measures the time from each kill to
//! the first TCP connection to the virtual IP answered by the other server.
//!
//! The topology, the kill, the client and the statistics are shared; the HA software is
//! pluggable behind [`HaPair`], so hapair and keepalived are measured the same way in the
//! same run:
//!
//! - kill: after a random pause of up to [`KILL_JITTER`], both links of the primary go
//!   down, then every process in its namespace gets SIGKILL (the HA daemon and the
//!   service), as when a machine loses power;
//! - restore: the node "reboots" (virtual IP and neighbour cache gone, its run directory
//!   emptied, links up), its HA software starts again and must come back as the standby
//!   while the survivor keeps the service, so roles alternate from one kill to the next;
//! - the service is [`service`], answering each connection with its node's name.

pub mod hapair;
pub mod keepalived;
pub mod overlap;
pub mod probe;
pub mod report;
pub mod service;
pub mod stats;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::netns::{ChildGuard, Netns, NetnsError, unique_name};
use crate::topology::{A0, A1, B0, B1, TwoServersAndClient};

use self::probe::Pace;
use self::stats::Samples;

/// The virtual IP both implementations move between the servers, on link 0.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const VIP_PREFIX_LEN: u8 = 24;
/// The service's port on every server.
pub const SERVICE_PORT: u16 = 7000;
/// How long a pair may take to start or to settle after a restore.
const SETTLE_BOUND: Duration = Duration::from_secs(60);
/// Each kill comes after a random pause of up to this, so kills fall at random phases of
/// the heartbeat or advertisement period instead of in step with the settle check.
pub const KILL_JITTER: Duration = Duration::from_secs(1);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks every wait in progress to give up (Ctrl-C), so the guards clean up on the way out.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Why a measurement run stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what} did not happen within {within:?}")]
    Timeout { what: String, within: Duration },
    #[error("{0}")]
    Setup(String),
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, BenchError>;

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// One of the two servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    A,
    B,
}

impl Node {
    pub const BOTH: [Node; 2] = [Node::A, Node::B];

    /// The node's name in the HA configuration, and what its service answers.
    pub fn name(self) -> &'static str {
        match self {
            Node::A => "a",
            Node::B => "b",
        }
    }

    pub fn other(self) -> Node {
        match self {
            Node::A => Node::B,
            Node::B => Node::A,
        }
    }

    /// Its address on link 0, the LAN the virtual IP lives on.
    pub fn lan_address(self) -> &'static str {
        match self {
            Node::A => A0,
            Node::B => B0,
        }
    }

    /// Its address on link 1, the dedicated heartbeat link.
    pub fn heartbeat_address(self) -> &'static str {
        match self {
            Node::A => A1,
            Node::B => B1,
        }
    }

    fn index(self) -> usize {
        match self {
            Node::A => 0,
            Node::B => 1,
        }
    }
}

/// Per-node slots, for implementations that keep something per server.
#[derive(Debug, Default)]
pub struct PerNode<T>([T; 2]);

impl<T> PerNode<T> {
    pub fn new(a: T, b: T) -> Self {
        PerNode([a, b])
    }

    pub fn get(&self, node: Node) -> &T {
        &self.0[node.index()]
    }

    pub fn get_mut(&mut self, node: Node) -> &mut T {
        &mut self.0[node.index()]
    }
}

/// The network of [`TwoServersAndClient`] with a working directory per server: `disk`
/// survives a kill, `run` is emptied at every reboot like a tmpfs `/run`.
#[derive(Debug)]
pub struct Testbed {
    net: TwoServersAndClient,
    work: tempfile::TempDir,
    program: PathBuf,
}

impl Testbed {
    /// Builds the network; `program` is the `bench-failover` binary, which also provides
    /// the service (`bench-failover serve`).
    pub fn build(program: PathBuf) -> Result<Self> {
        Self::build_keeping(program, false)
    }

    /// Like [`Testbed::build`]; with `keep_work`, the work directory (configurations,
    /// daemon logs) stays after the testbed is gone, for reading what happened.
    pub fn build_keeping(program: PathBuf, keep_work: bool) -> Result<Self> {
        let net = TwoServersAndClient::build()?;
        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", unique_name("fb")))
            .tempdir()
            .map_err(io_error("creating the benchmark's work directory"))?;
        let mut work = work;
        work.disable_cleanup(keep_work);
        let bed = Testbed { net, work, program };
        for node in Node::BOTH {
            for dir in [bed.disk_dir(node), bed.run_dir(node)] {
                std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
            }
        }
        Ok(bed)
    }

    pub fn ns(&self, node: Node) -> &Netns {
        match node {
            Node::A => &self.net.a,
            Node::B => &self.net.b,
        }
    }

    pub fn client(&self) -> &Netns {
        &self.net.client
    }

    pub fn namespace_names(&self) -> Vec<String> {
        self.net.namespace_names()
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Holds one directory per node, named after it.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// What survives a kill: configuration, state, logs.
    pub fn disk_dir(&self, node: Node) -> PathBuf {
        self.work.path().join(node.name())
    }

    /// Runtime files (pid files, state reports), gone after a reboot.
    pub fn run_dir(&self, node: Node) -> PathBuf {
        self.disk_dir(node).join("run")
    }

    /// Starts `args` inside `node`'s namespace in its own process group, output appended to
    /// `log`. The child is also killed if this process dies without running its guards.
    pub fn spawn(&self, node: Node, args: &[&str], log: &Path) -> Result<ChildGuard> {
        self.spawn_with_env(node, args, &[], log)
    }

    /// [`Testbed::spawn`] with `env` added to the child's environment.
    pub fn spawn_with_env(&self, node: Node, args: &[&str], env: &[(&str, &Path)], log: &Path) -> Result<ChildGuard> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(io_error(format!("opening {}", log.display())))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.ns(node).name()])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(io_error(format!("starting {} on {}", args.join(" "), node.name())))?;
        Ok(ChildGuard::new(child, format!("{} on {}", args.join(" "), node.name())))
    }

    /// The service, as a foreground process (for implementations that run it on both
    /// servers all the time).
    pub fn spawn_service(&self, node: Node) -> Result<ChildGuard> {
        let program = self.program.display().to_string();
        let port = SERVICE_PORT.to_string();
        let log = self.disk_dir(node).join("service.log");
        self.spawn(node, &[&program, "serve", "--name", node.name(), "--port", &port], &log)
    }

    /// Whether `node` has the virtual IP on its LAN interface.
    pub fn holds_vip(&self, node: Node) -> Result<bool> {
        let text = self.ns(node).ip(&["-o", "-4", "addr", "show", "dev", "eth0"])?;
        let vip = VIP.to_string();
        Ok(text.split_whitespace().any(|word| word.split('/').next() == Some(vip.as_str())))
    }

    /// The servers holding the virtual IP (one, when all is well).
    pub fn vip_holders(&self) -> Result<Vec<Node>> {
        let mut holders = Vec::new();
        for node in Node::BOTH {
            if self.holds_vip(node)? {
                holders.push(node);
            }
        }
        Ok(holders)
    }

    /// One connection from the client to the virtual IP: who answered, if anyone.
    pub fn ask(&self) -> Option<probe::Answer> {
        self.client().block_on(|| probe::ask(service_address(), Duration::from_millis(500)))
    }

    /// Kills `node` as a power failure would: its links go down, then every process in its
    /// namespace gets SIGKILL.
    pub fn kill(&self, node: Node) -> Result<()> {
        let ns = self.ns(node);
        for device in ["eth0", "eth1"] {
            ns.ip(&["link", "set", device, "down"])?;
        }
        // keepalived's parent restarts a VRRP child that dies first: the sweep repeats.
        let within = Duration::from_secs(5);
        let left = ns.kill_processes(within)?;
        if left.is_empty() {
            return Ok(());
        }
        Err(BenchError::Timeout { what: format!("killing every process on {} (left: {left:?})", node.name()), within })
    }

    /// Brings a killed node back as a freshly booted machine: no virtual IP left on its
    /// interface, an empty neighbour cache and run directory, links up. Its HA software is
    /// not started here.
    pub fn reboot(&self, node: Node) -> Result<()> {
        let ns = self.ns(node);
        if self.holds_vip(node)? {
            ns.ip(&["addr", "del", &format!("{VIP}/{VIP_PREFIX_LEN}"), "dev", "eth0"])?;
        }
        ns.ip(&["neigh", "flush", "all"])?;
        let run_dir = self.run_dir(node);
        std::fs::remove_dir_all(&run_dir)
            .and_then(|()| std::fs::create_dir_all(&run_dir))
            .map_err(io_error(format!("emptying {}", run_dir.display())))?;
        for device in ["eth0", "eth1"] {
            ns.ip(&["link", "set", device, "up"])?;
        }
        Ok(())
    }
}

/// Where the client connects.
pub fn service_address() -> SocketAddr {
    SocketAddr::from((VIP, SERVICE_PORT))
}

/// An HA implementation under test, running on the two servers of a [`Testbed`].
///
/// Killing and rebooting are the testbed's; the implementation starts its software on a
/// node and says when the pair has settled.
pub trait HaPair {
    /// The row label, e.g. "keepalived advert_int 1s".
    fn label(&self) -> String;
    /// The settings that matter for failover time, for the table's footnotes.
    fn parameters(&self) -> String;
    /// How long after a kill the other server must answer before the kill counts as a
    /// failure.
    fn failover_bound(&self) -> Duration;
    /// How long [`HaPair::settled`] must hold without interruption before the pair counts
    /// as stable (long enough that a standby which had not heard the primary would have
    /// taken over in the meantime).
    fn settle_time(&self) -> Duration;
    /// Starts the HA software (and whatever the service needs) on `node`, as at boot.
    fn start_node(&mut self, bed: &Testbed, node: Node) -> Result<()>;
    /// Whether `primary` serves and the other node is a standby following it.
    fn settled(&mut self, bed: &Testbed, primary: Node) -> bool;
    /// `node` was killed: release (reap) what was started there.
    fn node_killed(&mut self, node: Node);
    /// Whether the first start needs both servers at once (a new replicated volume has no
    /// UpToDate copy until the two replicas have met); else `a` starts first and is the
    /// primary.
    fn starts_together(&self) -> bool {
        false
    }
    /// The phases of the takeover `survivor` just completed, as it recorded them: each
    /// phase's name and when it ended from the start of its timeline. `None` for an
    /// implementation that records none.
    fn failover_phases(&mut self, _bed: &Testbed, _survivor: Node) -> Option<Vec<(String, Duration)>> {
        None
    }
}

/// The single holder of the virtual IP, if there is exactly one.
pub fn primary(bed: &Testbed) -> Result<Option<Node>> {
    Ok(match bed.vip_holders()?.as_slice() {
        [node] => Some(*node),
        _ => None,
    })
}

/// Waits until exactly one node holds the virtual IP and the implementation reports the
/// pair settled around it, continuously for its settle time; returns the primary.
pub fn wait_settled(pair: &mut dyn HaPair, bed: &Testbed) -> Result<Node> {
    let start = Instant::now();
    let mut streak: Option<(Node, Instant)> = None;
    loop {
        if interrupted() {
            return Err(BenchError::Interrupted);
        }
        let now = Instant::now();
        let current = primary(bed)?.filter(|&p| pair.settled(bed, p));
        streak = match (current, streak) {
            (Some(p), Some((q, since))) if p == q => Some((q, since)),
            (Some(p), _) => Some((p, now)),
            (None, _) => None,
        };
        if let Some((p, since)) = streak
            && now.duration_since(since) >= pair.settle_time()
        {
            return Ok(p);
        }
        if now.duration_since(start) >= SETTLE_BOUND {
            return Err(BenchError::Timeout {
                what: format!("{}: the pair settling (VIP holders {:?})", pair.label(), bed.vip_holders()?),
                within: SETTLE_BOUND,
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Starts the pair with `a` first, so that it becomes the primary, then `b` (or both at
/// once, see [`HaPair::starts_together`]); returns once the pair has settled.
pub fn start_pair(pair: &mut dyn HaPair, bed: &Testbed) -> Result<Node> {
    pair.start_node(bed, Node::A)?;
    if pair.starts_together() {
        pair.start_node(bed, Node::B)?;
        return wait_settled(pair, bed);
    }
    let deadline = Instant::now() + SETTLE_BOUND;
    while !bed.holds_vip(Node::A)? {
        if interrupted() {
            return Err(BenchError::Interrupted);
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout {
                what: format!("{}: a taking the VIP", pair.label()),
                within: SETTLE_BOUND,
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    pair.start_node(bed, Node::B)?;
    wait_settled(pair, bed)
}

/// How one kill went, when the other server answered within the bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Takeover {
    /// From the kill to the first answer from the other server.
    pub time: Duration,
    /// Writes the killed server acknowledged that the other server does not have (for a
    /// service that writes).
    pub lost_writes: Option<u64>,
}

/// Kills the primary and measures until the client is answered by the other server;
/// `None` when that took longer than the implementation's bound.
pub fn kill_primary(pair: &mut dyn HaPair, bed: &Testbed, primary: Node, pace: Pace) -> Result<Option<Takeover>> {
    let survivor = primary.other();
    let answered = crate::netns::wait_for(Duration::from_secs(10), || {
        if interrupted() {
            return Some(None);
        }
        bed.ask().filter(|a| a.server == primary.name()).map(Some)
    });
    if interrupted() {
        return Err(BenchError::Interrupted);
    }
    // The last write acknowledged before the kill, should no probe reach the primary after.
    let Some(Some(acknowledged)) = answered else {
        return Err(BenchError::Setup(format!(
            "{}: the client is not answered by the primary {} before the kill",
            pair.label(),
            primary.name()
        )));
    };
    let bound = pair.failover_bound();
    let (killed, answer) = std::thread::scope(|scope| {
        let t0 = Instant::now();
        let client = scope.spawn(move || {
            bed.client().block_on(|| {
                probe::first_answer_from(service_address(), survivor.name(), pace, t0 + bound, interrupted)
            })
        });
        let killed = bed.kill(primary);
        let answer = client.join().map(|first| {
            first.map(|first| {
                let acknowledged_before = first.acknowledged_before.max(acknowledged.write);
                let first = probe::FirstAnswer { acknowledged_before, ..first };
                Takeover { time: first.at.duration_since(t0), lost_writes: first.lost_writes() }
            })
        });
        (killed, answer)
    });
    killed?;
    pair.node_killed(primary);
    if interrupted() {
        return Err(BenchError::Interrupted);
    }
    answer.map_err(|_| BenchError::Setup("the client thread panicked".into()))
}

/// Reboots a killed node, starts its HA software and waits until the pair has settled;
/// returns the primary.
pub fn restore(pair: &mut dyn HaPair, bed: &Testbed, node: Node) -> Result<Node> {
    bed.reboot(node)?;
    pair.start_node(bed, node)?;
    wait_settled(pair, bed)
}

/// What one implementation's run measured, and why it stopped early if it did.
#[derive(Debug, Default)]
pub struct Measured {
    pub samples: Samples,
    /// Per phase, in the order phases were first seen: when it ended, for every kill.
    pub phases: Vec<(String, Vec<Duration>)>,
    /// Both servers holding the VIP at once, over the whole run.
    pub overlap: Option<overlap::Overlap>,
    /// Acknowledged writes missing on the new server, summed over the kills (for a service
    /// that writes).
    pub lost_writes: Option<u64>,
    pub error: Option<String>,
}

impl Measured {
    fn add_phases(&mut self, phases: Vec<(String, Duration)>) {
        for (name, at) in phases {
            match self.phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, times)) => times.push(at),
                None => self.phases.push((name, vec![at])),
            }
        }
    }
}

/// Starts the pair, then `kills` times: kill the primary, measure, restore. A restored
/// node must come back as the standby; the run stops with an error if it takes the
/// service back. `progress` receives a line per kill.
pub fn measure(
    pair: &mut dyn HaPair,
    bed: &Testbed,
    kills: usize,
    pace: Pace,
    progress: &mut dyn FnMut(&str),
) -> Measured {
    let mut measured = Measured::default();
    let watch = overlap::VipWatch::start(bed);
    if let Err(e) = measure_into(pair, bed, kills, pace, progress, &mut measured) {
        measured.error = Some(e.to_string());
    }
    measured.overlap = Some(watch.finish());
    measured
}

fn measure_into(
    pair: &mut dyn HaPair,
    bed: &Testbed,
    kills: usize,
    pace: Pace,
    progress: &mut dyn FnMut(&str),
    measured: &mut Measured,
) -> Result<()> {
    let mut current = start_pair(pair, bed)?;
    let mut rng = rand::rng();
    for i in 1..=kills {
        std::thread::sleep(rng.random_range(Duration::ZERO..KILL_JITTER));
        let killed = current;
        let outcome = kill_primary(pair, bed, killed, pace)?;
        match outcome {
            Some(Takeover { time, lost_writes }) => {
                measured.samples.times.push(time);
                if let Some(lost) = lost_writes {
                    *measured.lost_writes.get_or_insert(0) += lost;
                }
                if let Some(phases) = pair.failover_phases(bed, killed.other()) {
                    measured.add_phases(phases);
                }
                let lost = lost_writes.map_or_else(String::new, |n| format!(", {n} acknowledged writes lost"));
                progress(&format!(
                    "{}: kill {i}/{kills} of {}: {} answered after {:.1} ms{lost}",
                    pair.label(),
                    killed.name(),
                    killed.other().name(),
                    time.as_secs_f64() * 1e3
                ));
            }
            None => {
                measured.samples.failures += 1;
                progress(&format!(
                    "{}: kill {i}/{kills} of {}: no answer from {} within {:?}",
                    pair.label(),
                    killed.name(),
                    killed.other().name(),
                    pair.failover_bound()
                ));
            }
        }
        current = restore(pair, bed, killed)?;
        if outcome.is_some() && current == killed {
            return Err(BenchError::Setup(format!(
                "{}: the restored node {} took the service back instead of staying standby",
                pair.label(),
                killed.name()
            )));
        }
    }
    Ok(())
}
