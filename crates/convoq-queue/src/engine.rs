//! The engine interface: the small set of operations every queue engine implements, in the
//! crate's own types. [`crate::Queues`] and [`crate::WorkerPool`] are written against it alone.
//!
//! Engines receive jobs whose options are already merged with the queue's defaults.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::effect::TxEffect;
use crate::error::{ProcessError, Result};
use crate::events::{JobEvent, WatchRegistry};
use crate::job::{Added, Found, Job, JobSearch, JobState, NewJob, QueueCounts};

/// A run of a job's processor before the job is stored (see [`Engine::add_run_first`]),
/// implemented by the worker pool for a slot it holds for the job.
#[async_trait]
pub trait FirstRun: Send + Sync {
    /// Runs the processor on `job` as it will be stored (claimed: state `active`, its first
    /// attempt counted). Its completion, to commit in the add's own write; `None` when it
    /// failed (or panicked, or timed out): the job is then stored claimed and run as any other,
    /// so that its failure is recorded and retried by the usual rules.
    async fn run(&self, job: &Job) -> Option<Completion>;
}

/// A job held by a worker under a lease. Only the holder of `token` can finish it.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    /// The job as it was when claimed (state `active`, `attempts_made` counting this attempt).
    pub job: Job,
    /// The fencing token of this lease.
    pub token: String,
}

/// What a claim returned.
#[derive(Debug, Default)]
pub struct ClaimBatch {
    /// The claimed jobs, at most the number asked for.
    pub jobs: Vec<ClaimedJob>,
    /// When no job was ready: the time (ms since the epoch) the earliest delayed job comes due.
    pub next_due_ms: Option<i64>,
}

/// How an attempt ended, handed to [`Engine::finish`].
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The processor succeeded.
    Completed(Completion),
    /// The processor failed (or panicked, or timed out).
    Failed(ProcessError),
}

/// The lease an add takes its job under at once, for a worker of this process that waits for
/// work (see [`crate::Queues::add`]): the job is inserted claimed, which spares the claim's
/// statement, its row version and its commit.
#[derive(Debug, Clone)]
pub(crate) struct ClaimOnAdd {
    pub(crate) lease_ms: i64,
    pub(crate) token: String,
}

impl ClaimOnAdd {
    pub(crate) fn new(lease: Duration, owner: &str) -> Self {
        ClaimOnAdd {
            lease_ms: lease.as_millis().min(i64::MAX as u128) as i64,
            token: new_lease_token(owner),
        }
    }

    /// The job as held under this lease, if its add stored it so (not when it found an
    /// existing job, or left the job waiting: a paused queue, a delay).
    pub(crate) fn held(&self, added: &Added) -> Option<ClaimedJob> {
        (added.created && added.job.state == JobState::Active).then(|| ClaimedJob {
            job: added.job.clone(),
            token: self.token.clone(),
        })
    }
}

/// A fresh lease token for a claim by the engine whose [`Engine::owner_id`] is `owner`: the
/// owner, `/`, and a random part, so that a lease says which process holds it
/// ([`lease_holder`]) and a token is never guessed.
pub(crate) fn new_lease_token(owner: &str) -> String {
    format!("{owner}/{}", uuid::Uuid::new_v4().simple())
}

/// The process (its [`Engine::owner_id`]) that holds a lease, from the lease's token; `None`
/// for a token of another form.
pub(crate) fn lease_holder(token: &str) -> Option<&str> {
    token
        .split_once('/')
        .map(|(owner, _)| owner)
        .filter(|o| !o.is_empty())
}

/// Follow-up jobs a worker of this process waits for: the lease each is to be inserted under
/// (by its place in [`Completion::follow_ups`]), and, once the completion has committed, the
/// ones the engine stored claimed, to run. Engines that cannot claim on add leave it empty.
#[derive(Debug, Default)]
pub(crate) struct FollowUpClaims {
    pub(crate) leases: Vec<Option<ClaimOnAdd>>,
    pub(crate) claimed: std::sync::Mutex<Vec<ClaimedJob>>,
}

/// A processor's successful result, with the work to commit together with the completion.
#[derive(Default, Clone)]
pub struct Completion {
    /// The job's return value.
    pub result: serde_json::Value,
    /// Jobs to add when (and only when) this completion commits.
    pub follow_ups: Vec<NewJob>,
    /// Database work to commit in the same transaction as the completion, on engines that can
    /// ([`Capabilities::transactional_effects`]).
    pub effect: Option<Arc<dyn TxEffect>>,
    /// Set by the worker pool: see [`FollowUpClaims`].
    pub(crate) follow_up_claims: Option<Arc<FollowUpClaims>>,
}

impl Completion {
    /// A completion with this result and nothing else.
    pub fn with_result(result: serde_json::Value) -> Self {
        Completion {
            result,
            ..Default::default()
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("result", &self.result)
            .field("follow_ups", &self.follow_ups)
            .field("effect", &self.effect.as_ref().map(|_| "…"))
            .finish()
    }
}

/// The most jobs of one state that [`Engine::search`]'s default reads.
pub const SEARCH_SCAN_LIMIT: u64 = 10_000;

/// What an engine can and cannot do, so that callers and the conformance suite can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// A completion's [`Completion::effect`] and follow-up jobs commit in one transaction with
    /// it (the SQL engine). Where false, effects are refused and follow-ups are added before the
    /// completion (at least once).
    pub transactional_effects: bool,
    /// Lease expiry follows the engine's [`Clock`] (the SQL engine stamps leases with it). Where
    /// false, leases expire by the backend's own time (BullMQ's locks are Redis keys with a
    /// TTL): a test that moves a manual clock must also let the lease run out in real time.
    pub leases_follow_clock: bool,
    /// [`Engine::finish_and_claim`] may hand over the next job (BullMQ's fetch-next). Where
    /// true, a worker keeps an attempt's slot until its end is recorded, for the job that may
    /// come with it; where false, it frees the slot as soon as the processor returns.
    pub fetch_next: bool,
    /// [`Engine::add_claimed`] can store a job claimed (the SQL engine): a worker of the adding
    /// process that waits for work takes the job without a claim of its own.
    pub claim_on_add: bool,
}

/// A queue engine. Implemented by the SQL engine ([`crate::sql::SqlEngine`]) and the BullMQ
/// engine (`crate::bullmq::BullEngine`, feature `redis`).
///
/// Every method translates the backend's errors to [`crate::QueueError`]; transient failures are
/// [`crate::QueueError::Unavailable`].
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// A short name for logs and errors (`sqlite`, `postgres`, `redis`).
    fn name(&self) -> &'static str;
    /// This process's identity as a lease owner: new at every start, never configured.
    fn owner_id(&self) -> &str;
    /// The clock the engine stamps jobs with, as its due times read (on Postgres and Redis, the
    /// server's clock as seen from this process): workers wait for a due time by it.
    fn clock(&self) -> Arc<dyn Clock>;
    /// What this engine can do.
    fn capabilities(&self) -> Capabilities;
    /// The per-job change bells rung by this engine.
    fn watches(&self) -> &WatchRegistry;
    /// A signal that changes whenever jobs may have become ready on `queue` (an add, a resume,
    /// a retry) in this process. Other processes' adds are found by polling.
    fn work_signal(&self, queue: &str) -> watch::Receiver<u64>;

    /// Adds jobs, in order. A job whose custom id exists already is not added again: its
    /// [`Added`] carries the existing job and `created: false`.
    async fn add_bulk(&self, jobs: Vec<NewJob>) -> Result<Vec<Added>>;
    /// Adds one job and, where the engine can ([`Capabilities::claim_on_add`]) and the job is
    /// ready at once in an unpaused queue, claims it for `lease` in the same write: the job is
    /// stored active, its attempt counted, and handed back to run. A job not claimed this way
    /// (an engine that cannot, a delay, a paused queue, a custom id that exists) is added as
    /// [`Engine::add_bulk`] adds it, for any worker to claim.
    async fn add_claimed(
        &self,
        job: NewJob,
        _lease: Duration,
    ) -> Result<(Added, Option<ClaimedJob>)> {
        let added = self.add_bulk(vec![job]).await?.pop().ok_or_else(|| {
            crate::error::QueueError::Unavailable("the engine answered no job for the add".into())
        })?;
        Ok((added, None))
    }
    /// As [`Engine::add_claimed`], where the engine can commit a completion in the add's own
    /// write (the SQL engine on SQLite): first runs `first` on the job as it will be stored,
    /// then stores the job, claimed and at once completed with the completion `first`
    /// returned, its effect and follow-up jobs committed in the same transaction: one write for
    /// the job's whole life, and the answer shows it completed (its history still shows it added, active and
    /// completed). The job is stored claimed instead, and handed back to run, when `first`
    /// returns nothing, when the completion cannot commit with the add (its effect failed), or
    /// where the engine cannot do this (by default, as [`Engine::add_claimed`]). A job that
    /// could not be claimed at once is added as that method adds it, and `first`'s completion
    /// is dropped: only a processor whose whole work is its completion may run first
    /// ([`crate::Processor::effect_only`]).
    async fn add_run_first(
        &self,
        job: NewJob,
        lease: Duration,
        first: &dyn FirstRun,
    ) -> Result<(Added, Option<ClaimedJob>)> {
        let _ = first;
        self.add_claimed(job, lease).await
    }
    /// Reads one job.
    async fn get(&self, queue: &str, id: &str) -> Result<Option<Job>>;
    /// Lists jobs in one state, newest first for finished states, in run order otherwise.
    async fn list(&self, queue: &str, state: JobState, offset: u64, limit: u64)
        -> Result<Vec<Job>>;
    /// Finds up to `limit` jobs of `queue` that `search` matches, in one state or (`None`) in
    /// any, skipping the first `offset` matches. The SQL engine searches in its statement; this
    /// default, which the BullMQ engine uses, reads the state's listing (each state's, for
    /// `None`) page by page and stops after [`SEARCH_SCAN_LIMIT`] jobs a state, saying so in
    /// [`Found::exhaustive`].
    async fn search(
        &self,
        queue: &str,
        state: Option<JobState>,
        search: &JobSearch,
        offset: u64,
        limit: u64,
    ) -> Result<Found> {
        const PAGE: u64 = 500;
        let states = match state {
            Some(s) => vec![s],
            None => JobState::ALL.to_vec(),
        };
        let (mut found, mut skipped, mut exhaustive) = (Vec::new(), 0, true);
        'states: for s in states {
            let mut at = 0;
            loop {
                if at >= SEARCH_SCAN_LIMIT {
                    exhaustive = false;
                    break;
                }
                let page = self.list(queue, s, at, PAGE).await?;
                let last = (page.len() as u64) < PAGE;
                at += page.len() as u64;
                for job in page.into_iter().filter(|j| search.matches(j)) {
                    if skipped < offset {
                        skipped += 1;
                    } else if (found.len() as u64) < limit {
                        found.push(job);
                    } else {
                        break 'states;
                    }
                }
                if last {
                    break;
                }
            }
        }
        Ok(Found {
            jobs: found,
            exhaustive,
        })
    }
    /// Counts a queue's jobs by state, with its lifetime totals.
    async fn counts(&self, queue: &str) -> Result<QueueCounts>;
    /// Pauses or resumes a queue: a paused queue's waiting jobs are not claimed.
    async fn set_paused(&self, queue: &str, paused: bool) -> Result<()>;
    /// Whether a queue is paused.
    async fn is_paused(&self, queue: &str) -> Result<bool>;
    /// Moves a failed job back to waiting with a fresh set of attempts.
    async fn retry(&self, queue: &str, id: &str) -> Result<Job>;
    /// Makes a delayed job (a delay, or a backoff before its next attempt) ready now.
    async fn promote(&self, queue: &str, id: &str) -> Result<Job>;
    /// Removes a job that is not active. Returns whether it existed.
    async fn remove(&self, queue: &str, id: &str) -> Result<bool>;
    /// The job's history from the start, or `None` if the job does not exist.
    async fn history(&self, queue: &str, id: &str) -> Result<Option<Vec<JobEvent>>>;

    /// Claims up to `max` ready jobs of `queue` under a lease of `lease`.
    async fn claim(&self, queue: &str, max: usize, lease: Duration) -> Result<ClaimBatch>;
    /// Extends leases. Returns, per lease, whether it was still held.
    async fn extend(
        &self,
        queue: &str,
        leases: &[(String, String)],
        lease: Duration,
    ) -> Result<Vec<bool>>;
    /// Ends an attempt. A stale token changes nothing and answers
    /// [`crate::QueueError::LeaseLost`].
    async fn finish(&self, job: &ClaimedJob, outcome: Outcome) -> Result<()>;
    /// Ends an attempt like [`Engine::finish`] and claims the queue's next ready job under a
    /// lease of `next_lease` in the same step (fetch-next: one round trip per job instead of
    /// two). The BullMQ engine hands a job over when the attempt completed or failed for good
    /// (as BullMQ's `moveToFinished` does), the SQL engine whenever the end was recorded; a
    /// paused or empty queue hands over nothing. The default finishes and claims nothing; the
    /// worker then claims as usual.
    ///
    /// # Errors
    /// As [`Engine::finish`]. On an error nothing was claimed, or (an answer lost on the way)
    /// a job was claimed that nobody runs: its lease expires and it is taken back.
    async fn finish_and_claim(
        &self,
        job: &ClaimedJob,
        outcome: Outcome,
        next_lease: Duration,
    ) -> Result<Option<ClaimedJob>> {
        let _ = next_lease;
        self.finish(job, outcome).await.map(|()| None)
    }
    /// Gives a job back without counting the attempt (graceful shutdown).
    async fn release(&self, job: &ClaimedJob) -> Result<()>;
    /// Takes back the active jobs of `queue` whose lease expired, counting a stall; a job that
    /// stalled more than `max_stalled` times fails. Returns how many were taken back or failed.
    async fn reap_stalled(&self, queue: &str, max_stalled: u32) -> Result<u64>;
    /// Removes finished jobs that their retention settings no longer keep. Lifetime totals are
    /// not affected. Returns how many were removed.
    async fn prune(&self, queue: &str) -> Result<u64>;
    /// Checks that the backing service answers.
    async fn ping(&self) -> Result<()>;
    /// Flushes and closes; later calls fail with [`crate::QueueError::Closed`].
    async fn close(&self);
}
