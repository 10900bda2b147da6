//! Real pods on a real node: the chart, `manifests/job-once.yaml` and the agent image, run by kubelet.
//!
//! Needs the single-node cluster of `.ci/k8s-node.sh` (`install`, `up`; `$KUBECONFIG` is
//! `target/k8s-node/kubeconfig`, next to the node's run dir, which the images are built into). Without
//! `$KUBECONFIG` (or with a kubeconfig of a cluster without a kubelet) every test shows as ignored, with
//! the reason, unless `OSC_REQUIRE_KUBE` is set, as in CI: then a missing node fails. `harness = false`:
//! see `common::run_tests`.
//!
//! Each test builds nothing itself but its own namespace: the images are built once per run with
//! `.ci/k8s-node.sh image` from this build's agent binary (glibc + its `ldd` libraries, user 65532) and
//! from Debian's `busybox-static` (the test app, with `/bin/*` applet links). Every test runs a dev-server
//! pod (the agent binary, `dev-server --listen 0.0.0.0:8900`), which the agents reach by pod IP (no cluster
//! DNS here) and the test reaches through `kubectl port-forward` (never by pod IP from the host), then
//! `helm install`s `charts/osc-agent` or applies a manifest. Every wait has a deadline.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Logs, USER_KEY};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const AGENT_IMAGE: &str = "localhost/osc-agent:pods";
const APP_IMAGE: &str = "localhost/app:pods";
const DEV_PORT: u16 = 8900;
/// Pod start, sync and kubelet status updates on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(120);
/// A change on the server reaching the app container's view.
const PROPAGATION: Duration = Duration::from_secs(30);
/// A value that must never appear in a log (the app never prints it).
const SECRET_VALUE: &str = "pods-secret-token-7f3a9c";
const WRONG_KEY: &str = "wrong-user-key-for-pods-test-0123";
const BACKUP_PASSWORD: &str = "pods-backup-password-5d21";

/// Written straight to the process's stderr, so it is seen on the terminal.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn main() {
    let skip = common::missing_cluster().or_else(missing_kubelet);
    common::run_tests(
        skip,
        async_tests![
            files_mode_app_reads_files_at_start_and_sees_a_change,
            init_only_mode_syncs_before_the_app_and_runs_no_sidecar,
            job_once_manifest_completes,
            wrong_user_key_fails_the_init_container_with_exit_4,
            signal_action_sends_one_hup_per_real_change_and_none_on_a_no_op,
            restart_container_action_restarts_the_app_once_per_change_until_the_breaker,
            probes_gate_readiness_and_liveness_restarts_the_agent,
            secret_mode_rollout_restart_two_replicas_one_rollout_per_change,
            server_down_at_start_the_fallback_backup_starts_the_pod_stale_and_it_heals,
            injector_adds_the_agent_to_annotated_pods_only,
        ],
    );
}

/// Why these tests cannot run although `$KUBECONFIG` is set (its cluster has no kubelet: it is not a
/// `.ci/k8s-node.sh` node), or `None`. With `OSC_REQUIRE_KUBE` that is a failure.
fn missing_kubelet() -> Option<String> {
    let kubeconfig = PathBuf::from(std::env::var_os("KUBECONFIG")?);
    let run_dir = run_dir(&kubeconfig);
    if run_dir.join(".k8s-node").exists() {
        return None;
    }
    assert!(
        std::env::var_os("OSC_REQUIRE_KUBE").is_none(),
        "OSC_REQUIRE_KUBE is set but {} is not a .ci/k8s-node.sh run dir (no kubelet, no images)",
        run_dir.display()
    );
    Some(format!(
        "{} is not next to a .ci/k8s-node.sh node: these tests need a kubelet",
        kubeconfig.display()
    ))
}

/// The node's tools and paths (the tests run only when `main` found a node).
struct Node {
    kubectl: PathBuf,
    helm: PathBuf,
    kubeconfig: PathBuf,
}

fn node() -> Node {
    let kubeconfig =
        PathBuf::from(std::env::var_os("KUBECONFIG").expect("main checked $KUBECONFIG"));
    let run_dir = run_dir(&kubeconfig);
    let cache = std::env::var_os("K8S_TOOLS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/k8s-test-tools")))
        .unwrap_or_default();
    let n = Node {
        kubectl: cache.join("bin/kubectl"),
        helm: cache.join("bin/helm"),
        kubeconfig,
    };
    assert!(
        n.kubectl.is_file() && n.helm.is_file(),
        "kubectl/helm missing in {}: run .ci/k8s-node.sh install",
        cache.display()
    );
    images(&run_dir);
    n
}

/// The node's run dir: `$KUBE_IT_DIR`, else the kubeconfig's directory (k8s-node.sh writes it there).
fn run_dir(kubeconfig: &Path) -> PathBuf {
    std::env::var_os("KUBE_IT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| kubeconfig.parent().unwrap_or(Path::new(".")).to_owned())
}

/// Builds and imports the two images once per test run (`.ci/k8s-node.sh image`).
fn images(run_dir: &Path) {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let script = Path::new(ROOT).join(".ci/k8s-node.sh");
        let busybox = Path::new("/bin/busybox");
        if !busybox.is_file() {
            return Err("/bin/busybox is missing: apt-get install busybox-static".into());
        }
        // The app image: busybox as /busybox plus /bin/<applet> links, so `sh -c …` works as in manifests.
        let extra = tempfile::tempdir().map_err(|e| e.to_string())?;
        let bin = extra.path().join("bin");
        std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
        let list = std::process::Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(|e| e.to_string())?;
        for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
            std::os::unix::fs::symlink("/busybox", bin.join(applet)).map_err(|e| e.to_string())?;
        }
        for (image, binary, dir) in [
            (AGENT_IMAGE, Path::new(common::BIN), None),
            (APP_IMAGE, busybox, Some(extra.path())),
        ] {
            let start = Instant::now();
            let mut cmd = std::process::Command::new(&script);
            cmd.arg("image").arg(image).arg(binary);
            if let Some(d) = dir {
                cmd.arg(d);
            }
            let out = cmd
                .env("KUBE_IT_DIR", run_dir)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("{}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "k8s-node.sh image {image} failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            say(&format!(
                "pods: image {image} built and imported in {:.1} s",
                start.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// One namespace per test, deleted (without waiting) when the test ends, also when it fails.
struct Ns {
    node: Node,
    name: String,
    logs: Logs,
    dir: tempfile::TempDir,
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.node.kubectl)
            .env("KUBECONFIG", &self.node.kubeconfig)
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Ns {
    async fn new(node: Node, test: &str) -> Ns {
        let name = format!("pods-{test}-{:04x}", fastrand::u16(..)).replace('_', "-");
        let ns = Ns {
            node,
            name,
            logs: Logs::default(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        ns.kubectl(&["create", "namespace", &ns.name]).await;
        ns
    }

    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("KUBECONFIG", &self.node.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs a command (60 s deadline): (success, stdout, stderr).
    async fn try_run(&self, program: &Path, args: &[&str]) -> (bool, String, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            self.command(program, args).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish within 60 s", program.display()))
        .expect("run kubectl/helm");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn run(&self, program: &Path, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.try_run(program, args).await;
        assert!(
            ok,
            "{} {args:?} failed:\n{stdout}{stderr}",
            program.display()
        );
        stdout
    }

    /// `kubectl ARGS` in this namespace (the namespace flag is added when ARGS do not name one).
    async fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        self.run(&self.node.kubectl, &all).await
    }

    async fn helm(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        self.run(&self.node.helm, &all).await
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all).await).expect("kubectl -o json")
    }

    /// Logs of a container (also kept to check for leaked secrets at the end).
    async fn logs(&self, pod: &str, container: &str, previous: bool) -> String {
        let mut args = vec!["logs", pod, "-c", container];
        if previous {
            args.push("--previous");
        }
        let text = self.kubectl(&args).await;
        self.logs.push(&format!(
            "[{pod}/{container}{}]\n{text}",
            if previous { " previous" } else { "" }
        ));
        text
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }

    /// A credentials Secret holding `key` as `user-key`, made the way README shows.
    async fn credentials(&self, name: &str, key: &str) {
        let file = self.write(&format!("{name}.user-key"), key);
        self.kubectl(&[
            "create",
            "secret",
            "generic",
            name,
            &format!("--from-file=user-key={file}"),
        ])
        .await;
    }

    /// `helm install NAME charts/osc-agent` with these values (JSON is YAML).
    async fn helm_install(&self, release: &str, values: &Value) {
        let file = self.write(&format!("{release}-values.yaml"), &values.to_string());
        let chart = Path::new(ROOT).join("charts/osc-agent");
        self.helm(&[
            "install",
            release,
            chart.to_str().unwrap(),
            "-f",
            &file,
            "--wait=false",
        ])
        .await;
    }

    /// The one pod of a release (waits until it exists).
    async fn release_pod(&self, release: &str) -> String {
        let selector = format!("app.kubernetes.io/instance={release}");
        poll(&format!("a pod of release {release}"), WAIT, || async {
            let pods = self.json(&["get", "pods", "-l", &selector]).await;
            match pods["items"].as_array().map(|a| a.as_slice()) {
                Some([one]) => one["metadata"]["name"].as_str().map(str::to_owned),
                _ => None,
            }
        })
        .await
    }

    async fn wait_ready(&self, pod: &str) -> Value {
        poll(&format!("pod {pod} Ready"), WAIT, || async {
            let p = self.json(&["get", "pod", pod]).await;
            condition(&p, "Ready").then_some(p)
        })
        .await
    }

    /// `kubectl port-forward` to a pod's port on 127.0.0.1: the local port.
    async fn port_forward(&self, pod: &str, port: u16) -> PortForward {
        let target = format!("pod/{pod}");
        let spec = format!(":{port}");
        let mut child = self
            .command(
                &self.node.kubectl,
                &[
                    "-n",
                    &self.name,
                    "port-forward",
                    "--address",
                    "127.0.0.1",
                    &target,
                    &spec,
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl port-forward");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let local = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                // "Forwarding from 127.0.0.1:41235 -> 8900"
                if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
                    && let Some(p) = rest.split_whitespace().next()
                {
                    return p.parse::<u16>().expect("local port");
                }
            }
            panic!("kubectl port-forward to {target} ended before forwarding");
        })
        .await
        .expect("kubectl port-forward did not forward within 30 s");
        // Keep reading its stdout (one line per connection) so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        PortForward {
            _child: child,
            url: format!("http://127.0.0.1:{local}"),
        }
    }

    /// A dev-server pod (the agent image, `dev-server --listen 0.0.0.0:8900`), Ready, with the entries
    /// of environment `prod` created through a port-forward. Returns its pod IP and the forward.
    async fn dev_server(&self, entries: &[(&str, Value)]) -> (String, PortForward) {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "dev-server", "labels": {"app": "dev-server"}},
            "spec": {
                "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "dev-server", "image": AGENT_IMAGE, "imagePullPolicy": "Never",
                    "args": ["dev-server", "--listen", format!("0.0.0.0:{DEV_PORT}")],
                    "ports": [{"containerPort": DEV_PORT}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": DEV_PORT}, "periodSeconds": 1},
                    "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                         "capabilities": {"drop": ["ALL"]}}
                }]
            }
        });
        let file = self.write("dev-server.yaml", &pod.to_string());
        self.kubectl(&["apply", "-f", &file]).await;
        let status = self.wait_ready("dev-server").await;
        let ip = status["status"]["podIP"]
            .as_str()
            .expect("dev server pod IP")
            .to_owned();
        let forward = self.port_forward("dev-server", DEV_PORT).await;
        let api = forward.api(USER_KEY);
        for (key, value) in entries {
            api.create("prod", key, value.clone()).await;
        }
        (ip, forward)
    }

    /// [`Ns::dev_server`] with the two entries most tests use: `db.url` (`db_url`) and `api.token` (the
    /// secret value no log may show).
    async fn app_server(&self, db_url: &str) -> (String, PortForward) {
        self.dev_server(&[
            ("db.url", json!(db_url)),
            ("api.token", json!(SECRET_VALUE)),
        ])
        .await
    }

    /// `kubectl exec POD -c CONTAINER -- ARGS`: stdout, or None if it failed.
    async fn exec(&self, pod: &str, container: &str, args: &[&str]) -> Option<String> {
        let mut all = vec!["-n", &self.name, "exec", pod, "-c", container, "--"];
        all.extend_from_slice(args);
        let (ok, stdout, _) = self.try_run(&self.node.kubectl, &all).await;
        ok.then_some(stdout)
    }

    /// Every captured log is free of the user keys and the secret value.
    fn assert_no_secret_logged(&self) {
        self.logs
            .assert_free_of(&[USER_KEY, WRONG_KEY, SECRET_VALUE, BACKUP_PASSWORD]);
    }
}

struct PortForward {
    _child: Child,
    url: String,
}

impl PortForward {
    fn api(&self, key: &str) -> common::Api {
        common::Api::new(&self.url, key)
    }

    async fn get_json(&self, path: &str) -> Value {
        let resp = common::http_client()
            .get(format!("{}{path}", self.url))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        resp.json().await.expect("JSON answer")
    }
}

/// Polls `f` every 500 ms (each poll runs kubectl) until it gives a value; fails after `deadline`.
async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until `cond` holds (see [`poll`]).
async fn until<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll(what, deadline, || {
        let fut = cond();
        async move { fut.await.then_some(()) }
    })
    .await
}

fn condition(pod: &Value, kind: &str) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == kind && c["status"] == "True")
}

fn container_status<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod["status"][list]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Values for the chart: the test images, the dev server by pod IP, environment `prod`, credentials
/// from an existing Secret, and the busybox app running `script` as another user (1000) than the agent,
/// so that it reads the files through the group (fsGroup 65532, mode 0440).
fn chart_values(server_ip: &str, secret: &str, script: &str) -> Value {
    json!({
        "server": {"url": format!("http://{server_ip}:{DEV_PORT}")},
        "environment": "prod",
        "credentials": {"existingSecret": secret},
        "image": {"repository": "localhost/osc-agent", "tag": "pods", "pullPolicy": "Never"},
        "output": {"aggregates": [{"name": "app.env", "format": "dotenv"}]},
        "app": {
            "image": {"repository": "localhost/app", "tag": "pods", "pullPolicy": "Never"},
            "command": ["sh", "-c"],
            "args": [script],
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "readOnlyRootFilesystem": true,
                                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
        }
    })
}

/// The app: prints what it reads at start, then waits; `got HUP` per SIGHUP, exits 0 on SIGTERM.
const APP_SCRIPT: &str = r#"echo "start: db.url=$(cat /config/db.url) settings=$(wc -l < /config/app.env)"
trap 'echo got HUP' HUP
trap 'echo stopping; exit 0' TERM
while true; do sleep 1 & wait $!; done
"#;

/// (1) files mode: the init container ran first (the app read its files at start); a PUT on the server
/// shows up in the app container's view; modes and ownership as README documents.
async fn files_mode_app_reads_files_at_start_and_sees_a_change() {
    let ns = Ns::new(node(), "files").await;
    let (ip, server) = ns.app_server("postgres://db/app").await;
    ns.credentials("osc-credentials", USER_KEY).await;
    ns.helm_install("rel", &chart_values(&ip, "osc-credentials", APP_SCRIPT))
        .await;
    let pod = ns.release_pod("rel").await;
    let status = ns.wait_ready(&pod).await;
    // Both containers ready: the agent's readiness probe (/readyz) passed through kubelet.
    for c in ["app", "osc-agent"] {
        assert_eq!(
            container_status(&status, "containerStatuses", c)["ready"],
            true,
            "{c}: {status}"
        );
    }
    let init = container_status(&status, "initContainerStatuses", "osc-agent-init");
    assert_eq!(init["state"]["terminated"]["exitCode"], 0, "{init}");
    let shown = ns.kubectl(&["get", "pod", &pod]).await;
    say(&format!("pods: kubectl get pod\n{shown}"));
    assert!(
        shown.contains("2/2") && shown.contains("Running"),
        "{shown}"
    );

    // `helm test`: the chart's test pod gets /readyz from inside the cluster. Without cluster DNS here it
    // goes to the pod's IP (test.url), with the local busybox image; the pod template does not change.
    let pod_ip = status["status"]["podIP"].as_str().expect("podIP");
    let readyz = format!("http://{pod_ip}:8081/readyz");
    let chart = Path::new(ROOT).join("charts/osc-agent");
    ns.helm(&[
        "upgrade",
        "rel",
        chart.to_str().unwrap(),
        "--reuse-values",
        "--set",
        &format!("test.url={readyz}"),
        "--set",
        "test.image.repository=localhost/app,test.image.tag=pods,test.image.pullPolicy=Never",
    ])
    .await;
    let (ok, tested, err) = ns
        .try_run(
            &ns.node.helm,
            &["-n", &ns.name, "test", "rel", "--timeout", "50s"],
        )
        .await;
    say(&format!("pods: helm test rel\n{tested}"));
    if !ok {
        let test_pod = "rel-osc-agent-test-readyz";
        let log = ns.logs(test_pod, "readyz", false).await;
        let described = ns.kubectl(&["describe", "pod", test_pod]).await;
        panic!("helm test failed: {tested}{err}\nlog:\n{log}\n{described}");
    }
    assert!(
        tested.contains("rel-osc-agent-test-readyz") && tested.contains("Succeeded"),
        "{tested}"
    );
    assert_eq!(
        ns.release_pod("rel").await,
        pod,
        "the upgrade for the test did not roll the pod"
    );

    // The app read the synced files when it started (the init container ran before it).
    let app_log = ns.logs(&pod, "app", false).await;
    assert!(
        app_log.contains("start: db.url=postgres://db/app settings=2"),
        "{app_log}"
    );

    // Modes and ownership: 0440, owned by the agent's 65532 with group 65532 (fsGroup); the app runs as
    // 1000 and reads them through its supplementary group.
    let id = ns.exec(&pod, "app", &["id"]).await.expect("exec id");
    assert!(id.contains("uid=1000") && id.contains("65532"), "{id}");
    let stat = ns
        .exec(
            &pod,
            "app",
            &[
                "stat",
                "-L",
                "-c",
                "%a %u %g %n",
                "/config/db.url",
                "/config/api.token",
                "/config/app.env",
            ],
        )
        .await
        .expect("exec stat");
    for line in stat.lines() {
        assert!(line.starts_with("440 65532 65532 "), "{stat}");
    }
    // The app cannot write there (read-only mount).
    assert!(
        ns.exec(&pod, "app", &["sh", "-c", "echo x > /config/db.url"])
            .await
            .is_none(),
        "the app could write into /config"
    );

    // A PUT on the server reaches the app container's view.
    let admin = ns.port_forward(&pod, 8081).await;
    let before = admin.get_json("/status").await;
    assert_eq!(before["ready"], true, "{before}");
    assert_eq!(before["stream"]["connected"], true, "{before}");
    assert_eq!(before["sync"]["keys"], 2, "{before}");
    let put_at = Instant::now();
    server
        .api(USER_KEY)
        .update("prod", "db.url", json!("postgres://db2/app"))
        .await;
    until("the change in the app container", PROPAGATION, || async {
        ns.exec(&pod, "app", &["cat", "/config/db.url"])
            .await
            .as_deref()
            == Some("postgres://db2/app")
    })
    .await;
    say(&format!(
        "pods: PUT → app container's view in {:.1} s",
        put_at.elapsed().as_secs_f64()
    ));
    let env = ns
        .exec(&pod, "app", &["cat", "/config/app.env"])
        .await
        .expect("cat app.env");
    assert!(
        env.contains("db_url='postgres://db2/app'"),
        "aggregate not updated"
    );
    let after = admin.get_json("/status").await;
    say(&format!(
        "pods: /status sync {} stream {}",
        after["sync"], after["stream"]["events_by_type"]
    ));
    assert_ne!(
        after["sync"]["applied_hash"],
        before["sync"]["applied_hash"]
    );
    assert_eq!(after["sync"]["last_error"], Value::Null, "{after}");
    assert_eq!(after["status"], "ok", "{after}");

    ns.logs(&pod, "osc-agent-init", false).await;
    ns.logs(&pod, "osc-agent", false).await;
    ns.logs("dev-server", "dev-server", false).await;
    ns.assert_no_secret_logged();
}

/// `runMode: init-only` (chart): the init container syncs once, the app starts with its files and is
/// the pod's only container; the app's extra volume and mount (`extraVolumes`, `app.extraVolumeMounts`)
/// and env (`app.envFrom`) are wired in.
async fn init_only_mode_syncs_before_the_app_and_runs_no_sidecar() {
    let ns = Ns::new(node(), "initonly").await;
    let (ip, _server) = ns.app_server("postgres://db/app").await;
    ns.credentials("osc-credentials", USER_KEY).await;
    ns.kubectl(&[
        "create",
        "configmap",
        "app-settings",
        "--from-literal=GREETING=hello-from-envfrom",
    ])
    .await;
    let script = r#"echo "start: db.url=$(cat /config/db.url) settings=$(wc -l < /config/app.env)"
echo "greeting: $GREETING"
echo written > /scratch/probe && echo "scratch: $(cat /scratch/probe)"
trap 'echo stopping; exit 0' TERM
while true; do sleep 1 & wait $!; done
"#;
    let mut values = chart_values(&ip, "osc-credentials", script);
    values["runMode"] = json!("init-only");
    values["extraVolumes"] = json!([{"name": "scratch", "emptyDir": {}}]);
    values["app"]["extraVolumeMounts"] = json!([{"name": "scratch", "mountPath": "/scratch"}]);
    values["app"]["envFrom"] = json!([{"configMapRef": {"name": "app-settings"}}]);
    ns.helm_install("once", &values).await;
    let pod = ns.release_pod("once").await;
    let status = ns.wait_ready(&pod).await;
    let spec = ns.json(&["get", "pod", &pod]).await["spec"].clone();
    assert_eq!(
        names(&spec, "containers"),
        vec!["app"],
        "no sidecar: {spec}"
    );
    assert_eq!(
        names(&spec, "initContainers"),
        vec!["osc-agent-init"],
        "{spec}"
    );
    let init = container_status(&status, "initContainerStatuses", "osc-agent-init");
    assert_eq!(init["state"]["terminated"]["exitCode"], 0, "{init}");
    let app_log = poll("the app's start lines", WAIT, || async {
        let log = ns.logs(&pod, "app", false).await;
        log.contains("scratch: ").then_some(log)
    })
    .await;
    assert!(
        app_log.contains("start: db.url=postgres://db/app settings=2")
            && app_log.contains("greeting: hello-from-envfrom")
            && app_log.contains("scratch: written"),
        "{app_log}"
    );
    ns.logs(&pod, "osc-agent-init", false).await;
    ns.assert_no_secret_logged();
}

/// (6) `manifests/job-once.yaml`, with the test images, the dev server and this namespace: the Job
/// completes, and its container read the dotenv file the init container wrote.
async fn job_once_manifest_completes() {
    let ns = Ns::new(node(), "job").await;
    let (ip, _server) = ns
        .dev_server(&[
            ("db.url", json!("postgres://db/app")),
            ("api.token", json!(SECRET_VALUE)),
            ("pool", json!({"size": 5})),
        ])
        .await;
    ns.credentials("osc-agent-credentials", USER_KEY).await;
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("manifests/job-once.yaml"))
        .expect("manifests/job-once.yaml");
    let mut adapted = String::new();
    for line in manifest.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        match line.trim() {
            "namespace: my-app" => adapted += &format!("{indent}namespace: {}\n", ns.name),
            "image: ghcr.io/osc-agent/osc-agent:0.1.0" => {
                adapted +=
                    &format!("{indent}image: {AGENT_IMAGE}\n{indent}imagePullPolicy: Never\n")
            }
            "image: busybox:1.36" => {
                adapted += &format!("{indent}image: {APP_IMAGE}\n{indent}imagePullPolicy: Never\n")
            }
            "- --server=https://osc.example:9000" => {
                adapted += &format!("{indent}- --server=http://{ip}:{DEV_PORT}\n")
            }
            "- --environment=production" => adapted += &format!("{indent}- --environment=prod\n"),
            _ => adapted += &format!("{line}\n"),
        }
    }
    for changed in [AGENT_IMAGE, APP_IMAGE, "--environment=prod", ip.as_str()] {
        assert!(
            adapted.contains(changed),
            "job-once.yaml changed shape: {changed} not substituted"
        );
    }
    let file = ns.write("job-once.yaml", &adapted);
    ns.kubectl(&["apply", "-f", &file]).await;
    let job = poll("Job my-migration to complete", WAIT, || async {
        let job = ns.json(&["get", "job", "my-migration"]).await;
        assert!(
            job["status"]["failed"].as_u64().unwrap_or(0) == 0,
            "the Job failed: {job}"
        );
        (job["status"]["succeeded"] == 1).then_some(job)
    })
    .await;
    assert!(condition(&job, "Complete"), "{job}");
    let out = ns
        .kubectl(&["logs", "job/my-migration", "-c", "migrate"])
        .await;
    ns.logs.push(&out);
    assert_eq!(out.trim(), "migrating with 3 settings");
    let init = ns
        .kubectl(&["logs", "job/my-migration", "-c", "osc-agent"])
        .await;
    ns.logs.push(&init);
    assert!(init.contains("sync complete"), "{init}");
    ns.assert_no_secret_logged();
}

/// (5a) A wrong user key: the init container exits 4, the pod shows `Init:Error` (or the back-off
/// after it), the app never starts, and the log names the cause without any key or value.
async fn wrong_user_key_fails_the_init_container_with_exit_4() {
    let ns = Ns::new(node(), "wrongkey").await;
    let (ip, _server) = ns.dev_server(&[("api.token", json!(SECRET_VALUE))]).await;
    ns.credentials("bad-credentials", WRONG_KEY).await;
    ns.helm_install("bad", &chart_values(&ip, "bad-credentials", APP_SCRIPT))
        .await;
    let pod = ns.release_pod("bad").await;
    let status = poll("the init container to exit", WAIT, || async {
        let status = ns.json(&["get", "pod", &pod]).await;
        let init = container_status(&status, "initContainerStatuses", "osc-agent-init");
        let exited =
            !init["state"]["terminated"].is_null() || !init["lastState"]["terminated"].is_null();
        exited.then_some(status)
    })
    .await;
    let init = container_status(&status, "initContainerStatuses", "osc-agent-init");
    let terminated = if init["state"]["terminated"].is_null() {
        &init["lastState"]["terminated"]
    } else {
        &init["state"]["terminated"]
    };
    assert_eq!(terminated["exitCode"], 4, "{init}");
    let shown = ns.kubectl(&["get", "pod", &pod]).await;
    say(&format!("pods: kubectl get pod\n{shown}"));
    assert!(
        shown.contains("Init:Error") || shown.contains("Init:CrashLoopBackOff"),
        "{shown}"
    );
    // The app never started.
    let app = container_status(&status, "containerStatuses", "app");
    assert!(app["state"]["running"].is_null(), "{app}");
    let log = ns.kubectl(&["logs", &pod, "-c", "osc-agent-init"]).await;
    ns.logs.push(&log);
    assert!(
        log.contains("the user key does not match the data in environment 'prod'"),
        "{log}"
    );
    ns.assert_no_secret_logged();
}

/// An action chart: the files-mode values plus `actions`, a short cooldown and `maxActions`, with the
/// app running as the agent's user (65532). Found on this node: the `KILL` capability the chart adds
/// does not reach the agent's process, which runs as non-root (Kubernetes sets no ambient capabilities,
/// and `execve` as a non-root user clears the permitted set), so signalling an app of another user fails
/// with EPERM (`/status.actions.last` says so, naming CAP_KILL). Running both as one user works, and
/// the chart now refuses the other combination (tests/packaging.rs).
fn action_values(server_ip: &str, actions: Value, max_actions: u32) -> Value {
    let mut v = chart_values(server_ip, "osc-credentials", APP_SCRIPT);
    v["app"]["securityContext"]["runAsUser"] = json!(65532);
    v["app"]["securityContext"]["runAsGroup"] = json!(65532);
    v["actions"] = actions;
    v["actionCooldown"] = json!("1s");
    v["maxActions"] = json!(max_actions);
    v
}

fn count(text: &str, line: &str) -> usize {
    text.lines().filter(|l| l.trim() == line).count()
}

/// Sends a PUT and waits until the agent has synced after it (`/status.sync.succeeded` grew).
async fn put_and_wait_sync(server: &PortForward, admin: &PortForward, value: &str) -> Value {
    let before = admin.get_json("/status").await["sync"]["succeeded"]
        .as_u64()
        .expect("sync.succeeded");
    server
        .api(USER_KEY)
        .update("prod", "db.url", json!(value))
        .await;
    poll("a sync after the PUT", PROPAGATION, || async {
        let s = admin.get_json("/status").await;
        (s["sync"]["succeeded"].as_u64().unwrap_or(0) > before).then_some(s)
    })
    .await
}

/// (2) signal action: the app process in the other container (shared process namespace, KILL
/// capability) gets exactly one SIGHUP per real change, none on a no-op PUT.
async fn signal_action_sends_one_hup_per_real_change_and_none_on_a_no_op() {
    let ns = Ns::new(node(), "signal").await;
    let (ip, server) = ns.app_server("postgres://db/app").await;
    ns.credentials("osc-credentials", USER_KEY).await;
    let actions = json!([{"type": "signal", "process": "sh", "signal": "HUP"}]);
    ns.helm_install("sig", &action_values(&ip, actions, 10))
        .await;
    let pod = ns.release_pod("sig").await;
    let spec = ns.json(&["get", "pod", &pod]).await;
    assert_eq!(spec["spec"]["shareProcessNamespace"], true);
    ns.wait_ready(&pod).await;
    let admin = ns.port_forward(&pod, 8081).await;
    let hups = || async { count(&ns.logs(&pod, "app", false).await, "got HUP") };

    // No action on a fresh start, none on a PUT that changes nothing.
    let s = put_and_wait_sync(&server, &admin, "postgres://db/app").await;
    assert_eq!(s["actions"]["runs"], 0, "{}", s["actions"]);
    assert_eq!(hups().await, 0);

    for (n, value) in [(1, "postgres://db2/app"), (2, "postgres://db3/app")] {
        server
            .api(USER_KEY)
            .update("prod", "db.url", json!(value))
            .await;
        let s = poll(&format!("action run {n}"), PROPAGATION, || async {
            let s = admin.get_json("/status").await;
            (s["actions"]["runs"] == n && s["actions"]["pending"] == false).then_some(s)
        })
        .await;
        say(&format!(
            "pods: /status.actions after change {n}: {}",
            s["actions"]
        ));
        assert_eq!(s["actions"]["breaker_tripped"], false, "{}", s["actions"]);
        until(
            &format!("HUP {n} in the app's log"),
            PROPAGATION,
            || async { hups().await >= n },
        )
        .await;
        // A no-op PUT afterwards: synced, no further run, no further HUP.
        let s = put_and_wait_sync(&server, &admin, value).await;
        assert_eq!(s["actions"]["runs"], n, "{}", s["actions"]);
        assert_eq!(hups().await, n, "exactly one HUP per real change");
    }
    let app_log = ns.logs(&pod, "app", false).await;
    let restarts = container_status(
        &ns.json(&["get", "pod", &pod]).await,
        "containerStatuses",
        "app",
    )["restartCount"]
        .clone();
    assert_eq!(
        restarts, 0,
        "the app was restarted, not signalled:\n{app_log}"
    );
    ns.logs(&pod, "osc-agent", false).await;
    ns.assert_no_secret_logged();
}

/// (3) restart-container: the app container's restartCount goes up by one per real change (its main
/// process gets SIGTERM and exits; kubelet restarts it and it reads the new files at start); after
/// `maxActions` runs the breaker stops restarts while files keep syncing.
async fn restart_container_action_restarts_the_app_once_per_change_until_the_breaker() {
    let ns = Ns::new(node(), "restart").await;
    let (ip, server) = ns.app_server("postgres://db/app").await;
    ns.credentials("osc-credentials", USER_KEY).await;
    let actions = json!([{"type": "restart-container", "process": "sh", "grace": "5s"}]);
    ns.helm_install("rst", &action_values(&ip, actions, 2))
        .await;
    let pod = ns.release_pod("rst").await;
    ns.wait_ready(&pod).await;
    let admin = ns.port_forward(&pod, 8081).await;
    let restart_count = || async {
        container_status(
            &ns.json(&["get", "pod", &pod]).await,
            "containerStatuses",
            "app",
        )["restartCount"]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    assert_eq!(restart_count().await, 0);

    for (n, value) in [(1u64, "postgres://db2/app"), (2, "postgres://db3/app")] {
        server
            .api(USER_KEY)
            .update("prod", "db.url", json!(value))
            .await;
        // Kubelet restarts a container that exited with a back-off (10 s before the second restart).
        until(&format!("app restart {n}"), WAIT, || async {
            restart_count().await == n
        })
        .await;
        let s = admin.get_json("/status").await;
        say(&format!(
            "pods: /status.actions after change {n}: {}",
            s["actions"]
        ));
        assert_eq!(s["actions"]["runs"], n, "{}", s["actions"]);
        // The restarted app read the new value at its start; the one before it stopped on SIGTERM.
        let want = format!("start: db.url={value} settings=2");
        until(
            &format!("the restarted app's start line ({value})"),
            WAIT,
            || async { ns.logs(&pod, "app", false).await.contains(&want) },
        )
        .await;
        let previous = ns.logs(&pod, "app", true).await;
        assert!(previous.contains("stopping"), "{previous}");
    }

    // Third change: the breaker (maxActions 2) skips the action; the files still sync.
    server
        .api(USER_KEY)
        .update("prod", "db.url", json!("postgres://db4/app"))
        .await;
    until(
        "the third value in the app container",
        PROPAGATION,
        || async {
            ns.exec(&pod, "app", &["cat", "/config/db.url"])
                .await
                .as_deref()
                == Some("postgres://db4/app")
        },
    )
    .await;
    let s = poll("the breaker to trip", PROPAGATION, || async {
        let s = admin.get_json("/status").await;
        (s["actions"]["breaker_tripped"] == true).then_some(s)
    })
    .await;
    say(&format!(
        "pods: /status after change 3: status {} actions {}",
        s["status"], s["actions"]
    ));
    assert_eq!(s["status"], "degraded", "{s}");
    assert_eq!(s["actions"]["runs"], 2, "{}", s["actions"]);
    assert_eq!(restart_count().await, 2);
    ns.logs(&pod, "osc-agent", false).await;
    ns.assert_no_secret_logged();
}

/// (5b) kubelet's probes gate the pod: with nothing to sync (empty environment, no init container)
/// the agent's `/readyz` answers 503 and the pod stays `1/2`; once the entry exists it turns Ready.
/// With the server gone longer than `--stale-after`, `/healthz` fails and kubelet restarts the agent
/// container (liveness), while the app keeps running on its files.
async fn probes_gate_readiness_and_liveness_restarts_the_agent() {
    let ns = Ns::new(node(), "probes").await;
    let (ip, server) = ns.dev_server(&[]).await;
    ns.credentials("osc-credentials", USER_KEY).await;
    let mut values = chart_values(
        &ip,
        "osc-credentials",
        "echo started; while true; do sleep 1 & wait $!; done",
    );
    values["initContainer"] = json!(false);
    values["extraArgs"] = json!(["--stale-after=5s"]);
    values["readinessProbe"] =
        json!({"httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 1});
    values["livenessProbe"] = json!({"httpGet": {"path": "/healthz", "port": "admin"}, "periodSeconds": 1, "failureThreshold": 2});
    ns.helm_install("prb", &values).await;
    let pod = ns.release_pod("prb").await;

    // Running, probed, not ready: nothing was synced yet.
    let status = poll("the agent container running", WAIT, || async {
        let p = ns.json(&["get", "pod", &pod]).await;
        let running =
            !container_status(&p, "containerStatuses", "osc-agent")["state"]["running"].is_null();
        running.then_some(p)
    })
    .await;
    let admin = ns.port_forward(&pod, 8081).await;
    let ready = common::http_client()
        .get(format!("{}/readyz", admin.url))
        .send()
        .await
        .expect("GET /readyz");
    assert_eq!(ready.status().as_u16(), 503);
    let reason = ready.text().await.unwrap_or_default();
    assert!(reason.contains("prod"), "{reason}");
    let s = admin.get_json("/status").await;
    assert_eq!(s["ready"], false, "{s}");
    assert!(!condition(&status, "Ready"), "{status}");
    let shown = ns.kubectl(&["get", "pod", &pod]).await;
    say(&format!("pods: before the first entry\n{shown}"));
    assert!(shown.contains("1/2"), "{shown}");
    assert_eq!(
        container_status(&status, "containerStatuses", "osc-agent")["ready"],
        false
    );

    // The first entry: kubelet's readiness probe turns the pod Ready.
    server
        .api(USER_KEY)
        .create("prod", "db.url", json!("postgres://db/app"))
        .await;
    let status = ns.wait_ready(&pod).await;
    assert_eq!(
        container_status(&status, "containerStatuses", "osc-agent")["restartCount"],
        0
    );
    let shown = ns.kubectl(&["get", "pod", &pod]).await;
    say(&format!("pods: after the first entry\n{shown}"));
    assert!(shown.contains("2/2"), "{shown}");

    // The server goes away: after --stale-after, /healthz fails and kubelet restarts the agent.
    drop(admin);
    drop(server);
    ns.kubectl(&["delete", "pod", "dev-server", "--wait=false"])
        .await;
    let status = poll("a liveness restart of the agent", WAIT, || async {
        let p = ns.json(&["get", "pod", &pod]).await;
        let agent = container_status(&p, "containerStatuses", "osc-agent");
        (agent["restartCount"].as_u64().unwrap_or(0) >= 1).then_some(p)
    })
    .await;
    let agent = container_status(&status, "containerStatuses", "osc-agent");
    say(&format!("pods: agent after the server left: {agent}"));
    let events = ns
        .kubectl(&[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={pod}"),
        ])
        .await;
    assert!(
        events.contains("Liveness probe failed") && events.contains("osc-agent"),
        "{events}"
    );
    // The app kept running on its files.
    assert_eq!(
        container_status(&status, "containerStatuses", "app")["restartCount"],
        0
    );
    assert_eq!(
        ns.exec(&pod, "app", &["cat", "/config/db.url"])
            .await
            .as_deref(),
        Some("postgres://db/app")
    );
    ns.logs(&pod, "osc-agent", true).await;
    ns.assert_no_secret_logged();
}

/// The app of the secret-mode test: prints the value it got through `envFrom` at start, then waits.
const ENV_APP_SCRIPT: &str = r#"echo "start: DB_URL=$DB_URL"
trap 'echo stopping; exit 0' TERM
while true; do sleep 1 & wait $!; done
"#;

/// A Deployment, once it has rolled out completely: `replicas` pods updated, ready and
/// available, none left over, and the controller has seen the latest spec.
async fn rolled_out(ns: &Ns, name: &str, replicas: u64) -> Value {
    poll(
        &format!("Deployment {name}: {replicas} replicas rolled out"),
        WAIT,
        || async {
            let d = ns.json(&["get", "deployment", name]).await;
            let st = &d["status"];
            let done = st["observedGeneration"] == d["metadata"]["generation"]
                && [
                    "replicas",
                    "updatedReplicas",
                    "readyReplicas",
                    "availableReplicas",
                ]
                .iter()
                .all(|f| st[*f].as_u64() == Some(replicas));
            done.then_some(d)
        },
    )
    .await
}

/// The release's ReplicaSets, oldest first (by revision).
async fn replica_sets(ns: &Ns, release: &str) -> Vec<Value> {
    let selector = format!("app.kubernetes.io/instance={release}");
    let list = ns.json(&["get", "replicasets", "-l", &selector]).await;
    let mut sets = list["items"].as_array().cloned().unwrap_or_default();
    sets.sort_by_key(|rs| {
        rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0)
    });
    sets
}

/// The running pods of a ReplicaSet (by its pod-template-hash).
async fn pods_of(ns: &Ns, rs: &Value) -> Vec<String> {
    let hash = rs["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .expect("pod-template-hash");
    let list = ns
        .json(&[
            "get",
            "pods",
            "-l",
            &format!("pod-template-hash={hash}"),
            "--field-selector",
            "status.phase=Running",
        ])
        .await;
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// (4) secret mode + rollout-restart with 2 replicas: the agents keep one Secret, the app gets it through
/// `envFrom`, and each real change makes exactly one new ReplicaSet (both replicas' agents see the change;
/// the keyed content hash makes their restarts one rollout); a no-op PUT makes none.
async fn secret_mode_rollout_restart_two_replicas_one_rollout_per_change() {
    let ns = Ns::new(node(), "rollout").await;
    let (ip, server) = ns
        .dev_server(&[
            ("DB_URL", json!("postgres://db1/app")),
            ("API_TOKEN", json!(SECRET_VALUE)),
        ])
        .await;
    ns.credentials("osc-credentials", USER_KEY).await;
    let mut values = chart_values(&ip, "osc-credentials", ENV_APP_SCRIPT);
    values["output"] = json!({"mode": "secret", "appEnvFrom": true});
    values["replicaCount"] = json!(2);
    values["actions"] = json!([{"type": "rollout-restart"}]);
    values["actionCooldown"] = json!("1s");
    ns.helm_install("ro", &values).await;
    rolled_out(&ns, "ro-osc-agent", 2).await;
    let sets = replica_sets(&ns, "ro").await;
    assert_eq!(sets.len(), 1, "one ReplicaSet at start");

    // One Secret, named after the release, holding both keys; each app read its value at start.
    let secret = ns.json(&["get", "secret", "ro-osc-agent"]).await;
    let data = secret["data"].as_object().expect("Secret data");
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["API_TOKEN", "DB_URL"],
        "{secret}"
    );
    let first = pods_of(&ns, &sets[0]).await;
    assert_eq!(first.len(), 2, "{first:?}");
    for pod in &first {
        let log = ns.logs(pod, "app", false).await;
        assert!(
            log.contains("start: DB_URL=postgres://db1/app"),
            "{pod}: {log}"
        );
    }

    // A no-op PUT: synced by both agents, no action, no rollout.
    let admins = [
        ns.port_forward(&first[0], 8081).await,
        ns.port_forward(&first[1], 8081).await,
    ];
    let mut before = Vec::new();
    for admin in &admins {
        before.push(admin.get_json("/status").await["sync"]["succeeded"].as_u64());
    }
    server
        .api(USER_KEY)
        .update("prod", "DB_URL", json!("postgres://db1/app"))
        .await;
    for (admin, b) in admins.iter().zip(before) {
        let s = poll("a sync after the no-op PUT", PROPAGATION, || async {
            let s = admin.get_json("/status").await;
            (s["sync"]["succeeded"].as_u64() > b).then_some(s)
        })
        .await;
        assert_eq!(s["actions"]["runs"], 0, "{}", s["actions"]);
    }
    assert_eq!(replica_sets(&ns, "ro").await.len(), 1, "a no-op PUT rolled");
    drop(admins);

    for (n, value) in [(2, "postgres://db2/app"), (3, "postgres://db3/app")] {
        server
            .api(USER_KEY)
            .update("prod", "DB_URL", json!(value))
            .await;
        until(
            &format!("ReplicaSet {n} after change {}", n - 1),
            WAIT,
            || async { replica_sets(&ns, "ro").await.len() >= n },
        )
        .await;
        rolled_out(&ns, "ro-osc-agent", 2).await;
        let sets = replica_sets(&ns, "ro").await;
        assert_eq!(sets.len(), n, "exactly one rollout per change");
        let newest = pods_of(&ns, &sets[n - 1]).await;
        assert_eq!(newest.len(), 2, "{newest:?}");
        for pod in &newest {
            let log = ns.logs(pod, "app", false).await;
            assert!(
                log.contains(&format!("start: DB_URL={value}")),
                "{pod}: {log}"
            );
            // The new pod's agent has synced (Ready) and, on its fresh start, acted on nothing: no
            // further rollout can come from it.
            let admin = ns.port_forward(pod, 8081).await;
            let s = admin.get_json("/status").await;
            assert_eq!(s["ready"], true, "{s}");
            assert_eq!(s["actions"]["runs"], 0, "{}", s["actions"]);
            say(&format!("pods: {pod} /status.sync {}", s["sync"]));
        }
        assert_eq!(
            replica_sets(&ns, "ro").await.len(),
            n,
            "a second rollout for one change"
        );
        ns.logs(&newest[0], "osc-agent", false).await;
    }
    ns.assert_no_secret_logged();
}

/// (5b) the server is down (503 on every route) when the pod starts, and the chart names a fallback
/// backup: the init container renders the backup and exits 0, the pod becomes Ready on those stale
/// values (`/status` says so), and once the server answers the agent syncs its values into the app's view.
async fn server_down_at_start_the_fallback_backup_starts_the_pod_stale_and_it_heals() {
    let ns = Ns::new(node(), "fallback").await;
    let (ip, server) = ns.app_server("postgres://backup/app").await;
    // The backup holds the old value; the server has moved on since.
    let resp = common::http_client()
        .post(format!("{}/backup?environment=prod", server.url))
        .header("x-user-key", USER_KEY)
        .header("x-backup-password", BACKUP_PASSWORD)
        .send()
        .await
        .expect("POST /backup");
    assert_eq!(resp.status().as_u16(), 200);
    let backup = ns.write("backup.json", &resp.text().await.expect("backup body"));
    let password = ns.write("backup-password", BACKUP_PASSWORD);
    ns.kubectl(&[
        "create",
        "secret",
        "generic",
        "osc-backup",
        &format!("--from-file=backup.json={backup}"),
        &format!("--from-file=backup-password={password}"),
    ])
    .await;
    server
        .api(USER_KEY)
        .update("prod", "db.url", json!("postgres://live/app"))
        .await;
    let faults = server
        .api(USER_KEY)
        .post_admin("/_dev/faults", json!({"unavailable": true}))
        .await;
    assert_eq!(faults["unavailable"], true);

    ns.credentials("osc-credentials", USER_KEY).await;
    let mut values = chart_values(&ip, "osc-credentials", APP_SCRIPT);
    values["fallbackBackup"] = json!({"secretName": "osc-backup"});
    ns.helm_install("fb", &values).await;
    let pod = ns.release_pod("fb").await;
    let status = ns.wait_ready(&pod).await;
    let init = container_status(&status, "initContainerStatuses", "osc-agent-init");
    assert_eq!(init["state"]["terminated"]["exitCode"], 0, "{init}");
    let init_log = ns.logs(&pod, "osc-agent-init", false).await;
    assert!(init_log.contains("backup"), "{init_log}");
    let app_log = ns.logs(&pod, "app", false).await;
    assert!(
        app_log.contains("start: db.url=postgres://backup/app"),
        "{app_log}"
    );
    let admin = ns.port_forward(&pod, 8081).await;
    let s = admin.get_json("/status").await;
    say(&format!(
        "pods: while the server is down: stale {} ready {}",
        s["stale"], s["ready"]
    ));
    assert_eq!(s["ready"], true, "{s}");
    assert!(!s["stale"].is_null() && s["stale"] != false, "{s}");

    // The server comes back at the same address: the agent syncs its values.
    server
        .api(USER_KEY)
        .post_admin("/_dev/faults", json!({"unavailable": false}))
        .await;
    until("the server's value in the app container", WAIT, || async {
        ns.exec(&pod, "app", &["cat", "/config/db.url"])
            .await
            .as_deref()
            == Some("postgres://live/app")
    })
    .await;
    let s = poll("/status no longer stale", PROPAGATION, || async {
        let s = admin.get_json("/status").await;
        (s["stale"].is_null() || s["stale"] == false).then_some(s)
    })
    .await;
    assert_eq!(s["sync"]["last_error"], Value::Null, "{s}");
    ns.logs(&pod, "osc-agent", false).await;
    ns.assert_no_secret_logged();
}

/// A Deployment `web` whose pod template carries `annotations`; its busybox app prints what it reads at
/// start (like [`APP_SCRIPT`]), as user 1000.
fn annotated_deployment(annotations: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "annotations": annotations},
                "spec": {
                    "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never",
                        "command": ["sh", "-c", APP_SCRIPT],
                        "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                            "capabilities": {"drop": ["ALL"]}}
                    }]
                }
            }
        }
    })
}

/// The one Running pod of `web` in `ns`.
async fn web_pod(ns: &Ns) -> Value {
    poll("the pod of web", WAIT, || async {
        let pods = ns.json(&["get", "pods", "-l", "app=web"]).await;
        match pods["items"].as_array().map(|a| a.as_slice()) {
            Some([one]) if one["metadata"]["deletionTimestamp"].is_null() => Some(one.clone()),
            _ => None,
        }
    })
    .await
}

fn names(spec: &Value, list: &str) -> Vec<String> {
    spec[list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

/// Issue 12 on the real node: the chart's injector (2 replicas, TLS from the chart, called by the API
/// server over HTTPS) adds the agent to a Deployment carrying only the annotations; the app reads the
/// synced files and sees a change; a pod in an excluded namespace is untouched; a bad annotation denies
/// the pod with a message naming it; with the injector gone and `failurePolicy: Ignore`, a pod is
/// created without the agent, and the injector's audit marks it with an `AgentNotInjected` Event.
async fn injector_adds_the_agent_to_annotated_pods_only() {
    let ns = Ns::new(node(), "inject").await;
    let apps = Ns::new(node(), "inject-apps").await;
    let skipped = Ns::new(node(), "inject-skip").await;
    let (ip, server) = ns.app_server("postgres://db/app").await;
    let values = json!({
        "standalone": {"enabled": false},
        "image": {"repository": "localhost/osc-agent", "tag": "pods", "pullPolicy": "Never"},
        "injector": {
            "enabled": true,
            "defaultServer": format!("http://{ip}:{DEV_PORT}"),
            "excludeNamespaces": [skipped.name],
            "auditInterval": "10s",
        }
    });
    ns.helm_install("inj", &values).await;
    rolled_out(&ns, "inj-osc-agent-injector", 2).await;
    let webhook = ns
        .run(
            &ns.node.kubectl,
            &[
                "get",
                "mutatingwebhookconfiguration",
                &format!("{}-inj-osc-agent-injector", ns.name),
                "-o",
                "json",
            ],
        )
        .await;
    let webhook: Value = serde_json::from_str(&webhook).expect("webhook JSON");
    assert_eq!(webhook["webhooks"][0]["failurePolicy"], "Ignore");

    let annotations = json!({
        "osc-agent.io/inject": "true",
        "osc-agent.io/environment": "prod",
        "osc-agent.io/credentials-secret": "osc-credentials",
        "osc-agent.io/output-app.env": "dotenv",
    });
    for n in [&apps, &skipped] {
        n.credentials("osc-credentials", USER_KEY).await;
        let file = n.write(
            "web.yaml",
            &annotated_deployment(annotations.clone()).to_string(),
        );
        n.kubectl(&["apply", "-f", &file]).await;
    }

    // Injected: init container, sidecar, the status annotation; the app read its files at start.
    rolled_out(&apps, "web", 1).await;
    let pod = web_pod(&apps).await;
    let name = pod["metadata"]["name"].as_str().expect("name").to_owned();
    assert_eq!(
        pod["metadata"]["annotations"]["osc-agent.io/status"], "injected",
        "{pod}"
    );
    assert_eq!(names(&pod["spec"], "initContainers"), ["osc-agent-init"]);
    assert_eq!(names(&pod["spec"], "containers"), ["app", "osc-agent"]);
    let shown = apps.kubectl(&["get", "pod", &name]).await;
    say(&format!("pods: injected pod\n{shown}"));
    let app_log = apps.logs(&name, "app", false).await;
    let listing = apps
        .exec(
            &name,
            "app",
            &["sh", "-c", "id; ls -lnaL /config /config/..data"],
        )
        .await
        .unwrap_or_default();
    assert!(
        app_log.contains("start: db.url=postgres://db/app settings=2"),
        "{app_log}\n{listing}"
    );
    server
        .api(USER_KEY)
        .update("prod", "db.url", json!("postgres://db2/app"))
        .await;
    until("the change in the injected app", PROPAGATION, || async {
        apps.exec(&name, "app", &["cat", "/config/db.url"])
            .await
            .as_deref()
            == Some("postgres://db2/app")
    })
    .await;

    // Excluded namespace: the same Deployment runs untouched (its app finds no files: not Ready is
    // fine, the spec is what counts).
    let other = web_pod(&skipped).await;
    assert!(
        other["metadata"]["annotations"]["osc-agent.io/status"].is_null(),
        "{other}"
    );
    assert_eq!(names(&other["spec"], "containers"), ["app"]);
    assert!(
        names(&other["spec"], "initContainers").is_empty(),
        "{other}"
    );

    // A bad annotation: the pod is denied, naming the annotation.
    let bad = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bad", "annotations": {
            "osc-agent.io/inject": "true", "osc-agent.io/environment": "prod",
            "osc-agent.io/credentials-secret": "osc-credentials", "osc-agent.io/file-mode": "0999"}},
        "spec": {"containers": [{"name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never",
                                 "command": ["sleep", "3600"]}]}
    });
    let file = apps.write("bad.yaml", &bad.to_string());
    let (ok, stdout, stderr) = apps
        .try_run(
            &apps.node.kubectl,
            &["-n", &apps.name, "apply", "-f", &file],
        )
        .await;
    assert!(!ok, "a bad annotation was admitted: {stdout}");
    say(&format!("pods: denied: {}", stderr.trim()));
    assert!(
        stderr.contains("denied the request") && stderr.contains("osc-agent.io/file-mode"),
        "{stderr}"
    );

    // The injector gone, failurePolicy Ignore: an annotated pod is created without the agent.
    ns.kubectl(&[
        "scale",
        "deployment",
        "inj-osc-agent-injector",
        "--replicas=0",
    ])
    .await;
    until("no injector endpoint", WAIT, || async {
        let ep = ns
            .json(&["get", "endpoints", "inj-osc-agent-injector"])
            .await;
        ep["subsets"].as_array().is_none_or(|s| s.is_empty())
    })
    .await;
    let lone = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "lone", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never",
                                 "command": ["sleep", "3600"]}]}
    });
    let file = apps.write("lone.yaml", &lone.to_string());
    apps.kubectl(&["apply", "-f", &file]).await;
    let lone = apps.json(&["get", "pod", "lone"]).await;
    assert!(
        lone["metadata"]["annotations"]["osc-agent.io/status"].is_null(),
        "{lone}"
    );
    assert_eq!(names(&lone["spec"], "containers"), ["app"]);
    // ... and once an injector runs again, its audit says so on the pod (an Event) and in its metrics.
    ns.kubectl(&[
        "scale",
        "deployment",
        "inj-osc-agent-injector",
        "--replicas=1",
    ])
    .await;
    let event = poll("an AgentNotInjected event on the pod", WAIT, || async {
        let events = apps
            .json(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=lone",
            ])
            .await;
        events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["reason"] == "AgentNotInjected")
            .cloned()
    })
    .await;
    say(&format!(
        "pods: event on the pod created without the injector: {}",
        event["message"]
    ));
    assert_eq!(event["type"], "Warning");
    assert!(
        event["involvedObject"]["uid"] == lone["metadata"]["uid"],
        "{event}"
    );
    let injected_events = apps
        .json(&[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name}"),
        ])
        .await;
    assert!(
        !injected_events.to_string().contains("AgentNotInjected"),
        "the injected pod was reported: {injected_events}"
    );

    apps.logs(&name, "osc-agent-init", false).await;
    apps.logs(&name, "osc-agent", false).await;
    apps.assert_no_secret_logged();
    ns.assert_no_secret_logged();
}
