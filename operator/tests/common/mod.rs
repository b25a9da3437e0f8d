//! A real standalone controller on 127.0.0.1 with temporary manifest and state directories,
//! and real TLS clients for it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hapair_crds::hagroup::{Hardware, NodeHealth, NodeRole};
use hapair_crds::nodeapi::{
    ActionResult, EnrollRequest, EnrollResponse, GroupKey, GroupReport, LeaseOp, LeaseRequest, LeaseResponse,
    NodeReport,
};
use hapair_operator::controller::views::{AdminConfig, CLI_CONFIG_FILE, GroupsOverview};
use hapair_operator::pki::tokens::TokenFile;
use hapair_operator::server::ApiSettings;
use hapair_operator::server::ratelimit::RateSettings;
use hapair_operator::standalone::{Standalone, StandaloneConfig};
use hapair_operator::witness::lease::{LeaseAuthority, LeaseParams};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

pub const GROUP: &str = r#"apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: g}
spec:
  nodes:
    - {name: a, heartbeatAddresses: [198.18.1.1]}
    - {name: b, heartbeatAddresses: [198.18.1.2]}
  heartbeat: {leaseTTL: 600ms, maxClockDriftPpm: 500}
  virtualIPs:
    - {name: www, address: 198.18.1.80/24, interface: eth0}
"#;

pub const SOLO: &str = r#"apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: solo, namespace: edge}
spec:
  nodes:
    - {name: c, heartbeatAddresses: [198.18.2.1]}
    - {name: d, heartbeatAddresses: [198.18.2.2]}
  witness: {mode: none}
"#;

/// The lease requests a [`TestAuthority`] saw, with the parameters it was given.
pub type Seen = Arc<Mutex<Vec<(LeaseRequest, LeaseParams)>>>;

/// A minimal lease authority for the tests: one holder per group until its lease expires.
#[derive(Debug, Default)]
pub struct TestAuthority {
    holders: HashMap<GroupKey, (String, Duration)>,
    pub seen: Seen,
}

impl LeaseAuthority for TestAuthority {
    fn handle(&mut self, now: Duration, request: &LeaseRequest, params: LeaseParams) -> LeaseResponse {
        self.seen.lock().unwrap().push((request.clone(), params));
        let ttl = Duration::from_millis(request.ttl_ms).min(params.ttl);
        match (request.op, self.holders.get(&request.group)) {
            (LeaseOp::Release, Some((holder, _))) if *holder == request.node => {
                self.holders.remove(&request.group);
                LeaseResponse::Released
            }
            (LeaseOp::Release, _) => LeaseResponse::Released,
            (_, Some((holder, until))) if *holder != request.node && *until > now => LeaseResponse::Denied {
                holder: Some(holder.clone()),
                retry_after_ms: (*until - now).as_millis() as u64,
                reason: "held".into(),
            },
            _ => {
                self.holders.insert(request.group.clone(), (request.node.clone(), now + ttl));
                LeaseResponse::Granted {
                    holder: request.node.clone(),
                    ttl_ms: ttl.as_millis() as u64,
                    epoch: request.epoch,
                }
            }
        }
    }
}

pub struct Harness {
    pub manifests: tempfile::TempDir,
    pub state: tempfile::TempDir,
    pub controller: Option<Standalone>,
    pub base: String,
    pub admin: AdminConfig,
    pub seen: Seen,
}

pub fn settings() -> ApiSettings {
    ApiSettings { rate: RateSettings { burst: 1000, per_second: 1000.0 }, ..ApiSettings::default() }
}

impl Harness {
    pub async fn start(files: &[(&str, &str)]) -> Harness {
        Harness::start_with(files, settings()).await
    }

    pub async fn start_with(files: &[(&str, &str)], api: ApiSettings) -> Harness {
        let manifests = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(manifests.path().join(name), text).unwrap();
        }
        let (controller, base, admin, seen) = launch(manifests.path(), state.path(), api).await;
        Harness { manifests, state, controller: Some(controller), base, admin, seen }
    }

    /// Stops the controller and starts a new one on the same directories (a new port).
    pub async fn restart(&mut self) {
        if let Some(controller) = self.controller.take() {
            controller.shutdown().await;
        }
        let (controller, base, admin, seen) = launch(self.manifests.path(), self.state.path(), settings()).await;
        (self.controller, self.base, self.admin, self.seen) = (Some(controller), base, admin, seen);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn write_manifest(&self, name: &str, text: &str) {
        // As editors do: write elsewhere, rename over.
        let tmp = self.manifests.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests.path().join(name)).unwrap();
    }

    pub fn ca_pem(&self) -> &str {
        &self.admin.ca_pem
    }

    /// A client that trusts the controller CA and presents no certificate.
    pub fn anonymous(&self) -> reqwest::Client {
        client(self.ca_pem(), None)
    }

    pub fn admin_client(&self) -> reqwest::Client {
        client(self.ca_pem(), Some((&self.admin.cert_pem, &self.admin.key_pem)))
    }

    pub fn token(&self, node: &str) -> String {
        TokenFile::new(self.state.path())
            .create(node, Duration::from_secs(600), hapair_operator::support::timestamp::now_millis())
            .unwrap()
    }

    /// Enrolls `node` through `POST /v1/enroll` and returns a client with its certificate.
    pub async fn enroll(&self, node: &str) -> reqwest::Client {
        let (key, csr) = csr(node);
        let request = EnrollRequest { node: node.into(), token: self.token(node), csr_pem: csr };
        let response = self.anonymous().post(self.url("/v1/enroll")).json(&request).send().await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
        let answer: EnrollResponse = response.json().await.unwrap();
        client(self.ca_pem(), Some((&answer.certificate_pem, &key.serialize_pem())))
    }

    pub async fn overview(&self) -> GroupsOverview {
        let response = self.admin_client().get(self.url("/v1/groups")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn shutdown(mut self) {
        if let Some(controller) = self.controller.take() {
            controller.shutdown().await;
        }
    }
}

async fn launch(manifests: &Path, state: &Path, api: ApiSettings) -> (Standalone, String, AdminConfig, Seen) {
    let mut config = StandaloneConfig::new(manifests, state, "127.0.0.1:0".parse().unwrap());
    config.poll_interval = Duration::from_millis(100);
    config.api = api;
    let authority = TestAuthority::default();
    let seen = authority.seen.clone();
    let controller = Standalone::start(config, Some(Box::new(authority))).await.unwrap();
    let base = format!("https://127.0.0.1:{}", controller.local_addr().port());
    let admin: AdminConfig = serde_json::from_slice(&std::fs::read(state.join(CLI_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(admin.controller, base);
    (controller, base, admin, seen)
}

pub fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30));
    if let Some((cert, key)) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

pub fn csr(node: &str) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

pub fn group_report(key: &GroupKey, role: NodeRole, epoch: u64) -> GroupReport {
    GroupReport {
        key: key.clone(),
        role,
        epoch,
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
    }
}

pub fn report(node: &str, revision: u64, groups: Vec<GroupReport>) -> NodeReport {
    NodeReport {
        node: node.into(),
        applied_revision: revision,
        config_error: None,
        agent_version: "test".into(),
        os: "Debian GNU/Linux 12".into(),
        uptime_seconds: 5,
        hardware: Hardware { cpus: 2, memory_bytes: 1 << 30, ..Hardware::default() },
        links: vec![],
        groups,
        wipes: vec![],
    }
}

pub fn result(id: &str, outcome: hapair_crds::nodeapi::ActionOutcome, message: &str) -> ActionResult {
    ActionResult { id: id.into(), outcome, message: message.into() }
}

pub fn key(ns: &str, name: &str) -> GroupKey {
    GroupKey::new(ns, name)
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn state_dir(h: &Harness) -> &Path {
    h.state.path()
}

pub fn manifests_dir(h: &Harness) -> PathBuf {
    h.manifests.path().to_path_buf()
}

/// `kubectl-hapair ARGS` against `h`'s controller, on the admin config it wrote, with
/// output captured.
pub fn cli(h: &Harness, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-hapair"));
    command
        .arg("--config")
        .arg(state_dir(h).join(hapair_operator::controller::views::CLI_CONFIG_FILE))
        .args(args)
        .env_remove("HAPAIR_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}
