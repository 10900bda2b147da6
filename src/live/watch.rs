//! File watching with `notify`: outputs edited or deleted by someone else (drift), and credential files
//! replaced (a Kubernetes Secret volume swaps its `..data` link; the directory is watched, not the file,
//! because a watch on the file dies with the first swap).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use super::Trigger;

/// What to watch.
#[derive(Debug, Default)]
pub struct WatchPaths {
    /// Output directories (watched recursively: edits land in the generation directory).
    pub output_dirs: Vec<PathBuf>,
    /// Single output files (their directory is watched).
    pub output_files: Vec<PathBuf>,
    /// Credential files (their directory is watched).
    pub credential_files: Vec<PathBuf>,
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Start watching; events become triggers. Keep the returned watcher alive as long as needed.
pub fn start(paths: WatchPaths, tx: UnboundedSender<Trigger>) -> Option<RecommendedWatcher> {
    let abs = |v: Vec<PathBuf>| -> Vec<PathBuf> {
        v.into_iter()
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .collect()
    };
    let paths = WatchPaths {
        output_dirs: abs(paths.output_dirs),
        output_files: abs(paths.output_files),
        credential_files: abs(paths.credential_files),
    };
    let credential_dirs: BTreeSet<PathBuf> =
        paths.credential_files.iter().map(|p| parent(p)).collect();
    let output_dirs = paths.output_dirs.clone();
    let output_files: BTreeSet<PathBuf> = paths.output_files.iter().cloned().collect();
    let file_dirs: BTreeSet<PathBuf> = paths.output_files.iter().map(|p| parent(p)).collect();

    let classify_dirs = credential_dirs.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        for path in &event.paths {
            let trigger = if classify_dirs
                .iter()
                .any(|d| path.parent() == Some(d.as_path()))
            {
                Some(Trigger::Credentials)
            } else if output_dirs.iter().any(|d| path.starts_with(d)) || output_files.contains(path)
            {
                Some(Trigger::Drift)
            } else {
                None
            };
            if let Some(t) = trigger {
                let _ = tx.send(t);
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            warn!(
                "file watching unavailable ({e}): drift repair and credential reload rely on resyncs"
            );
            return None;
        }
    };
    let mut watch = |dir: &Path, mode: RecursiveMode| {
        if let Err(e) = watcher.watch(dir, mode) {
            warn!(path = %dir.display(), "cannot watch: {e}");
        } else {
            debug!(path = %dir.display(), "watching");
        }
    };
    for d in &paths.output_dirs {
        watch(d, RecursiveMode::Recursive);
    }
    for d in file_dirs.iter().chain(credential_dirs.iter()) {
        watch(d, RecursiveMode::NonRecursive);
    }
    Some(watcher)
}
