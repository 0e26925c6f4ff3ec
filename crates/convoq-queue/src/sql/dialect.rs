//! What a SQL dialect provides to the engine: the statements behind each write operation (run by
//! the writer inside its transaction) and the reads (run on a pool). SQLite implements it in
//! `sqlite/`; Postgres is the second dialect of the same engine.
//!
//! Every write takes `now`, the batch's clock reading in milliseconds, from [`Dialect::now_ms`]:
//! the injected clock on SQLite (one machine, one clock), the database's clock on a shared
//! server, so that no worker's clock is ever compared with a stored timestamp.

use async_trait::async_trait;

use super::operation::Operation;
use super::writer::Batch;
use crate::clock::Clock;
use crate::effect::SqlConn;
use crate::engine::{ClaimBatch, ClaimedJob, Completion, Outcome};
use crate::error::{QueueError, Result};
use crate::events::JobEvent;
use crate::job::{Added, Job, JobSearch, JobState, QueueCounts};
use crate::sql::rules::ToAdd;

/// A dialect's result: the driver's error outside, the operation's own inside.
pub(crate) type DResult<D, T> = std::result::Result<T, <D as Dialect>::Error>;

/// Whether sqlx says the connection itself failed (I/O, TLS, protocol, pool).
pub(crate) fn transport_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// What a failed batch says about the database, which decides what the writer does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection failed, not an operation: the batch may succeed as a whole on another
    /// connection, and no operation would on this one. Applied once more on a new connection.
    ConnectionLost,
    /// Another connection holds the lock the batch needs (SQLite's busy or locked, after its
    /// bounded wait). No operation would fare better alone: the batch is refused as unavailable.
    Busy,
    /// The disk is full. The batch is refused as unavailable; later batches try again, and
    /// those that need no new space (completions, removals) may go through.
    Full,
    /// The database cannot be read or written (I/O error, corruption, a file that is no longer
    /// there): the batch is refused, and readiness fails until a batch commits again.
    Broken,
    /// One of the batch's operations failed (a constraint, a bad value): applied again one
    /// operation at a time, so that it fails alone.
    Operation,
}

/// How the writer schedules a dialect's batches: a value apart from the statements.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Schedule {
    /// How long a batch (clock reading to commit) may take before the writer abandons it and
    /// [`Dialect::discard`]s its connection; `None`: no limit (a local file cannot hang).
    pub(crate) batch_timeout: Option<std::time::Duration>,
    /// Whether a batch's adds commit in a transaction of their own, before the rest of the
    /// batch (and its prunes each alone, after the adds that arrived meanwhile): worth it where
    /// a commit is cheap and one writer carries every write, so that an add's caller does not
    /// wait for the claims, completions and prunes queued with it.
    pub(crate) adds_first: bool,
    /// Whether each writer task runs on a thread of its own, in a single-threaded runtime,
    /// instead of on the runtime that opened the engine: needed where every statement is a
    /// blocking call on the calling thread (SQLite through rusqlite), so that the writer neither
    /// holds a runtime worker that request handlers need nor waits in their queue between
    /// batches. Not for a dialect whose connections are sockets registered with the runtime
    /// that opened them (Postgres).
    pub(crate) own_thread: bool,
    /// Whether adds get a writer of their own (the first connection, when there are several),
    /// so that a POST's add never waits behind claims and completions in a busy writer: its
    /// latency is one transaction's. Worth it where writers are several and each batch costs
    /// round trips to a server (Postgres); SQLite's one writer commits adds first instead
    /// (`adds_first`).
    pub(crate) add_lane: bool,
    /// Whether an add commits the completion of a job run before it was stored
    /// (`Engine::add_run_first`), making the add's transaction the job's whole life. Worth it
    /// where a commit costs the writer more than the statements (SQLite: one commit and the
    /// worker's round instead of two); not where each statement is a round trip to a server
    /// on the one connection that takes adds (Postgres's add lane: measured, the adds' round
    /// trips queued behind each other and POST latency and throughput fell).
    pub(crate) run_first: bool,
}

/// The write side of a dialect, driven by the writer task.
///
/// Each method answers `Result<_, Self::Error>`: an `Err` (the driver's) aborts the writer's
/// batch; an inner `Err` of the crate's is the operation's own answer (lease lost, wrong state)
/// and the batch goes on.
#[async_trait]
pub(crate) trait Dialect: Send + Sync + 'static {
    /// A connection the writer owns.
    type Conn: Send + 'static;
    /// The driver's error.
    type Error: std::fmt::Display + Send + 'static;

    /// Maps a driver error to the crate's error.
    fn map_err(&self, e: Self::Error) -> QueueError;
    /// The error of a batch abandoned after [`Schedule::batch_timeout`].
    fn timed_out(&self, message: String) -> Self::Error;
    /// How the writer schedules this dialect's batches (see [`Schedule`]).
    fn schedule(&self) -> Schedule;
    /// Gives up a connection whose state is unknown (a batch was abandoned mid-flight).
    fn discard(&self, _conn: &mut Self::Conn) {}
    /// What a batch's error says about the database (see [`Failure`]).
    fn classify(&self, e: &Self::Error) -> Failure;
    /// Replaces the connection with a fresh one after the writer lost track of its state (a
    /// panic in the middle of a batch). By default the connection is discarded
    /// ([`Dialect::discard`]) and opened again by the next batch.
    async fn reopen(&self, conn: &mut Self::Conn) -> DResult<Self, ()> {
        self.discard(conn);
        Ok(())
    }
    /// The batch's clock reading.
    async fn now_ms(&self, conn: &mut Self::Conn, clock: &dyn Clock) -> DResult<Self, i64>;
    /// Opens the batch's transaction.
    async fn begin(&self, conn: &mut Self::Conn) -> DResult<Self, ()>;
    /// For a batch of adds of jobs without custom ids (one insert, atomic by itself, that no
    /// conflict can refuse): its clock reading where the dialect runs it without a transaction,
    /// sparing the round trips of `BEGIN` and `COMMIT`; `None` to run it as any batch.
    async fn autocommit_adds(
        &self,
        _conn: &mut Self::Conn,
        _clock: &dyn Clock,
    ) -> DResult<Self, Option<i64>> {
        Ok(None)
    }
    /// What [`Dialect::commit`] does after its commit, for a batch run without a transaction.
    async fn autocommitted(&self, _conn: &mut Self::Conn, _batch: &Batch) -> DResult<Self, ()> {
        Ok(())
    }
    /// Adds the batch's lifetime totals and commits.
    async fn commit(&self, conn: &mut Self::Conn, batch: &Batch) -> DResult<Self, ()>;
    /// Abandons the batch.
    async fn rollback(&self, conn: &mut Self::Conn) -> DResult<Self, ()>;
    /// Closes a connection.
    async fn close(&self, conn: Self::Conn);

    async fn add_jobs(
        &self,
        conn: &mut Self::Conn,
        jobs: &[ToAdd<'_>],
        now: i64,
        batch: &mut Batch,
    ) -> DResult<Self, Result<Vec<Added>>>;
    #[allow(clippy::too_many_arguments)]
    async fn claim(
        &self,
        conn: &mut Self::Conn,
        queue: &str,
        max: usize,
        lease_ms: i64,
        token: &str,
        now: i64,
        batch: &mut Batch,
    ) -> DResult<Self, Result<ClaimBatch>>;
    async fn finish(
        &self,
        conn: &mut Self::Conn,
        job: &ClaimedJob,
        outcome: &Outcome,
        now: i64,
        batch: &mut Batch,
    ) -> DResult<Self, Result<()>>;
    /// Marks jobs completed with their results, fenced per job by its lease token, in as few
    /// statements as the dialect can, answering per job as [`Dialect::finish`] would. It does
    /// not apply effects or add follow-up jobs: the writer does, for the jobs that completed.
    ///
    /// Unless `exact`, a dialect may count instead of listing what it completed, and answer
    /// `None` when some job did not complete (a lease lost): the writer then applies the batch
    /// again with `exact`. Counting spares a row per job where rows are costly to hand over.
    async fn complete_plain(
        &self,
        conn: &mut Self::Conn,
        jobs: &[(&ClaimedJob, &Completion)],
        now: i64,
        exact: bool,
        batch: &mut Batch,
    ) -> DResult<Self, Option<Vec<Result<()>>>>;
    /// The connection as handed to a [`crate::sql::TxEffect`].
    fn effect_conn<'a>(&self, conn: &'a mut Self::Conn) -> DResult<Self, SqlConn<'a>>;
    /// Applies a plain operation (see `sql/operation.rs`): its statement in this dialect, its
    /// answer held until the batch commits.
    async fn run(
        &self,
        conn: &mut Self::Conn,
        op: &mut dyn Operation,
        now: i64,
        batch: &mut Batch,
    ) -> DResult<Self, ()>;
}

/// The read side of a dialect, on a pool.
#[async_trait]
pub(crate) trait Reads: Send + Sync + 'static {
    async fn get(&self, queue: &str, id: &str, now: i64) -> Result<Option<Job>>;
    async fn list(
        &self,
        queue: &str,
        state: JobState,
        offset: u64,
        limit: u64,
        now: i64,
    ) -> Result<Vec<Job>>;
    async fn search(
        &self,
        queue: &str,
        state: Option<JobState>,
        search: &JobSearch,
        offset: u64,
        limit: u64,
        now: i64,
    ) -> Result<Vec<Job>>;
    async fn counts(&self, queue: &str, now: i64) -> Result<QueueCounts>;
    async fn is_paused(&self, queue: &str) -> Result<bool>;
    async fn history(&self, queue: &str, id: &str, now: i64) -> Result<Option<Vec<JobEvent>>>;
    async fn ping(&self) -> Result<()>;
    async fn close(&self);
}
