//! AdmissionReview v1 (`admission.k8s.io/v1`) around [`mutate`]: the few fields the webhook reads and
//! writes, and the answer to one review. Pure: the HTTPS server only moves bytes.

use base64::Engine as _;

use super::{InjectorDefaults, Pod, mutate};

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AdmissionRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<AdmissionResponse>,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    #[serde(default)]
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub operation: Option<String>,
    /// The pod as sent, parsed (as [`Pod`]: the fields the injector reads) only once the request is
    /// known to be a pod's CREATE.
    #[serde(default)]
    pub object: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// Base64 of the JSONPatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct Status {
    pub code: u16,
    pub message: String,
}

/// What happened to one review (the `result` label of `osc_injector_admissions_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Patched.
    Injected,
    /// Allowed unchanged: not asked, already injected, excluded namespace, not a pod.
    Skipped,
    /// Refused: an invalid annotation.
    Denied,
    /// Refused: the review itself could not be read.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// The answer to `review`, and what it was. A review without a request is an [`Outcome::Error`] with an
/// empty uid (the API server never sends one).
pub fn respond(
    review: &AdmissionReview,
    defaults: &InjectorDefaults,
) -> (AdmissionReview, Outcome) {
    let (response, outcome) = match &review.request {
        None => (
            refuse(String::new(), 400, "no request in the AdmissionReview"),
            Outcome::Error,
        ),
        Some(req) => answer(req, defaults),
    };
    (
        AdmissionReview {
            api_version: "admission.k8s.io/v1".into(),
            kind: "AdmissionReview".into(),
            request: None,
            response: Some(response),
        },
        outcome,
    )
}

fn refuse(uid: String, code: u16, message: impl Into<String>) -> AdmissionResponse {
    AdmissionResponse {
        uid,
        allowed: false,
        status: Some(Status {
            code,
            message: message.into(),
        }),
        patch_type: None,
        patch: None,
    }
}

fn allow(uid: String) -> AdmissionResponse {
    AdmissionResponse {
        uid,
        allowed: true,
        status: None,
        patch_type: None,
        patch: None,
    }
}

fn answer(req: &AdmissionRequest, defaults: &InjectorDefaults) -> (AdmissionResponse, Outcome) {
    let uid = req.uid.clone();
    let is_pod = req.kind.kind == "Pod" && req.kind.group.is_empty();
    if !is_pod || req.operation.as_deref().is_some_and(|o| o != "CREATE") {
        return (allow(uid), Outcome::Skipped);
    }
    let Some(object) = &req.object else {
        return (allow(uid), Outcome::Skipped);
    };
    let pod: Pod = match serde_json::from_slice(object.get().as_bytes()) {
        Ok(p) => p,
        Err(e) => {
            return (
                refuse(
                    uid,
                    400,
                    // serde's message may quote a field's value (an env var's, say): never echoed.
                    format!(
                        "osc-agent injector cannot read the pod: {}",
                        crate::util::json_error_position(&e)
                    ),
                ),
                Outcome::Error,
            );
        }
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    match mutate(&pod, &namespace, defaults) {
        Ok(None) => (allow(uid), Outcome::Skipped),
        Ok(Some(ops)) => match serde_json::to_vec(&ops) {
            Ok(bytes) => (
                AdmissionResponse {
                    uid,
                    allowed: true,
                    status: None,
                    patch_type: Some("JSONPatch".into()),
                    patch: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                },
                Outcome::Injected,
            ),
            Err(e) => (
                refuse(
                    uid,
                    500,
                    format!("osc-agent injector cannot encode its patch: {e}"),
                ),
                Outcome::Error,
            ),
        },
        Err(denial) => (
            refuse(uid, 400, format!("osc-agent injector: {denial}")),
            Outcome::Denied,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn review(object: Value) -> AdmissionReview {
        serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "web",
                "operation": "CREATE",
                "object": object,
            }
        }))
        .unwrap()
    }

    fn defaults() -> InjectorDefaults {
        InjectorDefaults {
            server: Some("https://osc.example:9000".into()),
            ..Default::default()
        }
    }

    #[test]
    fn injects_denies_and_skips() {
        let pod = |ann: Value| json!({"metadata": {"annotations": ann}, "spec": {"containers": [{"name": "app"}]}});
        let (out, outcome) = respond(
            &review(pod(json!({
                "osc-agent.io/inject": "true",
                "osc-agent.io/environment": "production",
                "osc-agent.io/credentials-secret": "osc-credentials",
            }))),
            &defaults(),
        );
        assert_eq!(outcome, Outcome::Injected);
        let r = out.response.unwrap();
        assert!(r.allowed);
        assert_eq!(r.uid, "u-1");
        assert_eq!(r.patch_type.as_deref(), Some("JSONPatch"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r.patch.unwrap())
            .unwrap();
        let ops: Vec<json_patch::PatchOperation> = serde_json::from_slice(&bytes).unwrap();
        assert!(!ops.is_empty());

        let (out, outcome) = respond(
            &review(pod(json!({"osc-agent.io/inject": "yes please"}))),
            &defaults(),
        );
        assert_eq!(outcome, Outcome::Denied);
        let r = out.response.unwrap();
        assert!(!r.allowed);
        assert!(r.status.unwrap().message.contains("osc-agent.io/inject"));

        let (out, outcome) = respond(&review(pod(json!({}))), &defaults());
        assert_eq!(outcome, Outcome::Skipped);
        assert!(out.response.unwrap().allowed);

        let (out, outcome) = respond(&review(json!({"spec": "not a pod spec"})), &defaults());
        assert_eq!(outcome, Outcome::Error);
        assert!(!out.response.unwrap().allowed);

        // A pod the injector cannot read: the denial names where, never a value from the pod.
        let bad = json!({"spec": {"containers": [{"name": "app", "ports": [{"containerPort": "s3cr3t-token"}]}]}});
        let (out, outcome) = respond(&review(bad), &defaults());
        assert_eq!(outcome, Outcome::Error);
        let message = out.response.unwrap().status.unwrap().message;
        assert!(message.contains("cannot read the pod"), "{message}");
        assert!(!message.contains("s3cr3t-token"), "{message}");
    }
}
