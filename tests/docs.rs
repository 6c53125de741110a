//! The documents a user reads cannot drift from the code: every key of config/default.toml is in
//! docs/configuration.md's key table with its default, and nothing else is; the example
//! configuration is valid.

use std::collections::BTreeMap;
use std::path::Path;

/// The page with the full configuration reference, and the heading of its key table.
const CONFIGURATION: &str = "docs/configuration.md";
const KEY_TABLE_HEADING: &str = "## Every key";

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
