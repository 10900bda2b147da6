//! A reader that keeps reading every file during 500 consecutive syncs never sees a partial file or a
//! mix of two generations. The dev server is a real process; the writer is the agent's own pipeline.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use osc_agent::config::{AgentArgs, Settings};
use osc_agent::sync::Agent;
use serde_json::json;

const KEYS: [&str; 3] = ["alpha", "beta", "gamma"];
const PAD: usize = 48 * 1024;

fn value(generation: usize, key: &str) -> String {
    format!("gen={generation:06};key={key};{};end", "x".repeat(PAD))
}

/// Parse a file written by `value`; `None` if it is not a whole file.
fn generation_of(bytes: &[u8], key: &str) -> Option<usize> {
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix("gen=")?;
    let generation: usize = rest.get(..6)?.parse().ok()?;
    (text == value(generation, key)).then_some(generation)
}

/// Read all files of one generation the documented way: resolve `..data` once, read below it.
fn read_consistent(dir: &Path) -> Option<Vec<(String, Vec<u8>)>> {
    let target = std::fs::read_link(dir.join("..data")).ok()?;
    let generation: PathBuf = dir.join(target);
    KEYS.iter()
        .map(|k| {
            std::fs::read(generation.join(k))
                .ok()
                .map(|b| (k.to_string(), b))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_partial_files_or_mixed_generations() {
    forget_proxy_vars_of_this_process();
    let logs = Logs::default();
    let server = DevServer::start(&logs, &[]).await;
    let api = server.api();
    for k in KEYS {
        api.create("prod", k, json!(value(0, k))).await;
    }
    let scratch = Scratch::new();
    let out = scratch.path("out");
    let settings = Settings::from_args(AgentArgs {
        server: Some(server.url.clone()),
        environment: Some("prod".into()),
        user_key_file: Some(scratch.path("user-key")),
        output_dir: Some(out.clone()),
        ..Default::default()
    })
    .expect("settings");
    let agent = Agent::new(&settings).expect("agent");
    agent.sync_once().await.expect("first sync");

    let stop = Arc::new(AtomicBool::new(false));
    // Reader 1: whole generations through `..data`.
    let consistent = {
        let (stop, out) = (stop.clone(), out.clone());
        std::thread::spawn(move || {
            let (mut reads, mut seen) = (0usize, BTreeSet::new());
            while !stop.load(Ordering::Relaxed) {
                let Some(files) = read_consistent(&out) else {
                    continue;
                };
                let gens: BTreeSet<usize> = files
                    .iter()
                    .map(|(k, b)| generation_of(b, k).unwrap_or_else(|| panic!("partial file {k}")))
                    .collect();
                assert_eq!(gens.len(), 1, "mixed generations in one read: {gens:?}");
                seen.extend(gens);
                reads += 1;
            }
            (reads, seen)
        })
    };
    // Reader 2: each visible file on its own, always whole.
    let single = {
        let (stop, out) = (stop.clone(), out.clone());
        std::thread::spawn(move || {
            let mut reads = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for k in KEYS {
                    if let Ok(bytes) = std::fs::read(out.join(k)) {
                        assert!(generation_of(&bytes, k).is_some(), "partial read of {k}");
                        reads += 1;
                    }
                }
            }
            reads
        })
    };

    for generation in 1..=500 {
        for k in KEYS {
            api.update("prod", k, json!(value(generation, k))).await;
        }
        let report = agent.sync_once().await.expect("sync");
        assert_eq!(report.changed.len(), 1, "generation {generation} swapped");
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, seen) = consistent.join().expect("reader 1 found a violation");
    let single_reads = single.join().expect("reader 2 found a violation");

    let last = read_consistent(&out).expect("final read");
    for (k, b) in &last {
        assert_eq!(
            generation_of(b, k),
            Some(500),
            "{k} holds the last generation"
        );
    }
    assert!(
        reads > 100 && single_reads > 100,
        "readers ran: {reads} / {single_reads}"
    );
    assert!(
        seen.len() > 20,
        "reader saw many generations: {}",
        seen.len()
    );
    assert_eq!(
        hidden(&out).len(),
        2,
        "one generation left: {:?}",
        hidden(&out)
    );
}
