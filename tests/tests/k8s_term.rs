//! One leader term (`hapair_operator::k8s::term::Term`: reflectors, kube-runtime
//! controllers, the reconcile core, the Kubernetes store) against the in-process fake API
//! server, for what only a running term does: the Secret watch that reruns reconcile when a
//! Secret a group references appears or changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hapair_operator::k8s::term::{Term, TermConfig};
use hapair_operator::metrics::Metrics;
use hapair_operator::pki::Ca;
use hapair_tests::fake_kube::FakeApi;
use serde_json::{Value, json};

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
    let config = TermConfig::new("hapair-system", "operator-0", "hapair-state", "hapair-tokens");
    let term = Term::start(api.client(), Arc::new(ca), &config, None, Arc::new(Metrics::new())).await.unwrap();

    let message = wait_for_valid(&api, "False", "the group refused for its missing Secret").await;
    assert!(message.contains("hb"), "the message names the Secret: {message}");

    // Nothing but the Secret changes: only the Secret watch can make the group valid.
    api.insert("secrets", secret(&[7u8; 32]));
    wait_for_valid(&api, "True", "the group accepted once its Secret exists").await;

    // A Secret edited into a key too short is refused again, naming the key.
    api.insert("secrets", secret(b"short"));
    let message = wait_for_valid(&api, "False", "the group refused for its short key").await;
    assert!(message.contains("key \"key\" of Secret ns/hb"), "{message}");
    term.stop();
}
