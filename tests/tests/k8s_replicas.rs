//! Two operator replicas (`hapair_operator::k8s::run::run`, as `hapair-operator run` runs
//! them) against the in-process fake API server: one leads, the other is ready but answers
//! the node API with 503 and Retry-After; when the leader shuts down it hands the Lease
//! over and the other replica starts serving.
//!
//! The node API is reached over real TLS on 127.0.0.1. Without a client certificate the
//! leader answers 401 (it serves, and wants a certificate) while a standby answers 503
//! before looking at anyone: that difference is what the test watches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use hapair_operator::k8s::election::ElectionTiming;
use hapair_operator::k8s::run::{RunConfig, run};
use hapair_operator::k8s::term::TermConfig;
use hapair_tests::fake_kube::FakeApi;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NS: &str = "hapair-system";

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

struct Replica {
    node_api: SocketAddr,
    metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Replica {
    fn start(api: &FakeApi, identity: &str) -> Replica {
        let (node_api, metrics) = (free_port(), free_port());
        let config = RunConfig {
            node_api_listen: node_api,
            metrics_listen: metrics,
            server_names: vec!["localhost".into()],
            lease_name: "hapair-leader".into(),
            pki_secret: "hapair-pki".into(),
            election: ElectionTiming {
                lease_duration: Duration::from_secs(3),
                renew_deadline: Duration::from_secs(2),
                retry_period: Duration::from_millis(500),
            },
            term: TermConfig::new(NS, identity, "hapair-state", "hapair-tokens"),
            runtime_file: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let client = api.client();
        let task = tokio::spawn(async move {
            run(client, config, None, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap_or_else(|e| panic!("replica failed: {e}"));
        });
        Replica { node_api, metrics, stop: Some(stop), task }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.task).await.expect("shut down in time").unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ca_pem(api: &FakeApi) -> Option<String> {
    let secret = api.objects("secrets").into_iter().find(|s| s["metadata"]["name"] == json!("hapair-pki"))?;
    let encoded = secret["data"]["ca.crt"].as_str()?;
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).ok()?).ok()
}

fn holder(api: &FakeApi) -> Option<String> {
    let lease = api.objects("leases").into_iter().find(|l| l["metadata"]["name"] == json!("hapair-leader"))?;
    lease["spec"]["holderIdentity"].as_str().map(String::from)
}

/// Status code of `GET /v1/groups` without a client certificate, and its Retry-After.
async fn node_api(ca: &str, replica: &Replica) -> Option<(u16, Option<String>)> {
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve("localhost", replica.node_api)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/v1/groups", replica.node_api.port());
    let response = client.get(url).send().await.ok()?;
    let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
    Some((response.status().as_u16(), retry))
}

async fn get(url: String) -> Option<(u16, String)> {
    let response = reqwest::Client::new().get(url).timeout(Duration::from_secs(2)).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_the_other_answers_503_and_takes_over_at_a_handover() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = FakeApi::new();
    api.insert(
        "hagroups",
        json!({
            "apiVersion": "hapair.dev/v1alpha1", "kind": "HaGroup",
            "metadata": {"name": "g", "namespace": "default"},
            "spec": {"nodes": [
                {"name": "a", "heartbeatAddresses": ["198.18.1.1"]},
                {"name": "b", "heartbeatAddresses": ["198.18.1.2"]}
            ]}
        }),
    );
    let first = Replica::start(&api, "replica-a");
    let ca = eventually("the leader creates the CA", Duration::from_secs(20), || async { ca_pem(&api) }).await;
    let (code, _) = eventually("replica-a serves the node API", Duration::from_secs(20), || async {
        node_api(&ca, &first).await.filter(|(code, _)| *code == 401)
    })
    .await;
    assert_eq!(code, 401, "the leader serves and wants a client certificate");
    assert_eq!(holder(&api).as_deref(), Some("replica-a"));
    // The leader reconciled the group.
    eventually("the group's status", Duration::from_secs(20), || async {
        let group = api.objects("hagroups").pop()?;
        group["status"]["phase"].is_string().then_some(())
    })
    .await;

    let second = Replica::start(&api, "replica-b");
    let (ready, _) = eventually("replica-b ready", Duration::from_secs(20), || async {
        get(format!("http://{}/readyz", second.metrics)).await.filter(|(code, _)| *code == 200)
    })
    .await;
    assert_eq!(ready, 200, "a standby is ready too");
    let standby = node_api(&ca, &second).await.expect("replica-b answers");
    assert_eq!(standby, (503, Some("1".to_string())), "a standby sends agents elsewhere");
    let (_, text) = get(format!("http://{}/metrics", second.metrics)).await.unwrap();
    assert!(text.contains("hapair_controller_leader 0"), "{text}");
    assert_eq!(holder(&api).as_deref(), Some("replica-a"));

    // The leader goes (a rolling update): it hands the Lease over, the standby takes it
    // without waiting out the lease duration, and starts serving.
    first.shutdown().await;
    let (code, _) = eventually("replica-b takes over", Duration::from_secs(10), || async {
        node_api(&ca, &second).await.filter(|(code, _)| *code == 401)
    })
    .await;
    assert_eq!(code, 401);
    assert_eq!(holder(&api).as_deref(), Some("replica-b"));
    let (_, text) = get(format!("http://{}/metrics", second.metrics)).await.unwrap();
    assert!(text.contains("hapair_controller_leader 1"), "{text}");
    second.shutdown().await;
    assert_eq!(holder(&api), None, "handed over at shutdown");
}
