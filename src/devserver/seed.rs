//! Seed files (`--seed FILE`), JSON or YAML, in either of two shapes:
//!
//! 1. a list of entries, like the upstream's `GET /configs` output (extra fields such as `id` or
//!    `created_at` are ignored, so a recorded listing can be used directly):
//!    ```yaml
//!    - {key: database, environment: production, category: database, value: {host: db, port: 5432}}
//!    - {key: debug, environment: production, value: false}
//!    ```
//! 2. a mapping `environment -> key -> value` (category null):
//!    ```yaml
//!    production:
//!      database: {host: db, port: 5432}
//!      debug: false
//!    ```
//!
//! Error messages name the entry at fault but never quote values.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use super::store::{self, NewEntry};

/// Reads and validates a seed file. Errors are one line and do not name the file (the caller does).
pub fn load(path: &Path) -> Result<Vec<NewEntry>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let is_yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    parse(&text, is_yaml)
}

/// Parses seed text: JSON first (unless the file is known to be YAML), then YAML.
pub fn parse(text: &str, is_yaml: bool) -> Result<Vec<NewEntry>, String> {
    let document = if is_yaml {
        parse_yaml(text)?
    } else {
        match serde_json::from_str::<Value>(text) {
            Ok(value) => value,
            Err(json) => parse_yaml(text).map_err(|yaml| {
                format!(
                    "neither JSON (error at line {}, column {}) nor {yaml}",
                    json.line(),
                    json.column()
                )
            })?,
        }
    };
    let entries = match document {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| from_list_item(item).map_err(|e| format!("entry {}: {e}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?,
        Value::Object(environments) => {
            let mut entries = Vec::new();
            for (environment, keys) in environments {
                let Value::Object(keys) = keys else {
                    return Err(format!(
                        "environment '{environment}': expected a mapping of key -> value"
                    ));
                };
                for (key, value) in keys {
                    entries.push(NewEntry {
                        key,
                        environment: environment.clone(),
                        category: None,
                        value,
                    });
                }
            }
            entries
        }
        Value::Null => Vec::new(),
        _ => {
            return Err(
                "expected a list of entries or a mapping environment -> key -> value".into(),
            );
        }
    };
    let mut entries = entries;
    for entry in &mut entries {
        check(entry).map_err(|e| format!("{}/{}: {e}", entry.environment, entry.key))?;
    }
    let mut seen = HashSet::new();
    for entry in &entries {
        if !seen.insert((entry.environment.as_str(), entry.key.as_str())) {
            return Err(format!(
                "{}/{}: defined twice",
                entry.environment, entry.key
            ));
        }
    }
    Ok(entries)
}

fn parse_yaml(text: &str) -> Result<Value, String> {
    // The YAML error text may quote the document: report its position only.
    serde_saphyr::from_str::<Value>(text).map_err(|e| match e.location() {
        Some(at) => format!(
            "valid YAML (error at line {}, column {})",
            at.line(),
            at.column()
        ),
        None => "valid YAML".to_owned(),
    })
}

fn from_list_item(item: Value) -> Result<NewEntry, String> {
    let Value::Object(mut fields) = item else {
        return Err("expected a mapping with key, environment and value".into());
    };
    let mut text_field = |name: &str| match fields.remove(name) {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(format!("\"{name}\" must be a string")),
    };
    let key = text_field("key")?.ok_or("missing \"key\"")?;
    let environment =
        text_field("environment")?.ok_or_else(|| format!("{key}: missing \"environment\""))?;
    let category = text_field("category")?;
    let value = fields
        .remove("value")
        .ok_or_else(|| format!("{environment}/{key}: missing \"value\""))?;
    Ok(NewEntry {
        key,
        environment,
        category,
        value,
    })
}

/// Validates lengths and normalizes the value like upstream (see [`store::accept_value`]).
fn check(entry: &mut NewEntry) -> Result<(), String> {
    let length = |what: &str, text: &str, max: usize| {
        let n = text.chars().count();
        if n == 0 || n > max {
            Err(format!("{what} must be 1-{max} characters"))
        } else {
            Ok(())
        }
    };
    length("key", &entry.key, store::KEY_MAX)?;
    length("environment", &entry.environment, store::ENVIRONMENT_MAX)?;
    if let Some(category) = &entry.category {
        length("category", category, store::CATEGORY_MAX)?;
    }
    entry.value = store::accept_value(&entry.value).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn upstream_listing_is_a_valid_seed() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/upstream/upstream-list-all.json");
        assert!(path.exists(), "fixture {} is missing", path.display());
        let entries = load(&path).unwrap();
        assert_eq!(entries.len(), 6);
        assert_eq!(entries[0].key, "database");
        assert_eq!(entries[0].category.as_deref(), Some("database"));
        assert_eq!(entries[5].value, json!("caf\u{e9} \u{2603}"));
    }

    #[test]
    fn yaml_mapping_shape() {
        let yaml = "production:\n  database: {host: db, port: 5432}\n  debug: false\nstaging:\n  list: [a, b]\n";
        let entries = parse(yaml, true).unwrap();
        let got: Vec<(&str, &str, &Value)> = entries
            .iter()
            .map(|e| (e.environment.as_str(), e.key.as_str(), &e.value))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "production",
                    "database",
                    &json!({"host": "db", "port": 5432})
                ),
                ("production", "debug", &json!(false)),
                ("staging", "list", &json!(["a", "b"])),
            ]
        );
        assert!(entries.iter().all(|e| e.category.is_none()));
        // Without the extension hint, JSON is tried first and YAML second.
        assert_eq!(parse(yaml, false).unwrap(), entries);
    }

    #[test]
    fn yaml_list_shape() {
        let yaml = "- key: api_url\n  environment: prod\n  category: config\n  value: https://x\n  id: 9\n";
        let entries = parse(yaml, true).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].category.as_deref(), Some("config"));
        assert_eq!(entries[0].value, json!("https://x"));
    }

    #[test]
    fn errors_name_the_problem_without_values() {
        let cases = [
            (
                r#"[{"key": "k", "value": 1}]"#,
                "entry 1: k: missing \"environment\"",
            ),
            (
                r#"[{"key": "k", "environment": "e"}]"#,
                "entry 1: e/k: missing \"value\"",
            ),
            (
                r#"{"e": {"k": 1.5, "n": 1.0}}"#,
                "e/k: value must not be a floating-point number",
            ),
            (r#"{"e": {"k": null}}"#, "e/k: value must not be null"),
            (
                r#"{"e": "secret-value"}"#,
                "environment 'e': expected a mapping of key -> value",
            ),
            (
                r#"[{"key": "k", "environment": "e", "value": 1}, {"key": "k", "environment": "e", "value": 2}]"#,
                "e/k: defined twice",
            ),
            (
                r#"{"": {"k": 1}}"#,
                "/k: environment must be 1-100 characters",
            ),
            (
                "42",
                "expected a list of entries or a mapping environment -> key -> value",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text, false).unwrap_err(), want, "{text}");
        }
        let err = parse("a: [unclosed\n  password: hunter2", false).unwrap_err();
        assert!(err.starts_with("neither JSON"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
