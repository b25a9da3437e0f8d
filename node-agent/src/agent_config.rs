//! The agent's own configuration file, `/etc/hapair/agent.yaml` (`kind: AgentConfig`).
//!
//! It says who this node is and where its desired config comes from: the controllers
//! (`controller`, `controllers` + `tls`, written by `hapair-agent enroll`) or a local
//! desired-config bundle file (`bundleFile`). Everything else has working defaults (see
//! `packaging/agent.yaml`). Unknown keys are errors naming the key, so a typo is reported
//! rather than silently ignored. Relative paths are relative to the file's directory.
//!
//! Enrollment edits the file in place ([`write_enrollment`]): it sets `node`, `controller`,
//! `controllers` and the `tls` paths and keeps every other key and the comments, or creates the file
//! when it does not exist.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "hapair.dev/v1alpha1";
pub const KIND: &str = "AgentConfig";
/// Where the packaged unit and the DaemonSet look for the file.
pub const DEFAULT_PATH: &str = "/etc/hapair/agent.yaml";

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {field}: {message}")]
    Invalid { path: PathBuf, field: String, message: String },
}

/// `/etc/hapair/agent.yaml`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    /// This server's name in the HaGroups' `spec.nodes`; empty until enrolled.
    #[serde(default)]
    pub node: String,
    /// Base URL of the controller's node API; empty until enrolled. With `controllers`, the
    /// preferred one: the agent tries it first.
    #[serde(default)]
    pub controller: String,
    /// Every controller's base URL (replicated controllers; `controller` may be among them).
    /// Empty: `controller` is the only one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    #[serde(default)]
    pub tls: TlsFiles,
    /// A desired-config bundle file to run instead of a controller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_file: Option<PathBuf>,
    #[serde(default = "state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "runtime_dir")]
    pub runtime_dir: PathBuf,
    #[serde(default)]
    pub endpoints: Endpoints,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default, skip_serializing_if = "WatchdogSettings::is_default")]
    pub watchdog: WatchdogSettings,
}

/// The node's enrollment: the controller's CA and the node's client certificate and key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    #[serde(default = "ca_file")]
    pub ca_file: PathBuf,
    #[serde(default = "cert_file")]
    pub cert_file: PathBuf,
    #[serde(default = "key_file")]
    pub key_file: PathBuf,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoints {
    /// Address of `/healthz`, `/metrics` and `/v1/status`.
    #[serde(default = "listen")]
    pub listen: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogSettings {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter in `RUST_LOG` syntax.
    #[serde(default = "log_level")]
    pub level: String,
}

/// The hardware watchdog that resets the machine when a serving agent stalls.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WatchdogSettings {
    /// e.g. `/dev/watchdog`; without one, a stalled primary is not reset (reported as a
    /// risk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
}

impl WatchdogSettings {
    fn is_default(&self) -> bool {
        self.device.is_none()
    }
}

fn api_version() -> String {
    API_VERSION.into()
}
fn kind() -> String {
    KIND.into()
}
fn state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hapair")
}
fn runtime_dir() -> PathBuf {
    PathBuf::from("/run/hapair")
}
fn ca_file() -> PathBuf {
    PathBuf::from("/etc/hapair/ca.crt")
}
fn cert_file() -> PathBuf {
    PathBuf::from("/etc/hapair/node.crt")
}
fn key_file() -> PathBuf {
    PathBuf::from("/etc/hapair/node.key")
}
/// Loopback: the endpoints are unauthenticated, and a node's status (groups, roles, links)
/// should not be readable from the network unless the operator of the server chooses so
/// (`endpoints.listen: 0.0.0.0:9464` behind a firewall, for Prometheus).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

fn listen() -> String {
    DEFAULT_LISTEN.into()
}
fn log_level() -> String {
    "info".into()
}

impl Default for TlsFiles {
    fn default() -> Self {
        TlsFiles { ca_file: ca_file(), cert_file: cert_file(), key_file: key_file() }
    }
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints { listen: listen() }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { format: LogFormat::Text, level: log_level() }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            api_version: api_version(),
            kind: kind(),
            node: String::new(),
            controller: String::new(),
            controllers: Vec::new(),
            tls: TlsFiles::default(),
            bundle_file: None,
            state_dir: state_dir(),
            runtime_dir: runtime_dir(),
            endpoints: Endpoints::default(),
            log: LogSettings::default(),
            watchdog: WatchdogSettings::default(),
        }
    }
}

/// Where the desired config comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The controllers' node API: `url` is tried first, `controllers` is every endpoint
    /// (`url` first).
    Controller { url: String, node: String, controllers: Vec<String> },
    /// A local bundle file; `node` may be empty (then the bundle's own node is used).
    BundleFile { path: PathBuf, node: String },
    /// Neither: waiting for `hapair-agent enroll`.
    NotEnrolled,
}

impl AgentConfig {
    /// Parses `text` (the content of `path`), checks every field, and resolves relative
    /// paths against `path`'s directory.
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, AgentConfigError> {
        let invalid = |field: &str, message: String| AgentConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| invalid("(document)", e.to_string()))?;
        let value = if value.is_null() { serde_yaml::Value::Mapping(Default::default()) } else { value };
        let mut config: AgentConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            invalid(if field == "." { "(document)" } else { &field }, e.into_inner().to_string())
        })?;
        if config.api_version != API_VERSION {
            return Err(invalid("apiVersion", format!("{:?} is not {API_VERSION:?}", config.api_version)));
        }
        if config.kind != KIND {
            return Err(invalid("kind", format!("{:?} is not {KIND:?}", config.kind)));
        }
        if !config.node.is_empty() && !hapair_crds::validation::is_valid_name(&config.node) {
            return Err(invalid(
                "node",
                format!("{:?} is not a valid node name (lowercase letters, digits and '-', at most 63)", config.node),
            ));
        }
        if !config.controller.is_empty() && !config.controller.starts_with("https://") {
            return Err(invalid("controller", format!("{:?} must be an https:// URL", config.controller)));
        }
        for (i, url) in config.controllers.iter().enumerate() {
            let field = format!("controllers[{i}]");
            if !url.starts_with("https://") {
                return Err(invalid(&field, format!("{url:?} must be an https:// URL")));
            }
            if config.controllers[..i].iter().any(|u| base_url(u) == base_url(url)) {
                return Err(invalid(&field, format!("{url:?} is listed twice")));
            }
        }
        config.listen_addr().map_err(|message| invalid("endpoints.listen", message))?;
        tracing_subscriber::EnvFilter::try_new(&config.log.level)
            .map_err(|e| invalid("log.level", format!("{:?}: {e}", config.log.level)))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut config.tls.ca_file,
            &mut config.tls.cert_file,
            &mut config.tls.key_file,
            &mut config.state_dir,
            &mut config.runtime_dir,
        ] {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        for file in [config.bundle_file.as_mut(), config.watchdog.device.as_mut()].into_iter().flatten() {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }

    /// Reads `path`; a missing file reads as the defaults (not enrolled), so an agent
    /// started before enrollment waits for it.
    pub fn load(path: &Path) -> Result<(AgentConfig, bool), AgentConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((AgentConfig::parse(&text, path)?, true)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((AgentConfig::default(), false)),
            Err(source) => Err(AgentConfigError::Io { path: path.to_path_buf(), source }),
        }
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.endpoints.listen.parse().map_err(|_| format!("{:?} is not an address:port", self.endpoints.listen))
    }

    /// Every controller endpoint, without trailing '/': `controller` first, then the
    /// `controllers` it is not (the first of those when `controller` is empty).
    pub fn controller_urls(&self) -> Vec<String> {
        merge_urls(std::iter::once(self.controller.as_str()).chain(self.controllers.iter().map(String::as_str)))
    }

    /// Where the desired config comes from: a bundle file wins over the controller.
    pub fn source(&self) -> Source {
        if let Some(path) = &self.bundle_file {
            return Source::BundleFile { path: path.clone(), node: self.node.clone() };
        }
        let controllers = self.controller_urls();
        match controllers.first() {
            Some(url) if !self.node.is_empty() => {
                Source::Controller { url: url.clone(), node: self.node.clone(), controllers: controllers.clone() }
            }
            _ => Source::NotEnrolled,
        }
    }
}

/// A controller URL as compared and used: without trailing '/'.
pub fn base_url(url: &str) -> &str {
    url.trim().trim_end_matches('/')
}

/// `urls` as base URLs, in order, each once, empty ones left out.
pub fn merge_urls<'a>(urls: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for url in urls.into_iter().map(base_url) {
        if !url.is_empty() && !out.iter().any(|u| u == url) {
            out.push(url.to_string());
        }
    }
    out
}

/// What enrollment writes into `agent.yaml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrollment {
    pub node: String,
    pub controller: String,
    /// Every controller, `controller` included. Written as `controllers:` only when there is
    /// more than one; otherwise the key is removed, since `controller` says it all.
    pub controllers: Vec<String>,
    pub tls: TlsFiles,
}

impl Enrollment {
    /// The `controllers:` list to write: empty when `controller` is the only one.
    fn controllers_key(&self) -> Vec<String> {
        let all =
            merge_urls(std::iter::once(self.controller.as_str()).chain(self.controllers.iter().map(String::as_str)));
        if all.len() > 1 { all } else { Vec::new() }
    }
}

/// Sets `node`, `controller`, `controllers` and the `tls` paths in the configuration file at `path`,
/// keeping every other key (and, where the layout allows, the comments); creates the file
/// (mode 0640) when it does not exist. A file that does not parse is left alone.
pub fn write_enrollment(path: &Path, enrollment: &Enrollment) -> Result<(), AgentConfigError> {
    let io = |source| AgentConfigError::Io { path: path.to_path_buf(), source };
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(io(source)),
    };
    let text = match existing {
        None => fresh_file(enrollment),
        Some(text) => {
            let before = AgentConfig::parse(&text, path)?;
            let mut wanted = before.clone();
            wanted.node.clone_from(&enrollment.node);
            wanted.controller.clone_from(&enrollment.controller);
            wanted.controllers = enrollment.controllers_key();
            wanted.tls = enrollment.tls.clone();
            let edited = edit_in_place(&text, enrollment);
            match AgentConfig::parse(&edited, path) {
                Ok(after) if after == wanted => edited,
                // A layout the line editor does not handle (flow style, anchors): rewrite
                // the keys through a YAML tree; other keys survive, comments do not.
                _ => rewrite(&text, enrollment, path)?,
            }
        }
    };
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o640);
    let tmp = path.with_extension(format!("yaml.tmp.{}", std::process::id()));
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

fn yaml_scalar(value: &str) -> String {
    // serde_yaml quotes whatever needs quoting; a plain string stays plain.
    serde_yaml::to_string(value).map(|s| s.trim_end().to_string()).unwrap_or_else(|_| format!("{value:?}"))
}

fn yaml_path(path: &Path) -> String {
    yaml_scalar(&path.display().to_string())
}

/// The `controllers:` block (key and items), or nothing.
fn controllers_lines(e: &Enrollment) -> Vec<String> {
    let list = e.controllers_key();
    if list.is_empty() {
        return Vec::new();
    }
    std::iter::once("controllers:".to_string()).chain(list.iter().map(|u| format!("  - {}", yaml_scalar(u)))).collect()
}

fn fresh_file(e: &Enrollment) -> String {
    let controllers: String = controllers_lines(e).iter().map(|l| format!("{l}\n")).collect();
    format!(
        "# hapair-agent configuration, written by `hapair-agent enroll` (see packaging/agent.yaml\n\
         # for every key). Unknown keys are errors.\n\
         apiVersion: {API_VERSION}\nkind: {KIND}\nnode: {}\ncontroller: {}\n{controllers}tls:\n  caFile: {}\n  certFile: {}\n  keyFile: {}\n",
        yaml_scalar(&e.node),
        yaml_scalar(&e.controller),
        yaml_path(&e.tls.ca_file),
        yaml_path(&e.tls.cert_file),
        yaml_path(&e.tls.key_file),
    )
}

/// Replaces the top-level `node:`/`controller:` lines, the `controllers:` list and the
/// `tls:` block's keys, adding whatever is missing; comments and every other line stay as
/// they are.
fn edit_in_place(text: &str, e: &Enrollment) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let top = |line: &str, key: &str| line.strip_prefix(key).is_some_and(|rest| rest.starts_with(':'));
    for (key, value) in [("node", yaml_scalar(&e.node)), ("controller", yaml_scalar(&e.controller))] {
        match lines.iter().position(|l| top(l, key)) {
            Some(i) => lines[i] = format!("{key}: {value}"),
            None => lines.push(format!("{key}: {value}")),
        }
    }
    // The old list goes (its items, not the comments among them); the new one takes its
    // place, or follows `controller:` when there was none.
    let at = match lines.iter().position(|l| top(l, "controllers")) {
        Some(start) => {
            let end = lines[start + 1..]
                .iter()
                .position(|l| !l.trim().is_empty() && !l.starts_with([' ', '-']) && !l.trim_start().starts_with('#'))
                .map_or(lines.len(), |n| start + 1 + n);
            let mut i = 0;
            lines.retain(|l| {
                let keep = !(start..end).contains(&i)
                    || (i > start && (l.trim().is_empty() || l.trim_start().starts_with('#')));
                i += 1;
                keep
            });
            start
        }
        None => lines.iter().position(|l| top(l, "controller")).map_or(lines.len(), |i| i + 1),
    };
    for (n, line) in controllers_lines(e).into_iter().enumerate() {
        lines.insert(at + n, line);
    }
    let tls = [
        ("caFile", yaml_path(&e.tls.ca_file)),
        ("certFile", yaml_path(&e.tls.cert_file)),
        ("keyFile", yaml_path(&e.tls.key_file)),
    ];
    match lines.iter().position(|l| top(l, "tls") && l["tls:".len()..].trim_start().split('#').next() == Some("")) {
        Some(start) => {
            let end = lines[start + 1..]
                .iter()
                .position(|l| !l.trim().is_empty() && !l.starts_with(' ') && !l.trim_start().starts_with('#'))
                .map_or(lines.len(), |n| start + 1 + n);
            let mut missing = Vec::new();
            for (key, value) in tls {
                let found = (start + 1..end)
                    .find(|i| lines[*i].trim_start().strip_prefix(key).is_some_and(|r| r.starts_with(':')));
                match found {
                    Some(i) => {
                        let indent = lines[i].len() - lines[i].trim_start().len();
                        lines[i] = format!("{}{key}: {value}", " ".repeat(indent));
                    }
                    None => missing.push(format!("  {key}: {value}")),
                }
            }
            for (n, line) in missing.into_iter().enumerate() {
                lines.insert(start + 1 + n, line);
            }
        }
        None => {
            lines.push("tls:".into());
            for (key, value) in tls {
                lines.push(format!("  {key}: {value}"));
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn rewrite(text: &str, e: &Enrollment, path: &Path) -> Result<String, AgentConfigError> {
    let invalid =
        |message: String| AgentConfigError::Invalid { path: path.to_path_buf(), field: "(document)".into(), message };
    let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|err| invalid(err.to_string()))?;
    if value.is_null() {
        value = serde_yaml::Value::Mapping(Default::default());
    }
    let map = value.as_mapping_mut().ok_or_else(|| invalid("the document is not a mapping".into()))?;
    map.insert("node".into(), e.node.clone().into());
    map.insert("controller".into(), e.controller.clone().into());
    match e.controllers_key() {
        list if list.is_empty() => map.remove("controllers"),
        list => map.insert("controllers".into(), list.into()),
    };
    let tls = serde_yaml::to_value(&e.tls).map_err(|err| invalid(err.to_string()))?;
    map.insert("tls".into(), tls);
    serde_yaml::to_string(&value).map_err(|err| invalid(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGED: &str = include_str!("../../packaging/agent.yaml");

    fn path() -> PathBuf {
        PathBuf::from("/etc/hapair/agent.yaml")
    }

    fn enrollment() -> Enrollment {
        Enrollment {
            node: "db1".into(),
            controller: "https://ctl.example:7443".into(),
            controllers: vec!["https://ctl.example:7443".into()],
            tls: TlsFiles {
                ca_file: "/etc/hapair/ca.crt".into(),
                cert_file: "/etc/hapair/node.crt".into(),
                key_file: "/etc/hapair/node.key".into(),
            },
        }
    }

    #[test]
    fn the_packaged_file_is_the_defaults_and_not_enrolled() {
        let config = AgentConfig::parse(PACKAGED, &path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config, AgentConfig::default());
        assert_eq!(config.source(), Source::NotEnrolled);
        // Loopback only unless configured otherwise: the endpoints are unauthenticated.
        assert_eq!(config.listen_addr().ok(), "127.0.0.1:9464".parse().ok());
        assert!(config.listen_addr().is_ok_and(|a| a.ip().is_loopback()));
        assert_eq!(AgentConfig::parse("{}", &path()).map(|c| c.endpoints.listen).ok().as_deref(), Some(DEFAULT_LISTEN));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let cases = [
            ("nodes: a\n", "nodes"),
            ("tls:\n  cafile: x\n", "tls.cafile"),
            ("endpoints:\n  listen: nowhere\n", "endpoints.listen"),
            ("kind: HaGroup\n", "kind"),
            ("controller: http://ctl\n", "controller"),
            ("controllers: [https://a, http://b]\n", "controllers[1]"),
            ("controllers: [https://a, https://b, https://a/]\n", "controllers[2]"),
            ("controllers: https://a\n", "controllers"),
            ("node: DB_1\n", "node"),
            ("log:\n  format: xml\n", "log.format"),
            ("watchdog:\n  dev: /dev/watchdog\n", "watchdog.dev"),
        ];
        for (text, field) in cases {
            let err = AgentConfig::parse(text, &path()).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.starts_with(&format!("/etc/hapair/agent.yaml: {field}: ")), "{text:?}: {err}");
        }
        let err = AgentConfig::parse("tls:\n  cafile: x\n", &path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("cafile"), "{err}");
    }

    #[test]
    fn sources_and_relative_paths() {
        let text = "node: a\ncontroller: https://ctl:7443/\nbundleFile: bundle.yaml\nstateDir: state\nwatchdog:\n  device: /dev/watchdog\n";
        let config = AgentConfig::parse(text, Path::new("/srv/agent/agent.yaml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.source(), Source::BundleFile { path: "/srv/agent/bundle.yaml".into(), node: "a".into() });
        assert_eq!(config.state_dir, PathBuf::from("/srv/agent/state"));
        assert_eq!(config.watchdog.device, Some(PathBuf::from("/dev/watchdog")));
        let config = AgentConfig { bundle_file: None, ..config };
        assert_eq!(
            config.source(),
            Source::Controller {
                url: "https://ctl:7443".into(),
                node: "a".into(),
                controllers: vec!["https://ctl:7443".into()]
            }
        );
    }

    #[test]
    fn enrollment_edits_the_file_keeping_comments_and_other_keys() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("agent.yaml");
        let custom =
            PACKAGED.replace("level: info", "level: debug").replace("listen: 127.0.0.1:9464", "listen: 0.0.0.0:9999");
        std::fs::write(&file, &custom)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640))?;
        write_enrollment(&file, &enrollment())?;
        let text = std::fs::read_to_string(&file)?;
        assert!(text.contains("# This server's name, exactly as in the HaGroup's spec.nodes[].name."), "{text}");
        let config = AgentConfig::parse(&text, &file)?;
        assert_eq!((config.node.as_str(), config.controller.as_str()), ("db1", "https://ctl.example:7443"));
        assert_eq!((config.log.level.as_str(), config.endpoints.listen.as_str()), ("debug", "0.0.0.0:9999"));
        assert_eq!(std::fs::metadata(&file)?.permissions().mode() & 0o777, 0o640);
        // Enrolling again (--force) replaces the values, still in place.
        let mut again = enrollment();
        again.node = "db2".into();
        write_enrollment(&file, &again)?;
        let text2 = std::fs::read_to_string(&file)?;
        assert_eq!(AgentConfig::parse(&text2, &file)?.node, "db2");
        assert_eq!(text2.lines().count(), text.lines().count(), "{text2}");
        Ok(())
    }

    #[test]
    fn enrollment_creates_a_missing_file_and_handles_flow_style() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("agent.yaml");
        write_enrollment(&file, &enrollment())?;
        let config = AgentConfig::parse(&std::fs::read_to_string(&file)?, &file)?;
        let url = "https://ctl.example:7443".to_string();
        assert_eq!(
            config.source(),
            Source::Controller { url: url.clone(), node: "db1".into(), controllers: vec![url] }
        );
        assert!(!std::fs::read_to_string(&file)?.contains("controllers"), "one controller needs no list");
        assert_eq!(config.tls, enrollment().tls);
        assert_eq!(std::fs::metadata(&file)?.permissions().mode() & 0o777, 0o640);

        std::fs::write(&file, "{apiVersion: hapair.dev/v1alpha1, tls: {caFile: /x}, stateDir: /srv/state}\n")?;
        write_enrollment(&file, &enrollment())?;
        let config = AgentConfig::parse(&std::fs::read_to_string(&file)?, &file)?;
        assert_eq!((config.node.as_str(), config.state_dir.as_path()), ("db1", Path::new("/srv/state")));
        assert_eq!(config.tls, enrollment().tls);

        // A broken file is reported, not overwritten.
        std::fs::write(&file, "nodes: [\n")?;
        assert!(write_enrollment(&file, &enrollment()).is_err());
        assert_eq!(std::fs::read_to_string(&file)?, "nodes: [\n");
        Ok(())
    }

    #[test]
    fn controllers_list_every_endpoint_with_controller_first() {
        let text = "node: a\ncontroller: https://c2:7443/\ncontrollers:\n  - https://c1:7443\n  - https://c2:7443\n  - https://c3:7443/\n";
        let config = AgentConfig::parse(text, &path()).unwrap_or_else(|e| panic!("{e}"));
        let all: Vec<String> = ["https://c2:7443", "https://c1:7443", "https://c3:7443"].map(String::from).into();
        assert_eq!(config.controller_urls(), all);
        assert_eq!(
            config.source(),
            Source::Controller { url: all[0].clone(), node: "a".into(), controllers: all.clone() }
        );
        // Without `controller`, the list's first is the preferred one.
        let config = AgentConfig::parse("node: a\ncontrollers: [https://c1, https://c2]\n", &path())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(config.source(), Source::Controller { url, .. } if url == "https://c1"));
        // Messages say what is wrong with which entry.
        let err = AgentConfig::parse("controllers: [https://a, http://b]\n", &path()).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("/etc/hapair/agent.yaml: controllers[1]: \"http://b\" must be an https:// URL")
        );
        let err = AgentConfig::parse("controllers: [https://a, https://a/]\n", &path()).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("/etc/hapair/agent.yaml: controllers[1]: \"https://a/\" is listed twice"));
    }

    #[test]
    fn enrollment_writes_the_controllers_list_in_place() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("agent.yaml");
        std::fs::write(&file, PACKAGED)?;
        let mut three = enrollment();
        three.controllers = ["https://ctl.example:7443", "https://ctl2.example:7443", "https://ctl3.example:7443"]
            .map(String::from)
            .into();
        write_enrollment(&file, &three)?;
        let text = std::fs::read_to_string(&file)?;
        let config = AgentConfig::parse(&text, &file)?;
        assert_eq!(config.controllers, three.controllers);
        assert_eq!(config.controller, "https://ctl.example:7443");
        assert!(
            text.contains("controller: https://ctl.example:7443\ncontrollers:\n  - https://ctl.example:7443\n"),
            "{text}"
        );
        assert!(text.contains("# This server's name"), "{text}");

        // Enrolling again replaces the list (a comment among its items stays), other keys stay.
        let edited =
            text.replace("  - https://ctl2.example:7443\n", "  # the second site\n  - https://ctl2.example:7443\n");
        std::fs::write(&file, edited.replace("level: info", "level: debug"))?;
        let mut two = enrollment();
        two.controllers = vec!["https://ctl.example:7443".into(), "https://ctl4.example:7443".into()];
        write_enrollment(&file, &two)?;
        let text = std::fs::read_to_string(&file)?;
        let config = AgentConfig::parse(&text, &file)?;
        assert_eq!((config.controllers, config.log.level.as_str()), (two.controllers.clone(), "debug"));
        assert!(text.contains("# the second site") && !text.contains("ctl2"), "{text}");

        // Down to one controller: the list goes, `controller` says it all.
        write_enrollment(&file, &enrollment())?;
        let text = std::fs::read_to_string(&file)?;
        assert!(!text.contains("controllers") && !text.contains("ctl4"), "{text}");
        assert_eq!(AgentConfig::parse(&text, &file)?.controller_urls(), vec!["https://ctl.example:7443".to_string()]);

        // A flow-style list, and a file the line editor cannot handle, are rewritten too.
        std::fs::write(&file, "controllers: [https://old1, https://old2]\nstateDir: /srv/state\n")?;
        write_enrollment(&file, &two)?;
        let config = AgentConfig::parse(&std::fs::read_to_string(&file)?, &file)?;
        assert_eq!((config.controllers, config.state_dir), (two.controllers.clone(), PathBuf::from("/srv/state")));
        std::fs::write(&file, "{controllers: [https://old1], stateDir: /srv/state}\n")?;
        write_enrollment(&file, &two)?;
        let config = AgentConfig::parse(&std::fs::read_to_string(&file)?, &file)?;
        assert_eq!((config.controllers, config.state_dir), (two.controllers.clone(), PathBuf::from("/srv/state")));

        // A fresh file gets the list as well.
        std::fs::remove_file(&file)?;
        write_enrollment(&file, &two)?;
        assert_eq!(AgentConfig::parse(&std::fs::read_to_string(&file)?, &file)?.controllers, two.controllers);
        Ok(())
    }
}
