//! `osc-agent`: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use osc_agent::cli::{BackupCommand, Cli, Command};
use osc_agent::config::{AgentArgs, ConfigError, LogFormat};
use osc_agent::exit::Exit;
use osc_agent::{demo, devserver, logging, run};

// Measured alternatives to the C library's malloc (Cargo features; see README "Footprint").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    logging::install_panic_hook();
    #[cfg(not(any(feature = "mimalloc", feature = "jemalloc")))]
    osc_agent::util::tune_allocator();
    osc_agent::source::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("osc-agent: error: cannot start the async runtime: {e}");
            return Exit::Internal.code();
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Some(Command::DevServer(args)) => {
                logging::init(LogFormat::Text);
                match devserver::run(args).await {
                    Ok(()) => Exit::Ok.code(),
                    Err(e) => fail(Exit::Config, &e),
                }
            }
            Some(Command::Demo(args)) => {
                logging::init_with_default(LogFormat::Text, "warn");
                demo::run(args).await.code()
            }
            Some(Command::Backup(BackupCommand::Inspect(args))) => {
                logging::init(LogFormat::Text);
                run::inspect_backup(args).await.code()
            }
            Some(Command::Check(args)) => osc_agent::check::run(*args).code(),
            Some(Command::Injector(args)) => {
                logging::init(args.log_format.unwrap_or_default());
                osc_agent::injector::server::run(*args).await.code()
            }
            None => agent(cli.agent).await.code(),
        }
    })
}

async fn agent(args: AgentArgs) -> Exit {
    let args = match args.with_config_file() {
        Ok(a) => a,
        Err(e) => return config_error(&e),
    };
    // Logging first (from flags/env/file) so environment discovery can say where it looked.
    logging::init(args.log_format.unwrap_or_default());
    let settings = match run::settings(args).await {
        Ok(s) => s,
        Err(e) => return config_error(&e),
    };
    run::run(settings).await
}

fn config_error(e: &ConfigError) -> Exit {
    eprintln!("{}", logging::error_line("osc-agent", e));
    Exit::Config
}

fn fail(exit: Exit, e: &dyn std::error::Error) -> ExitCode {
    eprintln!("{}", logging::error_line("osc-agent", &e));
    exit.code()
}
