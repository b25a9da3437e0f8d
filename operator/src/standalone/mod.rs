//! `hapair-operator standalone`: the controller without Kubernetes. Desired state is a
//! directory of the same YAML users would `kubectl apply`; everything else lives in a state
//! directory (CA, certificates, tokens, controller state, statuses, events).
//!
//! The directory is polled (by content hash, so editors' write-and-rename saves are seen
//! like any other change) and reconciled on change; a refused manifest is logged and
//! recorded with file, object and field while the last good config stays in force.

pub mod file_store;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hapair_crds::manifest::MAX_MANIFEST_BYTES;
use hapair_crds::regular_file::read_text;

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::console::Console;
use crate::controller::metrics::Metrics;
use crate::controller::store::{Store, StoreError};
use crate::controller::views::{AdminConfig, CLI_CONFIG_FILE};
use crate::controller::{Controller, Settings};
use crate::pki::tokens::TokenFile;
use crate::pki::{Ca, PkiError};
use crate::server::identity::{TlsSetupError, server_config};
use crate::server::{ApiSettings, NodeApi, Server};
use crate::standalone::file_store::FileStore;
use crate::support::atomic_file::{FileError, write_json};
use crate::witness::lease::LeaseAuthority;

/// Full reconciles happen at least this often, changed directory or not.
const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// How the standalone controller runs.
#[derive(Clone, Debug)]
pub struct StandaloneConfig {
    pub manifests: PathBuf,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// Names (DNS or IP) agents use to reach the controller; go into the server certificate
    /// beside `localhost`, `127.0.0.1` and the listen address.
    pub server_names: Vec<String>,
    /// Base URL written into the CLI config; defaults to the first server name and the
    /// listen port.
    pub advertise: Option<String>,
    /// How often the manifest directory is checked for changes.
    pub poll_interval: Duration,
    pub controller: Settings,
    pub api: ApiSettings,
    /// Serve the web console under `/ui/`.
    pub console: bool,
}

impl StandaloneConfig {
    pub fn new(manifests: &Path, state_dir: &Path, listen: SocketAddr) -> Self {
        StandaloneConfig {
            manifests: manifests.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            listen,
            server_names: Vec::new(),
            advertise: None,
            poll_interval: Duration::from_secs(1),
            controller: Settings::default(),
            api: ApiSettings::default(),
            console: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("state directory {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    File(#[from] FileError),
}

/// Content hash of the manifest files of `dir` (names and bytes), or `None` when it cannot
/// be listed.
pub fn directory_fingerprint(dir: &Path) -> Option<String> {
    let mut files = crate::desired::catalog::manifest_files(dir).ok()?;
    files.sort();
    let mut hash = Sha256::new();
    for file in files {
        hash.update(file.to_string_lossy().as_bytes());
        hash.update([0]);
        // Read as the catalog reads, so a FIFO put here cannot block the watcher.
        match read_text(&file, MAX_MANIFEST_BYTES) {
            Ok(text) => hash.update(text.as_bytes()),
            Err(e) => hash.update(e.to_string().as_bytes()),
        }
        hash.update([0]);
    }
    Some(crate::support::hex::encode(&hash.finalize()))
}

pub(crate) fn certificate_names(config: &StandaloneConfig, bound: SocketAddr) -> Vec<String> {
    let mut names = config.server_names.clone();
    names.push("localhost".into());
    names.push("127.0.0.1".into());
    if !bound.ip().is_unspecified() {
        names.push(bound.ip().to_string());
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

pub(crate) fn advertised_url(config: &StandaloneConfig, bound: SocketAddr) -> String {
    if let Some(url) = &config.advertise {
        return url.trim_end_matches('/').to_string();
    }
    let host = match config.server_names.first() {
        Some(name) => name.clone(),
        None if bound.ip().is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
        None => bound.ip().to_string(),
    };
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("https://[{v6}]:{}", bound.port()),
        _ => format!("https://{host}:{}", bound.port()),
    }
}

/// Reconciles whenever the manifest directory changes (and every [`RESYNC_EVERY`]
/// anyway), re-evaluates time-dependent state and writes out status, until `stopped`;
/// `fingerprint` is the directory's as of the last reconcile.
pub(crate) async fn watch_manifests<S: Store>(
    controller: Arc<Controller<S>>,
    manifests: PathBuf,
    mut fingerprint: Option<String>,
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    let mut last_full = std::time::Instant::now();
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = ticker.tick() => {}
        }
        let current = directory_fingerprint(&manifests);
        // Besides changes, reconcile now and then anyway: a read that failed earlier
        // (or at start) is retried even when the directory looks unchanged.
        let resync = last_full.elapsed() >= RESYNC_EVERY;
        if current != fingerprint || resync {
            if current != fingerprint {
                info!(manifests = %manifests.display(), "manifest directory changed; reconciling");
            }
            last_full = std::time::Instant::now();
            match controller.reconcile().await {
                Ok(()) => fingerprint = current,
                Err(e) => warn!(error = %e, "reconcile failed; the last good configs stay in force"),
            }
        }
        if let Err(e) = controller.tick().await {
            warn!(error = %e, "cannot persist status");
        }
    }
    if let Err(e) = controller.flush().await {
        warn!(error = %e, "cannot persist status at shutdown");
    }
}

/// A running standalone controller.
#[derive(Debug)]
pub struct Standalone {
    server: Server,
    controller: Arc<Controller<FileStore>>,
    watcher: JoinHandle<()>,
    stop: watch::Sender<bool>,
    ca_fingerprint: String,
    url: String,
}

impl Standalone {
    /// Sets up the state directory (CA, certificates, CLI config), loads the manifests and
    /// starts serving. `authority` answers lease requests (the witness).
    pub async fn start(
        config: StandaloneConfig,
        authority: Option<Box<dyn LeaseAuthority>>,
    ) -> Result<Standalone, StandaloneError> {
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir).map_err(|source| StandaloneError::StateDir { path: dir.clone(), source })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| StandaloneError::StateDir { path: dir.clone(), source })?;

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StandaloneError::Listen { addr: config.listen, source })?;
        let bound = listener.local_addr().map_err(|source| StandaloneError::Listen { addr: config.listen, source })?;

        let ca = Arc::new(Ca::load_or_create(dir)?);
        let server_cert = ca.ensure_server_cert(dir, &certificate_names(&config, bound))?;
        let admin = ca.ensure_admin_cert(dir)?;
        let url = advertised_url(&config, bound);
        let cli = AdminConfig {
            controller: url.clone(),
            controllers: Vec::new(),
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: admin.cert_pem,
            key_pem: admin.key_pem,
        };
        write_json(&dir.join(CLI_CONFIG_FILE), &cli, 0o600)?;

        let fingerprint = directory_fingerprint(&config.manifests);
        let store = FileStore::open(&config.manifests, dir)?;
        let metrics = Arc::new(Metrics::new());
        let controller = Arc::new(Controller::start(store, config.controller.clone(), metrics).await?);

        let authority = match authority {
            Some(mut authority) => {
                // A restarted witness has forgotten the epochs it granted; the agents'
                // reported epochs (persisted in the status) keep new grants above them.
                for group in controller.overview().await.groups {
                    authority.restore_epoch(&group.key, group.status.epoch);
                }
                Some(authority)
            }
            None => None,
        };
        let (tls, auth) = server_config(ca.cert_der(), &server_cert.cert_pem, &server_cert.key_pem)?;
        let mut api = NodeApi::new(controller.clone(), ca.clone(), TokenFile::new(dir), authority, config.api.clone());
        if config.console {
            api = api.with_routes(Console::routes(controller.clone(), &ca));
        }
        let api = Arc::new(api);
        let server = Server::start(listener, tls, auth, api)
            .map_err(|source| StandaloneError::Listen { addr: config.listen, source })?;
        info!(listen = %bound, url = %url, manifests = %config.manifests.display(), ca_fingerprint = %ca.fingerprint(), "standalone controller serving");

        let (stop, stopped) = watch::channel(false);
        let watcher = tokio::spawn(watch_manifests(
            controller.clone(),
            config.manifests.clone(),
            fingerprint,
            config.poll_interval,
            stopped,
        ));
        Ok(Standalone { server, controller, watcher, stop, ca_fingerprint: ca.fingerprint(), url })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The URL written into the CLI config.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_fingerprint
    }

    pub fn controller(&self) -> &Arc<Controller<FileStore>> {
        &self.controller
    }

    /// Stops serving and watching, and writes out buffered status.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.watcher.await;
        self.server.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_follows_content_not_timestamps() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let empty = directory_fingerprint(dir.path());
        std::fs::write(dir.path().join("a.yaml"), "x: 1")?;
        let one = directory_fingerprint(dir.path());
        assert_ne!(one, empty);
        // An editor's save: new file renamed over the old, same content.
        std::fs::write(dir.path().join(".a.yaml.swp"), "x: 1")?;
        std::fs::rename(dir.path().join(".a.yaml.swp"), dir.path().join("a.yaml"))?;
        assert_eq!(directory_fingerprint(dir.path()), one);
        std::fs::write(dir.path().join("notes.txt"), "ignored")?;
        assert_eq!(directory_fingerprint(dir.path()), one);
        std::fs::write(dir.path().join("a.yaml"), "x: 2")?;
        assert_ne!(directory_fingerprint(dir.path()), one);
        assert_eq!(directory_fingerprint(&dir.path().join("missing")), None);
        Ok(())
    }

    #[test]
    fn names_and_url_cover_the_listen_address() {
        let mut config = StandaloneConfig::new(
            Path::new("m"),
            Path::new("s"),
            "0.0.0.0:0".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        let bound: SocketAddr = "0.0.0.0:7443".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(certificate_names(&config, bound), ["localhost", "127.0.0.1"]);
        assert_eq!(advertised_url(&config, bound), "https://127.0.0.1:7443");
        config.server_names = vec!["ctl.example".into(), "localhost".into()];
        let bound: SocketAddr = "198.18.0.1:7443".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(certificate_names(&config, bound), ["ctl.example", "localhost", "127.0.0.1", "198.18.0.1"]);
        assert_eq!(advertised_url(&config, bound), "https://ctl.example:7443");
    }
}
