//! The engine's modules depend on each other in one direction only. Each top-level module of
//! `crates/engine/src` may name (through `crate::`) the modules of the layers before its own,
//! never one of its own layer or after it:
//!
//! 1. `options`, `compress`, `inflight`, `lock`: options, inflation, I9's guards, the async
//!    mutex of shared state;
//! 2. `error`: the one error type (it names the options of `create`);
//! 3. `files`, `aligned`: the files under an image, aligned I/O;
//! 4. `meta`: the metadata state, its loaders, cache and store (write-back);
//! 5. `map`, `tracking`: the mapping layer; the upkeep of the persistent dirty bitmaps;
//! 6. `check`: the consistency check and repair;
//! 7. `image`: the facade type, opening, the `Disk` of a chain;
//! 8. `request`: the request paths behind the facade;
//! 9. `create`, `amend`, `snapshot`: creating images (it opens backing files to probe them),
//!    changing their options, internal snapshots;
//! 10. `bitmap_edit`: changing the persistent bitmaps (it uses amend's header layout);
//! 11. `bitmap_resize`: the bitmaps of a resize (stored by `bitmap_edit`'s writer).
//!
//! A name the crate root re-exports (`crate::Error`) counts as the module it comes from. The
//! rule is read off the sources, so a new dependency that breaks it fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: &[&[&str]] = &[
    &["options", "compress", "inflight", "lock"],
    &["error"],
    &["files", "aligned"],
    &["meta"],
    &["map", "tracking"],
    &["check"],
    &["image"],
    &["request"],
    &["create", "amend", "snapshot"],
    &["bitmap_edit", "rebase", "commit"],
    &["bitmap_resize"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer: add it to LAYERS"))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`None` for the crate root).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib") => None,
        Some(m) => Some(m.to_string()),
        None => Some(first),
    }
}

/// The crate root's re-exports: name -> the module it comes from.
fn reexports() -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut out = BTreeMap::new();
    for stmt in lib.split(';') {
        let stmt = stmt.trim();
        let Some(rest) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let module = rest.split("::").next().unwrap().to_string();
        let names = match (rest.find('{'), rest.rfind('}')) {
            (Some(a), Some(b)) => rest[a + 1..b].to_string(),
            _ => rest.rsplit("::").next().unwrap().to_string(),
        };
        for n in names.split(',') {
            let n = n.trim();
            if !n.is_empty() {
                out.insert(n.to_string(), module.clone());
            }
        }
    }
    out
}

/// The first path segments named after `crate::` in `code` (`crate::a::b` gives `a`,
/// `crate::{a, b::c}` gives `a` and `b`).
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(inner) = rest.strip_prefix('{') {
            let end = inner.find('}').unwrap_or(inner.len());
            for item in inner[..end].split(',') {
                let seg = item.trim().split("::").next().unwrap_or("").trim();
                if !seg.is_empty() {
                    out.push(seg.to_string());
                }
            }
        } else {
            let seg: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(seg);
        }
    }
    out
}

#[test]
fn modules_depend_only_on_earlier_layers() {
    let reexports = reexports();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut violations = BTreeSet::new();
    for f in &files {
        let Some(module) = module_of(f) else {
            continue;
        };
        let own = layer(&module);
        let text = std::fs::read_to_string(f).unwrap();
        for line in text.lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for seg in crate_refs(code) {
                let target = reexports.get(&seg).cloned().unwrap_or(seg);
                if target == module {
                    continue;
                }
                if layer(&target) >= own {
                    violations.insert(format!(
                        "{module} (layer {}) uses {target} (layer {}) in {}: {}",
                        own + 1,
                        layer(&target) + 1,
                        f.strip_prefix(src()).unwrap().display(),
                        code.trim()
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "dependencies against the layers:\n{}",
        violations.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn every_module_is_in_a_layer() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(!declared.is_empty());
    for m in declared {
        layer(m);
    }
}
