//! `hapair-agent enroll`: trading a one-time token for the node's client certificate.
//!
//! The agent makes a key pair and a CSR (CN = node name), posts them with the token to the
//! controller's `POST /v1/enroll`, and writes what it got into its directory: `node.key`
//! (mode 0600), `node.crt`, `ca.crt`, and sets `node`, `controller`, `controllers` and the
//! `tls` paths in `agent.yaml` next to them (creating it when missing, keeping its other
//! keys), which is all the agent needs to reach the node API afterwards.
//!
//! With several controllers (replicated, one leading), the given URLs are tried in order
//! until one takes the enrollment: one that cannot be reached or answers 503 (not the
//! leader) passes the turn to the leader it names in `x-hapair-leader`, or to the next URL.
//! The controllers `agent.yaml` lists are the given ones plus those the controller's
//! answer names.
//!
//! The first contact must not trust whoever answers: the controller is authenticated either
//! by a CA file obtained out of band or by the CA's SHA-256 fingerprint that
//! `hapair-operator token create` prints. There is no trust-on-first-use.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hapair_crds::nodeapi::{ApiError, EnrollRequest, EnrollResponse, LEADER_HEADER, paths};
use hapair_crds::validation::is_valid_name;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::agent_config::{AgentConfig, Enrollment, TlsFiles, base_url, merge_urls, write_enrollment};

pub const KEY_FILE: &str = "node.key";
pub const CERT_FILE: &str = "node.crt";
pub const CA_FILE: &str = "ca.crt";
pub const CONFIG_FILE: &str = "agent.yaml";

/// How the agent reaches the controller: the enrollment part of `agent.yaml`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ControllerConfig {
    /// Base URL of the node API, e.g. `https://ctl.example:7443`: the preferred controller.
    pub controller: String,
    /// Every controller's base URL, `controller` first; empty: `controller` only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// This node's name (the CN of its certificate).
    pub node: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ControllerConfig {
    /// Reads the enrollment from `agent.yaml` (relative paths resolved against its
    /// directory); an agent that is not enrolled has none.
    pub fn load(path: &Path) -> Result<ControllerConfig, EnrollError> {
        let text = std::fs::read_to_string(path).map_err(|e| EnrollError::Io(format!("{}: {e}", path.display())))?;
        let config = AgentConfig::parse(&text, path).map_err(|e| EnrollError::Io(e.to_string()))?;
        Self::from_agent_config(&config).ok_or_else(|| {
            EnrollError::Usage(format!("{}: not enrolled (node or controller is empty)", path.display()))
        })
    }

    /// The controller connection of an enrolled agent.
    pub fn from_agent_config(config: &AgentConfig) -> Option<ControllerConfig> {
        let controllers = config.controller_urls();
        let controller = controllers.first()?.clone();
        if config.node.is_empty() {
            return None;
        }
        Some(ControllerConfig {
            controller,
            controllers,
            node: config.node.clone(),
            ca: config.tls.ca_file.clone(),
            cert: config.tls.cert_file.clone(),
            key: config.tls.key_file.clone(),
        })
    }

    /// Every controller endpoint, without trailing '/', `controller` first.
    pub fn endpoints(&self) -> Vec<String> {
        merge_urls(std::iter::once(self.controller.as_str()).chain(self.controllers.iter().map(String::as_str)))
    }

    /// The mutual-TLS client configuration for the node API.
    pub fn tls(&self) -> Result<rustls::ClientConfig, EnrollError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| EnrollError::Io(format!("{}: {e}", p.display())));
        client_tls(&read(&self.ca)?, &read(&self.cert)?, &read(&self.key)?)
    }
}

/// How the controller is recognised on first contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// SHA-256 of the controller CA's certificate, lowercase hex.
    Fingerprint(String),
    /// The controller CA's certificate, PEM.
    CaPem(String),
}

#[derive(Clone, PartialEq, Eq)]
pub struct EnrollOptions {
    /// Base URLs of the controllers, `https://…`, in the order to try them; the first is the
    /// preferred one afterwards.
    pub controllers: Vec<String>,
    pub token: String,
    pub node: String,
    pub dir: PathBuf,
    pub trust: Trust,
    /// Replace an existing enrollment in `dir`.
    pub force: bool,
}

impl fmt::Debug for EnrollOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollOptions")
            .field("controllers", &self.controllers)
            .field("token", &"<redacted>")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .field("trust", &self.trust)
            .field("force", &self.force)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(String),
    #[error("{0} already holds an enrollment (node.crt); pass --force to replace it")]
    AlreadyEnrolled(PathBuf),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot reach the controller at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the controller refused the enrollment ({status}): {message}")]
    Refused { status: u16, message: String },
    /// Every controller was unreachable or not the leader; one entry per attempt, each
    /// naming its URL.
    #[error("no controller took the enrollment: {}", .0.join("; "))]
    NoController(Vec<String>),
    #[error("the controller's answer is not acceptable: {0}")]
    BadAnswer(String),
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// Normalizes a typed fingerprint (`AB:CD:…`, `sha256:abcd…`) to lowercase hex.
pub fn normalize_fingerprint(text: &str) -> Result<String, EnrollError> {
    let trimmed = text.trim();
    let bare = trimmed.strip_prefix("sha256:").or_else(|| trimmed.strip_prefix("SHA256:")).unwrap_or(trimmed);
    let hex: String = bare.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(EnrollError::Usage(format!("--ca-fingerprint {text:?} is not a SHA-256 fingerprint (64 hex digits)")))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the controller only if a certificate in its chain has the pinned fingerprint
/// and the chain verifies against that certificate as CA (name, validity, signatures).
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == self.fingerprint) else {
            return Err(rustls::Error::General(
                "no certificate the controller presented matches the pinned CA fingerprint".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, EnrollError> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| EnrollError::Tls(e.to_string()))
}

fn roots_from_pem(ca_pem: &str) -> Result<rustls::RootCertStore, EnrollError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| EnrollError::Tls(format!("CA certificate: {e}")))?;
        roots.add(cert).map_err(|e| EnrollError::Tls(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(EnrollError::Tls("CA file holds no certificate".into()));
    }
    Ok(roots)
}

/// A mutual-TLS client configuration: trust `ca_pem`, authenticate with the certificate and
/// key. This is how the agent talks to the node API once enrolled.
pub fn client_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<rustls::ClientConfig, EnrollError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| EnrollError::Tls(format!("certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| EnrollError::Tls(format!("key: {e}")))?;
    tls_builder()?
        .with_root_certificates(roots_from_pem(ca_pem)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| EnrollError::Tls(e.to_string()))
}

fn first_contact_tls(trust: &Trust) -> Result<rustls::ClientConfig, EnrollError> {
    Ok(match trust {
        Trust::CaPem(pem) => tls_builder()?.with_root_certificates(roots_from_pem(pem)?).with_no_client_auth(),
        Trust::Fingerprint(fp) => tls_builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa { fingerprint: fp.clone(), provider: provider() }))
            .with_no_client_auth(),
    })
}

/// Mode of the private key.
pub const KEY_MODE: u32 = 0o600;

/// Mode of an enrollment directory `enroll` creates: it holds the private key.
pub const DIR_MODE: u32 = 0o700;

/// Writes `bytes` to `path` via a temporary file and rename, with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EnrollError> {
    let io = |e: std::io::Error| EnrollError::Io(format!("{}: {e}", path.display()));
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io)?;
    // `mode` applies only to a file created here, and is narrowed by the umask; set on the
    // open file, it also holds for a leftover temporary file, before the key is written.
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// An error with all its sources, `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The CN of a PEM certificate.
fn common_name(cert_pem: &str) -> Option<String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// Enrolls this node; returns the path of the written `agent.yaml`.
pub async fn enroll(options: &EnrollOptions) -> Result<PathBuf, EnrollError> {
    if !is_valid_name(&options.node) {
        return Err(EnrollError::Usage(format!(
            "--node {:?} is not a valid node name (lowercase letters, digits and '-', at most 63)",
            options.node
        )));
    }
    let given = merge_urls(options.controllers.iter().map(String::as_str));
    if given.is_empty() {
        return Err(EnrollError::Usage("--controller: give at least one controller URL".into()));
    }
    if let Some(base) = given.iter().find(|u| !u.starts_with("https://")) {
        return Err(EnrollError::Usage(format!("--controller {base:?} must be an https:// URL")));
    }
    if options.dir.join(CERT_FILE).exists() && !options.force {
        return Err(EnrollError::AlreadyEnrolled(options.dir.clone()));
    }
    // A directory made here is private. One that exists is left as it is: it may be shared
    // (`/etc/hapair` with other files), and the key in it is 0600 on its own.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(&options.dir)
        .map_err(|e| EnrollError::Io(format!("{}: {e}", options.dir.display())))?;

    let key = KeyPair::generate().map_err(|e| EnrollError::Tls(format!("generating the node key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, options.node.as_str());
    params.distinguished_name = subject;
    let csr =
        params.serialize_request(&key).and_then(|c| c.pem()).map_err(|e| EnrollError::Tls(format!("CSR: {e}")))?;

    let client = reqwest::Client::builder()
        .use_preconfigured_tls(first_contact_tls(&options.trust)?)
        .timeout(Duration::from_secs(30))
        // A host that drops packets must not hold up the next controller for long.
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| EnrollError::Tls(e.to_string()))?;
    let request = EnrollRequest { node: options.node.clone(), token: options.token.trim().to_string(), csr_pem: csr };
    let (answered, answer) = post_enrollment(&client, &request, &given).await?;

    // The CA handed back must be the one the connection was authenticated with.
    let ca_der = CertificateDer::from_pem_slice(answer.ca_pem.as_bytes())
        .map_err(|e| EnrollError::BadAnswer(format!("caPem: {e}")))?;
    let expected = match &options.trust {
        Trust::Fingerprint(fp) => fp.clone(),
        Trust::CaPem(pem) => {
            CertificateDer::from_pem_slice(pem.as_bytes()).map(|d| fingerprint(&d)).unwrap_or_default()
        }
    };
    if fingerprint(&ca_der) != expected {
        return Err(EnrollError::BadAnswer("caPem is not the CA the controller was authenticated with".into()));
    }
    match common_name(&answer.certificate_pem) {
        Some(cn) if cn == options.node => {}
        other => return Err(EnrollError::BadAnswer(format!("certificatePem names {other:?}, not {:?}", options.node))),
    }
    // Refuse a certificate that does not work with our key before writing anything.
    client_tls(&answer.ca_pem, &answer.certificate_pem, &key.serialize_pem())?;

    write_file(&options.dir.join(KEY_FILE), key.serialize_pem().as_bytes(), KEY_MODE)?;
    write_file(&options.dir.join(CERT_FILE), answer.certificate_pem.as_bytes(), 0o644)?;
    write_file(&options.dir.join(CA_FILE), answer.ca_pem.as_bytes(), 0o644)?;
    let dir =
        std::path::absolute(&options.dir).map_err(|e| EnrollError::Io(format!("{}: {e}", options.dir.display())))?;
    let controllers = merged_controllers(&given, &answered, &answer.controllers);
    let enrollment = Enrollment {
        node: options.node.clone(),
        controller: given[0].clone(),
        controllers,
        tls: TlsFiles { ca_file: dir.join(CA_FILE), cert_file: dir.join(CERT_FILE), key_file: dir.join(KEY_FILE) },
    };
    let config_path = options.dir.join(CONFIG_FILE);
    write_enrollment(&config_path, &enrollment).map_err(|e| EnrollError::Io(e.to_string()))?;
    Ok(config_path)
}

/// The controllers `agent.yaml` lists: the given ones in their order, the one that took the
/// enrollment (it may have been a leader's hint), then those the answer names. An entry of
/// the answer that is not an https:// URL is left out: the token is spent by now, so a
/// controller's bad list must not cost the enrollment.
fn merged_controllers(given: &[String], answered: &str, listed: &[String]) -> Vec<String> {
    let usable = listed.iter().filter(|u| {
        let ok = base_url(u).starts_with("https://");
        if !ok {
            tracing::warn!(url = %u, "the controller lists a controller that is not an https:// URL; left out");
        }
        ok
    });
    merge_urls(given.iter().map(String::as_str).chain([answered]).chain(usable.map(String::as_str)))
}

/// Posts the enrollment to the controllers in turn until one takes it (or refuses it for a
/// reason another controller would share); returns that controller's URL and its answer.
async fn post_enrollment(
    client: &reqwest::Client,
    request: &EnrollRequest,
    given: &[String],
) -> Result<(String, EnrollResponse), EnrollError> {
    let mut queue: std::collections::VecDeque<String> = given.iter().cloned().collect();
    let mut tried: Vec<String> = Vec::new();
    let mut failures: Vec<(String, EnrollError)> = Vec::new();
    while let Some(base) = queue.pop_front() {
        if tried.contains(&base) {
            continue;
        }
        tried.push(base.clone());
        let url = format!("{base}{}", paths::ENROLL);
        let response = match client.post(&url).json(request).send().await {
            Ok(response) => response,
            Err(e) => {
                failures.push((url.clone(), EnrollError::Unreachable { url, message: error_chain(&e) }));
                continue;
            }
        };
        let status = response.status();
        let hint = response.headers().get(LEADER_HEADER).and_then(|v| v.to_str().ok()).map(|v| base_url(v).to_string());
        let bytes = response.bytes().await.map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
        if status.is_success() {
            let answer = serde_json::from_slice(&bytes).map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
            return Ok((base, answer));
        }
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        let refused = EnrollError::Refused { status: status.as_u16(), message };
        if status != reqwest::StatusCode::SERVICE_UNAVAILABLE {
            // A spent token or a wrong node is refused by every controller alike.
            return Err(refused);
        }
        // The hint came over a connection authenticated with the trusted CA: whoever it
        // names must present a certificate of that CA too, so following it is safe even to
        // a URL not given.
        if let Some(leader) = hint.filter(|h| h.starts_with("https://") && !tried.contains(h)) {
            queue.push_front(leader);
        }
        failures.push((url, refused));
    }
    if failures.len() == 1
        && let Some((_, only)) = failures.pop()
    {
        return Err(only);
    }
    Err(EnrollError::NoController(
        failures
            .into_iter()
            .map(|(url, e)| match e {
                EnrollError::Unreachable { .. } => e.to_string(),
                _ => format!("{url}: {e}"),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_accept_common_spellings() {
        let hex = "0f".repeat(32);
        assert_eq!(normalize_fingerprint(&hex).ok(), Some(hex.clone()));
        assert_eq!(normalize_fingerprint(&format!("SHA256:{}", hex.to_uppercase())).ok(), Some(hex.clone()));
        let colons: Vec<&str> = (0..32).map(|_| "0F").collect();
        assert_eq!(normalize_fingerprint(&colons.join(":")).ok(), Some(hex));
        assert!(normalize_fingerprint("0f0f").is_err());
    }

    #[tokio::test]
    async fn refuses_bad_input_before_touching_the_network_or_disk() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let options = |controller: &str, node: &str| EnrollOptions {
            controllers: vec![controller.into()],
            token: "t".into(),
            node: node.into(),
            dir: dir.path().join("agent"),
            trust: Trust::Fingerprint("00".repeat(32)),
            force: false,
        };
        let err = enroll(&options("http://ctl:7443", "db1")).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("must be an https:// URL"), "{err}");
        let err = enroll(&options("https://ctl:7443", "DB_1")).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not a valid node name"), "{err}");
        assert!(!dir.path().join("agent").exists());
        std::fs::create_dir_all(dir.path().join("agent"))?;
        std::fs::write(dir.path().join("agent").join(CERT_FILE), "x")?;
        let err = enroll(&options("https://ctl:7443", "db1")).await.err();
        assert!(matches!(err, Some(EnrollError::AlreadyEnrolled(_))), "{err:?}");
        Ok(())
    }

    #[test]
    fn the_key_is_written_owner_only_even_over_a_leftover_temporary_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(KEY_FILE);
        let leftover = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&leftover, "old")?;
        std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o666))?;
        write_file(&path, b"-----BEGIN PRIVATE KEY-----", KEY_MODE)?;
        assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read(&path)?, b"-----BEGIN PRIVATE KEY-----");
        assert!(!leftover.exists());
        // Replacing a key that had been left readable makes it private again.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        write_file(&path, b"new", KEY_MODE)?;
        assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o7777, 0o600);
        Ok(())
    }

    #[tokio::test]
    async fn a_directory_enroll_creates_is_private() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let options = EnrollOptions {
            // Nothing listens there: enroll fails after making the directory.
            controllers: vec!["https://127.0.0.1:1".into()],
            token: "t".into(),
            node: "db1".into(),
            dir: dir.path().join("etc/hapair"),
            trust: Trust::Fingerprint("00".repeat(32)),
            force: false,
        };
        let err = enroll(&options).await.err();
        assert!(matches!(err, Some(EnrollError::Unreachable { .. })), "{err:?}");
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o7777);
        assert_eq!(mode(&dir.path().join("etc/hapair"))?, 0o700);
        assert_eq!(mode(&dir.path().join("etc"))?, 0o700);
        Ok(())
    }

    #[test]
    fn the_config_resolves_paths_next_to_itself() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(
            &path,
            "controller: https://ctl:7443\nnode: db1\ntls: {caFile: ca.crt, certFile: /abs/node.crt, keyFile: node.key}\n",
        )?;
        let config = ControllerConfig::load(&path)?;
        assert_eq!(config.ca, dir.path().join("ca.crt"));
        assert_eq!(config.cert, PathBuf::from("/abs/node.crt"));
        std::fs::write(&path, "controller: https://ctl:7443\n")?;
        assert!(matches!(ControllerConfig::load(&path), Err(EnrollError::Usage(_))));
        Ok(())
    }

    mod failover {
        use super::*;
        use crate::runtime::node_api::fake::{Behaviour, FakeController, NODE, Pki, enrolled, refused_url};

        fn options(pki: &Pki, controllers: &[&str], dir: &Path) -> EnrollOptions {
            EnrollOptions {
                controllers: controllers.iter().map(|c| c.to_string()).collect(),
                token: "t".into(),
                node: NODE.into(),
                dir: dir.to_path_buf(),
                trust: Trust::CaPem(pki.ca_pem.clone()),
                force: false,
            }
        }

        #[tokio::test]
        async fn enrollment_reaches_the_leader_and_lists_every_controller() -> Result<(), Box<dyn std::error::Error>> {
            let pki = Pki::new();
            let far = "https://ctl-far.example:7443".to_string();
            let leader = FakeController::start(
                &pki,
                Behaviour::Leader {
                    lease_delay: Duration::ZERO,
                    controllers: vec![far.clone(), "http://not-tls.example".into()],
                },
            )
            .await;
            // The leader was not given: the follower's hint leads there.
            let follower = FakeController::start(&pki, Behaviour::NotLeader { hint: Some(leader.url.clone()) }).await;
            let down = refused_url().await;
            let dir = tempfile::tempdir()?;
            let written = enroll(&options(&pki, &[&down, &follower.url], dir.path())).await?;
            assert!(enrolled(dir.path()));
            assert_eq!((follower.hit_count(), leader.hit_count()), (1, 1));
            let config = AgentConfig::parse(&std::fs::read_to_string(&written)?, &written)?;
            // Given first (in their order), then the one that took it, then those it named;
            // an entry that is not https:// is left out.
            assert_eq!(config.controller, down);
            assert_eq!(config.controllers, vec![down.clone(), follower.url.clone(), leader.url.clone(), far]);
            let settings = ControllerConfig::load(&written)?;
            assert_eq!(settings.endpoints(), config.controllers);
            Ok(())
        }

        #[tokio::test]
        async fn enrollment_fails_naming_every_controller_it_tried() -> Result<(), Box<dyn std::error::Error>> {
            let pki = Pki::new();
            let follower = FakeController::start(&pki, Behaviour::NotLeader { hint: None }).await;
            let down = refused_url().await;
            let dir = tempfile::tempdir()?;
            let err = enroll(&options(&pki, &[&follower.url, &down], dir.path())).await.err();
            let Some(EnrollError::NoController(attempts)) = &err else { panic!("{err:?}") };
            assert_eq!(attempts.len(), 2, "{attempts:?}");
            assert!(attempts[0].starts_with(&format!("{}/v1/enroll: ", follower.url)), "{attempts:?}");
            assert!(attempts[0].contains("(503)"), "{attempts:?}");
            assert!(
                attempts[1].contains(&format!("cannot reach the controller at {down}/v1/enroll: ")),
                "{attempts:?}"
            );
            assert!(!dir.path().join(KEY_FILE).exists());

            // One controller alone fails as before: its own error.
            let err = enroll(&options(&pki, &[&follower.url], dir.path())).await.err();
            assert!(matches!(err, Some(EnrollError::Refused { status: 503, .. })), "{err:?}");
            Ok(())
        }

        #[tokio::test]
        async fn one_controller_writes_no_list() -> Result<(), Box<dyn std::error::Error>> {
            let pki = Pki::new();
            let leader = FakeController::start(&pki, Behaviour::leader()).await;
            let dir = tempfile::tempdir()?;
            // The URL as typed, with a trailing '/', and a controller that lists only itself.
            let written = enroll(&options(&pki, &[&format!("{}/", leader.url)], dir.path())).await?;
            let text = std::fs::read_to_string(&written)?;
            assert!(!text.contains("controllers"), "{text}");
            assert_eq!(AgentConfig::parse(&text, &written)?.controller, leader.url);
            Ok(())
        }
    }
}
