//! Single-file outputs: write a temp file in the same directory, fsync, rename over the target, fsync the
//! directory. Readers see the old or the new file, never a mix. In-place mode (for single-file bind
//! mounts, where rename fails with EBUSY) rewrites the existing inode instead.
//!
//! A symbolic link (or anything but a regular file) at the target is refused, never written through
//! nor replaced. Each output is locked (see `own`) before its first write, which also removes the temp
//! files an earlier run of the agent left beside it (`.NAME.osc-tmp-xxxxxxxx`).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tracing::info;

use super::own::{self, LockError};
use super::{SinkError, abandoned, create_file, no_follow, random_suffix, same_file, sync_dir};
use crate::config::FileOptions;
use crate::render::FilePayload;
use crate::util::{escape, escape_path};

/// The directory of a file output (`.` for a bare name).
pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The prefix of the temp files of the output `path`: `.NAME.osc-tmp-`.
fn temp_prefix(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    Some(format!(".{name}.osc-tmp-"))
}

/// Lock the output `path` through `lock` (see `own`; an in-place output whose directory does not let
/// the agent create a lock file locks the file itself), then remove the temp files an earlier run left
/// beside it (none of this process's own is in flight: they are all removed or renamed before a write
/// returns). Idempotent.
pub(crate) fn claim(path: &Path, lock: &Path, in_place: bool) -> Result<(), SinkError> {
    match own::lock(lock, true) {
        Ok(_) => {}
        Err(LockError::Io(e))
            if in_place
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                )
                && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) =>
        {
            // A single-file bind mount in a read-only directory: the file itself is the lock.
            own::lock(path, false).map_err(|e| own::lock_error(path, path, e))?;
        }
        Err(e) => return Err(own::lock_error(path, lock, e)),
    }
    remove_temp_files(path);
    Ok(())
}

/// Remove `.NAME.osc-tmp-xxxxxxxx` regular files beside `path` (exactly the names the agent makes).
fn remove_temp_files(path: &Path) {
    let Some(prefix) = temp_prefix(path) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent(path)) else {
        return;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let ours = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .is_some_and(super::is_random_suffix);
        if ours
            && entry.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    if removed > 0 {
        info!(path = %escape_path(path), removed, "removed temp files an earlier run left");
    }
}

/// Whether the target exists; an error when something other than a regular file is in the way.
fn check_target(p: &FilePayload) -> Result<bool, SinkError> {
    let refuse = |reason: &str| SinkError {
        path: p.path.clone(),
        what: format!("{} not written", escape(&p.origin)),
        reason: reason.to_owned(),
    };
    match std::fs::symlink_metadata(&p.path) {
        Ok(m) if m.file_type().is_symlink() && p.in_place => Err(refuse(
            "a symbolic link is in the way: --in-place never writes through a link; point the output at \
             the real file, or remove the link",
        )),
        Ok(m) if m.file_type().is_symlink() => Err(refuse(
            "a symbolic link is in the way: osc-agent never writes through nor replaces a link it did \
             not create; point the output at the real file, or remove the link",
        )),
        Ok(m) if !m.is_file() => Err(refuse(
            "not a regular file: osc-agent only replaces a file it can have written",
        )),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SinkError::io(&p.path, "cannot inspect the file", &e)),
    }
}

/// Write one file; `Ok(false)` when it already held these bytes with this mode. `lock` is the file
/// locking this output (see `own::file_lock_path`).
pub fn write(p: &FilePayload, opts: &FileOptions, lock: &Path) -> Result<bool, SinkError> {
    write_with(p, opts, lock, &super::aborting)
}

/// [`write`], abandoning the temp file (removed again) as soon as `abort` turns true.
fn write_with(
    p: &FilePayload,
    opts: &FileOptions,
    lock: &Path,
    abort: &dyn Fn() -> bool,
) -> Result<bool, SinkError> {
    if abort() {
        return Err(SinkError::io(&p.path, "not written", &abandoned()));
    }
    let exists = check_target(p)?;
    if exists && same_file(&p.path, &p.contents, opts) {
        return Ok(false);
    }
    let parent = parent(&p.path);
    super::create_dirs(parent, opts)
        .map_err(|e| SinkError::io(parent, "cannot create the directory", &e))?;
    claim(&p.path, lock, p.in_place)?;
    if p.in_place && exists {
        return write_in_place(p, opts).map(|()| true);
    }
    let prefix = temp_prefix(&p.path).ok_or_else(|| SinkError {
        path: p.path.clone(),
        what: escape(&p.origin).into_owned(),
        reason: "the output path has no file name".to_owned(),
    })?;
    let tmp = parent.join(format!("{prefix}{}", random_suffix()));
    let result = create_file(&tmp, &p.contents, opts, abort)
        .map_err(|e| SinkError::io(&p.path, "cannot write a temporary file", &e))
        .and_then(|()| {
            std::fs::rename(&tmp, &p.path).map_err(|e| {
                SinkError::io(
                    &p.path,
                    "cannot rename over the file (bind mount? try --in-place)",
                    &e,
                )
            })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(parent).map_err(|e| SinkError::io(parent, "cannot fsync the directory", &e))?;
    Ok(true)
}

fn write_in_place(p: &FilePayload, opts: &FileOptions) -> Result<(), SinkError> {
    let io = |what: &'static str| move |e: std::io::Error| SinkError::io(&p.path, what, &e);
    // Never through a link (checked before, and again here against a swap meanwhile).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(no_follow())
        .open(&p.path)
        .map_err(io("cannot open for in-place write (--in-place)"))?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Err(io("cannot write in place")(std::io::Error::other(
            "not a regular file",
        )));
    }
    f.write_all(&p.contents)
        .map_err(io("cannot write in place"))?;
    f.set_len(p.contents.len() as u64)
        .map_err(io("cannot truncate"))?;
    f.set_permissions(std::fs::Permissions::from_mode(opts.mode))
        .map_err(io("cannot set the mode"))?;
    if opts.uid.is_some() || opts.gid.is_some() {
        std::os::unix::fs::fchown(&f, opts.uid, opts.gid).map_err(io("cannot change the owner"))?;
    }
    f.sync_all().map_err(io("cannot fsync"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;

    fn opts() -> FileOptions {
        FileOptions {
            mode: 0o600,
            uid: None,
            gid: None,
        }
    }

    fn write(p: &FilePayload, opts: &FileOptions) -> Result<bool, SinkError> {
        super::write(p, opts, &own::file_lock_path(&p.path, None))
    }

    fn payload(path: &Path, bytes: &[u8], in_place: bool) -> FilePayload {
        FilePayload {
            path: path.to_owned(),
            contents: bytes.to_vec(),
            in_place,
            origin: "--output".into(),
        }
    }

    #[test]
    fn atomic_write_then_noop_then_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/app.env");
        assert!(write(&payload(&path, b"A=1\n", false), &opts()).unwrap());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(!write(&payload(&path, b"A=1\n", false), &opts()).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), meta.ino());
        assert!(write(&payload(&path, b"A=2\n", false), &opts()).unwrap());
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), meta.ino());
        assert_eq!(std::fs::read(&path).unwrap(), b"A=2\n");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(leftovers.len(), 2, "no temp files left: {leftovers:?}");
        assert!(leftovers.contains(&".app.env.osc-agent".to_string()));
    }

    #[test]
    fn in_place_keeps_the_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bind.conf");
        std::fs::write(&path, b"old contents that are longer").unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        assert!(write(&payload(&path, b"new", true), &opts()).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
    }

    #[test]
    fn failure_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target");
        std::fs::create_dir(&path).unwrap(); // renaming a file over a directory fails
        let err = write(&payload(&path, b"x", false), &opts()).unwrap_err();
        assert!(err.to_string().contains("target"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(std::fs::read_dir(&path).unwrap().next().is_none());
    }

    #[test]
    fn a_link_at_the_target_is_refused_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("app.env");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        for in_place in [true, false] {
            let err = write(&payload(&link, b"SECRET=1\n", in_place), &opts()).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("app.env") && msg.contains("symbolic link"),
                "{msg}"
            );
            assert_eq!(msg.contains("--in-place"), in_place, "{msg}");
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
            assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o644);
            assert!(
                std::fs::symlink_metadata(&link)
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
        }
        // Same bytes behind the link: still not "already written".
        std::fs::write(&victim, "SECRET=1\n").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(write(&payload(&link, b"SECRET=1\n", false), &opts()).is_err());
    }

    #[test]
    fn claim_removes_exactly_the_temp_files_of_its_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.env");
        let ours = [".app.env.osc-tmp-0123abcd", ".app.env.osc-tmp-ffffffff"];
        let theirs = [
            ".app.env.osc-tmp-keepme",
            ".other.env.osc-tmp-0123abcd",
            ".app.env.osc-tmp-0123ABCD",
        ];
        for name in ours.iter().chain(&theirs) {
            std::fs::write(dir.path().join(name), "partial secrets").unwrap();
        }
        std::fs::create_dir(dir.path().join(".app.env.osc-tmp-00000000")).unwrap();
        claim(&path, &own::file_lock_path(&path, None), false).unwrap();
        for name in ours {
            assert!(!dir.path().join(name).exists(), "{name}");
        }
        for name in theirs {
            assert!(dir.path().join(name).exists(), "{name}");
        }
        assert!(dir.path().join(".app.env.osc-tmp-00000000").is_dir());
    }

    #[test]
    fn an_abandoned_aggregate_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        write(&payload(&path, b"old", false), &opts()).unwrap();
        let checks = std::cell::Cell::new(0);
        let abort = || {
            checks.set(checks.get() + 1);
            checks.get() > 2 // in the middle of the temp file
        };
        let big = payload(&path, &vec![b'x'; 3 << 20], false);
        let lock = own::file_lock_path(&path, None);
        let err = write_with(&big, &opts(), &lock, &abort).unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("osc-tmp")), "{names:?}");
    }
}
