//! The change detector against the dev server: every write lands on a multi-worker server, a server
//! without `/cluster/configs` still converges, a start costs one list call, an identical-value PUT
//! is noticed without a write or an action, and the poll interval stretches while the stream hears
//! everything and drops back at the first write it missed.

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
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
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
    // The last poll is in the metrics too, as a Unix time: after the 40 updates, not at 0.
    let last_poll = agent
        .metric("osc_agent_detector_last_poll_timestamp_seconds")
        .await;
    assert!(
        last_poll >= started_unix,
        "last poll {last_poll} is before the test's start {started_unix}"
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

// Writes of ONE key alternate between a worker the stream hears and one it does not: an earlier
// announcement of the key must not hide a later, unheard write of it (each lands, no resync).
#[tokio::test]
async fn an_unheard_write_is_not_hidden_by_an_earlier_announcement_of_the_same_key() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &["--workers", "2"]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0, 0))).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        &["--change-poll-interval", "1s", "--resync-interval", "1h"],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    // Rounds of 2 and 3 writes 400 ms apart: the workers alternate, so half the rounds end with an
    // unheard write 400 ms after a heard one (after the reconcile the heard one triggered, in the same
    // poll window). Each round's last value must land within the poll interval and two seconds, never
    // with the hour-long resync.
    let mut v = 0;
    for round in 0..6 {
        for _ in 0..2 + round % 2 {
            v += 1;
            api.update("prod", "k", json!(secret(0, v))).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        wait_file(&out.join("k"), &secret(0, v), Duration::from_secs(3)).await;
    }
    assert!(
        agent.metric("osc_agent_events_total").await >= 4.0,
        "the stream heard some of the writes"
    );
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// Metadata that changes on every poll without any change of content (an app re-putting the same value,
// a server bumping timestamps): after three reconciles that changed nothing, the detector's list calls
// are spaced out, said once; a real change is still synced.
#[tokio::test]
async fn metadata_churn_without_content_changes_does_not_list_at_every_poll() {
    let logs = Logs::default();
    // The stream hears nothing: every reconcile here is the detector's.
    let server = DevServer::start(&logs, &["--drop-every", "1"]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0, 0))).await;
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
            "2s",
            "--wait-min",
            "10ms",
            "--resync-interval",
            "1h",
        ],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    let lists_before = requests(&server, "list").await;
    let polls_before = requests(&server, "cluster_configs").await;
    // 20 identical-value PUTs, 300 ms apart: each one is seen by a poll.
    for _ in 0..20 {
        api.update("prod", "k", json!(secret(0, 0))).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let lists = requests(&server, "list").await - lists_before;
    let polls = requests(&server, "cluster_configs").await - polls_before;
    println!("20 identical PUTs: {polls} metadata polls, {lists} list calls");
    assert!(polls >= 20, "the detector kept polling: {polls}");
    assert!(
        lists <= 8,
        "list calls were spaced out after three no-op reconciles: {lists} for 20 PUTs"
    );
    assert_eq!(
        logs.text()
            .matches("keeps seeing metadata changes with unchanged content")
            .count(),
        1,
        "said once"
    );
    // A real change still lands (within the hold, at most --change-poll-max doubled a few times).
    api.update("prod", "k", json!(secret(0, 1))).await;
    wait_file(&out.join("k"), &secret(0, 1), WAIT).await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// After the route has answered, a 404 is a failure (a proxy, a rolling deploy), not "unavailable"; the
// detector says so in /status and recovers when the route answers again.
#[tokio::test]
async fn a_route_that_answered_before_and_fails_now_is_failing_then_recovers() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0, 0))).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        &["--change-poll-interval", "200ms"],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    wait_for("polling", WAIT, || async {
        detector(&agent).await["state"] == "polling"
    })
    .await;
    api.post_admin("/_dev/faults", json!({"cluster_configs": false}))
        .await;
    wait_for("failing", WAIT, || async {
        detector(&agent).await["state"] == "failing"
    })
    .await;
    assert!(!logs.text().contains("change detector unavailable"));
    api.post_admin("/_dev/faults", json!({"cluster_configs": true}))
        .await;
    wait_for("polling again", WAIT, || async {
        detector(&agent).await["state"] == "polling"
    })
    .await;
    // Writes during the failure are found by comparing with what was known before.
    api.post_admin("/_dev/faults", json!({"drop_every": 1}))
        .await;
    api.update("prod", "k", json!(secret(0, 1))).await;
    wait_file(&out.join("k"), &secret(0, 1), WAIT).await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// The adaptive interval, end to end on a one-worker server: while every change a poll finds had been
// announced by the stream, the interval doubles up to --change-poll-max; the first change the stream
// missed (its queue paused) brings it back to --change-poll-interval, and that write still lands.
#[tokio::test]
async fn the_interval_stretches_while_the_stream_hears_everything_and_drops_at_a_miss() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "k", json!(secret(0, 0))).await;
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
            "1600ms",
            "--resync-interval",
            "1h",
        ],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    let interval = || agent.metric("osc_agent_detector_interval_seconds");
    let heard = || async {
        agent
            .metric_sample("osc_agent_detector_changes_total", "result=\"heard\"")
            .await
            .unwrap_or(0.0)
    };
    wait_for("the detector's baseline", WAIT, || async {
        detector(&agent).await["state"] == "polling"
    })
    .await;
    let near = |s: f64, x: f64| (s - x).abs() < 1e-9;
    assert!(near(interval().await, 0.2));
    let missed = || async {
        agent
            .metric_sample("osc_agent_detector_changes_total", "result=\"missed\"")
            .await
            .unwrap_or(0.0)
    };

    // Writes the stream announces, each seen by its own poll, until the detector trusts the stream
    // (a poll racing the event can count as a miss and restart the run: bounded retries).
    let mut version = 0;
    while interval().await < 0.3 {
        version += 1;
        assert!(version <= 30, "no stretch after {version} announced writes");
        let (before, before_missed) = (heard().await, missed().await);
        api.update("prod", "k", json!(secret(0, version))).await;
        wait_file(&out.join("k"), &secret(0, version), WAIT).await;
        wait_for("a poll that finds the write", WAIT, || async {
            heard().await > before || missed().await > before_missed || interval().await >= 0.3
        })
        .await;
    }
    // Quiet polls keep doubling it, up to the maximum.
    agent
        .wait_metric(
            "osc_agent_detector_interval_seconds",
            "at the maximum",
            |s| near(s, 1.6),
        )
        .await;

    // The stream stops delivering: the next write is caught by the detector, which goes back to the
    // minimum interval.
    api.post_admin("/_dev/faults", json!({"paused": true}))
        .await;
    let missed_before = missed().await;
    api.update("prod", "k", json!(secret(0, 100))).await;
    wait_file(&out.join("k"), &secret(0, 100), WAIT).await;
    agent
        .wait_metric(
            "osc_agent_detector_interval_seconds",
            "back at the minimum",
            |s| near(s, 0.2),
        )
        .await;
    assert!(missed().await > missed_before);
    logs.assert_free_of(&[SECRET, USER_KEY]);
}
