//! Jobs as users of the queue see them: what is added ([`NewJob`], [`JobOptions`]), what is
//! stored and read back ([`Job`], [`JobState`]), in BullMQ's vocabulary.
//!
//! These types are engine-neutral: every engine maps its rows or hashes to them at its edge.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The life of a job, in BullMQ's words.
///
/// `waiting` → `active` → `completed` | `failed`, with `delayed` while a job waits for its backoff
/// or its `delay`, and `paused` for waiting jobs of a paused queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Ready to run as soon as a worker is free.
    Waiting,
    /// Held by a worker under a lease.
    Active,
    /// Waiting for a point in time (a `delay`, or backoff before a retry).
    Delayed,
    /// Finished successfully; the result is stored.
    Completed,
    /// Finished unsuccessfully; the reason is stored.
    Failed,
    /// Waiting, but its queue is paused.
    Paused,
}

impl JobState {
    /// Every state, in the order reports list them.
    pub const ALL: [JobState; 6] = [
        JobState::Waiting,
        JobState::Active,
        JobState::Delayed,
        JobState::Completed,
        JobState::Failed,
        JobState::Paused,
    ];

    /// The lowercase name used on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Active => "active",
            JobState::Delayed => "delayed",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Paused => "paused",
        }
    }

    /// Parses a state name as [`JobState::as_str`] writes it.
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Whether the job has finished for good (until an operator retries it).
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long to wait before the next attempt of a job that failed with a retryable error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// `fixed` waits `delay` every time; `exponential` waits `delay * 2^(attempt-1)`.
    #[serde(rename = "type")]
    pub kind: BackoffKind,
    /// The base delay in milliseconds.
    pub delay: u64,
    /// The share of the delay (0.0 to 1.0) that is randomised downwards, as BullMQ's `jitter`:
    /// the wait is uniform in `[delay * (1 - jitter), delay]`.
    #[serde(default)]
    pub jitter: f64,
}

/// The two backoff curves BullMQ knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackoffKind {
    /// The same delay before every retry.
    Fixed,
    /// The delay doubles with every attempt.
    Exponential,
}

impl Backoff {
    /// The seed's default: exponential from one second, with half the delay randomised so that
    /// jobs failing together do not retry together.
    pub const DEFAULT: Backoff = Backoff {
        kind: BackoffKind::Exponential,
        delay: 1000,
        jitter: 0.5,
    };

    /// The upper bound of the wait after the `attempt`-th attempt failed (1-based), before jitter.
    pub fn max_delay(&self, attempt: u32) -> Duration {
        let factor = match self.kind {
            BackoffKind::Fixed => 1u64,
            BackoffKind::Exponential => 1u64 << attempt.saturating_sub(1).min(32),
        };
        Duration::from_millis(self.delay.saturating_mul(factor))
    }

    /// The wait after the `attempt`-th attempt failed (1-based), with jitter drawn from `unit`,
    /// a number in `[0, 1)`.
    pub fn delay_for(&self, attempt: u32, unit: f64) -> Duration {
        let max = self.max_delay(attempt).as_millis() as f64;
        let jitter = self.jitter.clamp(0.0, 1.0);
        let ms = max * (1.0 - jitter * unit.clamp(0.0, 1.0));
        Duration::from_millis(ms.round() as u64)
    }
}

/// Which finished jobs to keep, as BullMQ's `removeOnComplete` / `removeOnFail`.
///
/// On the wire: `true` (remove at once), `false` (keep forever), a number (keep the newest N),
/// or `{ "count": N, "age": SECONDS }` (keep the newest N, none older than `age`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepJobs {
    /// Remove the job as soon as it finishes.
    RemoveAtOnce,
    /// Keep the job while it is among the newest `count` finished jobs of its queue in the same
    /// state, and younger than `age` seconds. `None` means no bound.
    Keep {
        /// How many of the newest finished jobs to keep.
        count: Option<u64>,
        /// How long to keep them, in seconds.
        age_secs: Option<u64>,
    },
}

impl KeepJobs {
    /// Keep everything.
    pub const FOREVER: KeepJobs = KeepJobs::Keep {
        count: None,
        age_secs: None,
    };
    /// The seed's default: the newest 1000, for at most seven days.
    pub const DEFAULT: KeepJobs = KeepJobs::Keep {
        count: Some(1000),
        age_secs: Some(7 * 24 * 3600),
    };
}

impl Serialize for KeepJobs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct KeepRepr {
            #[serde(skip_serializing_if = "Option::is_none")]
            count: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            age: Option<u64>,
        }
        match *self {
            KeepJobs::RemoveAtOnce => s.serialize_bool(true),
            KeepJobs::Keep {
                count: None,
                age_secs: None,
            } => s.serialize_bool(false),
            KeepJobs::Keep {
                count: Some(n),
                age_secs: None,
            } => s.serialize_u64(n),
            KeepJobs::Keep { count, age_secs } => KeepRepr {
                count,
                age: age_secs,
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for KeepJobs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bool(bool),
            Count(u64),
            Keep {
                #[serde(default)]
                count: Option<u64>,
                #[serde(default)]
                age: Option<u64>,
            },
        }
        Ok(match Repr::deserialize(d)? {
            Repr::Bool(true) => KeepJobs::RemoveAtOnce,
            Repr::Bool(false) => KeepJobs::FOREVER,
            Repr::Count(n) => KeepJobs::Keep {
                count: Some(n),
                age_secs: None,
            },
            Repr::Keep { count, age } => KeepJobs::Keep {
                count,
                age_secs: age,
            },
        })
    }
}

/// Options of one job. Unset fields take the queue's defaults ([`JobOptions::merged_over`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobOptions {
    /// How many times the job may run before it fails for good (at least 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The wait between attempts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Milliseconds to wait before the job may first run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<u64>,
    /// Lower runs first; 0 (the default) runs before any prioritised job, as in BullMQ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// A custom id. Adding a job whose id exists returns the existing job and adds nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Which completed jobs to keep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove_on_complete: Option<KeepJobs>,
    /// Which failed jobs to keep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove_on_fail: Option<KeepJobs>,
    /// Milliseconds an attempt may run before it is abandoned as a retryable failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

impl JobOptions {
    /// The seed's defaults: 3 attempts, exponential backoff from 1 s with jitter, keep the last
    /// 1000 completed and failed jobs for 7 days, no timeout.
    pub fn seed_defaults() -> JobOptions {
        JobOptions {
            attempts: Some(3),
            backoff: Some(Backoff::DEFAULT),
            delay: None,
            priority: None,
            job_id: None,
            remove_on_complete: Some(KeepJobs::DEFAULT),
            remove_on_fail: Some(KeepJobs::DEFAULT),
            timeout: None,
        }
    }

    /// These options, with every unset field taken from `defaults`.
    pub fn merged_over(&self, defaults: &JobOptions) -> JobOptions {
        JobOptions {
            attempts: self.attempts.or(defaults.attempts),
            backoff: self.backoff.or(defaults.backoff),
            delay: self.delay.or(defaults.delay),
            priority: self.priority.or(defaults.priority),
            job_id: self.job_id.clone(),
            remove_on_complete: self.remove_on_complete.or(defaults.remove_on_complete),
            remove_on_fail: self.remove_on_fail.or(defaults.remove_on_fail),
            timeout: self.timeout.or(defaults.timeout),
        }
    }

    /// The number of attempts, never less than one.
    pub fn max_attempts(&self) -> u32 {
        self.attempts.unwrap_or(1).max(1)
    }
}

/// A job to add to a queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// The queue it goes to (`database`, `audit`, …).
    pub queue: String,
    /// The stable job name that selects the processor (`create_conversation`).
    pub name: String,
    /// The payload, any JSON value.
    pub data: serde_json::Value,
    /// Its options; unset fields take the queue's defaults.
    pub opts: JobOptions,
}

impl NewJob {
    /// A job with the queue's default options.
    pub fn new(queue: impl Into<String>, name: impl Into<String>, data: serde_json::Value) -> Self {
        NewJob {
            queue: queue.into(),
            name: name.into(),
            data,
            opts: JobOptions::default(),
        }
    }

    /// The same job with a custom id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.opts.job_id = Some(id.into());
        self
    }

    /// The same job with these options.
    pub fn with_opts(mut self, opts: JobOptions) -> Self {
        self.opts = opts;
        self
    }

    /// When this job, added at `now_ms`, becomes ready: after its delay.
    pub(crate) fn due_at(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(self.opts.delay.unwrap_or(0).min(i64::MAX as u64) as i64)
    }

    /// This job as an engine has just stored it under `id`, due at `run_at_ms`.
    pub(crate) fn into_stored(self, id: String, now_ms: i64, run_at_ms: i64) -> Job {
        Job {
            id,
            queue: self.queue,
            name: self.name,
            data: self.data,
            opts: self.opts,
            state: if run_at_ms > now_ms {
                JobState::Delayed
            } else {
                JobState::Waiting
            },
            attempts_made: 0,
            stalled_count: 0,
            result: None,
            failed_reason: None,
            created_at: crate::clock::ms_to_datetime(now_ms),
            available_at: crate::clock::ms_to_datetime(run_at_ms),
            processed_at: None,
            finished_at: None,
            lease_expires_at: None,
            lease_holder: None,
        }
    }

    /// [`NewJob::into_stored`] of a copy.
    pub(crate) fn stored(&self, id: String, now_ms: i64, run_at_ms: i64) -> Job {
        self.clone().into_stored(id, now_ms, run_at_ms)
    }
}

/// A job as stored, read back from an engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// Its id, unique in its queue.
    pub id: String,
    /// Its queue.
    pub queue: String,
    /// Its job name.
    pub name: String,
    /// Its payload.
    pub data: serde_json::Value,
    /// Its effective options (the queue's defaults merged in at add time).
    pub opts: JobOptions,
    /// Where it stands now.
    pub state: JobState,
    /// Attempts started so far (an attempt released at shutdown does not count).
    pub attempts_made: u32,
    /// Times its lease expired while it was active.
    pub stalled_count: u32,
    /// What the processor returned, once completed.
    pub result: Option<serde_json::Value>,
    /// Why the last attempt failed.
    pub failed_reason: Option<String>,
    /// When it was added.
    pub created_at: DateTime<Utc>,
    /// When it becomes (or became) runnable: later than `created_at` for delayed jobs and retries.
    pub available_at: DateTime<Utc>,
    /// When its latest attempt started.
    pub processed_at: Option<DateTime<Utc>>,
    /// When it completed or failed.
    pub finished_at: Option<DateTime<Utc>>,
    /// When an active job's lease runs out unless its worker renews it (SQL engines; `None`
    /// on BullMQ, whose lock is a key of its own with a time to live, and for jobs not active).
    /// A lease in the past is expired: the job waits for the stall sweep to take it back.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Which process holds an active job's lease: its engine's owner id, logged at its start
    /// (SQL engines; `None` on BullMQ and for jobs not active).
    pub lease_holder: Option<String>,
}

impl Job {
    /// The number of attempts it may make in all.
    pub fn max_attempts(&self) -> u32 {
        self.opts.max_attempts()
    }
}

/// What adding a job did.
#[derive(Debug, Clone, PartialEq)]
pub struct Added {
    /// The job as stored: the new one, or the existing one with the same custom id.
    pub job: Job,
    /// False when a job with the same custom id already existed and nothing was added.
    pub created: bool,
}

/// Counts of one queue's jobs by state, and its lifetime totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueCounts {
    /// Jobs ready to run (zero while the queue is paused: they count as `paused`).
    pub waiting: u64,
    /// Jobs held by workers.
    pub active: u64,
    /// Jobs waiting for their time.
    pub delayed: u64,
    /// Completed jobs still kept.
    pub completed: u64,
    /// Failed jobs still kept.
    pub failed: u64,
    /// Waiting jobs of a paused queue.
    pub paused: u64,
    /// Jobs ever completed, pruned ones included.
    pub completed_total: u64,
    /// Jobs ever failed for good, pruned ones included.
    pub failed_total: u64,
}

impl QueueCounts {
    /// The count for one state.
    pub fn get(&self, state: JobState) -> u64 {
        match state {
            JobState::Waiting => self.waiting,
            JobState::Active => self.active,
            JobState::Delayed => self.delayed,
            JobState::Completed => self.completed,
            JobState::Failed => self.failed,
            JobState::Paused => self.paused,
        }
    }

    /// Jobs not yet finished: waiting, paused, delayed and active.
    pub fn backlog(&self) -> u64 {
        self.waiting + self.paused + self.delayed + self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_jobs_round_trips_bullmq_forms() {
        for (json, keep) in [
            ("true", KeepJobs::RemoveAtOnce),
            ("false", KeepJobs::FOREVER),
            (
                "10",
                KeepJobs::Keep {
                    count: Some(10),
                    age_secs: None,
                },
            ),
            (
                r#"{"count":5,"age":60}"#,
                KeepJobs::Keep {
                    count: Some(5),
                    age_secs: Some(60),
                },
            ),
        ] {
            let parsed: KeepJobs = serde_json::from_str(json).unwrap();
            assert_eq!(parsed, keep);
            assert_eq!(serde_json::to_string(&parsed).unwrap(), json);
        }
    }

    #[test]
    fn exponential_backoff_doubles_and_jitter_stays_in_envelope() {
        let b = Backoff {
            kind: BackoffKind::Exponential,
            delay: 1000,
            jitter: 0.5,
        };
        assert_eq!(b.max_delay(1), Duration::from_millis(1000));
        assert_eq!(b.max_delay(3), Duration::from_millis(4000));
        assert_eq!(b.delay_for(2, 0.0), Duration::from_millis(2000));
        assert_eq!(b.delay_for(2, 0.999_999), Duration::from_millis(1000));
        let fixed = Backoff {
            kind: BackoffKind::Fixed,
            delay: 250,
            jitter: 0.0,
        };
        assert_eq!(fixed.delay_for(7, 0.7), Duration::from_millis(250));
    }

    #[test]
    fn options_reject_unknown_fields_and_merge_defaults() {
        let err = serde_json::from_str::<JobOptions>(r#"{"attempt":3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `attempt`"), "{err}");
        let opts: JobOptions = serde_json::from_str(r#"{"attempts":5,"jobId":"x"}"#).unwrap();
        let merged = opts.merged_over(&JobOptions::seed_defaults());
        assert_eq!(merged.attempts, Some(5));
        assert_eq!(merged.backoff, Some(Backoff::DEFAULT));
        assert_eq!(merged.job_id.as_deref(), Some("x"));
    }
}

/// What a job search matches: every part given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSearch {
    /// Text that the job's id, data (as JSON text) or failure reason contains, ignoring case.
    pub text: Option<String>,
    /// A top-level field of the job's data and the value it must have (a string, or the text of
    /// a number or boolean): every job of one `userId`, say.
    pub field: Option<(String, String)>,
    /// Only jobs that stalled before (their lease ran out at least once and they were taken
    /// back): jobs in trouble.
    pub stalled: bool,
}

impl JobSearch {
    /// Whether `job` matches: the rule each engine's search applies.
    pub fn matches(&self, job: &Job) -> bool {
        let text_ok = self.text.as_deref().is_none_or(|t| {
            let t = t.to_lowercase();
            job.id.to_lowercase().contains(&t)
                || job.data.to_string().to_lowercase().contains(&t)
                || job
                    .failed_reason
                    .as_deref()
                    .is_some_and(|r| r.to_lowercase().contains(&t))
        });
        let field_ok = self
            .field
            .as_ref()
            .is_none_or(|(k, v)| match job.data.get(k) {
                Some(serde_json::Value::String(s)) => s == v,
                Some(other @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    v.as_str() == other.to_string().as_str()
                }
                _ => false,
            });
        text_ok && field_ok && (!self.stalled || job.stalled_count > 0)
    }
}

/// A page of a job search.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The jobs found, in the order of a listing of their state (newest first across states).
    pub jobs: Vec<Job>,
    /// Whether every job of the state (or queue) was searched. An engine that cannot search
    /// where the jobs are stored (BullMQ) reads a bounded number of them and says so here.
    pub exhaustive: bool,
}
