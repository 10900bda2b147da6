//! `osc-agent injector` end to end: the real binary serving HTTPS on 127.0.0.1 with a self-signed
//! certificate (rcgen), AdmissionReviews posted over TLS as the API server would.

mod common;

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use common::{Logs, clean_command};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;

struct Injector {
    child: Child,
    url: String,
    client: reqwest::Client,
    cert: String,
    logs: Logs,
    dir: tempfile::TempDir,
}

fn drain(stream: impl AsyncRead + Unpin + Send + 'static, logs: Logs, tag: &'static str) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            logs.push(&format!("[{tag}] {line}"));
        }
    });
}

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM).
fn self_signed() -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("generate a certificate");
    (cert.cert.pem(), cert.signing_key.serialize_pem())
}

fn tls_client(cert_pem: &str) -> reqwest::Client {
    osc_agent::source::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("PEM"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

impl Injector {
    async fn start(extra: &[&str]) -> Injector {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed();
        std::fs::write(dir.path().join("tls.crt"), &cert).expect("write cert");
        std::fs::write(dir.path().join("tls.key"), &key).expect("write key");
        let logs = Logs::default();
        let mut child = clean_command(common::BIN)
            .arg("injector")
            .args(["--listen", "127.0.0.1:0"])
            .arg(format!(
                "--tls-cert-file={}",
                dir.path().join("tls.crt").display()
            ))
            .arg(format!(
                "--tls-key-file={}",
                dir.path().join("tls.key").display()
            ))
            .args(["--default-server", "https://osc.example:9000"])
            .args(["--agent-image", "ghcr.io/osc-agent/osc-agent:0.1.0"])
            .args(extra)
            .env("POD_NAMESPACE", "osc-system")
            // Never the CI cluster's: the audit (--audit-interval) stays off for want of credentials.
            .env_remove("KUBECONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the injector");
        drain(
            child.stderr.take().expect("stderr"),
            logs.clone(),
            "injector",
        );
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("osc-agent injector listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("the injector exited before listening: {}", logs.text());
        })
        .await
        .expect("the injector did not print its address within 30 s");
        Injector {
            child,
            url,
            client: tls_client(&cert),
            cert,
            logs,
            dir,
        }
    }

    async fn review(&self, namespace: &str, pod: Value) -> Value {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod,
                "dryRun": false,
            }
        });
        let resp = self
            .client
            .post(format!("{}/mutate?timeout=10s", self.url))
            .json(&body)
            .send()
            .await
            .expect("POST /mutate");
        assert_eq!(resp.status(), 200, "{}", self.logs.text());
        let answer: Value = resp.json().await.expect("JSON answer");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(
            answer["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        answer["response"].clone()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let resp = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("GET");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    }

    async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("the injector did not stop within 15 s after SIGTERM")
            .expect("wait");
        drop(self.dir);
        status
    }
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "annotations": annotations},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27-alpine"}]},
    })
}

fn injectable() -> Value {
    pod(json!({
        "osc-agent.io/inject": "true",
        "osc-agent.io/environment": "production",
        "osc-agent.io/credentials-secret": "osc-credentials",
    }))
}

#[tokio::test]
async fn injects_denies_and_skips_over_tls() {
    let injector = Injector::start(&[]).await;

    // Injected: a base64 JSONPatch that applies and gives a pod with the agent.
    let r = injector.review("web", injectable()).await;
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().expect("patch"))
        .expect("base64");
    let ops: Vec<json_patch::PatchOperation> = serde_json::from_slice(&bytes).expect("JSONPatch");
    let mut patched = injectable();
    json_patch::patch(&mut patched, &ops).expect("the patch applies");
    assert_eq!(
        patched["spec"]["initContainers"][0]["name"],
        "osc-agent-init"
    );
    assert_eq!(patched["spec"]["containers"][1]["name"], "osc-agent");
    assert_eq!(
        patched["metadata"]["annotations"]["osc-agent.io/status"],
        "injected"
    );
    let args = patched["spec"]["containers"][1]["args"].to_string();
    assert!(args.contains("--server=https://osc.example:9000"), "{args}");

    // The patched pod again (reinvocation): allowed, no patch.
    let r = injector.review("web", patched).await;
    assert_eq!(r["allowed"], true);
    assert!(r.get("patch").is_none(), "{r}");

    // Denied, with the annotation named.
    let mut bad = injectable();
    bad["metadata"]["annotations"]["osc-agent.io/file-mode"] = json!("rw-r--r--");
    let r = injector.review("web", bad).await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 400);
    let message = r["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("osc-agent.io/file-mode"), "{message}");

    // Not asked, or in the injector's own namespace / kube-system: allowed unchanged.
    for (ns, p) in [
        ("web", pod(json!({}))),
        ("osc-system", injectable()),
        ("kube-system", injectable()),
    ] {
        let r = injector.review(ns, p).await;
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none(), "{ns}: {r}");
    }

    // Probes and metrics.
    assert_eq!(injector.get("/healthz").await.0, 200);
    assert_eq!(injector.get("/readyz").await.0, 200);
    let (status, metrics) = injector.get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"osc_injector_admissions_total{result="injected"} 1"#,
        r#"osc_injector_admissions_total{result="skipped"} 4"#,
        r#"osc_injector_admissions_total{result="denied"} 1"#,
        r#"osc_injector_admissions_total{result="error"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }

    let status = injector.stop().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn bodies_are_bounded_and_garbage_is_refused() {
    let injector = Injector::start(&[]).await;
    let big = "x".repeat(5 << 20);
    let resp = injector
        .client
        .post(format!("{}/mutate", injector.url))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await;
    // The injector answers 413 from the Content-Length and closes without reading the body: the client
    // sees the 413, or a broken pipe when it was still writing.
    match resp {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => assert!(e.is_request(), "{e:?}"),
    }
    // Still serving (a fresh client: the pooled connection was closed by the injector).
    let fresh = tls_client(&injector.cert)
        .get(format!("{}/healthz", injector.url))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(fresh.status(), 200);

    let resp = tls_client(&injector.cert)
        .post(format!("{}/mutate", injector.url))
        .header("content-type", "application/json")
        .body("{\"kind\": 1}")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 400);

    // Plain HTTP on the TLS port gets no answer (the handshake fails and is counted).
    let plain = common::http_client()
        .get(injector.url.replacen("https://", "http://", 1) + "/healthz")
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    let metrics = tls_client(&injector.cert)
        .get(format!("{}/metrics", injector.url))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics.contains("osc_injector_tls_handshake_failures_total 1"),
        "{metrics}"
    );
    injector.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart_and_bad_flags_exit_2() {
    // Bad flags: exit 2 with one line naming the flag, before listening.
    let out = clean_command(common::BIN)
        .args(["injector", "--listen", "127.0.0.1:0"])
        .args([
            "--tls-cert-file=/nonexistent/tls.crt",
            "--tls-key-file=/nonexistent/tls.key",
        ])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-cert-file"), "{stderr}");

    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = self_signed();
    let (_, other_key) = self_signed();
    std::fs::write(dir.path().join("tls.crt"), &cert).expect("write");
    std::fs::write(dir.path().join("tls.key"), &other_key).expect("write");
    let out = clean_command(common::BIN)
        .args(["injector", "--listen", "127.0.0.1:0"])
        .arg(format!(
            "--tls-cert-file={}",
            dir.path().join("tls.crt").display()
        ))
        .arg(format!(
            "--tls-key-file={}",
            dir.path().join("tls.key").display()
        ))
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not the key of --tls-cert-file"),
        "{stderr}"
    );
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");

    // Rotation: new files are served from the next handshake on, without a restart.
    let injector = Injector::start(&["--tls-reload-interval=200ms"]).await;
    let r = injector.review("web", injectable()).await;
    assert_eq!(r["allowed"], true);
    let (new_cert, new_key) = self_signed();
    std::fs::write(injector.dir.path().join("tls.key"), &new_key).expect("write");
    std::fs::write(injector.dir.path().join("tls.crt"), &new_cert).expect("write");
    let trusting_new = tls_client(&new_cert);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ok = trusting_new
            .get(format!("{}/readyz", injector.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not served within 20 s: {}",
            injector.logs.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = trusting_new
        .get(format!("{}/metrics", injector.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics.contains(r#"osc_injector_certificate_reloads_total{result="ok"} 1"#),
        "{metrics}"
    );
    let logs = injector.logs.text();
    assert!(!logs.contains("PRIVATE KEY"), "{logs}");
    injector.stop().await;
}
