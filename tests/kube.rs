//! Kubernetes sinks, rollout-restart, environment discovery and RBAC against a real API server.
//!
//! Needs `$KUBECONFIG` (CI starts a single-node cluster, API server included, with
//! `.ci/k8s-node.sh`).
//! Without it every test here shows as ignored, with the reason (unless `OSC_REQUIRE_KUBE` is set, as in
//! CI: then it fails); with it, any misbehaviour fails the test. `harness = false`: see
//! `common::run_tests`.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn main() {
    run_tests(
        missing_cluster(),
        async_tests![
            configmap_and_secret_are_applied_updated_and_left_alone_when_unchanged,
            oversized_data_and_field_conflicts_are_reported_not_forced,
            rollout_restart_from_two_replicas_makes_one_rollout,
            environment_comes_from_the_pods_annotation_then_label,
            the_documented_role_is_enough_and_a_missing_verb_is_explained,
            a_deleted_secret_is_recreated_by_the_periodic_resync,
            an_earlier_runs_secret_makes_the_next_change_an_ordinary_one,
            a_new_hash_over_the_same_data_is_re_annotated_not_acted_on
        ],
    );
}

/// A client for `$KUBECONFIG` and a fresh namespace (`None` only without `$KUBECONFIG`, where the
/// tests are reported as ignored and never run).
async fn cluster(test: &str) -> Option<(kube::Client, String)> {
    std::env::var_os("KUBECONFIG")?;
    osc_agent::source::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .expect("KUBECONFIG is set but no client can be built");
    let ns = format!(
        "osc-it-{}-{:04x}",
        test.replace('_', "-").chars().take(30).collect::<String>(),
        fastrand::u16(..)
    );
    let api: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create namespace");
    Some((client, ns))
}

async fn cleanup(client: &kube::Client, ns: &str) {
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
}

fn kubeconfig() -> String {
    std::env::var("KUBECONFIG").unwrap_or_default()
}

async fn once(
    logs: &Logs,
    server: &DevServer,
    scratch: &Scratch,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Run {
    let key = scratch.key_file();
    let mut args = vec!["--once", "--server", &server.url, "--user-key-file", &key];
    args.extend_from_slice(extra);
    let kc = kubeconfig();
    let mut envs = vec![("KUBECONFIG", kc.as_str())];
    envs.extend_from_slice(env);
    run_agent(logs, &args, &envs).await
}

async fn configmap_and_secret_are_applied_updated_and_left_alone_when_unchanged() {
    let Some((client, ns)) = cluster("objects").await else {
        return;
    };
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "db.url", json!("postgres://db/app"))
        .await;
    api.create("prod", "pool", json!({"size": 5})).await;
    api.create("prod", "token", json!("k8s-secret-token-value"))
        .await;
    let scratch = Scratch::new();
    let args = [
        "--environment",
        "prod",
        "--configmap",
        "app-config",
        "--secret",
        "app-secret",
        "--namespace",
        &ns,
    ];
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!(r.code, 0, "{r:?}");

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let cm = cms.get("app-config").await.unwrap();
    let data = cm.data.clone().unwrap();
    assert_eq!(data["db.url"], "postgres://db/app");
    assert_eq!(data["pool"], "{\n  \"size\": 5\n}\n");
    let labels = cm.metadata.labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "osc-agent");
    assert_eq!(labels["osc-agent.io/environment"], "prod");
    assert_eq!(
        cm.metadata.annotations.clone().unwrap()["osc-agent.io/content-hash"].len(),
        64
    );
    let managers: Vec<String> = cm
        .metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.contains(&"osc-agent".to_string()), "{managers:?}");
    let secret = secrets.get("app-secret").await.unwrap();
    assert_eq!(
        secret.data.clone().unwrap()["token"].0,
        b"k8s-secret-token-value"
    );
    let (cm_rv, secret_rv) = (
        cm.metadata.resource_version.clone(),
        secret.metadata.resource_version.clone(),
    );

    // No change: no write (resourceVersion unchanged).
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        cms.get("app-config")
            .await
            .unwrap()
            .metadata
            .resource_version,
        cm_rv
    );
    assert_eq!(
        secrets
            .get("app-secret")
            .await
            .unwrap()
            .metadata
            .resource_version,
        secret_rv
    );

    // Changed and deleted keys.
    api.update("prod", "db.url", json!("postgres://db2/app"))
        .await;
    api.delete("prod", "pool").await;
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let data = cms.get("app-config").await.unwrap().data.unwrap();
    assert_eq!(data["db.url"], "postgres://db2/app");
    assert!(
        !data.contains_key("pool"),
        "a deleted key leaves the object: {data:?}"
    );
    logs.assert_free_of(&["k8s-secret-token-value", USER_KEY]);
    cleanup(&client, &ns).await;
}

async fn oversized_data_and_field_conflicts_are_reported_not_forced() {
    let Some((client, ns)) = cluster("guards").await else {
        return;
    };
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("big", "huge", json!("x".repeat(700 * 1024)))
        .await;
    api.create("big", "larger", json!("y".repeat(800 * 1024)))
        .await;
    api.create("prod", "shared", json!("from-osc")).await;
    let scratch = Scratch::new();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let r = once(
        &logs,
        &server,
        &scratch,
        &[
            "--environment",
            "big",
            "--configmap",
            "too-big",
            "--namespace",
            &ns,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr.contains("above the 1 MiB limit") && r.stderr.contains("'larger'"),
        "{}",
        r.stderr
    );
    assert!(
        cms.get_opt("too-big").await.unwrap().is_none(),
        "nothing written"
    );

    // Another manager owns data.shared.
    let theirs: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "shared", "namespace": ns}, "data": {"shared": "theirs"}
    }))
    .unwrap();
    cms.patch(
        "shared",
        &PatchParams::apply("someone-else"),
        &Patch::Apply(&theirs),
    )
    .await
    .unwrap();
    let args = [
        "--environment",
        "prod",
        "--configmap",
        "shared",
        "--namespace",
        &ns,
    ];
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr.contains("conflict with another field manager")
            && r.stderr.contains("--force-conflicts"),
        "{}",
        r.stderr
    );
    assert_eq!(
        cms.get("shared").await.unwrap().data.unwrap()["shared"],
        "theirs"
    );
    let mut forced = args.to_vec();
    forced.push("--force-conflicts");
    let r = once(&logs, &server, &scratch, &forced, &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        cms.get("shared").await.unwrap().data.unwrap()["shared"],
        "from-osc"
    );
    cleanup(&client, &ns).await;
}

async fn pods_of(client: &kube::Client, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
}

async fn rollout_restart_from_two_replicas_makes_one_rollout() {
    let Some((client, ns)) = cluster("rollout").await else {
        return;
    };
    let logs = Logs::default();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "app", "image": "registry.invalid/web:1"}]}}}
    })).unwrap();
    deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    wait_for("two pods of the first ReplicaSet", WAIT, || async {
        pods_of(&client, &ns, "app=web").await.len() == 2
    })
    .await;
    let pods = pods_of(&client, &ns, "app=web").await;
    let names: Vec<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();

    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "k", json!("v1")).await;
    let scratch = Scratch::new();
    let mut agents = vec![];
    for (i, pod) in names.iter().enumerate() {
        let out = scratch.path(&format!("out{i}"));
        let mut args = live_args(
            &server.url,
            &scratch,
            &out,
            &["--action", "rollout-restart", "--action-cooldown", "0s"],
        );
        args.extend([
            "--pod-name".into(),
            pod.clone(),
            "--pod-namespace".into(),
            ns.clone(),
        ]);
        agents.push(AgentProc::start(&logs, &strs(&args)).await);
    }
    for a in &agents {
        a.wait_ready().await;
    }
    api.update("prod", "k", json!("v2")).await;
    for a in &agents {
        wait_for("rollout-restart ran", WAIT, || async {
            a.status().await["actions"]["last"]["rollout-restart"]["result"] == json!("ok")
        })
        .await;
    }
    let hash = agents[0].status().await["sync"]["config_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        agents[1].status().await["sync"]["config_hash"].as_str(),
        Some(hash.as_str())
    );
    let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    wait_for(
        "the deployment controller created the new ReplicaSet",
        WAIT,
        || async {
            rs.list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
                .items
                .len()
                >= 2
        },
    )
    .await;
    let d = deployments.get("web").await.unwrap();
    let annotation = d
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()["osc-agent.io/config-hash"]
        .clone();
    assert_eq!(annotation, hash);
    wait_for(
        "the controller observed the last generation",
        WAIT,
        || async {
            let d = deployments.get("web").await.unwrap();
            d.status.and_then(|s| s.observed_generation) == d.metadata.generation
        },
    )
    .await;
    assert_eq!(
        rs.list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .len(),
        2,
        "exactly one new ReplicaSet"
    );
    cleanup(&client, &ns).await;
}

async fn environment_comes_from_the_pods_annotation_then_label() {
    let Some((client, ns)) = cluster("discovery").await else {
        return;
    };
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    server
        .api()
        .create("from-annotation", "k", json!("a"))
        .await;
    server.api().create("from-label", "k", json!("l")).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (name, meta) in [
        (
            "annotated",
            json!({"name": "annotated", "annotations": {"osc-agent.io/environment": "from-annotation"},
                             "labels": {"osc-agent.io/environment": "from-label"}}),
        ),
        (
            "labelled",
            json!({"name": "labelled", "labels": {"osc-agent.io/environment": "from-label"}}),
        ),
        ("bare", json!({"name": "bare"})),
    ] {
        let p: Pod = serde_json::from_value(json!({"metadata": meta,
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]}}))
        .unwrap();
        pods.create(&PostParams::default(), &p)
            .await
            .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    }
    let scratch = Scratch::new();
    for (pod, expect, source) in [
        ("annotated", "a", "pod annotation"),
        ("labelled", "l", "pod label"),
    ] {
        let out = scratch.path(pod);
        let r = once(
            &logs,
            &server,
            &scratch,
            &["--output-dir", out.to_str().unwrap()],
            &[("POD_NAME", pod), ("POD_NAMESPACE", &ns)],
        )
        .await;
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(std::fs::read_to_string(out.join("k")).unwrap(), expect);
        assert!(r.stderr.contains(source), "logs the source: {}", r.stderr);
    }
    let r = once(
        &logs,
        &server,
        &scratch,
        &["--output-dir", scratch.path("bare").to_str().unwrap()],
        &[("POD_NAME", "bare"), ("POD_NAMESPACE", &ns)],
    )
    .await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("no annotation or label osc-agent.io/environment"),
        "{}",
        r.stderr
    );
    cleanup(&client, &ns).await;
}

/// The Role of `manifests/rbac/<file>`, moved to `ns`, with `resourceNames` set to `name`.
fn documented_role(file: &str, ns: &str, name: &str) -> Role {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/rbac")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("my-app", ns);
    let mut role: Role = serde_saphyr::from_str(&text).unwrap();
    for rule in role.rules.iter_mut().flatten() {
        if let Some(names) = rule.resource_names.as_mut() {
            *names = vec![name.to_owned()];
        }
    }
    role
}

/// A kubeconfig authenticating as ServiceAccount `sa` (its token Secret, created by the token controller).
async fn service_account_kubeconfig(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    scratch: &Scratch,
) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let obj: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap();
    sas.create(&PostParams::default(), &obj).await.unwrap();
    let token_secret = || async {
        sas.get(sa)
            .await
            .unwrap()
            .secrets
            .unwrap_or_default()
            .first()
            .and_then(|s| s.name.clone())
    };
    wait_for("the ServiceAccount token", WAIT, || async {
        token_secret().await.is_some()
    })
    .await;
    let token_secret = token_secret().await.unwrap_or_default();
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&token_secret)
        .await
        .unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let admin = std::fs::read_to_string(kubeconfig()).unwrap();
    let server = admin
        .lines()
        .find_map(|l| l.split("server: \"").nth(1))
        .and_then(|s| s.split('"').next())
        .unwrap();
    let ca = admin
        .lines()
        .find_map(|l| l.split("certificate-authority: \"").nth(1))
        .and_then(|s| s.split('"').next())
        .unwrap();
    let kc = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: it, cluster: {{server: \"{server}\", certificate-authority: \"{ca}\"}}}}]\n\
         users: [{{name: sa, user: {{token: \"{token}\"}}}}]\ncontexts: [{{name: sa, context: {{cluster: it, user: sa, namespace: {ns}}}}}]\ncurrent-context: sa\n"
    );
    scratch
        .write(&format!("kubeconfig-{sa}"), &kc)
        .display()
        .to_string()
}

async fn bind(client: &kube::Client, ns: &str, role: Role, sa: &str) {
    let role_name = role.metadata.name.clone().unwrap();
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{sa}-{role_name}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &rb)
        .await
        .unwrap();
}

async fn the_documented_role_is_enough_and_a_missing_verb_is_explained() {
    let Some((client, ns)) = cluster("rbac").await else {
        return;
    };
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    server.api().create("prod", "k", json!("v")).await;
    let scratch = Scratch::new();

    let role = documented_role("configmap-sink.yaml", &ns, "app-config");
    bind(&client, &ns, role, "agent").await;
    let kc = service_account_kubeconfig(&client, &ns, "agent", &scratch).await;
    let run = |kc: String, name: &'static str| {
        let (logs, server, scratch) = (logs.clone(), &server, &scratch);
        async move {
            let mut args = vec![
                "--once",
                "--server",
                &server.url,
                "--environment",
                "prod",
                "--configmap",
                name,
            ];
            let key = scratch.key_file();
            args.extend(["--user-key-file", &key]);
            run_agent(&logs, &args, &[("KUBECONFIG", &kc)]).await
        }
    };
    let r = run(kc.clone(), "app-config").await;
    assert_eq!(r.code, 0, "the documented Role is enough: {r:?}");
    server.api().update("prod", "k", json!("v2")).await;
    let r = run(kc.clone(), "app-config").await;
    assert_eq!(r.code, 0, "updates too: {r:?}");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("app-config")
        .await
        .unwrap();
    assert_eq!(cm.data.unwrap()["k"], "v2");

    // A Role without `patch`: the agent says which verb on which resource is missing.
    let mut weak = documented_role("configmap-sink.yaml", &ns, "app-config");
    weak.metadata.name = Some("weak".into());
    for rule in weak.rules.iter_mut().flatten() {
        rule.verbs.retain(|v| v != "patch");
    }
    bind(&client, &ns, weak, "weak").await;
    let kc = service_account_kubeconfig(&client, &ns, "weak", &scratch).await;
    server.api().update("prod", "k", json!("v3")).await;
    let r = run(kc, "app-config").await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("forbidden to patch configmaps")
            && r.stderr.contains("grant the verb 'patch'"),
        "{}",
        r.stderr
    );
    cleanup(&client, &ns).await;
}

async fn a_deleted_secret_is_recreated_by_the_periodic_resync() {
    let Some((client, ns)) = cluster("recreate").await else {
        return;
    };
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    server
        .api()
        .create("prod", "token", json!("k8s-recreated-value"))
        .await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        &[
            "--secret",
            "live-secret",
            "--namespace",
            &ns,
            "--resync-interval",
            "1s",
        ],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let uid = secrets.get("live-secret").await.unwrap().metadata.uid;
    secrets
        .delete("live-secret", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the Secret recreated", WAIT, || async {
        secrets
            .get_opt("live-secret")
            .await
            .unwrap()
            .is_some_and(|s| s.metadata.uid != uid)
    })
    .await;
    let secret = secrets.get("live-secret").await.unwrap();
    assert_eq!(secret.data.unwrap()["token"].0, b"k8s-recreated-value");
    logs.assert_free_of(&["k8s-recreated-value", USER_KEY]);
    cleanup(&client, &ns).await;
}

async fn an_earlier_runs_secret_makes_the_next_change_an_ordinary_one() {
    let Some((client, ns)) = cluster("earlier").await else {
        return;
    };
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "token", json!("k8s-earlier-value-1"))
        .await;
    let scratch = Scratch::new();
    let marker = scratch.path("ran");
    let script = scratch.write("mark.sh", &format!("echo ran >> {}\n", marker.display()));
    let exec = format!("exec:command=sh {}", script.display());
    let args = [
        "--environment",
        "prod",
        "--secret",
        "earlier",
        "--namespace",
        &ns,
        "--action",
        &exec,
    ];
    let runs = || std::fs::read_to_string(&marker).map_or(0, |s| s.lines().count());
    // Fresh start: the Secret is created, nobody is told.
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!((r.code, runs()), (0, 0), "{r:?}");
    // A later run finds the earlier run's Secret: a change is acted on, as with files.
    api.update("prod", "token", json!("k8s-earlier-value-2"))
        .await;
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!((r.code, runs()), (0, 1), "{r:?}");
    logs.assert_free_of(&["k8s-earlier-value", USER_KEY]);
    cleanup(&client, &ns).await;
}

async fn a_new_hash_over_the_same_data_is_re_annotated_not_acted_on() {
    let Some((client, ns)) = cluster("rehash").await else {
        return;
    };
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "token", json!("k8s-rehash-value-1"))
        .await;
    let scratch = Scratch::new();
    let marker = scratch.path("ran");
    let script = scratch.write("mark.sh", &format!("echo ran >> {}\n", marker.display()));
    let exec = format!("exec:command=sh {}", script.display());
    let args = [
        "--environment",
        "prod",
        "--secret",
        "rehash",
        "--namespace",
        &ns,
        "--action",
        &exec,
    ];
    let runs = || std::fs::read_to_string(&marker).map_or(0, |s| s.lines().count());
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!((r.code, runs()), (0, 0), "{r:?}");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let annotation = |s: &Secret| {
        s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("osc-agent.io/content-hash").cloned())
    };
    let hash = annotation(&secrets.get("rehash").await.expect("secret")).expect("hash");
    assert_eq!(hash.len(), 64, "{hash}");
    // An earlier run with another hashing key (a rotated user key, a release hashing differently) left
    // the same data under another hash.
    let mut earlier = secrets.get("rehash").await.expect("secret");
    earlier.metadata.managed_fields = None;
    earlier.metadata.resource_version = None;
    earlier.metadata.uid = None;
    earlier.metadata.creation_timestamp = None;
    earlier
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("osc-agent.io/content-hash".into(), "0".repeat(64));
    secrets
        .patch(
            "rehash",
            &PatchParams::apply("osc-agent"),
            &Patch::Apply(&earlier),
        )
        .await
        .expect("plant another hash");
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        annotation(&secrets.get("rehash").await.expect("secret")).as_deref(),
        Some(hash.as_str()),
        "re-annotated with this run's hash"
    );
    assert_eq!(runs(), 0, "same data: no action");
    // Different data under another hash is a change.
    api.update("prod", "token", json!("k8s-rehash-value-2"))
        .await;
    let r = once(&logs, &server, &scratch, &args, &[]).await;
    assert_eq!((r.code, runs()), (0, 1), "{r:?}");
    logs.assert_free_of(&["k8s-rehash-value", USER_KEY]);
    cleanup(&client, &ns).await;
}
