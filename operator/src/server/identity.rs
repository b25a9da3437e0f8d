//! Who is on the other end of a node API connection, decided from its client certificate.
//!
//! Client authentication is optional at the TLS layer, because `POST /v1/enroll` must work
//! before a node has a certificate. A certificate that is presented is checked after the
//! handshake, against the controller's CA, and the verdict travels with every request of
//! the connection: an expired or foreign certificate gets a 401 naming the problem instead
//! of an opaque handshake failure. The handshake still proves the client holds the key of
//! whatever certificate it presented.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::pki::{ADMIN_CN, common_name};

/// The authenticated identity of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// No client certificate (only enrollment, health and metrics are open to it).
    Anonymous,
    /// A certificate was presented but is not acceptable; the text says why.
    Invalid(String),
    /// An enrolled node; the certificate's CN.
    Node(String),
    /// The admin certificate.
    Admin,
}

impl PeerIdentity {
    /// A short label for logs and rate-limit keys.
    pub fn label(&self) -> String {
        match self {
            PeerIdentity::Anonymous => "anonymous".into(),
            PeerIdentity::Invalid(_) => "invalid-certificate".into(),
            PeerIdentity::Node(n) => format!("node:{n}"),
            PeerIdentity::Admin => "admin".into(),
        }
    }
}

/// Accepts any client certificate chain during the handshake (signatures are still
/// verified), leaving the trust decision to [`ClientAuth::identify`].
#[derive(Debug)]
struct DeferredClientAuth {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{what}: {message}")]
    Bad { what: &'static str, message: String },
}

fn bad(what: &'static str) -> impl FnOnce(String) -> TlsSetupError {
    move |message| TlsSetupError::Bad { what, message }
}

/// The node API's TLS setup: server identity plus the CA client certificates must chain to.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl ClientAuth {
    /// Judges the certificate chain a client presented.
    pub fn identify(&self, chain: Option<&[CertificateDer<'static>]>) -> PeerIdentity {
        let Some((leaf, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return PeerIdentity::Anonymous;
        };
        if let Err(e) = self.verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
            return PeerIdentity::Invalid(describe(&e));
        }
        match common_name(leaf) {
            Some(cn) if cn == ADMIN_CN => PeerIdentity::Admin,
            Some(cn) if hapair_crds::validation::is_valid_name(&cn) => PeerIdentity::Node(cn),
            Some(cn) => PeerIdentity::Invalid(format!("client certificate names {cn:?}, which is not a node name")),
            None => PeerIdentity::Invalid("client certificate has no common name".into()),
        }
    }
}

fn describe(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "client certificate has expired".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "client certificate is not valid yet".into(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "client certificate is not signed by this controller's CA".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => "client certificate is revoked".into(),
        other => format!("client certificate rejected: {other}"),
    }
}

/// Builds the server TLS config: the server certificate chain (leaf then CA, so agents
/// pinning the CA fingerprint find it) and deferred client authentication against `ca_der`.
pub fn server_config(
    ca_der: &CertificateDer<'static>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Arc<rustls::ServerConfig>, ClientAuth), TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone()).map_err(|e| bad("CA certificate")(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad("client verifier")(e.to_string()))?;
    let leaf =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad("server certificate")(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad("server key")(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions")(e.to_string()))?
        .with_client_cert_verifier(Arc::new(DeferredClientAuth { inner: verifier.clone() }))
        .with_single_cert(vec![leaf, ca_der.clone()], key)
        .map_err(|e| bad("server certificate")(e.to_string()))?;
    Ok((Arc::new(config), ClientAuth { verifier }))
}
