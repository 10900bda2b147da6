//! ConfigMap and Secret outputs, written with server-side apply (field manager `osc-agent`).
//!
//! Objects carry `app.kubernetes.io/managed-by: osc-agent` and the content hash in the annotation
//! `osc-agent.io/content-hash`; when the hash is unchanged there is no API write at all (one read at
//! start, then the hash is remembered). Conflicts with another field manager are reported, not forced,
//! unless `--force-conflicts`. Objects above the 1 MiB API limit are refused with the largest keys named.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::{Map, Value};

use super::SinkError;
use crate::cluster::{self, ClusterError};
use crate::config::{KubeObjects, PodRef};
use crate::render::ObjectPayload;

pub const FIELD_MANAGER: &str = "osc-agent";
pub const HASH_ANNOTATION: &str = "osc-agent.io/content-hash";
/// The API server's limit on the data of one ConfigMap or Secret.
pub const MAX_OBJECT_DATA: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ConfigMap,
    Secret,
}

impl Kind {
    fn resource(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmaps",
            Kind::Secret => "secrets",
        }
    }

    /// Group, version and kind of the objects. Both kinds go through one untyped client
    /// (`Api<DynamicObject>`, as `rollout-restart` does): one copy of the request and response code in
    /// the binary instead of one per kind.
    fn api_resource(self) -> ApiResource {
        match self {
            Kind::ConfigMap => ApiResource::erase::<ConfigMap>(&()),
            Kind::Secret => ApiResource::erase::<Secret>(&()),
        }
    }

    /// One value of the object's `data` as the API holds it: text in a ConfigMap (invalid UTF-8
    /// replaced), base64 in a Secret.
    fn encode(self, value: &[u8]) -> String {
        match self {
            Kind::ConfigMap => String::from_utf8_lossy(value).into_owned(),
            Kind::Secret => base64::engine::general_purpose::STANDARD.encode(value),
        }
    }
}

/// Where the rendered entries go in the cluster.
pub struct ObjectSink {
    client: kube::Client,
    namespace: String,
    targets: Vec<(Kind, String)>,
    force: bool,
    environment: String,
    owner: Option<OwnerReference>,
    /// Content hash known to be in each object (`kind/name`).
    applied: Mutex<HashMap<String, String>>,
    /// An object already carried our hash annotation (an earlier run's output) when first checked.
    found_earlier: AtomicBool,
}

impl std::fmt::Debug for ObjectSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSink")
            .field("namespace", &self.namespace)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl ObjectSink {
    /// Connect, when a ConfigMap or Secret is configured. Namespace: `--namespace`, else the pod's, else
    /// the kubeconfig's.
    pub async fn connect(
        objects: &KubeObjects,
        pod: Option<&PodRef>,
        environment: &str,
    ) -> Result<Option<ObjectSink>, ClusterError> {
        if !objects.any() {
            return Ok(None);
        }
        let client = cluster::client().await?;
        let namespace = objects
            .namespace
            .clone()
            .or_else(|| pod.map(|p| p.namespace.clone()))
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let owner = match (objects.owner_reference, pod) {
            (true, Some(pod)) => {
                let mut r = cluster::workload_of(&client, pod).await?.reference;
                // Owned for garbage collection only: a controller or blockOwnerDeletion reference needs
                // extra permissions where OwnerReferencesPermissionEnforcement is on.
                r.controller = None;
                r.block_owner_deletion = None;
                Some(r)
            }
            _ => None,
        };
        let mut targets = vec![];
        if let Some(n) = &objects.configmap {
            targets.push((Kind::ConfigMap, n.clone()));
        }
        if let Some(n) = &objects.secret {
            targets.push((Kind::Secret, n.clone()));
        }
        Ok(Some(ObjectSink {
            client,
            namespace,
            targets,
            force: objects.force_conflicts,
            environment: environment.to_owned(),
            owner,
            applied: Mutex::new(HashMap::new()),
            found_earlier: AtomicBool::new(false),
        }))
    }

    /// Apply the payload to every configured object; returns the objects that changed.
    pub async fn apply(&self, payload: &ObjectPayload) -> (Vec<String>, Vec<SinkError>) {
        let mut changed = vec![];
        let mut errors = vec![];
        if let Err(e) = size_guard(payload) {
            for (kind, name) in &self.targets {
                errors.push(self.error(*kind, name, e.clone()));
            }
            return (changed, errors);
        }
        for (kind, name) in &self.targets {
            if super::aborting() {
                // Shutting down: objects not yet applied keep their content (like files).
                break;
            }
            match self.apply_one(*kind, name, payload).await {
                Ok(true) => changed.push(self.describe(*kind, name)),
                Ok(false) => {}
                Err(reason) => errors.push(self.error(*kind, name, reason)),
            }
        }
        (changed, errors)
    }

    fn describe(&self, kind: Kind, name: &str) -> String {
        format!("{}/{}/{name}", kind.resource(), self.namespace)
    }

    fn error(&self, kind: Kind, name: &str, reason: String) -> SinkError {
        SinkError {
            path: self.describe(kind, name).into(),
            what: "not applied".into(),
            reason,
        }
    }

    async fn apply_one(
        &self,
        kind: Kind,
        name: &str,
        payload: &ObjectPayload,
    ) -> Result<bool, String> {
        let id = self.describe(kind, name);
        let remembered = self.applied.lock().ok().and_then(|m| m.get(&id).cloned());
        let from_live = remembered.is_none();
        let known = match remembered {
            Some(h) => Some(h),
            None => {
                let live = self.current_hash(kind, name).await?;
                if live.is_some() {
                    self.found_earlier.store(true, Ordering::Relaxed);
                }
                live
            }
        };
        if known.as_deref() == Some(payload.hash.as_str()) {
            self.remember(&id, &payload.hash);
            return Ok(false);
        }
        // An object of an earlier run with another hash: the same data under another hashing key (the
        // user key was rotated, or a release with another hash) is re-annotated, not a content change.
        let same_data = from_live && known.is_some() && self.holds(kind, name, payload).await?;
        let meta = self.metadata(name, &payload.hash);
        let params = if self.force {
            PatchParams::apply(FIELD_MANAGER).force()
        } else {
            PatchParams::apply(FIELD_MANAGER)
        };
        let data: Map<String, Value> = payload
            .data
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(kind.encode(v))))
            .collect();
        let mut obj = DynamicObject::new(name, &kind.api_resource());
        obj.metadata = meta;
        obj.data = match kind {
            Kind::ConfigMap => serde_json::json!({ "data": data }),
            Kind::Secret => serde_json::json!({ "data": data, "type": "Opaque" }),
        };
        let result = self
            .api(kind)
            .patch(name, &params, &Patch::Apply(&obj))
            .await
            .map(drop);
        match result {
            Ok(()) => {
                self.remember(&id, &payload.hash);
                Ok(!same_data)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Err(format!(
                "conflict with another field manager ({}); it was not overwritten: pass --force-conflicts \
                 to take the fields over",
                s.message
            )),
            Err(e) => Err(cluster::explain(&e, "patch", kind.resource(), &self.namespace).0),
        }
    }

    fn remember(&self, id: &str, hash: &str) {
        if let Ok(mut m) = self.applied.lock() {
            m.insert(id.to_owned(), hash.to_owned());
        }
    }

    /// Whether an object was already managed by an earlier run (like existing files, this makes the
    /// first change of this run an ordinary change, acted on).
    pub fn found_earlier(&self) -> bool {
        self.found_earlier.load(Ordering::Relaxed)
    }

    /// Forget which content the objects hold, so the next apply reads their metadata again (a periodic
    /// resync thus recreates an object someone deleted, and repairs a changed hash annotation).
    pub fn forget_applied(&self) {
        if let Ok(mut m) = self.applied.lock() {
            m.clear();
        }
    }

    /// Whether the live object's data is exactly `payload`'s (read only when the hash annotation differs
    /// from an earlier run's, so a Secret's data crosses the wire only then).
    async fn holds(&self, kind: Kind, name: &str, payload: &ObjectPayload) -> Result<bool, String> {
        let explain =
            |e: kube::Error| cluster::explain(&e, "get", kind.resource(), &self.namespace).0;
        let live = self.api(kind).get_opt(name).await.map_err(explain)?;
        Ok(live
            .as_ref()
            .and_then(|o| o.data.get("data"))
            .and_then(Value::as_object)
            .is_some_and(|live| {
                live.len() == payload.data.len()
                    && payload.data.iter().all(|(k, v)| {
                        live.get(k).and_then(Value::as_str) == Some(kind.encode(v).as_str())
                    })
            }))
    }

    /// The hash annotation of the live object (`None` if it does not exist yet).
    async fn current_hash(&self, kind: Kind, name: &str) -> Result<Option<String>, String> {
        // Metadata only: the Secret's data never has to cross the wire (or reach a client log).
        let meta = self
            .api(kind)
            .get_metadata_opt(name)
            .await
            .map(|o| o.map(|o| o.metadata))
            .map_err(|e| cluster::explain(&e, "get", kind.resource(), &self.namespace).0)?;
        Ok(meta
            .and_then(|m| m.annotations)
            .and_then(|a| a.get(HASH_ANNOTATION).cloned()))
    }

    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &kind.api_resource())
    }

    fn metadata(&self, name: &str, hash: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace.clone()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "osc-agent".to_owned(),
                ),
                (
                    cluster::ENVIRONMENT_KEY.to_owned(),
                    label_value(&self.environment),
                ),
            ])),
            annotations: Some(BTreeMap::from([(
                HASH_ANNOTATION.to_owned(),
                hash.to_owned(),
            )])),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..Default::default()
        }
    }
}

/// A label value is at most 63 characters of `[-_.A-Za-z0-9]`, alphanumeric at both ends.
fn label_value(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// Refuse data above the API limit, naming the largest keys.
fn size_guard(payload: &ObjectPayload) -> Result<(), String> {
    let total: usize = payload.data.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total <= MAX_OBJECT_DATA {
        return Ok(());
    }
    let mut sizes: Vec<(&String, usize)> = payload.data.iter().map(|(k, v)| (k, v.len())).collect();
    sizes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let largest: Vec<String> = sizes
        .iter()
        .take(3)
        .map(|(k, n)| format!("'{}' ({n} bytes)", crate::util::Escaped(k)))
        .collect();
    Err(format!(
        "the data is {total} bytes, above the 1 MiB limit of a ConfigMap/Secret; largest keys: {}; \
         split the data with --include/--exclude or use --output-dir",
        largest.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_guard_names_the_largest_keys() {
        let payload = ObjectPayload {
            data: BTreeMap::from([
                ("small".to_owned(), vec![b'x'; 10]),
                ("big".to_owned(), vec![b'x'; 700 * 1024]),
                ("bigger".to_owned(), vec![b'x'; 800 * 1024]),
            ]),
            hash: String::new(),
        };
        let err = size_guard(&payload).unwrap_err();
        assert!(err.starts_with("the data is"), "{err}");
        assert!(
            err.find("'bigger'").unwrap() < err.find("'big'").unwrap(),
            "{err}"
        );
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(label_value("prod"), "prod");
        assert_eq!(label_value("my env/ü"), "my_env");
        assert_eq!(label_value(&"a".repeat(80)).len(), 63);
    }
}
