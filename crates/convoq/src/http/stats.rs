//! Backlog and throughput per queue, for backpressure (429), `estimatedWaitTime`, and the
//! queue stats endpoints. Counts are cached and refreshed in the background (stale while
//! revalidating), so that a POST never waits for the queue to be counted except on the very
//! first request or when the cache is too old to trust.
//!
//! The backlog a POST is admitted against is never older than what this process committed:
//! [`QueueStats::admit`] adds to the cached counts the jobs this process has added since their
//! read began and the admissions granted and not yet answered, and grants one at a time under
//! a lock. Jobs that drained since the read are found at the next refresh (the count errs high,
//! never low). An add that commits before a read begins but is answered after it would be
//! counted twice (in the read and as added since), so within [`NEAR_LIMIT`] jobs of the limit
//! admissions and reads are kept apart (`QueueStats::gate`; a read waits for it up to
//! [`GATE_WAIT`]): there the limit holds exactly within one process. Other processes' adds are seen at this process's next refresh: see the
//! README for the bound.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoq_queue::{QueueCounts, QueueError, Queues};

use crate::telemetry::Metrics;

/// How long cached counts are used as they are.
const FRESH_FOR: Duration = Duration::from_millis(250);
/// How long stale counts are still answered while one refresh runs in the background; older
/// than this, a caller waits for fresh counts.
const STALE_FOR: Duration = Duration::from_secs(5);
/// How close to its limit a queue's backlog must be for admissions and count reads to be kept
/// apart, so that the count is exact there.
pub const NEAR_LIMIT: u64 = 256;
/// The longest a count read waits for the admissions under way near the limit.
const GATE_WAIT: Duration = Duration::from_millis(50);
/// The window for throughput and mean duration.
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    completed_total: u64,
    duration_sum: f64,
    duration_count: u64,
}

#[derive(Default)]
struct PerQueue {
    /// The last counts read, stamped with when their read began.
    counts: Option<(Instant, QueueCounts)>,
    /// Jobs this process has added to the queue since it started (admitted and created).
    accepted: u64,
    /// `accepted` when the cached counts' read began: the jobs added since are not in them.
    accepted_at_read: u64,
    /// Admissions granted whose add has not been answered yet.
    reserved: u64,
    /// The backlog limit admissions are checked against, once one has been.
    limit: Option<u64>,
    refreshing: bool,
    samples: VecDeque<Sample>,
    /// The queue's lifetime totals as read, one reading every [`HISTORY_STEP`] at most, over
    /// the last [`HISTORY`]: wall-clock milliseconds, completed, failed.
    history: VecDeque<(i64, u64, u64)>,
}

/// How far back [`QueueStats::totals_history`] goes.
const HISTORY: Duration = Duration::from_secs(5 * 60);
/// The least time between two of its readings.
const HISTORY_STEP: Duration = Duration::from_secs(10);

impl PerQueue {
    /// The backlog (waiting, delayed and paused jobs) as this process knows it: the last counts
    /// plus what it added since their read began and the admissions under way.
    fn backlog(&self) -> Option<u64> {
        let (_, c) = self.counts.as_ref()?;
        Some(backlog_of(c) + self.accepted.saturating_sub(self.accepted_at_read) + self.reserved)
    }
}

/// The jobs of `counts` that wait to run.
pub fn backlog_of(counts: &QueueCounts) -> u64 {
    counts.waiting + counts.delayed + counts.paused
}

/// A POST's place in the backlog, granted by [`QueueStats::admit`]. Say with
/// [`Admission::added`] whether the add created a job; dropped without it (the add failed), the
/// place is given back.
pub struct Admission {
    stats: Arc<QueueStats>,
    queue: String,
    /// The backlog this admission counts in, itself included.
    pub backlog: u64,
    settled: bool,
    /// Near the limit: keeps count reads out until the add is answered.
    _gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl Admission {
    /// The add was answered: `created` when it made a new job (not an idempotent replay).
    pub fn added(mut self, created: bool) {
        self.settle(created);
    }

    fn settle(&mut self, created: bool) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut map = self.stats.lock();
        if let Some(q) = map.get_mut(&self.queue) {
            q.reserved = q.reserved.saturating_sub(1);
            if created {
                q.accepted += 1;
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// Why a POST was not admitted: the queue's backlog is at its limit.
#[derive(Debug, Clone, Copy)]
pub struct Full {
    /// The backlog as counted.
    pub backlog: u64,
    /// Seconds until the backlog should be under the limit at the queue's measured drain rate
    /// (1 to 60; 60 when the queue is not draining, e.g. paused).
    pub retry_after: u64,
}

/// Cached counts and a minute of throughput samples per queue.
#[derive(Default)]
pub struct QueueStats {
    // A std mutex: held only to read or update the cache, never across an await.
    inner: Mutex<HashMap<String, PerQueue>>,
    /// Near a queue's limit, held shared by each admission until its add is answered and
    /// exclusively by each count read, so that no add is between its commit and its answer
    /// while a read begins (it would be counted twice).
    gate: Arc<tokio::sync::RwLock<()>>,
}

/// Throughput figures of one queue over the last minute.
#[derive(Debug, Clone, Copy, Default)]
pub struct Throughput {
    /// Jobs completed per second.
    pub per_second: f64,
    /// Mean attempt duration in milliseconds (attempts run in this process).
    pub mean_duration_ms: f64,
}

impl QueueStats {
    /// The queue's counts: at most [`FRESH_FOR`] old, or at most [`STALE_FOR`] old while a
    /// refresh runs in the background (one at a time per queue).
    ///
    /// # Errors
    /// When the queue cannot be read and no recent counts are cached.
    pub async fn counts(
        self: &Arc<Self>,
        queues: &Queues,
        metrics: &Arc<Metrics>,
        queue: &str,
    ) -> Result<QueueCounts, QueueError> {
        let cached = {
            let mut map = self.lock();
            let q = map.entry(queue.to_owned()).or_default();
            match &q.counts {
                Some((at, c)) if at.elapsed() < FRESH_FOR => return Ok(c.clone()),
                Some((at, c)) if at.elapsed() < STALE_FOR => {
                    let start = !q.refreshing;
                    q.refreshing = true;
                    Some((c.clone(), start))
                }
                _ => None,
            }
        };
        match cached {
            Some((counts, start_refresh)) => {
                if start_refresh {
                    let (this, queues, metrics) = (self.clone(), queues.clone(), metrics.clone());
                    let queue = queue.to_owned();
                    tokio::spawn(async move {
                        let _ = this.fresh_counts(&queues, &metrics, &queue).await;
                        if let Some(q) = this.lock().get_mut(&queue) {
                            q.refreshing = false;
                        }
                    });
                }
                Ok(counts)
            }
            None => self.fresh_counts(queues, metrics, queue).await,
        }
    }

    /// Grants a place in `queue`'s backlog if it holds fewer than `limit` jobs as this process
    /// knows it (see the module docs); otherwise says when to try again.
    ///
    /// # Errors
    /// The outer error when the queue cannot be counted; the inner one when it is full.
    pub async fn admit(
        self: &Arc<Self>,
        queues: &Queues,
        metrics: &Arc<Metrics>,
        queue: &str,
        limit: u64,
    ) -> Result<Result<Admission, Full>, QueueError> {
        // Counts no older than STALE_FOR (a refresh under way in the background).
        self.counts(queues, metrics, queue).await?;
        let near = {
            let mut map = self.lock();
            let q = map.entry(queue.to_owned()).or_default();
            q.limit = Some(limit);
            q.backlog().unwrap_or(0) + NEAR_LIMIT >= limit
        };
        let gate = if near {
            Some(self.gate.clone().read_owned().await)
        } else {
            None
        };
        let full = {
            let mut map = self.lock();
            let q = map.entry(queue.to_owned()).or_default();
            let backlog = q.backlog().unwrap_or(0);
            if backlog < limit {
                q.reserved += 1;
                return Ok(Ok(Admission {
                    stats: self.clone(),
                    queue: queue.to_owned(),
                    backlog: backlog + 1,
                    settled: false,
                    _gate: gate,
                }));
            }
            backlog
        };
        let drain = self.throughput(queue).per_second;
        let excess = (full + 1).saturating_sub(limit) as f64;
        let retry_after = if drain > 0.0 {
            (excess / drain).ceil().clamp(1.0, 60.0) as u64
        } else {
            60
        };
        Ok(Err(Full {
            backlog: full,
            retry_after,
        }))
    }

    /// The queue's counts read now (not from the cache), and the cache updated with them.
    ///
    /// # Errors
    /// When the queue cannot be read.
    pub async fn fresh_counts(
        &self,
        queues: &Queues,
        metrics: &Metrics,
        queue: &str,
    ) -> Result<QueueCounts, QueueError> {
        // Near the limit, the read waits for the admissions under way to be answered, but no
        // longer than GATE_WAIT: one stuck behind a slow write must not hold up every POST
        // queued behind the read. Without the gate the count can only err high.
        let _apart = if self.near_limit(queue) {
            tokio::time::timeout(GATE_WAIT, self.gate.write())
                .await
                .ok()
        } else {
            None
        };
        let (started, mark) = self.read_begins(queue);
        let counts = queues.counts(queue).await?;
        self.record(metrics, queue, &counts, started, mark);
        Ok(counts)
    }

    /// Whether `queue`'s backlog is within [`NEAR_LIMIT`] of the limit admissions check.
    fn near_limit(&self, queue: &str) -> bool {
        let map = self.lock();
        map.get(queue).is_some_and(|q| {
            q.limit
                .is_some_and(|limit| q.backlog().unwrap_or(0) + NEAR_LIMIT >= limit)
        })
    }

    /// How old the cached counts of `queue` are, if any are cached.
    pub fn counts_age(&self, queue: &str) -> Option<Duration> {
        let map = self.lock();
        map.get(queue)?.counts.as_ref().map(|(at, _)| at.elapsed())
    }

    /// Notes that a read of `queue`'s counts begins: when, and how many jobs this process had
    /// added by then.
    fn read_begins(&self, queue: &str) -> (Instant, u64) {
        let mut map = self.lock();
        let q = map.entry(queue.to_owned()).or_default();
        (Instant::now(), q.accepted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PerQueue>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Caches counts whose read began at `started`, when this process had added `mark` jobs,
    /// unless counts read later are cached already.
    fn record(
        &self,
        metrics: &Metrics,
        queue: &str,
        counts: &QueueCounts,
        started: Instant,
        mark: u64,
    ) {
        let now = Instant::now();
        let (sum, count) = duration_totals(metrics, queue);
        let mut map = self.lock();
        let q = map.entry(queue.to_owned()).or_default();
        if q.counts.as_ref().is_none_or(|(at, _)| *at <= started) {
            q.counts = Some((started, counts.clone()));
            q.accepted_at_read = mark;
        }
        if q.samples
            .back()
            .is_none_or(|s| now - s.at >= Duration::from_millis(500))
        {
            q.samples.push_back(Sample {
                at: now,
                completed_total: counts.completed_total,
                duration_sum: sum,
                duration_count: count,
            });
        }
        while q.samples.len() > 2 && q.samples.front().is_some_and(|s| now - s.at > WINDOW) {
            q.samples.pop_front();
        }
        let wall = chrono::Utc::now().timestamp_millis();
        let (step, keep) = (HISTORY_STEP.as_millis() as i64, HISTORY.as_millis() as i64);
        if q.history.back().is_none_or(|(at, _, _)| wall - at >= step) {
            q.history
                .push_back((wall, counts.completed_total, counts.failed_total));
        }
        while q.history.front().is_some_and(|(at, _, _)| wall - at > keep) {
            q.history.pop_front();
        }
    }

    /// `queue`'s lifetime totals as this process read them over the last five minutes (one
    /// reading every ten seconds at most, while someone reads the counts): wall-clock
    /// milliseconds, completed, failed. Lets a page that opens now chart the minutes before.
    pub fn totals_history(&self, queue: &str) -> Vec<(i64, u64, u64)> {
        let map = self.lock();
        map.get(queue)
            .map(|q| q.history.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Throughput over the samples of the last minute.
    pub fn throughput(&self, queue: &str) -> Throughput {
        let map = self.lock();
        let Some(q) = map.get(queue) else {
            return Throughput::default();
        };
        let (Some(first), Some(last)) = (q.samples.front(), q.samples.back()) else {
            return Throughput::default();
        };
        let secs = (last.at - first.at).as_secs_f64();
        let per_second = if secs > 0.0 {
            last.completed_total.saturating_sub(first.completed_total) as f64 / secs
        } else {
            0.0
        };
        let n = last.duration_count.saturating_sub(first.duration_count);
        let mean_duration_ms = if n > 0 {
            (last.duration_sum - first.duration_sum) / n as f64 * 1000.0
        } else {
            0.0
        };
        Throughput {
            per_second,
            mean_duration_ms,
        }
    }

    /// Milliseconds a newly added job may wait: the backlog divided by recent throughput.
    pub fn estimated_wait_ms(&self, queue: &str, backlog: u64) -> u64 {
        let t = self.throughput(queue);
        if backlog == 0 {
            0
        } else if t.per_second > 0.0 {
            (backlog as f64 / t.per_second * 1000.0).round() as u64
        } else {
            // No completions seen yet: assume one mean attempt per job, or 1 ms.
            (backlog as f64 * t.mean_duration_ms.max(1.0)).round() as u64
        }
    }
}

fn duration_totals(metrics: &Metrics, queue: &str) -> (f64, u64) {
    use crate::domain::{AUDIT_QUEUE, CREATE_CONVERSATION, DATABASE_QUEUE, RECORD_AUDIT_EVENT};
    // Only the pairs that exist, so that reading never creates an empty series.
    let name = match queue {
        DATABASE_QUEUE => CREATE_CONVERSATION,
        AUDIT_QUEUE => RECORD_AUDIT_EVENT,
        _ => return (0.0, 0),
    };
    match metrics
        .job_duration
        .get_metric_with_label_values(&[queue, name])
    {
        Ok(h) => (h.get_sample_sum(), h.get_sample_count()),
        Err(_) => (0.0, 0),
    }
}
