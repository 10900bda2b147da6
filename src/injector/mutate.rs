//! The pure core of the injector: a pod and its annotations in, a JSONPatch (or a denial) out.
//!
//! What an injected pod gets (the same as the chart's pod, see `charts/osc-agent/templates/_helpers.tpl`):
//! - `osc-agent-init`, a `--once` init container placed first in `initContainers` (so the app and any
//!   other init container start with the files present), unless native sidecars are used;
//! - `osc-agent`, the long-running sidecar appended to `containers`, or with native sidecars the same
//!   container first in `initContainers` with `restartPolicy: Always` and a startup probe on `/readyz`;
//!   none with `init-only`;
//! - the volumes `osc-agent-output` (a memory-backed `emptyDir` mounted into the selected app containers,
//!   read-only), `osc-agent-credentials` (the credentials Secret) and, with templates,
//!   `osc-agent-templates` (a projected volume of the template ConfigMap and the pod's own `template-*`
//!   annotations). A name the pod already uses gets a `-2`, `-3`… suffix;
//! - `shareProcessNamespace: true` and the `KILL` capability only for `signal`/`restart-container` actions;
//! - the annotation `osc-agent.io/status: injected`, so a second pass (reinvocation) changes nothing.
//!
//! The agent containers run as UID/GID 65532, non-root, with a read-only root filesystem, no privilege
//! escalation, every capability dropped and the RuntimeDefault seccomp profile. Pod-level settings of the
//! app (`securityContext`, `fsGroup`) are left alone: without an `fsGroup` the files and the credentials are
//! made readable by any user of the pod's containers (mode `0444`) since the app may run as another user;
//! with one they are `0440`, readable through the group.
//!
//! Before answering, the agent arguments generated for both containers are parsed by the agent's own
//! command line and checked by [`Settings::validate`], so a bad combination is denied at admission
//! instead of crash-looping in the pod.

use std::collections::{BTreeMap, BTreeSet};

use clap::{Args as _, FromArgMatches as _};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Probe, ResourceRequirements, SeccompProfile, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::Pod;
use super::annotations::{self, INJECTED, PREFIX, Request};
use crate::config::{AgentArgs, Files, Settings, setting};

/// Why a pod asking for injection is refused. The message names the annotation at fault; it is shown to
/// whoever created the pod (`kubectl apply`, or the ReplicaSet's events).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denial {
    pub message: String,
}

impl Denial {
    pub fn new(message: impl Into<String>) -> Denial {
        Denial {
            message: message.into(),
        }
    }
}

/// The injector's own settings: what a pod gets unless its annotations say otherwise.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct InjectorDefaults {
    /// The agent image.
    pub image: String,
    pub image_pull_policy: String,
    /// OpenSecureConf server URL for pods without `osc-agent.io/server`.
    pub server: Option<String>,
    /// Credentials Secret for pods without `osc-agent.io/credentials-secret`.
    pub credentials_secret: Option<String>,
    /// The injector's own namespace: never mutated.
    pub own_namespace: Option<String>,
    /// More namespaces never mutated (`kube-system` always is).
    pub excluded_namespaces: Vec<String>,
    /// Native sidecars (an init container with `restartPolicy: Always`, Kubernetes ≥ 1.29) unless the
    /// pod's `osc-agent.io/native-sidecar` says otherwise.
    pub native_sidecar: bool,
    /// The agent's admin port (probes, metrics).
    pub admin_port: u16,
    /// Where the files appear, unless `osc-agent.io/mount-path` is set.
    pub mount_path: String,
    /// Size limit of the output `emptyDir`.
    pub size_limit: String,
    /// The agent containers' resources, unless `osc-agent.io/resources` is set.
    #[serde(skip)]
    pub resources: ResourceRequirements,
}

impl Default for InjectorDefaults {
    fn default() -> Self {
        let q = |s: &str| Quantity(s.to_owned());
        InjectorDefaults {
            image: format!("ghcr.io/osc-agent/osc-agent:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            server: None,
            credentials_secret: None,
            own_namespace: None,
            excluded_namespaces: Vec::new(),
            native_sidecar: false,
            admin_port: 8081,
            mount_path: "/config".into(),
            size_limit: "16Mi".into(),
            resources: ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".into(), q("5m")),
                    ("memory".into(), q("16Mi")),
                ])),
                limits: Some(BTreeMap::from([("memory".into(), q("64Mi"))])),
                ..Default::default()
            },
        }
    }
}

impl InjectorDefaults {
    /// Whether pods of `namespace` are never mutated.
    pub fn excludes(&self, namespace: &str) -> bool {
        namespace == "kube-system"
            || self.own_namespace.as_deref() == Some(namespace)
            || self.excluded_namespaces.iter().any(|n| n == namespace)
    }
}

const CREDENTIALS_DIR: &str = "/var/run/secrets/osc-agent";
const TEMPLATES_DIR: &str = "/etc/osc-agent/templates";
const AGENT_UID: i64 = 65532;

/// The patch adding the agent to `pod` (created in `namespace`), `None` when the pod does not ask for it
/// (`osc-agent.io/inject` absent or `"false"`), is already injected (`osc-agent.io/status: injected`) or
/// lives in an excluded namespace (the injector's own, `kube-system`, `--exclude-namespace`).
pub fn mutate(
    pod: &Pod,
    namespace: &str,
    defaults: &InjectorDefaults,
) -> Result<Option<Vec<PatchOperation>>, Denial> {
    if defaults.excludes(namespace) {
        return Ok(None);
    }
    let ann = |name: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(&format!("{PREFIX}{name}")))
    };
    match ann("inject") {
        None => return Ok(None),
        Some(v) => {
            if !annotations::parse_bool("inject", v)? {
                return Ok(None);
            }
        }
    }
    match ann("status").map(|s| s.trim()) {
        Some(INJECTED) => return Ok(None),
        Some(other) => {
            return Err(Denial::new(format!(
                "{PREFIX}status: '{other}': this annotation is written by the injector ({INJECTED}); remove it"
            )));
        }
        None => {}
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Err(Denial::new("the pod has no spec"));
    };
    let req = annotations::parse(pod, defaults)?;

    for (name, _) in [("osc-agent", ()), ("osc-agent-init", ())] {
        let taken = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == name);
        if taken {
            return Err(Denial::new(format!(
                "{PREFIX}inject: the pod already has a container named {name} (added by hand?): remove it or the annotation"
            )));
        }
    }
    let regular_sidecar = !req.init_only && !req.native_sidecar;
    if regular_sidecar && matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure")) {
        return Err(Denial::new(format!(
            "{PREFIX}init-only: this pod's restartPolicy is {}: a regular sidecar would keep it from ever completing; set {PREFIX}init-only: \"true\" (sync once) or {PREFIX}native-sidecar: \"true\" (Kubernetes >= 1.29)",
            spec.restart_policy.as_deref().unwrap_or_default()
        )));
    }
    if !req.init_only {
        let port = i32::from(defaults.admin_port);
        let clash = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.ports.iter().flatten().any(|p| p.container_port == port));
        if let Some(c) = clash {
            return Err(Denial::new(format!(
                "{PREFIX}inject: container {} already uses port {port}, the agent's admin port (the containers of a pod share one network namespace)",
                c.name
            )));
        }
    }

    // Which containers get the output volume: the annotation's (init containers allowed), else every
    // app container.
    let selected: Vec<String> = match &req.containers {
        Some(names) => names.clone(),
        None => spec.containers.iter().map(|c| c.name.clone()).collect(),
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| selected.contains(&c.name))
    {
        if c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path.trim_end_matches('/') == req.mount_path)
        {
            return Err(Denial::new(format!(
                "{PREFIX}mount-path: container {} already mounts something at {}: choose another path",
                c.name, req.mount_path
            )));
        }
    }

    let has_fs_group = spec
        .security_context
        .as_ref()
        .is_some_and(|s| s.fs_group.is_some());
    let file_mode = req
        .file_mode
        .clone()
        .unwrap_or_else(|| if has_fs_group { "0440" } else { "0444" }.to_owned());
    let secret_mode = if has_fs_group { 0o440 } else { 0o444 };

    let mut taken: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    let mut volume_name = |base: &str| {
        let mut name = base.to_owned();
        let mut n = 2;
        while taken.contains(&name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        taken.insert(name.clone());
        name
    };
    let names = VolumeNames {
        output: volume_name("osc-agent-output"),
        credentials: volume_name("osc-agent-credentials"),
        templates: volume_name("osc-agent-templates"),
    };
    let has_templates = req.template_configmap.is_some() || !req.inline_templates.is_empty();

    let common = common_args(&req, &file_mode);
    let mut init_args = vec!["--once".to_owned()];
    init_args.extend(common.iter().cloned());
    let mut sidecar_args = common;
    for (spec, _) in &req.actions {
        sidecar_args.push(format!("--action={spec}"));
    }
    sidecar_args.push(format!("--admin-addr=0.0.0.0:{}", defaults.admin_port));
    check_args(&init_args, namespace)?;
    if !req.init_only {
        check_args(&sidecar_args, namespace)?;
    }

    let mounts = agent_mounts(&req, &names, has_templates);
    let mut patch = Patch::default();

    // Mounts in existing containers first: inserting the init container shifts their indexes.
    let app_mount = json!(VolumeMount {
        name: names.output.clone(),
        mount_path: req.mount_path.clone(),
        read_only: Some(true),
        ..Default::default()
    });
    for (list, containers) in [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", spec.containers.as_slice()),
    ] {
        for (i, c) in containers.iter().enumerate() {
            if !selected.contains(&c.name) {
                continue;
            }
            let index = i.to_string();
            if c.volume_mounts.is_none() {
                patch.add(&["spec", list, &index, "volumeMounts"], json!([app_mount]));
            } else {
                patch.add(
                    &["spec", list, &index, "volumeMounts", "-"],
                    app_mount.clone(),
                );
            }
        }
    }

    let base = Container {
        name: String::new(),
        image: Some(defaults.image.clone()),
        image_pull_policy: Some(defaults.image_pull_policy.clone()),
        env: Some(downward_env()),
        resources: Some(req.resources.clone()),
        security_context: Some(security_context(false)),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let init = Container {
        name: "osc-agent-init".into(),
        args: Some(init_args),
        ..base.clone()
    };
    let probe = |path: &str, period: i32, timeout: Option<i32>, failures: Option<i32>| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(defaults.admin_port)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: timeout,
        failure_threshold: failures,
        ..Default::default()
    };
    let mut sidecar = Container {
        name: "osc-agent".into(),
        args: Some(sidecar_args),
        ports: Some(vec![ContainerPort {
            name: Some("osc-admin".into()),
            container_port: i32::from(defaults.admin_port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(probe("/healthz", 20, Some(3), Some(3))),
        readiness_probe: Some(probe("/readyz", 10, Some(3), None)),
        security_context: Some(security_context(req.needs_processes())),
        ..base
    };
    if req.native_sidecar {
        sidecar.startup_probe = Some(probe("/readyz", 1, None, Some(120)));
        sidecar.restart_policy = Some("Always".into());
    }

    // Init containers: ours first. `add` at index 0 twice would reverse them; there is only ever one.
    let first_init = if req.native_sidecar { &sidecar } else { &init };
    if spec.init_containers.is_none() {
        patch.add(&["spec", "initContainers"], json!([first_init]));
    } else {
        patch.add(&["spec", "initContainers", "0"], json!(first_init));
    }
    if regular_sidecar {
        patch.add(&["spec", "containers", "-"], json!(sidecar));
    }

    let mut volumes = vec![
        json!({
            "name": names.output,
            "emptyDir": {"medium": "Memory", "sizeLimit": defaults.size_limit},
        }),
        json!({
            "name": names.credentials,
            "secret": {"secretName": req.credentials_secret, "defaultMode": secret_mode},
        }),
    ];
    if has_templates {
        let mut sources = Vec::new();
        if let Some((name, keys)) = &req.template_configmap {
            let items: Vec<Value> = keys.iter().map(|k| json!({"key": k, "path": k})).collect();
            sources.push(json!({"configMap": {"name": name, "items": items}}));
        }
        if !req.inline_templates.is_empty() {
            let items: Vec<Value> = req
                .inline_templates
                .iter()
                .map(|f| {
                    json!({
                        "path": f,
                        "fieldRef": {
                            "fieldPath": format!("metadata.annotations['{PREFIX}template-{f}']")
                        },
                    })
                })
                .collect();
            sources.push(json!({"downwardAPI": {"items": items}}));
        }
        volumes.push(json!({
            "name": names.templates,
            "projected": {"sources": sources, "defaultMode": 0o444},
        }));
    }
    if spec.volumes.is_none() {
        patch.add(&["spec", "volumes"], Value::Array(volumes));
    } else {
        for v in volumes {
            patch.add(&["spec", "volumes", "-"], v);
        }
    }

    if req.needs_processes() {
        patch.add(&["spec", "shareProcessNamespace"], json!(true));
    }
    if pod.metadata.annotations.is_none() {
        patch.add(
            &["metadata", "annotations"],
            json!({ format!("{PREFIX}status"): INJECTED }),
        );
    } else {
        patch.add(
            &["metadata", "annotations", &format!("{PREFIX}status")],
            json!(INJECTED),
        );
    }
    Ok(Some(patch.ops))
}

struct VolumeNames {
    output: String,
    credentials: String,
    templates: String,
}

#[derive(Default)]
struct Patch {
    ops: Vec<PatchOperation>,
}

impl Patch {
    /// An `add` at the path made of these (unescaped) tokens: `/` and `~` in annotation keys are escaped.
    fn add(&mut self, tokens: &[&str], value: Value) {
        self.ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(tokens.iter().copied()),
            value,
        }));
    }
}

/// The flags both containers get, like the chart's `osc-agent.args` (files mode).
fn common_args(req: &Request, file_mode: &str) -> Vec<String> {
    let mut a = vec![
        format!("--server={}", req.server),
        format!("--environment={}", req.environment),
        format!("--user-key-file={CREDENTIALS_DIR}/{}", req.user_key_key),
    ];
    if let Some(k) = &req.api_key_key {
        a.push(format!("--api-key-file={CREDENTIALS_DIR}/{k}"));
    }
    if let Some(k) = &req.token_key {
        a.push(format!("--token-file={CREDENTIALS_DIR}/{k}"));
    }
    if let Some(k) = &req.ca_key {
        a.push(format!("--ca-file={CREDENTIALS_DIR}/{k}"));
    }
    a.extend(req.include.iter().map(|g| format!("--include={g}")));
    a.extend(req.exclude.iter().map(|g| format!("--exclude={g}")));
    a.extend(req.category.iter().map(|c| format!("--category={c}")));
    a.push(format!("--output-dir={}", req.mount_path));
    a.push(format!("--file-mode={file_mode}"));
    for (name, format) in &req.outputs {
        a.push(format!(
            "--output={}/{name}:{}",
            req.mount_path,
            format.as_str()
        ));
    }
    let mut templates: Vec<&String> = req
        .template_configmap
        .iter()
        .flat_map(|(_, keys)| keys)
        .collect();
    templates.extend(&req.inline_templates);
    for t in templates {
        a.push(format!(
            "--template={TEMPLATES_DIR}/{t}:{}/{t}",
            req.mount_path
        ));
    }
    a.push("--log-format=json".into());
    a
}

/// Annotations that map to the agent's flags, for messages of [`Settings::validate`].
const FLAG_ANNOTATIONS: &[(&str, &str)] = &[
    ("server", "server"),
    ("environment", "environment"),
    ("include", "include"),
    ("exclude", "exclude"),
    ("category", "category"),
    ("output-dir", "mount-path"),
    ("file-mode", "file-mode"),
    ("action", "action"),
    ("user-key-file", "user-key-key"),
    ("api-key-file", "api-key-key"),
    ("token-file", "token-key"),
];

/// Parse `args` with the agent's own command line (ignoring this process's environment) and validate
/// them as the agent would at start (without reading files, which live in the pod).
fn check_args(args: &[String], namespace: &str) -> Result<(), Denial> {
    let rewrite = |mut msg: String| {
        for (flag, ann) in FLAG_ANNOTATIONS {
            msg = msg.replace(&setting(flag), &format!("{PREFIX}{ann}"));
        }
        if msg.starts_with(PREFIX) {
            Denial::new(msg)
        } else {
            Denial::new(format!(
                "the osc-agent.io annotations give the agent an invalid configuration: {msg}"
            ))
        }
    };
    let command = AgentArgs::augment_args(clap::Command::new("osc-agent").no_binary_name(true))
        .mut_args(|a| a.env(None::<&'static str>));
    let matches = command
        .try_get_matches_from(args)
        .map_err(|e| rewrite(first_line(&e.to_string())))?;
    let mut agent = AgentArgs::from_arg_matches(&matches).map_err(|e| rewrite(e.to_string()))?;
    // The container gets both from the downward API.
    agent.pod_name = Some("injected-pod".into());
    agent.pod_namespace = Some(namespace.into());
    let settings = Settings::validate(agent, Files::Skip).map_err(|e| rewrite(e.0))?;
    crate::state::Filter::new(&settings.selection).map_err(|e| rewrite(e.0))?;
    Ok(())
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

fn downward_env() -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
    ]
}

/// The chart's `securityContext` plus the UID/GID it sets at pod level (here the pod is the app's).
fn security_context(kill: bool) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(AGENT_UID),
        run_as_group: Some(AGENT_UID),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: kill.then(|| vec!["KILL".into()]),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn agent_mounts(req: &Request, names: &VolumeNames, templates: bool) -> Vec<VolumeMount> {
    let mut m = vec![
        VolumeMount {
            name: names.credentials.clone(),
            mount_path: CREDENTIALS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: names.output.clone(),
            mount_path: req.mount_path.clone(),
            ..Default::default()
        },
    ];
    if templates {
        m.push(VolumeMount {
            name: names.templates.clone(),
            mount_path: TEMPLATES_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "annotations": annotations.iter().map(|(k, v)| (format!("{PREFIX}{k}"), *v)).collect::<BTreeMap<_, _>>(),
            },
            "spec": {"containers": [{"name": "app", "image": "nginx"}]},
        }))
        .unwrap()
    }

    fn defaults() -> InjectorDefaults {
        InjectorDefaults {
            server: Some("https://osc.example:9000".into()),
            own_namespace: Some("osc-system".into()),
            ..Default::default()
        }
    }

    const MINIMAL: &[(&str, &str)] = &[
        ("inject", "true"),
        ("environment", "production"),
        ("credentials-secret", "osc-credentials"),
    ];

    #[test]
    fn not_asked_excluded_or_done_is_no_patch() {
        let d = defaults();
        assert_eq!(mutate(&pod(&[]), "default", &d), Ok(None));
        assert_eq!(
            mutate(&pod(&[("inject", "false")]), "default", &d),
            Ok(None)
        );
        assert_eq!(mutate(&pod(MINIMAL), "kube-system", &d), Ok(None));
        assert_eq!(mutate(&pod(MINIMAL), "osc-system", &d), Ok(None));
        let mut done = MINIMAL.to_vec();
        done.push(("status", "injected"));
        assert_eq!(mutate(&pod(&done), "default", &d), Ok(None));
        assert!(mutate(&pod(MINIMAL), "default", &d).unwrap().is_some());
    }

    #[test]
    fn the_status_annotation_key_is_escaped() {
        let ops = mutate(&pod(MINIMAL), "default", &defaults())
            .unwrap()
            .unwrap();
        let last = serde_json::to_value(ops.last().unwrap()).unwrap();
        assert_eq!(
            last,
            json!({"op": "add", "path": "/metadata/annotations/osc-agent.io~1status", "value": "injected"})
        );
    }

    #[test]
    fn agent_validation_errors_name_the_annotation() {
        let mut a = MINIMAL.to_vec();
        a.push(("include", "a[b"));
        let e = mutate(&pod(&a), "default", &defaults()).unwrap_err();
        assert!(e.message.contains("osc-agent.io/include"), "{e}");
    }
}
