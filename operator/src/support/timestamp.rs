//! Wall-clock times as the API writes them (RFC 3339, UTC, whole seconds).
//!
//! Statuses, events and action records carry wall-clock times for people to read; every
//! decision that needs elapsed time takes it as an explicit input instead, so the pure parts
//! stay testable without a clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;

/// Milliseconds since the Unix epoch; what the controller stores for "when was this seen".
pub type UnixMillis = i64;

/// The current wall-clock time in Unix milliseconds.
pub fn now_millis() -> UnixMillis {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Formats Unix milliseconds as RFC 3339 with second precision, e.g. `2025-01-31T08:15:00Z`.
pub fn format_millis(millis: UnixMillis) -> String {
    match Timestamp::from_second(millis.div_euclid(1000)) {
        Ok(ts) => ts.to_string(),
        // Out of jiff's range (year ±9999): no real clock produces this.
        Err(_) => "1970-01-01T00:00:00Z".to_string(),
    }
}

/// Parses an RFC 3339 time into Unix milliseconds.
pub fn parse_millis(text: &str) -> Option<UnixMillis> {
    text.parse::<Timestamp>().ok().map(|ts| ts.as_millisecond())
}

/// The age of a moment, never negative (a clock step backwards reads as "just now").
pub fn age(now: UnixMillis, then: UnixMillis) -> Duration {
    Duration::from_millis(u64::try_from(now.saturating_sub(then)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_whole_seconds() {
        let text = format_millis(1_700_000_000_999);
        assert_eq!(text, "2023-11-14T22:13:20Z");
        assert_eq!(parse_millis(&text), Some(1_700_000_000_000));
        assert_eq!(parse_millis("yesterday"), None);
    }

    #[test]
    fn age_is_never_negative() {
        assert_eq!(age(1_000, 4_000), Duration::ZERO);
        assert_eq!(age(4_000, 1_000), Duration::from_secs(3));
    }
}
