//! The Helm chart, `manifests/` and the README's sidecar snippet, checked with the real tools that
//! `.ci/k8s-node.sh install` provides (helm 3.17, kubectl, kubernetes-validate) and, when `$KUBECONFIG` is
//! set, installed on a real kube-apiserver:
//!
//! - `helm lint --strict` and `helm template` over every values file in `charts/osc-agent/ci/`;
//! - every rendered document and every manifest validated with `kubernetes-validate --strict` against
//!   Kubernetes 1.29 (an unknown kind fails; only the Prometheus Operator kinds, which have no built-in
//!   schema, are exempt and named);
//! - every osc-agent container's arguments accepted by `osc-agent check --skip-files`;
//! - what the values asked for is what is rendered (RBAC, capabilities, volumes, sidecar style), and what
//!   `values.schema.json` or the templates refuse (misspelt or misplaced values fail `helm template` and
//!   `helm install`, with a message naming them);
//! - the named templates used from another chart (`tests/fixtures/helm-parent`).
//!
//! Without the tools (or, for the install tests, a cluster) these tests show as ignored, with the
//! reason (a plain local `cargo test`), unless `OSC_REQUIRE_KUBE` is set, as in CI: then they fail.
//! `harness = false`: see `common::run_trials`.

mod common;

use common::{TestFn, missing_cluster, run_trials};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_osc-agent");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Kinds of the Prometheus Operator: no built-in schema, and not installable on a bare API server.
const CRD_KINDS: [&str; 3] = ["ServiceMonitor", "PodMonitor", "PrometheusRule"];
/// The Kubernetes version charts are rendered for (and validated against) unless a test says otherwise.
const KUBE: &str = "1.29.0";

/// Tools (helm, kubectl, kubernetes-validate) and, for the install tests, a cluster: without them the
/// tests show as ignored with the reason (with `OSC_REQUIRE_KUBE` set, they fail instead).
fn main() {
    let no_tools = tools_missing();
    let no_cluster = no_tools.clone().or_else(missing_cluster);
    run_trials(vec![
        (
            "chart_lints_renders_valid_objects_and_only_real_flags",
            TestFn::Sync(chart_lints_renders_valid_objects_and_only_real_flags),
            no_tools.clone(),
        ),
        (
            "manifests_are_valid_and_use_only_real_flags",
            TestFn::Sync(manifests_are_valid_and_use_only_real_flags),
            no_tools.clone(),
        ),
        (
            "the_readme_snippet_uses_only_real_flags",
            TestFn::Sync(the_readme_snippet_uses_only_real_flags),
            no_tools.clone(),
        ),
        (
            "chart_and_manifests_install_on_a_real_api_server",
            TestFn::Sync(chart_and_manifests_install_on_a_real_api_server),
            no_cluster.clone(),
        ),
        (
            "the_schema_refuses_misspelt_and_misplaced_values",
            TestFn::Sync(the_schema_refuses_misspelt_and_misplaced_values),
            no_tools.clone(),
        ),
        (
            "every_action_field_the_schema_allows_is_accepted_by_the_agent",
            TestFn::Sync(every_action_field_the_schema_allows_is_accepted_by_the_agent),
            no_tools.clone(),
        ),
        (
            "native_sidecar_needs_kubernetes_1_29",
            TestFn::Sync(native_sidecar_needs_kubernetes_1_29),
            no_tools.clone(),
        ),
        (
            "process_actions_need_the_app_to_run_as_the_agents_user",
            TestFn::Sync(process_actions_need_the_app_to_run_as_the_agents_user),
            no_tools.clone(),
        ),
        (
            "injector_objects_are_valid_and_the_certificate_matches_the_ca_bundle",
            TestFn::Sync(injector_objects_are_valid_and_the_certificate_matches_the_ca_bundle),
            no_tools.clone(),
        ),
        (
            "injector_certificate_is_kept_across_upgrades_and_renewed_near_expiry",
            TestFn::Sync(injector_certificate_is_kept_across_upgrades_and_renewed_near_expiry),
            no_cluster.clone(),
        ),
        (
            "named_templates_work_from_a_parent_chart",
            TestFn::Sync(named_templates_work_from_a_parent_chart),
            no_tools.clone(),
        ),
        (
            "the_app_container_is_wired_to_the_output",
            TestFn::Sync(the_app_container_is_wired_to_the_output),
            no_tools.clone(),
        ),
        (
            "pod_options_names_and_the_disruption_budget",
            TestFn::Sync(pod_options_names_and_the_disruption_budget),
            no_tools.clone(),
        ),
        (
            "a_template_change_changes_the_pod_template",
            TestFn::Sync(a_template_change_changes_the_pod_template),
            no_tools.clone(),
        ),
        (
            "monitoring_objects_and_alert_rules",
            TestFn::Sync(monitoring_objects_and_alert_rules),
            no_tools.clone(),
        ),
        (
            "init_only_mode_syncs_once_without_a_sidecar",
            TestFn::Sync(init_only_mode_syncs_once_without_a_sidecar),
            no_tools.clone(),
        ),
        (
            "helm_test_checks_readyz_from_inside_the_cluster",
            TestFn::Sync(helm_test_checks_readyz_from_inside_the_cluster),
            no_tools.clone(),
        ),
        (
            "chart_variants_install_on_a_real_api_server",
            TestFn::Sync(chart_variants_install_on_a_real_api_server),
            no_cluster.clone(),
        ),
    ]);
}

struct Tools {
    helm: PathBuf,
    kubectl: PathBuf,
    validate: PathBuf,
    /// kubernetes-validate 1.28.0: the last release with Kubernetes 1.20's schemas.
    validate_1_20: PathBuf,
}

fn tools(test: &str) -> Option<Tools> {
    let cache = std::env::var_os("K8S_TOOLS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/k8s-test-tools")))
        .unwrap_or_default();
    let t = Tools {
        helm: cache.join("bin/helm"),
        kubectl: cache.join("bin/kubectl"),
        validate: cache.join("venv/bin/kubernetes-validate"),
        validate_1_20: cache.join("venv-1.20/bin/kubernetes-validate"),
    };
    if [&t.helm, &t.kubectl, &t.validate, &t.validate_1_20]
        .iter()
        .all(|p| p.is_file())
    {
        return Some(t);
    }
    assert!(
        std::env::var_os("OSC_REQUIRE_KUBE").is_none(),
        "{test}: OSC_REQUIRE_KUBE is set but helm/kubectl/kubernetes-validate are not in {}",
        cache.display()
    );
    None
}

/// Why the tools are missing, or `None`.
fn tools_missing() -> Option<String> {
    tools("packaging").is_none().then(|| {
        "helm, kubectl or kubernetes-validate is missing: run `.ci/k8s-node.sh install`".to_owned()
    })
}

fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|d| d.is_object())
        .collect()
}

/// `kubernetes-validate --strict` against 1.29; any WARN or ERROR fails, except a missing schema for
/// the exempt CRD kinds.
fn validate(t: &Tools, file: &Path) {
    validate_at(t, file, KUBE)
}

/// kubernetes-validate --strict of `file` for Kubernetes `kube` (1.20.x: the older validator).
fn validate_at(t: &Tools, file: &Path, kube: &str) {
    let (validator, version) = if kube.starts_with("1.20.") {
        (&t.validate_1_20, "1.20.0")
    } else {
        (&t.validate, kube)
    };
    let out = Command::new(validator)
        .args(["--strict", "-k", version])
        .arg(file)
        .output()
        .expect("kubernetes-validate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("INFO"))
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !CRD_KINDS.iter().any(|k| {
                l.contains(&format!(
                    "Couldn't find schema for kind {k} with api version monitoring.coreos.com/v1"
                ))
            })
        })
        .collect();
    assert!(
        out.status.success() && bad.is_empty(),
        "{}:\n{text}",
        file.display()
    );
}

/// The pod spec of a workload document.
fn pod_spec(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str()? {
        "Deployment" | "Job" | "StatefulSet" | "DaemonSet" => {
            Some(&doc["spec"]["template"]["spec"])
        }
        _ => None,
    }
}

/// Every osc-agent container (regular or init) of a pod spec.
fn agent_containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[k].as_array().into_iter().flatten())
        .filter(|c| c["image"].as_str().is_some_and(|i| i.contains("osc-agent")))
        .collect()
}

fn args_of(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .expect("agent args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

/// `osc-agent check --skip-files` accepts these arguments (the downward-API variables set).
fn check_args(what: &str, args: &[String]) {
    if args.first().is_some_and(|a| a == "injector") {
        return check_injector_args(what, args);
    }
    let out = Command::new(BIN)
        .arg("check")
        .arg("--skip-files")
        .args(args)
        .env("POD_NAME", "app-0")
        .env("POD_NAMESPACE", "my-app")
        .env_remove("OSC_USER_KEY")
        .output()
        .expect("osc-agent check");
    assert!(
        out.status.success(),
        "{what}: osc-agent check rejects {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The injector's flags are real: with them, the binary gets as far as reading the certificate file
/// (which does not exist here) and names that file; an unknown or malformed flag would fail earlier.
fn check_injector_args(what: &str, args: &[String]) {
    let out = Command::new(BIN)
        .args(args)
        .env("POD_NAMESPACE", "my-app")
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("osc-agent injector");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2)
            && err.contains("/var/run/secrets/osc-injector-tls/tls.crt")
            && !err.contains("unexpected argument")
            && !err.contains("invalid value"),
        "{what}: osc-agent {args:?}:\n{err}"
    );
}

fn check_all_agents(what: &str, docs: &[Value]) -> usize {
    let mut n = 0;
    for spec in docs.iter().filter_map(pod_spec) {
        for c in agent_containers(spec) {
            check_args(&format!("{what} container {}", c["name"]), &args_of(c));
            n += 1;
        }
    }
    n
}

fn chart() -> PathBuf {
    Path::new(ROOT).join("charts/osc-agent")
}

fn values_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn render(t: &Tools, values: &Path) -> String {
    run(Command::new(&t.helm)
        .args([
            "template",
            "rel",
            "--namespace",
            "my-app",
            "--kube-version",
            KUBE,
        ])
        .arg(chart())
        .arg("-f")
        .arg(values))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn deployment(docs: &[Value]) -> &Value {
    let d = find(docs, "Deployment");
    assert_eq!(d.len(), 1, "one Deployment");
    &d[0]["spec"]["template"]["spec"]
}

fn container<'a>(spec: &'a Value, list: &str, name: &str) -> &'a Value {
    spec[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} container {name}: {spec}"))
}

fn role_resources(docs: &[Value]) -> Vec<String> {
    find(docs, "Role")
        .iter()
        .flat_map(|r| r["rules"].as_array().unwrap().iter())
        .flat_map(|rule| {
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            rule["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |r| format!("{}:{}", r.as_str().unwrap(), verbs.join(",")))
        })
        .collect()
}

fn chart_lints_renders_valid_objects_and_only_real_flags() {
    let Some(t) = tools("chart_lints_renders_valid_objects_and_only_real_flags") else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let files = values_files();
    assert!(files.len() >= 15, "the values matrix: {files:?}");
    for values in &files {
        let name = values.file_name().unwrap().to_string_lossy().into_owned();
        run(Command::new(&t.helm)
            .args(["lint", "--strict", "--kube-version", KUBE])
            .arg(chart())
            .arg("-f")
            .arg(values));
        let text = render(&t, values);
        let out = scratch.path().join(&name);
        std::fs::write(&out, &text).unwrap();
        validate(&t, &out);
        let docs = docs(&text);
        assert!(
            check_all_agents(&name, &docs) >= 1,
            "{name}: no osc-agent container"
        );

        if name.starts_with("injector") {
            // No agent Deployment of its own: the injector's is checked in
            // injector_objects_are_valid_and_the_certificate_matches_the_ca_bundle.
            continue;
        }
        let spec = deployment(&docs);
        let native = spec["initContainers"][0]["restartPolicy"] == "Always";
        let sidecar = if native {
            container(spec, "initContainers", "osc-agent")
        } else if name.starts_with("init-only") {
            // No sidecar: the --once init container carries the common settings.
            container(spec, "initContainers", "osc-agent-init")
        } else {
            container(spec, "containers", "osc-agent")
        };
        let sc = &sidecar["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            sidecar["resources"]["requests"],
            json!({"cpu": "5m", "memory": "16Mi"}),
            "{name}"
        );
        assert_eq!(
            sidecar["resources"]["limits"],
            json!({"memory": "64Mi"}),
            "{name}"
        );
        if !name.starts_with("init-only") {
            assert_eq!(
                sidecar["livenessProbe"]["httpGet"]["path"], "/healthz",
                "{name}"
            );
            assert_eq!(
                sidecar["readinessProbe"]["httpGet"]["path"], "/readyz",
                "{name}"
            );
        }
        let sidecar_args = args_of(sidecar);
        let has_api = !find(&docs, "Role").is_empty();
        if name != "pod-options-values.yaml" {
            assert_eq!(
                spec["automountServiceAccountToken"],
                json!(has_api),
                "{name}"
            );
        }
        let rules = role_resources(&docs);

        match name.as_str() {
            "default-values.yaml" | "files-templates-values.yaml" => {
                assert!(
                    !has_api,
                    "{name}: files mode with an environment needs no RBAC"
                );
                assert!(find(&docs, "ServiceAccount").is_empty(), "{name}");
                let init = container(spec, "initContainers", "osc-agent-init");
                assert_eq!(args_of(init)[0], "--once", "{name}");
                let vol = spec["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == "osc-agent-output")
                    .unwrap();
                assert_eq!(vol["emptyDir"]["medium"], "Memory", "{name}");
                assert!(
                    sc["capabilities"]["add"].is_null(),
                    "{name}: no added capability"
                );
                assert!(spec["shareProcessNamespace"].is_null(), "{name}");
                if name.starts_with("files") {
                    assert!(
                        sidecar_args.contains(&"--output=/config/app.env:dotenv".to_owned()),
                        "{name}"
                    );
                    assert!(
                        sidecar_args.contains(
                            &"--template=/etc/osc-agent/templates/nginx.conf:/config/nginx.conf"
                                .to_owned()
                        ),
                        "{name}"
                    );
                    assert!(
                        sidecar_args
                            .contains(&"--ca-file=/var/run/secrets/osc-agent-ca/ca.crt".to_owned())
                    );
                    assert_eq!(
                        find(&docs, "ConfigMap").len(),
                        1,
                        "{name}: the templates ConfigMap"
                    );
                    assert!(
                        find(&docs, "Secret").is_empty(),
                        "{name}: existing credentials Secret is used"
                    );
                } else {
                    assert_eq!(
                        find(&docs, "Secret").len(),
                        1,
                        "{name}: the created credentials Secret"
                    );
                }
            }
            "secret-values.yaml" => {
                assert!(
                    sidecar_args.contains(&"--secret=app-config".to_owned()),
                    "{name}"
                );
                assert!(
                    rules.contains(&"secrets:create".to_owned()),
                    "{name}: {rules:?}"
                );
                assert!(
                    rules.contains(&"secrets:get,patch".to_owned()),
                    "{name}: {rules:?}"
                );
                assert!(
                    rules.contains(&"pods:get".to_owned()),
                    "{name}: environment from the pod: {rules:?}"
                );
                assert!(
                    !rules.iter().any(|r| r.starts_with("configmaps")),
                    "{name}: {rules:?}"
                );
                assert!(
                    !sidecar_args.iter().any(|a| a.starts_with("--environment")),
                    "{name}"
                );
            }
            "configmap-values.yaml" => {
                assert!(
                    rules.contains(&"configmaps:get,patch".to_owned()),
                    "{name}: {rules:?}"
                );
                assert!(
                    !rules
                        .iter()
                        .any(|r| r.starts_with("secrets") || r.starts_with("pods")),
                    "{name}: {rules:?}"
                );
            }
            "signal-values.yaml" => {
                assert_eq!(spec["shareProcessNamespace"], true, "{name}");
                assert_eq!(sc["capabilities"]["add"], json!(["KILL"]), "{name}");
                let init = container(spec, "initContainers", "osc-agent-init");
                assert!(
                    init["securityContext"]["capabilities"]["add"].is_null(),
                    "{name}: KILL only in the sidecar"
                );
                assert!(!has_api, "{name}");
            }
            "actions-values.yaml" => {
                assert_eq!(
                    sidecar_args
                        .iter()
                        .filter(|a| a.starts_with("--action="))
                        .count(),
                    4,
                    "{name}"
                );
                let init = container(spec, "initContainers", "osc-agent-init");
                assert!(
                    !args_of(init).iter().any(|a| a.starts_with("--action")),
                    "{name}: no action before the app runs"
                );
                assert!(
                    rules.contains(&"deployments:get,patch".to_owned()),
                    "{name}: {rules:?}"
                );
                assert_eq!(
                    spec["shareProcessNamespace"], true,
                    "{name}: restart-container"
                );
            }
            "http-values.yaml" | "exec-values.yaml" => {
                assert_eq!(
                    sidecar_args
                        .iter()
                        .filter(|a| a.starts_with("--action="))
                        .count(),
                    1,
                    "{name}"
                );
                assert!(spec["shareProcessNamespace"].is_null(), "{name}");
                assert!(sc["capabilities"]["add"].is_null(), "{name}");
                assert!(!has_api, "{name}");
            }
            "restart-values.yaml" => {
                assert!(
                    sidecar_args
                        .contains(&"--action=restart-container:grace=15s,process=nginx".to_owned()),
                    "{name}"
                );
                assert_eq!(spec["shareProcessNamespace"], true, "{name}");
                assert_eq!(sc["capabilities"]["add"], json!(["KILL"]), "{name}");
                assert!(!has_api, "{name}");
            }
            "rollout-values.yaml" => {
                assert!(
                    sidecar_args.contains(&"--action=rollout-restart".to_owned()),
                    "{name}"
                );
                assert!(
                    rules.contains(&"deployments:get,patch".to_owned()),
                    "{name}: {rules:?}"
                );
                assert!(
                    rules.contains(&"replicasets:get".to_owned()),
                    "{name}: {rules:?}"
                );
                assert!(
                    !rules
                        .iter()
                        .any(|r| r.starts_with("secrets") || r.starts_with("configmaps")),
                    "{name}"
                );
                assert!(spec["shareProcessNamespace"].is_null(), "{name}");
                assert!(sc["capabilities"]["add"].is_null(), "{name}");
            }
            "native-sidecar-values.yaml" => {
                assert!(native, "{name}");
                assert_eq!(
                    sidecar["startupProbe"]["httpGet"]["path"], "/readyz",
                    "{name}"
                );
                assert_eq!(
                    spec["initContainers"].as_array().unwrap().len(),
                    1,
                    "{name}: no --once init"
                );
                assert_eq!(find(&docs, "ServiceMonitor").len(), 1, "{name}");
            }
            "app-wiring-values.yaml" => {
                let app = container(spec, "containers", "app");
                assert_eq!(
                    app["envFrom"][0],
                    json!({"secretRef": {"name": "app-config"}}),
                    "{name}"
                );
                assert_eq!(app["readinessProbe"]["httpGet"]["path"], "/ready", "{name}");
                assert!(rules.contains(&"secrets:get,patch".to_owned()), "{name}");
            }
            "pod-options-values.yaml" => {
                assert_eq!(
                    find(&docs, "Deployment")[0]["metadata"]["name"],
                    "web-config"
                );
                assert_eq!(find(&docs, "PodDisruptionBudget").len(), 1, "{name}");
                assert_eq!(spec["automountServiceAccountToken"], true, "{name}");
                assert!(!has_api, "{name}");
            }
            "monitoring-values.yaml" => {
                for kind in CRD_KINDS {
                    assert_eq!(find(&docs, kind).len(), 1, "{name}: {kind}");
                }
            }
            "init-only-values.yaml" => {
                assert_eq!(args_of(sidecar)[0], "--once", "{name}");
                assert!(
                    agent_containers(spec).len() == 1,
                    "{name}: no sidecar: {spec}"
                );
            }
            other => panic!("add expectations for {other}"),
        }
    }
}

fn manifests_are_valid_and_use_only_real_flags() {
    let Some(t) = tools("manifests_are_valid_and_use_only_real_flags") else {
        return;
    };
    let mut files = vec![];
    for dir in ["manifests", "manifests/rbac"] {
        for e in std::fs::read_dir(Path::new(ROOT).join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|e| e == "yaml") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 9, "{files:?}");
    let mut agents = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.starts_with("# "),
            "{}: starts with a comment saying when to use it",
            f.display()
        );
        validate(&t, f);
        agents += check_all_agents(&f.display().to_string(), &docs(&text));
    }
    assert_eq!(agents, 7, "osc-agent containers checked in manifests/");
}

fn the_readme_snippet_uses_only_real_flags() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let start = readme
        .find("<!-- sidecar-snippet -->")
        .expect("README marks its sidecar snippet with <!-- sidecar-snippet -->");
    let block = &readme[start..];
    let body = block
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a yaml block after the marker")
        .0;
    let doc: Value = serde_saphyr::from_str(body).expect("the snippet is YAML");
    let containers = doc.as_array().expect("a list of containers");
    let mut n = 0;
    for c in containers
        .iter()
        .filter(|c| c["image"].as_str().is_some_and(|i| i.contains("osc-agent")))
    {
        check_args("README snippet", &args_of(c));
        n += 1;
    }
    assert!(n >= 1, "no osc-agent container in the README snippet");
}

/// `helm install` and `kubectl apply` against the real API server; the objects are what was asked for.
fn chart_and_manifests_install_on_a_real_api_server() {
    let test = "chart_and_manifests_install_on_a_real_api_server";
    let Some(t) = tools(test) else { return };
    let Some(kubeconfig) = std::env::var_os("KUBECONFIG") else {
        assert!(
            std::env::var_os("OSC_REQUIRE_KUBE").is_none(),
            "{test}: OSC_REQUIRE_KUBE is set but $KUBECONFIG is not"
        );
        eprintln!("SKIPPED {test}: $KUBECONFIG is not set");
        return;
    };
    let kubectl = |args: &[&str]| {
        run(Command::new(&t.kubectl)
            .env("KUBECONFIG", &kubeconfig)
            .args(args))
    };
    let ns = format!("pkg-{}", std::process::id());
    kubectl(&["create", "namespace", &ns]);
    let server_minor: u32 = {
        let v: Value = serde_json::from_str(&kubectl(&["version", "-o", "json"])).unwrap();
        v["serverVersion"]["minor"]
            .as_str()
            .unwrap()
            .trim_end_matches('+')
            .parse()
            .unwrap()
    };

    // The chart, in the secret-sink mode (ServiceAccount, Role, RoleBinding, Deployment).
    run(Command::new(&t.helm)
        .env("KUBECONFIG", &kubeconfig)
        .args(["install", "rel", "--namespace", &ns, "--wait=false"])
        .arg(chart())
        .arg("-f")
        .arg(chart().join("ci/secret-values.yaml")));
    let get = |kind: &str, name: &str| -> Value {
        serde_json::from_str(&kubectl(&["-n", &ns, "get", kind, name, "-o", "json"])).unwrap()
    };
    let dep = get("deployment", "rel-osc-agent");
    let spec = &dep["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], "rel-osc-agent");
    let args = args_of(container(spec, "containers", "osc-agent"));
    assert!(args.contains(&"--secret=app-config".to_owned()), "{args:?}");
    let role = get("role", "rel-osc-agent");
    let names: Vec<&Value> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["resourceNames"])
        .collect();
    assert!(names.contains(&&json!(["app-config"])), "{role}");
    get("rolebinding", "rel-osc-agent");
    get("serviceaccount", "rel-osc-agent");

    // The plain manifests, with their namespace replaced.
    let scratch = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(Path::new(ROOT).join("manifests")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        if text.contains("restartPolicy: Always") && server_minor < 29 {
            eprintln!(
                "skipped applying {}: native sidecars (initContainers[].restartPolicy) need Kubernetes >= 1.29; \
                 this API server is 1.{server_minor} (the file is still schema-validated against 1.29)",
                p.display()
            );
            continue;
        }
        let out = scratch.path().join(p.file_name().unwrap());
        std::fs::write(
            &out,
            text.replace("namespace: my-app", &format!("namespace: {ns}")),
        )
        .unwrap();
        kubectl(&["apply", "-f", out.to_str().unwrap()]);
    }
    let dep = get("deployment", "nginx-reload");
    assert_eq!(
        dep["spec"]["template"]["spec"]["shareProcessNamespace"],
        true
    );
    get("job", "my-migration");
    let role = get("role", "osc-agent-secret-sink");
    assert_eq!(role["rules"][1]["resourceNames"], json!(["app-config"]));
    kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// Values every targeted render starts from (a server, an environment, an existing credentials Secret).
const BASE: &str = "server: {url: \"https://osc.example:9000\"}\nenvironment: production\n\
                    credentials: {existingSecret: osc-credentials}\n";

/// `helm template` of `chart_dir` for Kubernetes `kube` with `values` (YAML text, after the chart's own
/// values): the rendered text, or helm's error.
fn try_template(t: &Tools, chart_dir: &Path, values: &str, kube: &str) -> Result<String, String> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), values).unwrap();
    let out = Command::new(&t.helm)
        .args([
            "template",
            "rel",
            "--namespace",
            "my-app",
            "--kube-version",
            kube,
        ])
        .arg(chart_dir)
        .arg("-f")
        .arg(file.path())
        .output()
        .expect("helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The chart rendered with BASE and `extra`, for Kubernetes `kube`; its documents, each validated (when
/// `kube` has schemas) and every agent container checked.
fn render_with(t: &Tools, extra: &str, kube: &str) -> Vec<Value> {
    let text = try_template(t, &chart(), &format!("{BASE}{extra}"), kube)
        .unwrap_or_else(|e| panic!("helm template with\n{extra}\nfailed:\n{e}"));
    let d = docs(&text);
    if kube == KUBE || kube.starts_with("1.20.") {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &text).unwrap();
        validate_at(t, file.path(), kube);
    }
    check_all_agents(extra, &d);
    d
}

/// helm's error for the chart with BASE and `extra` (which must be refused).
fn refused(t: &Tools, extra: &str, kube: &str) -> String {
    match try_template(t, &chart(), &format!("{BASE}{extra}"), kube) {
        Ok(text) => panic!("helm template accepted\n{extra}\nrendering:\n{text}"),
        Err(e) => e,
    }
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container_names(spec: &Value, list: &str) -> Vec<String> {
    spec[list]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn the_schema_refuses_misspelt_and_misplaced_values() {
    let Some(t) = tools("the_schema_refuses_misspelt_and_misplaced_values") else {
        return;
    };
    // (values, what the error must name)
    let cases = [
        ("replicas: 2\n", "replicas"),
        ("output: {mdoe: secret}\n", "mdoe"),
        ("output: {mode: file}\n", "output.mode"),
        ("logFormat: xml\n", "logFormat"),
        ("nativeSidecar: \"yes\"\n", "nativeSidecar"),
        ("app: {envfrom: []}\n", "envfrom"),
        (
            "serviceMonitor: {enabled: true, intervall: 1m}\n",
            "intervall",
        ),
        (
            "prometheusRule: {disabledAlerts: [OscAgentNotReadyy]}\n",
            "disabledAlerts",
        ),
        (
            "output: {aggregates: [{name: app.env, format: env}]}\n",
            "format",
        ),
        ("output: {fileMode: \"0999\"}\n", "fileMode"),
        ("serviceAccount: {automount: \"no\"}\n", "automount"),
        ("extraArgs: [\"stale-after=5m\"]\n", "extraArgs"),
        // Actions: unknown type, a field of another type or misspelt, a bad value, two selectors.
        ("actions: [{type: reload}]\n", "actions.0.type"),
        ("actions: [{process: nginx}]\n", "type"),
        (
            "actions: [{type: http, url: \"http://127.0.0.1:8080/r\", expect_status: 200}]\n",
            "expect_status",
        ),
        ("actions: [{type: signal, proces: nginx}]\n", "proces"),
        (
            "actions: [{type: signal, process: nginx, grace: 5s}]\n",
            "grace",
        ),
        (
            "actions: [{type: signal, process: nginx, signal: HUPP}]\n",
            "actions.0.signal",
        ),
        (
            "actions: [{type: signal, process: nginx, cmdline: nginx}]\n",
            "one and only one",
        ),
        ("actions: [{type: restart-container}]\n", "one and only one"),
        (
            "actions: [{type: http, url: \"127.0.0.1:8080/r\"}]\n",
            "actions.0.url",
        ),
        (
            "actions: [{type: http, url: \"http://x/r\", retries: many}]\n",
            "actions.0.retries",
        ),
        (
            "actions: [{type: http, url: \"http://x/r\", timeout: 5 seconds}]\n",
            "actions.0.timeout",
        ),
        (
            "actions: [{type: exec, command: \"/bin/reload --only=a,b\"}]\n",
            "actions.0.command",
        ),
        (
            "actions: [{type: exec, command: []}]\n",
            "actions.0.command",
        ),
        ("actions: [{type: exec}]\n", "command"),
        (
            "actions: [{type: rollout-restart, deployment: web}]\n",
            "deployment",
        ),
        (
            "runMode: init-only\nactions: [{type: rollout-restart}]\n",
            "actions",
        ),
        ("runMode: sidecars\n", "runMode"),
    ];
    for (values, named) in cases {
        let err = refused(&t, values, KUBE);
        assert!(
            err.contains("schema") && err.contains(named),
            "{values}: the error should be the schema's, naming {named}:\n{err}"
        );
    }
    // Combinations the templates refuse, with messages naming the values.
    let err = refused(
        &t,
        "serviceMonitor: {enabled: true}\nadmin: {address: 127.0.0.1}\n",
        KUBE,
    );
    assert!(
        err.contains("serviceMonitor/podMonitor: nothing to scrape"),
        "{err}"
    );
    let err = refused(
        &t,
        "podDisruptionBudget: {minAvailable: 1, maxUnavailable: 1}\nreplicaCount: 2\n",
        KUBE,
    );
    assert!(err.contains("not both"), "{err}");
    let err = refused(
        &t,
        "serviceAccount: {create: false}\noutput: {mode: secret}\n",
        KUBE,
    );
    assert!(err.contains("serviceAccount.name"), "{err}");
    let err = refused(
        &t,
        "serviceAccount: {automount: false}\noutput: {mode: secret}\n",
        KUBE,
    );
    assert!(err.contains("serviceAccount.automount is false"), "{err}");
    let err = refused(&t, "runMode: init-only\napp: {enabled: false}\n", KUBE);
    assert!(err.contains("app.enabled"), "{err}");
}

/// Every field the schema allows for an action reaches the agent as a flag it accepts.
fn every_action_field_the_schema_allows_is_accepted_by_the_agent() {
    let Some(t) = tools("every_action_field_the_schema_allows_is_accepted_by_the_agent") else {
        return;
    };
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .unwrap();
    let actions = "actions:\n\
        - {type: signal, pidfile: /run/app.pid, signal: USR1}\n\
        - {type: signal, cmdline: \"nginx: master\", signal: 1}\n\
        - {type: signal, process: nginx}\n\
        - {type: restart-container, process: java, grace: 1.5s}\n\
        - {type: restart-container, cmdline: \"java .*app.jar\"}\n\
        - {type: restart-container, pidfile: /run/java.pid}\n\
        - {type: http, url: \"https://127.0.0.1:8443/-/reload\", method: put, expect-status: 204, timeout: 2s, retries: 0}\n\
        - {type: exec, command: [/bin/reload, --graceful], timeout: 30}\n\
        - {type: rollout-restart}\n";
    let given: Vec<Value> = serde_saphyr::from_str::<Value>(actions).unwrap()["actions"]
        .as_array()
        .unwrap()
        .clone();
    // The example above uses every field of every type the schema knows.
    for rule in schema["properties"]["actions"]["items"]["allOf"]
        .as_array()
        .unwrap()
    {
        let kind = rule["if"]["properties"]["type"]["const"].as_str().unwrap();
        for field in rule["then"]["properties"].as_object().unwrap().keys() {
            assert!(
                given
                    .iter()
                    .any(|a| a["type"] == kind && !a[field.as_str()].is_null()),
                "the example misses the {kind} field {field}"
            );
        }
    }
    let docs = render_with(&t, actions, KUBE);
    let spec = deployment(&docs);
    let args = args_of(container(spec, "containers", "osc-agent"));
    assert!(
        args.contains(&"--action=http:expect-status=204,method=put,retries=0,timeout=2s,url=https://127.0.0.1:8443/-/reload".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--action=exec:command=/bin/reload --graceful,timeout=30".to_owned()),
        "{args:?}"
    );
}

fn native_sidecar_needs_kubernetes_1_29() {
    let Some(t) = tools("native_sidecar_needs_kubernetes_1_29") else {
        return;
    };
    for old in ["1.20.2", "1.28.9"] {
        let err = refused(&t, "nativeSidecar: true\n", old);
        assert!(
            err.contains("nativeSidecar: true needs Kubernetes >= 1.29")
                && err.contains(&format!("v{old}"))
                && err.contains("nativeSidecar: false"),
            "{old}: {err}"
        );
    }
    for new in ["1.29.0", "1.31.1"] {
        let docs = render_with(&t, "nativeSidecar: true\n", new);
        let spec = deployment(&docs);
        assert_eq!(container_names(spec, "initContainers"), ["osc-agent"]);
        assert_eq!(
            container(spec, "initContainers", "osc-agent")["restartPolicy"],
            "Always"
        );
        assert_eq!(container_names(spec, "containers"), ["app"]);
    }
    // Without native sidecars, any version renders.
    let docs = render_with(&t, "", "1.20.2");
    assert_eq!(
        container_names(deployment(&docs), "initContainers"),
        ["osc-agent-init"]
    );
}

/// Found on the real node (tests/pods.rs): the KILL capability never reaches a non-root agent's process,
/// so signal and restart-container work only on an app of the agent's own user. The chart refuses the
/// combination that would fail at the first change, and accepts the ones that work.
fn process_actions_need_the_app_to_run_as_the_agents_user() {
    let Some(t) = tools("process_actions_need_the_app_to_run_as_the_agents_user") else {
        return;
    };
    for action in [
        "{type: signal, process: app, signal: HUP}",
        "{type: restart-container, process: app}",
    ] {
        let actions = format!("actions: [{action}]\n");
        for other in [
            "app: {securityContext: {runAsUser: 1000}}\n",
            "securityContext: {runAsUser: 1000}\n",
            "podSecurityContext: {runAsUser: 1000}\nsecurityContext: {runAsUser: 65532}\n",
        ] {
            let err = refused(&t, &format!("{actions}{other}"), KUBE);
            assert!(
                err.contains("need the app to run as the agent's user")
                    && err.contains("app.securityContext.runAsUser"),
                "{other}: {err}"
            );
        }
        for works in [
            "",
            "app: {securityContext: {runAsUser: 65532}}\n",
            "podSecurityContext: {runAsUser: 1000, runAsGroup: 1000, fsGroup: 1000}\n",
            "securityContext: {runAsUser: 0, runAsNonRoot: false}\napp: {securityContext: {runAsUser: 1000}}\n",
        ] {
            let docs = render_with(&t, &format!("{actions}{works}"), KUBE);
            let spec = deployment(&docs);
            assert_eq!(spec["shareProcessNamespace"], true, "{works}");
            assert_eq!(
                container(spec, "containers", "osc-agent")["securityContext"]["capabilities"]["add"],
                json!(["KILL"]),
                "{works}"
            );
        }
    }
    // Without such an action, users differ freely.
    render_with(&t, "app: {securityContext: {runAsUser: 1000}}\n", KUBE);
}

const INJECTOR: &str = "standalone: {enabled: false}\n\
                        injector: {enabled: true, defaultServer: \"https://osc.example:9000\"}\n";

/// `openssl verify`: `cert` (base64 PEM) is signed by `ca` (base64 PEM) and valid for `host`.
fn verify_certificate(ca_b64: &str, cert_b64: &str, host: &str) -> Result<(), String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let cert = dir.path().join("cert.pem");
    std::fs::write(&ca, b64.decode(ca_b64).map_err(|e| e.to_string())?).unwrap();
    std::fs::write(&cert, b64.decode(cert_b64).map_err(|e| e.to_string())?).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca)
        .args(["-verify_hostname", host])
        .arg(&cert)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    }
}

fn webhook(docs: &[Value]) -> &Value {
    let w = find(docs, "MutatingWebhookConfiguration");
    assert_eq!(w.len(), 1, "one MutatingWebhookConfiguration");
    &w[0]["webhooks"][0]
}

/// Issue 12: the injector's objects (kubernetes-validate --strict at 1.29 and 1.20; the 1.20 API server
/// itself in the next test), the chart-made certificate valid for the Service's name and signed by the CA in the
/// webhook's caBundle, the selectors that keep the injector's own pods and namespaces out, and the values
/// the chart refuses.
fn injector_objects_are_valid_and_the_certificate_matches_the_ca_bundle() {
    let Some(t) = tools("injector_objects_are_valid_and_the_certificate_matches_the_ca_bundle")
    else {
        return;
    };
    let docs = render_with(&t, INJECTOR, KUBE);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Secret",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ] {
        assert_eq!(
            kinds.iter().filter(|k| **k == kind).count(),
            1,
            "{kind}: {kinds:?}"
        );
    }
    // Injector only: no credentials Secret, no agent Deployment of its own.
    let secret = &find(&docs, "Secret")[0];
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let d = &find(&docs, "Deployment")[0];
    assert_eq!(d["metadata"]["name"], "rel-osc-agent-injector");
    let spec = &d["spec"]["template"]["spec"];
    let c = container(spec, "containers", "injector");
    let args = args_of(c);
    for want in [
        "injector",
        "--default-server=https://osc.example:9000",
        "--native-sidecar=true",
        "--audit-interval=60s",
        "--agent-image=ghcr.io/osc-agent/osc-agent:0.1.0",
    ] {
        assert!(args.iter().any(|a| a == want), "{want}: {args:?}");
    }
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["osc-agent.io/injector"],
        "true"
    );
    // The injector's labels never match the standalone agent's selector (name differs).
    assert_eq!(
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "osc-agent-injector"
    );

    let hook = webhook(&docs);
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(
        hook["clientConfig"]["service"]["name"],
        "rel-osc-agent-injector"
    );
    assert_eq!(hook["clientConfig"]["service"]["namespace"], "my-app");
    assert_eq!(hook["rules"][0]["resources"], json!(["pods"]));
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(
        hook["objectSelector"]["matchExpressions"],
        json!([{"key": "osc-agent.io/injector", "operator": "DoesNotExist"}])
    );
    let ns_sel = hook["namespaceSelector"]["matchExpressions"].to_string();
    assert!(
        ns_sel.contains("kubernetes.io/metadata.name")
            && ns_sel.contains("kube-system")
            && ns_sel.contains("my-app"),
        "{ns_sel}"
    );
    let ca = hook["clientConfig"]["caBundle"].as_str().expect("caBundle");
    assert_eq!(secret["data"]["ca.crt"], ca);
    let cert = secret["data"]["tls.crt"].as_str().expect("tls.crt");
    verify_certificate(ca, cert, "rel-osc-agent-injector.my-app.svc")
        .unwrap_or_else(|e| panic!("the certificate does not match the caBundle: {e}"));
    assert!(
        verify_certificate(ca, cert, "other.my-app.svc").is_err(),
        "the certificate is valid for any name"
    );

    // Kubernetes 1.20: no metadata.name label on namespaces yet, PDB policy/v1beta1, no native sidecars.
    let old = render_with(&t, INJECTOR, "1.20.2");
    let ns_sel = webhook(&old)["namespaceSelector"].to_string();
    assert!(!ns_sel.contains("kubernetes.io/metadata.name"), "{ns_sel}");
    assert!(ns_sel.contains("osc-agent.io/inject"), "{ns_sel}");
    assert_eq!(
        find(&old, "PodDisruptionBudget")[0]["apiVersion"],
        "policy/v1beta1"
    );
    let args = args_of(container(
        &find(&old, "Deployment")[0]["spec"]["template"]["spec"],
        "containers",
        "injector",
    ));
    assert!(
        args.iter().any(|a| a == "--native-sidecar=false"),
        "{args:?}"
    );

    // Audit off: no ClusterRole, no token.
    let quiet = render_with(
        &t,
        &format!("{INJECTOR}injector: {{enabled: true, auditInterval: \"0\"}}\n"),
        KUBE,
    );
    assert!(find(&quiet, "ClusterRole").is_empty());
    assert_eq!(
        find(&quiet, "Deployment")[0]["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );

    // The namespaces the injector leaves alone are left out by the webhook too (so that, with
    // failurePolicy Fail, their pods never wait for it); a custom objectSelector still keeps the
    // injector's own pods out; the audit gets the same selectors.
    let docs = render_with(
        &t,
        &format!(
            "{INJECTOR}injector: {{enabled: true, excludeNamespaces: [calico-system], failurePolicy: Fail, \
             objectSelector: {{matchLabels: {{team: a}}}}}}\n"
        ),
        KUBE,
    );
    let hook = webhook(&docs);
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][1]["values"],
        json!(["my-app", "kube-system", "calico-system"])
    );
    assert_eq!(hook["objectSelector"]["matchLabels"], json!({"team": "a"}));
    assert_eq!(
        hook["objectSelector"]["matchExpressions"],
        json!([{"key": "osc-agent.io/injector", "operator": "DoesNotExist"}])
    );
    let args = args_of(container(
        &find(&docs, "Deployment")[0]["spec"]["template"]["spec"],
        "containers",
        "injector",
    ));
    for want in [
        "--audit-namespace-selector=osc-agent.io/inject notin (disabled),kubernetes.io/metadata.name notin (my-app,kube-system,calico-system)",
        "--audit-pod-selector=team=a,!osc-agent.io/injector",
    ] {
        assert!(args.iter().any(|a| a == want), "{want}: {args:?}");
    }
    // A PEM caBundle (what cert-manager users have) is accepted and encoded.
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let docs = render_with(
        &t,
        &format!(
            "{INJECTOR}injector: {{enabled: true, tls: {{existingSecret: my-tls, caBundle: {}}}}}\n",
            serde_json::to_string(pem).unwrap()
        ),
        KUBE,
    );
    use base64::Engine as _;
    assert_eq!(
        webhook(&docs)["clientConfig"]["caBundle"],
        base64::engine::general_purpose::STANDARD.encode(pem)
    );

    // Refused, naming the value.
    for (extra, kube, says) in [
        (
            "injector: {enabled: true, auditInterval: 1m30s}\n",
            KUBE,
            "auditInterval",
        ),
        (
            "injector: {enabled: true, tls: {validityDays: 30}}\n",
            KUBE,
            "injector.tls.validityDays (30) must be above",
        ),
        (
            "injector: {enabled: true, tls: {validityDays: 365000}}\n",
            KUBE,
            "validityDays",
        ),
        (
            "injector: {enabled: true, podDisruptionBudget: {minAvailable: 2}}\n",
            KUBE,
            "must be below injector.replicas",
        ),
        ("injector: {enabled: true, port: 443}\n", KUBE, "port"),
        (
            "injector: {enabled: true, nativeSidecar: true}\n",
            "1.20.2",
            "injector.nativeSidecar: true needs Kubernetes >= 1.29",
        ),
        (
            "injector: {enabled: true, failurePolicy: Sometimes}\n",
            KUBE,
            "failurePolicy",
        ),
        (
            "injector: {enabled: true, tls: {existingSecret: my-tls}}\n",
            KUBE,
            "injector.tls.caBundle",
        ),
        (
            "injector: {enabled: true, auditInterval: soon}\n",
            KUBE,
            "auditInterval",
        ),
    ] {
        let err = refused(&t, extra, kube);
        assert!(err.contains(says), "{extra}: {err}");
    }
    // A certificate of your own: the Secret is yours, the caBundle is what you give.
    let own = render_with(
        &t,
        &format!(
            "{INJECTOR}injector: {{enabled: true, tls: {{existingSecret: my-tls, caBundle: Zm9v}}}}\n"
        ),
        KUBE,
    );
    assert!(find(&own, "Secret").is_empty());
    assert_eq!(webhook(&own)["clientConfig"]["caBundle"], "Zm9v");
}

/// On the node's API server (Kubernetes 1.20): the injector release is accepted as is, and a `helm upgrade`
/// keeps the certificate and the caBundle (read back with `lookup`), so pods are not cut off on upgrades;
/// near its expiry an upgrade renews it, the caBundle trusting both CAs for one release.
fn injector_certificate_is_kept_across_upgrades_and_renewed_near_expiry() {
    let test = "injector_certificate_is_kept_across_upgrades_and_renewed_near_expiry";
    let Some(t) = tools(test) else { return };
    let kubeconfig = std::env::var_os("KUBECONFIG").expect("the harness checked $KUBECONFIG");
    let kubectl = |args: &[&str]| {
        run(Command::new(&t.kubectl)
            .env("KUBECONFIG", &kubeconfig)
            .args(args))
    };
    let ns = format!("pkg-inj-{}", std::process::id());
    kubectl(&["create", "namespace", &ns]);
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        format!("{INJECTOR}injector: {{enabled: true, replicas: 1}}\nimage: {{repository: localhost/none, tag: x, pullPolicy: Never}}\n"),
    )
    .unwrap();
    let helm = |verb: &str| {
        run(Command::new(&t.helm)
            .env("KUBECONFIG", &kubeconfig)
            .args([verb, "inj", "--namespace", &ns, "--wait=false"])
            .arg(chart())
            .arg("-f")
            .arg(values.path()))
    };
    let state = || {
        let secret: Value = serde_json::from_str(&kubectl(&[
            "-n",
            &ns,
            "get",
            "secret",
            "inj-osc-agent-injector-tls",
            "-o",
            "json",
        ]))
        .unwrap();
        let hook: Value = serde_json::from_str(&kubectl(&[
            "get",
            "mutatingwebhookconfiguration",
            &format!("{ns}-inj-osc-agent-injector"),
            "-o",
            "json",
        ]))
        .unwrap();
        (
            secret["data"]["tls.crt"].as_str().unwrap().to_owned(),
            secret["data"]["ca.crt"].as_str().unwrap().to_owned(),
            hook["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    };
    helm("install");
    let first = state();
    assert_eq!(first.1, first.2, "caBundle is not the Secret's CA");
    helm("upgrade");
    let second = state();
    assert_eq!(first, second, "helm upgrade replaced the certificate");

    // Near its expiry (the Secret says 10 days left; renewBeforeDays is 30), an upgrade renews the pair,
    // and the caBundle trusts both CAs while pods still serve the old certificate.
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 10 * 86400;
    kubectl(&[
        "-n",
        &ns,
        "annotate",
        "--overwrite",
        "secret",
        "inj-osc-agent-injector-tls",
        &format!("osc-agent.io/tls-not-after={soon}"),
    ]);
    helm("upgrade");
    let renewed = state();
    assert_ne!(renewed.0, second.0, "the certificate was not renewed");
    assert_ne!(renewed.1, second.1, "the CA was not renewed");
    let pem = |b64: &str| {
        String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap(),
        )
        .unwrap()
    };
    let bundle = pem(&renewed.2);
    assert!(
        bundle.contains(pem(&renewed.1).trim()) && bundle.contains(pem(&second.1).trim()),
        "the caBundle holds the new and the old CA:\n{bundle}"
    );
    // The next upgrade keeps the new pair and trusts only its CA.
    helm("upgrade");
    let settled = state();
    assert_eq!((&settled.0, &settled.1), (&renewed.0, &renewed.1));
    assert_eq!(settled.2, settled.1, "caBundle is the new CA alone");
    run(Command::new(&t.helm).env("KUBECONFIG", &kubeconfig).args([
        "uninstall",
        "inj",
        "--namespace",
        &ns,
    ]));
    // The webhook configuration is cluster-scoped: gone with the release, not left to intercept pods.
    let left = kubectl(&["get", "mutatingwebhookconfigurations", "-o", "name"]);
    assert!(
        !left.contains(&format!("{ns}-inj-osc-agent-injector")),
        "{left}"
    );
    kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// tests/fixtures/helm-parent with charts/osc-agent copied in as its dependency (what `helm dependency
/// update` would do, without a repository).
fn parent_chart(dir: &Path) -> PathBuf {
    let parent = dir.join("web");
    copy_dir(&Path::new(ROOT).join("tests/fixtures/helm-parent"), &parent);
    copy_dir(&chart(), &parent.join("charts/osc-agent"));
    parent
}

fn chart_yaml(dir: &Path) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(dir.join("Chart.yaml")).unwrap()).unwrap()
}

fn named_templates_work_from_a_parent_chart() {
    let Some(t) = tools("named_templates_work_from_a_parent_chart") else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let parent = parent_chart(scratch.path());
    run(Command::new(&t.helm)
        .args(["lint", "--strict", "--kube-version", KUBE])
        .arg(&parent));
    let app_version = chart_yaml(&chart())["appVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let helpers = std::fs::read_to_string(chart().join("templates/_helpers.tpl")).unwrap();
    assert!(
        helpers.contains(&format!(
            "define \"osc-agent.defaultTag\" -}}}}\n{app_version}\n"
        )),
        "osc-agent.defaultTag must equal Chart.yaml's appVersion {app_version}"
    );
    assert_ne!(chart_yaml(&parent)["appVersion"], json!(app_version));

    let text = try_template(&t, &parent, "", KUBE).unwrap();
    let file = scratch.path().join("parent.yaml");
    std::fs::write(&file, &text).unwrap();
    validate(&t, &file);
    let docs = docs(&text);
    assert_eq!(check_all_agents("parent chart", &docs), 2);
    // Only the parent's Deployment: the subchart deploys no agent, Service or test of its own.
    let kinds: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("Secret", "rel-osc-agent-credentials"),
            ("ConfigMap", "rel-osc-agent-templates"),
            ("Deployment", "rel-web"),
        ],
        "{text}"
    );
    let spec = deployment(&docs);
    assert_eq!(container_names(spec, "initContainers"), ["osc-agent-init"]);
    assert_eq!(container_names(spec, "containers"), ["web", "osc-agent"]);
    for c in agent_containers(spec) {
        assert_eq!(
            c["image"],
            format!("ghcr.io/osc-agent/osc-agent:{app_version}"),
            "the agent's tag, not the parent's appVersion nor latest"
        );
    }
    assert_eq!(spec["shareProcessNamespace"], true, "a signal action");
    let web = container(spec, "containers", "web");
    assert_eq!(
        web["volumeMounts"],
        json!([{"name": "osc-agent-output", "mountPath": "/config", "readOnly": true}])
    );
    let volumes: Vec<&str> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        volumes,
        [
            "osc-agent-credentials",
            "osc-agent-output",
            "osc-agent-templates"
        ]
    );
    let annotations = &find(&docs, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"];
    assert!(
        annotations["checksum/osc-agent-templates"].is_string(),
        "{annotations}"
    );

    // The switch is what keeps the standalone agent out.
    let both = docs_of(try_template(
        &t,
        &parent,
        "osc-agent: {standalone: {enabled: true}}\n",
        KUBE,
    ));
    assert_eq!(find(&both, "Deployment").len(), 2);
    // The version check reaches the parent's pods too (it passes .Capabilities).
    let err =
        try_template(&t, &parent, "osc-agent: {nativeSidecar: true}\n", "1.28.0").unwrap_err();
    assert!(
        err.contains("nativeSidecar: true needs Kubernetes >= 1.29"),
        "{err}"
    );
    let native = docs_of(try_template(
        &t,
        &parent,
        "osc-agent: {nativeSidecar: true}\n",
        KUBE,
    ));
    let spec = deployment(&native);
    assert_eq!(container_names(spec, "initContainers"), ["osc-agent"]);
    assert_eq!(container_names(spec, "containers"), ["web"]);
    // The subchart's schema guards the parent's values for it.
    let err = try_template(
        &t,
        &parent,
        "osc-agent: {actions: [{type: signal, proccess: web}]}\n",
        KUBE,
    )
    .unwrap_err();
    assert!(err.contains("proccess"), "{err}");
}

fn docs_of(rendered: Result<String, String>) -> Vec<Value> {
    docs(&rendered.unwrap_or_else(|e| panic!("helm template failed:\n{e}")))
}

fn the_app_container_is_wired_to_the_output() {
    let Some(t) = tools("the_app_container_is_wired_to_the_output") else {
        return;
    };
    let docs = render_with(
        &t,
        &std::fs::read_to_string(chart().join("ci/app-wiring-values.yaml")).unwrap(),
        KUBE,
    );
    let spec = deployment(&docs);
    // The agent's init container first: the migration reads the synced values.
    assert_eq!(
        container_names(spec, "initContainers"),
        ["osc-agent-init", "migrate"]
    );
    assert_eq!(
        container_names(spec, "containers"),
        ["app", "osc-agent", "log-shipper"]
    );
    let app = container(spec, "containers", "app");
    assert_eq!(
        app["envFrom"],
        json!([{"secretRef": {"name": "app-config"}},
               {"configMapRef": {"name": "app-defaults", "optional": true}}])
    );
    assert_eq!(
        app["volumeMounts"],
        json!([{"name": "osc-agent-output", "mountPath": "/etc/app-config", "readOnly": true},
               {"name": "scratch", "mountPath": "/tmp"}])
    );
    assert_eq!(app["livenessProbe"]["periodSeconds"], 10);
    assert_eq!(app["startupProbe"]["tcpSocket"]["port"], "http");
    let volumes = spec["volumes"].as_array().unwrap();
    let output = volumes
        .iter()
        .find(|v| v["name"] == "osc-agent-output")
        .unwrap();
    assert_eq!(
        output["secret"],
        json!({"secretName": "app-config", "defaultMode": 288, "optional": true})
    );
    assert!(volumes.iter().any(|v| v["name"] == "scratch"));

    // ConfigMap mode, envFrom only (no volume unless appMountPath).
    let docs = render_with(&t, "output: {mode: configmap}\n", KUBE);
    let spec = deployment(&docs);
    let app = container(spec, "containers", "app");
    assert_eq!(
        app["envFrom"],
        json!([{"configMapRef": {"name": "rel-osc-agent"}}])
    );
    assert!(app["volumeMounts"].is_null(), "{app}");
    assert!(
        !spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "osc-agent-output")
    );
    // Neither, when asked.
    let docs = render_with(&t, "output: {mode: secret, appEnvFrom: false}\n", KUBE);
    assert!(container(deployment(&docs), "containers", "app")["envFrom"].is_null());
    // Files mode: the shared volume plus the app's own mounts, the app's env untouched.
    let docs = render_with(
        &t,
        "app: {extraVolumeMounts: [{name: cache, mountPath: /cache}], envFrom: [{secretRef: {name: other}}]}\n\
         extraVolumes: [{name: cache, emptyDir: {}}]\n",
        KUBE,
    );
    let app = container(deployment(&docs), "containers", "app");
    assert_eq!(
        app["volumeMounts"],
        json!([{"name": "osc-agent-output", "mountPath": "/config", "readOnly": true},
               {"name": "cache", "mountPath": "/cache"}])
    );
    assert_eq!(app["envFrom"], json!([{"secretRef": {"name": "other"}}]));
}

fn pod_options_names_and_the_disruption_budget() {
    let Some(t) = tools("pod_options_names_and_the_disruption_budget") else {
        return;
    };
    let opts = std::fs::read_to_string(chart().join("ci/pod-options-values.yaml")).unwrap();
    let docs = render_with(&t, &opts, KUBE);
    let dep = named(&docs, "Deployment", "web-config");
    assert_eq!(
        dep["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
    );
    let pod = &dep["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["team"], "payments");
    assert_eq!(
        pod["metadata"]["labels"]["app.kubernetes.io/name"],
        "osc-agent"
    );
    let spec = &pod["spec"];
    assert_eq!(spec["priorityClassName"], "high-priority");
    assert_eq!(spec["serviceAccountName"], "web-config-agent");
    assert_eq!(spec["automountServiceAccountToken"], true);
    assert_eq!(
        spec["topologySpreadConstraints"][0]["labelSelector"],
        json!({"matchLabels": {"app.kubernetes.io/name": "osc-agent", "app.kubernetes.io/instance": "rel"}}),
        "the pods' own labels by default"
    );
    let sa = named(&docs, "ServiceAccount", "web-config-agent");
    assert_eq!(sa["metadata"]["annotations"]["example.com/role"], "reader");
    let pdb = named(&docs, "PodDisruptionBudget", "web-config");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"]
    );
    // Kubernetes 1.20 has policy/v1beta1 only (installed for real in the API server test).
    let old = render_with(&t, &opts, "1.20.2");
    assert_eq!(
        named(&old, "PodDisruptionBudget", "web-config")["apiVersion"],
        "policy/v1beta1"
    );
    // One replica: no budget (it would block every drain).
    let one = render_with(&t, &format!("{opts}replicaCount: 1\n"), KUBE);
    assert!(find(&one, "PodDisruptionBudget").is_empty());
    // Default budget: minAvailable 1.
    let two = render_with(&t, "replicaCount: 3\n", KUBE);
    assert_eq!(
        find(&two, "PodDisruptionBudget")[0]["spec"]["minAvailable"],
        1
    );

    // nameOverride: names and the name label.
    let docs = render_with(&t, "nameOverride: cfg\n", KUBE);
    let dep = named(&docs, "Deployment", "rel-cfg");
    assert_eq!(
        dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "cfg"
    );
    named(&docs, "Service", "rel-cfg");

    // ServiceAccount: created only when used; an existing one is referenced, not created.
    let files = render_with(&t, "", KUBE);
    assert!(find(&files, "ServiceAccount").is_empty());
    assert!(deployment(&files)["serviceAccountName"].is_null());
    let existing = render_with(
        &t,
        "output: {mode: secret}\nserviceAccount: {create: false, name: shared}\n",
        KUBE,
    );
    assert!(find(&existing, "ServiceAccount").is_empty());
    assert_eq!(deployment(&existing)["serviceAccountName"], "shared");
    assert_eq!(
        find(&existing, "RoleBinding")[0]["subjects"][0]["name"],
        "shared"
    );
    assert_eq!(deployment(&existing)["automountServiceAccountToken"], true);
    let created = render_with(&t, "output: {mode: secret}\n", KUBE);
    named(&created, "ServiceAccount", "rel-osc-agent");
}

/// The pods roll when a template changes (`helm upgrade` with new templates), not otherwise.
fn a_template_change_changes_the_pod_template() {
    let Some(t) = tools("a_template_change_changes_the_pod_template") else {
        return;
    };
    let annotation = |templates: &str| -> Option<String> {
        let docs = render_with(&t, templates, KUBE);
        find(&docs, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"]
            ["checksum/osc-agent-templates"]
            .as_str()
            .map(str::to_owned)
    };
    let a = annotation("templates: {app.conf: \"port={{ config['port'] }}\\n\"}\n").unwrap();
    let a2 = annotation("templates: {app.conf: \"port={{ config['port'] }}\\n\"}\n").unwrap();
    let b = annotation("templates: {app.conf: \"port = {{ config['port'] }}\\n\"}\n").unwrap();
    assert_eq!(a, a2, "stable for the same templates");
    assert_ne!(a, b, "changes with the templates");
    assert_eq!(annotation(""), None, "no templates, no annotation");
    // A user's own pod annotations stay.
    let docs = render_with(
        &t,
        "templates: {a: b}\npodAnnotations: {example.com/x: \"y\"}\n",
        KUBE,
    );
    let ann = &find(&docs, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["example.com/x"], "y");
    assert!(ann["checksum/osc-agent-templates"].is_string());
}

/// Every metric name an alert uses is one the agent exports.
fn assert_metrics_exist(expr: &str) {
    let sources: String = ["src/telemetry.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(Path::new(ROOT).join(f)).unwrap())
        .collect();
    let mut rest = expr;
    while let Some(i) = rest.find("osc_agent_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = name.trim_end_matches("_total");
        assert!(
            sources.contains(&format!("\"{base}\"")),
            "{expr}: {name} is not a metric of the agent (src/telemetry.rs)"
        );
        rest = &rest[i + name.len()..];
    }
}

fn monitoring_objects_and_alert_rules() {
    let Some(t) = tools("monitoring_objects_and_alert_rules") else {
        return;
    };
    let docs = render_with(
        &t,
        &std::fs::read_to_string(chart().join("ci/monitoring-values.yaml")).unwrap(),
        KUBE,
    );
    let sm = named(&docs, "ServiceMonitor", "rel-osc-agent");
    assert_eq!(sm["metadata"]["namespace"], "monitoring");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        sm["spec"]["namespaceSelector"],
        json!({"matchNames": ["my-app"]})
    );
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["port"], "admin");
    assert_eq!(ep["interval"], "15s");
    assert_eq!(ep["scrapeTimeout"], "5s");
    assert_eq!(ep["relabelings"][0]["targetLabel"], "node");
    assert_eq!(ep["metricRelabelings"][0]["action"], "drop");
    let svc = named(&docs, "Service", "rel-osc-agent");
    assert_eq!(
        svc["spec"]["selector"],
        sm["spec"]["selector"]["matchLabels"]
    );
    let pm = named(&docs, "PodMonitor", "rel-osc-agent");
    assert_eq!(pm["metadata"]["namespace"], "my-app");
    assert!(pm["spec"]["namespaceSelector"].is_null());
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "admin");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["interval"], "1m");
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        deployment_selector(&docs)
    );

    let rule = named(&docs, "PrometheusRule", "rel-osc-agent");
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let alerts: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(
        alerts,
        [
            "OscAgentActionBreakerTripped",
            "OscAgentActionErrors",
            "OscAgentDetectorUnavailable",
            "OscAgentNotReady",
            "OscAgentServingStale",
            "OscAgentStreamDown",
            "OscAgentSyncTooOld",
            "OscAgentRestarting",
        ],
        "the README's alerts, less the disabled one, plus the additional rule"
    );
    for r in rules.iter().filter(|r| r["alert"] != "OscAgentRestarting") {
        let expr = r["expr"].as_str().unwrap();
        assert_metrics_exist(expr);
        assert!(
            expr.contains("namespace=\"my-app\", pod=~\"rel-osc-agent-.*\""),
            "scoped to this release: {expr}"
        );
        assert_eq!(r["labels"]["severity"], "warning");
        assert!(
            r["annotations"]["summary"]
                .as_str()
                .unwrap()
                .contains("{{ $labels.pod }}")
        );
    }
    let too_old = rules
        .iter()
        .find(|r| r["alert"] == "OscAgentSyncTooOld")
        .unwrap();
    assert!(
        too_old["expr"].as_str().unwrap().ends_with("> 7200"),
        "{too_old}"
    );
    let errors = rules
        .iter()
        .find(|r| r["alert"] == "OscAgentActionErrors")
        .unwrap();
    assert!(
        errors["expr"]
            .as_str()
            .unwrap()
            .contains("osc_agent_actions_total{")
            && errors["expr"]
                .as_str()
                .unwrap()
                .contains("result=\"error\""),
        "{errors}"
    );
    // All alerts by default, including the informational one.
    let all = render_with(
        &t,
        "prometheusRule: {enabled: true, selector: \"job=\\\"osc\\\"\"}\n",
        KUBE,
    );
    let rules = named(&all, "PrometheusRule", "rel-osc-agent")["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(rules.len(), 8);
    let missed = rules
        .iter()
        .find(|r| r["alert"] == "OscAgentStreamMissesChanges")
        .unwrap();
    assert_eq!(missed["labels"]["severity"], "info");
    assert_metrics_exist(missed["expr"].as_str().unwrap());
    assert!(
        missed["expr"]
            .as_str()
            .unwrap()
            .contains("{job=\"osc\", result=\"missed\"}")
    );
    // Nothing to scrape in init-only mode.
    let err = refused(
        &t,
        "runMode: init-only\npodMonitor: {enabled: true}\n",
        KUBE,
    );
    assert!(err.contains("nothing to scrape"), "{err}");
}

fn deployment_selector(docs: &[Value]) -> Value {
    find(docs, "Deployment")[0]["spec"]["selector"]["matchLabels"].clone()
}

fn init_only_mode_syncs_once_without_a_sidecar() {
    let Some(t) = tools("init_only_mode_syncs_once_without_a_sidecar") else {
        return;
    };
    let docs = render_with(
        &t,
        &std::fs::read_to_string(chart().join("ci/init-only-values.yaml")).unwrap(),
        KUBE,
    );
    let spec = deployment(&docs);
    assert_eq!(container_names(spec, "initContainers"), ["osc-agent-init"]);
    assert_eq!(container_names(spec, "containers"), ["app"]);
    let args = args_of(container(spec, "initContainers", "osc-agent-init"));
    assert_eq!(args[0], "--once");
    assert!(args.contains(&"--output=/config/app.env:dotenv".to_owned()));
    assert!(!args.iter().any(|a| a.starts_with("--admin-addr")));
    let app = container(spec, "containers", "app");
    assert_eq!(app["volumeMounts"][0]["mountPath"], "/config");
    for kind in ["Service", "Pod"] {
        assert!(find(&docs, kind).is_empty(), "no admin port, no {kind}");
    }
    // The init container runs even with initContainer: false (it is the whole point).
    let docs = render_with(&t, "runMode: init-only\ninitContainer: false\n", KUBE);
    assert_eq!(
        container_names(deployment(&docs), "initContainers"),
        ["osc-agent-init"]
    );
    let err = refused(&t, "runMode: init-only\nnativeSidecar: true\n", KUBE);
    assert!(err.contains("nativeSidecar"), "{err}");
}

fn helm_test_checks_readyz_from_inside_the_cluster() {
    let Some(t) = tools("helm_test_checks_readyz_from_inside_the_cluster") else {
        return;
    };
    let docs = render_with(&t, "", KUBE);
    let pods = find(&docs, "Pod");
    assert_eq!(pods.len(), 1);
    let pod = pods[0];
    assert_eq!(pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    let c = &pod["spec"]["containers"][0];
    let env = c["env"].as_array().unwrap();
    assert_eq!(env[0]["name"], "READYZ_URL");
    assert_eq!(
        env[0]["value"],
        "http://rel-osc-agent.my-app.svc:8081/readyz"
    );
    assert!(c["command"][2].as_str().unwrap().contains("wget"));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    // The Service it goes through selects the agent's pods on the admin port.
    let svc = named(&docs, "Service", "rel-osc-agent");
    assert_eq!(svc["spec"]["selector"], deployment_selector(&docs));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "admin");
    // A given URL needs no Service; no test when the admin server is on loopback or disabled.
    let docs = render_with(&t, "test: {url: \"http://10.0.0.7:8081/readyz\"}\n", KUBE);
    assert!(find(&docs, "Service").is_empty());
    assert_eq!(
        find(&docs, "Pod")[0]["spec"]["containers"][0]["env"][0]["value"],
        "http://10.0.0.7:8081/readyz"
    );
    for values in [
        "admin: {address: 127.0.0.1}\nlivenessProbe: null\nreadinessProbe: null\n",
        "test: {enabled: false}\n",
    ] {
        let docs = render_with(&t, values, KUBE);
        assert!(find(&docs, "Pod").is_empty(), "{values}");
        assert!(find(&docs, "Service").is_empty(), "{values}");
    }
}

/// The chart's variants on the real API server: what the schema or the templates refuse is refused by
/// `helm install` (nothing installed), the rest installs; `helm upgrade` with a new template changes the
/// pod template. (The Prometheus Operator kinds are only rendered and checked: no CRDs here.)
fn chart_variants_install_on_a_real_api_server() {
    let test = "chart_variants_install_on_a_real_api_server";
    let Some(t) = tools(test) else { return };
    let Some(kubeconfig) = std::env::var_os("KUBECONFIG") else {
        assert!(
            std::env::var_os("OSC_REQUIRE_KUBE").is_none(),
            "{test}: OSC_REQUIRE_KUBE is set but $KUBECONFIG is not"
        );
        eprintln!("SKIPPED {test}: $KUBECONFIG is not set");
        return;
    };
    let kubectl = |args: &[&str]| {
        run(Command::new(&t.kubectl)
            .env("KUBECONFIG", &kubeconfig)
            .args(args))
    };
    let ns = format!("pkg-chart-{}", std::process::id());
    kubectl(&["create", "namespace", &ns]);
    let version: Value = serde_json::from_str(&kubectl(&["version", "-o", "json"])).unwrap();
    let server = &version["serverVersion"];
    let minor: u32 = server["minor"]
        .as_str()
        .unwrap()
        .trim_end_matches('+')
        .parse()
        .unwrap();
    let helm = |args: &[&str], values: &str| {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), format!("{BASE}{values}")).unwrap();
        Command::new(&t.helm)
            .env("KUBECONFIG", &kubeconfig)
            .args(args)
            .args(["--namespace", &ns, "-f"])
            .arg(file.path())
            .output()
            .expect("helm")
    };
    let chart_dir = chart();
    let chart_arg = chart_dir.to_str().unwrap();
    let install = |release: &str, values: &str| {
        let out = helm(&["install", release, chart_arg, "--wait=false"], values);
        assert!(
            out.status.success(),
            "helm install {release} with\n{values}\nfailed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let not_installed = |release: &str, values: &str, named: &str| {
        let out = helm(&["install", release, chart_arg, "--wait=false"], values);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(named),
            "helm install {release} should fail naming {named}:\n{err}"
        );
        let status = Command::new(&t.helm)
            .env("KUBECONFIG", &kubeconfig)
            .args(["status", release, "--namespace", &ns])
            .output()
            .unwrap();
        assert!(!status.status.success(), "{release} was installed");
    };
    let get = |kind: &str, name: &str| -> Value {
        serde_json::from_str(&kubectl(&["-n", &ns, "get", kind, name, "-o", "json"])).unwrap()
    };
    let exists = |kind: &str, name: &str| {
        Command::new(&t.kubectl)
            .env("KUBECONFIG", &kubeconfig)
            .args(["-n", &ns, "get", kind, name])
            .output()
            .unwrap()
            .status
            .success()
    };

    // A misspelt action field fails the install, not the pod.
    not_installed(
        "typo",
        "actions: [{type: http, url: \"http://127.0.0.1:8080/-/reload\", expect_status: 200}]\n",
        "expect_status",
    );
    assert!(!exists("deployment", "typo-osc-agent"));
    if minor < 29 {
        not_installed(
            "native",
            "nativeSidecar: true\n",
            "nativeSidecar: true needs Kubernetes >= 1.29",
        );
    }

    // Names, a budget in the cluster's policy version, a named ServiceAccount, scheduling options.
    let opts = std::fs::read_to_string(chart_dir.join("ci/pod-options-values.yaml")).unwrap();
    install("opts", &opts);
    let manifest = run(Command::new(&t.helm).env("KUBECONFIG", &kubeconfig).args([
        "get",
        "manifest",
        "opts",
        "--namespace",
        &ns,
    ]));
    let budget_api = if minor >= 21 {
        "policy/v1"
    } else {
        "policy/v1beta1"
    };
    let pdb = docs(&manifest)
        .into_iter()
        .find(|d| d["kind"] == "PodDisruptionBudget")
        .expect("a PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"], budget_api);
    get("poddisruptionbudget", "web-config");
    get("serviceaccount", "web-config-agent");
    let dep = get("deployment", "web-config");
    assert_eq!(
        dep["spec"]["template"]["metadata"]["labels"]["team"],
        "payments"
    );
    assert_eq!(
        dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );

    // The app wired to a Secret, extra containers and volumes; init-only.
    install(
        "wired",
        &std::fs::read_to_string(chart_dir.join("ci/app-wiring-values.yaml")).unwrap(),
    );
    let spec = get("deployment", "wired-osc-agent")["spec"]["template"]["spec"].clone();
    assert_eq!(
        container_names(&spec, "initContainers"),
        ["osc-agent-init", "migrate"]
    );
    assert_eq!(
        container(&spec, "containers", "app")["envFrom"][0]["secretRef"]["name"],
        "app-config"
    );
    install(
        "once",
        &std::fs::read_to_string(chart_dir.join("ci/init-only-values.yaml")).unwrap(),
    );
    let spec = get("deployment", "once-osc-agent")["spec"]["template"]["spec"].clone();
    assert_eq!(container_names(&spec, "containers"), ["app"]);
    assert!(!exists("service", "once-osc-agent"));

    // The library use: the parent's Deployment only.
    let scratch = tempfile::tempdir().unwrap();
    let parent = parent_chart(scratch.path());
    let out = helm(
        &["install", "lib", parent.to_str().unwrap(), "--wait=false"],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    get("deployment", "lib-web");
    get("configmap", "lib-osc-agent-templates");
    assert!(!exists("deployment", "lib-osc-agent"));
    assert!(!exists("service", "lib-osc-agent"));

    // helm upgrade with a changed template rolls the pods (a new pod template), the same one does not.
    let checksum = || {
        let d = get("deployment", "tpl-osc-agent");
        (
            d["spec"]["template"]["metadata"]["annotations"]["checksum/osc-agent-templates"]
                .as_str()
                .unwrap()
                .to_owned(),
            d["metadata"]["generation"].as_i64().unwrap(),
        )
    };
    install(
        "tpl",
        "templates: {app.conf: \"port={{ config['port'] }}\\n\"}\n",
    );
    let (first, gen1) = checksum();
    let upgrade = |values: &str| {
        let out = helm(&["upgrade", "tpl", chart_arg, "--wait=false"], values);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    upgrade("templates: {app.conf: \"port={{ config['port'] }}\\n\"}\n");
    assert_eq!(
        checksum(),
        (first.clone(), gen1),
        "same templates: no rollout"
    );
    upgrade("templates: {app.conf: \"listen={{ config['port'] }}\\n\"}\n");
    let (second, gen2) = checksum();
    assert_ne!(first, second);
    assert!(gen2 > gen1, "a new pod template");
    assert!(
        get("configmap", "tpl-osc-agent-templates")["data"]["app.conf"]
            .as_str()
            .unwrap()
            .starts_with("listen=")
    );

    kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}
