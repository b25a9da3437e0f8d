//! Accepting a desired-config bundle: the agent re-validates everything the controller sent,
//! so a bad bundle from any source (controller bug, hand-edited file) is refused whole.

use std::collections::BTreeMap;
use std::path::Path;

use hapair_crds::manifest::check_flow_depth;
use hapair_crds::nodeapi::{DesiredConfig, GroupConfig};
use hapair_crds::regular_file::read_text;
use hapair_crds::validation::{ValidationErrors, validate_group, validate_references, validate_volume};

/// Why a bundle was refused. Nothing of a refused bundle is applied.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is not valid JSON or YAML: {0}")]
    Decode(String),
    #[error("bundle is for node {found:?}, but this agent is {expected:?}")]
    WrongNode { expected: String, found: String },
    #[error("group {group}: node {node:?} is not one of the group's nodes")]
    NotAMember { group: String, node: String },
    #[error("group {group}: {errors}")]
    Invalid { group: String, errors: ValidationErrors },
    #[error("group {group}: volume {volume}: {errors}")]
    InvalidVolume { group: String, volume: String, errors: ValidationErrors },
    #[error("group {0} appears twice")]
    DuplicateGroup(String),
    #[error("wipes[{index}] (volume {volume}): {reason}")]
    InvalidWipe { index: usize, volume: String, reason: String },
}

/// Largest bundle file read. A bundle carries every group of one node, with keys and
/// flows; even hundreds of groups stay far below this.
pub const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;

/// Reads and decodes a bundle file, refusing a FIFO, a device or an oversized file
/// without blocking, since the agent reads it on the task that also runs heartbeats.
pub fn read_file(path: &Path) -> Result<DesiredConfig, String> {
    let text = read_text(path, MAX_BUNDLE_BYTES).map_err(|e| format!("{}: {e}", path.display()))?;
    decode(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Decodes a bundle from JSON or YAML text.
///
/// YAML goes through a JSON value first so enums read the same in both forms
/// (`heartbeatKey: {file: ...}`) instead of needing YAML tags.
pub fn decode(text: &str) -> Result<DesiredConfig, BundleError> {
    let value: serde_json::Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| BundleError::Decode(e.to_string()))?
    } else {
        check_flow_depth(text).map_err(BundleError::Decode)?;
        serde_yaml::from_str(text).map_err(|e| BundleError::Decode(e.to_string()))?
    };
    serde_path_to_error::deserialize(value).map_err(|e| BundleError::Decode(format!("{}: {}", e.path(), e.inner())))
}

/// Checks a bundle addressed to `node`: membership, then every group's and volume's rules.
pub fn check(bundle: &DesiredConfig, node: &str) -> Result<(), BundleError> {
    if bundle.node != node {
        return Err(BundleError::WrongNode { expected: node.to_string(), found: bundle.node.clone() });
    }
    let mut seen = std::collections::BTreeSet::new();
    for group in &bundle.groups {
        if !seen.insert(&group.key) {
            return Err(BundleError::DuplicateGroup(group.key.to_string()));
        }
        check_group(group, node)?;
    }
    let mut wipes = std::collections::BTreeSet::new();
    for (index, wipe) in bundle.wipes.iter().enumerate() {
        let invalid = |reason: String| BundleError::InvalidWipe { index, volume: wipe.volume.to_string(), reason };
        validate_volume(&wipe.spec).map_err(|errors| invalid(format!("spec: {errors}")))?;
        if wipe.uuid.trim().is_empty() {
            return Err(invalid("uuid is empty: without it the replica cannot be recognised".into()));
        }
        if !wipe.spec.backing.iter().any(|b| b.node == node) {
            return Err(invalid(format!("spec.backing has no entry for node {node:?}")));
        }
        if !wipes.insert((&wipe.volume, &wipe.uuid)) {
            return Err(invalid("listed twice".into()));
        }
    }
    Ok(())
}

fn check_group(group: &GroupConfig, node: &str) -> Result<(), BundleError> {
    let key = group.key.to_string();
    if !group.spec.nodes.iter().any(|n| n.name == node) {
        return Err(BundleError::NotAMember { group: key, node: node.to_string() });
    }
    validate_group(&group.spec).map_err(|errors| BundleError::Invalid { group: key.clone(), errors })?;
    let mut volumes = BTreeMap::new();
    for volume in &group.volumes {
        validate_volume(&volume.spec).map_err(|errors| BundleError::InvalidVolume {
            group: key.clone(),
            volume: volume.name.clone(),
            errors,
        })?;
        volumes.insert(volume.name.clone(), volume.spec.clone());
    }
    validate_references(&group.key.name, &group.spec, &volumes)
        .map_err(|errors| BundleError::Invalid { group: key, errors })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const BUNDLE: &str = r#"
node: a
revision: 3
groups:
  - key: default/web
    spec:
      nodes:
        - {name: a, heartbeatAddresses: [198.18.1.1]}
        - {name: b, heartbeatAddresses: [198.18.1.2]}
    heartbeatKey: {file: /etc/hapair/web.key}
"#;

    #[test]
    fn accepts_a_valid_bundle() {
        let bundle = decode(BUNDLE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bundle.revision, 3);
        check(&bundle, "a").unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn refuses_a_bundle_for_another_node() {
        let bundle = decode(BUNDLE).unwrap_or_else(|e| panic!("{e}"));
        let err = check(&bundle, "c").err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("bundle is for node \"a\", but this agent is \"c\""));
    }

    #[test]
    fn refuses_an_invalid_group_naming_the_field() {
        let text = BUNDLE.replace("198.18.1.2", "not-an-ip");
        let bundle = decode(&text).unwrap_or_else(|e| panic!("{e}"));
        let err = check(&bundle, "a").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("spec.nodes[1].heartbeatAddresses[0]"), "{err}");
    }

    #[test]
    fn accepts_a_volume_step_and_a_replication_monitor_naming_it() {
        let text = format!(
            "{BUNDLE}    volumes:\n      - name: pgdata\n        uuid: 0b6f5a52-9b43-4d3c-9f0e-3f1f0d6f2a11\n        spec:\n          group: web\n          size: 1Gi\n          backing:\n            - {{node: a, path: /var/lib/a.img}}\n            - {{node: b, path: /var/lib/b.img}}\n"
        )
        .replace("    spec:\n      nodes:", "    spec:\n      flow:\n        - {name: data, volume: {volumeRef: pgdata}}\n      nodes:");
        let bundle = decode(&text).unwrap_or_else(|e| panic!("{e}"));
        assert!(check(&bundle, "a").is_ok(), "{:?}", check(&bundle, "a").err());
        let with_monitor = |action: &str| {
            text.replace(
                "      flow:\n",
                &format!("      monitors:\n        - {{name: repl, replication: {{volumeRef: pgdata}}, action: {action}}}\n      flow:\n"),
            )
        };
        let bundle = decode(&with_monitor("alert")).unwrap_or_else(|e| panic!("{e}"));
        assert!(check(&bundle, "a").is_ok(), "{:?}", check(&bundle, "a").err());
        let bundle = decode(&with_monitor("failover")).unwrap_or_else(|e| panic!("{e}"));
        let err = check(&bundle, "a").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("spec.monitors[0].action"), "{err}");
    }

    const WIPE: &str = "wipes:\n  - volume: default/old\n    uuid: 0b6f5a52-9b43-4d3c-9f0e-3f1f0d6f2a11\n    spec:\n      group: web\n      size: 1Gi\n      deletionPolicy: Wipe\n      backing:\n        - {node: a, path: /var/lib/a.img}\n        - {node: b, path: /var/lib/b.img}\n";

    #[test]
    fn accepts_wipes_for_this_node_and_refuses_bad_ones_naming_the_entry() {
        let bundle = decode(&format!("{BUNDLE}{WIPE}")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bundle.wipes.len(), 1);
        assert!(check(&bundle, "a").is_ok(), "{:?}", check(&bundle, "a").err());

        let refused = |text: String| {
            let bundle = decode(&text).unwrap_or_else(|e| panic!("{e}"));
            check(&bundle, "a").err().map(|e| e.to_string()).unwrap_or_default()
        };
        let other_node = refused(format!("{BUNDLE}{}", WIPE.replace("node: a,", "node: c,")));
        assert_eq!(other_node, "wipes[0] (volume default/old): spec.backing has no entry for node \"a\"");
        let no_uuid = refused(format!("{BUNDLE}{}", WIPE.replace("0b6f5a52-9b43-4d3c-9f0e-3f1f0d6f2a11", "' '")));
        assert!(no_uuid.starts_with("wipes[0] (volume default/old): uuid is empty"), "{no_uuid}");
        let bad_path = refused(format!("{BUNDLE}{}", WIPE.replace("/var/lib/a.img", "relative.img")));
        assert!(
            bad_path.starts_with("wipes[0] (volume default/old): spec: ") && bad_path.contains("backing[0].path"),
            "{bad_path}"
        );
        let twice = refused(format!("{BUNDLE}{WIPE}{}", WIPE.trim_start_matches("wipes:\n")));
        assert_eq!(twice, "wipes[1] (volume default/old): listed twice");
    }

    #[test]
    fn refuses_garbage() {
        assert!(matches!(decode("{nope"), Err(BundleError::Decode(_))));
    }

    #[test]
    fn a_fifo_a_device_or_deep_nesting_in_place_of_the_bundle_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("hapair-bundle-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("ok.yaml");
        std::fs::write(&ok, BUNDLE).unwrap();
        assert_eq!(read_file(&ok).map(|b| b.revision), Ok(3));

        let fifo = dir.join("fifo.yaml");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert_eq!(read_file(&fifo).unwrap_err(), format!("{}: is a FIFO, not a regular file", fifo.display()));
        assert_eq!(
            read_file(Path::new("/dev/zero")).unwrap_err(),
            "/dev/zero: is a character device, not a regular file"
        );

        let deep = dir.join("deep.yaml");
        std::fs::write(&deep, format!("node: {}", "[".repeat(100_000))).unwrap();
        let err = read_file(&deep).unwrap_err();
        assert!(err.contains("more than 64 levels deep"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
