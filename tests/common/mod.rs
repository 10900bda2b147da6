//! Helpers for integration tests: a real dev server process, the real agent binary, real files.
//! Every wait has a deadline; nothing sleeps and hopes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_osc-agent");
pub const USER_KEY: &str = "integration-user-key-42";

/// Proxy variables: removed from every process a test starts (a test that wants one sets it), so that
/// the proxy settings of the machine running the suite change nothing.
pub const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
];

fn without_proxy_vars(cmd: &mut Command) -> &mut Command {
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// Remove the proxy variables from this test process, for a test that runs the agent's pipeline in
/// process (children are cleaned by the helpers that start them).
///
/// Call it first thing in the only test of a test binary: changing the environment is sound only while
/// no other thread reads it, which holds there (the runtime's workers are idle, no other test runs).
pub fn forget_proxy_vars_of_this_process() {
    for v in PROXY_VARS {
        if std::env::var_os(v).is_some() {
            // SAFETY: see above: no other thread of this process reads or writes the environment now.
            unsafe { std::env::remove_var(v) };
        }
    }
}

/// A reqwest client for the tests' own calls: never through a proxy of the environment.
pub fn http_client() -> reqwest::Client {
    osc_agent::source::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// Logs captured from every process a test started, to check that no secret ever reached them.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<String>>);

impl Logs {
    pub fn push(&self, text: &str) {
        if let Ok(mut l) = self.0.lock() {
            l.push_str(text);
            l.push('\n');
        }
    }
    pub fn text(&self) -> String {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
    /// Fails if any of `secrets` appears in the captured logs.
    pub fn assert_free_of(&self, secrets: &[&str]) {
        let text = self.text();
        for s in secrets {
            assert!(!text.contains(s), "secret {s:?} leaked into logs:\n{text}");
        }
    }
}

fn drain(stream: impl AsyncRead + Unpin + Send + 'static, logs: Logs, tag: &'static str) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            logs.push(&format!("[{tag}] {line}"));
        }
    });
}

/// A dev server child process.
pub struct DevServer {
    pub child: Child,
    pub url: String,
    pub addr: String,
    pub logs: Logs,
}

impl DevServer {
    pub async fn start(logs: &Logs, extra: &[&str]) -> DevServer {
        Self::start_on(logs, "127.0.0.1:0", extra).await
    }

    pub async fn start_on(logs: &Logs, listen: &str, extra: &[&str]) -> DevServer {
        let mut child = clean_command(BIN)
            .arg("dev-server")
            .args(["--listen", listen])
            .args(extra)
            .env("OSC_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start dev server");
        let stdout = child.stdout.take().expect("stdout");
        drain(
            child.stderr.take().expect("stderr"),
            logs.clone(),
            "dev-server",
        );
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                logs.push(&format!("[dev-server stdout] {line}"));
                if let Some(url) = line.strip_prefix("osc-agent dev-server listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("dev server exited before listening: {}", logs.text());
        })
        .await
        .expect("dev server did not print its address within 30 s");
        drain(lines.into_inner(), logs.clone(), "dev-server stdout");
        let addr = url.trim_start_matches("http://").to_owned();
        DevServer {
            child,
            url,
            addr,
            logs: logs.clone(),
        }
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url, USER_KEY)
    }

    /// How many list calls (`GET /configs`) the server has answered so far, read from its request log.
    /// Exact: a marker request is sent and its own log line awaited, so every earlier line is in.
    pub async fn list_calls(&self) -> usize {
        let marker = format!("/_dev/marker-{}", fastrand::u64(..));
        let _ = reqwest::get(format!("{}{marker}", self.url)).await;
        let needle = format!("path={marker} ");
        wait_for(
            "the dev server's marker log line",
            Duration::from_secs(10),
            || async { self.logs.text().contains(&needle) },
        )
        .await;
        self.logs
            .text()
            .lines()
            .filter(|l| l.contains("dev-server request") && l.contains("method=GET"))
            .filter(|l| l.contains("path=/configs "))
            .count()
    }

    /// SIGTERM and wait for exit (clean stop, streams end cleanly).
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("dev server did not stop within 10 s after SIGTERM");
    }

    /// SIGKILL (abrupt).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// REST calls to the dev server, as an operator would make them.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
    pub key: String,
}

impl Api {
    pub fn new(url: &str, key: &str) -> Api {
        Api {
            http: http_client(),
            url: url.to_owned(),
            key: key.to_owned(),
        }
    }

    pub fn with_key(&self, key: &str) -> Api {
        Api::new(&self.url, key)
    }

    pub async fn create(&self, env: &str, key: &str, value: Value) {
        self.create_in(env, key, value, None).await
    }

    pub async fn create_in(&self, env: &str, key: &str, value: Value, category: Option<&str>) {
        let resp = self
            .http
            .post(format!("{}/configs", self.url))
            .header("x-user-key", &self.key)
            .json(&json!({"key": key, "value": value, "environment": env, "category": category}))
            .send()
            .await
            .expect("POST /configs");
        assert_eq!(
            resp.status().as_u16(),
            201,
            "create {key}: {}",
            resp.text().await.unwrap_or_default()
        );
    }

    pub async fn update(&self, env: &str, key: &str, value: Value) {
        let resp = self
            .http
            .put(self.key_url(env, key))
            .header("x-user-key", &self.key)
            .json(&json!({"value": value}))
            .send()
            .await
            .expect("PUT /configs/{key}");
        assert_eq!(
            resp.status().as_u16(),
            200,
            "update {key}: {}",
            resp.text().await.unwrap_or_default()
        );
    }

    pub async fn delete(&self, env: &str, key: &str) {
        let resp = self
            .http
            .delete(self.key_url(env, key))
            .header("x-user-key", &self.key)
            .send()
            .await
            .expect("DELETE /configs/{key}");
        assert_eq!(resp.status().as_u16(), 200, "delete {key}");
    }

    fn key_url(&self, env: &str, key: &str) -> reqwest::Url {
        let mut u = reqwest::Url::parse(&self.url).expect("url");
        u.path_segments_mut()
            .expect("base")
            .extend(["configs", key]);
        u.query_pairs_mut().append_pair("environment", env);
        u
    }

    pub async fn post_admin(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("admin call");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap_or(Value::Null)
    }
}

/// Result of one agent run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run the agent binary to completion (60 s deadline), capturing its output into `logs`.
pub async fn run_agent(logs: &Logs, args: &[&str], env: &[(&str, &str)]) -> Run {
    run_agent_umask(logs, args, env, None).await
}

/// [`run_agent`] with the child's umask set to `umask` (when given) before it starts.
pub async fn run_agent_umask(
    logs: &Logs,
    args: &[&str],
    env: &[(&str, &str)],
    umask: Option<u32>,
) -> Run {
    let mut cmd = clean_command(BIN);
    cmd.args(args)
        .env_remove("OSC_USER_KEY")
        .env("OSC_LOG", "debug")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(mask) = umask {
        let mask = nix::sys::stat::Mode::from_bits_truncate(mask);
        // SAFETY: umask(2) is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::stat::umask(mask);
                Ok(())
            });
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("agent did not finish within 60 s")
        .expect("run agent");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    logs.push(&format!(
        "[agent {args:?}] exit {}\n{}{}",
        run.code, run.stdout, run.stderr
    ));
    run
}

/// A scratch directory with a user-key file in it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let s = Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        s.write("user-key", &format!("{USER_KEY}\n"));
        s
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
        p
    }
    pub fn key_file(&self) -> String {
        self.path("user-key").display().to_string()
    }
}

/// One node of a directory snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        bytes: Vec<u8>,
        mode: u32,
        inode: u64,
        mtime_ns: i128,
    },
    Link(PathBuf),
    Dir {
        mode: u32,
    },
}

/// Everything under `root` (names relative to it), including hidden generations, inodes and mtimes.
pub fn tree(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("prefix").display().to_string();
            let meta = std::fs::symlink_metadata(&p).expect("lstat");
            if meta.file_type().is_symlink() {
                out.insert(rel, Node::Link(std::fs::read_link(&p).expect("readlink")));
            } else if meta.is_dir() {
                out.insert(
                    rel,
                    Node::Dir {
                        mode: meta.mode() & 0o7777,
                    },
                );
                walk(root, &p, out);
            } else {
                out.insert(
                    rel,
                    Node::File {
                        bytes: std::fs::read(&p).expect("read"),
                        mode: meta.mode() & 0o7777,
                        inode: meta.ino(),
                        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Visible names of an output directory (without the `..` machinery).
pub fn visible(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with(".."))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Hidden entries (`..data`, generations, `..data_tmp`), without the agent's lock file `..osc-agent`.
/// [`tree`] without the agent's own state file (`..osc-agent`), which records a generation before it is
/// written and forgets it when the write is abandoned: for comparing what readers see.
pub fn visible_tree(root: &Path) -> BTreeMap<String, Node> {
    let mut t = tree(root);
    t.remove("..osc-agent");
    t
}

pub fn hidden(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("..") && n != "..osc-agent")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Poll `cond` every 20 ms until it holds, or panic after `deadline` naming `what`.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A long-running agent process with its admin server.
pub struct AgentProc {
    pub child: Child,
    pub admin: String,
    pub http: reqwest::Client,
}

/// How to start an agent process, beyond its arguments.
#[derive(Default)]
pub struct Launch<'a> {
    /// Extra environment variables (`OSC_LOG` defaults to `debug`).
    pub env: Vec<(&'a str, &'a str)>,
    /// A program (and its arguments) that ends by exec'ing the agent binary, which is appended to it
    /// with the agent's arguments: e.g. `unshare` to start the agent in a user namespace.
    pub wrapper: Vec<String>,
    /// The agent's stderr goes to this file (created or appended to) instead of the captured pipe;
    /// read it with [`std::fs::read_to_string`] and push it to the logs before checking them.
    pub stderr_file: Option<PathBuf>,
    /// Adjusts the command last (e.g. [`nohup_signals`]).
    pub setup: Option<fn(&mut Command)>,
}

fn admin_addr(line: &str) -> Option<String> {
    if !line.contains("admin server listening") {
        return None;
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .map(str::to_owned)
}

impl AgentProc {
    /// Start `osc-agent` (live mode) with `--admin-addr 127.0.0.1:0`; waits for the admin address.
    pub async fn start(logs: &Logs, args: &[&str]) -> AgentProc {
        Self::launch(logs, args, Launch::default()).await
    }

    /// [`AgentProc::start`] with extra environment variables.
    pub async fn start_with_env(logs: &Logs, args: &[&str], env: &[(&str, &str)]) -> AgentProc {
        let launch = Launch {
            env: env.to_vec(),
            ..Launch::default()
        };
        Self::launch(logs, args, launch).await
    }

    /// [`AgentProc::start`] with extra environment variables, after `setup` has adjusted the command
    /// (e.g. [`nohup_signals`]).
    pub async fn start_with(
        logs: &Logs,
        args: &[&str],
        env: &[(&str, &str)],
        setup: fn(&mut Command),
    ) -> AgentProc {
        let launch = Launch {
            env: env.to_vec(),
            setup: Some(setup),
            ..Launch::default()
        };
        Self::launch(logs, args, launch).await
    }

    /// [`AgentProc::start`] with a [`Launch`] setup. The command starts from [`clean_command`].
    pub async fn launch(logs: &Logs, args: &[&str], launch: Launch<'_>) -> AgentProc {
        let mut cmd = match launch.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = clean_command(program);
                c.args(rest).arg(BIN);
                c
            }
            None => clean_command(BIN),
        };
        cmd.args(args)
            .args(["--admin-addr", "127.0.0.1:0"])
            .env_remove("OSC_USER_KEY")
            .env("OSC_LOG", "debug")
            .envs(launch.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        match &launch.stderr_file {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open the agent's log file");
                cmd.stderr(file)
            }
            None => cmd.stderr(Stdio::piped()),
        };
        if let Some(setup) = launch.setup {
            setup(&mut cmd);
        }
        let mut child = cmd.spawn().expect("start agent");
        drain(
            child.stdout.take().expect("stdout"),
            logs.clone(),
            "agent stdout",
        );
        let admin = match &launch.stderr_file {
            Some(path) => {
                let mut found = None;
                wait_for(
                    "the admin address in the agent's log file",
                    Duration::from_secs(30),
                    || {
                        found = std::fs::read_to_string(path)
                            .ok()
                            .and_then(|text| text.lines().find_map(admin_addr));
                        let done = found.is_some() || child.try_wait().ok().flatten().is_some();
                        async move { done }
                    },
                )
                .await;
                found.unwrap_or_else(|| {
                    panic!(
                        "agent exited before its admin server listened: {}",
                        std::fs::read_to_string(path).unwrap_or_default()
                    )
                })
            }
            None => {
                let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
                let admin = tokio::time::timeout(Duration::from_secs(30), async {
                    while let Ok(Some(line)) = lines.next_line().await {
                        logs.push(&format!("[agent] {line}"));
                        if let Some(addr) = admin_addr(&line) {
                            return addr;
                        }
                    }
                    panic!(
                        "agent exited before its admin server listened: {}",
                        logs.text()
                    );
                })
                .await
                .expect("agent admin server did not start within 30 s");
                drain(lines.into_inner(), logs.clone(), "agent");
                admin
            }
        };
        AgentProc {
            child,
            admin,
            http: http_client(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        match self
            .http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    pub async fn status(&self) -> Value {
        let (code, body) = self.get("/status").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    /// Value of an unlabelled metric sample (or the sum of a labelled family), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until the metric satisfies `cond` (counters are updated just after the files they count
    /// land on disk, so a test that saw the file must still wait for the counter).
    pub async fn wait_metric(&self, name: &str, what: &str, cond: impl Fn(f64) -> bool) -> f64 {
        wait_for(
            &format!("{name} {what}"),
            Duration::from_secs(30),
            || async { cond(self.metric(name).await) },
        )
        .await;
        self.metric(name).await
    }

    pub async fn wait_ready(&self) {
        wait_for("agent ready", Duration::from_secs(30), || async {
            self.get("/readyz").await.0 == 200
        })
        .await;
    }

    /// POST to the admin server: status code and JSON body.
    pub async fn post(&self, path: &str) -> (u16, Value) {
        match self
            .http
            .post(format!("http://{}{path}", self.admin))
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    /// Value of one labelled sample, e.g. `metric_sample("osc_agent_watch_mode", "mode=\"polling\"")`.
    pub async fn metric_sample(&self, name: &str, labels: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        let prefix = format!("{name}{{{labels}}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("kill");
    }

    /// SIGTERM; returns the exit code and how long the exit took.
    pub async fn terminate(mut self) -> (i32, Duration) {
        let start = Instant::now();
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("agent did not exit within 10 s of SIGTERM")
            .expect("wait");
        (status.code().unwrap_or(-1), start.elapsed())
    }
}

/// Live-mode arguments for an agent against `server_url`, writing into `out`.
pub fn live_args(server_url: &str, scratch: &Scratch, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--server".into(),
        server_url.to_owned(),
        "--environment".into(),
        "prod".into(),
        "--user-key-file".into(),
        scratch.key_file(),
        "--output-dir".into(),
        out.display().to_string(),
        "--reconnect-initial-delay".into(),
        "200ms".into(),
        "--reconnect-max-delay".into(),
        "1s".into(),
        "--retry-initial-delay".into(),
        "100ms".into(),
        "--max-retries".into(),
        "1".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Replace the value of `flag` in an argument list (or append the flag).
pub fn set_arg(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(pos) => args[pos + 1] = value.to_owned(),
        None => args.extend([flag.to_owned(), value.to_owned()]),
    }
}

/// Wait until `path` holds exactly `expected`.
pub async fn wait_file(path: &Path, expected: &str, deadline: Duration) {
    wait_for(
        &format!("{} == {expected:?}", path.display()),
        deadline,
        || async { std::fs::read_to_string(path).is_ok_and(|s| s == expected) },
    )
    .await;
}

/// The head of one request a [`FakeServer`] received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET /configs?environment=prod HTTP/1.1` (absolute-form through a proxy).
    pub line: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The request target: `/configs?...`, or `http://host:port/...` through a proxy.
    pub fn target(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or("")
    }

    /// The path of the target, also for an absolute-form target.
    pub fn path(&self) -> &str {
        let t = self.target();
        let t = t
            .strip_prefix("http://")
            .map_or(t, |rest| rest.find('/').map_or("/", |i| &rest[i..]));
        t.split('?').next().unwrap_or("")
    }
}

/// A small HTTP/1.1 server on a loopback address, for answers no real server gives: it reads each
/// request head (at most 64 KiB), records it, and hands it with the connection to `answer`, which
/// writes whatever it wants. One request per connection (see [`respond`]).
pub struct FakeServer {
    pub addr: SocketAddr,
    /// `http://addr`
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    pub async fn start<F, Fut>(bind: &str, answer: F) -> FakeServer
    where
        F: Fn(Seen, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(bind).await.expect("bind fake server");
        let addr = listener.local_addr().expect("local addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let answer = Arc::new(answer);
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let answer = answer.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let Some(request) = read_head(&mut conn).await else {
                        return;
                    };
                    if let Ok(mut s) = recorded.lock() {
                        s.push(request.clone());
                    }
                    answer(request, conn).await;
                });
            }
        });
        FakeServer {
            addr,
            url: format!("http://{addr}"),
            seen,
            task,
        }
    }

    /// Every request head received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many requests had this path.
    pub fn count(&self, path: &str) -> usize {
        self.seen().iter().filter(|s| s.path() == path).count()
    }

    /// A forwarding HTTP proxy: records each absolute-form request, sends it in origin form (with
    /// `connection: close`) to the host it names, and copies bytes both ways (streams included).
    pub async fn proxy(bind: &str) -> FakeServer {
        FakeServer::start(bind, |seen: Seen, mut client: TcpStream| async move {
            let Some(rest) = seen.target().strip_prefix("http://") else {
                respond(&mut client, 400, &[], b"").await;
                return;
            };
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let Ok(mut upstream) = TcpStream::connect(authority).await else {
                respond(&mut client, 502, &[], b"").await;
                return;
            };
            let method = seen.line.split(' ').next().unwrap_or("GET");
            let mut head = format!(
                "{method} {} HTTP/1.1\r\n",
                if path.is_empty() { "/" } else { path }
            );
            for (k, v) in &seen.headers {
                if k != "connection" && !k.starts_with("proxy-") {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
            }
            head.push_str("connection: close\r\n\r\n");
            if upstream.write_all(head.as_bytes()).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        })
        .await
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_head(conn: &mut TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let line = lines.next()?.to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Seen { line, headers })
}

/// Write a complete answer (`content-length`, `connection: close`) and close the connection.
pub async fn respond(conn: &mut TcpStream, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status} Whatever\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body).await;
    let _ = conn.shutdown().await;
}

// ---- Signal dispositions: what a test observes must not depend on what the test process inherited ----

/// Makes `command` start with every signal at its default action and an empty mask, whatever the test
/// process inherited: under `nohup` SIGHUP is ignored, a background job has SIGINT and SIGQUIT ignored,
/// and a non-interactive `sh` cannot `trap` a signal that was ignored when it started.
pub fn default_signals(command: &mut std::process::Command) -> &mut std::process::Command {
    osc_agent::action::signals::reset_on_exec(command);
    command
}

/// `Command::new(program)` with [`default_signals`]: the dev server and the agent then start the same
/// whatever the test process inherited (a child inherits the signal mask, and ignored signals stay
/// ignored across `exec`).
/// The machine's proxy variables are removed too (see [`without_proxy_vars`]).
pub fn clean_command(program: &str) -> Command {
    let mut command = std::process::Command::new(program);
    default_signals(&mut command);
    let mut command = Command::from(command);
    without_proxy_vars(&mut command);
    command
}

/// Makes `command` start the way a `nohup`ed background job under a strict supervisor would: SIGHUP,
/// SIGINT and SIGQUIT ignored, and SIGHUP, SIGINT, SIGTERM and SIGUSR1 blocked.
pub fn nohup_signals(command: &mut Command) {
    use nix::libc;
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut blocked = SigSet::empty();
    for s in [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGUSR1,
    ] {
        blocked.add(s);
    }
    // SAFETY: runs between fork and exec; `signal` and `pthread_sigmask` are async-signal-safe and
    // nothing is allocated.
    unsafe {
        command.pre_exec(move || {
            for s in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
                libc::signal(s, libc::SIG_IGN);
            }
            pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None)?;
            Ok(())
        });
    }
}

/// The signals a program can use (1-31, SIGRTMIN-SIGRTMAX) that a `/proc/PID/status` line such as
/// `SigIgn:\t0000000000000006` lists; the C library's own (32, 33) are left out.
pub fn usable_signals(status: &str, field: &str) -> Vec<i32> {
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    (1..=31)
        .chain(nix::libc::SIGRTMIN()..=nix::libc::SIGRTMAX())
        .filter(|s| mask & (1u64 << (s - 1)) != 0)
        .collect()
}

// ---- Tests that need a cluster: reported as ignored (with the reason) when there is none ----

/// One async test of a `harness = false` test binary (see [`run_tests`]).
pub type AsyncTest = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// `async_tests![a, b]`: the named `async fn`s as `(name, AsyncTest)` pairs.
#[macro_export]
macro_rules! async_tests {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|| Box::pin($name())) as $crate::common::AsyncTest)),*]
    };
}

/// Why tests that need a Kubernetes cluster cannot run here (`$KUBECONFIG` unset), or `None`.
/// With `OSC_REQUIRE_KUBE=1` (CI) a missing cluster is a failure, never a skip.
pub fn missing_cluster() -> Option<String> {
    if std::env::var_os("KUBECONFIG").is_some() {
        return None;
    }
    assert!(
        std::env::var_os("OSC_REQUIRE_KUBE").is_none(),
        "OSC_REQUIRE_KUBE is set but $KUBECONFIG is not"
    );
    Some("$KUBECONFIG is not set: start a node with `.ci/k8s-node.sh up` and set KUBECONFIG=target/k8s-node/kubeconfig (CI does)".into())
}

/// The `main` of a test binary with `harness = false`: libtest's command line (filters, `--list`,
/// `--include-ignored`, `--test-threads`) through `libtest_mimic`, each test on its own runtime. When
/// `skip` holds a reason, every test shows as **ignored** in the summary and the reason is printed once,
/// instead of tests that pass in 0.00 s without doing anything.
pub fn run_tests(skip: Option<String>, tests: Vec<(&'static str, AsyncTest)>) -> ! {
    run_trials(
        tests
            .into_iter()
            .map(|(name, test)| (name, TestFn::Async(test), skip.clone()))
            .collect(),
    )
}

/// A test of a `harness = false` binary: async (on its own runtime) or plain.
pub enum TestFn {
    Async(AsyncTest),
    Sync(fn()),
}

/// [`run_tests`] with a skip reason per test (`None`: run it).
pub fn run_trials(tests: Vec<(&'static str, TestFn, Option<String>)>) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    if !args.list {
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, _, skip) in &tests {
            if let Some(reason) = skip {
                *reasons.entry(reason.as_str()).or_default() += 1;
            }
        }
        for (reason, n) in reasons {
            eprintln!("ignored ({n} tests): {reason}");
        }
    }
    let trials = tests
        .into_iter()
        .map(|(name, test, skip)| {
            libtest_mimic::Trial::test(name, move || {
                match test {
                    TestFn::Sync(f) => f(),
                    TestFn::Async(f) => tokio::runtime::Builder::new_multi_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("cannot build a runtime: {e}"))?
                        .block_on(f()),
                }
                Ok(())
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}
