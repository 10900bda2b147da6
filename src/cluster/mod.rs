//! Cluster: the Kubernetes API as the agent uses it. A client (in-cluster config in a pod, kubeconfig
//! otherwise), this pod's labels and annotations (environment discovery), its owner chain (Pod →
//! ReplicaSet → Deployment, or StatefulSet/DaemonSet) and the rollout-restart patch.
//!
//! Only stable core/v1 and apps/v1 APIs are used, so old API servers work too. Pods and ReplicaSets are
//! read as metadata only (`PartialObjectMetadata`), and workloads as untyped objects: the agent needs a
//! few fields of each, and every typed object read here would link one more copy of the large
//! k8s-openapi deserializers into the binary (README "Footprint").

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use tracing::info;

use crate::config::{ConfigError, PodRef, setting};

/// Annotation or label naming the environment on a pod.
pub const ENVIRONMENT_KEY: &str = "osc-agent.io/environment";
/// Pod-template annotation patched by rollout-restart.
pub const CONFIG_HASH_ANNOTATION: &str = "osc-agent.io/config-hash";

/// A Kubernetes API call failed. Says which call and what permission would fix a 403.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClusterError(pub String);

/// Describe a kube error for `verb resource`, with an RBAC hint on 403.
pub fn explain(e: &kube::Error, verb: &str, resource: &str, namespace: &str) -> ClusterError {
    match e {
        kube::Error::Api(status) if status.code == 403 => ClusterError(format!(
            "forbidden to {verb} {resource} in namespace '{namespace}': {}; grant the verb '{verb}' on \
             '{resource}' to the agent's ServiceAccount (see the RBAC section of the README)",
            status.message
        )),
        kube::Error::Api(status) => ClusterError(format!(
            "cannot {verb} {resource} in namespace '{namespace}': HTTP {} {}",
            status.code, status.message
        )),
        other => ClusterError(format!(
            "cannot {verb} {resource} in namespace '{namespace}': {}",
            crate::util::error_chain(other)
        )),
    }
}

/// In-cluster configuration when running in a pod, the kubeconfig (`$KUBECONFIG`) otherwise.
pub async fn client() -> Result<kube::Client, ClusterError> {
    crate::source::install_crypto_provider();
    kube::Client::try_default().await.map_err(|e| {
        ClusterError(format!(
            "no Kubernetes API access (in-cluster config or $KUBECONFIG): {}",
            crate::util::error_chain(&e)
        ))
    })
}

/// The environment from the pod's annotation, else its label `osc-agent.io/environment`.
pub async fn environment_of_pod(
    client: &kube::Client,
    pod: &PodRef,
) -> Result<Option<(String, &'static str)>, ClusterError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let p = api
        .get_metadata(&pod.name)
        .await
        .map_err(|e| explain(&e, "get", "pods", &pod.namespace))?;
    let meta = p.metadata;
    let pick = |m: Option<&std::collections::BTreeMap<String, String>>| {
        m.and_then(|m| m.get(ENVIRONMENT_KEY))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    Ok(pick(meta.annotations.as_ref())
        .map(|v| (v, "pod annotation osc-agent.io/environment"))
        .or_else(|| pick(meta.labels.as_ref()).map(|v| (v, "pod label osc-agent.io/environment"))))
}

/// Fill in `--environment` from the pod when it was not given; log where it came from.
pub async fn resolve_environment(args: &mut crate::config::AgentArgs) -> Result<(), ConfigError> {
    if args
        .environment
        .as_deref()
        .is_some_and(|e| !e.trim().is_empty())
    {
        info!(
            environment = args.environment.as_deref().unwrap_or_default(),
            source = "--environment / $OSC_ENVIRONMENT / config file",
            "environment chosen"
        );
        return Ok(());
    }
    let (Some(name), Some(namespace)) = (args.pod_name.clone(), args.pod_namespace.clone()) else {
        return Ok(()); // validation reports the missing environment
    };
    let pod = PodRef { name, namespace };
    let client = client().await.map_err(|e| ConfigError(e.0))?;
    match environment_of_pod(&client, &pod).await {
        Ok(Some((env, source))) => {
            info!(environment = %env, source, pod = %pod.name, "environment chosen");
            args.environment = Some(env);
            Ok(())
        }
        Ok(None) => Err(ConfigError(format!(
            "{} is not set and pod '{}' has no annotation or label {ENVIRONMENT_KEY}",
            setting("environment"),
            pod.name
        ))),
        Err(e) => Err(ConfigError(format!(
            "{} is not set and the pod's own environment could not be read: {e}",
            setting("environment")
        ))),
    }
}

/// The workload that owns a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub reference: OwnerReference,
}

fn controller(refs: Option<&Vec<OwnerReference>>) -> Option<OwnerReference> {
    refs?.iter().find(|r| r.controller == Some(true)).cloned()
}

/// Pod → ReplicaSet → Deployment, or Pod → StatefulSet/DaemonSet.
pub async fn workload_of(client: &kube::Client, pod: &PodRef) -> Result<Workload, ClusterError> {
    let ns = &pod.namespace;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p = pods
        .get_metadata(&pod.name)
        .await
        .map_err(|e| explain(&e, "get", "pods", ns))?;
    let owner = controller(p.metadata.owner_references.as_ref()).ok_or_else(|| {
        ClusterError(format!(
            "pod '{}' has no controller (a bare pod cannot be rolled out)",
            pod.name
        ))
    })?;
    let owner = if owner.kind == "ReplicaSet" && owner.api_version == "apps/v1" {
        let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
        let r = rs
            .get_metadata(&owner.name)
            .await
            .map_err(|e| explain(&e, "get", "replicasets", ns))?;
        controller(r.metadata.owner_references.as_ref()).ok_or_else(|| {
            ClusterError(format!(
                "ReplicaSet '{}' has no owning Deployment",
                owner.name
            ))
        })?
    } else {
        owner
    };
    match owner.kind.as_str() {
        "Deployment" | "StatefulSet" | "DaemonSet" if owner.api_version == "apps/v1" => {
            Ok(Workload {
                kind: owner.kind.clone(),
                name: owner.name.clone(),
                namespace: ns.clone(),
                reference: owner,
            })
        }
        other => Err(ClusterError(format!(
            "pod '{}' is owned by a {other} ({}); rollout-restart supports apps/v1 Deployment, StatefulSet \
             and DaemonSet",
            pod.name, owner.api_version
        ))),
    }
}

/// Set the pod-template annotation `osc-agent.io/config-hash` to `hash`. Every replica patches the same
/// value, so one rollout happens, not one per replica. Returns false when it already had that value.
pub async fn rollout_restart(
    client: &kube::Client,
    w: &Workload,
    hash: &str,
) -> Result<bool, ClusterError> {
    let patch = serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {CONFIG_HASH_ANNOTATION: hash}}}}
    });
    let (resource, plural) = match w.kind.as_str() {
        "Deployment" => (ApiResource::erase::<Deployment>(&()), "deployments"),
        "StatefulSet" => (ApiResource::erase::<StatefulSet>(&()), "statefulsets"),
        "DaemonSet" => (ApiResource::erase::<DaemonSet>(&()), "daemonsets"),
        other => return Err(ClusterError(format!("cannot roll out a {other}"))),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &w.namespace, &resource);
    let current = api
        .get(&w.name)
        .await
        .map_err(|e| explain(&e, "get", plural, &w.namespace))?;
    let existing = current
        .data
        .pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
        .and_then(|v| v.as_str());
    if existing == Some(hash) {
        return Ok(false);
    }
    api.patch(&w.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| explain(&e, "patch", plural, &w.namespace))?;
    Ok(true)
}
