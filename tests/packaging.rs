//! The Helm chart, `manifests/` and the README's sidecar snippet, checked with the real tools that
//! `.ci/k8s-node.sh install` provides (helm 3.17, kubectl, kubernetes-validate) and, when `$KUBECONFIG` is
//! set, installed on a real kube-apiserver:
//!
//! - `helm lint --strict` and `helm template` over every values file in `charts/osc-agent/ci/`;
//! - every rendered document and every manifest validated with `kubernetes-validate --strict` against
//!   Kubernetes 1.29 (an unknown kind fails; only the ServiceMonitor CRD, which has no built-in schema, is
//!   exempt and named);
//! - every osc-agent container's arguments accepted by `osc-agent check --skip-files`;
//! - what the values asked for is what is rendered (RBAC, capabilities, volumes, sidecar style).
//!
//! Without the tools these tests print SKIPPED (a plain local `cargo test`), unless `OSC_REQUIRE_KUBE` is
//! set, as in CI.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_osc-agent");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

struct Tools {
    helm: PathBuf,
    kubectl: PathBuf,
    validate: PathBuf,
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
    };
    if [&t.helm, &t.kubectl, &t.validate]
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
    eprintln!(
        "SKIPPED {test}: run `.ci/k8s-node.sh install` for helm, kubectl and kubernetes-validate"
    );
    None
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
    let out = Command::new(&t.validate)
        .args(["--strict", "-k", "1.29.0"])
        .arg(file)
        .output()
        .expect("kubernetes-validate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("INFO"))
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1"))
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
        .args(["template", "rel", "--namespace", "my-app"])
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

#[test]
fn chart_lints_renders_valid_objects_and_only_real_flags() {
    let Some(t) = tools("chart_lints_renders_valid_objects_and_only_real_flags") else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let files = values_files();
    assert!(files.len() >= 11, "the values matrix: {files:?}");
    for values in &files {
        let name = values.file_name().unwrap().to_string_lossy().into_owned();
        run(Command::new(&t.helm)
            .args(["lint", "--strict"])
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

        let spec = deployment(&docs);
        let native = spec["initContainers"][0]["restartPolicy"] == "Always";
        let sidecar = if native {
            container(spec, "initContainers", "osc-agent")
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
        assert_eq!(
            sidecar["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{name}"
        );
        assert_eq!(
            sidecar["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{name}"
        );
        let sidecar_args = args_of(sidecar);
        let has_api = !find(&docs, "Role").is_empty();
        assert_eq!(
            spec["automountServiceAccountToken"],
            json!(has_api),
            "{name}"
        );
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
            other => panic!("add expectations for {other}"),
        }
    }
}

#[test]
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

#[test]
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
#[test]
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
