//! Logging via `tracing` to stderr: human-readable by default, JSON lines with `--log-format json`.
//! The level comes from `$OSC_LOG` (or `$RUST_LOG`), default `info`.
//!
//! Every record is exactly one line: a control character inside a record (a newline in a key name, a
//! NUL, an escape sequence) is written as an escape (see [`crate::util::escape`]), so text from outside
//! can never forge a log line or drive a terminal. JSON records are already escaped by the encoder.

use std::io::{self, Write};

use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;
use crate::util::escape;

/// Longest panic message printed, in bytes (the rest is cut).
const PANIC_MESSAGE_MAX: usize = 512;

/// Report a panic (a bug) as one line on stderr, `osc-agent: error: internal error at FILE:LINE:COL:
/// MESSAGE`, the message escaped like every log record and cut at [`PANIC_MESSAGE_MAX`] bytes. The
/// release build then aborts (`panic = "abort"`): the process dies of `SIGABRT` and kubelet restarts
/// the container. Installed first in `main`, before anything can panic.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        let message = info.payload_as_str().unwrap_or("(no message)");
        let _ = writeln!(
            io::stderr().lock(),
            "{}",
            panic_line(location.as_deref(), message)
        );
    }));
}

/// The line [`install_panic_hook`] prints.
fn panic_line(location: Option<&str>, message: &str) -> String {
    let mut end = message.len().min(PANIC_MESSAGE_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < message.len() { "…" } else { "" };
    let location = location
        .map(|l| format!(" at {}", escape(l)))
        .unwrap_or_default();
    format!(
        "osc-agent: error: internal error{location}: {}{cut} (a bug: please report it)",
        escape(&message[..end])
    )
}

pub fn init(format: LogFormat) {
    init_with_default(format, "info")
}

/// Like [`init`], with another default level (the demo keeps its terminal for its own output).
///
/// `$OSC_LOG` (or `$RUST_LOG`) is a comma-separated list of `level` and `target=level` directives
/// (`debug`, `info,osc_agent=debug,kube=warn`; levels `trace`, `debug`, `info`, `warn`, `error`, `off`);
/// see [`directives`]. Empty or blank counts as unset. The span and field filters of `tracing`'s
/// `EnvFilter` (`[span{field=value}]`) are not supported: a list that does not read is reported once
/// and the default level applies.
pub fn init_with_default(format: LogFormat, default: &str) {
    let set = |name: &'static str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (name, v))
    };
    let asked = set("OSC_LOG").or_else(|| set("RUST_LOG"));
    let parsed = asked.as_ref().map(|(_, list)| {
        directives(list)
            .and_then(|d| d.parse::<Targets>().ok())
            .ok_or(())
    });
    let bad = matches!(parsed, Some(Err(())));
    let filter = match parsed {
        Some(Ok(targets)) => targets,
        _ => directives(default)
            .and_then(|d| d.parse().ok())
            .unwrap_or_default(),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(OneLine)
        // Colours are escape sequences, which the writer neutralises: none.
        .with_ansi(false)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.finish().with(filter).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(filter)
            .try_init(),
    };
    if let (true, Some((variable, asked))) = (bad, asked) {
        tracing::warn!(
            "${variable} '{}' is not a list of level and target=level directives: level {default} applies",
            escape(&asked)
        );
    }
}

/// Targets kept at a level unless a directive names them: `notify` logs every inotify event at trace
/// level (with the log file in a watched directory, each line would cause the next); `kube_client`
/// logs a whole response body at warn level when it cannot decode one (a Secret's data, say).
const QUIET_TARGETS: &[(&str, &str)] = &[("notify", "warn"), ("kube_client", "error")];

/// The directives of a log filter list, checked and normalised for `Targets`: items are trimmed and
/// empty ones dropped (`info,` is `info`); each is a level, a target, or `target=level`, a target
/// being a Rust path (letters, digits, `_`, `-`, `.`, `::`). `None` when an item is anything else
/// (`=debug`, `osc_agent=loud`, `[span]=debug`, a control character). [`QUIET_TARGETS`] not named are
/// added where the list's default level is more verbose than theirs.
pub fn directives(list: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l));
    let is_target = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    };
    let mut items = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let ok = match item.split_once('=') {
            Some((target, level)) => is_target(target.trim()) && is_level(level.trim()),
            None => is_level(item) || is_target(item),
        };
        if !ok {
            return None;
        }
        items.push(item.replace(' ', ""));
    }
    if items.is_empty() {
        return None;
    }
    // The list's own default level (its last bare level; none: off). A quiet target only ever lowers
    // it: `off` and `error` stay as quiet for every target.
    let rank = |l: &str| LEVELS.iter().position(|x| x.eq_ignore_ascii_case(l));
    let default = items.iter().rev().find_map(|i| rank(i)).unwrap_or(0);
    for (target, level) in QUIET_TARGETS {
        if default > rank(level).unwrap_or(0) && !items.iter().any(|i| i.contains(target)) {
            items.push(format!("{target}={level}"));
        }
    }
    Some(items.join(","))
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
    fn filter_lists_are_checked_and_normalised() {
        let quiet = ",notify=warn,kube_client=error";
        for (list, want) in [
            ("info", Some(format!("info{quiet}"))),
            ("info,", Some(format!("info{quiet}"))),
            (
                " debug ,, kube = warn ",
                Some(format!("debug,kube=warn{quiet}")),
            ),
            (
                "warn,hyper::proto=trace",
                Some("warn,hyper::proto=trace,kube_client=error".into()),
            ),
            ("osc_agent", Some("osc_agent".into())),
            ("off", Some("off".into())),
            ("error", Some("error".into())),
            ("warn", Some("warn,kube_client=error".into())),
            (
                "debug,notify=trace,kube_client=debug",
                Some("debug,notify=trace,kube_client=debug".into()),
            ),
            ("", None),
            (",", None),
            ("=", None),
            ("=debug", None),
            ("osc_agent=loud", None),
            ("[span]=debug", None),
            ("osc_agent[span{f=1}]=debug", None),
            ("info,\0", None),
            ("info\n", Some(format!("info{quiet}"))),
            ("in\nfo", None),
            ("osc_agent=\u{1b}[2Jdebug", None),
        ] {
            assert_eq!(directives(list), want, "{list:?}");
            if let Some(d) = directives(list) {
                assert!(d.parse::<Targets>().is_ok(), "{d}");
            }
        }
    }

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

    #[test]
    fn a_panic_is_one_escaped_bounded_line() {
        assert_eq!(
            panic_line(Some("src/x.rs:1:2"), "boom\nINFO forged"),
            "osc-agent: error: internal error at src/x.rs:1:2: boom\\nINFO forged (a bug: please report it)"
        );
        let long = "é".repeat(PANIC_MESSAGE_MAX);
        let line = panic_line(None, &long);
        assert!(
            line.starts_with("osc-agent: error: internal error: éé"),
            "{line}"
        );
        assert!(line.ends_with("é… (a bug: please report it)"), "{line}");
        assert_eq!(line.matches('é').count(), PANIC_MESSAGE_MAX / 2);
    }
}
