//! Telemetry: the Prometheus metrics of SPEC §6 in one [`Metrics`] registry, the worker
//! observer that feeds the job metrics and logs, and `tracing` set-up.
//!
//! Labels are bounded: queue and job names, route templates, operation names. Never user input.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoq_queue::{AttemptEnd, Job, WorkerObserver};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::config::LogFormat;
use crate::domain::{conversation_id_of, CREATE_CONVERSATION};

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    /// Jobs enqueued.
    pub jobs_queued: IntCounterVec,
    /// Jobs completed.
    pub jobs_completed: IntCounterVec,
    /// Attempts failed; `final` says whether the job failed for good.
    pub jobs_failed: IntCounterVec,
    /// Attempt durations.
    pub job_duration: HistogramVec,
    /// Time from a job being runnable to its attempt starting.
    pub job_wait: HistogramVec,
    /// Jobs per queue and state.
    pub queue_jobs: IntGaugeVec,
    /// 1 while the queue engine can take writes (its writer is up and its database answers),
    /// 0 while it cannot (a full disk, a broken file, an engine that is away); read at each
    /// scrape.
    pub queue_ready: IntGauge,
    /// HTTP requests.
    pub http_requests: IntCounterVec,
    /// Requests refused by a rate limit, by scope (`key`, `user`).
    pub rate_limited: IntCounterVec,
    /// HTTP request durations.
    pub http_duration: HistogramVec,
    /// Store query durations.
    pub db_query: HistogramVec,
}

const FAST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let jobs_queued = counter(
            "convoq_jobs_queued_total",
            "Jobs this process added: accepted POSTs, and follow-ups its workers' completions added.",
            &["queue", "name"],
        );
        let jobs_completed = counter(
            "convoq_jobs_completed_total",
            "Jobs completed.",
            &["queue", "name"],
        );
        let jobs_failed = counter(
            "convoq_jobs_failed_total",
            "Job attempts failed; final=true when the job failed for good.",
            &["queue", "name", "final"],
        );
        let job_duration = histogram(
            "convoq_job_duration_seconds",
            "Duration of job attempts.",
            &["queue", "name"],
            FAST_BUCKETS,
        );
        let job_wait = histogram(
            "convoq_job_wait_seconds",
            "Time from a job becoming runnable to its attempt starting.",
            &["queue", "name"],
            WAIT_BUCKETS,
        );
        let queue_jobs = IntGaugeVec::new(
            Opts::new("convoq_queue_jobs", "Jobs per queue and state."),
            &["queue", "state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_jobs.clone()))
            .expect("unique metric");
        let queue_ready = IntGauge::new(
            "convoq_queue_ready",
            "1 while the queue engine can take writes, 0 while it cannot (see /readyz).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_ready.clone()))
            .expect("unique metric");
        let http_requests = counter(
            "convoq_http_requests_total",
            "HTTP requests by route template and status.",
            &["method", "route", "status"],
        );
        let rate_limited = counter(
            "convoq_rate_limited_total",
            "Requests answered 429 by a per-caller limit, by its scope: rate_limited (key: an API key's rate, user: a userId's conversation POSTs) or backlog_quota (key_backlog, user_backlog: jobs queued and not ended).",
            &["scope"],
        );
        let http_duration = histogram(
            "convoq_http_request_duration_seconds",
            "HTTP request durations by route template.",
            &["method", "route"],
            FAST_BUCKETS,
        );
        let db_query = histogram(
            "convoq_db_query_duration_seconds",
            "Store query durations by operation.",
            &["operation"],
            FAST_BUCKETS,
        );
        Arc::new(Metrics {
            registry,
            jobs_queued,
            jobs_completed,
            jobs_failed,
            job_duration,
            job_wait,
            queue_jobs,
            queue_ready,
            http_requests,
            rate_limited,
            http_duration,
            db_query,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Times a store query into `convoq_db_query_duration_seconds{operation}`.
    pub fn db_timer(&self, operation: &'static str) -> DbTimer<'_> {
        DbTimer {
            metrics: self,
            operation,
            start: Instant::now(),
        }
    }
}

/// Records a query's duration when dropped.
pub struct DbTimer<'a> {
    metrics: &'a Metrics,
    operation: &'static str,
    start: Instant,
}

impl Drop for DbTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .db_query
            .with_label_values(&[self.operation])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Feeds job metrics and writes one log event per attempt step, with the request id that
/// travels inside the job.
pub struct JobTelemetry {
    /// Where to count.
    pub metrics: Arc<Metrics>,
}

fn field<'a>(job: &'a Job, name: &str) -> &'a str {
    job.data.get(name).and_then(|v| v.as_str()).unwrap_or("")
}

impl WorkerObserver for JobTelemetry {
    fn follow_up_added(&self, queue: &str, name: &str) {
        self.metrics
            .jobs_queued
            .with_label_values(&[queue, name])
            .inc();
    }

    fn started(&self, job: &Job) {
        let labels = [job.queue.as_str(), job.name.as_str()];
        if let Some(started) = job.processed_at {
            let wait = (started - job.available_at).num_milliseconds().max(0) as f64 / 1000.0;
            self.metrics
                .job_wait
                .with_label_values(&labels)
                .observe(wait);
        }
        tracing::info!(
            request_id = field(job, "requestId"),
            job_id = %job.id,
            queue = %job.queue,
            job_name = %job.name,
            user_id = field(job, "userId"),
            conversation_id = field(job, "conversationId"),
            attempt = job.attempts_made,
            "job started"
        );
    }

    fn finished(&self, job: &Job, end: AttemptEnd, elapsed: Duration, error: Option<&str>) {
        let labels = [job.queue.as_str(), job.name.as_str()];
        self.metrics
            .job_duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let request_id = field(job, "requestId");
        match end {
            AttemptEnd::Completed => {
                self.metrics.jobs_completed.with_label_values(&labels).inc();
                tracing::info!(request_id, job_id = %job.id, queue = %job.queue, job_name = %job.name,
                    user_id = field(job, "userId"), conversation_id = field(job, "conversationId"),
                    attempt = job.attempts_made, duration_ms, "job completed");
                if job.name == CREATE_CONVERSATION {
                    // After the commit that made the conversation (its own insert, or the
                    // completion's transaction where the queue is in the store's database).
                    let conversation_id = conversation_id_of(job);
                    tracing::info!(request_id, job_id = %job.id, user_id = field(job, "userId"),
                        conversation_id, attempt = job.attempts_made, "conversation created");
                }
            }
            AttemptEnd::Retrying => {
                self.metrics
                    .jobs_failed
                    .with_label_values(&[labels[0], labels[1], "false"])
                    .inc();
                tracing::warn!(request_id, job_id = %job.id, queue = %job.queue, job_name = %job.name,
                    attempt = job.attempts_made, duration_ms, error = error.unwrap_or(""), "job retrying");
            }
            AttemptEnd::Failed => {
                self.metrics
                    .jobs_failed
                    .with_label_values(&[labels[0], labels[1], "true"])
                    .inc();
                tracing::error!(request_id, job_id = %job.id, queue = %job.queue, job_name = %job.name,
                    attempt = job.attempts_made, duration_ms, error = error.unwrap_or(""), "job failed");
            }
            AttemptEnd::NotRecorded => {
                tracing::warn!(request_id, job_id = %job.id, queue = %job.queue, attempt = job.attempts_made,
                    duration_ms, "job attempt not recorded; the job will be taken back");
            }
        }
    }
}

/// Installs the global `tracing` subscriber: JSON unless `format` says pretty (or, unset,
/// stderr is a terminal). Logs go to stderr.
pub fn init_logging(format: Option<LogFormat>, filter: &str) {
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
