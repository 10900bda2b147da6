//! Human-friendly durations (`250ms`, `15s`, `5m`, `1h`) for flags, env vars and YAML.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A [`Duration`] written as `<number><unit>` with unit `ms`, `s`, `m` or `h` (a bare number means seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("invalid duration '{s}': expected e.g. 250ms, 15s, 5m or 1h"))?;
        let seconds = match unit.trim() {
            "ms" => number / 1000.0,
            "" | "s" => number,
            "m" => number * 60.0,
            "h" => number * 3600.0,
            other => {
                return Err(format!(
                    "invalid duration unit '{other}' in '{s}': use ms, s, m or h"
                ));
            }
        };
        if !seconds.is_finite() || seconds > 1e9 {
            return Err(format!("duration '{s}' is out of range"));
        }
        Ok(HumanDuration(Duration::from_secs_f64(seconds)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> serde::Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(HumanDuration(Duration::from_secs(s))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let p = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(p("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(p("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(p("15"), Ok(Duration::from_secs(15)));
        assert_eq!(p("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(p("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(p("5 parsecs").is_err());
        assert!(p("").is_err());
        assert!(p("-1s").is_err());
    }
}
