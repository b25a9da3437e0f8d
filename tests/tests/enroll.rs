//! `hapair-agent enroll` against a real standalone controller: the agent pins the CA by
//! fingerprint (or a CA file), gets its certificate, writes its files, and can then use the
//! node API with them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use hapair_agent::enroll::{
    CA_FILE, CONFIG_FILE, ControllerConfig, EnrollError, EnrollOptions, KEY_FILE, Trust, enroll,
};
use hapair_crds::nodeapi::{DesiredConfig, paths};
use hapair_operator::pki::tokens::TokenFile;
use hapair_operator::standalone::{Standalone, StandaloneConfig};

const GROUP: &str = r#"apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: g}
spec:
  nodes:
    - {name: a, heartbeatAddresses: [198.18.1.1]}
    - {name: b, heartbeatAddresses: [198.18.1.2]}
"#;

#[tokio::test]
async fn an_agent_enrolls_by_fingerprint_and_then_reads_its_config() {
    let manifests = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(manifests.path().join("g.yaml"), GROUP).unwrap();
    let config = StandaloneConfig::new(manifests.path(), state.path(), "127.0.0.1:0".parse().unwrap());
    let controller = Standalone::start(config, None).await.unwrap();
    let url = format!("https://127.0.0.1:{}", controller.local_addr().port());
    let token = |node: &str| {
        TokenFile::new(state.path())
            .create(node, Duration::from_secs(300), hapair_operator::support::timestamp::now_millis())
            .unwrap()
    };
    let agent_dir = tempfile::tempdir().unwrap();
    let options = |node: &str, trust: Trust, dir: &std::path::Path| EnrollOptions {
        controllers: vec![url.clone()],
        token: token(node),
        node: node.into(),
        dir: dir.to_path_buf(),
        trust,
        force: false,
    };

    // A wrong pin is refused during the handshake; nothing is written.
    let wrong = options("a", Trust::Fingerprint("00".repeat(32)), agent_dir.path());
    let err = enroll(&wrong).await.err().unwrap();
    assert!(matches!(err, EnrollError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("pinned CA fingerprint"), "{err}");
    assert!(!agent_dir.path().join(KEY_FILE).exists());

    let good = options("a", Trust::Fingerprint(controller.ca_fingerprint().to_string()), agent_dir.path());
    let written = enroll(&good).await.unwrap();
    assert_eq!(written, agent_dir.path().join(CONFIG_FILE));
    let mode = std::fs::metadata(agent_dir.path().join(KEY_FILE)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(agent_dir.path().join(CA_FILE)).unwrap(),
        std::fs::read_to_string(state.path().join("ca.crt")).unwrap()
    );
    // Enrolling again needs --force.
    assert!(matches!(enroll(&good).await, Err(EnrollError::AlreadyEnrolled(_))));

    let settings = ControllerConfig::load(&written).unwrap();
    assert_eq!((settings.controller.as_str(), settings.node.as_str()), (url.as_str(), "a"));
    let client = reqwest::Client::builder().use_preconfigured_tls(settings.tls().unwrap()).build().unwrap();
    let response = client.get(format!("{url}{}", paths::config("a"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let bundle: DesiredConfig = response.json().await.unwrap();
    assert_eq!((bundle.node.as_str(), bundle.groups.len()), ("a", 1));
    // The same certificate cannot read b's config.
    let response = client.get(format!("{url}{}", paths::config("b"))).send().await.unwrap();
    assert_eq!(response.status(), 403);

    // Trusting a CA file works the same; a used token is refused with the controller's reason.
    let b_dir = tempfile::tempdir().unwrap();
    let ca_pem = std::fs::read_to_string(state.path().join("ca.crt")).unwrap();
    let mut b = options("b", Trust::CaPem(ca_pem.clone()), b_dir.path());
    enroll(&b).await.unwrap();
    // Same token again (it was burned by the enrollment above).
    b.force = true;
    let err = enroll(&b).await.err().unwrap();
    assert!(matches!(err, EnrollError::Refused { status: 401, .. }), "{err}");
    assert!(err.to_string().contains("already used"), "{err}");
    controller.shutdown().await;
}

#[tokio::test]
async fn an_agent_given_a_dead_controller_first_enrolls_with_the_live_one_and_uses_it() {
    let manifests = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(manifests.path().join("g.yaml"), GROUP).unwrap();
    let config = StandaloneConfig::new(manifests.path(), state.path(), "127.0.0.1:0".parse().unwrap());
    let controller = Standalone::start(config, None).await.unwrap();
    let live = format!("https://127.0.0.1:{}", controller.local_addr().port());
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port())
    };
    let token = TokenFile::new(state.path())
        .create("a", Duration::from_secs(300), hapair_operator::support::timestamp::now_millis())
        .unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let options = EnrollOptions {
        controllers: vec![dead.clone(), live.clone()],
        token,
        node: "a".into(),
        dir: agent_dir.path().to_path_buf(),
        trust: Trust::Fingerprint(controller.ca_fingerprint().to_string()),
        force: false,
    };
    let written = enroll(&options).await.unwrap();
    let settings = ControllerConfig::load(&written).unwrap();
    // The dead one stays the preferred (first) one: it was given first.
    assert_eq!(settings.controller, dead);
    assert!(settings.endpoints().starts_with(&[dead.clone(), live.clone()]), "{:?}", settings.endpoints());

    // The running agent's client fails over from the dead controller and sticks to the live one.
    let client = hapair_agent::runtime::node_api::NodeApiClient::new(&settings).unwrap();
    let bundle = client.poll_config(None, Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!((bundle.node.as_str(), client.base()), ("a", live.as_str()));
    controller.shutdown().await;
}
