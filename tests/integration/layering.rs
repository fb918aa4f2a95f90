//! The crate's layering, checked from its source so it stays true: which top-level module may
//! import which ([`MAY_IMPORT`]), and no file-level import cycle inside any directory module.
//! Parses `src/**/*.rs` with `syn`, skips `#[cfg(test)]` items, and collects every `crate::…`,
//! `super::…` and `self::…` path: `use` trees, paths in code and types, and in macro arguments. Re-exports from a directory
//! module's root are followed to the file that defines the item, so a cycle cannot hide behind
//! a `pub use`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::ext::IdentExt;
use syn::visit::{self, Visit};
use syn::{Attribute, Ident, ImplItem, Item, ItemUse, Macro, UseTree, Visibility};

/// Each top-level module and what it may import directly, besides itself; it may also import
/// whatever those may ([`may_import`] follows the table down). `server` → `http` → `app` →
/// `export`/`auth`/`proxy` → `store`/`storage`/`fhir`/`job`/`upstream_auth`; `config` and `telemetry` are usable
/// from anywhere. `config` sits above `fhir` because validating a client's scopes needs the SMART
/// scope grammar.
const MAY_IMPORT: &[(&str, &[&str])] = &[
    ("fhir", &[]),
    ("job", &[]),
    ("config", &["fhir"]),
    ("telemetry", &["config"]),
    ("routes", &["telemetry"]),
    ("store", &["job", "telemetry"]),
    ("storage", &["job", "telemetry"]),
    ("upstream_auth", &["telemetry"]),
    ("proxy", LOWER),
    ("auth", LOWER),
    ("export", LOWER),
    ("ops", &["export"]),
    ("app", &["auth", "export", "proxy", "routes"]),
    ("http", &["app"]),
    ("server", &["http"]),
];

/// What `export`, `auth` and `proxy` build on.
const LOWER: &[&str] = &[
    "store",
    "storage",
    "fhir",
    "job",
    "telemetry",
    "upstream_auth",
];

/// What `module` may import: its entries in [`MAY_IMPORT`] and, in turn, theirs.
fn may_import(module: &str) -> Vec<&'static str> {
    let table: BTreeMap<&str, &[&'static str]> = MAY_IMPORT.iter().copied().collect();
    let mut found = BTreeSet::new();
    let mut next: Vec<&str> = table.get(module).map(|m| m.to_vec()).unwrap_or_default();
    while let Some(to) = next.pop() {
        if found.insert(to) {
            next.extend(table.get(to).copied().unwrap_or_default());
        }
    }
    found.into_iter().collect()
}

/// Test tooling on its way out of the library: checked neither as importer nor as imported,
/// whether or not the files still exist.
const NOT_LAYERED: &[&str] = &["client", "memory_fhir"];

#[test]
fn top_level_modules_import_only_what_the_table_allows() {
    let crate_ = Crate::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let table: BTreeMap<&str, &[&str]> = MAY_IMPORT.iter().copied().collect();
    let mut failures = Vec::new();
    for module in crate_.top_level_modules() {
        if !table.contains_key(module.as_str()) && !NOT_LAYERED.contains(&module.as_str()) {
            failures.push(format!(
                "top-level module `{module}` is not in MAY_IMPORT (tests/integration/layering.rs): \
                 add it with what it may import"
            ));
        }
    }
    for file in &crate_.files {
        let Some(from) = file.module.first().map(String::as_str) else {
            continue;
        };
        if NOT_LAYERED.contains(&from) {
            continue;
        }
        let allowed = may_import(from);
        for import in &file.imports {
            let Some(to) = crate_
                .absolute(file, &import.path)
                .and_then(|p| p.first().cloned())
            else {
                continue;
            };
            if to == from
                || NOT_LAYERED.contains(&to.as_str())
                || !crate_.is_module(std::slice::from_ref(&to))
            {
                continue;
            }
            if !allowed.contains(&to.as_str()) {
                failures.push(format!(
                    "{}:{}: `{}`: `{from}` may not import `{to}` (it may import: {})",
                    file.display,
                    import.line,
                    import.path.join("::"),
                    allowed.join(", ")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "imports against the layering:\n{}",
        failures.join("\n")
    );
}

#[test]
fn no_directory_module_has_a_file_level_import_cycle() {
    let crate_ = Crate::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut failures = Vec::new();
    for dir in crate_.directory_modules() {
        // Edges between the directory's child files, each with the import that makes it.
        let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for file in &crate_.files {
            let Some(from) = child_of(&dir, &file.module) else {
                continue;
            };
            for import in &file.imports {
                let Some(target) = crate_.resolve(file, &import.path) else {
                    continue;
                };
                let Some(to) = child_of(&dir, &target) else {
                    continue;
                };
                if to != from {
                    edges
                        .entry(from.clone())
                        .or_default()
                        .entry(to)
                        .or_insert_with(|| {
                            format!(
                                "{}:{}: `{}`",
                                file.display,
                                import.line,
                                import.path.join("::")
                            )
                        });
                }
            }
        }
        for cycle in cycles(&edges) {
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("  {} -> {}: {}", w[0], w[1], edges[&w[0]][&w[1]]))
                .collect();
            failures.push(format!(
                "file-level cycle in {}/: {}\n{}",
                dir.join("/"),
                cycle.join(" -> "),
                steps.join("\n")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "import cycles between files:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_table_itself_is_acyclic() {
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (from, tos) in MAY_IMPORT {
        for to in *tos {
            edges
                .entry((*from).into())
                .or_default()
                .insert((*to).into(), String::new());
        }
    }
    assert_eq!(cycles(&edges), Vec::<Vec<String>>::new());
}

#[test]
fn the_reader_sees_grouped_use_trees_and_inline_paths_but_not_comments_strings_or_tests() {
    let source = r#"
        //! Mentions crate::doc::Thing.
        use crate::{alpha::{self, A}, beta::B as Bee};
        use super::{gamma::G, *};
        /* crate::block::Comment */
        fn f() { let _ = "crate::string::Lit"; let _c = '"'; crate::delta::call(); }
        fn g<'a>(x: &'a str) { super::super::epsilon::E::new(x) }
        fn h() { tracing::info!(n = crate::zeta::count(), "{}", "crate::in_macro::Lit"); }
        macro_rules! m { () => { $crate::not_ours::X }; }
        #[cfg(test)]
        mod tests { use crate::test_only::X; }
        #[cfg(test)]
        mod other_tests;
    "#;
    let (imports, test_mods) = extract(source).unwrap();
    assert_eq!(test_mods, ["other_tests"]);
    let paths: Vec<String> = imports.into_iter().map(|i| i.path.join("::")).collect();
    assert_eq!(
        paths,
        [
            "crate::alpha",
            "crate::alpha::A",
            "crate::beta::B",
            "super::gamma::G",
            "super",
            "crate::delta::call",
            "super::super::epsilon::E::new",
            "crate::zeta::count",
        ]
    );
}

/// One path a file refers to, as written (with `use` trees expanded).
#[derive(Debug, Clone)]
struct Import {
    path: Vec<String>,
    line: usize,
    /// A `pub use`, which re-exports the item.
    reexport: Option<String>,
}

struct File {
    display: String,
    /// `["proxy", "h1"]` for `src/proxy/h1.rs`; `["proxy"]` for `src/proxy/mod.rs`.
    module: Vec<String>,
    imports: Vec<Import>,
}

struct Crate {
    files: Vec<File>,
    modules: BTreeSet<Vec<String>>,
    /// `(module, name)` → the absolute path a `pub use` in that module re-exports.
    reexports: BTreeMap<(Vec<String>, String), Vec<String>>,
}

impl Crate {
    fn read(src: &Path) -> Self {
        let mut paths = Vec::new();
        walk(src, &mut paths);
        let mut files = Vec::new();
        let mut test_only = BTreeSet::new();
        for path in paths {
            let relative = path.strip_prefix(src).unwrap();
            let mut module: Vec<String> = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module == ["main"] || module.first().is_some_and(|m| m == "bin") {
                continue; // the binary is its own crate: it has no `crate::` of the library's
            }
            if module.last().is_some_and(|m| m == "mod") || module == ["lib"] {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let (imports, test_mods) =
                extract(&text).unwrap_or_else(|e| panic!("src/{}: {e}", relative.display()));
            for name in test_mods {
                test_only.insert([module.clone(), vec![name]].concat());
            }
            files.push(File {
                display: format!("src/{}", relative.display()),
                module,
                imports,
            });
        }
        files.retain(|f| !test_only.iter().any(|t| f.module.starts_with(t)));
        assert!(
            files.len() > 20,
            "found only {} files under {}",
            files.len(),
            src.display()
        );
        let modules = files.iter().map(|f| f.module.clone()).collect();
        let mut crate_ = Self {
            files,
            modules,
            reexports: BTreeMap::new(),
        };
        let mut reexports = BTreeMap::new();
        for file in &crate_.files {
            for import in &file.imports {
                if let (Some(name), Some(target)) =
                    (&import.reexport, crate_.absolute(file, &import.path))
                {
                    reexports.insert((file.module.clone(), name.clone()), target);
                }
            }
        }
        crate_.reexports = reexports;
        crate_
    }

    fn is_module(&self, path: &[String]) -> bool {
        self.modules.contains(path)
    }

    fn top_level_modules(&self) -> BTreeSet<String> {
        self.modules
            .iter()
            .filter_map(|m| m.first().cloned())
            .collect()
    }

    /// Modules with child files (`proxy` for `src/proxy/*.rs`).
    fn directory_modules(&self) -> BTreeSet<Vec<String>> {
        self.modules
            .iter()
            .filter(|m| !m.is_empty())
            .map(|m| m[..m.len() - 1].to_vec())
            .filter(|parent| !parent.is_empty())
            .collect()
    }

    /// `path` as written in `file`, made absolute from the crate root (`None` for other crates).
    fn absolute(&self, file: &File, path: &[String]) -> Option<Vec<String>> {
        let mut base = file.module.clone();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            // `use child::Item` in a module's root file names a child module.
            Some(first) if self.is_module(&[base.clone(), vec![first.into()]].concat()) => {}
            _ => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file module `path` lands in, following re-exports to the file that defines the item.
    fn resolve(&self, file: &File, path: &[String]) -> Option<Vec<String>> {
        let mut absolute = self.absolute(file, path)?;
        for _ in 0..8 {
            let module = (0..=absolute.len())
                .rev()
                .map(|n| absolute[..n].to_vec())
                .find(|m| self.is_module(m))?;
            let Some(name) = absolute.get(module.len()) else {
                return Some(module);
            };
            match self.reexports.get(&(module.clone(), name.clone())) {
                Some(target) => {
                    absolute = [target.clone(), absolute[module.len() + 1..].to_vec()].concat()
                }
                None => return Some(module),
            }
        }
        None
    }
}

/// `dir`'s child (`"h1"` for `["proxy", "h1", ...]` in `["proxy"]`); `None` for `dir` itself or
/// anything outside it.
fn child_of(dir: &[String], module: &[String]) -> Option<String> {
    (module.len() > dir.len() && module.starts_with(dir)).then(|| module[dir.len()].clone())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// One cycle per strongly connected part of the graph (each starts and ends at the same node).
fn cycles(edges: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    let reaches = |from: &String, to: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(node) = stack.pop() {
            for next in edges.get(&node).into_iter().flat_map(|e| e.keys()) {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        false
    };
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut found = Vec::new();
    for start in edges.keys() {
        if reported.contains(start) || !reaches(start, start) {
            continue;
        }
        // Walk from `start`, always to a node that leads back, until back at `start`.
        let mut cycle = vec![start.clone()];
        let mut visited = BTreeSet::from([start.clone()]);
        let mut node = start.clone();
        loop {
            let nexts = edges[&node].keys();
            let next = nexts
                .clone()
                .find(|n| *n == start)
                .or_else(|| {
                    nexts
                        .clone()
                        .find(|n| !visited.contains(*n) && reaches(n, start))
                })
                .unwrap()
                .clone();
            cycle.push(next.clone());
            if next == *start {
                break;
            }
            visited.insert(next.clone());
            node = next;
        }
        for n in edges.keys() {
            if reaches(start, n) && reaches(n, start) {
                reported.insert(n.clone());
            }
        }
        found.push(cycle);
    }
    found
}
/// The paths `source` refers to, and the names of the child modules it declares test-only
/// (`#[cfg(test)] mod tests;`).
fn extract(source: &str) -> syn::Result<(Vec<Import>, Vec<String>)> {
    let mut reader = Reader::default();
    reader.visit_file(&syn::parse_file(source)?);
    Ok((reader.imports, reader.test_mods))
}

#[derive(Default)]
struct Reader {
    imports: Vec<Import>,
    test_mods: Vec<String>,
}

impl Reader {
    fn push(&mut self, path: Vec<String>, span: Span, reexport: Option<String>) {
        let line = span.start().line;
        self.imports.push(Import {
            path,
            line,
            reexport,
        });
    }

    /// Expands a `use` tree below `prefix`; a `pub use` (any `pub`) records what it re-exports.
    fn use_tree(&mut self, tree: &UseTree, mut prefix: Vec<String>, line: Span, public: bool) {
        let alias = match tree {
            UseTree::Path(p) => {
                prefix.push(p.ident.unraw().to_string());
                return self.use_tree(&p.tree, prefix, line, public);
            }
            UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(tree, prefix.clone(), line, public);
                }
                return;
            }
            UseTree::Name(n) if n.ident == "self" && !prefix.is_empty() => None,
            UseTree::Rename(r) if r.ident == "self" && !prefix.is_empty() => Some(&r.rename),
            UseTree::Name(n) => {
                prefix.push(n.ident.unraw().to_string());
                None
            }
            UseTree::Rename(r) => {
                prefix.push(r.ident.unraw().to_string());
                Some(&r.rename)
            }
            UseTree::Glob(_) => None,
        };
        let name = alias.map(|a| a.unraw().to_string());
        let reexport = public
            .then(|| name.or_else(|| prefix.last().cloned()))
            .flatten();
        self.push(prefix, line, reexport);
    }

    /// `crate :: a :: b` (not `$crate`) in a macro's tokens, which syn leaves unparsed.
    fn scan(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let ident = |i: usize| match trees.get(i) {
            Some(TokenTree::Ident(id)) => Some(id),
            _ => None,
        };
        let punct = |i: usize, c: char| matches!(trees.get(i), Some(TokenTree::Punct(p)) if p.as_char() == c);
        let colons = |i: usize| punct(i, ':') && punct(i + 1, ':');
        for (i, tree) in trees.iter().enumerate() {
            match tree {
                TokenTree::Group(g) => self.scan(g.stream()),
                TokenTree::Ident(id)
                    if ["crate", "super", "self"].iter().any(|k| id == k)
                        && colons(i + 1)
                        && !(i > 0 && (punct(i - 1, '$') || punct(i - 1, ':'))) =>
                {
                    let mut path = vec![id.to_string()];
                    let mut j = i + 1;
                    while let (true, Some(next)) = (colons(j), ident(j + 2)) {
                        path.push(next.unraw().to_string());
                        j += 3;
                    }
                    self.push(path, id.span(), None);
                }
                _ => {}
            }
        }
    }
}

/// Whether the attributes carry `#[cfg(test)]`.
fn cfg_test(attrs: &[Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.parse_args::<Ident>().is_ok_and(|i| i == "test"))
}

impl<'ast> Visit<'ast> for Reader {
    fn visit_item(&mut self, item: &'ast Item) {
        let attrs: &[Attribute] = match item {
            Item::Const(i) => &i.attrs,
            Item::Enum(i) => &i.attrs,
            Item::Fn(i) => &i.attrs,
            Item::Impl(i) => &i.attrs,
            Item::Macro(i) => &i.attrs,
            Item::Mod(i) => &i.attrs,
            Item::Static(i) => &i.attrs,
            Item::Struct(i) => &i.attrs,
            Item::Trait(i) => &i.attrs,
            Item::Type(i) => &i.attrs,
            Item::Use(i) => &i.attrs,
            _ => &[],
        };
        match item {
            Item::Mod(m) if cfg_test(attrs) && m.content.is_none() => {
                self.test_mods.push(m.ident.unraw().to_string())
            }
            _ if cfg_test(attrs) => {}
            _ => visit::visit_item(self, item),
        }
    }

    fn visit_impl_item(&mut self, item: &'ast ImplItem) {
        let attrs: &[Attribute] = match item {
            ImplItem::Const(i) => &i.attrs,
            ImplItem::Fn(i) => &i.attrs,
            ImplItem::Type(i) => &i.attrs,
            ImplItem::Macro(i) => &i.attrs,
            _ => &[],
        };
        if !cfg_test(attrs) {
            visit::visit_impl_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast ItemUse) {
        let public = !matches!(item.vis, Visibility::Inherited);
        self.use_tree(&item.tree, Vec::new(), item.use_token.span, public);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let first = path.segments.first().map(|s| &s.ident);
        if path.segments.len() > 1
            && first.is_some_and(|f| f == "crate" || f == "super" || f == "self")
        {
            let segments = path.segments.iter().map(|s| s.ident.unraw().to_string());
            self.push(segments.collect(), path.segments[0].ident.span(), None);
        }
        visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast Macro) {
        visit::visit_macro(self, mac);
        self.scan(mac.tokens.clone());
    }
}
