//! What marks an output as the agent's own, and keeps two agents off one output.
//!
//! Beside every output the agent keeps one small file, created `0600` and never replaced (its inode
//! carries the lock):
//! - `DIR/..osc-agent` for `--output-dir DIR`, hidden from readers like `..data`; single files written
//!   directly into DIR share it;
//! - `.NAME.osc-agent` beside any other single file `NAME`.
//!
//! The process takes an exclusive `flock` on it when it first claims the output and holds it until it
//! exits. Its content (JSON, rewritten in place under the lock) lists the generations the agent created
//! in DIR, the only ones it ever removes, and a salted digest of each key's value the output was last
//! completely written from, to name the keys that really changed after a restart. A torn or unreadable
//! content counts as no state: a directory is then adopted only when `..data` points at a generation
//! named exactly like the agent's, and every key counts as changed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{SinkError, no_follow};
use crate::config::Outputs;
use crate::state::Digests;
use crate::util::escape_path;

/// The lock and state file of an output directory.
pub(crate) const DIR_FILE: &str = "..osc-agent";
/// Larger state files are not read (the key record of 100,000 keys is about 6 MB).
const MAX_STATE: u64 = 64 << 20;

/// The content of a lock file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    /// Generation directories the agent created (the current one, and any it started and did not
    /// finish removing).
    #[serde(default)]
    pub generations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeyRecord>,
}

/// Which value each key had when the output was last completely written: `digests[key]` is a salted
/// digest of the key's value digest (never the value itself).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct KeyRecord {
    salt: String,
    digests: BTreeMap<String, String>,
}

/// The lock file of the single file `file`: the output directory's when `file` is directly in it,
/// else `.NAME.osc-agent` beside it.
pub(crate) fn file_lock_path(file: &Path, output_dir: Option<&Path>) -> PathBuf {
    let parent = super::file::parent(file);
    if let Some(d) = output_dir
        && same_dir(parent, d)
    {
        return d.join(DIR_FILE);
    }
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    parent.join(format!(".{name}.osc-agent"))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => match (std::path::absolute(a), std::path::absolute(b)) {
            (Ok(a), Ok(b)) => a.components().eq(b.components()),
            _ => a == b,
        },
    }
}

/// Every lock file that records keys for `outputs`, without duplicates.
pub(crate) fn record_files(outputs: &Outputs) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = outputs.dir.iter().map(|d| d.join(DIR_FILE)).collect();
    for (path, _) in super::single_files(outputs) {
        let lock = file_lock_path(path, outputs.dir.as_deref());
        if !files.contains(&lock) {
            files.push(lock);
        }
    }
    files
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another process holds it (its pid when `/proc/locks` shows it).
    Held(Option<u32>),
    Io(io::Error),
}

/// The locks this process holds, kept open (and so locked) until it exits.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Lock `path` (created `0600` when `create`, else opened read-only) for the rest of the process's
/// life, never through a link. `Ok(true)` when this call took it, `Ok(false)` when the process already
/// held it.
pub(crate) fn lock(path: &Path, create: bool) -> Result<bool, LockError> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(LockError::Io(io::Error::other(
            "a symbolic link is in the way of osc-agent's lock file",
        )));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(path)
        .map_err(LockError::Io)?;
    let meta = f.metadata().map_err(LockError::Io)?;
    if !meta.is_file() {
        return Err(LockError::Io(io::Error::other("not a regular file")));
    }
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // A held file that was deleted meanwhile no longer guards anything (and its inode may be reused).
    held.retain(|h| h.metadata().is_ok_and(|m| m.nlink() > 0));
    let same = |h: &File| {
        h.metadata()
            .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
    };
    if held.iter().any(same) {
        return Ok(false);
    }
    match f.try_lock() {
        Ok(()) => {
            held.push(f);
            Ok(true)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(LockError::Held(holder(meta.dev(), meta.ino())))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(LockError::Io(e)),
    }
}

/// The pid holding a `flock` on this inode, from `/proc/locks` (best effort).
fn holder(dev: u64, ino: u64) -> Option<u32> {
    use nix::sys::stat::{major, minor};
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let id = format!("{:02x}:{:02x}:{ino}", major(dev), minor(dev));
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&id.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

/// The error for an output whose lock `lock` could not be taken.
pub(crate) fn lock_error(output: &Path, lock: &Path, e: LockError) -> SinkError {
    match e {
        LockError::Held(pid) => SinkError {
            path: output.to_owned(),
            what: "not written".into(),
            reason: format!(
                "another osc-agent{} holds this output (lock file {}): run one agent per output",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                escape_path(lock)
            ),
        },
        LockError::Io(e) => SinkError {
            path: output.to_owned(),
            what: format!("cannot lock {}", escape_path(lock)),
            reason: crate::util::io_reason(&e),
        },
    }
}

/// The state in a lock file: `None` when there is no such file or its content is not a state (torn,
/// foreign); an empty file is an empty state. Errors: a link or a non-regular file in the way, I/O.
pub(crate) fn read_state(path: &Path) -> io::Result<Option<State>> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.len() == 0 {
        return Ok(Some(State::default()));
    }
    if meta.len() > MAX_STATE {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    f.take(MAX_STATE).read_to_end(&mut bytes)?;
    Ok(serde_json::from_slice(&bytes).ok())
}

/// Rewrite the state in place (the file keeps its inode, so its lock) and fsync it. A crash midway
/// leaves content that does not parse, read back as no state.
pub(crate) fn write_state(path: &Path, state: &State) -> io::Result<()> {
    let bytes = serde_json::to_vec(state).map_err(io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    f.write_all(&bytes)?;
    f.set_len(bytes.len() as u64)?;
    f.sync_data()
}

fn salted(salt: &str, key: &str, digest: &str) -> String {
    let mut h = crate::util::sha256_hex(format!("{salt}\0{key}\0{digest}").as_bytes());
    h.truncate(32);
    h
}

/// Keys whose digest differs from the record in the lock file `path` (added, changed, removed), sorted;
/// `None` without a record.
pub(crate) fn changed_keys(path: &Path, digests: &Digests) -> Option<Vec<String>> {
    let record = read_state(path).ok()??.keys?;
    let mut keys: Vec<String> = digests
        .iter()
        .filter(|(k, d)| record.digests.get(*k) != Some(&salted(&record.salt, k, d)))
        .map(|(k, _)| k.to_owned())
        .chain(
            record
                .digests
                .keys()
                .filter(|k| !digests.contains_key(k))
                .cloned(),
        )
        .collect();
    keys.sort();
    Some(keys)
}

/// Record `digests` in the lock file `path`, unless it already holds them. Nothing when the file does
/// not exist (the output keeps no lock file beside it).
pub(crate) fn record_keys(path: &Path, digests: &Digests) -> io::Result<()> {
    if std::fs::symlink_metadata(path).is_err()
        || changed_keys(path, digests).is_some_and(|c| c.is_empty())
    {
        return Ok(());
    }
    let state = match read_state(path)? {
        Some(state) => state,
        // A torn directory state is rebuilt by the directory's own claim, never here.
        None if path.file_name() == Some(DIR_FILE.as_ref()) => return Ok(()),
        None => State::default(),
    };
    let salt = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let record = KeyRecord {
        digests: digests
            .iter()
            .map(|(k, d)| (k.to_owned(), salted(&salt, k, d)))
            .collect(),
        salt,
    };
    write_state(
        path,
        &State {
            keys: Some(record),
            ..state
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(pairs: &[(&str, &str)]) -> Digests {
        pairs.iter().copied().collect()
    }

    #[test]
    fn key_record_names_added_changed_and_removed_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".app.env.osc-agent");
        assert_eq!(changed_keys(&path, &digests(&[("a", "1")])), None);
        std::fs::write(&path, "").unwrap();
        assert_eq!(changed_keys(&path, &digests(&[("a", "1")])), None);
        record_keys(&path, &digests(&[("a", "1"), ("b", "2"), ("c", "3")])).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("\"1\""), "digests are salted: {text}");
        assert_eq!(
            changed_keys(&path, &digests(&[("a", "1"), ("b", "9"), ("d", "4")])),
            Some(vec!["b".into(), "c".into(), "d".into()])
        );
        let before = std::fs::read(&path).unwrap();
        record_keys(&path, &digests(&[("a", "1"), ("b", "2"), ("c", "3")])).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "unchanged: not rewritten"
        );
        // A torn write reads as no record.
        std::fs::write(&path, &before[..before.len() / 2]).unwrap();
        assert_eq!(changed_keys(&path, &digests(&[("a", "1")])), None);
    }

    #[test]
    fn a_lock_held_elsewhere_is_refused_and_ours_is_reentrant() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("..osc-agent");
        std::fs::write(&path, "").unwrap();
        let other = File::open(&path).unwrap();
        other.try_lock().unwrap();
        let err = lock(&path, true).unwrap_err();
        assert!(
            matches!(err, LockError::Held(Some(pid)) if pid == std::process::id()),
            "{err:?}"
        );
        drop(other);
        assert!(lock(&path, true).unwrap());
        assert!(!lock(&path, true).unwrap(), "already ours");
        let msg = lock_error(tmp.path(), &path, LockError::Held(Some(7))).to_string();
        assert!(
            msg.contains("another osc-agent (pid 7) holds this output"),
            "{msg}"
        );
    }

    #[test]
    fn a_link_is_never_a_lock_file() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let path = tmp.path().join("..osc-agent");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(lock(&path, true), Err(LockError::Io(_))));
        assert!(read_state(&path).is_err());
        assert!(write_state(&path, &State::default()).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
