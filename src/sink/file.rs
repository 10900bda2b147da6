//! Single-file outputs: write a temp file in the same directory, fsync, rename over the target, fsync the
//! directory. Readers see the old or the new file, never a mix. In-place mode (for single-file bind
//! mounts, where rename fails with EBUSY) rewrites the existing inode instead.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{SinkError, create_file, random_suffix, same_file, sync_dir};
use crate::config::FileOptions;
use crate::render::FilePayload;

/// Write one file; `Ok(false)` when it already held these bytes with this mode.
pub fn write(p: &FilePayload, opts: &FileOptions) -> Result<bool, SinkError> {
    if same_file(&p.path, &p.contents, opts) {
        return Ok(false);
    }
    let parent = match p.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)
        .map_err(|e| SinkError::io(parent, "cannot create the directory", &e))?;
    if p.in_place && p.path.exists() {
        return write_in_place(p, opts).map(|()| true);
    }
    let name = p
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| SinkError {
            path: p.path.clone(),
            what: p.origin.clone(),
            reason: "the output path has no file name".to_owned(),
        })?;
    let tmp = parent.join(format!(".{name}.osc-tmp-{}", random_suffix()));
    let result = create_file(&tmp, &p.contents, opts)
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
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p.path)
        .map_err(io("cannot open for in-place write"))?;
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

    fn opts() -> FileOptions {
        FileOptions {
            mode: 0o600,
            uid: None,
            gid: None,
        }
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
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp files left");
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
    }
}
