//! Logging via `tracing` to stderr: human-readable by default, JSON lines with `--log-format json`.
//! The level comes from `$OSC_LOG` (or `$RUST_LOG`), default `info`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    init_with_default(format, "info")
}

/// Like [`init`], with another default level (the demo keeps its terminal for its own output).
pub fn init_with_default(format: LogFormat, default: &str) {
    // notify logs every inotify event at trace level: with the log file in a watched directory, each
    // line would cause the next. It stays at warn unless named explicitly.
    let filter = std::env::var("OSC_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .map(|f| match f.contains("notify") {
            true => f,
            false => format!("{f},notify=warn"),
        })
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("{default},notify=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
