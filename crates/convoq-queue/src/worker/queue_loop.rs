//! One queue's loops inside a [`super::WorkerPool`]: claiming in batches and running each
//! attempt under a concurrency permit (`fetch_loop`, `run_attempt`), reporting how it ended with
//! bounded retries (`finish_with_retries`), renewing held leases (`renew_loop`), and the
//! housekeeping beside them (stalled jobs, retention).

use super::*;

pub(super) struct QueueLoop {
    pub(super) queue: String,
    pub(super) engine: Arc<dyn Engine>,
    pub(super) queues: Queues,
    pub(super) processors: Arc<HashMap<String, Arc<dyn Processor>>>,
    pub(super) observer: Arc<dyn WorkerObserver>,
    pub(super) permits: Arc<Semaphore>,
    // A std mutex: held only to insert or remove an entry, never across an await.
    pub(super) in_flight: Mutex<HashMap<String, (ClaimedJob, tokio::task::AbortHandle)>>,
    /// Attempt tasks alive, until their result is recorded (a slot is freed earlier).
    pub(super) live: watch::Sender<usize>,
    pub(super) last_tick_ms: AtomicI64,
    pub(super) stopping: AtomicBool,
    /// The claim loop waits for work: its last claim found none (and jobs added since were
    /// handed to free slots as they were stored), so an attempt's end does not look for the
    /// next job (fetch-next).
    pub(super) idle: AtomicBool,
    pub(super) opts: WorkerOptions,
}

/// Held by an attempt task for as long as it lives, and by a slot held for a job being added:
/// shutdown waits for both.
struct Live(Arc<QueueLoop>);

impl Live {
    fn new(queue_loop: &Arc<QueueLoop>) -> Self {
        queue_loop.live.send_modify(|n| *n += 1);
        Live(queue_loop.clone())
    }
}

/// A slot held for a job being added ([`Queues::add`]).
struct HeldSlot {
    live: Live,
    permit: tokio::sync::OwnedSemaphorePermit,
    /// What the run before the job was stored took, and the follow-up jobs (queue, name) its
    /// completion carries, to report once the add has committed it ([`Reserved::ran_first`]).
    ran: Mutex<Option<FirstRunDone>>,
}

/// A run before the job was stored: how long it took, and its completion's follow-up jobs
/// (queue, name).
type FirstRunDone = (Duration, Vec<(String, String)>);

impl Taker for QueueLoop {
    fn reserve(self: Arc<Self>) -> Option<Box<dyn Reserved>> {
        if self.stopping.load(Ordering::Acquire) {
            return None;
        }
        // Fails while the claim loop waits for a slot (tokio's semaphore serves waiters first):
        // then the queue has a backlog, and the job added waits its turn in it.
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(Box::new(HeldSlot {
            live: Live::new(&self),
            permit,
            ran: Mutex::new(None),
        }))
    }
}

impl Reserved for HeldSlot {
    fn lease(&self) -> Duration {
        self.live.0.opts.lease
    }

    fn first_run(&self, name: &str) -> Option<&dyn FirstRun> {
        let this = &self.live.0;
        let effect_only = this.processors.get(name).is_some_and(|p| p.effect_only());
        (effect_only && !this.stopping.load(Ordering::Acquire)).then_some(self as &dyn FirstRun)
    }

    fn ran_first(self: Box<Self>, job: &Job) {
        let this = &self.live.0;
        let ran = self.ran.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (elapsed, follow_ups) = ran.unwrap_or_default();
        this.observer.started(job);
        this.observer
            .finished(job, AttemptEnd::Completed, elapsed, None);
        for (queue, name) in &follow_ups {
            this.observer.follow_up_added(queue, name);
        }
    }

    fn run(self: Box<Self>, job: ClaimedJob) {
        let HeldSlot { live, permit, .. } = *self;
        let this = live.0.clone();
        if !this.stopping.load(Ordering::Acquire) {
            this.spawn_attempt(job, permit, live);
            return;
        }
        // Stopping: the job goes back as shutdown gives back unfinished ones.
        drop(permit);
        tokio::spawn(async move {
            let _live = live;
            if let Err(e) = this.engine.release(&job).await {
                tracing::warn!(queue = %job.job.queue, job_id = %job.job.id, error = %e,
                    "could not release a job added at shutdown; it will be taken back when its lease expires");
            }
        });
    }
}

#[async_trait]
impl FirstRun for HeldSlot {
    async fn run(&self, job: &Job) -> Option<Completion> {
        let started = Instant::now();
        let completion = self.live.0.process(job).await.ok()?;
        let follow_ups = completion
            .follow_ups
            .iter()
            .map(|j| (j.queue.clone(), j.name.clone()))
            .collect();
        *self.ran.lock().unwrap_or_else(|p| p.into_inner()) = Some((started.elapsed(), follow_ups));
        Some(completion)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl QueueLoop {
    fn tick(&self) {
        self.last_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(super) async fn fetch_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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
                self.idle.store(true, Ordering::Release);
                tokio::select! {
                    _ = signal.changed() => {}
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                self.idle.store(false, Ordering::Release);
                continue;
            }
            for claimed in batch.jobs {
                let permit = permits.pop().expect("claimed no more jobs than permits");
                self.spawn_attempt(claimed, permit, Live::new(&self));
            }
        }
    }

    /// Runs `claimed` in a task holding `permit`; then, as long as each attempt's end handed
    /// over the queue's next job ([`Engine::finish_and_claim`]), runs that one in the same slot.
    fn spawn_attempt(
        self: &Arc<Self>,
        claimed: ClaimedJob,
        permit: tokio::sync::OwnedSemaphorePermit,
        live: Live,
    ) {
        let this = self.clone();
        let id = claimed.job.id.clone();
        let own_handle = Arc::new(OnceLock::<tokio::task::AbortHandle>::new());
        // Hold the map lock across spawn so the task cannot remove its entry before it exists.
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let task = tokio::spawn({
            let claimed = claimed.clone();
            let own_handle = own_handle.clone();
            async move {
                // Counts the task down however it ends, aborted at shutdown included.
                let _live = live;
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
        let outcome = match self.process(job).await {
            Ok(completion) => self.prepare_follow_ups(completion),
            Err(e) => Outcome::Failed(e),
        };
        let (outcome, mut held) = self.hold_slots_for_follow_ups(outcome);
        let elapsed = started.elapsed();
        // The processor is done with the slot. Where the engine hands over the next job with
        // this attempt's end, keep the slot for that job; otherwise free it now, so that the
        // next claim can share a commit with this attempt's result instead of waiting for it.
        // An idle claim loop found no ready job last time, and jobs added since were handed
        // out as they were stored: a next job is unlikely, and not worth a claim's statement.
        let fetch_next = self.engine.capabilities().fetch_next
            && !self.stopping.load(Ordering::Relaxed)
            && !self.idle.load(Ordering::Relaxed);
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
        // What the completion adds, to report once it has committed (empty, unallocated, for
        // most completions).
        let follow_ups: Vec<(String, String)> = match &outcome {
            Outcome::Completed(c) => c
                .follow_ups
                .iter()
                .map(|j| (j.queue.clone(), j.name.clone()))
                .collect(),
            Outcome::Failed(_) => Vec::new(),
        };
        let claims = match &outcome {
            Outcome::Completed(c) => c.follow_up_claims.clone(),
            Outcome::Failed(_) => None,
        };
        let mut next = None;
        match self
            .finish_with_retries(&claimed, outcome, fetch_next)
            .await
        {
            Ok(n) => {
                next = n;
                let stored = claims.map(|c| {
                    std::mem::take(&mut *c.claimed.lock().unwrap_or_else(|p| p.into_inner()))
                });
                for job in stored.into_iter().flatten() {
                    if let Some(slot) = held.remove(&job.token) {
                        slot.run(job);
                    }
                }
            }
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
        if end == AttemptEnd::Completed {
            for (queue, name) in &follow_ups {
                self.observer.follow_up_added(queue, name);
            }
        }
        (next, kept)
    }

    /// Runs `job`'s processor: a panic, or a run past the job's timeout, fails the attempt as
    /// retryable, and a job no processor is registered for fails for good.
    async fn process(&self, job: &Job) -> std::result::Result<Completion, ProcessError> {
        let Some(p) = self.processors.get(&job.name) else {
            return Err(ProcessError::unrecoverable(format!(
                "no processor is registered for job name {:?} on queue {:?}",
                job.name, job.queue
            )));
        };
        let run = AssertUnwindSafe(p.process(job)).catch_unwind();
        let timed = match job.opts.timeout {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), run)
                .await
                .map_err(|_| ms),
            None => Ok(run.await),
        };
        match timed {
            Ok(Ok(done)) => done,
            Ok(Err(panic)) => Err(ProcessError::retryable(format!(
                "processor panicked: {}",
                panic_message(&panic)
            ))),
            Err(ms) => Err(ProcessError::retryable(format!(
                "attempt timed out after {ms} ms"
            ))),
        }
    }

    /// Holds free slots of this process's workers for a completion's follow-up jobs, so
    /// that the completion stores them claimed and they run as soon as it commits (as
    /// [`Queues::add`] does for the jobs callers add). Returns the slots by lease token; those
    /// not used are freed when dropped.
    fn hold_slots_for_follow_ups(
        &self,
        outcome: Outcome,
    ) -> (Outcome, HashMap<String, Box<dyn Reserved>>) {
        let mut held = HashMap::new();
        let Outcome::Completed(mut completion) = outcome else {
            return (outcome, held);
        };
        let leases: Vec<Option<ClaimOnAdd>> = completion
            .follow_ups
            .iter()
            .map(|job| {
                let slot = self.queues.free_slot(job)?;
                let lease = ClaimOnAdd::new(slot.lease(), self.queues.engine().owner_id());
                held.insert(lease.token.clone(), slot);
                Some(lease)
            })
            .collect();
        if !held.is_empty() {
            completion.follow_up_claims = Some(Arc::new(FollowUpClaims {
                leases,
                claimed: Default::default(),
            }));
        }
        (Outcome::Completed(completion), held)
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
    pub(super) async fn housekeeping_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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

    pub(super) async fn renew_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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
