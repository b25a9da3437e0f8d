//! What every controller of the set shares besides the leader's state: the CA (so agents
//! trust whichever controller answers, and each controller issues its own serving
//! certificate from it) and the enrollment token book (so a token issued through one
//! controller is redeemed through another).
//!
//! Neither is fenced by leadership: the CA is created once, by whichever controller
//! comes first (create-if-absent), and the token book changes by compare-and-swap on its
//! revision, from the leader's node API or `hapair-operator token create` alike.

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::{EtcdError, Keys, decode, encode};
use crate::pki::tokens::{RedeemError, TokenBook, TokenError, TokenRedeemer};
use crate::pki::{Ca, PkiError};
use crate::support::timestamp::UnixMillis;

/// The CA as kept in etcd.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CaRecord {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("the CA in etcd ({key}): {source}")]
    Ca {
        key: String,
        #[source]
        source: PkiError,
    },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("etcd key {key}: changed by someone else {attempts} times in a row; try again")]
    Contended { key: String, attempts: u32 },
}

/// The CA from etcd; created there when there is none yet (by exactly one controller,
/// however many start at once). Returns whether this call created it.
pub async fn load_or_create_ca(client: &Client, keys: &Keys) -> Result<(Ca, bool), SharedError> {
    let key = keys.ca();
    let from = |record: CaRecord| {
        Ca::from_pems(&record.cert_pem, &record.key_pem).map_err(|source| SharedError::Ca { key: key.clone(), source })
    };
    if let Some(record) = super::get_json::<CaRecord>(client, &key).await? {
        return Ok((from(record)?, false));
    }
    let (ca, key_pem) = Ca::generate().map_err(|source| SharedError::Ca { key: key.clone(), source })?;
    let record = CaRecord { cert_pem: ca.cert_pem().to_string(), key_pem };
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), encode(&record), None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let response = client.clone().txn(txn).await.map_err(EtcdError::request("creating the CA"))?;
    if response.succeeded() {
        return Ok((ca, true));
    }
    // Another controller created it first: use theirs.
    let theirs = response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(decode::<CaRecord>),
        _ => None,
    });
    match theirs {
        Some(record) => Ok((from(record?)?, false)),
        None => Err(SharedError::Etcd(EtcdError::Decode { key, message: "created and deleted at once".into() })),
    }
}

/// The CA, only if some controller created it.
pub async fn load_ca(client: &Client, keys: &Keys) -> Result<Option<Ca>, SharedError> {
    let key = keys.ca();
    match super::get_json::<CaRecord>(client, &key).await? {
        None => Ok(None),
        Some(record) => {
            Ca::from_pems(&record.cert_pem, &record.key_pem).map(Some).map_err(|source| SharedError::Ca { key, source })
        }
    }
}

/// Attempts before a token book change gives up under contention.
const CAS_ATTEMPTS: u32 = 8;

/// The token book in etcd.
#[derive(Clone)]
pub struct EtcdTokens {
    client: Client,
    key: String,
}

impl std::fmt::Debug for EtcdTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The etcd client has no Debug of its own.
        f.debug_struct("EtcdTokens").field("key", &self.key).finish_non_exhaustive()
    }
}

impl EtcdTokens {
    pub fn new(client: Client, keys: &Keys) -> Self {
        EtcdTokens { client, key: keys.tokens() }
    }

    /// Reads the book, applies `change`, and writes it back only if nobody wrote it in
    /// between (by mod revision); retried a few times under contention. A failed change
    /// writes nothing.
    async fn update<T>(&self, change: impl Fn(&mut TokenBook) -> Result<T, TokenError>) -> Result<T, SharedError> {
        for _ in 0..CAS_ATTEMPTS {
            let response = self
                .client
                .clone()
                .get(self.key.clone(), None)
                .await
                .map_err(EtcdError::request("reading the token book"))?;
            let (mut book, revision) = match response.kvs().first() {
                Some(kv) => (decode::<TokenBook>(kv)?, kv.mod_revision()),
                None => (TokenBook::default(), 0),
            };
            let before = book.clone();
            let result = change(&mut book)?;
            if book == before {
                return Ok(result);
            }
            let unchanged = if revision == 0 {
                Compare::create_revision(self.key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(self.key.clone(), CompareOp::Equal, revision)
            };
            let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(self.key.clone(), encode(&book), None)]);
            let written =
                self.client.clone().txn(txn).await.map_err(EtcdError::request("writing the token book"))?.succeeded();
            if written {
                return Ok(result);
            }
        }
        Err(SharedError::Contended { key: self.key.clone(), attempts: CAS_ATTEMPTS })
    }

    /// Issues a token for `node`.
    pub async fn issue(&self, node: &str, ttl: std::time::Duration, now: UnixMillis) -> Result<String, SharedError> {
        self.update(|book| book.issue(node, ttl, now, &mut rand::rng())).await
    }
}

impl TokenRedeemer for EtcdTokens {
    fn redeem<'a>(
        &'a self,
        token: &'a str,
        node: &'a str,
        now: UnixMillis,
    ) -> futures::future::BoxFuture<'a, Result<(), RedeemError>> {
        Box::pin(async move {
            match self.update(|book| book.redeem(token, node, now)).await {
                Ok(()) => Ok(()),
                Err(SharedError::Token(e)) => Err(RedeemError::Token(e)),
                Err(e) => Err(RedeemError::Backend(e.to_string())),
            }
        })
    }
}
