//! `exec`: run a command (no shell) when the content changed.
//!
//! The command inherits the agent's environment, standard output and standard error, plus:
//!
//! | variable                 | value                                                  |
//! |--------------------------|--------------------------------------------------------|
//! | `OSC_CONTENT_HASH`       | content hash of everything rendered                     |
//! | `OSC_ENVIRONMENT`        | the environment name                                    |
//! | `OSC_CHANGED_KEYS`       | keys added, changed or deleted, one per line            |
//! | `OSC_CHANGED_KEYS_COUNT` | how many keys changed                                   |
//!
//! Never a value. The command runs in its own process group, so that on timeout its children are killed
//! with it.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::ActionContext;
use super::ActionError;
use super::spec::ExecSpec;
use crate::config::HumanDuration;
use crate::util::io_reason;

/// Time limit when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the command and returns its exit code (always 0: anything else is an error). On timeout the
/// command and its process group are killed.
pub async fn run(spec: &ExecSpec, ctx: &ActionContext) -> Result<i32, ActionError> {
    let (program, args) = spec
        .command
        .0
        .split_first()
        .ok_or_else(|| ActionError("exec: the command is empty".to_owned()))?;
    // Only the program is ever shown: arguments may carry tokens.
    let shown = program.as_str();
    let timeout = spec.timeout.map_or(DEFAULT_TIMEOUT, |t| t.0);
    let mut child = Command::new(program)
        .args(args)
        .envs(environment(ctx))
        // The agent may take its credentials from these; the command never gets them.
        .env_remove("OSC_USER_KEY")
        .env_remove("OSC_API_KEY")
        .env_remove("OSC_TOKEN")
        .env_remove("OSC_BACKUP_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| spawn_error(program, &e))?;
    match tokio::time::timeout(timeout, child.wait()).await {
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
    }
}

/// The variables added to the agent's environment.
pub fn environment(ctx: &ActionContext) -> [(&'static str, String); 4] {
    [
        ("OSC_CONTENT_HASH", ctx.hash.clone()),
        ("OSC_ENVIRONMENT", ctx.environment.clone()),
        ("OSC_CHANGED_KEYS", ctx.changed_keys.join("\n")),
        ("OSC_CHANGED_KEYS_COUNT", ctx.changed_keys.len().to_string()),
    ]
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

    #[tokio::test]
    async fn passes_the_context_in_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = r#"cd "$1" && env > env
            printf %s "$OSC_CONTENT_HASH" > hash
            printf %s "$OSC_ENVIRONMENT" > environment
            printf %s "$OSC_CHANGED_KEYS" > keys
            printf %s "$OSC_CHANGED_KEYS_COUNT" > count"#;
        let dir_arg = dir.path().to_str().expect("utf-8 path");
        let spec = spec(&["sh", "-c", script, "sh", dir_arg], None);

        assert_eq!(run(&spec, &ctx()).await, Ok(0));
        assert_eq!(read(dir.path(), "hash"), "abc123");
        assert_eq!(read(dir.path(), "environment"), "staging");
        assert_eq!(read(dir.path(), "keys"), "db.url\nfeature.flag");
        assert_eq!(read(dir.path(), "count"), "2");
        // The agent's own environment is inherited.
        assert!(
            read(dir.path(), "env")
                .lines()
                .any(|l| l.starts_with("PATH="))
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_command_and_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 10 & echo $! > '{}'; wait", pidfile.display());
        let timeout = Duration::from_millis(300);
        let started = Instant::now();

        let err = run(&spec(&["sh", "-c", &script], Some(timeout)), &ctx())
            .await
            .expect_err("timed out");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "did not wait for sleep 10"
        );
        assert!(
            err.0.contains("within 300ms") && err.0.contains("'sh'") && !err.0.contains("sleep 10"),
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
