//! Telemetry: Prometheus metrics and the `/status` statistics, updated by the stream and the reconcile
//! loop, read by the admin server. No label or field ever holds a value: only event types, results,
//! counts, times, the subscription id and the content hash.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::source::StreamEvent;
use crate::sync::SyncReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

/// File-watching modes, as shown in `/status.watch` and `osc_agent_watch_mode{mode}`.
pub const WATCH_MODES: [&str; 3] = ["inotify", "polling", "off"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabel {
    via: &'static str,
}

/// How an applied change was first noticed, as in `osc_agent_changes_noticed_total{via}`.
pub const NOTICED_VIA: [&str; 4] = ["stream", "detector", "resync", "on-demand"];

/// Change-detector states, as in `/status.detector.state` and `osc_agent_detector_state{state}`.
pub const DETECTOR_STATES: [&str; 5] = ["starting", "polling", "failing", "unavailable", "off"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
    result: &'static str,
}

struct Metrics {
    registry: Registry,
    stream_connected: Gauge,
    events: Family<TypeLabel, Counter>,
    keepalives: Counter,
    reconnects: Counter,
    syncs: Family<ResultLabel, Counter>,
    sync_duration: Histogram,
    last_sync_success: Gauge<f64, AtomicU64>,
    files_written: Counter,
    dir_swaps: Counter,
    drift_repairs: Counter,
    ready: Gauge,
    stale: Gauge,
    actions: Family<ActionLabel, Counter>,
    breaker: Gauge,
    sync_requests: Family<ResultLabel, Counter>,
    watch_mode: Family<ModeLabel, Gauge>,
    changes_noticed: Family<ViaLabel, Counter>,
    detector_polls: Family<ResultLabel, Counter>,
    detector_changes: Family<ResultLabel, Counter>,
    detector_state: Family<StateLabel, Gauge>,
    detector_interval: Gauge<f64, AtomicU64>,
    detector_last_poll: Gauge<f64, AtomicU64>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            stream_connected: Gauge::default(),
            events: Family::default(),
            keepalives: Counter::default(),
            reconnects: Counter::default(),
            syncs: Family::default(),
            sync_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            last_sync_success: Gauge::default(),
            files_written: Counter::default(),
            dir_swaps: Counter::default(),
            drift_repairs: Counter::default(),
            ready: Gauge::default(),
            stale: Gauge::default(),
            actions: Family::default(),
            breaker: Gauge::default(),
            sync_requests: Family::default(),
            watch_mode: Family::default(),
            changes_noticed: Family::default(),
            detector_polls: Family::default(),
            detector_changes: Family::default(),
            detector_state: Family::default(),
            detector_interval: Gauge::default(),
            detector_last_poll: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "osc_agent_stream_connected",
            "1 while the event stream is connected",
            m.stream_connected.clone(),
        );
        registry.register(
            "osc_agent_events",
            "Change events received, by type",
            m.events.clone(),
        );
        registry.register(
            "osc_agent_keepalives",
            "Keep-alive comments received",
            m.keepalives.clone(),
        );
        registry.register(
            "osc_agent_reconnects",
            "Event stream reconnections",
            m.reconnects.clone(),
        );
        registry.register(
            "osc_agent_syncs",
            "Reconciles, by result (ok, error)",
            m.syncs.clone(),
        );
        registry.register(
            "osc_agent_sync_duration_seconds",
            "Duration of a reconcile",
            m.sync_duration.clone(),
        );
        registry.register(
            "osc_agent_last_sync_success_timestamp_seconds",
            "Unix time of the last successful reconcile",
            m.last_sync_success.clone(),
        );
        registry.register(
            "osc_agent_files_written",
            "Files written",
            m.files_written.clone(),
        );
        registry.register(
            "osc_agent_dir_swaps",
            "New generations swapped into the output directory (content changes)",
            m.dir_swaps.clone(),
        );
        registry.register(
            "osc_agent_drift_repairs",
            "Outputs restored after outside edits",
            m.drift_repairs.clone(),
        );
        registry.register(
            "osc_agent_ready",
            "1 while /readyz answers 200",
            m.ready.clone(),
        );
        registry.register(
            "osc_agent_stale",
            "1 while the outputs hold stale data (from a backup or an earlier run) instead of the server's",
            m.stale.clone(),
        );
        registry.register(
            "osc_agent_actions",
            "Actions run, by action and result (ok, error, skipped)",
            m.actions.clone(),
        );
        registry.register(
            "osc_agent_action_breaker_tripped",
            "1 once the restart-loop breaker stopped all actions",
            m.breaker.clone(),
        );
        registry.register(
            "osc_agent_sync_requests",
            "On-demand reconcile requests (POST /sync, SIGHUP), by result: now, delayed (rate-limited by \
             --sync-min-interval) or coalesced (merged into one already scheduled)",
            m.sync_requests.clone(),
        );
        registry.register(
            "osc_agent_watch_mode",
            "1 for the current file-watching mode (inotify, polling, off), 0 for the others",
            m.watch_mode.clone(),
        );
        registry.register(
            "osc_agent_changes_noticed",
            "Reconciles that changed the outputs, by how the change was first noticed: stream (an \
             event), detector (the metadata poll caught a write the stream missed), resync (periodic, \
             reconnect or retry) or on-demand (POST /sync, SIGHUP)",
            m.changes_noticed.clone(),
        );
        registry.register(
            "osc_agent_detector_polls",
            "Metadata polls of the change detector (GET /cluster/configs), by result (ok, error, \
             unavailable)",
            m.detector_polls.clone(),
        );
        registry.register(
            "osc_agent_detector_changes",
            "Metadata changes the detector found, by whether the stream had announced them (heard) or \
             not (missed)",
            m.detector_changes.clone(),
        );
        registry.register(
            "osc_agent_detector_state",
            "1 for the change detector's current state (starting, polling, failing, unavailable, off)",
            m.detector_state.clone(),
        );
        registry.register(
            "osc_agent_detector_interval_seconds",
            "The change detector's current poll interval (adaptive, --change-poll-interval up to \
             --change-poll-max)",
            m.detector_interval.clone(),
        );
        registry.register(
            "osc_agent_detector_last_poll_timestamp_seconds",
            "Unix time of the change detector's last metadata poll, whatever its result (0: none yet)",
            m.detector_last_poll.clone(),
        );
        for via in NOTICED_VIA {
            let _ = m.changes_noticed.get_or_create(&ViaLabel { via });
        }
        for state in DETECTOR_STATES {
            m.detector_state
                .get_or_create(&StateLabel { state })
                .set(i64::from(state == "off"));
        }
        for mode in WATCH_MODES {
            m.watch_mode
                .get_or_create(&ModeLabel { mode })
                .set(i64::from(mode == "off"));
        }
        Metrics { registry, ..m }
    }
}

#[derive(Default)]
struct Status {
    connected: bool,
    subscription_id: Option<String>,
    connected_at: Option<SystemTime>,
    last_event_at: Option<SystemTime>,
    events_by_type: BTreeMap<&'static str, u64>,
    keepalives: u64,
    reconnections: u64,
    stream_errors: u64,
    last_stream_error: Option<String>,
    ever_connected: bool,
    gave_up: bool,
    ready: bool,
    last_success: Option<(Instant, SystemTime)>,
    last_attempt: Option<SystemTime>,
    last_error: Option<String>,
    syncs_ok: u64,
    syncs_failed: u64,
    applied_hash: Option<String>,
    config_hash: Option<String>,
    keys: usize,
    heartbeat: Option<Instant>,
    loop_exited: bool,
    stale: Option<String>,
    action_results: BTreeMap<&'static str, (String, String, SystemTime)>,
    action_runs: u64,
    action_pending: bool,
    breaker: Option<String>,
    watch: Option<(&'static str, Option<String>)>,
    /// The loop is idle until this instant (no heartbeat is due before it).
    idle_until: Option<Instant>,
    detector: DetectorStatus,
    changes_noticed: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct DetectorStatus {
    state: Option<&'static str>,
    detail: Option<String>,
    interval: Option<Duration>,
    last_poll_at: Option<SystemTime>,
    last_change_at: Option<SystemTime>,
    polls: u64,
    errors: u64,
    heard: u64,
    missed: u64,
}

/// Shared by the stream, the loop and the admin server.
pub struct Telemetry {
    metrics: Metrics,
    status: Mutex<Status>,
    started: (Instant, SystemTime),
    environment: String,
    ready_when_stale: bool,
}

/// Liveness verdict.
#[derive(Debug, PartialEq, Eq)]
pub struct Health {
    pub ok: bool,
    pub reason: String,
}

fn rfc3339(t: Option<SystemTime>) -> serde_json::Value {
    t.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map_or(serde_json::Value::Null, |ts| json!(ts.to_string()))
}

impl Telemetry {
    pub fn new(environment: &str, ready_when_stale: bool) -> Telemetry {
        Telemetry {
            metrics: Metrics::new(),
            status: Mutex::new(Status::default()),
            started: (Instant::now(), SystemTime::now()),
            environment: environment.to_owned(),
            ready_when_stale,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        let mut guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Record what the stream reported.
    pub fn on_stream(&self, event: &StreamEvent) {
        let m = &self.metrics;
        let now = SystemTime::now();
        self.with(|s| match event {
            StreamEvent::Connected { subscription_id } => {
                if s.ever_connected {
                    s.reconnections += 1;
                    m.reconnects.inc();
                }
                s.ever_connected = true;
                s.connected = true;
                s.subscription_id = subscription_id.clone();
                s.connected_at = Some(now);
                s.last_event_at = Some(now);
                *s.events_by_type.entry("connected").or_default() += 1;
                m.events
                    .get_or_create(&TypeLabel {
                        r#type: "connected",
                    })
                    .inc();
                m.stream_connected.set(1);
            }
            StreamEvent::Change { kind, .. } => {
                s.last_event_at = Some(now);
                *s.events_by_type.entry(kind.as_str()).or_default() += 1;
                m.events
                    .get_or_create(&TypeLabel {
                        r#type: kind.as_str(),
                    })
                    .inc();
            }
            StreamEvent::KeepAlive => {
                s.keepalives += 1;
                m.keepalives.inc();
            }
            StreamEvent::Disconnected { reason } => {
                s.connected = false;
                s.stream_errors += 1;
                s.last_stream_error = Some(reason.clone());
                m.stream_connected.set(0);
            }
            StreamEvent::GaveUp { .. } => {
                s.connected = false;
                s.gave_up = true;
                m.stream_connected.set(0);
            }
        });
    }

    pub fn on_sync_ok(&self, report: &SyncReport, took: Duration) {
        let m = &self.metrics;
        m.syncs.get_or_create(&ResultLabel { result: "ok" }).inc();
        m.sync_duration.observe(took.as_secs_f64());
        let now = SystemTime::now();
        m.last_sync_success.set(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        m.files_written.inc_by(report.files_written as u64);
        if report.dir_swapped {
            m.dir_swaps.inc();
        }
        m.ready.set(1);
        m.stale.set(0);
        self.with(|s| {
            s.ready = true;
            s.stale = None;
            s.syncs_ok += 1;
            s.last_success = Some((Instant::now(), now));
            s.last_attempt = Some(now);
            s.last_error = None;
            s.applied_hash = Some(report.hash.clone());
            s.config_hash = Some(report.config_hash.clone());
            s.keys = report.keys;
        });
    }

    pub fn on_sync_error(&self, error: &str, took: Duration) {
        let m = &self.metrics;
        m.syncs
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
        m.sync_duration.observe(took.as_secs_f64());
        self.with(|s| {
            s.syncs_failed += 1;
            s.last_attempt = Some(SystemTime::now());
            s.last_error = Some(error.to_owned());
        });
    }

    /// Outputs put back from memory after an outside edit.
    pub fn on_drift_repair(&self, files_written: usize) {
        self.metrics.drift_repairs.inc();
        self.metrics.files_written.inc_by(files_written as u64);
    }

    pub fn heartbeat(&self) {
        self.with(|s| {
            s.heartbeat = Some(Instant::now());
            s.idle_until = None;
        });
    }

    /// The loop sleeps until `wake` (its next deadline) unless something happens: the liveness check
    /// counts a stall from then on, not from the last heartbeat.
    pub fn idle_until(&self, wake: Instant) {
        self.with(|s| {
            s.heartbeat = Some(Instant::now());
            s.idle_until = Some(wake);
        });
    }

    /// A reconcile that changed the outputs, first noticed `via` (one of [`NOTICED_VIA`]).
    pub fn on_change_noticed(&self, via: &'static str) {
        self.metrics
            .changes_noticed
            .get_or_create(&ViaLabel { via })
            .inc();
        self.with(|s| *s.changes_noticed.entry(via).or_default() += 1);
    }

    /// The change detector's state (one of [`DETECTOR_STATES`]) and why, when not the normal one.
    pub fn set_detector_state(&self, state: &'static str, detail: Option<String>) {
        for st in DETECTOR_STATES {
            self.metrics
                .detector_state
                .get_or_create(&StateLabel { state: st })
                .set(i64::from(st == state));
        }
        self.with(|s| {
            s.detector.state = Some(state);
            s.detector.detail = detail;
        });
    }

    /// One metadata poll: `result` is ok, error or unavailable; `interval` the delay to the next one.
    pub fn on_detector_poll(&self, result: &'static str, interval: Duration) {
        self.metrics
            .detector_polls
            .get_or_create(&ResultLabel { result })
            .inc();
        self.metrics.detector_interval.set(interval.as_secs_f64());
        self.metrics.detector_last_poll.set(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        self.with(|s| {
            s.detector.polls += 1;
            s.detector.errors += u64::from(result == "error");
            s.detector.last_poll_at = Some(SystemTime::now());
            s.detector.interval = Some(interval);
        });
    }

    /// The detector found changed metadata; `missed`: the stream had not announced all of it.
    pub fn on_detector_change(&self, missed: bool) {
        let result = if missed { "missed" } else { "heard" };
        self.metrics
            .detector_changes
            .get_or_create(&ResultLabel { result })
            .inc();
        self.with(|s| {
            s.detector.last_change_at = Some(SystemTime::now());
            if missed {
                s.detector.missed += 1;
            } else {
                s.detector.heard += 1;
            }
        });
    }

    pub fn loop_exited(&self) {
        self.with(|s| s.loop_exited = true);
    }

    /// The outputs hold stale data (`Some(description)`), until the next successful sync.
    pub fn set_stale(&self, description: String) {
        self.metrics.stale.set(1);
        if self.ready_when_stale {
            self.metrics.ready.set(1);
        }
        self.with(|s| s.stale = Some(description));
    }

    /// One action finished (`result`: ok, error, skipped); `detail` is a value-free summary.
    pub fn on_action(&self, action: &'static str, result: &'static str, detail: &str) {
        self.metrics
            .actions
            .get_or_create(&ActionLabel { action, result })
            .inc();
        self.with(|s| {
            if result != "skipped" {
                s.action_runs += 1;
            }
            s.action_results.insert(
                action,
                (result.to_owned(), detail.to_owned(), SystemTime::now()),
            );
        });
    }

    /// Whether a changed generation waits for (or is in) an action run.
    pub fn set_action_pending(&self, pending: bool) {
        self.with(|s| s.action_pending = pending);
    }

    pub fn on_breaker_tripped(&self, reason: &str) {
        self.metrics.breaker.set(1);
        self.with(|s| s.breaker = Some(reason.to_owned()));
    }

    /// One on-demand reconcile request (`result`: now, delayed, coalesced).
    pub fn on_sync_request(&self, result: &'static str) {
        self.metrics
            .sync_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The file-watching mode (one of [`WATCH_MODES`]) and why, when not the normal one.
    pub fn set_watch(&self, mode: &'static str, detail: Option<String>) {
        for m in WATCH_MODES {
            self.metrics
                .watch_mode
                .get_or_create(&ModeLabel { mode: m })
                .set(i64::from(m == mode));
        }
        self.with(|s| s.watch = Some((mode, detail)));
    }

    /// Ready after a successful sync, or while serving stale files if `--ready-when-stale`.
    pub fn ready(&self) -> bool {
        self.with(|s| s.ready || (self.ready_when_stale && s.stale.is_some()))
    }

    /// Why not ready, for `/readyz`.
    pub fn not_ready_reason(&self) -> String {
        self.with(|s| match &s.stale {
            Some(stale) => format!("serving {stale} and --ready-when-stale is false"),
            None => match &s.last_error {
                Some(e) => format!("no successful sync yet: {e}"),
                None => "no successful sync yet".to_owned(),
            },
        })
    }

    /// Liveness: the loop is alive, and the stream is connected or the last success is recent enough.
    pub fn health(&self, staleness: Duration, stall: Duration) -> Health {
        self.with(|s| {
            let bad = |reason: String| Health { ok: false, reason };
            if s.loop_exited {
                return bad("the reconcile loop has stopped".into());
            }
            // Idle until a known deadline: overdue only past it.
            let beat = match (s.heartbeat, s.idle_until) {
                (_, Some(wake)) => Instant::now().saturating_duration_since(wake),
                (Some(b), None) => b.elapsed(),
                (None, None) => self.started.0.elapsed(),
            };
            if beat > stall {
                return bad(format!(
                    "the reconcile loop has not run for {}s",
                    beat.as_secs()
                ));
            }
            if s.connected {
                return Health {
                    ok: true,
                    reason: "event stream connected".into(),
                };
            }
            let since = s
                .last_success
                .map_or(self.started.0.elapsed(), |(i, _)| i.elapsed());
            if since <= staleness {
                return Health {
                    ok: true,
                    reason: format!(
                        "event stream down, last successful sync {}s ago",
                        since.as_secs()
                    ),
                };
            }
            bad(format!(
                "event stream down and no successful sync for {}s (staleness bound {}s){}",
                since.as_secs(),
                staleness.as_secs(),
                s.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ))
        })
    }

    /// Prometheus text exposition.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry).is_err() {
            out.clear();
        }
        out
    }

    /// `/status` document.
    pub fn status_json(&self) -> serde_json::Value {
        self.with(|s| {
            let received: u64 = s.events_by_type.values().sum();
            json!({
                "environment": self.environment,
                "ready": s.ready || (self.ready_when_stale && s.stale.is_some()),
                "stale": s.stale,
                "uptime_seconds": self.started.0.elapsed().as_secs_f64(),
                "started_at": rfc3339(Some(self.started.1)),
                "watch": s.watch.as_ref().map_or("off", |(m, _)| *m),
                "watch_detail": s.watch.as_ref().and_then(|(_, d)| d.clone()),
                "detector": {
                    "state": s.detector.state.unwrap_or("off"),
                    "detail": s.detector.detail,
                    "interval_ms": s.detector.interval.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    "last_poll_at": rfc3339(s.detector.last_poll_at),
                    "last_change_at": rfc3339(s.detector.last_change_at),
                    "polls": s.detector.polls,
                    "errors": s.detector.errors,
                    "changes_heard_by_stream": s.detector.heard,
                    "changes_missed_by_stream": s.detector.missed,
                },
                "changes_noticed": NOTICED_VIA.iter()
                    .map(|v| (v.to_string(), json!(s.changes_noticed.get(v).copied().unwrap_or(0))))
                    .collect::<serde_json::Map<_, _>>(),
                "stream": {
                    "connected": s.connected,
                    "subscription_id": s.subscription_id,
                    "connected_at": rfc3339(s.connected_at),
                    "last_event_at": rfc3339(s.last_event_at),
                    "events_received": received,
                    "events_by_type": s.events_by_type,
                    "keepalives_received": s.keepalives,
                    "reconnections": s.reconnections,
                    "errors": s.stream_errors,
                    "last_error": s.last_stream_error,
                    "gave_up": s.gave_up,
                },
                "actions": {
                    "runs": s.action_runs,
                    "pending": s.action_pending,
                    "last": s.action_results.iter().map(|(k, (r, d, t))| (k.to_string(), json!({
                        "result": r, "detail": d, "at": rfc3339(Some(*t)),
                    }))).collect::<serde_json::Map<_, _>>(),
                    "breaker_tripped": s.breaker.is_some(),
                    "breaker": s.breaker,
                },
                "sync": {
                    "last_success_at": rfc3339(s.last_success.map(|(_, t)| t)),
                    "last_attempt_at": rfc3339(s.last_attempt),
                    "last_error": s.last_error,
                    "succeeded": s.syncs_ok,
                    "failed": s.syncs_failed,
                    "keys": s.keys,
                    "applied_hash": s.applied_hash,
                    "config_hash": s.config_hash,
                },
            })
        })
    }
}
