//! Names from the server (keys) reach log lines and error messages escaped: a key holding a newline
//! cannot forge a log line, NUL and escape sequences never reach the terminal raw (issue 9, kind 6).

mod common;

use common::*;
use serde_json::json;

/// A key whose name tries to start a forged log line.
const FORGED: &str = "evil\n2001-01-01T00:00:00.000000Z  INFO forged: credentials rotated";

/// Every stderr line is a real record: a text log line (current timestamp), a JSON record, or the final
/// `osc-agent: error:` line; no raw NUL or escape byte anywhere.
fn assert_one_record_per_line(stderr: &str, json: bool) {
    assert!(!stderr.contains('\0'), "raw NUL in stderr:\n{stderr:?}");
    assert!(!stderr.contains('\u{1b}'), "raw ESC in stderr:\n{stderr:?}");
    for line in stderr.lines() {
        let ok = if json {
            serde_json::from_str::<serde_json::Value>(line).is_ok()
        } else {
            line.starts_with("20") && line.as_bytes().get(4) == Some(&b'-')
        };
        assert!(
            ok || line.starts_with("osc-agent: error: "),
            "a line that is not a record of the agent: {line:?}\nall:\n{stderr}"
        );
        assert!(!line.starts_with("2001-"), "forged line: {line:?}");
    }
}

#[tokio::test]
async fn hostile_key_names_cannot_forge_log_lines_or_errors() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    for key in [
        FORGED,
        "nul\u{0}key",
        "esc\u{1b}[2Jclear",
        "bidi\u{202e}txt.exe",
        "ok",
    ] {
        api.create("prod", key, json!("log-injection-value")).await;
    }
    let scratch = Scratch::new();
    let key = scratch.key_file();
    let out = scratch.path("out");
    let out = out.to_str().expect("utf-8 path");
    for format in ["text", "json"] {
        let run = run_agent(
            &logs,
            &[
                "--once",
                "--server",
                &server.url,
                "--user-key-file",
                &key,
                "--environment",
                "prod",
                "--output-dir",
                out,
                "--log-format",
                format,
            ],
            &[],
        )
        .await;
        assert_eq!(run.code, 0, "{run:?}");
        assert_one_record_per_line(&run.stderr, format == "json");
        // The keys with control characters are left out of the directory, named (escaped) in warnings.
        assert!(
            run.stderr.contains("evil\\n2001-01-01") || run.stderr.contains("evil\\\\n2001-01-01"),
            "the forged key is named, escaped: {}",
            run.stderr
        );
        let mut names: Vec<String> = std::fs::read_dir(scratch.path("out"))
            .expect("output dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".."))
            .collect();
        names.sort();
        assert_eq!(names, vec!["ok"], "no file name with a control character");
    }

    // An error naming hostile keys (two keys mapping to one dotenv name) is one line too.
    api.create("prod", "a\nb", json!("log-injection-value"))
        .await;
    api.create("prod", "a_b", json!("log-injection-value"))
        .await;
    let env_file = scratch.path("app.env");
    let run = run_agent(
        &logs,
        &[
            "--once",
            "--server",
            &server.url,
            "--user-key-file",
            &key,
            "--environment",
            "prod",
            "--output",
            &format!("{}:dotenv", env_file.display()),
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, 5, "{run:?}");
    assert_one_record_per_line(&run.stderr, false);
    // Debug records of the HTTP pool may come from another thread after the error line.
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("osc-agent: error: "))
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains("a\\nb"),
        "one error line naming the key, escaped: {errors:?}\n{}",
        run.stderr
    );
    logs.assert_free_of(&["log-injection-value", USER_KEY]);
}

/// Paths and names the user gives (a file path, an output directory, the environment) reach log lines
/// and errors escaped too: a newline or an escape sequence in them forges nothing.
#[tokio::test]
async fn hostile_paths_and_names_from_the_command_line_are_escaped() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let scratch = Scratch::new();
    let key = scratch.key_file();
    let forged_dir = scratch.path(FORGED);
    let cases: [(&str, Vec<String>, &str); 3] = [
        (
            "a user key file that does not exist",
            vec![
                "--user-key-file".into(),
                scratch.path(FORGED).display().to_string(),
                "--environment".into(),
                "prod".into(),
                "--output-dir".into(),
                scratch.path("out").display().to_string(),
            ],
            "evil\\n2001-01-01",
        ),
        (
            "an environment with control characters",
            vec![
                "--user-key-file".into(),
                key.clone(),
                "--environment".into(),
                "pr\u{1b}[2Jod\nx".into(),
                "--output-dir".into(),
                scratch.path("out").display().to_string(),
            ],
            "pr\\u{1b}[2Jod\\nx",
        ),
        (
            "an output directory under a file",
            vec![
                "--user-key-file".into(),
                key.clone(),
                "--environment".into(),
                "prod".into(),
                "--output-dir".into(),
                format!("{}/{FORGED}", key),
            ],
            "evil\\n2001-01-01",
        ),
    ];
    server
        .api()
        .create("prod", "ok", json!("log-injection-value"))
        .await;
    for (what, args, escaped) in cases {
        let mut all = vec!["--once", "--server", &server.url];
        all.extend(args.iter().map(String::as_str));
        let run = run_agent(&logs, &all, &[]).await;
        assert_ne!(run.code, 0, "{what}: {run:?}");
        assert_one_record_per_line(&run.stderr, false);
        assert!(
            run.stderr.contains(escaped),
            "{what}: named, escaped as {escaped:?}:\n{}",
            run.stderr
        );
    }
    assert!(!forged_dir.exists());
    logs.assert_free_of(&["log-injection-value", USER_KEY]);
}
