//! Time, injectable: engines and workers read the time through a [`Clock`] so that tests can
//! move it forward (backoff envelopes, lease expiry) without sleeping.
//!
//! Only the clock's *reading* is injected. Waiting (poll intervals, lease renewal cadence) uses
//! tokio's timers, which tests control with `tokio::time::pause()` where they need to.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

/// A source of the current time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        Utc::now().timestamp_millis()
    }
}

/// A clock that moves only when told to; for tests.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock standing at `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start_ms)))
    }

    /// A clock standing at the system's current time.
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now_ms())
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A server's clock (the Postgres database's, Redis's) as seen from this process: its lead over
/// this machine's system clock, so that processes on machines whose clocks disagree still agree
/// on due times and leases, each reading the server's time.
///
/// A measurement reads the system clock before and after reading the server's, and takes the
/// midpoint, so the error is at most half the round trip. A measurement replaces the one held
/// if its round trip is under a millisecond or no worse than the held one's, or if the held one
/// is older than a minute; a slow round trip (a busy scheduler) thus never moves the clock by
/// its noise. The lead is rounded to whole milliseconds, so a server on the same machine leads
/// by exactly zero.
#[derive(Debug, Default)]
pub(crate) struct ServerLead {
    held: Mutex<Option<Lead>>,
}

#[derive(Debug, Clone, Copy)]
struct Lead {
    lead_ms: i64,
    rtt_us: i64,
    taken_at_us: i64,
}

/// The system clock in microseconds since the Unix epoch.
pub(crate) fn system_us() -> i64 {
    Utc::now().timestamp_micros()
}

impl ServerLead {
    /// Offers a measurement: the system clock read at `before_us` and `after_us` around a
    /// reading `server_us` of the server's clock. Returns the lead to use now.
    pub(crate) fn offer(&self, before_us: i64, server_us: i64, after_us: i64) -> i64 {
        let rtt_us = after_us - before_us;
        let lead_us = server_us - (before_us + rtt_us / 2);
        let sample = Lead {
            lead_ms: (lead_us as f64 / 1000.0).round() as i64,
            rtt_us,
            taken_at_us: after_us,
        };
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let take = match *held {
            None => true,
            Some(h) => {
                rtt_us < 1_000 || rtt_us <= h.rtt_us || after_us - h.taken_at_us > 60_000_000
            }
        };
        if take {
            *held = Some(sample);
        }
        held.map_or(sample.lead_ms, |h| h.lead_ms)
    }

    /// The lead last measured (zero before any measurement).
    pub(crate) fn lead_ms(&self) -> i64 {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(0, |h| h.lead_ms)
    }
}

/// A clock moved by a server's measured lead: `base` plus the lead.
#[derive(Debug)]
pub(crate) struct LeadingClock {
    pub(crate) base: Arc<dyn Clock>,
    pub(crate) lead: Arc<ServerLead>,
}

impl Clock for LeadingClock {
    fn now_ms(&self) -> i64 {
        self.base.now_ms().saturating_add(self.lead.lead_ms())
    }
}

/// Converts engine milliseconds to a UTC timestamp (out-of-range values clamp to the epoch).
pub fn ms_to_datetime(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}
