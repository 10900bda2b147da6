//! Serialising values: one value per file, or the whole environment as json, yaml, dotenv or properties.
//!
//! Numbers are written exactly as the server sent them (serde_json's `arbitrary_precision`): a 30-digit
//! integer stays a 30-digit integer, `1.0` stays `1.0`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Serialize, Serializer};
use serde_json::{Number, Value};

use crate::config::{OutputFormat, ValueFormat};
use crate::state::Entry;
use crate::util::Escaped;

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

fn yaml(v: &Value) -> Result<Vec<u8>, String> {
    serde_saphyr::to_string(&Yaml(v))
        .map(String::into_bytes)
        .map_err(|e| e.to_string())
}

/// A JSON value as serde-saphyr should see it. With `arbitrary_precision`, serde_json hands numbers to
/// other serializers as a private one-field struct (which serde-saphyr would write as a map), so numbers
/// are serialized here: as a 128-bit integer or a float when YAML shows that exact text, otherwise as
/// the exact text with an explicit `!!int`/`!!float` tag (so that YAML 1.1 readers, which read `1e+16`
/// as a string, still see a number).
struct Yaml<'a>(&'a Value);

impl Serialize for Yaml<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::String(t) => s.serialize_str(t),
            Value::Number(n) => yaml_number(n, s),
            Value::Array(items) => s.collect_seq(items.iter().map(Yaml)),
            Value::Object(map) => s.collect_map(map.iter().map(|(k, v)| (k, Yaml(v)))),
        }
    }
}

fn yaml_number<S: Serializer>(n: &Number, s: S) -> Result<S::Ok, S::Error> {
    let text = n.as_str();
    if let Ok(i) = text.parse::<i128>()
        && i.to_string() == text
    {
        return s.serialize_i128(i);
    }
    if let Ok(u) = text.parse::<u128>()
        && u.to_string() == text
    {
        return s.serialize_u128(u);
    }
    if let Ok(f) = text.parse::<f64>()
        && f.is_finite()
        && serde_saphyr::to_string(&f).is_ok_and(|t| t.trim_end() == text)
    {
        return s.serialize_f64(f);
    }
    let tag = if text.contains(['.', 'e', 'E']) {
        "tag:yaml.org,2002:float"
    } else {
        "tag:yaml.org,2002:int"
    };
    serde_saphyr::Tagged(text, Some(tag.to_owned())).serialize(s)
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
        OutputFormat::Yaml => yaml(&Value::Object(map)),
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

/// `NAME='value'` lines, one per key, read back unchanged by a POSIX shell (`set -a; . ./app.env` in
/// bash, dash), python-dotenv (`dotenv_values`, with its default interpolation) and Node's `dotenv`
/// (`parse`), and inert when sourced (no expansion, no command substitution).
///
/// A value goes in single quotes; a value holding `'` goes in double quotes when it holds none of `"`,
/// `$`, `` ` ``, `\`. Nothing is escaped: the three readers disagree about every escape. The values no quoting
/// carries through all three are a render error naming the key (see [`dotenv_quote`]). Two keys mapping
/// to one name is an error too.
fn dotenv(entries: &BTreeMap<String, Entry>) -> Result<Vec<u8>, String> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut out = String::new();
    for (key, e) in entries {
        let name = dotenv_name(key);
        if let Some(other) = seen.insert(name.clone(), key) {
            return Err(format!(
                "keys '{}' and '{}' both map to the variable name {name}; exclude one with --exclude",
                Escaped(other),
                Escaped(key)
            ));
        }
        let quoted = dotenv_quote(&scalar_text(&e.value)).map_err(|why| {
            format!(
                "key '{}': its value {why}, which no dotenv quoting carries unchanged through sh, \
                 python-dotenv and Node dotenv alike; exclude the key with --exclude or use a json, \
                 yaml or properties output or --output-dir",
                Escaped(key)
            )
        })?;
        let _ = writeln!(out, "{name}={quoted}");
    }
    Ok(out.into_bytes())
}

/// The quoted form of `value` for a dotenv file, or why there is none:
/// - a NUL (no shell variable holds one) or a carriage return (python-dotenv and Node dotenv turn CR and
///   CRLF into LF, and their only escape for it, `\r` in double quotes, is literal text to a shell);
/// - `'` together with `"`, `$`, `` ` `` or `\` (single quotes cannot hold `'`; inside double quotes a
///   shell needs those escaped, and the escapes are kept as text by Node dotenv);
/// - two backslashes in a row or a trailing backslash (python-dotenv reads `\\` in single quotes as one
///   backslash and `\'` as a quote; shells and Node keep both as text);
/// - `${NAME}` or `${NAME:-default}` (python-dotenv expands it in every kind of quotes).
fn dotenv_quote(value: &str) -> Result<String, &'static str> {
    if value.contains('\0') {
        return Err("contains a NUL character");
    }
    if value.contains('\r') {
        return Err("contains a carriage return");
    }
    if value.contains('\'') {
        if value.contains(['"', '$', '`', '\\']) {
            return Err("contains a single quote together with one of \" $ ` \\");
        }
        return Ok(format!("\"{value}\""));
    }
    if value.contains("\\\\") || value.ends_with('\\') {
        return Err("contains two backslashes in a row or ends with a backslash");
    }
    if has_python_dotenv_variable(value) {
        return Err("contains ${...}, which python-dotenv expands");
    }
    Ok(format!("'{value}'"))
}

/// Whether python-dotenv's interpolation pattern `\$\{[^}:]*(:-[^}]*)?\}` occurs in `value`.
fn has_python_dotenv_variable(value: &str) -> bool {
    let mut rest = value;
    while let Some(at) = rest.find("${") {
        let after = &rest[at + 2..];
        match after.find(['}', ':']) {
            Some(i) if after[i..].starts_with('}') => return true,
            Some(i) if after[i..].starts_with(":-") && after[i..].contains('}') => return true,
            _ => {}
        }
        rest = &rest[at + 1..];
    }
    false
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
        let y = String::from_utf8(
            value_file(&json!({"a": [1, true, null, "x"]}), ValueFormat::Yaml).unwrap(),
        )
        .unwrap();
        assert_eq!(y, "a:\n- 1\n- true\n- null\n- x\n");
    }

    #[test]
    fn dotenv_quotes_and_detects_collisions() {
        let e = entries(&[
            (
                "db.url",
                json!("postgres://u:p@h/db?x=\"1\"\n$HOME `id` $(id)"),
            ),
            ("port", json!(5432)),
            ("9lives", json!(true)),
            ("apostrophe", json!("it's")),
            ("obj", json!({"a": [1, "b c"]})),
        ]);
        let text = String::from_utf8(aggregate(&e, OutputFormat::Dotenv).unwrap()).unwrap();
        assert_eq!(
            text,
            "_9lives='true'\napostrophe=\"it's\"\ndb_url='postgres://u:p@h/db?x=\"1\"\n$HOME `id` $(id)'\nobj='{\"a\":[1,\"b c\"]}'\nport='5432'\n"
        );
        let clash = entries(&[("a.b", json!("1")), ("a_b", json!("2"))]);
        let err = aggregate(&clash, OutputFormat::Dotenv).unwrap_err();
        assert!(err.contains("'a.b'") && err.contains("'a_b'"), "{err}");
    }

    /// The values no quoting carries through sh, python-dotenv and Node dotenv: an error naming the key
    /// and the reason, never the value.
    #[test]
    fn dotenv_refuses_what_readers_would_change() {
        for (value, why) in [
            ("a\rb", "carriage return"),
            ("line\r\n", "carriage return"),
            ("a\0b", "NUL"),
            ("it's \"q\"", "single quote together"),
            ("it's $5", "single quote together"),
            ("it's `x`", "single quote together"),
            ("it's a\\b", "single quote together"),
            ("C:\\\\share", "two backslashes"),
            ("ends\\", "ends with a backslash"),
            ("${HOME}", "${...}"),
            ("x${A:-b}y", "${...}"),
            ("a${}b", "${...}"),
        ] {
            let e = entries(&[("the.key", json!(value))]);
            let err = aggregate(&e, OutputFormat::Dotenv).unwrap_err();
            assert!(
                err.contains("key 'the.key'") && err.contains(why),
                "{value:?}: {err}"
            );
            assert!(!err.contains(value), "{value:?}: {err}");
        }
        for fine in [
            "${A:b}", "${abc", "$HOME", "a\\b", "\\a", "", "'", "a\n#b", " sp ",
        ] {
            let e = entries(&[("k", json!(fine))]);
            assert!(aggregate(&e, OutputFormat::Dotenv).is_ok(), "{fine:?}");
        }
        let e = entries(&[("bad\nkey", json!("\r"))]);
        let err = aggregate(&e, OutputFormat::Dotenv).unwrap_err();
        assert!(err.contains("key 'bad\\nkey'"), "{err}");
    }

    /// Numbers come out exactly as sent, in every format.
    #[test]
    fn numbers_as_sent_in_every_format() {
        let raw = r#"{"big": 123456789012345678901234567890, "huge": -1234567890123456789012345678901234567890123, "one": 1.0, "inf": 1e400, "neg0": -0, "tenth": 0.1, "exp": 1E5, "py": 1e-07, "int": 5432}"#;
        let value = crate::state::parse_value(raw).unwrap();
        let e = entries(&[("n", value.clone())]);
        let sent = [
            "123456789012345678901234567890",
            "-1234567890123456789012345678901234567890123",
            "1.0",
            "1e400",
            "-0",
            "0.1",
            "1E5",
            "1e-07",
            "5432",
        ];
        let json = String::from_utf8(aggregate(&e, OutputFormat::Json).unwrap()).unwrap();
        let file = String::from_utf8(value_file(&value, ValueFormat::Json).unwrap()).unwrap();
        let dotenv = String::from_utf8(aggregate(&e, OutputFormat::Dotenv).unwrap()).unwrap();
        let props = String::from_utf8(aggregate(&e, OutputFormat::Properties).unwrap()).unwrap();
        for text in sent {
            for (name, out) in [("json", &json), ("file", &file), ("dotenv", &dotenv)] {
                assert!(
                    out.contains(&format!(": {text}")) || out.contains(&format!(":{text}")),
                    "{name}: {text} in {out}"
                );
            }
            assert!(
                props.contains(&format!("\\:{text}")),
                "properties: {text} in {props}"
            );
        }
        let yaml = String::from_utf8(value_file(&value, ValueFormat::Yaml).unwrap()).unwrap();
        let agg = String::from_utf8(aggregate(&e, OutputFormat::Yaml).unwrap()).unwrap();
        assert!(
            agg.contains("big: 123456789012345678901234567890\n"),
            "{agg}"
        );
        assert_eq!(
            yaml,
            "big: 123456789012345678901234567890\n\
             huge: !<tag:yaml.org,2002:int> \"-1234567890123456789012345678901234567890123\"\n\
             one: 1.0\n\
             \"inf\": !<tag:yaml.org,2002:float> \"1e400\"\n\
             neg0: !<tag:yaml.org,2002:int> \"-0\"\n\
             tenth: 0.1\n\
             exp: !<tag:yaml.org,2002:float> \"1E5\"\n\
             py: !<tag:yaml.org,2002:float> \"1e-07\"\n\
             int: 5432\n"
        );
        // A YAML reader sees numbers, not strings (serde-saphyr itself reads 30 digits as a float).
        let small =
            r#"{"big": 123456789012345678901234567890, "one": 1.0, "py": 1e-07, "exp": 1E5}"#;
        let yaml = value_file(
            &crate::state::parse_value(small).unwrap(),
            ValueFormat::Yaml,
        )
        .unwrap();
        let back: serde_json::Value = serde_saphyr::from_slice(&yaml).unwrap();
        assert!(back["big"].is_number(), "{back}");
        assert_eq!(back["one"].as_f64(), Some(1.0));
        assert_eq!(back["py"].as_f64(), Some(1e-7));
        assert_eq!(back["exp"].as_f64(), Some(1e5));
    }

    /// The deepest value the parser accepts renders in every format.
    #[test]
    fn deepest_accepted_value_renders_everywhere() {
        let depth = crate::state::MAX_VALUE_DEPTH;
        let raw = format!(
            "{}{}",
            r#"{"a":["#.repeat(depth / 2),
            "]}".repeat(depth / 2)
        );
        let value = crate::state::parse_value(&raw).unwrap();
        for format in [ValueFormat::Json, ValueFormat::Yaml] {
            assert!(value_file(&value, format).is_ok(), "{format:?}");
        }
        let e = entries(&[("deep", value)]);
        for format in [
            OutputFormat::Json,
            OutputFormat::Yaml,
            OutputFormat::Dotenv,
            OutputFormat::Properties,
        ] {
            assert!(aggregate(&e, format).is_ok(), "{format:?}");
        }
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
