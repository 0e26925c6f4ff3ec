//! Rebuilding a job's history: the first event from its creation, the events of earlier attempts
//! from `cq_job_events`, the current attempt and its end from the job's row.
//!
//! The hot path writes no event rows: a job that runs once and completes has its whole history
//! in its row. Rows are written only when a transition overwrites what the row showed (a retry,
//! a stall, a release, an operator's retry), so the rebuilt history only ever grows.

use crate::clock::ms_to_datetime;
use crate::events::{JobEvent, JobEventKind};
use crate::job::{Job, JobState};

/// A stored event row.
pub(crate) struct EventRow {
    pub(crate) kind: String,
    pub(crate) attempt: u32,
    pub(crate) at: i64,
    pub(crate) detail: Option<serde_json::Value>,
}

impl EventRow {
    /// An event row from its stored columns (`kind`, `attempt`, `at`, `detail` as JSON text;
    /// a detail that is not JSON is left out).
    pub(crate) fn from_columns(
        kind: String,
        attempt: i64,
        at: i64,
        detail: Option<String>,
    ) -> Self {
        EventRow {
            kind,
            attempt: attempt.clamp(0, u32::MAX as i64) as u32,
            at,
            detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
        }
    }
}

fn kind_from_str(s: &str) -> Option<JobEventKind> {
    use JobEventKind::*;
    [
        Waiting, Delayed, Active, Retrying, Stalled, Completed, Failed,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}

/// The job's history, oldest first.
pub(crate) fn rebuild(job: &Job, stored: &[EventRow]) -> Vec<JobEvent> {
    let mut out = Vec::with_capacity(stored.len() + 3);
    let delayed_at_start = job.opts.delay.unwrap_or(0) > 0;
    out.push(JobEvent {
        kind: if delayed_at_start {
            JobEventKind::Delayed
        } else {
            JobEventKind::Waiting
        },
        at: job.created_at,
        attempt: 0,
        detail: None,
    });
    for e in stored {
        if let Some(kind) = kind_from_str(&e.kind) {
            out.push(JobEvent {
                kind,
                at: ms_to_datetime(e.at),
                attempt: e.attempt,
                detail: e.detail.clone(),
            });
        }
    }
    if let Some(started) = job.processed_at {
        if matches!(
            job.state,
            JobState::Active | JobState::Completed | JobState::Failed
        ) {
            out.push(JobEvent {
                kind: JobEventKind::Active,
                at: started,
                attempt: job.attempts_made,
                detail: None,
            });
        }
    }
    let finished = job.finished_at.unwrap_or(job.created_at);
    match job.state {
        JobState::Completed => out.push(JobEvent {
            kind: JobEventKind::Completed,
            at: finished,
            attempt: job.attempts_made,
            detail: job.result.clone(),
        }),
        JobState::Failed => out.push(JobEvent {
            kind: JobEventKind::Failed,
            at: finished,
            attempt: job.attempts_made,
            detail: job.failed_reason.clone().map(serde_json::Value::String),
        }),
        _ => {}
    }
    out
}
