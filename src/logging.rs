//! Logging via `tracing` to stderr: human-readable by default, JSON lines with `--log-format json`.
//! The level comes from `$OSC_LOG` (or `$RUST_LOG`), default `info`.
//!
//! Every record is exactly one line: a control character inside a record (a newline in a key name, a
//! NUL, an escape sequence) is written as an escape (see [`crate::util::escape`]), so text from outside
//! can never forge a log line or drive a terminal. JSON records are already escaped by the encoder.

use std::io::{self, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

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
        .with_writer(OneLine)
        // Colours are escape sequences, which the writer neutralises: none.
        .with_ansi(false)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Writes each formatted record to stderr as one line (the formatter hands over one whole record,
/// newline included, per `write` call).
#[derive(Clone, Copy, Debug, Default)]
pub struct OneLine;

impl<'a> MakeWriter<'a> for OneLine {
    type Writer = OneLineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter
    }
}

pub struct OneLineWriter;

impl Write for OneLineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr().lock().write_all(&one_line(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// One record as one line: every control character but the final newline escaped.
pub fn one_line(record: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(record);
    let body = text.strip_suffix('\n').unwrap_or(&text);
    let mut out = crate::util::escape_controls(body).into_owned().into_bytes();
    out.push(b'\n');
    out
}

/// An error line for stderr (`osc-agent: error: ...`), one line whatever the error holds.
pub fn error_line(prefix: &str, error: &dyn std::fmt::Display) -> String {
    format!(
        "{prefix}: error: {}",
        crate::util::escape_controls(&error.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_line() {
        assert_eq!(one_line(b"plain\n"), b"plain\n");
        assert_eq!(
            one_line(b"key 'a\nINFO forged' \x00 \x1b[2J\n"),
            b"key 'a\\nINFO forged' \\0 \\u{1b}[2J\n"
        );
        assert_eq!(one_line(b"no newline"), b"no newline\n");
        assert_eq!(
            error_line("osc-agent", &"bad\r\nkey"),
            "osc-agent: error: bad\\r\\nkey"
        );
    }
}
