//! The crate's layering, checked from its source so it stays true: which top-level module may
//! import which ([`MAY_IMPORT`]), and no file-level import cycle inside any directory module.
//! Reads `src/**/*.rs`, drops comments, literals and `#[cfg(test)]` items, and collects every
//! `crate::…`, `super::…` and `self::…` path, `use` trees included. Re-exports from a directory
//! module's root are followed to the file that defines the item, so a cycle cannot hide behind
//! a `pub use`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module and what it may import besides itself. `http` → `export`/`auth`/`proxy`
/// → `store`/`storage`/`fhir`/`job`; `config` and `telemetry` are usable from anywhere. `config`
/// sits above `fhir` because validating a client's scopes needs the SMART scope grammar.
const MAY_IMPORT: &[(&str, &[&str])] = &[
    ("fhir", &[]),
    ("job", &[]),
    ("config", &["fhir"]),
    ("telemetry", &["config"]),
    ("routes", &["config", "telemetry"]),
    ("store", &["job", "config", "telemetry"]),
    ("storage", &["job", "config", "telemetry"]),
    ("proxy", LOWER),
    ("auth", LOWER),
    ("export", LOWER),
    (
        "ops",
        &[
            "export",
            "store",
            "storage",
            "fhir",
            "job",
            "config",
            "telemetry",
        ],
    ),
    (
        "app",
        &[
            "auth",
            "export",
            "proxy",
            "routes",
            "store",
            "storage",
            "fhir",
            "job",
            "config",
            "telemetry",
        ],
    ),
    (
        "http",
        &[
            "app",
            "auth",
            "export",
            "proxy",
            "routes",
            "store",
            "storage",
            "fhir",
            "job",
            "config",
            "telemetry",
        ],
    ),
    (
        "server",
        &[
            "http",
            "app",
            "auth",
            "export",
            "proxy",
            "routes",
            "store",
            "storage",
            "fhir",
            "job",
            "config",
            "telemetry",
        ],
    ),
];

/// What `export`, `auth` and `proxy` may build on.
const LOWER: &[&str] = &["store", "storage", "fhir", "job", "config", "telemetry"];

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
        let allowed = table.get(from).copied().unwrap_or_default();
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
        #[cfg(test)]
        mod tests { use crate::test_only::X; }
    "#;
    let paths: Vec<String> = extract(source)
        .0
        .into_iter()
        .map(|i| i.path.join("::"))
        .collect();
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
            let (imports, test_mods) = extract(&text);
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

#[derive(Debug, PartialEq, Clone)]
enum Token {
    Ident(String),
    Punct(&'static str),
    Other(char),
}

/// The paths `source` refers to, and the names of the child modules it declares test-only
/// (`#[cfg(test)] mod tests;`).
fn extract(source: &str) -> (Vec<Import>, Vec<String>) {
    let tokens = drop_test_items(lex(source));
    let mut imports = Vec::new();
    let mut test_mods = Vec::new();
    let ident = |i: usize| match tokens.get(i) {
        Some((Token::Ident(s), _)) => Some(s.as_str()),
        _ => None,
    };
    let is = |i: usize, p: &str| matches!(tokens.get(i), Some((Token::Punct(q), _)) if *q == p);
    let mut i = 0;
    while i < tokens.len() {
        let line = tokens[i].1;
        match ident(i) {
            Some("use") => {
                // `pub use` or `pub(crate) use`: a re-export.
                let public = (i >= 1 && ident(i - 1) == Some("pub"))
                    || (i >= 4
                        && matches!(tokens[i - 1].0, Token::Other(')'))
                        && ident(i - 4) == Some("pub"));
                let mut paths = Vec::new();
                i = use_tree(&tokens, i + 1, Vec::new(), &mut paths);
                for (mut path, alias) in paths {
                    if path.last().is_some_and(|s| s == "*") {
                        path.pop();
                    }
                    if path.last().is_some_and(|s| s == "self") && path.len() > 1 {
                        path.pop();
                    }
                    let reexport = public
                        .then(|| alias.or_else(|| path.last().cloned()))
                        .flatten();
                    imports.push(Import {
                        path,
                        line,
                        reexport,
                    });
                }
            }
            Some("crate" | "super" | "self")
                if is(i + 1, "::") && !(i > 0 && (is(i - 1, "$") || is(i - 1, "::"))) =>
            {
                let mut path = vec![ident(i).unwrap().to_owned()];
                i += 1;
                while is(i, "::") {
                    match ident(i + 1) {
                        Some(segment) => {
                            path.push(segment.to_owned());
                            i += 2;
                        }
                        None => break,
                    }
                }
                imports.push(Import {
                    path,
                    line,
                    reexport: None,
                });
            }
            Some("mod") if is(i + 2, "test-only-mod;") => {
                test_mods.push(ident(i + 1).unwrap_or_default().to_owned());
                i += 3;
            }
            _ => i += 1,
        }
    }
    (imports, test_mods)
}

/// Parses one `use` tree from `i`, appending `(path, alias)`s; returns the index after it.
fn use_tree(
    tokens: &[(Token, usize)],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, Option<String>)>,
) -> usize {
    if matches!(tokens.get(i), Some((Token::Punct("::"), _))) {
        i += 1;
    }
    loop {
        match tokens.get(i) {
            Some((Token::Other('{'), _)) => {
                i += 1;
                loop {
                    match tokens.get(i) {
                        Some((Token::Other('}'), _)) => return i + 1,
                        Some((Token::Other(','), _)) => i += 1,
                        Some(_) => i = use_tree(tokens, i, prefix.clone(), out),
                        None => return i,
                    }
                }
            }
            Some((Token::Other('*'), _)) => {
                prefix.push("*".into());
                out.push((prefix, None));
                return i + 1;
            }
            Some((Token::Ident(name), _)) => {
                prefix.push(name.clone());
                i += 1;
                if matches!(tokens.get(i), Some((Token::Punct("::"), _))) {
                    i += 1;
                    continue;
                }
                let mut alias = None;
                if matches!(tokens.get(i), Some((Token::Ident(a), _)) if a == "as") {
                    if let Some((Token::Ident(a), _)) = tokens.get(i + 1) {
                        alias = Some(a.clone());
                    }
                    i += 2;
                }
                out.push((prefix, alias));
                return i;
            }
            _ => return i,
        }
    }
}

/// Removes every item marked `#[cfg(test)]` (a `mod`, `use`, `fn`, `impl`, ...). A
/// `#[cfg(test)] mod name;` becomes `mod name test-only-mod;` so [`extract`] can skip its file.
fn drop_test_items(tokens: Vec<(Token, usize)>) -> Vec<(Token, usize)> {
    let word = |i: usize, w: &str| matches!(tokens.get(i), Some((Token::Ident(s), _)) if s == w);
    let other = |i: usize, c: char| matches!(tokens.get(i), Some((Token::Other(o), _)) if *o == c);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let cfg_test = other(i, '#')
            && other(i + 1, '[')
            && word(i + 2, "cfg")
            && other(i + 3, '(')
            && word(i + 4, "test")
            && other(i + 5, ')')
            && other(i + 6, ']');
        if !cfg_test {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        let mut j = i + 7;
        // Further attributes and the visibility.
        while other(j, '#') && other(j + 1, '[') {
            j = skip_group(&tokens, j + 1);
        }
        if word(j, "pub") {
            j += 1;
            if other(j, '(') {
                j = skip_group(&tokens, j);
            }
        }
        let item = [
            "mod", "use", "fn", "impl", "const", "static", "struct", "enum", "async",
        ]
        .iter()
        .any(|w| word(j, w));
        if !item {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        if word(j, "mod") && other(j + 2, ';') {
            out.push(tokens[j].clone());
            out.push(tokens[j + 1].clone());
            out.push((Token::Punct("test-only-mod;"), tokens[j].1));
            i = j + 3;
            continue;
        }
        // To the end of the item: its `;`, or the close of its first brace.
        while j < tokens.len() && !other(j, ';') && !other(j, '{') {
            j += 1;
        }
        i = if other(j, '{') {
            skip_group(&tokens, j)
        } else {
            j + 1
        };
    }
    out
}

/// The index after the bracket group that opens at `i`.
fn skip_group(tokens: &[(Token, usize)], mut i: usize) -> usize {
    let mut depth = 0usize;
    while let Some((token, _)) = tokens.get(i) {
        match token {
            Token::Other('{' | '[' | '(') => depth += 1,
            Token::Other('}' | ']' | ')') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// Identifiers, `::` and single characters with their line numbers; comments, string and
/// character literals and lifetimes dropped.
fn lex(source: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                line += usize::from(at(i) == '\n');
                i += 1;
            }
            i += 1;
        } else if c == '\'' {
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or label: skip the quote and the name.
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let hashes = (i..).take_while(|&k| at(k) == '#').count();
            if matches!(word.as_str(), "r" | "br" | "cr") && at(i + hashes) == '"' {
                // A raw string: to the quote followed by as many `#`.
                i += hashes + 1;
                while i < chars.len() {
                    if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                        i += hashes + 1;
                        break;
                    }
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            } else if word == "r" && hashes == 1 && (at(i + 1).is_alphabetic() || at(i + 1) == '_')
            {
                i += 1; // a raw identifier: `r#type` lexes as `type`
            } else {
                tokens.push((Token::Ident(word), line));
            }
        } else if c.is_ascii_digit() {
            while at(i).is_alphanumeric()
                || at(i) == '_'
                || (at(i) == '.' && at(i + 1).is_ascii_digit())
            {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            tokens.push((Token::Punct("::"), line));
            i += 2;
        } else {
            tokens.push((Token::Other(c), line));
            i += 1;
        }
    }
    tokens
}
