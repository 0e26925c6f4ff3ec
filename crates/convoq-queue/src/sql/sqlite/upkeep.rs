//! The SQLite statements of the writer's upkeep and operator writes: taking back stalled jobs,
//! pruning finished ones past their retention, pausing, an operator's retry and removal. Each
//! runs inside the writer's open transaction, as those of `write.rs` do.

use rusqlite::{params, Connection, OptionalExtension};

use super::read::get_on;
use super::write::insert_events;
use super::SqlResult;
use crate::error::Result;
use crate::job::Job;
use crate::sql::answers;
use crate::sql::rules::{
    operator_promote, operator_retry, removable, stall, to_json, OperatorRule, PrunePlan, PruneStep,
};
use crate::sql::writer::Batch;

/// Takes back active jobs whose lease expired.
pub(crate) fn reap_stalled(
    conn: &Connection,
    queue: &str,
    max_stalled: u32,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<u64>> {
    let expired: Vec<(String, i64, i64, Option<i64>, String)> = conn
        .prepare_cached(
            "SELECT id, attempts_made, stalled_count, processed_at, opts FROM cq_jobs \
             WHERE queue = ? AND state = 'active' AND lease_expires_at < ?",
        )?
        .query_map(params![queue, now], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<SqlResult<_>>()?;
    let mut n = 0;
    for (id, attempt, stalled, started, opts) in expired {
        let decided = stall(attempt, stalled, started, &opts, max_stalled, now);
        insert_events(conn, queue, &id, &decided.events)?;
        if let Some((reason, keep_count, expire_at)) = &decided.fails {
            conn.prepare_cached(
                "UPDATE cq_jobs SET state = 'failed', stalled_count = stalled_count + 1, \
                 failed_reason = ?, finished_at = ?, processed_at = NULL, lease_token = NULL, \
                 lease_expires_at = NULL, keep_count = ?, expire_at = ? WHERE queue = ? AND id = ?",
            )?
            .execute(params![reason, now, keep_count, expire_at, queue, id])?;
        } else {
            conn.prepare_cached(
                "UPDATE cq_jobs SET state = 'waiting', stalled_count = stalled_count + 1, \
                 run_at = ?, processed_at = NULL, lease_token = NULL, lease_expires_at = NULL \
                 WHERE queue = ? AND id = ?",
            )?
            .execute(params![now, queue, id])?;
        }
        decided.note(queue, &id, batch);
        n += 1;
    }
    Ok(Ok(n))
}

/// Runs a `DELETE … RETURNING id` and gives the ids.
fn deleted_ids(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> SqlResult<Vec<String>> {
    conn.prepare_cached(sql)?
        .query_map(params, |r| r.get(0))?
        .collect()
}

/// Removes at most `limit` finished jobs past their retention, with their events, in the
/// set-based statements of a [`PrunePlan`]. Lifetime totals live in `cq_queues` and are not
/// touched.
pub(crate) fn prune(
    conn: &Connection,
    queue: &str,
    limit: u64,
    now: i64,
) -> SqlResult<Result<u64>> {
    let mut plan = PrunePlan::new(limit);
    while let Some(step) = plan.next_step() {
        let ids = match step {
            PruneStep::Expired { limit } => deleted_ids(
                conn,
                "DELETE FROM cq_jobs WHERE seq IN (SELECT seq FROM cq_jobs WHERE queue = ?1 \
                 AND state IN ('completed', 'failed') AND expire_at IS NOT NULL \
                 AND expire_at <= ?2 LIMIT ?3) RETURNING id",
                params![queue, now, limit],
            )?,
            PruneStep::Newest {
                state,
                window,
                limit,
            } => deleted_ids(
                conn,
                "DELETE FROM cq_jobs WHERE seq IN (SELECT seq FROM (SELECT seq, keep_count, \
                 ROW_NUMBER() OVER (ORDER BY finished_at DESC, seq DESC) AS rn FROM ( \
                   SELECT seq, keep_count, finished_at FROM cq_jobs WHERE queue = ?1 \
                   AND state = ?2 AND state IN ('completed', 'failed') \
                   AND keep_count IS NOT NULL ORDER BY finished_at DESC, seq DESC LIMIT ?3)) \
                 WHERE rn > keep_count LIMIT ?4) RETURNING id",
                params![queue, state, window, limit],
            )?,
            PruneStep::All { limit } => deleted_ids(
                conn,
                "DELETE FROM cq_jobs WHERE seq IN (SELECT seq FROM (SELECT seq, keep_count, \
                 ROW_NUMBER() OVER (PARTITION BY state ORDER BY finished_at DESC, seq DESC) \
                 AS rn FROM cq_jobs WHERE queue = ?1 AND state IN ('completed', 'failed') \
                 AND keep_count IS NOT NULL) WHERE rn > keep_count LIMIT ?2) RETURNING id",
                params![queue, limit],
            )?,
        };
        plan.deleted(ids);
    }
    let removed = plan.removed();
    if !removed.is_empty() {
        conn.prepare_cached(
            "DELETE FROM cq_job_events WHERE queue = ?1 \
             AND job_id IN (SELECT value FROM json_each(?2))",
        )?
        .execute(params![queue, to_json(&removed)])?;
    }
    Ok(Ok(removed.len() as u64))
}

/// Pauses or resumes a queue; a resumed queue's ready jobs wake its workers.
pub(crate) fn set_paused(
    conn: &Connection,
    queue: &str,
    paused: bool,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    conn.prepare_cached(
        "INSERT INTO cq_queues (name, paused) VALUES (?, ?) \
         ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
    )?
    .execute(params![queue, paused as i64])?;
    if !paused {
        batch.wake(queue);
    }
    Ok(Ok(()))
}

pub(crate) fn retry(
    conn: &Connection,
    queue: &str,
    id: &str,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<Job>> {
    make_ready(
        conn,
        (queue, id, now),
        operator_retry,
        "UPDATE cq_jobs SET state = 'waiting', attempts_made = 0, stalled_count = 0, run_at = ?, \
         processed_at = NULL, finished_at = NULL, result = NULL, keep_count = NULL, expire_at = NULL \
         WHERE queue = ? AND id = ?",
        batch,
    )
}

pub(crate) fn promote(
    conn: &Connection,
    queue: &str,
    id: &str,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<Job>> {
    make_ready(
        conn,
        (queue, id, now),
        operator_promote,
        "UPDATE cq_jobs SET run_at = ? WHERE queue = ? AND id = ?",
        batch,
    )
}

/// An operator's step that makes job `id` ready (a retry, a promotion): `rule` says what it
/// records or why it is refused, `update` (parameters: now, queue, id) changes the row.
fn make_ready(
    conn: &Connection,
    (queue, id, now): (&str, &str, i64),
    rule: OperatorRule,
    update: &str,
    batch: &mut Batch,
) -> SqlResult<Result<Job>> {
    let job = match get_on(conn, queue, id, now)? {
        Ok(j) => j,
        Err(e) => return Ok(Err(e)),
    };
    let events = match rule(job.as_ref(), queue, id, now) {
        Ok(events) => events,
        Err(e) => return Ok(Err(e)),
    };
    insert_events(conn, queue, id, &events)?;
    conn.prepare_cached(update)?
        .execute(params![now, queue, id])?;
    Ok(answers::retried(
        queue,
        id,
        get_on(conn, queue, id, now)?,
        batch,
    ))
}

pub(crate) fn remove(
    conn: &Connection,
    queue: &str,
    id: &str,
    batch: &mut Batch,
) -> SqlResult<Result<bool>> {
    let state: Option<String> = conn
        .prepare_cached("SELECT state FROM cq_jobs WHERE queue = ? AND id = ?")?
        .query_row(params![queue, id], |r| r.get(0))
        .optional()?;
    match removable(state.as_deref(), id) {
        Ok(true) => {}
        other => return Ok(other),
    }
    conn.prepare_cached("DELETE FROM cq_jobs WHERE queue = ? AND id = ?")?
        .execute(params![queue, id])?;
    conn.prepare_cached("DELETE FROM cq_job_events WHERE queue = ? AND job_id = ?")?
        .execute(params![queue, id])?;
    batch.changed(queue, id);
    Ok(Ok(true))
}
