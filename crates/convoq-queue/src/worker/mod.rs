//! Worker pools: per-queue loops that claim jobs in batches, run the processor registered for
//! each job's name with bounded concurrency, renew leases, and report how each attempt ended.
//! Each queue also has a housekeeping task (stalled jobs, retention) beside its claim loop.
//!
//! Written against [`Engine`] alone, so every engine gets the same worker semantics.
//!
//! Shutdown protocol ([`WorkerPool::shutdown`]): stop claiming → let in-flight attempts finish
//! within the grace period → abort the rest and release their jobs without counting the
//! attempt → return.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::engine::{
    ClaimOnAdd, ClaimedJob, Completion, Engine, FirstRun, FollowUpClaims, Outcome,
};
use crate::error::{panic_message, ProcessError, QueueError};
use crate::job::Job;
use crate::queues::{Queues, Reserved, Taker};

mod queue_loop;

use queue_loop::{now_ms, QueueLoop};

/// Runs jobs of one or more job names.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    /// Runs one attempt of `job`. Return a [`Completion`] on success, or say whether the failure
    /// is worth retrying. A panic fails the attempt as a retryable error; the worker lives on.
    async fn process(&self, job: &Job) -> Result<Completion, ProcessError>;

    /// Whether this processor's whole work is the [`Completion`] it returns (its result, its
    /// transactional effect, its follow-up jobs): it writes nothing elsewhere, so that a run
    /// whose completion never commits leaves no trace. Such a processor may run as its job is
    /// added, where a worker of the adding process has a free slot and the engine can commit
    /// the completion in the add's own write ([`crate::Queues::add`]). `false` by default.
    fn effect_only(&self) -> bool {
        false
    }
}

/// How an attempt ended, as reported to a [`WorkerObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The job completed.
    Completed,
    /// The attempt failed and the job will be retried.
    Retrying,
    /// The job failed for good.
    Failed,
    /// The attempt's result was not recorded: the lease was lost or the engine was unreachable.
    NotRecorded,
}

/// Hooks for metrics and logs around each attempt. Every method has an empty default.
pub trait WorkerObserver: Send + Sync + 'static {
    /// An attempt is about to start.
    fn started(&self, _job: &Job) {}
    /// An attempt ended after `elapsed`. `error` is the failure, if any.
    fn finished(&self, _job: &Job, _end: AttemptEnd, _elapsed: Duration, _error: Option<&str>) {}
    /// A completion that committed added the follow-up job `name` to `queue` (called after
    /// [`WorkerObserver::finished`], once per follow-up), so that counts of jobs added can
    /// include the jobs workers add, not only those callers add.
    fn follow_up_added(&self, _queue: &str, _name: &str) {}
}

struct NoObserver;
impl WorkerObserver for NoObserver {}

/// Settings of one queue's workers.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// How many attempts run at once. An attempt frees its slot when its processor returns,
    /// while its result is being recorded.
    pub concurrency: usize,
    /// How long a claim holds a job before another worker may take it back; renewed every third
    /// of it while the attempt runs.
    pub lease: Duration,
    /// The most jobs claimed in one round trip.
    pub batch: usize,
    /// How often an idle worker looks for work that no in-process signal announced (other
    /// processes' adds).
    pub poll_interval: Duration,
    /// How often expired leases are looked for.
    pub stalled_interval: Duration,
    /// How many times a job may stall before it fails.
    pub max_stalled: u32,
    /// How often retention pruning runs.
    pub prune_interval: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 8,
            lease: Duration::from_secs(30),
            batch: 64,
            poll_interval: Duration::from_millis(500),
            stalled_interval: Duration::from_secs(5),
            max_stalled: 2,
            prune_interval: Duration::from_secs(1),
        }
    }
}

/// Describes a worker pool: processors by job name and the queues to work.
pub struct WorkerPoolBuilder {
    queues: Queues,
    processors: HashMap<String, Arc<dyn Processor>>,
    queue_opts: Vec<(String, WorkerOptions)>,
    observer: Arc<dyn WorkerObserver>,
}

impl Queues {
    /// Starts describing a worker pool on these queues. (Defined here, beside the builder, so
    /// that `queues` does not depend on `worker`.)
    pub fn workers(&self) -> WorkerPoolBuilder {
        WorkerPoolBuilder::new(self.clone())
    }
}

impl WorkerPoolBuilder {
    pub(crate) fn new(queues: Queues) -> Self {
        WorkerPoolBuilder {
            queues,
            processors: HashMap::new(),
            queue_opts: Vec::new(),
            observer: Arc::new(NoObserver),
        }
    }

    /// Registers the processor for jobs named `name` (on any queue this pool works).
    pub fn processor(mut self, name: &str, processor: Arc<dyn Processor>) -> Self {
        self.processors.insert(name.to_owned(), processor);
        self
    }

    /// Works `queue` with these settings.
    pub fn queue(mut self, queue: &str, opts: WorkerOptions) -> Self {
        self.queue_opts.push((queue.to_owned(), opts));
        self
    }

    /// Reports every attempt to `observer`.
    pub fn observer(mut self, observer: Arc<dyn WorkerObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Starts the pool's loops on the current tokio runtime.
    pub fn start(self) -> WorkerPool {
        let (stop_tx, stop_rx) = watch::channel(false);
        let processors = Arc::new(self.processors);
        let mut loops = Vec::new();
        for (queue, opts) in self.queue_opts {
            let shared = Arc::new(QueueLoop {
                queue: queue.clone(),
                engine: self.queues.engine().clone(),
                queues: self.queues.clone(),
                processors: processors.clone(),
                observer: self.observer.clone(),
                permits: Arc::new(Semaphore::new(opts.concurrency.max(1))),
                in_flight: Mutex::new(HashMap::new()),
                live: watch::Sender::new(0),
                last_tick_ms: AtomicI64::new(now_ms()),
                stopping: AtomicBool::new(false),
                idle: AtomicBool::new(false),
                opts,
            });
            let taker: Arc<dyn Taker> = shared.clone();
            self.queues.register_taker(&queue, Arc::downgrade(&taker));
            let fetch = tokio::spawn(shared.clone().fetch_loop(stop_rx.clone()));
            let renew = tokio::spawn(shared.clone().renew_loop(stop_rx.clone()));
            let housekeeping = tokio::spawn(shared.clone().housekeeping_loop(stop_rx.clone()));
            loops.push(LoopHandles {
                shared,
                fetch,
                renew,
                housekeeping,
            });
        }
        WorkerPool {
            stop: stop_tx,
            loops,
        }
    }
}

struct LoopHandles {
    shared: Arc<QueueLoop>,
    fetch: JoinHandle<()>,
    renew: JoinHandle<()>,
    housekeeping: JoinHandle<()>,
}

/// Running workers. Dropping the pool without [`WorkerPool::shutdown`] aborts nothing: the loops
/// run until the runtime ends.
pub struct WorkerPool {
    stop: watch::Sender<bool>,
    loops: Vec<LoopHandles>,
}

/// What a shutdown did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Attempts still running when the grace period ran out, whose jobs were released.
    pub released: usize,
}

impl WorkerPool {
    /// When each queue's claim loop last went round; a loop that stops ticking is stuck.
    pub fn last_ticks(&self) -> Vec<(String, Instant)> {
        let now_ms = now_ms();
        let now = Instant::now();
        self.loops
            .iter()
            .map(|l| {
                let age = now_ms - l.shared.last_tick_ms.load(Ordering::Relaxed);
                let age = Duration::from_millis(age.max(0) as u64);
                (l.shared.queue.clone(), now.checked_sub(age).unwrap_or(now))
            })
            .collect()
    }

    /// Whether every queue's loop ticked within `max_age`. A loop ticks at least once per poll
    /// interval while healthy.
    pub fn is_healthy(&self, max_age: Duration) -> bool {
        self.last_ticks()
            .iter()
            .all(|(_, t)| t.elapsed() <= max_age)
    }

    /// Attempts running now, over all queues.
    pub fn in_flight(&self) -> usize {
        self.loops
            .iter()
            .map(|l| {
                l.shared
                    .in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .len()
            })
            .sum()
    }

    /// Stops the pool as the module doc describes, waiting at most `grace` for running attempts.
    pub async fn shutdown(self, grace: Duration) -> ShutdownReport {
        let _ = self.stop.send(true);
        for l in &self.loops {
            l.shared.stopping.store(true, Ordering::SeqCst);
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut report = ShutdownReport::default();
        for l in self.loops {
            let _ = l.fetch.await;
            l.renew.abort();
            l.housekeeping.abort();
            // Done when every attempt has recorded its result, not merely when every slot is
            // free: a slot is freed before the result is written.
            let mut live = l.shared.live.subscribe();
            let drained = tokio::time::timeout_at(deadline, live.wait_for(|n| *n == 0)).await;
            if drained.is_ok() {
                continue;
            }
            let leftovers: Vec<(ClaimedJob, tokio::task::AbortHandle)> = l
                .shared
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .map(|(_, v)| v)
                .collect();
            for (claimed, abort) in leftovers {
                abort.abort();
                report.released += 1;
                if let Err(e) = l.shared.engine.release(&claimed).await {
                    tracing::warn!(queue = %claimed.job.queue, job_id = %claimed.job.id, error = %e,
                        "could not release job at shutdown; its lease will expire and it will be taken back");
                }
            }
        }
        report
    }
}
