//! The SQLite dialect of the SQL engine: `schema.rs` (tables and transaction control),
//! `write.rs` (the writer's statements), `read.rs` (reads and row mapping).
//!
//! SQLite allows one writer at a time, so the engine runs one writer connection (with group
//! commit) and a small pool of read connections; WAL mode lets reads proceed during writes.
//!
//! Checkpoints (copying committed pages from the WAL into the database file) run beside the
//! writer, on a read connection, after its commits ([`checkpoint_after_commits`]). SQLite would
//! otherwise run each one inside the commit that takes the WAL past 1,000 pages, on the writer's
//! thread, and every caller waiting for the writer (a POST's add) would wait for it too.

mod read;
mod schema;
mod write;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub(crate) use super::dialect::SqlResult;
use super::dialect::{Dialect, Reads};
use super::writer::Batch;
use super::{Durability, SqlConfig};
use crate::clock::Clock;
use crate::engine::{ClaimBatch, ClaimedJob, Completion, Outcome};
use crate::error::{QueueError, Result};
use crate::events::JobEvent;
use crate::job::{Added, Job, JobState, NewJob, QueueCounts};
use crate::sql::effect::SqlConn;

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
    pool: SqlitePool,
    commits: Arc<Notify>,
}

impl Checkpoints {
    pub(crate) fn spawn(self) -> JoinHandle<()> {
        tokio::spawn(checkpoint_after_commits(self.pool, self.commits))
    }
}

/// Opens the writer connection (migrating the schema) and the read pool.
pub(crate) async fn open(config: &SqlConfig) -> Result<Opened> {
    let opts = SqliteConnectOptions::from_str(&config.url)
        .map_err(|e| QueueError::Invalid(format!("bad SQLite URL: {e}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match config.durability {
            Durability::Normal => SqliteSynchronous::Normal,
            Durability::Full => SqliteSynchronous::Full,
            Durability::Off => SqliteSynchronous::Off,
        })
        .busy_timeout(config.busy_timeout)
        .foreign_keys(true)
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-16000");
    let writer = schema::open_writer(&opts, config.busy_timeout).await?;
    // Lazy: read connections open on first use, with the same settings but SQLite's default
    // page cache (2 MB): a reader's cache is dropped whenever the writer commits, so a large
    // one buys nothing under load and costs resident memory per connection.
    let opts = opts.pragma("cache_size", "-2000");
    let pool = SqlitePoolOptions::new()
        .max_connections(config.read_connections.max(1))
        .min_connections(0)
        .acquire_timeout(config.busy_timeout)
        .connect_lazy_with(opts);
    let commits = Arc::new(Notify::new());
    Ok(Opened {
        writer: SqliteWriter::new(writer, commits.clone()),
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
async fn checkpoint_after_commits(pool: SqlitePool, commits: Arc<Notify>) {
    let mut failing = false;
    loop {
        commits.notified().await;
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            Ok(_) => failing = false,
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

    fn map_err(&self, e: sqlx::Error) -> QueueError {
        schema::map_err(e)
    }
    /// The one writer carries every write, and a commit (no sync in WAL mode at the default
    /// durability) costs little beside a batch of claims and completions.
    fn adds_first(&self) -> bool {
        true
    }
    /// sqlx runs each SQLite connection on a thread of its own; the writer is a chain of
    /// hand-offs to it, a dozen per batch.
    fn own_thread(&self) -> bool {
        true
    }
    async fn now_ms(&self, _w: &mut SqliteWriter, clock: &dyn Clock) -> SqlResult<i64> {
        Ok(clock.now_ms())
    }
    async fn begin(&self, w: &mut SqliteWriter) -> SqlResult<()> {
        w.begin_pending = true;
        Ok(())
    }
    async fn commit(&self, w: &mut SqliteWriter, batch: &Batch) -> SqlResult<()> {
        let (begin, conn) = w.with_begin();
        schema::commit(conn, begin, batch).await?;
        w.commits.notify_one();
        Ok(())
    }
    async fn rollback(&self, w: &mut SqliteWriter) -> SqlResult<()> {
        if std::mem::take(&mut w.begin_pending) {
            return Ok(());
        }
        schema::rollback(&mut w.conn).await
    }
    async fn close(&self, w: SqliteWriter) {
        let _ = w.conn.close().await;
    }
    async fn add_jobs(
        &self,
        w: &mut SqliteWriter,
        jobs: &[&NewJob],
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<Vec<Added>>> {
        let (begin, conn) = w.with_begin();
        write::add_jobs(conn, begin, jobs, now, batch).await
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
        let (begin, conn) = w.with_begin();
        write::claim(conn, begin, queue, max, lease_ms, token, now, batch).await
    }
    async fn extend(
        &self,
        w: &mut SqliteWriter,
        queue: &str,
        leases: &[(String, String)],
        lease_ms: i64,
        now: i64,
    ) -> SqlResult<Result<Vec<bool>>> {
        write::extend(w.begun().await?, queue, leases, lease_ms, now).await
    }
    async fn finish(
        &self,
        w: &mut SqliteWriter,
        job: &ClaimedJob,
        outcome: &Outcome,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<()>> {
        write::finish(w.begun().await?, job, outcome, now, batch).await
    }
    async fn complete_plain(
        &self,
        w: &mut SqliteWriter,
        jobs: &[(&ClaimedJob, &Completion)],
        now: i64,
        exact: bool,
        batch: &mut Batch,
    ) -> SqlResult<Option<Vec<Result<()>>>> {
        let (begin, conn) = w.with_begin();
        write::complete_plain(conn, begin, jobs, now, exact, batch).await
    }
    fn effect_conn<'a>(&self, w: &'a mut SqliteWriter) -> SqlResult<SqlConn<'a>> {
        if w.begin_pending {
            // The writer applies effects after the completions' statement, which opened the
            // transaction; an effect must never run outside it.
            return Err(sqlx::Error::Protocol(
                "an effect was about to run outside the batch's transaction".into(),
            ));
        }
        Ok(SqlConn::Sqlite(&mut w.conn))
    }
    async fn release(
        &self,
        w: &mut SqliteWriter,
        job: &ClaimedJob,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<()>> {
        write::release(w.begun().await?, job, now, batch).await
    }
    async fn reap_stalled(
        &self,
        w: &mut SqliteWriter,
        queue: &str,
        max_stalled: u32,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<u64>> {
        write::reap_stalled(w.begun().await?, queue, max_stalled, now, batch).await
    }
    async fn prune(
        &self,
        w: &mut SqliteWriter,
        queue: &str,
        limit: u64,
        now: i64,
    ) -> SqlResult<Result<u64>> {
        write::prune(w.begun().await?, queue, limit, now).await
    }
    async fn set_paused(
        &self,
        w: &mut SqliteWriter,
        queue: &str,
        paused: bool,
    ) -> SqlResult<Result<()>> {
        write::set_paused(w.begun().await?, queue, paused).await
    }
    async fn retry(
        &self,
        w: &mut SqliteWriter,
        queue: &str,
        id: &str,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<Job>> {
        write::retry(w.begun().await?, queue, id, now, batch).await
    }
    async fn remove(
        &self,
        w: &mut SqliteWriter,
        queue: &str,
        id: &str,
        batch: &mut Batch,
    ) -> SqlResult<Result<bool>> {
        write::remove(w.begun().await?, queue, id, batch).await
    }
}

/// The writer's connection. Each request to SQLite's thread is a round trip between threads,
/// which costs more than most statements: so the batch's `BEGIN IMMEDIATE` is held back and
/// sent with its first statement, and its totals with its `COMMIT`. These ride on the SQLite
/// driver's multi-statement queries (one request, binds spread over the statements in order).
pub(crate) struct SqliteWriter {
    conn: SqliteConnection,
    /// The batch's transaction is to be opened by the next statement.
    begin_pending: bool,
    /// Told after every commit ([`checkpoint_after_commits`] waits for it).
    commits: Arc<Notify>,
}

impl SqliteWriter {
    fn new(conn: SqliteConnection, commits: Arc<Notify>) -> Self {
        SqliteWriter {
            conn,
            begin_pending: false,
            commits,
        }
    }

    /// The connection, inside the batch's transaction.
    async fn begun(&mut self) -> SqlResult<&mut SqliteConnection> {
        if std::mem::take(&mut self.begin_pending) {
            schema::begin(&mut self.conn).await?;
        }
        Ok(&mut self.conn)
    }

    /// What the next statement must start with to open the batch's transaction (nothing once
    /// it is open), and the connection to send it on.
    fn with_begin(&mut self) -> (&'static str, &mut SqliteConnection) {
        let begin = if std::mem::take(&mut self.begin_pending) {
            schema::BEGIN
        } else {
            ""
        };
        (begin, &mut self.conn)
    }
}

/// SQLite reads on a pool.
pub(crate) struct SqliteReads(pub(crate) SqlitePool);

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
        self.0.close().await;
    }
}
