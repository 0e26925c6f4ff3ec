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

use crate::engine::{ClaimedJob, Completion, Engine, Outcome};
use crate::error::{panic_message, ProcessError, QueueError};
use crate::job::Job;
use crate::queues::Queues;

/// Runs jobs of one or more job names.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    /// Runs one attempt of `job`. Return a [`Completion`] on success, or say whether the failure
    /// is worth retrying. A panic fails the attempt as a retryable error; the worker lives on.
    async fn process(&self, job: &Job) -> Result<Completion, ProcessError>;
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
                opts,
            });
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

struct QueueLoop {
    queue: String,
    engine: Arc<dyn Engine>,
    queues: Queues,
    processors: Arc<HashMap<String, Arc<dyn Processor>>>,
    observer: Arc<dyn WorkerObserver>,
    permits: Arc<Semaphore>,
    // A std mutex: held only to insert or remove an entry, never across an await.
    in_flight: Mutex<HashMap<String, (ClaimedJob, tokio::task::AbortHandle)>>,
    /// Attempt tasks alive, until their result is recorded (a slot is freed earlier).
    live: watch::Sender<usize>,
    last_tick_ms: AtomicI64,
    stopping: AtomicBool,
    opts: WorkerOptions,
}

/// Held by an attempt task for as long as it lives.
struct Live(Arc<QueueLoop>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl QueueLoop {
    fn tick(&self) {
        self.last_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    async fn fetch_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut signal = self.engine.work_signal(&self.queue);
        let mut error_backoff = Duration::from_millis(100);
        loop {
            self.tick();
            if *stop.borrow() {
                return;
            }
            // Wait for a free slot first, so that claimed jobs never wait for a worker.
            let free = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.changed() => return,
                _ = tokio::time::sleep(self.opts.poll_interval) => continue,
            };
            // Attempts that end together (their completions commit in one batch) free their
            // slots together: let them, so that one claim takes them all rather than one each.
            tokio::task::yield_now().await;
            let mut permits = vec![free];
            while permits.len() < self.opts.batch.max(1) {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            signal.borrow_and_update();
            let batch = match self
                .engine
                .claim(&self.queue, permits.len(), self.opts.lease)
                .await
            {
                Ok(b) => {
                    error_backoff = Duration::from_millis(100);
                    b
                }
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, retry_in_ms = error_backoff.as_millis() as u64,
                        "claim failed; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(error_backoff) => {}
                    }
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if batch.jobs.is_empty() {
                drop(permits);
                let mut wait = self.opts.poll_interval;
                if let Some(due) = batch.next_due_ms {
                    let until = (due - self.engine.clock().now_ms()).max(1) as u64;
                    wait = wait.min(Duration::from_millis(until));
                }
                tokio::select! {
                    _ = signal.changed() => {}
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            for claimed in batch.jobs {
                let permit = permits.pop().expect("claimed no more jobs than permits");
                self.spawn_attempt(claimed, permit);
            }
        }
    }

    /// Runs `claimed` in a task holding `permit`; then, as long as each attempt's end handed
    /// over the queue's next job ([`Engine::finish_and_claim`]), runs that one in the same slot.
    fn spawn_attempt(
        self: &Arc<Self>,
        claimed: ClaimedJob,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let this = self.clone();
        let id = claimed.job.id.clone();
        let own_handle = Arc::new(OnceLock::<tokio::task::AbortHandle>::new());
        // Hold the map lock across spawn so the task cannot remove its entry before it exists.
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        self.live.send_modify(|n| *n += 1);
        let task = tokio::spawn({
            let claimed = claimed.clone();
            let own_handle = own_handle.clone();
            async move {
                // Counts the task down however it ends, aborted at shutdown included.
                let _live = Live(this.clone());
                let mut current = claimed;
                let mut slot = permit;
                loop {
                    let (next, kept) = this.clone().run_attempt(current.clone(), slot).await;
                    // Swap the entries in one step, so that shutdown always sees the job this
                    // task holds.
                    let mut map = this.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                    map.remove(&current.job.id);
                    // A job is handed over only to an attempt that kept its slot.
                    let (Some(next), Some(kept), Some(handle)) = (next, kept, own_handle.get())
                    else {
                        break;
                    };
                    map.insert(next.job.id.clone(), (next.clone(), handle.clone()));
                    drop(map);
                    current = next;
                    slot = kept;
                }
            }
        });
        let abort = task.abort_handle();
        let _ = own_handle.set(abort.clone());
        map.insert(id, (claimed, abort));
    }

    /// Runs one attempt and records its end. Returns the job handed over with the end, if any,
    /// with the slot kept for it.
    async fn run_attempt(
        self: Arc<Self>,
        claimed: ClaimedJob,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> (
        Option<ClaimedJob>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let job = &claimed.job;
        self.observer.started(job);
        let started = Instant::now();
        let outcome = match self.processors.get(&job.name) {
            None => Outcome::Failed(ProcessError::unrecoverable(format!(
                "no processor is registered for job name {:?} on queue {:?}",
                job.name, job.queue
            ))),
            Some(p) => {
                let run = AssertUnwindSafe(p.process(job)).catch_unwind();
                let timed = match job.opts.timeout {
                    Some(ms) => tokio::time::timeout(Duration::from_millis(ms), run)
                        .await
                        .map_err(|_| ms),
                    None => Ok(run.await),
                };
                match timed {
                    Ok(Ok(Ok(completion))) => self.prepare_follow_ups(completion),
                    Ok(Ok(Err(e))) => Outcome::Failed(e),
                    Ok(Err(panic)) => Outcome::Failed(ProcessError::retryable(format!(
                        "processor panicked: {}",
                        panic_message(&panic)
                    ))),
                    Err(ms) => Outcome::Failed(ProcessError::retryable(format!(
                        "attempt timed out after {ms} ms"
                    ))),
                }
            }
        };
        let elapsed = started.elapsed();
        // The processor is done with the slot. Where the engine hands over the next job with
        // this attempt's end, keep the slot for that job; otherwise free it now, so that the
        // next claim can share a commit with this attempt's result instead of waiting for it.
        let fetch_next =
            self.engine.capabilities().fetch_next && !self.stopping.load(Ordering::Relaxed);
        let kept = if fetch_next {
            Some(slot)
        } else {
            drop(slot);
            None
        };
        let failure_end = |e: &ProcessError| {
            let last = job.attempts_made >= job.max_attempts();
            let end = if e.is_retryable() && !last {
                AttemptEnd::Retrying
            } else {
                AttemptEnd::Failed
            };
            (end, Some(e.reason().to_owned()))
        };
        let (mut end, mut error) = match &outcome {
            Outcome::Completed(_) => (AttemptEnd::Completed, None),
            Outcome::Failed(e) => failure_end(e),
        };
        let mut next = None;
        match self
            .finish_with_retries(&claimed, outcome, fetch_next)
            .await
        {
            Ok(n) => next = n,
            Err(e) => {
                end = AttemptEnd::NotRecorded;
                match e {
                    QueueError::EffectFailed(e) => (end, error) = failure_end(&e),
                    QueueError::LeaseLost { .. } => {
                        tracing::warn!(queue = %job.queue, job_id = %job.id,
                            "attempt finished after its lease was taken back; its result was discarded")
                    }
                    e => tracing::error!(queue = %job.queue, job_id = %job.id, error = %e,
                        "could not record the attempt; the job will be taken back when its lease expires"),
                }
            }
        }
        self.observer.finished(job, end, elapsed, error.as_deref());
        (next, kept)
    }

    /// Records an attempt's end, retrying while the engine is unavailable for up to one lease
    /// period (after that the lease has expired and another worker takes the job back). With
    /// `fetch_next`, the first try also takes the queue's next job; retries do not, so that an
    /// answer lost on the way leaves at most one job claimed by nobody (its lease expires and
    /// it is taken back).
    async fn finish_with_retries(
        &self,
        claimed: &ClaimedJob,
        outcome: Outcome,
        fetch_next: bool,
    ) -> Result<Option<ClaimedJob>, QueueError> {
        let deadline = Instant::now() + self.opts.lease;
        let mut wait = Duration::from_millis(50);
        let mut first = true;
        loop {
            let fetch = fetch_next && first && !self.stopping.load(Ordering::Relaxed);
            first = false;
            let ended = if fetch {
                self.engine
                    .finish_and_claim(claimed, outcome.clone(), self.opts.lease)
                    .await
            } else {
                self.engine
                    .finish(claimed, outcome.clone())
                    .await
                    .map(|()| None)
            };
            match ended {
                Err(QueueError::Unavailable(_))
                    if Instant::now() + wait < deadline
                        && !self.stopping.load(Ordering::Relaxed) =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    /// Gives follow-up jobs their queues' default options; an invalid follow-up fails the
    /// attempt, since retrying cannot fix it.
    fn prepare_follow_ups(&self, mut completion: Completion) -> Outcome {
        let follow_ups = std::mem::take(&mut completion.follow_ups);
        match follow_ups
            .into_iter()
            .map(|j| self.queues.prepare(j))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(jobs) => {
                completion.follow_ups = jobs;
                Outcome::Completed(completion)
            }
            Err(e) => Outcome::Failed(ProcessError::unrecoverable(format!(
                "invalid follow-up job: {e}"
            ))),
        }
    }

    /// Takes back stalled jobs and prunes finished ones, on their own schedules. A task of its
    /// own: a prune of a busy queue takes several writes, and the claim loop must not wait for
    /// them (its slots would empty meanwhile).
    async fn housekeeping_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut last_reap = Instant::now() - self.opts.stalled_interval;
        let mut last_prune = Instant::now();
        loop {
            if last_reap.elapsed() >= self.opts.stalled_interval {
                last_reap = Instant::now();
                match self
                    .engine
                    .reap_stalled(&self.queue, self.opts.max_stalled)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(queue = %self.queue, count = n, "took back stalled jobs")
                    }
                    Err(e) => {
                        tracing::warn!(queue = %self.queue, error = %e, "stalled-job check failed")
                    }
                }
            }
            if last_prune.elapsed() >= self.opts.prune_interval {
                last_prune = Instant::now();
                if let Err(e) = self.engine.prune(&self.queue).await {
                    tracing::warn!(queue = %self.queue, error = %e, "retention pruning failed");
                }
            }
            let next =
                (last_reap + self.opts.stalled_interval).min(last_prune + self.opts.prune_interval);
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    async fn renew_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = (self.opts.lease / 3).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(every) => {}
            }
            let leases: Vec<(String, String)> = self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|(c, _)| (c.job.id.clone(), c.token.clone()))
                .collect();
            if leases.is_empty() {
                if *stop.borrow()
                    && self.permits.available_permits() == self.opts.concurrency.max(1)
                {
                    return;
                }
                continue;
            }
            match self
                .engine
                .extend(&self.queue, &leases, self.opts.lease)
                .await
            {
                Ok(held) => {
                    for ((id, _), ok) in leases.iter().zip(held) {
                        // An attempt that finished since the leases were listed holds none
                        // either; only one still running has lost its lease.
                        let running = || {
                            self.in_flight
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .contains_key(id)
                        };
                        if !ok && running() {
                            tracing::warn!(queue = %self.queue, job_id = %id, "lease lost while the attempt runs");
                        }
                    }
                }
                Err(e) => tracing::warn!(queue = %self.queue, error = %e, "lease renewal failed"),
            }
        }
    }
}
