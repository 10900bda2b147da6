//! Running the agent: `--once` reconciles and exits; otherwise the live loop keeps the outputs in sync,
//! with the admin server and the action runner beside it, until SIGTERM or SIGINT.
//!
//! Both modes handle SIGTERM and SIGINT the same way: stop fetching, abandon a new generation being
//! written between two of its files (the partial generation is removed, the current one untouched),
//! and exit within a bounded time: live mode with 0, `--once` with 143 (SIGTERM) or 130 (SIGINT) when it
//! had not finished. Whatever still runs [`SHUTDOWN_LIMIT`] after the signal (a Kubernetes API call that
//! does not answer, the removal of a large abandoned generation) is cut short by exiting with the same
//! code; what it leaves (a hidden partial generation, a temp file) is removed at the next start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::action::ActionContext;
use crate::action::runner::Runner;
use crate::config::{AgentArgs, ConfigError, Settings, setting};
use crate::exit::Exit;
use crate::live::{self, LiveContext, OnDemand, Outcome};
use crate::sink::kube::ObjectSink;
use crate::sync::{Agent, SyncError, SyncReport};
use crate::telemetry::Telemetry;

/// Validate the arguments into settings; the environment may come from the pod's own metadata.
pub async fn settings(mut args: AgentArgs) -> Result<Settings, ConfigError> {
    crate::cluster::resolve_environment(&mut args).await?;
    Settings::from_args(args)
}

/// The agent with its ConfigMap/Secret sink, and the action runner when actions are configured.
async fn build(
    settings: &Settings,
    telemetry: &Arc<Telemetry>,
) -> Result<(Agent, Option<Runner>), ConfigError> {
    let sink = ObjectSink::connect(
        &settings.objects,
        settings.pod.as_ref(),
        &settings.environment,
    )
    .await
    .map_err(|e| ConfigError(format!("--configmap/--secret: {e}")))?;
    let agent = Agent::new(settings)?.with_objects(sink);
    if settings.actions.specs.is_empty() {
        return Ok((agent, None));
    }
    let cluster = match &settings.pod {
        Some(pod)
            if settings
                .actions
                .specs
                .iter()
                .any(|s| s.kind() == "rollout-restart") =>
        {
            let client = crate::cluster::client()
                .await
                .map_err(|e| ConfigError(format!("rollout-restart: {e}")))?;
            Some((client, pod.clone()))
        }
        _ => None,
    };
    let runner = Runner::new(
        settings.actions.clone(),
        &settings.environment,
        cluster,
        telemetry.clone(),
    )
    .map_err(|e| ConfigError(e.0))?;
    Ok((agent, Some(runner)))
}

pub async fn run(settings: Settings) -> Exit {
    let telemetry = Arc::new(Telemetry::new(
        &settings.environment,
        settings.ready_when_stale,
    ));
    let (agent, runner) = match build(&settings, &telemetry).await {
        Ok(built) => built,
        Err(e) => {
            eprintln!("{}", crate::logging::error_line("osc-agent", &e));
            return Exit::Config;
        }
    };
    match settings.server() {
        Some(s) => {
            info!(server = %s.url, environment = %settings.environment, once = settings.once,
                         version = env!("CARGO_PKG_VERSION"), "osc-agent starting")
        }
        None => info!(environment = %settings.environment, version = env!("CARGO_PKG_VERSION"),
                      "osc-agent rendering a backup, no server"),
    }
    // Lock the outputs (held until exit) and remove what an interrupted earlier run left.
    if let Err(e) = crate::sink::claim(&settings.outputs) {
        if settings.once {
            eprintln!("{}", crate::logging::error_line("osc-agent", &e));
            return Exit::Partial;
        }
        warn!("{e} (retried at every sync)");
    }
    if settings.once {
        return once(&agent, runner.as_ref(), &settings).await;
    }
    live_mode(agent, runner, settings, telemetry).await
}

/// The longest time from a stop signal to the process's exit, in both modes.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// Exit with `code` [`SHUTDOWN_LIMIT`] from now unless the process has exited by then; the first call
/// arms it, later ones (a second signal) do nothing.
fn exit_at_shutdown_limit(code: Exit) {
    static ARMED: AtomicBool = AtomicBool::new(false);
    if ARMED.swap(true, Ordering::SeqCst) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("shutdown-limit".into())
        .spawn(move || {
            std::thread::sleep(SHUTDOWN_LIMIT);
            error!(
                "still stopping {} after the signal: exiting now (an unfinished generation or temp file \
                 is removed at the next start)",
                crate::config::HumanDuration(SHUTDOWN_LIMIT)
            );
            std::process::exit(i32::from(code as u8));
        });
    if let Err(e) = spawned {
        warn!("the shutdown time is not bounded: cannot start its timer thread: {e}");
    }
}

/// Which stop signal arrived (`--once`): its exit code.
type Stopped = Arc<OnceLock<Exit>>;

async fn once(agent: &Agent, runner: Option<&Runner>, settings: &Settings) -> Exit {
    let cancel = CancellationToken::new();
    let stopped: Stopped = Arc::default();
    let signals = match spawn_stop_handler(cancel.clone(), stopped.clone()) {
        Ok(h) => h,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return Exit::Internal;
        }
    };
    let exit = once_inner(agent, runner, settings, &cancel).await;
    signals.abort();
    let code = stopped.get().copied().unwrap_or(Exit::Internal);
    match exit {
        Once::Done(exit) => exit,
        Once::Stopped => {
            warn!(
                "stopped by a signal before finishing: the write in progress was abandoned (outputs \
                 written before it, if any, hold the new content; the others are as before this run)"
            );
            code
        }
        Once::StoppedBeforeActions => {
            warn!("stopped by a signal: files synced, but the actions were not run");
            code
        }
    }
}

/// How `--once` ended.
enum Once {
    Done(Exit),
    /// A signal arrived before the files were written (a write in progress was abandoned).
    Stopped,
    /// A signal arrived after the files were written, before or during the actions.
    StoppedBeforeActions,
}

async fn once_inner(
    agent: &Agent,
    runner: Option<&Runner>,
    settings: &Settings,
    cancel: &CancellationToken,
) -> Once {
    let existed = crate::sink::existing_outputs(&settings.outputs).is_some();
    let fetched = tokio::select! {
        _ = cancel.cancelled() => return Once::Stopped,
        r = agent.fetch() => r,
    };
    let e = match fetched {
        // A write in progress when a signal arrives abandons its new generation and fails.
        Ok(snapshot) => match agent.apply(snapshot).await {
            Ok(applied) => {
                log_report(&applied.report);
                let changed = !applied.report.changed.is_empty();
                if let Some(runner) = runner
                    && changed
                    && (existed || agent.objects_found_earlier() || settings.actions.act_on_start)
                {
                    let ctx = ActionContext {
                        environment: settings.environment.clone(),
                        hash: applied.report.config_hash.clone(),
                        changed_keys: applied.changed_keys(None),
                    };
                    let ok = tokio::select! {
                        _ = cancel.cancelled() => return Once::StoppedBeforeActions,
                        ok = runner.execute(&ctx) => ok,
                    };
                    if !ok {
                        eprintln!(
                            "osc-agent: error: files synced, but an action failed (see the log)"
                        );
                        return Once::Done(Exit::Partial);
                    }
                }
                return Once::Done(Exit::Ok);
            }
            Err(_) if cancel.is_cancelled() => return Once::Stopped,
            Err(e) => e,
        },
        Err(e) => e,
    };
    log_failure(&e);
    // With --fallback-backup, an unreachable server still lets the app start (from earlier files or
    // from the backup). Auth and key errors never fall back.
    if agent.has_fallback() && Exit::of(&e) == Exit::Unreachable {
        let degraded = tokio::select! {
            _ = cancel.cancelled() => return Once::Stopped,
            d = agent.degraded_start() => d,
        };
        match degraded {
            Some(Ok(stale)) => {
                warn!("server unreachable: serving {stale}");
                return Once::Done(Exit::Ok);
            }
            Some(Err(_)) if cancel.is_cancelled() => return Once::Stopped,
            Some(Err(fallback)) => {
                let both = format!("{e}; fallback failed: {fallback}");
                eprintln!("{}", crate::logging::error_line("osc-agent", &both));
                return Once::Done(Exit::of(&fallback));
            }
            None => {}
        }
    }
    eprintln!("{}", crate::logging::error_line("osc-agent", &e));
    Once::Done(Exit::of(&e))
}

/// SIGTERM/SIGINT during `--once`: remember which, abandon writes, cancel.
fn spawn_stop_handler(
    cancel: CancellationToken,
    stopped: Stopped,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Started with them blocked (a supervisor's mask), the handlers above would never run.
    use nix::sys::signal::Signal::{SIGINT, SIGTERM};
    crate::action::signals::unblock(&[SIGINT, SIGTERM]).map_err(std::io::Error::from)?;
    Ok(tokio::spawn(async move {
        let (name, code) = tokio::select! {
            _ = term.recv() => ("SIGTERM", Exit::Terminated),
            _ = int.recv() => ("SIGINT", Exit::Interrupted),
        };
        info!("{name}: stopping (a write in progress is abandoned, files stay as they were)");
        let _ = stopped.set(code);
        exit_at_shutdown_limit(code);
        // Cancelled first: a write that fails because of the abort is then seen as stopped.
        cancel.cancel();
        crate::sink::abort_writes();
    }))
}

async fn live_mode(
    agent: Agent,
    runner: Option<Runner>,
    settings: Settings,
    telemetry: Arc<Telemetry>,
) -> Exit {
    let cancel = CancellationToken::new();
    let on_demand = Arc::new(OnDemand::new(
        settings.live.sync_min_interval,
        telemetry.clone(),
    ));

    let admin = match settings.live.admin_addr {
        None => None,
        Some(addr) => match crate::admin::bind(addr).await {
            Ok(listener) => {
                let bound = listener.local_addr().map_or(addr, |a| a);
                info!(addr = %bound, "admin server listening: /healthz /readyz /metrics /status POST /sync");
                // The loop may legitimately wait for a whole retried request before its next beat.
                let stall = settings.server().map_or(Duration::from_secs(60), |s| {
                    let r = &s.retry;
                    Duration::from_secs(60)
                        + s.request_timeout * (r.max_retries + 1)
                        + r.max_delay * r.max_retries
                });
                Some(tokio::spawn(crate::admin::serve(
                    listener,
                    telemetry.clone(),
                    on_demand.clone(),
                    settings.live.stale_after,
                    stall,
                    cancel.clone(),
                )))
            }
            Err(e) => {
                eprintln!(
                    "osc-agent: error: {}: cannot listen on {addr}: {e}",
                    setting("admin-addr")
                );
                return Exit::Config;
            }
        },
    };

    let signals = match spawn_signal_handlers(cancel.clone(), on_demand.clone()) {
        Ok(h) => h,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return Exit::Internal;
        }
    };
    let (actions, runner_task) = match runner {
        Some(r) => {
            let (queue, task) = r.spawn(cancel.child_token());
            (Some(queue), Some(task))
        }
        None => (None, None),
    };

    live::run(
        agent,
        &settings,
        LiveContext {
            telemetry,
            actions,
            on_demand,
            cancel: cancel.clone(),
        },
    )
    .await;

    cancel.cancel();
    signals.abort();
    // The runner (an action in progress) and the admin server (open connections) get 2 s together.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if let Some(task) = runner_task {
            let _ = task.await;
        }
        if let Some(admin) = admin {
            let _ = admin.await;
        }
    })
    .await;
    info!("stopped");
    Exit::Ok
}

/// Live mode: SIGTERM/SIGINT stop (abandoning a new generation being written), SIGHUP asks for a
/// reconcile (rate-limited like `POST /sync`).
fn spawn_signal_handlers(
    cancel: CancellationToken,
    on_demand: Arc<OnDemand>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Started with them blocked (a supervisor's mask), the handlers above would never run.
    use nix::sys::signal::Signal::{SIGHUP, SIGINT, SIGTERM};
    crate::action::signals::unblock(&[SIGHUP, SIGINT, SIGTERM]).map_err(std::io::Error::from)?;
    Ok(tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    match on_demand.request("SIGHUP") {
                        Some(s) => {
                            let in_ms = s.at.saturating_duration_since(std::time::Instant::now()).as_millis() as u64;
                            match s.outcome {
                                Outcome::Now => info!("SIGHUP: reconciling now"),
                                Outcome::Delayed => info!(in_ms, "SIGHUP: reconcile scheduled (--sync-min-interval)"),
                                Outcome::Coalesced => info!(in_ms, "SIGHUP: a reconcile is already scheduled"),
                            }
                        }
                        None => return,
                    }
                    continue;
                }
            };
            info!(
                "{name}: stopping (a new generation being written is abandoned, the current one stays)"
            );
            exit_at_shutdown_limit(Exit::Ok);
            // Cancelled first: a write that fails because of the abort is then seen as stopped.
            cancel.cancel();
            crate::sink::abort_writes();
        }
    }))
}

/// `osc-agent backup inspect`.
pub async fn inspect_backup(args: crate::backup::inspect::InspectArgs) -> Exit {
    use crate::config::{BackupFile, Secret, SecretSource};
    let password = match (
        &args.backup_password_file,
        std::env::var("OSC_BACKUP_PASSWORD"),
    ) {
        (Some(path), _) => SecretSource::File {
            path: path.clone(),
            flag: "--backup-password-file",
        },
        (None, Ok(v)) if !v.is_empty() => SecretSource::Env {
            var: "OSC_BACKUP_PASSWORD",
            value: Secret::new(v),
        },
        _ => {
            eprintln!(
                "osc-agent: error: set --backup-password-file (or $OSC_BACKUP_PASSWORD_FILE) or $OSC_BACKUP_PASSWORD"
            );
            return Exit::Config;
        }
    };
    let file = BackupFile {
        path: args.file.clone(),
        password,
    };
    match crate::source::backup::load(&file).await {
        Ok(backup) => {
            print!(
                "{}",
                crate::backup::inspect::report(
                    &backup,
                    args.environment.as_deref(),
                    args.show_values
                )
            );
            Exit::Ok
        }
        Err(e) => {
            eprintln!("{}", crate::logging::error_line("osc-agent", &e));
            Exit::Backup
        }
    }
}

pub fn log_report(r: &SyncReport) {
    if r.changed.is_empty() {
        info!(keys = r.keys, hash = %short(&r.hash), repaired = r.repaired, "sync complete: nothing changed");
    } else {
        info!(keys = r.keys, hash = %short(&r.hash), files_written = r.files_written,
              changed = ?r.changed, "sync complete: content changed");
    }
}

pub fn log_failure(e: &SyncError) {
    match e {
        SyncError::Write { report, errors } => {
            for err in errors {
                warn!("{err}");
            }
            error!(
                keys = report.keys,
                failed = errors.len(),
                "sync incomplete: {e}"
            );
        }
        other => error!("sync failed, files on disk left as they were: {other}"),
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}
