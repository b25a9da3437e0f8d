//! The node API: HTTPS with mutual TLS, served by the controller, reached by agents (which
//! connect out) and by the CLI.
//!
//! | endpoint | who | what |
//! |---|---|---|
//! | `GET /v1/nodes/{node}/config?revision=N&wait=S` | that node | long-poll the desired config |
//! | `POST /v1/nodes/{node}/report` | that node | post a [`NodeReport`] |
//! | `POST /v1/witness/lease` | a member node | acquire, renew or release a lease |
//! | `POST /v1/enroll` | anyone with a token | trade a one-time token and a CSR for a certificate |
//! | `GET /v1/groups` | admin | every group's status, volumes and recent events |
//! | `POST /v1/groups/{ns}/{name}/actions` | admin | queue an admin action |
//! | `GET /v1/groups/{ns}/{name}/actions/{id}` | admin | an action's outcome |
//! | `GET /healthz`, `GET /metrics` | anyone | liveness, Prometheus metrics |
//! | `/ui/…` | console users | the web console, when enabled ([`NodeApi::with_routes`]) |
//!
//! No client certificate → 401; a certificate that is expired or from another CA → 401 with
//! the reason; a valid certificate for the wrong node or role → 403. Refused requests change
//! nothing. Bodies are limited to [`body::MAX_BODY_BYTES`] (413), malformed JSON gets a 400
//! naming the field, and each client has a request budget (429).
//!
//! Slow or numerous clients cannot hold the server: the TLS handshake, an idle kept-alive
//! connection, the request head and the request body each have a deadline (a body that is
//! late gets a 408 and the connection is closed), and open connections are capped overall
//! and per client address — over a cap a new connection is closed at accept (see [`limits`]
//! and [`ApiSettings`]). The deadlines cover the client's part only: a long-poll may take as
//! long as its `wait`.

pub mod body;
pub mod identity;
pub mod limits;
pub mod ratelimit;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hapair_crds::nodeapi::{
    EnrollRequest, EnrollResponse, GroupKey, LEADER_HEADER, LeaseRequest, LeaseResponse, NodeReport, PROTOCOL_HEADER,
    node_api_version, paths,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::controller::metrics::Metrics;
use crate::controller::publish::Poll;
use crate::controller::store::Store;
use crate::controller::views::ActionRequest;
use crate::controller::{Controller, ReportRefusal};
use crate::desired::actions::Refusal;
use crate::pki::Ca;
use crate::pki::tokens::{RedeemError, TokenError, TokenRedeemer, check_node_name};
use crate::witness::lease::{LeaseAuthority, LeaseJournal, LeaseRefusal};
use body::{ApiFailure, ApiJson};
use identity::{ClientAuth, PeerIdentity};
use limits::{ClockedIo, ConnectionClock, ConnectionLimiter, TimedBody};
use ratelimit::{RateLimiter, RateSettings};

/// Tunables of the node API.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub rate: RateSettings,
    /// Longest long-poll wait honoured, whatever `wait` asks for.
    pub max_wait: Duration,
    /// Lifetime of node certificates issued by enrollment.
    pub node_cert_validity: Duration,
    /// A client that has not finished the TLS handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// A connection without a request in progress — after the handshake or an answer — is
    /// closed after this. It does not run while a handler works on a request, so long-polls
    /// are not cut short; it does run while the answer is written, so it also bounds a
    /// client that does not read its answers.
    pub idle_timeout: Duration,
    /// A request head (request line and headers) must be complete within this of its first
    /// byte; otherwise the connection is closed. A deadline, not an inactivity timer: a
    /// client sending a byte now and then is cut off all the same.
    pub header_timeout: Duration,
    /// A request body must have arrived within this, counted from when the handler starts
    /// reading it; a late one gets a 408 and the connection is closed. Also a deadline.
    pub body_timeout: Duration,
    /// Open connections at most, over all clients; 0 for no limit. Over it, a new
    /// connection is closed as soon as it is accepted. Lowered at start if the open-file
    /// limit cannot accommodate it.
    pub max_connections: usize,
    /// Open connections at most from one IP address; 0 for no limit.
    pub max_connections_per_client: usize,
    /// Base URLs of every controller of the set (replicated controllers on etcd), told to
    /// agents when they enroll; empty for a single controller.
    pub controllers: Vec<String>,
}

impl ApiSettings {
    /// Ample for a TLS 1.3 handshake over a slow or lossy link (two round trips).
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// What hyper allowed before (its header timeout ran from the last answer, so it was the
    /// idle timeout too). Agents re-poll right after an answer, so their connections are
    /// rarely idle; their pool keeps idle connections longer (90 s) but notices a close.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Agents send a request's head, a few hundred bytes, in one write: ample even over a
    /// lossy link, and it is what a client trickling a head gets.
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// The largest body (1 MiB) in 30 s needs about 35 KB/s; a node report is far
    /// smaller, and agents give up on a report after 5 s anyway. With the other deadlines
    /// this bounds how long a client that trickles bytes holds a connection to about 80 s.
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// An agent holds one long-poll connection plus, at times, one or two for reports and
    /// leases; 1000 groups (the scale the controller is benchmarked at) are 2000 agents.
    /// 4096 serves them with room to spare while keeping memory and descriptors bounded.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
    /// One address can then hold at most 1/64 of the server. An agent needs up to three, so
    /// this leaves room for about twenty agents behind one NAT address; raise it (or set 0)
    /// where more share an address, e.g. a Kubernetes Service with
    /// `externalTrafficPolicy: Cluster`, which shows agents as the nodes' addresses.
    pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 64;
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            rate: RateSettings::default(),
            max_wait: Duration::from_secs(60),
            node_cert_validity: crate::pki::LEAF_VALIDITY,
            handshake_timeout: ApiSettings::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: ApiSettings::DEFAULT_IDLE_TIMEOUT,
            header_timeout: ApiSettings::DEFAULT_HEADER_TIMEOUT,
            body_timeout: ApiSettings::DEFAULT_BODY_TIMEOUT,
            max_connections: ApiSettings::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: ApiSettings::DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            controllers: Vec::new(),
        }
    }
}

/// Everything the handlers need.
pub struct NodeApi<S: Store> {
    controller: Arc<Controller<S>>,
    ca: Arc<Ca>,
    tokens: Arc<dyn TokenRedeemer>,
    authority: Option<Mutex<Box<dyn LeaseAuthority>>>,
    /// Where each grant and release is recorded before it is answered, when a successor
    /// must honour it (controllers on etcd).
    journal: Option<Arc<dyn LeaseJournal>>,
    /// Keeps journal writes in decision order: decide, record, answer, one at a time.
    lease_order: tokio::sync::Mutex<()>,
    started: Instant,
    limiter: RateLimiter,
    settings: ApiSettings,
    /// More routes served behind the same guard (rate limit, metrics, span): the console.
    extra: Option<Router>,
}

impl<S: Store> std::fmt::Debug for NodeApi<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeApi").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl<S: Store> NodeApi<S> {
    /// `authority` decides lease requests; without one the lease endpoint answers 503.
    /// Its clock (the `now` it is given) starts here. `tokens` burns enrollment tokens.
    pub fn new(
        controller: Arc<Controller<S>>,
        ca: Arc<Ca>,
        tokens: impl TokenRedeemer + 'static,
        authority: Option<Box<dyn LeaseAuthority>>,
        settings: ApiSettings,
    ) -> Self {
        NodeApi {
            controller,
            ca,
            tokens: Arc::new(tokens),
            authority: authority.map(Mutex::new),
            journal: None,
            lease_order: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            limiter: RateLimiter::new(settings.rate),
            settings,
            extra: None,
        }
    }

    /// Also serves `routes` (the web console) on this listener,
    /// behind the same rate limit, metrics and tracing.
    pub fn with_routes(mut self, routes: Router) -> Self {
        self.extra = Some(routes);
        self
    }

    /// Records every grant and release in `journal` before answering it; an answer whose
    /// record cannot be written becomes a denial.
    pub fn with_journal(mut self, journal: Arc<dyn LeaseJournal>) -> Self {
        self.journal = Some(journal);
        self
    }
}

/// Who sent a request: the connection's identity and address.
#[derive(Clone, Debug)]
pub struct Peer {
    pub identity: PeerIdentity,
    pub addr: SocketAddr,
}

impl Peer {
    /// The node this peer authenticates as, if it may act for `node`.
    fn require_node(&self, node: &str) -> Result<(), ApiFailure> {
        match &self.identity {
            PeerIdentity::Node(n) if n == node => Ok(()),
            PeerIdentity::Node(n) => Err(ApiFailure::forbidden(format!("certificate is for node {n:?}, not {node:?}"))),
            other => self.refuse_non_node(other),
        }
    }

    fn any_node(&self) -> Result<&str, ApiFailure> {
        match &self.identity {
            PeerIdentity::Node(n) => Ok(n),
            other => self.refuse_non_node(other),
        }
    }

    fn refuse_non_node<T>(&self, identity: &PeerIdentity) -> Result<T, ApiFailure> {
        Err(match identity {
            PeerIdentity::Anonymous => ApiFailure::unauthorized("a client certificate is required"),
            PeerIdentity::Invalid(why) => ApiFailure::unauthorized(why.clone()),
            _ => ApiFailure::forbidden("only node certificates may use this endpoint"),
        })
    }

    fn require_admin(&self) -> Result<(), ApiFailure> {
        match &self.identity {
            PeerIdentity::Admin => Ok(()),
            PeerIdentity::Anonymous => Err(ApiFailure::unauthorized("a client certificate is required")),
            PeerIdentity::Invalid(why) => Err(ApiFailure::unauthorized(why.clone())),
            PeerIdentity::Node(n) => Err(ApiFailure::forbidden(format!("node {n:?} may not use the admin API"))),
        }
    }
}

/// The axum router of the node API.
pub fn router<S: Store>(api: Arc<NodeApi<S>>) -> Router {
    let group_actions = paths::actions("{namespace}", "{name}");
    let mut routes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics::<S>))
        .route(paths::ENROLL, post(enroll::<S>))
        .route(&paths::config("{node}"), get(config::<S>))
        .route(&paths::report("{node}"), post(report::<S>))
        .route(paths::LEASE, post(lease::<S>))
        .route(paths::GROUPS, get(groups::<S>))
        .route(&group_actions, post(submit_action::<S>))
        .route(&format!("{group_actions}/{{id}}"), get(get_action::<S>))
        .with_state(api.clone());
    if let Some(extra) = &api.extra {
        routes = routes.merge(extra.clone());
    }
    routes
        .fallback(|| async { ApiFailure::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(api, guard::<S>))
}

/// The node-API version a request was made in, as the guard read it.
#[derive(Clone, Copy, Debug)]
struct NodeApiVersion(u8);

/// Rate limiting, request metrics and a tracing span, around every endpoint.
async fn guard<S: Store>(
    State(api): State<Arc<NodeApi<S>>>,
    Extension(peer): Extension<Peer>,
    matched: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let endpoint = matched.map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let key = match &peer.identity {
        PeerIdentity::Node(_) | PeerIdentity::Admin => peer.identity.label(),
        _ => format!("ip:{}", peer.addr.ip()),
    };
    let span = info_span!("request", endpoint = %endpoint, peer = %peer.identity.label());
    let announced = request.headers().get(PROTOCOL_HEADER).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let version = node_api_version(announced.as_deref());
    let mut response = match api.limiter.check(&key, Instant::now()) {
        Err(wait) if endpoint != "/healthz" => {
            let mut failure =
                ApiFailure::new(StatusCode::TOO_MANY_REQUESTS, format!("rate limit exceeded for {key}; slow down"));
            failure.retry_after = Some(wait.as_secs().max(1));
            failure.into_response()
        }
        _ => match &version {
            // A peer out of skew would misread whatever it got; it is told why instead.
            Err(message) => {
                span.in_scope(|| warn!(peer = %peer.identity.label(), "{message}"));
                ApiFailure::new(StatusCode::BAD_REQUEST, message.clone()).into_response()
            }
            Ok(v) => {
                request.extensions_mut().insert(NodeApiVersion(*v));
                next.run(request).instrument(span.clone()).await
            }
        },
    };
    if let (Some(_), Ok(v)) = (&announced, &version) {
        // Only a peer that announced gets an answer: version 1 never sees the header.
        response.headers_mut().insert(PROTOCOL_HEADER, HeaderValue::from(u16::from(*v)));
    }
    let code = response.status().as_u16();
    if code >= 400 {
        span.in_scope(|| debug!(code, "request refused"));
    }
    api.controller.metrics().request(&endpoint, code);
    response
}

async fn metrics<S: Store>(State(api): State<Arc<NodeApi<S>>>) -> Response {
    let text = api.controller.metrics().render();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

fn parse_number(query: &BTreeMap<String, String>, name: &str) -> Result<Option<u64>, ApiFailure> {
    query
        .get(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiFailure::bad_request(format!("query parameter {name}: {v:?} is not a number")))
        })
        .transpose()
}

async fn config<S: Store>(
    State(api): State<Arc<NodeApi<S>>>,
    Extension(peer): Extension<Peer>,
    Path(node): Path<String>,
    query: Result<Query<BTreeMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiFailure> {
    peer.require_node(&node)?;
    if !api.controller.knows_node(&node) {
        return Err(ApiFailure::forbidden(format!("node {node:?} is not in any group")));
    }
    let Query(query) = query.map_err(|e| ApiFailure::bad_request(format!("query: {e}")))?;
    let have = parse_number(&query, "revision")?;
    let wait = Duration::from_secs(parse_number(&query, "wait")?.unwrap_or(0)).min(api.settings.max_wait);
    match api.controller.poll_config(&node, have, wait).await {
        Poll::Changed(bundle) => Ok(Json(bundle.as_ref()).into_response()),
        Poll::Unchanged => Ok(StatusCode::NOT_MODIFIED.into_response()),
        Poll::Unknown => Err(ApiFailure::forbidden(format!("node {node:?} is not in any group"))),
    }
}

async fn report<S: Store>(
    State(api): State<Arc<NodeApi<S>>>,
    Extension(peer): Extension<Peer>,
    Path(node): Path<String>,
    request: Request,
) -> Result<StatusCode, ApiFailure> {
    // Authentication comes before the body is even read.
    peer.require_node(&node)?;
    if !api.controller.knows_node(&node) {
        return Err(ApiFailure::forbidden(format!("node {node:?} is not in any group")));
    }
    let node_api = request.extensions().get::<NodeApiVersion>().map_or(1, |v| v.0);
    let ApiJson(report) = ApiJson::<NodeReport>::from_request(request, &()).await?;
    match api.controller.accept_report(&node, report, node_api).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(refusal @ (ReportRefusal::NodeMismatch { .. } | ReportRefusal::NotAMember { .. })) => {
            api.controller.metrics().error("report");
            Err(ApiFailure::forbidden(refusal.to_string()))
        }
    }
}

async fn lease<S: Store>(
    State(api): State<Arc<NodeApi<S>>>,
    Extension(peer): Extension<Peer>,
    request: Request,
) -> Result<Json<LeaseResponse>, ApiFailure> {
    let cert = peer.any_node()?.to_string();
    let ApiJson(lease) = ApiJson::<LeaseRequest>::from_request(request, &()).await?;
    let params = api.controller.admit_lease(&cert, &lease).await.map_err(|refusal| {
        api.controller.metrics().witness_decision("refused");
        let status = match refusal {
            LeaseRefusal::OtherNode { .. } | LeaseRefusal::NotAMember { .. } => StatusCode::FORBIDDEN,
            LeaseRefusal::UnknownGroup(_) => StatusCode::NOT_FOUND,
            LeaseRefusal::NoWitness(_) | LeaseRefusal::Deleting(_) => StatusCode::CONFLICT,
        };
        ApiFailure::new(status, refusal.to_string())
    })?;
    let Some(authority) = &api.authority else {
        return Err(ApiFailure::new(StatusCode::SERVICE_UNAVAILABLE, "this controller has no witness configured"));
    };
    let _in_order = match &api.journal {
        Some(_) => Some(api.lease_order.lock().await),
        None => None,
    };
    let now = api.started.elapsed();
    let (answer, record) = {
        let mut authority = authority.lock().unwrap_or_else(|p| p.into_inner());
        let answer = authority.handle(now, &lease, params);
        (answer, authority.record(&lease.group))
    };
    if let (Some(journal), Some(record)) = (&api.journal, record)
        && !matches!(answer, LeaseResponse::Denied { .. })
        && let Err(e) = journal.write(&lease.group, &record).await
    {
        // Unrecorded, the decision must not be used: a successor would not honour it. The
        // authority may believe it granted, which only delays others until it expires.
        // Answered as a controller that does not lead, so the agents' broadcast takes
        // another controller's answer instead of waiting out a denial.
        api.controller.metrics().error("witness-journal");
        api.controller.metrics().witness_decision("unrecorded");
        warn!(group = %lease.group, error = %e, "witness: the decision could not be recorded; answering 503");
        let mut failure = ApiFailure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this controller could not record its witness decision ({e}); not granted, ask the leader"),
        );
        failure.retry_after = Some(1);
        return Err(failure);
    }
    let decision = match &answer {
        LeaseResponse::Granted { .. } => "granted",
        LeaseResponse::Denied { .. } => "denied",
        LeaseResponse::Released => "released",
    };
    api.controller.metrics().witness_decision(decision);
    let _span = info_span!("group", group = %lease.group, node = %cert, epoch = lease.epoch).entered();
    info!(op = ?lease.op, decision, "witness: {answer:?}");
    Ok(Json(answer))
}

async fn enroll<S: Store>(
    State(api): State<Arc<NodeApi<S>>>,
    ApiJson(request): ApiJson<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiFailure> {
    let result = enroll_inner(&api, request).await;
    api.controller.metrics().enrollment(if result.is_ok() { "issued" } else { "refused" });
    result.map(Json)
}

async fn enroll_inner<S: Store>(api: &NodeApi<S>, request: EnrollRequest) -> Result<EnrollResponse, ApiFailure> {
    check_node_name(&request.node).map_err(|e| ApiFailure::bad_request(format!("node: {e}")))?;
    // Sign first: a bad CSR must not burn the token. The certificate is only handed out
    // once the token is burned.
    let certificate_pem = api
        .ca
        .sign_node_csr(&request.node, &request.csr_pem, api.settings.node_cert_validity)
        .map_err(|e| ApiFailure::bad_request(format!("csrPem: {e}")))?;
    let now = crate::support::timestamp::now_millis();
    match api.tokens.redeem(&request.token, &request.node, now).await {
        Ok(()) => {
            info!(node = %request.node, "enrolled node");
            Ok(EnrollResponse { certificate_pem, ca_pem: api.ca.cert_pem().to_string(), controllers: Vec::new() })
        }
        Err(RedeemError::Token(e @ TokenError::WrongNode { .. })) => Err(ApiFailure::forbidden(e.to_string())),
        Err(RedeemError::Token(e @ (TokenError::InvalidNode(_) | TokenError::ReservedNode))) => {
            Err(ApiFailure::bad_request(e.to_string()))
        }
        Err(RedeemError::Token(e)) => {
            warn!(node = %request.node, "enrollment refused: {e}");
            Err(ApiFailure::unauthorized(e.to_string()))
        }
        Err(e @ RedeemError::Backend(_)) => {
            api.controller.metrics().error("store");
            Err(ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
    }
}

async fn groups<S: Store>(
    State(api): State<Arc<NodeApi<S>>>,
    Extension(peer): Extension<Peer>,
) -> Result<Response, ApiFailure> {
    peer.require_admin()?;
    Ok(Json(api.controller.overview().await).into_response())
}

async fn submit_action<S: Store>(
    State(api): State<Arc<NodeApi<S>>>,
    Extension(peer): Extension<Peer>,
    Path((namespace, name)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiFailure> {
    peer.require_admin()?;
    let ApiJson(action) = ApiJson::<ActionRequest>::from_request(request, &()).await?;
    let key = GroupKey::new(namespace, name);
    match api.controller.submit_action(&key, action, "the admin certificate").await {
        Ok(view) => Ok((StatusCode::ACCEPTED, Json(view)).into_response()),
        Err(refusal) => {
            api.controller.metrics().error("action");
            Err(action_refused(refusal))
        }
    }
}

/// The answer to an action the controller refused to queue.
pub(crate) fn action_refused(refusal: Refusal) -> ApiFailure {
    let status = match refusal {
        Refusal::NotFound(_) => StatusCode::NOT_FOUND,
        Refusal::Invalid(_) => StatusCode::BAD_REQUEST,
        Refusal::Conflict(_) => StatusCode::CONFLICT,
    };
    ApiFailure::new(status, refusal.to_string())
}

/// Put in a response's extensions by a handler whose answer streams for long (server-sent
/// events): the connection counts as busy until the body ends, so the idle deadline, which
/// otherwise runs while an answer is written, does not cut it.
#[derive(Clone, Copy, Debug)]
pub struct StreamingAnswer;

async fn get_action<S: Store>(
    State(api): State<Arc<NodeApi<S>>>,
    Extension(peer): Extension<Peer>,
    Path((namespace, name, id)): Path<(String, String, String)>,
) -> Result<Response, ApiFailure> {
    peer.require_admin()?;
    let key = GroupKey::new(namespace, name);
    match api.controller.action(&key, &id).await {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiFailure::new(StatusCode::NOT_FOUND, format!("no action {id:?} on HaGroup {key}"))),
    }
}

use axum::extract::FromRequest;

/// What a replica that is not the elected leader answers on the node API: 503 with a
/// `Retry-After`, so agents (and the CLI) retry and reach the leader on another attempt.
/// Its state may be out of date and it must never grant a lease, so it serves nothing else.
pub fn standby_router(retry_after: Duration) -> Router {
    standby_router_naming(retry_after, None)
}

/// [`standby_router`] that also names the leader's base URL, when it is known, in the
/// `x-hapair-leader` header and the message, so clients go there next.
pub fn standby_router_naming(retry_after: Duration, leader: Option<String>) -> Router {
    let seconds = retry_after.as_secs().max(1);
    Router::new().route("/healthz", get(|| async { "ok\n" })).fallback(move || {
        let leader = leader.clone();
        async move {
            let message = match &leader {
                Some(url) => format!("this hapair controller is not the leader; the leader is {url}"),
                None => "this hapair-operator replica is not the leader; retry (another replica serves the node API)"
                    .to_string(),
            };
            let mut failure = ApiFailure::new(StatusCode::SERVICE_UNAVAILABLE, message);
            failure.retry_after = Some(seconds);
            let mut response = failure.into_response();
            if let Some(value) = leader.and_then(|url| axum::http::HeaderValue::from_str(&url).ok()) {
                response.headers_mut().insert(LEADER_HEADER, value);
            }
            response
        }
    })
}

/// The deadlines of one connection.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    handshake: Duration,
    idle: Duration,
    header: Duration,
    body: Duration,
}

/// One connection: TLS handshake, then HTTP/1 until the client or [`Server::shutdown`] ends it.
#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    auth: ClientAuth,
    routes: watch::Receiver<Router>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    timeouts: Timeouts,
) {
    let tls = match tokio::time::timeout(timeouts.handshake, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.error("tls");
            debug!(%addr, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics.error("tls");
            metrics.api_timeout("handshake");
            debug!(%addr, "TLS handshake timed out");
            return;
        }
    };
    let identity = auth.identify(tls.get_ref().1.peer_certificates());
    let peer = Peer { identity, addr };
    let clock = ConnectionClock::new();
    let service_clock = clock.clone();
    let body_metrics = metrics.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        // hyper calls this as soon as the head is parsed: from here the handler's time is
        // its own, and the connection is idle again once it has answered.
        let handling = service_clock.handler_started();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(peer.clone());
        let timed_out = Arc::new(AtomicBool::new(false));
        let request =
            Request::from_parts(parts, axum::body::Body::new(TimedBody::new(body, timeouts.body, timed_out.clone())));
        let app = routes.borrow().clone();
        let metrics = body_metrics.clone();
        async move {
            let mut response = app.oneshot(request).await?;
            if response.extensions().get::<StreamingAnswer>().is_some() {
                // The guard goes with the body: the connection is idle once the stream ends.
                response = response.map(|body| {
                    axum::body::Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
                        let _busy = &handling;
                        frame
                    }))
                });
            } else {
                drop(handling);
            }
            if timed_out.load(Ordering::SeqCst) {
                // The rest of the body may still be on its way: the connection cannot be
                // reused, and a client this slow should not keep it.
                metrics.api_timeout("body");
                debug!(%addr, "request body timed out");
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // The ConnectionClock does its job (see limits); hyper's would cut idle
        // connections at the head deadline.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(ClockedIo::new(tls, clock.clone())), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!(%addr, error = %e, "connection ended with an error");
            }
        }
        stall = clock.stalled(timeouts.idle, timeouts.header) => {
            // Dropping the connection closes the socket; a client this slow, or gone, is
            // not owed a graceful close.
            metrics.api_timeout(stall.label());
            debug!(%addr, phase = stall.label(), "connection closed: client too slow or idle");
        }
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
}

/// A running node API server.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves `api` on `listener` with TLS until [`Server::shutdown`], with the connection
    /// limits and timeouts of its [`ApiSettings`].
    pub fn start<S: Store>(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        auth: ClientAuth,
        api: Arc<NodeApi<S>>,
    ) -> std::io::Result<Server> {
        let settings = api.settings.clone();
        let metrics = api.controller.metrics().clone();
        // The sender may go: a receiver keeps the last router it was given.
        let (_, routes) = watch::channel(router(api));
        Server::start_routed_with(listener, tls, auth, routes, metrics, &settings)
    }

    /// Serves whatever router `routes` holds at the time of each request, so that the
    /// Kubernetes operator can switch between the leader's node API and
    /// [`standby_router`] without closing connections. Choosing per request rather than per
    /// connection matters: a kept-alive connection of an agent must not keep reaching a
    /// witness that lost its leadership. Of `settings`, the connection limits and timeouts
    /// apply.
    pub fn start_routed_with(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        auth: ClientAuth,
        routes: watch::Receiver<Router>,
        metrics: Arc<Metrics>,
        settings: &ApiSettings,
    ) -> std::io::Result<Server> {
        let local_addr = listener.local_addr()?;
        let (shutdown, mut stop) = watch::channel(false);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let max_connections = limits::fit_fd_limit(settings.max_connections);
        let limiter = ConnectionLimiter::new(max_connections, settings.max_connections_per_client, metrics.clone());
        let timeouts = Timeouts {
            handshake: settings.handshake_timeout,
            idle: settings.idle_timeout,
            header: settings.header_timeout,
            body: settings.body_timeout,
        };
        let task = tokio::spawn(async move {
            loop {
                let (tcp, addr) = tokio::select! {
                    _ = stop.changed() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let slot = match limiter.admit(addr.ip()) {
                    Ok(slot) => slot,
                    Err(refused) => {
                        // Closed before the handshake: costs a descriptor for a moment, no TLS.
                        limiter.refused(addr, refused);
                        drop(tcp);
                        continue;
                    }
                };
                let (acceptor, auth, routes, metrics, stop) =
                    (acceptor.clone(), auth.clone(), routes.clone(), metrics.clone(), stop.clone());
                tokio::spawn(async move {
                    serve_connection(tcp, addr, acceptor, auth, routes, metrics, stop, timeouts).await;
                    drop(slot);
                });
            }
        });
        Ok(Server { local_addr, shutdown, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets open requests finish briefly, and waits for the accept loop.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}
