//! Small helpers shared by several stages.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::path::Path;

/// A short, secret-free reason for an I/O error (`permission denied`, `not found`, ...).
pub fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    }
}

/// The full chain of an error's sources, joined with `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Lower-case hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Make text from outside (a key name, a path, a server-provided name) safe for one log line or error
/// message: control characters (C0, DEL, C1) and Unicode line/paragraph separators and bidirectional
/// overrides are written as escapes (`\n`, `\r`, `\t`, `\0`, `\u{1b}`), backslashes doubled (so an
/// escaped text cannot be confused with another). Plain text is returned as is, without copying.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_with(text, true)
}

/// Like [`escape`] but backslashes are kept: for whole messages that may hold escaped parts already
/// (the log writer's last line of defence).
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    escape_with(text, false)
}

fn escape_with(text: &str, backslash: bool) -> Cow<'_, str> {
    let needs = |c: char| {
        (backslash && c == '\\')
            || c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(needs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !needs(c) => out.push(c),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// [`escape`] for a path (non-UTF-8 bytes shown as U+FFFD).
pub fn escape_path(path: &Path) -> String {
    escape(&path.to_string_lossy()).into_owned()
}

/// Displays a string through [`escape`]: `format!("key '{}'", Escaped(key))`.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

/// Where a JSON document failed to parse (error class, line, column), without serde's own message,
/// which may quote a piece of the document (a value). For errors about server or pod content.
pub fn json_error_position(e: &serde_json::Error) -> String {
    format!(
        "{:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

/// Give memory the allocator keeps after a sync back to the system (glibc's `malloc_trim`): a sync of
/// many keys allocates the response, the parsed entries and the rendered files at once, and glibc
/// otherwise keeps most of that peak mapped for good (10,000 keys × 1 KiB: ~48 MiB). Other C
/// libraries (musl) return memory on their own; there this does nothing.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and shrinks the allocator's own free lists; any argument is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Set glibc's malloc up so that what a sync frees can go back to the system (call once, first thing in
/// `main`, before any thread starts; nothing on other C libraries):
/// - one arena for all threads (`M_ARENA_MAX` 1): the agent allocates little at a time, and every extra
///   per-thread arena keeps free pages of its own;
/// - a fixed mmap threshold of 128 KiB (`M_MMAP_THRESHOLD`): buffers at least that large (a list
///   response, a rendered directory) get their own mapping, unmapped when freed. Without it glibc raises
///   the threshold after the first such buffer is freed and serves the next ones from the heap, where
///   they fragment it.
///
/// Measured with 10,000 keys × 1 KiB (README "Footprint"). An operator's own settings win: nothing is
/// changed when `GLIBC_TUNABLES`, `MALLOC_ARENA_MAX` or `MALLOC_MMAP_THRESHOLD_` is set.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if [
        "GLIBC_TUNABLES",
        "MALLOC_ARENA_MAX",
        "MALLOC_MMAP_THRESHOLD_",
    ]
    .iter()
    .all(|v| std::env::var_os(v).is_none())
    {
        // SAFETY: mallopt only sets allocator parameters; it is called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters_only() {
        assert!(matches!(escape("db.url"), Cow::Borrowed("db.url")));
        assert_eq!(escape("a\nb\r\t\0"), "a\\nb\\r\\t\\0");
        assert_eq!(escape("\u{1b}[31m"), "\\u{1b}[31m");
        assert_eq!(escape("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("héllo"), "héllo");
        assert_eq!(Escaped("k\ney").to_string(), "k\\ney");
        assert_eq!(escape_controls("a\\n\nb"), "a\\n\\nb");
    }
}
