//! Running actions safely: at most one run per applied generation (generations arriving while an
//! action runs or during the cooldown are coalesced into the next run, with the union of their changed
//! keys and the latest hash), never on no-op syncs (the loop only submits real changes), and a
//! restart-loop breaker: after `max_actions` runs within `window`, stop acting (files keep syncing) and
//! say so in `/status` and `osc_agent_action_breaker_tripped`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ActionContext, ActionError, ActionSpec, exec, http, process};
use crate::config::{Actions, PodRef};
use crate::telemetry::Telemetry;

/// Runs the configured actions.
pub struct Runner {
    settings: Actions,
    environment: String,
    http: reqwest::Client,
    cluster: Option<(kube::Client, PodRef)>,
    telemetry: Arc<Telemetry>,
}

/// The latest content hash and the union of changed keys not acted on yet.
type Pending = (String, BTreeSet<String>);

/// Where the reconcile loop hands over changed generations.
#[derive(Clone)]
pub struct ActionQueue {
    pending: Arc<Mutex<Option<Pending>>>,
    notify: Arc<Notify>,
    telemetry: Arc<Telemetry>,
}

impl ActionQueue {
    /// A generation with new content was applied.
    pub fn submit(&self, hash: String, changed_keys: impl IntoIterator<Item = String>) {
        if let Ok(mut p) = self.pending.lock() {
            let keys = changed_keys.into_iter();
            match p.as_mut() {
                Some((h, k)) => {
                    *h = hash;
                    k.extend(keys);
                }
                None => *p = Some((hash, keys.collect())),
            }
            // Under the lock, so that `settled` cannot clear the flag of a newer generation.
            self.telemetry.set_action_pending(true);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Option<Pending> {
        self.pending.lock().ok().and_then(|mut p| p.take())
    }

    /// A run finished (or was skipped): nothing is pending unless a generation arrived meanwhile.
    fn settled(&self) {
        if let Ok(p) = self.pending.lock()
            && p.is_none()
        {
            self.telemetry.set_action_pending(false);
        }
    }
}

impl Runner {
    pub fn new(
        settings: Actions,
        environment: &str,
        cluster: Option<(kube::Client, PodRef)>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Runner, ActionError> {
        Ok(Runner {
            settings,
            environment: environment.to_owned(),
            http: http::build_client()?,
            cluster,
            telemetry,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.settings.specs.is_empty()
    }

    /// Start the runner task.
    pub fn spawn(self, cancel: CancellationToken) -> (ActionQueue, tokio::task::JoinHandle<()>) {
        let queue = ActionQueue {
            pending: Arc::default(),
            notify: Arc::default(),
            telemetry: self.telemetry.clone(),
        };
        let task = tokio::spawn(self.run(queue.clone(), cancel));
        (queue, task)
    }

    async fn run(self, queue: ActionQueue, cancel: CancellationToken) {
        let mut history: VecDeque<Instant> = VecDeque::new();
        let mut last: Option<Instant> = None;
        let mut tripped = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = queue.notify.notified() => {}
            }
            if let Some(t) = last {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until((t + self.settings.cooldown).into()) => {}
                }
            }
            let Some((hash, keys)) = queue.take() else {
                continue;
            };
            let now = Instant::now();
            history.retain(|t| now.duration_since(*t) < self.settings.window);
            if !tripped && history.len() >= self.settings.max_actions as usize {
                tripped = true;
                let reason = format!(
                    "restart-loop breaker tripped: {} actions within {}s; no further actions until the agent \
                     restarts (files keep syncing)",
                    history.len(),
                    self.settings.window.as_secs()
                );
                warn!("{reason}");
                self.telemetry.on_breaker_tripped(&reason);
            }
            if tripped {
                for spec in &self.settings.specs {
                    self.telemetry
                        .on_action(spec.kind(), "skipped", "breaker tripped");
                }
                queue.settled();
                continue;
            }
            history.push_back(now);
            let ctx = ActionContext {
                environment: self.environment.clone(),
                hash,
                changed_keys: keys.into_iter().collect(),
            };
            self.execute(&ctx).await;
            // The cooldown counts from the end of a run (a restart with a grace period takes a while).
            last = Some(Instant::now());
            queue.settled();
        }
    }

    /// Run every action once, in order; failures are logged and counted, and do not stop the others.
    pub async fn execute(&self, ctx: &ActionContext) -> bool {
        let mut all_ok = true;
        for spec in &self.settings.specs {
            match self.run_one(spec, ctx).await {
                Ok(summary) => {
                    info!(action = spec.kind(), hash = %ctx.hash.get(..12).unwrap_or_default(), "{summary}");
                    self.telemetry.on_action(spec.kind(), "ok", &summary);
                }
                Err(e) => {
                    all_ok = false;
                    warn!(action = spec.kind(), "action failed: {e}");
                    self.telemetry.on_action(spec.kind(), "error", &e.0);
                }
            }
        }
        all_ok
    }

    async fn run_one(&self, spec: &ActionSpec, ctx: &ActionContext) -> Result<String, ActionError> {
        let names = |p: &[process::Process]| process::bounded_list(p, ", ");
        match spec {
            ActionSpec::Signal(s) => {
                let name = s.signal.as_deref().unwrap_or("HUP");
                let sig = process::parse_signal(name).map_err(ActionError)?;
                let target = spec.target().unwrap_or_default();
                let done = process::signal(&target, sig)?;
                Ok(format!("sent {name} to {}", names(&done)))
            }
            ActionSpec::RestartContainer(r) => {
                let target = spec.target().unwrap_or_default();
                let grace = r.grace.map_or(Duration::from_secs(10), |g| g.0);
                let out = process::restart(&target, grace).await?;
                Ok(format!(
                    "stopped {}{}",
                    names(&out.terminated),
                    if out.killed.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; killed after {}s: {}",
                            grace.as_secs(),
                            names(&out.killed)
                        )
                    }
                ))
            }
            ActionSpec::Http(h) => {
                let status = http::call(&self.http, h, ctx).await?;
                Ok(format!("{} answered {status}", http::shown_url(&h.url)))
            }
            ActionSpec::Exec(e) => {
                let code = exec::run(e, ctx).await?;
                Ok(format!(
                    "{} exited {code}",
                    e.command.0.first().map_or("", String::as_str)
                ))
            }
            ActionSpec::RolloutRestart(_) => {
                let (client, pod) = self.cluster.as_ref().ok_or_else(|| {
                    ActionError(
                        "rollout-restart needs POD_NAME and POD_NAMESPACE and API access".into(),
                    )
                })?;
                let w = crate::cluster::workload_of(client, pod)
                    .await
                    .map_err(|e| ActionError(e.0))?;
                let patched = crate::cluster::rollout_restart(client, &w, &ctx.hash)
                    .await
                    .map_err(|e| ActionError(e.0))?;
                Ok(if patched {
                    format!(
                        "{} '{}' pod template annotated with the new config hash",
                        w.kind, w.name
                    )
                } else {
                    format!(
                        "{} '{}' already carries this config hash (another replica was first)",
                        w.kind, w.name
                    )
                })
            }
        }
    }
}
