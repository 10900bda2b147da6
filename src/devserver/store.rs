//! The dev server's entries: ids, timestamps, "sealing" and optional persistence.
//!
//! Upstream encrypts every value under a key derived from the caller's `X-User-Key`; a request made
//! with another user key cannot decrypt those rows and fails with `500 {"detail":"Internal error: "}`.
//! The dev server keeps values in plain text but remembers, per entry, a *fingerprint* of the user key
//! that last wrote it (`sha256(server salt || user key)`), and refuses exactly where upstream fails.
//! The user key itself is never stored.
//!
//! With `--data-file`, the store is loaded at start and saved after each write (temporary file +
//! rename, mode 0600). **The file holds values in plain text: it is for development only.**

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::clock;

/// Marker written into the data file, checked when loading.
const DATA_FORMAT: &str = "osc-agent-dev-server-data/1";

/// Hex `sha256(server salt || user key)`: identifies a user key without storing it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(String);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = self.0.get(..8).unwrap_or(&self.0);
        write!(f, "Fingerprint({short}…)")
    }
}

/// One stored configuration entry.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: i64,
    pub key: String,
    pub category: Option<String>,
    pub environment: String,
    pub value: Value,
    pub created_at: String,
    pub updated_at: String,
    /// Fingerprint of the user key that last wrote the entry.
    pub sealed_by: Fingerprint,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("environment", &self.environment)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// The REST representation: `id, key, category, environment, value` (+ timestamps when `full`).
    pub fn to_json(&self, full: bool) -> Value {
        let mut map = serde_json::Map::new();
        map.insert("id".into(), self.id.into());
        map.insert("key".into(), self.key.clone().into());
        map.insert("category".into(), self.category.clone().into());
        map.insert("environment".into(), self.environment.clone().into());
        map.insert("value".into(), self.value.clone());
        if full {
            map.insert("created_at".into(), self.created_at.clone().into());
            map.insert("updated_at".into(), self.updated_at.clone().into());
        }
        Value::Object(map)
    }
}

/// One row of `GET /cluster/configs`, fields in the upstream's order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Metadata {
    pub key: String,
    pub category: Option<String>,
    pub environment: String,
    /// `YYYY-MM-DD HH:MM:SS.ffffff`, UTC.
    pub created_at: String,
    /// `YYYY-MM-DD HH:MM:SS.ffffff`, UTC; bumped by every PUT, even of an identical value.
    pub updated_at: String,
}

/// Why a store operation failed; the HTTP layer maps each to the upstream answer.
#[derive(Debug, PartialEq, Eq)]
pub enum StoreError {
    NotFound,
    AlreadyExists,
    /// A row in the selection was written under another user key (upstream: 500).
    Sealed,
    /// The data file could not be written; the change was rolled back.
    Persist(String),
}

/// A new entry as given by `POST /configs` or a seed file.
#[derive(Clone, PartialEq)]
pub struct NewEntry {
    pub key: String,
    pub environment: String,
    pub category: Option<String>,
    pub value: Value,
}

impl fmt::Debug for NewEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewEntry")
            .field("key", &self.key)
            .field("environment", &self.environment)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct DataFile {
    format: String,
    warning: String,
    fingerprint_salt: String,
    next_id: i64,
    entries: Vec<Entry>,
}

#[derive(Clone)]
struct Contents {
    next_id: i64,
    entries: BTreeMap<i64, Entry>,
}

/// All entries, ordered by id (the upstream's list order).
pub struct Store {
    salt: [u8; 32],
    contents: Contents,
    data_file: Option<PathBuf>,
}

impl Store {
    /// An empty in-memory store.
    pub fn in_memory() -> Self {
        Self {
            salt: crate::backup::random_salt(),
            contents: Contents {
                next_id: 1,
                entries: BTreeMap::new(),
            },
            data_file: None,
        }
    }

    /// A store persisted in `path`: loaded if the file exists, otherwise created on the first save.
    /// Errors are one line and do not name the file (the caller does).
    pub fn open(path: &Path) -> Result<Self, String> {
        let mut store = Self::in_memory();
        store.data_file = Some(path.to_owned());
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(store),
            Err(e) => return Err(format!("cannot read: {e}")),
        };
        let data: DataFile = serde_json::from_str(&text).map_err(|e| {
            format!(
                "not a dev-server data file (JSON error at line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        if data.format != DATA_FORMAT {
            return Err(format!(
                "unknown data file format '{}' (expected {DATA_FORMAT})",
                data.format.chars().take(64).collect::<String>()
            ));
        }
        let salt = hex::decode(&data.fingerprint_salt)
            .ok()
            .and_then(|s| <[u8; 32]>::try_from(s).ok())
            .ok_or("fingerprint_salt is not 64 hex digits")?;
        let mut entries = BTreeMap::new();
        for entry in data.entries {
            if entry.id >= data.next_id {
                return Err(format!("entry id {} is not below next_id", entry.id));
            }
            if entries.insert(entry.id, entry).is_some() {
                return Err("duplicate entry id".into());
            }
        }
        store.salt = salt;
        store.contents = Contents {
            next_id: data.next_id,
            entries,
        };
        Ok(store)
    }

    pub fn fingerprint(&self, user_key: &str) -> Fingerprint {
        let mut hasher = Sha256::new();
        hasher.update(self.salt);
        hasher.update(user_key.as_bytes());
        Fingerprint(hex::encode(hasher.finalize()))
    }

    pub fn len(&self) -> usize {
        self.contents.entries.len()
    }

    /// `GET /configs/{key}`: the entry, if the caller's key sealed it.
    pub fn get(
        &self,
        environment: &str,
        key: &str,
        fp: &Fingerprint,
    ) -> Result<&Entry, StoreError> {
        let entry = self
            .contents
            .find(environment, key)
            .ok_or(StoreError::NotFound)?;
        unsealed(entry, fp)
    }

    /// `GET /configs` and `POST /backup`: entries matching the filters (empty filter = all). Fails
    /// as a whole if any selected row is sealed under another key, like upstream.
    pub fn select(
        &self,
        environment: Option<&str>,
        category: Option<&str>,
        fp: &Fingerprint,
    ) -> Result<Vec<&Entry>, StoreError> {
        let selected: Vec<&Entry> = self
            .contents
            .entries
            .values()
            .filter(|e| environment.is_none_or(|env| e.environment == env))
            .filter(|e| category.is_none_or(|c| e.category.as_deref() == Some(c)))
            .collect();
        if selected.iter().any(|e| &e.sealed_by != fp) {
            return Err(StoreError::Sealed);
        }
        Ok(selected)
    }

    /// `GET /cluster/configs`: the metadata of every entry matching the filters (`None` = all),
    /// in id order, whatever user key sealed it (upstream reads these columns without decrypting).
    /// Timestamps in SQLite text form (see [`clock::sqlite_text`]); values never appear.
    pub fn metadata(&self, environment: Option<&str>, category: Option<&str>) -> Vec<Metadata> {
        self.contents
            .entries
            .values()
            .filter(|e| environment.is_none_or(|env| e.environment == env))
            .filter(|e| category.is_none_or(|c| e.category.as_deref() == Some(c)))
            .map(|e| Metadata {
                key: e.key.clone(),
                category: e.category.clone(),
                environment: e.environment.clone(),
                created_at: clock::sqlite_text(&e.created_at),
                updated_at: clock::sqlite_text(&e.updated_at),
            })
            .collect()
    }

    /// `POST /configs`: any user key may create a new entry.
    pub fn create(&mut self, new: NewEntry, fp: &Fingerprint) -> Result<Entry, StoreError> {
        if self.contents.find(&new.environment, &new.key).is_some() {
            return Err(StoreError::AlreadyExists);
        }
        let fp = fp.clone();
        self.commit(move |c| Ok(c.insert(new, fp)))
    }

    /// `PUT /configs/{key}`: replaces the value; a `None` category keeps the stored one.
    pub fn update(
        &mut self,
        environment: &str,
        key: &str,
        value: Value,
        category: Option<String>,
        fp: &Fingerprint,
    ) -> Result<Entry, StoreError> {
        let id = self.writable_id(environment, key, fp)?;
        self.commit(move |c| {
            let entry = c.entries.get_mut(&id).ok_or(StoreError::NotFound)?;
            entry.value = value;
            if category.is_some() {
                entry.category = category;
            }
            entry.updated_at = clock::utc_z();
            Ok(entry.clone())
        })
    }

    /// `DELETE /configs/{key}`.
    pub fn delete(
        &mut self,
        environment: &str,
        key: &str,
        fp: &Fingerprint,
    ) -> Result<Entry, StoreError> {
        let id = self.writable_id(environment, key, fp)?;
        self.commit(move |c| c.entries.remove(&id).ok_or(StoreError::NotFound))
    }

    /// Adds seed entries sealed under `fp`, skipping (environment, key) pairs that already exist
    /// (so restarting with the same `--seed` and `--data-file` is idempotent). Returns how many
    /// were added.
    pub fn seed(&mut self, entries: Vec<NewEntry>, fp: &Fingerprint) -> Result<usize, StoreError> {
        let fp = fp.clone();
        self.commit(move |c| {
            let mut added = 0;
            for new in entries {
                if c.find(&new.environment, &new.key).is_none() {
                    c.insert(new, fp.clone());
                    added += 1;
                }
            }
            Ok(added)
        })
    }

    /// Writes to a row sealed under another key fail like upstream (which cannot decrypt it).
    fn writable_id(
        &self,
        environment: &str,
        key: &str,
        fp: &Fingerprint,
    ) -> Result<i64, StoreError> {
        let entry = self
            .contents
            .find(environment, key)
            .ok_or(StoreError::NotFound)?;
        Ok(unsealed(entry, fp)?.id)
    }

    /// Applies `change`, saves the data file if any, and rolls back when saving fails.
    fn commit<T>(
        &mut self,
        change: impl FnOnce(&mut Contents) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Some(path) = self.data_file.clone() else {
            return change(&mut self.contents);
        };
        let before = self.contents.clone();
        let result = change(&mut self.contents)?;
        if let Err(e) = self.save(&path) {
            self.contents = before;
            return Err(StoreError::Persist(e.to_string()));
        }
        Ok(result)
    }

    fn save(&self, path: &Path) -> std::io::Result<()> {
        let data = DataFile {
            format: DATA_FORMAT.into(),
            warning: "DEV ONLY: osc-agent dev-server stores values in plain text".into(),
            fingerprint_salt: hex::encode(self.salt),
            next_id: self.contents.next_id,
            entries: self.contents.entries.values().cloned().collect(),
        };
        let mut json = serde_json::to_vec_pretty(&data).map_err(std::io::Error::other)?;
        json.push(b'\n');
        write_atomically(path, &json)
    }
}

impl Contents {
    fn find(&self, environment: &str, key: &str) -> Option<&Entry> {
        self.entries
            .values()
            .find(|e| e.environment == environment && e.key == key)
    }

    fn insert(&mut self, new: NewEntry, fp: Fingerprint) -> Entry {
        let now = clock::utc_z();
        let entry = Entry {
            id: self.next_id,
            key: new.key,
            category: new.category,
            environment: new.environment,
            value: new.value,
            created_at: now.clone(),
            updated_at: now,
            sealed_by: fp,
        };
        self.next_id += 1;
        self.entries.insert(entry.id, entry.clone());
        entry
    }
}

fn unsealed<'a>(entry: &'a Entry, fp: &Fingerprint) -> Result<&'a Entry, StoreError> {
    if &entry.sealed_by == fp {
        Ok(entry)
    } else {
        Err(StoreError::Sealed)
    }
}

/// Writes `bytes` to a temporary file next to `path` (mode 0600 on Unix), syncs it and renames it
/// over `path`, so readers never see a partial file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Why a top-level value is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadValue {
    Null,
    Fractional,
    TooLarge,
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadValue::Null => "value must not be null",
            BadValue::Fractional => "value must not be a floating-point number",
            BadValue::TooLarge => "value is an integer outside the 64-bit range",
        })
    }
}

/// Upstream validates `value` as pydantic's `Union[dict, str, int, bool, list]`: a top-level null or
/// a number with a fractional part is refused, and an integral float (`1.0`) becomes an integer
/// (pydantic's lax `int`). Nested values are kept as they are.
pub fn accept_value(value: &Value) -> Result<Value, BadValue> {
    match value {
        Value::Null => Err(BadValue::Null),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() != 0.0 || !f.is_finite() {
                Err(BadValue::Fractional)
            } else if f.abs() < 9.2e18 {
                // In range and integral: the conversion is exact.
                Ok(Value::from(f as i64))
            } else {
                Err(BadValue::TooLarge)
            }
        }
        other => Ok(other.clone()),
    }
}

/// Length limits of the upstream's schema, in characters.
pub const KEY_MAX: usize = 255;
pub const ENVIRONMENT_MAX: usize = 100;
pub const CATEGORY_MAX: usize = 100;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn new(env: &str, key: &str, value: Value) -> NewEntry {
        NewEntry {
            key: key.into(),
            environment: env.into(),
            category: Some("cat".into()),
            value,
        }
    }

    #[test]
    fn ids_sealing_and_category_rules() {
        let mut store = Store::in_memory();
        let alice = store.fingerprint("alice-key-1");
        let bob = store.fingerprint("bob-key-12");
        assert_ne!(alice, bob);

        let a = store.create(new("prod", "a", json!(1)), &alice).unwrap();
        let b = store.create(new("prod", "b", json!("x")), &alice).unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(
            store.create(new("prod", "a", json!(2)), &bob),
            Err(StoreError::AlreadyExists)
        );

        // PUT without category keeps it; the id is kept across updates.
        let a2 = store.update("prod", "a", json!(3), None, &alice).unwrap();
        assert_eq!((a2.id, a2.category.as_deref()), (1, Some("cat")));
        assert_eq!(a2.value, json!(3));

        // Bob may create a new row, but cannot read, list, update or delete Alice's rows.
        store.create(new("dev", "c", json!(true)), &bob).unwrap();
        assert_eq!(store.get("prod", "a", &bob).err(), Some(StoreError::Sealed));
        assert_eq!(
            store.select(None, None, &bob).err(),
            Some(StoreError::Sealed)
        );
        assert_eq!(store.select(Some("dev"), None, &bob).unwrap().len(), 1);
        assert_eq!(
            store.select(None, None, &alice).err(),
            Some(StoreError::Sealed)
        );
        assert_eq!(
            store.update("prod", "a", json!(4), None, &bob).err(),
            Some(StoreError::Sealed)
        );
        assert_eq!(
            store.delete("prod", "a", &bob).err(),
            Some(StoreError::Sealed)
        );
        assert_eq!(
            store.get("prod", "zz", &bob).err(),
            Some(StoreError::NotFound)
        );

        // Delete + create gives a new id.
        store.delete("prod", "a", &alice).unwrap();
        let a3 = store.create(new("prod", "a", json!(5)), &alice).unwrap();
        assert_eq!(a3.id, 4);
        let listed: Vec<i64> = store
            .select(Some("prod"), Some("cat"), &alice)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(listed, vec![2, 4]);
    }

    #[test]
    fn entry_json_field_order() {
        let mut store = Store::in_memory();
        let fp = store.fingerprint("some-user-key");
        let e = store
            .create(new("prod", "db", json!({"b": 1, "a": 2})), &fp)
            .unwrap();
        let short = serde_json::to_string(&e.to_json(false)).unwrap();
        assert_eq!(
            short,
            r#"{"id":1,"key":"db","category":"cat","environment":"prod","value":{"b":1,"a":2}}"#
        );
        let full = e.to_json(true);
        let keys: Vec<&str> = full
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "key",
                "category",
                "environment",
                "value",
                "created_at",
                "updated_at"
            ]
        );
        assert!(!format!("{e:?}").contains("\"a\""));
    }

    #[test]
    fn value_validation() {
        assert_eq!(accept_value(&json!(null)), Err(BadValue::Null));
        assert_eq!(accept_value(&json!(1.5)), Err(BadValue::Fractional));
        assert_eq!(accept_value(&json!(1e30)), Err(BadValue::TooLarge));
        assert_eq!(accept_value(&json!(-3.0)), Ok(json!(-3)));
        for ok in [
            json!(1),
            json!("s"),
            json!(false),
            json!([1.5, null]),
            json!({"f": 0.5}),
        ] {
            assert_eq!(accept_value(&ok), Ok(ok.clone()));
        }
    }

    #[test]
    fn persistence_round_trip_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev-data.json");
        let mut store = Store::open(&path).unwrap();
        let fp = store.fingerprint("persisted-key");
        store
            .create(new("prod", "a", json!({"x": [1, 2]})), &fp)
            .unwrap();
        store.create(new("prod", "b", json!("gone")), &fp).unwrap();
        store.delete("prod", "b", &fp).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("persisted-key"),
            "the user key is never stored"
        );
        let reopened = Store::open(&path).unwrap();
        let fp2 = reopened.fingerprint("persisted-key");
        assert_eq!(fp, fp2, "the salt is persisted");
        let entry = reopened.get("prod", "a", &fp2).unwrap();
        assert_eq!(entry.value, json!({"x": [1, 2]}));
        assert_eq!(reopened.contents.next_id, 3);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A failing save leaves memory unchanged.
        let mut broken = Store::open(&path).unwrap();
        broken.data_file = Some(dir.path().join("missing-dir/data.json"));
        let err = broken.create(new("prod", "c", json!(1)), &fp2);
        assert!(matches!(err, Err(StoreError::Persist(_))));
        assert_eq!(broken.len(), 1);

        std::fs::write(&path, "{not json").unwrap();
        assert!(Store::open(&path).is_err());
    }
}
