//! The documents a user reads cannot drift from the code or fall apart: every key of
//! config/default.toml is in docs/configuration.md's key table with its default, and nothing else
//! is; the example configuration is valid; README.md stays a short front page (under 15,000
//! bytes, no commit hashes, no issue numbers); and every relative link in README.md and
//! docs/*.md names a file that exists and, with a `#fragment`, a heading of that file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The page with the full configuration reference, and the heading of its key table.
const CONFIGURATION: &str = "docs/configuration.md";
const KEY_TABLE_HEADING: &str = "## Every key";

/// README.md's ceiling, in bytes.
const README_MAX_BYTES: usize = 15_000;

/// `section.key` → default, from config/default.toml.
fn default_keys() -> BTreeMap<String, toml::Value> {
    let defaults: toml::Table = imgedge::config::DEFAULT_TOML.parse().unwrap();
    let mut keys = BTreeMap::new();
    for (section, table) in defaults {
        let toml::Value::Table(table) = table else {
            panic!("config/default.toml: {section} is not a section");
        };
        for (key, value) in table {
            match value {
                // A section within a section: `[cache.shared]`.
                toml::Value::Table(inner) => {
                    for (k, v) in inner {
                        keys.insert(format!("{section}.{key}.{k}"), v);
                    }
                }
                value => {
                    keys.insert(format!("{section}.{key}"), value);
                }
            }
        }
    }
    keys
}

/// `section.key` → the default column's value, from the rows of docs/configuration.md's key
/// table (the section under `## Every key`). A row may name several keys of one section
/// (`memory.evicting`, `warning`, ...) with as many defaults; `[[routes]]` (no defaults) is left
/// out.
fn documented_keys() -> BTreeMap<String, toml::Value> {
    let page = std::fs::read_to_string(CONFIGURATION).unwrap();
    let table = page
        .split(&format!("\n{KEY_TABLE_HEADING}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("{CONFIGURATION} has a section {KEY_TABLE_HEADING:?}"))
        .split("\n## ")
        .next()
        .unwrap();
    let ticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    let mut keys = BTreeMap::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let names = ticked(cells[0].trim_start_matches("| "));
        if names.iter().any(|n| n.starts_with("[[")) {
            continue;
        }
        let section = names[0].split('.').next().unwrap().to_owned();
        let defaults = ticked(cells[1]);
        assert_eq!(names.len(), defaults.len(), "{CONFIGURATION} row: {row}");
        for (name, default) in names.iter().zip(defaults) {
            let key = if name.contains('.') {
                name.clone()
            } else {
                format!("{section}.{name}")
            };
            let value: toml::Table = format!("v = {default}")
                .parse()
                .unwrap_or_else(|e| panic!("{CONFIGURATION}: default of {key}: {default}: {e}"));
            keys.insert(key, value["v"].clone());
        }
    }
    keys
}

#[test]
fn the_configuration_table_lists_every_key_with_its_default() {
    let (defaults, documented) = (default_keys(), documented_keys());
    let missing: Vec<_> = defaults
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let unknown: Vec<_> = documented
        .keys()
        .filter(|k| !defaults.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "{CONFIGURATION}'s key table lacks {missing:?} and names keys config/default.toml \
         does not have: {unknown:?}"
    );
    for (key, value) in &defaults {
        assert_eq!(
            &documented[key], value,
            "{key}: {CONFIGURATION} says {}, config/default.toml {value}",
            documented[key]
        );
    }
}

#[test]
fn the_example_configuration_is_valid() {
    imgedge::Config::load(Some(Path::new("imgedge.example.toml")))
        .unwrap_or_else(|e| panic!("imgedge.example.toml:\n{e}"));
}

#[test]
fn the_readme_is_short() {
    let size = std::fs::metadata("README.md").unwrap().len();
    assert!(
        size < README_MAX_BYTES as u64,
        "README.md is {size} bytes, the limit {README_MAX_BYTES}: move reference material to a \
         page under docs/ and link it"
    );
}

/// The words of `text` that look like commit hashes: 7 to 40 lowercase hex digits with at least
/// one digit and one letter (`1be9742`, not `20261130` or `deadbeef`...).
fn commit_hashes(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            (7..=40).contains(&w.len())
                && w.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                && w.bytes().any(|b| b.is_ascii_digit())
                && w.bytes().any(|b| b.is_ascii_lowercase())
        })
        .collect()
}

/// The references to issues in `text`: "issue 12", "issues 10 and 11", "issue #12", "#12".
fn issue_references(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let lower = text.to_lowercase();
    for (at, _) in lower.match_indices("issue") {
        let rest = lower[at + "issue".len()..].trim_start_matches('s');
        let rest = rest.trim_start_matches([' ', '\t', '\n', '#']);
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            found.push(lower[at..].chars().take(20).collect());
        }
    }
    for (at, _) in text.match_indices('#') {
        let before = text[..at].chars().next_back();
        let after = text[at + 1..].chars().next();
        if before.is_none_or(|c| c.is_whitespace() || c == '(' || c == '[')
            && after.is_some_and(|c| c.is_ascii_digit())
        {
            found.push(text[at..].chars().take(8).collect());
        }
    }
    found
}

#[test]
fn the_readme_names_no_commit_and_no_issue() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let hashes = commit_hashes(&readme);
    assert!(
        hashes.is_empty(),
        "README.md names commits {hashes:?}: say what changed, not where (docs/benchmarks.md \
         keeps the record)"
    );
    let issues = issue_references(&readme);
    assert!(issues.is_empty(), "README.md refers to issues: {issues:?}");
}

#[test]
fn the_hash_and_issue_checks_see_what_they_should() {
    assert_eq!(commit_hashes("imgedge at 1be9742, defaults"), ["1be9742"]);
    assert!(commit_hashes("20261130T030332Z 8388608 deadbeef iVBORw0KGgo sha256").is_empty());
    assert_eq!(issue_references("the hardening of issue 9 added").len(), 1);
    assert_eq!(issue_references("Issues 10 and 11; see #12.").len(), 2);
    assert!(issue_references("an issue with it (#paths), C#").is_empty());
}

/// `text` without fenced code blocks and inline code spans (a code span may run over lines), so
/// that what looks like a link or a heading in code is not taken for one.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fenced = !fenced;
            out.push('\n');
            continue;
        }
        if !fenced {
            out.push_str(line);
        }
        out.push('\n');
    }
    let mut without_code = String::with_capacity(out.len());
    let mut in_code = false;
    for c in out.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code || c == '\n' {
            without_code.push(c);
        }
    }
    without_code
}

/// GitHub's anchor for a heading: its text lowercased, markup and punctuation but `-` and `_`
/// dropped, spaces made `-`; a repeated anchor gets `-1`, `-2`, ...
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let level = line.bytes().take_while(|&b| b == b'#').count();
        if !(1..=6).contains(&level) || !line[level..].starts_with(' ') {
            continue;
        }
        // A link in a heading reads as its text: drop each `](target)`.
        let mut text = line[level..].trim().to_owned();
        while let Some(start) = text.find("](") {
            let end = text[start..]
                .find(')')
                .map_or(text.len(), |e| start + e + 1);
            text.replace_range(start..end, "");
        }
        let slug: String = text
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                '-' | '_' => Some(c),
                c if c.is_alphanumeric() => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// The relative link targets of a Markdown text, as written: `[text](target)` and
/// `![alt](target)` outside code, but those with a scheme (`https:`, `mailto:`).
fn relative_links(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    let mut links = Vec::new();
    for (at, _) in text.match_indices("](") {
        let rest = &text[at + 2..];
        let Some(end) = rest.find(')') else { continue };
        let target = rest[..end].trim();
        let scheme = target
            .split_once(':')
            .is_some_and(|(s, _)| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphabetic()));
        if !target.is_empty() && !scheme {
            links.push(target.to_owned());
        }
    }
    links
}

/// README.md and every page under docs/.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir("docs")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, PathBuf::from("README.md"));
    docs
}

/// What is wrong with each relative link of `doc`: a target that does not exist, or a
/// `#fragment` no heading of the target produces.
fn broken_links(doc: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(doc).unwrap();
    let dir = doc.parent().unwrap_or(Path::new(""));
    let mut broken = Vec::new();
    for link in relative_links(&text) {
        let (path, fragment) = match link.split_once('#') {
            Some((path, fragment)) => (path, Some(fragment)),
            None => (link.as_str(), None),
        };
        let target = if path.is_empty() {
            doc.to_path_buf()
        } else {
            dir.join(path)
        };
        if !target.exists() {
            broken.push(format!(
                "{}: ({link}): no file {}",
                doc.display(),
                target.display()
            ));
            continue;
        }
        let Some(fragment) = fragment else { continue };
        if target.extension().is_some_and(|e| e == "md") {
            let headings = anchors(&std::fs::read_to_string(&target).unwrap());
            if !headings.contains(fragment) {
                broken.push(format!(
                    "{}: ({link}): {} has no heading #{fragment}",
                    doc.display(),
                    target.display()
                ));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_readme_and_docs_resolves() {
    let broken: Vec<String> = documents()
        .iter()
        .flat_map(|d| broken_links(d.as_path()))
        .collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_check_sees_what_it_should() {
    assert!(
        anchors("# Routes\n## `/image-proxy`\n## Storage and freshness (RFC 9111 §3, §4.2)\n")
            .is_superset(&BTreeSet::from([
                "routes".to_owned(),
                "image-proxy".to_owned(),
                "storage-and-freshness-rfc-9111-3-42".to_owned(),
            ]))
    );
    assert_eq!(
        anchors("## k6 suite (`run.sh`)\n## Notes\n## Notes\n```\n# not a heading\n```\n"),
        BTreeSet::from([
            "k6-suite-runsh".to_owned(),
            "notes".to_owned(),
            "notes-1".to_owned(),
        ])
    );
    assert_eq!(
        relative_links(
            "[a](docs/a.md) [b](https://x.example/) `[c](d.md)` ![e](f.svg)\n```\n[g](h.md)\n```\n"
        ),
        ["docs/a.md", "f.svg"]
    );
}
