//! `osc-agent dev-server`: an OpenSecureConf-compatible server for local trials and for the test
//! suite, in the spirit of `vault server -dev`. In memory by default; **never use it in production**
//! (values are not encrypted, and `--data-file` stores them in plain text).
//!
//! It reproduces the upstream 3.1.0 wire format (see `docs/opensecureconf-protocol.md`): the REST
//! routes and their exact error bodies, user-key "sealing" (a request with another user key gets
//! `500 {"detail":"Internal error: "}`, see `store.rs`), the encrypted `/backup` format (see
//! [`crate::backup`]), the SSE stream byte for byte (CRLF framing, Python `json.dumps` data,
//! `: ping` and `: keep-alive` comments, see `sse.rs`), and the metadata route
//! `GET /cluster/configs[?environment=E][&category=C]`: compact JSON rows
//! `{"key","category","environment","created_at","updated_at"}` in id order, timestamps in SQLite
//! text (`2026-11-30 17:22:26.925663`, UTC, no `T`, no zone), never values; no `X-User-Key` (only
//! `X-API-Key` in API-key mode) and no key derivation; absent or empty environment = all, unknown
//! = `[]`. Every PUT bumps `updated_at` (identical values too); delete + re-create gives a new
//! `created_at`. It reads the shared store, so it sees every write whatever the worker.
//!
//! # Fault switches
//!
//! The ways the upstream stream loses events can be switched on with flags or at runtime (see
//! `faults.rs`): `--drop-every N`, `--workers N` (per-worker fan-out), `--queue-size N`
//! (newest event dropped on overflow) and the runtime-only `paused`. `--no-cluster-configs` (or
//! `cluster_configs: false` at runtime) removes `/cluster/configs` (404 `{"detail":"Not Found"}`,
//! like a server without the route).
//!
//! `--workers N` models the kernel's choice of worker **round-robin** (deterministic, where the
//! real kernel's is not): subscription number `s` since start belongs to worker `s % N`, and
//! successful write number `w` (POST, PUT, DELETE) is handled by worker `w % N` and streamed only
//! to that worker's subscribers. So with 4 workers a lone subscriber hears exactly one write in
//! four (writes 0, 4, 8, … for the first subscription); `connected` events, `GET /configs` and
//! `GET /cluster/configs` are unaffected.
//!
//! # Server cost
//!
//! `--key-derivation-cost off|pbkdf2|DURATION` (see `cost.rs`) makes every `/configs*` and
//! `/backup` request that passes validation pay what the upstream's per-request PBKDF2 costs,
//! before it touches the store: `pbkdf2` runs the real derivation (480,000 rounds of
//! PBKDF2-HMAC-SHA256 over the user key) on a blocking thread (measured: ~75 ms of CPU in a release
//! build, like upstream; ~1.35 s in the debug/test build, where the generic HMAC and digest code
//! is monomorphised in this crate unoptimised although `sha2` and `pbkdf2` are optimised); a
//! duration such as `80ms` busy-waits for that much CPU time of one thread (1 ms to 10 s), the
//! way to model the upstream's cost in debug builds and tests. `/cluster/configs`, `/sse/*` and the health
//! routes never pay it. CPU time is read from `/proc/thread-self/schedstat` (scheduler-tick
//! resolution; wall time where it is unreadable).
//!
//! # Admin endpoints (unauthenticated, dev only)
//!
//! - `GET /_dev/faults`: the current fault state
//!   `{"drop_every","workers","queue_size","paused","cluster_configs"}`.
//! - `POST /_dev/faults` with any subset of those fields: changes them, answers the full state.
//!   `paused: true` stops every stream from draining its queue, so queues fill and overflow
//!   deterministically; `paused: false` resumes.
//! - `POST /_dev/streams/cut`: aborts every open stream (the chunked body ends with an error: no
//!   terminating chunk, the client sees a broken connection, like a SIGKILL). Answers `{"cut": N}`.
//! - `POST /_dev/streams/close`: ends every open stream cleanly (normal end of body, as upstream
//!   does on SIGTERM). Answers `{"closed": N}`.
//! - `GET /_dev/stats`: counters since start, all integers except the last:
//!   `{"active_subscriptions","events_published","events_delivered","events_dropped","writes"`
//!   (events and successful writes, see `sse.rs`), `"requests":{"list","get","create","update",
//!   "delete","backup","cluster_configs","subscribe"}` (requests received per route:
//!   `GET /configs`, `GET /configs/{key}`, `POST /configs`, `PUT`, `DELETE`, `POST /backup`,
//!   `GET /cluster/configs`, `GET /sse/subscribe`; every answer counts, errors and a disabled
//!   route's 404 included), `"key_derivations"` (derivations paid under
//!   `--key-derivation-cost`; 0 when off) and `"key_derivation_cpu_ms"` (their CPU time in
//!   milliseconds, a float with microsecond resolution)`}`.
//!
//! # Seeds, keys and persistence
//!
//! `--seed FILE` (JSON or YAML) holds either a list of entries shaped like the output of
//! `GET /configs` (so a recorded listing works as is; `id`, timestamps and other extra fields are
//! ignored) or a mapping `environment -> key -> value` (category null); see `seed.rs`. Seeded
//! entries are sealed under the seed user key (`--seed-user-key-file`, `OSC_DEV_SEED_USER_KEY`, or
//! a random 24-character key printed once as `seed user key: …`). `--data-file` keeps the entries
//! across restarts (seeds are only added where absent), with salted user-key fingerprints only.
//!
//! Logs (through `tracing`) carry method, path and status only: never values, keys or queries.

mod clock;
mod cost;
mod faults;
mod http;
mod pyjson;
mod seed;
mod sse;
mod store;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use self::cost::{KeyDerivation, Requests};
use self::faults::{FaultState, Faults};
use self::sse::{Hub, Timing};
use self::store::Store;

use crate::config::{HumanDuration, Secret};

pub use self::cost::KeyDerivationCost;

/// A positive duration flag (`250ms`, `15s`, `2m`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<HumanDuration>()?.0 {
        d if d.is_zero() => Err(format!("duration '{text}' must be greater than zero")),
        d => Ok(d),
    }
}

/// Flags of `osc-agent dev-server`. Each has an `OSC_DEV_*` environment twin.
#[derive(clap::Args, Debug, Clone)]
pub struct DevServerArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the ready line tells which).
    #[arg(
        long,
        env = "OSC_DEV_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8900"
    )]
    pub listen: SocketAddr,

    /// Entries to start with: JSON or YAML, either a list like the output of `GET /configs`
    /// or a mapping environment -> key -> value.
    #[arg(long, env = "OSC_DEV_SEED", value_name = "FILE")]
    pub seed: Option<PathBuf>,

    /// File holding the user key the seeded entries are sealed under. Without it (or
    /// OSC_DEV_SEED_USER_KEY), a random key is generated and printed once at start.
    #[arg(
        long,
        env = "OSC_DEV_SEED_USER_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "seed_user_key"
    )]
    pub seed_user_key_file: Option<PathBuf>,

    /// The seed user key itself; prefer the environment variable (arguments are visible to
    /// other local users).
    #[arg(
        long,
        env = "OSC_DEV_SEED_USER_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub seed_user_key: Option<Secret>,

    /// File holding an API key: enables API-key mode (X-API-Key required on protected routes).
    #[arg(
        long,
        env = "OSC_DEV_API_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "api_key"
    )]
    pub api_key_file: Option<PathBuf>,

    /// The API key itself; prefer the environment variable.
    #[arg(
        long,
        env = "OSC_DEV_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<Secret>,

    /// Persist entries in this file (loaded at start, saved after each write). DEV ONLY: values
    /// are stored in plain text (user keys are not: only salted fingerprints).
    #[arg(long, env = "OSC_DEV_DATA_FILE", value_name = "FILE")]
    pub data_file: Option<PathBuf>,

    /// Period of the `: ping` comment on every stream (e.g. 15s, 250ms, 2m).
    #[arg(long, env = "OSC_DEV_PING_INTERVAL", value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// Send a `: keep-alive` comment after this long without events.
    #[arg(long, env = "OSC_DEV_KEEPALIVE_AFTER", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_after: Duration,

    /// Fault: drop every Nth published event (0 = off).
    #[arg(
        long,
        env = "OSC_DEV_DROP_EVERY",
        value_name = "N",
        default_value_t = 0
    )]
    pub drop_every: u64,

    /// Fault: simulate N worker processes; a subscriber only sees writes handled by its worker.
    #[arg(long, env = "OSC_DEV_WORKERS", value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub workers: u64,

    /// Per-subscription queue capacity; when full, the newest event is dropped (like upstream).
    #[arg(long, env = "OSC_DEV_QUEUE_SIZE", value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub queue_size: u64,

    /// Serve no `GET /cluster/configs` (404, like a server without the route); switchable at
    /// runtime with `POST /_dev/faults {"cluster_configs": true|false}`.
    #[arg(long, env = "OSC_DEV_NO_CLUSTER_CONFIGS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_cluster_configs: bool,

    /// CPU cost of every request carrying X-User-Key (/configs*, /backup), like the upstream's
    /// per-request PBKDF2 (~70-80 ms): `off`; `pbkdf2` (a real PBKDF2-HMAC-SHA256 of the user key,
    /// 480,000 rounds, on a blocking thread: ~75 ms of CPU in a release build, ~1.35 s in a debug
    /// or test build, whose generic HMAC code is unoptimised); or a duration from 1ms to 10s
    /// (`80ms`: a busy-wait using that much CPU time of one thread; use it in debug builds).
    /// /cluster/configs, /sse/* and /health never pay it.
    #[arg(
        long,
        env = "OSC_DEV_KEY_DERIVATION_COST",
        value_name = "off|pbkdf2|DURATION",
        default_value = "off"
    )]
    pub key_derivation_cost: KeyDerivationCost,
}

impl DevServerArgs {
    /// Defaults, listening on `127.0.0.1:0` (a free port).
    pub fn for_demo() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: None,
            seed_user_key_file: None,
            seed_user_key: None,
            api_key_file: None,
            api_key: None,
            data_file: None,
            ping_interval: Duration::from_secs(15),
            keepalive_after: Duration::from_secs(30),
            drop_every: 0,
            workers: 1,
            queue_size: 100,
            no_cluster_configs: false,
            key_derivation_cost: KeyDerivationCost::Off,
        }
    }
}

/// Why the dev server could not start (or stopped). Each message names the flag or file at fault.
#[derive(thiserror::Error, Debug)]
pub enum DevServerError {
    #[error("--listen {addr}: cannot listen: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("--seed {}: {reason}", path.display())]
    Seed { path: PathBuf, reason: String },
    #[error("{flag} {}: {reason}", path.display())]
    KeyFile {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{flag}: {reason}")]
    InvalidKey { flag: &'static str, reason: String },
    #[error("--data-file {}: {reason}", path.display())]
    DataFile { path: PathBuf, reason: String },
    #[error("--workers/--queue-size: {0}")]
    Faults(String),
    #[error("dev-server cannot install its SIGTERM/SIGINT handlers: {0}")]
    Signal(io::Error),
    #[error("dev-server stopped unexpectedly: {0}")]
    Serve(io::Error),
}

/// A dev server running in this process (see [`spawn`]).
pub struct DevServer {
    addr: SocketAddr,
    hub: Arc<Hub>,
    seed_user_key: Option<String>,
    seed_user_key_generated: bool,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for DevServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DevServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The user key the seed entries are sealed under (given or generated), if there were seeds.
    pub fn seed_user_key(&self) -> Option<&str> {
        self.seed_user_key.as_deref()
    }

    /// Ends every SSE stream cleanly, then stops the server (waiting at most 5 s for in-flight
    /// requests).
    pub async fn shutdown(mut self) {
        let closed = self.hub.shut_down();
        tracing::info!(closed, "dev-server shutting down");
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!("dev-server: in-flight requests did not finish within 5s; aborting");
                abort.abort();
            }
        }
    }

    /// Resolves if the server task ends on its own (it should not).
    async fn stopped(&mut self) -> io::Error {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let result = task.await;
        self.task = None;
        match result {
            Ok(Ok(())) => io::Error::other("server task ended"),
            Ok(Err(e)) => e,
            Err(e) => io::Error::other(e),
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.hub.shut_down();
            task.abort();
        }
    }
}

/// Runs the dev server until SIGTERM or SIGINT, then ends every SSE stream cleanly and returns.
///
/// Prints exactly one line to stdout once listening (`osc-agent dev-server listening on
/// http://IP:PORT`), followed by `seed user key: …` when a seed key was generated.
pub async fn run(args: DevServerArgs) -> Result<(), DevServerError> {
    // Install the handlers before announcing readiness: a signal right after the ready line must
    // not hit the default action.
    let signal = shutdown_signal().map_err(DevServerError::Signal)?;
    let mut server = spawn(args).await?;
    {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "osc-agent dev-server listening on {}", server.url());
        if let (true, Some(key)) = (server.seed_user_key_generated, server.seed_user_key()) {
            let _ = writeln!(out, "seed user key: {key}");
        }
        let _ = out.flush();
    }
    tokio::select! {
        name = signal => tracing::info!(signal = name, "dev-server received a stop signal"),
        err = server.stopped() => return Err(DevServerError::Serve(err)),
    }
    server.shutdown().await;
    Ok(())
}

/// Starts the dev server inside this process (for `osc-agent demo` and tests).
pub async fn spawn(args: DevServerArgs) -> Result<DevServer, DevServerError> {
    let prepared = prepare(&args)?;
    let listen_error = |source| DevServerError::Listen {
        addr: args.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(listen_error)?;
    let addr = listener.local_addr().map_err(listen_error)?;
    let hub = Arc::clone(&prepared.app.hub);
    let router = http::router(prepared.app);
    let (stop, stopped) = oneshot::channel::<()>();
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        // Events are small writes that must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%addr, "dev-server listening");
    Ok(DevServer {
        addr,
        hub,
        seed_user_key: prepared.seed_user_key,
        seed_user_key_generated: prepared.seed_user_key_generated,
        stop: Some(stop),
        task: Some(task),
    })
}

struct Prepared {
    app: http::App,
    seed_user_key: Option<String>,
    seed_user_key_generated: bool,
}

/// Reads every file named by the flags and builds the server state.
fn prepare(args: &DevServerArgs) -> Result<Prepared, DevServerError> {
    let faults = Faults::new(FaultState {
        drop_every: args.drop_every,
        workers: args.workers,
        queue_size: args.queue_size,
        paused: false,
        cluster_configs: !args.no_cluster_configs,
        unavailable: false,
    })
    .map_err(DevServerError::Faults)?;
    let hub = Arc::new(Hub::new(
        Arc::new(faults),
        Timing {
            ping_interval: args.ping_interval,
            keepalive_after: args.keepalive_after,
        },
    ));

    let api_key = key_from(
        args.api_key_file.as_deref(),
        "--api-key-file",
        args.api_key.as_ref(),
        "--api-key/OSC_DEV_API_KEY",
        1,
    )?;

    let mut store = match &args.data_file {
        Some(path) => Store::open(path).map_err(|reason| DevServerError::DataFile {
            path: path.clone(),
            reason,
        })?,
        None => Store::in_memory(),
    };

    let seeds = match &args.seed {
        Some(path) => seed::load(path).map_err(|reason| DevServerError::Seed {
            path: path.clone(),
            reason,
        })?,
        None => Vec::new(),
    };
    let given_seed_key = key_from(
        args.seed_user_key_file.as_deref(),
        "--seed-user-key-file",
        args.seed_user_key.as_ref(),
        "--seed-user-key/OSC_DEV_SEED_USER_KEY",
        http::USER_KEY_MIN,
    )?;
    let (seed_user_key, seed_user_key_generated) = match (seeds.is_empty(), given_seed_key) {
        (true, _) => (None, false),
        (false, Some(key)) => (Some(key), false),
        (false, None) => (Some(random_user_key()), true),
    };
    if let Some(key) = &seed_user_key {
        let fp = store.fingerprint(key);
        let added = store
            .seed(seeds, &fp)
            .map_err(|e| DevServerError::DataFile {
                path: args.data_file.clone().unwrap_or_default(),
                reason: match e {
                    store::StoreError::Persist(reason) => {
                        format!("cannot save the seeded entries: {reason}")
                    }
                    other => format!("cannot seed: {other:?}"),
                },
            })?;
        tracing::info!(added, total = store.len(), "dev-server seeded");
    }

    Ok(Prepared {
        app: http::App {
            store: Arc::new(Mutex::new(store)),
            hub,
            api_key: api_key.map(Arc::from),
            requests: Arc::new(Requests::default()),
            key_derivation: Arc::new(KeyDerivation::new(args.key_derivation_cost)),
        },
        seed_user_key,
        seed_user_key_generated,
    })
}

/// A key from a file (trimmed) or from the flag/env value, checked for a minimum length.
fn key_from(
    file: Option<&Path>,
    file_flag: &'static str,
    inline: Option<&Secret>,
    inline_flag: &'static str,
    min_chars: usize,
) -> Result<Option<String>, DevServerError> {
    let too_short = format!("the key must be at least {min_chars} characters long");
    if let Some(path) = file {
        let key_file_error = |reason: String| DevServerError::KeyFile {
            flag: file_flag,
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| key_file_error(format!("cannot read: {e}")))?;
        let key = text.trim();
        if key.is_empty() {
            return Err(key_file_error("the file is empty".into()));
        }
        if key.chars().count() < min_chars {
            return Err(key_file_error(too_short));
        }
        return Ok(Some(key.to_owned()));
    }
    match inline.map(|s| s.expose().trim()) {
        None => Ok(None),
        Some(key) if key.chars().count() < min_chars.max(1) => Err(DevServerError::InvalidKey {
            flag: inline_flag,
            reason: if key.is_empty() {
                "the key is empty".into()
            } else {
                too_short
            },
        }),
        Some(key) => Ok(Some(key.to_owned())),
    }
}

/// A random 24-character alphanumeric user key (from the OS CSPRNG).
fn random_user_key() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    crate::backup::random_salt()
        .iter()
        .take(24)
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

#[cfg(unix)]
fn shutdown_signal() -> io::Result<impl Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> io::Result<impl Future<Output = &'static str>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    })
}
