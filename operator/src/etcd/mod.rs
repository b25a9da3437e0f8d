//! `hapair-operator standalone --etcd`: several standalone controllers share one etcd
//! cluster, so no single controller machine is a point of failure for failovers.
//!
//! Consensus is etcd's, never ours. Each controller campaigns for one leader key attached
//! to an etcd lease ([`election`]); the leader runs the reconcile core, the node API and
//! the witness, the others answer the node API with 503 and the leader's address. Every
//! write the leader makes is an etcd transaction guarded by the leader key's create
//! revision (its [`Fence`]), so a deposed leader's writes are refused by revision even if
//! it has not yet noticed that it lost.
//!
//! What lives in etcd, under a prefix (`/hapair/` by default), is listed by [`Keys`]: the
//! controller state, statuses, events, generations, the CA, the enrollment tokens and the
//! witness's [`LeaseRecord`](crate::witness::LeaseRecord)s. The manifests stay a directory
//! on each controller, kept identical by the operator of the cluster (Git, config
//! management): only the leader reads its copy.
//!
//! - [`election`]: campaigning, keep-alives, and the leadership deadline;
//! - [`store`]: the [`Store`](crate::controller::store::Store) kept in etcd;
//! - [`shared`]: the CA and the token book every controller uses;
//! - [`journal`]: the witness's durable records, written before each answer;
//! - [`run`]: one controller of the set, switching between leading and standing by;
//! - [`migrate`]: `hapair-operator migrate --to-etcd`, from a state directory.

pub mod election;
pub mod journal;
pub mod migrate;
pub mod run;
pub mod shared;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use hapair_crds::nodeapi::GroupKey;

/// How to reach etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, `http://` or `https://`.
    pub endpoints: Vec<String>,
    /// Every key hapair writes starts with this; ends with `/`.
    pub prefix: String,
    /// TLS to etcd; required for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// How long one etcd request may take before it counts as failed.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig { endpoints, prefix: DEFAULT_PREFIX.to_string(), tls: None, request_timeout: Duration::from_secs(2) }
    }
}

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/hapair/";

/// TLS to etcd: the CA that signed the members' certificates, and the client certificate
/// when the members require one (`--client-cert-auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{0}")]
    Config(String),
    #[error("etcd {endpoints}: {message}")]
    Connect { endpoints: String, message: String },
    #[error("etcd: {what}: {message}")]
    Request { what: String, message: String },
    /// The write was refused because another controller leads now.
    #[error("etcd: {what}: refused, this controller no longer leads (the leader key changed)")]
    Fenced { what: String },
    #[error("etcd key {key}: {message}")]
    Decode { key: String, message: String },
}

impl EtcdError {
    pub(crate) fn request(what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> EtcdError {
        let what = what.into();
        move |e| EtcdError::Request { what, message: e.to_string() }
    }
}

/// Checks a configuration before anything connects, naming the bad flag and entry.
pub fn validate(config: &EtcdConfig) -> Result<(), EtcdError> {
    if config.endpoints.is_empty() {
        return Err(EtcdError::Config("--etcd: name at least one etcd endpoint".into()));
    }
    for (i, endpoint) in config.endpoints.iter().enumerate() {
        let secure = endpoint.starts_with("https://");
        if !secure && !endpoint.starts_with("http://") {
            return Err(EtcdError::Config(format!("--etcd[{i}] {endpoint:?}: must be an http:// or https:// URL")));
        }
        if secure && config.tls.is_none() {
            return Err(EtcdError::Config(format!(
                "--etcd[{i}] {endpoint:?}: an https:// endpoint needs --etcd-ca (the CA of the etcd members)"
            )));
        }
    }
    if !config.prefix.starts_with('/') || !config.prefix.ends_with('/') || config.prefix.len() < 2 {
        return Err(EtcdError::Config(format!(
            "--etcd-prefix {:?}: must start and end with '/' and name something, e.g. /hapair/",
            config.prefix
        )));
    }
    if let Some(tls) = &config.tls
        && tls.cert.is_some() != tls.key.is_some()
    {
        return Err(EtcdError::Config("--etcd-cert and --etcd-key: give both or neither".into()));
    }
    Ok(())
}

fn read_pem(path: &PathBuf, flag: &str) -> Result<String, EtcdError> {
    std::fs::read_to_string(path).map_err(|e| EtcdError::Config(format!("{flag} {}: {e}", path.display())))
}

/// Connects to the etcd cluster (the client balances over the endpoints and fails over
/// between them by itself).
pub async fn connect(config: &EtcdConfig) -> Result<Client, EtcdError> {
    validate(config)?;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.request_timeout)
        .with_timeout(config.request_timeout)
        // etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time) by closing
        // the connection, which would break every watch.
        .with_keep_alive(Duration::from_secs(10), config.request_timeout);
    if let Some(tls) = &config.tls {
        let mut tls_options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read_pem(&tls.ca, "--etcd-ca")?));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            tls_options = tls_options.identity(etcd_client::Identity::from_pem(
                read_pem(cert, "--etcd-cert")?,
                read_pem(key, "--etcd-key")?,
            ));
        }
        options = options.with_tls(tls_options);
    }
    Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| EtcdError::Connect { endpoints: config.endpoints.join(","), message: e.to_string() })
}

/// Where each thing lives in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// Shards of the controller state (one transaction writes them all).
pub const STATE_SHARDS: usize = 16;

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The leader key: who leads, attached to the leader's etcd lease.
    pub fn leader(&self) -> String {
        self.key("leader")
    }

    pub fn state_shard(&self, shard: usize) -> String {
        self.key(&format!("state/{shard}"))
    }

    pub fn state_prefix(&self) -> String {
        self.key("state/")
    }

    pub fn generations(&self) -> String {
        self.key("generations")
    }

    pub fn group_status(&self, group: &GroupKey) -> String {
        self.key(&format!("status/groups/{group}"))
    }

    pub fn volume_status(&self, volume: &GroupKey) -> String {
        self.key(&format!("status/volumes/{volume}"))
    }

    pub fn group_statuses(&self) -> String {
        self.key("status/groups/")
    }

    pub fn volume_statuses(&self) -> String {
        self.key("status/volumes/")
    }

    pub fn events(&self, group: &GroupKey) -> String {
        self.key(&format!("events/{group}"))
    }

    pub fn all_events(&self) -> String {
        self.key("events/")
    }

    pub fn witness(&self, group: &GroupKey) -> String {
        self.key(&format!("witness/{group}"))
    }

    pub fn all_witness(&self) -> String {
        self.key("witness/")
    }

    pub fn ca(&self) -> String {
        self.key("pki/ca")
    }

    pub fn tokens(&self) -> String {
        self.key("tokens")
    }

    /// The group a key under `prefix` names (`…/namespace/name`).
    pub fn group_of(key: &[u8], prefix: &str) -> Option<GroupKey> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
        let (namespace, name) = rest.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then(|| GroupKey::new(namespace, name))
    }
}

/// Proof of leadership: the create revision of the leader key this controller wrote.
/// Writes guarded by it are refused by etcd once the key is gone or was written anew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    pub revision: i64,
}

/// Most operations in one transaction (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 100;

/// Runs `ops` as transactions guarded by `fence`, at most [`TXN_OPS`] at a time.
pub async fn fenced_write(
    client: &Client,
    keys: &Keys,
    fence: Fence,
    what: &str,
    ops: Vec<TxnOp>,
) -> Result<(), EtcdError> {
    let mut ops = ops;
    while !ops.is_empty() {
        let rest = ops.split_off(ops.len().min(TXN_OPS));
        let batch = std::mem::replace(&mut ops, rest);
        let txn = Txn::new()
            .when([Compare::create_revision(keys.leader(), CompareOp::Equal, fence.revision)])
            .and_then(batch);
        let response = client.clone().txn(txn).await.map_err(EtcdError::request(what))?;
        if !response.succeeded() {
            return Err(EtcdError::Fenced { what: what.to_string() });
        }
    }
    Ok(())
}

/// A JSON value stored at `key`, or `None`.
pub async fn get_json<T: serde::de::DeserializeOwned>(client: &Client, key: &str) -> Result<Option<T>, EtcdError> {
    let response = client.clone().get(key, None).await.map_err(EtcdError::request(format!("reading {key}")))?;
    match response.kvs().first() {
        None => Ok(None),
        Some(kv) => decode(kv).map(Some),
    }
}

/// Decodes one key's JSON value, naming the key when it does not decode.
pub fn decode<T: serde::de::DeserializeOwned>(kv: &etcd_client::KeyValue) -> Result<T, EtcdError> {
    serde_json::from_slice(kv.value())
        .map_err(|e| EtcdError::Decode { key: String::from_utf8_lossy(kv.key()).into_owned(), message: e.to_string() })
}

/// Every key under `prefix` with its value.
pub async fn get_prefix(client: &Client, prefix: &str) -> Result<Vec<etcd_client::KeyValue>, EtcdError> {
    let response = client
        .clone()
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .map_err(EtcdError::request(format!("listing {prefix}")))?;
    Ok(response.kvs().to_vec())
}

/// JSON for a value written to etcd.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own types into JSON cannot fail (string keys, no custom errors).
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_name_the_flag_and_the_entry() {
        let bad = |endpoints: &[&str], f: &dyn Fn(&mut EtcdConfig)| {
            let mut config = EtcdConfig::new(endpoints.iter().map(|e| e.to_string()).collect());
            f(&mut config);
            validate(&config).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert_eq!(bad(&[], &|_| {}), "--etcd: name at least one etcd endpoint");
        assert!(bad(&["http://127.0.0.1:2379", "127.0.0.1:2379"], &|_| {}).starts_with("--etcd[1] \"127.0.0.1:2379\""));
        assert!(bad(&["https://e1:2379"], &|_| {}).contains("needs --etcd-ca"));
        assert!(bad(&["http://e1:2379"], &|c| c.prefix = "hapair".into()).starts_with("--etcd-prefix \"hapair\""));
        let half = |c: &mut EtcdConfig| {
            c.tls = Some(EtcdTls { ca: "ca.pem".into(), cert: Some("c.pem".into()), key: None });
        };
        assert!(bad(&["https://e1:2379"], &half).starts_with("--etcd-cert and --etcd-key"));
        assert_eq!(bad(&["http://e1:2379", "http://e2:2379"], &|_| {}), "");
    }

    #[test]
    fn group_keys_round_trip_through_etcd_keys() {
        let keys = Keys::new("/hapair/");
        let group = GroupKey::new("prod", "db");
        assert_eq!(keys.witness(&group), "/hapair/witness/prod/db");
        assert_eq!(Keys::group_of(keys.witness(&group).as_bytes(), &keys.all_witness()), Some(group));
        assert_eq!(Keys::group_of(b"/hapair/witness/prod", &keys.all_witness()), None);
        assert_eq!(Keys::group_of(b"/hapair/witness/a/b/c", &keys.all_witness()), None);
        assert_eq!(Keys::group_of(b"/other/witness/a/b", &keys.all_witness()), None);
    }
}
