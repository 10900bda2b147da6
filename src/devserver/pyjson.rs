//! JSON serialization that matches Python byte for byte.
//!
//! The upstream server is Python: SSE `data:` lines come from `json.dumps(obj)` with its defaults
//! (separators `", "` and `": "`, `ensure_ascii=True`: every non-ASCII character as `\uXXXX`, with
//! surrogate pairs above the BMP), while REST bodies come from Starlette's `JSONResponse`
//! (`separators=(",", ":")`, `ensure_ascii=False`). Both print floats with Python's `repr`
//! (`1e-07`, `1e+16`, `100.0`). Key order is preserved (serde_json's `preserve_order`).

use std::io;

use serde::Serialize;
use serde_json::ser::Formatter;

/// Which Python serializer to imitate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// `json.dumps(obj)`: `", "`, `": "`, ASCII only (SSE event data).
    Dumps,
    /// Starlette `JSONResponse`: `","`, `":"`, UTF-8 kept (REST bodies).
    Compact,
}

/// A [`Formatter`] producing Python's `json` module output.
#[derive(Clone, Copy, Debug)]
pub struct PythonFormatter {
    style: Style,
}

impl PythonFormatter {
    pub fn new(style: Style) -> Self {
        Self { style }
    }

    fn item_separator(&self) -> &'static [u8] {
        match self.style {
            Style::Dumps => b", ",
            Style::Compact => b",",
        }
    }

    fn key_separator(&self) -> &'static [u8] {
        match self.style {
            Style::Dumps => b": ",
            Style::Compact => b":",
        }
    }
}

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(self.item_separator())
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(self.item_separator())
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_separator())
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if self.style == Style::Compact || (fragment.is_ascii() && !fragment.contains('\x7f')) {
            return w.write_all(fragment.as_bytes());
        }
        // `ensure_ascii` escapes everything outside `' '..='~'` (serde_json already escaped the
        // control characters, quotes and backslashes before calling us).
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if (' '..='~').contains(&c) {
                w.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(python_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(w, f64::from(value))
    }

    /// Numbers parsed with serde_json's `arbitrary_precision` arrive as text: integers stay exact (like
    /// Python's ints; `-0` is `0`), floats get Python's `repr`.
    fn write_number_str<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        value: &str,
    ) -> io::Result<()> {
        match value.parse::<f64>() {
            Ok(f) if value.contains(['.', 'e', 'E']) => self.write_f64(w, f),
            _ if value == "-0" => w.write_all(b"0"),
            _ => w.write_all(value.as_bytes()),
        }
    }
}

/// Serializes `value` the way Python would (see [`Style`]).
pub fn to_string<T: Serialize + ?Sized>(value: &T, style: Style) -> String {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter::new(style));
    // Serializing JSON values (string keys, finite numbers) into a Vec cannot fail.
    if value.serialize(&mut ser).is_err() {
        return "null".to_owned();
    }
    // The formatter only ever writes UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents -4..16, otherwise
/// scientific with a signed, at least two-digit exponent; always a `.0` for whole numbers.
fn python_float_repr(value: f64) -> String {
    if !value.is_finite() {
        // Python would refuse with allow_nan=False; JSON values never hold these anyway.
        return "null".to_owned();
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0"
        } else {
            "0.0"
        }
        .to_owned();
    }
    let sci = format!("{value:e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let Ok(exp) = exp.parse::<i32>() else {
        return sci;
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    if (-4..16).contains(&exp) {
        let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
        let (int, frac) = if exp >= 0 {
            let int_len = exp.unsigned_abs() as usize + 1;
            if digits.len() <= int_len {
                (format!("{digits:0<int_len$}"), "0".to_owned())
            } else {
                (digits[..int_len].to_owned(), digits[int_len..].to_owned())
            }
        } else {
            let zeros = "0".repeat(exp.unsigned_abs() as usize - 1);
            ("0".to_owned(), format!("{zeros}{digits}"))
        };
        format!("{sign}{int}.{frac}")
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dumps_matches_python_defaults() {
        let value = json!({
            "key": "db.url",
            "data": {"value": {"host": "caf\u{e9} \u{2603}", "ports": [5432, 2.5, {"x": null, "y": true}]}},
            "emoji": "\u{1F600}",
            "esc": "q\"b\\n\n\t\u{1}\u{7f}",
            "empty": {}, "list": []
        });
        assert_eq!(
            to_string(&value, Style::Dumps),
            r#"{"key": "db.url", "data": {"value": {"host": "caf\u00e9 \u2603", "ports": [5432, 2.5, {"x": null, "y": true}]}}, "emoji": "\ud83d\ude00", "esc": "q\"b\\n\n\t\u0001\u007f", "empty": {}, "list": []}"#
        );
    }

    #[test]
    fn compact_matches_starlette() {
        let value = json!({"id": 6, "value": "caf\u{e9} \u{2603}", "l": ["a", "b"], "c": null});
        assert_eq!(
            to_string(&value, Style::Compact),
            "{\"id\":6,\"value\":\"caf\u{e9} \u{2603}\",\"l\":[\"a\",\"b\"],\"c\":null}"
        );
    }

    #[test]
    fn floats_like_python_repr() {
        let cases = [
            (2.5, "2.5"),
            (100.0, "100.0"),
            (0.1, "0.1"),
            (-0.0, "-0.0"),
            (1e-4, "0.0001"),
            (1.5e-5, "1.5e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (-1.25e22, "-1.25e+22"),
            (123456.789, "123456.789"),
            (5e-324, "5e-324"),
        ];
        for (value, want) in cases {
            assert_eq!(python_float_repr(value), want, "{value:e}");
        }
    }

    #[test]
    fn parsed_numbers_like_python() {
        let value: serde_json::Value =
            serde_json::from_str(r#"[1.5E3, 1e16, 0.1, 123456789012345678901234567890, -0]"#)
                .unwrap();
        assert_eq!(
            to_string(&value, Style::Compact),
            "[1500.0,1e+16,0.1,123456789012345678901234567890,0]"
        );
    }
}
