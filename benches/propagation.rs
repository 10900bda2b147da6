//! How fast a change reaches the files, and how much memory an idle agent holds.
//!
//! `cargo bench --bench propagation` runs everything against ONE dev server process (started with
//! `--queue-size 100000`, so no event is ever dropped) and prints a Markdown table for the README.
//! `OSC_BENCH_UPDATES` sets the number of updates per agent configuration (default 200);
//! `OSC_BENCH_BIN` runs another build of the binary (e.g. the static musl one). Nothing here asserts
//! timing: it measures and prints.
//!
//! 1. **Propagation latency.** Sequential PUTs of key `k` in environment `bench`; t0 is when the PUT
//!    response arrived. For each update we record when (a) a bare SSE reader in this process saw the
//!    `updated` event carrying that update's marker (the floor set by the server's stream), and (b)
//!    the agent's `DIR/k` held exactly the new value (debounce + list call + render + atomic swap on
//!    top of that). Once with the default debounce, once with none, each with its own agent process.
//!    Both can be slightly negative: the server publishes the event before it answers the PUT.
//! 2. **Idle memory.** An agent synced to 100 keys and to 10,000 keys × 1 KiB, once it has stopped
//!    syncing: `VmRSS` and `VmHWM` (peak) from `/proc/<pid>/status`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

mod common;

use common::{Proc, Res, Tail, memory, pct, signed_ms};

const USER_KEY: &str = "bench-user-key-0042";
const KEY: &str = "k";
/// Longest wait for one update's event or file before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Res<()> {
    let started = Instant::now();
    let updates: usize = match std::env::var("OSC_BENCH_UPDATES") {
        Ok(n) => n
            .parse()
            .map_err(|_| "OSC_BENCH_UPDATES must be a number")?,
        Err(_) => 200,
    };
    osc_agent::source::install_crypto_provider();
    let scratch = tempfile::tempdir()?;
    let key_file = scratch.path().join("user-key");
    std::fs::write(&key_file, USER_KEY)?;
    let server = Proc::spawn(
        &[
            "dev-server",
            "--listen",
            "127.0.0.1:0",
            "--queue-size",
            "100000",
        ],
        |l| {
            l.strip_prefix("osc-agent dev-server listening on http://")
                .map(|a| a.trim().to_owned())
        },
    )
    .await?;
    let api = Api {
        http: reqwest::Client::new(),
        url: format!("http://{}", server.addr),
    };
    let ctx = Ctx {
        api,
        key_file,
        scratch: scratch.path().to_owned(),
    };

    // 1. Propagation latency: one bare reader for the whole phase, one agent per configuration.
    ctx.api.create("bench", KEY, "initial").await?;
    let (reader, mut events) = start_reader(&ctx.api, "bench").await?;
    wait_connected(&mut events).await?;
    let mut seq = 0;
    let no_debounce = ["--wait-min", "0ms", "--wait-max", "0ms"];
    let fast = latency_phase(
        &ctx,
        "nodebounce",
        &no_debounce,
        updates,
        &mut seq,
        &mut events,
    )
    .await?;
    let slow = latency_phase(&ctx, "default", &[], updates, &mut seq, &mut events).await?;
    reader.abort();

    // 2. Idle memory.
    ctx.api.seed("rss100", 100).await?;
    let rss100 = idle_memory(&ctx, "rss100").await?;
    ctx.api.seed("rss10k", 10_000).await?;
    let rss10k = idle_memory(&ctx, "rss10k").await?;
    let server_mem = memory(server.pid()?)?;
    server.stop().await;

    report(updates, &fast, &slow, rss100, rss10k, server_mem);
    println!("\nrun took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What every phase needs: the server's API and a scratch directory holding the user-key file.
struct Ctx {
    api: Api,
    key_file: PathBuf,
    scratch: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Phase 1: propagation latency

/// Milliseconds from t0 (PUT response received) to the event at the bare reader and to the file,
/// and the PUT's round trip (request sent → response received).
#[derive(Default)]
struct Latencies {
    event_ms: Vec<f64>,
    file_ms: Vec<f64>,
    put_ms: Vec<f64>,
}

impl Latencies {
    /// Latencies counted from when the PUT request was sent instead (always positive).
    fn from_sent(v: &[f64], put_ms: &[f64]) -> Vec<f64> {
        v.iter().zip(put_ms).map(|(x, put)| x + put).collect()
    }
}

/// `updates` sequential PUTs against a fresh agent started with `extra` flags.
async fn latency_phase(
    ctx: &Ctx,
    name: &str,
    extra: &[&str],
    updates: usize,
    seq: &mut u64,
    events: &mut UnboundedReceiver<(Seen, Instant)>,
) -> Res<Latencies> {
    let out = ctx.scratch.join(format!("out-{name}"));
    let mut flags = vec!["--resync-interval", "1h"];
    flags.extend(extra);
    let agent = start_agent(ctx, "bench", &out, &flags).await?;
    // The agent must be subscribed (or it would miss the first hint) and done with its start syncs.
    agent.wait_settled(true).await?;
    let mut lat = Latencies::default();
    for _ in 0..updates {
        *seq += 1;
        let value = marked_value(*seq);
        // Start watching the file before the PUT, so no swap can be missed.
        let poll = {
            let (out, expected) = (out.clone(), value.clone().into_bytes());
            tokio::task::spawn_blocking(move || {
                wait_file(&out, &expected, Instant::now() + STEP_TIMEOUT)
            })
        };
        let (sent, t0) = ctx.api.update("bench", KEY, &value).await?;
        let t_event = wait_marker(events, *seq).await?;
        let t_file = poll.await?.ok_or_else(|| {
            format!(
                "{name}: {}/{KEY} did not get update {} within {STEP_TIMEOUT:?}; agent log:\n{}",
                out.display(),
                *seq,
                agent.tail.text()
            )
        })?;
        lat.event_ms.push(signed_ms(t_event, t0));
        lat.file_ms.push(signed_ms(t_file, t0));
        lat.put_ms.push(signed_ms(t0, sent));
    }
    agent.stop().await;
    Ok(lat)
}

/// `m-000042-` then padding: a few hundred bytes, like a small config value.
fn marked_value(seq: u64) -> String {
    format!("m-{seq:06}-{}", "abcdefghij".repeat(30))
}

/// Poll until `dir/k` holds exactly `expected`; returns when the swap was first seen. Only one
/// `readlink(dir/..data)` every ~100 µs (a few µs of CPU each); the file is read only when the link
/// changed, so the poller costs little CPU and adds at most ~0.15 ms (sleep + timer slack).
fn wait_file(dir: &Path, expected: &[u8], deadline: Instant) -> Option<Instant> {
    let (link, file) = (dir.join("..data"), dir.join(KEY));
    let mut last = None;
    loop {
        let target = std::fs::read_link(&link).ok();
        let seen = Instant::now();
        if target != last {
            if std::fs::read(&file).is_ok_and(|b| b == expected) {
                return Some(seen);
            }
            last = target;
        }
        if seen > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

// ---------------------------------------------------------------------------------------------
// The bare SSE reader: what an ideal client of the stream would see.

/// What the reader saw, stamped with when the chunk holding it arrived.
enum Seen {
    Connected,
    Marker(u64),
}

async fn start_reader(
    api: &Api,
    env: &str,
) -> Res<(JoinHandle<()>, UnboundedReceiver<(Seen, Instant)>)> {
    let resp = api
        .http
        .get(format!("{}/sse/subscribe?environment={env}", api.url))
        .header("x-user-key", USER_KEY)
        .send()
        .await?
        .error_for_status()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        if let Err(e) = read_stream(resp, tx).await {
            eprintln!("SSE reader: {e}");
        }
    });
    Ok((task, rx))
}

/// Split the body into CRLF-framed events as chunks arrive; report `connected` and update markers.
async fn read_stream(mut resp: reqwest::Response, tx: UnboundedSender<(Seen, Instant)>) -> Res<()> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let at = Instant::now();
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let frame: Vec<u8> = buf.drain(..end + 4).collect();
            if let Some(seen) = parse_frame(&frame[..end]) {
                tx.send((seen, at))?;
            }
        }
    }
    Err("the stream ended".into())
}

fn parse_frame(frame: &[u8]) -> Option<Seen> {
    let text = std::str::from_utf8(frame).ok()?;
    let (mut event, mut data) = (None, None);
    for line in text.split("\r\n") {
        if let Some(e) = line.strip_prefix("event: ") {
            event = Some(e);
        } else if let Some(d) = line.strip_prefix("data: ") {
            data = Some(d);
        }
    }
    match event? {
        "connected" => Some(Seen::Connected),
        "updated" => {
            let data: Value = serde_json::from_str(data?).ok()?;
            let value = data["data"]["value"].as_str()?;
            value
                .strip_prefix("m-")?
                .get(..6)?
                .parse()
                .ok()
                .map(Seen::Marker)
        }
        _ => None,
    }
}

async fn wait_connected(events: &mut UnboundedReceiver<(Seen, Instant)>) -> Res<()> {
    match tokio::time::timeout(STEP_TIMEOUT, events.recv()).await {
        Ok(Some((Seen::Connected, _))) => Ok(()),
        _ => Err("the bare SSE reader got no `connected` event".into()),
    }
}

/// When the reader saw the event of update `seq` (earlier markers are skipped).
async fn wait_marker(events: &mut UnboundedReceiver<(Seen, Instant)>, seq: u64) -> Res<Instant> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some((Seen::Marker(m), at))) if m == seq => return Ok(at),
            Ok(Some(_)) => {}
            Ok(None) => return Err("the bare SSE reader stopped".into()),
            Err(_) => {
                return Err(format!("no event for update {seq} within {STEP_TIMEOUT:?}").into());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: idle memory

/// (VmRSS, VmHWM) in MiB of an agent synced to environment `env`, once idle.
async fn idle_memory(ctx: &Ctx, env: &str) -> Res<(f64, f64)> {
    let out = ctx.scratch.join(format!("out-{env}"));
    let agent = start_agent(ctx, env, &out, &[]).await?;
    agent.wait_settled(false).await?;
    let mem = memory(agent.proc.pid()?);
    agent.stop().await;
    mem
}

// ---------------------------------------------------------------------------------------------
// Processes and the dev server's REST API

/// An agent in live mode, with its admin server on a free loopback port.
struct Agent {
    proc: Proc,
    tail: Tail,
    http: reqwest::Client,
}

async fn start_agent(ctx: &Ctx, env: &str, out: &Path, extra: &[&str]) -> Res<Agent> {
    let (key_file, out) = (
        ctx.key_file.display().to_string(),
        out.display().to_string(),
    );
    let mut args = vec![
        "--server",
        ctx.api.url.as_str(),
        "--environment",
        env,
        "--user-key-file",
    ];
    args.extend([
        key_file.as_str(),
        "--output-dir",
        &out,
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    args.extend(extra);
    let proc = Proc::spawn(&args, |line| {
        let addr = line.contains("admin server listening").then_some(line)?;
        addr.split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .map(str::to_owned)
    })
    .await?;
    Ok(Agent {
        tail: proc.tail.clone(),
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

    /// Sum of a metric family's samples in `/metrics` (0 if absent).
    async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Wait (2 min at most) until `/readyz` is 200, the stream is connected if `stream` is set, and
    /// `osc_agent_syncs_total` has not changed for 1 s: the agent is idle.
    async fn wait_settled(&self, stream: bool) -> Res<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut syncs, mut since) = (-1.0, Instant::now());
        loop {
            let now = Instant::now();
            if now > deadline {
                return Err(format!("agent did not settle:\n{}", self.tail.text()).into());
            }
            if self.get("/readyz").await.0 != 200
                || (stream && self.metric("osc_agent_stream_connected").await != 1.0)
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
    async fn create(&self, env: &str, key: &str, value: &str) -> Res<()> {
        let resp = self
            .http
            .post(format!("{}/configs", self.url))
            .header("x-user-key", USER_KEY)
            .json(&json!({"key": key, "value": value, "environment": env}))
            .send()
            .await?;
        match resp.status().as_u16() {
            201 => Ok(()),
            s => Err(format!("POST /configs {key}: {s}").into()),
        }
    }

    /// PUT a new value; returns when the request was sent and when the response (headers) arrived
    /// (t0 of the latency phase).
    async fn update(&self, env: &str, key: &str, value: &str) -> Res<(Instant, Instant)> {
        let sent = Instant::now();
        let resp = self
            .http
            .put(format!("{}/configs/{key}?environment={env}", self.url))
            .header("x-user-key", USER_KEY)
            .json(&json!({ "value": value }))
            .send()
            .await?;
        let at = Instant::now();
        match resp.status().as_u16() {
            200 => Ok((sent, at)),
            s => Err(format!("PUT /configs/{key}: {s}").into()),
        }
    }

    /// Create `n` keys with 1 KiB values in `env`, 16 requests in flight.
    async fn seed(&self, env: &str, n: usize) -> Res<()> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (api, next, env) = (self.clone(), next.clone(), env.to_owned());
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), Box<dyn std::error::Error + Send + Sync>>(());
                    }
                    let value = format!("{i:05}-{}", "v".repeat(1024 - 6));
                    api.create(&env, &format!("key-{i:05}"), &value).await?;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done??;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(x: f64) -> String {
    if x.abs() < 10.0 {
        format!("{x:.2} ms")
    } else {
        format!("{x:.1} ms")
    }
}

fn times(ratio: f64) -> String {
    if ratio.abs() < 10.0 {
        format!("{ratio:.1}×")
    } else {
        format!("{ratio:.0}×")
    }
}

fn report(
    updates: usize,
    fast: &Latencies,
    slow: &Latencies,
    rss100: (f64, f64),
    rss10k: (f64, f64),
    server: (f64, f64),
) {
    // The bare reader ran through both phases; its latency does not depend on the agent's flags.
    let all = |f: fn(&Latencies) -> &[f64]| [f(fast), f(slow)].concat();
    let events = all(|l| &l.event_ms);
    let puts = all(|l| &l.put_ms);
    // The server publishes the event before it answers the PUT, so counted from the response the
    // bare reader's latency is about 0 (or below): ratios are taken from when the PUT was sent.
    let events_sent = Latencies::from_sent(&events, &puts);
    let (e50, e99) = (pct(&events_sent, 0.5), pct(&events_sent, 0.99));
    let line = |what: &str, v: &[f64]| {
        println!("| {what} | {} | {} |", ms(pct(v, 0.5)), ms(pct(v, 0.99)));
    };
    let files = |what: &str, l: &Latencies| {
        line(what, &l.file_ms);
        let sent = Latencies::from_sent(&l.file_ms, &l.put_ms);
        let (f50, f99) = (pct(&sent, 0.5), pct(&sent, 0.99));
        let ratio = "… ratio to the bare reader (both counted from the PUT request)";
        println!("| {ratio} | {} | {} |", times(f50 / e50), times(f99 / e99));
    };
    let mem = |what: &str, (rss, hwm): (f64, f64)| {
        println!("| {what} | {rss:.1} MiB | (peak {hwm:.1} MiB) |");
    };
    println!("| measure | p50 | p99 |\n|---|---|---|");
    line("PUT round trip (request sent → response received)", &puts);
    line("PUT → event at a bare SSE reader", &events);
    line(
        "PUT request sent → event at a bare SSE reader",
        &events_sent,
    );
    files("PUT → file renamed, no debounce (`--wait-min 0ms`)", fast);
    files("PUT → file renamed, default debounce (250 ms)", slow);
    mem("idle RSS, 100 keys", rss100);
    mem("idle RSS, 10,000 keys × 1 KiB", rss10k);
    mem("dev server RSS (context: holds all of the above)", server);

    let kernel = std::fs::read_to_string("/proc/version").unwrap_or_default();
    let kernel: Vec<&str> = kernel.split_whitespace().take(3).collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nMachine: {cpus} CPUs (nproc), {}. {updates} sequential updates per configuration, \
         values of {} bytes; \"PUT →\" = from the PUT response received (release build, loopback).",
        kernel.join(" "),
        marked_value(0).len()
    );
    for (name, l) in [("no debounce", fast), ("default debounce", slow)] {
        println!(
            "Run with {name}: bare reader p50 {}, p99 {}, max {}; file min {}, max {}.",
            ms(pct(&l.event_ms, 0.5)),
            ms(pct(&l.event_ms, 0.99)),
            ms(pct(&l.event_ms, 1.0)),
            ms(pct(&l.file_ms, 0.0)),
            ms(pct(&l.file_ms, 1.0)),
        );
    }
}
