//! Helpers for integration tests: a real dev server process, the real agent binary, real files.
//! Every wait has a deadline; nothing sleeps and hopes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_osc-agent");
pub const USER_KEY: &str = "integration-user-key-42";

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
        let mut child = Command::new(BIN)
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
        osc_agent::source::install_crypto_provider();
        Api {
            http: reqwest::Client::new(),
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
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("OSC_USER_KEY")
        .env("OSC_LOG", "debug")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
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

/// Hidden entries (`..data`, generations, `..data_tmp`).
pub fn hidden(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".."))
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

    /// [`AgentProc::start`] with a [`Launch`] setup.
    pub async fn launch(logs: &Logs, args: &[&str], launch: Launch<'_>) -> AgentProc {
        let mut cmd = match launch.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
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
            http: {
                osc_agent::source::install_crypto_provider();
                reqwest::Client::new()
            },
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
