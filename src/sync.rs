//! One reconcile: list the environment, select, render, write. The live loop calls this on every hint;
//! `--once` calls it once.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::warn;

use crate::config::{BackupFile, ConfigError, Outputs, Settings, Source};
use crate::hash::ContentHasher;
use crate::render::{RejectedKey, RenderError, Rendered, Renderer};
use crate::sink::kube::ObjectSink;
use crate::sink::{self, SinkError, WriteReport};
use crate::source::backup::{self, BackupInfo, BackupLoadError};
use crate::source::{Client, SourceError};
use crate::state::{Digests, Filter, Snapshot};

/// What one successful (or partly successful) reconcile did.
#[derive(Debug, Default, Clone)]
pub struct SyncReport {
    /// Entries selected after filtering.
    pub keys: usize,
    /// Keyed content hash of everything rendered (outputs, paths and formats included).
    pub hash: String,
    /// Keyed hash of the selected entries only (keys and values): equal on every replica that reads the
    /// same data with the same user key, whatever its output paths. Actions and rollout-restart use it.
    pub config_hash: String,
    /// Outputs whose content changed.
    pub changed: Vec<PathBuf>,
    /// A new generation was swapped into --output-dir.
    pub dir_swapped: bool,
    pub files_written: usize,
    /// Links or files restored without a content change.
    pub repaired: usize,
    /// Keys left out of --output-dir (unsafe names).
    pub rejected: Vec<RejectedKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Backup(#[from] BackupLoadError),
    #[error("nothing written: {0}")]
    Render(#[from] RenderError),
    #[error("{} output(s) could not be written, the others were: {}", .errors.len(), first(.errors))]
    Write {
        report: SyncReport,
        errors: Vec<SinkError>,
    },
    #[error("internal error: {0}")]
    Internal(String),
    /// No entry selected and `--allow-empty` not set: nothing written (a mistyped `--environment`
    /// must not empty the outputs). The message names the environment and the filters.
    #[error("{0}")]
    Empty(String),
}

fn first(errors: &[SinkError]) -> String {
    errors.first().map(ToString::to_string).unwrap_or_default()
}

/// A successful apply: the report and what was rendered (kept to repair drift without a server call).
#[derive(Debug, Clone)]
pub struct Applied {
    pub report: SyncReport,
    pub rendered: Arc<Rendered>,
    /// Keyed hash of each selected entry's value, to tell actions which keys changed.
    pub digests: Digests,
    /// Keys changed since the local outputs were last completely written (by this or an earlier
    /// process), from the record beside them; `None` when unknown.
    pub changed_on_disk: Option<Vec<String>>,
}

impl Applied {
    /// Keys changed since `previous` (digests this process applied before), else since what is on
    /// disk, else every key.
    pub fn changed_keys(&self, previous: Option<&Digests>) -> Vec<String> {
        match (previous, &self.changed_on_disk) {
            (None, Some(keys)) => keys.clone(),
            (previous, _) => changed_keys(previous, &self.digests),
        }
    }
}

/// Why the outputs hold data that is not (yet) the server's current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stale {
    /// Rendered from `--fallback-backup`.
    Backup(BackupInfo),
    /// Left on disk by an earlier run, kept untouched.
    LastKnownGood { generation: String },
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::Backup(b) => write!(
                f,
                "stale (from backup {}, {})",
                b.backup_id, b.backup_timestamp
            ),
            Stale::LastKnownGood { generation } => {
                write!(
                    f,
                    "stale (last-known-good files of an earlier run: {generation})"
                )
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Origin {
    Server {
        client: Box<Client>,
        fallback: Option<BackupFile>,
    },
    Backup(BackupFile),
}

/// Keys added, changed or removed between two digest maps (all keys when there is no previous one).
pub fn changed_keys(previous: Option<&Digests>, current: &Digests) -> Vec<String> {
    let Some(prev) = previous else {
        return current.keys().map(str::to_owned).collect();
    };
    let mut keys: Vec<String> = current
        .iter()
        .filter(|(k, d)| prev.get(k) != Some(*d))
        .map(|(k, _)| k.to_owned())
        .chain(
            prev.keys()
                .filter(|k| !current.contains_key(k))
                .map(str::to_owned),
        )
        .collect();
    keys.sort();
    keys
}

/// The pipeline's stages, built once from the settings.
#[derive(Clone, Debug)]
pub struct Agent {
    origin: Origin,
    filter: Filter,
    renderer: Arc<Renderer>,
    environment: String,
    outputs: Outputs,
    objects: Option<Arc<ObjectSink>>,
    hasher: ContentHasher,
    /// Where the hashing key comes from (re-read at every apply: a rotated user key re-keys).
    source: Source,
    allow_empty: bool,
    /// The filters as flags (` --include 'a*'`), for the empty-environment error.
    filters: String,
}

impl Agent {
    pub fn new(settings: &Settings) -> Result<Agent, ConfigError> {
        let origin = match &settings.source {
            Source::Server(server) => Origin::Server {
                client: Box::new(Client::new(server, settings.live.stream_read_timeout)?),
                fallback: server.fallback.clone(),
            },
            Source::Backup(file) => Origin::Backup(file.clone()),
        };
        let hasher = content_hasher(&settings.source)?;
        Ok(Agent {
            origin,
            filter: Filter::new(&settings.selection)?,
            renderer: Arc::new(Renderer::new(
                &settings.outputs,
                settings.objects.any(),
                hasher.clone(),
            )?),
            hasher,
            source: settings.source.clone(),
            environment: settings.environment.clone(),
            outputs: settings.outputs.clone(),
            objects: None,
            allow_empty: settings.allow_empty,
            filters: describe_filters(&settings.selection),
        })
    }

    /// Whether a ConfigMap/Secret output already held an earlier run's content when first checked.
    pub fn objects_found_earlier(&self) -> bool {
        self.objects.as_ref().is_some_and(|o| o.found_earlier())
    }

    /// Re-check the ConfigMap/Secret on the next apply instead of trusting the remembered hash.
    pub fn recheck_objects(&self) {
        if let Some(sink) = &self.objects {
            sink.forget_applied();
        }
    }

    /// Also apply to a ConfigMap and/or Secret.
    pub fn with_objects(mut self, sink: Option<ObjectSink>) -> Agent {
        self.objects = sink.map(Arc::new);
        self
    }

    /// The server client (`None` with `--from-backup`).
    pub fn client(&self) -> Option<&Client> {
        match &self.origin {
            Origin::Server { client, .. } => Some(client),
            Origin::Backup(_) => None,
        }
    }

    pub fn has_fallback(&self) -> bool {
        matches!(
            &self.origin,
            Origin::Server {
                fallback: Some(_),
                ..
            }
        )
    }

    /// Read the environment and select entries. Touches nothing on disk; safe to cancel.
    pub async fn fetch(&self) -> Result<Snapshot, SyncError> {
        match &self.origin {
            Origin::Server { client, .. } => {
                let entries = client.list(&self.environment).await?;
                let listed = entries.len();
                let snapshot = self.filter.apply(&self.environment, entries);
                self.refuse_empty(&snapshot, Some(listed))
                    .map_err(SyncError::Empty)?;
                Ok(snapshot)
            }
            Origin::Backup(file) => Ok(self.read_backup(file).await?.0),
        }
    }

    async fn read_backup(
        &self,
        file: &BackupFile,
    ) -> Result<(Snapshot, BackupInfo), BackupLoadError> {
        let decrypted = backup::load(file).await?;
        let (entries, info) = backup::entries(&decrypted, &file.path, &self.environment)?;
        Ok((self.filter.apply(&self.environment, entries), info))
    }

    /// The server cannot be reached at start: keep the files of an earlier run if every output is there,
    /// else render `--fallback-backup` if there is one. `None` when neither applies.
    pub async fn degraded_start(&self) -> Option<Result<Stale, SyncError>> {
        if let Some(generation) = sink::existing_outputs(&self.outputs) {
            return Some(Ok(Stale::LastKnownGood { generation }));
        }
        let Origin::Server {
            fallback: Some(file),
            ..
        } = &self.origin
        else {
            return None;
        };
        Some(
            async {
                let (snapshot, info) = self.read_backup(file).await?;
                self.apply(snapshot).await?;
                Ok(Stale::Backup(info))
            }
            .await,
        )
    }

    /// Render and write a snapshot. Runs to completion once started (do not cancel mid-write).
    pub async fn apply(&self, snapshot: Snapshot) -> Result<Applied, SyncError> {
        self.refuse_empty(&snapshot, None)
            .map_err(SyncError::Empty)?;
        let keys = snapshot.entries.len();
        // The current user key (or backup password): after a rotation, hashes follow the new key.
        if let Ok(secret) = hash_secret(&self.source) {
            self.hasher.rekey(&secret);
        }
        // Kept until the next sync: in one buffer (see `Digests`); the entries come in key order.
        let mut digests = Digests::with_capacity(snapshot.entries.len());
        for (k, e) in &snapshot.entries {
            digests.push(k, &value_digest(&self.hasher, &e.value));
        }
        digests.shrink_to_fit();
        let config_hash = config_hash(&self.hasher, &digests);
        let renderer = self.renderer.clone();
        let rendered = tokio::task::spawn_blocking(move || renderer.render(&snapshot))
            .await
            .map_err(|e| SyncError::Internal(format!("render task failed: {e}")))??;
        for r in &rendered.rejected {
            warn!(
                "key '{}' not written to {}: {} (other keys are synced)",
                crate::util::Escaped(&r.key),
                r.output,
                r.reason
            );
        }
        let rendered = Arc::new(rendered);
        let (outputs, d) = (self.outputs.clone(), digests.clone());
        let changed_on_disk =
            tokio::task::spawn_blocking(move || sink::changed_since_record(&outputs, &d))
                .await
                .unwrap_or(None);
        let mut written = self.write(rendered.clone()).await?;
        if let (Some(sink), Some(payload)) = (&self.objects, &rendered.objects)
            && !sink::aborting()
        {
            let (changed, errors) = sink.apply(payload).await;
            written
                .changed
                .extend(changed.into_iter().map(PathBuf::from));
            written.errors.extend(errors);
        }
        let report = SyncReport {
            keys,
            hash: rendered.hash.clone(),
            config_hash,
            dir_swapped: rendered
                .dir
                .as_ref()
                .is_some_and(|d| written.changed.contains(&d.path)),
            changed: written.changed,
            files_written: written.files_written,
            repaired: written.repaired,
            rejected: rendered.rejected.clone(),
        };
        // The response, the entries and the render's transient buffers are gone by now.
        let _ = tokio::task::spawn_blocking(crate::util::release_freed_memory).await;
        if written.errors.is_empty() {
            let (outputs, d) = (self.outputs.clone(), digests.clone());
            match tokio::task::spawn_blocking(move || sink::record_keys(&outputs, &d)).await {
                Ok(Err(e)) => warn!("{e} (the next start may name every key as changed)"),
                Err(e) => warn!("recording the keys failed: {e}"),
                Ok(Ok(())) => {}
            }
            Ok(Applied {
                report,
                rendered,
                digests,
                changed_on_disk,
            })
        } else {
            Err(SyncError::Write {
                report,
                errors: written.errors,
            })
        }
    }

    /// The message of [`SyncError::Empty`] when nothing is selected and `--allow-empty` is not set; `listed`: the
    /// number of entries the server listed before the filters, when known.
    fn refuse_empty(&self, snapshot: &Snapshot, listed: Option<usize>) -> Result<(), String> {
        if self.allow_empty || !snapshot.entries.is_empty() {
            return Ok(());
        }
        let env = format!("environment '{}'", crate::util::Escaped(&self.environment));
        let f = &self.filters;
        let what = match listed {
            Some(0) => format!("the server listed no entry for {env}"),
            Some(n) => format!("none of the {n} entries of {env} passes the filters{f}"),
            None if f.is_empty() => format!("{env} has no entries"),
            None => format!("no entry of {env} passes the filters{f}"),
        };
        Err(format!(
            "{what}: nothing written. Check {}{}, or pass --allow-empty to accept an empty environment",
            crate::config::setting("environment"),
            if f.is_empty() { "" } else { " and the filters" },
        ))
    }

    /// Write (or re-write after drift) what was rendered; a no-op when the disk already matches.
    pub async fn write(&self, rendered: Arc<Rendered>) -> Result<WriteReport, SyncError> {
        let options = self.outputs.file;
        tokio::task::spawn_blocking(move || sink::write_all(&rendered, &options))
            .await
            .map_err(|e| SyncError::Internal(format!("write task failed: {e}")))
    }

    /// Fetch and apply.
    pub async fn sync_once(&self) -> Result<SyncReport, SyncError> {
        let snapshot = self.fetch().await?;
        self.apply(snapshot).await.map(|a| a.report)
    }
}

/// ` --include 'a*' --exclude 'b' --category 'c'` (empty without filters), escaped for messages.
fn describe_filters(sel: &crate::config::Selection) -> String {
    [
        ("--include", &sel.include),
        ("--exclude", &sel.exclude),
        ("--category", &sel.categories),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(flag, v)| {
        let list: Vec<String> = v
            .iter()
            .map(|g| format!("'{}'", crate::util::Escaped(g)))
            .collect();
        format!(" {flag} {}", list.join(","))
    })
    .collect()
}

/// The hashing key: derived from the user key (or the backup password with `--from-backup`), so that
/// replicas agree and no plain digest of a value ever leaves the process.
fn content_hasher(source: &Source) -> Result<ContentHasher, ConfigError> {
    hash_secret(source).map(|s| ContentHasher::derive(&s))
}

/// The credential the hashing key is derived from.
fn hash_secret(source: &Source) -> Result<crate::config::Secret, ConfigError> {
    match source {
        Source::Server(server) => server.credentials.user_key.read_user_key(),
        Source::Backup(file) => file.password.read(),
    }
    .map_err(|e| ConfigError(e.to_string()))
}

/// Keyed digest of one entry's value (its compact JSON), used to tell which keys changed.
pub fn value_digest(hasher: &ContentHasher, value: &serde_json::Value) -> String {
    hasher.hex(value.to_string().as_bytes())
}

/// The configuration hash: of the selected keys and their values only, so it is the same for every
/// replica whatever its output paths or formats (actions and `rollout-restart` carry it; `/status` shows
/// it as `sync.config_hash`). `digests` maps each key to its [`value_digest`].
pub fn config_hash(hasher: &ContentHasher, digests: &Digests) -> String {
    hasher.fields(
        digests
            .iter()
            .flat_map(|(k, d)| [k.as_bytes(), d.as_bytes()]),
    )
}
