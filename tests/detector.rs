//! The change detector against the dev server: every write lands on a multi-worker server, a server
//! without `/cluster/configs` still converges, a start costs one list call, and an identical-value PUT
//! is noticed without a write or an action.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "detector-secret-Wp4";
const WAIT: Duration = Duration::from_secs(30);

fn secret(key: usize, version: usize) -> String {
    format!("{SECRET}-{key}-{version}")
}

async fn dev_stats(server: &DevServer) -> Value {
    reqwest::get(format!("{}/_dev/stats", server.url))
        .await
        .expect("GET /_dev/stats")
        .json()
        .await
        .expect("stats JSON")
}

async fn requests(server: &DevServer, route: &str) -> u64 {
    dev_stats(server).await["requests"][route]
        .as_u64()
        .unwrap_or_else(|| panic!("no requests.{route} in /_dev/stats"))
}

/// The agent's /status `detector` object.
async fn detector(agent: &AgentProc) -> Value {
    agent.status().await["detector"].clone()
}

// 40 updates spaced 200 ms apart on a server with 4 workers (one stream hears one write in four): each
// lands within the poll interval + 1 s, and the detector is credited for the ones the stream missed.
#[tokio::test]
async fn on_four_workers_every_update_lands_within_the_poll_interval() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--workers", "4"]).await;
    let api = server.api();
    const KEYS: usize = 40;
    for k in 0..KEYS {
        api.create("prod", &format!("k{k:02}"), json!(secret(k, 0)))
            .await;
    }
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let interval = Duration::from_secs(2);
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        // The resync must not be what saves a write here.
        &["--change-poll-interval", "2s", "--resync-interval", "1h"],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    wait_for("the detector's baseline", WAIT, || async {
        detector(&agent).await["state"] == "polling"
    })
    .await;

    // A watcher records when each file first shows its new value.
    let landed = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<usize, Instant>::new()));
    let watcher = {
        let (landed, out) = (landed.clone(), out.clone());
        tokio::spawn(async move {
            loop {
                for k in 0..KEYS {
                    let path = out.join(format!("k{k:02}"));
                    if std::fs::read_to_string(&path).is_ok_and(|v| v == secret(k, 1)) {
                        landed.lock().unwrap().entry(k).or_insert_with(Instant::now);
                    }
                }
                if landed.lock().unwrap().len() == KEYS {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut written = BTreeMap::new();
    for k in 0..KEYS {
        api.update("prod", &format!("k{k:02}"), json!(secret(k, 1)))
            .await;
        written.insert(k, Instant::now());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::timeout(WAIT, watcher)
        .await
        .expect("every update lands")
        .expect("watcher");
    let landed = landed.lock().unwrap().clone();
    let mut late = Vec::new();
    let mut worst = Duration::ZERO;
    for (k, at) in &written {
        let took = landed[k].saturating_duration_since(*at);
        worst = worst.max(took);
        if took > interval + Duration::from_secs(1) {
            late.push((k, took));
        }
    }
    println!("4 workers, 40 updates: slowest landed {worst:?} after its PUT");
    assert!(
        late.is_empty(),
        "landed later than interval + 1 s: {late:?}"
    );
    let via_detector = agent
        .metric_sample("osc_agent_changes_noticed_total", "via=\"detector\"")
        .await
        .unwrap_or(0.0);
    assert!(via_detector > 0.0, "the detector noticed missed writes");
    let status = detector(&agent).await;
    assert!(
        status["changes_missed_by_stream"].as_u64() > Some(0),
        "{status}"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// A server without /cluster/configs (404): the agent says the detector is unavailable, and converges
// through the stream and the periodic resync.
#[tokio::test]
async fn without_cluster_configs_the_agent_says_so_and_converges_through_resync() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--workers", "4", "--no-cluster-configs"]).await;
    let api = server.api();
    for k in 0..4 {
        api.create("prod", &format!("k{k:02}"), json!(secret(k, 0)))
            .await;
    }
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(&server.url, &scratch, &out, &["--resync-interval", "2s"]);
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    wait_for("the detector reported unavailable", WAIT, || async {
        detector(&agent).await["state"] == "unavailable"
    })
    .await;
    assert_eq!(
        agent
            .metric_sample("osc_agent_detector_state", "state=\"unavailable\"")
            .await,
        Some(1.0)
    );
    assert!(
        logs.text().contains("change detector unavailable"),
        "said once in the log"
    );
    // Four writes: the stream hears one of them, the resync brings the rest.
    for k in 0..4 {
        api.update("prod", &format!("k{k:02}"), json!(secret(k, 1)))
            .await;
    }
    for k in 0..4 {
        wait_file(&out.join(format!("k{k:02}")), &secret(k, 1), WAIT).await;
    }
    assert_eq!(
        logs.text().matches("change detector unavailable").count(),
        1,
        "said once, not at every poll"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// A start lists the environment once: it subscribes first and reconciles on `connected`.
#[tokio::test]
async fn a_start_makes_exactly_one_list_call() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    for k in 0..50 {
        api.create("prod", &format!("k{k:02}"), json!(secret(k, 0)))
            .await;
    }
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        &[
            "--change-poll-interval",
            "200ms",
            "--change-poll-max",
            "200ms",
        ],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    assert!(out.join("k49").exists());
    // Long enough after the start for a second list to have happened, if any was coming: the
    // stream's `connected` was handled before the sync (it is what triggered it), and the detector
    // has polled a few times since.
    let polls = requests(&server, "cluster_configs").await;
    wait_for("three more metadata polls", WAIT, || async {
        requests(&server, "cluster_configs").await >= polls + 3
    })
    .await;
    assert_eq!(
        agent.status().await["stream"]["connected"],
        true,
        "the stream is up"
    );
    assert_eq!(
        requests(&server, "list").await,
        1,
        "one list call (one key derivation) per start"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// An identical-value PUT changes only the metadata: the detector notices it, the reconcile finds the
// same content, nothing is written and no action runs.
#[tokio::test]
async fn an_identical_value_put_is_noticed_and_changes_nothing() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--workers", "4"]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0, 0))).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let ran = scratch.path("action-ran");
    let action = format!("exec:command=touch {}", ran.display());
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        &[
            "--change-poll-interval",
            "300ms",
            "--action",
            &action,
            "--action-cooldown",
            "0s",
        ],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    wait_for("the detector's baseline", WAIT, || async {
        detector(&agent).await["state"] == "polling"
    })
    .await;
    let generation = std::fs::read_link(out.join("..data")).expect("..data");
    let syncs = agent.metric("osc_agent_syncs_total").await;
    let written = agent.metric("osc_agent_files_written_total").await;
    let before = tree(&out);

    api.update("prod", "k", json!(secret(0, 0))).await;
    wait_for("the detector noticed the write", WAIT, || async {
        let d = detector(&agent).await;
        d["changes_missed_by_stream"].as_u64().unwrap_or(0)
            + d["changes_heard_by_stream"].as_u64().unwrap_or(0)
            >= 1
    })
    .await;
    agent
        .wait_metric("osc_agent_syncs_total", "the reconcile it asked for", |n| {
            n > syncs
        })
        .await;
    assert_eq!(
        std::fs::read_link(out.join("..data")).ok(),
        Some(generation)
    );
    assert_eq!(tree(&out), before, "nothing on disk changed");
    assert_eq!(agent.metric("osc_agent_files_written_total").await, written);
    assert!(!ran.exists(), "no action for unchanged content");
    assert_eq!(
        agent
            .metric_sample("osc_agent_changes_noticed_total", "via=\"detector\"")
            .await,
        Some(0.0),
        "nothing changed, so no change is credited"
    );
    // A real change still goes through (and acts), so the check above is not vacuous.
    api.update("prod", "k", json!(secret(0, 1))).await;
    wait_file(&out.join("k"), &secret(0, 1), WAIT).await;
    wait_for("the action ran", WAIT, || async { ran.exists() }).await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}
