//! Backups: decrypting the real upstream fixtures, `--from-backup`, `--fallback-backup`, last-known-good
//! files across restarts, `backup inspect`, and errors that leave every file as it was.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PASSWORD: &str = "fixture-backup-password";
/// Values and secrets of the fixtures that must never reach a log.
const FIXTURE_SECRETS: [&str; 4] = [
    "fixture-s3cret",
    "db.prod.internal",
    "api.staging.example.com",
    PASSWORD,
];
const WAIT: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upstream")
        .join(name)
}

/// The entries of `environment` in the recorded list, rendered as the agent renders one file per key.
fn expected_files(environment: &str) -> Vec<(String, Vec<u8>)> {
    let list: Vec<Value> =
        serde_json::from_slice(&std::fs::read(fixture("upstream-list-all.json")).unwrap()).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = list
        .iter()
        .filter(|e| e["environment"] == json!(environment))
        .map(|e| {
            let bytes = match &e["value"] {
                Value::String(s) => s.clone().into_bytes(),
                v => format!("{}\n", serde_json::to_string_pretty(v).unwrap()).into_bytes(),
            };
            (e["key"].as_str().unwrap().to_owned(), bytes)
        })
        .collect();
    out.sort();
    out
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    visible(dir)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect()
}

fn from_backup_args(
    backup: &Path,
    scratch: &Scratch,
    environment: &str,
    out: &Path,
) -> Vec<String> {
    vec![
        "--once".into(),
        "--from-backup".into(),
        backup.display().to_string(),
        "--backup-password-file".into(),
        scratch.path("backup-password").display().to_string(),
        "--environment".into(),
        environment.into(),
        "--output-dir".into(),
        out.display().to_string(),
    ]
}

fn scratch_with_password() -> Scratch {
    let s = Scratch::new();
    s.write("backup-password", &format!("{PASSWORD}\n"));
    s
}

#[tokio::test]
async fn from_backup_renders_the_upstream_fixtures_like_the_recorded_list() {
    let logs = Logs::default();
    let scratch = scratch_with_password();
    for (file, envs) in [
        ("upstream-backup-all.json", vec!["production", "staging"]),
        ("upstream-backup-production.json", vec!["production"]),
    ] {
        for env in envs {
            let out = scratch.path(&format!("{file}-{env}"));
            let r = run_agent(
                &logs,
                &strs(&from_backup_args(&fixture(file), &scratch, env, &out)),
                &[],
            )
            .await;
            assert_eq!(r.code, 0, "{r:?}");
            assert_eq!(files_of(&out), expected_files(env), "{file} / {env}");
        }
    }
    // The non-ASCII value, written as-is.
    let greeting =
        std::fs::read_to_string(scratch.path("upstream-backup-all.json-staging/greeting")).unwrap();
    assert_eq!(greeting, "café ☃");
    // An environment the backup does not hold: exit 6, nothing written.
    let out = scratch.path("nothing");
    let r = run_agent(
        &logs,
        &strs(&from_backup_args(
            &fixture("upstream-backup-production.json"),
            &scratch,
            "staging",
            &out,
        )),
        &[],
    )
    .await;
    assert_eq!(r.code, 6, "{r:?}");
    assert!(
        r.stderr.contains("no entry for environment 'staging'") && r.stderr.contains("production"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
    logs.assert_free_of(&FIXTURE_SECRETS);
}

#[tokio::test]
async fn broken_backups_fail_clearly_and_touch_nothing() {
    let logs = Logs::default();
    let scratch = scratch_with_password();
    let out = scratch.path("out");
    let good = fixture("upstream-backup-all.json");
    assert_eq!(
        run_agent(
            &logs,
            &strs(&from_backup_args(&good, &scratch, "production", &out)),
            &[]
        )
        .await
        .code,
        0
    );
    let before = tree(&out);

    let response: Value = serde_json::from_slice(&std::fs::read(&good).unwrap()).unwrap();
    let blob = response["backup_data"].as_str().unwrap().to_owned();
    // Flip one character of the Fernet token (still valid base64): the HMAC check must fail.
    let mut raw = base64_decode(&blob);
    let i = 32 + 80;
    raw[i] = if raw[i] == b'A' { b'B' } else { b'A' };
    let flipped = scratch.write("flipped.b64", &base64_encode(&raw));
    let truncated = scratch.write("truncated.b64", &blob[..blob.len() / 2]);
    let empty = scratch.write("empty.json", "");
    let not_base64 = scratch.write("garbage.txt", "this is not a backup at all!");
    scratch.write("wrong-password", "not-the-password\n");

    let cases: Vec<(PathBuf, bool, &str)> = vec![
        (good.clone(), true, "wrong backup password"),
        (
            flipped.clone(),
            false,
            "wrong backup password or corrupted backup",
        ),
        (truncated.clone(), false, "truncated"),
        (empty.clone(), false, "empty"),
        (not_base64.clone(), false, "not valid standard base64"),
    ];
    for (file, wrong_password, expect) in cases {
        let mut args = from_backup_args(&file, &scratch, "production", &out);
        if wrong_password {
            args[4] = scratch.path("wrong-password").display().to_string();
        }
        let r = run_agent(&logs, &strs(&args), &[]).await;
        assert_eq!(r.code, 6, "{file:?}: {r:?}");
        let errors: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("osc-agent: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{}", r.stderr);
        assert!(
            errors[0].contains(expect) && errors[0].contains(&file.display().to_string()),
            "{}",
            errors[0]
        );
        assert_eq!(tree(&out), before, "{file:?}: files untouched");
    }
    // No password at all: a configuration error.
    let mut args = from_backup_args(&good, &scratch, "production", &out);
    args.drain(3..5);
    let r = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("--backup-password-file"), "{}", r.stderr);
    logs.assert_free_of(&FIXTURE_SECRETS);
}

#[tokio::test]
async fn fallback_backup_serves_until_the_server_answers() {
    let logs = Logs::default();
    let scratch = scratch_with_password();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let out = scratch.path("out");
    let mut args = live_args(
        &format!("http://{addr}"),
        &scratch,
        &out,
        &["--resync-interval", "300ms"],
    );
    let pos = args.iter().position(|a| a == "--environment").unwrap();
    args[pos + 1] = "production".into();
    args.extend([
        "--fallback-backup".into(),
        fixture("upstream-backup-all.json").display().to_string(),
        "--backup-password-file".into(),
        scratch.path("backup-password").display().to_string(),
    ]);
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    wait_for("stale from the backup", WAIT, || async {
        agent.status().await["stale"]
            .as_str()
            .is_some_and(|s| s.starts_with("stale (from backup backup-1795414905,"))
    })
    .await;
    assert_eq!(files_of(&out), expected_files("production"));
    assert_eq!(
        agent.get("/readyz").await.0,
        200,
        "ready while stale (--ready-when-stale defaults to true)"
    );
    assert_eq!(agent.metric("osc_agent_stale").await, 1.0);

    let server = DevServer::start_on(&logs, &addr, &[]).await;
    server
        .api()
        .create(
            "production",
            "api_url",
            json!("https://from-the-server.example"),
        )
        .await;
    // The server's truth replaces the backup's entries. The links of removed keys go after the swap
    // that changes `api_url`: wait for the whole state, not for one file of it.
    wait_for("only the server's entry", WAIT, || async {
        visible(&out) == ["api_url"]
            && std::fs::read_to_string(out.join("api_url"))
                .is_ok_and(|s| s == "https://from-the-server.example")
    })
    .await;
    wait_for("stale cleared", WAIT, || async {
        agent.status().await["stale"].is_null()
    })
    .await;
    assert_eq!(agent.metric("osc_agent_stale").await, 0.0);
    logs.assert_free_of(&FIXTURE_SECRETS);
    logs.assert_free_of(&[USER_KEY]);
}

#[tokio::test]
async fn once_falls_back_when_unreachable_but_never_on_a_key_mismatch() {
    let logs = Logs::default();
    let scratch = scratch_with_password();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fallback = [
        "--fallback-backup".to_string(),
        fixture("upstream-backup-all.json").display().to_string(),
        "--backup-password-file".into(),
        scratch.path("backup-password").display().to_string(),
    ];
    let once = |url: String, out: &Path| {
        let mut v = vec![
            "--once".to_string(),
            "--server".into(),
            url,
            "--environment".into(),
            "production".into(),
            "--user-key-file".into(),
            scratch.key_file(),
            "--output-dir".into(),
            out.display().to_string(),
            "--max-retries".into(),
            "0".into(),
        ];
        v.extend(fallback.iter().cloned());
        v
    };
    // Unreachable: exit 0 from the backup.
    let out = scratch.path("down");
    let r = run_agent(
        &logs,
        &strs(&once(format!("http://127.0.0.1:{port}"), &out)),
        &[],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("stale (from backup"), "{}", r.stderr);
    assert_eq!(files_of(&out), expected_files("production"));

    // Key mismatch: the data is sealed under another key. Exit 4, nothing written.
    let server = DevServer::start(&logs, &[]).await;
    server
        .api()
        .with_key("someone-elses-key")
        .create("production", "x", json!("y"))
        .await;
    let out = scratch.path("mismatch");
    let r = run_agent(&logs, &strs(&once(server.url.clone(), &out)), &[]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(!out.exists(), "no fallback on a key mismatch");
    logs.assert_free_of(&FIXTURE_SECRETS);
}

#[tokio::test]
async fn dev_server_backup_round_trips_through_from_backup() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create_in(
        "prod",
        "db",
        json!({"host": "h", "password": "rt-secret-1", "nested": [1, {"a": true}]}),
        Some("database"),
    )
    .await;
    api.create("prod", "greeting", json!("héllo ☃ wörld")).await;
    api.create("prod", "flags", json!([true, false])).await;
    api.create("prod", "debug", json!(false)).await;
    api.create("prod", "port", json!(5432)).await;
    api.create("other", "x", json!("rt-secret-2")).await;
    let scratch = scratch_with_password();
    let resp = api
        .http
        .post(format!("{}/backup", server.url))
        .header("x-user-key", USER_KEY)
        .header("x-backup-password", PASSWORD)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let backup = scratch.write("backup.json", &resp.text().await.unwrap());

    let live = scratch.path("live");
    let r = run_agent(
        &logs,
        &[
            "--once",
            "--server",
            &server.url,
            "--environment",
            "prod",
            "--user-key-file",
            &scratch.key_file(),
            "--output-dir",
            live.to_str().unwrap(),
            "--output",
            &format!("{}:dotenv", scratch.path("live.env").display()),
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let restored = scratch.path("restored");
    let mut args = from_backup_args(&backup, &scratch, "prod", &restored);
    args.extend([
        "--output".into(),
        format!("{}:dotenv", scratch.path("restored.env").display()),
    ]);
    let r = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(files_of(&restored), files_of(&live));
    assert_eq!(
        std::fs::read(scratch.path("restored.env")).unwrap(),
        std::fs::read(scratch.path("live.env")).unwrap()
    );
    logs.assert_free_of(&["rt-secret-1", "rt-secret-2", "héllo", PASSWORD, USER_KEY]);
}

#[tokio::test]
async fn last_known_good_files_survive_a_restart_while_the_server_is_down() {
    let logs = Logs::default();
    let mut server = DevServer::start(&logs, &[]).await;
    server
        .api()
        .create("prod", "k", json!("lkg-secret-value"))
        .await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(&server.url, &scratch, &out, &["--resync-interval", "300ms"]);
    let agent = AgentProc::start(&logs, &strs(&args)).await;
    agent.wait_ready().await;
    wait_file(&out.join("k"), "lkg-secret-value", WAIT).await;
    assert_eq!(agent.terminate().await.0, 0);
    server.kill().await;
    let before = tree(&out);

    let agent = AgentProc::start(&logs, &strs(&args)).await;
    wait_for("stale last-known-good", WAIT, || async {
        agent.status().await["stale"]
            .as_str()
            .is_some_and(|s| s.contains("last-known-good"))
    })
    .await;
    assert_eq!(agent.get("/readyz").await.0, 200);
    assert_eq!(tree(&out), before, "files kept exactly (inodes, mtimes)");
    drop(agent);

    let mut strict = args.clone();
    strict.push("--ready-when-stale=false".into());
    let agent = AgentProc::start(&logs, &strs(&strict)).await;
    wait_for("stale", WAIT, || async {
        agent.status().await["stale"].is_string()
    })
    .await;
    let (code, body) = agent.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("ready-when-stale"), "{body}");
    assert_eq!(tree(&out), before);
    logs.assert_free_of(&["lkg-secret-value", USER_KEY]);
}

#[tokio::test]
async fn backup_inspect_lists_without_values_unless_asked() {
    let logs = Logs::default();
    let scratch = scratch_with_password();
    let pw = scratch.path("backup-password").display().to_string();
    let file = fixture("upstream-backup-all.json").display().to_string();
    let r = run_agent(
        &logs,
        &["backup", "inspect", &file, "--backup-password-file", &pw],
        &[],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    for expect in [
        "backup-1795414905",
        "production",
        "staging",
        "database",
        "api_url",
        "greeting",
        "2026-11-23T06:21:45",
    ] {
        assert!(r.stdout.contains(expect), "{expect} in {}", r.stdout);
    }
    assert!(
        r.stdout.contains("production                   4"),
        "{}",
        r.stdout
    );
    logs.assert_free_of(&FIXTURE_SECRETS);

    let shown = Logs::default();
    let r = run_agent(
        &shown,
        &[
            "backup",
            "inspect",
            &file,
            "--backup-password-file",
            &pw,
            "--show-values",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("fixture-s3cret") && r.stdout.contains("café ☃"),
        "{}",
        r.stdout
    );
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
