//! One controller of a set sharing etcd: `hapair-operator standalone --etcd …`.
//!
//! Every controller serves the node API on its listener, campaigns, and watches its
//! manifest directory only while it leads. While standing by it answers the node API
//! with 503, `Retry-After` and the leader's URL (`x-hapair-leader`), and serves
//! `/healthz` and `/metrics`. On winning it starts a term: a store opened with the new
//! fence, the reconcile core loaded from etcd, and a witness resumed from the records its
//! predecessors wrote. On losing it ends the term at once; on shutdown it resigns so
//! another controller takes over without waiting out the leader lease.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use etcd_client::Client;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::election::{ElectionState, ElectionTiming, LeaderRecord, run_election};
use super::journal::{EtcdJournal, load_records};
use super::shared::{EtcdTokens, SharedError, load_or_create_ca};
use super::store::EtcdStore;
use super::{EtcdConfig, EtcdError, Keys, connect};
use crate::console::Console;
use crate::controller::Controller;
use crate::controller::metrics::Metrics;
use crate::controller::store::StoreError;
use crate::controller::views::{AdminConfig, CLI_CONFIG_FILE};
use crate::k8s::election::FencedAuthority;
use crate::pki::{Ca, PkiError};
use crate::server::identity::{TlsSetupError, server_config};
use crate::server::{NodeApi, Server, router, standby_router_naming};
use crate::standalone::{StandaloneConfig, advertised_url, certificate_names, directory_fingerprint, watch_manifests};
use crate::support::atomic_file::{FileError, write, write_json};
use crate::witness::Witness;
use crate::witness::lease::LeaseAuthority;

/// How one controller of the set runs.
#[derive(Clone, Debug)]
pub struct ReplicatedConfig {
    /// Manifests, the local state directory (serving certificate, CLI config), listener,
    /// names and API settings, as for a single controller.
    pub standalone: StandaloneConfig,
    pub etcd: EtcdConfig,
    /// This controller's name in the leader key and in logs.
    pub name: String,
    pub election: ElectionTiming,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Shared(#[from] SharedError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Pause before a term that failed to start is tried again.
const TERM_RETRY: Duration = Duration::from_secs(2);

/// A running term: the leader's controller, node API router and manifest watcher.
struct Term {
    controller: Arc<Controller<EtcdStore>>,
    router: Router,
    watcher: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Term {
    async fn start(
        config: &ReplicatedConfig,
        client: &Client,
        keys: &Keys,
        ca: &Arc<Ca>,
        election: &Arc<ElectionState>,
        metrics: &Arc<Metrics>,
    ) -> Result<Term, RunError> {
        let fence = election.fence().ok_or_else(|| EtcdError::Fenced { what: "starting a term".into() })?;
        let standalone = &config.standalone;
        let store = EtcdStore::open(&standalone.manifests, client.clone(), keys.clone(), fence).await?;
        let controller = Arc::new(Controller::start(store, standalone.controller.clone(), metrics.clone()).await?);
        let mut witness = Witness::resume(Duration::ZERO, load_records(client, keys).await?);
        for group in controller.overview().await.groups {
            witness.restore_epoch(&group.key, group.status.epoch);
        }
        let authority: Box<dyn LeaseAuthority> =
            Box::new(FencedAuthority::new(Box::new(witness), election.leadership.clone(), config.election.renew_every));
        let mut api = NodeApi::new(
            controller.clone(),
            ca.clone(),
            EtcdTokens::new(client.clone(), keys),
            Some(authority),
            standalone.api.clone(),
        )
        .with_journal(Arc::new(EtcdJournal::new(client.clone(), keys.clone(), fence)));
        if standalone.console {
            // Every controller holds the shared CA, so a session survives a change of leader.
            api = api.with_routes(Console::routes(controller.clone(), ca));
        }
        let (stop, stopped) = watch::channel(false);
        let watcher = tokio::spawn(watch_manifests(
            controller.clone(),
            standalone.manifests.clone(),
            directory_fingerprint(&standalone.manifests),
            standalone.poll_interval,
            stopped,
        ));
        Ok(Term { controller, router: router(Arc::new(api)), watcher, stop })
    }

    /// Ends the term: the watcher stops after writing out what it buffered (refused by
    /// etcd if this controller no longer leads, which is as it should be).
    async fn end(self) {
        let _ = self.stop.send(true);
        let _ = self.watcher.await;
        drop(self.controller);
    }
}

async fn metrics_text(axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.render())
}

/// What a controller that does not lead serves.
fn standing_by(metrics: &Arc<Metrics>, retry_after: Duration, leader: Option<String>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(metrics.clone())
        .merge(standby_router_naming(retry_after, leader))
}

/// Connects and loads (or creates) the shared CA, retrying while etcd is unreachable.
async fn connect_and_load_ca(
    config: &EtcdConfig,
    keys: &Keys,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Option<(Client, Ca)>, RunError> {
    let mut logged = false;
    loop {
        let attempt = async {
            let client = connect(config).await?;
            let (ca, created) = load_or_create_ca(&client, keys).await?;
            Ok::<_, RunError>((client, ca, created))
        };
        let outcome = tokio::select! {
            outcome = attempt => outcome,
            _ = &mut *shutdown => return Ok(None),
        };
        match outcome {
            Ok((client, ca, created)) => {
                if created {
                    info!(fingerprint = %ca.fingerprint(), "created the controller CA in etcd");
                }
                return Ok(Some((client, ca)));
            }
            // A bad flag or a damaged CA does not get better by waiting.
            Err(RunError::Etcd(EtcdError::Config(message))) => return Err(EtcdError::Config(message).into()),
            Err(RunError::Shared(e @ SharedError::Ca { .. })) => return Err(e.into()),
            Err(e) => {
                if !logged {
                    warn!(error = %e, "etcd is not reachable yet; retrying");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Runs one controller of the set until `shutdown` resolves.
pub async fn run(config: ReplicatedConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let standalone = &config.standalone;
    let dir = &standalone.state_dir;
    std::fs::create_dir_all(dir)
        .map_err(|source| RunError::Io { what: format!("state directory {}", dir.display()), source })?;
    let keys = Keys::new(&config.etcd.prefix);
    let mut shutdown = std::pin::pin!(shutdown);
    let Some((client, ca)) = connect_and_load_ca(&config.etcd, &keys, &mut shutdown).await? else {
        return Ok(());
    };
    let ca = Arc::new(ca);

    let listener = TcpListener::bind(standalone.listen)
        .await
        .map_err(|source| RunError::Io { what: format!("listening on {}", standalone.listen), source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| RunError::Io { what: format!("listening on {}", standalone.listen), source })?;
    let url = advertised_url(standalone, bound);
    // The CA certificate (never its key, which stays in etcd) beside the CLI config, for
    // tools that check the controller's certificate, as in a single controller's directory.
    write(&dir.join(crate::pki::CA_CERT_FILE), ca.cert_pem().as_bytes(), 0o644)?;
    let serving = ca.ensure_server_cert(dir, &certificate_names(standalone, bound))?;
    let admin = ca.ensure_admin_cert(dir)?;
    let mut controllers = standalone.api.controllers.clone();
    if !controllers.contains(&url) {
        controllers.insert(0, url.clone());
    }
    let cli = AdminConfig {
        controller: url.clone(),
        controllers: controllers.clone(),
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: admin.cert_pem,
        key_pem: admin.key_pem,
    };
    write_json(&dir.join(CLI_CONFIG_FILE), &cli, 0o600)?;
    let mut config = config.clone();
    config.standalone.api.controllers = controllers;

    let metrics = Arc::new(Metrics::new());
    let retry_after = config.election.renew_every;
    let (routes, served) = watch::channel(standing_by(&metrics, retry_after, None));
    let (tls, auth) = server_config(ca.cert_der(), &serving.cert_pem, &serving.key_pem)?;
    let server = Server::start_routed_with(listener, tls, auth, served, metrics.clone(), &config.standalone.api)
        .map_err(|source| RunError::Io { what: "starting the node API".into(), source })?;
    info!(listen = %bound, url = %url, name = %config.name, etcd = %config.etcd.endpoints.join(","),
        ca_fingerprint = %ca.fingerprint(), "controller serving; the node API answers 503 until this controller leads");

    let election = Arc::new(ElectionState::default());
    let (stop_election, election_stop) = watch::channel(false);
    let me = LeaderRecord { id: config.name.clone(), url: url.clone() };
    let campaign = tokio::spawn(run_election(
        client.clone(),
        keys.clone(),
        me,
        config.election,
        election.clone(),
        metrics.clone(),
        election_stop,
    ));

    let mut leading = election.leadership.subscribe();
    let mut term: Option<Term> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut hinted: Option<String> = None;
    loop {
        let is_leader = election.leadership.is_leader(Instant::now());
        if !is_leader {
            if let Some(ended) = term.take() {
                let _ = routes.send_replace(standing_by(&metrics, retry_after, None));
                hinted = None;
                warn!("lost the leadership: the term ended and the node API answers 503");
                ended.end().await;
            }
            retry_at = None;
            let leader = election.leader().map(|l| l.url).filter(|leader| leader != &url);
            if leader != hinted {
                let _ = routes.send_replace(standing_by(&metrics, retry_after, leader.clone()));
                hinted = leader;
            }
        } else if term.is_none() && retry_at.is_none_or(|at| tokio::time::Instant::now() >= at) {
            info!("elected leader: starting a term");
            // Not spawned: the loop has nothing else to do meanwhile, and a term that
            // starts after the leadership lapsed is ended on the next turn.
            match Term::start(&config, &client, &keys, &ca, &election, &metrics).await {
                Ok(new_term) => {
                    let _ = routes.send_replace(new_term.router.clone());
                    info!("leading: serving the node API and the witness");
                    term = Some(new_term);
                    retry_at = None;
                }
                Err(e) => {
                    metrics.error("term");
                    warn!(error = %e, "starting the term failed; retrying in {}s", TERM_RETRY.as_secs());
                    retry_at = Some(tokio::time::Instant::now() + TERM_RETRY);
                }
            }
            continue;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            changed = leading.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            // The deadline can lapse without the election saying so (etcd hangs), the
            // leader's address changes, and failed terms are retried: look again soon.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }

    info!("shutting down");
    let _ = routes.send_replace(standing_by(&metrics, retry_after, None));
    if let Some(ending) = term.take() {
        if let Err(e) = ending.controller.flush().await {
            warn!(error = %e, "status writes still pending at shutdown");
        }
        ending.end().await;
    }
    // Resigning lets another controller lead at once.
    let _ = stop_election.send(true);
    let _ = campaign.await;
    server.shutdown().await;
    Ok(())
}

/// The default `--name`: the host name.
pub fn default_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
}
