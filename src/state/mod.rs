//! State: the entries of one environment as the agent last read them, after selection.
//!
//! Events from the stream are only hints; the agent's truth is always a full list read, filtered here by
//! key globs and categories (client-side: a server-side category filter misses updates and deletes).

use std::collections::BTreeMap;
use std::fmt;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde_json::value::RawValue;
use serde_json::{Number, Value};
use tracing::warn;

use crate::config::{ConfigError, Selection, setting};
use crate::util::Escaped;

mod names;
pub use names::{Digests, NameMap, NameSet};

/// One configuration entry as listed by the server. `Debug` never shows the value.
#[derive(Clone, PartialEq, serde::Deserialize)]
pub struct Entry {
    pub key: String,
    #[serde(default)]
    pub category: Option<String>,
    pub value: serde_json::Value,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key)
            .field("category", &self.category)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Deepest nesting of arrays and objects accepted in one value (`[[1]]` is 2 levels). The renderers and
/// serde_json walk values recursively; a deeper value is skipped by [`parse_list`] with a warning.
pub const MAX_VALUE_DEPTH: usize = 127;

/// One element of the list response, its value still unparsed.
#[derive(serde::Deserialize)]
struct Listed<'a> {
    key: String,
    #[serde(default)]
    category: Option<String>,
    #[serde(borrow)]
    value: &'a RawValue,
}

/// Parse the body of `GET /configs?environment=E`: a JSON array of entries.
///
/// The array and each entry's fields are read first, each value separately (skipping a value is not
/// recursive in serde_json, so any nesting fits in the body's size): an entry whose value is nested
/// deeper than [`MAX_VALUE_DEPTH`] is left out with one warning naming its key, the others are returned.
/// Numbers keep the exact text the server sent (see [`parse_value`]).
///
/// # Errors
/// The body is not such an array (not JSON, an entry without `key` or `value`, a non-string key or
/// category): the reason gives the error class and position only, never text from the body.
pub fn parse_list(body: &[u8]) -> Result<Vec<Entry>, String> {
    let listed: Vec<Listed<'_>> =
        serde_json::from_slice(body).map_err(|e| crate::util::json_error_position(&e))?;
    let mut entries = Vec::with_capacity(listed.len());
    for item in listed {
        match parse_value(item.value.get()) {
            Ok(value) => entries.push(Entry {
                key: item.key,
                category: item.category,
                value,
            }),
            Err(why) => warn!(
                "key '{}' skipped: {why} (other keys are synced)",
                Escaped(&item.key)
            ),
        }
    }
    Ok(entries)
}

/// Parse one value (valid JSON text) with its numbers exactly as written: serde_json's
/// `arbitrary_precision` keeps every digit, and the exponents it respells (`1E5`, `1e5` → `1e+5`) get
/// their original spelling back.
///
/// # Errors
/// The value is nested deeper than [`MAX_VALUE_DEPTH`], or is not valid JSON; the message holds no
/// part of the value.
pub fn parse_value(raw: &str) -> Result<Value, String> {
    let scan = scan(raw);
    if scan.depth > MAX_VALUE_DEPTH {
        return Err(format!(
            "its value is nested deeper than {MAX_VALUE_DEPTH} levels of arrays and objects"
        ));
    }
    let mut value: Value = serde_json::from_str(raw).map_err(|e| {
        format!(
            "its value is not valid JSON ({})",
            crate::util::json_error_position(&e)
        )
    })?;
    if scan.respelled {
        restore_spelling(&scan.numbers, &mut value);
    }
    Ok(value)
}

/// What one pass over a value's JSON text finds.
struct Scan<'a> {
    /// Deepest nesting of arrays and objects.
    depth: usize,
    /// Number tokens, in document order.
    numbers: Vec<&'a str>,
    /// Some number has an exponent that serde_json respells.
    respelled: bool,
}

/// One iterative pass over JSON text (assumed valid): no recursion, whatever the nesting.
fn scan(raw: &str) -> Scan<'_> {
    let b = raw.as_bytes();
    let mut out = Scan {
        depth: 0,
        numbers: Vec::new(),
        respelled: false,
    };
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() {
                    match b[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                out.depth = out.depth.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let token = &raw[start..i];
                if let Some(e) = token.find(['e', 'E']) {
                    out.respelled |=
                        token[e..].starts_with('E') || !token[e + 1..].starts_with(['+', '-']);
                }
                out.numbers.push(token);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Give the numbers of `value` the spelling of `tokens` (the same numbers in document order). Leaves
/// `value` as it is when the two do not line up (an object with a duplicate key keeps only one value).
fn restore_spelling(tokens: &[&str], value: &mut Value) {
    fn numbers<'v>(v: &'v mut Value, out: &mut Vec<&'v mut Number>) {
        match v {
            Value::Number(n) => out.push(n),
            Value::Array(items) => items.iter_mut().for_each(|x| numbers(x, out)),
            Value::Object(map) => map.values_mut().for_each(|x| numbers(x, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    numbers(value, &mut found);
    let lined_up = found.len() == tokens.len()
        && found
            .iter()
            .zip(tokens)
            .all(|(n, t)| t.parse::<Number>().is_ok_and(|p| p.as_str() == n.as_str()));
    if lined_up {
        for (n, t) in found.into_iter().zip(tokens) {
            if n.as_str() != *t {
                // The token is a valid JSON number (the text parsed) equal to `n`: only its spelling differs.
                *n = Number::from_string_unchecked((*t).to_owned());
            }
        }
    }
}

/// The selected entries of one environment, by key (sorted, so rendering is deterministic).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub environment: String,
    pub entries: BTreeMap<String, Entry>,
}

/// Compiled key globs and categories.
#[derive(Clone, Debug)]
pub struct Filter {
    include: Option<GlobSet>,
    exclude: GlobSet,
    categories: Vec<String>,
}

fn globset(flag: &str, globs: &[String]) -> Result<GlobSet, ConfigError> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).map_err(|e| {
            ConfigError(format!("{}: bad glob '{g}': {}", setting(flag), e.kind()))
        })?);
    }
    b.build()
        .map_err(|e| ConfigError(format!("{}: {e}", setting(flag))))
}

impl Filter {
    pub fn new(sel: &Selection) -> Result<Filter, ConfigError> {
        Ok(Filter {
            include: if sel.include.is_empty() {
                None
            } else {
                Some(globset("include", &sel.include)?)
            },
            exclude: globset("exclude", &sel.exclude)?,
            categories: sel.categories.clone(),
        })
    }

    pub fn matches(&self, e: &Entry) -> bool {
        self.matches_key(&e.key, e.category.as_deref())
    }

    /// [`Filter::matches`] on a key and its category alone (an entry's metadata, without its value).
    pub fn matches_key(&self, key: &str, category: Option<&str>) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(key))
            && !self.exclude.is_match(key)
            && (self.categories.is_empty()
                || category.is_some_and(|c| self.categories.iter().any(|s| s == c)))
    }

    /// Build the snapshot of the selected entries.
    pub fn apply(&self, environment: &str, entries: Vec<Entry>) -> Snapshot {
        Snapshot {
            environment: environment.to_owned(),
            entries: entries
                .into_iter()
                .filter(|e| self.matches(e))
                .map(|e| (e.key.clone(), e))
                .collect(),
        }
    }

    /// The single key selected, when the include list is exactly one literal key (lets the stream
    /// subscribe with `key=`).
    pub fn single_key(sel: &Selection) -> Option<&str> {
        match sel.include.as_slice() {
            [k] if !k.contains(['*', '?', '[', '{', '\\']) => Some(k),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(key: &str, cat: Option<&str>) -> Entry {
        Entry {
            key: key.into(),
            category: cat.map(Into::into),
            value: json!("v"),
        }
    }

    #[test]
    fn include_exclude_and_categories() {
        let f = Filter::new(&Selection {
            include: vec!["db.*".into(), "api".into()],
            exclude: vec!["*.old".into()],
            categories: vec!["database".into()],
        })
        .unwrap();
        let snap = f.apply(
            "prod",
            vec![
                entry("db.url", Some("database")),
                entry("db.url.old", Some("database")),
                entry("db.pass", None),
                entry("api", Some("web")),
                entry("cache", Some("database")),
            ],
        );
        assert_eq!(snap.entries.keys().collect::<Vec<_>>(), vec!["db.url"]);
    }

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn values_up_to_the_depth_limit_parse() {
        for levels in [0, 1, MAX_VALUE_DEPTH - 1, MAX_VALUE_DEPTH] {
            let v = parse_value(&nested(levels)).unwrap();
            assert_eq!(serde_json::to_string(&v).unwrap(), nested(levels));
        }
        let obj = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_VALUE_DEPTH),
            "}".repeat(MAX_VALUE_DEPTH)
        );
        assert!(parse_value(&obj).is_ok());
        let err = parse_value(&nested(MAX_VALUE_DEPTH + 1)).unwrap_err();
        assert!(err.contains("nested deeper than"), "{err}");
        // Brackets inside strings do not count.
        assert!(parse_value(&format!("[\"{}\"]", "[".repeat(1000))).is_ok());
    }

    /// One entry nested too deep is skipped (the others are kept), whatever its depth: 100,000 levels
    /// parse, skip and drop without recursion.
    #[test]
    fn deep_entries_are_skipped_not_fatal() {
        for levels in [MAX_VALUE_DEPTH + 1, 130, 100_000] {
            let body = format!(
                r#"[{{"id":1,"key":"a","category":null,"environment":"prod","value":"x"}},
                   {{"id":2,"key":"deep\nkey","category":"c","environment":"prod","value":{}}},
                   {{"id":3,"key":"z","environment":"prod","value":{{"k":[1,2]}},"extra":{}}}]"#,
                nested(levels),
                nested(levels)
            );
            let entries = parse_list(body.as_bytes()).unwrap();
            let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, ["a", "z"], "{levels} levels");
        }
        assert!(parse_list(b"[{\"key\": \"a\"}]").is_err());
        assert!(parse_list(b"{}").is_err());
        let err = parse_list(b"[{\"key\": \"a\", \"value\": \"secret").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn numbers_keep_their_spelling() {
        for text in [
            "123456789012345678901234567890",
            "-0",
            "1.0",
            "0.1",
            "1e400",
            "1E400",
            "1e+400",
            "2.5E-3",
            "1e-07",
            "[1e5,{\"a\":1E+5,\"b\":\"1e5\"},-0.0e0]",
        ] {
            let v = parse_value(text).unwrap();
            assert_eq!(serde_json::to_string(&v).unwrap(), text);
        }
        // A duplicate key leaves one value: the spelling falls back to serde_json's (same number).
        let v = parse_value(r#"{"a":1e5,"a":2e5}"#).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), r#"{"a":2e+5}"#);
        let listed =
            parse_list(br#"[{"key":"n","value":{"big":123456789012345678901234567890,"e":1E3}}]"#)
                .unwrap();
        assert_eq!(
            serde_json::to_string(&listed[0].value).unwrap(),
            r#"{"big":123456789012345678901234567890,"e":1E3}"#
        );
    }

    #[test]
    fn debug_hides_values() {
        let e = Entry {
            key: "k".into(),
            category: None,
            value: json!({"password": "hunter2"}),
        };
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    #[test]
    fn single_key_only_for_one_literal() {
        let sel = |v: &[&str]| Selection {
            include: v.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(Filter::single_key(&sel(&["db.url"])), Some("db.url"));
        assert_eq!(Filter::single_key(&sel(&["db.*"])), None);
        assert_eq!(Filter::single_key(&sel(&["a", "b"])), None);
    }
}
