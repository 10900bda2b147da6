//! On-demand reconciles (`POST /sync`, SIGHUP), rate-limited.
//!
//! The admin port is unauthenticated and every reconcile costs the server a full list call (~80 ms of
//! key derivation upstream), so on-demand reconciles start at most once per `--sync-min-interval`: a
//! request within that time of the previous on-demand reconcile is scheduled for the first allowed
//! moment, and any further request until then is coalesced into it. Each request is counted in
//! `osc_agent_sync_requests_total{result}`: `now`, `delayed` or `coalesced`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::telemetry::Telemetry;

/// How a request was scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Runs at once.
    Now,
    /// Runs once `--sync-min-interval` has passed since the previous reconcile.
    Delayed,
    /// Merged into a reconcile already scheduled.
    Coalesced,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Now => "now",
            Outcome::Delayed => "delayed",
            Outcome::Coalesced => "coalesced",
        }
    }
}

/// When an accepted request will be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub outcome: Outcome,
    /// The time the reconcile is due (it starts as soon as the loop is free after that).
    pub at: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Start of the last on-demand reconcile.
    last_run: Option<Instant>,
    pending: Option<(Instant, &'static str)>,
    closed: bool,
}

/// Shared by the admin server, the signal handler and the live loop.
pub struct OnDemand {
    min_interval: Duration,
    state: Mutex<State>,
    wake: Notify,
    telemetry: Arc<Telemetry>,
}

impl OnDemand {
    /// At most one on-demand reconcile per `min_interval` (counted from start to start).
    pub fn new(min_interval: Duration, telemetry: Arc<Telemetry>) -> OnDemand {
        OnDemand {
            min_interval,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            telemetry,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Ask for a reconcile (`reason` is logged by the loop). `None` once the loop has stopped.
    pub fn request(&self, reason: &'static str) -> Option<Scheduled> {
        let scheduled = self.request_at(Instant::now(), reason)?;
        self.telemetry.on_sync_request(scheduled.outcome.as_str());
        self.wake.notify_one();
        Some(scheduled)
    }

    fn request_at(&self, now: Instant, reason: &'static str) -> Option<Scheduled> {
        let min_interval = self.min_interval;
        self.with(|s| {
            if s.closed {
                return None;
            }
            if let Some((at, _)) = s.pending {
                return Some(Scheduled {
                    outcome: Outcome::Coalesced,
                    at,
                });
            }
            let allowed = s.last_run.map_or(now, |t| (t + min_interval).max(now));
            s.pending = Some((allowed, reason));
            Some(Scheduled {
                outcome: if allowed <= now {
                    Outcome::Now
                } else {
                    Outcome::Delayed
                },
                at: allowed,
            })
        })
    }

    /// The reconcile asked for starts now: it serves every request made before.
    pub(super) fn started(&self, now: Instant) {
        self.with(|s| {
            s.last_run = Some(now);
            s.pending = None;
        });
    }

    /// When the pending request is due, if there is one.
    pub fn due_at(&self) -> Option<Instant> {
        self.with(|s| s.pending.map(|(at, _)| at))
    }

    /// The reason of a request due at `now` (it stays pending until [`OnDemand::started`]).
    pub(super) fn due(&self, now: Instant) -> Option<&'static str> {
        self.with(|s| s.pending.filter(|(at, _)| *at <= now).map(|(_, r)| r))
    }

    /// Completes when a request arrived since the last call (or at once if one is unseen).
    pub(super) async fn requested(&self) {
        self.wake.notified().await
    }

    /// The loop has stopped: later requests are refused.
    pub(super) fn close(&self) {
        self.with(|s| s.closed = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_reconcile_per_interval_the_rest_coalesced() {
        let ms = Duration::from_millis;
        let d = OnDemand::new(ms(5000), Arc::new(Telemetry::new("e", true)));
        let t0 = Instant::now();
        let first = d.request_at(t0, "a").unwrap();
        assert_eq!((first.outcome, first.at), (Outcome::Now, t0));
        assert_eq!(d.due(t0), Some("a"));
        d.started(t0);
        assert_eq!(d.due_at(), None);

        let second = d.request_at(t0 + ms(100), "b").unwrap();
        assert_eq!(
            (second.outcome, second.at),
            (Outcome::Delayed, t0 + ms(5000))
        );
        let third = d.request_at(t0 + ms(200), "c").unwrap();
        assert_eq!(
            (third.outcome, third.at),
            (Outcome::Coalesced, t0 + ms(5000))
        );
        assert_eq!(d.due(t0 + ms(4999)), None);
        assert_eq!(d.due(t0 + ms(5000)), Some("b"));

        d.started(t0 + ms(5000));
        assert_eq!(d.due_at(), None);
        let fourth = d.request_at(t0 + ms(6000), "d").unwrap();
        assert_eq!(
            (fourth.outcome, fourth.at),
            (Outcome::Delayed, t0 + ms(10_000))
        );
        d.started(t0 + ms(10_000));
        let fifth = d.request_at(t0 + ms(16_000), "e").unwrap();
        assert_eq!((fifth.outcome, fifth.at), (Outcome::Now, t0 + ms(16_000)));

        d.close();
        assert_eq!(d.request_at(t0 + ms(20_000), "e"), None);
    }
}
