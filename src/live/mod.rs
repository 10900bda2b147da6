//! The live loop: keep the outputs equal to the server's state, despite a lossy event stream.
//!
//! Start: subscribe first, and reconcile once when the stream is connected (and the change detector
//! has its baseline), so a start costs one list call and no write between the two is missed. Every
//! reconnect → full reconcile. Change hints (stream events, and writes the stream missed, found by the
//! change detector: see [`crate::source::detector`]) → coalesced (see [`debounce`]) → one list call.
//! A jittered periodic resync is the last net. Between deadlines the loop sleeps: no timer wakes it. SIGHUP and `POST /sync` reconcile on demand, at most
//! once per `--sync-min-interval` (see [`ondemand`]). Outputs edited by someone else are restored from
//! the last render kept in memory (no server call). On SIGTERM/SIGINT the loop stops taking hints; a
//! write in progress abandons its new generation between two files (see [`crate::sink::abort_writes`]).
//!
//! Backoff holds on every path: while a reconcile is failing, hints, reconnects and periodic resyncs
//! wait for the scheduled retry (it reads everything anyway); a credential file change and a stream
//! reconnect may each bring that retry forward once per failure streak, never repeatedly. Repeated
//! drift repairs back off too.

mod debounce;
mod ondemand;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::action::runner::ActionQueue;
use crate::backoff::Backoff;
use crate::config::Settings;
use crate::render::Rendered;
use crate::run::{log_failure, log_report};
use crate::source::detector::{self, Announcements, DetectorEvent, DetectorOptions};
use crate::source::{ChangeKind, FailureClass, StreamEvent, StreamOptions, stream};
use crate::state::Filter;
use crate::sync::{Agent, SyncError};
use crate::telemetry::Telemetry;
use debounce::Debounce;
pub use ondemand::{OnDemand, Outcome, Scheduled};
pub use watch::POLL_INTERVAL;

/// A reason to look at the outputs again, from the file watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A managed output changed on disk.
    Drift,
    /// A credential file changed.
    Credentials,
}

/// Handles the loop needs from its surroundings.
pub struct LiveContext {
    pub telemetry: Arc<Telemetry>,
    /// Where changed generations go, when actions are configured.
    pub actions: Option<ActionQueue>,
    /// On-demand reconciles (`POST /sync`, SIGHUP).
    pub on_demand: Arc<OnDemand>,
    pub cancel: CancellationToken,
}

/// Longest wait at start for the stream's `connected` event (and the detector's baseline) before the
/// first reconcile runs anyway.
pub const START_WAIT: Duration = Duration::from_secs(5);

/// Detector-triggered reconciles in a row that change nothing before further ones are spaced out.
const DETECTOR_NOOPS_BEFORE_HOLD: u32 = 3;

/// The least time between two detector-triggered reconciles after `noops` of them in a row changed
/// nothing: `--change-poll-max`, doubling per further no-op, at most `--resync-interval`.
fn detector_hold_delay(noops: u32, poll_max: Duration, resync: Duration) -> Duration {
    let doublings = noops.saturating_sub(DETECTOR_NOOPS_BEFORE_HOLD).min(16);
    poll_max
        .saturating_mul(1 << doublings)
        .min(resync.max(poll_max))
}

/// How a change was first noticed (see `osc_agent_changes_noticed_total{via}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Stream,
    Detector,
    Resync,
    OnDemand,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Stream => "stream",
            Via::Detector => "detector",
            Via::Resync => "resync",
            Via::OnDemand => "on-demand",
        }
    }
}

fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// The next retry delay of a failing reconcile: between half and all of the backoff's ceiling
/// (spread over a fleet, and never collapsing to zero the way full jitter can), at least 100 ms.
fn retry_delay(failures: &mut Backoff) -> Duration {
    let ceiling = failures.ceiling();
    let _ = failures.next_delay();
    ceiling
        .mul_f64(0.5 + 0.5 * fastrand::f64())
        .max(Duration::from_millis(100))
}

/// Run until cancelled.
pub async fn run(agent: Agent, settings: &Settings, ctx: LiveContext) {
    let LiveContext {
        telemetry,
        actions,
        on_demand,
        cancel,
    } = ctx;
    let live = &settings.live;
    let (Some(client), Some(server)) = (agent.client(), settings.server()) else {
        warn!("live mode needs a server");
        on_demand.close();
        telemetry.loop_exited();
        return;
    };

    let (events_tx, mut events) = mpsc::channel(stream::QUEUE);
    let stream_cancel = cancel.child_token();
    let stream_task = tokio::spawn(stream::run(
        client.clone(),
        settings.environment.clone(),
        StreamOptions {
            initial_delay: live.reconnect_initial_delay,
            multiplier: live.reconnect_multiplier,
            max_delay: live.reconnect_max_delay,
            max_attempts: live.reconnect_max_attempts,
            key: Filter::single_key(&settings.selection).map(str::to_owned),
        },
        events_tx,
        stream_cancel.clone(),
    ));

    // The change detector: its own task, telling the loop about writes the stream did not announce.
    let announcements = Announcements::default();
    let (detector_tx, mut detector_events) = mpsc::unbounded_channel();
    let detector_task = match live.change_poll_interval {
        Some(min_interval) => match crate::state::Filter::new(&settings.selection) {
            Ok(filter) => Some(tokio::spawn(detector::run(
                client.clone(),
                settings.environment.clone(),
                DetectorOptions {
                    min_interval,
                    max_interval: live.change_poll_max,
                    retry_initial: live.reconnect_initial_delay,
                    retry_max: live.reconnect_max_delay,
                    filter: Arc::new(filter),
                },
                announcements.clone(),
                detector_tx,
                telemetry.clone(),
                stream_cancel.clone(),
            ))),
            Err(e) => {
                warn!("change detector off: {e}");
                None
            }
        },
        None => {
            telemetry.set_detector_state("off", Some("--change-poll-interval 0".into()));
            None
        }
    };
    // Until it answers, the resync keeps its stream-only interval.
    let mut detector_works = false;
    let resync_interval = |works: bool| {
        if works {
            live.resync_interval_detected
        } else {
            live.resync_interval
        }
    };

    // Credential files are watched from the start (a rotation may be what fixes the first sync);
    // outputs once they exist.
    let (triggers_tx, mut triggers): (UnboundedSender<Trigger>, UnboundedReceiver<Trigger>) =
        mpsc::unbounded_channel();
    let mut watcher =
        watch::Watch::start(credential_files(settings), triggers_tx, telemetry.clone());
    let mut outputs_watched = false;

    let mut changes = Debounce::new(live.wait_min, live.wait_max);
    // The first reconcile waits for the stream's `connected` (and the detector's baseline).
    let mut sync_now = None;
    let mut start_at = Some(Instant::now() + START_WAIT);
    let (mut stream_ready, mut detector_ready) = (false, detector_task.is_none());
    let mut noticed: Option<Via> = None;
    // When the last list call started (a detector change answered before it is covered by it).
    let mut last_fetch: Option<Instant> = None;
    // Detector-triggered reconciles in a row that changed nothing (metadata that changes on every
    // poll, an app re-putting the same value): past a few, such reconciles are spaced out.
    let mut detector_noops: u32 = 0;
    let mut detector_hold: Option<Instant> = None;
    let mut detector_deferred = false;
    let mut baseline_seen = false;
    // The reconcile about to run was asked for (POST /sync, SIGHUP).
    let mut on_demand_sync = false;
    let mut next_resync = Instant::now() + jittered(live.resync_interval);
    let mut retry_at: Option<Instant> = None;
    let mut failures = Backoff::new(server.retry.initial_delay, live.reconnect_max_delay, 2.0);
    // Shortcuts into a pending retry already taken in this failure streak.
    let (mut credentials_shortcut, mut reconnect_shortcut) = (false, false);
    let mut drift = Debounce::new(live.wait_min, live.wait_max);
    let mut repairs = Backoff::new(
        live.wait_min.max(Duration::from_millis(100)),
        live.reconnect_max_delay,
        2.0,
    );
    let mut repair_not_before = Instant::now();
    let mut degraded_checked = false;
    // Actions skip the first sync of a fresh start: the app reads its first files by itself.
    let existed_at_start = crate::sink::existing_outputs(&settings.outputs).is_some();
    let mut first_apply = true;
    let mut digests: Option<crate::state::Digests> = None;
    let mut last: Option<Arc<Rendered>> = None;

    loop {
        telemetry.heartbeat();
        if let Some(reason) = sync_now.take() {
            let started = Instant::now();
            last_fetch = Some(started);
            if reason == "start" && on_demand.due(started).is_some() {
                // A POST /sync or SIGHUP made during the start wait: this reconcile answers it.
                on_demand_sync = true;
            }
            let via = if std::mem::take(&mut on_demand_sync) {
                on_demand.started(started);
                noticed.take().unwrap_or(Via::OnDemand)
            } else {
                noticed.take().unwrap_or(Via::Resync)
            };
            // Fetching is cancellable (nothing on disk changes); a write abandons its new generation
            // between two files once shutdown starts, and returns.
            let fetched = tokio::select! {
                _ = cancel.cancelled() => break,
                r = agent.fetch() => r,
            };
            let result = match fetched {
                Ok(snapshot) => agent.apply(snapshot).await,
                Err(e) => Err(e),
            };
            if cancel.is_cancelled() && result.is_err() {
                info!("stopping: the reconcile in progress was abandoned, files left as they were");
                break;
            }
            let took = started.elapsed();
            match result {
                Ok(applied) => {
                    debug!(reason, "reconcile done");
                    log_report(&applied.report);
                    if !first_apply && !applied.report.changed.is_empty() {
                        telemetry.on_change_noticed(via.as_str());
                    }
                    if !applied.report.changed.is_empty() {
                        (detector_noops, detector_hold) = (0, None);
                    } else if via == Via::Detector {
                        detector_noops += 1;
                        if detector_noops >= DETECTOR_NOOPS_BEFORE_HOLD {
                            let hold = detector_hold_delay(
                                detector_noops,
                                live.change_poll_max,
                                live.resync_interval,
                            );
                            if detector_noops == DETECTOR_NOOPS_BEFORE_HOLD {
                                warn!(
                                    hold_ms = hold.as_millis() as u64,
                                    "the change detector keeps seeing metadata changes with unchanged content \
                                     ({DETECTOR_NOOPS_BEFORE_HOLD} reconciles in a row): spacing out the list calls it asks for"
                                );
                            }
                            detector_hold = Some(Instant::now() + hold);
                        }
                    }
                    // Hand over to the actions first: once `/status` shows this sync, its action is
                    // already pending.
                    if let Some(queue) = &actions
                        && !applied.report.changed.is_empty()
                    {
                        let existed = existed_at_start || agent.objects_found_earlier();
                        if first_apply && !existed && !settings.actions.act_on_start {
                            info!("first sync of a fresh start: no action (see --act-on-start)");
                        } else {
                            let keys = applied.changed_keys(digests.as_ref());
                            queue.submit(applied.report.config_hash.clone(), keys);
                        }
                    }
                    // Watched before the sync shows in /status: a change made right after is seen.
                    if live.drift_repair {
                        if !outputs_watched {
                            outputs_watched = true;
                            let (dirs, files) = output_paths(settings);
                            watcher.watch_outputs(&dirs, &files);
                        }
                        if let Some(dir) = &applied.rendered.dir {
                            watcher.set_keys(&dir.path, dir.files.names().clone());
                        }
                    }
                    telemetry.on_sync_ok(&applied.report, took);
                    first_apply = false;
                    digests = Some(applied.digests);
                    last = Some(applied.rendered);
                    retry_at = None;
                    failures.reset();
                    (credentials_shortcut, reconnect_shortcut) = (false, false);
                }
                Err(e) => {
                    log_failure(&e);
                    telemetry.on_sync_error(&e.to_string(), took);
                    if matches!(e, SyncError::Write { .. }) {
                        // Some outputs may hold the new content already: repairing "drift" from the
                        // previous render would flip them back. The retry writes them all.
                        last = None;
                    }
                    if !degraded_checked && !telemetry.ready() && is_unreachable(&e) {
                        degraded_checked = true;
                        if degrade(&agent, &telemetry).await {
                            first_apply = false;
                        }
                    }
                    if matches!(e, SyncError::Empty(_))
                        && !telemetry.ready()
                        && let Some(generation) = crate::sink::existing_outputs(&settings.outputs)
                    {
                        // Refused to empty an earlier run's files: they are what the app should read.
                        let stale = crate::sync::Stale::LastKnownGood { generation };
                        warn!("serving {stale}: the environment has no entry");
                        telemetry.set_stale(stale.to_string());
                        first_apply = false;
                    }
                    let delay = retry_delay(&mut failures);
                    retry_at = Some(Instant::now() + delay);
                    info!(
                        retry_in_ms = delay.as_millis() as u64,
                        "will retry the reconcile"
                    );
                }
            }
            next_resync = Instant::now() + jittered(resync_interval(detector_works));
            continue;
        }

        let drift_due = drift.deadline().map(|d| d.max(repair_not_before));
        let wake = start_at.unwrap_or_else(|| {
            [
                changes.deadline(),
                detector_hold.filter(|_| detector_deferred),
                drift_due,
                retry_at,
                on_demand.due_at(),
                Some(next_resync),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(Instant::now)
        });
        telemetry.idle_until(wake);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(event) = events.recv() => {
                telemetry.on_stream(&event);
                match event {
                    StreamEvent::Connected { .. } if start_at.is_some() => {
                        stream_ready = true;
                        announcements.reconnected();
                    }
                    // Not connected at start: no reason to wait for it.
                    StreamEvent::Disconnected { .. } | StreamEvent::GaveUp { .. } if start_at.is_some() => {
                        stream_ready = true;
                    }
                    StreamEvent::Connected { .. } => {
                        announcements.reconnected();
                        match retry_at {
                            None => sync_now = Some("stream connected"),
                            // The server may be back: try soon, once per failure streak.
                            Some(at) if !reconnect_shortcut => {
                                reconnect_shortcut = true;
                                retry_at = Some(at.min(Instant::now() + live.wait_min));
                            }
                            Some(_) => {}
                        }
                    }
                    StreamEvent::Change { kind, key } => {
                        // Only an event naming its key proves the stream heard that write.
                        if let (ChangeKind::Created | ChangeKind::Updated | ChangeKind::Deleted, Some(key)) = (kind, &key) {
                            announcements.note(key);
                        }
                        changes.note(Instant::now());
                        noticed.get_or_insert(Via::Stream);
                    }
                    StreamEvent::GaveUp { attempts } => warn!(attempts, "event stream gave up; only periodic resyncs remain"),
                    StreamEvent::KeepAlive | StreamEvent::Disconnected { .. } => {}
                }
            }
            Some(trigger) = triggers.recv() => {
                // Everything queued is handled at once.
                let mut next = Some(trigger);
                while let Some(trigger) = next {
                    match trigger {
                        Trigger::Drift => drift.note(Instant::now()),
                        Trigger::Credentials => match retry_at {
                            Some(at) if !credentials_shortcut => {
                                credentials_shortcut = true;
                                info!("credential file changed: retrying soon");
                                // A short wait lets a Secret volume's swap (several events) settle.
                                retry_at = Some(at.min(Instant::now() + live.wait_min));
                            }
                            Some(_) => debug!("credential file changed: the scheduled retry will use it"),
                            None => debug!("credential file changed: used from the next request on"),
                        },
                    }
                    next = triggers.try_recv().ok();
                }
            },
            Some(event) = detector_events.recv() => match event {
                DetectorEvent::Working { answered } => {
                    detector_ready = true;
                    detector_works = true;
                    // The start list ran before the first baseline (the start wait timed out, or the
                    // first poll failed): a write between the two would be in the baseline and never
                    // noticed; list once more.
                    if !baseline_seen {
                        baseline_seen = true;
                        if start_at.is_none() && last_fetch.is_none_or(|t| t < answered) {
                            changes.note(Instant::now());
                        }
                    }
                }
                DetectorEvent::NotWorking => {
                    detector_ready = true;
                    if detector_works {
                        detector_works = false;
                        next_resync = next_resync.min(Instant::now() + jittered(resync_interval(false)));
                    }
                }
                DetectorEvent::Changed { answered, keys, missed } => {
                    if last_fetch.is_some_and(|t| t >= answered) {
                        debug!(keys, "the change detector's changes are covered by a later list");
                    } else if detector_hold.is_some_and(|h| h > Instant::now()) {
                        detector_deferred = true;
                        noticed.get_or_insert(if missed { Via::Detector } else { Via::Stream });
                    } else {
                        debug!(keys, missed, "the change detector found changed entries");
                        changes.note(Instant::now());
                        noticed.get_or_insert(if missed { Via::Detector } else { Via::Stream });
                    }
                }
            },
            _ = on_demand.requested() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }

        let now = Instant::now();
        if start_at.is_some_and(|at| at <= now || (stream_ready && detector_ready)) {
            start_at = None;
            sync_now = Some("start");
            changes.clear();
            noticed = None;
            continue;
        }
        if start_at.is_some() {
            // Before the first reconcile, hints wait for it (it reads everything).
            changes.clear();
            continue;
        }
        if detector_deferred && detector_hold.is_none_or(|h| h <= now) {
            detector_deferred = false;
            changes.note(now);
        }
        if let Some(reason) = on_demand.due(now) {
            sync_now = Some(reason);
            on_demand_sync = true;
        } else if let Some(at) = retry_at {
            // Failing: hints and resyncs wait for the retry, which reads everything anyway (and
            // nothing due stays in the wake-up list, or the loop would spin until then).
            changes.clear();
            if at <= now {
                sync_now = Some("retry");
            } else if next_resync <= now {
                next_resync = at;
            }
        } else if changes.take_due(now) {
            sync_now = Some("change events");
        } else if next_resync <= now {
            sync_now = Some("periodic resync");
            agent.recheck_objects();
        }
        if drift_due.is_some_and(|t| t <= now) {
            drift.clear();
            if let Some(rendered) = &last {
                if repair(&agent, rendered.clone(), &telemetry).await {
                    // Someone keeps changing the outputs: do not fight at full speed.
                    repair_not_before = Instant::now() + retry_delay(&mut repairs);
                } else {
                    repairs.reset();
                }
            }
        }
    }
    on_demand.close();
    stream_cancel.cancel();
    let _ = stream_task.await;
    if let Some(task) = detector_task {
        let _ = task.await;
    }
    drop(watcher);
    telemetry.loop_exited();
}

fn is_unreachable(e: &SyncError) -> bool {
    matches!(e, SyncError::Source(s) if s.class() == FailureClass::Unreachable)
}

/// The server cannot be reached before any successful sync: keep an earlier run's files, or render the
/// fallback backup, and say so. Auth and key errors never get here (they are not a reason to fall back).
async fn degrade(agent: &Agent, telemetry: &Telemetry) -> bool {
    match agent.degraded_start().await {
        Some(Ok(stale)) => {
            warn!("server unreachable at start: serving {stale} until the first successful sync");
            telemetry.set_stale(stale.to_string());
            true
        }
        Some(Err(e)) => {
            warn!("server unreachable at start and the fallback failed: {e}");
            false
        }
        None => false,
    }
}

/// Put back outputs changed by someone else, from the last render (no server call). True when
/// something had to be restored.
async fn repair(agent: &Agent, rendered: Arc<Rendered>, telemetry: &Telemetry) -> bool {
    match agent.write(rendered).await {
        Ok(report) if !report.changed.is_empty() || report.repaired > 0 => {
            warn!(restored = ?report.changed, links = report.repaired,
                  "managed outputs were changed by someone else: restored");
            telemetry.on_drift_repair(report.files_written);
            true
        }
        Ok(report) => {
            for e in &report.errors {
                warn!("drift repair: {e}");
            }
            false
        }
        Err(e) => {
            warn!("drift repair failed: {e}");
            false
        }
    }
}

/// The single-file outputs and the output directory, for drift repair.
fn output_paths(settings: &Settings) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let o = &settings.outputs;
    let files = o
        .files
        .iter()
        .map(|f| f.path.clone())
        .chain(o.templates.iter().map(|t| t.destination.clone()))
        .collect();
    (o.dir.iter().cloned().collect(), files)
}

/// Credential files (re-read for every request; watched to retry a failing sync at once).
fn credential_files(settings: &Settings) -> Vec<PathBuf> {
    use crate::config::SecretSource;
    let credentials = settings.server().map(|s| &s.credentials);
    credentials
        .into_iter()
        .flat_map(|c| [Some(&c.user_key), c.api_key.as_ref(), c.token.as_ref()])
        .flatten()
        .filter_map(|s| match s {
            SecretSource::File { path, .. } => Some(path.clone()),
            SecretSource::Env { .. } => None,
        })
        .collect()
}
