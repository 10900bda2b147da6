//! Footprint (issue 13): what a `--once` run of N keys costs on a real disk, and what the agent's
//! process holds in memory, side by side in one run.
//!
//! `cargo bench --bench footprint` seeds ONE dev server with `OSC_BENCH_KEYS` entries (default 10,000)
//! of `OSC_BENCH_VALUE_BYTES` (1024) each, then, alternating `OSC_BENCH_ROUNDS` times (default 5) so that
//! page-cache and disk state favour no one:
//!
//! 1. `osc-agent --once` of every binary given in `OSC_BENCH_BINS` (`name=path,name=path`; default: this
//!    build's binary as `this`) into a fresh directory under `OSC_BENCH_DIR` (default `target/`, which
//!    should be the disk you care about; a tmpfs shows no flush cost at all);
//! 2. the official Python client (`opensecureconf-client`, with `OSC_BENCH_PYTHON` naming a python that
//!    has it) listing the environment and writing one file per key **without fsync**: the reference of
//!    the issue's target (agent ≤ 1.5× of it);
//! 3. per binary, a live agent synced to the same keys: `VmHWM` (peak RSS during the first sync) and
//!    `VmRSS` once idle (nothing written for `OSC_BENCH_QUIET_SECS`, default 2), from `/proc/<pid>/status`.
//!
//! Each timed run starts after a `sync` (nothing dirty left by the previous one). It prints a Markdown
//! table (medians) for README's Performance section, and the size of each binary
//! (as given, and after `strip` if the tool exists). Nothing is asserted: it measures and prints.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::Res;

const USER_KEY: &str = "bench-user-key-0042";
const ENV: &str = "bench";

fn var<T: std::str::FromStr>(name: &str, default: T) -> Res<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}: not a number: {v}").into()),
        Err(_) => Ok(default),
    }
}

fn main() -> Res<()> {
    let keys: usize = var("OSC_BENCH_KEYS", 10_000)?;
    let value_bytes: usize = var("OSC_BENCH_VALUE_BYTES", 1024)?;
    let rounds: usize = var("OSC_BENCH_ROUNDS", 5)?;
    let quiet: u64 = var("OSC_BENCH_QUIET_SECS", 2)?;
    let bins: Vec<(String, PathBuf)> = match std::env::var("OSC_BENCH_BINS") {
        Ok(list) => list
            .split(',')
            .map(|item| {
                let (name, path) = item
                    .split_once('=')
                    .ok_or_else(|| format!("OSC_BENCH_BINS: '{item}' is not name=path"))?;
                Ok((name.to_owned(), PathBuf::from(path)))
            })
            .collect::<Res<_>>()?,
        Err(_) => vec![(
            "this".into(),
            PathBuf::from(env!("CARGO_BIN_EXE_osc-agent")),
        )],
    };
    let base = std::env::var_os("OSC_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&base)?;
    let scratch = tempfile::tempdir_in(&base)?;
    let fs_type = fs_type(scratch.path());
    eprintln!(
        "footprint: {keys} keys x {value_bytes} B, {rounds} rounds, in {} ({fs_type})",
        scratch.path().display()
    );

    // The seed: environment -> key -> value (printable, distinct per key).
    let seed = scratch.path().join("seed.json");
    let mut entries = serde_json::Map::new();
    for i in 0..keys {
        let value: String = format!("{i:08}-")
            .chars()
            .chain(std::iter::repeat('v'))
            .take(value_bytes)
            .collect();
        entries.insert(format!("key-{i:05}"), serde_json::Value::String(value));
    }
    std::fs::write(
        &seed,
        serde_json::to_vec(&serde_json::json!({ ENV: entries }))?,
    )?;
    drop(entries);
    let key_file = scratch.path().join("user-key");
    std::fs::write(&key_file, USER_KEY)?;
    let server_bin = &bins[0].1;
    let mut server = spawn_ready(
        Command::new(server_bin)
            .args(["dev-server", "--listen", "127.0.0.1:0", "--seed"])
            .arg(&seed)
            .arg("--seed-user-key-file")
            .arg(&key_file),
        "osc-agent dev-server listening on http://",
    )?;
    let url = format!("http://{}", server.ready);

    let python = std::env::var_os("OSC_BENCH_PYTHON").map(PathBuf::from);
    // The runners of one round: every binary, then the Python client (`None`) when there is one.
    let runners: Vec<(&str, Option<&PathBuf>)> = bins
        .iter()
        .map(|(name, bin)| (name.as_str(), Some(bin)))
        .chain(python.as_ref().map(|_| ("python (no fsync)", None)))
        .collect();
    let mut once: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut runs = 0usize;
    for round in 0..rounds {
        // Each round starts with another runner: on this machine's disk the first run of a round was
        // measured faster, whichever it was.
        let order = runners
            .iter()
            .cycle()
            .skip(round % runners.len())
            .take(runners.len());
        for (name, bin) in order {
            runs += 1;
            let out = scratch.path().join(format!("once-{runs}"));
            settle()?;
            let t0 = Instant::now();
            let status = match (bin, &python) {
                (Some(bin), _) => Command::new(bin)
                    .args(["--once", "--server", &url, "--environment", ENV])
                    .arg("--user-key-file")
                    .arg(&key_file)
                    .arg("--output-dir")
                    .arg(&out)
                    .args(["--log-format", "json"])
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?,
                (None, Some(py)) => {
                    std::fs::create_dir_all(&out)?;
                    Command::new(py)
                        .arg("-c")
                        .arg(PYTHON_CLIENT)
                        .arg(&url)
                        .arg(&out)
                        .env("OSC_USER_KEY", USER_KEY)
                        .stdin(Stdio::null())
                        .status()?
                }
                (None, None) => continue,
            };
            let secs = t0.elapsed().as_secs_f64();
            if !status.success() {
                return Err(format!("{name}: --once failed: {status}").into());
            }
            let written = std::fs::read_dir(&out)?
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
                })
                .count();
            if written != keys {
                return Err(format!("{name} wrote {written} files, not {keys}").into());
            }
            once.entry((*name).to_owned()).or_default().push(secs);
            std::fs::remove_dir_all(&out)?;
        }
    }

    // Memory of a live agent per binary.
    let mut memory: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (name, bin) in &bins {
        let out = scratch.path().join(format!("live-{name}"));
        let mut agent = spawn_ready(
            Command::new(bin)
                .args(["--server", &url, "--environment", ENV])
                .arg("--user-key-file")
                .arg(&key_file)
                .arg("--output-dir")
                .arg(&out)
                .args(["--admin-addr", "127.0.0.1:0", "--log-format", "text"])
                .env("RUST_LOG", "info"),
            "sync complete",
        )?;
        // Idle: no more writes for `OSC_BENCH_QUIET_SECS` (2) after the first sync; allocators that
        // purge on a timer (jemalloc's decay: 10 s) need longer to show what they give back.
        wait_quiet(
            &out,
            Duration::from_secs(quiet),
            Duration::from_secs(60 + quiet),
        )?;
        memory.insert(name.clone(), common::memory(agent.child.id())?);
        agent.child.kill()?;
    }
    server.child.kill()?;

    println!(
        "\n| `--once`, {keys} keys × {value_bytes} B on {fs_type} | median of {rounds} | runs | ratio to python |"
    );
    println!("|---|---|---|---|");
    let py = once.get("python (no fsync)").map(|v| median(v));
    for (name, runs) in &once {
        let m = median(runs);
        let shown: Vec<String> = runs.iter().map(|s| format!("{s:.2}")).collect();
        let ratio = py.map_or("-".into(), |p| format!("{:.2}×", m / p));
        println!("| {name} | {m:.2} s | {} | {ratio} |", shown.join(", "));
    }
    println!("\n| binary | size | stripped | peak RSS (first sync) | idle RSS |");
    println!("|---|---|---|---|---|");
    for (name, bin) in &bins {
        let (idle, peak) = memory[name];
        let size = std::fs::metadata(bin)?.len() as f64 / 1e6;
        let stripped =
            stripped_size(bin, scratch.path()).map_or("-".into(), |s| format!("{s:.2} MB"));
        println!("| {name} | {size:.2} MB | {stripped} | {peak:.1} MiB | {idle:.1} MiB |");
    }
    Ok(())
}

/// Lists the environment with the official client and writes each value to a file, without fsync.
const PYTHON_CLIENT: &str = r#"
import os, sys, json
from opensecureconf_client import OpenSecureConfClient
url, out = sys.argv[1], sys.argv[2]
client = OpenSecureConfClient(base_url=url, user_key=os.environ["OSC_USER_KEY"])
for entry in client.list_all(environment="bench"):
    value = entry["value"]
    text = value if isinstance(value, str) else json.dumps(value)
    with open(os.path.join(out, entry["key"]), "w") as f:
        f.write(text)
"#;

struct Ready {
    child: Child,
    ready: String,
}

/// Starts `cmd` and waits (60 s at most) for a line of its output containing `marker`; returns what
/// follows the marker on that line. The rest of the output is drained in a thread.
fn spawn_ready(cmd: &mut Command, marker: &str) -> Res<Ready> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let pipes: Vec<Box<dyn Read + Send>> = vec![
        Box::new(child.stdout.take().ok_or("stdout")?),
        Box::new(child.stderr.take().ok_or("stderr")?),
    ];
    for pipe in pipes {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(at) = line.find(marker) {
                    let ready = line[at + marker.len()..].trim().to_owned();
                    std::thread::spawn(move || while rx.recv().is_ok() {});
                    return Ok(Ready { child, ready });
                }
                seen.push(line);
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    Err(format!("no '{marker}' within 60 s; output:\n{}", seen.join("\n")).into())
}

/// Waits until nothing under `dir` changed for `quiet` (by the newest mtime), `limit` at most.
fn wait_quiet(dir: &Path, quiet: Duration, limit: Duration) -> Res<()> {
    let start = Instant::now();
    let newest = || -> Option<std::time::SystemTime> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max()
    };
    loop {
        if let Some(t) = newest()
            && t.elapsed().unwrap_or_default() >= quiet
        {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err("the agent kept writing".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts each timed run from the same state: nothing dirty in the page cache (an earlier run's
/// unflushed files, the deletion of its directory), which a flush in the next run would pay for.
fn settle() -> Res<()> {
    if !Command::new("sync").status()?.success() {
        return Err("sync failed".into());
    }
    Ok(())
}

fn stripped_size(bin: &Path, scratch: &Path) -> Option<f64> {
    let copy = scratch.join("stripped");
    std::fs::copy(bin, &copy).ok()?;
    let ok = Command::new("strip").arg(&copy).status().ok()?.success();
    let size = std::fs::metadata(&copy).ok()?.len() as f64 / 1e6;
    let _ = std::fs::remove_file(&copy);
    ok.then_some(size)
}

/// The file system type of the mount holding `path` (from /proc/self/mountinfo: `stat -f` cannot tell
/// ext4 from ext2).
fn fs_type(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount = *fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            let fs = *fields.get(dash + 1)?;
            path.starts_with(mount)
                .then(|| (mount.len(), fs.to_owned()))
        })
        .max()
        .map_or_else(|| "unknown file system".into(), |(_, fs)| fs)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}
