//! The controller's certificate authority and the certificates it issues.
//!
//! On first start the controller creates a CA in its state directory. It signs the node
//! API's server certificate, the admin client certificate used by the CLI, and one client
//! certificate per enrolled node (CN = node name). Agents and the CLI trust only this CA,
//! and the node API trusts only certificates it signed: nothing depends on public PKI.

pub mod tokens;

use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::support::atomic_file::{FileError, write};
use crate::support::hex;

/// CN of the admin client certificate; the node API gives it the admin API and nothing
/// else. No node may enroll under this name.
pub const ADMIN_CN: &str = "hapair-admin";

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.crt";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const ADMIN_CERT_FILE: &str = "admin.crt";
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// Lifetime of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Lifetime of server, admin and node certificates.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Server and admin certificates closer to expiry than this are reissued at start.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// Backdating of `notBefore`, so a peer whose clock is a little behind accepts a fresh cert.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0} exists without its counterpart {1}; restore it or remove both to create a new CA")]
    HalfPresent(String, String),
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
    #[error("certificate signing request: {0}")]
    BadCsr(String),
    #[error("{0}")]
    BadCertificate(String),
}

fn rc(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Rcgen { what: what.to_string(), source }
}

/// A certificate and its private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedPem").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// The controller's CA, loaded from or created in the state directory.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read { path: path.display().to_string(), source })
}

fn offset(now: OffsetDateTime, by: Duration, forward: bool) -> OffsetDateTime {
    let by = time::Duration::try_from(by).unwrap_or(time::Duration::ZERO);
    if forward { now.saturating_add(by) } else { now.saturating_sub(by) }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and non-zero as RFC 5280 wants.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "hapair");
    dn.push(DnType::CommonName, cn);
    dn
}

fn san(entry: &str) -> Result<SanType, PkiError> {
    match entry.parse::<IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => entry.to_string().try_into().map(SanType::DnsName).map_err(rc("subject alternative name")),
    }
}

impl Ca {
    /// Loads the CA from `dir`, or creates it there (key file mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Ca::from_pems(&read(&cert_path)?, &read(&key_path)?),
            (false, false) => {
                let (ca, key_pem) = Ca::generate()?;
                // Key first: a crash in between leaves a key without a cert, which is refused
                // loudly instead of silently replaced.
                write(&key_path, key_pem.as_bytes(), 0o600)?;
                write(&cert_path, ca.cert_pem().as_bytes(), 0o644)?;
                Ok(ca)
            }
            (true, false) => {
                Err(PkiError::HalfPresent(cert_path.display().to_string(), key_path.display().to_string()))
            }
            (false, true) => {
                Err(PkiError::HalfPresent(key_path.display().to_string(), cert_path.display().to_string()))
            }
        }
    }

    /// A new CA, and its private key (PEM) for the caller to keep.
    pub fn generate() -> Result<(Ca, String), PkiError> {
        let key = KeyPair::generate().map_err(rc("generating the CA key"))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        // A unique name per CA, so a certificate from another hapair controller is
        // recognised as foreign by its issuer, not only by its signature.
        let tag: [u8; 4] = rand::random();
        params.distinguished_name = name(&format!("hapair controller CA {}", hex::encode(&tag)));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = offset(now, BACKDATE, false);
        params.not_after = offset(now, CA_VALIDITY, true);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(rc("self-signing the CA"))?;
        let key_pem = key.serialize_pem();
        Ok((Ca::from_pem(&cert.pem(), key)?, key_pem))
    }

    /// The CA from its certificate and key, PEM (as kept in the operator's PKI Secret).
    pub fn from_pems(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(rc("CA key"))?;
        Ca::from_pem(cert_pem, key)
    }

    fn from_pem(cert_pem: &str, key: KeyPair) -> Result<Ca, PkiError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::BadCertificate(format!("CA certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(rc("CA certificate"))?;
        Ok(Ca { cert_pem: cert_pem.to_string(), cert_der, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, DER: the secret the console's signing keys are derived from, so
    /// that every controller holding this CA accepts the same console sessions.
    pub(crate) fn private_key_der(&self) -> &[u8] {
        self.issuer.key().serialized_der()
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: what agents pin on first contact.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    fn sign(&self, params: &CertificateParams, public_key: &impl PublicKeyData) -> Result<String, PkiError> {
        Ok(params.signed_by(public_key, &self.issuer).map_err(rc("signing a certificate"))?.pem())
    }

    fn leaf_params(
        cn: &str,
        sans: &[String],
        usages: &[ExtendedKeyUsagePurpose],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn);
        params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// A server certificate for the node API, valid for `names` (DNS names or IPs).
    pub fn issue_server(&self, names: &[String]) -> Result<CertifiedPem, PkiError> {
        let key = KeyPair::generate().map_err(rc("generating the server key"))?;
        let now = OffsetDateTime::now_utc();
        let cn = names.first().map(String::as_str).unwrap_or("hapair-controller");
        let params = Ca::leaf_params(
            cn,
            names,
            &[ExtendedKeyUsagePurpose::ServerAuth],
            offset(now, BACKDATE, false),
            offset(now, LEAF_VALIDITY, true),
        )?;
        Ok(CertifiedPem { cert_pem: self.sign(&params, &key)?, key_pem: key.serialize_pem() })
    }

    /// A client certificate with common name `cn`, valid between the two Unix times
    /// (seconds). The admin certificate is one; tests also make expired ones.
    pub fn issue_client(&self, cn: &str, not_before: i64, not_after: i64) -> Result<CertifiedPem, PkiError> {
        let key = KeyPair::generate().map_err(rc("generating a client key"))?;
        let at = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t).map_err(|e| PkiError::BadCertificate(format!("validity: {e}")))
        };
        let params = Ca::leaf_params(cn, &[], &[ExtendedKeyUsagePurpose::ClientAuth], at(not_before)?, at(not_after)?)?;
        Ok(CertifiedPem { cert_pem: self.sign(&params, &key)?, key_pem: key.serialize_pem() })
    }

    /// Signs a node's CSR. The certificate says only what the controller decides: CN and DNS
    /// SAN are `node`, usages client and server auth (the server side is for the replication
    /// link between the pair), whatever else the CSR asked for. The CSR must be self-signed
    /// by the key it carries and name `node` as its CN.
    pub fn sign_node_csr(&self, node: &str, csr_pem: &str, validity: Duration) -> Result<String, PkiError> {
        let csr_der = pem_block(csr_pem, "CERTIFICATE REQUEST")
            .ok_or_else(|| PkiError::BadCsr("not a PEM CERTIFICATE REQUEST".into()))?;
        use x509_parser::prelude::FromDer;
        let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der)
            .map_err(|e| PkiError::BadCsr(format!("cannot parse: {e}")))?;
        let cn = parsed
            .certification_request_info
            .subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok().map(str::to_string))
            .ok_or_else(|| PkiError::BadCsr("subject has no common name".into()))?;
        if cn != node {
            return Err(PkiError::BadCsr(format!("subject common name is {cn:?}, expected the node name {node:?}")));
        }
        let csr =
            CertificateSigningRequestParams::from_der(&csr_der.into()).map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        let params = Ca::leaf_params(
            node,
            &[node.to_string()],
            &[ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth],
            offset(now, BACKDATE, false),
            offset(now, validity, true),
        )?;
        self.sign(&params, &csr.public_key)
    }

    /// Makes sure `dir` holds a server certificate from this CA covering exactly `names`
    /// and not about to expire, issuing a new one otherwise.
    pub fn ensure_server_cert(&self, dir: &Path, names: &[String]) -> Result<CertifiedPem, PkiError> {
        let (cert_path, key_path) = (dir.join(SERVER_CERT_FILE), dir.join(SERVER_KEY_FILE));
        if let (Ok(cert_pem), Ok(key_pem)) = (fs::read_to_string(&cert_path), fs::read_to_string(&key_path))
            && self.still_good(&cert_pem, Some(names))
        {
            return Ok(CertifiedPem { cert_pem, key_pem });
        }
        let issued = self.issue_server(names)?;
        write(&key_path, issued.key_pem.as_bytes(), 0o600)?;
        write(&cert_path, issued.cert_pem.as_bytes(), 0o644)?;
        Ok(issued)
    }

    /// Makes sure `dir` holds an admin client certificate from this CA, not about to expire.
    pub fn ensure_admin_cert(&self, dir: &Path) -> Result<CertifiedPem, PkiError> {
        let (cert_path, key_path) = (dir.join(ADMIN_CERT_FILE), dir.join(ADMIN_KEY_FILE));
        if let (Ok(cert_pem), Ok(key_pem)) = (fs::read_to_string(&cert_path), fs::read_to_string(&key_path))
            && self.still_good(&cert_pem, None)
        {
            return Ok(CertifiedPem { cert_pem, key_pem });
        }
        let now = OffsetDateTime::now_utc();
        let issued = self.issue_client(
            ADMIN_CN,
            offset(now, BACKDATE, false).unix_timestamp(),
            offset(now, LEAF_VALIDITY, true).unix_timestamp(),
        )?;
        write(&key_path, issued.key_pem.as_bytes(), 0o600)?;
        write(&cert_path, issued.cert_pem.as_bytes(), 0o644)?;
        Ok(issued)
    }

    /// Whether `cert_pem` was signed by this CA, is valid for at least [`RENEW_BEFORE`], and
    /// (when given) covers exactly `names`.
    fn still_good(&self, cert_pem: &str, names: Option<&[String]>) -> bool {
        let Some(der) = pem_block(cert_pem, "CERTIFICATE") else { return false };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else { return false };
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(&self.cert_der) else { return false };
        if cert.verify_signature(Some(ca.public_key())).is_err() {
            return false;
        }
        let now = OffsetDateTime::now_utc();
        if cert.validity().not_after.timestamp() < offset(now, RENEW_BEFORE, true).unix_timestamp() {
            return false;
        }
        match names {
            None => true,
            Some(names) => {
                let mut wanted: Vec<String> = names.to_vec();
                wanted.sort();
                wanted.dedup();
                let mut have = subject_alt_names(&cert);
                have.sort();
                have.dedup();
                have == wanted
            }
        }
    }
}

fn subject_alt_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(ext)) = cert.subject_alternative_name() else { return Vec::new() };
    ext.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).ok().map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes).ok().map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The DER content of the first PEM block labelled `label` (`CERTIFICATE` or
/// `CERTIFICATE REQUEST`).
fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    match label {
        "CERTIFICATE" => CertificateDer::from_pem_slice(pem.as_bytes()).ok().map(|d| d.to_vec()),
        "CERTIFICATE REQUEST" => {
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).ok().map(|d| d.to_vec())
        }
        _ => None,
    }
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(&Sha256::digest(der))
}

/// Normalizes a user-typed fingerprint (`AB:CD…`, `sha256:abcd…`) to lowercase hex.
pub fn normalize_fingerprint(text: &str) -> Option<String> {
    let text = text.trim();
    let text = text.strip_prefix("sha256:").or_else(|| text.strip_prefix("SHA256:")).unwrap_or(text);
    let hex: String = text.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn csr(cn: &str) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn);
        let csr = params.serialize_request(&key).unwrap_or_else(|e| panic!("{e}"));
        let pem = csr.pem().unwrap_or_else(|e| panic!("{e}"));
        (key, pem)
    }

    #[test]
    fn creates_the_ca_once_with_a_private_key_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::load_or_create(dir.path())?;
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(dir.path())?;
        assert_eq!(again.fingerprint(), ca.fingerprint());
        fs::remove_file(dir.path().join(CA_CERT_FILE))?;
        let err = Ca::load_or_create(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("exists without its counterpart"), "{err}");
        Ok(())
    }

    #[test]
    fn signs_a_node_csr_with_the_node_name_only() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::load_or_create(dir.path())?;
        let (_, pem) = csr("db1");
        let cert = ca.sign_node_csr("db1", &pem, LEAF_VALIDITY)?;
        let der = pem_block(&cert, "CERTIFICATE").unwrap_or_default();
        assert_eq!(common_name(&der).as_deref(), Some("db1"));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)?;
        assert_eq!(subject_alt_names(&parsed), ["db1"]);
        let err = ca.sign_node_csr("db2", &pem, LEAF_VALIDITY).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "certificate signing request: subject common name is \"db1\", expected the node name \"db2\"");
        assert!(matches!(ca.sign_node_csr("db1", "garbage", LEAF_VALIDITY), Err(PkiError::BadCsr(_))));
        Ok(())
    }

    #[test]
    fn server_cert_is_kept_while_names_match_and_reissued_when_they_change() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::load_or_create(dir.path())?;
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let first = ca.ensure_server_cert(dir.path(), &names)?;
        assert_eq!(ca.ensure_server_cert(dir.path(), &names)?, first);
        let more = vec!["localhost".to_string(), "127.0.0.1".to_string(), "ctl.example".to_string()];
        assert_ne!(ca.ensure_server_cert(dir.path(), &more)?, first);
        // A certificate from another CA is replaced.
        let other = tempfile::tempdir()?;
        let foreign = Ca::load_or_create(other.path())?.issue_server(&more)?;
        fs::write(dir.path().join(SERVER_CERT_FILE), &foreign.cert_pem)?;
        assert_ne!(ca.ensure_server_cert(dir.path(), &more)?.cert_pem, foreign.cert_pem);
        Ok(())
    }

    #[test]
    fn fingerprints_are_normalized() {
        let hex64 = "ab".repeat(32);
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(normalize_fingerprint(&colons.join(":")), Some(hex64.clone()));
        assert_eq!(normalize_fingerprint(&format!("sha256:{hex64}")), Some(hex64));
        assert_eq!(normalize_fingerprint("abc"), None);
    }
}
