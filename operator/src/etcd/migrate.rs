//! `hapair-operator migrate --to-etcd`: moves a single standalone controller's state
//! directory into etcd, so a set of controllers can take over from it.
//!
//! The pairs keep serving throughout: agents need a controller only for config changes,
//! reports and witness calls, and the CA moves with the state, so the certificates the
//! agents hold stay valid with every controller of the set. The order is: stop the single
//! controller (so its state stops changing), migrate, start the controllers with `--etcd`.
//!
//! Nothing is half-applied on purpose: the data goes in first, guarded by "no leader and
//! no CA yet", and the CA last, under the same guard, so a set of controllers started too
//! early (which would have made its own CA) makes the migration fail instead of mixing
//! two CAs. A failed migration can be run again.

use std::path::Path;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use super::shared::CaRecord;
use super::store::{Contents, contents_ops, state_ops};
use super::{EtcdError, Keys, encode};
use crate::desired::state::ControllerState;
use crate::pki::tokens::{TOKENS_FILE, TokenBook};
use crate::pki::{CA_CERT_FILE, CA_KEY_FILE, Ca};
use crate::standalone::file_store::{EVENTS_FILE, GENERATIONS_FILE, STATE_FILE, STATUS_FILE};
use crate::support::atomic_file::{FileError, read_json};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {message}")]
    StateDir { path: String, message: String },
    #[error(
        "etcd already holds hapair state under {prefix} ({what}); refusing to overwrite it. Migrate into an \
         empty prefix (--etcd-prefix), or remove it with `etcdctl del --prefix {prefix}` if it is a leftover"
    )]
    NotEmpty { prefix: String, what: String },
}

/// What was moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub groups: usize,
    pub volumes: usize,
    pub event_lists: usize,
    pub ca_fingerprint: String,
}

fn read_text(path: &Path) -> Result<String, MigrateError> {
    std::fs::read_to_string(path)
        .map_err(|e| MigrateError::StateDir { path: path.display().to_string(), message: e.to_string() })
}

/// Copies the state directory `dir` into etcd under `keys`.
pub async fn migrate(dir: &Path, client: &Client, keys: &Keys) -> Result<Migrated, MigrateError> {
    let (cert_pem, key_pem) = (read_text(&dir.join(CA_CERT_FILE))?, read_text(&dir.join(CA_KEY_FILE))?);
    let ca = Ca::from_pems(&cert_pem, &key_pem).map_err(|e| MigrateError::StateDir {
        path: dir.join(CA_CERT_FILE).display().to_string(),
        message: e.to_string(),
    })?;
    let state: ControllerState = read_json(&dir.join(STATE_FILE))?.unwrap_or_default();
    let contents = Contents {
        statuses: read_json(&dir.join(STATUS_FILE))?.unwrap_or_default(),
        events: read_json(&dir.join(EVENTS_FILE))?.unwrap_or_default(),
        generations: read_json(&dir.join(GENERATIONS_FILE))?.unwrap_or_default(),
    };
    let tokens: TokenBook = read_json(&dir.join(TOKENS_FILE))?.unwrap_or_default();

    let existing = client
        .clone()
        .get(keys.prefix(), Some(etcd_client::GetOptions::new().with_prefix().with_limit(1).with_keys_only()))
        .await
        .map_err(EtcdError::request(format!("looking under {}", keys.prefix())))?;
    if let Some(kv) = existing.kvs().first() {
        return Err(MigrateError::NotEmpty {
            prefix: keys.prefix().to_string(),
            what: String::from_utf8_lossy(kv.key()).into_owned(),
        });
    }

    let mut ops = state_ops(keys, &state, &[]).0;
    ops.extend(contents_ops(keys, &contents));
    ops.push(TxnOp::put(keys.tokens(), encode(&tokens), None));
    let vacant = || {
        [
            Compare::create_revision(keys.leader(), CompareOp::Equal, 0),
            Compare::create_revision(keys.ca(), CompareOp::Equal, 0),
        ]
    };
    let mut rest = ops;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(100));
        let batch = std::mem::replace(&mut rest, tail);
        let done = client
            .clone()
            .txn(Txn::new().when(vacant()).and_then(batch))
            .await
            .map_err(EtcdError::request("writing the migrated state"))?;
        if !done.succeeded() {
            return Err(started_meanwhile(keys));
        }
    }
    let record = CaRecord { cert_pem, key_pem };
    let done = client
        .clone()
        .txn(Txn::new().when(vacant()).and_then([TxnOp::put(keys.ca(), encode(&record), None)]))
        .await
        .map_err(EtcdError::request("writing the CA"))?;
    if !done.succeeded() {
        return Err(started_meanwhile(keys));
    }
    Ok(Migrated {
        groups: contents.statuses.groups.len(),
        volumes: contents.statuses.volumes.len(),
        event_lists: contents.events.groups().count(),
        ca_fingerprint: ca.fingerprint(),
    })
}

fn started_meanwhile(keys: &Keys) -> MigrateError {
    MigrateError::NotEmpty {
        prefix: keys.prefix().to_string(),
        what: "a controller started on etcd during the migration and made its own CA or leads".into(),
    }
}
