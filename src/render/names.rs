//! Key → file name, safely: a key never becomes a path that leaves the output directory or collides with
//! the `..data` machinery of the atomic writer.

/// Why a key cannot be a file name in the output directory, or `None` when it can.
pub fn unsafe_reason(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("it is empty")
    } else if key == "." || key == ".." {
        Some("it is a relative directory name")
    } else if key.starts_with("..") {
        Some("names starting with '..' are reserved for the atomic-write machinery")
    } else if key.contains('/') || key.contains('\\') {
        Some("it contains a path separator")
    } else if key.contains('\0') {
        Some("it contains a NUL byte")
    } else if matches!(
        crate::util::escape_controls(key),
        std::borrow::Cow::Owned(_)
    ) {
        Some(
            "it contains a control or bidirectional-override character (a newline, a tab, an escape...)",
        )
    } else if key.len() > 255 {
        Some("it is longer than 255 bytes")
    } else {
        None
    }
}

/// Why a key cannot be a ConfigMap/Secret data key (`[-._a-zA-Z0-9]+`, at most 253 characters, not
/// `.`, `..` or starting with `..`), or `None` when it can.
pub fn object_key_reason(key: &str) -> Option<&'static str> {
    if key.is_empty() || key.len() > 253 {
        Some("a ConfigMap/Secret key has 1 to 253 characters")
    } else if key == "." || key.starts_with("..") {
        Some("a ConfigMap/Secret key may not be '.' or start with '..'")
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("a ConfigMap/Secret key may only hold letters, digits, '-', '_' and '.'")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys() {
        for good in ["db.url", "A_b-c", "x"] {
            assert_eq!(object_key_reason(good), None, "{good}");
        }
        for bad in ["", ".", "..x", "a/b", "a b", "ключ"] {
            assert!(object_key_reason(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn rejects_escapes_and_reserved_names() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "..data",
            "..data_tmp",
            "a/b",
            "a\\b",
            "x\0y",
            "/abs",
        ] {
            assert!(unsafe_reason(bad).is_some(), "{bad:?} should be rejected");
        }
        for good in ["db.url", "app.yaml", ".hidden", "a..b", "ключ", "a b"] {
            assert_eq!(unsafe_reason(good), None, "{good:?} should be accepted");
        }
        assert!(unsafe_reason(&"k".repeat(256)).is_some());
    }
}
