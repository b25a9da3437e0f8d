//! The shipped examples are valid, and every invalid fixture is refused with its message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hapair_crds::manifest::{Object, parse_documents};
use hapair_crds::validation::{validate_references, validate_volume_group};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn examples_parse_validate_and_resolve() {
    let files = yaml_files(&repo_path("examples"));
    assert!(files.len() >= 2, "expected the PostgreSQL and minimal examples, found {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let (docs, errors) = parse_documents(&file.display().to_string(), &text);
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
        assert!(!docs.is_empty(), "{} holds no objects", file.display());
        let mut volumes = BTreeMap::new();
        let mut groups = BTreeMap::new();
        for doc in &docs {
            match &doc.object {
                Object::Volume(v) => {
                    volumes.insert(doc.object.name().to_string(), v.spec.clone());
                }
                Object::Group(g) => {
                    groups.insert(doc.object.name().to_string(), g.spec.clone());
                }
                Object::Secret(_) => {}
            }
        }
        for (name, group) in &groups {
            if let Err(e) = validate_references(name, group, &volumes) {
                panic!("{}: group {name}: {e}", file.display());
            }
        }
        for (name, volume) in &volumes {
            if let Err(e) = validate_volume_group(volume, groups.get(&volume.group)) {
                panic!("{}: volume {name}: {e}", file.display());
            }
        }
    }
}

/// Independent of the loader: the committed CRD YAML (what `kubectl apply` installs) accepts
/// every example object.
#[test]
fn committed_crd_schemas_accept_examples() {
    let mut validators = BTreeMap::new();
    for file in yaml_files(&repo_path("charts/hapair/crds")) {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let crd: serde_json::Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default().to_string();
        let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
        let validator = jsonschema::validator_for(&hapair_crds::crd::to_json_schema(schema))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        validators.insert(kind, validator);
    }
    assert_eq!(validators.len(), 2);
    let mut checked = 0;
    for file in yaml_files(&repo_path("examples")) {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let kind = value["kind"].as_str().unwrap_or_default();
            if let Some(validator) = validators.get(kind) {
                let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{} {kind}: {errors:?}", file.display());
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "only {checked} objects checked");
}

#[test]
fn invalid_fixtures_fail_with_expected_messages() {
    let files = yaml_files(&repo_path("tests/fixtures/invalid"));
    assert!(files.len() >= 15, "need at least 15 invalid fixtures, found {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let header = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")).map(str::to_string))
                .unwrap_or_else(|| panic!("{} lacks a `# {key}:` line", file.display()))
        };
        let (field, message) = (header("expect-field"), header("expect-message"));
        let (docs, errors) = parse_documents(&file.display().to_string(), &text);
        match errors.as_slice() {
            [error] if docs.is_empty() => {
                let ok = error.field.as_deref() == Some(field.as_str()) && error.message.contains(&message);
                let rendered = error.to_string();
                if !ok || !rendered.contains(&field) {
                    failures.push(format!(
                        "{}: expected {field}: …{message}…, got field {:?}: {}",
                        file.display(),
                        error.field,
                        error.message
                    ));
                }
            }
            _ => failures
                .push(format!("{}: expected one error and no object, got {docs:?} / {errors:?}", file.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
