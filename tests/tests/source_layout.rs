//! The layout rules the source keeps: the operator's root holds only `lib.rs`, `main.rs`
//! and folders; every folder says what it holds; no source file outside tests passes 1,000
//! lines; and the modules that sit side by side in a folder import one another one way only,
//! so each folder reads as a pipeline and not as a knot.
//!
//! The import graph is read from the source text: every `crate::…` and `super::…` path
//! (including the names inside a `use …::{…}` group) outside `#[cfg(test)]` modules is an
//! edge from the file's module to the deepest module the path names. An edge between two
//! modules of the same folder counts at that folder's level; a cycle there fails the test
//! and prints the modules it runs through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: [&str; 4] = ["crds", "operator", "node-agent", "tests"];
const MAX_LINES: usize = 1_000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

type Module = Vec<String>;

/// The module path of a source file, or `None` for binaries and test modules.
fn module_of(src: &Path, file: &Path) -> Option<Module> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.first().is_some_and(|p| p == "bin") || parts.last().is_some_and(|p| p == "tests") {
        return None;
    }
    if parts.last().is_some_and(|p| p == "mod") || parts == ["lib"] || parts == ["main"] {
        parts.pop();
    }
    Some(parts)
}

/// The text without comments and without `#[cfg(test)]` items.
fn production_text(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            // Skip the next item: up to its closing brace, or its `;`.
            let mut depth = 0i64;
            for item in lines.by_ref() {
                depth += item.matches('{').count() as i64 - item.matches('}').count() as i64;
                if depth <= 0 && (item.contains('}') || item.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        let code = line.split("//").next().unwrap_or("");
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn ident_at(text: &str, at: usize) -> &str {
    let rest = &text[at..];
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
    &rest[..end]
}

/// The path segments that follow `at` (`a::b::c`), and the names of a `{…}` group there.
fn path_at(text: &str, mut at: usize) -> (Vec<String>, Vec<String>) {
    let mut segments = Vec::new();
    loop {
        let name = ident_at(text, at);
        if name.is_empty() {
            break;
        }
        segments.push(name.to_string());
        at += name.len();
        if !text[at..].starts_with("::") {
            return (segments, vec![]);
        }
        at += 2;
    }
    let mut group = Vec::new();
    if text[at..].starts_with('{') {
        let close = text[at..].find('}').map_or(text.len(), |c| at + c);
        for item in text[at + 1..close].split(',') {
            let first = item.trim().split("::").next().unwrap_or("").trim();
            let first = first.split_whitespace().next().unwrap_or("");
            if !first.is_empty() && first != "self" {
                group.push(first.to_string());
            }
        }
    }
    (segments, group)
}

fn is_boundary(text: &str, at: usize) -> bool {
    at == 0 || !text[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
}

/// Every module path `text` (the source of `module`) names.
fn referenced_paths(module: &Module, text: &str) -> Vec<Module> {
    let mut paths = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        if !is_boundary(text, at) {
            continue;
        }
        let (segments, group) = path_at(text, at + "crate::".len());
        paths.push(segments.clone());
        paths.extend(group.into_iter().map(|g| [segments.clone(), vec![g]].concat()));
    }
    for (at, _) in text.match_indices("super::") {
        if !is_boundary(text, at) {
            continue;
        }
        let mut up = 0;
        let mut next = at;
        while text[next..].starts_with("super::") {
            up += 1;
            next += "super::".len();
        }
        let Some(base) = module.len().checked_sub(up) else { continue };
        let base: Module = module[..base].to_vec();
        let (segments, group) = path_at(text, next);
        let full = [base, segments].concat();
        paths.push(full.clone());
        paths.extend(group.into_iter().map(|g| [full.clone(), vec![g]].concat()));
    }
    paths
}

struct Crate {
    /// Sibling edges per folder: folder → (module → modules it imports).
    edges: BTreeMap<Module, BTreeMap<String, BTreeSet<String>>>,
}

fn read_crate(name: &str) -> Crate {
    let src = repo().join(name).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<Module, PathBuf> =
        files.iter().filter_map(|f| Some((module_of(&src, f)?, f.clone()))).collect();
    let mut edges: BTreeMap<Module, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = production_text(&std::fs::read_to_string(file).unwrap());
        for path in referenced_paths(module, &text) {
            let Some(target) = (1..=path.len()).rev().map(|k| path[..k].to_vec()).find(|p| modules.contains_key(p))
            else {
                continue;
            };
            let common = module.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if common >= module.len() || common >= target.len() {
                continue; // the same module, an ancestor or a descendant
            }
            let folder = module[..common].to_vec();
            edges.entry(folder).or_default().entry(module[common].clone()).or_default().insert(target[common].clone());
        }
    }
    Crate { edges }
}

/// A cycle through `graph`, as the modules it visits, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|start| visit(start, graph, &mut done, &mut Vec::new()))
}

#[test]
fn sibling_modules_import_one_another_one_way_only() {
    let mut cycles = Vec::new();
    for name in CRATES {
        let krate = read_crate(name);
        for (folder, graph) in &krate.edges {
            if let Some(cycle) = find_cycle(graph) {
                let folder = if folder.is_empty() { "src".to_string() } else { folder.join("/") };
                cycles.push(format!("{name}: {folder}: {}", cycle.join(" → ")));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_cycle_and_accepts_a_chain() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
        }
        g
    };
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".to_string(), "b".into(), "c".into(), "a".into()])
    );
    // Paths are read from `use` groups and `super::` chains, not from tests.
    let module: Module = vec!["runtime".into(), "group".into()];
    let text = production_text(
        "use super::inbox::Input;\nuse crate::engine::{Command, self};\n#[cfg(test)]\nmod tests {\n    use super::super::steps;\n}\n",
    );
    let paths = referenced_paths(&module, &text);
    assert!(paths.contains(&vec!["runtime".into(), "inbox".into(), "Input".into()]), "{paths:?}");
    assert!(paths.contains(&vec!["engine".into(), "Command".into()]), "{paths:?}");
    assert!(!paths.iter().any(|p| p.contains(&"steps".to_string())), "{paths:?}");
}

#[test]
fn no_source_file_outside_tests_passes_a_thousand_lines() {
    let mut long = Vec::new();
    for name in CRATES {
        let src = repo().join(name).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let rel = file.strip_prefix(repo()).unwrap().display().to_string();
            // Test modules and the test crate's simulator are tests.
            if file.file_name().is_some_and(|f| f == "tests.rs") || name == "tests" {
                continue;
            }
            let lines = std::fs::read_to_string(&file).unwrap().lines().count();
            if lines > MAX_LINES {
                long.push(format!("{rel}: {lines} lines"));
            }
        }
    }
    assert!(long.is_empty(), "files over {MAX_LINES} lines:\n{}", long.join("\n"));
}

#[test]
fn the_operator_root_holds_only_its_entry_points_and_folders() {
    let src = repo().join("operator/src");
    let mut stray: Vec<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|f| f == "lib.rs" || f == "main.rs"))
        .map(|p| p.display().to_string())
        .collect();
    stray.sort();
    assert!(stray.is_empty(), "files at the operator's root: {stray:?}");
}

#[test]
fn every_folder_says_what_it_holds() {
    let mut silent = Vec::new();
    for name in CRATES {
        let src = repo().join(name).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files.iter().filter(|f| f.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs")) {
            let text = std::fs::read_to_string(file).unwrap();
            if !text.trim_start().starts_with("//!") {
                silent.push(file.strip_prefix(repo()).unwrap().display().to_string());
            }
        }
    }
    assert!(silent.is_empty(), "folders without a doc comment: {silent:?}");
}
