//! One leader term (`hapair_operator::k8s::term::Term`: reflectors, kube-runtime
//! controllers, the reconcile core, the Kubernetes store) against the in-process fake API
//! server, for what only a running term does: the Secret watches (one per namespace the
//! operator reads Secrets in) that rerun reconcile when a Secret a group references appears
//! or changes, the status error for a Secret the operator may not read, and the term's own
//! witness (new at every takeover: it waits out its restart period and continues the epochs
//! the statuses record).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hapair_crds::nodeapi::{GroupKey, LeaseOp, LeaseRequest, LeaseResponse, paths};
use hapair_operator::controller::metrics::Metrics;
use hapair_operator::k8s::election::{FencedAuthority, Leadership};
use hapair_operator::k8s::term::{Term, TermConfig};
use hapair_operator::pki::Ca;
use hapair_operator::server::Peer;
use hapair_operator::server::identity::PeerIdentity;
use hapair_operator::witness::Witness;
use hapair_tests::fake_kube::FakeApi;
use serde_json::{Value, json};
use tower::ServiceExt;

fn group() -> Value {
    json!({
        "apiVersion": "hapair.dev/v1alpha1",
        "kind": "HaGroup",
        "metadata": {"name": "g", "namespace": "ns"},
        "spec": {
            "nodes": [
                {"name": "a", "heartbeatAddresses": ["198.18.1.1"]},
                {"name": "b", "heartbeatAddresses": ["198.18.1.2"]},
            ],
            "heartbeat": {"keySecretRef": {"name": "hb", "key": "key"}},
        },
    })
}

fn secret(key: &[u8]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hb", "namespace": "ns"},
        "data": {"key": base64::engine::general_purpose::STANDARD.encode(key)},
    })
}

/// The `Valid` condition of the stored group: status and message.
fn valid(api: &FakeApi) -> Option<(String, String)> {
    let group = api.objects("hagroups").into_iter().find(|g| g["metadata"]["name"] == json!("g"))?;
    let condition = group["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == json!("Valid"))?.clone();
    Some((condition["status"].as_str()?.to_string(), condition["message"].as_str().unwrap_or("").to_string()))
}

async fn wait_for_valid(api: &FakeApi, status: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((found, message)) = valid(api)
            && found == status
        {
            return message;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; Valid is {:?}", valid(api));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_to_a_referenced_secret_reruns_reconcile() {
    let api = FakeApi::new();
    api.insert("hagroups", group());
    let (ca, _) = Ca::generate().unwrap();
    let mut config = TermConfig::new("hapair-system", "operator-0", "hapair-state", "hapair-tokens");
    config.secret_namespaces = vec!["ns".into()];
    let term = Term::start(api.client(), Arc::new(ca), &config, None, Arc::new(Metrics::new())).await.unwrap();

    let message = wait_for_valid(&api, "False", "the group refused for its missing Secret").await;
    assert!(message.contains("no Secret named \"hb\" in namespace \"ns\""), "{message}");

    // Nothing but the Secret changes: only the Secret watch can make the group valid.
    api.insert("secrets", secret(&[7u8; 32]));
    wait_for_valid(&api, "True", "the group accepted once its Secret exists").await;

    // A Secret edited into a key too short is refused again, naming the key.
    api.insert("secrets", secret(b"short"));
    let message = wait_for_valid(&api, "False", "the group refused for its short key").await;
    assert!(message.contains("key \"key\" of Secret ns/hb"), "{message}");
    term.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_outside_the_operators_namespaces_is_a_status_error_not_a_read() {
    let api = FakeApi::new();
    api.insert("hagroups", group());
    api.insert("secrets", secret(&[7u8; 32]));
    let (ca, _) = Ca::generate().unwrap();
    // Only its own namespace: the group's Secret in "ns" is out of bounds.
    let config = TermConfig::new("hapair-system", "operator-0", "hapair-state", "hapair-tokens");
    let term = Term::start(api.client(), Arc::new(ca), &config, None, Arc::new(Metrics::new())).await.unwrap();
    let message = wait_for_valid(&api, "False", "the group refused for its unreadable Secret").await;
    assert!(message.contains("cannot read Secret ns/hb"), "{message}");
    assert!(message.contains("rbac.secretNamespaces"), "the message says how to allow it: {message}");
    // Secrets are read in hapair-system only: never across all namespaces, never in "ns".
    let reads = api.reads_of("secrets");
    assert_eq!(reads.keys().collect::<Vec<_>>(), ["hapair-system"], "{reads:?}");
    term.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_without_rbac_refuses_its_groups_until_access_is_granted() {
    let api = FakeApi::new();
    api.insert("hagroups", group());
    api.insert("secrets", secret(&[7u8; 32]));
    // Configured, but the Role+RoleBinding in "ns" are missing.
    api.forbid("secrets", "ns", true);
    let (ca, _) = Ca::generate().unwrap();
    let mut config = TermConfig::new("hapair-system", "operator-0", "hapair-state", "hapair-tokens");
    config.secret_namespaces = vec!["ns".into()];
    // The term starts nevertheless: one namespace's RBAC must not stop every group.
    let term = tokio::time::timeout(
        Duration::from_secs(20),
        Term::start(api.client(), Arc::new(ca), &config, None, Arc::new(Metrics::new())),
    )
    .await
    .expect("a forbidden namespace must not hold the term back")
    .unwrap();
    let message = wait_for_valid(&api, "False", "the group refused for its forbidden Secret").await;
    assert!(message.contains("cannot read Secret ns/hb"), "{message}");
    assert!(message.contains("may not list Secrets in namespace \"ns\""), "{message}");

    // Granted: the retrying watch lists them, and the group resolves without any change to it.
    api.forbid("secrets", "ns", false);
    wait_for_valid(&api, "True", "the group accepted once its Secret may be read").await;
    let reads = api.reads_of("secrets");
    assert_eq!(reads.keys().collect::<Vec<_>>(), ["hapair-system", "ns"], "never cluster-wide: {reads:?}");
    term.stop();
}

/// `node` asks the term's node API for the lease of ns/g, as an agent would.
async fn acquire(router: &axum::Router, node: &str, epoch: u64) -> LeaseResponse {
    let request =
        LeaseRequest { group: GroupKey::new("ns", "g"), node: node.into(), op: LeaseOp::Acquire, epoch, ttl_ms: 800 };
    let mut http = http::Request::builder()
        .method("POST")
        .uri(paths::LEASE)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(serde_json::to_vec(&request).unwrap()))
        .unwrap();
    http.extensions_mut()
        .insert(Peer { identity: PeerIdentity::Node(node.into()), addr: "127.0.0.1:40000".parse().unwrap() });
    let response = router.clone().oneshot(http).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_terms_witness_waits_out_its_restart_and_continues_the_recorded_epochs() {
    let api = FakeApi::new();
    let mut group = group();
    group["spec"]["heartbeat"] = json!({});
    // A previous leader's term saw epoch 5 serve.
    group["status"] = json!({"phase": "Healthy", "activeNode": "a", "epoch": 5});
    api.insert("hagroups", group);
    let (ca, _) = Ca::generate().unwrap();
    let leadership = Leadership::new();
    let now = Instant::now();
    leadership.set(Some(now + Duration::from_secs(3600)), now);
    let witness = FencedAuthority::new(Box::new(Witness::new(Duration::ZERO)), leadership, Duration::from_secs(2));
    let config = TermConfig::new("hapair-system", "operator-0", "hapair-state", "hapair-tokens");
    let term = Term::start(api.client(), Arc::new(ca), &config, Some(Box::new(witness)), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let router = term.router();

    // Just taken over: the old leader's witness may have granted a lease this one never saw.
    match acquire(&router, "b", 1).await {
        LeaseResponse::Denied { reason, retry_after_ms, .. } => {
            assert!(reason.contains("waiting out"), "{reason}");
            // leaseTTL 800 ms stretched by the default 1% drift bound.
            assert!(retry_after_ms > 0 && retry_after_ms <= 808, "{retry_after_ms}");
        }
        other => panic!("granted right after the takeover: {other:?}"),
    }
    // Once leaseTTL·(1+drift) has passed, the grant continues above the recorded epoch.
    tokio::time::sleep(Duration::from_millis(900)).await;
    match acquire(&router, "b", 1).await {
        LeaseResponse::Granted { holder, epoch, .. } => assert_eq!((holder.as_str(), epoch), ("b", 6)),
        other => panic!("not granted after the wait-out: {other:?}"),
    }
    match acquire(&router, "a", 6).await {
        LeaseResponse::Denied { holder, .. } => assert_eq!(holder.as_deref(), Some("b")),
        other => panic!("two holders: {other:?}"),
    }
    term.stop();
}
