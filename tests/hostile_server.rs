//! The agent facing a hostile or broken server, over loopback: fake servers that redirect, answer with
//! text meant to reach logs, send endless bodies and events; and a fake proxy counting what goes through
//! it. Every case runs the real agent binary.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A valid list answer of the protocol (`GET /configs?environment=prod`).
const LIST: &str = r#"[{"id":1,"key":"db.url","category":"database","environment":"prod","value":{"host":"db.internal","port":5432}}]"#;

/// Text planted by the server: it must never come back in anything the agent prints or serves.
const CANARY: &str = "CANARY-7f3a";

const API_KEY: &str = "api-key-should-stay-home";
const TOKEN: &str = "bearer-token-should-stay-home";

async fn list_answer(conn: &mut TcpStream) {
    respond(
        conn,
        200,
        &[("content-type", "application/json")],
        LIST.as_bytes(),
    )
    .await;
}

/// `--once` arguments against `server`, with every credential the agent can send.
fn once_args(server: &str, scratch: &Scratch, extra: &[&str]) -> Vec<String> {
    scratch.write("api-key", API_KEY);
    scratch.write("token", TOKEN);
    let mut v: Vec<String> = [
        "--once",
        "--server",
        server,
        "--environment",
        "prod",
        "--user-key-file",
        &scratch.key_file(),
        "--api-key-file",
        &scratch.path("api-key").display().to_string(),
        "--token-file",
        &scratch.path("token").display().to_string(),
        "--output-dir",
        &scratch.path("out").display().to_string(),
        "--max-retries",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A server on 127.0.0.2 that must never be reached (it would answer like the real server).
async fn elsewhere() -> FakeServer {
    FakeServer::start("127.0.0.2:0", |_, mut conn| async move {
        list_answer(&mut conn).await
    })
    .await
}

#[tokio::test]
async fn redirects_are_not_followed_and_credentials_stay_with_the_server() {
    let logs = Logs::default();
    let target = elsewhere().await;
    for status in [301u16, 302, 303, 307, 308] {
        let location = format!(
            "{}/configs?environment=prod&token={CANARY}",
            target.url.replace("http://", "http://user:pw@")
        );
        let server = FakeServer::start("127.0.0.1:0", move |_, mut conn| {
            let location = location.clone();
            async move { respond(&mut conn, status, &[("location", &location)], b"").await }
        })
        .await;
        let scratch = Scratch::new();
        let r = run_agent(&logs, &strs(&once_args(&server.url, &scratch, &[])), &[]).await;

        assert_eq!(r.code, 3, "{status}: {r:?}");
        assert!(
            r.stderr.contains(&format!("HTTP {status}"))
                && r.stderr.contains("another host (not shown")
                && !r.stderr.contains("127.0.0.2")
                && r.stderr.contains("--server"),
            "{status}: the error names the status, says the target is another host, and the fix: {}",
            r.stderr
        );
        assert!(!r.stderr.contains(CANARY), "{status}: {}", r.stderr);
        let asked = server.seen();
        assert!(
            !asked.is_empty() && asked[0].header("x-user-key") == Some(USER_KEY),
            "the server itself was asked, with the user key: {asked:?}"
        );
        assert!(!scratch.path("out").join("db.url").exists());
    }
    assert!(
        target.seen().is_empty(),
        "the redirect target received requests: {:?}",
        target.seen()
    );
    // A server echoing a credential into the Location's host, to get it into logs: another host is
    // never shown, so no log holds the credential.
    for secret in [USER_KEY, API_KEY, TOKEN] {
        let location = format!(
            "http://{}.example:{}/",
            secret.to_uppercase(),
            target.addr.port()
        );
        let server = FakeServer::start("127.0.0.1:0", move |_, mut conn| {
            let location = location.clone();
            async move { respond(&mut conn, 302, &[("location", &location)], b"").await }
        })
        .await;
        let scratch = Scratch::new();
        let r = run_agent(&logs, &strs(&once_args(&server.url, &scratch, &[])), &[]).await;
        assert_eq!(r.code, 3, "{r:?}");
        assert!(r.stderr.contains("another host (not shown"), "{}", r.stderr);
    }
    logs.assert_free_of(&[USER_KEY, API_KEY, TOKEN]);
    let lower = logs.text().to_lowercase();
    for secret in [USER_KEY, API_KEY, TOKEN] {
        assert!(!lower.contains(secret), "{secret} in the logs");
    }
}

#[tokio::test]
async fn a_redirected_event_stream_is_not_followed_and_is_retried_with_backoff() {
    let logs = Logs::default();
    let target = elsewhere().await;
    let location = format!("{}/sse/subscribe?environment=prod", target.url);
    let server = FakeServer::start("127.0.0.1:0", move |seen, mut conn| {
        let location = location.clone();
        async move {
            if seen.path() == "/sse/subscribe" {
                respond(&mut conn, 307, &[("location", &location)], b"").await
            } else {
                list_answer(&mut conn).await
            }
        }
    })
    .await;
    let scratch = Scratch::new();
    scratch.write("api-key", API_KEY);
    let out = scratch.path("out");
    let api_key = scratch.path("api-key").display().to_string();
    let args = live_args(&server.url, &scratch, &out, &["--api-key-file", &api_key]);
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    wait_for(
        "three attempts at the event stream",
        Duration::from_secs(30),
        || async { server.count("/sse/subscribe") >= 3 },
    )
    .await;
    let status = agent.status().await;
    let last = status["stream"]["last_error"].as_str().unwrap_or_default();
    assert!(
        last.contains("HTTP 307") && last.contains("another host (not shown"),
        "/status says why: {status}"
    );
    assert_eq!(status["stream"]["connected"], false);
    let (code, _) = agent.terminate().await;
    assert_eq!(code, 0);
    assert!(
        target.seen().is_empty(),
        "the redirect target received requests: {:?}",
        target.seen()
    );
    assert!(
        logs.text()
            .contains("event stream disconnected, reconnecting")
            && logs.text().contains("307"),
        "the log says why: {}",
        logs.text()
    );
    logs.assert_free_of(&[USER_KEY, API_KEY]);
}

/// Error answers with planted text: (status, body, exit code expected in `--once`).
fn hostile_answers() -> Vec<(u16, String, i32)> {
    let c = CANARY;
    let ctl = format!("\u{1b}[31m{c}\n2026-01-01T00:00:00Z  INFO forged line\r\0");
    let detail = |d: &str| serde_json::json!({ "detail": d }).to_string();
    vec![
        (
            400,
            detail(&format!("Configuration with key '{c}' already exists")),
            3,
        ),
        (
            401,
            detail(&format!(
                "X-User-Key must be at least 8 characters long {c}"
            )),
            4,
        ),
        (401, detail(&ctl), 4),
        (
            403,
            detail(&format!("API key required but missing. {c}")),
            4,
        ),
        (403, detail(&format!("Invalid API key{c}")), 4),
        (404, detail(&format!("environment is required {c}")), 2),
        (
            404,
            detail(&format!(
                "Configuration with key '{c}' not found in environment 'prod'"
            )),
            2,
        ),
        (405, format!("<html>{c}</html>"), 3),
        (409, detail(&ctl), 3),
        (
            422,
            serde_json::json!({"detail": [
                {"type": "missing", "loc": ["query", c], "msg": c, "input": c},
                {"type": c, "loc": ["header", "x-user-key"], "msg": ctl},
                {"type": "missing", "loc": ["body", ctl], "msg": c},
            ]})
            .to_string(),
            2,
        ),
        (422, detail(c), 2),
        (429, c.to_string(), 3),
        (500, detail(&format!("Internal error: {c}")), 3),
        (500, ctl.clone(), 3),
        (502, format!("<html><body>Bad gateway {c}</body></html>"), 3),
        (503, detail(c), 3),
        (504, ctl, 3),
    ]
}

/// A server answering every request with the current `(status, body)`.
async fn answering(current: Arc<Mutex<(u16, String)>>) -> FakeServer {
    FakeServer::start("127.0.0.1:0", move |_, mut conn| {
        let (status, body) = current.lock().map(|c| c.clone()).unwrap_or_default();
        async move {
            respond(
                &mut conn,
                status,
                &[("content-type", "application/json")],
                body.as_bytes(),
            )
            .await
        }
    })
    .await
}

#[tokio::test]
async fn server_text_never_reaches_the_error_nor_the_log() {
    let logs = Logs::default();
    let current = Arc::new(Mutex::new((200, LIST.to_owned())));
    let server = answering(current.clone()).await;
    for (status, body, code) in hostile_answers() {
        *current.lock().unwrap() = (status, body.clone());
        let scratch = Scratch::new();
        let r = run_agent(&logs, &strs(&once_args(&server.url, &scratch, &[])), &[]).await;
        assert_eq!(r.code, code, "{status} {body:?}: {r:?}");
        // Debug records of the HTTP pool may come from another thread after the error line.
        let error = r
            .stderr
            .lines()
            .find(|l| l.starts_with("osc-agent: error: "))
            .unwrap_or_default();
        assert!(
            error.contains(&status.to_string()),
            "{status}: the error names the status: {error:?}\n{}",
            r.stderr
        );
        for text in [&r.stderr, &r.stdout] {
            assert!(!text.contains(CANARY), "{status} {body:?} echoed: {text}");
            assert!(
                !text.contains('\u{1b}') && !text.contains('\0') && !text.contains("forged"),
                "{status}: control characters or text from the body: {text}"
            );
        }
    }
    logs.assert_free_of(&[CANARY, USER_KEY, API_KEY, TOKEN]);
}

#[tokio::test]
async fn server_text_never_reaches_status_in_live_mode() {
    let logs = Logs::default();
    let answers = Arc::new(hostile_answers());
    let served = Arc::new(AtomicUsize::new(0));
    let (answers2, served2) = (answers.clone(), served.clone());
    let server = FakeServer::start("127.0.0.1:0", move |seen, mut conn| {
        let n = served2.fetch_add(1, Ordering::SeqCst);
        let (status, body, _) = answers2[n % answers2.len()].clone();
        async move {
            if seen.path() == "/sse/subscribe" && n % 3 == 0 {
                // A stream whose events carry planted text where the agent keeps something.
                let id = format!("{CANARY}\n\u{1b}[2J");
                let connected = serde_json::json!({"subscription_id": id}).to_string();
                let change = serde_json::json!({"key": format!("{CANARY}\nforged"), "data": null});
                let stream = format!(
                    "event: connected\r\ndata: {connected}\r\n\r\nevent: {CANARY}\r\ndata: {change}\r\n\r\n"
                );
                respond(
                    &mut conn,
                    200,
                    &[("content-type", "text/event-stream")],
                    stream.as_bytes(),
                )
                .await
            } else {
                respond(&mut conn, status, &[], body.as_bytes()).await
            }
        }
    })
    .await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let out_s = out.display().to_string();
    let key_file = scratch.key_file();
    let args = [
        "--server",
        &server.url,
        "--environment",
        "prod",
        "--user-key-file",
        &key_file,
        "--output-dir",
        &out_s,
        "--max-retries",
        "0",
        "--retry-initial-delay",
        "10ms",
        "--reconnect-initial-delay",
        "10ms",
        "--reconnect-max-delay",
        "50ms",
    ];
    let agent = AgentProc::start(&logs, &args).await;
    // Every /status document served while the answers go round, twice.
    let mut statuses = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while served.load(Ordering::SeqCst) < 2 * answers.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out: {} answers served",
            served.load(Ordering::SeqCst)
        );
        statuses.push_str(&agent.get("/status").await.1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = agent.status().await;
    assert!(
        status["sync"]["failed"].as_u64().unwrap_or(0) > 0
            && status["stream"]["errors"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    let (code, _) = agent.terminate().await;
    assert_eq!(code, 0);
    assert!(
        !statuses.contains(CANARY) && !statuses.contains("forged"),
        "/status echoed server text: {statuses}"
    );
    logs.assert_free_of(&[CANARY, USER_KEY]);
    assert!(!logs.text().contains('\u{1b}'), "{}", logs.text());
}

/// Writes `total` bytes of a list that never closes (chunked, or with `content-length` announcing
/// it), counting in `written` how many the peer accepted before it hung up.
async fn endless_list(conn: &mut TcpStream, total: u64, announce: bool, written: &AtomicU64) {
    let framing = if announce {
        format!("content-length: {total}")
    } else {
        "transfer-encoding: chunked".to_owned()
    };
    let open = if announce { "[" } else { "1\r\n[\r\n" };
    let head =
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{framing}\r\n\r\n{open}");
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let entry = r#"{"id":1,"key":"k","category":null,"environment":"prod","value":"vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv"},"#;
    let block = entry.repeat(64 * 1024 / entry.len());
    let mut sent = 0u64;
    while sent < total {
        let piece = if announce {
            block.clone().into_bytes()
        } else {
            format!("{:x}\r\n{block}\r\n", block.len()).into_bytes()
        };
        if conn.write_all(&piece).await.is_err() {
            return;
        }
        sent += block.len() as u64;
        written.store(sent, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn an_oversized_list_is_cut_at_max_response_size_and_files_stay() {
    const TOTAL: u64 = 256 << 20;
    let logs = Logs::default();
    // 0: a valid list, 1: an endless chunked list, 2: an endless list with a huge content-length.
    let mode = Arc::new(AtomicUsize::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let (mode2, written2) = (mode.clone(), written.clone());
    let server = FakeServer::start("127.0.0.1:0", move |_, mut conn| {
        let mode = mode2.load(Ordering::SeqCst);
        let written = written2.clone();
        async move {
            match mode {
                0 => list_answer(&mut conn).await,
                m => endless_list(&mut conn, TOTAL, m == 2, &written).await,
            }
        }
    })
    .await;
    let scratch = Scratch::new();
    let args = once_args(&server.url, &scratch, &["--max-response-size", "1Mi"]);
    let r = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let before = tree(&scratch.path("out"));
    assert!(before.contains_key("db.url"), "{before:?}");

    for m in [1, 2] {
        mode.store(m, Ordering::SeqCst);
        written.store(0, Ordering::SeqCst);
        let r = run_agent(&logs, &strs(&args), &[]).await;
        assert_eq!(r.code, 3, "mode {m}: {r:?}");
        assert!(
            r.stderr.contains("--max-response-size") && r.stderr.contains("1048576 bytes"),
            "mode {m}: the error names the flag and the limit: {}",
            r.stderr
        );
        // The server could write the cap plus what the loopback socket buffers hold, no more.
        let w = written.load(Ordering::SeqCst);
        assert!(
            w < 32 << 20,
            "mode {m}: the agent read {w} bytes of a {TOTAL}-byte answer"
        );
        assert_eq!(
            tree(&scratch.path("out")),
            before,
            "mode {m}: files changed"
        );
    }
    logs.assert_free_of(&[USER_KEY, API_KEY, TOKEN]);
}

#[tokio::test]
async fn an_endless_event_is_dropped_and_the_stream_reconnects() {
    let logs = Logs::default();
    let subscribes = Arc::new(AtomicUsize::new(0));
    let first_written = Arc::new(AtomicU64::new(0));
    let (subscribes2, first2) = (subscribes.clone(), first_written.clone());
    let server = FakeServer::start("127.0.0.1:0", move |seen, mut conn| {
        let subscribes = subscribes2.clone();
        let first = first2.clone();
        async move {
            if seen.path() != "/sse/subscribe" {
                return list_answer(&mut conn).await;
            }
            let n = subscribes.fetch_add(1, Ordering::SeqCst);
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n\
                        event: connected\r\ndata: {\"subscription_id\": \"abc\"}\r\n\r\nevent: updated\r\n";
            if conn.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            // 1 MB data lines, never a blank line: one event growing without end (up to 256 MB).
            let line = format!("data: {}\r\n", "x".repeat(1 << 20));
            for _ in 0..256 {
                if conn.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                if n == 0 {
                    first.fetch_add(line.len() as u64, Ordering::SeqCst);
                }
            }
            // Then hold the connection open: only the agent can end it.
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
    })
    .await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        &["--max-response-size", "2Mi", "--stream-read-timeout", "5m"],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    wait_for(
        "a second subscription after the oversized event",
        Duration::from_secs(30),
        || async { subscribes.load(Ordering::SeqCst) >= 2 },
    )
    .await;
    let w = first_written.load(Ordering::SeqCst);
    assert!(
        w < 64 << 20,
        "the agent accepted {w} bytes of one event before hanging up"
    );
    let status = agent.status().await;
    assert!(
        status["stream"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("--max-response-size")),
        "{status}"
    );
    let (code, _) = agent.terminate().await;
    assert_eq!(code, 0);
    logs.assert_free_of(&[USER_KEY]);
}

/// Runs `--once` against `dev` with `env`; returns what the proxy saw during the run.
async fn once_via(
    logs: &Logs,
    dev: &DevServer,
    proxy: &FakeServer,
    env: &[(&str, &str)],
) -> Vec<Seen> {
    let before = proxy.seen().len();
    let scratch = Scratch::new();
    let out = scratch.path("out").display().to_string();
    let args = [
        "--once",
        "--server",
        &dev.url,
        "--environment",
        "prod",
        "--user-key-file",
        &scratch.key_file(),
        "--output-dir",
        &out,
    ];
    let r = run_agent(logs, &args, env).await;
    assert_eq!(r.code, 0, "{env:?}: {r:?}");
    assert!(scratch.path("out").join("db.url").exists(), "{env:?}");
    proxy.seen()[before..].to_vec()
}

#[tokio::test]
async fn proxy_variables_are_read_as_curl_reads_them() {
    let logs = Logs::default();
    let dev = DevServer::start(&logs, &[]).await;
    dev.api()
        .create("prod", "db.url", serde_json::json!("postgres://db"))
        .await;
    let proxy = FakeServer::proxy("127.0.0.1:0").await;
    let p = proxy.url.as_str();

    // Through the proxy: the request line is in absolute form, for the server.
    for var in ["http_proxy", "ALL_PROXY", "all_proxy"] {
        let seen = once_via(&logs, &dev, &proxy, &[(var, p)]).await;
        assert!(
            seen.iter()
                .any(|s| s.target().starts_with(&format!("{}/configs?", dev.url))),
            "{var}: the proxy saw {seen:?}"
        );
    }
    // Not through it: NO_PROXY matches the IP server (`*`, a CIDR block, the address), lower case
    // first; HTTP_PROXY in upper case is ignored (as curl does).
    let bypass: [&[(&str, &str)]; 6] = [
        &[("http_proxy", p), ("NO_PROXY", "*")],
        &[("http_proxy", p), ("NO_PROXY", "127.0.0.0/8")],
        &[("http_proxy", p), ("NO_PROXY", "127.0.0.1")],
        &[("ALL_PROXY", p), ("no_proxy", "example.com, 127.0.0.1")],
        &[
            ("ALL_PROXY", p),
            ("no_proxy", "*"),
            ("NO_PROXY", "example.com"),
        ],
        &[("HTTP_PROXY", p)],
    ];
    for env in bypass {
        let seen = once_via(&logs, &dev, &proxy, env).await;
        assert!(seen.is_empty(), "{env:?}: the proxy saw {seen:?}");
    }
    // An unusable proxy is a configuration error naming the variable, not silently skipped.
    let scratch = Scratch::new();
    let out = scratch.path("out").display().to_string();
    let secret_proxy = "socks5://user:proxy-password@127.0.0.1:1";
    let r = run_agent(
        &logs,
        &[
            "--once",
            "--server",
            &dev.url,
            "--environment",
            "prod",
            "--user-key-file",
            &scratch.key_file(),
            "--output-dir",
            &out,
        ],
        &[("all_proxy", secret_proxy)],
    )
    .await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("$all_proxy"), "{}", r.stderr);
    logs.assert_free_of(&["proxy-password"]);
}

#[tokio::test]
async fn the_event_stream_follows_the_same_proxy_rules() {
    let logs = Logs::default();
    let dev = DevServer::start(&logs, &[]).await;
    dev.api()
        .create("prod", "db.url", serde_json::json!("postgres://db"))
        .await;
    let proxy = FakeServer::proxy("127.0.0.1:0").await;
    let p = proxy.url.clone();

    for (no_proxy, through) in [(None, true), (Some("*"), false)] {
        let scratch = Scratch::new();
        let out = scratch.path("out");
        let args = live_args(&dev.url, &scratch, &out, &[]);
        let mut env = vec![("http_proxy", p.as_str())];
        env.extend(no_proxy.map(|n| ("NO_PROXY", n)));
        let before = proxy.seen().len();
        let agent = AgentProc::start_with_env(&logs, &strs(&args), &env).await;
        agent.wait_ready().await;
        wait_for(
            "the event stream connected",
            Duration::from_secs(30),
            || async { agent.status().await["stream"]["connected"] == true },
        )
        .await;
        let seen: Vec<String> = proxy.seen()[before..]
            .iter()
            .map(|s| s.path().to_owned())
            .collect();
        if through {
            assert!(
                seen.iter().any(|p| p == "/sse/subscribe") && seen.iter().any(|p| p == "/configs"),
                "the proxy saw {seen:?}"
            );
        } else {
            assert!(seen.is_empty(), "NO_PROXY=*: the proxy saw {seen:?}");
        }
        let (code, _) = agent.terminate().await;
        assert_eq!(code, 0);
    }
}

/// Each request carries the credentials its route needs and no more: the change detector's metadata
/// polls (`GET /cluster/configs`, no key derivation upstream) and the event stream get the API key and
/// the token, never the user key; only `GET /configs` gets the user key.
#[tokio::test]
async fn metadata_polls_and_the_stream_never_carry_the_user_key() {
    let logs = Logs::default();
    let server = FakeServer::start("127.0.0.1:0", |seen, mut conn| async move {
        match seen.path() {
            "/cluster/configs" => {
                let meta = r#"[{"key":"db.url","category":"database","environment":"prod","created_at":"2026-12-03T10:00:00.000000","updated_at":"2026-12-03T10:00:00.000000"}]"#;
                respond(
                    &mut conn,
                    200,
                    &[("content-type", "application/json")],
                    meta.as_bytes(),
                )
                .await
            }
            // No stream here: the detector is what notices changes.
            "/sse/subscribe" => respond(&mut conn, 503, &[], b"").await,
            _ => list_answer(&mut conn).await,
        }
    })
    .await;
    let scratch = Scratch::new();
    scratch.write("api-key", API_KEY);
    scratch.write("token", TOKEN);
    let out = scratch.path("out");
    let api_key = scratch.path("api-key").display().to_string();
    let token = scratch.path("token").display().to_string();
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        &[
            "--api-key-file",
            &api_key,
            "--token-file",
            &token,
            "--change-poll-interval",
            "200ms",
        ],
    );
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    wait_for(
        "three metadata polls and two stream attempts",
        Duration::from_secs(30),
        || async { server.count("/cluster/configs") >= 3 && server.count("/sse/subscribe") >= 2 },
    )
    .await;
    let (code, _) = agent.terminate().await;
    assert_eq!(code, 0);
    let seen = server.seen();
    assert!(seen.iter().any(|s| s.path() == "/configs"), "{seen:?}");
    for s in &seen {
        assert_eq!(s.header("x-api-key"), Some(API_KEY), "{}", s.line);
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{}",
            s.line
        );
        let user_key = s.header("x-user-key");
        if s.path() == "/configs" {
            assert_eq!(user_key, Some(USER_KEY), "{}", s.line);
        } else {
            assert_eq!(user_key, None, "the user key went to {}", s.line);
        }
    }
    logs.assert_free_of(&[USER_KEY, API_KEY, TOKEN]);
}
