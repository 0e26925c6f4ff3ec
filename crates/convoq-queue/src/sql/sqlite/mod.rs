//! The SQLite dialect of the SQL engine: `schema.rs` (tables and transaction control),
//! `write.rs` (the writer's statements), `read.rs` (reads and row mapping).
//!
//! SQLite allows one writer at a time, so the engine runs one writer connection (with group
//! commit) and a small pool of read connections; WAL mode lets reads proceed during writes.

mod read;
mod schema;
mod write;

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};

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

/// Opens the writer connection (migrating the schema) and the read pool.
pub(crate) async fn open(config: &SqlConfig) -> Result<(SqliteConnection, SqliteReads)> {
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
    let mut writer = schema::open_writer(opts.clone()).await?;
    schema::migrate(&mut writer).await?;
    // Lazy: read connections open on first use, with the same settings but SQLite's default
    // page cache (2 MB): a reader's cache is dropped whenever the writer commits, so a large
    // one buys nothing under load and costs resident memory per connection.
    let opts = opts.pragma("cache_size", "-2000");
    let pool = SqlitePoolOptions::new()
        .max_connections(config.read_connections.max(1))
        .min_connections(0)
        .acquire_timeout(config.busy_timeout)
        .connect_lazy_with(opts);
    Ok((writer, SqliteReads(pool)))
}

#[async_trait]
impl Dialect for Sqlite {
    type Conn = SqliteConnection;

    fn map_err(&self, e: sqlx::Error) -> QueueError {
        schema::map_err(e)
    }
    async fn now_ms(&self, _conn: &mut SqliteConnection, clock: &dyn Clock) -> SqlResult<i64> {
        Ok(clock.now_ms())
    }
    async fn begin(&self, conn: &mut SqliteConnection) -> SqlResult<()> {
        schema::begin(conn).await
    }
    async fn commit(&self, conn: &mut SqliteConnection, batch: &Batch) -> SqlResult<()> {
        schema::commit(conn, batch).await
    }
    async fn rollback(&self, conn: &mut SqliteConnection) -> SqlResult<()> {
        schema::rollback(conn).await
    }
    async fn close(&self, conn: SqliteConnection) {
        let _ = conn.close().await;
    }
    async fn add_jobs(
        &self,
        conn: &mut SqliteConnection,
        jobs: &[NewJob],
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<Vec<Added>>> {
        write::add_jobs(conn, jobs, now, batch).await
    }
    async fn claim(
        &self,
        conn: &mut SqliteConnection,
        queue: &str,
        max: usize,
        lease_ms: i64,
        token: &str,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<ClaimBatch>> {
        write::claim(conn, queue, max, lease_ms, token, now, batch).await
    }
    async fn extend(
        &self,
        conn: &mut SqliteConnection,
        queue: &str,
        leases: &[(String, String)],
        lease_ms: i64,
        now: i64,
    ) -> SqlResult<Result<Vec<bool>>> {
        write::extend(conn, queue, leases, lease_ms, now).await
    }
    async fn finish(
        &self,
        conn: &mut SqliteConnection,
        job: &ClaimedJob,
        outcome: &Outcome,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<()>> {
        write::finish(conn, job, outcome, now, batch).await
    }
    async fn complete_plain(
        &self,
        conn: &mut SqliteConnection,
        jobs: &[(&ClaimedJob, &Completion)],
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Vec<Result<()>>> {
        write::complete_plain(conn, jobs, now, batch).await
    }
    fn effect_conn<'a>(&self, conn: &'a mut SqliteConnection) -> SqlResult<SqlConn<'a>> {
        Ok(SqlConn::Sqlite(conn))
    }
    async fn release(
        &self,
        conn: &mut SqliteConnection,
        job: &ClaimedJob,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<()>> {
        write::release(conn, job, now, batch).await
    }
    async fn reap_stalled(
        &self,
        conn: &mut SqliteConnection,
        queue: &str,
        max_stalled: u32,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<u64>> {
        write::reap_stalled(conn, queue, max_stalled, now, batch).await
    }
    async fn prune(
        &self,
        conn: &mut SqliteConnection,
        queue: &str,
        limit: u64,
        now: i64,
    ) -> SqlResult<Result<u64>> {
        write::prune(conn, queue, limit, now).await
    }
    async fn set_paused(
        &self,
        conn: &mut SqliteConnection,
        queue: &str,
        paused: bool,
    ) -> SqlResult<Result<()>> {
        write::set_paused(conn, queue, paused).await
    }
    async fn retry(
        &self,
        conn: &mut SqliteConnection,
        queue: &str,
        id: &str,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<Job>> {
        write::retry(conn, queue, id, now, batch).await
    }
    async fn remove(
        &self,
        conn: &mut SqliteConnection,
        queue: &str,
        id: &str,
        batch: &mut Batch,
    ) -> SqlResult<Result<bool>> {
        write::remove(conn, queue, id, batch).await
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
