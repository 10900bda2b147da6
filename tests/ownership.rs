//! Files the agent does not own: links at a target are never followed, what the agent did not create is
//! never removed, one agent per output (a lock), leftovers of a killed run are cleaned at start, created
//! directories get the requested mode and owner whatever the umask, and changed keys after a restart
//! are computed against what is on disk. Real agent processes, the dev server, real files.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

const SECRET: &str = "ownership-secret-Vx93";
const WAIT: Duration = Duration::from_secs(30);

fn secret(n: usize) -> String {
    format!("{SECRET}-{n}")
}

/// A dev server holding `a`, `b`, `c` in `prod`.
async fn server_abc(logs: &Logs) -> DevServer {
    let server = DevServer::start(logs, &[]).await;
    let api = server.api();
    for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
        api.create("prod", k, json!(secret(i))).await;
    }
    server
}

/// `--once` arguments without any output: add them.
fn once_bare(server: &DevServer, scratch: &Scratch, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--once",
        "--server",
        &server.url,
        "--environment",
        "prod",
        "--user-key-file",
        &scratch.key_file(),
        "--max-retries",
        "1",
        "--retry-initial-delay",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).expect("lstat").mode() & 0o7777
}

fn generation_of(dir: &Path) -> String {
    std::fs::read_link(dir.join("..data"))
        .expect("..data")
        .display()
        .to_string()
}

// Kind 7: a link at the target is refused, never written through.
#[tokio::test]
async fn in_place_never_writes_through_a_symlink() {
    let logs = Logs::default();
    let server = server_abc(&logs).await;
    let scratch = Scratch::new();
    // Two victims: links to one file would make the two outputs one path (a configuration error).
    let victims = [
        scratch.write("victim.env", "owned by someone else\n"),
        scratch.write("victim.conf", "owned by someone else\n"),
    ];
    for victim in &victims {
        std::fs::set_permissions(victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let env_link = scratch.path("app.env");
    let conf_link = scratch.path("app.conf");
    std::os::unix::fs::symlink(&victims[0], &env_link).unwrap();
    std::os::unix::fs::symlink(&victims[1], &conf_link).unwrap();
    let template = scratch.write("app.conf.j2", "a={{ config.a }}\n");
    let output = format!("{}:dotenv", env_link.display());
    let tpl = format!("{}:{}", template.display(), conf_link.display());

    for in_place in [true, false] {
        let mut extra = vec!["--output", &output, "--template", &tpl];
        if in_place {
            extra.push("--in-place");
        }
        let r = run_agent(&logs, &strs(&once_bare(&server, &scratch, &extra)), &[]).await;
        assert_eq!(r.code, 5, "{r:?}");
        for link in [&env_link, &conf_link] {
            assert!(
                r.stderr.contains(&format!("{}: ", link.display())),
                "the error names {}: {}",
                link.display(),
                r.stderr
            );
        }
        assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
        assert_eq!(r.stderr.contains("--in-place never writes"), in_place);
        for (victim, link) in victims.iter().zip([&env_link, &conf_link]) {
            assert_eq!(
                std::fs::read_to_string(victim).unwrap(),
                "owned by someone else\n"
            );
            assert_eq!(mode(victim), 0o644, "not chmod'ed through the link");
            assert!(
                std::fs::symlink_metadata(link)
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
        }
    }
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// Kind 8: a user's `..backup/` survives every write.
#[tokio::test]
async fn a_users_dot_dot_directory_is_never_removed() {
    let logs = Logs::default();
    let server = server_abc(&logs).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    scratch.write("out/..backup/old-config", "user's own copy\n");
    let args = live_args(&server.url, &scratch, &out, &["--once"]);
    for n in 0..3 {
        if n > 0 {
            server
                .api()
                .update("prod", "a", json!(secret(10 + n)))
                .await;
        }
        let r = run_agent(&logs, &strs(&args), &[]).await;
        assert_eq!(r.code, 0, "{r:?}");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("..backup/old-config")).unwrap(),
        "user's own copy\n"
    );
    assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), secret(12));
    let mut hidden = hidden(&out);
    hidden.retain(|n| n != "..backup");
    assert_eq!(hidden.len(), 2, "..data and one generation: {hidden:?}");
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// Kind 8: an output directory that is a kubelet-managed volume is refused, untouched.
#[tokio::test]
async fn a_kubelet_volume_is_refused_and_left_untouched() {
    let logs = Logs::default();
    let server = server_abc(&logs).await;
    let scratch = Scratch::new();
    let out = scratch.path("vol");
    let generation = "..2024_05_06_07_08_09.2718281828";
    scratch.write(&format!("vol/{generation}/ca.crt"), "CLUSTER CA\n");
    scratch.write(
        &format!("vol/{generation}/token"),
        "service-account-token\n",
    );
    std::os::unix::fs::symlink(generation, out.join("..data")).unwrap();
    for name in ["ca.crt", "token"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), out.join(name)).unwrap();
    }
    let before = tree(&out);

    let r = run_agent(
        &logs,
        &strs(&live_args(&server.url, &scratch, &out, &["--once"])),
        &[],
    )
    .await;
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr.contains("refusing to manage this directory") && r.stderr.contains(generation),
        "{}",
        r.stderr
    );
    assert_eq!(tree(&out), before, "nothing created, nothing removed");

    // Live mode keeps refusing (and says so in /status) without touching it either.
    let agent = AgentProc::start(&logs, &strs(&live_args(&server.url, &scratch, &out, &[]))).await;
    wait_for("the refusal in /status", WAIT, || async {
        agent.status().await["sync"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refusing to manage"))
    })
    .await;
    assert_eq!(agent.get("/readyz").await.0, 503);
    agent.terminate().await;
    assert_eq!(tree(&out), before);
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// Kind 8, upgrades: a directory written by the previous release (no lock file) is adopted.
#[tokio::test]
async fn a_directory_of_the_previous_release_is_adopted() {
    let logs = Logs::default();
    let server = server_abc(&logs).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let args = live_args(&server.url, &scratch, &out, &["--once"]);
    assert_eq!(run_agent(&logs, &strs(&args), &[]).await.code, 0);
    // What the previous release leaves: the same layout, no `..osc-agent`, maybe a generation of a
    // crashed write.
    std::fs::remove_file(out.join("..osc-agent")).unwrap();
    let crashed = "..2025_01_01_00_00_00.000000000_0badc0de";
    scratch.write(&format!("out/{crashed}/a"), "half");
    let old = generation_of(&out);

    server.api().update("prod", "b", json!(secret(20))).await;
    let r = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read_to_string(out.join("b")).unwrap(), secret(20));
    assert_ne!(generation_of(&out), old);
    assert!(!out.join(&old).exists() && !out.join(crashed).exists());
    assert_eq!(hidden(&out).len(), 2, "{:?}", hidden(&out));
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// Kind 10: one agent per output; the second one fails clearly and touches nothing, and takes over
// once the first one is gone.
#[tokio::test]
async fn a_second_agent_on_the_same_outputs_is_refused() {
    let logs = Logs::default();
    let server = server_abc(&logs).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let aggregate = scratch.path("files/app.env");
    let output = format!("{}:dotenv", aggregate.display());
    let first = AgentProc::start(
        &logs,
        &strs(&live_args(
            &server.url,
            &scratch,
            &out,
            &["--output", &output],
        )),
    )
    .await;
    first.wait_ready().await;
    let pid = first.child.id().expect("running");
    let before = (tree(&out), tree(&scratch.path("files")));

    // The same directory.
    let r = run_agent(
        &logs,
        &strs(&live_args(&server.url, &scratch, &out, &["--once"])),
        &[],
    )
    .await;
    assert_eq!(r.code, 5, "{r:?}");
    let held = format!("another osc-agent (pid {pid}) holds this output");
    assert!(r.stderr.contains(&held), "{}", r.stderr);
    // Only the same single file, in another directory.
    let elsewhere = scratch.path("elsewhere");
    let r = run_agent(
        &logs,
        &strs(&live_args(
            &server.url,
            &scratch,
            &elsewhere,
            &["--once", "--output", &output],
        )),
        &[],
    )
    .await;
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr.contains(&held) && r.stderr.contains("app.env"),
        "{}",
        r.stderr
    );
    assert_eq!((tree(&out), tree(&scratch.path("files"))), before);

    // A second live agent waits, not ready, and takes over when the first one stops.
    let second = AgentProc::start(
        &logs,
        &strs(&live_args(
            &server.url,
            &scratch,
            &out,
            &["--output", &output],
        )),
    )
    .await;
    wait_for("the lock error in /status", WAIT, || async {
        second.status().await["sync"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("another osc-agent"))
    })
    .await;
    assert_eq!(second.get("/readyz").await.0, 503);
    assert_eq!((tree(&out), tree(&scratch.path("files"))), before);
    assert_eq!(first.terminate().await.0, 0);
    second.wait_ready().await;
    server.api().update("prod", "a", json!(secret(30))).await;
    wait_file(&out.join("a"), &secret(30), WAIT).await;
    second.terminate().await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

// Kinds 11 and 21: what a killed run leaves (temp files of aggregates, a partial generation) is
// removed at the next start, before anything is fetched.
#[tokio::test]
async fn leftovers_of_a_killed_run_are_removed_at_start() {
    let logs = Logs::default();
    let mut server = server_abc(&logs).await;
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let files = scratch.path("files");
    let aggregate = files.join("app.env");
    let json_out = out.join("all.json");
    let outputs = [
        format!("{}:dotenv", aggregate.display()),
        format!("{}:json", json_out.display()),
    ];
    let args = live_args(
        &server.url,
        &scratch,
        &out,
        &["--once", "--output", &outputs[0], "--output", &outputs[1]],
    );
    assert_eq!(run_agent(&logs, &strs(&args), &[]).await.code, 0);
    let good = (tree(&out), tree(&files));

    // Exactly what SIGKILL leaves mid-write: temp files beside the aggregates, and a generation
    // recorded in `..osc-agent` (recorded before it is created) that `..data` never pointed at.
    let temps = [
        files.join(".app.env.osc-tmp-0a1b2c3d"),
        files.join(".app.env.osc-tmp-99999999"),
        out.join(".all.json.osc-tmp-deadbeef"),
    ];
    for t in &temps {
        std::fs::write(t, format!("A=\"{}\"\n", secret(0))).unwrap();
    }
    let not_ours = [
        files.join(".app.env.osc-tmp-notmine1"),
        files.join(".other.env.osc-tmp-0a1b2c3d"),
    ];
    for t in &not_ours {
        std::fs::write(t, "someone else's").unwrap();
    }
    let partial = "..2026_01_01_00_00_00.000000000_5ca1ab1e";
    scratch.write(&format!("out/{partial}/a"), &secret(0)[..4]);
    let state_path = out.join("..osc-agent");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["generations"]
        .as_array_mut()
        .expect("generations")
        .push(json!(partial));
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    std::os::unix::fs::symlink(partial, out.join("..data_tmp")).unwrap();

    // Even a run that fails (server down) cleans them, and leaves the good files exactly as they were.
    server.kill().await;
    let r = run_agent(&logs, &strs(&args), &[]).await;
    assert_eq!(r.code, 3, "{r:?}");
    for t in &temps {
        assert!(!t.exists(), "{} left", t.display());
    }
    for t in &not_ours {
        assert!(t.exists(), "{} removed", t.display());
    }
    assert!(!out.join(partial).exists());
    assert!(std::fs::symlink_metadata(out.join("..data_tmp")).is_err());
    let mut now = (tree(&out), tree(&files));
    now.0.remove("..osc-agent");
    now.1
        .retain(|k, _| !k.starts_with(".app.env.osc-tmp-notmine") && !k.starts_with(".other"));
    let mut good = good;
    good.0.remove("..osc-agent");
    assert_eq!(now, good, "the good files are untouched");
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

/// Whether this process may chown (root): a file it creates is owned by uid 0.
fn is_root(scratch: &Scratch) -> bool {
    let probe = scratch.write("root-probe", "");
    std::fs::metadata(probe).expect("probe").uid() == 0
}

// Kind 12: directories the agent creates get the search bits of --file-mode and --uid/--gid,
// whatever the umask; existing directories keep theirs.
#[tokio::test]
async fn created_directories_follow_file_mode_and_owner_not_the_umask() {
    let logs = Logs::default();
    let server = server_abc(&logs).await;
    for umask in [0o077, 0o000] {
        let scratch = Scratch::new();
        let root = is_root(&scratch);
        if !root {
            eprintln!("SKIPPED (ownership part): not root, --uid/--gid not checked");
        }
        let existing = scratch.path("vol");
        std::fs::create_dir(&existing).unwrap();
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o711)).unwrap();
        let template = scratch.write("t.j2", "a={{ config.a }}\n");
        let out = existing.join("app");
        let output = format!("{}:dotenv", existing.join("files/deep/app.env").display());
        let tpl = format!(
            "{}:{}",
            template.display(),
            existing.join("tpl/app.conf").display()
        );
        let mut extra = vec![
            "--once",
            "--file-mode",
            "0440",
            "--output",
            &output,
            "--template",
            &tpl,
        ];
        if root {
            extra.extend(["--uid", "1234", "--gid", "5678"]);
        }
        let args = live_args(&server.url, &scratch, &out, &extra);
        let r = run_agent_umask(&logs, &strs(&args), &[], Some(umask)).await;
        assert_eq!(r.code, 0, "{r:?}");

        let generation = out.join(generation_of(&out));
        for dir in [
            out.clone(),
            generation.clone(),
            existing.join("files"),
            existing.join("files/deep"),
            existing.join("tpl"),
        ] {
            assert_eq!(
                mode(&dir),
                0o750,
                "{} under umask {umask:03o}",
                dir.display()
            );
            if root {
                let meta = std::fs::metadata(&dir).unwrap();
                assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{}", dir.display());
            }
        }
        for file in [
            generation.join("a"),
            existing.join("files/deep/app.env"),
            existing.join("tpl/app.conf"),
        ] {
            assert_eq!(mode(&file), 0o440, "{}", file.display());
        }
        assert_eq!(
            mode(&existing),
            0o711,
            "an existing directory is not changed"
        );
    }
    logs.assert_free_of(&[SECRET, USER_KEY]);
}

/// An exec action that appends `$OSC_CHANGED_KEYS` (newlines as spaces) as one line per run.
fn keys_action(scratch: &Scratch) -> (String, std::path::PathBuf) {
    let runs = scratch.path("changed-keys");
    let script = scratch.write(
        "keys.sh",
        &format!(
            "printf '%s\\n' \"$(printf '%s' \"$OSC_CHANGED_KEYS\" | tr '\\n' ' ')\" >> {}\n",
            runs.display()
        ),
    );
    (format!("exec:command=sh {}", script.display()), runs)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

// Kind 23 (changed keys): the first action after a restart names only the keys that changed on disk.
#[tokio::test]
async fn changed_keys_after_a_restart_are_computed_against_the_disk() {
    let logs = Logs::default();
    let server = server_abc(&logs).await;
    let api = server.api();
    let scratch = Scratch::new();
    let (action, runs) = keys_action(&scratch);
    let out = scratch.path("out");
    let aggregate = format!("{}:dotenv", scratch.path("only/app.env").display());

    // --once with the directory, and --once with only an aggregate file.
    let with_dir = live_args(
        &server.url,
        &scratch,
        &out,
        &["--once", "--action", &action],
    );
    let only_file = once_bare(
        &server,
        &scratch,
        &["--output", &aggregate, "--action", &action],
    );
    for args in [&with_dir, &only_file] {
        assert_eq!(run_agent(&logs, &strs(args), &[]).await.code, 0);
    }
    assert_eq!(lines(&runs), Vec::<String>::new(), "fresh start: no action");

    api.update("prod", "b", json!(secret(40))).await;
    for args in [&with_dir, &only_file] {
        let r = run_agent(&logs, &strs(args), &[]).await;
        assert_eq!(r.code, 0, "{r:?}");
    }
    assert_eq!(lines(&runs), vec!["b", "b"]);

    api.delete("prod", "c").await;
    api.create("prod", "d", json!(secret(41))).await;
    for args in [&with_dir, &only_file] {
        assert_eq!(run_agent(&logs, &strs(args), &[]).await.code, 0);
    }
    assert_eq!(lines(&runs)[2..], ["c d", "c d"]);

    // Live mode restarted on up-to-date files except one changed key.
    api.update("prod", "a", json!(secret(42))).await;
    let agent = AgentProc::start(
        &logs,
        &strs(&live_args(
            &server.url,
            &scratch,
            &out,
            &["--action", &action],
        )),
    )
    .await;
    wait_for("the first action after the restart", WAIT, || async {
        lines(&runs).len() == 5
    })
    .await;
    assert_eq!(lines(&runs)[4], "a");
    agent.terminate().await;
    logs.assert_free_of(&[SECRET, USER_KEY]);
}
