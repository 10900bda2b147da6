//! Byte sizes for flags, env vars and YAML: `16Mi`, `512Ki`, `1Gi`, `10M`, or a bare number of bytes.

use std::fmt;
use std::str::FromStr;

/// A size in bytes written as `<integer>[unit]`: `Ki`/`Mi`/`Gi` (powers of 1024, a trailing `B` is
/// accepted: `16MiB`), `k`/`K`/`M`/`G` (powers of 1000), or no unit (bytes). At most 1 TiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let bad = || format!("invalid size '{s}': expected e.g. 16Mi, 512Ki or 1048576");
        let number: u64 = number.parse().map_err(|_| bad())?;
        let factor: u64 = match unit.trim().trim_end_matches('B') {
            "" => 1,
            "k" | "K" => 1000,
            "M" => 1000 * 1000,
            "G" => 1000 * 1000 * 1000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            _ => return Err(bad()),
        };
        number
            .checked_mul(factor)
            .filter(|n| *n <= 1 << 40)
            .map(ByteSize)
            .ok_or_else(|| format!("size '{s}' is out of range (at most 1Ti)"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, factor) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if n >= factor && n.is_multiple_of(factor) {
                return write!(f, "{}{unit}", n / factor);
            }
        }
        write!(f, "{n}")
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let p = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(p("16Mi"), Ok(16 << 20));
        assert_eq!(p("16MiB"), Ok(16 << 20));
        assert_eq!(p("512Ki"), Ok(512 << 10));
        assert_eq!(p("10M"), Ok(10_000_000));
        assert_eq!(p("1048576"), Ok(1 << 20));
        assert!(p("16 parsecs").is_err());
        assert!(p("").is_err());
        assert!(p("-1").is_err());
        assert!(p("99999999999Gi").is_err());
        assert_eq!(ByteSize(16 << 20).to_string(), "16Mi");
    }
}
