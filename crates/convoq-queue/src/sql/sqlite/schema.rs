//! The SQLite schema (numbered steps recorded in `cq_schema`) and transaction control.
//!
//! Jobs are rows of `cq_jobs`. The stored `state` is one of `waiting`, `active`, `completed`,
//! `failed`; `delayed` (a waiting job whose `run_at` is in the future) and `paused` (a waiting
//! job of a paused queue) are derived when read, so that no timer has to promote delayed jobs.
//! `cq_job_events` keeps the parts of a job's history that its row no longer shows (earlier
//! attempts); `cq_queues` keeps pause flags and lifetime totals that survive pruning.

use rusqlite::{Connection, ErrorCode};

use super::conn::{retry_while_busy, SqliteFile};
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
    // Postgres's step 5 spreads a queue's lifetime totals over rows per writer; SQLite has one
    // writer, and keeps them in `cq_queues`. Kept so that versions mean the same on both.
    r#"
SELECT 1;
"#,
];

/// Maps a driver error to the crate's error. Values that do not read as their column's type
/// mean corrupt data; a bad path or a database that is not SQLite's is the configuration's
/// fault; busy, locked, full and I/O conditions are transient.
pub(crate) fn map_err(e: rusqlite::Error) -> QueueError {
    use rusqlite::Error as E;
    match &e {
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::InvalidColumnType(..)
        | E::Utf8Error(..) => QueueError::Corrupt(e.to_string()),
        E::InvalidPath(_) => QueueError::Invalid(e.to_string()),
        _ if matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::NotADatabase | ErrorCode::CannotOpen)
        ) =>
        {
            QueueError::Invalid(e.to_string())
        }
        _ if e.sqlite_error_code() == Some(ErrorCode::DatabaseCorrupt) => {
            QueueError::Corrupt(e.to_string())
        }
        _ => QueueError::Unavailable(e.to_string()),
    }
}

/// Opens the writer connection and brings the schema up to date, under the write lock so that
/// processes starting together migrate once. Processes that open a new file together race to
/// switch it to WAL mode, and SQLite answers the loser "database is locked" at once rather than
/// through the busy timeout: so a busy answer is retried, for up to the busy timeout. Blocks
/// the calling thread.
pub(crate) fn open_writer(file: &SqliteFile) -> Result<Connection> {
    match retry_while_busy(file.busy_timeout_value(), || open_once(file)) {
        Ok(r) => r,
        Err(e) => Err(map_err(e)),
    }
}

fn open_once(file: &SqliteFile) -> SqlResult<Result<Connection>> {
    let conn = file.open()?;
    match migrate_steps(&conn) {
        Ok(r) => Ok(r.map(|()| conn)),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn migrate_steps(conn: &Connection) -> SqlResult<Result<()>> {
    conn.execute_batch(
        "BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS cq_schema (version INTEGER NOT NULL)",
    )?;
    let have: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM cq_schema", [], |r| r.get(0))?;
    let have = have.unwrap_or(0) as usize;
    if have > MIGRATIONS.len() {
        conn.execute_batch("ROLLBACK")?;
        return Ok(Err(QueueError::Invalid(format!(
            "the database's queue schema is version {have}, newer than this build knows ({}); upgrade convoq",
            MIGRATIONS.len()
        ))));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(have) {
        conn.execute_batch(step)?;
        conn.execute("INSERT INTO cq_schema (version) VALUES (?)", [i as i64 + 1])?;
    }
    conn.execute_batch("COMMIT")?;
    Ok(Ok(()))
}

pub(crate) fn begin(conn: &Connection) -> SqlResult<()> {
    conn.prepare_cached("BEGIN IMMEDIATE")?
        .execute([])
        .map(drop)
}

/// Adds the batch's lifetime totals and commits.
pub(crate) fn commit(conn: &Connection, batch: &Batch) -> SqlResult<()> {
    if !batch.totals.is_empty() {
        let mut totals = conn.prepare_cached(
            "INSERT INTO cq_queues (name, completed_total, failed_total) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET \
             completed_total = completed_total + excluded.completed_total, \
             failed_total = failed_total + excluded.failed_total",
        )?;
        for (queue, (completed, failed)) in &batch.totals {
            totals.execute(rusqlite::params![queue, completed, failed])?;
        }
    }
    conn.prepare_cached("COMMIT")?.execute([]).map(drop)
}

pub(crate) fn rollback(conn: &Connection) -> SqlResult<()> {
    conn.execute_batch("ROLLBACK")
}
