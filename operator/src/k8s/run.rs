//! `hapair-operator run`: one operator replica.
//!
//! Every replica campaigns for the leader Lease, serves `/metrics`, `/healthz` and
//! `/readyz` on the metrics port, and listens on the node API port. Only the leader runs a
//! [`Term`] (controllers, reconcile core, witness) and serves the node API; the others
//! answer it with 503 and `Retry-After`, so agents retry until they reach the leader (the
//! Service balances over both). Readiness does not depend on leading: the non-leader must
//! be ready too, or a node drain would block on the PodDisruptionBudget.
//!
//! The CA comes from the PKI Secret, created by the first leader; each replica issues its
//! own serving certificate from it. On losing the lead the node API switches to 503 at
//! once and the term ends; on SIGTERM the Lease is handed over so the other replica need
//! not wait it out.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::controller::metrics::Metrics;
use crate::k8s::K8sError;
use crate::k8s::election::{ElectionTiming, Elector, FencedAuthority, Leadership, run_election};
use crate::k8s::pki_secret;
use crate::k8s::term::{Term, TermConfig};
use crate::pki::Ca;
use crate::server::identity::server_config;
use crate::server::{Server, standby_router};
use crate::witness::lease::LeaseAuthority;

/// Builds a fresh witness authority; called at the start of every term.
pub type AuthorityFactory = Arc<dyn Fn() -> Box<dyn LeaseAuthority> + Send + Sync>;

/// Where `run` tells `hapair-operator token create`, run later in the same container, which
/// Secrets it uses (the only writable path of the pod is /tmp).
pub const RUNTIME_FILE: &str = "/tmp/hapair-operator/runtime.json";

/// Pause before a term that failed to start is tried again.
const TERM_RETRY: Duration = Duration::from_secs(5);

/// What a running operator tells tools started beside it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeInfo {
    pub namespace: String,
    pub pki_secret: String,
    pub tokens_secret: String,
    pub server_names: Vec<String>,
    pub node_api_port: u16,
}

/// How a replica runs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub node_api_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// DNS names or IPs agents use; they go into this replica's serving certificate.
    pub server_names: Vec<String>,
    pub lease_name: String,
    pub pki_secret: String,
    pub election: ElectionTiming,
    pub term: TermConfig,
    /// Where [`RuntimeInfo`] is written (`None`: nowhere).
    pub runtime_file: Option<PathBuf>,
}

/// Default names of the Secrets beside the PKI Secret: `<base>-tokens`, `<base>-state-N`,
/// where `<base>` is the PKI Secret's name without its `-pki` suffix.
pub fn secret_names(pki_secret: &str) -> (String, String) {
    let base = pki_secret.strip_suffix("-pki").unwrap_or(pki_secret);
    (format!("{base}-tokens"), format!("{base}-state"))
}

#[derive(Debug, Default)]
struct Health {
    ready: AtomicBool,
}

async fn metrics_text(State((metrics, _)): State<(Arc<Metrics>, Arc<Health>)>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.render())
}

async fn readyz(State((_, health)): State<(Arc<Metrics>, Arc<Health>)>) -> impl IntoResponse {
    if health.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting: the node API is not listening yet\n")
    }
}

/// The plain-HTTP metrics and probe endpoints.
fn probes(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state((metrics, health))
}

/// Waits for the PKI Secret: the leader creates it, everyone else reads it once it exists.
async fn obtain_ca(secrets: &Api<Secret>, name: &str, leadership: &Leadership) -> Result<Ca, K8sError> {
    let mut waiting_logged = false;
    loop {
        if leadership.is_leader(Instant::now()) {
            let (ca, created) = pki_secret::load_or_create(secrets, name).await?;
            if created {
                info!(secret = %name, fingerprint = %ca.fingerprint(), "created the controller CA");
            }
            return Ok(ca);
        }
        if let Some(ca) = pki_secret::load(secrets, name).await? {
            return Ok(ca);
        }
        if !waiting_logged {
            info!(secret = %name, "waiting for the leader to create the CA");
            waiting_logged = true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn write_runtime_info(path: &std::path::Path, info: &RuntimeInfo) {
    if let Some(dir) = path.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        warn!(path = %dir.display(), error = %e, "cannot create the runtime directory");
        return;
    }
    if let Err(e) = crate::support::atomic_file::write_json(path, info, 0o644) {
        warn!(path = %path.display(), error = %e, "cannot write the runtime file; token create needs --tokens-secret");
    }
}

/// Runs one replica until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: RunConfig,
    authority: Option<AuthorityFactory>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), K8sError> {
    config.election.check().map_err(K8sError::Invalid)?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let probe_listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| K8sError::Io { what: format!("listening on {}", config.metrics_listen), source })?;
    let probe_server: JoinHandle<()> = {
        let app = probes(metrics.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(probe_listener, app).await {
                warn!(error = %e, "metrics server stopped");
            }
        })
    };

    let namespace = config.term.namespace.clone();
    let leadership = Leadership::new();
    let (stop_election, election_stop) = watch::channel(false);
    let elector = Elector::new(&config.lease_name, &config.term.identity, config.election);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let election = tokio::spawn(run_election(leases, elector, leadership.clone(), metrics.clone(), election_stop));

    let mut shutdown = std::pin::pin!(shutdown);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let ca = tokio::select! {
        ca = obtain_ca(&secrets, &config.pki_secret, &leadership) => Arc::new(ca?),
        _ = &mut shutdown => {
            let _ = stop_election.send(true);
            let _ = election.await;
            probe_server.abort();
            return Ok(());
        }
    };
    let serving = ca.issue_server(&config.server_names)?;
    let (tls, auth) = server_config(ca.cert_der(), &serving.cert_pem, &serving.key_pem)?;
    let listener = TcpListener::bind(config.node_api_listen)
        .await
        .map_err(|source| K8sError::Io { what: format!("listening on {}", config.node_api_listen), source })?;
    let retry_after = config.election.retry_period;
    let (routes, served) = watch::channel(standby_router(retry_after));
    let server = Server::start_routed_with(listener, tls, auth, served, metrics.clone(), &config.term.api)
        .map_err(|source| K8sError::Io { what: "starting the node API".into(), source })?;
    health.ready.store(true, Ordering::SeqCst);
    if let Some(path) = &config.runtime_file {
        let info = RuntimeInfo {
            namespace: namespace.clone(),
            pki_secret: config.pki_secret.clone(),
            tokens_secret: config.term.tokens_secret.clone(),
            server_names: config.server_names.clone(),
            node_api_port: config.node_api_listen.port(),
        };
        write_runtime_info(path, &info);
    }
    info!(
        identity = %config.term.identity,
        node_api = %config.node_api_listen,
        metrics = %config.metrics_listen,
        ca_fingerprint = %ca.fingerprint(),
        "operator replica serving; the node API answers 503 until this replica leads"
    );

    let mut leading = leadership.subscribe();
    let mut term: Option<Term> = None;
    let mut starting: Option<JoinHandle<Result<Term, K8sError>>> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let now = Instant::now();
        let is_leader = leadership.is_leader(now);
        if !is_leader {
            if let Some(ended) = term.take() {
                let _ = routes.send_replace(standby_router(retry_after));
                ended.stop();
                warn!("lost the leadership: the term ended and the node API answers 503");
            }
            if let Some(aborted) = starting.take() {
                aborted.abort();
            }
            retry_at = None;
        } else if term.is_none() && starting.is_none() && retry_at.is_none() {
            info!("elected leader: starting a term");
            // A new witness for every term, so its restart wait-out runs from the takeover.
            let witness = authority.as_ref().map(|factory| {
                Box::new(FencedAuthority::new(factory(), leadership.clone(), retry_after)) as Box<dyn LeaseAuthority>
            });
            let (client, ca, term_config, metrics) = (client.clone(), ca.clone(), config.term.clone(), metrics.clone());
            starting = Some(tokio::spawn(async move { Term::start(client, ca, &term_config, witness, metrics).await }));
        }
        let started = async {
            match starting.as_mut() {
                Some(handle) => handle.await,
                None => std::future::pending().await,
            }
        };
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            changed = leading.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            outcome = started => {
                starting = None;
                match outcome {
                    Ok(Ok(new_term)) if leadership.is_leader(Instant::now()) => {
                        let _ = routes.send_replace(new_term.router());
                        info!("leading: serving the node API and the witness");
                        term = Some(new_term);
                    }
                    Ok(Ok(stale)) => stale.stop(),
                    Ok(Err(e)) => {
                        metrics.error("term");
                        warn!(error = %e, "starting the term failed; retrying in {}s", TERM_RETRY.as_secs());
                        retry_at = Some(tokio::time::Instant::now() + TERM_RETRY);
                    }
                    Err(e) => {
                        metrics.error("term");
                        warn!(error = %e, "the term's start was interrupted");
                        retry_at = Some(tokio::time::Instant::now() + TERM_RETRY);
                    }
                }
            }
            _ = retry => retry_at = None,
            // Leadership can lapse without the election loop saying so (its requests hang):
            // look again at the fence's deadline.
            _ = tokio::time::sleep(retry_after) => {}
        }
    }

    info!("shutting down");
    let _ = routes.send_replace(standby_router(retry_after));
    if let Some(handle) = starting.take() {
        handle.abort();
    }
    if let Some(ending) = term.take() {
        if let Err(e) = ending.core().flush().await {
            warn!(error = %e, "status writes still pending at shutdown");
        }
        ending.stop();
    }
    let _ = stop_election.send(true);
    let _ = election.await;
    server.shutdown().await;
    probe_server.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_follow_the_pki_secret() {
        assert_eq!(secret_names("hapair-pki"), ("hapair-tokens".to_string(), "hapair-state".to_string()));
        assert_eq!(secret_names("ca"), ("ca-tokens".to_string(), "ca-state".to_string()));
    }

    #[tokio::test]
    async fn probes_are_ready_only_once_the_node_api_listens() {
        use tower::ServiceExt;
        let health = Arc::new(Health::default());
        let app = probes(Arc::new(Metrics::new()), health.clone());
        let get = |path: &str| {
            axum::http::Request::builder().uri(path).body(axum::body::Body::empty()).unwrap_or_else(|e| panic!("{e}"))
        };
        let status = |app: Router, path: &'static str| async move {
            app.oneshot(get(path)).await.map(|r| r.status()).unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(status(app.clone(), "/healthz").await, StatusCode::OK);
        assert_eq!(status(app.clone(), "/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
        health.ready.store(true, Ordering::SeqCst);
        assert_eq!(status(app.clone(), "/readyz").await, StatusCode::OK);
        assert_eq!(status(app, "/metrics").await, StatusCode::OK);
    }
}
