//! The SQL engine: jobs as rows, on SQLite (the embedded default) and, as a second dialect,
//! Postgres.
//!
//! Layout:
//! - `mod.rs` (this file): [`SqlEngine`] and the [`Engine`] implementation, which sends writes
//!   to the writer and reads from a pool; `config.rs` its [`SqlConfig`].
//! - `writer/`: the group-commit writer. Every write (add, claim, finish, extend, release,
//!   reap, prune, operator actions) is an `Op` sent to one task that drains whatever is queued
//!   and applies it in one transaction, so 32 concurrent adds cost one commit.
//! - `operation.rs`, `operations.rs`: the plain write operations (lease renewal, release,
//!   reaping, pruning, pausing, operators' retries and removals), each a `Statement` with its
//!   typed answer and its statement per dialect; the writer holds them behind one `Op::Run`.
//! - `dialect.rs`: what a dialect provides: the statements behind the hot path's grouped
//!   writes (adds, claims, completions), `run` for a plain operation, and the reads.
//! - `rules.rs`: the job rules written once for both dialects (row mapping, retention columns,
//!   what a failed attempt or a stall does, a prune's order, listings and counts); the dialects
//!   run the statements they decide. `answers.rs`: what those statements returned becomes each
//!   operation's answer and the batch's notes, once for both dialects.
//! - `sqlite/`: the SQLite dialect: schema and statements.
//! - `postgres/`: the Postgres dialect: the same schema and statements in Postgres's SQL,
//!   `SKIP LOCKED` claims, several writer connections, and `LISTEN/NOTIFY` wake-ups.
//! - `history.rs`: rebuilding a job's event history from its row and its event rows.
//!
//! Timestamps are milliseconds since the Unix epoch from the engine's [`Clock`]. On SQLite all
//! processes share one machine and so one clock. On Postgres, writes are stamped with the
//! database server's clock (shifted by the injected clock's offset from the system clock, which
//! is zero outside tests), so that processes on several machines agree on lease expiry.

mod answers;
mod config;
mod dialect;
mod history;
mod operation;
mod operations;
mod postgres;
mod rules;
mod sqlite;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};

pub use crate::effect::{SqlConn, TxEffect};
pub use config::{redact_url, Durability, SqlConfig, DEFAULT_WRITE_TIMEOUT};
pub use sqlite::conn::{retry_while_busy, sqlite_busy, ReadPool, SqliteFile};

use crate::clock::{Clock, LeadingClock};
use crate::engine::{
    new_lease_token, Capabilities, ClaimBatch, ClaimOnAdd, ClaimedJob, Completion, Engine,
    FirstRun, Outcome,
};
use crate::error::{QueueError, Result};
use crate::events::{JobEvent, WatchRegistry};
use crate::job::{Added, Found, Job, JobSearch, JobState, NewJob, QueueCounts};
use dialect::{Dialect, Reads};
use operation::{Pending, Statement};
use writer::{Op, Request, Slot, WriterHandle};

/// Counters of the group-commit writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Transactions committed.
    pub commits: u64,
    /// Operations applied in them.
    pub operations: u64,
}

/// The most finished jobs one prune operation removes on SQLite: each commits alone, and an add
/// that arrives meanwhile waits for it, so 100 keep that wait near half a millisecond (removing
/// a job and its index entries costs the writer about 5 µs). 500 was measurably in the tail
/// of POST latency: A/B alternated three times at 2,000 POST/s, p99 5.1–6.1 ms against 5.7–7.8.
const SQLITE_PRUNE_CHUNK: u64 = 100;
/// The same on Postgres, where a prune holds one of several writers and each operation costs a
/// round trip and a commit of its own: fewer, larger ones.
const POSTGRES_PRUNE_CHUNK: u64 = 2_000;

/// How many of a state's newest finished jobs, beyond those a prune may remove, each dialect's
/// prune ranks to find the ones past their keep count: counts up to this are pruned without
/// ranking every finished job.
const PRUNE_WINDOW: i64 = 2048;

/// The SQL engine. Create it with [`SqlEngine::connect`].
pub struct SqlEngine {
    owner: String,
    clock: Arc<dyn Clock>,
    /// The clock the engine's due times are on, for workers to wait by: `clock`, moved by the
    /// database's measured lead on Postgres.
    due_clock: Arc<dyn Clock>,
    name: &'static str,
    reads: Box<dyn Reads>,
    writer: WriterHandle,
    shared: Arc<Shared>,
    /// Background tasks to stop at close (the Postgres listener).
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The most finished jobs one prune operation removes.
    prune_chunk: u64,
    /// How long a caller waits for a write.
    write_timeout: Duration,
    /// Whether adds commit the completions of jobs run first (the dialect's
    /// [`Schedule::run_first`](dialect::Schedule::run_first)).
    run_first: bool,
}

/// State shared between the engine's handle and its writer task.
pub(crate) struct Shared {
    pub(crate) watches: WatchRegistry,
    /// Transactions committed by the writer.
    pub(crate) commits: AtomicU64,
    /// Operations applied by the writer.
    pub(crate) ops: AtomicU64,
    // A std mutex: only looked up or inserted into, never held across an await.
    work: Mutex<std::collections::HashMap<String, watch::Sender<u64>>>,
    /// Why the writer cannot write now (a full disk, a broken file, a connection it could not
    /// reopen after a panic), until its next commit; `None` while it can.
    down: Mutex<Option<String>>,
    /// Whether `down` holds a reason: the writer checks it after each commit without a lock.
    is_down: AtomicBool,
    /// A fault the writer is to stage once (tests only, through `SqlEngine::inject_fault`); the
    /// writer looks before taking the lock.
    fault: Mutex<Option<WriterFault>>,
    fault_staged: AtomicBool,
}

/// A fault staged in the writer for tests of its recovery (feature `testkit`): a panic at one
/// point of the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterFault {
    /// Before the batch is applied: nothing of it commits.
    PanicBeforeApply,
    /// After the batch committed, before any of its callers is answered.
    PanicAfterCommit,
}

impl Shared {
    fn signal(&self, queue: &str) -> watch::Sender<u64> {
        self.work
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(queue.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    /// Announces that jobs may have become ready on `queue`.
    pub(crate) fn wake(&self, queue: &str) {
        self.signal(queue).send_modify(|v| *v += 1);
    }

    /// Records why the writer cannot write; readiness fails until [`Shared::writer_up`].
    pub(crate) fn writer_down(&self, why: String) {
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.is_down.store(true, Ordering::Release);
    }

    /// Records that the writer committed (or recovered its connection).
    pub(crate) fn writer_up(&self) {
        if !self.is_down.load(Ordering::Acquire) {
            return;
        }
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        self.is_down.store(false, Ordering::Release);
        if let Some(why) = down.take() {
            tracing::info!(was = %why, "the writer is writing again");
        }
    }

    /// Why the writer cannot write, if it cannot.
    pub(crate) fn writer_problem(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Panics if `point` is the fault a test staged, once.
    pub(crate) fn inject(&self, point: WriterFault) {
        if !self.fault_staged.load(Ordering::Acquire) {
            return;
        }
        let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if *fault == Some(point) {
            *fault = None;
            drop(fault);
            panic!("injected writer fault: {point:?}");
        }
    }

    /// Announces that jobs may have become ready on every queue this process watches (after
    /// notifications may have been missed).
    pub(crate) fn wake_all(&self) {
        let senders: Vec<_> = self
            .work
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for s in senders {
            s.send_modify(|v| *v += 1);
        }
    }
}

impl SqlEngine {
    /// Adds one job under `claim` (its id minted in `ids`), committing `complete` with it where
    /// the writer can (see `Op::Add`); the job as held, if it was stored claimed and not
    /// completed by its add (`held` wants it active).
    async fn add_held(
        &self,
        job: NewJob,
        ids: Vec<Option<String>>,
        claim: ClaimOnAdd,
        complete: Option<Completion>,
    ) -> Result<(Added, Option<ClaimedJob>)> {
        let held = claim.clone();
        let added = self
            .request(|reply| Op::Add {
                ids,
                jobs: vec![job],
                claim: Some(claim),
                complete,
                reply,
            })
            .await?
            .pop()
            .ok_or_else(|| QueueError::Corrupt("the writer answered no job for an add".into()))?;
        let claimed = held.held(&added);
        Ok((added, claimed))
    }
    /// Opens (creating if needed) the database at `config.url`, brings its queue tables up to
    /// date, and starts the writer.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for a URL this engine does not take; [`QueueError::Unavailable`]
    /// when the database cannot be opened or migrated.
    pub async fn connect(config: SqlConfig) -> Result<Arc<SqlEngine>> {
        let shared = Arc::new(Shared {
            watches: WatchRegistry::default(),
            commits: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            work: Mutex::new(Default::default()),
            down: Mutex::new(None),
            is_down: AtomicBool::new(false),
            fault: Mutex::new(None),
            fault_staged: AtomicBool::new(false),
        });
        let (name, prune_chunk, run_first, reads, writer, background, due_clock): (
            _,
            _,
            bool,
            Box<dyn Reads>,
            _,
            _,
            Arc<dyn Clock>,
        ) = if config.url.starts_with("sqlite:") {
            let opened = sqlite::open(&config).await?;
            let run_first = sqlite::Sqlite.schedule().run_first;
            // SQLite has one writer: exactly one writer task.
            let writer = writer::spawn(
                sqlite::Sqlite,
                vec![opened.writer],
                config.clock.clone(),
                shared.clone(),
                config.max_batch,
            )?;
            (
                "sqlite",
                SQLITE_PRUNE_CHUNK,
                run_first,
                Box::new(opened.reads),
                writer,
                vec![opened.checkpoints.spawn()],
                config.clock.clone(),
            )
        } else if config.url.starts_with("postgres://") || config.url.starts_with("postgresql://") {
            let opened = postgres::open(&config).await?;
            let run_first = opened.dialect.schedule().run_first;
            let due_clock = Arc::new(LeadingClock {
                base: config.clock.clone(),
                lead: opened.dialect.clock.lead.clone(),
            });
            let writer = writer::spawn(
                opened.dialect,
                opened.writers,
                config.clock.clone(),
                shared.clone(),
                config.max_batch,
            )?;
            let mut background = vec![opened.notifications.spawn()];
            if let Some((listener, pool)) = opened.listener {
                background.push(postgres::spawn_listener(
                    listener,
                    pool,
                    Arc::downgrade(&shared),
                ));
            }
            (
                "postgres",
                POSTGRES_PRUNE_CHUNK,
                run_first,
                Box::new(opened.reads),
                writer,
                background,
                due_clock,
            )
        } else {
            return Err(QueueError::Invalid(format!(
                "the SQL engine takes sqlite:// or postgres:// URLs, not {:?}",
                redact_url(&config.url)
            )));
        };
        Ok(Arc::new(SqlEngine {
            prune_chunk,
            run_first,
            write_timeout: config.write_timeout,
            owner: uuid::Uuid::now_v7().to_string(),
            name,
            clock: config.clock,
            due_clock,
            reads,
            writer,
            shared,
            background: Mutex::new(background),
        }))
    }

    /// How many transactions the writer has committed and how many operations they held; the
    /// ratio is the group-commit factor.
    pub fn write_stats(&self) -> WriteStats {
        WriteStats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            operations: self.shared.ops.load(Ordering::Relaxed),
        }
    }

    /// Stages a fault in the writer's next batch, to test its recovery.
    #[cfg(feature = "testkit")]
    pub fn inject_fault(&self, fault: WriterFault) {
        *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault);
        self.shared.fault_staged.store(true, Ordering::Release);
    }

    /// Sends a write to the writer and waits for its answer, up to the write timeout: past it
    /// the caller gets [`QueueError::Unavailable`], and the writer drops the operation unless
    /// it has already taken it up.
    async fn request<T>(&self, make: impl FnOnce(Slot<T>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let answer = async {
            self.writer.send(Request::new(make(Slot::new(tx)))).await?;
            match rx.await {
                Ok(r) => r,
                Err(_) if self.writer.is_closed() => Err(QueueError::Closed),
                Err(_) => Err(QueueError::Unavailable(
                    "the writer dropped the write unanswered".into(),
                )),
            }
        };
        match tokio::time::timeout(self.write_timeout, answer).await {
            Ok(r) => r,
            Err(_) => Err(QueueError::Unavailable(format!(
                "the write did not finish within {} ms (the write timeout){}",
                self.write_timeout.as_millis(),
                self.shared
                    .writer_problem()
                    .map(|why| format!(": {why}"))
                    .unwrap_or_default()
            ))),
        }
    }
}

impl SqlEngine {
    /// Sends a plain operation (see `operation.rs`) to the writer and waits for its answer.
    async fn run<S: Statement>(&self, statement: S) -> Result<S::Answer> {
        self.request(|reply| Op::Run(Box::new(Pending::new(statement, reply))))
            .await
    }
}

#[async_trait]
impl Engine for SqlEngine {
    fn name(&self) -> &'static str {
        self.name
    }

    fn owner_id(&self) -> &str {
        &self.owner
    }

    fn clock(&self) -> Arc<dyn Clock> {
        self.due_clock.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            transactional_effects: true,
            leases_follow_clock: true,
            fetch_next: true,
            claim_on_add: true,
        }
    }

    fn watches(&self) -> &WatchRegistry {
        &self.shared.watches
    }

    fn work_signal(&self, queue: &str) -> watch::Receiver<u64> {
        self.shared.signal(queue).subscribe()
    }

    async fn add_bulk(&self, jobs: Vec<NewJob>) -> Result<Vec<Added>> {
        let ids = rules::mint_ids(&jobs);
        self.request(|reply| Op::Add {
            jobs,
            ids,
            claim: None,
            complete: None,
            reply,
        })
        .await
    }

    async fn add_claimed(
        &self,
        job: NewJob,
        lease: Duration,
    ) -> Result<(Added, Option<ClaimedJob>)> {
        let ids = rules::mint_ids(std::slice::from_ref(&job));
        let claim = ClaimOnAdd::new(lease, &self.owner);
        self.add_held(job, ids, claim, None).await
    }

    async fn add_run_first(
        &self,
        job: NewJob,
        lease: Duration,
        first: &dyn FirstRun,
    ) -> Result<(Added, Option<ClaimedJob>)> {
        if !self.run_first {
            return self.add_claimed(job, lease).await;
        }
        let ids = rules::mint_ids(std::slice::from_ref(&job));
        let claim = ClaimOnAdd::new(lease, &self.owner);
        let add = rules::ToAdd {
            job: &job,
            claim: Some(&claim),
            minted: ids[0].as_deref(),
        };
        let preview = rules::as_claimed(add, &claim, self.clock.now_ms());
        let complete = first.run(&preview).await;
        self.add_held(job, ids, claim, complete).await
    }

    async fn get(&self, queue: &str, id: &str) -> Result<Option<Job>> {
        self.reads.get(queue, id, self.clock.now_ms()).await
    }

    async fn list(
        &self,
        queue: &str,
        state: JobState,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<Job>> {
        self.reads
            .list(queue, state, offset, limit, self.clock.now_ms())
            .await
    }

    async fn search(
        &self,
        queue: &str,
        state: Option<JobState>,
        search: &JobSearch,
        offset: u64,
        limit: u64,
    ) -> Result<Found> {
        let jobs = self
            .reads
            .search(queue, state, search, offset, limit, self.clock.now_ms())
            .await?;
        Ok(Found {
            jobs,
            exhaustive: true,
        })
    }

    async fn counts(&self, queue: &str) -> Result<QueueCounts> {
        self.reads.counts(queue, self.clock.now_ms()).await
    }

    async fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        let queue = queue.to_owned();
        self.run(operations::SetPaused { queue, paused }).await
    }

    async fn is_paused(&self, queue: &str) -> Result<bool> {
        self.reads.is_paused(queue).await
    }

    async fn retry(&self, queue: &str, id: &str) -> Result<Job> {
        let (queue, id) = (queue.to_owned(), id.to_owned());
        self.run(operations::Retry { queue, id }).await
    }

    async fn promote(&self, queue: &str, id: &str) -> Result<Job> {
        let (queue, id) = (queue.to_owned(), id.to_owned());
        self.run(operations::Promote { queue, id }).await
    }

    async fn remove(&self, queue: &str, id: &str) -> Result<bool> {
        let (queue, id) = (queue.to_owned(), id.to_owned());
        self.run(operations::Remove { queue, id }).await
    }

    async fn history(&self, queue: &str, id: &str) -> Result<Option<Vec<JobEvent>>> {
        self.reads.history(queue, id, self.clock.now_ms()).await
    }

    async fn claim(&self, queue: &str, max: usize, lease: Duration) -> Result<ClaimBatch> {
        let queue = queue.to_owned();
        let token = new_lease_token(&self.owner);
        self.request(|reply| Op::Claim {
            queue,
            max,
            lease_ms: lease.as_millis() as i64,
            token,
            reply,
        })
        .await
    }

    async fn extend(
        &self,
        queue: &str,
        leases: &[(String, String)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        let queue = queue.to_owned();
        let leases = leases.to_vec();
        self.run(operations::Extend {
            queue,
            leases,
            lease_ms: lease.as_millis() as i64,
        })
        .await
    }

    async fn finish(&self, job: &ClaimedJob, outcome: Outcome) -> Result<()> {
        let job = job.clone();
        self.request(|reply| Op::Finish {
            job,
            outcome,
            reply,
        })
        .await
    }

    async fn finish_and_claim(
        &self,
        job: &ClaimedJob,
        outcome: Outcome,
        next_lease: Duration,
    ) -> Result<Option<ClaimedJob>> {
        let job = job.clone();
        let token = new_lease_token(&self.owner);
        self.request(|reply| Op::FinishAndClaim {
            job,
            outcome,
            lease_ms: next_lease.as_millis() as i64,
            token,
            reply,
        })
        .await
    }

    async fn release(&self, job: &ClaimedJob) -> Result<()> {
        let job = job.clone();
        self.run(operations::Release { job }).await
    }

    async fn reap_stalled(&self, queue: &str, max_stalled: u32) -> Result<u64> {
        let queue = queue.to_owned();
        self.run(operations::ReapStalled { queue, max_stalled })
            .await
    }

    async fn prune(&self, queue: &str) -> Result<u64> {
        // One chunk per writer operation, so that other writes get their turn between chunks
        // instead of waiting behind one long delete.
        let mut removed = 0;
        loop {
            let queue = queue.to_owned();
            let n = self
                .run(operations::Prune {
                    queue,
                    limit: self.prune_chunk,
                })
                .await?;
            removed += n;
            if n < self.prune_chunk {
                return Ok(removed);
            }
        }
    }

    /// Fails while the writer cannot write (a full disk, a broken file, a connection it could not
    /// reopen) or has stopped, and when a read connection cannot reach the database.
    async fn ping(&self) -> Result<()> {
        if let Some(why) = self.shared.writer_problem() {
            return Err(QueueError::Unavailable(why));
        }
        if self.writer.is_closed() {
            return Err(QueueError::Closed);
        }
        self.reads.ping().await
    }

    async fn close(&self) {
        let background =
            std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
        for task in background {
            task.abort();
        }
        self.writer.close().await;
        self.reads.close().await;
    }
}
