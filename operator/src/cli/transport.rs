//! How the CLI reaches a controller. Standalone controllers are reached over the admin API
//! with the admin certificate ([`HttpsTransport`]); a cluster through the Kubernetes API
//! ([`crate::cli::kube_transport::KubeTransport`]: actions as annotations, status from the
//! HaGroup objects).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hapair_crds::nodeapi::{ApiError, GroupKey, LEADER_HEADER, paths};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject;
use serde::de::DeserializeOwned;

use crate::controller::views::{ActionRequest, ActionView, AdminConfig, GroupView, GroupsOverview, action_path};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the controller at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("controller answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from the controller: {0}")]
    Decode(String),
    /// Stdout could not be written (a full disk, a closed pipe).
    #[error("writing output: {}", io_message(.0))]
    Output(std::io::Error),
}

/// An I/O error in words, without the `(os error N)` std appends: "No space left on device".
fn io_message(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_string(),
        _ => text,
    }
}

/// What the CLI needs from a controller.
pub trait Transport {
    fn groups(&self) -> impl Future<Output = Result<GroupsOverview, CliError>>;
    /// One group in detail (for `describe`). A transport that can fetch one group (and its
    /// Events) on its own does so; the default picks it out of [`Transport::groups`].
    fn group(&self, key: &GroupKey) -> impl Future<Output = Result<GroupView, CliError>> {
        async move {
            let overview = self.groups().await?;
            let known: Vec<String> = overview.groups.iter().map(|g| g.key.to_string()).collect();
            overview
                .groups
                .into_iter()
                .find(|g| g.key == *key)
                .ok_or_else(|| CliError::Config(format!("no HaGroup {key} (known: {})", known.join(", "))))
        }
    }
    fn submit(&self, key: &GroupKey, request: &ActionRequest) -> impl Future<Output = Result<ActionView, CliError>>;
    fn action(&self, key: &GroupKey, id: &str) -> impl Future<Output = Result<ActionView, CliError>>;
}

/// Where the connection settings come from: a config file, individual flags, or both (flags
/// win).
#[derive(Debug, Clone, Default)]
pub struct ConnectionFlags {
    pub config: Option<PathBuf>,
    pub controller: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| CliError::Config(format!("reading {what} {}: {e}", path.display())))
}

impl ConnectionFlags {
    /// Resolves the flags into complete settings.
    pub fn resolve(&self) -> Result<AdminConfig, CliError> {
        let base: Option<AdminConfig> = match &self.config {
            Some(path) => Some(
                serde_json::from_str(&read(path, "config")?)
                    .map_err(|e| CliError::Config(format!("{}: not a hapair admin config: {e}", path.display())))?,
            ),
            None => None,
        };
        let missing = |what: &str| {
            CliError::Config(format!(
                "no {what}: pass --config (hapair-admin.json from the controller's state directory, or set HAPAIR_CONFIG) or --controller, --ca, --cert and --key"
            ))
        };
        let controller = match (&self.controller, &base) {
            (Some(url), _) => url.clone(),
            (None, Some(b)) => b.controller.clone(),
            (None, None) => return Err(missing("controller URL")),
        };
        let pick = |flag: &Option<PathBuf>, from_base: Option<&String>, what: &str| match (flag, from_base) {
            (Some(path), _) => read(path, what),
            (None, Some(pem)) => Ok(pem.clone()),
            (None, None) => Err(missing(what)),
        };
        // Flags name one controller; the config's list applies only to the config's own.
        let controllers = match (&self.controller, &base) {
            (None, Some(b)) => b.controllers.iter().map(|c| c.trim_end_matches('/').to_string()).collect(),
            _ => Vec::new(),
        };
        Ok(AdminConfig {
            controller: controller.trim_end_matches('/').to_string(),
            controllers,
            ca_pem: pick(&self.ca, base.as_ref().map(|b| &b.ca_pem), "CA certificate")?,
            cert_pem: pick(&self.cert, base.as_ref().map(|b| &b.cert_pem), "client certificate")?,
            key_pem: pick(&self.key, base.as_ref().map(|b| &b.key_pem), "client key")?,
        })
    }
}

/// The admin API over HTTPS with the admin client certificate.
#[derive(Debug, Clone)]
pub struct HttpsTransport {
    /// The configured controller first, then the others of its set.
    bases: Vec<String>,
    client: reqwest::Client,
}

impl HttpsTransport {
    pub fn new(config: &AdminConfig) -> Result<Self, CliError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| CliError::Config(format!("{what}: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(config.ca_pem.as_bytes()) {
            roots.add(cert.map_err(|e| bad("CA certificate", &e))?).map_err(|e| bad("CA certificate", &e))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(config.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| bad("client certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(config.key_pem.as_bytes()).map_err(|e| bad("client key", &e))?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS", &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("client certificate", &e))?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| bad("HTTP client", &e))?;
        let mut bases = vec![config.controller.clone()];
        for other in &config.controllers {
            if !bases.contains(other) {
                bases.push(other.clone());
            }
        }
        Ok(HttpsTransport { bases, client })
    }

    /// Sends the request `build` makes for a controller's base URL, to the configured
    /// controller first. A controller that cannot be connected to, or that does not lead
    /// (503), hands the request to the leader it names, if that is one of the set, or to
    /// the next controller; each is tried once. Nothing is retried once a controller may
    /// have acted on it.
    async fn answer<T: DeserializeOwned>(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<T, CliError> {
        let mut tried: Vec<&str> = Vec::new();
        let mut next = self.bases.first().map(String::as_str);
        let mut failure = None;
        while let Some(base) = next {
            tried.push(base);
            let untried = self.bases.iter().map(String::as_str).find(|b| !tried.contains(b));
            let response = match build(base).send().await {
                Ok(response) => response,
                Err(e) if e.is_connect() => {
                    failure = Some(CliError::Unreachable { url: base.to_string(), message: error_chain(&e) });
                    next = untried;
                    continue;
                }
                Err(e) => return Err(CliError::Unreachable { url: base.to_string(), message: error_chain(&e) }),
            };
            let status = response.status();
            let hint = response
                .headers()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim_end_matches('/').to_string());
            let bytes = response.bytes().await.map_err(|e| CliError::Decode(e.to_string()))?;
            if status.is_success() {
                return serde_json::from_slice(&bytes).map_err(|e| CliError::Decode(e.to_string()));
            }
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            let error = CliError::Api { status: status.as_u16(), message };
            if status != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                return Err(error);
            }
            failure = Some(error);
            let leader = hint.as_deref().and_then(|h| self.bases.iter().map(String::as_str).find(|b| *b == h));
            next = leader.filter(|l| !tried.contains(l)).or(untried);
        }
        Err(failure.unwrap_or_else(|| CliError::Config("no controller configured".into())))
    }
}

/// reqwest's errors hide the interesting part (the TLS or connect failure) in the source
/// chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl Transport for HttpsTransport {
    async fn groups(&self) -> Result<GroupsOverview, CliError> {
        self.answer(|base| self.client.get(format!("{base}{}", paths::GROUPS))).await
    }

    async fn submit(&self, key: &GroupKey, request: &ActionRequest) -> Result<ActionView, CliError> {
        let path = paths::actions(&key.namespace, &key.name);
        self.answer(|base| self.client.post(format!("{base}{path}")).json(request)).await
    }

    async fn action(&self, key: &GroupKey, id: &str) -> Result<ActionView, CliError> {
        let path = action_path(&key.namespace, &key.name, id);
        self.answer(|base| self.client.get(format!("{base}{path}"))).await
    }
}
