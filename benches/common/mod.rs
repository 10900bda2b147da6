//! Helpers shared by the bench binaries (`mod common;` in each; each uses a part of them).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::error::Error;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::{self, UnboundedSender};

pub type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// (`VmRSS`, `VmHWM`) of a process in MiB: resident now, and the peak, from `/proc/<pid>/status`.
pub fn memory(pid: u32) -> Res<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Res<f64> {
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Milliseconds from `t0` to `t`, negative when `t` came first.
pub fn signed_ms(t: Instant, t0: Instant) -> f64 {
    if t >= t0 {
        (t - t0).as_secs_f64() * 1e3
    } else {
        -(t0 - t).as_secs_f64() * 1e3
    }
}

/// The `p` quantile (0..=1, nearest rank) of `samples`; NaN when there are none.
pub fn pct(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// A child process (killed on drop) with the last lines it logged, for error messages.
pub struct Proc {
    pub child: Child,
    /// What the ready line announced (`127.0.0.1:PORT`).
    pub addr: String,
    pub tail: Tail,
}

impl Proc {
    /// Spawn `osc-agent args` and wait (30 s at most) for the line `ready` extracts an address from.
    /// `OSC_BENCH_BIN` measures another build of the same sources (e.g. the static musl binary the
    /// image ships), for the dev server and the agents alike.
    pub async fn spawn(args: &[&str], ready: fn(&str) -> Option<String>) -> Res<Proc> {
        let bin = std::env::var("OSC_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_osc-agent").to_owned());
        let mut child = Command::new(&bin)
            .args(args)
            .env_remove("OSC_USER_KEY")
            .env_remove("OSC_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn {bin}: {e}"))?;
        let tail = Tail::default();
        let (tx, mut lines) = mpsc::unbounded_channel();
        drain(child.stdout.take(), tail.clone(), tx.clone());
        drain(child.stderr.take(), tail.clone(), tx);
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.recv().await {
                if let Some(addr) = ready(&line) {
                    return Some(addr);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(addr)) => Ok(Proc { child, addr, tail }),
            _ => Err(format!("osc-agent {args:?} did not start:\n{}", tail.text()).into()),
        }
    }

    pub fn pid(&self) -> Res<u32> {
        Ok(self.child.id().ok_or("process already exited")?)
    }

    /// SIGKILL and reap.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Forward a child's output lines to `tail` (and to `tx` while someone listens).
pub fn drain(
    out: Option<impl AsyncRead + Unpin + Send + 'static>,
    tail: Tail,
    tx: UnboundedSender<String>,
) {
    let Some(out) = out else { return };
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line.clone());
            tail.push(line);
        }
    });
}

/// The last 40 lines of a process's output.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    pub fn push(&self, line: String) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == 40 {
            t.pop_front();
        }
        t.push_back(line);
    }
    pub fn text(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}
