//! The node API served for real: TLS with client certificates, enrollment, long-polls,
//! reports, the witness endpoint, admin actions and manifest changes while running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use hapair_crds::hagroup::{GroupPhase, NodeRole};
use hapair_crds::nodeapi::{
    ActionOutcome, ApiError, DesiredConfig, EnrollRequest, LeaseOp, LeaseRequest, LeaseResponse, paths,
};
use hapair_operator::controller::views::ActionView;
use hapair_operator::pki::Ca;
use hapair_operator::pki::tokens::TokenFile;
use hapair_operator::server::ratelimit::RateSettings;

/// A client whose certificate comes from a CA that copies our CA's subject name.
fn forged_ca_client(h: &Harness, now: i64) -> reqwest::Client {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ours: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(h.ca_pem().as_bytes()).unwrap();
    let cn = hapair_operator::pki::common_name(&ours).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    // The same subject, encoded the way the controller encodes it.
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "hapair");
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = Issuer::new(params, key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "a");
    leaf.distinguished_name = dn;
    leaf.not_before = time::OffsetDateTime::from_unix_timestamp(now - 60).unwrap();
    leaf.not_after = time::OffsetDateTime::from_unix_timestamp(now + 3600).unwrap();
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    client(h.ca_pem(), Some((&cert.pem(), &leaf_key.serialize_pem())))
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: ApiError = response.json().await.unwrap_or_else(|e| panic!("{status}: body is not an ApiError: {e}"));
    (status, body.error)
}

async fn config(client: &reqwest::Client, h: &Harness, node: &str, query: &str) -> reqwest::Response {
    client.get(h.url(&format!("{}{query}", paths::config(node)))).send().await.unwrap()
}

#[tokio::test]
async fn enrollment_accepts_a_good_token_once_and_refuses_the_rest() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let anonymous = h.anonymous();
    let post = |request: EnrollRequest| anonymous.post(h.url(paths::ENROLL)).json(&request).send();

    let (_, csr_a) = csr("a");
    let token = h.token("a");
    let good = EnrollRequest { node: "a".into(), token: token.clone(), csr_pem: csr_a.clone() };
    // A malformed CSR is refused without burning the token.
    let bad_csr = EnrollRequest {
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
        ..good.clone()
    };
    let (status, message) = error_of(post(bad_csr).await.unwrap()).await;
    assert_eq!(status, 400, "{message}");
    assert!(message.starts_with("csrPem: "), "{message}");
    // A CSR for another name is refused too.
    let (_, csr_b) = csr("b");
    let (status, message) =
        error_of(post(EnrollRequest { csr_pem: csr_b.clone(), ..good.clone() }).await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(message.contains("expected the node name \"a\""), "{message}");

    let response = post(good.clone()).await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: hapair_crds::nodeapi::EnrollResponse = response.json().await.unwrap();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(answer.certificate_pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateDer<'static>| d.to_vec())
        .unwrap();
    assert_eq!(hapair_operator::pki::common_name(&der).as_deref(), Some("a"));
    assert_eq!(answer.ca_pem, h.ca_pem());

    let (status, message) = error_of(post(good.clone()).await.unwrap()).await;
    assert_eq!(status, 401);
    assert!(message.starts_with("enrollment token was already used"), "{message}");

    let expired = TokenFile::new(state_dir(&h))
        .create("a", Duration::from_secs(1), hapair_operator::support::timestamp::now_millis() - 10_000)
        .unwrap();
    let (status, message) = error_of(post(EnrollRequest { token: expired, ..good.clone() }).await.unwrap()).await;
    assert_eq!(status, 401);
    assert!(message.starts_with("enrollment token expired at"), "{message}");

    let (status, message) =
        error_of(post(EnrollRequest { token: "hpe_guessed".into(), ..good.clone() }).await.unwrap()).await;
    assert_eq!((status, message.as_str()), (401, "unknown enrollment token"));

    let for_b = h.token("b");
    let (status, message) = error_of(post(EnrollRequest { token: for_b.clone(), ..good.clone() }).await.unwrap()).await;
    assert_eq!((status, message.as_str()), (403, "enrollment token was issued for node \"b\", not \"a\""));
    // That refusal did not burn b's token.
    let ok = post(EnrollRequest { node: "b".into(), token: for_b, csr_pem: csr_b }).await.unwrap();
    assert_eq!(ok.status(), 200);

    let (status, message) =
        error_of(post(EnrollRequest { node: "hapair-admin".into(), ..good.clone() }).await.unwrap()).await;
    assert_eq!(status, 400, "{message}");
    h.shutdown().await;
}

#[tokio::test]
async fn config_long_poll_returns_on_change_and_times_out_otherwise() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let a = h.enroll("a").await;
    let first: DesiredConfig = config(&a, &h, "a", "").await.json().await.unwrap();
    assert_eq!((first.node.as_str(), first.revision, first.groups.len()), ("a", 1, 1));
    let steps: Vec<&str> = first.groups[0].spec.flow.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["vip-www"]);

    let started = Instant::now();
    let unchanged = config(&a, &h, "a", "?revision=1&wait=1").await;
    assert_eq!(unchanged.status(), 304);
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());

    let waiting = {
        let (a, url) = (a.clone(), h.url(&format!("{}?revision=1&wait=20", paths::config("a"))));
        tokio::spawn(async move {
            let started = Instant::now();
            let response = a.get(url).send().await.unwrap();
            (response.status().as_u16(), response.json::<DesiredConfig>().await.ok(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.write_manifest("g.yaml", &GROUP.replace("198.18.1.80/24", "198.18.1.81/24"));
    let (status, bundle, waited) = tokio::time::timeout(Duration::from_secs(15), waiting).await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert!(waited < Duration::from_secs(10), "returned on change, not on timeout: {waited:?}");
    let bundle = bundle.unwrap();
    assert_eq!(bundle.revision, 2);
    assert_eq!(bundle.groups[0].spec.virtual_ips[0].address, "198.18.1.81/24");

    let (status, message) = error_of(config(&a, &h, "a", "?revision=x").await).await;
    assert_eq!((status, message.as_str()), (400, "query parameter revision: \"x\" is not a number"));
    h.shutdown().await;
}

#[tokio::test]
async fn reports_update_status_and_foreign_or_missing_certificates_change_nothing() {
    let h = Harness::start(&[("g.yaml", GROUP), ("solo.yaml", SOLO)]).await;
    let g = key("default", "g");
    let (a, b, c) = (h.enroll("a").await, h.enroll("b").await, h.enroll("c").await);
    let post = |client: &reqwest::Client, node: &str, body: &hapair_crds::nodeapi::NodeReport| {
        client.post(h.url(&paths::report(node))).json(body).send()
    };
    assert_eq!(
        post(&a, "a", &report("a", 1, vec![group_report(&g, NodeRole::Primary, 3)])).await.unwrap().status(),
        204
    );
    assert_eq!(
        post(&b, "b", &report("b", 1, vec![group_report(&g, NodeRole::Standby, 3)])).await.unwrap().status(),
        204
    );
    let overview = h.overview().await;
    let view = overview.groups.iter().find(|v| v.key == g).unwrap();
    assert_eq!(view.status.phase, Some(GroupPhase::Healthy));
    assert_eq!(view.status.active_node.as_deref(), Some("a"));
    assert_eq!(view.status.epoch, 3);
    assert_eq!(view.node_details[0].applied_revision, Some(1));

    let before = serde_json::to_value(h.overview().await).unwrap();
    let before_config = config(&a, &h, "a", "").await.text().await.unwrap();
    // b writing a's report, or reading a's config: 403.
    let (status, message) =
        error_of(post(&b, "a", &report("a", 1, vec![group_report(&g, NodeRole::Fenced, 9)])).await.unwrap()).await;
    assert_eq!((status, message.as_str()), (403, "certificate is for node \"b\", not \"a\""));
    assert_eq!(config(&b, &h, "a", "").await.status(), 403);
    // b posting under its own name but with a's identity in the body, or for a group it is
    // not in: 403.
    let (status, _) = error_of(post(&b, "b", &report("a", 1, vec![])).await.unwrap()).await;
    assert_eq!(status, 403);
    let (status, message) =
        error_of(post(&c, "c", &report("c", 1, vec![group_report(&g, NodeRole::Primary, 9)])).await.unwrap()).await;
    assert_eq!((status, message.as_str()), (403, "node \"c\" is not a node of HaGroup default/g"));
    // A node enrolled but in no group at all.
    let stranger = h.enroll("zed").await;
    let (status, message) = error_of(config(&stranger, &h, "zed", "").await).await;
    assert_eq!((status, message.as_str()), (403, "node \"zed\" is not in any group"));
    // No certificate: 401, on node and admin endpoints alike.
    let anonymous = h.anonymous();
    let (status, message) = error_of(post(&anonymous, "a", &report("a", 1, vec![])).await.unwrap()).await;
    assert_eq!((status, message.as_str()), (401, "a client certificate is required"));
    assert_eq!(config(&anonymous, &h, "a", "").await.status(), 401);
    assert_eq!(anonymous.get(h.url(paths::GROUPS)).send().await.unwrap().status(), 401);
    // A node certificate on the admin API: 403.
    let (status, _) = error_of(a.get(h.url(paths::GROUPS)).send().await.unwrap()).await;
    assert_eq!(status, 403);

    let after = serde_json::to_value(h.overview().await).unwrap();
    assert_eq!(after, before);
    assert_eq!(config(&a, &h, "a", "").await.text().await.unwrap(), before_config);
    h.shutdown().await;
}

#[tokio::test]
async fn certificates_from_another_ca_or_expired_are_refused_with_the_reason() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let now = hapair_operator::support::timestamp::now_millis() / 1000;
    let other_dir = tempfile::tempdir().unwrap();
    let foreign = Ca::load_or_create(other_dir.path()).unwrap().issue_client("a", now - 60, now + 3600).unwrap();
    // Even a CA with the very same name as ours is told apart by the signature.
    let forged = forged_ca_client(&h, now);
    let (status, message) = error_of(config(&forged, &h, "a", "").await).await;
    assert_eq!((status, message.as_str()), (401, "client certificate is not signed by this controller's CA"));
    let foreign_client = client(h.ca_pem(), Some((&foreign.cert_pem, &foreign.key_pem)));
    let (status, message) = error_of(config(&foreign_client, &h, "a", "").await).await;
    assert_eq!((status, message.as_str()), (401, "client certificate is not signed by this controller's CA"));

    let ca = Ca::load_or_create(state_dir(&h)).unwrap();
    let expired = ca.issue_client("a", now - 7200, now - 3600).unwrap();
    let expired_client = client(h.ca_pem(), Some((&expired.cert_pem, &expired.key_pem)));
    let (status, message) = error_of(config(&expired_client, &h, "a", "").await).await;
    assert_eq!((status, message.as_str()), (401, "client certificate has expired"));
    let (status, _) =
        error_of(expired_client.post(h.url(&paths::report("a"))).json(&report("a", 1, vec![])).send().await.unwrap())
            .await;
    assert_eq!(status, 401);
    // Nothing was recorded from either.
    let overview = h.overview().await;
    assert!(overview.groups[0].node_details.iter().all(|d| d.applied_revision.is_none()));
    h.shutdown().await;
}

#[tokio::test]
async fn bodies_are_limited_and_malformed_json_is_named() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let a = h.enroll("a").await;
    let url = h.url(&paths::report("a"));
    let huge = format!("{{\"node\": \"a\", \"padding\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let response = a.post(&url).header("content-type", "application/json").body(huge).send().await.unwrap();
    let (status, message) = error_of(response).await;
    assert_eq!((status, message.as_str()), (413, "request body exceeds 1048576 bytes"));

    let mut body = serde_json::to_value(report("a", 1, vec![])).unwrap();
    body["appliedRevision"] = serde_json::json!("seven");
    let (status, message) = error_of(a.post(&url).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(message.starts_with("malformed JSON body at appliedRevision: invalid type: string \"seven\""), "{message}");
    let response = a.post(&url).header("content-type", "application/json").body("{\"node\": ").send().await.unwrap();
    let (status, message) = error_of(response).await;
    assert_eq!(status, 400);
    assert!(message.starts_with("malformed JSON body at node: EOF while parsing a value"), "{message}");
    let response = a.post(&url).header("content-type", "text/plain").body("{}").send().await.unwrap();
    assert_eq!(response.status(), 415);
    h.shutdown().await;
}

#[tokio::test]
async fn each_client_has_a_request_budget() {
    let api = hapair_operator::server::ApiSettings { rate: RateSettings { burst: 5, per_second: 0.2 }, ..settings() };
    let h = Harness::start_with(&[("g.yaml", GROUP)], api).await;
    let a = h.enroll("a").await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(config(&a, &h, "a", "").await.status().as_u16());
    }
    assert_eq!(codes, [200, 200, 200, 200, 200, 429]);
    let limited = config(&a, &h, "a", "").await;
    assert!(limited.headers().get("retry-after").is_some());
    let (status, message) = error_of(limited).await;
    assert_eq!((status, message.as_str()), (429, "rate limit exceeded for node:a; slow down"));
    // The admin has its own budget.
    assert_eq!(h.admin_client().get(h.url(paths::GROUPS)).send().await.unwrap().status(), 200);
    h.shutdown().await;
}

#[tokio::test]
async fn leases_go_to_the_authority_only_for_members_of_witnessed_groups() {
    let h = Harness::start(&[("g.yaml", GROUP), ("solo.yaml", SOLO)]).await;
    let (a, b, c) = (h.enroll("a").await, h.enroll("b").await, h.enroll("c").await);
    let lease = |node: &str, group: &str, op: LeaseOp| LeaseRequest {
        group: group.parse().unwrap(),
        node: node.into(),
        op,
        epoch: 4,
        ttl_ms: 5_000,
    };
    let ask = |client: &reqwest::Client, request: LeaseRequest| client.post(h.url(paths::LEASE)).json(&request).send();
    let granted: LeaseResponse =
        ask(&a, lease("a", "default/g", LeaseOp::Acquire)).await.unwrap().json().await.unwrap();
    assert_eq!(granted, LeaseResponse::Granted { holder: "a".into(), ttl_ms: 600, epoch: 4 });
    let denied: LeaseResponse = ask(&b, lease("b", "default/g", LeaseOp::Acquire)).await.unwrap().json().await.unwrap();
    assert!(matches!(denied, LeaseResponse::Denied { holder: Some(ref h), .. } if h == "a"), "{denied:?}");
    {
        let seen = h.seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].1.ttl, Duration::from_millis(600), "leaseTTL from the spec");
        assert_eq!(seen[0].1.max_clock_drift_ppm, 500);
    }

    let (status, message) = error_of(ask(&a, lease("b", "default/g", LeaseOp::Release)).await.unwrap()).await;
    assert_eq!((status, message.as_str()), (403, "node \"a\" cannot ask for a lease on behalf of \"b\""));
    let (status, _) = error_of(ask(&c, lease("c", "default/g", LeaseOp::Acquire)).await.unwrap()).await;
    assert_eq!(status, 403);
    let (status, message) = error_of(ask(&c, lease("c", "edge/solo", LeaseOp::Acquire)).await.unwrap()).await;
    assert_eq!(
        (status, message.as_str()),
        (409, "HaGroup edge/solo has witness mode none: it fails over without a witness")
    );
    let (status, _) = error_of(ask(&a, lease("a", "default/nope", LeaseOp::Acquire)).await.unwrap()).await;
    assert_eq!(status, 404);
    let (status, _) = error_of(
        h.anonymous().post(h.url(paths::LEASE)).json(&lease("a", "default/g", LeaseOp::Acquire)).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = error_of(
        h.admin_client()
            .post(h.url(paths::LEASE))
            .json(&lease("a", "default/g", LeaseOp::Acquire))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(h.seen.lock().unwrap().len(), 2, "refused requests never reach the authority");
    let released: LeaseResponse =
        ask(&a, lease("a", "default/g", LeaseOp::Release)).await.unwrap().json().await.unwrap();
    assert_eq!(released, LeaseResponse::Released);
    h.shutdown().await;
}

#[tokio::test]
async fn admin_actions_reach_the_nodes_and_their_outcome_comes_back() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let g = key("default", "g");
    let (a, b) = (h.enroll("a").await, h.enroll("b").await);
    let admin = h.admin_client();
    let actions_url = h.url(&paths::actions("default", "g"));

    let (status, message) = error_of(
        admin.post(&actions_url).json(&serde_json::json!({"action": "switchover", "to": "z"})).send().await.unwrap(),
    )
    .await;
    assert_eq!((status, message.as_str()), (400, "to: \"z\" is not a node of HaGroup default/g (nodes: a, b)"));
    let (status, message) = error_of(
        admin
            .post(h.url(&paths::actions("default", "nope")))
            .json(&serde_json::json!({"action": "maintenance", "enabled": true}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, message.as_str()), (404, "no HaGroup default/nope"));
    let (status, message) =
        error_of(admin.post(&actions_url).json(&serde_json::json!({"action": "reboot"})).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(message.contains("unknown variant `reboot`"), "{message}");
    let (status, _) = error_of(
        a.post(&actions_url).json(&serde_json::json!({"action": "switchover", "to": "a"})).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 403, "nodes cannot queue actions");

    let response =
        admin.post(&actions_url).json(&serde_json::json!({"action": "switchover", "to": "b"})).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let queued: ActionView = response.json().await.unwrap();
    assert_eq!(queued.outcome, ActionOutcome::Pending);
    let (status, message) = error_of(
        admin
            .post(&actions_url)
            .json(&serde_json::json!({"action": "maintenance", "enabled": true}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409, "{message}");

    for (client, node) in [(&a, "a"), (&b, "b")] {
        let bundle: DesiredConfig = config(client, &h, node, "").await.json().await.unwrap();
        assert_eq!(bundle.revision, 2, "{node}");
        assert_eq!(bundle.groups[0].actions.len(), 1, "{node}");
        assert_eq!(bundle.groups[0].actions[0].id, queued.id);
    }
    let mut from_a = group_report(&g, NodeRole::Standby, 5);
    from_a.actions = vec![result(&queued.id, ActionOutcome::Succeeded, "demoted")];
    let response = a.post(h.url(&paths::report("a"))).json(&report("a", 2, vec![from_a])).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let action_url = h.url(&hapair_operator::controller::views::action_path("default", "g", &queued.id));
    let view: ActionView = admin.get(&action_url).send().await.unwrap().json().await.unwrap();
    assert_eq!(view.outcome, ActionOutcome::Pending);
    // a answered; only b still sees the action.
    let on_a: DesiredConfig = config(&a, &h, "a", "").await.json().await.unwrap();
    assert!(on_a.groups[0].actions.is_empty());

    let mut from_b = group_report(&g, NodeRole::Primary, 5);
    from_b.actions = vec![result(&queued.id, ActionOutcome::Succeeded, "serving")];
    let response = b.post(h.url(&paths::report("b"))).json(&report("b", 2, vec![from_b])).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let view: ActionView = admin.get(&action_url).send().await.unwrap().json().await.unwrap();
    assert_eq!((view.outcome, view.message.as_str()), (ActionOutcome::Succeeded, "b: serving"));
    assert_eq!(view.results.len(), 2);
    let on_b: DesiredConfig = config(&b, &h, "b", "").await.json().await.unwrap();
    assert!(on_b.groups[0].actions.is_empty());
    let overview = h.overview().await;
    let status = &overview.groups[0].status;
    assert_eq!(status.last_action.as_ref().map(|a| a.outcome), Some(ActionOutcome::Succeeded));
    let reasons: Vec<&str> = overview.groups[0].events.iter().map(|e| e.event.reason.as_str()).collect();
    assert!(reasons.contains(&"ActionRequested") && reasons.contains(&"ActionSucceeded"), "{reasons:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn a_bad_manifest_written_while_running_is_reported_and_the_last_good_config_stays() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let a = h.enroll("a").await;
    let before = config(&a, &h, "a", "").await.text().await.unwrap();
    h.write_manifest("g.yaml", &GROUP.replace("leaseTTL: 600ms", "leaseTTL: 5s"));
    let expected = format!(
        "{}/g.yaml (document 1), HaGroup default/g: spec.heartbeat.leaseTTL: leaseTTL (5s) must be less than deadAfter (1s)",
        manifests_dir(&h).display()
    );
    let overview = eventually(Duration::from_secs(10), || async {
        let overview = h.overview().await;
        (!overview.errors.is_empty()).then_some(overview)
    })
    .await
    .expect("the error is reported");
    assert!(overview.errors[0].starts_with(&expected), "{:?}", overview.errors);
    let view = &overview.groups[0];
    assert_eq!(view.status.phase, Some(GroupPhase::Invalid));
    assert!(view.error.as_deref().is_some_and(|e| e.starts_with(&expected)));
    assert!(view.events.iter().any(
        |e| e.event.reason == "InvalidManifest" && e.event.message.ends_with("the last good config stays in force")
    ));
    // The nodes keep their bundle: same revision, same content.
    assert_eq!(config(&a, &h, "a", "?revision=0").await.text().await.unwrap(), before);
    assert_eq!(config(&a, &h, "a", "?revision=1&wait=1").await.status(), 304);

    // Fixing the manifest clears the error and moves on.
    h.write_manifest("g.yaml", &GROUP.replace("leaseTTL: 600ms", "leaseTTL: 700ms"));
    let bundle: DesiredConfig = config(&a, &h, "a", "?revision=1&wait=10").await.json().await.unwrap();
    assert_eq!(bundle.revision, 2);
    assert_eq!(bundle.groups[0].spec.heartbeat.lease_ttl.as_millis(), 700);
    assert!(h.overview().await.errors.is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn health_and_metrics_are_open_and_count_requests() {
    let h = Harness::start(&[("g.yaml", GROUP)]).await;
    let anonymous = h.anonymous();
    assert_eq!(anonymous.get(h.url("/healthz")).send().await.unwrap().text().await.unwrap(), "ok\n");
    assert_eq!(anonymous.get(h.url(paths::GROUPS)).send().await.unwrap().status(), 401);
    let text = anonymous.get(h.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("hapair_controller_api_requests_total{endpoint=\"/v1/groups\",code=\"401\"} 1"), "{text}");
    assert!(text.contains("hapair_controller_groups{phase=\"Pending\"} 1"), "{text}");
    assert!(text.contains("hapair_controller_reconciles_total"), "{text}");
    assert!(!text.contains("default/g"), "no group names in metrics");
    h.shutdown().await;
}

#[tokio::test]
async fn a_removed_group_is_deleted_once_both_nodes_cleaned_up() {
    let h = Harness::start(&[("g.yaml", GROUP), ("solo.yaml", SOLO)]).await;
    let g = key("default", "g");
    let (a, b) = (h.enroll("a").await, h.enroll("b").await);
    let mut running = group_report(&g, NodeRole::Primary, 1);
    running.events = vec![hapair_crds::nodeapi::EventRecord {
        time: "2025-01-01T00:00:00Z".into(),
        type_: hapair_crds::nodeapi::EventType::Normal,
        reason: "Promoted".into(),
        message: "acquired the witness lease".into(),
        epoch: 1,
    }];
    let post = |client: &reqwest::Client, node: &str, group: hapair_crds::nodeapi::GroupReport| {
        client.post(h.url(&paths::report(node))).json(&report(node, 1, vec![group])).send()
    };
    assert_eq!(post(&a, "a", running.clone()).await.unwrap().status(), 204);
    // The same event re-sent (a retried report) is kept once.
    assert_eq!(post(&a, "a", running).await.unwrap().status(), 204);
    let events = h.overview().await.groups.into_iter().find(|v| v.key == g).unwrap().events;
    let promoted: Vec<_> = events.iter().filter(|e| e.event.reason == "Promoted").collect();
    assert_eq!(promoted.len(), 1);
    assert_eq!(promoted[0].node.as_deref(), Some("a"));

    std::fs::remove_file(manifests_dir(&h).join("g.yaml")).unwrap();
    let bundle: DesiredConfig = config(&a, &h, "a", "?revision=1&wait=10").await.json().await.unwrap();
    assert_eq!((bundle.revision, bundle.groups.len(), bundle.groups[0].deleting), (2, 1, true));
    let overview = h.overview().await;
    assert!(overview.groups.iter().any(|v| v.key == g && v.deleting));

    let mut done = group_report(&g, NodeRole::Standby, 1);
    done.cleaned_up = true;
    assert_eq!(post(&a, "a", done.clone()).await.unwrap().status(), 204);
    assert_eq!(config(&a, &h, "a", "?revision=2").await.status(), 304, "still deleting until b is done");
    assert_eq!(post(&b, "b", done).await.unwrap().status(), 204);
    let bundle: DesiredConfig = config(&a, &h, "a", "?revision=2&wait=10").await.json().await.unwrap();
    assert_eq!((bundle.revision, bundle.groups.len()), (3, 0));
    let overview = h.overview().await;
    assert_eq!(overview.groups.iter().map(|v| v.key.to_string()).collect::<Vec<_>>(), ["edge/solo"]);
    h.shutdown().await;
}
