//! Live mode against a real dev server process: every way the upstream stream loses events, bursts,
//! drift repair, credential rotation, health, signals. Every wait has a deadline.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::json;

const SECRET: &str = "live-secret-value-Xy9";
const WAIT: Duration = Duration::from_secs(20);

fn secret(n: usize) -> String {
    format!("{SECRET}-{n}")
}

async fn started(logs: &Logs, server: &DevServer, scratch: &Scratch, extra: &[&str]) -> AgentProc {
    let out = scratch.path("out");
    let agent = AgentProc::start(logs, &strs(&live_args(&server.url, scratch, &out, extra))).await;
    agent.wait_ready().await;
    agent
}

#[tokio::test]
async fn partitioned_workers_converge_through_resync() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--workers", "3"]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let agent = started(&logs, &server, &scratch, &["--resync-interval", "1s"]).await;
    for i in 1..=20 {
        api.update("prod", "k", json!(secret(i))).await;
    }
    wait_file(&scratch.path("out/k"), &secret(20), WAIT).await;
    // The agent saw only the writes of its own "worker".
    let updated = agent.metric("osc_agent_events_total").await;
    assert!(
        updated < 21.0,
        "a partitioned stream cannot have delivered every event ({updated})"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn queue_overflow_dropping_the_final_value_converges() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--queue-size", "3"]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let _agent = started(&logs, &server, &scratch, &["--resync-interval", "10m"]).await;
    api.post_admin("/_dev/faults", json!({"paused": true}))
        .await;
    for i in 1..=20 {
        api.update("prod", "k", json!(secret(i))).await;
    }
    api.post_admin("/_dev/faults", json!({"paused": false}))
        .await;
    // Only 3 events fit the queue: the final value's event was dropped. No resync within the test:
    // the reconcile after the surviving hints reads the true state.
    wait_file(&scratch.path("out/k"), &secret(20), WAIT).await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn writes_while_disconnected_and_abrupt_cuts_converge() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let agent = started(&logs, &server, &scratch, &["--resync-interval", "10m"]).await;
    let first_sub = agent.status().await["stream"]["subscription_id"].clone();
    // Drop every event from now on, cut the stream, write: only the reconnect's reconcile can see it.
    api.post_admin("/_dev/faults", json!({"drop_every": 1}))
        .await;
    api.post_admin("/_dev/streams/cut", json!({})).await;
    api.update("prod", "k", json!(secret(1))).await;
    wait_file(&scratch.path("out/k"), &secret(1), WAIT).await;
    wait_for("a new subscription", WAIT, || async {
        agent.status().await["stream"]["subscription_id"] != first_sub
    })
    .await;
    assert!(agent.metric("osc_agent_reconnects_total").await >= 1.0);
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn clean_end_of_stream_and_restart_reconnect() {
    let logs = Logs::default();
    let scratch = Scratch::new();
    let data = scratch.path("dev-data.json");
    let data_s = data.display().to_string();
    let mut server = DevServer::start(&logs, &["--data-file", &data_s]).await;
    server.api().create("prod", "k", json!(secret(0))).await;
    let agent = started(&logs, &server, &scratch, &["--resync-interval", "10m"]).await;
    // SIGTERM ends the stream with a clean end of body; the agent must not take that as "done".
    let addr = server.addr.clone();
    server.stop().await;
    let server = DevServer::start_on(&logs, &addr, &["--data-file", &data_s]).await;
    wait_for("reconnected", WAIT, || async {
        agent.metric("osc_agent_reconnects_total").await >= 1.0
    })
    .await;
    server.api().update("prod", "k", json!(secret(1))).await;
    wait_file(&scratch.path("out/k"), &secret(1), WAIT).await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn a_burst_of_1000_updates_lands_the_last_value_with_few_swaps() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--queue-size", "2000"]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let agent = started(&logs, &server, &scratch, &["--resync-interval", "10m"]).await;
    let swaps_before = agent.metric("osc_agent_dir_swaps_total").await;
    for i in 1..=1000 {
        api.update("prod", "k", json!(secret(i))).await;
    }
    wait_file(&scratch.path("out/k"), &secret(1000), WAIT).await;
    // Syncs run one after another: once the last value is on disk, no later sync can swap again.
    let swaps = agent
        .wait_metric("osc_agent_dir_swaps_total", "grew", |v| v > swaps_before)
        .await
        - swaps_before;
    assert!(
        (1.0..=20.0).contains(&swaps),
        "directory swaps for 1000 updates: {swaps}"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn drift_is_repaired_from_memory() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    server.api().create("prod", "k", json!(secret(0))).await;
    server.api().create("prod", "j", json!(secret(1))).await;
    let scratch = Scratch::new();
    let agent = started(&logs, &server, &scratch, &["--resync-interval", "10m"]).await;
    let out = scratch.path("out");
    // The start sync and the one every (re)connect triggers: after them, only drift can restore files.
    let syncs = agent
        .wait_metric("osc_agent_syncs_total", ">= 2", |v| v >= 2.0)
        .await;
    std::fs::remove_file(out.join("k")).unwrap();
    wait_file(&out.join("k"), &secret(0), WAIT).await;
    std::fs::write(out.join("j"), "edited by hand").unwrap(); // follows the link into the generation
    wait_file(&out.join("j"), &secret(1), WAIT).await;
    agent
        .wait_metric("osc_agent_drift_repairs_total", ">= 2", |v| v >= 2.0)
        .await;
    assert_eq!(
        agent.metric("osc_agent_syncs_total").await,
        syncs,
        "repairs need no server call"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn rotated_user_key_is_used_without_restart() {
    use osc_agent::config::FileOptions;
    use osc_agent::render::DirPayload;
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let old_key = "old-user-key-0001";
    let new_key = "new-user-key-0002";
    let scratch = Scratch::new();
    // A Secret volume: `user-key -> ..data/user-key`, swapped atomically on rotation.
    let secret_dir = scratch.path("secret");
    let mount = |key: &str| {
        osc_agent::sink::dir::write(
            &DirPayload {
                path: secret_dir.clone(),
                files: [("user-key".to_string(), format!("{key}\n").into_bytes())].into(),
            },
            &FileOptions {
                mode: 0o600,
                uid: None,
                gid: None,
            },
        )
        .expect("mount secret");
    };
    mount(old_key);
    server
        .api()
        .with_key(old_key)
        .create("prod", "k", json!(secret(0)))
        .await;
    let out = scratch.path("out");
    let key_path = secret_dir.join("user-key").display().to_string();
    let mut args = live_args(&server.url, &scratch, &out, &["--resync-interval", "10m"]);
    let pos = args.iter().position(|a| a == "--user-key-file").unwrap();
    args[pos + 1] = key_path;
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;

    // The operator re-seals the data under the new key: the agent's reads now fail (files untouched)...
    let old = server.api().with_key(old_key);
    old.delete("prod", "k").await;
    server
        .api()
        .with_key(new_key)
        .create("prod", "k", json!(secret(1)))
        .await;
    wait_for("key mismatch reported", WAIT, || async {
        agent.status().await["sync"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("does not match"))
    })
    .await;
    assert_eq!(std::fs::read_to_string(out.join("k")).unwrap(), secret(0));
    // ...until the Secret volume rotates.
    mount(new_key);
    wait_file(&out.join("k"), &secret(1), WAIT).await;
    wait_for("error cleared", WAIT, || async {
        agent.status().await["sync"]["last_error"].is_null()
    })
    .await;
    logs.assert_free_of(&[SECRET, old_key, new_key, USER_KEY]);
}

#[tokio::test]
async fn health_and_readiness_follow_the_server() {
    let logs = Logs::default();
    // Reserve a port, start the agent while no server listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(
        &format!("http://{addr}"),
        &scratch,
        &out,
        &["--stale-after", "1s", "--resync-interval", "300ms"],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    assert_eq!(
        agent.get("/readyz").await.0,
        503,
        "not ready before the first sync"
    );
    wait_for(
        "unhealthy while the server was never reached",
        WAIT,
        || async { agent.get("/healthz").await.0 == 503 },
    )
    .await;
    let (_, body) = agent.get("/healthz").await;
    let reason: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        reason["reason"]
            .as_str()
            .unwrap()
            .contains("no successful sync"),
        "{body}"
    );

    let mut server = DevServer::start_on(&logs, &addr, &[]).await;
    server.api().create("prod", "k", json!(secret(0))).await;
    agent.wait_ready().await;
    wait_for("healthy", WAIT, || async {
        agent.get("/healthz").await.0 == 200
    })
    .await;
    wait_file(&out.join("k"), &secret(0), WAIT).await;

    server.kill().await;
    wait_for("unhealthy after the staleness bound", WAIT, || async {
        agent.get("/healthz").await.0 == 503
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(out.join("k")).unwrap(),
        secret(0),
        "files kept"
    );
    assert_eq!(
        agent.get("/readyz").await.0,
        200,
        "still ready: the last good files are in place"
    );

    let _server = DevServer::start_on(&logs, &addr, &[]).await; // empty: the data is gone
    _server.api().create("prod", "k", json!(secret(2))).await;
    wait_for("healthy again", WAIT, || async {
        agent.get("/healthz").await.0 == 200
    })
    .await;
    wait_file(&out.join("k"), &secret(2), WAIT).await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn sighup_and_post_sync_reconcile_when_every_event_is_lost() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--drop-every", "1"]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let agent = started(&logs, &server, &scratch, &["--resync-interval", "10m"]).await;
    let out = scratch.path("out/k");
    // The start sync, `connected` counted and the sync it triggers: from here on, only SIGHUP and
    // POST /sync can bring an update.
    agent
        .wait_metric("osc_agent_events_total", "1 (connected)", |v| v >= 1.0)
        .await;
    agent
        .wait_metric("osc_agent_syncs_total", ">= 2", |v| v >= 2.0)
        .await;
    api.update("prod", "k", json!(secret(1))).await;
    agent.signal(Signal::SIGHUP);
    wait_file(&out, &secret(1), WAIT).await;
    api.update("prod", "k", json!(secret(2))).await;
    let resp = agent
        .http
        .post(format!("http://{}/sync", agent.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    wait_file(&out, &secret(2), WAIT).await;
    assert_eq!(
        agent.metric("osc_agent_events_total").await,
        1.0,
        "only `connected` arrived"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn sigterm_during_a_burst_exits_0_quickly_and_leaves_no_temp_files() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    for k in 0..20 {
        api.create("prod", &format!("k{k}"), json!(secret(k))).await;
    }
    let scratch = Scratch::new();
    let agent = started(
        &logs,
        &server,
        &scratch,
        &["--wait-min", "1ms", "--wait-max", "5ms"],
    )
    .await;
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            for i in 0..2000 {
                api.update("prod", &format!("k{}", i % 20), json!(secret(i)))
                    .await;
            }
        })
    };
    wait_for("the burst is being applied", WAIT, || async {
        agent.metric("osc_agent_dir_swaps_total").await >= 3.0
    })
    .await;
    let (code, took) = agent.terminate().await;
    writer.abort();
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    let out = scratch.path("out");
    let hidden = hidden(&out);
    assert_eq!(
        hidden.len(),
        2,
        "..data and one generation, no ..data_tmp: {hidden:?}"
    );
    assert!(tree(&out).keys().all(|k| !k.contains("osc-tmp")));
    assert_eq!(visible(&out).len(), 20);
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn status_and_metrics_report_the_stream_without_values() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--ping-interval", "100ms"]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let agent = started(&logs, &server, &scratch, &[]).await;
    api.update("prod", "k", json!(secret(1))).await;
    wait_file(&scratch.path("out/k"), &secret(1), WAIT).await;
    wait_for("keep-alives counted", WAIT, || async {
        agent.metric("osc_agent_keepalives_total").await >= 2.0
    })
    .await;
    // The file may land through the sync `connected` triggers, before the `updated` event is counted.
    wait_for("the update event counted", WAIT, || async {
        agent.status().await["stream"]["events_by_type"]["updated"].as_u64() >= Some(1)
    })
    .await;
    let status = agent.status().await;
    assert_eq!(status["stream"]["connected"], json!(true));
    assert!(status["stream"]["subscription_id"].is_string());
    assert_eq!(
        status["sync"]["applied_hash"].as_str().map(str::len),
        Some(64)
    );
    let (_, metrics) = agent.get("/metrics").await;
    for name in [
        "osc_agent_stream_connected",
        "osc_agent_events_total",
        "osc_agent_syncs_total",
        "osc_agent_sync_duration_seconds",
        "osc_agent_last_sync_success_timestamp_seconds",
        "osc_agent_files_written_total",
        "osc_agent_drift_repairs_total",
        "osc_agent_reconnects_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    for text in [status.to_string(), metrics] {
        assert!(!text.contains(SECRET) && !text.contains(USER_KEY));
    }
    logs.assert_free_of(&[SECRET, USER_KEY]);
}
