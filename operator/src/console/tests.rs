//! The console's routes on a real controller (file store, one group), driven through the
//! node API's router as the server runs it: sign-in, cookies, roles, CSRF, the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use http_body_util::BodyExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tower::ServiceExt;

use super::session::{COOKIE_NAME, ConsoleKeys, ConsoleRole};
use super::*;
use crate::controller::metrics::Metrics;
use crate::pki::Ca;
use crate::server::identity::PeerIdentity;
use crate::server::{ApiSettings, NodeApi, Peer, router as node_api_router};
use crate::standalone::file_store::FileStore;

const HOUR: Duration = Duration::from_secs(3600);

struct Fixture {
    app: Router,
    keys: ConsoleKeys,
    _dirs: [tempfile::TempDir; 2],
}

async fn fixture(console: bool) -> Fixture {
    let manifests = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(
        manifests.path().join("g.yaml"),
        "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {name: g}\nspec:\n  nodes:\n    - {name: a, heartbeatAddresses: [198.18.1.1]}\n    - {name: b, heartbeatAddresses: [198.18.1.2]}\n  virtualIPs: [{name: web, address: 198.18.0.100/24, interface: eth0}]\n  flow: [{name: ip, virtualIP: {name: web}}]\n",
    )
    .unwrap();
    let store = FileStore::open(manifests.path(), state.path()).unwrap();
    let controller = Arc::new(
        Controller::start(store, crate::controller::Settings::default(), Arc::new(Metrics::new())).await.unwrap(),
    );
    controller.reconcile().await.unwrap();
    let ca = Ca::generate().unwrap().0;
    let keys = ConsoleKeys::from_ca(&ca);
    let mut api = NodeApi::new(
        controller.clone(),
        Arc::new(ca),
        crate::pki::tokens::TokenFile::new(state.path()),
        None,
        ApiSettings::default(),
    );
    if console {
        api = api.with_routes(router(Arc::new(Console::new(controller.clone(), keys.clone()))));
    }
    Fixture { app: node_api_router(Arc::new(api)), keys, _dirs: [manifests, state] }
}

struct Answer {
    status: u16,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Fixture {
    fn token(&self, role: ConsoleRole, ttl: Duration, now: UnixMillis) -> String {
        self.keys.issue_token(role, Some("alice"), ttl, now, &mut StdRng::seed_from_u64(7)).unwrap().0
    }

    async fn send(&self, request: axum::http::request::Builder, body: Option<String>) -> Answer {
        let mut request = match body {
            Some(b) => request.header(header::CONTENT_TYPE, "application/json").body(Body::from(b)),
            None => request.body(Body::empty()),
        }
        .unwrap();
        let addr: SocketAddr = "198.18.0.9:50000".parse().unwrap();
        request.extensions_mut().insert(Peer { identity: PeerIdentity::Anonymous, addr });
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Answer { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() }
    }

    /// Signs in; the cookie header to send and the CSRF token.
    async fn sign_in(&self, role: ConsoleRole) -> (String, String) {
        let token = self.token(role, HOUR, now_millis());
        let answer = self
            .send(
                Request::post("/ui/api/session").header(header::HOST, "ctl:7443"),
                Some(format!(r#"{{"token":"{token}"}}"#)),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let set = answer.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string();
        let cookie = set.split(';').next().unwrap().to_string();
        let view: SessionView = serde_json::from_str(&answer.body).unwrap();
        (cookie, view.csrf)
    }
}

#[tokio::test]
async fn nothing_but_the_page_and_the_sign_in_is_served_without_a_session() {
    let f = fixture(true).await;
    let page = f.send(Request::get("/ui/"), None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>hapair console</title>"));
    let csp = page.headers.get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(f.send(Request::get("/ui/console.js"), None).await.status, 200);
    assert_eq!(f.send(Request::get("/ui/secrets.txt"), None).await.status, 404);
    for path in ["/ui/api/overview", "/ui/api/stream", "/ui/api/usage", "/ui/api/session"] {
        let answer = f.send(Request::get(path), None).await;
        assert_eq!(answer.status, 401, "{path}: {}", answer.body);
        assert!(answer.body.contains("not signed in"), "{path}: {}", answer.body);
    }
    let forged =
        f.send(Request::get("/ui/api/overview").header(header::COOKIE, format!("{COOKIE_NAME}=e30.AAAA")), None).await;
    assert_eq!(forged.status, 401);
    assert!(forged.body.contains("damaged or was not issued by this controller"), "{}", forged.body);
}

#[tokio::test]
async fn a_wrong_or_expired_token_is_refused_with_the_reason_and_sets_no_cookie() {
    let f = fixture(true).await;
    let sign_in = |token: String| f.send(Request::post("/ui/api/session"), Some(format!(r#"{{"token":"{token}"}}"#)));
    let wrong = sign_in("hpc_bm90IGEgdG9rZW4.AAAA".into()).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("damaged or was not issued by this controller"), "{}", wrong.body);
    assert!(wrong.headers.get(header::SET_COOKIE).is_none());
    let enrollment = sign_in("hpe_abc".into()).await;
    assert!(enrollment.body.contains("console tokens start with hpc_"), "{}", enrollment.body);
    let expired = sign_in(f.token(ConsoleRole::Operator, Duration::from_secs(60), now_millis() - 120_000)).await;
    assert_eq!(expired.status, 401);
    assert!(expired.body.contains("the token expired at"), "{}", expired.body);
    assert!(expired.headers.get(header::SET_COOKIE).is_none());
    let unknown_field =
        f.send(Request::post("/ui/api/session"), Some(r#"{"token":"x","role":"operator"}"#.into())).await;
    assert_eq!(unknown_field.status, 400);
    assert!(unknown_field.body.contains("role"), "{}", unknown_field.body);
}

#[tokio::test]
async fn a_sign_in_sets_a_host_only_http_only_strict_cookie_that_opens_the_overview() {
    let f = fixture(true).await;
    let token = f.token(ConsoleRole::Viewer, HOUR, now_millis());
    let answer = f.send(Request::post("/ui/api/session"), Some(format!(r#"{{"token":"{token}"}}"#))).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let set = answer.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap();
    assert!(set.starts_with(&format!("{COOKIE_NAME}=")), "{set}");
    for attribute in ["Path=/", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=3599"] {
        assert!(set.split("; ").any(|a| a == attribute) || attribute.starts_with("Max-Age"), "{attribute} in {set}");
    }
    let view: SessionView = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(view.role, ConsoleRole::Viewer);
    assert!(view.actor.starts_with("console user \"alice\" (viewer, token c-"), "{}", view.actor);

    let cookie = set.split(';').next().unwrap();
    let overview = f.send(Request::get("/ui/api/overview").header(header::COOKIE, cookie), None).await;
    assert_eq!(overview.status, 200, "{}", overview.body);
    let json: serde_json::Value = serde_json::from_str(&overview.body).unwrap();
    assert_eq!(json["groups"][0]["key"], "default/g");
    assert_eq!(json["groups"][0]["virtualIps"][0]["step"], "ip");
    assert!(json["now"].as_str().unwrap().ends_with('Z'));
    // Among other cookies, in any order.
    let mixed = format!("theme=dark; {cookie}; other=1");
    assert_eq!(f.send(Request::get("/ui/api/usage").header(header::COOKIE, mixed), None).await.status, 200);

    let out = f
        .send(Request::delete("/ui/api/session").header(header::COOKIE, cookie).header(CSRF_HEADER, &view.csrf), None)
        .await;
    assert_eq!(out.status, 204);
    assert!(out.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().contains("Max-Age=0"));
}

#[tokio::test]
async fn a_viewer_gets_403_for_an_action_and_nothing_is_queued() {
    let f = fixture(true).await;
    let (cookie, csrf) = f.sign_in(ConsoleRole::Viewer).await;
    let answer = f
        .send(
            Request::post("/ui/api/groups/default/g/actions")
                .header(header::COOKIE, &cookie)
                .header(CSRF_HEADER, &csrf),
            Some(r#"{"action":"maintenance","enabled":true}"#.into()),
        )
        .await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert!(answer.body.contains("needs the operator role"), "{}", answer.body);
    let overview = f.send(Request::get("/ui/api/overview").header(header::COOKIE, &cookie), None).await;
    assert!(!overview.body.contains("ActionRequested"), "{}", overview.body);
}

#[tokio::test]
async fn an_operators_action_needs_the_csrf_token_and_the_same_origin_and_names_who_asked() {
    let f = fixture(true).await;
    let (cookie, csrf) = f.sign_in(ConsoleRole::Operator).await;
    let post = || Request::post("/ui/api/groups/default/g/actions").header(header::COOKIE, &cookie);
    let body = || Some(r#"{"id":"m1","action":"maintenance","enabled":true}"#.to_string());

    let no_csrf = f.send(post(), body()).await;
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.body);
    assert!(no_csrf.body.contains("missing or wrong CSRF token"), "{}", no_csrf.body);
    let wrong_csrf = f.send(post().header(CSRF_HEADER, "AAAA"), body()).await;
    assert_eq!(wrong_csrf.status, 403);
    let cross_site = f
        .send(
            post()
                .header(CSRF_HEADER, &csrf)
                .header(header::HOST, "ctl:7443")
                .header(header::ORIGIN, "https://evil.example"),
            body(),
        )
        .await;
    assert_eq!(cross_site.status, 403);
    assert!(cross_site.body.contains(r#"origin \"https://evil.example\" refused"#), "{}", cross_site.body);
    let overview = f.send(Request::get("/ui/api/overview").header(header::COOKIE, &cookie), None).await;
    assert!(!overview.body.contains("ActionRequested"), "refused requests queue nothing: {}", overview.body);

    let accepted = f
        .send(
            post()
                .header(CSRF_HEADER, &csrf)
                .header(header::HOST, "ctl:7443")
                .header(header::ORIGIN, "https://ctl:7443"),
            body(),
        )
        .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let outcome =
        f.send(Request::get("/ui/api/groups/default/g/actions/m1").header(header::COOKIE, &cookie), None).await;
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    assert!(outcome.body.contains(r#""outcome":"Pending""#), "{}", outcome.body);
    let overview = f.send(Request::get("/ui/api/overview").header(header::COOKIE, &cookie), None).await;
    assert!(
        overview.body.contains("maintenance m1 requested by console user \\\"alice\\\" (operator, token c-"),
        "{}",
        overview.body
    );

    let unknown = f
        .send(
            Request::post("/ui/api/groups/default/nope/actions")
                .header(header::COOKIE, &cookie)
                .header(CSRF_HEADER, &csrf),
            Some(r#"{"action":"maintenance","enabled":true}"#.into()),
        )
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
}

#[tokio::test]
async fn the_stream_opens_with_the_overview_and_is_marked_long_lived() {
    let f = fixture(true).await;
    let (cookie, _) = f.sign_in(ConsoleRole::Viewer).await;
    let mut request = Request::get("/ui/api/stream").header(header::COOKIE, &cookie).body(Body::empty()).unwrap();
    let addr: SocketAddr = "198.18.0.9:50000".parse().unwrap();
    request.extensions_mut().insert(Peer { identity: PeerIdentity::Anonymous, addr });
    let response = f.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.extensions().get::<StreamingAnswer>().is_some());
    assert_eq!(response.headers().get(header::CONTENT_TYPE).unwrap(), "text/event-stream");
    let mut body = response.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.unwrap().unwrap().unwrap();
    let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(text.starts_with("event: overview\ndata: {"), "{text}");
    assert!(text.contains(r#""key":"default/g""#), "{text}");
    // Nothing changes: the next message is a ping, about five seconds later.
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.unwrap().unwrap().unwrap();
    let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(text.starts_with("event: ping\n"), "{text}");
}

#[tokio::test]
async fn without_the_console_nothing_is_served_under_ui() {
    let f = fixture(false).await;
    assert_eq!(f.send(Request::get("/ui/"), None).await.status, 404);
    let token = f.token(ConsoleRole::Operator, HOUR, now_millis());
    let answer = f.send(Request::post("/ui/api/session"), Some(format!(r#"{{"token":"{token}"}}"#))).await;
    assert_eq!(answer.status, 404);
}
