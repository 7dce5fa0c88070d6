//! The shape of the code, checked like behaviour (no root needed):
//! - zt-daemon's modules form a layered graph: at every level of the module tree, the modules
//!   beside one another depend on one another in one direction only (no import cycle, e.g. between
//!   two files of `tunnel/` or between `workload` and `proxy`). A module and its own submodules
//!   may refer to each other; that is one module.
//! - No source file holds more than `MAX_LINES` lines of non-test code.
//! - README's layout table names every zt-daemon module, and nothing that is not one.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

const MAX_LINES: usize = 600;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A module's path from the crate root, e.g. `["tunnel", "pool"]`; the root is `[]`.
type ModPath = Vec<String>;

/// The module a file of zt-daemon/src is.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModPath = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// Every `crate::`, `super::` and `self::` path a file names (in `use` items and in code),
/// outside `#[cfg(test)]` items, resolved to absolute module paths.
struct Paths<'a> {
    module: &'a [String],
    found: Vec<ModPath>,
}

impl Paths<'_> {
    fn resolve(&mut self, segments: &[String]) {
        let mut base: ModPath;
        let rest = match segments.first().map(String::as_str) {
            Some("crate") => {
                base = Vec::new();
                &segments[1..]
            }
            Some("super") => {
                base = self.module.to_vec();
                let mut rest = segments;
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop();
                    rest = &rest[1..];
                }
                rest
            }
            Some("self") => {
                base = self.module.to_vec();
                &segments[1..]
            }
            _ => return,
        };
        base.extend(rest.iter().cloned());
        self.found.push(base);
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.resolve(&prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.resolve(&prefix.clone());
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.resolve(&prefix.clone()),
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(prefix, tree);
                }
            }
        }
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string().trim() == "test")
    })
}

impl<'ast> Visit<'ast> for Paths<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segments);
        syn::visit::visit_path(self, path);
    }
}

/// The module graph of zt-daemon's library: for each module, the modules it refers to.
fn module_graph() -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let src = workspace().join("zt-daemon/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // main.rs is the binary, a crate of its own over the library; test-only modules are tests.
    let test_only = test_only_modules(&src, &files);
    files.retain(|f| {
        !f.ends_with("main.rs")
            && !f.starts_with(src.join("bin"))
            && !test_only.iter().any(|t| module_of(&src, f).starts_with(t))
    });
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut paths = Paths {
            module: &module,
            found: Vec::new(),
        };
        paths.visit_file(&ast);
        let targets: BTreeSet<ModPath> = paths
            .found
            .into_iter()
            .filter_map(|path| {
                // The longest prefix that is a module of its own file.
                (0..=path.len())
                    .rev()
                    .map(|n| path[..n].to_vec())
                    .find(|prefix| modules.contains(prefix))
            })
            .collect();
        graph.insert(module, targets);
    }
    graph
}

/// Modules declared `#[cfg(test)] mod x;`: unit tests kept in a file of their own.
fn test_only_modules(src: &Path, files: &[PathBuf]) -> Vec<ModPath> {
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        let Ok(ast) = syn::parse_file(&text) else {
            continue;
        };
        for item in ast.items {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
                && is_cfg_test(&m.attrs)
            {
                let mut path = module_of(src, file);
                path.push(m.ident.to_string());
                found.push(path);
            }
        }
    }
    found
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

#[test]
fn modules_beside_one_another_depend_on_one_another_in_one_direction_only() {
    // For each parent module, the graph of its children: a -> b when anything inside a refers to
    // anything inside b.
    let mut levels: BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut why: BTreeMap<(ModPath, String, String), (ModPath, ModPath)> = BTreeMap::new();
    for (from, targets) in module_graph() {
        for to in targets {
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // a module and its own submodules
            }
            let parent = from[..common].to_vec();
            let (a, b) = (from[common].clone(), to[common].clone());
            levels
                .entry(parent.clone())
                .or_default()
                .entry(a.clone())
                .or_default()
                .insert(b.clone());
            why.entry((parent, a, b))
                .or_insert((from.clone(), to.clone()));
        }
    }
    let mut cycles = Vec::new();
    for (parent, edges) in &levels {
        for (a, outs) in edges {
            for b in outs {
                // a -> b and b reaches a: report each pair once.
                if a < b
                    && let Some(back) = path(edges, b, a)
                {
                    let step = |x: &String, y: &String| {
                        let (f, t) = &why[&(parent.clone(), x.clone(), y.clone())];
                        format!("{} uses {}", name(f), name(t))
                    };
                    let steps: Vec<String> = std::iter::once(step(a, b))
                        .chain(back.windows(2).map(|w| step(&w[0], &w[1])))
                        .collect();
                    cycles.push(format!(
                        "in {}: {a} <-> {b}: {}",
                        name(parent),
                        steps.join("; ")
                    ));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between modules:\n{}",
        cycles.join("\n")
    );
}

/// A shortest path of modules from `from` to `to`, both included.
fn path(
    edges: &BTreeMap<String, BTreeSet<String>>,
    from: &String,
    to: &String,
) -> Option<Vec<String>> {
    let mut came_from: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from]);
    while let Some(n) = queue.pop_front() {
        if n == to {
            let mut path = vec![n.clone()];
            let mut at = n;
            while at != from {
                at = came_from[at];
                path.push(at.clone());
            }
            path.reverse();
            return Some(path);
        }
        for next in edges.get(n).into_iter().flatten() {
            if next != from && !came_from.contains_key(next) {
                came_from.insert(next, n);
                queue.push_back(next);
            }
        }
    }
    None
}

/// Lines before the file's first `#[cfg(test)]` item; a file that is all tests counts none.
fn non_test_lines(file: &Path) -> usize {
    if file.file_name().is_some_and(|n| n == "tests.rs") {
        return 0;
    }
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .count()
}

#[test]
fn no_source_file_is_over_the_line_budget() {
    let root = workspace();
    let mut files = Vec::new();
    for dir in [
        "zt-common/src",
        "zt-ebpf/src",
        "zt-daemon/src",
        "tests/src",
        "xtask/src",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut over: Vec<String> = files
        .iter()
        .map(|f| (non_test_lines(f), f))
        .filter(|(n, _)| *n > MAX_LINES)
        .map(|(n, f)| format!("{}: {n}", f.strip_prefix(&root).unwrap().display()))
        .collect();
    over.sort();
    assert!(
        over.is_empty(),
        "files over {MAX_LINES} lines of non-test code (split them by concern):\n{}",
        over.join("\n")
    );
}

#[test]
fn readme_layout_names_every_daemon_module_and_only_those() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `zt-daemon/` |"))
        .expect("README's layout table has a zt-daemon/ row");
    let named: BTreeSet<String> = row
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_owned)
        .collect();
    let modules: BTreeSet<String> = module_graph()
        .into_keys()
        .filter_map(|m| m.last().cloned())
        .collect();
    let missing: Vec<_> = modules.difference(&named).collect();
    let stale: Vec<_> = named.difference(&modules).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README's zt-daemon/ row does not match zt-daemon/src: missing {missing:?}, not modules {stale:?}"
    );
}
