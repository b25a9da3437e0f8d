//! Per-client request budgets (token buckets), keyed by certificate name or, for clients
//! without a valid certificate, by address: one misbehaving agent or a flood of enrollment
//! attempts cannot starve the others.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets idle longer than this are forgotten once the table grows.
const IDLE_FORGET: Duration = Duration::from_secs(600);
const PRUNE_ABOVE: usize = 10_000;

/// Burst size and sustained rate of one client.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateSettings {
    pub burst: u32,
    pub per_second: f64,
}

impl Default for RateSettings {
    /// Generous for an agent (a report every second or two, long-polls, lease renewals
    /// while heartbeats fail) and for an operator's CLI polling an action.
    fn default() -> Self {
        RateSettings { burst: 60, per_second: 20.0 }
    }
}

#[derive(Debug)]
pub struct RateLimiter {
    settings: RateSettings,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(settings: RateSettings) -> Self {
        RateLimiter { settings, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token from `key`'s bucket at time `now`, or says how long until one is
    /// available.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.settings.burst.max(1));
        let rate = self.settings.per_second.max(0.001);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, (_, last)| now.saturating_duration_since(*last) < IDLE_FORGET);
        }
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_the_sustained_rate_per_client() {
        let limiter = RateLimiter::new(RateSettings { burst: 3, per_second: 2.0 });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check("a", t0), Ok(()));
        }
        let wait = limiter.check("a", t0).err().unwrap_or_default();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        assert_eq!(limiter.check("b", t0), Ok(()), "another client has its own bucket");
        assert_eq!(limiter.check("a", t0 + Duration::from_millis(500)), Ok(()));
        assert!(limiter.check("a", t0 + Duration::from_millis(500)).is_err());
    }
}
