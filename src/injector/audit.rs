//! Pods that asked for the agent but run without it.
//!
//! With `failurePolicy: Ignore`, the API server creates a pod unchanged when no injector answers (all
//! replicas down, a timeout, a network fault) and says so only in its audit log. The audit makes that
//! visible: every `--audit-interval` it lists the pods' metadata in every namespace (pages of
//! [`PAGE`]; needs `list` on pods, cluster-wide) and counts the pods annotated `osc-agent.io/inject:
//! "true"`, outside the excluded namespaces, without `osc-agent.io/status: injected`:
//! `osc_injector_pods_without_agent` is that count, and each such pod gets one `Warning` Event
//! `AgentNotInjected` (needs `create` on events; once per pod and injector process) and one log line.
//! The remedy is to delete the pod (its controller makes a new one, which is injected).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use super::annotations::{INJECTED, PREFIX, parse_bool};
use super::mutate::InjectorDefaults;
use crate::util::escape;

/// Pods per list call (metadata only, but with managedFields: kept small for a 64 MiB pod).
pub const PAGE: u32 = 100;

/// Shortest interval between two audits.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Which pods the webhook sees: label selectors (`?labelSelector=` syntax), empty for all.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pub namespace_selector: String,
    pub pod_selector: String,
}

/// Reason of the Events the audit writes.
pub const REASON: &str = "AgentNotInjected";

/// The audit's metrics (registered with the injector's).
#[derive(Clone, Default)]
pub struct AuditMetrics {
    /// Pods found without the agent at the last complete pass.
    pub without_agent: Gauge,
    /// Passes by result (`ok`, `error`).
    pub runs: Family<Vec<(String, String)>, Counter>,
}

/// Whether a pod (by its metadata) asked for the agent and did not get it.
pub fn missing_agent(meta: &ObjectMeta, defaults: &InjectorDefaults) -> bool {
    let Some(namespace) = meta.namespace.as_deref() else {
        return false;
    };
    if defaults.excludes(namespace) || meta.deletion_timestamp.is_some() {
        return false;
    }
    let ann = |name: &str| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(&format!("{PREFIX}{name}")))
    };
    // An invalid value counts too: the injector would have denied the pod, which exists anyway.
    let wants = ann("inject").is_some_and(|v| !matches!(parse_bool("inject", v), Ok(false)));
    wants && ann("status").map(|s| s.trim()) != Some(INJECTED)
}

/// Runs passes every `interval` until `cancel`. A pass that fails (no permission, API server away) is
/// logged (once until one succeeds) and counted; the gauge keeps the last complete pass's value.
pub async fn run(
    client: kube::Client,
    interval: Duration,
    scope: Scope,
    defaults: Arc<InjectorDefaults>,
    metrics: AuditMetrics,
    cancel: CancellationToken,
) {
    let interval = interval.max(MIN_INTERVAL);
    let mut reported: HashSet<String> = HashSet::new();
    let client = &client;
    let mut failing = false;
    loop {
        match pass(client, &scope, &defaults).await {
            Ok(missing) => {
                failing = false;
                metrics
                    .without_agent
                    .set(i64::try_from(missing.len()).unwrap_or(i64::MAX));
                metrics
                    .runs
                    .get_or_create(&vec![("result".into(), "ok".into())])
                    .inc();
                // Forget pods that are gone (or were replaced), so the set stays bounded.
                let now: HashSet<&str> = missing.iter().map(|p| p.uid.as_str()).collect();
                reported.retain(|uid| now.contains(uid.as_str()));
                for pod in &missing {
                    if reported.contains(&pod.uid) {
                        continue;
                    }
                    tracing::warn!(
                        namespace = %escape(&pod.namespace),
                        pod = %escape(&pod.name),
                        "injector: pod asked for the agent (osc-agent.io/inject) but runs without it: created while no injector answered (failurePolicy: Ignore); delete it to get the agent"
                    );
                    match record(client, pod).await {
                        // Written, or already there: not again. A failure is tried at the next pass.
                        Ok(()) => {
                            reported.insert(pod.uid.clone());
                        }
                        Err(e) => tracing::warn!(
                            namespace = %escape(&pod.namespace),
                            "injector: cannot write the {REASON} event: {}",
                            crate::cluster::explain(&e, "create", "events", &pod.namespace)
                        ),
                    }
                }
            }
            Err(e) => {
                metrics
                    .runs
                    .get_or_create(&vec![("result".into(), "error".into())])
                    .inc();
                if !failing {
                    tracing::warn!(
                        "injector: cannot list pods to find those created without the agent: {}",
                        crate::cluster::explain(&e, "list", "pods", "(all namespaces)")
                    );
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

struct Missing {
    namespace: String,
    name: String,
    uid: String,
}

async fn pass(
    client: &kube::Client,
    scope: &Scope,
    defaults: &InjectorDefaults,
) -> Result<Vec<Missing>, kube::Error> {
    // The namespaces the webhook sees (all when there is no selector).
    let namespaces: Option<HashSet<String>> = if scope.namespace_selector.is_empty() {
        None
    } else {
        let api: Api<Namespace> = Api::all(client.clone());
        let mut names = HashSet::new();
        let mut params = ListParams::default()
            .labels(&scope.namespace_selector)
            .limit(PAGE);
        loop {
            let page = api.list_metadata(&params).await?;
            names.extend(page.items.into_iter().filter_map(|n| n.metadata.name));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break Some(names),
            }
        }
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let mut missing = Vec::new();
    let mut params = ListParams::default().limit(PAGE);
    if !scope.pod_selector.is_empty() {
        params = params.labels(&scope.pod_selector);
    }
    loop {
        let page = pods.list_metadata(&params).await?;
        for pod in page.items {
            let meta = pod.metadata;
            let seen = namespaces
                .as_ref()
                .is_none_or(|n| meta.namespace.as_ref().is_some_and(|ns| n.contains(ns)));
            if seen && missing_agent(&meta, defaults) {
                missing.push(Missing {
                    namespace: meta.namespace.unwrap_or_default(),
                    name: meta.name.unwrap_or_default(),
                    uid: meta.uid.unwrap_or_default(),
                });
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(missing),
        }
    }
}

/// Writes the pod's Event, unless one is there already (another replica's, or an earlier run's).
async fn record(client: &kube::Client, pod: &Missing) -> Result<(), kube::Error> {
    // Untyped (the API server answers a create with the whole Event, which is not read): no Event
    // deserializer in the binary for one write.
    let resource = ApiResource::erase::<Event>(&());
    let events: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &pod.namespace, &resource);
    let existing = events
        .list_metadata(
            &ListParams::default()
                .fields(&format!("involvedObject.uid={},reason={REASON}", pod.uid))
                .limit(1),
        )
        .await?;
    if !existing.items.is_empty() {
        return Ok(());
    }
    let now = Time(jiff::Timestamp::now());
    let mut event = DynamicObject::new("", &resource).within(&pod.namespace);
    event.metadata.name = None;
    event.metadata.generate_name = Some(format!("{}.", pod.name));
    event.data = serde_json::json!({
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
        },
        "reason": REASON,
        "message": "this pod asked for osc-agent (osc-agent.io/inject) but was created while no injector answered \
             (failurePolicy: Ignore): it runs without the agent and its files. Delete it to get a pod with the agent.",
        "type": "Warning",
        "source": {"component": "osc-agent-injector"},
        "reportingComponent": "osc-agent.io/injector",
        "reportingInstance": std::env::var("HOSTNAME").unwrap_or_else(|_| "osc-agent-injector".into()),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": MicroTime(now.0),
        "action": "Audit",
        "count": 1,
    });
    events
        .create(&PostParams::default(), &event)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(ns: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn only_annotated_uninjected_pods_outside_excluded_namespaces_count() {
        let defaults = InjectorDefaults {
            own_namespace: Some("osc".into()),
            excluded_namespaces: vec!["legacy".into()],
            ..Default::default()
        };
        assert!(missing_agent(
            &meta("app", &[("inject", "true")]),
            &defaults
        ));
        assert!(missing_agent(&meta("app", &[("inject", "yes")]), &defaults));
        assert!(!missing_agent(
            &meta("app", &[("inject", "true"), ("status", "injected")]),
            &defaults
        ));
        assert!(!missing_agent(
            &meta("app", &[("inject", "false")]),
            &defaults
        ));
        assert!(!missing_agent(&meta("app", &[]), &defaults));
        for excluded in ["osc", "kube-system", "legacy"] {
            assert!(!missing_agent(
                &meta(excluded, &[("inject", "true")]),
                &defaults
            ));
        }
        let mut leaving = meta("app", &[("inject", "true")]);
        leaving.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert!(!missing_agent(&leaving, &defaults));
    }
}
