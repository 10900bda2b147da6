//! Values and templates, end to end through `osc-agent --once`: dotenv files that third-party readers
//! (bash, dash, python-dotenv, Node dotenv) read back exactly and that run no code when sourced; numbers
//! exactly as the server sent them in every output; one deeply nested value that does not fail the
//! environment; templates that never hide a missing key.
//!
//! The dotenv readers come from the registries (`.ci/interop-deps.sh` installs them under
//! `target/interop/`). A reader that is missing skips its part with a SKIPPED line on stderr, or fails
//! the test when `OSC_REQUIRE_INTEROP=1` (as in CI).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn once_args(server: &str, scratch: &Scratch, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--once".into(),
        "--server".into(),
        server.to_owned(),
        "--environment".into(),
        "prod".into(),
        "--user-key-file".into(),
        scratch.key_file(),
        "--max-retries".into(),
        "0".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

async fn once(logs: &Logs, server: &str, scratch: &Scratch, extra: &[&str]) -> Run {
    run_agent(logs, &strs(&once_args(server, scratch, extra)), &[]).await
}

fn raw(json_text: &str) -> Value {
    serde_json::from_str(json_text).expect("test JSON")
}

/// A fake OpenSecureConf server on 127.0.0.1 answering every `GET /configs…` with `body` as it is (the
/// dev server would re-serialize it), anything else with 404. Runs until the test ends.
async fn fake_list_server(body: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request);
                let (status, body) = if head.starts_with("GET /configs") {
                    ("200 OK", body)
                } else {
                    ("404 Not Found", r#"{"detail":"Not Found"}"#.to_owned())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    url
}

/// A list response body with these `(key, raw JSON value)` entries.
fn list_body(entries: &[(&str, &str)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .enumerate()
        .map(|(i, (key, value))| {
            format!(
                r#"{{"id":{},"key":{},"category":null,"environment":"prod","value":{value}}}"#,
                i + 1,
                serde_json::to_string(key).expect("key")
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

// ------------------------------------------------------------------------------------------------
// dotenv readers

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop")
}

fn interop_required() -> bool {
    std::env::var("OSC_REQUIRE_INTEROP").is_ok_and(|v| v == "1")
}

/// A reader is not installed: fail under `OSC_REQUIRE_INTEROP=1`, else say so loudly and go on.
fn reader_missing(reader: &str, why: &str) {
    assert!(
        !interop_required(),
        "{reader} is required (OSC_REQUIRE_INTEROP=1) but unavailable: {why}; run .ci/interop-deps.sh"
    );
    eprintln!(
        "SKIPPED: dotenv reader {reader} unavailable ({why}); install it with .ci/interop-deps.sh \
         (OSC_REQUIRE_INTEROP=1 makes this a failure)"
    );
}

/// Variables as a shell sees them after `set -a; . ./app.env` (empty environment, cwd `dir`).
fn shell_reads(shell: &str, dir: &Path) -> Option<BTreeMap<String, String>> {
    let out = Command::new(shell)
        .args(["-c", "set -a; . ./app.env; exec env -0"])
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "{shell} could not source app.env: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{shell} complained: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        out.stdout
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .filter_map(|v| {
                let text = String::from_utf8(v.to_vec()).expect("UTF-8 environment");
                let (k, v) = text.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect(),
    )
}

const PYTHON_READER: &str = r#"
import json, sys
from dotenv import dotenv_values
print(json.dumps(dotenv_values(sys.argv[1])))
"#;

const NODE_READER: &str = r#"
const dotenv = require(process.argv[1]);
const fs = require("fs");
process.stdout.write(JSON.stringify(dotenv.parse(fs.readFileSync(process.argv[2]))));
"#;

/// Variables as python-dotenv's `dotenv_values` (default interpolation) or Node's `dotenv.parse` read
/// them; `None` when that reader is not installed.
fn library_reads(reader: &str, dir: &Path) -> Option<BTreeMap<String, String>> {
    let file = dir.join("app.env");
    let mut cmd = match reader {
        "python-dotenv" => {
            let lib = interop_dir().join("python");
            if !lib.join("dotenv").is_dir() {
                reader_missing(reader, &format!("{} is missing", lib.display()));
                return None;
            }
            let mut c = Command::new("python3");
            c.args(["-c", PYTHON_READER])
                .arg(&file)
                .env("PYTHONPATH", lib);
            c
        }
        _ => {
            let lib = interop_dir().join("node/node_modules/dotenv");
            if !lib.join("package.json").is_file() {
                reader_missing(reader, &format!("{} is missing", lib.display()));
                return None;
            }
            let mut c = Command::new("node");
            c.args(["-e", NODE_READER]).arg(&lib).arg(&file);
            c
        }
    };
    let out = match cmd.current_dir(dir).env_remove("HOME").output() {
        Ok(out) => out,
        Err(e) => {
            reader_missing(reader, &format!("cannot run its interpreter: {e}"));
            return None;
        }
    };
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{reader} failed or warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: BTreeMap<String, Value> =
        serde_json::from_slice(&out.stdout).expect("reader prints a JSON object");
    Some(
        parsed
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect(),
    )
}

/// The hard values of the dotenv table: key (a valid variable name), the value sent, the text read back.
fn hard_values() -> Vec<(&'static str, Value, String)> {
    let strings: &[(&str, &str)] = &[
        ("NEWLINE", "line1\nline2"),
        ("TRAILING_NEWLINE", "x\n"),
        ("TAB", "a\tb"),
        ("SINGLE_QUOTE", "it's"),
        ("SINGLE_QUOTE_LINES", "it's\n# not a comment\nX=1"),
        ("DOUBLE_QUOTE", "say \"hi\""),
        ("BACKTICK", "pa`touch CANARY_BACKTICK`ss"),
        ("COMMAND", "$(touch CANARY_COMMAND)"),
        ("DOLLAR", "pa$sword $HOME $1 $"),
        ("BRACE_OPEN", "${HOME"),
        ("BRACE_COLON", "${A:b}"),
        ("BACKSLASH", "a\\b c\\n d\\$e"),
        ("HASH", "a#b"),
        ("SPACE_HASH", "a #x"),
        ("EQUALS", "k=v=w"),
        ("SPACES", "  lead and trail  "),
        ("UNICODE", "héllo ☃ 😀 \u{2028} \u{85}"),
        ("EMPTY", ""),
        ("CONTROL", "\u{b}\u{c}\u{1f}\u{7f}"),
        ("INJECTION", "x\nexport INJECTED=1\nALSO=2"),
    ];
    let mut v: Vec<(&'static str, Value, String)> = strings
        .iter()
        .map(|(k, s)| (*k, json!(s), (*s).to_owned()))
        .collect();
    for (k, text) in [
        ("PORT", "5432"),
        ("FLAG", "true"),
        ("OBJECT", r#"{"a":[1,"b c"],"n":null,"f":1.0,"s":"x$y`z`"}"#),
        ("BIG", "123456789012345678901234567890"),
    ] {
        v.push((k, raw(text), text.to_owned()));
    }
    v
}

#[tokio::test]
async fn dotenv_reads_back_exactly_in_shells_python_and_node_and_runs_nothing() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    let values = hard_values();
    for (key, value, _) in &values {
        api.create("prod", key, value.clone()).await;
    }
    let scratch = Scratch::new();
    let env_file = scratch.path("app.env");
    let r = once(
        &logs,
        &server.url,
        &scratch,
        &["--output", &format!("{}:dotenv", env_file.display())],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");

    let expected: BTreeMap<&str, &str> = values.iter().map(|(k, _, t)| (*k, t.as_str())).collect();
    let mut checked = Vec::new();
    for shell in ["bash", "dash", "sh"] {
        let Some(vars) = shell_reads(shell, scratch.dir.path()) else {
            reader_missing(shell, "not installed");
            continue;
        };
        for (k, want) in &expected {
            assert_eq!(
                vars.get(*k).map(String::as_str),
                Some(*want),
                "{shell}: {k}"
            );
        }
        for injected in ["INJECTED", "ALSO", "X"] {
            assert!(!vars.contains_key(injected), "{shell}: {injected} was set");
        }
        checked.push(shell);
    }
    for reader in ["python-dotenv", "node dotenv"] {
        let Some(vars) = library_reads(reader, scratch.dir.path()) else {
            continue;
        };
        let got: BTreeMap<&str, &str> =
            vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, expected, "{reader}");
        checked.push(reader);
    }
    for canary in ["CANARY_BACKTICK", "CANARY_COMMAND"] {
        assert!(
            !scratch.path(canary).exists(),
            "sourcing app.env ran code ({canary} exists); readers run: {checked:?}"
        );
    }
    assert!(checked.contains(&"bash"), "bash must be there: {checked:?}");
    eprintln!("dotenv read back exactly by: {checked:?}");
}

#[tokio::test]
async fn dotenv_refuses_values_a_reader_would_change_naming_the_key() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    api.create("prod", "GOOD", json!("fine")).await;
    let scratch = Scratch::new();
    let env_file = scratch.path("app.env");
    let out = scratch.path("out");
    let extra = [
        "--output".to_owned(),
        format!("{}:dotenv", env_file.display()),
        "--output-dir".to_owned(),
        out.display().to_string(),
    ];
    let r = once(&logs, &server.url, &scratch, &strs(&extra)).await;
    assert_eq!(r.code, 0, "{r:?}");
    let good = std::fs::read(&env_file).expect("app.env");
    let good_dir = tree(&out);

    let bad = [
        ("CR", "pa\rss-1"),
        ("CRLF", "line-one\r\nline-two"),
        ("QUOTES", "it's \"quoted\"-2"),
        ("QUOTE_DOLLAR", "it's $five-3"),
        ("DOUBLE_BACKSLASH", "C:\\\\share-4"),
        ("TRAILING_BACKSLASH", "ends-5\\"),
        ("BRACED", "${HOME}/secret-6"),
        ("BRACED_DEFAULT", "x${A:-b}-7"),
        ("NUL", "nul\u{0}-8"),
    ];
    for (key, value) in bad {
        api.create("prod", key, json!(value)).await;
        let r = once(&logs, &server.url, &scratch, &strs(&extra)).await;
        assert_eq!(r.code, 5, "{key}: {r:?}");
        assert!(
            r.stderr.contains(&format!("key '{key}'")) && r.stderr.contains("app.env"),
            "{key}: {}",
            r.stderr
        );
        assert_eq!(
            std::fs::read(&env_file).unwrap(),
            good,
            "{key}: app.env changed"
        );
        assert_eq!(tree(&out), good_dir, "{key}: nothing written at all");
        api.delete("prod", key).await;
    }
    let secrets: Vec<&str> = bad.iter().map(|(_, v)| *v).collect();
    logs.assert_free_of(&secrets);
}

// ------------------------------------------------------------------------------------------------
// numbers

/// Values with numbers no 64-bit type holds or that print differently once parsed.
const NUMBERS: &str = r#"{"big":-123456789012345678901234567890123,"one":1.0,"inf":1e400,"neg0":-0,"tenth":0.1,"exp":1E5,"py":1e-07,"int":5432}"#;
const BIG: &str = "123456789012345678901234567890";
const SENT: [&str; 9] = [
    BIG,
    "-123456789012345678901234567890123",
    "1.0",
    "1e400",
    "-0",
    "0.1",
    "1E5",
    "1e-07",
    "5432",
];

#[tokio::test]
async fn numbers_come_out_exactly_as_sent_in_every_output() {
    let logs = Logs::default();
    let server = fake_list_server(list_body(&[("big", BIG), ("nums", NUMBERS)])).await;
    let scratch = Scratch::new();
    let p = |name: &str| scratch.path(name).display().to_string();
    let template = scratch.write(
        "t.j2",
        "{{ config.big }} {{ config.big | tojson }} {{ config.nums | tojson }} \
         {% for k, v in config.nums | items %}{{ v }} {% endfor %}{{ config.nums }}\n",
    );
    let args = [
        "--output-dir".to_owned(),
        p("out"),
        "--output".into(),
        format!("{}:json", p("all.json")),
        "--output".into(),
        format!("{}:yaml", p("all.yaml")),
        "--output".into(),
        format!("{}:dotenv", p("all.env")),
        "--output".into(),
        format!("{}:properties", p("all.properties")),
        "--template".into(),
        format!("{}:{}", template.display(), p("t.out")),
    ];
    let r = once(&logs, &server, &scratch, &strs(&args)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(scratch.path("out/big")).unwrap(),
        format!("{BIG}\n")
    );
    let read = |name: &str| std::fs::read_to_string(scratch.path(name)).expect(name);
    for file in ["out/nums", "all.json", "all.env", "all.properties", "t.out"] {
        let text = read(file);
        for n in SENT {
            assert!(text.contains(n), "{file} lacks {n}:\n{text}");
        }
        assert!(
            !text.contains("e+"),
            "{file} respelled an exponent:\n{text}"
        );
    }
    let t = read("t.out");
    assert!(
        t.starts_with(&format!("{BIG} {BIG} {{\"big\": -123456789012345678901234567890123, \"one\": 1.0, \"inf\": 1e400")),
        "{t}"
    );
    assert!(
        t.contains("-123456789012345678901234567890123 1.0 1e400 -0 0.1 1E5 1e-07 5432 {"),
        "{t}"
    );
    let yaml = read("all.yaml");
    assert!(yaml.contains(&format!("big: {BIG}\n")), "{yaml}");
    for n in ["-123456789012345678901234567890123", "1.0", "0.1", "5432"] {
        assert!(yaml.contains(&format!(": {n}\n")), "{n} in {yaml}");
    }
    for n in ["1e400", "-0", "1E5", "1e-07"] {
        assert!(
            yaml.contains(&format!("> \"{n}\"\n")),
            "{n} (tagged) in {yaml}"
        );
    }

    // The YAML value format of --output-dir (and of ConfigMap/Secret data).
    let args = [
        "--output-dir".to_owned(),
        p("out-yaml"),
        "--value-format".into(),
        "yaml".into(),
    ];
    let r = once(&logs, &server, &scratch, &strs(&args)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(read("out-yaml/big"), format!("{BIG}\n"));
    let nums = read("out-yaml/nums");
    assert!(
        nums.contains("one: 1.0\n") && nums.contains("\"1e400\""),
        "{nums}"
    );
    assert!(!nums.contains("private"), "{nums}");
}

#[tokio::test]
async fn a_big_integer_survives_the_dev_server_and_the_agent() {
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    server.api().create("prod", "big", raw(BIG)).await;
    server
        .api()
        .create(
            "prod",
            "nested",
            raw(&format!(r#"{{"n":{BIG},"f":[1.0,0.1]}}"#)),
        )
        .await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let r = once(
        &logs,
        &server.url,
        &scratch,
        &["--output-dir", &out.display().to_string()],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(out.join("big")).unwrap(),
        format!("{BIG}\n")
    );
    assert_eq!(
        std::fs::read_to_string(out.join("nested")).unwrap(),
        format!("{{\n  \"n\": {BIG},\n  \"f\": [\n    1.0,\n    0.1\n  ]\n}}\n")
    );
}

// ------------------------------------------------------------------------------------------------
// nesting

fn nested(levels: usize) -> String {
    format!("{}\"deep\"{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test]
async fn one_deeply_nested_value_is_skipped_and_the_others_sync() {
    for levels in [osc_agent::state::MAX_VALUE_DEPTH + 1, 200, 100_000] {
        let logs = Logs::default();
        let deep = nested(levels);
        let fine = nested(osc_agent::state::MAX_VALUE_DEPTH);
        let server = fake_list_server(list_body(&[
            ("a", r#""first""#),
            ("deep.key\nforged line", &deep),
            ("deepest.ok", &fine),
            ("z", r#"{"k":[1,2]}"#),
        ]))
        .await;
        let scratch = Scratch::new();
        let out = scratch.path("out");
        let all = scratch.path("all.json");
        let args = [
            "--output-dir".to_owned(),
            out.display().to_string(),
            "--output".into(),
            format!("{}:json", all.display()),
        ];
        let r = once(&logs, &server, &scratch, &strs(&args)).await;
        assert_eq!(r.code, 0, "{levels} levels: {r:?}");
        assert_eq!(visible(&out), ["a", "deepest.ok", "z"], "{levels} levels");
        // (The aggregate nests one level deeper than serde_json's default limit: compare its text.)
        let agg = std::fs::read_to_string(&all).unwrap();
        assert!(
            agg.starts_with("{\n  \"a\": \"first\",\n  \"deepest.ok\": [")
                && agg.contains("\n  \"z\": {")
                && !agg.contains("deep.key"),
            "{levels} levels"
        );
        let warning: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.contains("deep.key"))
            .collect();
        assert_eq!(
            warning.len(),
            1,
            "{levels} levels: one warning\n{}",
            r.stderr
        );
        assert!(
            warning[0].contains("deep.key\\nforged line") && warning[0].contains("127 levels"),
            "{}",
            warning[0]
        );
        assert!(
            !r.stderr.lines().any(|l| l.starts_with("forged line")),
            "a key forged a log line:\n{}",
            r.stderr
        );
    }
}

// ------------------------------------------------------------------------------------------------
// templates

async fn template_server(logs: &Logs) -> DevServer {
    let server = DevServer::start(logs, &[]).await;
    server
        .api()
        .create(
            "prod",
            "db",
            json!({"user": "app", "password": "pw-Tmpl-secret", "opt": null, "on": true}),
        )
        .await;
    server
        .api()
        .create("prod", "list", json!([null, true, 1, "x"]))
        .await;
    server
}

#[tokio::test]
async fn templates_fail_on_a_missing_attribute_in_any_position() {
    let logs = Logs::default();
    let server = template_server(&logs).await;
    let scratch = Scratch::new();
    for (i, src) in [
        "{{ config[\"db\"].passwrd | tojson }}",
        "{{ [config.db.user, config.db.passwrd] | join(\",\") }}",
        "{{ config.db.passwrd | length }}",
        "{{ {\"p\": config.db.passwrd} | tojson }}",
        "{% if config.db.passwrd is none %}x{% endif %}",
    ]
    .iter()
    .enumerate()
    {
        let template = scratch.write(&format!("t{i}.j2"), &format!("ok\n{src}\n"));
        let dest = scratch.path(&format!("t{i}.out"));
        let spec = format!("{}:{}", template.display(), dest.display());
        let r = once(&logs, &server.url, &scratch, &["--template", &spec]).await;
        assert_eq!(r.code, 5, "{src}: {r:?}");
        assert!(
            r.stderr.contains("'passwrd'")
                && r.stderr.contains("key 'db'")
                && r.stderr.contains(&format!("t{i}.j2"))
                && r.stderr.contains("line 2"),
            "{src}: {}",
            r.stderr
        );
        assert!(!dest.exists(), "{src}: nothing written");
    }
    logs.assert_free_of(&["pw-Tmpl-secret"]);
}

#[tokio::test]
async fn templates_print_null_and_booleans_like_json_everywhere() {
    let logs = Logs::default();
    let server = template_server(&logs).await;
    let scratch = Scratch::new();
    let template = scratch.write(
        "t.j2",
        "{{ config.db.opt }}|{{ config.db.on }}|{{ config.db.opt is none }}|\
         {{ config.db.passwrd | default(\"unset\") }}|{{ config.list }}|\
         {% for v in config.list %}{{ v }},{% endfor %}|{{ config.list | join(\";\") }}|\
         {{ config.db.opt | string }}|{{ config.db | tojson }}\n",
    );
    let dest = scratch.path("t.out");
    let spec = format!("{}:{}", template.display(), dest.display());
    let r = once(&logs, &server.url, &scratch, &["--template", &spec]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(&dest).unwrap(),
        "null|true|true|unset|[null, true, 1, \"x\"]|null,true,1,x,|null;true;1;x|null|\
         {\"user\": \"app\", \"password\": \"pw-Tmpl-secret\", \"opt\": null, \"on\": true}\n"
    );
}
