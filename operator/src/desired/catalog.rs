//! A directory of manifests, loaded and checked as one consistent set.
//!
//! Standalone mode keeps its desired state in files; this is where those files become
//! objects. Each object is checked on its own (schema, strict decoding, semantic rules) and
//! then against the others (a volume's group exists, nodes match, references resolve). An
//! object that fails is left out and reported with file, object and field; the rest load.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hapair_crds::manifest::{Document, MAX_MANIFEST_BYTES, ManifestError, Object, parse_documents};
use hapair_crds::nodeapi::GroupKey;
use hapair_crds::regular_file::read_text;
use hapair_crds::validation::{FieldError, ValidationErrors, validate_references, validate_volume_group};
use hapair_crds::{HaGroup, ReplicatedVolume};
use k8s_openapi::api::core::v1::Secret;

/// Where an object was read from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub file: String,
    pub index: usize,
}

/// The valid objects of a manifest directory, and the reasons the others were refused.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub groups: BTreeMap<GroupKey, (HaGroup, Origin)>,
    /// Keyed by namespace and name, like groups.
    pub volumes: BTreeMap<GroupKey, (ReplicatedVolume, Origin)>,
    pub secrets: BTreeMap<GroupKey, Secret>,
    /// Referenced Secrets the source could not read (Kubernetes RBAC), and why: their
    /// groups are refused naming the Secret, rather than told it does not exist.
    pub unreadable_secrets: BTreeMap<GroupKey, String>,
    pub errors: Vec<ManifestError>,
    /// `metadata.generation` of every HaGroup seen, valid or refused, when the source
    /// assigns one: the status reports it as `observedGeneration` even for a refused edit.
    pub generations: BTreeMap<GroupKey, i64>,
    /// The same for every ReplicatedVolume seen.
    pub volume_generations: BTreeMap<GroupKey, i64>,
}

/// Why a directory could not be read at all (as opposed to a bad manifest in it).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading manifest directory {path}: {source}")]
    ReadDir { path: PathBuf, source: std::io::Error },
}

/// The file each object was last loaded from. When two files define the same object, the
/// one that already held it keeps it: a copy dropped into the directory must never take
/// over (or, once refused, delete) a running group.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Incumbents {
    #[serde(default)]
    pub groups: BTreeMap<GroupKey, String>,
    #[serde(default)]
    pub volumes: BTreeMap<GroupKey, String>,
}

impl Incumbents {
    /// The incumbents after loading `catalog`: the files its objects came from, plus the
    /// remembered file of any object missing because its file has a refused document (it
    /// is still that file's once the typo is fixed).
    pub fn after(&self, catalog: &Catalog) -> Incumbents {
        let next = |known: &BTreeMap<GroupKey, String>, live: BTreeMap<GroupKey, String>| {
            let mut next: BTreeMap<GroupKey, String> = known
                .iter()
                .filter(|(key, file)| !live.contains_key(*key) && refusal_in_file(&catalog.errors, file).is_some())
                .map(|(key, file)| (key.clone(), file.clone()))
                .collect();
            next.extend(live);
            next
        };
        let files = |(key, origin): (&GroupKey, &Origin)| (key.clone(), origin.file.clone());
        Incumbents {
            groups: next(&self.groups, catalog.groups.iter().map(|(k, (_, o))| files((k, o))).collect()),
            volumes: next(&self.volumes, catalog.volumes.iter().map(|(k, (_, o))| files((k, o))).collect()),
        }
    }
}

impl Catalog {
    /// Loads every `*.yaml` / `*.yml` file of `dir` (not recursive; hidden files skipped).
    ///
    /// Files are taken oldest first, so that without an incumbent the older of two
    /// duplicates wins and the newer file is the one reported. Anything that is not a
    /// regular file of at most [`MAX_MANIFEST_BYTES`] is refused as an error in that file,
    /// without blocking.
    pub fn load_dir(dir: &Path, incumbents: &Incumbents) -> Result<Catalog, CatalogError> {
        let mut files: Vec<(Option<std::time::SystemTime>, PathBuf)> = manifest_files(dir)
            .map_err(|source| CatalogError::ReadDir { path: dir.to_path_buf(), source })?
            .into_iter()
            .map(|p| (std::fs::metadata(&p).and_then(|m| m.modified()).ok(), p))
            .collect();
        files.sort();
        let mut sources = Vec::with_capacity(files.len());
        let mut errors = Vec::new();
        for (_, file) in files {
            match read_text(&file, MAX_MANIFEST_BYTES) {
                Ok(text) => sources.push((file.display().to_string(), text)),
                Err(e) => errors.push(ManifestError {
                    file: file.display().to_string(),
                    index: 0,
                    object: None,
                    field: None,
                    message: e.to_string(),
                }),
            }
        }
        let catalog =
            Catalog::from_sources_with(sources.iter().map(|(f, t)| (f.as_str(), t.as_str())), incumbents, errors);
        Ok(catalog)
    }

    /// Builds a catalog from in-memory sources `(name, yaml text)`; the first of two
    /// duplicates wins.
    pub fn from_sources<'a>(sources: impl IntoIterator<Item = (&'a str, &'a str)>) -> Catalog {
        Catalog::from_sources_with(sources, &Incumbents::default(), Vec::new())
    }

    /// Builds a catalog from sources in order of age, `errors` being those already found
    /// while reading them. Of two duplicates, the one in the incumbent's file wins, else
    /// the first. While the incumbent's file has a refused document, a duplicate elsewhere
    /// is refused too: a typo must not hand a group to a stray copy.
    fn from_sources_with<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
        incumbents: &Incumbents,
        errors: Vec<ManifestError>,
    ) -> Catalog {
        let mut catalog = Catalog { errors, ..Catalog::default() };
        let mut documents: Vec<Document> = Vec::new();
        for (name, text) in sources {
            let (docs, mut errors) = parse_documents(name, text);
            documents.extend(docs);
            catalog.errors.append(&mut errors);
        }
        let incumbent_file = |doc: &Document, key: &GroupKey| match &doc.object {
            Object::Group(_) => incumbents.groups.get(key),
            Object::Volume(_) => incumbents.volumes.get(key),
            Object::Secret(_) => None,
        };
        // Incumbents first, each kind keeping the order of age among the rest.
        documents.sort_by_key(|doc| {
            let key = GroupKey::new(doc.object.namespace(), doc.object.name());
            incumbent_file(doc, &key) != Some(&doc.source)
        });
        let mut refused = Vec::new();
        for doc in documents {
            let key = GroupKey::new(doc.object.namespace(), doc.object.name());
            let origin = Origin { file: doc.source.clone(), index: doc.index };
            let kind = doc.object.kind();
            let refuse = |message: String| ManifestError {
                file: doc.source.clone(),
                index: doc.index,
                object: Some(format!("{kind} {key}")),
                field: Some("metadata.name".into()),
                message,
            };
            let duplicate =
                |previous: &Origin| refuse(format!("also defined in {} (document {})", previous.file, previous.index));
            if let Some(home) = incumbent_file(&doc, &key).filter(|home| **home != doc.source)
                && refusal_in_file(&catalog.errors, home).is_some()
            {
                {
                    refused.push(refuse(format!(
                        "also defined in {home}, which holds it and has a refused document; fix that file first"
                    )));
                    continue;
                }
            }
            match doc.object {
                Object::Group(group) => match catalog.groups.get(&key) {
                    Some((_, previous)) => refused.push(duplicate(previous)),
                    None => {
                        catalog.groups.insert(key, (*group, origin));
                    }
                },
                Object::Volume(volume) => match catalog.volumes.get(&key) {
                    Some((_, previous)) => refused.push(duplicate(previous)),
                    None => {
                        catalog.volumes.insert(key, (*volume, origin));
                    }
                },
                Object::Secret(secret) => {
                    catalog.secrets.insert(key, *secret);
                }
            }
        }
        catalog.errors.append(&mut refused);
        catalog.check_cross_references();
        catalog
    }

    /// Builds a catalog from objects that already passed the API server's schema check (the
    /// Kubernetes operator's caches): each is validated semantically, then against the
    /// others, exactly as manifests from files are. Errors name the object and field; there
    /// is no file.
    pub fn from_objects(
        groups: impl IntoIterator<Item = HaGroup>,
        volumes: impl IntoIterator<Item = ReplicatedVolume>,
        secrets: impl IntoIterator<Item = Secret>,
    ) -> Catalog {
        let mut catalog = Catalog::default();
        let origin = Origin { file: String::new(), index: 0 };
        let key_of = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            GroupKey::new(
                meta.namespace.as_deref().unwrap_or(hapair_crds::manifest::DEFAULT_NAMESPACE),
                meta.name.as_deref().unwrap_or(""),
            )
        };
        for group in groups {
            let key = key_of(&group.metadata);
            if let Some(generation) = group.metadata.generation {
                catalog.generations.insert(key.clone(), generation);
            }
            match hapair_crds::validation::validate_group(&group.spec) {
                Ok(()) => {
                    catalog.groups.insert(key, (group, origin.clone()));
                }
                Err(errors) => catalog.errors.push(error_for(&origin, "HaGroup", &key, errors)),
            }
        }
        for volume in volumes {
            let key = key_of(&volume.metadata);
            if let Some(generation) = volume.metadata.generation {
                catalog.volume_generations.insert(key.clone(), generation);
            }
            match hapair_crds::validation::validate_volume(&volume.spec) {
                Ok(()) => {
                    catalog.volumes.insert(key, (volume, origin.clone()));
                }
                Err(errors) => catalog.errors.push(error_for(&origin, "ReplicatedVolume", &key, errors)),
            }
        }
        for secret in secrets {
            catalog.secrets.insert(key_of(&secret.metadata), secret);
        }
        catalog.check_cross_references();
        catalog
    }

    /// Drops objects whose references do not resolve, recording why. An object that refers
    /// to one refused on its own is told so, rather than that it does not exist.
    fn check_cross_references(&mut self) {
        let refused_groups_before = self.refused("HaGroup");
        let mut refused_volumes = Vec::new();
        for (key, (volume, origin)) in &self.volumes {
            let group_key = GroupKey::new(&key.namespace, &volume.spec.group);
            let group = self.groups.get(&group_key).map(|(g, _)| &g.spec);
            let result = if group.is_none() && refused_groups_before.contains(&group_key) {
                Err(ValidationErrors(vec![FieldError {
                    path: "spec.group".into(),
                    message: format!(
                        "HaGroup {:?} is refused (see its status); the volume is checked against it once it is valid",
                        volume.spec.group
                    ),
                }]))
            } else {
                validate_volume_group(&volume.spec, group)
            };
            if let Err(errors) = result {
                self.errors.push(error_for(origin, "ReplicatedVolume", key, errors));
                refused_volumes.push(key.clone());
            }
        }
        for key in refused_volumes {
            self.volumes.remove(&key);
        }
        let refused_volumes = self.refused("ReplicatedVolume");
        let mut refused_groups = Vec::new();
        for (key, (group, origin)) in &self.groups {
            let refused_refs: Vec<FieldError> = volume_refs(&group.spec)
                .into_iter()
                .filter(|(_, name)| refused_volumes.contains(&GroupKey::new(&key.namespace, *name)))
                .map(|(path, name)| FieldError {
                    path,
                    message: format!("ReplicatedVolume {name:?} is refused (see its status)"),
                })
                .collect();
            let result = if refused_refs.is_empty() {
                validate_references(&key.name, &group.spec, &self.volume_specs_in(&key.namespace))
            } else {
                Err(ValidationErrors(refused_refs))
            };
            if let Err(errors) = result {
                self.errors.push(error_for(origin, "HaGroup", key, errors));
                refused_groups.push(key.clone());
            }
        }
        for key in refused_groups {
            self.groups.remove(&key);
        }
    }

    /// Objects of `kind` refused so far. An object that is present is not refused, even if
    /// an error names it: that error is about a duplicate it won against.
    fn refused(&self, kind: &str) -> BTreeSet<GroupKey> {
        let present = |key: &GroupKey| match kind {
            "HaGroup" => self.groups.contains_key(key),
            "ReplicatedVolume" => self.volumes.contains_key(key),
            _ => false,
        };
        self.errors.iter().filter_map(|e| refused_object(e, kind)).filter(|key| !present(key)).collect()
    }

    /// Volume specs of one namespace, by name.
    pub fn volume_specs_in(&self, namespace: &str) -> BTreeMap<String, hapair_crds::ReplicatedVolumeSpec> {
        self.volumes
            .iter()
            .filter(|(k, _)| k.namespace == namespace)
            .map(|(k, (v, _))| (k.name.clone(), v.spec.clone()))
            .collect()
    }
}

/// The manifest files of `dir`: `*.yaml` and `*.yml`, not hidden, not recursive, in no
/// particular order.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
        })
        .collect())
}

/// The key of the object of `kind` that `error` refuses.
pub fn refused_object(error: &ManifestError, kind: &str) -> Option<GroupKey> {
    error.object.as_deref()?.strip_prefix(kind)?.strip_prefix(' ')?.parse().ok()
}

/// The first refused document of `file`, if any. Objects read from the API server have no
/// file: there an error about one object never stands for another, and only an error that
/// names no object at all (the whole snapshot unreadable) holds them.
pub fn refusal_in_file<'a>(errors: &'a [ManifestError], file: &str) -> Option<&'a ManifestError> {
    errors.iter().find(|e| e.file == file && (!file.is_empty() || e.object.is_none()))
}

/// The volumes a group refers to, with the field that names each.
fn volume_refs(spec: &hapair_crds::HaGroupSpec) -> Vec<(String, &str)> {
    let flow = spec.flow.iter().enumerate().filter_map(|(i, step)| {
        step.volume.as_ref().map(|v| (format!("spec.flow[{i}].volume.volumeRef"), v.volume_ref.as_str()))
    });
    let monitors = spec.monitors.iter().enumerate().filter_map(|(i, monitor)| {
        monitor
            .replication
            .as_ref()
            .map(|r| (format!("spec.monitors[{i}].replication.volumeRef"), r.volume_ref.as_str()))
    });
    flow.chain(monitors).collect()
}

fn error_for(
    origin: &Origin,
    kind: &str,
    key: &GroupKey,
    errors: hapair_crds::validation::ValidationErrors,
) -> ManifestError {
    ManifestError {
        file: origin.file.clone(),
        index: origin.index,
        object: Some(format!("{kind} {key}")),
        field: errors.first().map(|e| e.path.clone()),
        message: errors.0.iter().map(|e| e.message.clone()).collect::<Vec<_>>().join("; "),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const GROUP: &str = r#"
apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: g, namespace: ns}
spec:
  nodes:
    - {name: a, heartbeatAddresses: [198.18.1.1]}
    - {name: b, heartbeatAddresses: [198.18.1.2]}
  flow:
    - name: data
      volume: {volumeRef: data}
"#;

    const VOLUME: &str = r#"
apiVersion: hapair.dev/v1alpha1
kind: ReplicatedVolume
metadata: {name: data, namespace: ns}
spec:
  group: g
  size: 1Gi
  backing:
    - {node: a, path: /srv/data.img}
    - {node: b, path: /srv/data.img}
"#;

    #[test]
    fn loads_a_consistent_set() {
        let catalog = Catalog::from_sources([("g.yaml", GROUP), ("v.yaml", VOLUME)]);
        assert!(catalog.errors.is_empty(), "{:?}", catalog.errors);
        assert_eq!(catalog.groups.len(), 1);
        assert_eq!(catalog.volumes.len(), 1);
    }

    #[test]
    fn refuses_a_group_whose_volume_is_missing() {
        let catalog = Catalog::from_sources([("g.yaml", GROUP)]);
        assert!(catalog.groups.is_empty());
        let error = catalog.errors.first().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            error,
            "g.yaml (document 1), HaGroup ns/g: spec.flow[0].volume.volumeRef: no ReplicatedVolume named \"data\" in the group's namespace"
        );
    }

    #[test]
    fn refuses_a_volume_on_foreign_nodes() {
        let volume = VOLUME.replace("node: b", "node: c");
        let catalog = Catalog::from_sources([("g.yaml", GROUP), ("v.yaml", volume.as_str())]);
        let errors: Vec<String> = catalog.errors.iter().map(|e| e.to_string()).collect();
        assert!(errors[0].contains("spec.backing[1].node: \"c\" is not a node of group \"g\""), "{errors:?}");
        // Without its volume the group no longer resolves either.
        assert!(catalog.groups.is_empty());
    }

    #[test]
    fn objects_from_the_api_are_checked_like_files_and_named_without_a_file() {
        let parse = |text: &str| -> serde_json::Value { serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}")) };
        let group: HaGroup = serde_json::from_value(parse(GROUP)).unwrap_or_else(|e| panic!("{e}"));
        let mut volume: ReplicatedVolume = serde_json::from_value(parse(VOLUME)).unwrap_or_else(|e| panic!("{e}"));
        let mut with_generation = group.clone();
        with_generation.metadata.generation = Some(4);
        let catalog = Catalog::from_objects([with_generation], [volume.clone()], []);
        assert!(catalog.errors.is_empty(), "{:?}", catalog.errors);
        assert_eq!(catalog.generations.get(&GroupKey::new("ns", "g")), Some(&4));
        volume.spec.backing[1].node = "c".into();
        let catalog = Catalog::from_objects([group], [volume], []);
        let errors: Vec<String> = catalog.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                "ReplicatedVolume ns/data: spec.backing[1].node: \"c\" is not a node of group \"g\" (nodes: {\"a\", \"b\"})",
                "HaGroup ns/g: spec.flow[0].volume.volumeRef: ReplicatedVolume \"data\" is refused (see its status)",
            ]
        );
    }

    #[test]
    fn a_volume_of_a_refused_group_is_told_so_and_keeps_its_generation() {
        let parse = |text: &str| -> serde_json::Value { serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}")) };
        let mut group: HaGroup = serde_json::from_value(parse(GROUP)).unwrap_or_else(|e| panic!("{e}"));
        group.spec.nodes.pop();
        let mut volume: ReplicatedVolume = serde_json::from_value(parse(VOLUME)).unwrap_or_else(|e| panic!("{e}"));
        volume.metadata.generation = Some(3);
        let catalog = Catalog::from_objects([group], [volume], []);
        let errors: Vec<String> = catalog.errors.iter().map(|e| e.to_string()).collect();
        assert!(errors[0].starts_with("HaGroup ns/g: spec.nodes"), "{errors:?}");
        assert_eq!(
            errors[1],
            "ReplicatedVolume ns/data: spec.group: HaGroup \"g\" is refused (see its status); the volume is checked against it once it is valid"
        );
        assert_eq!(catalog.volume_generations.get(&GroupKey::new("ns", "data")), Some(&3));
        assert_eq!(refused_object(&catalog.errors[1], "ReplicatedVolume"), Some(GroupKey::new("ns", "data")));
        assert_eq!(refused_object(&catalog.errors[1], "HaGroup"), None);
    }

    #[test]
    fn refuses_duplicates_naming_both_files() {
        let catalog = Catalog::from_sources([("one.yaml", VOLUME), ("two.yaml", VOLUME), ("g.yaml", GROUP)]);
        let error = catalog.errors.first().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.starts_with(
                "two.yaml (document 1), ReplicatedVolume ns/data: metadata.name: also defined in one.yaml"
            ),
            "{error}"
        );
        assert_eq!(catalog.volumes.len(), 1);
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hapair-catalog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn age(path: &Path, seconds_ago: u64) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(seconds_ago)).unwrap();
    }

    #[test]
    fn the_older_file_wins_a_duplicate_and_the_newer_is_reported() {
        let dir = scratch_dir("older");
        std::fs::write(dir.join("g.yaml"), GROUP).unwrap();
        std::fs::write(dir.join("z-old.yaml"), VOLUME).unwrap();
        std::fs::write(dir.join("a-new.yaml"), VOLUME).unwrap();
        age(&dir.join("z-old.yaml"), 3600);
        let catalog = Catalog::load_dir(&dir, &Incumbents::default()).unwrap();
        let key = GroupKey::new("ns", "data");
        assert!(catalog.volumes[&key].1.file.ends_with("z-old.yaml"));
        assert_eq!(catalog.errors.len(), 1, "{:?}", catalog.errors);
        assert!(catalog.errors[0].file.ends_with("a-new.yaml"));
        assert!(catalog.errors[0].message.contains("z-old.yaml"), "{}", catalog.errors[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_file_that_holds_an_object_keeps_it_even_when_edited_last() {
        let key = GroupKey::new("ns", "data");
        let incumbents = Incumbents { volumes: [(key.clone(), "b.yaml".to_string())].into(), ..Incumbents::default() };
        let catalog = Catalog::from_sources_with(
            [("a.yaml", VOLUME), ("b.yaml", VOLUME), ("g.yaml", GROUP)],
            &incumbents,
            Vec::new(),
        );
        assert_eq!(catalog.volumes[&key].1.file, "b.yaml");
        assert_eq!(catalog.errors.len(), 1, "{:?}", catalog.errors);
        assert_eq!(catalog.errors[0].file, "a.yaml");
        assert_eq!(incumbents.after(&catalog).volumes, incumbents.volumes);
        assert_eq!(
            incumbents.after(&catalog).groups.get(&GroupKey::new("ns", "g")).map(String::as_str),
            Some("g.yaml")
        );
    }

    #[test]
    fn a_copy_never_takes_over_while_the_holding_file_has_a_typo() {
        let key = GroupKey::new("ns", "g");
        let incumbents =
            Incumbents { groups: [(key.clone(), "pair.yaml".to_string())].into(), ..Incumbents::default() };
        let typo = format!("{}---\n{}", GROUP.replace("kind: HaGroup", "kind: HAGroup"), VOLUME);
        let catalog =
            Catalog::from_sources_with([("pair.yaml", typo.as_str()), ("copy.yaml", GROUP)], &incumbents, Vec::new());
        assert!(catalog.groups.is_empty());
        let refused: Vec<_> = catalog.errors.iter().filter(|e| e.file == "copy.yaml").collect();
        assert_eq!(refused.len(), 1, "{:?}", catalog.errors);
        assert!(refused[0].message.contains("pair.yaml, which holds it and has a refused document"), "{}", refused[0]);
        // The group is still pair.yaml's once the typo is fixed.
        assert_eq!(incumbents.after(&catalog).groups.get(&key).map(String::as_str), Some("pair.yaml"));
    }

    #[test]
    fn a_fifo_or_a_directory_among_the_manifests_is_refused_without_blocking() {
        let dir = scratch_dir("fifo");
        std::fs::write(dir.join("g.yaml"), GROUP).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(dir.join("v.yaml")).status().unwrap().success());
        std::fs::create_dir(dir.join("d.yaml")).unwrap();
        let catalog = Catalog::load_dir(&dir, &Incumbents::default()).unwrap();
        let of = |name: &str| catalog.errors.iter().find(|e| e.file.ends_with(name)).map(|e| e.message.clone());
        assert_eq!(of("v.yaml").as_deref(), Some("is a FIFO, not a regular file"));
        assert_eq!(of("d.yaml").as_deref(), Some("is a directory, not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
