//! `osc-agent check`: validates without contacting anything (the server URL points at a closed port).

mod common;

use std::process::Command;

use common::{BIN, PROXY_VARS, default_signals};

/// The agent binary, with default signal dispositions and without the machine's proxy variables.
fn agent() -> Command {
    let mut c = Command::new(BIN);
    for v in PROXY_VARS {
        c.env_remove(v);
    }
    default_signals(&mut c);
    c
}
const SERVER: &str = "http://127.0.0.1:9"; // discard port: nothing listens, nothing may be contacted

fn check(args: &[&str]) -> (i32, String, String) {
    let out = agent()
        .arg("check")
        .args(args)
        .env_remove("OSC_USER_KEY")
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .output()
        .expect("run osc-agent check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_configuration_with_its_files_passes_and_is_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "check-user-key-123\n").unwrap();
    let tpl = dir.path().join("app.j2");
    std::fs::write(&tpl, "url={{ config.url }}\n").unwrap();
    let template = format!(
        "{}:{}",
        tpl.display(),
        dir.path().join("app.conf").display()
    );
    let out = dir.path().join("out").display().to_string();
    let (code, stdout, stderr) = check(&[
        "--server",
        SERVER,
        "--environment",
        "prod",
        "--user-key-file",
        key.to_str().unwrap(),
        "--output-dir",
        &out,
        "--template",
        &template,
        "--action",
        "http:url=http://127.0.0.1:8080/-/reload",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("configuration OK\n"), "{stdout}");
    assert!(
        stdout.contains("environment  prod") && stdout.contains("action       http"),
        "{stdout}"
    );
    assert!(!stdout.contains("check-user-key-123") && !stderr.contains("check-user-key-123"));
    assert!(!dir.path().join("out").exists(), "check writes nothing");
}

#[test]
fn missing_files_and_bad_templates_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").display().to_string();
    let (code, _, stderr) = check(&[
        "--server",
        SERVER,
        "--environment",
        "prod",
        "--user-key-file",
        "/nonexistent/key",
        "--output-dir",
        &out,
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--user-key-file") && stderr.contains("/nonexistent/key"),
        "{stderr}"
    );

    let key = dir.path().join("key");
    std::fs::write(&key, "check-user-key-123").unwrap();
    let tpl = dir.path().join("bad.j2");
    std::fs::write(&tpl, "{% if %}").unwrap();
    let template = format!("{}:{}", tpl.display(), dir.path().join("x").display());
    let (code, _, stderr) = check(&[
        "--server",
        SERVER,
        "--environment",
        "prod",
        "--user-key-file",
        key.to_str().unwrap(),
        "--template",
        &template,
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("bad.j2"), "{stderr}");
}

#[test]
fn skip_files_still_rejects_bad_flags() {
    let base = [
        "--skip-files",
        "--server",
        SERVER,
        "--user-key-file",
        "/var/run/secrets/osc/user-key",
        "--output-dir",
        "/config",
    ];
    // Files elsewhere are not read; the environment may come from the pod.
    let out = agent()
        .arg("check")
        .args(base)
        .env("POD_NAME", "app-0")
        .env("POD_NAMESPACE", "default")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("from this pod's annotation"), "{stdout}");

    let (code, _, stderr) = check(
        &[
            &base[..],
            &["--environment", "prod", "--action", "bogus:x=1"],
        ]
        .concat(),
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--action") || stderr.contains("bogus"),
        "{stderr}"
    );
    let (code, _, stderr) = check(
        &[
            &base[..],
            &["--environment", "prod", "--secret", "Not_A_Name"],
        ]
        .concat(),
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("--secret"), "{stderr}");
    let (code, _, stderr) =
        check(&[&base[..], &["--environment", "prod", "--no-such-flag"]].concat());
    assert_eq!(code, 2);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn errors_never_quote_secrets_from_the_config_file_or_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        "server: http://127.0.0.1:9\naction:\n  - http: {url: \"http://127.0.0.1:8080/\", headers: \
         {Authorization: \"Bearer HEADER-TOKEN-77\"}}\nbogus-key: 1\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&["--skip-files", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("bogus-key") && stderr.contains("line 4"),
        "{stderr}"
    );
    assert!(!stderr.contains("HEADER-TOKEN-77"), "{stderr}");

    let (code, _, stderr) = check(&[
        "--skip-files",
        "--server",
        "https://user:URL-PASSWORD-88@osc.example",
        "--environment",
        "prod",
        "--output-dir",
        "/config",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--server") && stderr.contains("credentials in the URL"),
        "{stderr}"
    );
    assert!(!stderr.contains("URL-PASSWORD-88"), "{stderr}");
}

#[test]
fn outputs_colliding_with_inputs_or_each_other_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "check-user-key-123\n").unwrap();
    let tpl = dir.path().join("t.j2");
    std::fs::write(&tpl, "x\n").unwrap();
    let key_s = key.to_str().unwrap();
    let tpl_s = tpl.to_str().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    let env_file = dir.path().join("app.env");
    let env_s = env_file.to_str().unwrap();
    let base = [
        "--server",
        SERVER,
        "--environment",
        "prod",
        "--user-key-file",
        key_s,
    ];
    let cases: Vec<(Vec<String>, [&str; 2])> = vec![
        (
            vec!["--output".into(), format!("{key_s}:dotenv")],
            ["--output", "--user-key-file"],
        ),
        (
            vec![
                "--output".into(),
                format!("{}/sub/../key:json", dir.path().display()),
            ],
            ["--output", "--user-key-file"],
        ),
        (
            vec!["--template".into(), format!("{tpl_s}:{tpl_s}")],
            ["--template destination", "--template source"],
        ),
        (
            vec![
                "--output".into(),
                format!("{env_s}:dotenv"),
                "--output".into(),
                format!("{env_s}:json"),
            ],
            ["--output", "--output"],
        ),
        (
            vec![
                "--output".into(),
                format!("{env_s}:dotenv"),
                "--template".into(),
                format!("{tpl_s}:{env_s}"),
            ],
            ["--output", "--template destination"],
        ),
        (
            vec!["--output-dir".into(), "/".into()],
            ["--output-dir", "system directory"],
        ),
        (
            vec!["--output-dir".into(), "/etc".into()],
            ["--output-dir", "system directory"],
        ),
        (
            vec!["--output-dir".into(), dir.path().display().to_string()],
            ["--output-dir", "--user-key-file"],
        ),
        (
            vec![
                "--output-dir".into(),
                out_s.into(),
                "--output".into(),
                format!("{out_s}/..data:json"),
            ],
            ["--output", "--output-dir"],
        ),
    ];
    for (extra, named) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter().map(String::as_str));
        let (code, _, stderr) = check(&args);
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        for n in named {
            assert!(stderr.contains(n), "{extra:?} should name {n}: {stderr}");
        }
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        "check-user-key-123\n",
        "the key is untouched"
    );
    // The agent itself refuses the same configuration before contacting anything.
    let run = agent()
        .args(base)
        .args(["--once", "--output", &format!("{key_s}:dotenv")])
        .env_remove("OSC_USER_KEY")
        .output()
        .expect("run osc-agent");
    assert_eq!(run.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        "check-user-key-123\n"
    );
}

/// What a newcomer reads: `check` names output formats as they are written on the command line (not
/// Rust type names), and `--help` says when `--server` is required.
#[test]
fn check_and_help_speak_the_users_words() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "check-user-key-123\n").unwrap();
    let mut args = vec![
        "--server".to_owned(),
        SERVER.to_owned(),
        "--environment".into(),
        "prod".into(),
        "--user-key-file".into(),
        key.display().to_string(),
    ];
    for format in ["dotenv", "json", "yaml", "properties"] {
        args.push("--output".into());
        args.push(format!(
            "{}:{format}",
            dir.path().join(format!("app.{format}")).display()
        ));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = check(&refs);
    assert_eq!(code, 0, "{stderr}");
    for format in ["dotenv", "json", "yaml", "properties"] {
        assert!(
            stdout.contains(&format!("app.{format} ({format})")),
            "{format}: {stdout}"
        );
    }
    for rust_name in ["(Dotenv)", "(Json)", "(Yaml)", "(Properties)"] {
        assert!(!stdout.contains(rust_name), "{stdout}");
    }

    let help = agent().arg("--help").output().expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    let server = help
        .lines()
        .find(|l| l.trim_start().starts_with("--server"))
        .unwrap_or_else(|| panic!("no --server line:\n{help}"));
    assert!(server.contains("Required"), "{server}");
}
