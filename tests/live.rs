//! Live mode against a real dev server process: every way the upstream stream loses events, bursts,
//! drift repair, credential rotation, health, signals. Every wait has a deadline.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

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
    // Without the change detector: the resync alone must converge (tests/detector.rs covers the rest).
    let agent = started(
        &logs,
        &server,
        &scratch,
        &["--resync-interval", "1s", "--change-poll-interval", "0"],
    )
    .await;
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
    // The start sync (one per start, once the stream is connected): after it, only drift can restore
    // files.
    let syncs = agent
        .wait_metric("osc_agent_syncs_total", ">= 1", |v| v >= 1.0)
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

/// A Secret volume holding `user-key`: `user-key -> ..data/user-key`, swapped atomically like kubelet
/// does on rotation.
fn mount_secret(secret_dir: &Path, key: &str) {
    use osc_agent::config::FileOptions;
    use osc_agent::render::DirPayload;
    osc_agent::sink::dir::write(
        &DirPayload {
            path: secret_dir.to_owned(),
            files: [("user-key", format!("{key}\n"))].into_iter().collect(),
        },
        &FileOptions {
            mode: 0o600,
            uid: None,
            gid: None,
        },
    )
    .expect("mount secret");
}

#[tokio::test]
async fn rotated_user_key_is_used_without_restart() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let old_key = "old-user-key-0001";
    let new_key = "new-user-key-0002";
    let scratch = Scratch::new();
    let secret_dir = scratch.path("secret");
    let mount = |key: &str| mount_secret(&secret_dir, key);
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
    // No change detector: from here on, only SIGHUP and POST /sync can bring an update.
    let agent = started(
        &logs,
        &server,
        &scratch,
        &["--resync-interval", "10m", "--change-poll-interval", "0"],
    )
    .await;
    let out = scratch.path("out/k");
    // `connected` counted, and the start sync it triggered.
    agent
        .wait_metric("osc_agent_events_total", "1 (connected)", |v| v >= 1.0)
        .await;
    agent
        .wait_metric("osc_agent_syncs_total", ">= 1", |v| v >= 1.0)
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

/// A seed file with `n` keys `k0000`… in environment `prod` (values of about 1 KiB).
fn big_seed(scratch: &Scratch, n: usize) -> String {
    let env: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| {
            (
                format!("k{i:04}"),
                json!(format!("{}-{i}-{}", SECRET, "x".repeat(1000))),
            )
        })
        .collect();
    scratch
        .write("seed.json", &json!({ "prod": env }).to_string())
        .display()
        .to_string()
}

/// Generation directories (`..2026_…`) in an output directory.
fn generations(dir: &Path) -> Vec<String> {
    hidden(dir)
        .into_iter()
        .filter(|n| n != "..data" && n != "..data_tmp")
        .collect()
}

#[tokio::test]
async fn a_burst_of_post_sync_and_sighup_costs_one_list_call_per_interval() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    server.api().create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let interval = Duration::from_secs(1);
    let agent = started(
        &logs,
        &server,
        &scratch,
        &["--resync-interval", "10m", "--sync-min-interval", "1s"],
    )
    .await;
    // The start sync (once the stream is connected).
    agent
        .wait_metric("osc_agent_syncs_total", ">= 1", |v| v >= 1.0)
        .await;
    let syncs_before = agent.metric("osc_agent_syncs_total").await;
    let calls_before = server.list_calls().await;

    let burst_start = Instant::now();
    let requests = 40;
    let mut answers = Vec::new();
    for i in 0..requests {
        if i % 10 == 5 {
            agent.signal(Signal::SIGHUP);
        } else {
            answers.push(agent.post("/sync").await);
        }
        // The pace of the burst (one request every 50 ms), not a wait for anything.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Requests are coalesced, never dropped: wait until the last one has been served.
    wait_for("every requested reconcile done", WAIT, || async {
        let pending = agent.status().await["sync"]["requested_in_ms"].clone();
        let syncs = agent.metric("osc_agent_syncs_total").await - syncs_before;
        let calls = server.list_calls().await - calls_before;
        pending.is_null() && syncs == calls as f64
    })
    .await;
    let duration = burst_start.elapsed();
    let calls = server.list_calls().await - calls_before;
    let bound = (duration.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 1;
    assert!(
        (2..=bound).contains(&calls),
        "{requests} requests in {duration:?} made {calls} list calls (bound {bound})"
    );
    // Each answer says when its reconcile runs; every request is counted by how it was scheduled.
    for (code, body) in &answers {
        assert_eq!(*code, 202, "{body}");
        assert!(
            ["now", "delayed", "coalesced"].contains(&body["result"].as_str().unwrap_or("")),
            "{body}"
        );
        assert!(body["runs_in_ms"].as_u64() <= Some(1000), "{body}");
    }
    agent
        .wait_metric(
            "osc_agent_sync_requests_total",
            "counts every request",
            |v| v == f64::from(requests),
        )
        .await;
    let merged = agent
        .metric_sample("osc_agent_sync_requests_total", "result=\"coalesced\"")
        .await
        .unwrap_or(0.0);
    assert!(
        merged >= f64::from(requests) - 2.0 * bound as f64,
        "coalesced requests: {merged}"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

/// Waits until `/status` reports the user key mismatch (the server's 500).
async fn wait_key_mismatch(agent: &AgentProc) {
    wait_for("key mismatch reported", WAIT, || async {
        agent.status().await["sync"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("does not match"))
    })
    .await;
}

#[tokio::test]
async fn noise_in_the_credential_directory_keeps_the_backoff_and_rotations_retry_at_once() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let secret_dir = scratch.path("secret");
    let (second_key, third_key) = ("second-user-key-0002", "third-user-key-0003");
    mount_secret(&secret_dir, USER_KEY);
    let out = scratch.path("out");
    let mut args = live_args(&server.url, &scratch, &out, &["--resync-interval", "10m"]);
    let key_path = secret_dir.join("user-key");
    set_arg(&mut args, "--user-key-file", key_path.to_str().unwrap());
    // A failing sync is retried after 15-30 s, then 30-60 s (half to all of the backoff's ceiling).
    set_arg(&mut args, "--retry-initial-delay", "30s");
    set_arg(&mut args, "--reconnect-max-delay", "60s");
    // The agent's own log, at trace level, in the credential directory: every line is a file event
    // next to the credential file.
    let log = secret_dir.join("agent.log");
    let agent = AgentProc::launch(
        &logs,
        &strs(&args),
        Launch {
            env: vec![("OSC_LOG", "trace")],
            stderr_file: Some(log.clone()),
            ..Launch::default()
        },
    )
    .await;
    agent.wait_ready().await;

    // The data is re-sealed under another key: the agent's syncs fail from now on.
    api.with_key(second_key)
        .create("prod", "k2", json!(secret(2)))
        .await;
    wait_key_mismatch(&agent).await;
    let before = server.list_calls().await;
    // The observation window: files written next to the credential file (by someone else, and the
    // agent's own log lines) must not cut the backoff short.
    let neighbour = secret_dir.join("notes.txt");
    for i in 0..30 {
        std::fs::write(&neighbour, format!("noise {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = server.list_calls().await - before;
    assert!(
        calls <= 1,
        "{calls} list calls in 3 s while the retry waits 15-30 s (at most one is brought forward, by \
         the stream's connect)"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("agent.log") && !text.contains("notes.txt"),
        "the watcher logged events of unwatched names"
    );

    // A kubelet-style rotation (..data swap) retries at once, well before the backoff.
    api.delete("prod", "k").await;
    mount_secret(&secret_dir, second_key);
    wait_file(&out.join("k2"), &secret(2), Duration::from_secs(10)).await;
    wait_for("k removed", WAIT, || async { visible(&out) == ["k2"] }).await;

    // Re-sealed again; this time the key file itself is replaced (renamed over).
    api.with_key(third_key)
        .create("prod", "k3", json!(secret(3)))
        .await;
    wait_key_mismatch(&agent).await;
    api.with_key(second_key).delete("prod", "k2").await;
    let replacement = secret_dir.join("user-key.new");
    std::fs::write(&replacement, format!("{third_key}\n")).unwrap();
    std::fs::rename(&replacement, &key_path).unwrap();
    wait_file(&out.join("k3"), &secret(3), Duration::from_secs(10)).await;

    drop(agent);
    logs.push(&std::fs::read_to_string(&log).unwrap_or_default());
    logs.assert_free_of(&[SECRET, USER_KEY, second_key, third_key]);
}

/// Whether user namespaces can be created here (they give each test agent its own inotify limits).
fn user_namespaces() -> bool {
    std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn without_inotify_the_agent_polls_drift_and_credentials() {
    if !user_namespaces() {
        assert!(
            std::env::var_os("OSC_REQUIRE_USERNS").is_none(),
            "OSC_REQUIRE_USERNS is set but `unshare --user --map-root-user` fails here"
        );
        eprintln!(
            "SKIPPED without_inotify_the_agent_polls_drift_and_credentials: `unshare --user` is not \
             available (OSC_REQUIRE_USERNS=1 makes this a failure)"
        );
        return;
    }
    // In its own user namespace, the agent gets inotify limits of 0: `inotify_init` fails with
    // EMFILE (no instance left), or adding a watch fails with ENOSPC (no watch left). Real failures.
    for (limit, reason) in [
        ("max_inotify_instances", "max_user_instances"),
        ("max_inotify_watches", "max_user_watches"),
    ] {
        let logs = Logs::default();
        let server = DevServer::start(&logs, &[]).await;
        let api = server.api();
        api.create("prod", "k", json!(secret(0))).await;
        let scratch = Scratch::new();
        let out = scratch.path("out");
        let mut args = live_args(&server.url, &scratch, &out, &["--resync-interval", "10m"]);
        set_arg(&mut args, "--retry-initial-delay", "30s");
        set_arg(&mut args, "--reconnect-max-delay", "60s");
        let agent = AgentProc::launch(
            &logs,
            &strs(&args),
            Launch {
                wrapper: vec![
                    "unshare".into(),
                    "--user".into(),
                    "--map-root-user".into(),
                    "sh".into(),
                    "-c".into(),
                    format!("echo 0 > /proc/sys/user/{limit} && exec \"$0\" \"$@\""),
                ],
                ..Launch::default()
            },
        )
        .await;
        agent.wait_ready().await;
        // Drift repair still works: a deleted file comes back, from memory.
        let syncs = agent.metric("osc_agent_syncs_total").await;
        std::fs::remove_file(out.join("k")).unwrap();
        wait_file(&out.join("k"), &secret(0), WAIT).await;
        assert_eq!(agent.metric("osc_agent_syncs_total").await, syncs);

        wait_for("polling shown in /status", WAIT, || async {
            agent.status().await["watch"] == json!("polling")
        })
        .await;
        let status = agent.status().await;
        assert!(
            status["watch_detail"]
                .as_str()
                .is_some_and(|d| d.contains(reason)),
            "{limit}: {status}"
        );
        assert_eq!(
            agent
                .metric_sample("osc_agent_watch_mode", "mode=\"polling\"")
                .await,
            Some(1.0)
        );
        assert_eq!(
            agent
                .metric_sample("osc_agent_watch_mode", "mode=\"inotify\"")
                .await,
            Some(0.0)
        );

        // Credential reload still works: a failing sync is retried as soon as the key file changes.
        let second_key = "second-user-key-0002";
        api.with_key(second_key)
            .create("prod", "k2", json!(secret(1)))
            .await;
        wait_key_mismatch(&agent).await;
        api.delete("prod", "k").await;
        scratch.write("user-key.new", &format!("{second_key}\n"));
        std::fs::rename(scratch.path("user-key.new"), scratch.path("user-key")).unwrap();
        // The retry waits 15-30 s; polling notices the new key within seconds.
        wait_file(&out.join("k2"), &secret(1), Duration::from_secs(10)).await;

        let text = logs.text();
        assert_eq!(
            text.matches("polling every").count(),
            1,
            "the fallback is said once, at warn level"
        );
        assert!(text.contains("WARN") && text.contains(reason), "{text}");
        logs.assert_free_of(&[SECRET, USER_KEY, second_key]);
    }
}

#[tokio::test]
async fn inotify_is_the_normal_watch_mode() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    server.api().create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let agent = started(&logs, &server, &scratch, &[]).await;
    wait_for("inotify shown in /status", WAIT, || async {
        agent.status().await["watch"] == json!("inotify")
    })
    .await;
    assert_eq!(
        agent
            .metric_sample("osc_agent_watch_mode", "mode=\"inotify\"")
            .await,
        Some(1.0)
    );
    assert!(!logs.text().contains("polling every"));
}

#[tokio::test]
async fn an_empty_environment_never_empties_the_outputs() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let agent = started(&logs, &server, &scratch, &["--resync-interval", "10m"]).await;
    let syncs = agent.metric("osc_agent_syncs_total").await;
    let before = tree(&out);

    // The last key goes: the agent refuses to write an empty generation, says why, keeps the files.
    api.delete("prod", "k").await;
    wait_for("refusal reported", WAIT, || async {
        agent.status().await["sync"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no entry") && e.contains("--allow-empty"))
    })
    .await;
    assert_eq!(tree(&out), before, "files kept exactly");
    assert_eq!(agent.get("/readyz").await.0, 200, "still serving the files");
    assert!(
        logs.text().contains("--environment"),
        "the log names the flag"
    );
    assert!(agent.metric("osc_agent_syncs_total").await > syncs);

    // Entries come back: synced as usual.
    api.create("prod", "k", json!(secret(1))).await;
    wait_file(&out.join("k"), &secret(1), WAIT).await;
    // The swap is seen before the old generation is removed and the agent's record updated: wait for
    // both, so that the files kept below are a settled state, not one cut short by the kill.
    wait_for("the old generation cleaned up", WAIT, || async {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("..osc-agent")).unwrap_or_default())
                .unwrap_or_default();
        hidden(&out).len() == 2 && record["generations"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    drop(agent);

    // A fresh start on an environment with no entry: nothing written, not ready, the reason named.
    let fresh = scratch.path("fresh");
    let mut args = live_args(&server.url, &scratch, &fresh, &[]);
    set_arg(&mut args, "--environment", "prodution");
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    wait_for("not ready, naming the environment", WAIT, || async {
        let (code, body) = agent.get("/readyz").await;
        code == 503 && body.contains("prodution") && body.contains("--environment")
    })
    .await;
    assert!(!fresh.exists(), "nothing written");
    drop(agent);

    // A restart on that environment over an earlier run's files: kept, served as last-known-good.
    let kept = tree(&out);
    let mut args = live_args(&server.url, &scratch, &out, &[]);
    set_arg(&mut args, "--environment", "prodution");
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    wait_for("the refusal reported", WAIT, || async {
        agent.status().await["stale"]
            .as_str()
            .is_some_and(|s| s.contains("last-known-good"))
    })
    .await;
    assert_eq!(tree(&out), kept);
    drop(agent);

    // --allow-empty: an empty environment is synced like any other.
    let allowed = scratch.path("allowed");
    let mut args = live_args(&server.url, &scratch, &allowed, &["--allow-empty"]);
    set_arg(&mut args, "--environment", "prodution");
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    assert_eq!(hidden(&allowed).len(), 2, "..data and an empty generation");
    assert!(visible(&allowed).is_empty());
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn sigterm_during_a_big_live_write_abandons_it_and_exits() {
    let logs = Logs::default();
    let scratch = Scratch::new();
    let seed = big_seed(&scratch, 4000);
    let server = DevServer::start(
        &logs,
        &["--seed", &seed, "--seed-user-key-file", &scratch.key_file()],
    )
    .await;
    let out = scratch.path("out");
    // An earlier run's files (10 keys).
    let once = live_args(
        &server.url,
        &scratch,
        &out,
        &["--include", "k000*", "--once"],
    );
    let r = run_agent(&logs, &strs(&once), &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let before = visible_tree(&out);

    // Live, all 4000 keys: a new generation of 4000 fsynced files.
    let agent = AgentProc::start(&logs, &strs(&live_args(&server.url, &scratch, &out, &[]))).await;
    wait_for("the new generation being written", WAIT, || async {
        generations(&out).len() == 2
    })
    .await;
    let (code, took) = agent.terminate().await;
    assert_eq!(code, 0);
    println!("SIGTERM during a 4000-file write: exited after {took:?}");
    assert_eq!(
        visible_tree(&out),
        before,
        "the partial generation is gone and the earlier files are untouched"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

#[tokio::test]
async fn idle_admin_connections_are_bounded_and_closed() {
    use tokio::io::AsyncReadExt;
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    server.api().create("prod", "k", json!(secret(0))).await;
    let scratch = Scratch::new();
    let agent = started(&logs, &server, &scratch, &[]).await;
    // More idle connections than the agent keeps (64), none sending a byte.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(
            tokio::net::TcpStream::connect(&agent.admin)
                .await
                .expect("connect"),
        );
    }
    // Each is closed by the agent: the extra ones at once, the others after their lifetime (10 s).
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        for mut conn in idle {
            let mut buf = [0u8; 16];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            assert_eq!(n, 0, "the agent sent bytes to an idle connection");
        }
    })
    .await;
    assert!(closed.is_ok(), "idle admin connections were kept open");
    assert_eq!(agent.get("/healthz").await.0, 200);
    logs.assert_free_of(&[SECRET, USER_KEY]);
}
