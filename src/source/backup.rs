//! A backup file as a source of entries: `--from-backup` (no server) and `--fallback-backup` (server
//! unreachable at start). Decryption (PBKDF2, 480,000 rounds) runs once per file, off the async executor.

use std::path::PathBuf;

use crate::backup::{self, Backup};
use crate::config::BackupFile;
use crate::state::Entry;

/// A backup could not be used. Names the file; never holds a decrypted byte or the password.
#[derive(Debug, thiserror::Error)]
#[error("backup '{}': {reason}", path.display())]
pub struct BackupLoadError {
    pub path: PathBuf,
    pub reason: String,
}

/// Identity of a loaded backup, for `/status`, metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    pub backup_id: String,
    pub backup_timestamp: String,
}

/// Read and decrypt a backup file.
pub async fn load(file: &BackupFile) -> Result<Backup, BackupLoadError> {
    let file = file.clone();
    let fail = |path: &PathBuf, reason: String| BackupLoadError {
        path: path.clone(),
        reason,
    };
    tokio::task::spawn_blocking(move || {
        let password = file
            .password
            .read()
            .map_err(|e| fail(&file.path, e.to_string()))?;
        let bytes = std::fs::read(&file.path).map_err(|e| {
            fail(
                &file.path,
                format!("cannot read: {}", crate::util::io_reason(&e)),
            )
        })?;
        backup::decrypt(&bytes, password.expose().as_bytes())
            .map_err(|e| fail(&file.path, e.to_string()))
    })
    .await
    .map_err(|e| BackupLoadError {
        path: PathBuf::new(),
        reason: format!("decryption task failed: {e}"),
    })?
}

/// The entries of one environment. An environment the backup does not hold is an error (rendering
/// nothing would delete every file).
pub fn entries(
    backup: &Backup,
    path: &std::path::Path,
    environment: &str,
) -> Result<(Vec<Entry>, BackupInfo), BackupLoadError> {
    let entries: Vec<Entry> = backup
        .configurations
        .iter()
        .filter(|c| c.environment == environment)
        .map(|c| Entry {
            key: c.key.clone(),
            category: c.category.clone(),
            value: c.value.clone(),
        })
        .collect();
    if entries.is_empty() {
        let mut envs: Vec<&str> = backup
            .configurations
            .iter()
            .map(|c| c.environment.as_str())
            .collect();
        envs.sort_unstable();
        envs.dedup();
        return Err(BackupLoadError {
            path: path.to_owned(),
            reason: format!(
                "holds no entry for environment '{environment}' (it holds: {})",
                if envs.is_empty() {
                    "nothing".to_owned()
                } else {
                    envs.join(", ")
                }
            ),
        });
    }
    Ok((
        entries,
        BackupInfo {
            backup_id: backup.backup_id.clone(),
            backup_timestamp: backup.backup_timestamp.clone(),
        },
    ))
}
