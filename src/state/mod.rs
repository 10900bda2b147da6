//! State: the entries of one environment as the agent last read them, after selection.
//!
//! Events from the stream are only hints; the agent's truth is always a full list read, filtered here by
//! key globs and categories (client-side: a server-side category filter misses updates and deletes).

use std::collections::BTreeMap;
use std::fmt;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::{ConfigError, Selection, setting};

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
        self.include.as_ref().is_none_or(|g| g.is_match(&e.key))
            && !self.exclude.is_match(&e.key)
            && (self.categories.is_empty()
                || e.category
                    .as_ref()
                    .is_some_and(|c| self.categories.contains(c)))
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
