//! Command line: the agent's flags at the top level, plus subcommands.

use clap::{Parser, Subcommand};

use crate::config::AgentArgs;
use crate::devserver::DevServerArgs;

#[derive(Parser, Debug)]
#[command(
    name = "osc-agent",
    version,
    about = "Keeps files in sync with an OpenSecureConf server (sidecar, init container or one-shot).",
    after_help = "Exit codes: 0 ok, 1 internal error, 2 bad configuration, 3 server unreachable, \
                  4 authentication failed or user key does not match, 5 partial failure (some outputs not written, \
                  or with --once an action failed), 6 backup unusable, 7 the environment has no entry (see --allow-empty)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a local OpenSecureConf-compatible server (in memory; for trials and tests).
    DevServer(DevServerArgs),
    /// Work with OpenSecureConf encrypted backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Try it: a dev server with sample entries, synced into ./osc-demo/ and watched live.
    Demo(DemoArgs),
    /// Validate a configuration (flags, env vars, config file and the files they name) without contacting
    /// the server: `osc-agent check --server ... --environment ... --output-dir ...`.
    Check(Box<crate::check::CheckArgs>),
    /// Mutating admission webhook (HTTPS): adds the agent to pods annotated `osc-agent.io/inject: "true"`.
    Injector(Box<crate::injector::server::InjectorArgs>),
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// List environments, keys, categories, counts and timestamps of a backup (values hidden).
    Inspect(crate::backup::inspect::InspectArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the demo writes its files.
    #[arg(long, default_value = "osc-demo")]
    pub dir: std::path::PathBuf,
    /// Exit once the live update has landed instead of watching until Ctrl-C (for scripted runs).
    #[arg(long)]
    pub exit_after_update: bool,
}
