//! The one-file-per-key directory, written like kubelet writes a ConfigMap volume:
//!
//! ```text
//! out/
//!   ..2026_11_23_05_00_14.814411000_1a2b3c4d/   one immutable generation: every file, made durable by one syncfs
//!   ..data -> ..2026_11_23_05_00_14.814411000_1a2b3c4d
//!   db.url -> ..data/db.url                     one visible link per key
//!   ..osc-agent                                 lock and state (see `own`): the generations it wrote
//! ```
//!
//! A new generation is recorded in `..osc-agent`, written in full into a new hidden directory, then a
//! `..data_tmp` link to it is renamed over `..data`: one atomic step switches every file at once. Links
//! of new keys are added, links of deleted keys removed, and the previous generation deleted. A reader
//! that resolves `..data` once and reads every file below that directory sees one generation, never a
//! mix; a reader of one file always sees a whole file.
//!
//! Only generations recorded in `..osc-agent` are ever removed; a directory whose `..data` points at a
//! generation the agent did not write (a kubelet-managed volume) is refused, untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tracing::info;

use super::own::{self, DIR_FILE, State};
use super::{SinkError, abandoned, dir_mode, random_suffix, same_file, sync_dir};
use crate::config::FileOptions;
use crate::render::DirPayload;
use crate::util::{Escaped, escape_path};

pub const DATA_LINK: &str = "..data";
const DATA_TMP_LINK: &str = "..data_tmp";

/// What one directory write did.
#[derive(Debug, Default)]
pub struct DirOutcome {
    /// A new generation was swapped in (content changed).
    pub swapped: bool,
    pub files_written: usize,
    /// Visible links created or removed while the content itself was unchanged.
    pub links_repaired: usize,
    /// Keys not written because a file the agent does not manage holds their name.
    pub conflicts: Vec<SinkError>,
}

/// The generation `..data` points at, if any.
pub fn current_generation(dir: &Path) -> Option<OsString> {
    let target = std::fs::read_link(dir.join(DATA_LINK)).ok()?;
    let name = target.file_name()?.to_owned();
    (target.as_os_str() == name && name.as_encoded_bytes().starts_with(b"..")).then_some(name)
}

/// Is `name` exactly what the agent names a generation: `..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN_xxxxxxxx`
/// (UTC time, nanoseconds, 8 random lower-case hex digits)? Kubelet's own generations
/// (`..YYYY_MM_DD_HH_MM_SS.DIGITS`) never match.
pub fn is_generation_name(name: &str) -> bool {
    const SHAPE: &[u8] = b"..dddd_dd_dd_dd_dd_dd.ddddddddd_";
    let b = name.as_bytes();
    b.len() == SHAPE.len() + 8
        && SHAPE.iter().zip(b).all(|(s, c)| match s {
            b'd' => c.is_ascii_digit(),
            s => s == c,
        })
        && super::is_random_suffix(&name[SHAPE.len()..])
}

fn link_target(name: &str) -> PathBuf {
    Path::new(DATA_LINK).join(name)
}

/// Is `dir/name` one of our links (`name -> ..data/name`)?
fn is_our_link(dir: &Path, name: &str) -> bool {
    std::fs::read_link(dir.join(name)).is_ok_and(|t| t == link_target(name))
}

fn refuse(dir: &Path, reason: String) -> SinkError {
    SinkError {
        path: dir.to_owned(),
        what: "refusing to manage this directory".into(),
        reason,
    }
}

/// Where `..data` points when it names an entry of `dir` (`None`: no `..data`, or a dangling or
/// outside target, which the next write simply replaces). Error: `..data` is not a link.
fn data_entry(dir: &Path) -> Result<Option<String>, SinkError> {
    let data = dir.join(DATA_LINK);
    match std::fs::symlink_metadata(&data) {
        Ok(m) if m.file_type().is_symlink() => {}
        Ok(_) => {
            return Err(refuse(
                dir,
                "'..data' exists and is not a link (not written by osc-agent)".into(),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SinkError::io(dir, "cannot read '..data'", &e)),
    }
    let Some(name) = current_generation(dir) else {
        return Ok(None);
    };
    let name = name.to_string_lossy().into_owned();
    Ok(std::fs::symlink_metadata(dir.join(&name))
        .is_ok()
        .then_some(name))
}

/// A directory written without a lock file (by an earlier release) is the agent's only when `..data`
/// (if any) points at a directory named exactly like the agent's generations. Error: it points at
/// something else (a kubelet volume, another tool's directory).
fn check_adoptable(dir: &Path, current: Option<&str>) -> Result<(), SinkError> {
    let Some(current) = current else {
        return Ok(());
    };
    if is_generation_name(current)
        && std::fs::symlink_metadata(dir.join(current)).is_ok_and(|m| m.is_dir())
    {
        return Ok(());
    }
    Err(refuse(
        dir,
        format!(
            "'..data' points at '{}', which osc-agent did not write (a Kubernetes volume or another \
             tool's directory); use an empty directory",
            Escaped(current)
        ),
    ))
}

/// Adopt a directory that passes [`check_adoptable`]: every directory named exactly like a generation
/// becomes the agent's, nothing else. Without `..data`, none (nothing is known to be the agent's).
fn adopt(dir: &Path, current: Option<&str>) -> Result<Vec<String>, SinkError> {
    check_adoptable(dir, current)?;
    if current.is_none() {
        return Ok(Vec::new());
    }
    let mut generations = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| SinkError::io(dir, "cannot list", &e))? {
        let entry = entry.map_err(|e| SinkError::io(dir, "cannot list", &e))?;
        if let Some(name) = entry.file_name().to_str()
            && is_generation_name(name)
            && entry.file_type().is_ok_and(|t| t.is_dir())
        {
            generations.push(name.to_owned());
        }
    }
    info!(dir = %escape_path(dir), generations = generations.len(),
          "adopted an output directory written by an earlier osc-agent release");
    Ok(generations)
}

/// Take `dir` for this process: its lock (see `own`), its state, a check that `..data` points at a
/// generation the agent wrote, and the removal of every other generation the agent wrote (partial
/// ones of an interrupted write, old ones) and of a stale `..data_tmp`. Idempotent.
pub(crate) fn claim(dir: &Path) -> Result<State, SinkError> {
    let lock = dir.join(DIR_FILE);
    let current = data_entry(dir)?;
    if current.is_some() && std::fs::symlink_metadata(&lock).is_err() {
        // Checked before creating anything in a directory that may not be ours.
        check_adoptable(dir, current.as_deref())?;
    }
    own::lock(&lock, true).map_err(|e| own::lock_error(dir, &lock, e))?;
    let lock_path = lock.as_path();
    let io = |what: &'static str| move |e: io::Error| SinkError::io(lock_path, what, &e);
    let mut state = match own::read_state(&lock).map_err(io("cannot read the state"))? {
        Some(s) if !s.generations.is_empty() || current.is_none() => s,
        previous => {
            let s = State {
                generations: adopt(dir, current.as_deref())?,
                keys: previous.and_then(|p| p.keys),
            };
            own::write_state(&lock, &s).map_err(io("cannot write the state"))?;
            s
        }
    };
    if let Some(current) = &current
        && !state.generations.contains(current)
    {
        return Err(refuse(
            dir,
            format!(
                "'..data' points at '{}', a generation osc-agent did not write (a Kubernetes volume, \
                 another tool or another agent); use an empty directory",
                Escaped(current)
            ),
        ));
    }
    let removed = remove_stale(dir, &mut state, current.as_deref())?;
    if removed > 0 {
        info!(dir = %escape_path(dir), removed, "removed generations an earlier run left unfinished");
    }
    Ok(state)
}

/// Remove every generation in `state` but `keep`, then a stale `..data_tmp` link; rewrite the state.
/// Only real directories named like generations are removed; other names are forgotten.
fn remove_stale(dir: &Path, state: &mut State, keep: Option<&str>) -> Result<usize, SinkError> {
    let before = state.generations.clone();
    let mut removed = 0;
    let mut failed = None;
    state.generations.retain(|g| {
        if Some(g.as_str()) == keep {
            return true;
        }
        if !is_generation_name(g) {
            return false;
        }
        let path = dir.join(g);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    removed += 1;
                    false
                }
                Err(e) => {
                    failed.get_or_insert(e);
                    true
                }
            },
            // Gone, or replaced by something that is not ours: forgotten, left alone.
            _ => false,
        }
    });
    if state.generations != before {
        own::write_state(&dir.join(DIR_FILE), state)
            .map_err(|e| SinkError::io(dir, "cannot write the state", &e))?;
    }
    let tmp = dir.join(DATA_TMP_LINK);
    if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(&tmp);
    }
    match failed {
        Some(e) => Err(SinkError::io(dir, "cannot remove an old generation", &e)),
        None => Ok(removed),
    }
}

pub fn write(payload: &DirPayload, opts: &FileOptions) -> Result<DirOutcome, SinkError> {
    write_with(payload, opts, &super::aborting)
}

/// [`write`], abandoning a new generation (removed again) as soon as `abort` turns true.
fn write_with(
    payload: &DirPayload,
    opts: &FileOptions,
    abort: &dyn Fn() -> bool,
) -> Result<DirOutcome, SinkError> {
    let dir = payload.path.as_path();
    let io = |what: &'static str| move |e: std::io::Error| SinkError::io(dir, what, &e);
    if abort() {
        return Err(io("not written")(abandoned()));
    }
    super::create_dirs(dir, opts).map_err(io("cannot create the output directory"))?;
    let mut state = claim(dir)?;

    let mut outcome = DirOutcome::default();
    // A name held by something we did not create is left alone and reported.
    let mut files: BTreeMap<&str, &[u8]> = BTreeMap::new();
    for (name, bytes) in payload.files.iter() {
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok() && !is_our_link(dir, name) {
            outcome.conflicts.push(SinkError {
                path,
                what: format!("key '{}' not written", Escaped(name)),
                reason: "a file osc-agent does not manage has this name; move it away".into(),
            });
            continue;
        }
        files.insert(name, bytes);
    }

    let current = current_generation(dir).map(|g| g.to_string_lossy().into_owned());
    let unchanged = current.as_ref().is_some_and(|gen_name| {
        state.generations.contains(gen_name)
            && generation_matches(&dir.join(gen_name), &files, opts)
    });
    let mut changed_dir = false;
    let generation = if unchanged {
        current.clone()
    } else {
        let name = new_generation(dir, &mut state, &files, opts, abort)?;
        outcome.swapped = true;
        outcome.files_written = files.len();
        changed_dir = true;
        Some(name)
    };

    // Visible links: add missing ones, drop those of keys that are gone.
    for name in files.keys() {
        if !is_our_link(dir, name) {
            std::os::unix::fs::symlink(link_target(name), dir.join(name))
                .map_err(io("cannot create a link"))?;
            changed_dir = true;
            if unchanged {
                outcome.links_repaired += 1;
            }
        }
    }
    let wanted: BTreeSet<&str> = files.keys().copied().collect();
    for entry in std::fs::read_dir(dir).map_err(io("cannot list the output directory"))? {
        let entry = entry.map_err(io("cannot list the output directory"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("..") && !wanted.contains(name) && is_our_link(dir, name) {
            std::fs::remove_file(entry.path())
                .map_err(io("cannot remove the link of a deleted key"))?;
            changed_dir = true;
            if unchanged {
                outcome.links_repaired += 1;
            }
        }
    }
    // Old generations: only those the agent wrote.
    if remove_stale(dir, &mut state, generation.as_deref())? > 0 {
        changed_dir = true;
    }
    if changed_dir {
        sync_dir(dir).map_err(io("cannot fsync the output directory"))?;
    }
    Ok(outcome)
}

/// Does this generation directory hold exactly these files, with these bytes, mode and owner?
fn generation_matches(gen_dir: &Path, files: &BTreeMap<&str, &[u8]>, opts: &FileOptions) -> bool {
    if !std::fs::symlink_metadata(gen_dir).is_ok_and(|m| m.is_dir()) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(gen_dir) else {
        return false;
    };
    let mut count = 0;
    for entry in entries {
        let Ok(entry) = entry else { return false };
        let name = entry.file_name();
        let Some(bytes) = name.to_str().and_then(|n| files.get(n)) else {
            return false;
        };
        if !same_file(&entry.path(), bytes, opts) {
            return false;
        }
        count += 1;
    }
    count == files.len()
}

/// Record a new generation in the state, write it in full, fsync it, and point `..data` at it. On
/// error (or when abandoned) nothing of it remains, and the state forgets it.
fn new_generation(
    dir: &Path,
    state: &mut State,
    files: &BTreeMap<&str, &[u8]>,
    opts: &FileOptions,
    abort: &dyn Fn() -> bool,
) -> Result<String, SinkError> {
    let lock = dir.join(DIR_FILE);
    let name = (0..100)
        .map(|_| {
            let now = jiff::Timestamp::now();
            format!(
                "..{}.{:09}_{}",
                now.strftime("%Y_%m_%d_%H_%M_%S"),
                now.subsec_nanosecond(),
                random_suffix()
            )
        })
        .find(|n| std::fs::symlink_metadata(dir.join(n)).is_err())
        .ok_or_else(|| SinkError {
            path: dir.to_owned(),
            what: "cannot create a new generation directory".into(),
            reason: "no free name".into(),
        })?;
    // Recorded first: a crash from here on leaves a generation the next start knows to remove.
    state.generations.push(name.clone());
    own::write_state(&lock, state)
        .map_err(|e| SinkError::io(&lock, "cannot write the state", &e))?;
    let path = dir.join(&name);
    // Checked once more after the flush (a long syncfs): once shutdown started, no swap begins, so an
    // exit at the shutdown limit never falls between `..data` and the visible links.
    let result = write_generation(&path, files, opts, abort)
        .and_then(|()| if abort() { Err(abandoned()) } else { Ok(()) })
        .map_err(|e| SinkError::io(dir, "cannot write the new generation", &e))
        .and_then(|()| swap_data_link(dir, &name));
    if let Err(e) = result {
        if std::fs::remove_dir_all(&path).is_ok() || std::fs::symlink_metadata(&path).is_err() {
            state.generations.retain(|g| *g != name);
            let _ = own::write_state(&lock, state);
        }
        return Err(e);
    }
    Ok(name)
}

/// Create the generation directory `path` and its files (through its descriptor: never through a
/// link), stopping with an error between two files or chunks when `abort` turns true.
fn write_generation(
    path: &Path,
    files: &BTreeMap<&str, &[u8]>,
    opts: &FileOptions,
    abort: &dyn Fn() -> bool,
) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .mode(dir_mode(opts.mode))
        .create(path)?;
    let generation = super::set_up_new_dir(path, opts)?;
    let flags =
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    for (name, bytes) in files {
        if abort() {
            return Err(abandoned());
        }
        let fd = nix::fcntl::openat(
            &generation,
            *name,
            flags,
            Mode::from_bits_truncate(opts.mode),
        )?;
        let file = super::fill_unsynced(File::from(fd), bytes, opts, abort)?;
        if flush_each(files.len()) {
            file.sync_all()?;
        }
    }
    if flush_each(files.len()) {
        // The files, the generation directory's entries, and its own entry in the output directory.
        generation.sync_all()?;
        return path
            .parent()
            .map_or(Ok(()), |parent| File::open(parent)?.sync_all());
    }
    // One flush for the whole generation, not one per file: syncfs(2) commits every dirty file, inode
    // and directory entry of the file system holding it (the new files and the directory included),
    // so `..data` is only swapped to a generation that a power loss cannot take back. On tmpfs (the
    // usual memory-backed volume) it costs nothing. It also flushes other writers' dirty data on that
    // file system, which is the price of O(1) flushes per generation.
    nix::unistd::syncfs(&generation).map_err(io::Error::from)
}

/// Generations of at most this many files are made durable file by file (each file, then the
/// directories: at most 18 fsyncs), larger ones by one `syncfs`. A few fsyncs never wait for other
/// writers' dirty data, which one `syncfs` does on a file system shared with other pods (an `emptyDir`
/// on the node's disk): a small change should not pay for a neighbour's writes.
const FLUSH_EACH_MAX_FILES: usize = 16;

fn flush_each(files: usize) -> bool {
    files <= FLUSH_EACH_MAX_FILES
}

/// Point `..data` at `generation` atomically: a `..data_tmp` link renamed over it.
fn swap_data_link(dir: &Path, generation: &str) -> Result<(), SinkError> {
    let tmp = dir.join(DATA_TMP_LINK);
    if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(&tmp);
    }
    let result = std::os::unix::fs::symlink(generation, &tmp)
        .and_then(|()| std::fs::rename(&tmp, dir.join(DATA_LINK)));
    if let Err(e) = result {
        if std::fs::read_link(&tmp).is_ok_and(|t| t == Path::new(generation)) {
            let _ = std::fs::remove_file(&tmp);
        }
        return Err(SinkError::io(dir, "cannot swap the ..data link", &e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn opts() -> FileOptions {
        FileOptions {
            mode: 0o600,
            uid: None,
            gid: None,
        }
    }

    fn payload(dir: &Path, pairs: &[(&str, &str)]) -> DirPayload {
        DirPayload {
            path: dir.to_owned(),
            files: pairs.iter().map(|(k, v)| (k, v.as_bytes())).collect(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("..2"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn layout_noop_change_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let out = write(&payload(&dir, &[("a", "1"), ("b", "2")]), &opts()).unwrap();
        assert!(out.swapped);
        assert_eq!(names(&dir), vec!["..data", "..osc-agent", "a", "b"]);
        assert_eq!(
            std::fs::read_link(dir.join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"2");
        let generation = current_generation(&dir).unwrap();

        let again = write(&payload(&dir, &[("a", "1"), ("b", "2")]), &opts()).unwrap();
        assert!(!again.swapped);
        assert_eq!(current_generation(&dir).unwrap(), generation);

        let out = write(&payload(&dir, &[("a", "1"), ("c", "3")]), &opts()).unwrap();
        assert!(out.swapped);
        assert_eq!(names(&dir), vec!["..data", "..osc-agent", "a", "c"]);
        let gens = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("..2")
            })
            .count();
        assert_eq!(gens, 1, "old generation removed");
    }

    #[test]
    fn repairs_links_and_respects_foreign_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        std::fs::write(dir.join("b"), "not ours").unwrap();
        let out = write(&payload(&dir, &[("a", "1"), ("b", "2")]), &opts()).unwrap();
        assert_eq!(out.conflicts.len(), 1);
        assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"not ours");
        std::fs::remove_file(dir.join("a")).unwrap();
        let out = write(&payload(&dir, &[("a", "1")]), &opts()).unwrap();
        assert!(!out.swapped);
        assert_eq!(out.links_repaired, 1);
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
    }

    #[test]
    fn edited_generation_file_is_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write(&payload(&dir, &[("a", "1")]), &opts()).unwrap();
        let generation = dir.join(current_generation(&dir).unwrap()).join("a");
        std::fs::write(&generation, "tampered").unwrap();
        let out = write(&payload(&dir, &[("a", "1")]), &opts()).unwrap();
        assert!(out.swapped);
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
    }

    fn generations(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| is_generation_name(n))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn generation_names_are_exact() {
        let tmp = tempfile::tempdir().unwrap();
        write(&payload(tmp.path(), &[("a", "1")]), &opts()).unwrap();
        let made = current_generation(tmp.path()).unwrap();
        assert!(is_generation_name(made.to_str().unwrap()), "{made:?}");
        for other in [
            "..2024_01_02_03_04_05.1234567890",
            "..2024_01_02_03_04_05.123456789_1a2b3c4D",
            "..2024_01_02_03_04_05.123456789_1a2b3c4d0",
            "..backup",
            "..data",
            "2024_01_02_03_04_05.123456789_1a2b3c4d",
        ] {
            assert!(!is_generation_name(other), "{other}");
        }
    }

    #[test]
    fn never_removes_dot_dot_entries_it_did_not_create() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        std::fs::create_dir(dir.join("..backup")).unwrap();
        std::fs::write(dir.join("..backup/keep"), "user data").unwrap();
        std::fs::create_dir(dir.join("..2024_01_02_03_04_05.123456789_00000000")).unwrap();
        for value in ["1", "2", "3"] {
            assert!(
                write(&payload(&dir, &[("a", value)]), &opts())
                    .unwrap()
                    .swapped
            );
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("..backup/keep")).unwrap(),
            "user data"
        );
        assert!(
            dir.join("..2024_01_02_03_04_05.123456789_00000000")
                .is_dir()
        );
        assert_eq!(generations(&dir).len(), 2, "its own old ones are removed");
    }

    /// A projected ConfigMap/Secret volume as kubelet writes it.
    fn kubelet_volume(dir: &Path) {
        let generation = "..2024_05_06_07_08_09.3141592653";
        std::fs::create_dir(dir.join(generation)).unwrap();
        std::fs::write(dir.join(generation).join("token"), "service-account-token").unwrap();
        std::os::unix::fs::symlink(generation, dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.join("token")).unwrap();
    }

    #[test]
    fn refuses_a_kubelet_volume_and_touches_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        kubelet_volume(&dir);
        let before = names(&dir);
        let err = write(&payload(&dir, &[("a", "1")]), &opts()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("refusing to manage this directory"), "{msg}");
        assert!(msg.contains("..2024_05_06_07_08_09.3141592653"), "{msg}");
        assert_eq!(names(&dir), before, "nothing created, nothing removed");
        assert_eq!(
            std::fs::read_to_string(dir.join("token")).unwrap(),
            "service-account-token"
        );
        assert!(claim(&dir).is_err());
    }

    #[test]
    fn refuses_when_data_is_repointed_at_a_generation_it_did_not_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write(&payload(&dir, &[("a", "1")]), &opts()).unwrap();
        // Another writer (another agent without the lock, or a copy) makes its own generation current.
        let foreign = "..2030_01_01_00_00_00.000000000_abcdef01";
        std::fs::create_dir(dir.join(foreign)).unwrap();
        std::fs::write(dir.join(foreign).join("a"), "theirs").unwrap();
        std::os::unix::fs::symlink(foreign, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let err = write(&payload(&dir, &[("a", "2")]), &opts()).unwrap_err();
        assert!(err.to_string().contains("did not write"), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "theirs");
        assert!(dir.join(foreign).is_dir());
    }

    #[test]
    fn adopts_a_directory_of_an_earlier_release() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write(&payload(&dir, &[("a", "1")]), &opts()).unwrap();
        let old = current_generation(&dir).unwrap();
        // What the previous release left: no lock file, and an unfinished generation from a crash.
        std::fs::remove_file(dir.join(DIR_FILE)).unwrap();
        let unfinished = "..2020_01_01_00_00_00.000000000_0badf00d";
        std::fs::create_dir(dir.join(unfinished)).unwrap();
        std::fs::create_dir(dir.join("..backup")).unwrap();
        claim(&dir).unwrap();
        assert!(!dir.join(unfinished).exists(), "an adopted generation");
        assert!(dir.join("..backup").is_dir());
        assert_eq!(current_generation(&dir).unwrap(), old);
        let out = write(&payload(&dir, &[("a", "2")]), &opts()).unwrap();
        assert!(out.swapped);
        assert!(
            !dir.join(&old).exists(),
            "the adopted generation is replaced"
        );
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "2");
    }

    #[test]
    fn claim_removes_partial_generations_the_state_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write(&payload(&dir, &[("a", "1")]), &opts()).unwrap();
        let current = current_generation(&dir).unwrap();
        // Exactly what a kill between "recorded" and "swapped" leaves.
        let partial = "..2030_01_01_00_00_00.000000000_0000beef";
        let mut state = own::read_state(&dir.join(DIR_FILE)).unwrap().unwrap();
        state.generations.push(partial.into());
        own::write_state(&dir.join(DIR_FILE), &state).unwrap();
        std::fs::create_dir(dir.join(partial)).unwrap();
        std::fs::write(dir.join(partial).join("a"), "half").unwrap();
        std::os::unix::fs::symlink(partial, dir.join("..data_tmp")).unwrap();
        claim(&dir).unwrap();
        assert!(!dir.join(partial).exists());
        assert!(std::fs::symlink_metadata(dir.join("..data_tmp")).is_err());
        assert_eq!(current_generation(&dir).unwrap(), current);
        assert_eq!(
            own::read_state(&dir.join(DIR_FILE))
                .unwrap()
                .unwrap()
                .generations,
            vec![current.to_string_lossy().into_owned()]
        );
    }

    #[test]
    fn an_abandoned_generation_is_removed_and_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write(&payload(&dir, &[("a", "1"), ("b", "2")]), &opts()).unwrap();
        let before = current_generation(&dir).unwrap();
        let checks = std::cell::Cell::new(0);
        let abort = || {
            checks.set(checks.get() + 1);
            checks.get() > 2 // after the first file of the new generation
        };
        let next = payload(&dir, &[("a", "3"), ("b", "4"), ("c", "5")]);
        let err = write_with(&next, &opts(), &abort).unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        assert_eq!(
            generations(&dir),
            vec![before.to_string_lossy().into_owned()]
        );
        assert_eq!(current_generation(&dir).unwrap(), before);
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert_eq!(
            own::read_state(&dir.join(DIR_FILE))
                .unwrap()
                .unwrap()
                .generations,
            vec![before.to_string_lossy().into_owned()]
        );
        // Abandoned before it starts: nothing at all.
        assert!(write_with(&next, &opts(), &|| true).is_err());
        assert_eq!(current_generation(&dir).unwrap(), before);

        // Abandoned at the last check, after every file was written and flushed: no swap either.
        let counted = tempfile::tempdir().unwrap();
        let checks = std::cell::Cell::new(0);
        let counting = || {
            checks.set(checks.get() + 1);
            false
        };
        write_with(
            &payload(counted.path(), &[("a", "3"), ("b", "4"), ("c", "5")]),
            &opts(),
            &counting,
        )
        .unwrap();
        let all = checks.replace(0);
        let complete = std::cell::Cell::new(false);
        let at_the_last = || {
            checks.set(checks.get() + 1);
            if checks.get() < all {
                return false;
            }
            // The last check comes after the last file is whole.
            let new = generations(&dir)
                .into_iter()
                .find(|g| *g != *before.to_string_lossy());
            complete.set(new.is_some_and(|g| {
                std::fs::read_to_string(dir.join(g).join("c")).is_ok_and(|c| c == "5")
            }));
            true
        };
        let err = write_with(&next, &opts(), &at_the_last).unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        assert!(
            complete.get(),
            "the last abort check came before the last file was written"
        );
        assert_eq!(current_generation(&dir).unwrap(), before);
        assert_eq!(
            generations(&dir),
            vec![before.to_string_lossy().into_owned()]
        );
    }

    #[test]
    fn a_link_in_a_generation_is_never_read_through() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        write(&payload(&dir, &[("a", "1")]), &opts()).unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::write(&elsewhere, "1").unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
        let file = dir.join(current_generation(&dir).unwrap()).join("a");
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
        let out = write(&payload(&dir, &[("a", "1")]), &opts()).unwrap();
        assert!(out.swapped, "a link with the same bytes is not the file");
        assert!(
            !std::fs::symlink_metadata(dir.join(current_generation(&dir).unwrap()).join("a"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "1");
    }

    #[test]
    fn another_holder_of_the_lock_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        std::fs::write(dir.join(DIR_FILE), "").unwrap();
        let other = std::fs::File::open(dir.join(DIR_FILE)).unwrap();
        other.try_lock().unwrap();
        let err = write(&payload(&dir, &[("a", "1")]), &opts()).unwrap_err();
        assert!(err.to_string().contains("another osc-agent"), "{err}");
        assert!(current_generation(&dir).is_none());
        assert!(generations(&dir).is_empty());
    }
}
