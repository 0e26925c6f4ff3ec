//! The SQL engine's job rules, written once for both dialects: how a stored row becomes a
//! [`Job`] (or [`QueueError::Corrupt`], never a panic), what a finished job keeps, and what an
//! attempt's failure does (fail for good, or wait for a retry with backoff, and which events say
//! so). The dialects run the statements these rules decide; they decide nothing themselves.

use rand::Rng;

use crate::clock::ms_to_datetime;
use crate::engine::ClaimedJob;
use crate::error::{ProcessError, QueueError, Result};
use crate::events::JobEventKind;
use crate::job::{Job, JobOptions, JobState, KeepJobs};

/// The columns a [`Job`] is read from, in [`job_from_row`]'s order.
pub(crate) const JOB_COLUMNS: &str = "queue, id, name, data, opts, state, run_at, attempts_made, \
    stalled_count, result, failed_reason, created_at, processed_at, finished_at, lease_expires_at, \
    lease_token";

/// A stored row of [`JOB_COLUMNS`], as each driver reads it.
pub(crate) trait JobRow {
    /// The integer in column `i` (a timestamp or a counter), or NULL.
    fn int(&self, i: usize) -> std::result::Result<Option<i64>, String>;
    /// The text in column `i`, or NULL.
    fn text(&self, i: usize) -> std::result::Result<Option<String>, String>;
}

impl JobRow for rusqlite::Row<'_> {
    fn int(&self, i: usize) -> std::result::Result<Option<i64>, String> {
        self.get::<_, Option<i64>>(i).map_err(|e| e.to_string())
    }
    fn text(&self, i: usize) -> std::result::Result<Option<String>, String> {
        self.get::<_, Option<String>>(i).map_err(|e| e.to_string())
    }
}

impl JobRow for sqlx::postgres::PgRow {
    fn int(&self, i: usize) -> std::result::Result<Option<i64>, String> {
        sqlx::Row::try_get::<Option<i64>, _>(self, i).map_err(|e| e.to_string())
    }
    fn text(&self, i: usize) -> std::result::Result<Option<String>, String> {
        sqlx::Row::try_get::<Option<String>, _>(self, i).map_err(|e| e.to_string())
    }
}

/// Reads a job from a row of [`JOB_COLUMNS`] at the clock reading `now` (a waiting job due
/// later is `delayed`; one of a paused queue is `paused`).
pub(crate) fn job_from_row(row: &impl JobRow, now: i64, paused: bool) -> Result<Job> {
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        QueueError::Corrupt(format!("{what} of a stored job: {e}"))
    };
    let get_i64 = |i: usize| -> Result<Option<i64>> {
        row.int(i)
            .map_err(|e| corrupt("a timestamp or counter", &e))
    };
    let text = |i: usize| -> Result<Option<String>> {
        row.text(i).map_err(|e| corrupt("a text column", &e))
    };
    let id = text(1)?.unwrap_or_default();
    let data: serde_json::Value = serde_json::from_str(&text(3)?.unwrap_or_default())
        .map_err(|e| corrupt(&format!("the payload of job {id}"), &e))?;
    let opts: JobOptions = serde_json::from_str(&text(4)?.unwrap_or_default())
        .map_err(|e| corrupt(&format!("the options of job {id}"), &e))?;
    let run_at = get_i64(6)?.unwrap_or(0);
    let state = match text(5)?.as_deref() {
        Some("waiting") if run_at > now => JobState::Delayed,
        Some("waiting") if paused => JobState::Paused,
        Some("waiting") => JobState::Waiting,
        Some("active") => JobState::Active,
        Some("completed") => JobState::Completed,
        Some("failed") => JobState::Failed,
        other => {
            return Err(corrupt(
                &format!("the state of job {id}"),
                &format!("{other:?}"),
            ))
        }
    };
    let result = match text(9)? {
        Some(r) => Some(
            serde_json::from_str(&r)
                .map_err(|e| corrupt(&format!("the result of job {id}"), &e))?,
        ),
        None => None,
    };
    Ok(Job {
        queue: text(0)?.unwrap_or_default(),
        name: text(2)?.unwrap_or_default(),
        data,
        opts,
        state,
        attempts_made: get_i64(7)?.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        stalled_count: get_i64(8)?.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        result,
        failed_reason: text(10)?,
        created_at: ms_to_datetime(get_i64(11)?.unwrap_or(0)),
        available_at: ms_to_datetime(run_at),
        processed_at: get_i64(12)?.map(ms_to_datetime),
        finished_at: get_i64(13)?.map(ms_to_datetime),
        lease_expires_at: match state {
            JobState::Active => get_i64(14)?.map(ms_to_datetime),
            _ => None,
        },
        lease_holder: match state {
            JobState::Active => text(15)?
                .as_deref()
                .and_then(crate::engine::lease_holder)
                .map(str::to_owned),
            _ => None,
        },
        id,
    })
}

/// What a job finished at `finished_at` keeps, as its `keep_count` and `expire_at` columns:
/// the newest `count` of its state, until `age` has passed; removed at once; or kept forever.
pub(crate) fn keep_columns(keep: Option<KeepJobs>, finished_at: i64) -> (Option<i64>, Option<i64>) {
    match keep.unwrap_or(KeepJobs::FOREVER) {
        KeepJobs::RemoveAtOnce => (Some(0), Some(finished_at)),
        KeepJobs::Keep { count, age_secs } => (
            count.map(|c| c.min(i64::MAX as u64) as i64),
            age_secs.map(|a| finished_at.saturating_add((a as i64).saturating_mul(1000))),
        ),
    }
}

/// A value as JSON text for a column.
pub(crate) fn to_json(v: &impl serde::Serialize) -> String {
    // Serialising a serde_json::Value or our own option types cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

/// The answer to a completion or failure whose lease is no longer held.
pub(crate) fn lease_lost(claimed: &ClaimedJob) -> QueueError {
    QueueError::LeaseLost {
        queue: claimed.job.queue.clone(),
        job_id: claimed.job.id.clone(),
    }
}

/// What a failed attempt does to its job.
pub(crate) enum AttemptFailure {
    /// The job fails for good: not retryable, or its attempts are spent.
    Final {
        reason: String,
        keep_count: Option<i64>,
        expire_at: Option<i64>,
    },
    /// The job waits until `run_at` for another attempt; its history records the attempt
    /// that ran (`events[0]`, an `active` event at its start) and the retry (`events[1]`).
    Retry {
        reason: String,
        run_at: i64,
        events: [NewEvent; 2],
    },
}

impl AttemptFailure {
    /// How the attempt ended.
    pub(crate) fn ended(&self) -> crate::sql::answers::Ended {
        match self {
            AttemptFailure::Final { .. } => crate::sql::answers::Ended::Failed,
            AttemptFailure::Retry { .. } => crate::sql::answers::Ended::Retrying,
        }
    }
}

/// An event to insert into a job's history.
pub(crate) struct NewEvent {
    pub(crate) kind: JobEventKind,
    pub(crate) attempt: u32,
    pub(crate) at: i64,
    pub(crate) detail: Option<serde_json::Value>,
}

/// Decides what `error` does to the attempt of `claimed` at `now`: the retry rule (retryable
/// and attempts left) and the backoff (the job's, or the default, with jitter).
pub(crate) fn attempt_failure(
    claimed: &ClaimedJob,
    error: &ProcessError,
    now: i64,
) -> AttemptFailure {
    let job = &claimed.job;
    let attempt = job.attempts_made;
    if !error.is_retryable() || attempt >= job.max_attempts() {
        let (keep_count, expire_at) = keep_columns(job.opts.remove_on_fail, now);
        return AttemptFailure::Final {
            reason: error.reason().to_owned(),
            keep_count,
            expire_at,
        };
    }
    let backoff = job.opts.backoff.unwrap_or(crate::job::Backoff::DEFAULT);
    let delay = backoff
        .delay_for(attempt, rand::thread_rng().gen::<f64>())
        .as_millis() as i64;
    let started = job.processed_at.map_or(now, |t| t.timestamp_millis());
    AttemptFailure::Retry {
        reason: error.reason().to_owned(),
        run_at: now.saturating_add(delay),
        events: [
            NewEvent {
                kind: JobEventKind::Active,
                attempt,
                at: started,
                detail: None,
            },
            NewEvent {
                kind: JobEventKind::Retrying,
                attempt,
                at: now,
                detail: Some(serde_json::json!({ "reason": error.reason(), "delayMs": delay })),
            },
        ],
    }
}

/// An operator's rule for a job it makes ready ([`operator_retry`], [`operator_promote`]): from
/// the job as read (queue, id, clock), the events to record, or why the step is refused.
pub(crate) type OperatorRule = fn(Option<&Job>, &str, &str, i64) -> Result<Vec<NewEvent>>;

/// The job an operator's step acts on, if it exists and is in the one state the step takes.
fn operator_target<'a>(
    job: Option<&'a Job>,
    queue: &str,
    id: &str,
    wanted: JobState,
) -> Result<&'a Job> {
    let Some(job) = job else {
        return Err(QueueError::Invalid(format!("no job {id} in queue {queue}")));
    };
    if job.state != wanted {
        return Err(QueueError::WrongState {
            job_id: id.to_owned(),
            state: job.state.to_string(),
        });
    }
    Ok(job)
}

/// What an operator's promotion of a delayed job records (it is ready now), or why it is
/// refused: only a delayed job can be promoted.
pub(crate) fn operator_promote(
    job: Option<&Job>,
    queue: &str,
    id: &str,
    now: i64,
) -> Result<Vec<NewEvent>> {
    let job = operator_target(job, queue, id, JobState::Delayed)?;
    Ok(vec![NewEvent {
        kind: JobEventKind::Waiting,
        attempt: job.attempts_made,
        at: now,
        detail: Some("promoted by an operator".into()),
    }])
}

/// What an operator's retry of job `id` records in its history before it waits again: the
/// failed attempt (its start and its failure) and the retry. Only a failed job can be retried.
pub(crate) fn operator_retry(
    job: Option<&Job>,
    queue: &str,
    id: &str,
    now: i64,
) -> Result<Vec<NewEvent>> {
    let job = operator_target(job, queue, id, JobState::Failed)?;
    let mut events = Vec::with_capacity(3);
    if let Some(started) = job.processed_at {
        events.push(NewEvent {
            kind: JobEventKind::Active,
            attempt: job.attempts_made,
            at: started.timestamp_millis(),
            detail: None,
        });
    }
    events.push(NewEvent {
        kind: JobEventKind::Failed,
        attempt: job.attempts_made,
        at: job.finished_at.map_or(now, |t| t.timestamp_millis()),
        detail: job.failed_reason.clone().map(serde_json::Value::String),
    });
    events.push(NewEvent {
        kind: JobEventKind::Waiting,
        attempt: 0,
        at: now,
        detail: Some("retried by an operator".into()),
    });
    Ok(events)
}

/// What taking back a job whose lease expired does: the events that record its attempt and the
/// stall, and whether it fails for good (it stalled more than `max_stalled` times: its
/// `failed_reason`, `keep_count` and `expire_at`) or waits to run again (`None`).
pub(crate) struct Stall {
    pub(crate) events: [NewEvent; 2],
    pub(crate) fails: Option<(String, Option<i64>, Option<i64>)>,
}

/// Decides a stall from the stored `attempts_made`, `stalled_count`, `processed_at` and `opts`.
pub(crate) fn stall(
    attempts_made: i64,
    stalled_count: i64,
    started: Option<i64>,
    opts: &str,
    max_stalled: u32,
    now: i64,
) -> Stall {
    let opts: JobOptions = serde_json::from_str(opts).unwrap_or_default();
    let attempt = attempts_made.clamp(0, u32::MAX as i64) as u32;
    let fails = (stalled_count + 1 > max_stalled as i64).then(|| {
        let (keep_count, expire_at) = keep_columns(opts.remove_on_fail, now);
        (
            format!("job stalled more than the allowed {max_stalled} times"),
            keep_count,
            expire_at,
        )
    });
    Stall {
        events: [
            NewEvent {
                kind: JobEventKind::Active,
                attempt,
                at: started.unwrap_or(now),
                detail: None,
            },
            NewEvent {
                kind: JobEventKind::Stalled,
                attempt,
                at: now,
                detail: Some("the job's lease expired: its worker stopped or stalled".into()),
            },
        ],
        fails,
    }
}

/// What releasing a claimed job at shutdown records: its attempt's start, and its return to
/// waiting with the attempt not counted.
pub(crate) fn release_events(claimed: &ClaimedJob, now: i64) -> [NewEvent; 2] {
    let job = &claimed.job;
    [
        NewEvent {
            kind: JobEventKind::Active,
            attempt: job.attempts_made,
            at: job.processed_at.map_or(now, |t| t.timestamp_millis()),
            detail: None,
        },
        NewEvent {
            kind: JobEventKind::Waiting,
            attempt: job.attempts_made.saturating_sub(1),
            at: now,
            detail: Some(
                serde_json::json!({ "reason": "released at shutdown; the attempt does not count" }),
            ),
        },
    ]
}

/// A job to add, with the lease to insert it under, if any.
#[derive(Clone, Copy)]
pub(crate) struct ToAdd<'a> {
    pub(crate) job: &'a crate::job::NewJob,
    pub(crate) claim: Option<&'a crate::engine::ClaimOnAdd>,
    /// The id minted for a job without a custom id before its add was first applied (see
    /// `Op::Add`'s `ids`); `None` for a custom id, or to mint one now (a follow-up).
    pub(crate) minted: Option<&'a str>,
}

impl<'a> From<&'a crate::job::NewJob> for ToAdd<'a> {
    fn from(job: &'a crate::job::NewJob) -> Self {
        ToAdd {
            job,
            claim: None,
            minted: None,
        }
    }
}

impl ToAdd<'_> {
    /// Whether a stored job under this add's id can only be this add's own, committed by an
    /// earlier application of its batch whose answer was lost: its id was minted for it (no
    /// custom id, which another add may share).
    pub(crate) fn owns_its_id(&self) -> bool {
        self.minted.is_some()
    }
}

/// Ids for the jobs of one add, minted before it is first applied.
/// `None` for a job with a custom id (its id is its own).
pub(crate) fn mint_ids(jobs: &[crate::job::NewJob]) -> Vec<Option<String>> {
    jobs.iter()
        .map(|job| {
            job.opts
                .job_id
                .is_none()
                .then(|| uuid::Uuid::now_v7().to_string())
        })
        .collect()
}

/// The stored row of a job being added: its id (the custom one, or a new UUIDv7) and the
/// columns its options decide.
pub(crate) struct NewRow<'a> {
    pub(crate) queue: &'a str,
    pub(crate) id: String,
    pub(crate) name: &'a str,
    pub(crate) data: String,
    pub(crate) opts: String,
    pub(crate) priority: i64,
    pub(crate) run_at: i64,
    pub(crate) max_attempts: i64,
    /// The lease token and its expiry when the job is to be inserted claimed: only a job ready
    /// at once is (the statement also leaves it waiting while its queue is paused).
    pub(crate) lease: Option<(&'a str, i64)>,
}

/// Plans the row of `add` at `now`.
pub(crate) fn new_row<'a>(add: ToAdd<'a>, now: i64) -> NewRow<'a> {
    let job = add.job;
    let run_at = job.due_at(now);
    NewRow {
        queue: &job.queue,
        id: match (&job.opts.job_id, add.minted) {
            (Some(custom), _) => custom.clone(),
            (None, Some(minted)) => minted.to_owned(),
            (None, None) => uuid::Uuid::now_v7().to_string(),
        },
        name: &job.name,
        data: to_json(&job.data),
        opts: to_json(&job.opts),
        priority: job.opts.priority.unwrap_or(0) as i64,
        run_at,
        max_attempts: job.opts.max_attempts() as i64,
        lease: add
            .claim
            .filter(|_| run_at <= now)
            .map(|c| (c.token.as_str(), now.saturating_add(c.lease_ms))),
    }
}

/// `add` as its insert under `claim` at `now` stores it (active, its first attempt counted),
/// for a run of its processor before it is stored ([`crate::Engine::add_run_first`]).
pub(crate) fn as_claimed(add: ToAdd<'_>, claim: &crate::engine::ClaimOnAdd, now: i64) -> Job {
    let row = new_row(add, now);
    let job = add.job;
    Job {
        id: row.id,
        queue: job.queue.clone(),
        name: job.name.clone(),
        data: job.data.clone(),
        opts: job.opts.clone(),
        state: JobState::Active,
        attempts_made: 1,
        stalled_count: 0,
        result: None,
        failed_reason: None,
        created_at: ms_to_datetime(now),
        available_at: ms_to_datetime(row.run_at),
        processed_at: Some(ms_to_datetime(now)),
        finished_at: None,
        lease_expires_at: Some(ms_to_datetime(now.saturating_add(claim.lease_ms))),
        lease_holder: crate::engine::lease_holder(&claim.token).map(str::to_owned),
    }
}

/// A job stored claimed by its add, as it reads once the same write completed it at `now`.
pub(crate) fn completed_by_its_add(job: &mut Job, result: &serde_json::Value, now: i64) {
    job.state = JobState::Completed;
    job.result = Some(result.clone());
    job.finished_at = Some(ms_to_datetime(now));
    job.lease_expires_at = None;
    job.lease_holder = None;
}

/// Whether an operator may remove job `id` in its stored `state` (`None`: there is no such
/// job, nothing to remove): any job but one a worker holds.
pub(crate) fn removable(state: Option<&str>, id: &str) -> Result<bool> {
    match state {
        None => Ok(false),
        Some("active") => Err(QueueError::WrongState {
            job_id: id.to_owned(),
            state: "active".into(),
        }),
        Some(_) => Ok(true),
    }
}

/// One statement of a prune, in the order [`PrunePlan`] runs them; each deletes at most
/// `limit` jobs of the queue and returns their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PruneStep {
    /// Finished jobs whose `expire_at` has passed.
    Expired { limit: i64 },
    /// Jobs of `state` beyond their keep count, ranked among that state's newest `window`
    /// jobs that have a count (their ranks are exact: they are the newest).
    Newest {
        state: &'static str,
        window: i64,
        limit: i64,
    },
    /// Jobs beyond their keep count, ranked among all the finished jobs of their state: only
    /// when the windows left work undone (a count larger than the window).
    All { limit: i64 },
}

/// How a prune removes at most `limit` finished jobs past their retention: expired ones first,
/// then those beyond their keep count. Ranking every finished job costs a sort of all of them
/// per chunk, so each state's newest `left + PRUNE_WINDOW` are ranked first; only if that
/// leaves work undone are all of them ranked.
pub(crate) struct PrunePlan {
    limit: i64,
    removed: Vec<String>,
    next: usize,
}

impl PrunePlan {
    pub(crate) fn new(limit: u64) -> Self {
        PrunePlan {
            limit: limit.min(i64::MAX as u64) as i64,
            removed: Vec::new(),
            next: 0,
        }
    }

    /// The next statement to run, if any work is left.
    pub(crate) fn next_step(&mut self) -> Option<PruneStep> {
        let left = self.limit - self.removed.len() as i64;
        if left <= 0 {
            return None;
        }
        let step = match self.next {
            0 => PruneStep::Expired { limit: left },
            1 | 2 => PruneStep::Newest {
                state: if self.next == 1 {
                    "completed"
                } else {
                    "failed"
                },
                window: left.saturating_add(crate::sql::PRUNE_WINDOW),
                limit: left,
            },
            3 => PruneStep::All { limit: left },
            _ => return None,
        };
        self.next += 1;
        Some(step)
    }

    /// Records the ids a step deleted.
    pub(crate) fn deleted(&mut self, ids: Vec<String>) {
        self.removed.extend(ids);
    }

    /// Every id deleted (their events go next).
    pub(crate) fn removed(&self) -> &[String] {
        &self.removed
    }
}

/// Which rows of a queue a listing of one state reads, and in what order; `None` when the
/// state is empty by the queue's pause flag (waiting jobs of a paused queue are `paused`).
pub(crate) fn listing(state: JobState, paused: bool) -> Option<(Rows, &'static str)> {
    Some(match state {
        JobState::Waiting if paused => return None,
        JobState::Paused if !paused => return None,
        JobState::Waiting | JobState::Paused => (Rows::Ready, "priority, run_at, seq"),
        JobState::Delayed => (Rows::Later, "run_at, seq"),
        JobState::Active => (Rows::State("active"), "processed_at, seq"),
        JobState::Completed => (Rows::State("completed"), "finished_at DESC, seq DESC"),
        JobState::Failed => (Rows::State("failed"), "finished_at DESC, seq DESC"),
    })
}

/// The order of a search over every state: newest first.
pub(crate) const ANY_STATE_ORDER: &str = "seq DESC";

/// Rows a listing reads (see [`listing`]); each dialect writes the condition in its SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    /// Every row of the queue (a search over every state).
    Any,
    /// Waiting and due.
    Ready,
    /// Waiting and due later.
    Later,
    /// In this stored state.
    State(&'static str),
}

/// A queue's stored tallies, as each dialect reads them.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    /// Waiting and due.
    pub(crate) ready: u64,
    /// Waiting and due later.
    pub(crate) later: u64,
    pub(crate) active: u64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) paused: bool,
    pub(crate) completed_total: u64,
    pub(crate) failed_total: u64,
}

impl Tally {
    /// The counts by state: the jobs ready in a paused queue count as `paused`.
    pub(crate) fn counts(self) -> crate::job::QueueCounts {
        crate::job::QueueCounts {
            waiting: if self.paused { 0 } else { self.ready },
            paused: if self.paused { self.ready } else { 0 },
            delayed: self.later,
            active: self.active,
            completed: self.completed,
            failed: self.failed,
            completed_total: self.completed_total,
            failed_total: self.failed_total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prune_stops_when_its_limit_is_reached_and_ranks_everything_last() {
        let mut plan = PrunePlan::new(10);
        assert_eq!(plan.next_step(), Some(PruneStep::Expired { limit: 10 }));
        plan.deleted(vec!["a".into(); 4]);
        let window = 6 + crate::sql::PRUNE_WINDOW;
        assert_eq!(
            plan.next_step(),
            Some(PruneStep::Newest {
                state: "completed",
                window,
                limit: 6
            })
        );
        plan.deleted(Vec::new());
        assert_eq!(
            plan.next_step(),
            Some(PruneStep::Newest {
                state: "failed",
                window,
                limit: 6
            })
        );
        assert_eq!(plan.next_step(), Some(PruneStep::All { limit: 6 }));
        plan.deleted(vec!["b".into(); 6]);
        assert_eq!(plan.next_step(), None);
        assert_eq!(plan.removed().len(), 10);

        let mut full = PrunePlan::new(3);
        assert_eq!(full.next_step(), Some(PruneStep::Expired { limit: 3 }));
        full.deleted(vec!["c".into(); 3]);
        assert_eq!(
            full.next_step(),
            None,
            "nothing runs once the limit is reached"
        );
    }

    #[test]
    fn ready_jobs_of_a_paused_queue_count_as_paused() {
        let t = Tally {
            ready: 3,
            later: 2,
            paused: true,
            ..Tally::default()
        };
        let c = t.counts();
        assert_eq!((c.waiting, c.paused, c.delayed), (0, 3, 2));
        let c = Tally { paused: false, ..t }.counts();
        assert_eq!((c.waiting, c.paused, c.delayed), (3, 0, 2));
        assert!(listing(JobState::Waiting, true).is_none());
        assert!(listing(JobState::Paused, false).is_none());
        assert_eq!(
            listing(JobState::Paused, true).map(|l| l.0),
            Some(Rows::Ready)
        );
    }
}
