//! [`Queues`]: the handle callers hold. It owns the per-queue default options, validates and
//! completes jobs before they reach the engine, and offers the read, operator and follow calls.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use crate::engine::{ClaimedJob, Engine, FirstRun};
use crate::error::{QueueError, Result};
use crate::follow::Follower;
use crate::job::{Added, Found, Job, JobOptions, JobSearch, JobState, NewJob, QueueCounts};

/// Longest accepted queue name.
pub const MAX_QUEUE_NAME: usize = 64;
/// Longest accepted job name.
pub const MAX_JOB_NAME: usize = 128;
/// Longest accepted custom job id.
pub const MAX_JOB_ID: usize = 255;
/// Highest accepted priority (BullMQ's limit, 2^21).
pub const MAX_PRIORITY: u32 = 2_097_152;
/// How often a follower re-reads a job when no change was signalled in this process (changes
/// made by other processes are found this way).
pub const DEFAULT_FOLLOW_POLL: Duration = Duration::from_millis(250);

/// The queues of one engine, with their default job options.
///
/// Cheap to clone; clones share the defaults.
#[derive(Clone)]
pub struct Queues {
    engine: Arc<dyn Engine>,
    defaults: Arc<RwLock<HashMap<String, JobOptions>>>,
    follow_poll: Duration,
    /// This process's workers, by queue, that take jobs as they are added.
    takers: Arc<RwLock<HashMap<String, Weak<dyn Taker>>>>,
}

/// A queue's workers in this process, as [`Queues::add`] sees them.
pub(crate) trait Taker: Send + Sync {
    /// A free slot, held for a job being added. `None` while every slot is taken or the claim
    /// loop waits for one (the queue has a backlog: a job added then waits its turn in it), or
    /// while the workers stop.
    fn reserve(self: Arc<Self>) -> Option<Box<dyn Reserved>>;
}

/// A worker's slot held for a job being added. Dropped unused, the slot is free again.
pub(crate) trait Reserved: Send {
    /// The lease to claim the job under.
    fn lease(&self) -> Duration;
    /// Runs the job, claimed as it was added, in this slot.
    fn run(self: Box<Self>, job: ClaimedJob);
    /// The run of a job named `name` before it is stored, where its processor allows it
    /// ([`crate::Processor::effect_only`]).
    fn first_run(&self, name: &str) -> Option<&dyn FirstRun>;
    /// Reports the attempt that [`Reserved::first_run`] ran, committed with the add: `job` as
    /// stored, completed.
    fn ran_first(self: Box<Self>, job: &Job);
}

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queues")
            .field("engine", &self.engine.name())
            .finish_non_exhaustive()
    }
}

impl Queues {
    /// Queues on `engine`, every queue with the seed's default options until
    /// [`Queues::set_defaults`] says otherwise.
    pub fn new(engine: Arc<dyn Engine>) -> Self {
        Queues {
            engine,
            defaults: Default::default(),
            follow_poll: DEFAULT_FOLLOW_POLL,
            takers: Default::default(),
        }
    }

    /// The same queues, with followers re-reading jobs at this interval.
    pub fn with_follow_poll(mut self, poll: Duration) -> Self {
        self.follow_poll = poll;
        self
    }

    /// The engine underneath.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Sets a queue's default options (unset fields fall back to the seed's defaults).
    pub fn set_defaults(&self, queue: &str, opts: JobOptions) {
        let merged = opts.merged_over(&JobOptions::seed_defaults());
        self.defaults
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue.to_owned(), merged);
    }

    /// A queue's default options.
    pub fn defaults(&self, queue: &str) -> JobOptions {
        self.defaults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
            .cloned()
            .unwrap_or_else(JobOptions::seed_defaults)
    }

    /// Validates a job and merges its queue's defaults into its options, as the engine will store
    /// them.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] naming the first thing wrong.
    pub fn prepare(&self, mut job: NewJob) -> Result<NewJob> {
        check_name("queue name", &job.queue, MAX_QUEUE_NAME)?;
        check_name("job name", &job.name, MAX_JOB_NAME)?;
        if let Some(id) = &job.opts.job_id {
            if id.is_empty() || id.len() > MAX_JOB_ID || id.chars().any(char::is_control) {
                return Err(QueueError::Invalid(format!(
                    "jobId must be 1 to {MAX_JOB_ID} bytes without control characters"
                )));
            }
        }
        if job.opts.attempts == Some(0) {
            return Err(QueueError::Invalid("attempts must be at least 1".into()));
        }
        if let Some(b) = &job.opts.backoff {
            if !(0.0..=1.0).contains(&b.jitter) {
                return Err(QueueError::Invalid(
                    "backoff.jitter must be between 0 and 1".into(),
                ));
            }
        }
        if job.opts.priority.is_some_and(|p| p > MAX_PRIORITY) {
            return Err(QueueError::Invalid(format!(
                "priority must be at most {MAX_PRIORITY}"
            )));
        }
        job.opts = job.opts.merged_over(&self.defaults(&job.queue));
        Ok(job)
    }

    /// Adds one job.
    ///
    /// Where a worker of this process has a free slot on the job's queue and the engine can
    /// ([`crate::Capabilities::claim_on_add`]), a job ready at once is stored claimed by that
    /// worker in the add's own write and handed to it: no claim of its own, no wake-up. Its
    /// life is otherwise the same (its lease, renewals and fencing, its history, and a crash
    /// of this process leaves it to be taken back when its lease expires). The answer then
    /// shows it active.
    ///
    /// Where, moreover, the job's processor does nothing but return its completion
    /// ([`crate::Processor::effect_only`]), the slot runs it first, and the engine stores the
    /// job completed, its completion's effect committed in the add's own write
    /// ([`Engine::add_run_first`]): one write for the job's whole life, no hand-off to the
    /// worker. The answer then shows it completed; the worker's observer hears of the attempt
    /// as of any other. A failed first run, or an effect that fails with the add, leaves the
    /// job stored claimed and run in the slot as above. An add for a slot goes on in a task of
    /// its own: a caller that stops waiting (a client that hung up) neither strands the job
    /// nor leaves its attempt unreported.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for a bad job; [`QueueError::Unavailable`] when the job could not
    /// be stored (nothing was added).
    pub async fn add(&self, job: NewJob) -> Result<Added> {
        let job = self.prepare(job)?;
        if let Some(slot) = self.free_slot(&job) {
            // In a task of its own, so that a caller that goes away while the add commits
            // (a client that hangs up) does not leave a job stored claimed with nobody to run
            // it until its lease expires, or a job run first unreported to the observer.
            let engine = self.engine.clone();
            return tokio::spawn(Self::add_to_slot(engine, job, slot))
                .await
                .unwrap_or_else(|e| {
                    Err(QueueError::Unavailable(format!(
                        "the add was interrupted: {e}"
                    )))
                });
        }
        let mut added = self.engine.add_bulk(vec![job]).await?;
        added.pop().ok_or(QueueError::Closed)
    }

    /// Adds `job` claimed for `slot` (run first where its processor allows), then runs it
    /// there, or reports the attempt its add completed.
    async fn add_to_slot(
        engine: Arc<dyn Engine>,
        job: NewJob,
        slot: Box<dyn Reserved>,
    ) -> Result<Added> {
        let lease = slot.lease();
        let (added, claimed) = match slot.first_run(&job.name) {
            Some(first) => engine.add_run_first(job, lease, first).await?,
            None => engine.add_claimed(job, lease).await?,
        };
        if let Some(claimed) = claimed {
            slot.run(claimed);
        } else if added.created && added.job.state == JobState::Completed {
            slot.ran_first(&added.job);
        }
        Ok(added)
    }

    /// A slot of this process's workers for `job`, if it can be claimed as it is added.
    pub(crate) fn free_slot(&self, job: &NewJob) -> Option<Box<dyn Reserved>> {
        if !self.engine.capabilities().claim_on_add || job.opts.delay.unwrap_or(0) > 0 {
            return None;
        }
        let taker = self
            .takers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&job.queue)?
            .upgrade()?;
        taker.reserve()
    }

    /// Lets `taker` take jobs added to `queue` into its free slots.
    pub(crate) fn register_taker(&self, queue: &str, taker: Weak<dyn Taker>) {
        self.takers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue.to_owned(), taker);
    }

    /// Adds jobs in one go: all are stored or none.
    ///
    /// # Errors
    /// As [`Queues::add`].
    pub async fn add_bulk(&self, jobs: Vec<NewJob>) -> Result<Vec<Added>> {
        let jobs = jobs
            .into_iter()
            .map(|j| self.prepare(j))
            .collect::<Result<Vec<_>>>()?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.engine.add_bulk(jobs).await
    }

    /// Reads one job.
    ///
    /// # Errors
    /// When the engine cannot be read.
    pub async fn get(&self, queue: &str, id: &str) -> Result<Option<Job>> {
        self.engine.get(queue, id).await
    }

    /// Lists up to `limit` jobs of a queue in one state, skipping `offset`.
    ///
    /// # Errors
    /// When the engine cannot be read.
    pub async fn list(
        &self,
        queue: &str,
        state: JobState,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<Job>> {
        self.engine.list(queue, state, offset, limit).await
    }

    /// Finds up to `limit` jobs of a queue that `search` matches, in one state or in any,
    /// skipping the first `offset` matches ([`Engine::search`]).
    ///
    /// # Errors
    /// When the engine cannot be read.
    pub async fn search(
        &self,
        queue: &str,
        state: Option<JobState>,
        search: &JobSearch,
        offset: u64,
        limit: u64,
    ) -> Result<Found> {
        self.engine
            .search(queue, state, search, offset, limit)
            .await
    }

    /// Counts a queue's jobs by state.
    ///
    /// # Errors
    /// When the engine cannot be read.
    pub async fn counts(&self, queue: &str) -> Result<QueueCounts> {
        self.engine.counts(queue).await
    }

    /// Pauses a queue: workers stop taking its jobs; running ones finish.
    ///
    /// # Errors
    /// When the engine cannot be written.
    pub async fn pause(&self, queue: &str) -> Result<()> {
        self.engine.set_paused(queue, true).await
    }

    /// Resumes a paused queue.
    ///
    /// # Errors
    /// When the engine cannot be written.
    pub async fn resume(&self, queue: &str) -> Result<()> {
        self.engine.set_paused(queue, false).await
    }

    /// Whether a queue is paused.
    ///
    /// # Errors
    /// When the engine cannot be read.
    pub async fn is_paused(&self, queue: &str) -> Result<bool> {
        self.engine.is_paused(queue).await
    }

    /// Makes a delayed job ready now (an operator's promotion).
    ///
    /// # Errors
    /// [`QueueError::WrongState`] unless the job is delayed; when the engine cannot be written.
    pub async fn promote(&self, queue: &str, id: &str) -> Result<Job> {
        self.engine.promote(queue, id).await
    }

    /// Retries a failed job with a fresh set of attempts.
    ///
    /// # Errors
    /// [`QueueError::WrongState`] if the job has not failed; `Ok(None)`-like absence is
    /// [`QueueError::Invalid`].
    pub async fn retry(&self, queue: &str, id: &str) -> Result<Job> {
        self.engine.retry(queue, id).await
    }

    /// Removes a job that is not active. Returns whether it existed.
    ///
    /// # Errors
    /// [`QueueError::WrongState`] for an active job.
    pub async fn remove(&self, queue: &str, id: &str) -> Result<bool> {
        self.engine.remove(queue, id).await
    }

    /// Follows a job: its history from the start, then its new events.
    pub fn follow(&self, queue: &str, id: &str) -> Follower {
        Follower::new(self.engine.clone(), queue, id, self.follow_poll)
    }

    /// Waits until a job has finished or `timeout` passes, and returns the job as it then is
    /// (`None` if it does not exist).
    ///
    /// # Errors
    /// When the engine cannot be read.
    pub async fn wait_finished(
        &self,
        queue: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<Job>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut watch = self.engine.watches().watch(queue, id);
        loop {
            let job = self.engine.get(queue, id).await?;
            match &job {
                Some(j) if !j.state.is_finished() => {}
                _ => return Ok(job),
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(job);
            }
            watch.changed((deadline - now).min(self.follow_poll)).await;
        }
    }
}

fn check_name(what: &str, value: &str, max: usize) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(QueueError::Invalid(format!(
            "{what} must be 1 to {max} characters of A-Z, a-z, 0-9, '_', '-', '.' (got {value:?})"
        )))
    }
}
