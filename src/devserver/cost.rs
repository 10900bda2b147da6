//! What the server spends: per-route request counters and the optional key-derivation cost.
//!
//! Upstream derives the value-encryption key from `X-User-Key` with PBKDF2-HMAC-SHA256 (480,000
//! rounds) **on every request that carries it** (`/configs*`, `/backup`): ~70-80 ms of CPU each,
//! while `/cluster/configs`, `/sse/*` and `/health` cost almost nothing. `--key-derivation-cost`
//! reproduces that cost model so benchmarks and fleet tests see it; `GET /_dev/stats` reports the
//! request counts and the CPU time spent deriving.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::HumanDuration;

/// PBKDF2-HMAC-SHA256 rounds of the upstream's key derivation.
pub const UPSTREAM_ROUNDS: u32 = 480_000;
/// Fixed salt of the simulated derivation (upstream reads a 64-byte salt file).
const SALT: [u8; 64] = *b"osc-agent dev-server: fixed 64-byte salt of the key derivation..";
/// Longest accepted busy-wait cost.
pub const MAX_SPIN: Duration = Duration::from_secs(10);

/// `--key-derivation-cost`: what each request carrying `X-User-Key` costs the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyDerivationCost {
    /// No cost (the default).
    #[default]
    Off,
    /// A real PBKDF2-HMAC-SHA256 of the request's user key, 480,000 rounds, fixed salt. Measured
    /// CPU per derivation: ~75 ms in a release build (upstream: ~70-80 ms); ~1.35 s in a debug or
    /// test build (the generic HMAC/digest code is monomorphised here at opt-level 0).
    Pbkdf2,
    /// A busy-wait consuming this much CPU time of one thread (1 ms to 10 s).
    Spin(Duration),
}

impl FromStr for KeyDerivationCost {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "off" | "none" | "0" => return Ok(Self::Off),
            "pbkdf2" => return Ok(Self::Pbkdf2),
            _ => {}
        }
        let duration = text.parse::<HumanDuration>().map_err(|_| {
            format!("invalid key-derivation cost '{text}': expected off, pbkdf2 or a duration such as 80ms")
        })?;
        match duration.0 {
            d if d.is_zero() => Ok(Self::Off),
            d if d < Duration::from_millis(1) || d > MAX_SPIN => Err(format!(
                "key-derivation cost '{text}' must be between 1ms and 10s"
            )),
            d => Ok(Self::Spin(d)),
        }
    }
}

impl fmt::Display for KeyDerivationCost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Pbkdf2 => f.write_str("pbkdf2"),
            Self::Spin(d) => write!(f, "{}", HumanDuration(*d)),
        }
    }
}

/// Applies [`KeyDerivationCost`] and accounts for it.
#[derive(Debug)]
pub struct KeyDerivation {
    cost: KeyDerivationCost,
    derivations: AtomicU64,
    cpu_micros: AtomicU64,
}

impl KeyDerivation {
    pub fn new(cost: KeyDerivationCost) -> Self {
        Self {
            cost,
            derivations: AtomicU64::new(0),
            cpu_micros: AtomicU64::new(0),
        }
    }

    /// Pays one derivation for `user_key` on a blocking thread (so it holds a CPU like the
    /// upstream's, without stalling the async workers). Accounted even if the caller goes away
    /// meanwhile: the CPU is spent either way.
    pub async fn derive(self: &std::sync::Arc<Self>, user_key: &str) {
        if self.cost == KeyDerivationCost::Off {
            return;
        }
        let this = std::sync::Arc::clone(self);
        let user_key = user_key.to_owned();
        let task = tokio::task::spawn_blocking(move || {
            let spent = match this.cost {
                KeyDerivationCost::Off => return,
                KeyDerivationCost::Pbkdf2 => {
                    measured(|| pbkdf2(user_key.as_bytes(), &SALT, UPSTREAM_ROUNDS))
                }
                KeyDerivationCost::Spin(cost) => spin(cost),
            };
            let micros = u64::try_from(spent.as_micros()).unwrap_or(u64::MAX);
            this.cpu_micros.fetch_add(micros, Ordering::SeqCst);
            this.derivations.fetch_add(1, Ordering::SeqCst);
        });
        if task.await.is_err() {
            tracing::warn!("dev-server: a simulated key derivation did not complete");
        }
    }

    /// Derivations completed so far.
    pub fn derivations(&self) -> u64 {
        self.derivations.load(Ordering::SeqCst)
    }

    /// CPU time spent in derivations so far, in milliseconds (microsecond resolution).
    pub fn cpu_ms(&self) -> f64 {
        self.cpu_micros.load(Ordering::SeqCst) as f64 / 1000.0
    }
}

/// PBKDF2-HMAC-SHA256, 32-byte output (a Fernet key's size).
fn pbkdf2(user_key: &[u8], salt: &[u8], rounds: u32) -> [u8; 32] {
    pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(user_key, salt, rounds)
}

/// Runs `work` and returns the CPU time it took on this thread (wall time where the thread's
/// CPU clock is not available).
fn measured<T>(work: impl FnOnce() -> T) -> Duration {
    let (cpu, wall) = (thread_cpu(), Instant::now());
    std::hint::black_box(work());
    match (cpu, thread_cpu()) {
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => wall.elapsed(),
    }
}

/// Busy-waits until this thread has used `cost` of CPU time (of wall time where the thread's
/// CPU clock is not available); returns the time used as measured.
fn spin(cost: Duration) -> Duration {
    let wall = Instant::now();
    let Some(start) = thread_cpu() else {
        while wall.elapsed() < cost {
            std::hint::spin_loop();
        }
        return wall.elapsed();
    };
    loop {
        // CPU time never runs ahead of wall time: spin for the remainder on the wall clock (no
        // system calls), then check how much CPU that really was (less if the thread was
        // preempted meanwhile).
        let spent = match thread_cpu() {
            Some(now) => now.saturating_sub(start),
            None => wall.elapsed(),
        };
        if spent >= cost {
            return spent;
        }
        let until = Instant::now() + (cost - spent);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
}

/// CPU time used by the calling thread so far: the first field of Linux's
/// `/proc/thread-self/schedstat` (nanoseconds, brought up to date at every scheduler tick, so
/// 1-10 ms behind at worst). `None` where it cannot be read.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// A route whose requests are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /configs`
    List,
    /// `GET /configs/{key}`
    Get,
    /// `POST /configs`
    Create,
    /// `PUT /configs/{key}`
    Update,
    /// `DELETE /configs/{key}`
    Delete,
    /// `POST /backup`
    Backup,
    /// `GET /cluster/configs`
    ClusterConfigs,
    /// `GET /sse/subscribe`
    Subscribe,
}

/// Requests received per route, whatever their answer (errors and the 404 of a disabled
/// `/cluster/configs` included), as `"requests"` of `GET /_dev/stats`.
#[derive(Debug, Default)]
pub struct Requests {
    list: AtomicU64,
    get: AtomicU64,
    create: AtomicU64,
    update: AtomicU64,
    delete: AtomicU64,
    backup: AtomicU64,
    cluster_configs: AtomicU64,
    subscribe: AtomicU64,
}

/// A snapshot of [`Requests`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub list: u64,
    pub get: u64,
    pub create: u64,
    pub update: u64,
    pub delete: u64,
    pub backup: u64,
    pub cluster_configs: u64,
    pub subscribe: u64,
}

impl Requests {
    pub fn count(&self, route: Route) {
        let counter = match route {
            Route::List => &self.list,
            Route::Get => &self.get,
            Route::Create => &self.create,
            Route::Update => &self.update,
            Route::Delete => &self.delete,
            Route::Backup => &self.backup,
            Route::ClusterConfigs => &self.cluster_configs,
            Route::Subscribe => &self.subscribe,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    pub fn snapshot(&self) -> RequestCounts {
        let load = |c: &AtomicU64| c.load(Ordering::SeqCst);
        RequestCounts {
            list: load(&self.list),
            get: load(&self.get),
            create: load(&self.create),
            update: load(&self.update),
            delete: load(&self.delete),
            backup: load(&self.backup),
            cluster_configs: load(&self.cluster_configs),
            subscribe: load(&self.subscribe),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_flag_values() {
        let parse = |s: &str| s.parse::<KeyDerivationCost>();
        assert_eq!(parse("off"), Ok(KeyDerivationCost::Off));
        assert_eq!(parse("0"), Ok(KeyDerivationCost::Off));
        assert_eq!(parse("0ms"), Ok(KeyDerivationCost::Off));
        assert_eq!(parse("pbkdf2"), Ok(KeyDerivationCost::Pbkdf2));
        assert_eq!(
            parse("80ms"),
            Ok(KeyDerivationCost::Spin(Duration::from_millis(80)))
        );
        assert!(parse("11s").is_err() && parse("0.5ms").is_err() && parse("fast").is_err());
        for text in ["off", "pbkdf2", "80ms", "2s"] {
            assert_eq!(parse(text).map(|c| c.to_string()), Ok(text.to_owned()));
        }
    }

    #[test]
    fn pbkdf2_is_hmac_sha256() {
        // RFC 7914 section 11 (PBKDF2-HMAC-SHA-256, "passwd"/"salt", 1 round), first 32 bytes.
        assert_eq!(
            hex::encode(pbkdf2(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
        // RFC 7914: "Password"/"NaCl", 80,000 rounds (a sixth of the upstream's), first 32 bytes.
        assert_eq!(
            hex::encode(pbkdf2(b"Password", b"NaCl", 80_000)),
            "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56"
        );
    }

    #[test]
    fn spin_holds_a_cpu_for_its_cost() {
        #[cfg(target_os = "linux")]
        assert!(thread_cpu().is_some(), "the thread CPU clock is readable");
        let cost = Duration::from_millis(15);
        let wall = Instant::now();
        let spent = spin(cost);
        // CPU time cannot exceed wall time: an independent check that the CPU was really held.
        assert!(wall.elapsed() >= cost && spent >= cost, "{spent:?}");
    }
}
