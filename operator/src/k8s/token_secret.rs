//! One-time enrollment tokens in Kubernetes: the same [`TokenBook`] as standalone mode
//! (hashes only), kept in one Secret in the operator's namespace under `tokens.json`.
//!
//! `hapair-operator token create` (in the operator pod) and `kubectl hapair token create`
//! issue into it; the leader burns tokens from it at enrollment. Every change is a
//! compare-and-swap on the Secret's `resourceVersion`, retried on conflict, so two
//! enrollments with the same token cannot both succeed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use crate::controller::metrics::Metrics;
use crate::k8s::K8sError;
use crate::k8s::state_secrets::SECRET_ROLE_LABEL;
use crate::pki::tokens::{RedeemError, TokenBook, TokenError, TokenRedeemer};
use crate::support::timestamp::UnixMillis;

/// Data key of the token book.
pub const TOKENS_KEY: &str = "tokens.json";

/// Attempts of one change before giving up on conflicts.
const ATTEMPTS: usize = 5;

/// Why a token could not be issued or burned.
#[derive(Debug, thiserror::Error)]
pub enum TokenSecretError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Backend(#[from] K8sError),
}

/// The token book Secret.
#[derive(Clone, Debug)]
pub struct TokenSecret {
    api: Api<Secret>,
    name: String,
    metrics: Option<Arc<Metrics>>,
}

impl TokenSecret {
    /// `api` is namespaced to the operator's namespace.
    pub fn new(api: Api<Secret>, name: &str, metrics: Option<Arc<Metrics>>) -> Self {
        TokenSecret { api, name: name.to_string(), metrics }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn encode(&self, book: &TokenBook, resource_version: Option<String>) -> Result<Secret, K8sError> {
        let json = serde_json::to_vec(book).map_err(|e| K8sError::Invalid(format!("encoding the token book: {e}")))?;
        Ok(Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version,
                labels: Some(
                    [
                        (SECRET_ROLE_LABEL.to_string(), "tokens".to_string()),
                        ("app.kubernetes.io/managed-by".to_string(), "hapair-operator".to_string()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some([(TOKENS_KEY.to_string(), ByteString(json))].into()),
            ..Secret::default()
        })
    }

    /// Reads the book and its `resourceVersion` (`None`: no Secret yet, an empty book).
    async fn read(&self) -> Result<(TokenBook, Option<String>), K8sError> {
        let name = &self.name;
        let Some(secret) = self.api.get_opt(name).await.map_err(K8sError::kube(format!("reading Secret {name}")))?
        else {
            return Ok((TokenBook::default(), None));
        };
        let bytes = secret.data.as_ref().and_then(|d| d.get(TOKENS_KEY)).map(|b| b.0.clone()).unwrap_or_default();
        let book = if bytes.is_empty() {
            TokenBook::default()
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| K8sError::Invalid(format!("Secret {name} key {TOKENS_KEY} is not a token book: {e}")))?
        };
        Ok((book, secret.metadata.resource_version))
    }

    /// Applies `change` to the book and writes it back when it succeeds and changed
    /// something. Retried from a fresh read when another writer got there first.
    async fn update<T>(&self, change: impl Fn(&mut TokenBook) -> Result<T, TokenError>) -> Result<T, TokenSecretError> {
        let name = &self.name;
        for _ in 0..ATTEMPTS {
            let (mut book, version) = self.read().await?;
            let before = book.clone();
            let result = change(&mut book)?;
            if book == before {
                return Ok(result);
            }
            let secret = self.encode(&book, version.clone())?;
            let pp = PostParams::default();
            let written = match version {
                Some(_) => self.api.replace(name, &pp, &secret).await,
                None => self.api.create(&pp, &secret).await,
            };
            match written {
                Ok(_) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.kube_write("token");
                    }
                    return Ok(result);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(K8sError::kube(format!("writing Secret {name}"))(e).into()),
            }
        }
        Err(K8sError::Invalid(format!("Secret {name} kept changing under {ATTEMPTS} attempts; try again")).into())
    }

    /// Issues a token for `node`; returns its text (shown once).
    pub async fn issue(&self, node: &str, ttl: Duration, now: UnixMillis) -> Result<String, TokenSecretError> {
        self.update(|book| book.issue(node, ttl, now, &mut rand::rng())).await
    }

    /// Burns `token` for `node`.
    pub async fn burn(&self, token: &str, node: &str, now: UnixMillis) -> Result<(), TokenSecretError> {
        self.update(|book| book.redeem(token, node, now)).await
    }
}

impl TokenRedeemer for TokenSecret {
    fn redeem<'a>(
        &'a self,
        token: &'a str,
        node: &'a str,
        now: UnixMillis,
    ) -> futures::future::BoxFuture<'a, Result<(), RedeemError>> {
        Box::pin(async move {
            match self.burn(token, node, now).await {
                Ok(()) => Ok(()),
                Err(TokenSecretError::Token(e)) => Err(RedeemError::Token(e)),
                Err(TokenSecretError::Backend(e)) => Err(RedeemError::Backend(e.to_string())),
            }
        })
    }
}
