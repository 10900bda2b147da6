//! minijinja templates with strict undefined: a missing key is an error naming the key and the template,
//! never an empty string.
//!
//! Context: `config` (key → value; `config["db.url"].host`), `entries` (list of `{key, category, value}`,
//! sorted by key) and `environment`. Values keep their JSON types; use `|tojson` to embed structures.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Object, Serde, Value};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};

use crate::config::ConfigError;
use crate::state::Snapshot;

/// All configured templates, parsed once at start.
pub struct Templates {
    env: Environment<'static>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Templates")
    }
}

fn template_name(path: &Path) -> String {
    path.display().to_string()
}

impl Templates {
    pub fn load(sources: &[PathBuf]) -> Result<Templates, ConfigError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        if let Ok(syntax) = SyntaxConfig::builder().keep_trailing_newline(true).build() {
            env.set_syntax(syntax);
        }
        env.set_auto_escape_callback(|_| AutoEscape::None);
        for path in sources {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!(
                    "--template: cannot read '{}': {}",
                    path.display(),
                    crate::util::io_reason(&e)
                ))
            })?;
            env.add_template_owned(template_name(path), text)
                .map_err(|e| {
                    ConfigError(format!(
                        "--template '{}': syntax error at line {}: {}",
                        path.display(),
                        e.line().unwrap_or(0),
                        e.detail().unwrap_or("invalid template")
                    ))
                })?;
        }
        Ok(Templates { env })
    }

    /// Render one template against a snapshot.
    pub fn render(&self, source: &Path, snap: &Snapshot) -> Result<Vec<u8>, String> {
        let name = template_name(source);
        let tmpl = self
            .env
            .get_template(&name)
            .map_err(|e| format!("template '{name}' is not loaded: {}", e.kind()))?;
        let config = Arc::new(ConfigObject {
            values: snap
                .entries
                .iter()
                .map(|(k, e)| (k.clone(), Value::from(Serde(&e.value))))
                .collect(),
            misses: Mutex::new(Vec::new()),
        });
        let entries: Vec<Value> = snap
            .entries
            .values()
            .map(|e| {
                minijinja::context! {
                    key => e.key.clone(),
                    category => e.category.clone(),
                    value => Value::from(Serde(&e.value)),
                }
            })
            .collect();
        let ctx = minijinja::context! {
            config => Value::from_dyn_object(config.clone()),
            entries => entries,
            environment => snap.environment.clone(),
        };
        tmpl.render(ctx).map(String::into_bytes).map_err(|e| {
            let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
            let missed = config.misses.lock().ok().and_then(|m| m.last().cloned());
            match (e.kind(), missed) {
                (ErrorKind::UndefinedError, Some(key)) => format!(
                    "template '{name}'{line}: key '{key}' is not in environment '{}' (or is filtered out)",
                    snap.environment
                ),
                (ErrorKind::UndefinedError, None) => format!(
                    "template '{name}'{line}: undefined variable or attribute (keys are read as config[\"key\"])"
                ),
                (kind, _) => format!(
                    "template '{name}'{line}: {kind}{}",
                    e.detail().map(|d| format!(": {d}")).unwrap_or_default()
                ),
            }
        })
    }
}

/// `config` in templates; remembers the keys looked up but missing, to name them in errors.
struct ConfigObject {
    values: BTreeMap<String, Value>,
    misses: Mutex<Vec<String>>,
}

impl fmt::Debug for ConfigObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<config: {} keys>", self.values.len())
    }
}

impl Object for ConfigObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let k = key.as_str()?;
        let found = self.values.get(k).cloned();
        if found.is_none()
            && let Ok(mut m) = self.misses.lock()
        {
            m.push(k.to_owned());
        }
        found
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.values
                .keys()
                .map(|k| Value::from(k.as_str()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Entry;
    use serde_json::json;

    fn snap() -> Snapshot {
        let mut s = Snapshot {
            environment: "prod".into(),
            ..Default::default()
        };
        for (k, v) in [
            ("db.url", json!({"host": "db", "port": 5432})),
            ("name", json!("app")),
        ] {
            s.entries.insert(
                k.into(),
                Entry {
                    key: k.into(),
                    category: None,
                    value: v,
                },
            );
        }
        s
    }

    fn render(src: &str) -> Result<String, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.conf.j2");
        std::fs::write(&path, src).unwrap();
        let t = Templates::load(std::slice::from_ref(&path)).map_err(|e| e.0)?;
        t.render(&path, &snap())
            .map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn renders_values_and_keeps_newline() {
        assert_eq!(
            render("host={{ config[\"db.url\"].host }}:{{ config[\"db.url\"].port }} <{{ config.name }}>\n").unwrap(),
            "host=db:5432 <app>\n"
        );
        assert_eq!(
            render("{% for e in entries %}{{ e.key }};{% endfor %}{{ environment }}").unwrap(),
            "db.url;name;prod"
        );
        assert_eq!(
            render("{{ config[\"db.url\"] | tojson }}").unwrap(),
            r#"{"host": "db", "port": 5432}"#
        );
    }

    #[test]
    fn missing_key_is_an_error_naming_it() {
        let err = render("a\nb={{ config[\"db.password\"] }}\n").unwrap_err();
        assert!(
            err.contains("'db.password'") && err.contains("t.conf.j2") && err.contains("line 2"),
            "{err}"
        );
        let err = render("{{ nope }}").unwrap_err();
        assert!(err.contains("undefined"), "{err}");
        assert!(render("{% if config.missing is defined %}x{% endif %}ok").unwrap() == "ok");
    }

    #[test]
    fn syntax_errors_are_config_errors() {
        let err = render("{{ config[ }}").unwrap_err();
        assert!(
            err.contains("syntax error") && err.contains("t.conf.j2"),
            "{err}"
        );
    }
}
