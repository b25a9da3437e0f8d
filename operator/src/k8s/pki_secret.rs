//! The controller CA in Kubernetes: the PKI Secret in the operator's namespace (keys
//! `ca.crt` and `ca.key`), created by the first leader and never by the chart, so that
//! upgrades and uninstalls keep it and enrolled agents stay valid.
//!
//! Serving certificates are not stored: each replica issues its own from the CA when it
//! starts, for the names it was given (`--server-name`), so nothing but the CA has to be
//! shared between replicas.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use crate::k8s::K8sError;
use crate::k8s::state_secrets::SECRET_ROLE_LABEL;
use crate::pki::{CA_CERT_FILE, CA_KEY_FILE, Ca};

fn text(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone());
    let string = secret.string_data.as_ref().and_then(|d| d.get(key)).map(|s| s.as_bytes().to_vec());
    string.or(data).and_then(|bytes| String::from_utf8(bytes).ok())
}

/// The CA certificate (PEM) of a PKI Secret, for showing its fingerprint.
pub fn ca_cert_pem(secret: &Secret) -> Option<String> {
    text(secret, CA_CERT_FILE)
}

/// Reads the CA from the Secret `name`; `None` when the Secret does not exist yet.
pub async fn load(api: &Api<Secret>, name: &str) -> Result<Option<Ca>, K8sError> {
    let Some(secret) = api.get_opt(name).await.map_err(K8sError::kube(format!("reading Secret {name}")))? else {
        return Ok(None);
    };
    let (Some(cert), Some(key)) = (text(&secret, CA_CERT_FILE), text(&secret, CA_KEY_FILE)) else {
        return Err(K8sError::Invalid(format!(
            "Secret {name} lacks {CA_CERT_FILE} or {CA_KEY_FILE}; restore it, or delete it to have a new CA created (every agent must then enroll again)"
        )));
    };
    Ok(Some(Ca::from_pems(&cert, &key)?))
}

/// Reads the CA, creating it first when the Secret does not exist. Of two replicas racing
/// to create it, the loser reads the winner's.
pub async fn load_or_create(api: &Api<Secret>, name: &str) -> Result<(Ca, bool), K8sError> {
    if let Some(ca) = load(api, name).await? {
        return Ok((ca, false));
    }
    let (ca, key_pem) = Ca::generate()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(
                [
                    (SECRET_ROLE_LABEL.to_string(), "pki".to_string()),
                    ("app.kubernetes.io/managed-by".to_string(), "hapair-operator".to_string()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [
                (CA_CERT_FILE.to_string(), ByteString(ca.cert_pem().as_bytes().to_vec())),
                (CA_KEY_FILE.to_string(), ByteString(key_pem.into_bytes())),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((ca, true)),
        Err(kube::Error::Api(status)) if status.code == 409 => match load(api, name).await? {
            Some(ca) => Ok((ca, false)),
            None => Err(K8sError::Invalid(format!("Secret {name} was created and removed again while starting"))),
        },
        Err(e) => Err(K8sError::kube(format!("creating Secret {name}"))(e)),
    }
}
