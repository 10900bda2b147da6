//! `osc-agent backup inspect FILE`: what a backup holds (environments, keys, categories, counts,
//! timestamps). Values only with `--show-values`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use super::Backup;

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// The backup: the JSON answer of `POST /backup`, or the bare base64 blob.
    pub file: PathBuf,
    /// File holding the backup password. Or set $OSC_BACKUP_PASSWORD.
    #[arg(long, env = "OSC_BACKUP_PASSWORD_FILE", value_name = "FILE")]
    pub backup_password_file: Option<PathBuf>,
    /// Only this environment.
    #[arg(long, value_name = "NAME")]
    pub environment: Option<String>,
    /// Print the decrypted values too (they are secrets: mind your terminal and scrollback).
    #[arg(long)]
    pub show_values: bool,
}

/// Names from the file, shown on one line each (a key holding a newline cannot forge report lines).
fn esc(text: &str) -> String {
    crate::util::escape(text).into_owned()
}

/// Human-readable report of a decrypted backup (every name escaped).
pub fn report(backup: &Backup, environment: Option<&str>, show_values: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "backup {} (format {}), taken {}, {} keys in all",
        esc(&backup.backup_id),
        esc(&backup.version),
        esc(&backup.backup_timestamp),
        backup.total_keys
    );
    let mut by_env: BTreeMap<&str, Vec<&super::BackupEntry>> = BTreeMap::new();
    for c in &backup.configurations {
        if environment.is_none_or(|e| e == c.environment) {
            by_env.entry(&c.environment).or_default().push(c);
        }
    }
    if by_env.is_empty() {
        let _ = writeln!(
            out,
            "\nno entries{}",
            environment
                .map(|e| format!(" in environment '{}'", esc(e)))
                .unwrap_or_default()
        );
        return out;
    }
    let _ = writeln!(out, "\n{:<24} {:>5}  categories", "environment", "keys");
    for (env, entries) in &by_env {
        let mut cats: Vec<String> = entries
            .iter()
            .map(|e| esc(e.category.as_deref().unwrap_or("-")))
            .collect();
        cats.sort_unstable();
        cats.dedup();
        let _ = writeln!(
            out,
            "{:<24} {:>5}  {}",
            esc(env),
            entries.len(),
            cats.join(", ")
        );
    }
    for (env, entries) in &by_env {
        let _ = writeln!(out, "\n{}:", esc(env));
        let width = entries
            .iter()
            .map(|e| esc(&e.key).chars().count())
            .max()
            .unwrap_or(3)
            .max(3);
        let _ = writeln!(
            out,
            "  {:<width$}  {:<16}  {:<27}  value",
            "key", "category", "updated"
        );
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        for e in sorted {
            let value = if show_values {
                e.value.to_string()
            } else {
                format!("<{}, hidden: --show-values>", kind(&e.value))
            };
            let _ = writeln!(
                out,
                "  {:<width$}  {:<16}  {:<27}  {value}",
                esc(&e.key),
                esc(e.category.as_deref().unwrap_or("-")),
                esc(e.updated_at.as_deref().unwrap_or("-")),
            );
        }
    }
    out
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "list",
        serde_json::Value::Object(_) => "object",
    }
}
