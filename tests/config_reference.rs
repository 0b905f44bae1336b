//! docs/configuration.md documents every configuration key, and nothing else.
//!
//! The keys of the code are enumerated by serializing `Config::default()` (with one
//! `TableConfig::default()` under `tables."schema.table"`) to JSON: a non-empty object is a
//! section to descend into, anything else is a key — an `Option` that is `None` (null), and an
//! empty map such as `kafka.extra` or `tables."schema.table".rename`, included.
//!
//! The keys of the documentation are the rows of its `key | type | default | meaning` tables:
//! each table belongs to the nearest heading above it that names a section in backticks
//! (``## `[postgres.tls]` ``), and a row is a key when its first cell is one name in backticks.
//! Other tables and rows whose first cell is not in backticks are prose.
//!
//! A key added to a config struct without a row in the reference, or a row left behind after a
//! key was renamed or removed, fails this test with the list of differences.

use std::collections::BTreeSet;

use serde_json::Value;
use walsync::config::{Config, TableConfig};

/// The placeholder table name of the `[tables."schema.table"]` section.
const TABLE_PLACEHOLDER: &str = "schema.table";

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");

/// A TOML key as written in a dotted path: bare when it can be, else quoted.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

fn join(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

/// Every key path below `value`, which sits at `path`.
fn collect_keys(path: &str, value: &Value, keys: &mut BTreeSet<String>) {
    match value {
        Value::Object(members) if !members.is_empty() => {
            for (key, member) in members {
                collect_keys(&join(path, &toml_key(key)), member, keys);
            }
        }
        _ => {
            keys.insert(path.to_owned());
        }
    }
}

fn code_keys() -> BTreeSet<String> {
    let mut config = Config::default();
    config
        .tables
        .insert(TABLE_PLACEHOLDER.to_owned(), TableConfig::default());
    let value = serde_json::to_value(&config).expect("the configuration serializes to JSON");
    let mut keys = BTreeSet::new();
    collect_keys("", &value, &mut keys);
    keys
}

/// The text between the first pair of backticks in `text`.
fn backticked(text: &str) -> Option<&str> {
    let start = text.find('`')? + 1;
    let length = text[start..].find('`')?;
    Some(&text[start..start + length])
}

/// The cells of a markdown table row, trimmed (the outer pipes dropped).
fn cells(line: &str) -> Vec<&str> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

fn is_delimiter_row(line: &str) -> bool {
    cells(line)
        .iter()
        .all(|cell| !cell.is_empty() && cell.chars().all(|c| matches!(c, '-' | ':')))
}

fn is_key_table_header(line: &str) -> bool {
    let names: Vec<String> = cells(line).iter().map(|c| c.to_lowercase()).collect();
    names == ["key", "type", "default", "meaning"]
}

/// The key paths documented in `markdown`, and the problems found while reading it.
fn documented_keys(markdown: &str) -> (BTreeSet<String>, Vec<String>) {
    let mut keys = BTreeSet::new();
    let mut problems = Vec::new();
    let mut section: Option<String> = None;
    let mut in_key_table = false;
    let mut in_other_table = false;
    let mut in_code_block = false;
    for (number, line) in markdown.lines().enumerate() {
        let number = number + 1;
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_code_block = !in_code_block;
            continue;
        }
        if in_code_block {
            continue;
        }
        if trimmed.starts_with('#') {
            in_key_table = false;
            in_other_table = false;
            section = backticked(trimmed)
                .and_then(|name| name.strip_prefix('['))
                .and_then(|name| name.strip_suffix(']'))
                .map(str::to_owned);
            continue;
        }
        if !trimmed.starts_with('|') {
            in_key_table = false;
            in_other_table = false;
            continue;
        }
        if !in_key_table && !in_other_table {
            if is_key_table_header(trimmed) {
                in_key_table = true;
                if section.is_none() {
                    problems.push(format!(
                        "line {number}: a key table under a heading that names no `[section]`"
                    ));
                }
            } else {
                in_other_table = true;
            }
            continue;
        }
        if in_other_table || is_delimiter_row(trimmed) {
            continue;
        }
        let row = cells(trimmed);
        let first = row[0];
        let Some(key) = first
            .strip_prefix('`')
            .and_then(|cell| cell.strip_suffix('`'))
        else {
            continue;
        };
        if key.is_empty() || key.contains('`') || key.contains(char::is_whitespace) {
            problems.push(format!(
                "line {number}: the first cell {first:?} is not one key name in backticks"
            ));
            continue;
        }
        if row.len() != 4 {
            problems.push(format!(
                "line {number}: key `{key}` has {} cells, expected 4 (key | type | default | meaning)",
                row.len()
            ));
        }
        if let Some(section) = &section {
            let path = join(section, key);
            if !keys.insert(path.clone()) {
                problems.push(format!("line {number}: `{path}` is documented twice"));
            }
        }
    }
    (keys, problems)
}

#[test]
fn the_reference_documents_exactly_the_configuration_keys() {
    let markdown = std::fs::read_to_string(REFERENCE)
        .unwrap_or_else(|error| panic!("cannot read {REFERENCE}: {error}"));
    let (documented, problems) = documented_keys(&markdown);
    let code = code_keys();

    let undocumented: Vec<&String> = code.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&code).collect();
    let mut report = Vec::new();
    if !undocumented.is_empty() {
        report.push(format!(
            "keys of the config structs missing from docs/configuration.md:\n  {}",
            undocumented
                .iter()
                .map(|key| key.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    if !unknown.is_empty() {
        report.push(format!(
            "keys documented in docs/configuration.md that the config structs do not have:\n  {}",
            unknown
                .iter()
                .map(|key| key.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    if !problems.is_empty() {
        report.push(format!(
            "malformed rows in docs/configuration.md:\n  {}",
            problems.join("\n  ")
        ));
    }
    assert!(report.is_empty(), "{}", report.join("\n\n"));
}

#[test]
fn the_key_enumeration_sees_nested_sections_optional_keys_and_maps() {
    let keys = code_keys();
    for expected in [
        "postgres.tls.mode",
        "postgres.password",
        "kafka.extra",
        "kafka.security.sasl_password_file",
        "tables.\"schema.table\".rename",
        "tables.\"schema.table\".index",
    ] {
        assert!(keys.contains(expected), "{expected} not in {keys:#?}");
    }
    assert!(!keys.contains("postgres.tls"), "a section is not a key");
    assert!(!keys.contains("tables"), "a section is not a key");
}

#[test]
fn the_reader_takes_only_backticked_rows_of_key_tables_under_their_section() {
    let markdown = "\
# Title

| key | type | default | meaning |
|---|---|---|---|

## `[kafka]`

| key | type | default | meaning |
|---|---|---|---|
| `brokers` | string | `\"127.0.0.1:9092\"` | bootstrap servers |
| `extra` | table | `{}` | see below |
| any other | — | — | prose, not a key |

### `[kafka.extra]`

| setting | why walsync owns it |
|---|---|
| `acks` | not a key of the struct |

```toml
| `inside_code` | x | y | z |
```

## `[tables.\"schema.table\"]`

| Key | Type | Default | Meaning |
|:--|--|--|--|
| `rename` | table | `{}` | column → field |
";
    let (keys, problems) = documented_keys(markdown);
    let expected: BTreeSet<String> = [
        "kafka.brokers",
        "kafka.extra",
        "tables.\"schema.table\".rename",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(keys, expected);
    assert_eq!(
        problems,
        ["line 3: a key table under a heading that names no `[section]`"]
    );
}
