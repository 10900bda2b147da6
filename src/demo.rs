//! `osc-agent demo`: a dev server with sample entries, synced into `./osc-demo/`, then watched live: one
//! sample value is changed through the server and the update lands in the files. Ctrl-C stops it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::config::{AgentArgs, OutputSpec, Settings, TemplateSpec};
use crate::devserver::{self, DevServerArgs};
use crate::exit::Exit;
use crate::live::{self, LiveContext, OnDemand};
use crate::sync::Agent;
use crate::telemetry::Telemetry;

const DEMO_USER_KEY: &str = "osc-demo-user-key";
const ENVIRONMENT: &str = "demo";

const TEMPLATE: &str = "\
# Rendered by osc-agent from environment '{{ environment }}'.
[database]
url = postgres://{{ config.database.user }}@{{ config.database.host }}:{{ config.database.port }}/app
[logging]
level = {{ config[\"log.level\"] }}
";

fn samples() -> Vec<serde_json::Value> {
    vec![
        json!({"key": "database", "category": "database",
               "value": {"host": "db.internal", "port": 5432, "user": "app", "password": "demo-password-123"}}),
        json!({"key": "log.level", "category": "app", "value": "info"}),
        json!({"key": "feature.flags", "category": "app", "value": {"new_checkout": true, "beta": false}}),
        json!({"key": "allowed.origins", "category": "web",
               "value": ["https://example.com", "https://app.example.com"]}),
        json!({"key": "welcome.message", "category": "web", "value": "Grüß dich! Config arrived safely."}),
    ]
}

pub async fn run(args: DemoArgs) -> Exit {
    match demo(&args).await {
        Ok(()) => Exit::Ok,
        Err(e) => {
            eprintln!("osc-agent demo: error: {e}");
            Exit::Internal
        }
    }
}

async fn demo(args: &DemoArgs) -> Result<(), String> {
    let root = args.dir.as_path();
    let server = devserver::spawn(DevServerArgs::for_demo())
        .await
        .map_err(|e| e.to_string())?;
    let url = server.url();
    println!("Started an in-memory OpenSecureConf dev server at {url}");
    let http = reqwest::Client::new();
    for mut body in samples() {
        body["environment"] = json!(ENVIRONMENT);
        send(http.post(format!("{url}/configs")).json(&body)).await?;
    }
    println!(
        "Stored {} sample entries in environment '{ENVIRONMENT}'.",
        samples().len()
    );

    std::fs::create_dir_all(root.join("templates")).map_err(io(root))?;
    let key_file = root.join("user-key");
    std::fs::write(&key_file, format!("{DEMO_USER_KEY}\n")).map_err(io(&key_file))?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&key_file))?;
    let template = root.join("templates/app.conf.j2");
    std::fs::write(&template, TEMPLATE).map_err(io(&template))?;

    let settings = Settings::from_args(AgentArgs {
        server: Some(url.clone()),
        environment: Some(ENVIRONMENT.into()),
        user_key_file: Some(key_file.clone()),
        output_dir: Some(root.join("config")),
        output: vec![
            OutputSpec {
                path: root.join("app.env"),
                format: crate::config::OutputFormat::Dotenv,
                in_place: false,
            },
            OutputSpec {
                path: root.join("app.json"),
                format: crate::config::OutputFormat::Json,
                in_place: false,
            },
        ],
        template: vec![TemplateSpec {
            source: template.clone(),
            destination: root.join("app.conf"),
            in_place: false,
        }],
        admin_addr: Some("off".into()),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let agent = Agent::new(&settings).map_err(|e| e.to_string())?;
    let report = agent.sync_once().await.map_err(|e| e.to_string())?;
    println!(
        "Synced {} keys (content hash {}): {} file(s) written. {} now holds (files, and the links a \
         kubelet-style directory reads through):\n",
        report.keys,
        report.hash.get(..12).unwrap_or_default(),
        report.files_written,
        root.display()
    );
    print_tree(root);
    let conf = root.join("app.conf");
    println!(
        "\n{} (from {}):\n{}",
        conf.display(),
        template.display(),
        read(&conf)
    );
    println!(
        "The same as: osc-agent --server {url} --environment {ENVIRONMENT} --user-key-file {} \\\n    \
         --output-dir {} --output {}:dotenv --output {}:json --template {}:{}\n",
        key_file.display(),
        root.join("config").display(),
        root.join("app.env").display(),
        root.join("app.json").display(),
        template.display(),
        conf.display()
    );

    // Live: watch the stream, change one value through the server, see it land.
    let cancel = CancellationToken::new();
    let telemetry = Arc::new(Telemetry::new(ENVIRONMENT, true));
    let loop_task = {
        let (agent, settings, cancel) = (agent.clone(), settings.clone(), cancel.clone());
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let on_demand = OnDemand::new(settings.live.sync_min_interval, telemetry.clone());
            let ctx = LiveContext {
                telemetry,
                actions: None,
                on_demand: Arc::new(on_demand),
                cancel,
            };
            live::run(agent, &settings, ctx).await;
        })
    };
    let level = root.join("config/log.level");
    let before = read(&level);
    println!("Watching for changes. Setting log.level to \"debug\" through the server...");
    let started = Instant::now();
    let mut put_url = reqwest::Url::parse(&url).map_err(|e| e.to_string())?;
    put_url
        .path_segments_mut()
        .map_err(|()| "bad server URL".to_owned())?
        .extend(["configs", "log.level"]);
    put_url
        .query_pairs_mut()
        .append_pair("environment", ENVIRONMENT);
    send(http.put(put_url).json(&json!({"value": "debug"}))).await?;
    let deadline = started + Duration::from_secs(15);
    while read(&level) == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if read(&level) == before {
        return Err("the live update did not arrive within 15 s".into());
    }
    println!(
        "Live update landed in {} ms: {} now holds \"{}\" (and {} was re-rendered).",
        started.elapsed().as_millis(),
        level.display(),
        read(&level),
        conf.display()
    );

    if args.exit_after_update {
        cancel.cancel();
    } else {
        println!(
            "Still watching. Change an entry through the server, e.g.:\n\n  curl -X PUT -H 'X-User-Key: \
             {DEMO_USER_KEY}' -H 'Content-Type: application/json' -d '{{\"value\": \"warning\"}}' \\\n    \
             '{url}/configs/log.level?environment={ENVIRONMENT}'\n\nand watch it land here. Ctrl-C stops."
        );
        let applied = |t: &Telemetry| t.status_json()["sync"]["applied_hash"].clone();
        let mut last = applied(&telemetry);
        let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
        loop {
            tokio::select! {
                _ = &mut ctrl_c => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let now = applied(&telemetry);
            if now != last {
                last = now;
                println!(
                    "Update landed: content hash {}; {} holds \"{}\"",
                    last.as_str().and_then(|h| h.get(..12)).unwrap_or_default(),
                    level.display(),
                    read(&level)
                );
            }
        }
        println!("\nStopping.");
        cancel.cancel();
    }
    let _ = loop_task.await;
    server.shutdown().await;
    Ok(())
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", p.display())
}

async fn send(req: reqwest::RequestBuilder) -> Result<(), String> {
    let resp = req
        .header("x-user-key", DEMO_USER_KEY)
        .send()
        .await
        .map_err(|e| format!("dev server request failed: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("dev server request failed: HTTP {}", resp.status()))
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// List what the demo wrote: names, modes, sizes and link targets (no contents).
fn print_tree(root: &Path) {
    use std::os::unix::fs::MetadataExt;
    let mut paths = walk(root);
    paths.sort();
    // The agent's own lock and state files (`.NAME.osc-agent`, `..osc-agent`): named once, not listed.
    let (state, paths): (Vec<_>, Vec<_>) = paths.into_iter().partition(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".osc-agent"))
    });
    for p in paths {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&p)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            println!("  {:<36} -> {target}", p.display());
        } else if meta.is_file() {
            println!(
                "  {:<36} mode {:o}, {} bytes",
                p.display(),
                meta.mode() & 0o777,
                meta.len()
            );
        }
    }
    if !state.is_empty() {
        println!(
            "  (and {} lock/state file(s) of the agent: .NAME.osc-agent, ..osc-agent)",
            state.len()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && e.file_name().to_string_lossy().starts_with("..") {
            continue; // the hidden generation directory: shown through its links
        }
        if is_dir {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
