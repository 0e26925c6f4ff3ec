//! Backlog and throughput per queue, for backpressure (429), `estimatedWaitTime`, and the
//! queue stats endpoints. Counts are cached and refreshed in the background (stale while
//! revalidating), so that a POST never waits for the queue to be counted except on the very
//! first request or when the cache is too old to trust.

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
    refreshing: bool,
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
                        let fresh = queues.counts(&queue).await;
                        if let Ok(c) = &fresh {
                            this.record(&metrics, &queue, c);
                        }
                        if let Some(q) = this.lock().get_mut(&queue) {
                            q.refreshing = false;
                        }
                    });
                }
                Ok(counts)
            }
            None => {
                let counts = queues.counts(queue).await?;
                self.record(metrics, queue, &counts);
                Ok(counts)
            }
        }
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
