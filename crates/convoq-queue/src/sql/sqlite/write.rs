//! The SQLite statements behind a job's life from its add to its attempt's end: add, claim,
//! extend, finish, release (`upkeep.rs` has the rest). Each runs inside the writer's open
//! transaction, on the writer's own thread (rusqlite runs a statement on the calling thread,
//! from a cache of prepared statements), and records what to announce after the commit in the
//! [`Batch`].

use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection};

use super::read::{get_on, job_from_row, JOB_COLUMNS};
use super::SqlResult;
use crate::effect::{apply_guarded, SqlConn};
use crate::engine::{ClaimBatch, ClaimedJob, Completion, Outcome};
use crate::error::{ProcessError, QueueError, Result};
use crate::job::Added;
use crate::sql::answers::{self, Ended, Unreadable};
use crate::sql::rules::{
    attempt_failure, keep_columns, new_row, release_events, to_json, AttemptFailure, NewEvent,
    NewRow, ToAdd,
};
use crate::sql::writer::Batch;

/// Rows for a statement that reads them with `json_each(?)`, one JSON array per row (a value
/// that is itself JSON text goes as a string, so that `->>` gives it back exactly): one
/// parameter and one prepared statement for any number of rows, stepped once.
fn json_rows<R: serde::Serialize>(rows: impl Iterator<Item = R>) -> String {
    to_json(&rows.collect::<Vec<R>>())
}

/// The add of a batch in which some jobs are to be held by a local worker (claim on add): they
/// go in `active` under their lease unless their queue is paused. The rows are materialized
/// first: flattened into the insert, each row's `held` (a JSON read and a lookup of its queue)
/// would be evaluated once per column that reads it, five times (`bench/sqlite_floor.py`: 14 µs
/// a job instead of 19-21 in batches of 128). `WHERE true` tells SQLite's parser that
/// `ON CONFLICT` is the upsert clause.
const ADD_HELD: &str = "WITH v AS MATERIALIZED (SELECT value ->> 0 AS queue, value ->> 1 AS id, \
     value ->> 2 AS name, value ->> 3 AS data, value ->> 4 AS opts, value ->> 5 AS priority, \
     value ->> 6 AS run_at, value ->> 7 AS max_attempts, value ->> 8 AS token, \
     value ->> 9 AS expires, value ->> 8 IS NOT NULL AND NOT EXISTS \
       (SELECT 1 FROM cq_queues q WHERE q.name = value ->> 0 AND q.paused = 1) AS held \
     FROM json_each(?2)) \
     INSERT INTO cq_jobs (queue, id, name, data, opts, priority, run_at, max_attempts, \
     created_at, state, lease_token, lease_expires_at, attempts_made, processed_at) \
     SELECT queue, id, name, data, opts, priority, run_at, max_attempts, ?1, \
     CASE WHEN held THEN 'active' ELSE 'waiting' END, \
     CASE WHEN held THEN token END, CASE WHEN held THEN expires END, \
     CASE WHEN held THEN 1 ELSE 0 END, CASE WHEN held THEN ?1 END \
     FROM v WHERE true \
     ON CONFLICT (queue, id) DO NOTHING RETURNING queue, id, state";

/// The add of a batch in which every job waits (no materialized rows: nothing to evaluate
/// twice; bulk adds and adds with no free local worker).
const ADD_WAITING: &str = "INSERT INTO cq_jobs (queue, id, name, data, opts, priority, run_at, \
     max_attempts, created_at, state) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
     value ->> 6, value ->> 7, ?1, 'waiting' FROM json_each(?2) WHERE true \
     ON CONFLICT (queue, id) DO NOTHING RETURNING queue, id, state";

/// Inserts jobs in one statement whatever their number (see [`json_rows`]); a custom id that
/// exists already yields the existing job. A job that brings a lease ([`ToAdd::claim`]) is
/// inserted active under it, unless its queue is paused.
pub(crate) fn add_jobs(
    conn: &Connection,
    jobs: &[ToAdd<'_>],
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<Vec<Added>>> {
    let planned: Vec<NewRow> = jobs.iter().map(|add| new_row(*add, now)).collect();
    let rows = json_rows(planned.iter().map(|r| {
        (
            r.queue,
            &r.id,
            r.name,
            &r.data,
            &r.opts,
            r.priority,
            r.run_at,
            r.max_attempts,
            r.lease.map(|l| l.0),
            r.lease.map(|l| l.1),
        )
    }));
    let held = planned.iter().any(|r| r.lease.is_some());
    let mut insert = conn.prepare_cached(if held { ADD_HELD } else { ADD_WAITING })?;
    let mut fresh: HashMap<(String, String), bool> = insert
        .query_map(params![now, rows], |r| {
            Ok(((r.get(0)?, r.get(1)?), r.get::<_, String>(2)? == "active"))
        })?
        .collect::<SqlResult<_>>()?;
    let mut out = Vec::with_capacity(jobs.len());
    for (add, NewRow { id, run_at, .. }) in jobs.iter().zip(planned) {
        let job = add.job;
        // `remove` so that a custom id listed twice is created once and found once.
        if let Some(held) = fresh.remove(&(job.queue.clone(), id.clone())) {
            out.push(answers::created(job, id, now, run_at, held, batch));
        } else {
            match answers::found(&id, add.owns_its_id(), get_on(conn, &job.queue, &id, now)?) {
                Ok(added) => out.push(added),
                Err(e) => return Ok(Err(e)),
            }
        }
    }
    Ok(Ok(out))
}

/// Claims up to `max` ready jobs of an unpaused queue, under one lease token.
#[allow(clippy::too_many_arguments)]
pub(crate) fn claim(
    conn: &Connection,
    queue: &str,
    max: usize,
    lease_ms: i64,
    token: &str,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<ClaimBatch>> {
    let mut stmt = conn.prepare_cached(&format!(
        "UPDATE cq_jobs SET state = 'active', lease_token = ?1, lease_expires_at = ?2, \
         attempts_made = attempts_made + 1, processed_at = ?3 \
         WHERE seq IN (SELECT seq FROM cq_jobs WHERE queue = ?4 AND state = 'waiting' \
           AND run_at <= ?3 ORDER BY priority, run_at, seq LIMIT ?5) \
         AND NOT EXISTS (SELECT 1 FROM cq_queues WHERE name = ?4 AND paused = 1) \
         RETURNING {JOB_COLUMNS}"
    ))?;
    let rows: Vec<(String, Result<crate::job::Job>)> = stmt
        .query_map(
            params![token, now.saturating_add(lease_ms), now, queue, max as i64],
            |r| Ok((r.get(1)?, job_from_row(r, now, false))),
        )?
        .collect::<SqlResult<_>>()?;
    let (jobs, unreadable) = answers::sort_claimed(queue, token, rows, batch);
    for Unreadable { id, reason } in unreadable {
        conn.prepare_cached(
            "UPDATE cq_jobs SET state = 'failed', failed_reason = ?, finished_at = ?, \
             lease_token = NULL, lease_expires_at = NULL WHERE queue = ? AND id = ?",
        )?
        .execute(params![reason, now, queue, id])?;
    }
    let mut next_due_ms = None;
    if jobs.is_empty() {
        next_due_ms = conn
            .prepare_cached(
                "SELECT MIN(run_at) FROM cq_jobs WHERE queue = ? AND state = 'waiting'",
            )?
            .query_row([queue], |r| r.get::<_, Option<i64>>(0))?;
    }
    Ok(Ok(ClaimBatch { jobs, next_due_ms }))
}

pub(crate) fn extend(
    conn: &Connection,
    queue: &str,
    leases: &[(String, String)],
    lease_ms: i64,
    now: i64,
) -> SqlResult<Result<Vec<bool>>> {
    let mut stmt = conn.prepare_cached(
        "UPDATE cq_jobs SET lease_expires_at = ? \
         WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
    )?;
    let mut held = Vec::with_capacity(leases.len());
    for (id, token) in leases {
        let n = stmt.execute(params![now.saturating_add(lease_ms), queue, id, token])?;
        held.push(n == 1);
    }
    Ok(Ok(held))
}

/// Records events in a job's history.
pub(super) fn insert_events(
    conn: &Connection,
    queue: &str,
    id: &str,
    events: &[NewEvent],
) -> SqlResult<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO cq_job_events (queue, job_id, kind, attempt, at, detail) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )?;
    for e in events {
        insert.execute(params![
            queue,
            id,
            e.kind.as_str(),
            e.attempt as i64,
            e.at,
            e.detail.as_ref().map(to_json)
        ])?;
    }
    Ok(())
}

/// Runs one statement of the writer's transaction control (savepoints), from the cache.
fn control(conn: &Connection, sql: &str) -> SqlResult<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Records the end of an attempt, fenced by the lease token.
pub(crate) async fn finish(
    conn: &mut Connection,
    claimed: &ClaimedJob,
    outcome: &Outcome,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    let job = &claimed.job;
    match outcome {
        Outcome::Completed(c) => {
            if c.effect.is_some() {
                control(conn, "SAVEPOINT effect")?;
            }
            let (keep_count, expire_at) = keep_columns(job.opts.remove_on_complete, now);
            let n = conn
                .prepare_cached(
                    "UPDATE cq_jobs SET state = 'completed', result = ?, finished_at = ?, \
                     lease_token = NULL, lease_expires_at = NULL, keep_count = ?, expire_at = ? \
                     WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
                )?
                .execute(params![
                    to_json(&c.result),
                    now,
                    keep_count,
                    expire_at,
                    job.queue,
                    job.id,
                    claimed.token
                ])?;
            if let Err(lost) = answers::fenced(claimed, n as u64) {
                if c.effect.is_some() {
                    control(conn, "RELEASE effect")?;
                }
                return Ok(Err(lost));
            }
            if let Some(effect) = &c.effect {
                if let Err(e) = apply_guarded(&**effect, SqlConn::Sqlite(&mut *conn), now).await {
                    control(conn, "ROLLBACK TO effect")?;
                    control(conn, "RELEASE effect")?;
                    // The attempt is recorded as failed; the caller learns why.
                    return Ok(fail_attempt(conn, claimed, &e, now, batch)?
                        .and(Err(QueueError::EffectFailed(e))));
                }
                control(conn, "RELEASE effect")?;
            }
            if let Err(e) = add_jobs(
                conn,
                &c.follow_ups.iter().map(ToAdd::from).collect::<Vec<_>>(),
                now,
                batch,
            )? {
                return Ok(Err(e));
            }
            answers::ended(claimed, Ended::Completed, batch);
            Ok(Ok(()))
        }
        Outcome::Failed(e) => fail_attempt(conn, claimed, e, now, batch),
    }
}

/// Completes jobs in one statement whatever their number, fenced per job by its lease token:
/// the rows travel as one JSON parameter (see [`json_rows`]). Answers per job as [`finish`]
/// would; effects and follow-ups are the caller's.
///
/// Unless `exact`, the statement only counts what it completes, and the rare batch in which a
/// job lost its lease answers `None` (the writer applies it again, exactly).
pub(crate) fn complete_plain(
    conn: &Connection,
    jobs: &[(&ClaimedJob, &Completion)],
    now: i64,
    exact: bool,
    batch: &mut Batch,
) -> SqlResult<Option<Vec<Result<()>>>> {
    const COMPLETE: &str = "UPDATE cq_jobs SET state = 'completed', result = v.result, \
        finished_at = ?, lease_token = NULL, lease_expires_at = NULL, \
        keep_count = v.keep_count, expire_at = v.expire_at \
        FROM (SELECT value ->> 0 AS queue, value ->> 1 AS id, value ->> 2 AS token, \
          value ->> 3 AS result, value ->> 4 AS keep_count, value ->> 5 AS expire_at \
          FROM json_each(?)) AS v \
        WHERE cq_jobs.queue = v.queue AND cq_jobs.id = v.id AND cq_jobs.state = 'active' \
        AND cq_jobs.lease_token = v.token";
    let rows = json_rows(jobs.iter().map(|(claimed, completion)| {
        let (keep_count, expire_at) = keep_columns(claimed.job.opts.remove_on_complete, now);
        (
            &claimed.job.queue,
            &claimed.job.id,
            &claimed.token,
            to_json(&completion.result),
            keep_count,
            expire_at,
        )
    }));
    if !exact {
        let counted = conn.prepare_cached(COMPLETE)?.execute(params![now, rows])?;
        if counted != jobs.len() {
            return Ok(None);
        }
        return Ok(Some(answers::completions(jobs, |_, _| true, batch)));
    }
    // Which of the listed completions hold their job's current lease, by their index in the
    // list: a stale holder and the current one of one job may end in the same batch, and only
    // the current one's completion is the job's (SQLite's `RETURNING` cannot name the listed
    // token that matched, so it is read first, in the same transaction).
    let holding: HashSet<usize> = conn
        .prepare_cached(
            "SELECT v.key FROM json_each(?) AS v JOIN cq_jobs \
             ON cq_jobs.queue = v.value ->> 0 AND cq_jobs.id = v.value ->> 1 \
             AND cq_jobs.state = 'active' AND cq_jobs.lease_token = v.value ->> 2",
        )?
        .query_map(params![rows], |r| r.get::<_, i64>(0))?
        .map(|k| k.map(|k| k as usize))
        .collect::<SqlResult<_>>()?;
    conn.prepare_cached(COMPLETE)?.execute(params![now, rows])?;
    // A job listed twice under its current token is completed once: the second answers lease
    // lost.
    let mut completed: HashSet<(&str, &str)> = HashSet::with_capacity(holding.len());
    Ok(Some(answers::completions(
        jobs,
        |i, claimed| {
            holding.contains(&i) && completed.insert((&claimed.job.queue, &claimed.job.id))
        },
        batch,
    )))
}

fn fail_attempt(
    conn: &Connection,
    claimed: &ClaimedJob,
    error: &ProcessError,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    let job = &claimed.job;
    let failure = attempt_failure(claimed, error, now);
    let n = match &failure {
        AttemptFailure::Final {
            reason,
            keep_count,
            expire_at,
        } => conn
            .prepare_cached(
                "UPDATE cq_jobs SET state = 'failed', failed_reason = ?, finished_at = ?, \
                 lease_token = NULL, lease_expires_at = NULL, keep_count = ?, expire_at = ? \
                 WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
            )?
            .execute(params![
                reason,
                now,
                keep_count,
                expire_at,
                job.queue,
                job.id,
                claimed.token
            ])?,
        AttemptFailure::Retry {
            reason,
            run_at,
            events,
        } => {
            let n = conn
                .prepare_cached(
                    "UPDATE cq_jobs SET state = 'waiting', failed_reason = ?, run_at = ?, \
                     lease_token = NULL, lease_expires_at = NULL, processed_at = NULL \
                     WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
                )?
                .execute(params![reason, run_at, job.queue, job.id, claimed.token])?;
            if n == 1 {
                insert_events(conn, &job.queue, &job.id, events)?;
            }
            n
        }
    };
    if let Err(lost) = answers::fenced(claimed, n as u64) {
        return Ok(Err(lost));
    }
    answers::ended(claimed, failure.ended(), batch);
    Ok(Ok(()))
}

/// Gives a job back without counting its attempt.
pub(crate) fn release(
    conn: &Connection,
    claimed: &ClaimedJob,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    let job = &claimed.job;
    let n = conn
        .prepare_cached(
            "UPDATE cq_jobs SET state = 'waiting', run_at = ?, \
             attempts_made = MAX(attempts_made - 1, 0), \
             lease_token = NULL, lease_expires_at = NULL, processed_at = NULL \
             WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
        )?
        .execute(params![now, job.queue, job.id, claimed.token])?;
    if let Err(lost) = answers::fenced(claimed, n as u64) {
        return Ok(Err(lost));
    }
    insert_events(conn, &job.queue, &job.id, &release_events(claimed, now))?;
    answers::ended(claimed, Ended::Released, batch);
    Ok(Ok(()))
}
