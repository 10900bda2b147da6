//! Running the agent: `--once` reconciles and exits; otherwise the live loop keeps the outputs in sync,
//! with the admin server and the action runner beside it, until SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::action::ActionContext;
use crate::action::runner::Runner;
use crate::config::{AgentArgs, ConfigError, Settings, setting};
use crate::exit::Exit;
use crate::live::{self, LiveContext, Trigger};
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
            eprintln!("osc-agent: error: {e}");
            return Exit::Partial;
        }
        warn!("{e} (retried at every sync)");
    }
    if settings.once {
        return once(&agent, runner.as_ref(), &settings).await;
    }
    live_mode(agent, runner, settings, telemetry).await
}

async fn once(agent: &Agent, runner: Option<&Runner>, settings: &Settings) -> Exit {
    let existed = crate::sink::existing_outputs(&settings.outputs).is_some();
    let e = match agent.fetch().await {
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
                    if !runner.execute(&ctx).await {
                        eprintln!(
                            "osc-agent: error: files synced, but an action failed (see the log)"
                        );
                        return Exit::Partial;
                    }
                }
                return Exit::Ok;
            }
            Err(e) => e,
        },
        Err(e) => e,
    };
    log_failure(&e);
    // With --fallback-backup, an unreachable server still lets the app start (from earlier files or
    // from the backup). Auth and key errors never fall back.
    if agent.has_fallback() && Exit::of(&e) == Exit::Unreachable {
        match agent.degraded_start().await {
            Some(Ok(stale)) => {
                warn!("server unreachable: serving {stale}");
                return Exit::Ok;
            }
            Some(Err(fallback)) => {
                let both = format!("{e}; fallback failed: {fallback}");
                eprintln!("{}", crate::logging::error_line("osc-agent", &both));
                return Exit::of(&fallback);
            }
            None => {}
        }
    }
    eprintln!("{}", crate::logging::error_line("osc-agent", &e));
    Exit::of(&e)
}

async fn live_mode(
    agent: Agent,
    runner: Option<Runner>,
    settings: Settings,
    telemetry: Arc<Telemetry>,
) -> Exit {
    let cancel = CancellationToken::new();
    let (triggers_tx, triggers) = mpsc::unbounded_channel();

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
                    triggers_tx.clone(),
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

    let signals = match spawn_signal_handlers(cancel.clone(), triggers_tx.clone()) {
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
            triggers_tx,
            triggers,
            cancel: cancel.clone(),
        },
    )
    .await;

    cancel.cancel();
    signals.abort();
    if let Some(task) = runner_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
    }
    info!("stopped");
    Exit::Ok
}

fn spawn_signal_handlers(
    cancel: CancellationToken,
    triggers: mpsc::UnboundedSender<Trigger>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Started with them blocked (a supervisor's mask), the handlers above would never run.
    use nix::sys::signal::Signal::{SIGHUP, SIGINT, SIGTERM};
    crate::action::signals::unblock(&[SIGHUP, SIGINT, SIGTERM]).map_err(std::io::Error::from)?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: finishing the current write and stopping"); cancel.cancel(); }
                _ = int.recv() => { info!("SIGINT: finishing the current write and stopping"); cancel.cancel(); }
                _ = hup.recv() => {
                    info!("SIGHUP: reconciling now");
                    if triggers.send(Trigger::Sync("SIGHUP")).is_err() { return; }
                }
            }
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
