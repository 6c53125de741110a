//! The module dependency rule of ARCHITECTURE.md ("Layers"), read off the source: every
//! `crate::module` path in `src/` (comments aside) may name only a module of a lower layer, or
//! of its own layer without closing a cycle; and the files of one module (`http/*.rs`,
//! `render/*.rs`, ...) do not use each other in a cycle either (`super::sibling`,
//! `crate::parent::sibling`). A new module must be given a layer here and there.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first: a module may use the modules of lower layers, and those of its
/// own layer as long as no cycle forms. Keep in step with ARCHITECTURE.md.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaves",
        &[
            "connections",
            "descriptors",
            "freshness",
            "metrics",
            "rss",
            "signing",
            "target",
            "tasks",
        ],
    ),
    ("settings", &["config", "pressure"]),
    ("origin", &["error", "upstream"]),
    ("storage", &["body", "cache", "collapse", "relief", "tee"]),
    ("requests", &["proxy", "render", "transform"]),
    ("face", &["http"]),
    ("process", &["app", "server"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The code of a file without its comments (line comments and doc comments: their
/// intra-doc links are not dependencies).
fn code(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| match line.find("//") {
            // a `//` inside a string literal (a URL) is rare in paths that matter; a line
            // cut short loses nothing this test reads unless it names a module after it
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow `prefix` in `code` (`crate::` → `http`, `cache`, ...).
fn named_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    code.match_indices(prefix)
        .filter(|(at, _)| {
            // not the tail of a longer name or path (`a_crate::`, `x::crate::`)
            !code[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
        })
        .map(|(at, _)| {
            let rest = &code[at + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// The top-level module a file of `src/` belongs to (`src/http/admit.rs` → `http`); `None` for
/// the crate root and the binary.
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix("src").unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// `from` → the modules it uses, over every file of `src/`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(Path::new("src")) {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let code = code(&file);
        let used = graph.entry(module.clone()).or_default();
        for name in named_after(&code, "crate::") {
            if name != module {
                used.insert(name.to_owned());
            }
        }
    }
    graph
}

/// A cycle in `graph`, as the path that closes it, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn modules_use_only_lower_layers_and_no_module_cycles() {
    let graph = module_graph();
    let mut wrong = Vec::new();
    for (from, used) in &graph {
        let Some(from_layer) = layer_of(from) else {
            wrong.push(format!(
                "src/{from}: in no layer (add it to tests/integration/layers.rs and ARCHITECTURE.md)"
            ));
            continue;
        };
        for to in used {
            match layer_of(to) {
                None => wrong.push(format!("{from} uses {to}, which is in no layer")),
                Some(to_layer) if to_layer > from_layer => wrong.push(format!(
                    "{from} ({}) uses {to} ({}), a higher layer",
                    LAYERS[from_layer].0, LAYERS[to_layer].0
                )),
                Some(_) => {}
            }
        }
    }
    assert!(wrong.is_empty(), "layer rule broken:\n{}", wrong.join("\n"));
    assert_eq!(cycle(&graph), None, "modules use each other in a cycle");
}

#[test]
fn the_files_of_a_module_do_not_use_each_other_in_a_cycle() {
    for dir in sources(Path::new("src"))
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect::<BTreeSet<_>>()
    {
        if dir == Path::new("src") {
            continue;
        }
        let parent = dir
            .strip_prefix("src")
            .unwrap()
            .to_str()
            .unwrap()
            .replace('/', "::");
        let files: BTreeSet<String> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                let name = path.file_name()?.to_str()?;
                Some(name.strip_suffix(".rs")?.to_owned())
            })
            .collect();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let code = code(&dir.join(format!("{file}.rs")));
            let mut used: BTreeSet<String> = named_after(&code, "super::")
                .into_iter()
                .chain(named_after(&code, &format!("crate::{parent}::")))
                .filter(|n| *n != file && files.contains(*n))
                .map(str::to_owned)
                .collect();
            used.remove(file);
            graph.insert(file.clone(), used);
        }
        assert_eq!(
            cycle(&graph),
            None,
            "the files of src/{} use each other in a cycle",
            dir.strip_prefix("src").unwrap().display()
        );
    }
}

/// The rule has teeth: a graph with a cycle is found, and a use of a higher layer is.
#[test]
fn the_checks_find_what_they_look_for() {
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"])]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
            .collect();
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        named_after(
            "use crate::http::Router; x::crate::no; crate::cache",
            "crate::"
        ),
        vec!["http", "cache"]
    );
    assert!(layer_of("http") > layer_of("proxy"));
    assert!(layer_of("render") > layer_of("proxy") || layer_of("render") == layer_of("proxy"));
    // the graph read from src/ is not empty: the test reads what it should
    let real = module_graph();
    assert!(real["http"].contains("render") && real["render"].contains("proxy"));
}
