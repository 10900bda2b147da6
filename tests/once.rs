//! `--once` against a real dev server process: layout, no-op runs, changes, failures, unsafe keys,
//! templates, exit codes, and no secret in any log.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use serde_json::json;

const DB_PASSWORD: &str = "pw-Zq8-very-secret";
const API_TOKEN: &str = "tok-3141-secret-value";

fn once_args<'a>(
    server: &'a DevServer,
    scratch: &'a Scratch,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<String> {
    let mut v = vec![
        "--once".to_string(),
        "--server".into(),
        server.url.clone(),
        "--environment".into(),
        "prod".into(),
        "--user-key-file".into(),
        scratch.key_file(),
        "--output-dir".into(),
        out.to_string(),
        "--max-retries".into(),
        "1".into(),
        "--retry-initial-delay".into(),
        "50ms".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

async fn run(logs: &Logs, args: &[String]) -> Run {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_agent(logs, &refs, &[]).await
}

async fn seed(api: &Api) {
    api.create_in(
        "prod",
        "db",
        json!({"host": "db.internal", "port": 5432, "password": DB_PASSWORD}),
        Some("database"),
    )
    .await;
    api.create("prod", "api.token", json!(API_TOKEN)).await;
    api.create("prod", "flags", json!([true, false])).await;
    api.create("staging", "other", json!("not in prod")).await;
}

#[tokio::test]
async fn once_writes_the_kubelet_layout_and_a_second_run_writes_nothing() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    seed(&server.api()).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let out_s = out.display().to_string();

    let r = run(&logs, &once_args(&server, &scratch, &out_s, &[])).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(visible(&out), vec!["api.token", "db", "flags"]);
    for name in ["api.token", "db", "flags"] {
        let link = std::fs::read_link(out.join(name)).expect("visible names are links");
        assert_eq!(link, Path::new("..data").join(name));
        let meta = std::fs::metadata(out.join(name)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "{name} mode");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("api.token")).unwrap(),
        API_TOKEN
    );
    let db: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("db")).unwrap()).unwrap();
    assert_eq!(db["password"], json!(DB_PASSWORD));
    assert!(
        std::fs::read_to_string(out.join("db"))
            .unwrap()
            .contains("\n  \"host\""),
        "pretty JSON"
    );
    let hidden = hidden(&out);
    assert_eq!(hidden.len(), 2, "..data and one generation: {hidden:?}");
    assert!(hidden.contains(&"..data".to_string()));

    let before = tree(&out);
    let r = run(&logs, &once_args(&server, &scratch, &out_s, &[])).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        tree(&out),
        before,
        "second run must not touch anything (inodes, mtimes, links)"
    );
    assert!(r.stderr.contains("nothing changed"), "{}", r.stderr);

    logs.assert_free_of(&[DB_PASSWORD, API_TOKEN, USER_KEY]);
}

/// `OSC_LOG` takes `level` and `target=level` directives; one that does not parse is named in a warning
/// and the default level applies (the run itself goes on).
#[tokio::test]
async fn the_log_filter_is_applied_and_a_bad_one_is_reported() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    seed(&server.api()).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let out_s = out.display().to_string();
    let args = once_args(&server, &scratch, &out_s, &[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let levels = |stderr: &str| -> BTreeSet<String> {
        stderr
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(str::to_owned)
            .collect()
    };

    let quiet = run_agent(&logs, &refs, &[("OSC_LOG", "error")]).await;
    assert_eq!(quiet.code, 0, "{quiet:?}");
    assert!(quiet.stderr.is_empty(), "nothing at error level: {quiet:?}");

    let r = run_agent(&logs, &refs, &[("OSC_LOG", "error,osc_agent=info")]).await;
    assert_eq!(r.code, 0, "{r:?}");
    // Info from the agent (a slow run may add a warning), nothing more detailed.
    let seen = levels(&r.stderr);
    assert!(
        seen.contains("INFO") && !seen.contains("DEBUG") && !seen.contains("TRACE"),
        "{}",
        r.stderr
    );

    // A trailing comma is no directive (not "errors only").
    let r = run_agent(&logs, &refs, &[("OSC_LOG", "info,")]).await;
    assert!(levels(&r.stderr).contains("INFO"), "{}", r.stderr);

    for bad in ["osc_agent=loud", "=", "[span]=debug"] {
        let r = run_agent(&logs, &refs, &[("OSC_LOG", bad), ("RUST_LOG", "error")]).await;
        assert_eq!(r.code, 0, "{r:?}");
        assert!(
            r.stderr.contains(&format!("$OSC_LOG '{bad}' is not a list of level and target=level directives: level info applies")),
            "{}",
            r.stderr
        );
        let seen = levels(&r.stderr);
        assert!(
            seen.contains("INFO") && !seen.contains("DEBUG"),
            "{}",
            r.stderr
        );
    }
    logs.assert_free_of(&[DB_PASSWORD, API_TOKEN, USER_KEY]);
}

#[tokio::test]
async fn added_changed_and_deleted_keys_give_the_exact_file_set() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    seed(&api).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let out_s = out.display().to_string();
    assert_eq!(
        run(&logs, &once_args(&server, &scratch, &out_s, &[]))
            .await
            .code,
        0
    );

    api.create("prod", "new.key", json!("fresh")).await;
    api.update("prod", "api.token", json!("rotated-token-value"))
        .await;
    api.delete("prod", "flags").await;
    let r = run(&logs, &once_args(&server, &scratch, &out_s, &[])).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(visible(&out), vec!["api.token", "db", "new.key"]);
    assert_eq!(
        std::fs::read_to_string(out.join("api.token")).unwrap(),
        "rotated-token-value"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("new.key")).unwrap(),
        "fresh"
    );
    let hidden = hidden(&out);
    assert_eq!(
        hidden.len(),
        2,
        "no stale generation or ..data_tmp: {hidden:?}"
    );
    let generation = std::fs::read_link(out.join("..data")).unwrap();
    let mut in_generation: Vec<String> = std::fs::read_dir(out.join(&generation))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_generation.sort();
    assert_eq!(in_generation, vec!["api.token", "db", "new.key"]);
    logs.assert_free_of(&[DB_PASSWORD, API_TOKEN, "rotated-token-value", USER_KEY]);
}

#[tokio::test]
async fn failures_leave_every_file_byte_identical() {
    let logs = Logs::default();
    let mut server = DevServer::start(&logs, &[]).await;
    seed(&server.api()).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let out_s = out.display().to_string();
    assert_eq!(
        run(&logs, &once_args(&server, &scratch, &out_s, &[]))
            .await
            .code,
        0
    );
    let before = tree(&out);

    // Wrong user key: the server answers 500 "Internal error: " → exit 4, message says so.
    scratch.write("wrong-key", "a-different-user-key\n");
    let mut args = once_args(&server, &scratch, &out_s, &[]);
    let pos = args.iter().position(|a| a == "--user-key-file").unwrap();
    args[pos + 1] = scratch.path("wrong-key").display().to_string();
    let r = run(&logs, &args).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr
            .contains("user key does not match the data in environment 'prod'"),
        "{}",
        r.stderr
    );
    assert_eq!(tree(&out), before);

    // Server down → exit 3 after retries.
    server.kill().await;
    let r = run(&logs, &once_args(&server, &scratch, &out_s, &[])).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("cannot reach"), "{}", r.stderr);
    assert_eq!(tree(&out), before);

    // API-key mode and no API key → exit 4; with the right key → 0.
    let api_key = scratch.write("api-key", "the-api-key-123\n");
    let server = DevServer::start(&logs, &["--api-key-file", api_key.to_str().unwrap()]).await;
    let r = run(&logs, &once_args(&server, &scratch, &out_s, &[])).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains("requires an API key"), "{}", r.stderr);
    assert_eq!(tree(&out), before);

    logs.assert_free_of(&[
        DB_PASSWORD,
        API_TOKEN,
        USER_KEY,
        "a-different-user-key",
        "the-api-key-123",
    ]);
}

#[tokio::test]
async fn unsafe_keys_never_escape_and_other_keys_still_sync() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    for key in ["../x", "a/b", "..data", ".", "good"] {
        api.create("prod", key, json!(format!("value of {key}")))
            .await;
    }
    let scratch = Scratch::new();
    let out = scratch.path("nested/out");
    let out_s = out.display().to_string();
    let r = run(&logs, &once_args(&server, &scratch, &out_s, &[])).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(visible(&out), vec!["good"]);
    assert_eq!(
        std::fs::read_to_string(out.join("good")).unwrap(),
        "value of good"
    );
    // Nothing beside the output directory: only `user-key` and `nested/out` exist in the scratch dir.
    let mut top: Vec<String> = tree(scratch.dir.path())
        .keys()
        .filter(|k| !k.starts_with("nested/out/"))
        .cloned()
        .collect();
    top.sort();
    assert_eq!(top, vec!["nested", "nested/out", "user-key"]);
    assert_eq!(
        std::fs::read_link(out.join("..data"))
            .unwrap()
            .components()
            .count(),
        1
    );
    for key in ["'../x'", "'a/b'", "'..data'", "'.'"] {
        assert!(
            r.stderr.contains(&format!("key {key} not written")),
            "warning names {key}: {}",
            r.stderr
        );
    }
}

#[tokio::test]
async fn template_with_a_missing_key_fails_naming_it_and_replaces_nothing() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    seed(&api).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let out_s = out.display().to_string();
    let tmpl = scratch.write(
        "app.conf.j2",
        "host={{ config.db.host }}\ntoken={{ config[\"api.token\"] }}\n",
    );
    let conf = scratch.path("rendered/app.conf");
    let spec = format!("{}:{}", tmpl.display(), conf.display());
    let args = once_args(
        &server,
        &scratch,
        &out_s,
        &[
            "--template",
            &spec,
            "--output",
            &format!("{}:dotenv", scratch.path("rendered/app.env").display()),
        ],
    );
    let r = run(&logs, &args).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        format!("host=db.internal\ntoken={API_TOKEN}\n")
    );
    let before_out = tree(&out);
    let before_rendered = tree(&scratch.path("rendered"));

    api.delete("prod", "api.token").await;
    api.update("prod", "flags", json!([false])).await;
    let r = run(&logs, &args).await;
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr.contains("'api.token'") && r.stderr.contains("app.conf.j2"),
        "{}",
        r.stderr
    );
    assert_eq!(tree(&out), before_out, "output dir untouched");
    assert_eq!(
        tree(&scratch.path("rendered")),
        before_rendered,
        "single files untouched"
    );
    logs.assert_free_of(&[DB_PASSWORD, API_TOKEN, USER_KEY]);
}

#[tokio::test]
async fn aggregate_outputs_in_every_format() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "db.url", json!("postgres://db/app"))
        .await;
    api.create("prod", "port", json!(5432)).await;
    let scratch = Scratch::new();
    let p = |n: &str| scratch.path(n).display().to_string();
    let args = vec![
        "--once".to_string(),
        "--server".into(),
        server.url.clone(),
        "--environment".into(),
        "prod".into(),
        "--user-key-file".into(),
        scratch.key_file(),
        "--output".into(),
        format!("{}:json", p("all.json")),
        "--output".into(),
        format!("{}:yaml", p("all.yaml")),
        "--output".into(),
        format!("{}:dotenv", p("all.env")),
        "--output".into(),
        format!("{}:properties", p("all.properties")),
        "--file-mode".into(),
        "0640".into(),
    ];
    let r = run(&logs, &args).await;
    assert_eq!(r.code, 0, "{r:?}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("all.json")).unwrap()).unwrap();
    assert_eq!(j, json!({"db.url": "postgres://db/app", "port": 5432}));
    let y = std::fs::read_to_string(p("all.yaml")).unwrap();
    assert!(
        y.contains("db.url: postgres://db/app") && y.contains("port: 5432"),
        "{y}"
    );
    assert_eq!(
        std::fs::read_to_string(p("all.env")).unwrap(),
        "db_url='postgres://db/app'\nport='5432'\n"
    );
    assert_eq!(
        std::fs::read_to_string(p("all.properties")).unwrap(),
        "db.url=postgres\\://db/app\nport=5432\n"
    );
    for f in ["all.json", "all.yaml", "all.env", "all.properties"] {
        assert_eq!(
            std::fs::metadata(p(f)).unwrap().mode() & 0o777,
            0o640,
            "{f}"
        );
    }
}

#[tokio::test]
async fn a_foreign_file_with_a_key_name_is_kept_and_reported_as_partial_failure() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "mine", json!("ok")).await;
    api.create("prod", "theirs", json!("would overwrite")).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("theirs"), "hand-written").unwrap();
    let r = run(
        &logs,
        &once_args(&server, &scratch, &out.display().to_string(), &[]),
    )
    .await;
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("theirs"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(out.join("theirs")).unwrap(),
        "hand-written"
    );
    assert_eq!(std::fs::read_to_string(out.join("mine")).unwrap(), "ok");
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_setting() {
    let logs = Logs::default();
    let scratch = Scratch::new();
    let key = scratch.key_file();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--once",
                "--server",
                "http://127.0.0.1:9",
                "--user-key-file",
                &key,
                "--output-dir",
                "/tmp/x",
            ],
            "--environment",
        ),
        (
            vec![
                "--once",
                "--server",
                "http://127.0.0.1:9",
                "--environment",
                " ",
                "--user-key-file",
                &key,
                "--output-dir",
                "/tmp/x",
            ],
            "--environment",
        ),
        (
            vec![
                "--once",
                "--server",
                "ftp://x",
                "--environment",
                "p",
                "--user-key-file",
                &key,
                "--output-dir",
                "/tmp/x",
            ],
            "--server",
        ),
        (
            vec![
                "--once",
                "--server",
                "http://127.0.0.1:9",
                "--environment",
                "p",
                "--user-key-file",
                "/nonexistent/key",
                "--output-dir",
                "/tmp/x",
            ],
            "--user-key-file",
        ),
        (
            vec![
                "--once",
                "--server",
                "http://127.0.0.1:9",
                "--environment",
                "p",
                "--user-key-file",
                &key,
            ],
            "no output configured",
        ),
        (
            vec![
                "--once",
                "--server",
                "http://127.0.0.1:9",
                "--environment",
                "p",
                "--user-key-file",
                &key,
                "--output-dir",
                "/tmp/x",
                "--include",
                "a[b",
            ],
            "--include",
        ),
        (
            vec![
                "--once",
                "--server",
                "http://127.0.0.1:9",
                "--environment",
                "p",
                "--user-key-file",
                &key,
                "--output",
                "/tmp/x:toml",
            ],
            "unknown format",
        ),
    ];
    for (args, expect) in cases {
        let r = run_agent(&logs, &args, &[]).await;
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        let errors: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("osc-agent: error:") || l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line: {}", r.stderr);
        assert!(
            errors[0].contains(expect),
            "{args:?} should name {expect}: {}",
            r.stderr
        );
    }
    // Short user key, and a config file with a typo.
    scratch.write("short", "short\n");
    let short = scratch.path("short").display().to_string();
    let r = run_agent(
        &logs,
        &[
            "--once",
            "--server",
            "http://127.0.0.1:9",
            "--environment",
            "p",
            "--user-key-file",
            &short,
            "--output-dir",
            "/tmp/x",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("shorter than 8") && !r.stderr.contains("short\n"),
        "{}",
        r.stderr
    );
    let cfg = scratch.write(
        "agent.yaml",
        "server: http://127.0.0.1:9\nenviroment: prod\n",
    );
    let r = run_agent(&logs, &["--once", "--config", cfg.to_str().unwrap()], &[]).await;
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("enviroment") && r.stderr.contains("agent.yaml"),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn config_file_env_vars_and_flags_combine() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create_in("prod", "db.url", json!("x"), Some("database"))
        .await;
    api.create_in("prod", "db.pool", json!(5), Some("tuning"))
        .await;
    api.create_in("prod", "web.port", json!(80), Some("database"))
        .await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let cfg = scratch.write(
        "agent.yaml",
        &format!(
            "server: {}\nenvironment: wrong-env\ninclude: [\"db.*\"]\ncategory: [database]\noutput-dir: {}\n",
            server.url,
            out.display()
        ),
    );
    // The env var overrides the file's environment; the user key comes from $OSC_USER_KEY.
    let r = run_agent(
        &logs,
        &["--once", "--config", cfg.to_str().unwrap()],
        &[("OSC_ENVIRONMENT", "prod"), ("OSC_USER_KEY", USER_KEY)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(visible(&out), vec!["db.url"]);
    logs.assert_free_of(&[USER_KEY]);
}

#[tokio::test]
async fn an_environment_with_no_selected_entry_exits_7_and_keeps_earlier_files() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    seed(&server.api()).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let out_s = out.display().to_string();
    let env_file = scratch.path("app.env");
    let dotenv = format!("{}:dotenv", env_file.display());
    let r = run(
        &logs,
        &once_args(&server, &scratch, &out_s, &["--output", &dotenv]),
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let before = tree(scratch.dir.path());

    // A mistyped environment: exit 7, naming the flag; nothing touched.
    let mut args = once_args(&server, &scratch, &out_s, &["--output", &dotenv]);
    set_arg(&mut args, "--environment", "prodution");
    let r = run(&logs, &args).await;
    assert_eq!(r.code, 7, "{r:?}");
    for needle in [
        "no entry for environment 'prodution'",
        "--environment",
        "--allow-empty",
    ] {
        assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
    }
    assert_eq!(tree(scratch.dir.path()), before, "earlier files untouched");

    // Filters selecting nothing: exit 7, naming the filters.
    let r = run(
        &logs,
        &once_args(
            &server,
            &scratch,
            &out_s,
            &[
                "--output",
                &dotenv,
                "--include",
                "nomatch*",
                "--category",
                "none",
            ],
        ),
    )
    .await;
    assert_eq!(r.code, 7, "{r:?}");
    for needle in [
        "none of the 3 entries of environment 'prod'",
        "--include 'nomatch*'",
        "--category 'none'",
    ] {
        assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
    }
    assert_eq!(tree(scratch.dir.path()), before, "earlier files untouched");

    // A first run: nothing created at all.
    let fresh = scratch.path("fresh");
    let fresh_env = format!("{}:dotenv", scratch.path("fresh.env").display());
    let mut args = once_args(
        &server,
        &scratch,
        fresh.to_str().unwrap(),
        &["--output", &fresh_env],
    );
    set_arg(&mut args, "--environment", "prodution");
    let r = run(&logs, &args).await;
    assert_eq!(r.code, 7, "{r:?}");
    assert!(!fresh.exists() && !scratch.path("fresh.env").exists());

    // --allow-empty: empty outputs, exit 0.
    args.push("--allow-empty".into());
    let r = run(&logs, &args).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(visible(&fresh).is_empty());
    assert_eq!(std::fs::read(scratch.path("fresh.env")).unwrap(), b"");
    logs.assert_free_of(&[DB_PASSWORD, API_TOKEN, USER_KEY]);
}

/// `osc-agent ARGS` with `env`, started in the background (stdout and stderr piped), for a test that
/// signals it mid-run.
fn spawn_agent(args: &[String], env: &[(&str, &str)]) -> tokio::process::Child {
    let mut cmd = clean_command(BIN);
    cmd.args(args)
        .env_remove("OSC_USER_KEY")
        .env("OSC_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start agent")
}

/// Sends `signal` to `child` and waits (up to `within`) for its exit: its code and stderr, which also
/// goes to `logs`.
async fn signal_and_wait(
    logs: &Logs,
    mut child: tokio::process::Child,
    signal: nix::sys::signal::Signal,
    within: std::time::Duration,
) -> (Option<i32>, String) {
    use tokio::io::AsyncReadExt;
    let pid = nix::unistd::Pid::from_raw(child.id().expect("running") as i32);
    nix::sys::signal::kill(pid, signal).expect("kill");
    let status = tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the agent did not exit within {within:?} of {signal}"))
        .expect("wait");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr).await;
    }
    logs.push(&stderr);
    (status.code(), stderr)
}

#[tokio::test]
async fn sigterm_or_sigint_during_a_big_once_write_abandons_it_cleanly() {
    use nix::sys::signal::Signal;
    let logs = Logs::default();
    let scratch = Scratch::new();
    // 4000 keys of about 1 KiB: a generation of 4000 fsynced files takes a while to write.
    let env: serde_json::Map<String, serde_json::Value> = (0..4000)
        .map(|i| {
            (
                format!("k{i:04}"),
                json!(format!("{DB_PASSWORD}-{i}-{}", "x".repeat(1000))),
            )
        })
        .collect();
    let seed = scratch.write("seed.json", &json!({ "prod": env }).to_string());
    let server = DevServer::start(
        &logs,
        &[
            "--seed",
            seed.to_str().unwrap(),
            "--seed-user-key-file",
            &scratch.key_file(),
        ],
    )
    .await;
    let out = scratch.path("out");
    let out_s = out.display().to_string();
    // An earlier run's files (10 keys).
    let r = run(
        &logs,
        &once_args(&server, &scratch, &out_s, &["--include", "k000*"]),
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let before = visible_tree(&out);

    for (signal, code) in [(Signal::SIGTERM, 143), (Signal::SIGINT, 130)] {
        let args = once_args(&server, &scratch, &out_s, &[]);
        let child = spawn_agent(&args, &[]);
        wait_for(
            "the new generation being written",
            std::time::Duration::from_secs(30),
            || async { hidden(&out).len() == 3 },
        )
        .await;
        let (code_seen, stderr) =
            signal_and_wait(&logs, child, signal, std::time::Duration::from_secs(10)).await;
        assert_eq!(code_seen, Some(code), "{signal}: {stderr}");
        assert!(
            stderr.contains("the write in progress was abandoned"),
            "{stderr}"
        );
        assert_eq!(
            visible_tree(&out),
            before,
            "{signal}: the partial generation is removed, the earlier files untouched"
        );
    }
    logs.assert_free_of(&[DB_PASSWORD, USER_KEY]);
}

/// A stop signal bounds the run even where nothing can be cancelled: a Kubernetes API server that
/// accepts the ConfigMap's request and never answers holds the write, and the agent exits with the
/// signal's code at the shutdown limit, saying so, instead of waiting for the client's own timeout.
#[tokio::test]
async fn a_stop_signal_exits_at_the_shutdown_limit_when_an_api_call_hangs() {
    use nix::sys::signal::Signal;
    use tokio::io::AsyncReadExt;
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    seed(&server.api()).await;
    let scratch = Scratch::new();

    // The API server: reads requests, answers none.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api_addr = listener.local_addr().expect("addr");
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = requests.clone();
    let hung = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            open.push(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }));
        }
    });
    let kubeconfig = scratch.write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: hung\nclusters:\n- name: hung\n  cluster:\n    server: http://{api_addr}\nusers:\n- name: u\n  user:\n    token: not-a-real-token\ncontexts:\n- name: hung\n  context:\n    cluster: hung\n    user: u\n    namespace: default\n"
        ),
    );
    let mut args = once_args(&server, &scratch, "unused", &[]);
    let at = args
        .iter()
        .position(|a| a == "--output-dir")
        .expect("--output-dir");
    args.drain(at..at + 2);
    args.extend(["--configmap".into(), "app-config".into()]);

    let kubeconfig = kubeconfig.display().to_string();
    let child = spawn_agent(&args, &[("KUBECONFIG", &kubeconfig)]);
    wait_for(
        "the agent's request to the Kubernetes API",
        std::time::Duration::from_secs(30),
        || async { requests.load(std::sync::atomic::Ordering::SeqCst) > 0 },
    )
    .await;
    // The limit is 5 s; the client's own read timeout is minutes.
    let (code, stderr) = signal_and_wait(
        &logs,
        child,
        Signal::SIGTERM,
        std::time::Duration::from_secs(30),
    )
    .await;
    hung.abort();
    assert_eq!(code, Some(143), "{stderr}");
    assert!(
        stderr.contains("still stopping 5s after the signal: exiting now"),
        "{stderr}"
    );
    logs.assert_free_of(&[DB_PASSWORD, API_TOKEN, USER_KEY]);
}
