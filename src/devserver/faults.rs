//! Fault switches that reproduce the ways the upstream event stream loses events.
//!
//! All of them can be set at start (flags) and changed at runtime (`POST /_dev/faults`), as can
//! the presence of `GET /cluster/configs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// A snapshot of every fault switch, as answered by `GET /_dev/faults`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultState {
    /// Drop every Nth published event before fan-out (0 = off). Models events lost anywhere
    /// between the write and the subscriber.
    pub drop_every: u64,
    /// Number of simulated worker processes (1 or more). The upstream runs several uvicorn
    /// workers sharing one listening socket, each with its own in-memory subscriber list: a
    /// subscriber only sees the writes its own worker handled. The kernel picks the worker per
    /// connection; the dev server models that **round-robin**, deterministically: subscription
    /// number `s` (counted from 0 since start) belongs to worker `s % workers`, and successful
    /// write number `w` (POST, PUT, DELETE; counted from 0) is handled by worker `w % workers`, as
    /// if each write came on a new connection. Both are recomputed when `workers` changes. The
    /// `connected` event is unaffected, and the store (hence `GET /configs` and
    /// `GET /cluster/configs`) is shared by all workers, as upstream's database is.
    pub workers: u64,
    /// Capacity of each subscription's queue. Upstream uses an `asyncio.Queue(maxsize=100)` and
    /// `put_nowait`: when full, the **newest** event is silently dropped. Applies to subscriptions
    /// opened after the change.
    pub queue_size: u64,
    /// When true, no stream drains its queue (a deterministic "slow reader"): queues fill and
    /// overflow. Pings and keep-alive comments still flow.
    pub paused: bool,
    /// Whether `GET /cluster/configs` exists (default true). When false it answers 404
    /// `{"detail":"Not Found"}`, like a server without the route.
    pub cluster_configs: bool,
    /// When true, every route but `/_dev/*` answers `503 {"detail":"Service Unavailable"}` (a server
    /// behind a proxy with no healthy backend), and turning it on closes every open stream. Lets a
    /// test start a client against a server that is down, then bring it back at the same address.
    #[serde(default)]
    pub unavailable: bool,
}

/// A partial update, as accepted by `POST /_dev/faults`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    pub drop_every: Option<u64>,
    pub workers: Option<u64>,
    pub queue_size: Option<u64>,
    pub paused: Option<bool>,
    pub cluster_configs: Option<bool>,
    pub unavailable: Option<bool>,
}

/// The live fault switches, shared by the HTTP handlers and every stream.
#[derive(Debug)]
pub struct Faults {
    drop_every: AtomicU64,
    workers: AtomicU64,
    queue_size: AtomicU64,
    paused: watch::Sender<bool>,
    cluster_configs: AtomicBool,
    unavailable: AtomicBool,
}

impl Faults {
    pub fn new(initial: FaultState) -> Result<Self, String> {
        validate(&initial)?;
        Ok(Self {
            drop_every: AtomicU64::new(initial.drop_every),
            workers: AtomicU64::new(initial.workers),
            queue_size: AtomicU64::new(initial.queue_size),
            paused: watch::Sender::new(initial.paused),
            cluster_configs: AtomicBool::new(initial.cluster_configs),
            unavailable: AtomicBool::new(initial.unavailable),
        })
    }

    pub fn snapshot(&self) -> FaultState {
        FaultState {
            drop_every: self.drop_every.load(Ordering::SeqCst),
            workers: self.workers.load(Ordering::SeqCst),
            queue_size: self.queue_size.load(Ordering::SeqCst),
            paused: *self.paused.borrow(),
            cluster_configs: self.cluster_configs.load(Ordering::SeqCst),
            unavailable: self.unavailable.load(Ordering::SeqCst),
        }
    }

    /// Applies `update` atomically with respect to validation: nothing changes if any field is bad.
    pub fn apply(&self, update: FaultUpdate) -> Result<FaultState, String> {
        let current = self.snapshot();
        let next = FaultState {
            drop_every: update.drop_every.unwrap_or(current.drop_every),
            workers: update.workers.unwrap_or(current.workers),
            queue_size: update.queue_size.unwrap_or(current.queue_size),
            paused: update.paused.unwrap_or(current.paused),
            cluster_configs: update.cluster_configs.unwrap_or(current.cluster_configs),
            unavailable: update.unavailable.unwrap_or(current.unavailable),
        };
        validate(&next)?;
        self.drop_every.store(next.drop_every, Ordering::SeqCst);
        self.workers.store(next.workers, Ordering::SeqCst);
        self.queue_size.store(next.queue_size, Ordering::SeqCst);
        self.cluster_configs
            .store(next.cluster_configs, Ordering::SeqCst);
        self.unavailable.store(next.unavailable, Ordering::SeqCst);
        self.paused.send_if_modified(|paused| {
            let changed = *paused != next.paused;
            *paused = next.paused;
            changed
        });
        Ok(next)
    }

    /// Whether the server plays down (see [`FaultState::unavailable`]).
    pub fn unavailable(&self) -> bool {
        self.unavailable.load(Ordering::SeqCst)
    }

    /// A receiver that observes `paused` changes (each stream holds one).
    pub fn watch_paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }
}

fn validate(state: &FaultState) -> Result<(), String> {
    if state.workers == 0 {
        return Err("workers must be at least 1".into());
    }
    if state.queue_size == 0 || state.queue_size > 1_000_000 {
        return Err("queue_size must be between 1 and 1000000".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> FaultState {
        FaultState {
            drop_every: 0,
            workers: 1,
            queue_size: 100,
            paused: false,
            cluster_configs: true,
            unavailable: false,
        }
    }

    #[test]
    fn partial_updates_and_validation() {
        let faults = Faults::new(defaults()).unwrap();
        let mut paused = faults.watch_paused();
        let state = faults
            .apply(FaultUpdate {
                workers: Some(4),
                paused: Some(true),
                cluster_configs: Some(false),
                ..FaultUpdate::default()
            })
            .unwrap();
        assert_eq!((state.workers, state.cluster_configs), (4, false));
        assert_eq!(faults.snapshot(), state);
        assert!(state.paused && paused.has_changed().unwrap());
        assert!(*paused.borrow_and_update());
        let err = faults.apply(FaultUpdate {
            drop_every: Some(3),
            queue_size: Some(0),
            ..FaultUpdate::default()
        });
        assert!(err.is_err());
        assert_eq!(
            faults.snapshot().drop_every,
            0,
            "a rejected update changes nothing"
        );
        assert!(
            Faults::new(FaultState {
                workers: 0,
                ..defaults()
            })
            .is_err()
        );
    }
}
