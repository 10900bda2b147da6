//! `osc-agent check`: validate a configuration (flags, env vars, config file, and by default the files
//! they point to) without contacting the server or the Kubernetes API. Prints what the agent would do.
//! Exit 0 when valid, 2 with one line naming the flag, variable, file or key at fault otherwise.

use std::fmt::Write as _;

use crate::config::{AgentArgs, ConfigError, Files, Settings, Source};
use crate::exit::Exit;
use crate::util::escape_path;

#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Check flags and settings only: do not read the credential, CA, backup or template files they
    /// name (for arguments rendered for another machine, e.g. by the Helm chart).
    #[arg(long)]
    pub skip_files: bool,
    #[command(flatten)]
    pub agent: AgentArgs,
}

pub fn run(args: CheckArgs) -> Exit {
    match check(args) {
        Ok(summary) => {
            print!("{summary}");
            Exit::Ok
        }
        Err(e) => {
            eprintln!("{}", crate::logging::error_line("osc-agent check", &e));
            Exit::Config
        }
    }
}

/// The summary printed for a valid configuration (never a secret: credentials are named by source).
pub fn check(args: CheckArgs) -> Result<String, ConfigError> {
    let files = if args.skip_files {
        Files::Skip
    } else {
        Files::Read
    };
    let mut a = args.agent.with_config_file()?;
    let from_pod = a.environment.as_deref().is_none_or(|e| e.trim().is_empty())
        && a.pod_name.is_some()
        && a.pod_namespace.is_some();
    if from_pod {
        // Read from the pod at start; any non-empty name validates the rest.
        a.environment = Some("from-pod".into());
    }
    let settings = Settings::validate(a, files)?;
    if files == Files::Read {
        // Builds the HTTP client (CA file) and the renderer (template syntax) without any request.
        crate::sync::Agent::new(&settings)?;
    }
    Ok(summary(&settings, from_pod, files))
}

fn summary(s: &Settings, from_pod: bool, files: Files) -> String {
    let mut out = String::from("configuration OK\n");
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "  {k:<12} {v}");
    };
    match &s.source {
        Source::Server(server) => line("server", server.url.to_string()),
        Source::Backup(b) => line("backup", escape_path(&b.path)),
    }
    line(
        "environment",
        if from_pod {
            "from this pod's annotation or label osc-agent.io/environment (read at start)".into()
        } else {
            s.environment.clone()
        },
    );
    line("mode", if s.once { "once" } else { "live" }.into());
    let o = &s.outputs;
    if let Some(dir) = &o.dir {
        line("output-dir", escape_path(dir));
    }
    for f in &o.files {
        line(
            "output",
            format!("{} ({})", escape_path(&f.path), f.format.as_str()),
        );
    }
    for t in &o.templates {
        line(
            "template",
            format!(
                "{} -> {}",
                escape_path(&t.source),
                escape_path(&t.destination)
            ),
        );
    }
    if let Some(cm) = &s.objects.configmap {
        line("configmap", cm.clone());
    }
    if let Some(secret) = &s.objects.secret {
        line("secret", secret.clone());
    }
    for a in &s.actions.specs {
        line("action", a.kind().into());
    }
    line(
        "files",
        match files {
            Files::Read => "read and valid".into(),
            Files::Skip => "not read (--skip-files)".into(),
        },
    );
    out
}
