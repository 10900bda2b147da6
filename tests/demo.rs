//! `osc-agent demo`, as a newcomer runs it: it syncs the sample entries, shows a live update, prints
//! the command to change an entry, and reports that change when it lands; Ctrl-C (SIGINT) stops it.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn demo_shows_a_live_update_and_reports_a_later_edit() {
    let logs = Logs::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = clean_command(BIN)
        .arg("demo")
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    let mut until = async |what: &str, done: &dyn Fn(&str) -> bool| {
        tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                seen.push_str(&line);
                seen.push('\n');
                if done(&line) {
                    return line;
                }
            }
            panic!("the demo ended before {what}:\n{seen}")
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
    };

    until("the first sync", &|l| l.starts_with("Synced 5 keys")).await;
    until("the live update", &|l| {
        l.starts_with("Live update landed in")
    })
    .await;
    // The printed command's URL, used as a newcomer would use it with curl.
    let url_line = until("the URL of the suggested edit", &|l| {
        l.contains("/configs/log.level?environment=demo")
    })
    .await;
    let url = url_line.trim().trim_matches('\'').to_owned();
    until("the invitation to edit", &|l| l.contains("Ctrl-C stops")).await;
    let answer = http_client()
        .put(&url)
        .header("X-User-Key", "osc-demo-user-key")
        .json(&serde_json::json!({"value": "warning"}))
        .send()
        .await
        .expect("PUT the suggested edit");
    assert!(answer.status().is_success(), "{}", answer.status());
    until("the report of the edit", &|l| {
        l.starts_with("Update landed") && l.contains("holds \"warning\"")
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("osc-demo/config/log.level")).expect("log.level"),
        "warning"
    );

    let pid = nix::unistd::Pid::from_raw(child.id().expect("running") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the demo stops on Ctrl-C")
        .expect("wait");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    logs.push(&stderr);
    assert_eq!(status.code(), Some(0), "{stderr}");
    logs.assert_free_of(&["osc-demo-user-key"]);
}
