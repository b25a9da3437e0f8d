//! The agent's local HTTP endpoints: `/healthz`, `/metrics` (Prometheus text),
//! `/v1/status` (JSON of the latest [`StatusSnapshot`] the runtime published), and the
//! role checks `/primary` and `/standby` for load balancers.
//!
//! The role checks answer as Patroni's do, so HAProxy's `option httpchk GET /primary` or a
//! cloud load balancer's HTTP health check can send traffic to whichever node serves:
//! 200 only in that role (Primary: the flow is up and serving; Standby: standing by),
//! 503 otherwise, including while promoting or demoting. An agent that runs several groups
//! needs `?group=namespace/name`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hapair_crds::hagroup::NodeRole;
use hapair_crds::nodeapi::{GroupReport, WipeReport};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::metrics::AgentMetrics;

/// What `/v1/status` shows: the node and each of its groups as the runtime last saw them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusSnapshot {
    pub node: String,
    pub agent_version: String,
    pub uptime_seconds: u64,
    /// Revision of the desired config in force, if any was accepted yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<u64>,
    /// Why the latest desired config was refused, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    #[serde(default)]
    pub groups: Vec<GroupReport>,
    /// Deleted volumes this node was asked to erase, and how that went.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wipes: Vec<WipeReport>,
    /// The node-API version agreed with the controller (see docs/upgrades.md), once it
    /// has answered a report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_protocol_version: Option<u8>,
}

#[derive(Clone, Debug)]
struct Shared {
    metrics: Arc<AgentMetrics>,
    status: watch::Receiver<StatusSnapshot>,
}

/// A running endpoint server; dropping it (or calling [`EndpointServer::shutdown`]) stops it.
#[derive(Debug)]
pub struct EndpointServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl EndpointServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for the server task to end.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

impl Drop for EndpointServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The routes, for serving or for in-process tests.
pub fn router(metrics: Arc<AgentMetrics>, status: watch::Receiver<StatusSnapshot>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .route("/v1/status", get(status_handler))
        .route("/primary", get(|s, q| role_check(s, q, NodeRole::Primary)))
        .route("/standby", get(|s, q| role_check(s, q, NodeRole::Standby)))
        .with_state(Shared { metrics, status })
}

async fn metrics_handler(State(shared): State<Shared>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        shared.metrics.encode(),
    )
}

async fn status_handler(State(shared): State<Shared>) -> impl IntoResponse {
    let snapshot = shared.status.borrow().clone();
    axum::Json(snapshot)
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RoleQuery {
    group: Option<String>,
}

async fn role_check(
    State(shared): State<Shared>,
    query: Result<Query<RoleQuery>, QueryRejection>,
    want: NodeRole,
) -> Response {
    let answer = |code: StatusCode, body: serde_json::Value| (code, axum::Json(body)).into_response();
    let Ok(Query(query)) = query else {
        return answer(StatusCode::BAD_REQUEST, json!({"error": "the only query parameter is group=namespace/name"}));
    };
    let snapshot = shared.status.borrow().clone();
    let group = match &query.group {
        Some(wanted) => match snapshot.groups.iter().find(|g| g.key.to_string() == *wanted) {
            Some(g) => g,
            None => {
                return answer(StatusCode::NOT_FOUND, json!({"error": format!("this node runs no group {wanted:?}")}));
            }
        },
        None => match snapshot.groups.as_slice() {
            [only] => only,
            [] => return answer(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "this node runs no group yet"})),
            _ => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "this node runs several groups: add ?group=namespace/name"}),
                );
            }
        },
    };
    let code = if group.role == want { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    answer(code, json!({"group": group.key.to_string(), "role": group.role.as_str(), "epoch": group.epoch}))
}

/// Binds `addr` (port 0 picks a free port) and serves the endpoints in a background task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<AgentMetrics>,
    status: watch::Receiver<StatusSnapshot>,
) -> std::io::Result<EndpointServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let app = router(metrics, status);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(EndpointServer { local_addr, stop: Some(stop), task })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hapair_crds::hagroup::NodeHealth;
    use hapair_crds::nodeapi::GroupKey;

    use super::*;
    use crate::flow::check::http_get;

    #[tokio::test]
    async fn serves_health_metrics_and_status_over_tcp() {
        let metrics = Arc::new(AgentMetrics::new());
        metrics.set_epoch("db/pg", 9);
        let (publish, status) = watch::channel(StatusSnapshot::default());
        let server = serve("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")), metrics, status)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let base = format!("http://{}", server.local_addr());
        let t = Duration::from_secs(5);

        let health = http_get(&format!("{base}/healthz"), t).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((health.status, health.body.as_slice()), (200, &b"ok\n"[..]));

        let m = http_get(&format!("{base}/metrics"), t).await.unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&m.body);
        assert!(text.contains("hapair_agent_epoch{group=\"db/pg\"} 9"), "{text}");

        publish.send_replace(StatusSnapshot {
            node: "a".into(),
            agent_version: "0.1.0".into(),
            uptime_seconds: 5,
            config_revision: Some(3),
            config_error: None,
            wipes: vec![],
            controller_protocol_version: Some(2),
            groups: vec![GroupReport {
                key: GroupKey::new("db", "pg"),
                role: NodeRole::Primary,
                epoch: 9,
                health: NodeHealth::Healthy,
                role_reason: None,
                peer_reachable: true,
                last_peer_heartbeat: None,
                heartbeat_links: vec![],
                steps: vec![],
                monitors: vec![],
                volumes: vec![],
                last_failover: None,
                actions: vec![],
                events: vec![],
                cleaned_up: false,
            }],
        });
        let s = http_get(&format!("{base}/v1/status"), t).await.unwrap_or_else(|e| panic!("{e}"));
        let json: serde_json::Value = serde_json::from_slice(&s.body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["node"], "a");
        assert_eq!(json["configRevision"], 3);
        assert_eq!(json["groups"][0]["key"], "db/pg");
        assert_eq!(json["groups"][0]["role"], "Primary");

        // Patroni-style role checks: 200 only in that role.
        let primary = http_get(&format!("{base}/primary"), t).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(primary.status, 200, "{}", String::from_utf8_lossy(&primary.body));
        let body: serde_json::Value = serde_json::from_slice(&primary.body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body, json!({"group": "db/pg", "role": "Primary", "epoch": 9}));
        assert_eq!(http_get(&format!("{base}/standby"), t).await.unwrap_or_else(|e| panic!("{e}")).status, 503);
        let named = http_get(&format!("{base}/primary?group=db/pg"), t).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(named.status, 200);
        let unknown = http_get(&format!("{base}/primary?group=db/other"), t).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(unknown.status, 404);
        let error: serde_json::Value = serde_json::from_slice(&unknown.body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(error["error"], "this node runs no group \"db/other\"");
        let typo = http_get(&format!("{base}/primary?grop=db/pg"), t).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(typo.status, 400);
        publish.send_modify(|s| s.groups[0].role = NodeRole::Promoting);
        assert_eq!(http_get(&format!("{base}/primary"), t).await.unwrap_or_else(|e| panic!("{e}")).status, 503);
        publish.send_modify(|s| s.groups[0].role = NodeRole::Standby);
        assert_eq!(http_get(&format!("{base}/standby"), t).await.unwrap_or_else(|e| panic!("{e}")).status, 200);
        assert_eq!(http_get(&format!("{base}/primary"), t).await.unwrap_or_else(|e| panic!("{e}")).status, 503);

        let missing = http_get(&format!("{base}/nope"), t).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(missing.status, 404);
        server.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
    }
}
