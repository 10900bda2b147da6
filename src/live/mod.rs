//! The live loop: keep the outputs equal to the server's state, despite a lossy event stream.
//!
//! Every (re)connect → full reconcile. Change hints → coalesced (see [`debounce`]) → one list call.
//! A jittered periodic resync is the safety net. SIGHUP and `POST /sync` reconcile on demand. Outputs
//! edited by someone else are restored from the last render kept in memory (no server call). On
//! SIGTERM/SIGINT the loop stops taking hints, lets an in-flight write finish, and returns.

mod debounce;
mod watch;

use std::collections::BTreeMap;
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
use crate::source::{FailureClass, StreamEvent, StreamOptions, stream};
use crate::state::Filter;
use crate::sync::{Agent, SyncError};
use crate::telemetry::Telemetry;
use debounce::Debounce;

/// A reason to look at the outputs again, from outside the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Reconcile now (SIGHUP, `POST /sync`).
    Sync(&'static str),
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
    pub triggers_tx: UnboundedSender<Trigger>,
    pub triggers: UnboundedReceiver<Trigger>,
    pub cancel: CancellationToken,
}

fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// Run until cancelled.
pub async fn run(agent: Agent, settings: &Settings, ctx: LiveContext) {
    let LiveContext {
        telemetry,
        actions,
        triggers_tx,
        mut triggers,
        cancel,
    } = ctx;
    let live = &settings.live;
    let (Some(client), Some(server)) = (agent.client(), settings.server()) else {
        warn!("live mode needs a server");
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

    let mut changes = Debounce::new(live.wait_min, live.wait_max);
    let mut drift: Option<Instant> = None;
    let mut sync_now = Some("start");
    let mut next_resync = Instant::now() + jittered(live.resync_interval);
    let mut retry_at: Option<Instant> = None;
    let mut failures = Backoff::new(server.retry.initial_delay, live.reconnect_max_delay, 2.0);
    let mut degraded_checked = false;
    // Actions skip the first sync of a fresh start: the app reads its first files by itself.
    let existed_at_start = crate::sink::existing_outputs(&settings.outputs).is_some();
    let mut first_apply = true;
    let mut digests: Option<BTreeMap<String, String>> = None;
    let mut last: Option<Arc<Rendered>> = None;
    let mut watcher = None;

    loop {
        telemetry.heartbeat();
        if let Some(reason) = sync_now.take() {
            // Fetching is cancellable (nothing on disk changes); applying runs to completion.
            let started = Instant::now();
            let fetched = tokio::select! {
                _ = cancel.cancelled() => break,
                r = agent.fetch() => r,
            };
            let result = match fetched {
                Ok(snapshot) => agent.apply(snapshot).await,
                Err(e) => Err(e),
            };
            let took = started.elapsed();
            match result {
                Ok(applied) => {
                    debug!(reason, "reconcile done");
                    log_report(&applied.report);
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
                    telemetry.on_sync_ok(&applied.report, took);
                    first_apply = false;
                    digests = Some(applied.digests);
                    last = Some(applied.rendered);
                    retry_at = None;
                    failures.reset();
                    if watcher.is_none() && live.drift_repair {
                        watcher = watch::start(watch_paths(settings), triggers_tx.clone());
                    }
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
                    let delay = failures.next_delay().max(Duration::from_millis(100));
                    retry_at = Some(Instant::now() + delay);
                    info!(
                        retry_in_ms = delay.as_millis() as u64,
                        "will retry the reconcile"
                    );
                }
            }
            next_resync = Instant::now() + jittered(live.resync_interval);
            continue;
        }

        let wake = [
            changes.deadline(),
            drift,
            retry_at,
            Some(next_resync),
            Some(Instant::now() + Duration::from_secs(1)),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(Instant::now);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(event) = events.recv() => {
                telemetry.on_stream(&event);
                match event {
                    StreamEvent::Connected { .. } => sync_now = Some("stream connected"),
                    StreamEvent::Change { .. } => changes.note(Instant::now()),
                    StreamEvent::GaveUp { attempts } => warn!(attempts, "event stream gave up; only periodic resyncs remain"),
                    StreamEvent::KeepAlive | StreamEvent::Disconnected { .. } => {}
                }
            }
            Some(trigger) = triggers.recv() => {
                // Everything queued is handled at once: a burst of POST /sync or SIGHUP costs one
                // reconcile, and the queue is emptied before each one.
                let mut next = Some(trigger);
                while let Some(trigger) = next {
                    match trigger {
                        Trigger::Sync(reason) => sync_now = Some(reason),
                        Trigger::Drift => drift = Some(Instant::now() + live.wait_min),
                        Trigger::Credentials => {
                            if retry_at.is_some() {
                                info!("credential file changed: retrying now");
                                sync_now = Some("credentials changed");
                            }
                        }
                    }
                    next = triggers.try_recv().ok();
                }
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }

        let now = Instant::now();
        if changes.take_due(now) {
            sync_now = Some("change events");
        } else if retry_at.is_some_and(|t| t <= now) {
            sync_now = Some("retry");
        } else if next_resync <= now {
            sync_now = Some("periodic resync");
            agent.recheck_objects();
        }
        if drift.is_some_and(|t| t <= now) {
            drift = None;
            if let Some(rendered) = &last {
                repair(&agent, rendered.clone(), &telemetry).await;
            }
        }
    }
    stream_cancel.cancel();
    let _ = stream_task.await;
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

/// Put back outputs changed by someone else, from the last render (no server call).
async fn repair(agent: &Agent, rendered: Arc<Rendered>, telemetry: &Telemetry) {
    match agent.write(rendered).await {
        Ok(report) if !report.changed.is_empty() || report.repaired > 0 => {
            warn!(restored = ?report.changed, links = report.repaired,
                  "managed outputs were changed by someone else: restored");
            telemetry.on_drift_repair(report.files_written);
        }
        Ok(report) => {
            for e in report.errors {
                warn!("drift repair: {e}");
            }
        }
        Err(e) => warn!("drift repair failed: {e}"),
    }
}

fn watch_paths(settings: &Settings) -> watch::WatchPaths {
    use crate::config::SecretSource;
    let o = &settings.outputs;
    let credentials = settings.server().map(|s| &s.credentials);
    watch::WatchPaths {
        output_dirs: o.dir.iter().cloned().collect(),
        output_files: o
            .files
            .iter()
            .map(|f| f.path.clone())
            .chain(o.templates.iter().map(|t| t.destination.clone()))
            .collect(),
        credential_files: credentials
            .into_iter()
            .flat_map(|c| [Some(&c.user_key), c.api_key.as_ref(), c.token.as_ref()])
            .flatten()
            .filter_map(|s| match s {
                SecretSource::File { path, .. } => Some(path.clone()),
                SecretSource::Env { .. } => None,
            })
            .collect(),
    }
}
