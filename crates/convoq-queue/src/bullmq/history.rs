//! A job's history, derived from its BullMQ hash alone: BullMQ keeps no per-attempt record, only
//! counters (`ats` attempts started, `stc` stalls), the latest attempt's start (`processedOn`),
//! the end (`finishedOn`), the last `failedReason` and the `returnvalue`.
//!
//! So the derived history has every step in order, but the steps of attempts before the latest
//! one carry the job's creation time (BullMQ does not store when they happened), and an earlier
//! attempt that ended in a stall is reported as `retrying` once a later attempt has started.
//! The history only ever grows while the job lives, as [`crate::Follower`] needs. It shows at
//! most the last [`MAX_DERIVED_ATTEMPTS`] attempts: the counters are whatever the hash holds,
//! and a hash written by another client could claim billions.

use crate::events::{JobEvent, JobEventKind};
use crate::job::{Job, JobState};

/// The most attempts a derived history shows (the latest ones).
pub(crate) const MAX_DERIVED_ATTEMPTS: u32 = 1_000;

/// The job's history, oldest first.
pub(crate) fn derive(job: &Job) -> Vec<JobEvent> {
    let event = |kind, at, attempt, detail| JobEvent {
        kind,
        at,
        attempt,
        detail,
    };
    let shown = job.attempts_made.min(MAX_DERIVED_ATTEMPTS) as usize;
    let mut out = Vec::with_capacity(2 + 2 * shown);
    let first = if job.opts.delay.unwrap_or(0) > 0 {
        JobEventKind::Delayed
    } else {
        JobEventKind::Waiting
    };
    out.push(event(first, job.created_at, 0, None));
    let n = job.attempts_made;
    let running_or_done = matches!(
        job.state,
        JobState::Active | JobState::Completed | JobState::Failed
    );
    // Attempts that ended without finishing the job: all before the latest, and the latest
    // too when the job is waiting again.
    let ended = if running_or_done {
        n.saturating_sub(1)
    } else {
        n
    };
    let reason = job.failed_reason.clone().map(serde_json::Value::String);
    let oldest_shown = ended.saturating_sub(MAX_DERIVED_ATTEMPTS - 1).max(1);
    for attempt in oldest_shown..=ended {
        let latest = attempt == ended && !running_or_done;
        let at = if latest {
            job.processed_at.unwrap_or(job.created_at)
        } else {
            job.created_at
        };
        out.push(event(JobEventKind::Active, at, attempt, None));
        let kind = if latest && job.state != JobState::Delayed && job.stalled_count > 0 {
            JobEventKind::Stalled
        } else {
            JobEventKind::Retrying
        };
        out.push(event(
            kind,
            at,
            attempt,
            if latest { reason.clone() } else { None },
        ));
    }
    if running_or_done && n > 0 {
        let started = job.processed_at.unwrap_or(job.created_at);
        out.push(event(JobEventKind::Active, started, n, None));
    }
    let finished = job.finished_at.unwrap_or(job.created_at);
    match job.state {
        JobState::Completed => out.push(event(
            JobEventKind::Completed,
            finished,
            n,
            job.result.clone(),
        )),
        JobState::Failed => out.push(event(JobEventKind::Failed, finished, n, reason)),
        _ => {}
    }
    out
}
