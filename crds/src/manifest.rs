//! Reading manifests the way the API server would: YAML documents, checked against the CRD
//! schema, decoded strictly (unknown fields are errors), then validated semantically.
//!
//! The standalone controller reads its directory with this, and the tests use it on
//! `examples/` and `tests/fixtures/`. Every error names the file, the document, the object
//! and the field.

use std::fmt;
use std::sync::LazyLock;

use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use serde::de::DeserializeOwned;

use crate::hagroup::HaGroup;
use crate::validation::{validate_group, validate_volume};
use crate::volume::ReplicatedVolume;

/// Namespace given to objects whose manifest names none, as `kubectl apply` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A decoded, individually valid object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Group(Box<HaGroup>),
    Volume(Box<ReplicatedVolume>),
    /// Secrets carry heartbeat keys and enrollment tokens in standalone mode.
    Secret(Box<Secret>),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Group(_) => "HaGroup",
            Object::Volume(_) => "ReplicatedVolume",
            Object::Secret(_) => "Secret",
        }
    }

    pub fn namespace(&self) -> &str {
        let ns = match self {
            Object::Group(g) => g.metadata.namespace.as_deref(),
            Object::Volume(v) => v.metadata.namespace.as_deref(),
            Object::Secret(s) => s.metadata.namespace.as_deref(),
        };
        ns.unwrap_or(DEFAULT_NAMESPACE)
    }

    pub fn name(&self) -> &str {
        let name = match self {
            Object::Group(g) => g.metadata.name.as_deref(),
            Object::Volume(v) => v.metadata.name.as_deref(),
            Object::Secret(s) => s.metadata.name.as_deref(),
        };
        name.unwrap_or("")
    }
}

/// One object and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub source: String,
    /// 1-based position among the YAML documents of the source.
    pub index: usize,
    pub object: Object,
}

/// Why one document was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// File (or other origin) the document came from.
    pub file: String,
    pub index: usize,
    /// `Kind namespace/name`, when the document got far enough to say.
    pub object: Option<String>,
    /// Field path such as `spec.heartbeat.interval`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Objects read from the API server have no file: they are named by kind and key alone.
        let mut located = false;
        if !self.file.is_empty() {
            write!(f, "{} (document {})", self.file, self.index)?;
            located = true;
        }
        if let Some(object) = &self.object {
            if located {
                f.write_str(", ")?;
            }
            f.write_str(object)?;
            located = true;
        }
        if located {
            f.write_str(": ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

struct Schemas {
    group: Result<jsonschema::Validator, String>,
    volume: Result<jsonschema::Validator, String>,
}

static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| {
    let build = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        let schema = crate::crd::openapi_schema(&crd).ok_or_else(|| "CRD has no schema".to_string())?;
        jsonschema::validator_for(&crate::crd::to_json_schema(schema)).map_err(|e| e.to_string())
    };
    use kube::CustomResourceExt;
    Schemas { group: build(HaGroup::crd()), volume: build(ReplicatedVolume::crd()) }
});

/// Converts a JSON pointer (`/spec/nodes/0/name`) into a manifest path (`spec.nodes[0].name`).
pub fn pointer_to_path(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push('[');
            path.push_str(&segment);
            path.push(']');
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment);
        }
    }
    path
}

/// Parses every YAML document in `text`. Valid objects and errors come back side by side:
/// one bad document never hides the others.
pub fn parse_documents(source: &str, text: &str) -> (Vec<Document>, Vec<ManifestError>) {
    use serde::Deserialize;
    let mut documents = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let error = |object: Option<String>, field: Option<String>, message: String| ManifestError {
            file: source.to_string(),
            index,
            object,
            field,
            message,
        };
        let value = match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(error(None, None, format!("not valid YAML: {e}")));
                // A syntax error leaves the YAML stream unusable past this point.
                break;
            }
        };
        match parse_object(value) {
            Ok(object) => documents.push(Document { source: source.to_string(), index, object }),
            Err((object, field, message)) => errors.push(error(object, field, message)),
        }
    }
    (documents, errors)
}

type ObjectError = (Option<String>, Option<String>, String);

/// Decodes and validates one object from its JSON form.
pub fn parse_object(value: serde_json::Value) -> Result<Object, ObjectError> {
    let Some(map) = value.as_object() else {
        return Err((None, None, "a manifest must be a mapping with apiVersion and kind".into()));
    };
    let api_version = map.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    let kind = map.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let name = value.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or("");
    let namespace = value.pointer("/metadata/namespace").and_then(|v| v.as_str()).unwrap_or(DEFAULT_NAMESPACE);
    let label = Some(format!("{kind} {namespace}/{name}"));
    if name.is_empty() {
        return Err((label, Some("metadata.name".into()), "is required".into()));
    }
    let expected_group = HaGroup::api_version(&());
    match (api_version, kind) {
        (v, "HaGroup") if v == expected_group => {
            let group: HaGroup = decode(&value, SCHEMAS.group.as_ref(), &label)?;
            validate_group(&group.spec).map_err(|errs| semantic(errs, &label))?;
            Ok(Object::Group(Box::new(group)))
        }
        (v, "ReplicatedVolume") if v == expected_group => {
            let volume: ReplicatedVolume = decode(&value, SCHEMAS.volume.as_ref(), &label)?;
            validate_volume(&volume.spec).map_err(|errs| semantic(errs, &label))?;
            Ok(Object::Volume(Box::new(volume)))
        }
        ("v1", "Secret") => {
            let secret: Secret = decode(&value, Err(&String::new()), &label).or_else(|_| {
                // Secrets are not ours to be strict about; only their shape matters.
                serde_json::from_value(value.clone()).map_err(|e| (label.clone(), None, e.to_string()))
            })?;
            Ok(Object::Secret(Box::new(secret)))
        }
        (_, "HaGroup" | "ReplicatedVolume") => {
            Err((label, Some("apiVersion".into()), format!("{api_version:?} is not served; use {expected_group}")))
        }
        _ => Err((
            label,
            Some("kind".into()),
            format!("{api_version} {kind} is not a hapair object (expected HaGroup, ReplicatedVolume or v1 Secret)"),
        )),
    }
}

fn semantic(errs: crate::validation::ValidationErrors, label: &Option<String>) -> ObjectError {
    let field = errs.first().map(|e| e.path.clone());
    let message = match errs.0.as_slice() {
        [one] => one.message.clone(),
        many => {
            let mut text = many.first().map(|e| e.message.clone()).unwrap_or_default();
            for e in &many[1..] {
                text.push_str(&format!("; {e}"));
            }
            text
        }
    };
    (label.clone(), field, message)
}

fn decode<T: DeserializeOwned>(
    value: &serde_json::Value,
    schema: Result<&jsonschema::Validator, &String>,
    label: &Option<String>,
) -> Result<T, ObjectError> {
    match schema {
        Ok(validator) => {
            if let Some(err) = validator.iter_errors(value).next() {
                let field = pointer_to_path(err.instance_path().as_str());
                // Scalars are short and name the culprit; whole objects would drown the message.
                let message = if err.instance().is_object() || err.instance().is_array() {
                    err.masked().to_string()
                } else {
                    err.to_string()
                };
                return Err((label.clone(), Some(field).filter(|f| !f.is_empty()), message));
            }
        }
        Err(e) if !e.is_empty() => {
            return Err((label.clone(), None, format!("internal error: CRD schema unusable: {e}")));
        }
        Err(_) => {}
    }
    let mut unknown = Vec::new();
    let mut record_unknown = |path: serde_ignored::Path<'_>| {
        let path = path.to_string();
        // kube's generated types check the type meta themselves and do not keep it.
        if path != "apiVersion" && path != "kind" {
            unknown.push(path);
        }
    };
    let deserializer = serde_ignored::Deserializer::new(value, &mut record_unknown);
    let decoded: Result<T, _> = serde_path_to_error::deserialize(deserializer);
    match decoded {
        Err(e) => {
            let field = e.path().to_string();
            Err((label.clone(), Some(field).filter(|f| f != "."), e.into_inner().to_string()))
        }
        Ok(_) if !unknown.is_empty() => {
            let field = unknown.remove(0);
            Err((label.clone(), Some(field), "unknown field (check the spelling against the CRD reference)".into()))
        }
        Ok(object) => Ok(object),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_becomes_manifest_path() {
        assert_eq!(pointer_to_path("/spec/nodes/0/name"), "spec.nodes[0].name");
        assert_eq!(pointer_to_path(""), "");
        assert_eq!(pointer_to_path("/metadata/annotations/a~1b"), "metadata.annotations.a/b");
    }

    #[test]
    fn reports_each_bad_document_and_keeps_good_ones() {
        let text = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
---
apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: ok}
spec:
  nodes:
  - {name: a, heartbeatAddresses: [198.18.1.1]}
  - {name: b, heartbeatAddresses: [198.18.1.2]}
"#;
        let (docs, errors) = parse_documents("test.yaml", text);
        assert_eq!(docs.len(), 1, "{errors:#?}");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].index, 1);
        assert_eq!(errors[0].field.as_deref(), Some("kind"));
        assert_eq!(docs[0].index, 2);
        assert_eq!(docs[0].object.namespace(), DEFAULT_NAMESPACE);
    }
}
