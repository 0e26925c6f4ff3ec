//! Limits per caller: a token bucket per API key (every route but the probes and `/metrics`)
//! and per `userId` (conversation POSTs), so that one caller cannot take the service, or the
//! queue, for itself. Each bucket holds up to twice its rate per second and refills at that
//! rate; a request finding it empty is answered 429 `rate_limited` with `Retry-After`, counted
//! in `convoq_rate_limited_total{scope}`. Buckets live in this process (with N API processes a
//! caller gets N times the rate) and are bounded in number: idle ones (full again) are dropped
//! when the map grows past [`MAX_TRACKED`]. Event streams are counted per key too: at most
//! `--max-streams-per-key` open at once (429 `too_many_streams` past it). The backlog quotas
//! per key and per `userId` are `quota.rs`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::ApiError;
use super::quota::BacklogQuota;
use crate::config::Config;
use crate::telemetry::Metrics;

/// The most callers tracked per limit before idle ones are dropped.
pub const MAX_TRACKED: usize = 100_000;

/// One rate limit over many callers.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// A limit of `per_second` (bursts of twice as many); `None` for 0, no limit.
    pub fn new(per_second: u64) -> Option<RateLimiter> {
        (per_second > 0).then(|| RateLimiter {
            per_second: per_second as f64,
            burst: (per_second * 2) as f64,
            buckets: Mutex::default(),
        })
    }

    /// Takes one request from `who`'s bucket at `now`, or says how long until it has one.
    pub fn take(&self, who: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(who) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| refill(*b, now, rate, burst).tokens < burst);
        }
        let bucket = buckets.entry(who.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        *bucket = refill(*bucket, now, self.per_second, self.burst);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64(
            (1.0 - bucket.tokens) / self.per_second,
        ))
    }
}

fn refill(b: Bucket, now: Instant, rate: f64, burst: f64) -> Bucket {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    Bucket {
        tokens: (b.tokens + elapsed * rate).min(burst),
        at: now,
    }
}

/// The limits of this process.
#[derive(Debug, Default)]
pub struct Limits {
    per_key: Option<RateLimiter>,
    per_user: Option<RateLimiter>,
    streams: Arc<Streams>,
    /// Unfinished conversation jobs per API key.
    pub key_backlog: Option<Arc<BacklogQuota>>,
    /// Unfinished conversation jobs per userId.
    pub user_backlog: Option<Arc<BacklogQuota>>,
}

/// Event streams open per API key.
#[derive(Debug, Default)]
struct Streams {
    max_per_key: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open event stream, counted against its key until dropped.
#[derive(Debug)]
pub struct StreamSlot {
    streams: Arc<Streams>,
    key: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl Limits {
    /// The limits the configuration sets.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            per_key: RateLimiter::new(config.key_rate_limit),
            per_user: RateLimiter::new(config.user_rate_limit),
            streams: Arc::new(Streams {
                max_per_key: config.max_streams_per_key,
                open: Mutex::default(),
            }),
            key_backlog: BacklogQuota::new(config.key_backlog_quota, "key_backlog", "API key"),
            user_backlog: BacklogQuota::new(config.user_backlog_quota, "user_backlog", "userId"),
        }
    }

    /// A place for one more event stream of API key `key`, or 429 `too_many_streams`.
    pub fn open_stream(&self, key: &str) -> Result<StreamSlot, ApiError> {
        let mut open = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.to_owned()).or_default();
        if *n >= self.streams.max_per_key {
            return Err(ApiError::TooManyStreams(self.streams.max_per_key));
        }
        *n += 1;
        Ok(StreamSlot {
            streams: self.streams.clone(),
            key: key.to_owned(),
        })
    }

    /// Admits a request of API key `key` (its name), or answers 429.
    pub fn admit_key(&self, key: &str, metrics: &Metrics) -> Result<(), ApiError> {
        check(self.per_key.as_ref(), key, "key", "API key", metrics)
    }

    /// Admits a conversation POST for `user`, or answers 429.
    pub fn admit_user(&self, user: &str, metrics: &Metrics) -> Result<(), ApiError> {
        check(self.per_user.as_ref(), user, "user", "userId", metrics)
    }
}

fn check(
    limit: Option<&RateLimiter>,
    who: &str,
    scope: &str,
    what: &str,
    metrics: &Metrics,
) -> Result<(), ApiError> {
    let Some(limit) = limit else { return Ok(()) };
    limit.take(who, Instant::now()).map_err(|wait| {
        metrics.rate_limited.with_label_values(&[scope]).inc();
        ApiError::RateLimited {
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            message: format!(
                "this {what} is over its limit of {} requests a second; retry later",
                limit.per_second
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limit = RateLimiter::new(2).expect("a limit");
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(limit.take("a", t0).is_ok());
        }
        let wait = limit.take("a", t0).expect_err("the burst is spent");
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(
            limit.take("b", t0).is_ok(),
            "callers have their own buckets"
        );
        assert!(limit.take("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(limit.take("a", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn no_limit_at_zero() {
        assert!(RateLimiter::new(0).is_none());
    }

    #[test]
    fn idle_callers_are_dropped_past_the_bound() {
        let limit = RateLimiter::new(1).expect("a limit");
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED {
            limit.take(&i.to_string(), t0).expect("fresh");
        }
        // Seconds later every bucket is full again: the next new caller drops them.
        limit
            .take("new", t0 + Duration::from_secs(5))
            .expect("fresh");
        assert_eq!(limit.buckets.lock().unwrap().len(), 1);
    }
}
