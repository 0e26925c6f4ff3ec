//! How the results of a write's statements become its answer and the batch's notes (which jobs
//! changed, which queues may have work, the lifetime totals), written once for both dialects:
//! a dialect runs the statements that [`super::rules`] decide, and hands what they returned
//! (rows touched, rows read) to the functions here.

use super::rules::{lease_lost, Stall};
use super::writer::Batch;
use crate::clock::ms_to_datetime;
use crate::engine::{ClaimedJob, Completion};
use crate::error::{QueueError, Result};
use crate::job::{Added, Job, JobState, NewJob};

/// The answer for a job `id` that its add inserted, as stored at `now` to run at `run_at`;
/// `claimed` when the statement inserted it held by the lease the add brought (then no worker
/// needs waking for it).
pub(crate) fn created(
    job: &NewJob,
    id: String,
    now: i64,
    run_at: i64,
    claimed: bool,
    batch: &mut Batch,
) -> Added {
    let mut stored = job.stored(id, now, run_at);
    if claimed {
        stored.state = JobState::Active;
        stored.attempts_made = 1;
        stored.processed_at = Some(ms_to_datetime(now));
    } else {
        batch.wake(&job.queue);
    }
    Added {
        job: stored,
        created: true,
    }
}

/// The answer for a job `id` that its add did not insert (its custom id exists, or appeared
/// earlier in the list), from the existing job as read back in the same transaction; created
/// by this add all the same if it `owns` the id (an earlier application of its batch committed
/// it and the answer was lost with the connection).
pub(crate) fn found(id: &str, owns: bool, existing: Result<Option<Job>>) -> Result<Added> {
    match existing? {
        Some(job) => Ok(Added { job, created: owns }),
        None => Err(QueueError::Corrupt(format!(
            "job {id} conflicted on insert but cannot be read"
        ))),
    }
}

/// A claimed job whose stored data cannot be read: it can never run, so it is failed with the
/// reason (visible to operators instead of stalling forever) by the dialect's statement.
pub(crate) struct Unreadable {
    pub(crate) id: String,
    pub(crate) reason: String,
}

/// Sorts the rows a claim took under `token`, each as its id and the job read from it: the
/// jobs to hand out, and those to fail as [`Unreadable`] (logged here, counted as failed).
pub(crate) fn sort_claimed(
    queue: &str,
    token: &str,
    rows: impl IntoIterator<Item = (String, Result<Job>)>,
    batch: &mut Batch,
) -> (Vec<ClaimedJob>, Vec<Unreadable>) {
    let mut jobs = Vec::new();
    let mut unreadable = Vec::new();
    for (id, read) in rows {
        match read {
            Ok(job) => {
                batch.changed(&job.queue, &job.id);
                jobs.push(ClaimedJob {
                    job,
                    token: token.to_owned(),
                });
            }
            Err(e) => {
                tracing::error!(queue, job_id = %id, error = %e, "failing a job whose stored data cannot be read");
                batch.count_failed(queue);
                batch.changed(queue, &id);
                unreadable.push(Unreadable {
                    id,
                    reason: e.to_string(),
                });
            }
        }
    }
    (jobs, unreadable)
}

/// Whether a statement fenced by `claimed`'s lease token found the job still held: it touched
/// `updated` rows, one if so; else the answer is lease lost.
pub(crate) fn fenced(claimed: &ClaimedJob, updated: u64) -> Result<()> {
    if updated == 1 {
        Ok(())
    } else {
        Err(lease_lost(claimed))
    }
}

/// How an attempt ended, once its fenced statement has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Completed,
    /// Failed for good.
    Failed,
    /// Failed, to run again after its backoff.
    Retrying,
    /// Given back at shutdown, its attempt not counted.
    Released,
}

/// Notes the end of `claimed`'s attempt in the batch.
pub(crate) fn ended(claimed: &ClaimedJob, how: Ended, batch: &mut Batch) {
    let job = &claimed.job;
    match how {
        Ended::Completed => batch.count_completed(&job.queue),
        Ended::Failed => batch.count_failed(&job.queue),
        Ended::Retrying => {}
        Ended::Released => batch.wake(&job.queue),
    }
    batch.changed(&job.queue, &job.id);
}

/// The answers to a list of plain completions applied in one statement: `completed(i, job)`
/// says whether the statement completed the `i`th listed completion (a job listed twice under
/// its current token completes once; a stale holder's completion never does).
pub(crate) fn completions<'a>(
    jobs: &[(&'a ClaimedJob, &'a Completion)],
    mut completed: impl FnMut(usize, &'a ClaimedJob) -> bool,
    batch: &mut Batch,
) -> Vec<Result<()>> {
    jobs.iter()
        .enumerate()
        .map(|(i, (claimed, _))| {
            if completed(i, claimed) {
                ended(claimed, Ended::Completed, batch);
                Ok(())
            } else {
                Err(lease_lost(claimed))
            }
        })
        .collect()
}

impl Stall {
    /// Notes the stalled job `id` of `queue` in the batch, once its statements have run.
    pub(crate) fn note(&self, queue: &str, id: &str, batch: &mut Batch) {
        if self.fails.is_some() {
            batch.count_failed(queue);
        } else {
            batch.wake(queue);
        }
        batch.changed(queue, id);
    }
}

/// The answer to an operator's retry (or promotion) of job `id`, from the job as read back after
/// it was made ready: the queue's workers are woken.
pub(crate) fn retried(
    queue: &str,
    id: &str,
    read: Result<Option<Job>>,
    batch: &mut Batch,
) -> Result<Job> {
    batch.wake(queue);
    batch.changed(queue, id);
    read.and_then(|j| j.ok_or_else(|| QueueError::Corrupt(format!("job {id} vanished"))))
}
