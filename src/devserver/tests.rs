//! In-process tests of the dev server over real HTTP/1.1 (raw `TcpStream`s, so that the exact
//! bytes, the chunked framing and the way a stream ends can be checked).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::*;

const DEADLINE: Duration = Duration::from_secs(20);
const ALICE: &str = "alice-user-key";
const BOB: &str = "bob-user-key-2";

fn quiet_args() -> DevServerArgs {
    DevServerArgs {
        // Long enough that no ping or keep-alive lands in the middle of an exact-bytes check.
        ping_interval: Duration::from_secs(3600),
        keepalive_after: Duration::from_secs(3600),
        ..DevServerArgs::for_demo()
    }
}

async fn start(args: DevServerArgs) -> DevServer {
    timeout(DEADLINE, spawn(args))
        .await
        .expect("spawn in time")
        .expect("dev-server starts")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked body: the complete chunks so far, and whether the last chunk was seen.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(raw, b"\r\n") else {
            return (out, false);
        };
        let size_line = std::str::from_utf8(&raw[..eol]).expect("chunk size line");
        let size = usize::from_str_radix(size_line.trim(), 16).expect("hex chunk size");
        let start = eol + 2;
        if size == 0 {
            return (out, raw[start..].starts_with(b"\r\n"));
        }
        if raw.len() < start + size + 2 {
            return (out, false);
        }
        out.extend_from_slice(&raw[start..start + size]);
        assert_eq!(
            &raw[start + size..start + size + 2],
            b"\r\n",
            "chunk framing"
        );
        raw = &raw[start + size + 2..];
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
async fn call(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = timeout(DEADLINE, exchange)
        .await
        .expect("reply in time")
        .expect("HTTP exchange");
    let split = find(&raw, b"\r\n\r\n").expect("end of head");
    let head = String::from_utf8(raw[..split].to_vec()).expect("ASCII head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let payload = &raw[split + 4..];
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload).0
    } else {
        payload.to_vec()
    };
    Reply {
        status,
        head,
        body: String::from_utf8(body).expect("UTF-8 body"),
    }
}

fn user(key: &str) -> [(&str, &str); 1] {
    [("X-User-Key", key)]
}

async fn create(addr: SocketAddr, key: &str, body: Value) -> Reply {
    let reply = call(
        addr,
        "POST",
        "/configs",
        &user(key),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply
}

async fn put(addr: SocketAddr, target: &str, body: Value) -> Reply {
    let reply = call(addr, "PUT", target, &user(ALICE), Some(&body.to_string())).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply
}

async fn set_faults(addr: SocketAddr, body: Value) -> Value {
    let reply = call(addr, "POST", "/_dev/faults", &[], Some(&body.to_string())).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// How a stream ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// Terminating chunk seen: a clean end of body.
    Clean,
    /// The connection ended without the terminating chunk.
    Broken,
}

/// A raw SSE subscription; reads the chunked body incrementally.
struct Sse {
    tcp: TcpStream,
    raw: Vec<u8>,
    body_start: usize,
    consumed: usize,
}

impl Sse {
    async fn open(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Self {
        let mut request = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nConnection: close\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let mut tcp = timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut sse = Self {
            tcp,
            raw: Vec::new(),
            body_start: 0,
            consumed: 0,
        };
        timeout(DEADLINE, async {
            while find(&sse.raw, b"\r\n\r\n").is_none() {
                assert!(
                    sse.read_more().await,
                    "connection closed before the response head"
                );
            }
        })
        .await
        .expect("response head in time");
        sse.body_start = find(&sse.raw, b"\r\n\r\n").unwrap_or_default() + 4;
        sse
    }

    fn head(&self) -> String {
        String::from_utf8_lossy(&self.raw[..self.body_start]).into_owned()
    }

    fn body(&self) -> (Vec<u8>, bool) {
        dechunk(&self.raw[self.body_start..])
    }

    /// Reads more bytes; false at end of connection (EOF or error).
    async fn read_more(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        match self.tcp.read(&mut buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
        }
    }

    /// The next complete SSE message (event or comment, up to the blank line), as text.
    async fn next_message(&mut self) -> String {
        timeout(DEADLINE, async {
            loop {
                let (body, _) = self.body();
                if let Some(end) = find(&body[self.consumed..], b"\r\n\r\n") {
                    let message = &body[self.consumed..self.consumed + end + 4];
                    self.consumed += end + 4;
                    return String::from_utf8(message.to_vec()).expect("UTF-8 message");
                }
                assert!(
                    self.read_more().await,
                    "stream ended while waiting for a message"
                );
            }
        })
        .await
        .expect("SSE message in time")
    }

    /// The next `event:` message (comments skipped).
    async fn next_event(&mut self) -> String {
        loop {
            let message = self.next_message().await;
            if !message.starts_with(':') {
                return message;
            }
        }
    }

    /// Reads until the connection ends and tells how.
    async fn ending(&mut self) -> Ending {
        timeout(DEADLINE, async { while self.read_more().await {} })
            .await
            .expect("stream ends in time");
        if self.body().1 {
            Ending::Clean
        } else {
            Ending::Broken
        }
    }
}

/// The `data:` JSON of an event message.
fn event_data(message: &str) -> Value {
    let data = message
        .split("\r\n")
        .find_map(|line| line.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line in {message:?}"));
    serde_json::from_str(data).unwrap()
}

/// Replaces the string value of `name` (`"name": "…"` or `"name":"…"`) with `<T>`.
fn mask(text: &str, name: &str) -> String {
    let start = [format!("\"{name}\": \""), format!("\"{name}\":\"")]
        .iter()
        .find_map(|marker| text.find(marker.as_str()).map(|i| i + marker.len()));
    let Some(start) = start else {
        return text.to_owned();
    };
    let end = start + text[start..].find('"').unwrap_or(0);
    format!("{}<T>{}", &text[..start], &text[end..])
}

#[tokio::test]
async fn sse_wire_bytes_for_connected_and_change_events() {
    let server = start(quiet_args()).await;
    let addr = server.addr();
    let mut sse = Sse::open(addr, "/sse/subscribe?environment=prod", &[]).await;
    let head = sse.head().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    for wanted in [
        "content-type: text/event-stream; charset=utf-8\r\n",
        "cache-control: no-store\r\n",
        "x-accel-buffering: no\r\n",
        "transfer-encoding: chunked\r\n",
    ] {
        assert!(head.contains(wanted), "missing {wanted:?} in {head}");
    }

    let connected = sse.next_message().await;
    let data = event_data(&connected);
    let id = data["subscription_id"].as_str().unwrap();
    assert_eq!((id.len(), &id[14..15]), (36, "4"), "{id}");
    assert_eq!(
        mask(&mask(&connected, "subscription_id"), "server_time"),
        "event: connected\r\ndata: {\"subscription_id\": \"<T>\", \"filters\": {\"key\": null, \"environment\": \"prod\", \"category\": null}, \"server_time\": \"<T>\"}\r\n\r\n"
    );
    let server_time = data["server_time"].as_str().unwrap();
    assert!(server_time.len() >= 19 && !server_time.ends_with('Z') && !server_time.contains('+'));

    let reply = create(
        addr,
        ALICE,
        json!({"key": "db.url", "value": {"host": "db.intérnal", "port": 5432}, "environment": "prod", "category": "database"}),
    )
    .await;
    assert!(
        reply
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    assert_eq!(
        mask(&mask(&reply.body, "created_at"), "updated_at"),
        r#"{"id":1,"key":"db.url","category":"database","environment":"prod","value":{"host":"db.intérnal","port":5432},"created_at":"<T>","updated_at":"<T>"}"#
    );
    // Writes elsewhere are filtered out by environment.
    create(
        addr,
        ALICE,
        json!({"key": "other", "value": 1, "environment": "staging"}),
    )
    .await;

    let created = sse.next_event().await;
    assert_eq!(
        mask(&created, "timestamp"),
        "event: created\r\ndata: {\"key\": \"db.url\", \"environment\": \"prod\", \"category\": \"database\", \"timestamp\": \"<T>\", \"node_id\": null, \"data\": {\"value\": {\"host\": \"db.int\\u00e9rnal\", \"port\": 5432}}}\r\n\r\n"
    );

    // PUT without category: the event says null, the entry keeps its category.
    put(
        addr,
        "/configs/db.url?environment=prod",
        json!({"value": "v2"}),
    )
    .await;
    let updated = sse.next_event().await;
    assert_eq!(
        mask(&updated, "timestamp"),
        "event: updated\r\ndata: {\"key\": \"db.url\", \"environment\": \"prod\", \"category\": null, \"timestamp\": \"<T>\", \"node_id\": null, \"data\": {\"value\": \"v2\"}}\r\n\r\n"
    );
    let got = call(
        addr,
        "GET",
        "/configs/db.url?environment=prod",
        &user(ALICE),
        None,
    )
    .await;
    assert_eq!(
        got.body,
        r#"{"id":1,"key":"db.url","category":"database","environment":"prod","value":"v2"}"#
    );

    let deleted = call(
        addr,
        "DELETE",
        "/configs/db.url?environment=prod",
        &user(ALICE),
        None,
    )
    .await;
    assert_eq!(
        deleted.body,
        r#"{"message":"Configuration 'db.url' deleted successfully"}"#
    );
    let event = sse.next_event().await;
    assert_eq!(
        mask(&event, "timestamp"),
        "event: deleted\r\ndata: {\"key\": \"db.url\", \"environment\": \"prod\", \"category\": null, \"timestamp\": \"<T>\", \"node_id\": null, \"data\": null}\r\n\r\n"
    );
    // Recreated: a new id.
    let again = create(
        addr,
        ALICE,
        json!({"key": "db.url", "value": 1, "environment": "prod"}),
    )
    .await;
    assert_eq!(again.json()["id"], 3);

    let (body, _) = sse.body();
    let text = String::from_utf8(body).unwrap();
    assert!(!text.contains("\nid:") && !text.contains("\nretry:"));
    assert!(
        !text.replace("\r\n", "").contains('\n'),
        "every line ends with CRLF"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn pings_and_keepalives() {
    let server = start(DevServerArgs {
        ping_interval: Duration::from_millis(150),
        keepalive_after: Duration::from_millis(250),
        ..DevServerArgs::for_demo()
    })
    .await;
    let mut sse = Sse::open(server.addr(), "/sse/subscribe", &[]).await;
    assert!(sse.next_message().await.starts_with("event: connected\r\n"));
    let (mut ping, mut keepalive) = (None, None);
    while ping.is_none() || keepalive.is_none() {
        let message = sse.next_message().await;
        if message.starts_with(": ping - ") {
            ping = Some(message);
        } else if message.starts_with(": keep-alive ") {
            keepalive = Some(message);
        }
    }
    // `: ping - 2026-11-23 05:00:46.068931+00:00` and `: keep-alive 2026-11-23T05:01:16.693693`.
    let ping = ping.unwrap_or_default();
    assert!(
        ping.ends_with("+00:00\r\n\r\n") && ping.as_bytes()[19] == b' ',
        "{ping:?}"
    );
    let keepalive = keepalive.unwrap_or_default();
    assert!(
        keepalive.ends_with("\r\n\r\n") && keepalive.as_bytes()[23] == b'T',
        "{keepalive:?}"
    );
    assert!(
        !keepalive.contains('+') && !keepalive.contains('Z'),
        "{keepalive:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_user_key_is_a_500_for_reads_and_writes() {
    let server = start(quiet_args()).await;
    let addr = server.addr();
    create(
        addr,
        ALICE,
        json!({"key": "a", "value": {"s": 1}, "environment": "prod"}),
    )
    .await;
    // Any key may create a new row.
    create(
        addr,
        BOB,
        json!({"key": "b", "value": [1], "environment": "dev"}),
    )
    .await;

    let internal = r#"{"detail":"Internal error: "}"#;
    for (method, target) in [
        ("GET", "/configs/a?environment=prod"),
        ("GET", "/configs"),
        ("GET", "/configs?environment=prod"),
        ("PUT", "/configs/a?environment=prod"),
        ("DELETE", "/configs/a?environment=prod"),
    ] {
        let body = (method == "PUT").then_some(r#"{"value": 2}"#);
        let reply = call(addr, method, target, &user(BOB), body).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (500, internal),
            "{method} {target}"
        );
    }
    let backup = call(
        addr,
        "POST",
        "/backup",
        &[("X-User-Key", BOB), ("X-Backup-Password", "pw")],
        None,
    )
    .await;
    assert_eq!((backup.status, backup.body.as_str()), (500, internal));

    // A selection with only Bob's rows works, and so does Alice on hers.
    let mine = call(
        addr,
        "GET",
        "/configs?environment=dev&mode=full",
        &user(BOB),
        None,
    )
    .await;
    assert_eq!(mine.status, 200);
    let rows = mine.json();
    assert_eq!(rows.as_array().map(Vec::len), Some(1));
    assert!(rows[0]["updated_at"].as_str().unwrap().ends_with('Z'));
    let alice = call(addr, "GET", "/configs?environment=prod", &user(ALICE), None).await;
    assert_eq!(
        alice.body,
        r#"[{"id":1,"key":"a","category":null,"environment":"prod","value":{"s":1}}]"#
    );
    server.shutdown().await;
}

#[tokio::test]
async fn auth_and_validation_errors() {
    let server = start(DevServerArgs {
        api_key: Some(Secret::new("the-api-key".into())),
        ..quiet_args()
    })
    .await;
    let addr = server.addr();
    let api = ("X-API-Key", "the-api-key");

    let keys = [api, ("X-User-Key", ALICE)];
    let not_found = r#"{"detail":"Configuration with key 'k' not found in environment 'prod'"}"#;
    let missing_api_key = r#"{"detail":"API key required but missing. Provide X-API-Key header."}"#;
    #[rustfmt::skip]
    let cases = [
        ("GET /configs", &[("X-User-Key", ALICE)][..], None, 403, missing_api_key),
        ("GET /configs", &[("X-API-Key", "nope"), ("X-User-Key", ALICE)], None, 403, r#"{"detail":"Invalid API key"}"#),
        ("GET /sse/subscribe", &[], None, 403, missing_api_key),
        ("GET /configs", &[api, ("X-User-Key", "short")], None, 401, r#"{"detail":"X-User-Key must be at least 8 characters long"}"#),
        ("GET /configs/k", &keys, None, 422, r#"{"detail":[{"type":"missing","loc":["query","environment"],"msg":"Field required","input":null}]}"#),
        ("GET /configs/k?environment=", &keys, None, 404, r#"{"detail":"environment is required"}"#),
        ("GET /configs/k?environment=prod", &keys, None, 404, not_found),
        ("PUT /configs/k?environment=prod", &keys, Some(r#"{"value": 1}"#), 404, not_found),
        ("DELETE /configs/k?environment=prod", &keys, None, 404, not_found),
        ("GET /configs", &keys, None, 200, "[]"),
        ("GET /health", &[], None, 200, r#"{"status":"healthy"}"#),
        ("GET /ready", &[], None, 200, r#"{"ready":true}"#),
        ("GET /sse/health", &[], None, 200, r#"{"status":"healthy","active_subscriptions":0,"total_events_sent":0}"#),
        ("GET /nowhere", &[], None, 404, r#"{"detail":"Not Found"}"#),
        ("PATCH /configs", &[], None, 405, r#"{"detail":"Method Not Allowed"}"#),
    ];
    for (request, headers, body, status, want) in cases {
        let (method, target) = request.split_once(' ').unwrap_or_default();
        let reply = call(addr, method, target, headers, body).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (status, want),
            "{request}"
        );
    }

    // Missing and empty user keys are 422 validation errors.
    for headers in [vec![api], vec![api, ("X-User-Key", "")]] {
        let reply = call(addr, "GET", "/configs", &headers, None).await;
        assert_eq!(reply.status, 422, "{}", reply.body);
        assert_eq!(
            reply.json()["detail"][0]["loc"],
            json!(["header", "x-user-key"])
        );
    }
    let with_keys = [api, ("X-User-Key", ALICE)];
    let post = |body: &'static str| call(addr, "POST", "/configs", &with_keys, Some(body));
    let float = post(r#"{"key": "k", "value": 1.5, "environment": "e"}"#).await;
    assert_eq!(float.status, 422);
    let members: Vec<Value> = float.json()["detail"]
        .as_array()
        .map(|items| items.iter().map(|i| i["loc"][2].clone()).collect())
        .unwrap_or_default();
    assert_eq!(
        members,
        json!(["dict[any,any]", "str", "int", "bool", "list[any]"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    );
    #[rustfmt::skip]
    let invalid = [
        r#"{"key": "k", "value": null, "environment": "e"}"#,
        r#"{"key": "", "value": 1, "environment": "e"}"#,
        r#"{"key": "k", "value": 1, "environment": "e", "category": 7}"#,
        r#"{"value": 1, "environment": "e"}"#,
        r#"[1]"#,
        "not json",
        "",
    ];
    for body in invalid {
        assert_eq!(post(body).await.status, 422, "{body}");
    }
    // An integral float is an integer for pydantic's lax `int`.
    let integral = post(r#"{"key": "n", "value": 2.0, "environment": "e"}"#).await;
    assert_eq!(
        (integral.status, &integral.json()["value"]),
        (201, &json!(2))
    );
    let bad_mode = call(addr, "GET", "/configs?mode=long", &with_keys, None).await;
    assert_eq!(bad_mode.status, 422);
    assert_eq!(
        post(r#"{"key": "k", "value": [1.5, null], "environment": "e"}"#)
            .await
            .status,
        201
    );
    let dup = post(r#"{"key": "k", "value": 2, "environment": "e"}"#).await;
    assert_eq!(
        (dup.status, dup.body.as_str()),
        (
            400,
            r#"{"detail":"Configuration with key 'k' already exists in environment 'e'"}"#
        )
    );
    // A key with '/' can be created but never reached again.
    assert_eq!(
        post(r#"{"key": "a/b", "value": 1, "environment": "e"}"#)
            .await
            .status,
        201
    );
    let slash = call(
        addr,
        "GET",
        "/configs/a%2Fb?environment=e",
        &with_keys,
        None,
    )
    .await;
    assert_eq!(
        (slash.status, slash.body.as_str()),
        (404, r#"{"detail":"Not Found"}"#)
    );
    let root = call(addr, "GET", "/", &[], None).await.json();
    assert_eq!(
        (&root["name"], &root["version"], &root["status"]),
        (
            &json!("OpenSecureConf API"),
            &json!("3.1.0"),
            &json!("operational")
        )
    );
    server.shutdown().await;
}

#[tokio::test]
async fn paused_queue_overflow_drops_the_newest_events() {
    let server = start(DevServerArgs {
        queue_size: 3,
        ..quiet_args()
    })
    .await;
    let addr = server.addr();
    let mut sse = Sse::open(addr, "/sse/subscribe?environment=prod&key=k", &[]).await;
    sse.next_message().await;
    let state = set_faults(addr, json!({"paused": true})).await;
    assert_eq!(
        state,
        json!({"drop_every": 0, "workers": 1, "queue_size": 3, "paused": true, "cluster_configs": true, "unavailable": false})
    );

    create(
        addr,
        ALICE,
        json!({"key": "k", "value": 0, "environment": "prod"}),
    )
    .await;
    for i in 1..20 {
        put(addr, "/configs/k?environment=prod", json!({"value": i})).await;
    }
    set_faults(addr, json!({"paused": false})).await;
    for want in 0..3 {
        assert_eq!(event_data(&sse.next_event().await)["data"]["value"], want);
    }
    // Events 3..19 are gone: the next one is the marker written now.
    put(
        addr,
        "/configs/k?environment=prod",
        json!({"value": "marker"}),
    )
    .await;
    assert_eq!(
        event_data(&sse.next_event().await)["data"]["value"],
        "marker"
    );
    let stats = call(addr, "GET", "/_dev/stats", &[], None).await.json();
    assert_eq!(
        stats,
        json!({
            "active_subscriptions": 1, "events_published": 21, "events_delivered": 4, "events_dropped": 17, "writes": 21,
            "requests": {"list": 0, "get": 0, "create": 1, "update": 20, "delete": 0, "backup": 0, "cluster_configs": 0, "subscribe": 1},
            "key_derivations": 0, "key_derivation_cpu_ms": 0.0,
        })
    );
    server.shutdown().await;
}

#[tokio::test]
async fn workers_partition_events_and_drop_every() {
    let server = start(DevServerArgs {
        workers: 2,
        ..quiet_args()
    })
    .await;
    let addr = server.addr();
    let mut a = Sse::open(addr, "/sse/subscribe", &[]).await;
    a.next_message().await;
    let mut b = Sse::open(addr, "/sse/subscribe", &[]).await;
    b.next_message().await;
    for i in 0..6 {
        create(
            addr,
            ALICE,
            json!({"key": format!("k{i}"), "value": i, "environment": "prod"}),
        )
        .await;
    }
    // Subscription 0 and writes 0, 2, 4 are on worker 0; subscription 1 and writes 1, 3, 5 on 1.
    for want in ["k0", "k2", "k4"] {
        assert_eq!(event_data(&a.next_event().await)["key"], want);
    }
    for want in ["k1", "k3", "k5"] {
        assert_eq!(event_data(&b.next_event().await)["key"], want);
    }

    // One worker again, and drop every 2nd event (the write counter is at 6: writes 7, 9 are lost).
    set_faults(addr, json!({"workers": 1, "drop_every": 2})).await;
    for i in 6..10 {
        create(
            addr,
            ALICE,
            json!({"key": format!("k{i}"), "value": i, "environment": "prod"}),
        )
        .await;
    }
    for want in ["k6", "k8"] {
        assert_eq!(event_data(&a.next_event().await)["key"], want);
        assert_eq!(event_data(&b.next_event().await)["key"], want);
    }
    let bad = call(addr, "POST", "/_dev/faults", &[], Some(r#"{"workers": 0}"#)).await;
    assert_eq!(bad.status, 422);
    let unknown = call(addr, "POST", "/_dev/faults", &[], Some(r#"{"wrokers": 2}"#)).await;
    assert_eq!(unknown.status, 422);
    server.shutdown().await;
}

#[tokio::test]
async fn cut_breaks_streams_and_close_ends_them_cleanly() {
    let server = start(quiet_args()).await;
    let addr = server.addr();

    let mut cut = Sse::open(addr, "/sse/subscribe", &[]).await;
    cut.next_message().await;
    let reply = call(addr, "POST", "/_dev/streams/cut", &[], None).await;
    assert_eq!(reply.json(), json!({"cut": 1}));
    assert_eq!(cut.ending().await, Ending::Broken);

    let mut closed = Sse::open(addr, "/sse/subscribe", &[]).await;
    closed.next_message().await;
    let reply = call(addr, "POST", "/_dev/streams/close", &[], None).await;
    assert_eq!(reply.json(), json!({"closed": 1}));
    assert_eq!(closed.ending().await, Ending::Clean);

    let health = call(addr, "GET", "/sse/health", &[], None).await.json();
    assert_eq!(health["active_subscriptions"], 0);

    // Shutdown ends open streams cleanly and does not hang on them.
    let mut open = Sse::open(addr, "/sse/subscribe", &[]).await;
    open.next_message().await;
    timeout(DEADLINE, server.shutdown())
        .await
        .expect("prompt shutdown");
    assert_eq!(open.ending().await, Ending::Clean);
}

#[tokio::test]
async fn unavailable_answers_503_closes_streams_and_comes_back() {
    let server = start(quiet_args()).await;
    let addr = server.addr();
    create(
        addr,
        ALICE,
        json!({"key": "k", "value": 1, "environment": "prod"}),
    )
    .await;
    let mut open = Sse::open(addr, "/sse/subscribe?environment=prod", &[]).await;
    open.next_message().await;

    let state = set_faults(addr, json!({"unavailable": true})).await;
    assert_eq!(state["unavailable"], true);
    assert_eq!(open.ending().await, Ending::Clean);
    let keys = user(ALICE);
    for (method, target) in [
        ("GET", "/configs/k?environment=prod"),
        ("GET", "/configs?environment=prod"),
        ("GET", "/cluster/configs?environment=prod"),
        ("GET", "/sse/subscribe?environment=prod"),
        ("GET", "/health"),
    ] {
        let reply = call(addr, method, target, &keys, None).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (503, r#"{"detail":"Service Unavailable"}"#),
            "{method} {target}"
        );
    }
    // The controls still answer, and the store kept its entries.
    assert_eq!(
        call(addr, "GET", "/_dev/stats", &[], None).await.status,
        200
    );
    set_faults(addr, json!({"unavailable": false})).await;
    let back = call(addr, "GET", "/configs/k?environment=prod", &keys, None).await;
    assert_eq!(back.status, 200, "{}", back.body);
    assert_eq!(back.json()["value"], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn seeds_with_a_generated_key_and_a_data_file() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream/upstream-list-all.json");
    assert!(fixture.exists(), "fixture {} is missing", fixture.display());
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("dev-data.json");
    let args = DevServerArgs {
        seed: Some(fixture.clone()),
        seed_user_key: Some(Secret::new("seed-user-key-1".into())),
        data_file: Some(data_file.clone()),
        ..quiet_args()
    };

    let server = start(args.clone()).await;
    assert_eq!(server.seed_user_key(), Some("seed-user-key-1"));
    let listed = call(
        server.addr(),
        "GET",
        "/configs",
        &user("seed-user-key-1"),
        None,
    )
    .await;
    let want: Vec<Value> =
        serde_json::from_str::<Vec<Value>>(&std::fs::read_to_string(&fixture).unwrap())
            .unwrap()
            .into_iter()
            .map(|mut e| {
                let map = e.as_object_mut().unwrap();
                map.remove("created_at");
                map.remove("updated_at");
                e
            })
            .collect();
    assert_eq!(listed.json(), Value::Array(want));
    create(
        server.addr(),
        "seed-user-key-1",
        json!({"key": "new", "value": "x", "environment": "dev"}),
    )
    .await;
    server.shutdown().await;

    // Restart on the same data file: seeds are not duplicated, the write survived.
    let server = start(args).await;
    let listed = call(
        server.addr(),
        "GET",
        "/configs",
        &user("seed-user-key-1"),
        None,
    )
    .await;
    assert_eq!(listed.json().as_array().map(Vec::len), Some(7));
    server.shutdown().await;
    let saved = std::fs::read_to_string(&data_file).unwrap();
    assert!(!saved.contains("seed-user-key-1"));

    // Without a seed key, one is generated.
    let server = start(DevServerArgs {
        seed: Some(fixture),
        ..quiet_args()
    })
    .await;
    let key = server
        .seed_user_key()
        .map(str::to_owned)
        .unwrap_or_default();
    assert_eq!(key.len(), 24);
    let listed = call(
        server.addr(),
        "GET",
        "/configs?environment=staging",
        &user(&key),
        None,
    )
    .await;
    assert_eq!(listed.json().as_array().map(Vec::len), Some(2));
    server.shutdown().await;
}

#[tokio::test]
async fn startup_errors_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let bad_seed = dir.path().join("seed.json");
    std::fs::write(&bad_seed, r#"[{"key": "k", "value": 1}]"#).unwrap();
    let err = spawn(DevServerArgs {
        seed: Some(bad_seed.clone()),
        ..quiet_args()
    })
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "--seed {}: entry 1: k: missing \"environment\"",
            bad_seed.display()
        )
    );

    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "short\n").unwrap();
    let err = spawn(DevServerArgs {
        seed_user_key_file: Some(key_file.clone()),
        ..quiet_args()
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("--seed-user-key-file {}: ", key_file.display())),
        "{err}"
    );

    let err = spawn(DevServerArgs {
        api_key_file: Some(dir.path().join("missing")),
        ..quiet_args()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().starts_with("--api-key-file "), "{err}");

    let taken = start(quiet_args()).await;
    let err = spawn(DevServerArgs {
        listen: taken.addr(),
        ..quiet_args()
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("--listen {}: ", taken.addr())),
        "{err}"
    );
    taken.shutdown().await;
}

#[tokio::test]
async fn backup_decrypts_with_the_backup_module() {
    let server = start(quiet_args()).await;
    let addr = server.addr();
    create(addr, ALICE, json!({"key": "db", "value": {"password": "s3cret"}, "environment": "prod", "category": "database"})).await;
    create(
        addr,
        ALICE,
        json!({"key": "greeting", "value": "café ☃", "environment": "staging"}),
    )
    .await;

    let missing = call(addr, "POST", "/backup", &user(ALICE), None).await;
    assert_eq!(missing.status, 422);
    let reply = call(
        addr,
        "POST",
        "/backup?environment=prod",
        &[("X-User-Key", ALICE), ("X-Backup-Password", "backup-pw")],
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let response = reply.json();
    let fields: Vec<&str> = response
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        ["backup_data", "total_keys", "backup_timestamp", "backup_id"]
    );
    assert_eq!(response["total_keys"], 1);

    let backup = crate::backup::decrypt(reply.body.as_bytes(), b"backup-pw").unwrap();
    assert_eq!(backup.version, "2.2.0");
    assert_eq!(backup.backup_id, response["backup_id"]);
    assert_eq!(backup.configurations.len(), 1);
    let entry = &backup.configurations[0];
    assert_eq!(
        (
            entry.id,
            entry.key.as_str(),
            entry.category.as_deref(),
            &entry.value
        ),
        (1, "db", Some("database"), &json!({"password": "s3cret"}))
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// GET /cluster/configs, --workers fidelity, request counters and the key-derivation cost

async fn stats(addr: SocketAddr) -> Value {
    let reply = call(addr, "GET", "/_dev/stats", &[], None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// `GET /cluster/configs…` answered 200; its rows.
async fn cluster(addr: SocketAddr, target: &str) -> Vec<Value> {
    let reply = call(addr, "GET", target, &[], None).await;
    assert_eq!(reply.status, 200, "{target}: {}", reply.body);
    match reply.json() {
        Value::Array(rows) => rows,
        other => panic!("{target}: not an array: {other}"),
    }
}

/// The one row of `key` in `environment` (`None` when absent).
async fn cluster_row(addr: SocketAddr, environment: &str, key: &str) -> Option<Value> {
    let rows = cluster(addr, &format!("/cluster/configs?environment={environment}")).await;
    let mut matching = rows.into_iter().filter(|r| r["key"] == key);
    let row = matching.next();
    assert!(matching.next().is_none(), "one row per key");
    row
}

#[tokio::test]
async fn cluster_configs_exact_bytes_filters_and_no_values() {
    // A data file with the protocol document's example rows (fixed timestamps), plus a row in
    // another environment sealed under another user key (metadata is read without decrypting).
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("dev-data.json");
    let data = json!({
        "format": "osc-agent-dev-server-data/1",
        "warning": "test",
        "fingerprint_salt": "00".repeat(32),
        "next_id": 4,
        "entries": [
            {"id": 1, "key": "db.url", "category": "database", "environment": "prod",
             "value": {"host": "db.internal", "port": 5432},
             "created_at": "2026-11-30T17:22:26.925663Z", "updated_at": "2026-11-30T17:22:26.925663Z",
             "sealed_by": "aa"},
            {"id": 2, "key": "log.level", "category": null, "environment": "prod",
             "value": "secret-log-value",
             "created_at": "2026-11-30T17:22:27.072824Z", "updated_at": "2026-11-30T17:22:28.408341Z",
             "sealed_by": "aa"},
            {"id": 3, "key": "grüße \"q\"", "category": "café", "environment": "staging",
             "value": "secret-staging-value",
             "created_at": "2026-12-01T00:00:00Z", "updated_at": "2026-12-01T00:00:00.000001Z",
             "sealed_by": "bb"},
        ],
    });
    std::fs::write(&data_file, data.to_string()).unwrap();
    let server = start(DevServerArgs {
        data_file: Some(data_file),
        ..quiet_args()
    })
    .await;
    let addr = server.addr();

    let doc_example = r#"[{"key":"db.url","category":"database","environment":"prod","created_at":"2026-11-30 17:22:26.925663","updated_at":"2026-11-30 17:22:26.925663"},{"key":"log.level","category":null,"environment":"prod","created_at":"2026-11-30 17:22:27.072824","updated_at":"2026-11-30 17:22:28.408341"}]"#;
    let reply = call(addr, "GET", "/cluster/configs?environment=prod", &[], None).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, doc_example));
    let head = reply.head.to_ascii_lowercase();
    assert!(
        head.contains("content-type: application/json\r\n")
            && head.contains(&format!("content-length: {}\r\n", doc_example.len())),
        "{head}"
    );
    // A user key changes nothing (and is not needed).
    let with_key = call(
        addr,
        "GET",
        "/cluster/configs?environment=prod",
        &user(BOB),
        None,
    )
    .await;
    assert_eq!(with_key.body, doc_example);

    let staging = r#"[{"key":"grüße \"q\"","category":"café","environment":"staging","created_at":"2026-12-01 00:00:00.000000","updated_at":"2026-12-01 00:00:00.000001"}]"#;
    let reply = call(
        addr,
        "GET",
        "/cluster/configs?environment=staging",
        &[],
        None,
    )
    .await;
    assert_eq!(reply.body, staging);

    let keys = |rows: Vec<Value>| -> Vec<String> {
        rows.iter()
            .map(|r| r["key"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let all = ["db.url", "log.level", "grüße \"q\""];
    assert_eq!(keys(cluster(addr, "/cluster/configs").await), all);
    assert_eq!(
        keys(cluster(addr, "/cluster/configs?environment=").await),
        all
    );
    assert!(
        cluster(addr, "/cluster/configs?environment=nowhere")
            .await
            .is_empty()
    );
    assert_eq!(
        keys(cluster(addr, "/cluster/configs?category=database").await),
        ["db.url"]
    );
    assert_eq!(
        keys(
            cluster(
                addr,
                "/cluster/configs?environment=staging&category=caf%C3%A9"
            )
            .await
        ),
        ["grüße \"q\""]
    );
    assert!(
        cluster(
            addr,
            "/cluster/configs?environment=staging&category=database"
        )
        .await
        .is_empty()
    );
    let everything = call(addr, "GET", "/cluster/configs", &[], None).await.body;
    for value in [
        "db.internal",
        "secret-log-value",
        "secret-staging-value",
        "value",
    ] {
        assert!(!everything.contains(value), "{value} leaked: {everything}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn cluster_configs_timestamps_follow_writes() {
    let server = start(quiet_args()).await;
    let addr = server.addr();
    let sqlite = |rest: &Value| -> String {
        let text = rest.as_str().unwrap_or_default();
        assert!(
            text.len() == 27 && text.as_bytes()[10] == b'T' && text.ends_with('Z'),
            "REST format {text}"
        );
        text.replace('T', " ").replace('Z', "")
    };
    let created = create(
        addr,
        ALICE,
        json!({"key": "k", "value": "same", "environment": "prod", "category": "c"}),
    )
    .await
    .json();
    let row = cluster_row(addr, "prod", "k")
        .await
        .expect("row after POST");
    assert_eq!(
        row,
        json!({"key": "k", "category": "c", "environment": "prod",
               "created_at": sqlite(&created["created_at"]), "updated_at": sqlite(&created["updated_at"])})
    );
    let first_created = row["created_at"].clone();

    // An identical-value PUT bumps updated_at (the REST mode=full form agrees), not created_at.
    let updated = put(
        addr,
        "/configs/k?environment=prod",
        json!({"value": "same"}),
    )
    .await
    .json();
    let row = cluster_row(addr, "prod", "k").await.expect("row after PUT");
    assert_eq!(row["created_at"], first_created);
    assert_ne!(
        row["updated_at"], first_created,
        "identical PUT bumps updated_at"
    );
    assert_eq!(row["updated_at"], sqlite(&updated["updated_at"]));
    let full = call(
        addr,
        "GET",
        "/configs/k?environment=prod&mode=full",
        &user(ALICE),
        None,
    )
    .await
    .json();
    assert_eq!(row["updated_at"], sqlite(&full["updated_at"]));

    // DELETE removes the row; re-creating gives a new created_at.
    let deleted = call(
        addr,
        "DELETE",
        "/configs/k?environment=prod",
        &user(ALICE),
        None,
    )
    .await;
    assert_eq!(deleted.status, 200);
    assert_eq!(cluster_row(addr, "prod", "k").await, None);
    create(
        addr,
        ALICE,
        json!({"key": "k", "value": "same", "environment": "prod"}),
    )
    .await;
    let row = cluster_row(addr, "prod", "k")
        .await
        .expect("row after re-POST");
    assert_ne!(row["created_at"], first_created);
    assert_eq!(row["category"], Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn cluster_configs_switch_and_api_key() {
    let server = start(DevServerArgs {
        api_key: Some(Secret::new("the-api-key".into())),
        ..quiet_args()
    })
    .await;
    let addr = server.addr();
    let api = [("X-API-Key", "the-api-key")];
    let missing = r#"{"detail":"API key required but missing. Provide X-API-Key header."}"#;
    let not_found = r#"{"detail":"Not Found"}"#;
    let get = |headers: &'static [(&'static str, &'static str)]| {
        call(
            addr,
            "GET",
            "/cluster/configs?environment=prod",
            headers,
            None,
        )
    };
    let answer = |r: Reply| (r.status, r.body);
    assert_eq!(answer(get(&[]).await), (403, missing.to_owned()));
    assert_eq!(
        answer(get(&[("X-API-Key", "wrong")]).await),
        (403, r#"{"detail":"Invalid API key"}"#.to_owned())
    );
    // The API key is enough: no X-User-Key.
    assert_eq!(
        answer(get(&[("X-API-Key", "the-api-key")]).await),
        (200, "[]".to_owned())
    );

    // Switched off at runtime: a plain 404 before any key check, like a server without the route.
    let state = set_faults(addr, json!({"cluster_configs": false})).await;
    assert_eq!(state["cluster_configs"], false);
    assert_eq!(
        answer(get(&[("X-API-Key", "the-api-key")]).await),
        (404, not_found.to_owned())
    );
    assert_eq!(answer(get(&[]).await), (404, not_found.to_owned()));
    // The rest of the server is unaffected.
    let mut sse = Sse::open(addr, "/sse/subscribe", &api).await;
    assert!(sse.next_message().await.starts_with("event: connected\r\n"));
    set_faults(addr, json!({"cluster_configs": true})).await;
    assert_eq!(get(&[("X-API-Key", "the-api-key")]).await.status, 200);
    server.shutdown().await;

    // Switched off by the flag.
    let server = start(DevServerArgs {
        no_cluster_configs: true,
        ..quiet_args()
    })
    .await;
    let addr = server.addr();
    let reply = call(addr, "GET", "/cluster/configs", &[], None).await;
    assert_eq!((reply.status, reply.body.as_str()), (404, not_found));
    let faults = call(addr, "GET", "/_dev/faults", &[], None).await.json();
    assert_eq!(faults["cluster_configs"], false);
    server.shutdown().await;
}

#[tokio::test]
async fn four_workers_a_subscriber_hears_its_worker_and_cluster_configs_sees_all() {
    let server = start(DevServerArgs {
        workers: 4,
        ..quiet_args()
    })
    .await;
    let addr = server.addr();
    // Subscriptions 0..3 land on workers 0..3; each gets its `connected` event whatever its worker.
    let mut subscribers = Vec::new();
    for _ in 0..4 {
        let mut sse = Sse::open(addr, "/sse/subscribe?environment=prod", &[]).await;
        assert!(sse.next_message().await.starts_with("event: connected\r\n"));
        subscribers.push(sse);
    }
    // Write w (0 = the POST, then PUTs) is handled by worker w % 4. /cluster/configs, reading the
    // shared store, sees every one of them.
    create(
        addr,
        ALICE,
        json!({"key": "k", "value": 0, "environment": "prod"}),
    )
    .await;
    let mut last = cluster_row(addr, "prod", "k").await.expect("row")["updated_at"].clone();
    for i in 1..40 {
        put(addr, "/configs/k?environment=prod", json!({"value": i})).await;
        let now = cluster_row(addr, "prod", "k").await.expect("row")["updated_at"].clone();
        assert_ne!(now, last, "/cluster/configs missed write {i}");
        last = now;
    }
    // Each subscriber heard exactly 1 write in 4: its own worker's. A marker write per worker
    // follows: had a subscriber received anything else, it would show before its marker.
    for i in 40..44 {
        put(addr, "/configs/k?environment=prod", json!({"value": i})).await;
    }
    for (worker, sse) in subscribers.iter_mut().enumerate() {
        let heard: Vec<Value> = {
            let mut heard = Vec::new();
            for _ in 0..11 {
                heard.push(event_data(&sse.next_event().await)["data"]["value"].clone());
            }
            heard
        };
        let want: Vec<Value> = (0..11).map(|n| json!(worker + 4 * n)).collect();
        assert_eq!(heard, want, "subscriber on worker {worker}");
    }
    let stats = stats(addr).await;
    assert_eq!(
        (
            &stats["writes"],
            &stats["events_published"],
            &stats["events_delivered"]
        ),
        (&json!(44), &json!(44), &json!(44)),
        "every event reached exactly one of the four subscribers"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn requests_and_spin_key_derivations_are_counted() {
    const COST_MS: f64 = 20.0;
    let server = start(DevServerArgs {
        key_derivation_cost: KeyDerivationCost::Spin(Duration::from_millis(20)),
        ..quiet_args()
    })
    .await;
    let addr = server.addr();
    create(
        addr,
        ALICE,
        json!({"key": "k", "value": 1, "environment": "prod"}),
    )
    .await;
    let got = call(
        addr,
        "GET",
        "/configs/nope?environment=prod",
        &user(ALICE),
        None,
    )
    .await;
    assert_eq!(got.status, 404, "a 404 still pays its derivation");
    let wrong_key = call(addr, "GET", "/configs?environment=prod", &user(BOB), None).await;
    assert_eq!(wrong_key.status, 500, "so does a wrong user key");
    // No derivation: a user key too short (401), /cluster/configs, the stream, health.
    let short = call(
        addr,
        "GET",
        "/configs?environment=prod",
        &user("short"),
        None,
    )
    .await;
    assert_eq!(short.status, 401);
    cluster(addr, "/cluster/configs?environment=prod").await;
    let mut sse = Sse::open(addr, "/sse/subscribe", &[]).await;
    sse.next_message().await;
    for free in ["/health", "/sse/health", "/ready"] {
        assert_eq!(call(addr, "GET", free, &[], None).await.status, 200);
    }
    let before = stats(addr).await;
    assert_eq!(
        before["requests"],
        json!({"list": 2, "get": 1, "create": 1, "update": 0, "delete": 0, "backup": 0, "cluster_configs": 1, "subscribe": 1})
    );
    assert_eq!(before["key_derivations"], 3);

    // Each list call costs exactly one derivation: at least its cost, well under two.
    const LISTS: u64 = 4;
    for _ in 0..LISTS {
        let reply = call(addr, "GET", "/configs?environment=prod", &user(ALICE), None).await;
        assert_eq!(reply.status, 200);
    }
    let after = stats(addr).await;
    assert_eq!(after["requests"]["list"], 2 + LISTS);
    assert_eq!(after["key_derivations"], 3 + LISTS);
    let spent = after["key_derivation_cpu_ms"].as_f64().unwrap_or_default()
        - before["key_derivation_cpu_ms"].as_f64().unwrap_or_default();
    let lists = LISTS as f64;
    assert!(
        spent >= lists * COST_MS && spent < lists * 2.0 * COST_MS,
        "{spent} ms of derivation CPU for {LISTS} list calls at {COST_MS} ms each"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn pbkdf2_cost_is_a_real_derivation_per_request() {
    let server = start(DevServerArgs {
        key_derivation_cost: KeyDerivationCost::Pbkdf2,
        ..quiet_args()
    })
    .await;
    let addr = server.addr();
    let reply = call(addr, "GET", "/configs?environment=prod", &user(ALICE), None).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "[]"));
    cluster(addr, "/cluster/configs").await;
    let stats = stats(addr).await;
    assert_eq!(stats["key_derivations"], 1);
    // 480,000 PBKDF2-HMAC-SHA256 rounds take tens of milliseconds of CPU even fully optimised
    // (and over a second in the unoptimised test build).
    let spent = stats["key_derivation_cpu_ms"].as_f64().unwrap_or_default();
    assert!(spent >= 20.0, "{spent} ms for one derivation");
    server.shutdown().await;
}
