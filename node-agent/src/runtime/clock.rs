//! Time as the runtime hands it to the engine, and the wall-clock forms reports need.
//!
//! The engine's [`Instant`] is read from `CLOCK_BOOTTIME`: monotonic, counting suspend,
//! and shared by every process of one boot. That is what lets a lease end recorded by one
//! run of the agent mean the same instant to the next run after a restart. A reboot starts
//! the clock over, which the boot id (`/proc/sys/kernel/random/boot_id`) reveals: a record
//! from another boot is never trusted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};

use crate::engine::Instant;

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The engine's clock: `CLOCK_BOOTTIME`.
pub fn now() -> Instant {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            Instant::from_nanos(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
        }
        // The kernel has supported CLOCK_BOOTTIME since 2.6.39; if it ever fails, the
        // monotonic clock is the next best thing (a boot id check still guards records).
        Err(_) => match clock_gettime(ClockId::CLOCK_MONOTONIC) {
            Ok(ts) => Instant::from_nanos(
                u64::try_from(ts.tv_sec()).unwrap_or(0).saturating_mul(1_000_000_000)
                    + u64::try_from(ts.tv_nsec()).unwrap_or(0),
            ),
            Err(_) => Instant::ZERO,
        },
    }
}

/// How long until `at` on the engine's clock (zero when it has passed).
pub fn until(at: Instant) -> Duration {
    at.since(now())
}

/// This boot's id; empty when unreadable (then no record from "this boot" is trusted
/// either, since an empty id never matches a recorded one).
pub fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// This run's incarnation: above every earlier one even if the wall clock went back.
pub fn next_incarnation(previous: Option<u64>, now_unix_millis: u64) -> u64 {
    match previous {
        Some(p) => now_unix_millis.max(p.saturating_add(1)),
        None => now_unix_millis.max(1),
    }
}

/// The wall-clock time of engine instant `at`, given a reading of both clocks.
pub fn wall_millis(at: Instant, now: Instant, now_unix_millis: u64) -> u64 {
    let back = u64::try_from(now.since(at).as_millis()).unwrap_or(u64::MAX);
    let ahead = u64::try_from(at.since(now).as_millis()).unwrap_or(u64::MAX);
    now_unix_millis.saturating_sub(back).saturating_add(ahead)
}

/// RFC 3339 in UTC with second precision, e.g. `2025-01-31T08:15:00Z` (as the controller
/// writes its times).
pub fn rfc3339(unix_millis: u64) -> String {
    let secs = unix_millis / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rest = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, (rest / 60) % 60, rest % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, u32::try_from(month).unwrap_or(1), u32::try_from(day).unwrap_or(1))
}

/// The current time in RFC 3339.
pub fn rfc3339_now() -> String {
    rfc3339(unix_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_controller() {
        assert_eq!(rfc3339(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn incarnations_only_grow() {
        assert_eq!(next_incarnation(None, 1000), 1000);
        assert_eq!(next_incarnation(Some(5000), 1000), 5001, "clock went backwards");
        assert_eq!(next_incarnation(Some(5000), 9000), 9000);
    }

    #[test]
    fn boot_time_is_monotonic_and_the_boot_has_an_id() {
        let a = now();
        let b = now();
        assert!(b >= a);
        assert!(a > Instant::ZERO);
        assert_eq!(boot_id().len(), 36, "{:?}", boot_id());
        assert_eq!(boot_id(), boot_id());
    }

    #[test]
    fn engine_instants_map_to_wall_time() {
        let now = Instant::from_millis(10_000);
        assert_eq!(wall_millis(Instant::from_millis(9_000), now, 50_000), 49_000);
        assert_eq!(wall_millis(Instant::from_millis(10_500), now, 50_000), 50_500);
    }
}
