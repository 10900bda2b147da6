//! Sink: where rendered bytes reach the disk.
//!
//! - [`dir`]: the one-file-per-key directory, swapped atomically like a kubelet ConfigMap volume.
//! - [`file`]: single files (aggregates, templates): temp file + fsync + rename, or in place.
//! - [`own`]: what marks an output as the agent's: one lock and state file per output (the generations
//!   it wrote, a salted digest of the keys it last wrote), held with `flock` for the process's life.
//!
//! Both compare with what is on disk first and write nothing when every byte and mode already match.
//! The sink never follows a symbolic link it did not create, never removes what it did not create,
//! and creates directories with the requested mode and owner whatever the umask.

pub mod dir;
pub mod file;
pub mod kube;
mod own;

use crate::state::Digests;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::OFlag;

use crate::config::{FileOptions, Outputs};
use crate::render::Rendered;
use crate::util::escape_path;

/// Writing one output failed; what was on disk before is left as it was.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}: {reason}", escape_path(path))]
pub struct SinkError {
    pub path: PathBuf,
    pub what: String,
    pub reason: String,
}

impl SinkError {
    pub fn io(path: &Path, what: &str, e: &io::Error) -> SinkError {
        SinkError {
            path: path.to_owned(),
            what: what.to_owned(),
            reason: crate::util::io_reason(e),
        }
    }
}

static ABORT: AtomicBool = AtomicBool::new(false);

/// Ask writes in progress to stop (shutdown): a new generation being written is abandoned between two
/// files, a temp file between two 1 MiB chunks, and removed, leaving the current files untouched.
/// Outputs not started yet are not started. Process-wide and permanent.
pub fn abort_writes() {
    ABORT.store(true, Ordering::SeqCst);
}

/// Whether [`abort_writes`] was called.
pub fn aborting() -> bool {
    ABORT.load(Ordering::SeqCst)
}

/// The error of a write abandoned by [`abort_writes`].
pub(crate) fn abandoned() -> io::Error {
    io::Error::other("abandoned: the agent is shutting down")
}

/// What one write pass did.
#[derive(Debug, Default)]
pub struct WriteReport {
    /// Outputs whose content changed (the directory, or a file path).
    pub changed: Vec<PathBuf>,
    /// Files written (including every file of a new directory generation).
    pub files_written: usize,
    /// Links or files put back after someone else changed them, without a content change.
    pub repaired: usize,
    /// Outputs (or keys) that could not be written; the rest were.
    pub errors: Vec<SinkError>,
}

/// Write every output of a render. Each output is atomic on its own; a failing one does not stop others.
pub fn write_all(rendered: &Rendered, opts: &FileOptions) -> WriteReport {
    let mut report = WriteReport::default();
    let dir_path = rendered.dir.as_ref().map(|d| d.path.as_path());
    if let Some(payload) = &rendered.dir {
        match dir::write(payload, opts) {
            Ok(out) => {
                if out.swapped {
                    report.changed.push(payload.path.clone());
                    report.files_written += out.files_written;
                }
                report.repaired += out.links_repaired;
                report.errors.extend(out.conflicts);
            }
            Err(e) => report.errors.push(e),
        }
    }
    for f in &rendered.files {
        match file::write(f, opts, &own::file_lock_path(&f.path, dir_path)) {
            Ok(true) => {
                report.changed.push(f.path.clone());
                report.files_written += 1;
            }
            Ok(false) => {}
            Err(e) => report.errors.push(e),
        }
    }
    report
}

/// Single-file outputs: path and whether it is rewritten in place.
fn single_files(outputs: &Outputs) -> impl Iterator<Item = (&Path, bool)> {
    outputs
        .files
        .iter()
        .map(|f| (f.path.as_path(), f.in_place))
        .chain(
            outputs
                .templates
                .iter()
                .map(|t| (t.destination.as_path(), t.in_place)),
        )
}

/// Take the lock of every output whose directory already exists, and remove what an earlier run of the
/// agent left there: its temp files beside single files, generations it started but never switched
/// `..data` to. Call once at start, before anything is fetched; the locks are held until the process
/// exits. Outputs whose directory does not exist yet are locked when first written.
///
/// Errors (the first one; the others are claimed when written): another osc-agent holds an output; an
/// output directory osc-agent does not manage (a kubelet volume); a lock file that cannot be created.
pub fn claim(outputs: &Outputs) -> Result<(), SinkError> {
    if let Some(d) = &outputs.dir
        && d.is_dir()
    {
        dir::claim(d)?;
    }
    for (path, in_place) in single_files(outputs) {
        if file::parent(path).is_dir() {
            file::claim(
                path,
                &own::file_lock_path(path, outputs.dir.as_deref()),
                in_place,
            )?;
        }
    }
    Ok(())
}

/// The keys whose value differs from the one the local outputs were last completely written from (by
/// this or an earlier process), as recorded by [`record_keys`]; `digests` maps each key to its value
/// digest. `None` when that is unknown: no local output, or one without a record (a first run).
pub fn changed_since_record(outputs: &Outputs, digests: &Digests) -> Option<Vec<String>> {
    let mut changed = std::collections::BTreeSet::new();
    let files = own::record_files(outputs);
    if files.is_empty() {
        return None;
    }
    for f in files {
        changed.extend(own::changed_keys(&f, digests)?);
    }
    Some(changed.into_iter().collect())
}

/// Record, beside every local output, the keys (salted digests of their values) it now holds: call
/// after every output was written without error. Skips outputs whose record is already up to date.
pub fn record_keys(outputs: &Outputs, digests: &Digests) -> Result<(), SinkError> {
    for f in own::record_files(outputs) {
        own::record_keys(&f, digests)
            .map_err(|e| SinkError::io(&f, "cannot record the keys", &e))?;
    }
    Ok(())
}

/// When every configured output already exists (files of an earlier run), a description of them:
/// the current generation of the output directory, or the number of single files.
pub fn existing_outputs(outputs: &crate::config::Outputs) -> Option<String> {
    let files: Vec<&Path> = single_files(outputs).map(|(p, _)| p).collect();
    if !files.iter().all(|p| p.is_file()) {
        return None;
    }
    match &outputs.dir {
        Some(d) => {
            let generation = dir::current_generation(d)?;
            d.join(&generation)
                .is_dir()
                .then(|| format!("{}/{}", d.display(), generation.to_string_lossy()))
        }
        None if files.is_empty() => None,
        None => Some(format!("{} file(s)", files.len())),
    }
}

/// Mode for directories holding files of `mode`: add search (x) wherever read is allowed.
pub(crate) fn dir_mode(mode: u32) -> u32 {
    mode | ((mode & 0o444) >> 2) | 0o700
}

/// fsync a directory so renames and new entries in it are durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Open flags that never follow a symbolic link at the last component (and never block on a FIFO).
pub(crate) fn no_follow() -> i32 {
    (OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits()
}

/// Open a directory without following a link at its last component.
pub(crate) fn open_dir(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY).bits())
        .open(path)
}

/// Give a directory the agent just created the search bits matching `opts.mode` and `opts`' owner,
/// through a descriptor (a link swapped in meanwhile is refused, never followed). Returns it, open.
///
/// The set-group-ID bit a parent passed on is kept: on a volume with a pod `fsGroup` (setgid, group
/// fsGroup) the files inside then belong to that group, so an app of another user in it can read them.
/// The mode is only changed when it differs (a `chmod` by a process outside the directory's group would
/// drop that bit).
pub(crate) fn set_up_new_dir(path: &Path, opts: &FileOptions) -> io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let d = open_dir(path)?;
    let current = d.metadata()?.mode() & 0o7777;
    let wanted = dir_mode(opts.mode) | (current & 0o2000);
    if current != wanted {
        d.set_permissions(std::fs::Permissions::from_mode(wanted))?;
    }
    if opts.uid.is_some() || opts.gid.is_some() {
        std::os::unix::fs::fchown(&d, opts.uid, opts.gid)?;
    }
    Ok(d)
}

/// Create `path` and its missing parents like `mkdir -p`, each new one with [`dir_mode`] of
/// `opts.mode` and `opts`' owner, whatever the umask. Existing directories (and links to directories
/// on the way, which are the user's) are left as they are. Errors name no path: the caller does.
pub(crate) fn create_dirs(path: &Path, opts: &FileOptions) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut p = path;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "a path component is not a directory",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(p);
                match p.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new()
            .mode(dir_mode(opts.mode))
            .create(d)
        {
            Ok(()) => {
                set_up_new_dir(d, opts)?;
            }
            // Created meanwhile by someone else: theirs, left as it is.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Does the file at `path` already hold exactly `bytes` with `opts`' mode and owner? A symbolic link
/// (or anything but a regular file) never does: it is not read through.
pub(crate) fn same_file(path: &Path, bytes: &[u8], opts: &FileOptions) -> bool {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(path)
    else {
        return false;
    };
    let Ok(meta) = f.metadata() else {
        return false;
    };
    if !(meta.is_file()
        && meta.len() == bytes.len() as u64
        && meta.mode() & 0o7777 == opts.mode
        && opts.uid.is_none_or(|u| meta.uid() == u)
        && opts.gid.is_none_or(|g| meta.gid() == g))
    {
        return false;
    }
    let mut existing = Vec::with_capacity(bytes.len());
    f.take(bytes.len() as u64 + 1)
        .read_to_end(&mut existing)
        .is_ok_and(|_| existing == bytes)
}

/// Size of the pieces a file is written in; [`aborting`] is checked between two.
const CHUNK: usize = 1 << 20;

/// Give a file just created `opts`' mode and owner, write `bytes` in chunks (stopping with an error
/// when `abort` turns true), fsync.
pub(crate) fn fill(
    f: File,
    bytes: &[u8],
    opts: &FileOptions,
    abort: &dyn Fn() -> bool,
) -> io::Result<()> {
    fill_unsynced(f, bytes, opts, abort)?.sync_all()
}

/// [`fill`] without the fsync: for files made durable together, by one `syncfs` (see `dir`).
pub(crate) fn fill_unsynced(
    mut f: File,
    bytes: &[u8],
    opts: &FileOptions,
    abort: &dyn Fn() -> bool,
) -> io::Result<File> {
    use std::io::Write;
    // The umask may have cleared bits of the requested mode.
    f.set_permissions(std::fs::Permissions::from_mode(opts.mode))?;
    if opts.uid.is_some() || opts.gid.is_some() {
        std::os::unix::fs::fchown(&f, opts.uid, opts.gid)?;
    }
    for chunk in bytes.chunks(CHUNK) {
        if abort() {
            return Err(abandoned());
        }
        f.write_all(chunk)?;
    }
    Ok(f)
}

/// Create `path` exclusively (never through a link) with `opts`' mode and owner, write `bytes`, fsync.
pub(crate) fn create_file(
    path: &Path,
    bytes: &[u8],
    opts: &FileOptions,
    abort: &dyn Fn() -> bool,
) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(opts.mode)
        .custom_flags(no_follow())
        .open(path)?;
    fill(f, bytes, opts, abort)
}

/// A random suffix for temporary names: 8 lower-case hex digits.
pub(crate) fn random_suffix() -> String {
    format!("{:08x}", fastrand::u32(..))
}

/// Is `s` exactly what [`random_suffix`] makes?
pub(crate) fn is_random_suffix(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn opts(mode: u32) -> FileOptions {
        FileOptions {
            mode,
            uid: None,
            gid: None,
        }
    }

    #[test]
    fn same_file_never_reads_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::write(&real, "x").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(same_file(&real, b"x", &opts(0o600)));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(!same_file(&link, b"x", &opts(0o600)));
    }

    #[test]
    fn created_directories_get_the_mode_existing_ones_keep_theirs() {
        let tmp = tempfile::tempdir().unwrap();
        let existing = tmp.path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o711)).unwrap();
        let deep = existing.join("a/b");
        create_dirs(&deep, &opts(0o440)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&existing), 0o711);
        assert_eq!(mode(&existing.join("a")), 0o750);
        assert_eq!(mode(&deep), 0o750);
        create_dirs(&deep, &opts(0o600)).unwrap();
        assert_eq!(mode(&deep), 0o750, "existing directories are not changed");
        std::fs::write(tmp.path().join("file"), "").unwrap();
        assert!(create_dirs(&tmp.path().join("file/sub"), &opts(0o600)).is_err());
    }

    /// Found on a real node (tests/pods.rs, the injector): an fsGroup volume is setgid; a directory the
    /// agent makes in it must stay setgid so that the files inside get the volume's group.
    #[test]
    fn a_new_directory_keeps_the_set_group_id_bit_of_its_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o2777)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&volume), 0o2777, "this file system keeps setgid");
        let sub = volume.join("..2026_12_03_00_00_00.000000001_x");
        create_dirs(&sub, &opts(0o440)).unwrap();
        assert_eq!(mode(&sub), 0o2750);
        // Without a setgid parent, nothing is added.
        let plain = tmp.path().join("plain/sub");
        create_dirs(&plain, &opts(0o440)).unwrap();
        assert_eq!(mode(&plain), 0o750);
    }

    #[test]
    fn an_abandoned_fill_stops_between_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("big");
        let calls = std::cell::Cell::new(0);
        let abort = || {
            calls.set(calls.get() + 1);
            calls.get() > 1
        };
        let bytes = vec![b'x'; CHUNK * 3];
        let err = create_file(&path, &bytes, &opts(0o600), &abort).unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CHUNK as u64);
    }
}
