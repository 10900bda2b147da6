//! Sink: where rendered bytes reach the disk.
//!
//! - [`dir`]: the one-file-per-key directory, swapped atomically like a kubelet ConfigMap volume.
//! - [`file`]: single files (aggregates, templates): temp file + fsync + rename, or in place.
//!
//! Both compare with what is on disk first and write nothing when every byte and mode already match.

pub mod dir;
pub mod file;
pub mod kube;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::FileOptions;
use crate::render::Rendered;

/// Writing one output failed; what was on disk before is left as it was.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}: {reason}", path.display())]
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
/// files and removed, leaving the current one untouched. Process-wide and permanent.
pub fn abort_writes() {
    ABORT.store(true, Ordering::SeqCst);
}

/// Whether [`abort_writes`] was called.
pub fn aborting() -> bool {
    ABORT.load(Ordering::SeqCst)
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
        match file::write(f, opts) {
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

/// When every configured output already exists (files of an earlier run), a description of them:
/// the current generation of the output directory, or the number of single files.
pub fn existing_outputs(outputs: &crate::config::Outputs) -> Option<String> {
    let files: Vec<&Path> = outputs
        .files
        .iter()
        .map(|f| f.path.as_path())
        .chain(outputs.templates.iter().map(|t| t.destination.as_path()))
        .collect();
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
    std::fs::File::open(path)?.sync_all()
}

/// Does the file at `path` already hold exactly `bytes` with `opts`' mode and owner?
pub(crate) fn same_file(path: &Path, bytes: &[u8], opts: &FileOptions) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    meta.is_file()
        && meta.len() == bytes.len() as u64
        && meta.mode() & 0o7777 == opts.mode
        && opts.uid.is_none_or(|u| meta.uid() == u)
        && opts.gid.is_none_or(|g| meta.gid() == g)
        && std::fs::read(path).is_ok_and(|existing| existing == bytes)
}

/// Create `path` exclusively with `opts`' mode and owner, write `bytes`, fsync.
pub(crate) fn create_file(path: &Path, bytes: &[u8], opts: &FileOptions) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(opts.mode)
        .open(path)?;
    // The umask may have cleared bits of the requested mode.
    f.set_permissions(std::fs::Permissions::from_mode(opts.mode))?;
    if opts.uid.is_some() || opts.gid.is_some() {
        std::os::unix::fs::fchown(&f, opts.uid, opts.gid)?;
    }
    f.write_all(bytes)?;
    f.sync_all()
}

/// A random suffix for temporary names.
pub(crate) fn random_suffix() -> String {
    format!("{:08x}", fastrand::u32(..))
}
