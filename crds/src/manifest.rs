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
use crate::validation::{check_namespace, check_object_name, validate_group, validate_volume};
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
    if let Err(message) = check_bounds(text) {
        errors.push(ManifestError { file: source.to_string(), index: 0, object: None, field: None, message });
        return (documents, errors);
    }
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

/// Largest manifest file accepted. The biggest real manifests (a group with dozens of
/// steps, monitors and VIPs) are a few tens of KiB; a megabyte is already a mistake.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// Deepest flow nesting (`[` and `{`) accepted. Real manifests nest a handful of levels.
/// libyaml's scanner does work proportional to the open flow levels for every token, so
/// deep nesting costs quadratic time long before serde_yaml's recursion limit refuses it.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Refuses text that is too large or too deeply nested to be worth handing to the YAML
/// parser, so a hostile file costs a linear scan and no more.
pub fn check_bounds(text: &str) -> Result<(), String> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(format!("is {} bytes, more than the {MAX_MANIFEST_BYTES} bytes a manifest may have", text.len()));
    }
    check_flow_depth(text)
}

/// Refuses YAML nested deeper than [`MAX_FLOW_DEPTH`], whatever its size (agents read
/// bundles far larger than a manifest).
pub fn check_flow_depth(text: &str) -> Result<(), String> {
    match flow_depth_beyond(text, MAX_FLOW_DEPTH) {
        Some((line, column)) => {
            Err(format!("nests '[' or '{{' more than {MAX_FLOW_DEPTH} levels deep at line {line} column {column}"))
        }
        None => Ok(()),
    }
}

/// Where flow nesting first exceeds `max`, as 1-based line and column. Quoted scalars and
/// comments are skipped so brackets inside them do not count; a quote only opens a scalar
/// where YAML allows one to start, so a stray `'` inside a plain word cannot hide brackets
/// that the parser will see.
fn flow_depth_beyond(text: &str, max: usize) -> Option<(usize, usize)> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut comment = false;
    let mut previous = '\n';
    for c in text.chars() {
        column += 1;
        if c == '\n' {
            line += 1;
            column = 0;
            comment = false;
        }
        if comment {
            previous = c;
            continue;
        }
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '#' if previous.is_whitespace() => comment = true,
                '\'' | '"' if previous.is_whitespace() || "[{,:-".contains(previous) => quote = Some(c),
                '[' | '{' => {
                    depth += 1;
                    if depth > max {
                        return Some((line, column));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        previous = c;
    }
    None
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
    // The label goes into status, events and terminals, so a hostile name is shown escaped.
    let label = Some(format!("{} {}/{}", kind.escape_debug(), namespace.escape_debug(), name.escape_debug()));
    if name.is_empty() {
        return Err((label, Some("metadata.name".into()), "is required".into()));
    }
    // Checked before anything else: a name becomes a key in state, a path in the API and a
    // label on the nodes, and one that cannot be all three must never get that far.
    check_object_name(name).map_err(|why| (label.clone(), Some("metadata.name".into()), why))?;
    check_namespace(namespace).map_err(|why| (label.clone(), Some("metadata.namespace".into()), why))?;
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
            format!(
                "{} {} is not a hapair object (expected HaGroup, ReplicatedVolume or v1 Secret)",
                api_version.escape_debug(),
                kind.escape_debug()
            ),
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

    fn group_named(metadata: &str) -> String {
        format!(
            "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {metadata}\nspec:\n  nodes:\n  \
             - {{name: a, heartbeatAddresses: [198.18.1.1]}}\n  - {{name: b, heartbeatAddresses: [198.18.1.2]}}\n"
        )
    }

    #[test]
    fn names_are_refused_as_the_api_server_would_with_the_field_named() {
        let long = "a".repeat(254);
        let cases = [
            (r#"{name: "a/b"}"#.to_string(), "metadata.name", "'/'"),
            (r#"{name: "a b"}"#.to_string(), "metadata.name", "white space"),
            (r#"{name: "a\x1b[2Jb"}"#.to_string(), "metadata.name", "control character"),
            (r#"{name: "Web"}"#.to_string(), "metadata.name", "upper-case"),
            (r#"{name: "a..b"}"#.to_string(), "metadata.name", "\"..\""),
            (r#"{name: "-a"}"#.to_string(), "metadata.name", "start and end"),
            (format!("{{name: {long}}}"), "metadata.name", "254 bytes"),
            (r#"{name: ok, namespace: "a/b"}"#.to_string(), "metadata.namespace", "'/'"),
            (r#"{name: ok, namespace: "a.b"}"#.to_string(), "metadata.namespace", "'.'"),
            (r#"{name: ok, namespace: ""}"#.to_string(), "metadata.namespace", "empty"),
            (format!("{{name: ok, namespace: {}}}", "n".repeat(64)), "metadata.namespace", "64 bytes"),
        ];
        for (metadata, field, why) in cases {
            let (docs, errors) = parse_documents("names.yaml", &group_named(&metadata));
            assert!(docs.is_empty(), "{metadata} was accepted");
            assert_eq!(errors.len(), 1, "{metadata}: {errors:#?}");
            assert_eq!(errors[0].field.as_deref(), Some(field), "{metadata}");
            assert!(errors[0].message.contains(why), "{metadata}: {}", errors[0].message);
        }
    }

    #[test]
    fn a_refused_name_is_shown_escaped() {
        let (_, errors) = parse_documents("names.yaml", &group_named(r#"{name: "x\x1b]0;owned\x07"}"#));
        let shown = errors[0].to_string();
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
        assert!(shown.contains("\\u{1b}"), "{shown}");
    }

    #[test]
    fn good_names_pass() {
        for metadata in ["{name: web-1.example, namespace: prod-2}", "{name: a}", r#"{name: "0"}"#] {
            let (docs, errors) = parse_documents("names.yaml", &group_named(metadata));
            assert_eq!(docs.len(), 1, "{metadata}: {errors:#?}");
        }
    }

    #[test]
    fn deep_nesting_and_huge_files_are_refused_before_parsing() {
        let (docs, errors) = parse_documents("deep.yaml", &"[".repeat(200_000));
        assert!(docs.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("more than 64 levels deep at line 1 column 65"), "{}", errors[0]);

        let (_, errors) = parse_documents("big.yaml", &format!("# {}\n", "x".repeat(MAX_MANIFEST_BYTES)));
        assert!(errors[0].message.contains("more than the 1048576 bytes"), "{}", errors[0]);
    }

    #[test]
    fn brackets_in_quotes_and_comments_do_not_count_but_a_stray_quote_hides_none() {
        let deep = "[".repeat(100);
        assert_eq!(flow_depth_beyond(&format!("a: '{deep}'\nb: \"{deep}\\\"\"\n# {deep}\n"), 64), None);
        assert_eq!(flow_depth_beyond(&format!("a: [b'{deep}"), 64), Some((1, 70)));
        let nested = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert_eq!(flow_depth_beyond(&nested, 64), None);
        assert!(flow_depth_beyond(&format!("[{nested}]"), 64).is_some());
    }
}
