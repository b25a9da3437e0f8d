//! Kubernetes mode (`hapair-operator run`): the standalone controller's reconcile core with
//! the Kubernetes API as its store.
//!
//! - [`store`]: [`store::KubeStore`], the [`crate::controller::store::Store`] of this mode (caches in,
//!   state Secrets, server-side-applied statuses, Events and finalizer releases out), with
//!   [`writer`] doing the writes off the controller's lock and [`state_secrets`] sharding
//!   the controller's state over Secrets in the operator's namespace;
//! - [`reconciler`]: the per-object reconcilers kube-runtime's `Controller`s call
//!   (finalizers, admin-action [`annotations`], blocked volume deletion), which hand
//!   everything else to the shared core;
//! - [`finalizer`]: the operator's finalizer, added by the reconcilers and released by
//!   either the group reconciler or the status writer;
//! - [`election`]: leader election on a Lease, and the fence that keeps a non-leader from
//!   granting witness leases;
//! - [`pki_secret`] and [`token_secret`]: the CA and the enrollment tokens in Secrets;
//! - [`term`]: everything a replica runs while it leads; [`run`]: the process around terms
//!   (election, node API that answers 503 when not leading, metrics and probes).

pub mod annotations;
pub mod election;
pub mod finalizer;
pub mod pki_secret;
pub mod reconciler;
pub mod run;
pub mod state_secrets;
pub mod store;
pub mod term;
pub mod token_secret;
pub mod writer;

/// Why something in Kubernetes mode failed, naming the object involved.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Store(#[from] crate::controller::store::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::server::identity::TlsSetupError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

impl K8sError {
    /// Wraps a client error with what was being done.
    pub fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> K8sError {
        let what = what.into();
        move |source| K8sError::Kube { what, source }
    }
}
