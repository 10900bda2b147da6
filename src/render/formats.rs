//! Serialising values: one value per file, or the whole environment as json, yaml, dotenv or properties.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::config::{OutputFormat, ValueFormat};
use crate::state::Entry;

/// Bytes of one key's file: a string as-is, anything else as pretty JSON or YAML.
pub fn value_file(value: &Value, format: ValueFormat) -> Result<Vec<u8>, String> {
    match value {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        other => match format {
            ValueFormat::Json => pretty_json(other),
            ValueFormat::Yaml => yaml(other),
        },
    }
}

fn pretty_json(v: &Value) -> Result<Vec<u8>, String> {
    let mut out = serde_json::to_vec_pretty(v).map_err(|e| e.to_string())?;
    out.push(b'\n');
    Ok(out)
}

fn yaml<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_saphyr::to_string(v)
        .map(String::into_bytes)
        .map_err(|e| e.to_string())
}

/// The whole selection as one document.
pub fn aggregate(
    entries: &BTreeMap<String, Entry>,
    format: OutputFormat,
) -> Result<Vec<u8>, String> {
    let map: serde_json::Map<String, Value> = entries
        .iter()
        .map(|(k, e)| (k.clone(), e.value.clone()))
        .collect();
    match format {
        OutputFormat::Json => pretty_json(&Value::Object(map)),
        OutputFormat::Yaml => yaml(&map),
        OutputFormat::Dotenv => dotenv(entries),
        OutputFormat::Properties => Ok(properties(entries)),
    }
}

/// Scalar text of a value: strings as-is, everything else as compact JSON.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Environment-variable name for a key: characters outside `[A-Za-z0-9_]` become `_`, a leading digit
/// gets a `_` prefix. Case is kept.
pub fn dotenv_name(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

/// `NAME="value"` lines, double-quoted with `\\`, `\"`, `\n`, `\r`, `\t` and `\$` escapes (the form read
/// by docker compose, python-dotenv, godotenv and dotenvy). Two keys mapping to one name is an error.
fn dotenv(entries: &BTreeMap<String, Entry>) -> Result<Vec<u8>, String> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut out = String::new();
    for (key, e) in entries {
        let name = dotenv_name(key);
        if let Some(other) = seen.insert(name.clone(), key) {
            return Err(format!(
                "keys '{other}' and '{key}' both map to the variable name {name}; exclude one with --exclude"
            ));
        }
        let mut quoted = String::new();
        for c in scalar_text(&e.value).chars() {
            match c {
                '\\' => quoted.push_str("\\\\"),
                '"' => quoted.push_str("\\\""),
                '\n' => quoted.push_str("\\n"),
                '\r' => quoted.push_str("\\r"),
                '\t' => quoted.push_str("\\t"),
                '$' => quoted.push_str("\\$"),
                c => quoted.push(c),
            }
        }
        let _ = writeln!(out, "{name}=\"{quoted}\"");
    }
    Ok(out.into_bytes())
}

/// Java `.properties` as `Properties.store` writes it: ISO-8859-1 safe (`\uXXXX` escapes), `\t\n\r\f`
/// escaped, `= : # !` and leading spaces escaped.
fn properties(entries: &BTreeMap<String, Entry>) -> Vec<u8> {
    fn escape(s: &str, is_key: bool, out: &mut String) {
        for (i, c) in s.chars().enumerate() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\x0c' => out.push_str("\\f"),
                '=' | ':' | '#' | '!' => {
                    out.push('\\');
                    out.push(c);
                }
                ' ' if i == 0 || is_key => out.push_str("\\ "),
                c if (' '..='~').contains(&c) => out.push(c),
                c => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04X}");
                    }
                }
            }
        }
    }
    let mut out = String::new();
    for (key, e) in entries {
        escape(key, true, &mut out);
        out.push('=');
        escape(&scalar_text(&e.value), false, &mut out);
        out.push('\n');
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entries(pairs: &[(&str, Value)]) -> BTreeMap<String, Entry> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Entry {
                        key: k.to_string(),
                        category: None,
                        value: v.clone(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn value_files() {
        assert_eq!(
            value_file(&json!("raw\ntext"), ValueFormat::Json).unwrap(),
            b"raw\ntext"
        );
        assert_eq!(
            String::from_utf8(value_file(&json!({"a": 1}), ValueFormat::Json).unwrap()).unwrap(),
            "{\n  \"a\": 1\n}\n"
        );
        let y = String::from_utf8(value_file(&json!({"a": [1, true]}), ValueFormat::Yaml).unwrap())
            .unwrap();
        assert!(y.contains("a:") && y.ends_with('\n'), "{y}");
    }

    #[test]
    fn dotenv_escapes_and_detects_collisions() {
        let e = entries(&[
            ("db.url", json!("postgres://u:p@h/db?x=\"1\"\n$HOME")),
            ("port", json!(5432)),
            ("9lives", json!(true)),
        ]);
        let text = String::from_utf8(aggregate(&e, OutputFormat::Dotenv).unwrap()).unwrap();
        assert_eq!(
            text,
            "_9lives=\"true\"\ndb_url=\"postgres://u:p@h/db?x=\\\"1\\\"\\n\\$HOME\"\nport=\"5432\"\n"
        );
        let clash = entries(&[("a.b", json!("1")), ("a_b", json!("2"))]);
        let err = aggregate(&clash, OutputFormat::Dotenv).unwrap_err();
        assert!(err.contains("'a.b'") && err.contains("'a_b'"), "{err}");
    }

    #[test]
    fn properties_escapes() {
        let e = entries(&[
            ("greeting key", json!("héllo = world\n#1")),
            ("obj", json!({"a": 1})),
        ]);
        let text = String::from_utf8(aggregate(&e, OutputFormat::Properties).unwrap()).unwrap();
        assert_eq!(
            text,
            "greeting\\ key=h\\u00E9llo \\= world\\n\\#1\nobj={\"a\"\\:1}\n"
        );
    }

    #[test]
    fn json_and_yaml_aggregates() {
        let e = entries(&[("b", json!([1, 2])), ("a", json!("x"))]);
        let j: Value = serde_json::from_slice(&aggregate(&e, OutputFormat::Json).unwrap()).unwrap();
        assert_eq!(j, json!({"a": "x", "b": [1, 2]}));
        let y = String::from_utf8(aggregate(&e, OutputFormat::Yaml).unwrap()).unwrap();
        let back: Value = serde_saphyr::from_str(&y).unwrap();
        assert_eq!(back, json!({"a": "x", "b": [1, 2]}));
    }
}
