//! The SQLite schema (numbered steps recorded in `cq_schema`) and transaction control.
//!
//! Jobs are rows of `cq_jobs`. The stored `state` is one of `waiting`, `active`, `completed`,
//! `failed`; `delayed` (a waiting job whose `run_at` is in the future) and `paused` (a waiting
//! job of a paused queue) are derived when read, so that no timer has to promote delayed jobs.
//! `cq_job_events` keeps the parts of a job's history that its row no longer shows (earlier
//! attempts); `cq_queues` keeps pause flags and lifetime totals that survive pruning.

use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, SqliteConnection};

use super::SqlResult;
use crate::error::{QueueError, Result};
use crate::sql::writer::Batch;

/// The schema, one step per version. A database records the steps it has in `cq_schema`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE cq_jobs (
    seq INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    opts TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('waiting', 'active', 'completed', 'failed')),
    priority INTEGER NOT NULL DEFAULT 0,
    run_at INTEGER NOT NULL,
    attempts_made INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    stalled_count INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT,
    lease_expires_at INTEGER,
    result TEXT,
    failed_reason TEXT,
    created_at INTEGER NOT NULL,
    processed_at INTEGER,
    finished_at INTEGER,
    keep_count INTEGER,
    expire_at INTEGER,
    UNIQUE (queue, id)
);
CREATE INDEX cq_jobs_ready ON cq_jobs (queue, priority, run_at, seq) WHERE state = 'waiting';
CREATE INDEX cq_jobs_leases ON cq_jobs (queue, lease_expires_at) WHERE state = 'active';
CREATE INDEX cq_jobs_finished ON cq_jobs (queue, state, finished_at)
    WHERE state IN ('completed', 'failed');
CREATE TABLE cq_job_events (
    idx INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX cq_job_events_job ON cq_job_events (queue, job_id, idx);
CREATE TABLE cq_queues (
    name TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    completed_total INTEGER NOT NULL DEFAULT 0,
    failed_total INTEGER NOT NULL DEFAULT 0
);
"#,
    // `state` in the ready index's columns makes it a covering index for the claim's subquery
    // and the waiting counts (SQLite does not count a partial index's condition as covered).
    r#"
DROP INDEX cq_jobs_ready;
CREATE INDEX cq_jobs_ready ON cq_jobs (queue, state, priority, run_at, seq) WHERE state = 'waiting';
"#,
    // Finished jobs past their age, found without reading every finished job (retention runs
    // every second).
    r#"
CREATE INDEX cq_jobs_expiry ON cq_jobs (queue, expire_at) WHERE expire_at IS NOT NULL;
"#,
    // Postgres's step 4 drops its `seq` index; SQLite's `seq` is the rowid, which costs no
    // index of its own. The step is kept so that versions mean the same on both.
    r#"
SELECT 1;
"#,
];

/// Maps a driver error to the crate's error. Busy, locked, full and I/O conditions are
/// transient; decoding problems mean corrupt data.
pub(crate) fn map_err(e: sqlx::Error) -> QueueError {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            QueueError::Corrupt(e.to_string())
        }
        sqlx::Error::Configuration(_) => QueueError::Invalid(e.to_string()),
        other => QueueError::Unavailable(other.to_string()),
    }
}

/// Opens the writer connection and brings the schema up to date, under the write lock so that
/// processes starting together migrate once. Processes that open a new file together race to
/// switch it to WAL mode, and SQLite answers the loser "database is locked" at once rather than
/// through the busy timeout: so a busy answer is retried, for up to `busy_timeout`.
pub(crate) async fn open_writer(
    opts: &SqliteConnectOptions,
    busy_timeout: Duration,
) -> Result<SqliteConnection> {
    match crate::sql::retry_while_busy(busy_timeout, || open_once(opts)).await {
        Ok(r) => r,
        Err(e) => Err(map_err(e)),
    }
}

async fn open_once(opts: &SqliteConnectOptions) -> SqlResult<Result<SqliteConnection>> {
    let mut conn = opts.connect().await?;
    match migrate_steps(&mut conn).await {
        Ok(r) => Ok(r.map(|()| conn)),
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut conn).await;
            Err(e)
        }
    }
}

async fn migrate_steps(conn: &mut SqliteConnection) -> SqlResult<Result<()>> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS cq_schema (version INTEGER NOT NULL)")
        .execute(&mut *conn)
        .await?;
    let have: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM cq_schema")
        .fetch_one(&mut *conn)
        .await?;
    let have = have.unwrap_or(0) as usize;
    if have > MIGRATIONS.len() {
        sqlx::query("ROLLBACK").execute(&mut *conn).await?;
        return Ok(Err(QueueError::Invalid(format!(
            "the database's queue schema is version {have}, newer than this build knows ({}); upgrade convoq",
            MIGRATIONS.len()
        ))));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(have) {
        for statement in step.split(';').filter(|s| !s.trim().is_empty()) {
            sqlx::query(statement).execute(&mut *conn).await?;
        }
        sqlx::query("INSERT INTO cq_schema (version) VALUES (?)")
            .bind(i as i64 + 1)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(Ok(()))
}

/// Opens a write transaction, as a prefix of a batch's first statement.
pub(crate) const BEGIN: &str = "BEGIN IMMEDIATE; ";

pub(crate) async fn begin(conn: &mut SqliteConnection) -> SqlResult<()> {
    sqlx::query("BEGIN IMMEDIATE").execute(conn).await.map(drop)
}

/// Adds the batch's lifetime totals and commits, in one request to SQLite's thread (after
/// `begin`, the transaction's opening if no statement has opened it).
pub(crate) async fn commit(
    conn: &mut SqliteConnection,
    begin: &str,
    batch: &Batch,
) -> SqlResult<()> {
    const TOTALS: &str = "INSERT INTO cq_queues (name, completed_total, failed_total) \
        VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET \
        completed_total = completed_total + excluded.completed_total, \
        failed_total = failed_total + excluded.failed_total;";
    let mut sql = String::from(begin);
    sql.push_str(&TOTALS.repeat(batch.totals.len()));
    sql.push_str("COMMIT");
    let mut q = sqlx::query(&sql);
    for (queue, (completed, failed)) in &batch.totals {
        q = q.bind(queue).bind(completed).bind(failed);
    }
    q.execute(conn).await.map(drop)
}

pub(crate) async fn rollback(conn: &mut SqliteConnection) -> SqlResult<()> {
    sqlx::query("ROLLBACK").execute(conn).await.map(drop)
}
