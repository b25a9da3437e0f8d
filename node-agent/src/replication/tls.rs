//! TLS for the replication link: mutual authentication with the nodes' certificates.
//!
//! The dialing node is the TLS client and verifies the listener's certificate against the
//! CA with the peer's node name as the server name (so certificates must name their node as
//! a DNS subject alternative name); the listener requires a client certificate from the same
//! CA and checks that it names the expected peer.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    Pem { what: &'static str, path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("peer name {0:?} is not a valid TLS server name")]
    Name(String),
}

/// PEM material for one node.
#[derive(Clone)]
pub struct TlsMaterial {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub ca: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").field("certs", &self.cert_chain.len()).field("ca", &self.ca.len()).finish()
    }
}

impl TlsMaterial {
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsError> {
        let pem = |what, reason: String| TlsError::Pem { what, path: "(inline)".into(), reason };
        let cert_chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem("certificate", e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| pem("private key", e.to_string()))?;
        let ca =
            CertificateDer::pem_slice_iter(ca).collect::<Result<Vec<_>, _>>().map_err(|e| pem("CA", e.to_string()))?;
        if cert_chain.is_empty() || ca.is_empty() {
            return Err(pem("certificate", "no certificate found".into()));
        }
        Ok(TlsMaterial { cert_chain, key: Arc::new(key), ca })
    }

    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let read = |what: &'static str, p: &Path| {
            std::fs::read(p).map_err(|e| TlsError::Pem { what, path: p.display().to_string(), reason: e.to_string() })
        };
        Self::from_pem(&read("certificate", cert)?, &read("private key", key)?, &read("CA", ca)?)
    }
}

/// Ready-to-use TLS for one replication link.
#[derive(Clone)]
pub struct LinkTls {
    pub connector: TlsConnector,
    pub acceptor: TlsAcceptor,
    pub peer_name: ServerName<'static>,
    pub peer_node: String,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls").field("peer_node", &self.peer_node).finish()
    }
}

pub fn link_tls(material: &TlsMaterial, peer_node: &str) -> Result<LinkTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in &material.ca {
        roots.add(ca.clone()).map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    let client = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(material.cert_chain.clone(), material.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.cert_chain.clone(), material.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let peer_name = ServerName::try_from(peer_node.to_string()).map_err(|_| TlsError::Name(peer_node.to_string()))?;
    Ok(LinkTls {
        connector: TlsConnector::from(Arc::new(client)),
        acceptor: TlsAcceptor::from(Arc::new(server)),
        peer_name,
        peer_node: peer_node.to_string(),
    })
}

/// Whether a verified client certificate names `node` (as a DNS name or common name).
pub fn certificate_names(cert: &CertificateDer<'_>, node: &str) -> bool {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return false };
    let cn = parsed.subject().iter_common_name().filter_map(|c| c.as_str().ok()).any(|c| c == node);
    let san = parsed.subject_alternative_name().ok().flatten().is_some_and(|ext| {
        ext.value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if *d == node))
    });
    cn || san
}
