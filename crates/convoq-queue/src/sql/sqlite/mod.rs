//! The SQLite dialect of the SQL engine, on `rusqlite` (SQLite bundled, its safe API):
//! `conn.rs` (opening connections, the read pool, busy handling; shared with the service's
//! store), `schema.rs` (tables and transaction control), `write.rs` and `upkeep.rs` (the
//! writer's statements), `read.rs` (reads and row mapping).
//!
//! SQLite allows one writer at a time, so the engine runs one writer connection (with group
//! commit) on a thread of its own, where each statement is a direct call into SQLite with no
//! hand-off between threads, and a small pool of read connections on tokio's blocking threads;
//! WAL mode lets reads proceed during writes.
//!
//! Checkpoints (copying committed pages from the WAL into the database file) run beside the
//! writer, on a read connection, after its commits ([`checkpoint_after_commits`]). SQLite would
//! otherwise run each one inside the commit that takes the WAL past 1,000 pages, on the writer's
//! thread, and every caller waiting for the writer (a POST's add) would wait for it too.

pub(crate) mod conn;
mod read;
mod schema;
pub(super) mod upkeep;
pub(super) mod write;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::dialect::{Dialect, Failure, Reads, Schedule};
use super::operation::Operation;
use super::writer::Batch;
use super::SqlConfig;
use crate::clock::Clock;
use crate::effect::SqlConn;
use crate::engine::{ClaimBatch, ClaimedJob, Completion, Outcome};
use crate::error::{QueueError, Result};
use crate::events::JobEvent;
use crate::job::{Added, Job, JobSearch, JobState, QueueCounts};
use crate::sql::rules::ToAdd;
use conn::{ReadPool, SqliteFile};

/// A driver result: `Err` aborts the writer's batch; an inner `Err` is the operation's own
/// answer (lease lost, wrong state) and the batch goes on.
pub(crate) type SqlResult<T> = std::result::Result<T, rusqlite::Error>;

/// The SQLite dialect.
pub(crate) struct Sqlite;

/// The writer connection (schema migrated), the read pool, and the checkpoints that follow the
/// writer's commits, to be started with the writer.
pub(crate) struct Opened {
    pub(crate) writer: SqliteWriter,
    pub(crate) reads: SqliteReads,
    pub(crate) checkpoints: Checkpoints,
}

/// The background checkpoints of an opened database ([`checkpoint_after_commits`]), not yet
/// started.
pub(crate) struct Checkpoints {
    pool: Arc<ReadPool>,
    commits: Arc<Notify>,
}

impl Checkpoints {
    pub(crate) fn spawn(self) -> JoinHandle<()> {
        tokio::spawn(checkpoint_after_commits(self.pool, self.commits))
    }
}

/// The writer's page cache: it keeps the hot pages of the job table and its indexes.
const WRITER_CACHE_KIB: i64 = 16_000;
/// A reader's page cache: SQLite's default. A reader's cache is dropped whenever the writer
/// commits, so a large one buys nothing under load and costs resident memory per connection.
const READER_CACHE_KIB: i64 = 2_000;

/// Opens the writer connection (migrating the schema) and the read pool.
pub(crate) async fn open(config: &SqlConfig) -> Result<Opened> {
    let file = SqliteFile::from_url(&config.url)
        .map_err(|e| QueueError::Invalid(format!("bad SQLite URL: {e}")))?
        .durability(config.durability)
        .busy_timeout(config.busy_timeout);
    // The writer waits for another process's lock no longer than its callers wait for it.
    let writer_file = file
        .clone()
        .cache_kib(WRITER_CACHE_KIB)
        .busy_timeout(config.busy_timeout.min(config.write_timeout));
    let writer_file_again = writer_file.clone();
    let writer = tokio::task::spawn_blocking(move || schema::open_writer(&writer_file))
        .await
        .map_err(|e| QueueError::Unavailable(format!("opening the database failed: {e}")))??;
    // Read connections open on first use.
    let pool = ReadPool::new(
        file.cache_kib(READER_CACHE_KIB),
        config.read_connections.max(1),
        config.busy_timeout,
    );
    let commits = Arc::new(Notify::new());
    Ok(Opened {
        writer: SqliteWriter {
            conn: writer,
            file: writer_file_again,
            commits: commits.clone(),
        },
        checkpoints: Checkpoints {
            pool: pool.clone(),
            commits,
        },
        reads: SqliteReads(pool),
    })
}

/// The pause after each background checkpoint: the commits of the pause are copied together by
/// the next one.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(5);

/// Runs a passive checkpoint on a read connection after the writer commits, at most one per
/// [`CHECKPOINT_PAUSE`]: a passive checkpoint copies what it can without taking the write lock,
/// so the writer goes on committing meanwhile.
///
/// SQLite's own checkpoint stays on for the writer (`wal_autocheckpoint`, 1,000 pages): that
/// one is what lets the WAL start over from its beginning, which a checkpoint can do only while
/// no write is under way. It now finds the pages already copied, and is short. If checkpoints
/// here fail (a busy or full disk), the writer's do the whole work again, as without this task.
async fn checkpoint_after_commits(pool: Arc<ReadPool>, commits: Arc<Notify>) {
    let mut failing = false;
    loop {
        commits.notified().await;
        let done = pool
            .run(|c| c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())))
            .await;
        match done {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "background checkpoint failed; the writer checkpoints the WAL itself until one succeeds");
            }
            Err(_) => {}
        }
        tokio::time::sleep(CHECKPOINT_PAUSE).await;
    }
}

#[async_trait]
impl Dialect for Sqlite {
    type Conn = SqliteWriter;
    type Error = rusqlite::Error;

    fn map_err(&self, e: rusqlite::Error) -> QueueError {
        schema::map_err(e)
    }
    fn timed_out(&self, message: String) -> rusqlite::Error {
        conn::failure(rusqlite::ffi::SQLITE_BUSY, message)
    }
    /// A local file has no connection to lose: see [`conn::classify`].
    fn classify(&self, e: &rusqlite::Error) -> Failure {
        conn::classify(e)
    }
    /// A fresh connection to the same file, with the writer's settings; the old one (its
    /// transaction, if any, rolled back by SQLite) is closed. On failure the old one is kept.
    async fn reopen(&self, w: &mut SqliteWriter) -> SqlResult<()> {
        let fresh = w.file.clone().existing().open()?;
        let old = std::mem::replace(&mut w.conn, fresh);
        drop(old);
        Ok(())
    }
    /// Adds first: the one writer carries every write, and a commit (no sync in WAL mode at
    /// the default durability) costs little beside a batch of claims and completions. A
    /// thread of its own: every statement runs on the calling thread and blocks it, so that no
    /// request handler waits behind SQLite, and SQLite behind none. No batch timeout: a local
    /// file does not hang (a lock held elsewhere is bounded by the busy timeout).
    fn schedule(&self) -> Schedule {
        Schedule {
            batch_timeout: None,
            adds_first: true,
            own_thread: true,
            add_lane: false,
            run_first: true,
        }
    }
    async fn now_ms(&self, _w: &mut SqliteWriter, clock: &dyn Clock) -> SqlResult<i64> {
        Ok(clock.now_ms())
    }
    async fn begin(&self, w: &mut SqliteWriter) -> SqlResult<()> {
        schema::begin(&w.conn)
    }
    async fn commit(&self, w: &mut SqliteWriter, batch: &Batch) -> SqlResult<()> {
        schema::commit(&w.conn, batch)?;
        w.commits.notify_one();
        Ok(())
    }
    async fn rollback(&self, w: &mut SqliteWriter) -> SqlResult<()> {
        schema::rollback(&w.conn)
    }
    async fn close(&self, w: SqliteWriter) {
        let _ = w.conn.close();
    }
    async fn add_jobs(
        &self,
        w: &mut SqliteWriter,
        jobs: &[ToAdd<'_>],
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<Vec<Added>>> {
        write::add_jobs(&w.conn, jobs, now, batch)
    }
    async fn claim(
        &self,
        w: &mut SqliteWriter,
        queue: &str,
        max: usize,
        lease_ms: i64,
        token: &str,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<ClaimBatch>> {
        write::claim(&w.conn, queue, max, lease_ms, token, now, batch)
    }
    async fn finish(
        &self,
        w: &mut SqliteWriter,
        job: &ClaimedJob,
        outcome: &Outcome,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<()>> {
        write::finish(&mut w.conn, job, outcome, now, batch).await
    }
    async fn complete_plain(
        &self,
        w: &mut SqliteWriter,
        jobs: &[(&ClaimedJob, &Completion)],
        now: i64,
        exact: bool,
        batch: &mut Batch,
    ) -> SqlResult<Option<Vec<Result<()>>>> {
        write::complete_plain(&w.conn, jobs, now, exact, batch)
    }
    fn effect_conn<'a>(&self, w: &'a mut SqliteWriter) -> SqlResult<SqlConn<'a>> {
        Ok(SqlConn::Sqlite(&mut w.conn))
    }
    async fn run(
        &self,
        w: &mut SqliteWriter,
        op: &mut dyn Operation,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<()> {
        op.on_sqlite(&w.conn, now, batch)
    }
}

/// The writer's connection, owned by the writer task on its own thread: each statement is a
/// call into SQLite on that thread, from the connection's cache of prepared statements.
pub(crate) struct SqliteWriter {
    conn: Connection,
    /// Where it was opened from, to open it again ([`Dialect::reopen`]).
    file: SqliteFile,
    /// Told after every commit ([`checkpoint_after_commits`] waits for it).
    commits: Arc<Notify>,
}

/// SQLite reads on a pool.
pub(crate) struct SqliteReads(pub(crate) Arc<ReadPool>);

#[async_trait]
impl Reads for SqliteReads {
    async fn get(&self, queue: &str, id: &str, now: i64) -> Result<Option<Job>> {
        read::get(&self.0, queue, id, now).await
    }
    async fn list(
        &self,
        queue: &str,
        state: JobState,
        offset: u64,
        limit: u64,
        now: i64,
    ) -> Result<Vec<Job>> {
        read::list(&self.0, queue, state, offset, limit, now).await
    }
    async fn search(
        &self,
        queue: &str,
        state: Option<JobState>,
        search: &JobSearch,
        offset: u64,
        limit: u64,
        now: i64,
    ) -> Result<Vec<Job>> {
        read::search(&self.0, queue, state, search, offset, limit, now).await
    }
    async fn counts(&self, queue: &str, now: i64) -> Result<QueueCounts> {
        read::counts(&self.0, queue, now).await
    }
    async fn is_paused(&self, queue: &str) -> Result<bool> {
        read::is_paused(&self.0, queue).await
    }
    async fn history(&self, queue: &str, id: &str, now: i64) -> Result<Option<Vec<JobEvent>>> {
        read::history(&self.0, queue, id, now).await
    }
    async fn ping(&self) -> Result<()> {
        read::ping(&self.0).await
    }
    async fn close(&self) {
        self.0.close();
    }
}
