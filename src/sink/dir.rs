//! The one-file-per-key directory, written like kubelet writes a ConfigMap volume:
//!
//! ```text
//! out/
//!   ..2026_11_23_05_00_14.814411000_1a2b3c4d/   one immutable generation: every file, fsynced
//!   ..data -> ..2026_11_23_05_00_14.814411000_1a2b3c4d
//!   db.url -> ..data/db.url                     one visible link per key
//! ```
//!
//! A new generation is written in full into a new hidden directory, then a `..data_tmp` link to it is
//! renamed over `..data`: one atomic step switches every file at once. Links of new keys are added, links
//! of deleted keys removed, and the previous generation deleted. A reader that resolves `..data` once
//! and reads every file below that directory sees one generation, never a mix; a reader of one file
//! always sees a whole file.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{SinkError, create_file, dir_mode, random_suffix, same_file, sync_dir};
use crate::config::FileOptions;
use crate::render::DirPayload;

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

fn link_target(name: &str) -> PathBuf {
    Path::new(DATA_LINK).join(name)
}

/// Is `dir/name` one of our links (`name -> ..data/name`)?
fn is_our_link(dir: &Path, name: &str) -> bool {
    std::fs::read_link(dir.join(name)).is_ok_and(|t| t == link_target(name))
}

pub fn write(payload: &DirPayload, opts: &FileOptions) -> Result<DirOutcome, SinkError> {
    let dir = payload.path.as_path();
    let io = |what: &'static str| move |e: std::io::Error| SinkError::io(dir, what, &e);
    std::fs::create_dir_all(dir).map_err(io("cannot create the output directory"))?;
    let data = dir.join(DATA_LINK);
    if std::fs::symlink_metadata(&data).is_ok_and(|m| !m.file_type().is_symlink()) {
        return Err(SinkError {
            path: data,
            what: "refusing to manage this directory".into(),
            reason: "'..data' exists and is not a link (not written by osc-agent)".into(),
        });
    }

    let mut outcome = DirOutcome::default();
    // A name held by something we did not create is left alone and reported.
    let mut files: BTreeMap<&str, &[u8]> = BTreeMap::new();
    for (name, bytes) in &payload.files {
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok() && !is_our_link(dir, name) {
            outcome.conflicts.push(SinkError {
                path,
                what: format!("key '{name}' not written"),
                reason: "a file osc-agent does not manage has this name; move it away".into(),
            });
            continue;
        }
        files.insert(name, bytes);
    }

    let current = current_generation(dir);
    let unchanged = current
        .as_ref()
        .is_some_and(|gen_name| generation_matches(&dir.join(gen_name), &files, opts));
    let mut changed_dir = false;
    let generation = if unchanged {
        current.clone()
    } else {
        let name = write_generation(dir, &files, opts)?;
        swap_data_link(dir, &name)?;
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
        if name.starts_with("..") {
            // Our machinery: drop old generations and a stale `..data_tmp`.
            let is_old_generation = entry.file_type().is_ok_and(|t| t.is_dir())
                && generation.as_deref() != Some(entry.file_name().as_os_str());
            if is_old_generation {
                std::fs::remove_dir_all(entry.path())
                    .map_err(io("cannot remove an old generation"))?;
                changed_dir = true;
            } else if name == DATA_TMP_LINK {
                let _ = std::fs::remove_file(entry.path());
            }
        } else if !wanted.contains(name) && is_our_link(dir, name) {
            std::fs::remove_file(entry.path())
                .map_err(io("cannot remove the link of a deleted key"))?;
            changed_dir = true;
            if unchanged {
                outcome.links_repaired += 1;
            }
        }
    }
    if changed_dir {
        sync_dir(dir).map_err(io("cannot fsync the output directory"))?;
    }
    Ok(outcome)
}

/// Does this generation directory hold exactly these files, with these bytes, mode and owner?
fn generation_matches(gen_dir: &Path, files: &BTreeMap<&str, &[u8]>, opts: &FileOptions) -> bool {
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

/// Write a new generation directory, fsynced, and return its name. On error nothing of it remains.
fn write_generation(
    dir: &Path,
    files: &BTreeMap<&str, &[u8]>,
    opts: &FileOptions,
) -> Result<OsString, SinkError> {
    let now = jiff::Timestamp::now();
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(dir_mode(opts.mode));
    let (name, path) = loop {
        let name = format!(
            "..{}.{:09}_{}",
            now.strftime("%Y_%m_%d_%H_%M_%S"),
            now.subsec_nanosecond(),
            random_suffix()
        );
        let path = dir.join(&name);
        match builder.create(&path) {
            Ok(()) => break (name, path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(SinkError::io(
                    dir,
                    "cannot create a new generation directory",
                    &e,
                ));
            }
        }
    };
    let result = (|| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(dir_mode(opts.mode)))?;
        if opts.uid.is_some() || opts.gid.is_some() {
            std::os::unix::fs::chown(&path, opts.uid, opts.gid)?;
        }
        for (file, bytes) in files {
            if super::aborting() {
                return Err(std::io::Error::other("abandoned: the agent is shutting down"));
            }
            create_file(&path.join(file), bytes, opts)?;
        }
        sync_dir(&path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&path);
        return Err(SinkError::io(dir, "cannot write the new generation", &e));
    }
    Ok(name.into())
}

/// Point `..data` at `generation` atomically: a `..data_tmp` link renamed over it.
fn swap_data_link(dir: &Path, generation: &OsString) -> Result<(), SinkError> {
    let tmp = dir.join(DATA_TMP_LINK);
    let _ = std::fs::remove_file(&tmp);
    let result = std::os::unix::fs::symlink(generation, &tmp)
        .and_then(|()| std::fs::rename(&tmp, dir.join(DATA_LINK)));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_dir_all(dir.join(generation));
        return Err(SinkError::io(dir, "cannot swap the ..data link", &e));
    }
    Ok(())
}

/// Read every file of the current generation consistently (test and debugging helper): resolves
/// `..data` once and reads below that directory; `None` if the generation vanished meanwhile.
pub fn read_generation(dir: &Path) -> Option<BTreeMap<String, Vec<u8>>> {
    let generation = dir.join(current_generation(dir)?);
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&generation).ok()? {
        let entry = entry.ok()?;
        let bytes = std::fs::read(entry.path()).ok()?;
        out.insert(entry.file_name().to_string_lossy().into_owned(), bytes);
    }
    Some(out)
}

/// Inode of a path (for "nothing was rewritten" checks).
pub fn inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            files: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
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
        assert_eq!(names(&dir), vec!["..data", "a", "b"]);
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
        assert_eq!(names(&dir), vec!["..data", "a", "c"]);
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
}
