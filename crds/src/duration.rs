//! Durations as users write them in manifests: `100ms`, `1s`, `1m30s`.
//!
//! Kubernetes APIs spell durations the way Go's `time.ParseDuration` does, so the same
//! strings work in `kubectl apply`, in standalone manifests and in the node API.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Pattern put into the generated CRD so the API server rejects malformed durations.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A non-negative duration with a Go-style textual form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected a number followed by a unit (ns, us, ms, s, m, h), e.g. 100ms or 1m30s")]
    Malformed(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl Duration {
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }

    pub const fn as_std(&self) -> std::time::Duration {
        self.0
    }

    pub fn as_millis(&self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err(DurationError::Empty);
        }
        if text == "0" {
            return Ok(Duration::ZERO);
        }
        let malformed = || DurationError::Malformed(s.to_string());
        let mut total_nanos: u128 = 0;
        let mut rest = text;
        while !rest.is_empty() {
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(malformed)?;
            if number_len == 0 {
                return Err(malformed());
            }
            let (number, after) = rest.split_at(number_len);
            let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let unit_nanos: u128 = match unit {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(malformed()),
            };
            let (whole, frac) = match number.split_once('.') {
                Some((w, f)) if !w.is_empty() && !f.is_empty() && !f.contains('.') => (w, f),
                Some(_) => return Err(malformed()),
                None => (number, ""),
            };
            let whole: u128 = whole.parse().map_err(|_| malformed())?;
            let mut part = whole.checked_mul(unit_nanos).ok_or_else(|| DurationError::Overflow(s.to_string()))?;
            if !frac.is_empty() {
                // Keep at most 9 fractional digits: nanosecond resolution is all we store.
                let digits = &frac[..frac.len().min(9)];
                let frac_value: u128 = digits.parse().map_err(|_| malformed())?;
                let scale = 10u128.pow(u32::try_from(digits.len()).map_err(|_| malformed())?);
                part += frac_value * unit_nanos / scale;
            }
            total_nanos = total_nanos.checked_add(part).ok_or_else(|| DurationError::Overflow(s.to_string()))?;
            rest = next;
        }
        let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| DurationError::Overflow(s.to_string()))?;
        let nanos = u32::try_from(total_nanos % 1_000_000_000).map_err(|_| DurationError::Overflow(s.to_string()))?;
        Ok(Duration(std::time::Duration::new(secs, nanos)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        const UNITS: [(u128, &str); 6] = [
            (3_600_000_000_000, "h"),
            (60_000_000_000, "m"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
            (1_000, "us"),
            (1, "ns"),
        ];
        let mut rest = nanos;
        for (size, unit) in UNITS {
            if rest >= size {
                write!(f, "{}{}", rest / size, unit)?;
                rest %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 100ms, 1s or 1m30s."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        let cases = [
            ("100ms", 100_000_000u128),
            ("1s", 1_000_000_000),
            ("1m30s", 90_000_000_000),
            ("1.5s", 1_500_000_000),
            ("2h", 7_200_000_000_000),
            ("250us", 250_000),
            ("0", 0),
        ];
        for (text, nanos) in cases {
            let d: Duration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(d.as_std().as_nanos(), nanos, "{text}");
        }
    }

    #[test]
    fn refuses_malformed_durations() {
        for text in ["", "10", "ms", "1x", "1.s", "-1s", "1..5s", "1s2"] {
            assert!(text.parse::<Duration>().is_err(), "{text:?} should be refused");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["100ms", "1s", "1m30s", "2h5m", "1s500ms", "0s"] {
            let d: Duration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(d.to_string(), text);
        }
    }
}
