//! File watching: outputs edited or deleted by someone else (drift), and credential files replaced.
//!
//! Only the watched names count, never their neighbours: a credential file itself, or the `..data` link
//! of its directory (a Kubernetes Secret volume swaps `..data`; the directory is watched, not the file,
//! because a watch on the file dies with the first swap); an output file itself; in an output directory,
//! the keys last written and the hidden `..` machinery (`..data`, generations). A log file, an editor's
//! swap file or anything else in those directories is ignored, so the agent's own log lines cannot feed
//! back into it.
//!
//! inotify (through `notify`) is used when it can be; when it cannot (`inotify_init` fails with EMFILE:
//! the per-user limit of 128 instances is shared by every sidecar running as one UID on a node; adding a
//! watch fails with ENOSPC: `max_user_watches`), the same names are polled: `stat` every
//! [`POLL_INTERVAL`] (inode, size, mode, mtime, ctime, link target). The fallback is logged once at warn
//! level and shown in `/status.watch` and `osc_agent_watch_mode`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use super::Trigger;
use crate::state::NameSet;
use crate::telemetry::Telemetry;
use crate::util::escape_path;

/// How often watched names are checked when inotify is unavailable.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

const DATA_LINK: &str = "..data";

/// How changes are noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Inotify,
    Polling,
    /// Nothing to watch (no credential file; drift repair off or no output yet).
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Inotify => "inotify",
            Mode::Polling => "polling",
            Mode::Off => "off",
        }
    }
}

/// The watched names (absolute paths).
#[derive(Clone, Debug, Default)]
struct Targets {
    credential_files: BTreeSet<PathBuf>,
    credential_dirs: BTreeSet<PathBuf>,
    /// Output directory → the visible names (keys) last written there.
    output_dirs: BTreeMap<PathBuf, NameSet>,
    output_files: BTreeSet<PathBuf>,
    /// Polling: the fingerprints of the last round (new targets get theirs when they are added).
    baseline: BTreeMap<PathBuf, Fingerprint>,
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

impl Targets {
    /// Which triggers a change at `path` stands for.
    fn classify(&self, path: &Path) -> (bool, bool) {
        let credentials = self.credential_files.contains(path)
            || (path.file_name() == Some(DATA_LINK.as_ref())
                && self.credential_dirs.contains(&parent(path)));
        let drift = self.output_files.contains(path)
            || self.output_dirs.iter().any(|(dir, keys)| {
                let Ok(rel) = path.strip_prefix(dir) else {
                    return false;
                };
                match rel.components().next() {
                    // The directory itself (removed, replaced).
                    None => true,
                    Some(Component::Normal(first)) => {
                        first.as_encoded_bytes().starts_with(b"..")
                            || first.to_str().is_some_and(|k| keys.contains(k))
                    }
                    Some(_) => false,
                }
            });
        (drift, credentials)
    }

    fn is_empty(&self) -> bool {
        self.credential_files.is_empty()
            && self.output_dirs.is_empty()
            && self.output_files.is_empty()
    }

    /// Directories to give to inotify.
    fn watch_dirs(&self) -> BTreeMap<PathBuf, RecursiveMode> {
        let mut dirs: BTreeMap<PathBuf, RecursiveMode> = self
            .credential_dirs
            .iter()
            .cloned()
            .chain(self.output_files.iter().map(|f| parent(f)))
            .map(|d| (d, RecursiveMode::NonRecursive))
            .collect();
        // Edits through a key's link land in the generation directory: watched recursively.
        for d in self.output_dirs.keys() {
            dirs.insert(d.clone(), RecursiveMode::Recursive);
        }
        dirs
    }

    /// The paths polled; `true` for the output directories themselves, of which only the identity
    /// counts (new neighbours change a directory's times, and are not watched names).
    fn polled(&self) -> Vec<(PathBuf, bool)> {
        let mut v: Vec<(PathBuf, bool)> = Vec::new();
        let mut add = |p: PathBuf| v.push((p, false));
        self.credential_files.iter().cloned().for_each(&mut add);
        self.credential_dirs
            .iter()
            .map(|d| d.join(DATA_LINK))
            .for_each(&mut add);
        self.output_files.iter().cloned().for_each(&mut add);
        for (dir, keys) in &self.output_dirs {
            add(dir.join(DATA_LINK));
            keys.iter().map(|k| dir.join(k)).for_each(&mut add);
        }
        v.extend(self.output_dirs.keys().map(|d| (d.clone(), true)));
        v
    }

    /// Polling: fingerprints for targets that have none yet, taken now (right after the write that
    /// made them), so that a change before the next round is seen as one.
    fn take_baseline(&mut self) {
        for (path, identity_only) in self.polled() {
            self.baseline
                .entry(path)
                .or_insert_with_key(|p| fingerprint(p, identity_only));
        }
    }

    /// Polling: one round; the targets whose fingerprint changed since the last one.
    fn round(&mut self) -> Vec<PathBuf> {
        let current: BTreeMap<PathBuf, Fingerprint> = self
            .polled()
            .into_iter()
            .map(|(p, identity_only)| {
                let f = fingerprint(&p, identity_only);
                (p, f)
            })
            .collect();
        let changed = current
            .iter()
            .filter(|(p, f)| self.baseline.get(*p).is_some_and(|old| old != *f))
            .map(|(p, _)| p.clone())
            .collect();
        self.baseline = current;
        changed
    }
}

/// What polling compares: the entry itself (`lstat`, link target) and what it leads to (`stat`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    entry: Option<(u64, u64, u32, i64, i64, i64, i64)>,
    link: Option<PathBuf>,
    target: Option<(u64, u64, u32, i64, i64, i64, i64)>,
}

fn meta_key(m: &std::fs::Metadata) -> (u64, u64, u32, i64, i64, i64, i64) {
    (
        m.ino(),
        m.size(),
        m.mode(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

fn fingerprint(path: &Path, identity_only: bool) -> Fingerprint {
    if identity_only {
        return Fingerprint {
            entry: std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.ino(), 0, 0, 0, 0, 0, 0)),
            link: None,
            target: None,
        };
    }
    Fingerprint {
        entry: std::fs::symlink_metadata(path).ok().map(|m| meta_key(&m)),
        link: std::fs::read_link(path).ok(),
        target: std::fs::metadata(path).ok().map(|m| meta_key(&m)),
    }
}

enum Backend {
    Inotify(RecommendedWatcher),
    /// Dropping the sender stops the polling thread.
    Polling {
        _stop: Sender<()>,
    },
    Off,
}

/// The running watcher; dropping it stops watching.
pub struct Watch {
    targets: Arc<Mutex<Targets>>,
    tx: UnboundedSender<Trigger>,
    telemetry: Arc<Telemetry>,
    backend: Backend,
    /// Directories given to inotify so far.
    watched: BTreeSet<PathBuf>,
}

fn send(targets: &Mutex<Targets>, tx: &UnboundedSender<Trigger>, paths: &[PathBuf]) {
    let (mut drift, mut credentials) = (false, false);
    if let Ok(t) = targets.lock() {
        for path in paths {
            let (d, c) = t.classify(path);
            if d || c {
                debug!(path = %escape_path(path), drift = d, credentials = c, "watched file changed");
            }
            drift |= d;
            credentials |= c;
        }
    }
    if drift {
        let _ = tx.send(Trigger::Drift);
    }
    if credentials {
        let _ = tx.send(Trigger::Credentials);
    }
}

impl Watch {
    /// Start watching the credential files (outputs are added by [`Watch::watch_outputs`]).
    pub fn start(
        credential_files: Vec<PathBuf>,
        tx: UnboundedSender<Trigger>,
        telemetry: Arc<Telemetry>,
    ) -> Watch {
        let credential_files: BTreeSet<PathBuf> =
            credential_files.iter().map(|p| absolute(p)).collect();
        let targets = Targets {
            credential_dirs: credential_files.iter().map(|p| parent(p)).collect(),
            credential_files,
            ..Targets::default()
        };
        let mut watch = Watch {
            targets: Arc::new(Mutex::new(targets)),
            tx,
            telemetry,
            backend: Backend::Off,
            watched: BTreeSet::new(),
        };
        watch.refresh();
        watch
    }

    /// Also watch the outputs (once they exist): drift repair.
    pub fn watch_outputs(&mut self, dirs: &[PathBuf], files: &[PathBuf]) {
        if let Ok(mut t) = self.targets.lock() {
            for d in dirs {
                t.output_dirs.entry(absolute(d)).or_default();
            }
            t.output_files.extend(files.iter().map(|f| absolute(f)));
            if matches!(self.backend, Backend::Polling { .. }) {
                t.take_baseline();
            }
        }
        self.refresh();
    }

    /// The keys just written into output directory `dir` (their links are watched).
    pub fn set_keys(&self, dir: &Path, keys: NameSet) {
        if let Ok(mut t) = self.targets.lock()
            && let Some(set) = t.output_dirs.get_mut(&absolute(dir))
        {
            *set = keys;
            if matches!(self.backend, Backend::Polling { .. }) {
                t.take_baseline();
            }
        }
    }

    /// Bring the backend in line with the targets: inotify if possible, else polling.
    fn refresh(&mut self) {
        if matches!(self.backend, Backend::Polling { .. }) {
            return; // polling reads the targets on every round
        }
        let targets = match self.targets.lock() {
            Ok(t) => t.clone(),
            Err(_) => return,
        };
        if targets.is_empty() {
            return;
        }
        if matches!(self.backend, Backend::Off) {
            match self.new_inotify() {
                Ok(w) => self.backend = Backend::Inotify(w),
                Err(e) => return self.fall_back(&format!("inotify unavailable: {}", explain(&e))),
            }
        }
        let mut failure = None;
        if let Backend::Inotify(watcher) = &mut self.backend {
            for (dir, mode) in targets.watch_dirs() {
                if self.watched.contains(&dir) && mode == RecursiveMode::NonRecursive {
                    continue;
                }
                match watcher.watch(&dir, mode) {
                    Ok(()) => {
                        debug!(path = %escape_path(&dir), "watching");
                        self.watched.insert(dir);
                    }
                    Err(e) => {
                        failure = Some(format!(
                            "cannot watch {} with inotify: {}",
                            escape_path(&dir),
                            explain(&e)
                        ));
                        break;
                    }
                }
            }
        }
        if let Some(reason) = failure {
            return self.fall_back(&reason);
        }
        self.telemetry.set_watch(Mode::Inotify.as_str(), None);
    }

    fn new_inotify(&self) -> notify::Result<RecommendedWatcher> {
        let targets = self.targets.clone();
        let tx = self.tx.clone();
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if event.need_rescan() {
                // The kernel's queue overflowed: events were lost, look at everything again.
                let _ = tx.send(Trigger::Drift);
                let _ = tx.send(Trigger::Credentials);
                return;
            }
            if !matches!(event.kind, notify::EventKind::Access(_)) {
                send(&targets, &tx, &event.paths);
            }
        })
    }

    fn fall_back(&mut self, reason: &str) {
        warn!(
            "file watching: {reason}; polling every {}s instead (drift repair and credential reload \
             notice changes within that time)",
            POLL_INTERVAL.as_secs()
        );
        self.backend = Backend::Off; // drops the inotify instance, if any
        let (stop, stopped) = channel::<()>();
        let targets = self.targets.clone();
        if let Ok(mut t) = targets.lock() {
            t.take_baseline();
        }
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("osc-watch-poll".into())
            .spawn(move || poll(&targets, &tx, &stopped));
        match spawned {
            Ok(_) => {
                self.backend = Backend::Polling { _stop: stop };
                self.telemetry
                    .set_watch(Mode::Polling.as_str(), Some(reason.to_owned()));
            }
            Err(e) => {
                warn!("file watching off: cannot start the polling thread: {e}");
                self.telemetry.set_watch(
                    Mode::Off.as_str(),
                    Some(format!("{reason}; polling thread failed: {e}")),
                );
            }
        }
    }
}

/// An inotify failure, with the limit at fault when it is one.
fn explain(e: &notify::Error) -> String {
    let errno = match &e.kind {
        notify::ErrorKind::MaxFilesWatch => Some(nix::libc::ENOSPC),
        notify::ErrorKind::Io(io) => io.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(nix::libc::ENOSPC) => "the inotify watch limit is reached (sysctl fs.inotify.max_user_watches)".into(),
        Some(nix::libc::EMFILE) => "too many inotify instances or open files (sysctl fs.inotify.max_user_instances: \
             128 per user by default, shared by every container of that UID on the node; or the open-file limit)"
            .into(),
        Some(nix::libc::ENFILE) => "the system-wide open-file limit is reached".into(),
        _ => match &e.kind {
            notify::ErrorKind::Io(io) => crate::util::io_reason(io),
            notify::ErrorKind::PathNotFound => "no such file or directory".into(),
            notify::ErrorKind::Generic(text) => crate::util::escape(text).into_owned(),
            other => format!("{other:?}"),
        },
    }
}

/// The polling thread: a round every [`POLL_INTERVAL`] until the sender is dropped.
fn poll(
    targets: &Mutex<Targets>,
    tx: &UnboundedSender<Trigger>,
    stopped: &std::sync::mpsc::Receiver<()>,
) {
    loop {
        match stopped.recv_timeout(POLL_INTERVAL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let changed = targets.lock().map(|mut t| t.round()).unwrap_or_default();
        if !changed.is_empty() {
            send(targets, tx, &changed);
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_watched_names_count() {
        let mut t = Targets {
            credential_files: [PathBuf::from("/s/user-key")].into(),
            credential_dirs: [PathBuf::from("/s")].into(),
            output_files: [PathBuf::from("/o/app.env")].into(),
            ..Targets::default()
        };
        t.output_dirs
            .insert("/out".into(), ["db.url"].into_iter().collect());
        let c = |p: &str| t.classify(Path::new(p));
        assert_eq!(c("/s/user-key"), (false, true));
        assert_eq!(c("/s/..data"), (false, true));
        assert_eq!(c("/s/agent.log"), (false, false), "a neighbour is ignored");
        assert_eq!(c("/s/..data_tmp"), (false, false));
        assert_eq!(c("/o/app.env"), (true, false));
        assert_eq!(c("/o/.app.env.osc-tmp-1234"), (false, false));
        assert_eq!(c("/o/agent.log"), (false, false));
        assert_eq!(c("/out/db.url"), (true, false));
        assert_eq!(c("/out/..data"), (true, false));
        assert_eq!(c("/out/..2026_01_01_00_00_00.0_ab/db.url"), (true, false));
        assert_eq!(c("/out"), (true, false));
        assert_eq!(c("/out/agent.log"), (false, false), "not a key");
        assert_eq!(c("/outside/db.url"), (false, false));
    }

    #[test]
    fn polling_sees_replacement_edit_and_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("k");
        std::fs::write(&f, "a").unwrap();
        let before = fingerprint(&f, false);
        assert_eq!(before, fingerprint(&f, false));
        std::fs::write(tmp.path().join("k.new"), "b").unwrap();
        std::fs::rename(tmp.path().join("k.new"), &f).unwrap();
        assert_ne!(before, fingerprint(&f, false), "replaced by rename");
        let link = tmp.path().join("..data");
        std::os::unix::fs::symlink("gen1", &link).unwrap();
        let l1 = fingerprint(&link, false);
        std::os::unix::fs::symlink("gen2", tmp.path().join("..data_tmp")).unwrap();
        std::fs::rename(tmp.path().join("..data_tmp"), &link).unwrap();
        assert_ne!(l1, fingerprint(&link, false), "link swapped");
    }
}
