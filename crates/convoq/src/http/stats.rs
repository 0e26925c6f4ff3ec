//! Backlog and throughput per queue, for backpressure (429), `estimatedWaitTime`, and the
//! queue stats endpoints. Counts are cached for a short time so that a busy POST path does not
//! count the queue on every request.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use convoq_queue::{QueueCounts, QueueError, Queues};

use crate::telemetry::Metrics;

/// How long cached counts are used.
const FRESH_FOR: Duration = Duration::from_millis(250);
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
    counts: Option<(Instant, QueueCounts)>,
    samples: VecDeque<Sample>,
}

/// Cached counts and a minute of throughput samples per queue.
#[derive(Default)]
pub struct QueueStats {
    // A std mutex: held only to read or update the cache, never across an await.
    inner: Mutex<HashMap<String, PerQueue>>,
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
    /// The queue's counts, at most [`FRESH_FOR`] old.
    ///
    /// # Errors
    /// When the queue cannot be read.
    pub async fn counts(
        &self,
        queues: &Queues,
        metrics: &Metrics,
        queue: &str,
    ) -> Result<QueueCounts, QueueError> {
        if let Some((at, c)) = self.lock().get(queue).and_then(|q| q.counts.clone()) {
            if at.elapsed() < FRESH_FOR {
                return Ok(c);
            }
        }
        let counts = queues.counts(queue).await?;
        self.record(metrics, queue, &counts);
        Ok(counts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PerQueue>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, metrics: &Metrics, queue: &str, counts: &QueueCounts) {
        let now = Instant::now();
        let (sum, count) = duration_totals(metrics, queue);
        let mut map = self.lock();
        let q = map.entry(queue.to_owned()).or_default();
        q.counts = Some((now, counts.clone()));
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
    let mut sum = 0.0;
    let mut count = 0;
    for name in [
        crate::domain::CREATE_CONVERSATION,
        crate::domain::RECORD_AUDIT_EVENT,
    ] {
        if let Ok(h) = metrics
            .job_duration
            .get_metric_with_label_values(&[queue, name])
        {
            sum += h.get_sample_sum();
            count += h.get_sample_count();
        }
    }
    (sum, count)
}
