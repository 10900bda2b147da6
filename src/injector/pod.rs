//! The parts of a pod the injector reads, as serde types: names, ports and mount paths of the
//! containers, volume names, `restartPolicy`, `securityContext.fsGroup` and the metadata. Every other
//! field of the pod is skipped unread, so the binary carries no deserializer for the whole `PodSpec`
//! tree (k8s-openapi's `Pod` with its volume sources, probes and affinities: ~0.25 MB of code, README
//! "Footprint"). The API server has already decoded and validated the object it sends; what the
//! injector adds is checked by the API server again after the patch.
//!
//! Field names and types are those of `core/v1` (the same names as k8s-openapi's `Pod`, `PodSpec`,
//! `Container`…), so a pod serialized by any client reads here unchanged; like k8s-openapi, a required
//! field that is missing or `null` reads as its default (the API server's validation names it).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A pod, as far as the injector reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Empty when absent or `null` (the API server sends a pod without containers to the webhook
    /// before its own validation names `spec.containers`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub init_containers: Option<Vec<Container>>,
    #[serde(default)]
    pub restart_policy: Option<String>,
    #[serde(default)]
    pub security_context: Option<PodSecurityContext>,
    #[serde(default)]
    pub volumes: Option<Vec<Volume>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSecurityContext {
    #[serde(default)]
    pub fs_group: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub ports: Option<Vec<ContainerPort>>,
    #[serde(default)]
    pub volume_mounts: Option<Vec<VolumeMount>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, deserialize_with = "null_as_default")]
    pub container_port: i32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    #[serde(default, deserialize_with = "null_as_default")]
    pub mount_path: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Volume {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
}

/// `null` read as the type's default, like an absent field.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_or_absent_lists_read_as_empty_and_unknown_fields_are_skipped() {
        for spec in [
            r#"{"containers": null}"#,
            r#"{}"#,
            r#"{"containers": [], "affinity": {"nodeAffinity": {}}, "volumes": null}"#,
        ] {
            let pod: Pod =
                serde_json::from_str(&format!(r#"{{"metadata": {{}}, "spec": {spec}}}"#))
                    .unwrap_or_else(|e| panic!("{spec}: {e}"));
            let spec = pod.spec.expect("spec");
            assert!(spec.containers.is_empty());
            assert!(spec.volumes.is_none());
        }
        // Required fields missing or null read as their defaults, as with k8s-openapi.
        let pod: Pod = serde_json::from_str(
            r#"{"spec": {"containers": [{"image": "x", "ports": [{"containerPort": null}], "volumeMounts": [{"name": "v"}]}], "volumes": [{"emptyDir": {}}]}}"#,
        )
        .expect("pod with missing required fields");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.containers[0].name, "");
        assert_eq!(spec.volumes.expect("volumes")[0].name, "");
        let pod: Pod = serde_json::from_str(
            r#"{"spec": {"containers": [{"name": "app", "image": "x", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]}}"#,
        )
        .expect("pod");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.containers[0].name, "app");
        assert_eq!(
            spec.containers[0]
                .volume_mounts
                .as_deref()
                .map(|m| m[0].mount_path.as_str()),
            Some("/v")
        );
    }
}
