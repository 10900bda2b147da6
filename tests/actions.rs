//! Actions end to end: a real agent process, the dev server, real child processes receiving real signals,
//! a real HTTP endpoint and real commands. Every wait has a deadline; "no action" is checked against a
//! later action that must come, never by sleeping.

mod common;

use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "action-secret-value-Qz7";
const WAIT: Duration = Duration::from_secs(20);

fn secret(n: usize) -> String {
    format!("{SECRET}-{n}")
}

/// A shell script that appends one line to `count` per SIGHUP (and optionally ignores SIGTERM). It starts
/// with default signal dispositions whatever the test process inherited (`nohup`), and once started never
/// forks again: a forked copy of the shell has its command line until it execs, and would match too.
struct Counter {
    child: Child,
    count: PathBuf,
    /// A regular expression matching only this process's command line.
    pattern: String,
}

impl Counter {
    fn start(scratch: &Scratch, name: &str, ignore_term: bool) -> Counter {
        let count = scratch.path(&format!("{name}.count"));
        let ready = scratch.path(&format!("{name}.ready"));
        // `wait` returns when a trapped signal arrives; the trap runs and the loop waits again. The
        // `sleep` bounds the life of an orphan if the test process is killed (Drop kills the group).
        let script = scratch.write(
            &format!("{name}.sh"),
            &format!(
                "trap 'echo hup >> {count}' HUP\n{term}sleep 300 &\necho $! > {ready}.tmp\nmv {ready}.tmp {ready}\n\
                 while kill -0 $! 2>/dev/null; do wait $!; done\n",
                count = count.display(),
                ready = ready.display(),
                term = if ignore_term { "trap '' TERM\n" } else { "" }
            ),
        );
        let child = default_signals(Command::new("sh").arg(&script))
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the counter script");
        // The scratch directory's name is random: the pattern matches this process only.
        let pattern = format!("{}/{name}\\.sh", dir_name(scratch));
        let counter = Counter {
            child,
            count,
            pattern,
        };
        // Ready: the traps are set and the background `sleep` has exec'd (no copy of the shell is left).
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let sleeping = std::fs::read_to_string(&ready)
                .ok()
                .and_then(|pid| std::fs::read(format!("/proc/{}/cmdline", pid.trim())).ok())
                .is_some_and(|cmdline| cmdline.starts_with(b"sleep\0"));
            if sleeping {
                return counter;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}.sh did not get ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn hups(&self) -> usize {
        std::fs::read_to_string(&self.count).map_or(0, |s| s.lines().count())
    }

    async fn wait_hups(&self, n: usize) {
        wait_for(&format!("{n} SIGHUP(s) counted"), WAIT, || async {
            self.hups() == n
        })
        .await;
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_for("the process to exit", WAIT, || {
            let s = self.child.try_wait().expect("try_wait");
            status = s;
            async move { s.is_some() }
        })
        .await;
        status.expect("exited")
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        // The shell and its `sleep`.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

fn dir_name(scratch: &Scratch) -> String {
    scratch
        .dir
        .path()
        .file_name()
        .expect("scratch name")
        .to_string_lossy()
        .replace('.', "\\.")
}

async fn agent(logs: &Logs, server: &DevServer, scratch: &Scratch, extra: &[&str]) -> AgentProc {
    let out = scratch.path("out");
    let agent = AgentProc::start(logs, &strs(&live_args(&server.url, scratch, &out, extra))).await;
    agent.wait_ready().await;
    agent
}

/// The configuration hash the agent computes for these entries: keyed with the user key, so any
/// process holding the same key (another replica) computes the same one.
fn config_hash(entries: &[(&str, Value)]) -> String {
    static HASHER: std::sync::OnceLock<osc_agent::hash::ContentHasher> = std::sync::OnceLock::new();
    let hasher = HASHER.get_or_init(|| {
        osc_agent::hash::ContentHasher::derive(&osc_agent::config::Secret::new(USER_KEY.into()))
    });
    let digests: osc_agent::state::Digests = entries
        .iter()
        .map(|(k, v)| (k.to_string(), osc_agent::sync::value_digest(hasher, v)))
        .collect();
    osc_agent::sync::config_hash(hasher, &digests)
}

/// Waits until the agent has applied exactly this content and no action is pending or running.
async fn settled(agent: &AgentProc, entries: &[(&str, Value)]) {
    let hash = config_hash(entries);
    wait_for("the content applied and actions settled", WAIT, || async {
        let s = agent.status().await;
        s["sync"]["config_hash"].as_str() == Some(hash.as_str())
            && s["actions"]["pending"] == json!(false)
    })
    .await;
}

async fn action_count(agent: &AgentProc, result: &str) -> f64 {
    let (_, body) = agent.get("/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("osc_agent_actions_total{"))
        .filter(|l| l.contains(&format!("result=\"{result}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Logs, a dev server (started with `args`) holding `k = secret(0)` in `prod`, and a scratch directory.
async fn with_k(args: &[&str]) -> (Logs, DevServer, Scratch) {
    let logs = Logs::default();
    let server = DevServer::start(&logs, args).await;
    server.api().create("prod", "k", json!(secret(0))).await;
    (logs, server, Scratch::new())
}

#[tokio::test]
async fn signal_once_per_generation_never_on_no_op_or_fresh_start() {
    let (logs, server, scratch) = with_k(&[]).await;
    let api = server.api();
    let app = Counter::start(&scratch, "app", false);
    let action = format!("signal:cmdline={},signal=HUP", app.pattern);
    let agent = agent(
        &logs,
        &server,
        &scratch,
        &["--action", &action, "--action-cooldown", "0s"],
    )
    .await;
    settled(&agent, &[("k", json!(secret(0)))]).await;

    // A fresh start: the app reads its first files itself.
    api.update("prod", "k", json!(secret(1))).await;
    settled(&agent, &[("k", json!(secret(1)))]).await;
    app.wait_hups(1).await;

    // The same value again, and a forced reconcile: nothing changes, nothing is signalled.
    let syncs = agent.metric("osc_agent_syncs_total").await;
    api.update("prod", "k", json!(secret(1))).await;
    post_sync(&agent).await;
    agent
        .wait_metric("osc_agent_syncs_total", "2 more", |v| v >= syncs + 2.0)
        .await;
    settled(&agent, &[("k", json!(secret(1)))]).await;

    api.update("prod", "k", json!(secret(2))).await;
    settled(&agent, &[("k", json!(secret(2)))]).await;
    app.wait_hups(2).await;
    assert_eq!(action_count(&agent, "ok").await, 2.0);
    assert_eq!(action_count(&agent, "error").await, 0.0);
    assert_eq!(
        std::fs::read_to_string(scratch.path("out/k")).unwrap(),
        secret(2)
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

async fn post_sync(agent: &AgentProc) {
    let resp = agent
        .http
        .post(format!("http://{}/sync", agent.admin))
        .send()
        .await
        .expect("POST /sync");
    assert_eq!(resp.status().as_u16(), 202);
}

#[tokio::test]
async fn a_burst_of_100_updates_signals_at_most_twice() {
    let (logs, server, scratch) = with_k(&["--queue-size", "500"]).await;
    let api = server.api();
    let app = Counter::start(&scratch, "app", false);
    let action = format!("signal:cmdline={}", app.pattern);
    // Default cooldown (5 s): generations arriving after the first action are coalesced into one more.
    let agent = agent(&logs, &server, &scratch, &["--action", &action]).await;
    for i in 1..=100 {
        api.update("prod", "k", json!(secret(i))).await;
    }
    settled(&agent, &[("k", json!(secret(100)))]).await;
    let runs = action_count(&agent, "ok").await;
    assert!(
        (1.0..=2.0).contains(&runs),
        "100 updates caused {runs} actions"
    );
    app.wait_hups(runs as usize).await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn a_signal_matching_nothing_is_a_clear_error_and_files_still_sync() {
    let (logs, server, scratch) = with_k(&[]).await;
    let api = server.api();
    let agent = agent(
        &logs,
        &server,
        &scratch,
        &["--action", "signal:process=no-such-app-7781"],
    )
    .await;
    api.update("prod", "k", json!(secret(1))).await;
    settled(&agent, &[("k", json!(secret(1)))]).await;
    assert_eq!(
        std::fs::read_to_string(scratch.path("out/k")).unwrap(),
        secret(1)
    );
    let status = agent.status().await;
    let last = &status["actions"]["last"]["signal"];
    assert_eq!(last["result"], "error", "{status}");
    let detail = last["detail"].as_str().unwrap();
    assert!(detail.contains("no-such-app-7781"), "{detail}");
    assert_eq!(action_count(&agent, "error").await, 1.0);
    // The agent logs before it records the result, but its stderr is read by another task.
    wait_for("the failure logged", WAIT, || async {
        logs.text().contains("action failed")
    })
    .await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn once_mode_acts_only_on_change_and_exits_5_when_the_action_fails() {
    let (logs, server, scratch) = with_k(&[]).await;
    let api = server.api();
    let out = scratch.path("out");
    let marker = scratch.path("ran");
    let script = scratch.write("mark.sh", &format!("echo ran >> {}\n", marker.display()));
    let exec = format!("exec:command=sh {}", script.display());
    let mut args = live_args(&server.url, &scratch, &out, &["--once", "--action", &exec]);
    let runs = |m: &Path| std::fs::read_to_string(m).map_or(0, |s| s.lines().count());

    // Fresh start: files appear, no action.
    let run = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(runs(&marker), 0);
    // Unchanged: no action.
    let run = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!((run.code, runs(&marker)), (0, 0), "{}", run.stderr);
    // Changed: the action runs once.
    api.update("prod", "k", json!(secret(1))).await;
    let run = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!((run.code, runs(&marker)), (0, 1), "{}", run.stderr);

    // Changed, and the action fails: files are synced, exit code 5 names the action.
    api.update("prod", "k", json!(secret(2))).await;
    args.extend(["--action".into(), "signal:process=no-such-app-7782".into()]);
    let run = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(run.stderr.contains("no-such-app-7782"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(out.join("k")).unwrap(), secret(2));
    assert_eq!(runs(&marker), 2, "the other action still ran");
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn restart_container_terminates_and_kills_after_the_grace_period() {
    let (logs, server, scratch) = with_k(&[]).await;
    let api = server.api();
    let mut polite = Counter::start(&scratch, "polite", false);
    let mut stubborn = Counter::start(&scratch, "stubborn", true);
    let a = format!("restart-container:cmdline={}", polite.pattern);
    let b = format!("restart-container:cmdline={},grace=1s", stubborn.pattern);
    let agent = agent(&logs, &server, &scratch, &["--action", &a, "--action", &b]).await;
    api.update("prod", "k", json!(secret(1))).await;
    let status = polite.wait_exit().await;
    assert_eq!(status.signal(), Some(libc_sig("TERM")), "{status:?}");
    let status = stubborn.wait_exit().await;
    assert_eq!(status.signal(), Some(libc_sig("KILL")), "{status:?}");
    settled(&agent, &[("k", json!(secret(1)))]).await;
    let detail = agent.status().await["actions"]["last"]["restart-container"]["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("killed after 1s"), "{detail}");
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

fn libc_sig(name: &str) -> i32 {
    match name {
        "TERM" => nix::sys::signal::Signal::SIGTERM as i32,
        _ => nix::sys::signal::Signal::SIGKILL as i32,
    }
}

/// A reload endpoint that fails `failures` times with 500, then answers 200; records each request's
/// content-hash header.
async fn reload_endpoint(failures: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/-/reload",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let state = state.clone();
            async move {
                let mut seen = state.lock().unwrap();
                seen.push(
                    headers
                        .get("x-osc-content-hash")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned(),
                );
                if seen.len() <= failures {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/-/reload", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn http_reload_is_retried_until_it_succeeds() {
    let (logs, server, scratch) = with_k(&[]).await;
    let api = server.api();
    let (url, seen) = reload_endpoint(2).await;
    let action = format!("http:url={url},retries=3");
    let agent = agent(&logs, &server, &scratch, &["--action", &action]).await;
    api.update("prod", "k", json!(secret(1))).await;
    settled(&agent, &[("k", json!(secret(1)))]).await;
    let hash = config_hash(&[("k", json!(secret(1)))]);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![hash.clone(), hash.clone(), hash]
    );
    assert_eq!(action_count(&agent, "ok").await, 1.0);
    let detail = agent.status().await["actions"]["last"]["http"]["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("200"), "{detail}");
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn exec_gets_changed_keys_and_hash_never_values() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "a", json!(secret(0))).await;
    api.create("prod", "b", json!(secret(1))).await;
    let scratch = Scratch::new();
    let env_dump = scratch.path("env");
    let script = scratch.write(
        "dump.sh",
        &format!(
            "{{ printf 'KEYS=%s\\n' \"$OSC_CHANGED_KEYS\" | tr '\\n' ' '; echo; \
             echo \"HASH=$OSC_CONTENT_HASH\"; echo \"COUNT=$OSC_CHANGED_KEYS_COUNT\"; env; }} > {}\n",
            env_dump.display()
        ),
    );
    let action = format!("exec:command=sh {}", script.display());
    let agent = agent(
        &logs,
        &server,
        &scratch,
        &["--action", &action, "--action-cooldown", "0s"],
    )
    .await;

    api.update("prod", "b", json!(secret(2))).await;
    api.create("prod", "c", json!(secret(3))).await;
    let entries = [
        ("a", json!(secret(0))),
        ("b", json!(secret(2))),
        ("c", json!(secret(3))),
    ];
    settled(&agent, &entries).await;
    let dump = std::fs::read_to_string(&env_dump).expect("the command ran");
    let hash = config_hash(&entries);
    // b and c may arrive in one generation or two; the last run names what changed in it.
    assert!(
        dump.starts_with("KEYS=b c \n") || dump.starts_with("KEYS=c \n"),
        "{dump}"
    );
    assert!(dump.contains(&format!("HASH={hash}\n")), "{dump}");
    assert!(
        !dump.contains(SECRET),
        "a value reached the command's environment"
    );

    api.delete("prod", "a").await;
    let entries = [("b", json!(secret(2))), ("c", json!(secret(3)))];
    settled(&agent, &entries).await;
    let dump = std::fs::read_to_string(&env_dump).unwrap();
    assert!(dump.starts_with("KEYS=a \n"), "{dump}");
    assert!(dump.contains("COUNT=1\n"), "{dump}");
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn the_restart_loop_breaker_stops_actions_but_not_syncing() {
    let (logs, server, scratch) = with_k(&[]).await;
    let api = server.api();
    let app = Counter::start(&scratch, "app", false);
    let action = format!("signal:cmdline={}", app.pattern);
    let agent = agent(
        &logs,
        &server,
        &scratch,
        &[
            "--action",
            &action,
            "--action-cooldown",
            "0s",
            "--max-actions",
            "2",
            "--action-window",
            "10m",
        ],
    )
    .await;
    for i in 1..=2 {
        api.update("prod", "k", json!(secret(i))).await;
        settled(&agent, &[("k", json!(secret(i)))]).await;
        app.wait_hups(i).await;
    }
    assert_eq!(agent.metric("osc_agent_action_breaker_tripped").await, 0.0);
    api.update("prod", "k", json!(secret(3))).await;
    settled(&agent, &[("k", json!(secret(3)))]).await;
    assert_eq!(
        std::fs::read_to_string(scratch.path("out/k")).unwrap(),
        secret(3),
        "files keep syncing"
    );
    let status = agent.status().await;
    assert_eq!(status["actions"]["breaker_tripped"], true, "{status}");
    assert_eq!(status["status"], "degraded", "{status}");
    assert!(
        status["health_reason"]
            .as_str()
            .unwrap()
            .contains("actions stopped: restart-loop breaker tripped"),
        "{status}"
    );
    assert_eq!(agent.get("/healthz").await.0, 200, "liveness is kept");
    assert!(
        status["actions"]["breaker"]
            .as_str()
            .unwrap()
            .contains("2 actions within 600s"),
        "{status}"
    );
    assert_eq!(agent.metric("osc_agent_action_breaker_tripped").await, 1.0);
    assert_eq!(action_count(&agent, "skipped").await, 1.0);
    assert_eq!(app.hups(), 2);
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

/// A reload endpoint that records the size of each request's head (request line and headers), answering 200.
async fn head_recorder() -> (String, Arc<Mutex<Vec<usize>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let heads: Arc<Mutex<Vec<usize>>> = Arc::default();
    let seen = heads.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/-/reload", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            // Bounded: a head over 1 MiB is recorded as such and answered.
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 1 << 20 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            seen.lock().unwrap().push(head.len());
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
        }
    });
    (url, heads)
}

#[tokio::test]
async fn ten_thousand_changed_keys_with_long_names_reach_exec_and_http() {
    // 10,000 keys of 200 bytes: a 2 MB list, far over the kernel's 128 KiB for one environment variable
    // (600 such keys were enough for "Argument list too long", and the hook never ran).
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("{i:05}.{}", "long-key-name-".repeat(14)))
        .collect();
    let logs = Logs::default();
    let scratch = Scratch::new();
    let seed: serde_json::Map<String, Value> =
        keys.iter().map(|k| (k.clone(), json!(SECRET))).collect();
    let seed = scratch.write("seed.json", &json!({ "prod": seed }).to_string());
    let server = DevServer::start(
        &logs,
        &[
            "--seed",
            seed.to_str().unwrap(),
            "--seed-user-key-file",
            &scratch.key_file(),
        ],
    )
    .await;
    // The hook copies what it got; `UNSET` when OSC_CHANGED_KEYS is not set.
    let seen = scratch.path("seen");
    let script = scratch.write(
        "hook.sh",
        &format!(
            "mkdir -p {seen} && cd {seen} && printf %s \"${{OSC_CHANGED_KEYS-UNSET}}\" > keys && \
             printf %s \"$OSC_CHANGED_KEYS_COUNT\" > count && \
             printf %s \"${{OSC_CHANGED_KEYS_FILE-UNSET}}\" > file-path && \
             {{ [ ! -e \"$OSC_CHANGED_KEYS_FILE\" ] || cp \"$OSC_CHANGED_KEYS_FILE\" file; }}\n",
            seen = seen.display()
        ),
    );
    let (url, heads) = head_recorder().await;
    let once = |output: &str| -> Vec<String> {
        vec![
            "--once".into(),
            "--act-on-start".into(),
            "--server".into(),
            server.url.clone(),
            "--environment".into(),
            "prod".into(),
            "--user-key-file".into(),
            scratch.key_file(),
            "--output".into(),
            format!("{}:json", scratch.path(output).display()),
            "--action".into(),
            format!("exec:command=sh {}", script.display()),
            "--action".into(),
            format!("http:url={url},retries=0"),
        ]
    };
    let read = |name: &str| std::fs::read_to_string(seen.join(name)).unwrap_or_default();

    let run = run_agent(&logs, &strs(&once("first.json")), &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(read("count"), "10000");
    assert_eq!(
        read("keys"),
        "UNSET",
        "too long for the environment: not set"
    );
    assert_eq!(read("file"), format!("{}\n", keys.join("\n")));
    let file = PathBuf::from(read("file-path"));
    assert!(file.is_absolute(), "{file:?}");
    assert!(!file.exists(), "removed after the command");
    // The reload call carries no key list: its head stays small.
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(heads[0] < 4096, "request head of {} bytes", heads[0]);

    // Nowhere to write the file (TMPDIR missing): the hook still runs, told why in the log.
    std::fs::remove_dir_all(&seen).unwrap();
    let missing = scratch.path("no-such-tmp");
    let run = run_agent(
        &logs,
        &strs(&once("second.json")),
        &[("TMPDIR", missing.to_str().unwrap())],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        (read("count").as_str(), read("file-path").as_str()),
        ("10000", "UNSET")
    );
    assert!(
        run.stderr.contains("cannot write the changed-keys file") && run.stderr.contains("TMPDIR"),
        "{}",
        run.stderr
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn started_under_nohup_with_signals_blocked_the_agent_and_its_commands_behave_as_usual() {
    // Every event is dropped: only the SIGHUP below can bring the update.
    let (logs, server, scratch) = with_k(&["--drop-every", "1"]).await;
    let api = server.api();
    // The commands, in order: `cp` records its own ignored and blocked signals (a shell would show the
    // mask it sets while waiting for a child), then a shell checks that it can trap SIGHUP.
    let seen = scratch.path("seen");
    std::fs::create_dir(&seen).unwrap();
    let hook = scratch.write(
        "hook.sh",
        &format!(
            "trap 'echo trapped > {seen}/hup.tmp' HUP\nkill -HUP $$\nmv {seen}/hup.tmp {seen}/hup\n",
            seen = seen.display()
        ),
    );
    let status = seen.join("status");
    let actions = [
        format!("exec:command=cp /proc/self/status {}.tmp", status.display()),
        format!("exec:command=mv {0}.tmp {0}", status.display()),
        format!("exec:command=sh {}", hook.display()),
    ];
    let out = scratch.path("out");
    let mut extra = vec!["--resync-interval", "10m"];
    for action in &actions {
        extra.extend(["--action", action.as_str()]);
    }
    let args = live_args(&server.url, &scratch, &out, &extra);
    let agent = AgentProc::start_with(&logs, &strs(&args), &[], nohup_signals).await;
    agent.wait_ready().await;
    settled(&agent, &[("k", json!(secret(0)))]).await;

    api.update("prod", "k", json!(secret(1))).await;
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_file(&out.join("k"), &secret(1), WAIT).await;

    settled(&agent, &[("k", json!(secret(1)))]).await;
    let status = std::fs::read_to_string(&status).expect("cp ran");
    assert_eq!(
        usable_signals(&status, "SigIgn:"),
        Vec::<i32>::new(),
        "{status}"
    );
    assert_eq!(
        usable_signals(&status, "SigBlk:"),
        Vec::<i32>::new(),
        "{status}"
    );
    assert_eq!(
        std::fs::read_to_string(seen.join("hup")).unwrap_or_default(),
        "trapped\n"
    );
    assert_eq!(action_count(&agent, "ok").await, 3.0);
    // SIGTERM was blocked too: it still stops the agent cleanly.
    assert_eq!(agent.terminate().await.0, 0);
    logs.assert_free_of(&[SECRET, USER_KEY]);
}
