//! `signal` and `restart-container`: find the app's processes by scanning `/proc` and signal them.
//!
//! The agent sees the app's processes only when the pod sets `shareProcessNamespace: true`, and may signal
//! them only when it runs as the same user or has the `KILL` capability. Whatever the selector, the agent
//! itself, PID 1 (the namespace's init, e.g. the pause container), kernel threads and zombies never match.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use regex::Regex;
use tokio::time::Instant;

use super::ActionError;
use super::spec::ProcessTarget;
use crate::util::{Escaped, escape_path, io_reason};

/// Where the process table lives.
const PROC: &str = "/proc";
/// `/proc/PID/comm` holds at most this many bytes of the name (`TASK_COMM_LEN` minus the NUL).
const COMM_LEN: usize = 15;
/// How often `restart` checks whether the terminated processes have exited.
const EXIT_POLL: Duration = Duration::from_millis(50);
/// Why a selector may match nothing although the app runs.
const VISIBILITY_HINT: &str = "the agent only sees the app's processes when the pod sets \
     `shareProcessNamespace: true`; to signal them it must run as the same user or have the KILL capability";
/// At most this many processes are named in a summary or an error; the others are counted.
pub const MAX_NAMED: usize = 10;
/// Why `kill` may be refused.
const PERMISSION_HINT: &str =
    "the agent must run as the same user as the app or have the KILL capability (CAP_KILL)";

/// Parses a signal given as a name (`HUP`, `SIGHUP`, `hup`) or a number (`1`).
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    let text = name.trim();
    let parsed = match text.parse::<i32>() {
        Ok(number) => Signal::try_from(number).ok(),
        Err(_) => {
            let upper = text.to_ascii_uppercase();
            let full = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            full.parse().ok()
        }
    };
    parsed.ok_or_else(|| {
        format!(
            "unknown signal '{name}': use a name such as HUP, USR1, USR2, TERM, INT or QUIT, or a number such as 1"
        )
    })
}

/// A process that matched a [`ProcessTarget`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    /// The kernel's name for it (`/proc/PID/comm`).
    pub name: String,
}

impl fmt::Display for Process {
    /// `NAME (pid PID)`, the name escaped (any process may set its own name to any bytes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", Escaped(&self.name), self.pid)
    }
}

/// `items` joined by `separator`, at most [`MAX_NAMED`] of them, then `and N more`: a selector such as
/// `cmdline=.` may match thousands of processes, and the text goes to logs and `/status`.
pub fn bounded_list<T: fmt::Display>(items: &[T], separator: &str) -> String {
    let mut text = items
        .iter()
        .take(MAX_NAMED)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(separator);
    if items.len() > MAX_NAMED {
        text.push_str(&format!(" and {} more", items.len() - MAX_NAMED));
    }
    text
}

/// What `restart` did: processes that exited after SIGTERM within the grace period, and those that had to
/// be killed with SIGKILL after it. The two lists are disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestartOutcome {
    pub terminated: Vec<Process>,
    pub killed: Vec<Process>,
}

/// The processes `target` selects, sorted by PID. Errors when nothing matches, explaining why that may be.
pub fn find(target: &ProcessTarget) -> Result<Vec<Process>, ActionError> {
    Ok(find_live(target)?.into_iter().map(|l| l.process).collect())
}

/// Sends `sig` to every process `target` selects and returns those that received it. Processes that exit in
/// the meantime are skipped; an error if none is left, or if the kernel refuses a signal.
pub fn signal(target: &ProcessTarget, sig: Signal) -> Result<Vec<Process>, ActionError> {
    let selector = Selector::from_target(target)?;
    let sent = send(find_with(&selector)?, sig)?;
    if sent.is_empty() {
        return Err(nothing_matched(&selector));
    }
    Ok(sent.into_iter().map(|l| l.process).collect())
}

/// Sends SIGTERM to every process `target` selects, waits up to `grace` for them to exit, then SIGKILLs
/// those still alive. When the app's main process dies, kubelet restarts its container.
pub async fn restart(
    target: &ProcessTarget,
    grace: Duration,
) -> Result<RestartOutcome, ActionError> {
    let selector = Selector::from_target(target)?;
    let mut pending = send(find_with(&selector)?, Signal::SIGTERM)?;
    if pending.is_empty() {
        return Err(nothing_matched(&selector));
    }
    let mut outcome = RestartOutcome::default();
    let deadline = Instant::now() + grace;
    loop {
        let (exited, alive): (Vec<Live>, Vec<Live>) =
            pending.into_iter().partition(|l| !l.is_alive());
        outcome
            .terminated
            .extend(exited.into_iter().map(|l| l.process));
        pending = alive;
        let now = Instant::now();
        if pending.is_empty() || now >= deadline {
            break;
        }
        tokio::time::sleep(EXIT_POLL.min(deadline - now)).await;
    }
    // Every survivor gets its SIGKILL even if one is refused; the refusals are reported together.
    let mut refused = vec![];
    for live in pending {
        match kill_if_alive(&live) {
            Ok(true) => {
                tracing::warn!(process = %live.process, grace = ?grace, "still running after SIGTERM: sent SIGKILL");
                outcome.killed.push(live.process);
            }
            Ok(false) => outcome.terminated.push(live.process),
            Err(e) => refused.push(e.0),
        }
    }
    if !refused.is_empty() {
        return Err(ActionError(bounded_list(&refused, "; ")));
    }
    Ok(outcome)
}

/// One way of selecting processes, validated.
enum Selector<'a> {
    Name(&'a str),
    Cmdline(Regex),
    Pidfile(&'a Path),
}

impl<'a> Selector<'a> {
    /// The one selector `target` sets.
    fn from_target(target: &'a ProcessTarget) -> Result<Self, ActionError> {
        match (&target.process, &target.cmdline, &target.pidfile) {
            (Some(name), None, None) => Ok(Selector::Name(name)),
            (None, Some(re), None) => Regex::new(re)
                .map(Selector::Cmdline)
                .map_err(|e| ActionError(format!("bad cmdline regex '{re}': {e}"))),
            (None, None, Some(file)) => Ok(Selector::Pidfile(file)),
            _ => Err(ActionError(
                "set exactly one of process=, cmdline= or pidfile=".to_owned(),
            )),
        }
    }
}

impl fmt::Display for Selector<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Name(name) => write!(f, "process={}", Escaped(name)),
            Selector::Cmdline(re) => write!(f, "cmdline={}", Escaped(re.as_str())),
            Selector::Pidfile(file) => write!(f, "pidfile={}", escape_path(file)),
        }
    }
}

/// A matched process, with its start time (clock ticks since boot) so that a recycled PID is not mistaken
/// for it.
#[derive(Debug)]
struct Live {
    process: Process,
    start_time: u64,
}

impl Live {
    /// Whether the process is still running: its `/proc` entry is there, is not a zombie (a zombie still
    /// answers `kill(pid, 0)`) and has the same start time.
    fn is_alive(&self) -> bool {
        read_stat(self.process.pid)
            .is_some_and(|stat| stat.state != 'Z' && stat.start_time == self.start_time)
    }
}

/// `find`, keeping the start times.
fn find_live(target: &ProcessTarget) -> Result<Vec<Live>, ActionError> {
    find_with(&Selector::from_target(target)?)
}

/// The live processes `selector` matches; an error when there are none.
fn find_with(selector: &Selector<'_>) -> Result<Vec<Live>, ActionError> {
    let found = match selector {
        Selector::Pidfile(file) => vec![from_pidfile(file)?],
        Selector::Name(name) => scan(|c| c.has_name(name))?,
        Selector::Cmdline(re) => scan(|c| re.is_match(&c.cmdline_text()))?,
    };
    if found.is_empty() {
        return Err(nothing_matched(selector));
    }
    Ok(found)
}

/// The error for a selector that matched nothing.
fn nothing_matched(selector: &Selector<'_>) -> ActionError {
    ActionError(format!("no process matches {selector}: {VISIBILITY_HINT}"))
}

/// Every eligible process in `/proc` that `matches`, sorted by PID.
fn scan(matches: impl Fn(&Candidate) -> bool) -> Result<Vec<Live>, ActionError> {
    let entries = fs::read_dir(PROC)
        .map_err(|e| ActionError(format!("cannot list {PROC}: {}", io_reason(&e))))?;
    let mut found: Vec<Live> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Candidate::inspect(pid).ok())
        .filter(|c| matches(c))
        .map(Candidate::into_live)
        .collect();
    found.sort_by_key(|l| l.process.pid);
    Ok(found)
}

/// The process whose PID `file` holds.
fn from_pidfile(file: &Path) -> Result<Live, ActionError> {
    let text = fs::read_to_string(file).map_err(|e| {
        ActionError(format!(
            "cannot read pidfile {}: {}",
            escape_path(file),
            io_reason(&e)
        ))
    })?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| {
            ActionError(format!(
                "pidfile {} does not hold a process ID",
                escape_path(file)
            ))
        })?;
    let why = match Candidate::inspect(pid) {
        Ok(candidate) => return Ok(candidate.into_live()),
        Err(Skip::Agent) => "which is the agent itself".to_owned(),
        Err(Skip::Init) => "which is the PID namespace's init: it is never signalled".to_owned(),
        Err(Skip::KernelThread) => "which is a kernel thread".to_owned(),
        Err(Skip::Gone | Skip::Zombie) => {
            format!("but no such process is running ({VISIBILITY_HINT})")
        }
    };
    Err(ActionError(format!(
        "pidfile {} names PID {pid}, {why}",
        escape_path(file)
    )))
}

/// Why a process is not a candidate.
#[derive(Debug, PartialEq, Eq)]
enum Skip {
    /// Vanished during the scan, or unreadable.
    Gone,
    Agent,
    Init,
    KernelThread,
    Zombie,
}

/// A process that may be selected.
struct Candidate {
    pid: i32,
    /// `/proc/PID/comm`, without the newline.
    comm: Vec<u8>,
    /// `/proc/PID/cmdline`: NUL-terminated arguments.
    cmdline: Vec<u8>,
    start_time: u64,
}

impl Candidate {
    /// Reads what selection needs, or says why `pid` is never selected.
    fn inspect(pid: i32) -> Result<Self, Skip> {
        if u32::try_from(pid).is_ok_and(|p| p == std::process::id()) {
            return Err(Skip::Agent);
        }
        if pid == 1 {
            return Err(Skip::Init);
        }
        let stat = read_stat(pid).ok_or(Skip::Gone)?;
        if stat.state == 'Z' {
            return Err(Skip::Zombie);
        }
        let dir = proc_dir(pid);
        let cmdline = fs::read(dir.join("cmdline")).map_err(|_| Skip::Gone)?;
        if cmdline.is_empty() {
            return Err(Skip::KernelThread);
        }
        let mut comm = fs::read(dir.join("comm")).map_err(|_| Skip::Gone)?;
        if comm.last() == Some(&b'\n') {
            comm.pop();
        }
        Ok(Candidate {
            pid,
            comm,
            cmdline,
            start_time: stat.start_time,
        })
    }

    /// Whether `name` is its `comm` (compared on the bytes the kernel keeps), or the base name of its
    /// executable or of its argv[0].
    fn has_name(&self, name: &str) -> bool {
        let wanted = name.as_bytes();
        let truncated = &wanted[..wanted.len().min(COMM_LEN)];
        self.comm == truncated
            || self.exe_name().is_some_and(|exe| exe == name)
            || self.argv0_name() == wanted
    }

    /// Base name of `/proc/PID/exe`; `None` when unreadable (EACCES for other users' processes).
    fn exe_name(&self) -> Option<String> {
        let exe = fs::read_link(proc_dir(self.pid).join("exe")).ok()?;
        let base = exe.file_name()?.to_str()?;
        Some(base.strip_suffix(" (deleted)").unwrap_or(base).to_owned())
    }

    /// Base name of argv[0].
    fn argv0_name(&self) -> &[u8] {
        let argv0 = self.cmdline.split(|b| *b == 0).next().unwrap_or_default();
        argv0.rsplit(|b| *b == b'/').next().unwrap_or_default()
    }

    /// The command line, arguments joined by spaces.
    fn cmdline_text(&self) -> String {
        let joined: Vec<u8> = self
            .cmdline
            .iter()
            .map(|b| if *b == 0 { b' ' } else { *b })
            .collect();
        String::from_utf8_lossy(&joined).trim().to_owned()
    }

    fn into_live(self) -> Live {
        Live {
            process: Process {
                pid: self.pid,
                name: String::from_utf8_lossy(&self.comm).into_owned(),
            },
            start_time: self.start_time,
        }
    }
}

/// `/proc/PID`.
fn proc_dir(pid: i32) -> PathBuf {
    Path::new(PROC).join(pid.to_string())
}

/// What `restart` needs from `/proc/PID/stat`.
struct Stat {
    state: char,
    start_time: u64,
}

/// Reads `/proc/PID/stat`; `None` when the process is gone.
fn read_stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(proc_dir(pid).join("stat")).ok()?;
    parse_stat(&text)
}

/// Parses `pid (comm) state ppid ...`: the name may hold spaces and parentheses, so fields are counted
/// from the last `)`. The start time is field 22 (the 20th after the name).
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// Sends `sig` to each process, skipping those that have exited. Errors if the kernel refuses any (after
/// trying all of them).
fn send(processes: Vec<Live>, sig: Signal) -> Result<Vec<Live>, ActionError> {
    let mut sent = Vec::with_capacity(processes.len());
    let mut refused = Vec::new();
    for live in processes {
        match signal::kill(Pid::from_raw(live.process.pid), sig) {
            Ok(()) => sent.push(live),
            Err(Errno::ESRCH) => {
                tracing::debug!(process = %live.process, "exited before it could be signalled")
            }
            Err(errno) => refused.push(format!("{} ({})", live.process, errno.desc())),
        }
    }
    if refused.is_empty() {
        return Ok(sent);
    }
    let also = match sent.len() {
        0 => String::new(),
        n => format!(" ({n} other process(es) did receive it)"),
    };
    Err(ActionError(format!(
        "cannot send {sig} to {}{also}: {PERMISSION_HINT}",
        bounded_list(&refused, ", ")
    )))
}

/// SIGKILLs the process unless it has exited meanwhile; whether it was killed.
fn kill_if_alive(live: &Live) -> Result<bool, ActionError> {
    if !live.is_alive() {
        return Ok(false);
    }
    match signal::kill(Pid::from_raw(live.process.pid), Signal::SIGKILL) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(errno) => Err(ActionError(format!(
            "cannot send SIGKILL to {} ({}): {PERMISSION_HINT}",
            live.process,
            errno.desc()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
    use std::process::Stdio;

    use tokio::process::{Child, Command};

    /// Generous bound for anything the tests wait for.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// A name no other test (or run) uses.
    fn unique(prefix: &str) -> String {
        let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(10)
            .collect();
        format!("{prefix}{suffix}")
    }

    fn by_name(name: &str) -> ProcessTarget {
        ProcessTarget {
            process: Some(name.to_owned()),
            ..ProcessTarget::default()
        }
    }

    fn by_cmdline(re: &str) -> ProcessTarget {
        ProcessTarget {
            cmdline: Some(re.to_owned()),
            ..ProcessTarget::default()
        }
    }

    fn by_pidfile(file: &Path) -> ProcessTarget {
        ProcessTarget {
            pidfile: Some(file.to_owned()),
            ..ProcessTarget::default()
        }
    }

    /// `sleep 30` whose argv[0] is `argv0`.
    fn spawn_sleep(argv0: &str) -> Child {
        let mut command = std::process::Command::new("sleep");
        command.arg0(argv0).arg("30").stdin(Stdio::null());
        // Whatever the test process inherited (SIGHUP ignored under `nohup`, ...).
        crate::action::signals::reset_on_exec(&mut command);
        let child = Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sleep");
        wait_exec(&child, argv0);
        child
    }

    /// Waits (10 s deadline) until the child's `/proc` command line shows `text`: until then a scan
    /// may still see the forked test process instead of the new program.
    fn wait_exec(child: &Child, text: &str) {
        let cmdline = format!("/proc/{}/cmdline", child.id().expect("running"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read(&cmdline).is_ok_and(|c| c.windows(text.len()).any(|w| w == text.as_bytes()))
        {
            assert!(Instant::now() < deadline, "{cmdline} never showed {text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A shell started by [`spawn_sh`]; its process group (the shell and the `sleep` it waits for) is
    /// killed when dropped.
    struct Shell {
        child: Child,
    }

    impl Drop for Shell {
        fn drop(&mut self) {
            if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// The end of every [`spawn_sh`] script: wait for a background `sleep` without forking again (a
    /// trapped signal interrupts `wait`, runs the trap, and the loop waits again).
    const WAIT_WITHOUT_FORKING: &str = r#"sleep 30 &
        echo ready > "$DIR/ready"
        while kill -0 $! 2>/dev/null; do wait $!; done"#;

    /// `sh -c 'SCRIPT; WAIT_WITHOUT_FORKING' MARKER` in its own process group, with every signal at its
    /// default action whatever the test process inherited (under `nohup` SIGHUP is ignored, and a
    /// non-interactive shell cannot trap a signal ignored at its start). The marker, as `$0`, makes the
    /// command line unique. Returns once the shell is ready and is the only process matching the marker:
    /// a forked copy of the shell has the same command line until it execs `sleep`.
    async fn spawn_sh(script: &str, marker: &str, dir: &Path) -> Shell {
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{script}\n{WAIT_WITHOUT_FORKING}"))
            .arg(marker)
            .env("DIR", dir)
            .stdin(Stdio::null())
            .process_group(0);
        crate::action::signals::reset_on_exec(&mut command);
        let child = Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sh");
        let pid = pid_of(&child);
        wait_until("the shell to be ready, alone with its marker", || {
            dir.join("ready").exists()
                && find(&by_cmdline(&regex::escape(marker))).is_ok_and(|p| pids(&p) == [pid])
        })
        .await;
        Shell { child }
    }

    fn pid_of(child: &Child) -> i32 {
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .expect("child pid")
    }

    /// Waits (with a deadline) until `check` holds.
    async fn wait_until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lines of a file (none if it does not exist yet).
    fn lines(file: &Path) -> Vec<String> {
        fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Reaps a child (with a deadline) and returns its status.
    async fn reap(child: &mut Child) -> std::process::ExitStatus {
        tokio::time::timeout(DEADLINE, child.wait())
            .await
            .expect("child exits")
            .expect("wait")
    }

    fn pids(processes: &[Process]) -> Vec<i32> {
        processes.iter().map(|p| p.pid).collect()
    }

    #[test]
    fn parses_signal_names_and_numbers() {
        for name in ["HUP", "SIGHUP", "hup", "sighup", " Hup ", "1"] {
            assert_eq!(parse_signal(name), Ok(Signal::SIGHUP), "{name}");
        }
        assert_eq!(parse_signal("usr1"), Ok(Signal::SIGUSR1));
        assert_eq!(parse_signal("15"), Ok(Signal::SIGTERM));
        for bad in ["NOPE", "SIG", "", "0", "999", "-1"] {
            let err = parse_signal(bad).expect_err(bad);
            assert!(
                err.contains(&format!("'{bad}'")) && err.contains("HUP"),
                "{err}"
            );
        }
    }

    #[test]
    fn parses_stat_with_awkward_names() {
        let text = "42 (a) b (c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0\n";
        let stat = parse_stat(text).expect("stat");
        assert_eq!((stat.state, stat.start_time), ('S', 12345));
        assert!(parse_stat("42 (x) Z").is_none());
    }

    #[tokio::test]
    async fn finds_by_argv0_and_cmdline_and_pidfile() {
        let name = unique("osc-test-");
        let mut child = spawn_sleep(&name);
        let pid = pid_of(&child);

        assert_eq!(
            find(&by_name(&name)).expect("by name"),
            vec![Process {
                pid,
                name: "sleep".into()
            }]
        );
        let re = format!("^{name} 30$");
        assert_eq!(
            pids(&find(&by_cmdline(&re)).expect("by cmdline")),
            vec![pid]
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("app.pid");
        fs::write(&file, format!("{pid}\n")).expect("write pidfile");
        assert_eq!(
            pids(&find(&by_pidfile(&file)).expect("by pidfile")),
            vec![pid]
        );

        child.kill().await.expect("kill");
    }

    #[tokio::test]
    async fn finds_by_truncated_comm() {
        // The kernel names the process after the first 15 bytes of the executable's (link) name.
        let dir = tempfile::tempdir().expect("tempdir");
        let name = format!("{}-with-a-long-name", unique("c"));
        let link = dir.path().join(&name);
        std::os::unix::fs::symlink("/usr/bin/sleep", &link).expect("symlink");
        let argv0 = unique("other-");
        let mut child = Command::new(&link)
            .arg0(&argv0)
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        wait_exec(&child, &argv0);
        let pid = pid_of(&child);

        let found = find(&by_name(&name)).expect("by comm");
        assert_eq!(
            found,
            vec![Process {
                pid,
                name: name[..COMM_LEN].to_owned()
            }]
        );

        child.kill().await.expect("kill");
    }

    #[test]
    fn never_matches_the_agent_or_init() {
        let everything = find(&by_cmdline(".*")).expect("some processes");
        let me = i32::try_from(std::process::id()).expect("pid");
        assert!(
            everything.iter().all(|p| p.pid != me && p.pid != 1),
            "{everything:?}"
        );

        for pid in ["self", "1"] {
            let comm = fs::read_to_string(format!("{PROC}/{pid}/comm")).expect("comm");
            if let Ok(found) = find(&by_name(comm.trim())) {
                assert!(found.iter().all(|p| p.pid != me && p.pid != 1), "{found:?}");
            }
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pid");
        for (pid, expect) in [(me, "the agent itself"), (1, "init")] {
            fs::write(&file, pid.to_string()).expect("write");
            let err = find(&by_pidfile(&file)).expect_err("excluded");
            assert!(err.0.contains(expect), "{err}");
        }
    }

    #[tokio::test]
    async fn zombies_do_not_match() {
        let name = unique("osc-zombie-");
        let mut child = std::process::Command::new("sleep")
            .arg0(&name)
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid = i32::try_from(child.id()).expect("pid");
        child.kill().expect("kill");
        // Not reaped yet: a zombie.
        wait_until("zombie", || read_stat(pid).is_some_and(|s| s.state == 'Z')).await;

        let err = find(&by_name(&name)).expect_err("zombie ignored");
        assert!(err.0.contains(&format!("process={name}")), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pid");
        fs::write(&file, pid.to_string()).expect("write");
        let err = find(&by_pidfile(&file)).expect_err("zombie ignored");
        assert!(err.0.contains("no such process is running"), "{err}");

        child.wait().expect("reap");
    }

    #[test]
    fn nothing_matched_is_explained() {
        let name = unique("osc-missing-");
        let err = find(&by_name(&name)).expect_err("no match");
        assert!(
            err.0
                .contains(&format!("no process matches process={name}")),
            "{err}"
        );
        assert!(
            err.0.contains("shareProcessNamespace: true") && err.0.contains("KILL capability"),
            "{err}"
        );
        assert!(!err.0.contains('\n'), "{err}");

        let err = signal(&by_cmdline(&format!("^{name}$")), Signal::SIGHUP).expect_err("no match");
        assert!(err.0.contains(&format!("cmdline=^{name}$")), "{err}");
    }

    #[test]
    fn bad_pidfiles_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pid");
        let err = find(&by_pidfile(&missing)).expect_err("missing");
        assert!(
            err.0.contains(&missing.display().to_string()) && err.0.contains("no such file"),
            "{err}"
        );

        let garbage = dir.path().join("garbage.pid");
        fs::write(&garbage, "not a pid\n").expect("write");
        let err = find(&by_pidfile(&garbage)).expect_err("garbage");
        assert!(
            err.0.contains(&garbage.display().to_string()) && err.0.contains("process ID"),
            "{err}"
        );

        let stale = dir.path().join("stale.pid");
        fs::write(&stale, "999999999").expect("write");
        let err = find(&by_pidfile(&stale)).expect_err("stale");
        assert!(
            err.0.contains("999999999") && err.0.contains("shareProcessNamespace"),
            "{err}"
        );
    }

    #[test]
    fn selectors_must_be_exactly_one() {
        let err = find(&ProcessTarget::default()).expect_err("none");
        assert!(err.0.contains("exactly one"), "{err}");
        let err = find(&by_cmdline("(")).expect_err("bad regex");
        assert!(err.0.contains("regex"), "{err}");
    }

    #[tokio::test]
    async fn signal_is_delivered_exactly_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = unique("osc-hup-");
        let script = r#"trap 'echo hup >> "$DIR/count"' HUP
            trap 'echo usr1 >> "$DIR/count"' USR1"#;
        let shell = spawn_sh(script, &marker, dir.path()).await;
        let pid = pid_of(&shell.child);

        let sent = signal(&by_cmdline(&marker), Signal::SIGHUP).expect("signalled");
        assert_eq!(
            pids(&sent),
            vec![pid],
            "only the shell, not its sleep child"
        );
        let count = dir.path().join("count");
        wait_until("HUP counted", || !lines(&count).is_empty()).await;
        // A second, different signal as a barrier: anything signal() sent came before it.
        signal::kill(Pid::from_raw(pid), Signal::SIGUSR1).expect("USR1");
        wait_until("USR1 counted", || {
            lines(&count).contains(&"usr1".to_owned())
        })
        .await;
        assert_eq!(lines(&count), vec!["hup", "usr1"]);
    }

    #[tokio::test]
    async fn restart_terminates_then_kills() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = unique("osc-restart-");
        let mut polite = spawn_sleep(&format!("{marker}-polite"));
        let mut stubborn =
            spawn_sh("trap '' TERM", &format!("{marker}-stubborn"), dir.path()).await;

        let grace = Duration::from_millis(300);
        let started = Instant::now();
        let outcome = restart(&by_cmdline(&marker), grace).await.expect("restart");
        assert!(started.elapsed() >= grace, "waited for the grace period");
        assert_eq!(pids(&outcome.terminated), vec![pid_of(&polite)]);
        assert_eq!(pids(&outcome.killed), vec![pid_of(&stubborn.child)]);

        assert_eq!(
            reap(&mut polite).await.signal(),
            Some(Signal::SIGTERM as i32)
        );
        assert_eq!(
            reap(&mut stubborn.child).await.signal(),
            Some(Signal::SIGKILL as i32)
        );
    }

    #[tokio::test]
    async fn many_matches_are_all_signalled_but_named_boundedly() {
        // 25 processes, one of them named with a newline (a process may name itself anything).
        let marker = unique("osc-many-");
        let mut children: Vec<Child> = (0..24)
            .map(|i| spawn_sleep(&format!("{marker}-{i}")))
            .collect();
        children.push(spawn_sleep(&format!("{marker}-forged\nline")));
        let sent = signal(&by_cmdline(&marker), Signal::SIGTERM).expect("signalled");
        assert_eq!(sent.len(), 25, "every match is signalled");
        for child in &mut children {
            assert_eq!(reap(child).await.signal(), Some(Signal::SIGTERM as i32));
        }

        let forged = Process {
            pid: 7,
            name: "app\nforged log line".into(),
        };
        assert_eq!(forged.to_string(), "app\\nforged log line (pid 7)");
        let many: Vec<Process> = (1..=25)
            .map(|pid| Process {
                pid,
                name: "w".into(),
            })
            .collect();
        let text = bounded_list(&many, ", ");
        assert!(text.starts_with("w (pid 1), w (pid 2)"), "{text}");
        assert!(text.ends_with("w (pid 10) and 15 more"), "{text}");
        assert_eq!(
            bounded_list(&many[..MAX_NAMED], ", ")
                .matches("pid")
                .count(),
            MAX_NAMED
        );
    }

    #[tokio::test]
    async fn restart_returns_as_soon_as_processes_exit() {
        let name = unique("osc-quick-");
        let mut child = spawn_sleep(&name);
        let started = Instant::now();
        let outcome = restart(&by_name(&name), DEADLINE).await.expect("restart");
        // A zombie (the test has not reaped the child yet) counts as exited.
        assert!(
            started.elapsed() < DEADLINE / 2,
            "did not wait for the grace period"
        );
        assert_eq!(pids(&outcome.terminated), vec![pid_of(&child)]);
        assert!(outcome.killed.is_empty());
        reap(&mut child).await;
    }
}
