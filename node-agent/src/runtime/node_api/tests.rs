#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hapair_crds::nodeapi::{GroupKey, LeaseOp, LeaseRequest, LeaseResponse, NodeReport};

use super::fake::{Behaviour, FakeController, NODE, Pki, refused_url};
use super::{NodeApiClient, NodeApiError};
use crate::engine::WitnessAnswer;

fn client(pki: &Pki, urls: &[&str]) -> NodeApiClient {
    NodeApiClient::new(&pki.controller_config(urls)).unwrap()
}

fn report() -> NodeReport {
    NodeReport {
        node: NODE.into(),
        applied_revision: 1,
        config_error: None,
        agent_version: "test".into(),
        os: "linux".into(),
        uptime_seconds: 1,
        hardware: Default::default(),
        links: Vec::new(),
        groups: Vec::new(),
        wipes: Vec::new(),
    }
}

fn lease_request() -> LeaseRequest {
    LeaseRequest { group: GroupKey::new("db", "pg"), node: NODE.into(), op: LeaseOp::Acquire, epoch: 3, ttl_ms: 2000 }
}

fn granted(answer: &WitnessAnswer) -> bool {
    matches!(answer, WitnessAnswer::Response(LeaseResponse::Granted { epoch: 3, .. }))
}

#[tokio::test]
async fn a_refused_endpoint_is_skipped_and_the_next_one_sticks() {
    let pki = Pki::new();
    let down = refused_url().await;
    let up = FakeController::start(&pki, Behaviour::leader()).await;
    let client = client(&pki, &[&down, &up.url]);
    assert_eq!(client.base(), down);

    // The first call fails over within itself: one attempt at `down`, one at `up`.
    let bundle = client.poll_config(None, Duration::from_secs(1)).await.unwrap();
    assert_eq!(bundle.map(|b| b.revision), Some(1));
    assert_eq!(client.base(), up.url);
    assert_eq!(up.hit_count(), 1);
    // A clone (the reporter, a group's witness path) uses what the poll learnt.
    let reporter = client.clone();
    reporter.post_report(&report()).await.unwrap();
    assert_eq!(client.poll_config(Some(1), Duration::from_secs(1)).await.unwrap(), None);
    assert!(granted(&client.lease(&lease_request(), Duration::from_secs(5)).await));
    // Every call went straight to `up`: it sticks.
    assert_eq!(up.hit_count(), 4, "{:?}", up.hits.lock().unwrap());
    assert_eq!((client.base(), reporter.base()), (up.url.as_str(), up.url.as_str()));
}

#[tokio::test]
async fn a_report_fails_over_too_and_an_error_names_the_url() {
    let pki = Pki::new();
    let down = refused_url().await;
    let up = FakeController::start(&pki, Behaviour::leader()).await;
    let client = client(&pki, &[&down, &up.url]);
    client.post_report(&report()).await.unwrap();
    assert_eq!(client.base(), up.url);

    // Alone, a refusing endpoint is reported with its URL, and there is no retry.
    let lonely = self::client(&pki, &[&down]);
    let err = lonely.post_report(&report()).await.unwrap_err();
    assert!(matches!(&err, NodeApiError::Transport { url, .. } if url.starts_with(&down)), "{err}");
    assert!(err.to_string().starts_with(&format!("{down}/v1/nodes/a/report: ")), "{err}");
}

#[tokio::test]
async fn a_non_leader_hint_is_followed_to_a_configured_controller() {
    let pki = Pki::new();
    let leader = FakeController::start(&pki, Behaviour::leader()).await;
    // Would answer too: reaching it would mean the hint was ignored for "the next one".
    let next = FakeController::start(&pki, Behaviour::leader()).await;
    let follower = FakeController::start(&pki, Behaviour::NotLeader { hint: Some(format!("{}/", leader.url)) }).await;
    let client = client(&pki, &[&follower.url, &next.url, &leader.url]);

    client.post_report(&report()).await.unwrap();
    assert_eq!(client.base(), leader.url);
    assert_eq!((follower.hit_count(), next.hit_count(), leader.hit_count()), (1, 0, 1));
    client.poll_config(None, Duration::from_secs(1)).await.unwrap();
    assert_eq!((follower.hit_count(), next.hit_count(), leader.hit_count()), (1, 0, 2));
}

#[tokio::test]
async fn a_hint_to_an_unknown_controller_is_not_followed() {
    let pki = Pki::new();
    let stranger = FakeController::start(&pki, Behaviour::leader()).await;
    let follower = FakeController::start(&pki, Behaviour::NotLeader { hint: Some(stranger.url.clone()) }).await;
    let next = FakeController::start(&pki, Behaviour::leader()).await;
    let client = client(&pki, &[&follower.url, &next.url]);

    client.poll_config(None, Duration::from_secs(1)).await.unwrap();
    assert_eq!(client.base(), next.url);
    assert_eq!((follower.hit_count(), next.hit_count(), stranger.hit_count()), (1, 1, 0));
}

#[tokio::test]
async fn when_every_controller_refuses_the_call_fails_after_one_retry_and_moves_on() {
    let pki = Pki::new();
    let a = FakeController::start(&pki, Behaviour::NotLeader { hint: None }).await;
    let b = FakeController::start(&pki, Behaviour::NotLeader { hint: None }).await;
    let c = FakeController::start(&pki, Behaviour::NotLeader { hint: None }).await;
    let client = client(&pki, &[&a.url, &b.url, &c.url]);

    let err = client.post_report(&report()).await.unwrap_err();
    // The last attempt's error, naming its URL; the caller's backoff takes it from here.
    assert!(matches!(&err, NodeApiError::Refused { url, status: 503, .. } if url.starts_with(&b.url)), "{err}");
    assert_eq!((a.hit_count(), b.hit_count(), c.hit_count()), (1, 1, 0));
    // The next attempt starts where the last one would have gone.
    assert_eq!(client.base(), c.url);
}

#[tokio::test]
async fn an_answer_that_is_not_a_503_does_not_move_the_client() {
    let pki = Pki::new();
    let leader = FakeController::start(&pki, Behaviour::leader()).await;
    let other = FakeController::start(&pki, Behaviour::leader()).await;
    let mut config = pki.controller_config(&[&leader.url, &other.url]);
    // A node the controller does not serve: a 404 is its answer, not a reason to fail over.
    config.node = "zz".into();
    let client = NodeApiClient::new(&config).unwrap();
    let err = client.post_report(&report()).await.unwrap_err();
    assert!(matches!(err, NodeApiError::Refused { status: 404, .. }), "{err}");
    assert_eq!((client.base(), other.hit_count()), (leader.url.as_str(), 0));
}

#[tokio::test]
async fn the_lease_goes_to_every_controller_and_the_leader_s_slow_grant_wins() {
    let pki = Pki::new();
    let follower = FakeController::start(&pki, Behaviour::NotLeader { hint: None }).await;
    let down = refused_url().await;
    let leader = FakeController::start(
        &pki,
        Behaviour::Leader { lease_delay: Duration::from_millis(300), controllers: Vec::new() },
    )
    .await;
    let client = client(&pki, &[&follower.url, &down, &leader.url]);

    let started = Instant::now();
    let answer = client.lease(&lease_request(), Duration::from_secs(5)).await;
    assert!(granted(&answer), "{answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((follower.hit_count(), leader.hit_count()), (1, 1));
    // The leader is the current endpoint now: the next poll goes there first.
    assert_eq!(client.base(), leader.url);
    client.poll_config(None, Duration::from_secs(1)).await.unwrap();
    assert_eq!((follower.hit_count(), leader.hit_count()), (1, 2));
}

#[tokio::test]
async fn the_lease_fails_naming_every_controller_when_all_are_down() {
    let pki = Pki::new();
    let (first, second) = (refused_url().await, refused_url().await);
    let follower = FakeController::start(&pki, Behaviour::NotLeader { hint: None }).await;
    let client = client(&pki, &[&first, &second, &follower.url]);

    let answer = client.lease(&lease_request(), Duration::from_secs(5)).await;
    let WitnessAnswer::Failed(message) = answer else { panic!("{answer:?}") };
    let at = |url: &str| message.find(&format!("{url}/v1/witness/lease: ")).unwrap_or_else(|| panic!("{message}"));
    // In the order the endpoints are configured.
    assert!(at(&first) < at(&second) && at(&second) < at(&follower.url), "{message}");
    assert!(message.contains("503"), "{message}");
}

#[tokio::test]
async fn the_lease_times_out_when_no_controller_answers_in_time() {
    let pki = Pki::new();
    let hung = FakeController::start(&pki, Behaviour::Hang).await;
    let follower = FakeController::start(&pki, Behaviour::NotLeader { hint: None }).await;
    let slow =
        FakeController::start(&pki, Behaviour::Leader { lease_delay: Duration::from_secs(5), controllers: Vec::new() })
            .await;
    let client = client(&pki, &[&hung.url, &follower.url, &slow.url]);

    let started = Instant::now();
    let answer = client.lease(&lease_request(), Duration::from_millis(300)).await;
    assert!(matches!(answer, WitnessAnswer::Timeout), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Nobody answered: the current endpoint stays.
    assert_eq!(client.base(), hung.url);
}

#[tokio::test]
async fn the_node_api_still_presents_the_enrollment_certificate() {
    let pki = Pki::new();
    let leader = FakeController::start(&pki, Behaviour::leader()).await;
    // The fake refuses node-API calls without a client certificate (403, no failover).
    let client = client(&pki, &[&leader.url]);
    client.post_report(&report()).await.unwrap();
    let plain = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let response = plain.post(format!("{}/v1/nodes/a/report", leader.url)).json(&report()).send().await.unwrap();
    assert_eq!(response.status(), 403);
}
