//! The Postgres statements of the writer's upkeep and operator writes: taking back stalled jobs,
//! pruning finished ones past their retention, pausing, an operator's retry and removal. Each
//! runs inside one writer's open transaction, as those of `write.rs` do; rows another writer
//! holds are skipped or waited for as each function says.

use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::read::get_on;
use super::write::insert_events;
use super::SqlResult;
use crate::error::Result;
use crate::job::Job;
use crate::sql::answers;
use crate::sql::rules::{
    operator_promote, operator_retry, removable, stall, OperatorRule, PrunePlan, PruneStep,
};
use crate::sql::writer::Batch;

/// Takes back active jobs whose lease expired. Rows another writer holds (a completion racing
/// the expiry) are skipped: if that writer commits, the job is no longer active; if not, the
/// next check takes it.
pub(crate) async fn reap_stalled(
    conn: &mut PgConnection,
    queue: &str,
    max_stalled: u32,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<u64>> {
    let rows = sqlx::query(
        "SELECT id, attempts_made, stalled_count, processed_at, opts FROM cq_jobs \
         WHERE queue = $1 AND state = 'active' AND lease_expires_at < $2 \
         ORDER BY seq FOR UPDATE SKIP LOCKED",
    )
    .bind(queue)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut n = 0;
    for row in rows {
        let id: String = row.try_get(0)?;
        let decided = stall(
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get::<&str, _>(4)?,
            max_stalled,
            now,
        );
        insert_events(conn, queue, &id, &decided.events).await?;
        if let Some((reason, keep_count, expire_at)) = &decided.fails {
            sqlx::query(
                "UPDATE cq_jobs SET state = 'failed', stalled_count = stalled_count + 1, \
                 failed_reason = $1, finished_at = $2, processed_at = NULL, lease_token = NULL, \
                 lease_expires_at = NULL, keep_count = $3, expire_at = $4 \
                 WHERE queue = $5 AND id = $6",
            )
            .bind(reason)
            .bind(now)
            .bind(keep_count)
            .bind(expire_at)
            .bind(queue)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
        } else {
            sqlx::query(
                "UPDATE cq_jobs SET state = 'waiting', stalled_count = stalled_count + 1, \
                 run_at = $1, processed_at = NULL, lease_token = NULL, lease_expires_at = NULL \
                 WHERE queue = $2 AND id = $3",
            )
            .bind(now)
            .bind(queue)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
        }
        decided.note(queue, &id, batch);
        n += 1;
    }
    Ok(Ok(n))
}

/// Removes at most `limit` finished jobs past their retention, with their events, in the
/// set-based statements of a [`PrunePlan`]. Lifetime totals live in `cq_queues` and are not
/// touched.
pub(crate) async fn prune(
    conn: &mut PgConnection,
    queue: &str,
    limit: u64,
    now: i64,
) -> SqlResult<Result<u64>> {
    let mut plan = PrunePlan::new(limit);
    while let Some(step) = plan.next_step() {
        let ids: Vec<String> = match step {
            PruneStep::Expired { limit } => sqlx::query_scalar(
                "DELETE FROM cq_jobs WHERE ctid = ANY(ARRAY(SELECT ctid FROM cq_jobs \
                 WHERE queue = $1 AND state IN ('completed', 'failed') \
                 AND expire_at IS NOT NULL AND expire_at <= $2 LIMIT $3)) RETURNING id",
            )
            .bind(queue)
            .bind(now)
            .bind(limit),
            PruneStep::Newest {
                state,
                window,
                limit,
            } => sqlx::query_scalar(
                "DELETE FROM cq_jobs WHERE ctid = ANY(ARRAY(SELECT ctid FROM (SELECT ctid, \
                 keep_count, ROW_NUMBER() OVER (ORDER BY finished_at DESC, seq DESC) AS rn FROM ( \
                   SELECT ctid, seq, keep_count, finished_at FROM cq_jobs WHERE queue = $1 \
                   AND state = $2 AND state IN ('completed', 'failed') \
                   AND keep_count IS NOT NULL ORDER BY finished_at DESC, seq DESC LIMIT $3) \
                 AS newest) AS ranked WHERE rn > keep_count LIMIT $4)) RETURNING id",
            )
            .bind(queue)
            .bind(state)
            .bind(window)
            .bind(limit),
            PruneStep::All { limit } => sqlx::query_scalar(
                "DELETE FROM cq_jobs WHERE ctid = ANY(ARRAY(SELECT ctid FROM (SELECT ctid, \
                 keep_count, ROW_NUMBER() OVER (PARTITION BY state \
                 ORDER BY finished_at DESC, seq DESC) AS rn FROM cq_jobs WHERE queue = $1 \
                 AND state IN ('completed', 'failed') AND keep_count IS NOT NULL) AS ranked \
                 WHERE rn > keep_count LIMIT $2)) RETURNING id",
            )
            .bind(queue)
            .bind(limit),
        }
        .fetch_all(&mut *conn)
        .await?;
        plan.deleted(ids);
    }
    let removed = plan.removed();
    if !removed.is_empty() {
        sqlx::query("DELETE FROM cq_job_events WHERE queue = $1 AND job_id = ANY($2::text[])")
            .bind(queue)
            .bind(removed)
            .execute(&mut *conn)
            .await?;
    }
    Ok(Ok(removed.len() as u64))
}

/// Pauses or resumes a queue; a resumed queue's ready jobs wake its workers.
pub(crate) async fn set_paused(
    conn: &mut PgConnection,
    queue: &str,
    paused: bool,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    sqlx::query(
        "INSERT INTO cq_queues (name, paused) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
    )
    .bind(queue)
    .bind(paused)
    .execute(conn)
    .await?;
    if !paused {
        batch.wake(queue);
    }
    Ok(Ok(()))
}

pub(crate) async fn retry(
    conn: &mut PgConnection,
    queue: &str,
    id: &str,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<Job>> {
    make_ready(
        conn,
        (queue, id, now),
        operator_retry,
        "UPDATE cq_jobs SET state = 'waiting', attempts_made = 0, stalled_count = 0, run_at = $1, \
         processed_at = NULL, finished_at = NULL, result = NULL, keep_count = NULL, expire_at = NULL \
         WHERE queue = $2 AND id = $3",
        batch,
    )
    .await
}

pub(crate) async fn promote(
    conn: &mut PgConnection,
    queue: &str,
    id: &str,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<Job>> {
    make_ready(
        conn,
        (queue, id, now),
        operator_promote,
        "UPDATE cq_jobs SET run_at = $1 WHERE queue = $2 AND id = $3",
        batch,
    )
    .await
}

/// An operator's step that makes job `id` ready (a retry, a promotion): `rule` says what it
/// records or why it is refused, `update` (parameters: now, queue, id) changes the row. The row
/// is locked first, so that two operators' steps do not both record events.
async fn make_ready(
    conn: &mut PgConnection,
    (queue, id, now): (&str, &str, i64),
    rule: OperatorRule,
    update: &str,
    batch: &mut Batch,
) -> SqlResult<Result<Job>> {
    sqlx::query("SELECT 1 FROM cq_jobs WHERE queue = $1 AND id = $2 FOR UPDATE")
        .bind(queue)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let job = match get_on(&mut *conn, queue, id, now).await? {
        Ok(j) => j,
        Err(e) => return Ok(Err(e)),
    };
    let events = match rule(job.as_ref(), queue, id, now) {
        Ok(events) => events,
        Err(e) => return Ok(Err(e)),
    };
    insert_events(conn, queue, id, &events).await?;
    sqlx::query(update)
        .bind(now)
        .bind(queue)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let read = get_on(conn, queue, id, now).await?;
    Ok(answers::retried(queue, id, read, batch))
}

pub(crate) async fn remove(
    conn: &mut PgConnection,
    queue: &str,
    id: &str,
    batch: &mut Batch,
) -> SqlResult<Result<bool>> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM cq_jobs WHERE queue = $1 AND id = $2 FOR UPDATE")
            .bind(queue)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    match removable(state.as_deref(), id) {
        Ok(true) => {}
        other => return Ok(other),
    }
    sqlx::query("DELETE FROM cq_jobs WHERE queue = $1 AND id = $2")
        .bind(queue)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM cq_job_events WHERE queue = $1 AND job_id = $2")
        .bind(queue)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    batch.changed(queue, id);
    Ok(Ok(true))
}
