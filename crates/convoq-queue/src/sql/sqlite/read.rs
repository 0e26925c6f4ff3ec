//! SQLite reads: jobs, listings, counts, pause flags and histories, and the row mapping that
//! turns a stored row into a [`Job`] (or a [`QueueError::Corrupt`], never a panic).

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::schema::map_err;
use super::SqlResult;
use crate::clock::ms_to_datetime;
use crate::error::{QueueError, Result};
use crate::events::JobEvent;
use crate::job::{Job, JobOptions, JobState, QueueCounts};
use crate::sql::history::{self, EventRow};

/// The columns a [`Job`] is read from, in [`job_from_row`]'s order.
pub(crate) const JOB_COLUMNS: &str = "queue, id, name, data, opts, state, run_at, attempts_made, \
    stalled_count, result, failed_reason, created_at, processed_at, finished_at";

pub(crate) fn job_from_row(row: &SqliteRow, now: i64, paused: bool) -> Result<Job> {
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        QueueError::Corrupt(format!("{what} of a stored job: {e}"))
    };
    let get_i64 = |i: usize| -> Result<Option<i64>> {
        row.try_get::<Option<i64>, _>(i)
            .map_err(|e| corrupt("a timestamp or counter", &e))
    };
    let text = |i: usize| -> Result<Option<String>> {
        row.try_get::<Option<String>, _>(i)
            .map_err(|e| corrupt("a text column", &e))
    };
    let id = text(1)?.unwrap_or_default();
    let data: serde_json::Value = serde_json::from_str(&text(3)?.unwrap_or_default())
        .map_err(|e| corrupt(&format!("the payload of job {id}"), &e))?;
    let opts: JobOptions = serde_json::from_str(&text(4)?.unwrap_or_default())
        .map_err(|e| corrupt(&format!("the options of job {id}"), &e))?;
    let run_at = get_i64(6)?.unwrap_or(0);
    let state = match text(5)?.as_deref() {
        Some("waiting") if run_at > now => JobState::Delayed,
        Some("waiting") if paused => JobState::Paused,
        Some("waiting") => JobState::Waiting,
        Some("active") => JobState::Active,
        Some("completed") => JobState::Completed,
        Some("failed") => JobState::Failed,
        other => {
            return Err(corrupt(
                &format!("the state of job {id}"),
                &format!("{other:?}"),
            ))
        }
    };
    let result = match text(9)? {
        Some(r) => Some(
            serde_json::from_str(&r)
                .map_err(|e| corrupt(&format!("the result of job {id}"), &e))?,
        ),
        None => None,
    };
    Ok(Job {
        queue: text(0)?.unwrap_or_default(),
        name: text(2)?.unwrap_or_default(),
        data,
        opts,
        state,
        attempts_made: get_i64(7)?.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        stalled_count: get_i64(8)?.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        result,
        failed_reason: text(10)?,
        created_at: ms_to_datetime(get_i64(11)?.unwrap_or(0)),
        available_at: ms_to_datetime(run_at),
        processed_at: get_i64(12)?.map(ms_to_datetime),
        finished_at: get_i64(13)?.map(ms_to_datetime),
        id,
    })
}

pub(crate) async fn get_on(
    conn: &mut SqliteConnection,
    queue: &str,
    id: &str,
    now: i64,
) -> SqlResult<Result<Option<Job>>> {
    let sql = format!(
        "SELECT {JOB_COLUMNS}, COALESCE((SELECT paused FROM cq_queues WHERE name = cq_jobs.queue), 0) \
         FROM cq_jobs WHERE queue = ? AND id = ?"
    );
    let row = sqlx::query(&sql)
        .bind(queue)
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(match row {
        None => Ok(None),
        Some(row) => {
            let paused: i64 = row.try_get(14)?;
            job_from_row(&row, now, paused != 0).map(Some)
        }
    })
}

pub(crate) async fn get(pool: &SqlitePool, queue: &str, id: &str, now: i64) -> Result<Option<Job>> {
    let mut conn = pool.acquire().await.map_err(map_err)?;
    get_on(&mut conn, queue, id, now).await.map_err(map_err)?
}

pub(crate) async fn is_paused(pool: &SqlitePool, queue: &str) -> Result<bool> {
    let paused: Option<i64> = sqlx::query_scalar("SELECT paused FROM cq_queues WHERE name = ?")
        .bind(queue)
        .fetch_optional(pool)
        .await
        .map_err(map_err)?;
    Ok(paused.unwrap_or(0) != 0)
}

pub(crate) async fn list(
    pool: &SqlitePool,
    queue: &str,
    state: JobState,
    offset: u64,
    limit: u64,
    now: i64,
) -> Result<Vec<Job>> {
    let paused = is_paused(pool, queue).await?;
    let (filter, order) = match state {
        JobState::Waiting if paused => return Ok(Vec::new()),
        JobState::Paused if !paused => return Ok(Vec::new()),
        JobState::Waiting | JobState::Paused => (
            "state = 'waiting' AND run_at <= ?2",
            "priority, run_at, seq",
        ),
        JobState::Delayed => ("state = 'waiting' AND run_at > ?2", "run_at, seq"),
        JobState::Active => ("state = 'active' AND ?2 = ?2", "processed_at, seq"),
        JobState::Completed => (
            "state = 'completed' AND ?2 = ?2",
            "finished_at DESC, seq DESC",
        ),
        JobState::Failed => ("state = 'failed' AND ?2 = ?2", "finished_at DESC, seq DESC"),
    };
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM cq_jobs WHERE queue = ?1 AND {filter} \
         ORDER BY {order} LIMIT ?3 OFFSET ?4"
    );
    let rows = sqlx::query(&sql)
        .bind(queue)
        .bind(now)
        .bind(limit.min(i64::MAX as u64) as i64)
        .bind(offset.min(i64::MAX as u64) as i64)
        .fetch_all(pool)
        .await
        .map_err(map_err)?;
    rows.iter().map(|r| job_from_row(r, now, paused)).collect()
}

pub(crate) async fn counts(pool: &SqlitePool, queue: &str, now: i64) -> Result<QueueCounts> {
    // One subquery per state, each answered from its partial index alone (the finished ones
    // repeat that index's condition, which is how SQLite sees that it applies).
    let row = sqlx::query(
        "SELECT \
         (SELECT COUNT(*) FROM cq_jobs WHERE queue = ?1 AND state = 'waiting'), \
         (SELECT COUNT(*) FROM cq_jobs WHERE queue = ?1 AND state = 'waiting' AND run_at > ?2), \
         (SELECT COUNT(*) FROM cq_jobs WHERE queue = ?1 AND state = 'active'), \
         (SELECT COUNT(*) FROM cq_jobs WHERE queue = ?1 \
         AND state IN ('completed', 'failed') AND state = 'completed'), \
         (SELECT COUNT(*) FROM cq_jobs WHERE queue = ?1 \
         AND state IN ('completed', 'failed') AND state = 'failed'), \
         (SELECT paused FROM cq_queues WHERE name = ?1), \
         (SELECT completed_total FROM cq_queues WHERE name = ?1), \
         (SELECT failed_total FROM cq_queues WHERE name = ?1)",
    )
    .bind(queue)
    .bind(now)
    .fetch_one(pool)
    .await
    .map_err(map_err)?;
    let get = |i: usize| -> Result<u64> {
        let v: Option<i64> = row.try_get(i).map_err(map_err)?;
        Ok(v.unwrap_or(0).max(0) as u64)
    };
    let (waiting, delayed) = (get(0)?, get(1)?);
    let ready = waiting.saturating_sub(delayed);
    let paused = get(5)? != 0;
    Ok(QueueCounts {
        waiting: if paused { 0 } else { ready },
        paused: if paused { ready } else { 0 },
        delayed,
        active: get(2)?,
        completed: get(3)?,
        failed: get(4)?,
        completed_total: get(6)?,
        failed_total: get(7)?,
    })
}

pub(crate) async fn history(
    pool: &SqlitePool,
    queue: &str,
    id: &str,
    now: i64,
) -> Result<Option<Vec<JobEvent>>> {
    let mut conn = pool.acquire().await.map_err(map_err)?;
    // One read transaction, so that the row and its events are one snapshot.
    sqlx::query("BEGIN")
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    let job = get_on(&mut conn, queue, id, now).await;
    let events = sqlx::query(
        "SELECT kind, attempt, at, detail FROM cq_job_events WHERE queue = ? AND job_id = ? ORDER BY idx",
    )
    .bind(queue)
    .bind(id)
    .fetch_all(&mut *conn)
    .await;
    let _ = sqlx::query("COMMIT").execute(&mut *conn).await;
    let Some(job) = job.map_err(map_err)?? else {
        return Ok(None);
    };
    let mut stored = Vec::new();
    for r in events.map_err(map_err)? {
        let detail: Option<String> = r.try_get(3).map_err(map_err)?;
        stored.push(EventRow {
            kind: r.try_get(0).map_err(map_err)?,
            attempt: r.try_get::<i64, _>(1).map_err(map_err)?.max(0) as u32,
            at: r.try_get(2).map_err(map_err)?,
            detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
        });
    }
    Ok(Some(history::rebuild(&job, &stored)))
}

pub(crate) async fn ping(pool: &SqlitePool) -> Result<()> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map_err(map_err)
        .map(drop)
}
