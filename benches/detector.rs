//! What the change detector buys on a multi-worker server, and what it costs the server when idle.
//!
//! `cargo bench --bench detector` runs everything in one process, side by side, against dev servers
//! started with `--key-derivation-cost pbkdf2` (the upstream's real per-request PBKDF2, ~75 ms of CPU
//! per authenticated request in a release build), and prints Markdown tables for the README.
//! `OSC_BENCH_IDLE_SECS` sets the idle window of section 2 (default 60); `OSC_BENCH_BIN` runs another
//! build of the binary. Nothing here asserts timing: it measures and prints.
//!
//! 1. **Landing on 4 workers.** `--workers 4`: a lone stream hears one write in four. 40 keys, each
//!    updated once, 500 ms apart; t0 is when the PUT answered, a watcher reads the files every 10 ms.
//!    Once with the stream only (`--change-poll-interval 0`), once with the detector (defaults), one
//!    agent at a time. An update not landed within 20 s counts as "> 20 s".
//! 2. **Server cost per idle agent.** The server's CPU per list (`GET /configs`, key derivation) and
//!    per metadata poll (`GET /cluster/configs`) from `/proc/<pid>/stat` around direct requests; then
//!    the requests an idle agent makes in the window (`/_dev/stats` deltas), on 4 workers and on 1
//!    worker (where the stream earns the detector's trust and the interval stretches), scaled to an
//!    hour and compared with a 2-second list poll.
//! 3. **Quiet idle.** The agents' context switches per second in those idle windows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{Proc, Res, pct, signed_ms};

const USER_KEY: &str = "bench-user-key-0042";
const ENV: &str = "bench";
/// Keys of section 1, each updated once per configuration.
const KEYS: usize = 40;
/// Time between two PUTs of section 1.
const SPACING: Duration = Duration::from_millis(500);
/// How long after the last PUT the watcher keeps looking; later landings count as "> window".
const WINDOW: Duration = Duration::from_secs(20);
/// The "landed quickly" threshold of section 1.
const QUICK: Duration = Duration::from_secs(3);
/// Updates made before an idle window, spaced more than the 2 s poll interval apart so that each one
/// is a poll of its own (five announced changes in a row earn the stream the detector's trust).
const IDLE_UPDATES: usize = 10;
const IDLE_SPACING: Duration = Duration::from_millis(2500);
/// Direct requests of the CPU calibration.
const CAL_LISTS: u32 = 20;
const CAL_POLLS: u32 = 200;
/// The agent's defaults this benchmark reports against.
const POLL_MAX_MS: u64 = 30_000;
const RESYNC_STREAM_ONLY_PER_HOUR: f64 = 12.0; // 5 minutes
const RESYNC_DETECTOR_PER_HOUR: f64 = 2.0; // 30 minutes
const REFERENCE_LISTS_PER_HOUR: f64 = 1800.0; // a 2-second list poll

#[tokio::main]
async fn main() -> Res<()> {
    let started = Instant::now();
    let idle_secs: u64 = match std::env::var("OSC_BENCH_IDLE_SECS") {
        Ok(n) => n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or("OSC_BENCH_IDLE_SECS must be a positive number of seconds")?,
        Err(_) => 60,
    };
    let idle_window = Duration::from_secs(idle_secs);
    osc_agent::source::install_crypto_provider();
    let scratch = tempfile::tempdir()?;
    let key_file = scratch.path().join("user-key");
    std::fs::write(&key_file, USER_KEY)
        .map_err(|e| format!("write {}: {e}", key_file.display()))?;

    // 1. Landing on 4 workers: one agent at a time, same keys, fresh output directories.
    let four = Server::start(4).await?;
    let ctx4 = Ctx {
        api: four.api(),
        key_file: key_file.clone(),
        scratch: scratch.path().to_owned(),
    };
    for k in 0..KEYS {
        ctx4.api.create(&key_name(k), &format!("v0-{k}")).await?;
    }
    let stream_only = landing(&ctx4, "stream-only", false).await?;
    let with_detector = landing(&ctx4, "detector", true).await?;

    // 2. Server CPU per request type, no agent attached; then the idle agents.
    let cal = calibrate(&four, &ctx4.api).await?;
    let idle4 = idle_phase(&ctx4, "4w", idle_window).await?;
    four.proc.stop().await;

    let one = Server::start(1).await?;
    let ctx1 = Ctx {
        api: one.api(),
        key_file,
        scratch: scratch.path().to_owned(),
    };
    for k in 0..KEYS {
        ctx1.api.create(&key_name(k), &format!("v0-{k}")).await?;
    }
    let idle1 = idle_phase(&ctx1, "1w", idle_window).await?;
    one.proc.stop().await;

    report(&stream_only, &with_detector, &cal, &idle1, &idle4);
    println!("\nrun took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What every phase needs: a server's API and a scratch directory holding the user-key file.
struct Ctx {
    api: Api,
    key_file: PathBuf,
    scratch: PathBuf,
}

fn key_name(k: usize) -> String {
    format!("k{k:02}")
}

// ---------------------------------------------------------------------------------------------
// Section 1: landing on 4 workers

/// One configuration's landings.
struct Landing {
    /// Milliseconds from the PUT's answer to the file holding the new value, per update;
    /// `f64::INFINITY` when it did not land within [`WINDOW`].
    latency_ms: Vec<f64>,
    /// `osc_agent_changes_noticed_total` by `via`.
    noticed: BTreeMap<String, f64>,
    /// `/status.detector` at the end.
    detector: Value,
}

/// Update every key once, 500 ms apart, against a fresh agent: stream only, or with the detector
/// (the agent's defaults).
async fn landing(ctx: &Ctx, name: &str, detector: bool) -> Res<Landing> {
    let out = ctx.scratch.join(format!("out-{name}"));
    let flags: &[&str] = if detector {
        &[]
    } else {
        &["--change-poll-interval", "0"]
    };
    let agent = start_agent(ctx, &out, flags).await?;
    agent.wait_settled(detector).await?;

    let expected: Vec<Vec<u8>> = (0..KEYS)
        .map(|k| format!("{name}-{k}-new").into_bytes())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (out, expected, stop) = (out.clone(), expected.clone(), stop.clone());
        tokio::task::spawn_blocking(move || watch(&out, &expected, &stop))
    };

    let start = tokio::time::Instant::now();
    let mut t0 = Vec::with_capacity(KEYS);
    for (k, value) in expected.iter().enumerate() {
        tokio::time::sleep_until(start + SPACING * k as u32).await;
        let value = std::str::from_utf8(value)?;
        t0.push(ctx.api.update(&key_name(k), value).await?);
    }
    let deadline = t0.last().copied().unwrap_or_else(Instant::now) + WINDOW;
    while !watcher.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.await?;

    let window_ms = WINDOW.as_secs_f64() * 1e3;
    let latency_ms = seen
        .iter()
        .zip(&t0)
        .map(|(seen, t0)| match seen {
            Some(t) if signed_ms(*t, *t0) <= window_ms => signed_ms(*t, *t0),
            _ => f64::INFINITY,
        })
        .collect();
    let noticed = agent
        .labeled("osc_agent_changes_noticed_total", "via")
        .await;
    let detector = agent.status().await?["detector"].clone();
    agent.stop().await;
    Ok(Landing {
        latency_ms,
        noticed,
        detector,
    })
}

/// Read every file every 10 ms until each holds its expected bytes or `stop` is set; returns when
/// each was first seen holding them.
fn watch(dir: &Path, expected: &[Vec<u8>], stop: &AtomicBool) -> Vec<Option<Instant>> {
    let mut seen = vec![None; expected.len()];
    loop {
        for (k, want) in expected.iter().enumerate() {
            if seen[k].is_none() && std::fs::read(dir.join(key_name(k))).is_ok_and(|b| b == *want) {
                seen[k] = Some(Instant::now());
            }
        }
        if seen.iter().all(Option::is_some) || stop.load(Ordering::Relaxed) {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Section 2: server CPU per request, requests of an idle agent

/// The server's CPU per request type, measured around direct requests.
struct Calibration {
    list_s: f64,
    poll_s: f64,
    list_ticks: u64,
    poll_ticks: u64,
    /// Per list, as the dev server itself accounts its key derivations (`/_dev/stats`).
    list_kdf_s: f64,
    tick_s: f64,
}

async fn calibrate(server: &Server, api: &Api) -> Res<Calibration> {
    let pid = server.proc.pid()?;
    let tick_s = 1.0 / clock_ticks_per_second()?;
    // Warm up (first-use allocations, connection) outside the measurement.
    api.list().await?;
    api.cluster_configs().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let stats0 = api.stats().await?;
    let c0 = cpu_ticks(pid)?;
    for _ in 0..CAL_LISTS {
        api.list().await?;
    }
    let c1 = cpu_ticks(pid)?;
    let stats1 = api.stats().await?;
    for _ in 0..CAL_POLLS {
        api.cluster_configs().await?;
    }
    let c2 = cpu_ticks(pid)?;

    let kdf_ms = stats1["key_derivation_cpu_ms"].as_f64().unwrap_or(f64::NAN)
        - stats0["key_derivation_cpu_ms"].as_f64().unwrap_or(f64::NAN);
    let (list_ticks, poll_ticks) = (c1.saturating_sub(c0), c2.saturating_sub(c1));
    Ok(Calibration {
        list_s: list_ticks as f64 * tick_s / f64::from(CAL_LISTS),
        poll_s: poll_ticks as f64 * tick_s / f64::from(CAL_POLLS),
        list_ticks,
        poll_ticks,
        list_kdf_s: kdf_ms / 1e3 / f64::from(CAL_LISTS),
        tick_s,
    })
}

fn clock_ticks_per_second() -> Res<f64> {
    // SAFETY: sysconf(3) only reads a configuration value.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return Err("sysconf(_SC_CLK_TCK) failed".into());
    }
    Ok(hz as f64)
}

/// utime + stime of a process (all its threads, exited ones included), in clock ticks.
fn cpu_ticks(pid: u32) -> Res<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    // The command name (field 2) may hold spaces: fields are counted after its closing parenthesis,
    // where field 3 (state) comes first; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("{path}: no ')'"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Res<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("{path}: no field {n}").into())
    };
    Ok(field(14)? + field(15)?)
}

/// Voluntary + involuntary context switches of each of a process's threads, by thread id.
fn ctx_switches(pid: u32) -> Res<BTreeMap<u32, u64>> {
    let dir = format!("/proc/{pid}/task");
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir(&dir).map_err(|e| format!("read {dir}: {e}"))? {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = task.path().join("status");
        // A thread may exit between the listing and the read.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut total = 0;
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += rest
                    .trim()
                    .parse::<u64>()
                    .map_err(|e| format!("{}: {line}: {e}", path.display()))?;
            }
        }
        threads.insert(tid, total);
    }
    Ok(threads)
}

/// Wait until a process's set of threads has not changed for 12 s (60 s at most): a thread that exits
/// takes its counters with it, so none should be about to (tokio's idle blocking threads exit after
/// 10 s).
async fn wait_threads_stable(pid: u32) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let tids = || ctx_switches(pid).map(|t| t.into_keys().collect::<Vec<_>>());
    let (mut known, mut since) = (tids()?, Instant::now());
    while since.elapsed() < Duration::from_secs(12) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = tids()?;
        if now != known {
            (known, since) = (now, Instant::now());
        }
    }
    Ok(())
}

/// An agent idle for a window, after updates.
struct Idle {
    /// The window as measured.
    window: Duration,
    lists: u64,
    polls: u64,
    /// Other requests to the server in the window (gets, subscriptions, …).
    other: u64,
    /// Context switches of the threads alive at the end (only those after the start for the
    /// threads alive at both ends).
    ctx_switches: u64,
    /// Threads that exited during the window (their switches in it are not counted).
    threads_exited: usize,
    /// Threads alive at the end.
    threads: usize,
    /// `/status.detector` at the end of the window.
    detector: Value,
    /// The poll interval when the window started.
    interval_at_start: Option<u64>,
    /// From the last update's PUT to the interval no longer changing.
    settle: Duration,
}

impl Idle {
    fn per_hour(&self, n: u64) -> f64 {
        n as f64 * 3600.0 / self.window.as_secs_f64()
    }
}

async fn idle_phase(ctx: &Ctx, name: &str, window: Duration) -> Res<Idle> {
    let out = ctx.scratch.join(format!("out-idle-{name}"));
    let agent = start_agent(ctx, &out, &[]).await?;
    agent.wait_settled(true).await?;
    let last = IDLE_UPDATES - 1;
    let value = |i: usize| format!("idle-{name}-{i}");
    let mut last_put = Instant::now();
    for i in 0..IDLE_UPDATES {
        if i > 0 {
            tokio::time::sleep(IDLE_SPACING).await;
        }
        last_put = ctx.api.update(&key_name(i), &value(i)).await?;
    }
    let file = out.join(key_name(last));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read(&file).is_ok_and(|b| b == value(last).as_bytes()) {
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: {} did not get its update within 30 s; agent log:\n{}",
                file.display(),
                agent.proc.tail.text()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.wait_settled(true).await?;
    let interval_at_start = agent.wait_interval_settled().await?;
    let settle = last_put.elapsed();
    let pid = agent.proc.pid()?;
    wait_threads_stable(pid).await?;

    let s0 = ctx.api.stats().await?;
    let cs0 = ctx_switches(pid)?;
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let cs1 = ctx_switches(pid)?;
    let window = t.elapsed();
    let switches = cs1
        .iter()
        .map(|(tid, n)| n.saturating_sub(cs0.get(tid).copied().unwrap_or(0)))
        .sum();
    let threads_exited = cs0.keys().filter(|tid| !cs1.contains_key(tid)).count();
    let s1 = ctx.api.stats().await?;
    let detector = agent.status().await?["detector"].clone();
    agent.stop().await;

    let delta = |route: &str| -> Res<u64> {
        let get = |s: &Value| {
            s["requests"][route]
                .as_u64()
                .ok_or_else(|| format!("no requests.{route} in /_dev/stats"))
        };
        Ok(get(&s1)?.saturating_sub(get(&s0)?))
    };
    let (lists, polls) = (delta("list")?, delta("cluster_configs")?);
    let mut other = 0;
    for route in ["get", "create", "update", "delete", "backup", "subscribe"] {
        other += delta(route)?;
    }
    Ok(Idle {
        window,
        lists,
        polls,
        other,
        ctx_switches: switches,
        threads_exited,
        threads: cs1.len(),
        detector,
        interval_at_start,
        settle,
    })
}

// ---------------------------------------------------------------------------------------------
// Processes and the dev server's REST API

/// A dev server with real PBKDF2 per authenticated request.
struct Server {
    proc: Proc,
}

impl Server {
    async fn start(workers: u64) -> Res<Server> {
        let workers = workers.to_string();
        let proc = Proc::spawn(
            &[
                "dev-server",
                "--listen",
                "127.0.0.1:0",
                "--workers",
                &workers,
                "--key-derivation-cost",
                "pbkdf2",
            ],
            |l| {
                l.strip_prefix("osc-agent dev-server listening on http://")
                    .map(|a| a.trim().to_owned())
            },
        )
        .await?;
        Ok(Server { proc })
    }

    fn api(&self) -> Api {
        Api {
            http: reqwest::Client::new(),
            url: format!("http://{}", self.proc.addr),
        }
    }
}

/// An agent in live mode, with its admin server on a free loopback port.
struct Agent {
    proc: Proc,
    http: reqwest::Client,
}

async fn start_agent(ctx: &Ctx, out: &Path, extra: &[&str]) -> Res<Agent> {
    let (key_file, out) = (
        ctx.key_file.display().to_string(),
        out.display().to_string(),
    );
    let mut args = vec![
        "--server",
        ctx.api.url.as_str(),
        "--environment",
        ENV,
        "--user-key-file",
        &key_file,
        "--output-dir",
        &out,
        "--admin-addr",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    let proc = Proc::spawn(&args, |line| {
        let addr = line.contains("admin server listening").then_some(line)?;
        addr.split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .map(|a| a.trim_matches('"').to_owned())
    })
    .await?;
    Ok(Agent {
        proc,
        http: reqwest::Client::new(),
    })
}

impl Agent {
    async fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.proc.addr);
        match self.http.get(url).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    async fn status(&self) -> Res<Value> {
        let (code, body) = self.get("/status").await;
        if code != 200 {
            return Err(
                format!("agent /status answered {code}:\n{}", self.proc.tail.text()).into(),
            );
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Sum of a metric family's samples in `/metrics` (0 if absent).
    async fn metric(&self, name: &str) -> f64 {
        self.labeled(name, "").await.values().sum()
    }

    /// A metric's samples by the value of `label` (`""`: all under one key).
    async fn labeled(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let (_, body) = self.get("/metrics").await;
        let mut out = BTreeMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            if line.split(['{', ' ']).next() != Some(name) {
                continue;
            }
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            let pattern = format!("{label}=\"");
            let key = line
                .split_once(&pattern)
                .and_then(|(_, rest)| rest.split_once('"'))
                .map_or(String::new(), |(v, _)| v.to_owned());
            *out.entry(key).or_default() += value;
        }
        out
    }

    /// Wait (2 min at most) until `/readyz` is 200, the stream is connected, the detector has its
    /// baseline if `detector` is set, and `osc_agent_syncs_total` has not changed for 1 s.
    async fn wait_settled(&self, detector: bool) -> Res<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut syncs, mut since) = (-1.0, Instant::now());
        loop {
            let now = Instant::now();
            if now > deadline {
                return Err(format!("agent did not settle:\n{}", self.proc.tail.text()).into());
            }
            let polling = || async {
                self.status()
                    .await
                    .is_ok_and(|s| s["detector"]["state"] == "polling")
            };
            if self.get("/readyz").await.0 != 200
                || self.metric("osc_agent_stream_connected").await != 1.0
                || (detector && !polling().await)
            {
                since = now;
            } else {
                let current = self.metric("osc_agent_syncs_total").await;
                if current != syncs {
                    (syncs, since) = (current, now);
                } else if now - since >= Duration::from_secs(1) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until the detector's interval stops changing: it reached `--change-poll-max`, or two
    /// further polls left it unchanged (75 s at most: then it is reported as it is). Returns it.
    async fn wait_interval_settled(&self) -> Res<Option<u64>> {
        let deadline = Instant::now() + Duration::from_secs(75);
        let read = |s: &Value| {
            (
                s["detector"]["polls"].as_u64().unwrap_or(0),
                s["detector"]["interval_ms"].as_u64(),
            )
        };
        let (mut polls, mut interval) = read(&self.status().await?);
        let mut unchanged = 0;
        loop {
            if interval.is_some_and(|i| i >= POLL_MAX_MS) || unchanged >= 2 {
                return Ok(interval);
            }
            if Instant::now() > deadline {
                return Ok(interval);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (p, i) = read(&self.status().await?);
            if p != polls {
                unchanged = if i == interval { unchanged + 1 } else { 0 };
                (polls, interval) = (p, i);
            }
        }
    }

    async fn stop(self) {
        self.proc.stop().await;
    }
}

/// The dev server's REST API, as an operator uses it.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    url: String,
}

impl Api {
    async fn create(&self, key: &str, value: &str) -> Res<()> {
        let resp = self
            .http
            .post(format!("{}/configs", self.url))
            .header("x-user-key", USER_KEY)
            .json(&json!({"key": key, "value": value, "environment": ENV}))
            .send()
            .await?;
        match resp.status().as_u16() {
            201 => Ok(()),
            s => Err(format!("POST /configs {key}: {s}").into()),
        }
    }

    /// PUT a new value; returns when the response (headers) arrived.
    async fn update(&self, key: &str, value: &str) -> Res<Instant> {
        let resp = self
            .http
            .put(format!("{}/configs/{key}?environment={ENV}", self.url))
            .header("x-user-key", USER_KEY)
            .json(&json!({ "value": value }))
            .send()
            .await?;
        let at = Instant::now();
        match resp.status().as_u16() {
            200 => Ok(at),
            s => Err(format!("PUT /configs/{key}: {s}").into()),
        }
    }

    /// `GET /configs?environment=bench`: a list, with key derivation.
    async fn list(&self) -> Res<()> {
        let resp = self
            .http
            .get(format!("{}/configs?environment={ENV}", self.url))
            .header("x-user-key", USER_KEY)
            .send()
            .await?;
        match resp.status().as_u16() {
            200 => Ok(resp.bytes().await.map(drop)?),
            s => Err(format!("GET /configs: {s}").into()),
        }
    }

    /// `GET /cluster/configs?environment=bench`: metadata only, no user key.
    async fn cluster_configs(&self) -> Res<()> {
        let resp = self
            .http
            .get(format!("{}/cluster/configs?environment={ENV}", self.url))
            .send()
            .await?;
        match resp.status().as_u16() {
            200 => Ok(resp.bytes().await.map(drop)?),
            s => Err(format!("GET /cluster/configs: {s}").into()),
        }
    }

    async fn stats(&self) -> Res<Value> {
        let resp = self
            .http
            .get(format!("{}/_dev/stats", self.url))
            .send()
            .await?
            .error_for_status()?;
        Ok(resp.json().await?)
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn latency(ms: f64) -> String {
    if ms.is_infinite() {
        format!("> {} s", WINDOW.as_secs())
    } else if ms.abs() >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else {
        format!("{ms:.0} ms")
    }
}

fn cpu(s: f64) -> String {
    if s >= 10.0 {
        format!("{s:.0} s")
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else if s >= 0.1 {
        format!("{s:.2} s")
    } else {
        format!("{s:.3} s")
    }
}

fn noticed(n: &BTreeMap<String, f64>) -> String {
    ["stream", "detector", "resync", "on-demand"]
        .iter()
        .map(|via| format!("{via} {}", n.get(*via).copied().unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn interval(ms: Option<u64>) -> String {
    ms.map_or("?".into(), |ms| format!("{} s", ms as f64 / 1e3))
}

fn report(stream: &Landing, detector: &Landing, cal: &Calibration, idle1: &Idle, idle4: &Idle) {
    let quick_ms = QUICK.as_secs_f64() * 1e3;
    println!("\n### 1. Landing on a 4-worker server\n");
    println!(
        "| configuration | landed within {} s | p50 | p99 | landed within {} s | changes noticed (by via) |",
        QUICK.as_secs(),
        WINDOW.as_secs()
    );
    println!("|---|---|---|---|---|---|");
    for (name, l) in [
        ("stream only (`--change-poll-interval 0`)", stream),
        ("stream + detector (defaults)", detector),
    ] {
        let n = l.latency_ms.len();
        let quick = l.latency_ms.iter().filter(|ms| **ms <= quick_ms).count();
        let landed = l.latency_ms.iter().filter(|ms| ms.is_finite()).count();
        println!(
            "| {name} | {quick}/{n} ({:.0}%) | {} | {} | {landed}/{n} | {} |",
            100.0 * quick as f64 / n as f64,
            latency(pct(&l.latency_ms, 0.5)),
            latency(pct(&l.latency_ms, 0.99)),
            noticed(&l.noticed),
        );
    }
    println!(
        "\n`--workers 4 --key-derivation-cost pbkdf2`: {KEYS} keys each updated once, {} ms apart, one agent \
         at a time; latency = PUT answered → the file holds the new value (watcher every 10 ms); not landed \
         within {} s = \"> {} s\". Detector at the end: polls {}, changes heard by the stream {}, missed {}.",
        SPACING.as_millis(),
        WINDOW.as_secs(),
        WINDOW.as_secs(),
        detector.detector["polls"],
        detector.detector["changes_heard_by_stream"],
        detector.detector["changes_missed_by_stream"],
    );
    for (name, l) in [("stream only", stream), ("stream + detector", detector)] {
        let missing: Vec<String> = (0..l.latency_ms.len())
            .filter(|k| l.latency_ms[*k].is_infinite())
            .map(key_name)
            .collect();
        if !missing.is_empty() {
            println!(
                "{name}: not landed within {} s: {} (of k00…k{:02}, in update order). Every reconcile lists \
                 all keys, so an update the stream missed also lands with the next one it hears.",
                WINDOW.as_secs(),
                missing.join(", "),
                KEYS - 1,
            );
        }
    }

    let list_h = |lists: f64| lists * cal.list_s;
    let reference = list_h(REFERENCE_LISTS_PER_HOUR);
    let idle_row = |what: &str, i: &Idle, target: &str| {
        let (polls_h, lists_h) = (i.per_hour(i.polls), i.per_hour(i.lists));
        let cost = polls_h * cal.poll_s + list_h(lists_h + RESYNC_DETECTOR_PER_HOUR);
        println!(
            "| {what} | {} polls + {} lists in {:.0} s | {polls_h:.0} polls + {lists_h:.0} lists + {RESYNC_DETECTOR_PER_HOUR:.0} \
             resync lists (computed) | {} | {:.2}% ({target}) |",
            i.polls,
            i.lists,
            i.window.as_secs_f64(),
            cpu(cost),
            100.0 * cost / reference,
        );
    };
    println!("\n### 2. Server cost per idle agent\n");
    println!(
        "| agent | server requests measured | per hour | server CPU per agent per hour | vs a 2-second list poll |"
    );
    println!("|---|---|---|---|---|");
    idle_row(
        &format!(
            "(i) 1 worker + detector, interval reached {}",
            interval(idle1.interval_at_start)
        ),
        idle1,
        "target ≤ 1%",
    );
    idle_row(
        &format!(
            "(ii) 4 workers + detector, interval {}",
            interval(idle4.interval_at_start)
        ),
        idle4,
        "target ≤ 5%",
    );
    let stream_only = list_h(RESYNC_STREAM_ONLY_PER_HOUR);
    println!(
        "| (iii) stream only, 5-minute resync | computed | {RESYNC_STREAM_ONLY_PER_HOUR:.0} lists | {} | {:.2}% |",
        cpu(stream_only),
        100.0 * stream_only / reference
    );
    println!(
        "| (iv) reference: list every 2 s | computed | {REFERENCE_LISTS_PER_HOUR:.0} lists | {} | 100% |",
        cpu(reference)
    );
    println!(
        "\nServer CPU per request, measured in this run from the dev server's utime+stime (tick = {:.0} ms), \
         no agent attached: list (`GET /configs`, PBKDF2) {:.1} ms ({CAL_LISTS} lists, {} ticks; the server's \
         own key-derivation accounting: {:.1} ms), metadata poll (`GET /cluster/configs`, 40 keys) {:.3} ms \
         ({CAL_POLLS} polls, {} ticks) = {:.2}% of a list. Idle windows start once the poll interval stopped \
         changing, after {IDLE_UPDATES} updates {:.1} s apart; the 30-minute resync of (i)/(ii) is not in the \
         window: it is added as {RESYNC_DETECTOR_PER_HOUR:.0} lists/hour, computed. Polls in a window are few at \
         a 30 s interval (±10% jitter), so (i)'s poll count is coarse; its cost is dominated by the resync.",
        cal.tick_s * 1e3,
        cal.list_s * 1e3,
        cal.list_ticks,
        cal.list_kdf_s * 1e3,
        cal.poll_s * 1e3,
        cal.poll_ticks,
        100.0 * cal.poll_s / cal.list_s,
        IDLE_SPACING.as_secs_f64(),
    );
    for (name, i) in [("(i)", idle1), ("(ii)", idle4)] {
        let d = &i.detector;
        println!(
            "{name}: detector {} at the end, interval {}, polls {}, changes heard by the stream {}, missed {}; \
             interval settled {:.1} s after the last update; other requests in the window: {}.",
            d["state"],
            interval(d["interval_ms"].as_u64()),
            d["polls"],
            d["changes_heard_by_stream"],
            d["changes_missed_by_stream"],
            i.settle.as_secs_f64(),
            i.other,
        );
    }

    println!("\n### 3. Quiet idle\n");
    println!("| agent | idle window | context switches (all threads) | per second | threads |");
    println!("|---|---|---|---|---|");
    for (what, i) in [
        (
            format!(
                "(i) 1 worker + detector, interval {}",
                interval(idle1.interval_at_start)
            ),
            idle1,
        ),
        (
            format!(
                "(ii) 4 workers + detector, interval {}",
                interval(idle4.interval_at_start)
            ),
            idle4,
        ),
    ] {
        let exited = match i.threads_exited {
            0 => String::new(),
            n => format!(" ({n} exited in the window: not counted)"),
        };
        println!(
            "| {what} | {:.0} s | {} | {:.2}/s | {}{exited} |",
            i.window.as_secs_f64(),
            i.ctx_switches,
            i.ctx_switches as f64 / i.window.as_secs_f64(),
            i.threads,
        );
    }
    println!(
        "\nvoluntary + nonvoluntary context switches from /proc/PID/task/*/status, per thread, before and \
         after the idle window of section 2 (which starts once the agent's set of threads has not changed \
         for 12 s)."
    );

    let kernel = std::fs::read_to_string("/proc/version").unwrap_or_default();
    let kernel: Vec<&str> = kernel.split_whitespace().take(3).collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nMachine: {cpus} CPUs (nproc), {}; release build, loopback.",
        kernel.join(" ")
    );
}
