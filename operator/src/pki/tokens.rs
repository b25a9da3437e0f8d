//! One-time enrollment tokens: `hapair-operator token create` issues one for a node, the
//! agent trades it for a client certificate at `POST /v1/enroll`, and it is burned.
//!
//! Only a SHA-256 hash of each token is stored, so the state directory does not hold usable
//! tokens. The book itself is pure; [`TokenFile`] keeps it in `tokens.json` under an
//! exclusive lock, because `token create` runs as a separate process beside the server.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hapair_crds::validation::is_valid_name;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pki::ADMIN_CN;
use crate::support::atomic_file::{FileError, read_json, write_json};
use crate::support::hex;
use crate::support::timestamp::{UnixMillis, age, format_millis};

pub const TOKENS_FILE: &str = "tokens.json";
const LOCK_FILE: &str = "tokens.lock";

/// Prefix that makes a token recognisable in logs and shell history.
pub const TOKEN_PREFIX: &str = "hpe_";

/// Default and longest token lifetimes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Used and expired records are kept this long so a late retry gets a precise answer.
const KEEP_SPENT: Duration = Duration::from_secs(86_400);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    /// SHA-256 of the token, hex.
    pub hash: String,
    pub node: String,
    pub created: UnixMillis,
    pub expires: UnixMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<UnixMillis>,
}

/// Why a token was not issued or not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{0:?} is not a valid node name (lowercase letters, digits and '-', at most 63)")]
    InvalidNode(String),
    #[error("{ADMIN_CN:?} is reserved for the admin certificate")]
    ReservedNode,
    #[error("ttl must be between 1s and {}h", MAX_TTL.as_secs() / 3600)]
    InvalidTtl,
    #[error("unknown enrollment token")]
    Unknown,
    #[error("enrollment token was already used at {0}")]
    Used(String),
    #[error("enrollment token expired at {0}")]
    Expired(String),
    #[error("enrollment token was issued for node {issued_for:?}, not {requested:?}")]
    WrongNode { issued_for: String, requested: String },
}

/// The tokens the controller has issued.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenBook {
    #[serde(default)]
    pub tokens: Vec<TokenRecord>,
}

pub fn hash_token(token: &str) -> String {
    hex::encode(&Sha256::digest(token.trim().as_bytes()))
}

/// Checks a name a certificate could be issued for.
pub fn check_node_name(node: &str) -> Result<(), TokenError> {
    if node == ADMIN_CN {
        return Err(TokenError::ReservedNode);
    }
    if !is_valid_name(node) {
        return Err(TokenError::InvalidNode(node.to_string()));
    }
    Ok(())
}

impl TokenBook {
    /// Issues a token for `node` valid for `ttl`; returns the token text (shown once).
    pub fn issue(
        &mut self,
        node: &str,
        ttl: Duration,
        now: UnixMillis,
        rng: &mut dyn RngCore,
    ) -> Result<String, TokenError> {
        check_node_name(node)?;
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::InvalidTtl);
        }
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
        self.prune(now);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.tokens.push(TokenRecord {
            hash: hash_token(&token),
            node: node.to_string(),
            created: now,
            expires: now.saturating_add(ttl_ms),
            used: None,
        });
        Ok(token)
    }

    /// Burns `token` for `node`. Nothing changes unless it is accepted.
    pub fn redeem(&mut self, token: &str, node: &str, now: UnixMillis) -> Result<(), TokenError> {
        let hash = hash_token(token);
        let record = self.tokens.iter_mut().find(|r| r.hash == hash).ok_or(TokenError::Unknown)?;
        if let Some(used) = record.used {
            return Err(TokenError::Used(format_millis(used)));
        }
        if now >= record.expires {
            return Err(TokenError::Expired(format_millis(record.expires)));
        }
        if record.node != node {
            return Err(TokenError::WrongNode { issued_for: record.node.clone(), requested: node.to_string() });
        }
        record.used = Some(now);
        Ok(())
    }

    /// Forgets records spent (used or expired) more than a day ago.
    pub fn prune(&mut self, now: UnixMillis) {
        self.tokens.retain(|r| {
            let spent_at = r.used.unwrap_or(r.expires);
            spent_at > now || age(now, spent_at) < KEEP_SPENT
        });
    }
}

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
}

/// What `token create` prints: the token and the one command to run on the node.
pub fn enroll_instructions(token: &str, node: &str, expires: &str, ca_fingerprint: &str, controller: &str) -> String {
    format!(
        "token:          {token}\nnode:           {node}\nexpires:        {expires}\nca fingerprint: {ca_fingerprint}\n\nOn {node}, run once:\n  hapair-agent enroll --controller {controller} --node {node} --token {token} --ca-fingerprint {ca_fingerprint} --dir /etc/hapair\n"
    )
}

/// Why a token could not be burned at enrollment.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    /// The token itself is refused; nothing changed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Where tokens are kept could not be read or written.
    #[error("{0}")]
    Backend(String),
}

/// Where the node API burns enrollment tokens: the token file of a state directory
/// (standalone) or the token book Secret (Kubernetes).
pub trait TokenRedeemer: Send + Sync {
    /// Burns `token` for `node`; nothing changes unless it is accepted.
    fn redeem<'a>(
        &'a self,
        token: &'a str,
        node: &'a str,
        now: UnixMillis,
    ) -> futures::future::BoxFuture<'a, Result<(), RedeemError>>;
}

impl TokenRedeemer for TokenFile {
    fn redeem<'a>(
        &'a self,
        token: &'a str,
        node: &'a str,
        now: UnixMillis,
    ) -> futures::future::BoxFuture<'a, Result<(), RedeemError>> {
        let file = self.clone();
        let (token, node) = (token.to_string(), node.to_string());
        Box::pin(async move {
            // The file lock blocks; keep it off the async workers.
            match tokio::task::spawn_blocking(move || TokenFile::redeem(&file, &token, &node, now)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(TokenFileError::Token(e))) => Err(RedeemError::Token(e)),
                Ok(Err(e)) => Err(RedeemError::Backend(e.to_string())),
                Err(e) => Err(RedeemError::Backend(format!("token check failed: {e}"))),
            }
        })
    }
}

/// The token book in a state directory, changed only under an exclusive file lock.
#[derive(Debug, Clone)]
pub struct TokenFile {
    dir: PathBuf,
}

impl TokenFile {
    pub fn new(dir: &Path) -> Self {
        TokenFile { dir: dir.to_path_buf() }
    }

    fn update<T>(&self, change: impl FnOnce(&mut TokenBook) -> Result<T, TokenError>) -> Result<T, TokenFileError> {
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| TokenFileError::Lock { path: lock_path.clone(), source })?;
        lock.lock().map_err(|source| TokenFileError::Lock { path: lock_path.clone(), source })?;
        let path = self.dir.join(TOKENS_FILE);
        let mut book: TokenBook = read_json(&path)?.unwrap_or_default();
        let before = book.clone();
        let result = change(&mut book);
        // Failed redemptions change nothing, so the file is rewritten only on success.
        if result.is_ok() && book != before {
            write_json(&path, &book, 0o600)?;
        }
        drop(lock);
        Ok(result?)
    }

    pub fn create(&self, node: &str, ttl: Duration, now: UnixMillis) -> Result<String, TokenFileError> {
        self.update(|book| book.issue(node, ttl, now, &mut rand::rng()))
    }

    pub fn redeem(&self, token: &str, node: &str, now: UnixMillis) -> Result<(), TokenFileError> {
        self.update(|book| book.redeem(token, node, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_token_works_once_for_its_node_before_it_expires() {
        let mut book = TokenBook::default();
        let mut rng = StdRng::seed_from_u64(1);
        let token = book.issue("db1", HOUR, 0, &mut rng).unwrap_or_else(|e| panic!("{e}"));
        assert!(token.starts_with(TOKEN_PREFIX));
        assert!(!serde_json::to_string(&book).unwrap_or_default().contains(&token), "only the hash is stored");
        let before = book.clone();
        assert_eq!(
            book.redeem(&token, "db2", 1),
            Err(TokenError::WrongNode { issued_for: "db1".into(), requested: "db2".into() })
        );
        assert_eq!(book.redeem("hpe_guess", "db1", 1), Err(TokenError::Unknown));
        assert_eq!(book, before, "failed attempts change nothing");
        assert_eq!(book.redeem(&token, "db1", 1_000), Ok(()));
        assert_eq!(book.redeem(&token, "db1", 2_000), Err(TokenError::Used("1970-01-01T00:00:01Z".into())));
    }

    #[test]
    fn expired_tokens_are_refused_and_eventually_forgotten() {
        let mut book = TokenBook::default();
        let mut rng = StdRng::seed_from_u64(2);
        let token = book.issue("db1", HOUR, 0, &mut rng).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(book.redeem(&token, "db1", 3_600_000), Err(TokenError::Expired("1970-01-01T01:00:00Z".into())));
        book.prune(3_600_000 + 86_400_000);
        assert!(book.tokens.is_empty());
    }

    #[test]
    fn refuses_bad_names_and_ttls() {
        let mut book = TokenBook::default();
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(book.issue(ADMIN_CN, HOUR, 0, &mut rng), Err(TokenError::ReservedNode));
        assert_eq!(book.issue("DB_1", HOUR, 0, &mut rng), Err(TokenError::InvalidNode("DB_1".into())));
        assert_eq!(book.issue("db1", Duration::ZERO, 0, &mut rng), Err(TokenError::InvalidTtl));
        assert_eq!(book.issue("db1", MAX_TTL + HOUR, 0, &mut rng), Err(TokenError::InvalidTtl));
    }

    #[test]
    fn the_file_keeps_hashes_only_and_burns_tokens() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = TokenFile::new(dir.path());
        let token = file.create("db1", HOUR, 0)?;
        let stored = std::fs::read_to_string(dir.path().join(TOKENS_FILE))?;
        assert!(stored.contains(&hash_token(&token)) && !stored.contains(&token));
        file.redeem(&token, "db1", 10)?;
        let again = file.redeem(&token, "db1", 20).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(again.starts_with("enrollment token was already used"), "{again}");
        Ok(())
    }
}
