//! `exec`: run a command (no shell) when the content changed.
//!
//! The command inherits the agent's environment, standard output and standard error, plus:
//!
//! | variable                 | value                                                              |
//! |--------------------------|--------------------------------------------------------------------|
//! | `OSC_CONTENT_HASH`       | content hash of everything rendered (always set)                   |
//! | `OSC_ENVIRONMENT`        | the environment name (always set)                                  |
//! | `OSC_CHANGED_KEYS_COUNT` | how many keys changed (always set)                                 |
//! | `OSC_CHANGED_KEYS_FILE`  | a file listing the changed keys, one per line (set unless the file cannot be written) |
//! | `OSC_CHANGED_KEYS`       | the same list, one per line, only when it is at most [`MAX_KEYS_IN_ENV`] bytes |
//!
//! The kernel refuses to start a program whose environment holds one variable over 128 KiB or more than
//! its argument space in total ("Argument list too long"): a list of many long key names would keep the
//! command from ever running. So the list always goes through the file, and into `OSC_CHANGED_KEYS`
//! only while it is short; otherwise that variable is not set at all (never cut short), and
//! `OSC_CHANGED_KEYS_COUNT` still tells how many keys changed. A key holding a backslash or a control
//! character (a newline, NUL, ...) is written escaped as in the logs (`\\`, `\n`, `\0`, `\u{1b}`), so that
//! every line is one key. The file lives in a private directory (mode 0700, under `$TMPDIR` or `/tmp`),
//! has mode 0600, and is removed when the command exits or is killed.
//!
//! Never a value. The command runs in its own process group, so that on timeout its children are killed
//! with it. It starts with every signal at its default action and nothing blocked, whatever the agent
//! inherited (see [`super::signals`]).

use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::{CommandExt as _, ExitStatusExt};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::ActionContext;
use super::ActionError;
use super::signals;
use super::spec::ExecSpec;
use crate::config::HumanDuration;
use crate::util::{escape, escape_path, io_reason};

/// Time limit when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// `OSC_CHANGED_KEYS` is set only when the list (escaped keys joined by newlines) is at most this many
/// bytes: a quarter of the kernel's 128 KiB limit for one variable, leaving room for the agent's own
/// environment within the total limit.
pub const MAX_KEYS_IN_ENV: usize = 32 * 1024;
/// Name of the file in the private directory that `OSC_CHANGED_KEYS_FILE` points at.
const KEYS_FILE_NAME: &str = "changed-keys";

/// Runs the command and returns its exit code (always 0: anything else is an error). On timeout the
/// command and its process group are killed. The changed-keys file is removed before this returns.
pub async fn run(spec: &ExecSpec, ctx: &ActionContext) -> Result<i32, ActionError> {
    let (program, args) = spec
        .command
        .0
        .split_first()
        .ok_or_else(|| ActionError("exec: the command is empty".to_owned()))?;
    // Only the program is ever shown: arguments may carry tokens.
    let shown = program.as_str();
    let timeout = spec.timeout.map_or(DEFAULT_TIMEOUT, |t| t.0);
    // Removed (with its directory) when dropped, whatever happens below.
    let keys_file = match KeysFile::write(&ctx.changed_keys) {
        Ok(file) => Some(file),
        Err(reason) => {
            tracing::warn!(
                "exec: cannot write the changed-keys file ({reason}); running '{shown}' without \
                 OSC_CHANGED_KEYS_FILE: point TMPDIR at a writable directory"
            );
            None
        }
    };
    let vars = environment(ctx, keys_file.as_ref().map(|f| f.path.clone()));
    if !vars.iter().any(|(name, _)| *name == "OSC_CHANGED_KEYS") {
        tracing::info!(
            keys = ctx.changed_keys.len(),
            "exec: the changed keys exceed {MAX_KEYS_IN_ENV} bytes: OSC_CHANGED_KEYS is not set, the list \
             is in OSC_CHANGED_KEYS_FILE"
        );
    }
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        // Set below when they apply: never a stale value inherited from the agent's own environment.
        .env_remove("OSC_CHANGED_KEYS")
        .env_remove("OSC_CHANGED_KEYS_FILE")
        .envs(vars)
        // The agent may take its credentials from these; the command never gets them.
        .env_remove("OSC_USER_KEY")
        .env_remove("OSC_API_KEY")
        .env_remove("OSC_TOKEN")
        .env_remove("OSC_BACKUP_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0);
    signals::reset_on_exec(&mut command);
    let mut child = Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| spawn_error(program, &e))?;
    let result = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => exit_code(shown, status),
        Ok(Err(e)) => Err(ActionError(format!(
            "exec: cannot wait for '{shown}': {}",
            io_reason(&e)
        ))),
        Err(_) => {
            kill(&mut child).await;
            Err(ActionError(format!(
                "exec: '{shown}' did not finish within {}: killed it",
                HumanDuration(timeout)
            )))
        }
    };
    drop(keys_file);
    result
}

/// The variables added to the agent's environment (see the module documentation): the hash, the
/// environment, the count, `OSC_CHANGED_KEYS_FILE` when `keys_file` is given, and `OSC_CHANGED_KEYS`
/// when the list is at most [`MAX_KEYS_IN_ENV`] bytes.
pub fn environment(
    ctx: &ActionContext,
    keys_file: Option<PathBuf>,
) -> Vec<(&'static str, std::ffi::OsString)> {
    let mut vars = vec![
        ("OSC_CONTENT_HASH", ctx.hash.clone().into()),
        ("OSC_ENVIRONMENT", ctx.environment.clone().into()),
        (
            "OSC_CHANGED_KEYS_COUNT",
            ctx.changed_keys.len().to_string().into(),
        ),
    ];
    if let Some(path) = keys_file {
        vars.push(("OSC_CHANGED_KEYS_FILE", path.into_os_string()));
    }
    if let Some(list) = short_list(&ctx.changed_keys) {
        vars.push(("OSC_CHANGED_KEYS", list.into()));
    }
    vars
}

/// The escaped keys joined by newlines, if that is at most [`MAX_KEYS_IN_ENV`] bytes. Stops counting as
/// soon as the limit is passed.
fn short_list(keys: &[String]) -> Option<String> {
    let mut list = String::new();
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            list.push('\n');
        }
        list.push_str(&escape(key));
        if list.len() > MAX_KEYS_IN_ENV {
            return None;
        }
    }
    Some(list)
}

/// The changed keys, one escaped key per line, in a file of a private temporary directory; both are
/// removed when this is dropped.
struct KeysFile {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl KeysFile {
    /// Writes the file; the error is a short reason naming the directory, never a key.
    fn write(keys: &[String]) -> Result<KeysFile, String> {
        let dir = tempfile::Builder::new()
            .prefix("osc-agent-exec-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(|e| {
                format!(
                    "cannot create a directory in {}: {}",
                    escape_path(&std::env::temp_dir()),
                    io_reason(&e)
                )
            })?;
        let path = dir.path().join(KEYS_FILE_NAME);
        let failed =
            |e: io::Error| format!("cannot write {}: {}", escape_path(&path), io_reason(&e));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(failed)?;
        let mut out = io::BufWriter::new(file);
        for key in keys {
            writeln!(out, "{}", escape(key)).map_err(failed)?;
        }
        // Flushes; the command reads the file through the page cache, so there is nothing to sync.
        out.into_inner().map_err(|e| failed(e.into_error()))?;
        Ok(KeysFile { path, _dir: dir })
    }
}

/// Why the program could not be started.
fn spawn_error(program: &str, error: &io::Error) -> ActionError {
    let reason = match error.kind() {
        io::ErrorKind::NotFound if !program.contains('/') => "not found in PATH".to_owned(),
        io::ErrorKind::NotFound => "not found".to_owned(),
        _ => io_reason(error),
    };
    ActionError(format!("exec: cannot run '{program}': {reason}"))
}

/// 0 for success; an error naming the exit code or the signal otherwise.
fn exit_code(shown: &str, status: ExitStatus) -> Result<i32, ActionError> {
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(0),
        (Some(code), _) => Err(ActionError(format!(
            "exec: '{shown}' exited with code {code}"
        ))),
        (None, Some(signal)) => {
            let name =
                Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string());
            Err(ActionError(format!(
                "exec: '{shown}' was killed by signal {name}"
            )))
        }
        (None, None) => Err(ActionError(format!(
            "exec: '{shown}' ended abnormally ({status})"
        ))),
    }
}

/// SIGKILLs the child's process group (the child leads it), then the child itself, and reaps it.
async fn kill(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        // Fails only if the group is already gone.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    if let Err(e) = child.kill().await {
        tracing::warn!(error = %io_reason(&e), "exec: cannot kill the timed-out command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;
    use std::path::Path;

    use tokio::time::Instant;

    use crate::action::spec::CommandLine;

    fn spec(command: &[&str], timeout: Option<Duration>) -> ExecSpec {
        ExecSpec {
            command: CommandLine(command.iter().map(|s| (*s).to_owned()).collect()),
            timeout: timeout.map(HumanDuration),
        }
    }

    fn ctx() -> ActionContext {
        ActionContext {
            environment: "staging".into(),
            hash: "abc123".into(),
            changed_keys: vec!["db.url".into(), "feature.flag".into()],
        }
    }

    fn read(dir: &Path, name: &str) -> String {
        fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Runs `spec` with `keys` changed, with a script that records what it saw in `dir`: the variables,
    /// whether `OSC_CHANGED_KEYS` is set, a copy of the keys file, and the modes of the file and its
    /// directory.
    async fn run_recording(dir: &Path, keys: Vec<String>) -> Result<i32, ActionError> {
        let script = r#"cd "$1" && env > env
            printf %s "$OSC_CONTENT_HASH" > hash
            printf %s "$OSC_ENVIRONMENT" > environment
            printf %s "${OSC_CHANGED_KEYS-UNSET}" > keys
            printf %s "$OSC_CHANGED_KEYS_COUNT" > count
            printf %s "$OSC_CHANGED_KEYS_FILE" > keys-file-path
            cp "$OSC_CHANGED_KEYS_FILE" keys-file
            stat -c %a "$OSC_CHANGED_KEYS_FILE" > keys-file-mode
            stat -c %a "$(dirname "$OSC_CHANGED_KEYS_FILE")" > keys-dir-mode"#;
        let dir_arg = dir.to_str().expect("utf-8 path");
        let ctx = ActionContext {
            changed_keys: keys,
            ..ctx()
        };
        run(&spec(&["sh", "-c", script, "sh", dir_arg], None), &ctx).await
    }

    #[tokio::test]
    async fn passes_the_context_in_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(run_recording(dir.path(), ctx().changed_keys).await, Ok(0));
        assert_eq!(read(dir.path(), "hash"), "abc123");
        assert_eq!(read(dir.path(), "environment"), "staging");
        assert_eq!(read(dir.path(), "keys"), "db.url\nfeature.flag");
        assert_eq!(read(dir.path(), "count"), "2");
        assert_eq!(read(dir.path(), "keys-file"), "db.url\nfeature.flag\n");
        assert_eq!(read(dir.path(), "keys-file-mode").trim(), "600");
        assert_eq!(read(dir.path(), "keys-dir-mode").trim(), "700");
        // Removed with its directory once the command has exited.
        let file = PathBuf::from(read(dir.path(), "keys-file-path"));
        assert!(!file.exists() && !file.parent().expect("dir").exists());
        // The agent's own environment is inherited.
        assert!(
            read(dir.path(), "env")
                .lines()
                .any(|l| l.starts_with("PATH="))
        );
    }

    #[tokio::test]
    async fn ten_thousand_long_keys_go_through_the_file_only() {
        // 10,000 keys of 200 bytes: 2 MB, far over the kernel's 128 KiB for one variable and its total
        // argument space (the command could not even start with them in OSC_CHANGED_KEYS).
        let keys: Vec<String> = (0..10_000)
            .map(|i| format!("{i:05}.{}", "k".repeat(194)))
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(run_recording(dir.path(), keys.clone()).await, Ok(0));
        assert_eq!(read(dir.path(), "keys"), "UNSET", "never a truncated list");
        assert_eq!(read(dir.path(), "count"), "10000");
        assert_eq!(
            read(dir.path(), "keys-file"),
            format!("{}\n", keys.join("\n"))
        );
        assert_eq!(read(dir.path(), "keys-file-mode").trim(), "600");
        assert!(!Path::new(&read(dir.path(), "keys-file-path")).exists());
    }

    #[test]
    fn the_variable_holds_lists_up_to_the_limit() {
        let with = |keys: Vec<String>| {
            let ctx = ActionContext {
                changed_keys: keys,
                ..ctx()
            };
            environment(&ctx, None)
                .into_iter()
                .find(|(name, _)| *name == "OSC_CHANGED_KEYS")
                .map(|(_, v)| v.len())
        };
        // Two keys and the newline between them: exactly the limit, then one byte over.
        let half = MAX_KEYS_IN_ENV / 2;
        let exact = vec!["a".repeat(half), "b".repeat(MAX_KEYS_IN_ENV - half - 1)];
        assert_eq!(with(exact), Some(MAX_KEYS_IN_ENV));
        let over = vec!["a".repeat(half), "b".repeat(MAX_KEYS_IN_ENV - half)];
        assert_eq!(with(over), None);
        assert_eq!(with(vec![]), Some(0), "set (empty) when no key changed");
        let names: Vec<&str> = environment(&ctx(), Some("/x".into()))
            .iter()
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(
            names,
            [
                "OSC_CONTENT_HASH",
                "OSC_ENVIRONMENT",
                "OSC_CHANGED_KEYS_COUNT",
                "OSC_CHANGED_KEYS_FILE",
                "OSC_CHANGED_KEYS"
            ]
        );
    }

    #[tokio::test]
    async fn keys_with_newlines_or_nul_are_one_escaped_line_each() {
        // A NUL in a variable used to keep the command from starting; a newline made one key two lines.
        let keys = vec![
            "two\nlines".to_owned(),
            "nul\0byte".to_owned(),
            "back\\slash".to_owned(),
            "plain".to_owned(),
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(run_recording(dir.path(), keys).await, Ok(0));
        let expected = ["two\\nlines", "nul\\0byte", "back\\\\slash", "plain"];
        assert_eq!(read(dir.path(), "keys"), expected.join("\n"));
        assert_eq!(
            read(dir.path(), "keys-file"),
            format!("{}\n", expected.join("\n"))
        );
        assert_eq!(read(dir.path(), "count"), "4");
    }

    #[tokio::test]
    async fn timeout_kills_the_command_and_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 10 & echo $! > '{}'; wait", pidfile.display());
        // Long enough for the shell to write the pid file before it is killed, even on a busy machine.
        let timeout = Duration::from_secs(2);
        let started = Instant::now();

        let err = run(&spec(&["sh", "-c", &script], Some(timeout)), &ctx())
            .await
            .expect_err("timed out");
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "did not wait for sleep 10"
        );
        assert!(
            err.0.contains("within 2s") && err.0.contains("'sh'") && !err.0.contains("sleep 10"),
            "{err}"
        );

        // The grandchild `sleep 10` was killed with its process group (it is reparented, so it may linger
        // briefly as a zombie before its new parent reaps it).
        let pid = read(dir.path(), "pid");
        let stat = format!("/proc/{}/stat", pid.trim());
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
            assert!(Instant::now() < deadline, "sleep 10 still running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn plain_timeout_names_the_command() {
        let err = run(
            &spec(&["sleep", "10"], Some(Duration::from_millis(100))),
            &ctx(),
        )
        .await
        .expect_err("timed out");
        assert_eq!(
            err.0, "exec: 'sleep' did not finish within 100ms: killed it",
            "only the program is named, never its arguments"
        );
    }

    #[tokio::test]
    async fn failures_are_named() {
        let err = run(&spec(&["sh", "-c", "exit 3"], None), &ctx())
            .await
            .expect_err("exit 3");
        assert_eq!(err.0, "exec: 'sh' exited with code 3");

        let err = run(&spec(&["sh", "-c", "kill -TERM $$"], None), &ctx())
            .await
            .expect_err("killed");
        assert!(err.0.ends_with("was killed by signal SIGTERM"), "{err}");

        let err = run(&spec(&["osc-no-such-program", "--flag"], None), &ctx())
            .await
            .expect_err("missing");
        assert_eq!(
            err.0,
            "exec: cannot run 'osc-no-such-program': not found in PATH"
        );

        let err = run(&spec(&["/nonexistent/reload.sh"], None), &ctx())
            .await
            .expect_err("missing");
        assert_eq!(
            err.0,
            "exec: cannot run '/nonexistent/reload.sh': not found"
        );

        let err = run(&spec(&[], None), &ctx()).await.expect_err("empty");
        assert!(err.0.contains("empty"), "{err}");
    }
}
