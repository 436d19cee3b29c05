//! Dependencies point down (DESIGN.md, "Code shape"): every `crate::` path in the library's
//! non-test code names a module of a lower layer than its own, or its own module. Reads the
//! sources, so a new upward `use` fails here with the file, the line and both layers.

use std::path::{Path, PathBuf};

/// The layers, bottom first. Modules of one layer do not use each other, except at the top.
const LAYERS: &[(&str, &[&str])] = &[
    ("bottom", &["types", "pb", "tls", "auth"]),
    ("config", &["config", "introspect", "accept"]),
    ("store", &["store"]),
    ("hub", &["hub"]),
    ("views", &["views"]),
    ("readiness", &["readiness"]),
    ("writer", &["writer"]),
    ("moving data", &["feed", "origin"]),
    ("serving", &["serve"]),
    ("wiring", &["sidecar", "demo", "cli", "bench"]),
];

/// Items of `lib.rs` itself (helpers and re-exports) and the module each comes from.
const ROOT_ITEMS: &[(&str, &str)] = &[
    ("signalled", "types"),
    ("shutdown_signal", "types"),
    ("ConfigError", "config"),
    ("OriginConfig", "config"),
    ("SidecarConfig", "config"),
    ("FeedStats", "feed"),
    ("OpenError", "origin"),
    ("Origin", "origin"),
    ("Put", "origin"),
    ("StoreError", "origin"),
    ("Readiness", "readiness"),
    ("ws", "serve"),
    ("Sidecar", "sidecar"),
    ("StartError", "sidecar"),
    ("check_config", "sidecar"),
    ("Standalone", "writer"),
    ("internals", "bench"),
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/store/view_cache.rs` -> `store`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// Every `crate::NAME` in `code` with its line number.
fn crate_refs(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((n + 1, name));
            }
            rest = after;
        }
    }
    out
}

#[test]
fn no_module_uses_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut upward = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let own = layer(&module)
            .unwrap_or_else(|| panic!("{}: module '{module}' is in no layer", file.display()));
        let text = std::fs::read_to_string(file).expect("read source");
        // Unit tests may build whatever they need; only the library's own code is checked.
        let code = text.split("\n#[cfg(test)]\nmod tests").next().unwrap_or("");
        for (line, name) in crate_refs(code) {
            checked += 1;
            let target = ROOT_ITEMS
                .iter()
                .find(|(item, _)| *item == name)
                .map_or(name.as_str(), |(_, m)| m);
            if target == module {
                continue;
            }
            let Some(to) = layer(target) else {
                upward.push(format!(
                    "{}:{line}: crate::{name} is in no layer (add it to LAYERS or ROOT_ITEMS)",
                    file.display()
                ));
                continue;
            };
            let top = own == LAYERS.len() - 1;
            if to > own || (to == own && !top) {
                upward.push(format!(
                    "{}:{line}: {module} ({}) uses crate::{name} ({})",
                    file.display(),
                    LAYERS[own].0,
                    LAYERS[to].0
                ));
            }
        }
    }
    assert!(checked > 100, "only {checked} crate:: paths found");
    assert!(
        upward.is_empty(),
        "modules that use a layer above (or beside) their own:\n{}",
        upward.join("\n")
    );
}
