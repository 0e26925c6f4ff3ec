//! The Postgres schema (the same numbered steps as SQLite's, recorded in `cq_schema`), error
//! mapping, and transaction control (a batch's `BEGIN` is sent with its clock reading, in
//! `mod.rs`).
//!
//! Version 1 is the same tables as SQLite's version 1: `BIGINT` for milliseconds and counters,
//! `TEXT` for JSON payloads (so that the row mapping is the same as SQLite's), a `BIGSERIAL`
//! `seq`, and `BOOLEAN` for the pause flag. A new step is added to both dialects together, with
//! the same number.

use sqlx::postgres::PgConnection;

use super::SqlResult;
use crate::error::{QueueError, Result};
use crate::sql::writer::Batch;

/// The schema, one step per version, in step with SQLite's.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE cq_jobs (
    seq BIGSERIAL PRIMARY KEY,
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    opts TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('waiting', 'active', 'completed', 'failed')),
    priority BIGINT NOT NULL DEFAULT 0,
    run_at BIGINT NOT NULL,
    attempts_made BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    stalled_count BIGINT NOT NULL DEFAULT 0,
    lease_token TEXT,
    lease_expires_at BIGINT,
    result TEXT,
    failed_reason TEXT,
    created_at BIGINT NOT NULL,
    processed_at BIGINT,
    finished_at BIGINT,
    keep_count BIGINT,
    expire_at BIGINT,
    UNIQUE (queue, id)
);
CREATE INDEX cq_jobs_ready ON cq_jobs (queue, priority, run_at, seq) WHERE state = 'waiting';
CREATE INDEX cq_jobs_leases ON cq_jobs (queue, lease_expires_at) WHERE state = 'active';
CREATE INDEX cq_jobs_finished ON cq_jobs (queue, state, finished_at)
    WHERE state IN ('completed', 'failed');
CREATE TABLE cq_job_events (
    idx BIGSERIAL PRIMARY KEY,
    queue TEXT NOT NULL,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    at BIGINT NOT NULL,
    detail TEXT
);
CREATE INDEX cq_job_events_job ON cq_job_events (queue, job_id, idx);
CREATE TABLE cq_queues (
    name TEXT PRIMARY KEY,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    completed_total BIGINT NOT NULL DEFAULT 0,
    failed_total BIGINT NOT NULL DEFAULT 0
);
"#,
    // SQLite's step 2 puts `state` in its ready index to make it covering; Postgres needs no
    // such change, and keeps the step so that versions mean the same on both.
    r#"
SELECT 1;
"#,
    // Finished jobs past their age, found without reading every finished job (retention runs
    // every second).
    r#"
CREATE INDEX cq_jobs_expiry ON cq_jobs (queue, expire_at) WHERE expire_at IS NOT NULL;
"#,
    // Every version of a job's row had an entry in two unique indexes, `seq` and
    // `(queue, id)`, and a job has three versions (added, claimed, finished): the `seq` index
    // goes, and `(queue, id)` becomes the primary key. Writes that found rows by `seq` find
    // them by their physical address (`ctid`) within the statement.
    r#"
ALTER TABLE cq_jobs DROP CONSTRAINT cq_jobs_pkey, DROP CONSTRAINT cq_jobs_queue_id_key,
    ADD CONSTRAINT cq_jobs_pkey PRIMARY KEY (queue, id);
"#,
    // A queue's lifetime totals were one row that every completing transaction updated, so
    // writers (of every process) waited for each other's commits on it (`Lock:transactionid`
    // in `pg_stat_activity` under load). They are now spread over rows per shard, each writer
    // adding to its own; a read sums them.
    r#"
CREATE TABLE cq_queue_totals (
    name TEXT NOT NULL,
    shard INTEGER NOT NULL,
    completed_total BIGINT NOT NULL DEFAULT 0,
    failed_total BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (name, shard)
);
INSERT INTO cq_queue_totals (name, shard, completed_total, failed_total)
    SELECT name, 0, completed_total, failed_total FROM cq_queues;
UPDATE cq_queues SET completed_total = 0, failed_total = 0;
"#,
];

/// How many rows a queue's lifetime totals are spread over (see step 5): writers pick theirs
/// at random, so that two of them rarely share one.
pub(crate) const TOTAL_SHARDS: u32 = 32;

/// The advisory lock that serialises migrations of one database ("cq_schem" in ASCII).
const MIGRATION_LOCK: i64 = 0x6371_5f73_6368_656d;

/// The notification channel on which writers announce queues with newly ready jobs; the payload
/// is the queue's name.
pub(crate) const CHANNEL: &str = "convoq_jobs";

/// Whether a SQLSTATE is a transient condition: connection exceptions (`08`), insufficient
/// resources (`53`), operator intervention (`57`: admin shutdown, cancelled statement such as a
/// statement timeout), serialization failures and deadlocks (`40001`, `40P01`), lock timeouts
/// (`55P03`).
fn transient_code(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || matches!(code, "40001" | "40P01" | "55P03")
}

/// Maps a driver error to the crate's error. Connection, I/O, pool and server conditions are
/// transient; decoding problems and data exceptions (`22`) mean corrupt data.
pub(crate) fn map_err(e: sqlx::Error) -> QueueError {
    match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            QueueError::Corrupt(e.to_string())
        }
        sqlx::Error::Configuration(_) => QueueError::Invalid(e.to_string()),
        sqlx::Error::Database(ref db) => match db.code() {
            Some(code) if transient_code(&code) => QueueError::Unavailable(e.to_string()),
            Some(code) if code.starts_with("22") => QueueError::Corrupt(e.to_string()),
            _ => QueueError::Unavailable(e.to_string()),
        },
        // Io, Tls, Protocol, PoolTimedOut, PoolClosed, WorkerCrashed and the rest.
        other => QueueError::Unavailable(other.to_string()),
    }
}

/// Brings the schema up to date. An advisory transaction lock serialises processes that start
/// together, so that the steps run once.
pub(crate) async fn migrate(conn: &mut PgConnection) -> Result<()> {
    match migrate_steps(conn).await {
        Ok(r) => r,
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            Err(map_err(e))
        }
    }
}

async fn migrate_steps(conn: &mut PgConnection) -> SqlResult<Result<()>> {
    sqlx::query("BEGIN").execute(&mut *conn).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS cq_schema (version BIGINT NOT NULL)")
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
        sqlx::query("INSERT INTO cq_schema (version) VALUES ($1)")
            .bind(i as i64 + 1)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(Ok(()))
}

/// Adds the batch's lifetime totals to the writer's `shard` and commits (the queues it woke are
/// announced after the commit: see `notify.rs`).
///
/// Totals are added in queue-name order so that two writers on one shard never lock its rows
/// in opposite orders.
pub(crate) async fn commit(conn: &mut PgConnection, batch: &Batch, shard: i32) -> SqlResult<()> {
    let mut totals: Vec<_> = batch.totals.iter().collect();
    totals.sort_by(|a, b| a.0.cmp(b.0));
    if !totals.is_empty() {
        let names: Vec<&str> = totals.iter().map(|(q, _)| q.as_str()).collect();
        let completed: Vec<i64> = totals.iter().map(|(_, t)| t.0).collect();
        let failed: Vec<i64> = totals.iter().map(|(_, t)| t.1).collect();
        sqlx::query(
            "INSERT INTO cq_queue_totals (name, shard, completed_total, failed_total) \
             SELECT t.name, $4, t.completed, t.failed \
             FROM unnest($1::text[], $2::int8[], $3::int8[]) AS t(name, completed, failed) \
             ON CONFLICT (name, shard) DO UPDATE SET \
             completed_total = cq_queue_totals.completed_total + excluded.completed_total, \
             failed_total = cq_queue_totals.failed_total + excluded.failed_total",
        )
        .bind(&names)
        .bind(&completed)
        .bind(&failed)
        .bind(shard)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query("COMMIT").execute(conn).await.map(drop)
}

pub(crate) async fn rollback(conn: &mut PgConnection) -> SqlResult<()> {
    sqlx::query("ROLLBACK").execute(conn).await.map(drop)
}
