//! Test controllers on real TLS sockets: a CA with a server and a node certificate, and
//! node-API servers that lead (serve config, reports, leases, enrollment), answer 503 as a
//! non-leader would (with or without a leader hint), or accept and never answer. The agent
//! code under test talks to them exactly as to a real controller.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use hapair_crds::nodeapi::{
    ApiError, DesiredConfig, EnrollRequest, EnrollResponse, LEADER_HEADER, LeaseRequest, LeaseResponse,
};
use hyper::{Request, Response, StatusCode};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::enroll::ControllerConfig;

/// The node the client certificate names.
pub const NODE: &str = "a";

/// A CA, the controllers' server certificate (localhost, 127.0.0.1) and node `a`'s client
/// certificate, as PEM, with the files a [`ControllerConfig`] names in a temporary dir.
pub struct Pki {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    server_cert_pem: String,
    server_key_pem: String,
    pub dir: tempfile::TempDir,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir.path()).finish_non_exhaustive()
    }
}

fn signed(cn: &str, sans: &[&str], issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    params.distinguished_name = name;
    (params.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

impl Pki {
    pub fn new() -> Arc<Pki> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "hapair test CA");
        params.distinguished_name = name;
        let ca_pem = params.self_signed(&key).unwrap().pem();
        let issuer = Issuer::new(params, key);
        let (server_cert_pem, server_key_pem) = signed("controller", &["localhost", "127.0.0.1"], &issuer);
        let (node_cert, node_key) = signed(NODE, &[NODE], &issuer);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("node.crt"), node_cert).unwrap();
        std::fs::write(dir.path().join("node.key"), node_key).unwrap();
        Arc::new(Pki { ca_pem, issuer, server_cert_pem, server_key_pem, dir })
    }

    /// The enrollment of node `a` with these controllers, the first preferred.
    pub fn controller_config(&self, controllers: &[&str]) -> ControllerConfig {
        let file = |name: &str| self.dir.path().join(name);
        ControllerConfig {
            controller: controllers[0].to_string(),
            controllers: controllers.iter().map(|c| c.to_string()).collect(),
            node: NODE.into(),
            ca: file("ca.crt"),
            cert: file("node.crt"),
            key: file("node.key"),
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap()).unwrap();
        // Enrollment comes without a client certificate; the node API checks for one.
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .unwrap();
        let chain = CertificateDer::pem_slice_iter(self.server_cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// What a fake controller does with each request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Serves everything; lease answers come after `lease_delay`; enrollment answers list
    /// `controllers`.
    Leader { lease_delay: Duration, controllers: Vec<String> },
    /// 503 with `Retry-After`, and `x-hapair-leader` when `hint` is set.
    NotLeader { hint: Option<String> },
    /// Accepts the connection and the request, never answers.
    Hang,
}

impl Behaviour {
    pub fn leader() -> Behaviour {
        Behaviour::Leader { lease_delay: Duration::ZERO, controllers: Vec::new() }
    }
}

/// One fake controller, serving until dropped.
#[derive(Debug)]
pub struct FakeController {
    pub url: String,
    /// `METHOD path` of every request received.
    pub hits: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A URL nothing listens on: connections are refused.
pub async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("https://127.0.0.1:{port}")
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(value).unwrap()))
        .unwrap()
}

impl FakeController {
    pub async fn start(pki: &Arc<Pki>, behaviour: Behaviour) -> FakeController {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let acceptor = pki.acceptor();
        let (pki, seen) = (Arc::clone(pki), Arc::clone(&hits));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, pki, seen, behaviour) = (acceptor.clone(), pki.clone(), seen.clone(), behaviour.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let client_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let (pki, seen, behaviour) = (pki.clone(), seen.clone(), behaviour.clone());
                        async move {
                            seen.lock().unwrap().push(format!("{} {}", request.method(), request.uri().path()));
                            Ok::<_, Infallible>(answer(&pki, &behaviour, client_cert, request).await)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        FakeController { url, hits, task }
    }

    /// How many requests reached this controller.
    pub fn hit_count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

async fn answer(
    pki: &Pki,
    behaviour: &Behaviour,
    client_cert: bool,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let (lease_delay, controllers) = match behaviour {
        Behaviour::Hang => std::future::pending().await,
        Behaviour::NotLeader { hint } => {
            let mut response = json(
                StatusCode::SERVICE_UNAVAILABLE,
                &ApiError { error: "this controller is not the leader; retry".into() },
            );
            response.headers_mut().insert("retry-after", "1".parse().unwrap());
            if let Some(hint) = hint {
                response.headers_mut().insert(LEADER_HEADER, hint.parse().unwrap());
            }
            return response;
        }
        Behaviour::Leader { lease_delay, controllers } => (*lease_delay, controllers.clone()),
    };
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let body = axum::body::to_bytes(Body::new(request.into_body()), 1 << 20).await.unwrap_or_default();
    if path == hapair_crds::nodeapi::paths::ENROLL {
        let enroll: EnrollRequest = serde_json::from_slice(&body).unwrap();
        let csr = CertificateSigningRequestParams::from_pem(&enroll.csr_pem).unwrap();
        let certificate_pem = csr.signed_by(&pki.issuer).unwrap().pem();
        return json(StatusCode::OK, &EnrollResponse { certificate_pem, ca_pem: pki.ca_pem.clone(), controllers });
    }
    if !client_cert {
        return json(StatusCode::FORBIDDEN, &ApiError { error: "no client certificate".into() });
    }
    if path == hapair_crds::nodeapi::paths::LEASE {
        tokio::time::sleep(lease_delay).await;
        let lease: LeaseRequest = serde_json::from_slice(&body).unwrap();
        return json(
            StatusCode::OK,
            &LeaseResponse::Granted { holder: lease.node, ttl_ms: lease.ttl_ms, epoch: lease.epoch },
        );
    }
    if path == hapair_crds::nodeapi::paths::config(NODE) {
        if query.contains("revision=1") {
            return Response::builder().status(StatusCode::NOT_MODIFIED).body(Body::empty()).unwrap();
        }
        let bundle = DesiredConfig { node: NODE.into(), revision: 1, groups: Vec::new(), wipes: Vec::new() };
        return json(StatusCode::OK, &bundle);
    }
    if path == hapair_crds::nodeapi::paths::report(NODE) {
        return Response::builder().status(StatusCode::OK).body(Body::empty()).unwrap();
    }
    json(StatusCode::NOT_FOUND, &ApiError { error: format!("no route {path}") })
}

/// Whether `dir` holds the files a successful enrollment writes.
pub fn enrolled(dir: &Path) -> bool {
    ["node.key", "node.crt", "ca.crt", "agent.yaml"].iter().all(|f| dir.join(f).exists())
}
