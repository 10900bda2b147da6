//! minijinja templates with strict undefined: a missing key or attribute is an error naming it and the
//! template, never an empty string, a `null` or a `false`.
//!
//! Context: `config` (key → value; `config["db.url"].host`), `entries` (list of `{key, category, value}`,
//! sorted by key) and `environment`. Values keep their JSON types; use `|tojson` to embed structures.
//!
//! - **Strict everywhere.** Besides minijinja's own strict checks (printing, loops, `if`, comparisons,
//!   `~`, attribute access), every filter and test refuses an undefined argument, also inside a list or
//!   map built in the template. Only `is defined`, `is undefined` and `default` (`d`) accept one.
//! - **JSON null** is the template's `none`. Printed, it reads `null`, like in JSON: also inside printed
//!   lists and maps, in loops, and through `tojson`, `string`, `join` and the other filters that turn a
//!   value into text; `true`/`false` likewise. Only minijinja's `~` operator writes them its own way
//!   (`None`, `True`).
//! - **Numbers** print, and go through `tojson`, exactly as the server sent them. An integer of up to 128
//!   bits or a float whose text is what a 64-bit float prints is a plain number (arithmetic works); any
//!   other number (more digits, `1e400`, `-0`) is kept as its text: printing and `tojson` give that text,
//!   arithmetic on it is an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{
    Enumerator, Kwargs, Object, ObjectRepr, Rest, Value, ValueKind, ValueOrKwargs,
};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};

use crate::config::ConfigError;
use crate::state::Snapshot;
use crate::util::Escaped;

/// All configured templates, parsed once at start.
pub struct Templates {
    env: Environment<'static>,
    /// Names that resolve to globals (`range`, `dict`, ...): not reported as missing variables.
    globals: Arc<BTreeSet<String>>,
    /// Template texts by name, to tell a name written in the template from one computed from a value.
    sources: BTreeMap<String, String>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Templates")
    }
}

fn template_name(path: &Path) -> String {
    path.display().to_string()
}

/// Context variable through which filters reach the render's [`MissLog`] (not a name users write).
const MISS_LOG: &str = "__osc_agent_misses";

impl Templates {
    /// Parse every template.
    ///
    /// # Errors
    /// A template cannot be read or has a syntax error: the message names the file and line.
    pub fn load(sources: &[PathBuf]) -> Result<Templates, ConfigError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        if let Ok(syntax) = SyntaxConfig::builder().keep_trailing_newline(true).build() {
            env.set_syntax(syntax);
        }
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_formatter(|out, _state, value| {
            out.write_str(&print_text(value)?).map_err(Error::from)
        });
        install_strict_filters(&mut env);
        install_strict_tests(&mut env);
        let globals = Arc::new(env.globals().map(|(name, _)| name.to_owned()).collect());
        let mut texts = BTreeMap::new();
        for path in sources {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!(
                    "--template: cannot read '{}': {}",
                    path.display(),
                    crate::util::io_reason(&e)
                ))
            })?;
            texts.insert(template_name(path), text.clone());
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
        Ok(Templates {
            env,
            globals,
            sources: texts,
        })
    }

    /// Render one template against a snapshot.
    ///
    /// # Errors
    /// A lookup the template needs is missing (the message names the key or attribute and the line), or
    /// another template error (named by its kind and minijinja's detail).
    pub fn render(&self, source: &Path, snap: &Snapshot) -> Result<Vec<u8>, String> {
        let name = template_name(source);
        let tmpl = self
            .env
            .get_template(&name)
            .map_err(|e| format!("template '{name}' is not loaded: {}", e.kind()))?;
        let log = Arc::new(MissLog::default());
        let config = ConfigObject {
            environment: snap.environment.clone(),
            values: snap
                .entries
                .iter()
                .map(|(k, e)| {
                    let owner: Arc<str> = format!("the value of key '{}'", Escaped(k)).into();
                    (k.clone(), from_json(&e.value, &owner, &log))
                })
                .collect(),
            log: log.clone(),
        };
        let entry_owner: Arc<str> = "an item of entries".into();
        let entries: Vec<Value> = snap
            .entries
            .values()
            .map(|e| {
                let owner: Arc<str> = format!("the value of key '{}'", Escaped(&e.key)).into();
                let fields = [
                    ("key", Value::from(e.key.as_str())),
                    (
                        "category",
                        e.category.as_deref().map_or(Value::from(()), Value::from),
                    ),
                    ("value", from_json(&e.value, &owner, &log)),
                ];
                tracked_map(
                    fields.into_iter().map(|(k, v)| (Arc::from(k), v)),
                    &entry_owner,
                    &log,
                )
            })
            .collect();
        let root = Root {
            config: Value::from_object(config),
            entries: Value::from(entries),
            environment: Value::from(snap.environment.as_str()),
            log: log.clone(),
            globals: self.globals.clone(),
        };
        tmpl.render(Value::from_object(root))
            .map(String::into_bytes)
            .map_err(|e| {
                let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
                let undefined = e.kind() == ErrorKind::UndefinedError
                    || e.detail().is_some_and(|d| d.contains("undefined"));
                match (undefined, log.last()) {
                    (true, Some(miss)) => format!(
                        "template '{name}'{line}: {}",
                        miss.describe(self.sources.get(&name).map_or("", String::as_str))
                    ),
                    (true, None) => format!(
                        "template '{name}'{line}: undefined variable or attribute (keys are read as config[\"key\"])"
                    ),
                    (false, _) => format!(
                        "template '{name}'{line}: {}{}",
                        e.kind(),
                        e.detail().map(|d| format!(": {d}")).unwrap_or_default()
                    ),
                }
            })
    }
}

// ---------------------------------------------------------------------------------------------------
// The context: root, `config`, JSON values.

/// What a render looked up and did not find, newest last: only to name the culprit in an error.
#[derive(Debug, Default)]
struct MissLog(Mutex<Vec<Miss>>);

/// One failed lookup: `name` between two fixed parts of the message.
#[derive(Clone, Debug)]
struct Miss {
    before: String,
    name: String,
    after: String,
}

impl Miss {
    /// The message, naming the key, attribute or index only when the template's text holds it: a name
    /// computed from a value (`config.hosts[config.region]`) could be a secret.
    fn describe(&self, source: &str) -> String {
        let name = if source.contains(&self.name) {
            format!("'{}'", Escaped(&self.name))
        } else {
            "(computed from a value, not shown)".to_owned()
        };
        format!("{}{name}{}", self.before, self.after)
    }
}

impl MissLog {
    fn push(&self, before: impl Into<String>, name: &str, after: impl Into<String>) {
        if let Ok(mut m) = self.0.lock() {
            m.push(Miss {
                before: before.into(),
                name: name.to_owned(),
                after: after.into(),
            });
        }
    }
    /// Forget the miss `back` places before the newest one: `is defined` or `default` has dealt with it
    /// (arguments are evaluated left to right, each missing one adds one miss).
    fn forget(&self, back: usize) {
        if let Ok(mut m) = self.0.lock()
            && let Some(i) = m.len().checked_sub(back + 1)
        {
            m.remove(i);
        }
    }
    fn last(&self) -> Option<Miss> {
        self.0.lock().ok().and_then(|m| m.last().cloned())
    }
}

impl Object for MissLog {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }
}

/// The root of the context: `config`, `entries`, `environment`; reports other names as missing.
#[derive(Debug)]
struct Root {
    config: Value,
    entries: Value,
    environment: Value,
    log: Arc<MissLog>,
    globals: Arc<BTreeSet<String>>,
}

impl Object for Root {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "config" => Some(self.config.clone()),
            "entries" => Some(self.entries.clone()),
            "environment" => Some(self.environment.clone()),
            MISS_LOG => Some(Value::from_dyn_object(self.log.clone())),
            other => {
                if !self.globals.contains(other) {
                    self.log.push(
                        "variable ",
                        other,
                        " is not defined (the context holds config, entries and environment)",
                    );
                }
                None
            }
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["config", "entries", "environment"])
    }
}

/// `config` in templates; remembers the keys looked up but missing, to name them in errors.
struct ConfigObject {
    environment: String,
    values: BTreeMap<String, Value>,
    log: Arc<MissLog>,
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
        if found.is_none() {
            self.log.push(
                "key ",
                k,
                format!(
                    " is not in environment '{}' (or is filtered out)",
                    Escaped(&self.environment)
                ),
            );
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

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &json_text(&Value::from_dyn_object(self.clone()), Style::Spaced, false)
                .map_err(|_| fmt::Error)?,
        )
    }
}

/// A list or map from a JSON value (or an item of `entries`): reports missing attributes and indexes,
/// prints as JSON, keeps the order of map keys.
struct Tracked {
    body: Body,
    /// "the value of key 'db'", for messages.
    owner: Arc<str>,
    log: Arc<MissLog>,
}

enum Body {
    List(Vec<Value>),
    Map {
        keys: Vec<Value>,
        values: HashMap<Arc<str>, Value>,
    },
}

impl fmt::Debug for Tracked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.owner)
    }
}

fn tracked_list(items: Vec<Value>, owner: &Arc<str>, log: &Arc<MissLog>) -> Value {
    Value::from_object(Tracked {
        body: Body::List(items),
        owner: owner.clone(),
        log: log.clone(),
    })
}

fn tracked_map(
    pairs: impl Iterator<Item = (Arc<str>, Value)>,
    owner: &Arc<str>,
    log: &Arc<MissLog>,
) -> Value {
    let mut keys = Vec::new();
    let mut values = HashMap::new();
    for (k, v) in pairs {
        if values.insert(k.clone(), v).is_none() {
            keys.push(Value::from(k));
        }
    }
    Value::from_object(Tracked {
        body: Body::Map { keys, values },
        owner: owner.clone(),
        log: log.clone(),
    })
}

impl Object for Tracked {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.body {
            Body::List(_) => ObjectRepr::Seq,
            Body::Map { .. } => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let found = match &self.body {
            Body::List(items) => key.as_i64().and_then(|i| {
                let i = if i < 0 { i + items.len() as i64 } else { i };
                usize::try_from(i).ok().and_then(|i| items.get(i)).cloned()
            }),
            Body::Map { values, .. } => key.as_str().and_then(|k| values.get(k)).cloned(),
        };
        if found.is_none() {
            let after = format!(" is not in {}", self.owner);
            match (&self.body, key.as_str()) {
                (Body::List(_), _) => self.log.push("index ", &key.to_string(), after),
                (Body::Map { .. }, Some(k)) => self.log.push("attribute ", k, after),
                (Body::Map { .. }, None) => self.log.push("item ", &key.to_string(), after),
            }
        }
        found
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match &self.body {
            Body::List(items) => Enumerator::Seq(items.len()),
            Body::Map { keys, .. } => Enumerator::Values(keys.clone()),
        }
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(match &self.body {
            Body::List(items) => items.len(),
            Body::Map { keys, .. } => keys.len(),
        })
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &json_text(&Value::from_dyn_object(self.clone()), Style::Spaced, false)
                .map_err(|_| fmt::Error)?,
        )
    }
}

/// A number that no native minijinja number shows as sent (over 128 bits, `1e400`, `-0`): its text.
#[derive(Debug)]
struct RawNumber(serde_json::Number);

impl Object for RawNumber {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn is_true(self: &Arc<Self>) -> bool {
        self.0.as_str().parse::<f64>() != Ok(0.0)
    }

    fn custom_cmp(
        self: &Arc<Self>,
        other: &minijinja::value::DynObject,
    ) -> Option<std::cmp::Ordering> {
        let other = other.downcast_ref::<Self>()?;
        let (a, b) = (self.0.as_str(), other.0.as_str());
        let by_value = a
            .parse::<f64>()
            .ok()?
            .partial_cmp(&b.parse::<f64>().ok()?)?;
        Some(by_value.then_with(|| a.cmp(b)))
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// A JSON value as a template value (JSON null → `none`, numbers as described in the module docs).
/// Values are at most [`crate::state::MAX_VALUE_DEPTH`] deep, so the recursion is bounded.
fn from_json(v: &serde_json::Value, owner: &Arc<str>, log: &Arc<MissLog>) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Number(n) => number(n),
        serde_json::Value::Array(items) => tracked_list(
            items.iter().map(|x| from_json(x, owner, log)).collect(),
            owner,
            log,
        ),
        serde_json::Value::Object(map) => tracked_map(
            map.iter()
                .map(|(k, x)| (Arc::from(k.as_str()), from_json(x, owner, log))),
            owner,
            log,
        ),
    }
}

fn number(n: &serde_json::Number) -> Value {
    let text = n.as_str();
    if let Ok(i) = text.parse::<i64>()
        && i.to_string() == text
    {
        return Value::from(i);
    }
    if let Ok(i) = text.parse::<i128>()
        && i.to_string() == text
    {
        return Value::from(i);
    }
    if let Ok(u) = text.parse::<u128>()
        && u.to_string() == text
    {
        return Value::from(u);
    }
    if text.contains(['.', 'e', 'E'])
        && let Ok(f) = text.parse::<f64>()
        && f.is_finite()
        && Value::from(f).to_string() == text
        && float_json(f).as_deref() == Some(text)
    {
        return Value::from(f);
    }
    Value::from_object(RawNumber(n.clone()))
}

/// serde_json's text of a finite float (the same as minijinja's own `tojson`).
fn float_json(f: f64) -> Option<String> {
    serde_json::Number::from_f64(f).map(|n| n.to_string())
}

// ---------------------------------------------------------------------------------------------------
// Printing and JSON.

/// What `{{ value }}` writes: strings as they are, `null`, `true`/`false`, numbers as sent, lists and
/// maps as JSON.
fn print_text(value: &Value) -> Result<String, Error> {
    Ok(match value.kind() {
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => if value.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::Seq | ValueKind::Map => json_text(value, Style::Spaced, false)?,
        ValueKind::Undefined => return Err(undefined_error("printed")),
        _ => value.to_string(),
    })
}

/// The layout of JSON text.
#[derive(Clone, Copy, Debug)]
enum Style {
    /// `[1, 2]`, `{"a": 1}` (like minijinja's `tojson`).
    Spaced,
    /// One item per line, indented by this many spaces per level.
    Pretty(usize),
}

/// Deepest nesting written as JSON (data is at most [`crate::state::MAX_VALUE_DEPTH`] deep; this bounds
/// what a template builds itself).
const MAX_JSON_DEPTH: usize = crate::state::MAX_VALUE_DEPTH + 64;

/// JSON text of a template value; an undefined value anywhere in it is an error. `html_safe` escapes
/// `< > & '` in strings (as minijinja's `tojson` does).
fn json_text(value: &Value, style: Style, html_safe: bool) -> Result<String, Error> {
    let mut w = JsonWriter {
        out: String::new(),
        style,
        html_safe,
        depth: 0,
    };
    w.value(value)?;
    Ok(w.out)
}

struct JsonWriter {
    out: String,
    style: Style,
    html_safe: bool,
    depth: usize,
}

impl JsonWriter {
    fn value(&mut self, v: &Value) -> Result<(), Error> {
        if let Some(raw) = v.downcast_object_ref::<RawNumber>() {
            self.out.push_str(raw.0.as_str());
            return Ok(());
        }
        match v.kind() {
            ValueKind::Undefined => return Err(undefined_error("written as JSON")),
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    let _ = write!(self.out, "{v}");
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    self.out
                        .push_str(float_json(f).as_deref().unwrap_or("null"));
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default()),
            ValueKind::Bytes => {
                self.string(&String::from_utf8_lossy(v.as_bytes().unwrap_or_default()))
            }
            ValueKind::Seq | ValueKind::Iterable => {
                self.open('[')?;
                let mut first = true;
                for item in v.try_iter()? {
                    self.item(first);
                    first = false;
                    self.value(&item)?;
                }
                self.close(']', first);
            }
            ValueKind::Map => {
                self.open('{')?;
                let mut first = true;
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    self.item(first);
                    first = false;
                    self.key(&key)?;
                    self.out.push_str(": ");
                    self.value(&item)?;
                }
                self.close('}', first);
            }
            _ => self.string(&v.to_string()),
        }
        Ok(())
    }

    fn key(&mut self, k: &Value) -> Result<(), Error> {
        match k.kind() {
            ValueKind::String => self.string(k.as_str().unwrap_or_default()),
            ValueKind::Number | ValueKind::Bool | ValueKind::Plain => {
                let text = print_text(k)?;
                self.string(&text);
            }
            other => {
                return Err(Error::new(
                    ErrorKind::BadSerialization,
                    format!("cannot use a value of type {other} as a JSON key"),
                ));
            }
        }
        Ok(())
    }

    fn open(&mut self, c: char) -> Result<(), Error> {
        self.depth += 1;
        if self.depth > MAX_JSON_DEPTH {
            return Err(Error::new(
                ErrorKind::BadSerialization,
                format!("value nested deeper than {MAX_JSON_DEPTH} levels"),
            ));
        }
        self.out.push(c);
        Ok(())
    }

    fn item(&mut self, first: bool) {
        match self.style {
            Style::Spaced if !first => self.out.push_str(", "),
            Style::Spaced => {}
            Style::Pretty(indent) => {
                self.out.push_str(if first { "\n" } else { ",\n" });
                self.indent(indent);
            }
        }
    }

    fn close(&mut self, c: char, empty: bool) {
        self.depth -= 1;
        if let Style::Pretty(indent) = self.style
            && !empty
        {
            self.out.push('\n');
            self.indent(indent);
        }
        self.out.push(c);
    }

    fn indent(&mut self, indent: usize) {
        for _ in 0..indent * self.depth {
            self.out.push(' ');
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                '<' | '>' | '&' | '\'' if self.html_safe => {
                    let _ = write!(self.out, "\\u{:04x}", c as u32);
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

// ---------------------------------------------------------------------------------------------------
// Strict filters and tests.

fn undefined_error(what: &str) -> Error {
    Error::new(ErrorKind::UndefinedError, format!("undefined value {what}"))
}

/// The first undefined value in `v`, looking into lists and maps built in the template (values from the
/// server never hold one; lazy iterables are not walked, walking would consume them).
fn holds_undefined(v: &Value) -> bool {
    let mut stack = vec![v.clone()];
    while let Some(v) = stack.pop() {
        if v.is_undefined() {
            return true;
        }
        if v.downcast_object_ref::<Tracked>().is_some()
            || v.downcast_object_ref::<ConfigObject>().is_some()
        {
            continue;
        }
        match v.kind() {
            ValueKind::Seq => stack.extend(v.try_iter().into_iter().flatten()),
            ValueKind::Map => {
                if let Ok(keys) = v.try_iter() {
                    for k in keys {
                        stack.push(v.get_item(&k).unwrap_or_default());
                    }
                }
            }
            _ => {}
        }
    }
    false
}

/// `v` where a filter turns it into text: `none` and booleans in their printed (JSON) form.
fn as_printed(v: Value) -> Value {
    match v.kind() {
        ValueKind::None | ValueKind::Bool => print_text(&v).map_or(v, Value::from),
        _ => v,
    }
}

/// Filters that turn their first argument into text (`join`: each item; `format`: every argument).
const TEXT_FILTERS: &[&str] = &[
    "lower",
    "upper",
    "title",
    "capitalize",
    "replace",
    "trim",
    "split",
    "lines",
    "indent",
    "string",
];

fn builtin_filters() -> Vec<(&'static str, Value)> {
    use minijinja::filters as f;
    vec![
        ("safe", Value::from_function(f::safe)),
        ("escape", Value::from_function(f::escape)),
        ("e", Value::from_function(f::escape)),
        ("lower", Value::from_function(f::lower)),
        ("upper", Value::from_function(f::upper)),
        ("title", Value::from_function(f::title)),
        ("capitalize", Value::from_function(f::capitalize)),
        ("replace", Value::from_function(f::replace)),
        ("length", Value::from_function(f::length)),
        ("count", Value::from_function(f::length)),
        ("dictsort", Value::from_function(f::dictsort)),
        ("items", Value::from_function(f::items)),
        ("reverse", Value::from_function(f::reverse)),
        ("trim", Value::from_function(f::trim)),
        ("join", Value::from_function(f::join)),
        ("split", Value::from_function(f::split)),
        ("lines", Value::from_function(f::lines)),
        ("round", Value::from_function(f::round)),
        ("abs", Value::from_function(f::abs)),
        ("int", Value::from_function(f::int)),
        ("float", Value::from_function(f::float)),
        ("attr", Value::from_function(f::attr)),
        ("first", Value::from_function(f::first)),
        ("last", Value::from_function(f::last)),
        ("min", Value::from_function(f::min)),
        ("max", Value::from_function(f::max)),
        ("sort", Value::from_function(f::sort)),
        ("list", Value::from_function(f::list)),
        ("string", Value::from_function(f::string)),
        ("bool", Value::from_function(f::bool)),
        ("batch", Value::from_function(f::batch)),
        ("slice", Value::from_function(f::slice)),
        ("sum", Value::from_function(f::sum)),
        ("indent", Value::from_function(f::indent)),
        ("select", Value::from_function(f::select)),
        ("reject", Value::from_function(f::reject)),
        ("selectattr", Value::from_function(f::selectattr)),
        ("rejectattr", Value::from_function(f::rejectattr)),
        ("map", Value::from_function(f::map)),
        ("groupby", Value::from_function(f::groupby)),
        ("unique", Value::from_function(f::unique)),
        ("chain", Value::from_function(f::chain)),
        ("zip", Value::from_function(f::zip)),
        ("pprint", Value::from_function(f::pprint)),
        ("format", Value::from_function(f::format)),
        ("tojson", Value::from_function(tojson)),
    ]
}

fn builtin_tests() -> Vec<(&'static str, Value)> {
    use minijinja::tests as t;
    vec![
        ("none", Value::from_function(t::is_none)),
        ("safe", Value::from_function(t::is_safe)),
        ("escaped", Value::from_function(t::is_safe)),
        ("boolean", Value::from_function(t::is_boolean)),
        ("odd", Value::from_function(t::is_odd)),
        ("even", Value::from_function(t::is_even)),
        ("divisibleby", Value::from_function(t::is_divisibleby)),
        ("number", Value::from_function(t::is_number)),
        ("integer", Value::from_function(t::is_integer)),
        ("int", Value::from_function(t::is_integer)),
        ("float", Value::from_function(t::is_float)),
        ("string", Value::from_function(t::is_string)),
        ("sequence", Value::from_function(t::is_sequence)),
        ("iterable", Value::from_function(t::is_iterable)),
        ("mapping", Value::from_function(t::is_mapping)),
        ("startingwith", Value::from_function(t::is_startingwith)),
        ("endingwith", Value::from_function(t::is_endingwith)),
        ("lower", Value::from_function(t::is_lower)),
        ("upper", Value::from_function(t::is_upper)),
        ("sameas", Value::from_function(t::is_sameas)),
        ("eq", Value::from_function(t::is_eq)),
        ("equalto", Value::from_function(t::is_eq)),
        ("==", Value::from_function(t::is_eq)),
        ("ne", Value::from_function(t::is_ne)),
        ("!=", Value::from_function(t::is_ne)),
        ("lt", Value::from_function(t::is_lt)),
        ("lessthan", Value::from_function(t::is_lt)),
        ("<", Value::from_function(t::is_lt)),
        ("le", Value::from_function(t::is_le)),
        ("<=", Value::from_function(t::is_le)),
        ("gt", Value::from_function(t::is_gt)),
        ("greaterthan", Value::from_function(t::is_gt)),
        (">", Value::from_function(t::is_gt)),
        ("ge", Value::from_function(t::is_ge)),
        (">=", Value::from_function(t::is_ge)),
        ("in", Value::from_function(t::is_in)),
        ("true", Value::from_function(t::is_true)),
        ("false", Value::from_function(t::is_false)),
        ("filter", Value::from_function(t::is_filter)),
        ("test", Value::from_function(t::is_test)),
    ]
}

/// Refuses undefined arguments before calling `inner`.
fn strict_args(name: &'static str, kind: &'static str, args: &[Value]) -> Result<(), Error> {
    if args.iter().any(holds_undefined) {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            format!("undefined value passed to the {kind} '{name}'"),
        ));
    }
    Ok(())
}

/// The render's miss log, reached through the context.
fn miss_log(state: &State) -> Option<Arc<MissLog>> {
    state.lookup(MISS_LOG)?.downcast_object::<MissLog>()
}

fn install_strict_filters(env: &mut Environment<'static>) {
    for (name, inner) in builtin_filters() {
        let text = TEXT_FILTERS.contains(&name);
        env.add_filter(
            name,
            move |state: &mut State, args: Rest<ValueOrKwargs>| -> Result<Value, Error> {
                let mut args = args.into_values();
                strict_args(name, "filter", &args)?;
                match name {
                    "format" => args = args.into_iter().map(as_printed).collect(),
                    "join" if args.first().is_some_and(|v| v.kind() == ValueKind::Seq) => {
                        let items: Vec<Value> = args[0].try_iter()?.map(as_printed).collect();
                        args[0] = Value::from(items);
                    }
                    _ if text => {
                        if let Some(first) = args.first_mut() {
                            *first = as_printed(first.clone());
                        }
                    }
                    _ => {}
                }
                inner.call(state, &args)
            },
        );
    }
    let default = Value::from_function(minijinja::filters::default);
    for name in ["default", "d"] {
        let default = default.clone();
        env.add_filter(
            name,
            move |state: &mut State, args: Rest<ValueOrKwargs>| -> Result<Value, Error> {
                let args = args.into_values();
                if args.first().is_some_and(Value::is_undefined)
                    && let Some(log) = miss_log(state)
                {
                    log.forget(args[1..].iter().filter(|a| a.is_undefined()).count());
                }
                default.call(state, &args)
            },
        );
    }
}

fn install_strict_tests(env: &mut Environment<'static>) {
    for (name, inner) in builtin_tests() {
        env.add_test(
            name,
            move |state: &mut State, args: Rest<ValueOrKwargs>| -> Result<bool, Error> {
                let args = args.into_values();
                strict_args(name, "test", &args)?;
                Ok(inner.call(state, &args)?.is_true())
            },
        );
    }
    for (name, defined) in [("defined", true), ("undefined", false)] {
        env.add_test(name, move |state: &State, v: &Value| -> bool {
            if v.is_undefined()
                && let Some(log) = miss_log(state)
            {
                log.forget(0);
            }
            v.is_undefined() != defined
        });
    }
}

/// `tojson`, like minijinja's (`indent` as argument or keyword, HTML-safe, `", "` separators), with
/// numbers as sent and an error for an undefined value anywhere in the argument.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None if kwargs.has("indent") => Some(kwargs.get::<Value>("indent")?),
        None => None,
    };
    kwargs.assert_all_used()?;
    if indent.as_ref().is_some_and(Value::is_undefined) {
        return Err(undefined_error("passed to the filter 'tojson'"));
    }
    let style = match indent {
        None => Style::Spaced,
        Some(v) if v.kind() == ValueKind::Bool => {
            if v.is_true() {
                Style::Pretty(2)
            } else {
                Style::Spaced
            }
        }
        Some(v) => Style::Pretty(usize::try_from(v)?),
    };
    if value.is_undefined() {
        return Err(undefined_error("passed to the filter 'tojson'"));
    }
    Ok(Value::from_safe_string(json_text(value, style, true)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Entry;

    fn snap() -> Snapshot {
        let mut s = Snapshot {
            environment: "prod".into(),
            ..Default::default()
        };
        for (k, v) in [
            ("db.url", r#"{"host": "db", "port": 5432}"#),
            ("name", r#""app""#),
            (
                "db",
                r#"{"password": "pw", "user": "u", "opt": null, "on": true}"#,
            ),
            ("list", r#"[null, true, 1, "x"]"#),
            (
                "nums",
                r#"{"big": 123456789012345678901234567890, "huge": 1234567890123456789012345678901234567890123, "one": 1.0, "inf": 1e400, "neg0": -0, "tenth": 0.1, "exp": 1E5, "small": 1e-07}"#,
            ),
            ("users", r#"[{"name": "a", "email": "a@x"}, {"name": "b"}]"#),
        ] {
            s.entries.insert(
                k.into(),
                Entry {
                    key: k.into(),
                    category: None,
                    value: crate::state::parse_value(v).unwrap(),
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
            // The random temp directory's name may hold any letters ("/tmp/.tmpwK…" holds "pw"):
            // errors are checked without it.
            .map_err(|e| e.replace(&*dir.path().to_string_lossy(), "DIR"))
    }

    #[track_caller]
    fn ok(src: &str, expected: &str) {
        assert_eq!(render(src).as_deref(), Ok(expected), "template {src:?}");
    }

    /// Fails naming `what`, the template and the line.
    #[track_caller]
    fn fails(src: &str, what: &str) {
        match render(src) {
            Ok(out) => panic!("template {src:?} rendered {out:?}, expected an error naming {what}"),
            Err(e) => assert!(
                e.contains(what) && e.contains("t.conf.j2") && e.contains("line 1"),
                "template {src:?}: error {e:?} should name {what}"
            ),
        }
    }

    #[test]
    fn renders_values_and_keeps_newline() {
        ok(
            "host={{ config[\"db.url\"].host }}:{{ config[\"db.url\"].port }} <{{ config.name }}>\n",
            "host=db:5432 <app>\n",
        );
        ok(
            "{% for e in entries %}{{ e.key }};{% endfor %}{{ environment }}",
            "db;db.url;list;name;nums;users;prod",
        );
        ok(
            "{{ config[\"db.url\"] | tojson }}",
            r#"{"host": "db", "port": 5432}"#,
        );
        ok("{{ config[\"db.url\"].port + 1 }}", "5433");
    }

    #[test]
    fn missing_key_is_an_error_naming_it() {
        let err = render("a\nb={{ config[\"db.password\"] }}\n").unwrap_err();
        assert!(
            err.contains("'db.password'") && err.contains("t.conf.j2") && err.contains("line 2"),
            "{err}"
        );
        fails("{{ nope }}", "'nope'");
        ok("{% if config.missing is defined %}x{% endif %}ok", "ok");
    }

    /// A missing key or attribute fails in every position, naming what is missing; only `is defined`,
    /// `is undefined` and `default` accept it.
    #[test]
    fn strict_undefined_in_every_position() {
        let attr = "'passwrd' is not in the value of key 'db'";
        for src in [
            "{{ config.db.passwrd }}",
            "{{ config.db.passwrd | tojson }}",
            "{{ config[\"db\"].passwrd | tojson }}",
            "{{ config.db.passwrd | tojson(indent=2) }}",
            "{{ config.db.passwrd | upper }}",
            "{{ config.db.passwrd | length }}",
            "{{ config.db.passwrd | string }}",
            "{{ config.db.passwrd | list }}",
            "{{ config.db.passwrd | first }}",
            "{{ config.db.passwrd | int }}",
            "{{ config.db.passwrd | bool }}",
            "{{ config.db.passwrd | pprint }}",
            "{{ config.db.passwrd | escape }}",
            "{{ config.db.passwrd | replace(\"a\", \"b\") }}",
            "{{ \"%s\" | format(config.db.passwrd) }}",
            "{{ [config.db.user, config.db.passwrd] | join(\",\") }}",
            "{{ [config.db.passwrd] | length }}",
            "{{ [config.db.passwrd] }}",
            "{{ [config.db.passwrd] | tojson }}",
            "{{ {\"p\": config.db.passwrd} | tojson }}",
            "{{ {\"p\": config.db.passwrd} }}",
            "{{ dict(p=config.db.passwrd) | tojson }}",
            "{{ config.db.passwrd is none }}",
            "{{ config.db.passwrd is string }}",
            "{{ config.db.passwrd is eq(1) }}",
            "{{ \"a\" is in([config.db.passwrd]) }}",
            "{{ config.db.passwrd == none }}",
            "{{ config.db.passwrd ~ \"x\" }}",
            "{{ config.db.passwrd + 1 }}",
            "{{ config.db.passwrd in [1] }}",
            "{% if config.db.passwrd %}x{% endif %}",
            "{% if not config.db.passwrd %}x{% endif %}",
            "{{ config.db.passwrd or \"x\" }}",
            "{% for x in config.db.passwrd %}{% endfor %}",
            "{% for x in [config.db.passwrd] %}{{ x }}{% endfor %}",
            "{% set p = config.db.passwrd %}{{ p }}",
            "{% macro m(v) %}{{ v | tojson }}{% endmacro %}{{ m(config.db.passwrd) }}",
            "{{ [config.db.passwrd] | map(\"upper\") | list }}",
            "{{ [config.db.passwrd] | select(\"none\") | list }}",
            "{{ config.db.passwrd | default(config.db.other) | tojson }}",
            "{{ config.list | tojson(indent=config.db.passwrd) }}",
            "{{ config.list | tojson(config.db.passwrd) }}",
            "{{ config.list | join(config.db.passwrd) }}",
            "{{ config.list | map(attribute=config.db.passwrd) | list }}",
            "{{ config.list | sort(attribute=config.db.passwrd) }}",
        ] {
            if src.contains("other") {
                fails(src, "'other' is not in the value of key 'db'");
            } else {
                fails(src, attr);
            }
        }
        fails(
            "{{ config.nokey | tojson }}",
            "key 'nokey' is not in environment 'prod'",
        );
        fails(
            "{{ config.list[9] | tojson }}",
            "index '9' is not in the value of key 'list'",
        );
        fails(
            "{{ entries[0].valu | tojson }}",
            "attribute 'valu' is not in an item of entries",
        );
        fails("{{ nope | tojson }}", "variable 'nope' is not defined");

        ok("{{ config.db.passwrd is defined }}", "false");
        ok("{{ config.db.passwrd is undefined }}", "true");
        ok("{{ config.db.passwrd | default(\"d\") }}", "d");
        ok("{{ config.db.passwrd | d(config.db.user) }}", "u");
        ok("{{ config.nokey | default(\"d\") | tojson }}", "\"d\"");
        ok("{% if \"nokey\" in config %}x{% else %}no{% endif %}", "no");
        ok("{% if \"password\" in config.db %}yes{% endif %}", "yes");
        ok(
            "{{ config.users | selectattr(\"email\", \"defined\") | map(attribute=\"name\") | join(\",\") }}",
            "a",
        );
        ok("{{ range(3) | list | tojson }}", "[0, 1, 2]");
        // A miss dealt with by `is defined` is not blamed for a later, unrelated error.
        let err =
            render("{% if config.x is defined %}{% endif %}{{ \"s\".foo | tojson }}").unwrap_err();
        assert!(!err.contains("'x'"), "{err}");
    }

    /// JSON null is `none` and prints as `null`, everywhere; booleans print as `true`/`false`.
    #[test]
    fn null_and_booleans_print_as_json() {
        ok("{{ config.db.opt }}", "null");
        ok("{{ config.db.on }}", "true");
        ok(
            "{{ config.db.opt is none }}|{{ config.db.opt == none }}|{{ config.db.opt is defined }}",
            "true|true|true",
        );
        ok("{% if config.db.opt %}x{% else %}falsy{% endif %}", "falsy");
        ok("{{ config.db.opt | default(\"d\", true) }}", "d");
        ok("{{ config.list }}", r#"[null, true, 1, "x"]"#);
        ok(
            "{{ config.db }}",
            r#"{"password": "pw", "user": "u", "opt": null, "on": true}"#,
        );
        ok(
            "{% for v in config.list %}{{ v }} {% endfor %}",
            "null true 1 x ",
        );
        ok("{{ config.list | join(\",\") }}", "null,true,1,x");
        ok(
            "{{ config.db.opt | string }}|{{ config.db.on | string }}",
            "null|true",
        );
        ok("{{ config.db.opt | upper }}", "NULL");
        ok(
            "{{ \"%s %s\" | format(config.db.opt, config.db.on) }}",
            "null true",
        );
        ok(
            "{{ config.db.opt | tojson }}|{{ config.list | tojson }}",
            "null|[null, true, 1, \"x\"]",
        );
        ok(
            "{{ config.list | tojson(indent=2) }}",
            "[\n  null,\n  true,\n  1,\n  \"x\"\n]",
        );
        ok("{{ \"<&'>\" | tojson }}", r#""\u003c\u0026\u0027\u003e""#);
        ok("{{ entries[0].category }}", "null");
    }

    /// Numbers print and go through `tojson` exactly as sent.
    #[test]
    fn numbers_as_sent() {
        let all = ["big", "huge", "one", "inf", "neg0", "tenth", "exp", "small"];
        let sent = [
            "123456789012345678901234567890",
            "1234567890123456789012345678901234567890123",
            "1.0",
            "1e400",
            "-0",
            "0.1",
            "1E5",
            "1e-07",
        ];
        for (k, text) in all.iter().zip(sent) {
            ok(&format!("{{{{ config.nums.{k} }}}}"), text);
            ok(&format!("{{{{ config.nums.{k} | tojson }}}}"), text);
            ok(&format!("{{{{ config.nums.{k} | string }}}}"), text);
            ok(
                &format!("{{{{ [config.nums.{k}] | tojson }}}}"),
                &format!("[{text}]"),
            );
        }
        ok(
            "{{ config.nums }}",
            "{\"big\": 123456789012345678901234567890, \"huge\": 1234567890123456789012345678901234567890123, \"one\": 1.0, \"inf\": 1e400, \"neg0\": -0, \"tenth\": 0.1, \"exp\": 1E5, \"small\": 1e-07}",
        );
        ok(
            "{{ config.nums.big + 1 }}",
            "123456789012345678901234567891",
        );
        ok("{{ config.nums.huge == config.nums.huge }}", "true");
    }

    #[test]
    fn deepest_accepted_value_renders() {
        let depth = crate::state::MAX_VALUE_DEPTH;
        let raw = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let mut snap = snap();
        snap.entries.get_mut("name").unwrap().value = crate::state::parse_value(&raw).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.j2");
        std::fs::write(&path, "{{ config.name | tojson }}|{{ config.name }}").unwrap();
        let t = Templates::load(std::slice::from_ref(&path)).unwrap();
        let out = String::from_utf8(t.render(&path, &snap).unwrap()).unwrap();
        let compact = raw.clone();
        assert_eq!(out, format!("{compact}|{compact}"));
    }

    #[test]
    fn syntax_errors_are_config_errors() {
        let err = render("{{ config[ }}").unwrap_err();
        assert!(
            err.contains("syntax error") && err.contains("t.conf.j2"),
            "{err}"
        );
    }

    #[test]
    fn errors_never_show_values() {
        // A lookup computed from a value does not show the value.
        for src in [
            "{{ config.db[config.name] | tojson }}",
            "{{ config[config.db.password] }}",
            "{{ config.list[config[\"db.url\"].port] }}",
        ] {
            let err = render(src).unwrap_err();
            assert!(
                err.contains("(computed from a value, not shown)"),
                "{src}: {err}"
            );
            assert!(
                !err.contains("app") && !err.contains("pw") && !err.contains("5432"),
                "{src}: {err}"
            );
        }
        for src in [
            "{{ config.db.password + 1 }}",
            "{{ config.db.password | int }}",
            "{{ config.db.password.x }}",
            "{{ config.db | tojson(indent=\"pw\") }}",
        ] {
            let err = render(src).unwrap_err();
            assert!(!err.contains("pw"), "{src}: {err}");
        }
    }
}
