//! Postgres reads: jobs, listings, counts, pause flags and histories (rows become [`Job`]s by
//! the shared rule in `sql/rules.rs`).
//!
//! Reads derive `delayed` from the database's clock too: `now` is the engine clock's reading
//! moved by the database's measured lead (see `DbClock`).

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Row;

use super::schema::map_err;
use super::SqlResult;
use crate::error::Result;
use crate::events::JobEvent;
use crate::job::{Job, JobSearch, JobState, QueueCounts};
use crate::sql::history::{self, EventRow};

pub(crate) use crate::sql::rules::{job_from_row, JOB_COLUMNS};
use crate::sql::rules::{listing, Rows, Tally, ANY_STATE_ORDER};

/// Reads one job inside the writer's transaction, at the batch's `now`.
pub(crate) async fn get_on(
    conn: &mut PgConnection,
    queue: &str,
    id: &str,
    now: i64,
) -> SqlResult<Result<Option<Job>>> {
    let sql = format!(
        "SELECT {JOB_COLUMNS}, COALESCE((SELECT paused FROM cq_queues WHERE name = cq_jobs.queue), FALSE) \
         FROM cq_jobs WHERE queue = $1 AND id = $2"
    );
    let row = sqlx::query(&sql)
        .bind(queue)
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(match row {
        None => Ok(None),
        Some(row) => {
            let paused: bool = row.try_get(16)?;
            job_from_row(&row, now, paused).map(Some)
        }
    })
}

pub(crate) async fn get(pool: &PgPool, queue: &str, id: &str, now: i64) -> Result<Option<Job>> {
    let mut conn = pool.acquire().await.map_err(map_err)?;
    get_on(&mut conn, queue, id, now).await.map_err(map_err)?
}

pub(crate) async fn is_paused(pool: &PgPool, queue: &str) -> Result<bool> {
    let paused: Option<bool> = sqlx::query_scalar("SELECT paused FROM cq_queues WHERE name = $1")
        .bind(queue)
        .fetch_optional(pool)
        .await
        .map_err(map_err)?;
    Ok(paused.unwrap_or(false))
}

pub(crate) async fn list(
    pool: &PgPool,
    queue: &str,
    state: JobState,
    offset: u64,
    limit: u64,
    now: i64,
) -> Result<Vec<Job>> {
    select(pool, queue, Some(state), None, offset, limit, now).await
}

pub(crate) async fn search(
    pool: &PgPool,
    queue: &str,
    state: Option<JobState>,
    search: &JobSearch,
    offset: u64,
    limit: u64,
    now: i64,
) -> Result<Vec<Job>> {
    select(pool, queue, state, Some(search), offset, limit, now).await
}

/// A listing of one state (or of every state, newest first), narrowed by `search` if given:
/// its text in the id, data or failure reason (ignoring case), its field's value in the data.
async fn select(
    pool: &PgPool,
    queue: &str,
    state: Option<JobState>,
    search: Option<&JobSearch>,
    offset: u64,
    limit: u64,
    now: i64,
) -> Result<Vec<Job>> {
    let paused = is_paused(pool, queue).await?;
    let (rows, order) = match state {
        Some(state) => match listing(state, paused) {
            Some(found) => found,
            None => return Ok(Vec::new()),
        },
        None => (Rows::Any, ANY_STATE_ORDER),
    };
    let filter = match rows {
        Rows::Ready => "state = 'waiting' AND run_at <= $2",
        Rows::Later => "state = 'waiting' AND run_at > $2",
        Rows::State("active") => "state = 'active' AND $2::int8 IS NOT NULL",
        Rows::State("completed") => "state = 'completed' AND $2::int8 IS NOT NULL",
        Rows::State(_) => "state = 'failed' AND $2::int8 IS NOT NULL",
        Rows::Any => "$2::int8 IS NOT NULL",
    };
    let matching = match search {
        Some(s) => format!(
            "AND ($5::text IS NULL OR strpos(lower(id || ' ' || data || ' ' || COALESCE(failed_reason, '')), $5) > 0) \
             AND ($6::text IS NULL OR (data::jsonb ->> $6) = $7) {}",
            if s.stalled { "AND stalled_count > 0 " } else { "" }
        ),
        None => String::new(),
    };
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM cq_jobs WHERE queue = $1 AND {filter} {matching}\
         ORDER BY {order} LIMIT $3 OFFSET $4"
    );
    let mut query = sqlx::query(&sql)
        .bind(queue)
        .bind(now)
        .bind(limit.min(i64::MAX as u64) as i64)
        .bind(offset.min(i64::MAX as u64) as i64);
    if let Some(search) = search {
        let (key, value) = search.field.clone().unzip();
        query = query
            .bind(search.text.as_ref().map(|t| t.to_lowercase()))
            .bind(key)
            .bind(value);
    }
    let rows = query.fetch_all(pool).await.map_err(map_err)?;
    rows.iter().map(|r| job_from_row(r, now, paused)).collect()
}

pub(crate) async fn counts(pool: &PgPool, queue: &str, now: i64) -> Result<QueueCounts> {
    let rows = sqlx::query(
        "SELECT state, run_at > $1 AS later, COUNT(*) FROM cq_jobs WHERE queue = $2 GROUP BY 1, 2",
    )
    .bind(now)
    .bind(queue)
    .fetch_all(pool)
    .await
    .map_err(map_err)?;
    // The pause flag, and the lifetime totals summed over their shards (schema step 5).
    let q = sqlx::query(
        "SELECT COALESCE((SELECT paused FROM cq_queues WHERE name = $1), FALSE), \
         COALESCE(SUM(completed_total), 0)::int8, COALESCE(SUM(failed_total), 0)::int8 \
         FROM cq_queue_totals WHERE name = $1",
    )
    .bind(queue)
    .fetch_one(pool)
    .await
    .map_err(map_err)?;
    let mut t = Tally {
        paused: q.try_get::<bool, _>(0).map_err(map_err)?,
        completed_total: q.try_get::<i64, _>(1).map_err(map_err)?.max(0) as u64,
        failed_total: q.try_get::<i64, _>(2).map_err(map_err)?.max(0) as u64,
        ..Tally::default()
    };
    for r in rows {
        let state: String = r.try_get(0).map_err(map_err)?;
        let later: bool = r.try_get(1).map_err(map_err)?;
        let n = r.try_get::<i64, _>(2).map_err(map_err)?.max(0) as u64;
        match (state.as_str(), later) {
            ("waiting", true) => t.later += n,
            ("waiting", false) => t.ready += n,
            ("active", _) => t.active += n,
            ("completed", _) => t.completed += n,
            ("failed", _) => t.failed += n,
            _ => {}
        }
    }
    Ok(t.counts())
}

/// A job's history, readable from any process: its row and its event rows in one snapshot.
pub(crate) async fn history(
    pool: &PgPool,
    queue: &str,
    id: &str,
    now: i64,
) -> Result<Option<Vec<JobEvent>>> {
    let mut conn = pool.acquire().await.map_err(map_err)?;
    // One repeatable-read transaction, so that the row and its events are one snapshot.
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    let job = get_on(&mut conn, queue, id, now).await;
    let events = sqlx::query(
        "SELECT kind, attempt, at, detail FROM cq_job_events WHERE queue = $1 AND job_id = $2 ORDER BY idx",
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
        stored.push(EventRow::from_columns(
            r.try_get(0).map_err(map_err)?,
            r.try_get(1).map_err(map_err)?,
            r.try_get(2).map_err(map_err)?,
            r.try_get(3).map_err(map_err)?,
        ));
    }
    Ok(Some(history::rebuild(&job, &stored)))
}

pub(crate) async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map_err(map_err)
        .map(drop)
}
