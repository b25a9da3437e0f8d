//! The web console: the controller serves a page under `/ui/` on its HTTPS listener that
//! shows every group live and runs the admin actions, for whoever signed in with a console
//! token.
//!
//! | endpoint | who | what |
//! |---|---|---|
//! | `GET /ui/`, `GET /ui/{asset}` | anyone | the page: plain files embedded in the binary |
//! | `POST /ui/api/session` | anyone with a token | sign in: `{"token": "hpc_…"}` sets the session cookie |
//! | `GET /ui/api/session` | signed in | role, expiry and the CSRF token |
//! | `DELETE /ui/api/session` | signed in | sign out |
//! | `GET /ui/api/overview` | signed in | what `GET /v1/groups` answers |
//! | `GET /ui/api/stream` | signed in | server-sent events: the overview each time it changes |
//! | `GET /ui/api/usage` | signed in | each node's CPU and memory over the last hour |
//! | `POST /ui/api/groups/{ns}/{name}/actions` | operator | queue an admin action |
//! | `GET /ui/api/groups/{ns}/{name}/actions/{id}` | signed in | its outcome |
//!
//! The same checks as the admin API apply to actions (the controller's `submit_action`),
//! and the audit event names the console user. No anonymous access: everything under
//! `/ui/api/` but the sign-in answers 401 without a valid session. A state-changing request
//! needs the session's CSRF token in `x-csrf-token` and, when the browser sends an `Origin`,
//! one that matches the host it asked; a viewer's gets 403. The cookie is HttpOnly, Secure
//! and SameSite=Strict.
//!
//! Boundaries: the console reads the controller's views and submits actions through it; it
//! holds no state of its own but the signing keys ([`session`]).

mod assets;
pub mod session;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use hapair_crds::nodeapi::GroupKey;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::controller::Controller;
use crate::controller::store::Store;
use crate::controller::views::ActionRequest;
use crate::server::body::{ApiFailure, ApiJson};
use crate::server::{StreamingAnswer, action_refused};
use crate::support::timestamp::{UnixMillis, format_millis, now_millis};
use session::{AuthError, COOKIE_NAME, CSRF_HEADER, ConsoleKeys, ConsoleRole, Session};

/// How often the stream looks for a change: "within a second" with room to spare.
const STREAM_POLL: Duration = Duration::from_millis(250);
/// Longest silence on the stream; the page shows the link lost after about two of these.
const STREAM_PING: Duration = Duration::from_secs(5);

/// What the console handlers share.
pub struct Console<S: Store> {
    controller: Arc<Controller<S>>,
    keys: ConsoleKeys,
}

impl<S: Store> std::fmt::Debug for Console<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl<S: Store> Console<S> {
    pub fn new(controller: Arc<Controller<S>>, keys: ConsoleKeys) -> Self {
        Console { controller, keys }
    }

    /// The console of `controller`, with sessions signed with keys from `ca`: the routes
    /// to hand to [`crate::server::NodeApi::with_routes`].
    pub fn routes(controller: Arc<Controller<S>>, ca: &crate::pki::Ca) -> Router {
        router(Arc::new(Console::new(controller, ConsoleKeys::from_ca(ca))))
    }
}

/// The console's routes, to merge into the node API's router.
pub fn router<S: Store>(console: Arc<Console<S>>) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { assets::serve("index.html") }))
        .route("/ui/{asset}", get(|Path(asset): Path<String>| async move { assets::serve(&asset) }))
        .route("/ui/api/session", get(session_info::<S>).post(sign_in::<S>).delete(sign_out::<S>))
        .route("/ui/api/overview", get(overview::<S>))
        .route("/ui/api/stream", get(stream::<S>))
        .route("/ui/api/usage", get(usage::<S>))
        .route("/ui/api/groups/{namespace}/{name}/actions", axum::routing::post(submit_action::<S>))
        .route("/ui/api/groups/{namespace}/{name}/actions/{id}", get(get_action::<S>))
        .with_state(console)
}

/// The session cookie's value, from however many `Cookie` headers the browser sent.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE_NAME)?.strip_prefix('='))
}

fn refused(e: AuthError) -> ApiFailure {
    ApiFailure::unauthorized(e.to_string())
}

impl<S: Store> Console<S> {
    fn session(&self, headers: &HeaderMap) -> Result<Session, ApiFailure> {
        self.keys.check_session(cookie(headers), now_millis()).map_err(refused)
    }

    /// For requests that change something: same origin, the CSRF token, and `role` if given.
    fn authorize_change(&self, headers: &HeaderMap, need: Option<ConsoleRole>) -> Result<Session, ApiFailure> {
        check_origin(headers)?;
        let session = self.session(headers)?;
        let presented = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !self.keys.check_csrf(&session, presented) {
            return Err(ApiFailure::forbidden(format!(
                "missing or wrong CSRF token: send the one GET /ui/api/session gives in the {CSRF_HEADER} header"
            )));
        }
        if let Some(need) = need
            && session.token.role != need
        {
            return Err(ApiFailure::forbidden(format!(
                "{} may not do this: it needs the {} role",
                session.token.actor(),
                need.as_str()
            )));
        }
        Ok(session)
    }
}

/// A browser names the page a request comes from in `Origin`; one from another site is
/// refused even before its cookie (which SameSite=Strict already withholds) is looked at.
fn check_origin(headers: &HeaderMap) -> Result<(), ApiFailure> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.strip_prefix("https://").unwrap_or("");
    if origin_host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
        return Err(ApiFailure::forbidden(format!("request from origin {origin:?} refused: not this console")));
    }
    Ok(())
}

/// What the page learns about its session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub role: ConsoleRole,
    /// Who signed in, as audit events name them.
    pub actor: String,
    /// RFC 3339.
    pub expires: String,
    pub csrf: String,
}

fn session_view(keys: &ConsoleKeys, session: &Session) -> SessionView {
    SessionView {
        role: session.token.role,
        actor: session.token.actor(),
        expires: format_millis(session.exp),
        csrf: keys.csrf(session),
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

fn set_cookie(value: &str, max_age_seconds: i64) -> HeaderValue {
    let text = format!("{COOKIE_NAME}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age_seconds}");
    // Cookie values are base64url and dots, always valid header text.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

async fn sign_in<S: Store>(State(console): State<Arc<Console<S>>>, request: Request) -> Result<Response, ApiFailure> {
    check_origin(request.headers())?;
    let ApiJson(SignIn { token }) = ApiJson::<SignIn>::from_request(request, &()).await?;
    let now = now_millis();
    let claims = console.keys.check_token(&token, now).map_err(|e| {
        info!("console sign-in refused: {e}");
        console.controller.metrics().error("console-sign-in");
        refused(e)
    })?;
    let (value, session) = console.keys.open_session(claims, now, &mut rand::rng());
    info!(actor = %session.token.actor(), "console sign-in");
    let mut response = Json(session_view(&console.keys, &session)).into_response();
    let max_age = (session.exp - now) / 1000;
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(&value, max_age));
    Ok(response)
}

async fn session_info<S: Store>(
    State(console): State<Arc<Console<S>>>,
    headers: HeaderMap,
) -> Result<Json<SessionView>, ApiFailure> {
    let session = console.session(&headers)?;
    Ok(Json(session_view(&console.keys, &session)))
}

async fn sign_out<S: Store>(
    State(console): State<Arc<Console<S>>>,
    headers: HeaderMap,
) -> Result<Response, ApiFailure> {
    console.authorize_change(&headers, None)?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie("", 0));
    Ok(response)
}

/// The overview and the time it was read.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ConsoleOverview {
    /// RFC 3339, the controller's clock.
    now: String,
    #[serde(flatten)]
    overview: crate::controller::views::GroupsOverview,
}

/// What the page renders from: `overview`, stamped with the controller's time.
fn overview_json(overview: crate::controller::views::GroupsOverview) -> String {
    serde_json::to_string(&ConsoleOverview { now: format_millis(now_millis()), overview }).unwrap_or_default()
}

async fn overview<S: Store>(
    State(console): State<Arc<Console<S>>>,
    headers: HeaderMap,
) -> Result<Response, ApiFailure> {
    console.session(&headers)?;
    let json = overview_json(console.controller.overview().await);
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

async fn usage<S: Store>(State(console): State<Arc<Console<S>>>, headers: HeaderMap) -> Result<Response, ApiFailure> {
    console.session(&headers)?;
    let (nodes, bytes) = console.controller.usage_history().await;
    Ok(Json(serde_json::json!({ "nodes": nodes, "historyBytes": bytes })).into_response())
}

/// Sends the overview at once and then whenever it changes (the `now` field aside), a
/// `ping` when nothing changed for [`STREAM_PING`] (so the page can tell a silent link from
/// a quiet pair), and `signed-out` when the session ends, which also ends the stream.
async fn stream<S: Store>(State(console): State<Arc<Console<S>>>, headers: HeaderMap) -> Result<Response, ApiFailure> {
    let session = console.session(&headers)?;
    let state = StreamState { console, exp: session.exp, last: String::new(), sent: Instant::now(), done: false };
    let events = futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            if now_millis() >= state.exp {
                state.done = true;
                let event = Event::default().event("signed-out").data("the session expired; sign in again");
                return Some((Ok::<_, Infallible>(event), state));
            }
            let overview = state.console.controller.overview().await;
            let fingerprint = serde_json::to_string(&overview).unwrap_or_default();
            if fingerprint != state.last {
                let json = overview_json(overview);
                state.last = fingerprint;
                state.sent = Instant::now();
                return Some((Ok(Event::default().event("overview").data(json)), state));
            }
            if state.sent.elapsed() >= STREAM_PING {
                state.sent = Instant::now();
                return Some((Ok(Event::default().event("ping").data(format_millis(now_millis()))), state));
            }
            tokio::time::sleep(STREAM_POLL).await;
        }
    });
    Ok(streaming(Sse::new(events)))
}

struct StreamState<S: Store> {
    console: Arc<Console<S>>,
    exp: UnixMillis,
    /// The overview last sent, serialized.
    last: String,
    sent: Instant,
    done: bool,
}

/// Marks a long-lived answer, so the server's idle deadline does not cut it.
fn streaming<T: Stream<Item = Result<Event, Infallible>> + Send + 'static>(sse: Sse<T>) -> Response {
    let mut response = sse.into_response();
    response.extensions_mut().insert(StreamingAnswer);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn submit_action<S: Store>(
    State(console): State<Arc<Console<S>>>,
    Path((namespace, name)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiFailure> {
    let session = console.authorize_change(request.headers(), Some(ConsoleRole::Operator))?;
    let ApiJson(action) = ApiJson::<ActionRequest>::from_request(request, &()).await?;
    let key = GroupKey::new(namespace, name);
    match console.controller.submit_action(&key, action, &session.token.actor()).await {
        Ok(view) => Ok((StatusCode::ACCEPTED, Json(view)).into_response()),
        Err(refusal) => {
            console.controller.metrics().error("action");
            Err(action_refused(refusal))
        }
    }
}

async fn get_action<S: Store>(
    State(console): State<Arc<Console<S>>>,
    Path((namespace, name, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiFailure> {
    console.session(&headers)?;
    let key = GroupKey::new(namespace, name);
    match console.controller.action(&key, &id).await {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiFailure::new(StatusCode::NOT_FOUND, format!("no action {id:?} on HaGroup {key}"))),
    }
}

#[cfg(test)]
mod tests;
