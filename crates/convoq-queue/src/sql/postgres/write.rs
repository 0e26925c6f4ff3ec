//! The Postgres statements behind a job's life from its add to its attempt's end: add, claim,
//! extend, finish, release (`upkeep.rs` has the rest). Each runs inside one writer's open
//! transaction and records what to announce after the commit in the [`Batch`].
//!
//! Several writers run at once, each in its own transaction, so the statements that pick rows
//! (claim, reap) lock them with `FOR UPDATE SKIP LOCKED`: two writers never pick the same row,
//! and never wait for each other to do so. Every change to an active job is fenced by its lease
//! token in the statement's `WHERE`, which Postgres re-checks on the latest row version.

use std::collections::HashMap;

use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::read::{get_on, job_from_row, JOB_COLUMNS};
use super::SqlResult;
use crate::effect::{apply_guarded, SqlConn};
use crate::engine::{ClaimBatch, ClaimedJob, Completion, Outcome};
use crate::error::{ProcessError, QueueError, Result};
use crate::job::Added;
use crate::sql::answers::{self, Ended, Unreadable};
use crate::sql::rules::{
    attempt_failure, keep_columns, new_row, release_events, to_json, AttemptFailure, NewEvent,
    ToAdd,
};
use crate::sql::writer::Batch;

/// Inserts jobs; a custom id that exists already yields the existing job. A job that brings a
/// lease ([`ToAdd::claim`]) is inserted active under it, unless its queue is paused.
///
/// One statement for the whole list (`unnest`), returning the ids it inserted; the jobs it did
/// not insert (their custom id exists, or appeared earlier in the list) are read back. A custom
/// id being inserted by another writer's open transaction waits for that transaction, then
/// conflicts, as on SQLite.
pub(crate) async fn add_jobs(
    conn: &mut PgConnection,
    jobs: &[ToAdd<'_>],
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<Vec<Added>>> {
    if jobs.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let n = jobs.len();
    let mut queues = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    let mut datas = Vec::with_capacity(n);
    let mut optss = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut expiries = Vec::with_capacity(n);
    for row in jobs.iter().map(|add| new_row(*add, now)) {
        queues.push(row.queue);
        ids.push(row.id);
        names.push(row.name);
        datas.push(row.data);
        optss.push(row.opts);
        priorities.push(row.priority);
        run_ats.push(row.run_at);
        max_attempts.push(row.max_attempts);
        tokens.push(row.lease.map(|l| l.0));
        expiries.push(row.lease.map(|l| l.1));
    }
    // `WITH ORDINALITY` keeps the list's order in `seq`, so that FIFO follows the order added.
    let inserted: Vec<(String, String, String)> = sqlx::query_as(
        "INSERT INTO cq_jobs (queue, id, name, data, opts, state, priority, run_at, \
         max_attempts, created_at, lease_token, lease_expires_at, attempts_made, processed_at) \
         SELECT v.queue, v.id, v.name, v.data, v.opts, \
         CASE WHEN v.held THEN 'active' ELSE 'waiting' END, v.priority, v.run_at, \
         v.max_attempts, $9, CASE WHEN v.held THEN v.token END, \
         CASE WHEN v.held THEN v.expires END, CASE WHEN v.held THEN 1 ELSE 0 END, \
         CASE WHEN v.held THEN $9 END \
         FROM (SELECT u.*, u.token IS NOT NULL AND NOT EXISTS \
               (SELECT 1 FROM cq_queues q WHERE q.name = u.queue AND q.paused) AS held \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::int8[], $7::int8[], $8::int8[], $10::text[], $11::int8[]) WITH ORDINALITY \
             AS u(queue, id, name, data, opts, priority, run_at, max_attempts, token, expires, \
             ord)) v \
         ORDER BY v.ord \
         ON CONFLICT (queue, id) DO NOTHING RETURNING queue, id, state",
    )
    .bind(&queues)
    .bind(&ids)
    .bind(&names)
    .bind(&datas)
    .bind(&optss)
    .bind(&priorities)
    .bind(&run_ats)
    .bind(&max_attempts)
    .bind(now)
    .bind(&tokens)
    .bind(&expiries)
    .fetch_all(&mut *conn)
    .await?;
    // Per (queue, id): how many of the list's entries the statement inserted, and whether held.
    let mut fresh: HashMap<(String, String), (usize, bool)> =
        HashMap::with_capacity(inserted.len());
    for (queue, id, state) in inserted {
        let entry = fresh.entry((queue, id)).or_default();
        entry.0 += 1;
        entry.1 = state == "active";
    }
    let mut out = Vec::with_capacity(n);
    for (i, add) in jobs.iter().enumerate() {
        let job = add.job;
        let id = &ids[i];
        let created = match fresh.get_mut(&(job.queue.clone(), id.clone())) {
            Some((left, held)) if *left > 0 => {
                *left -= 1;
                Some(*held)
            }
            _ => None,
        };
        if let Some(held) = created {
            out.push(answers::created(
                job,
                id.clone(),
                now,
                run_ats[i],
                held,
                batch,
            ));
        } else {
            match answers::found(
                id,
                add.owns_its_id(),
                get_on(&mut *conn, &job.queue, id, now).await?,
            ) {
                Ok(added) => out.push(added),
                Err(e) => return Ok(Err(e)),
            }
        }
    }
    Ok(Ok(out))
}

/// Claims up to `max` ready jobs of an unpaused queue, under one lease token. Rows locked by
/// another writer's claim are skipped, not waited for.
pub(crate) async fn claim(
    conn: &mut PgConnection,
    queue: &str,
    max: usize,
    lease_ms: i64,
    token: &str,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<ClaimBatch>> {
    let sql = format!(
        "WITH claimed AS (UPDATE cq_jobs SET state = 'active', lease_token = $1, \
           lease_expires_at = $2, attempts_made = attempts_made + 1, processed_at = $3 \
           WHERE ctid = ANY(ARRAY(SELECT ctid FROM cq_jobs WHERE queue = $4 \
             AND state = 'waiting' AND run_at <= $3 \
             AND NOT EXISTS (SELECT 1 FROM cq_queues WHERE name = $4 AND paused) \
             ORDER BY priority, run_at, seq LIMIT $5 FOR UPDATE SKIP LOCKED)) \
           RETURNING {JOB_COLUMNS}, cq_jobs.priority, cq_jobs.seq) \
         SELECT * FROM claimed ORDER BY priority, run_at, seq"
    );
    let rows = sqlx::query(&sql)
        .bind(token)
        .bind(now.saturating_add(lease_ms))
        .bind(now)
        .bind(queue)
        .bind(max.min(i64::MAX as usize) as i64)
        .fetch_all(&mut *conn)
        .await?;
    let mut read = Vec::with_capacity(rows.len());
    for row in &rows {
        read.push((row.try_get::<String, _>(1)?, job_from_row(row, now, false)));
    }
    let (jobs, unreadable) = answers::sort_claimed(queue, token, read, batch);
    for Unreadable { id, reason } in unreadable {
        sqlx::query(
            "UPDATE cq_jobs SET state = 'failed', failed_reason = $1, finished_at = $2, \
             lease_token = NULL, lease_expires_at = NULL WHERE queue = $3 AND id = $4",
        )
        .bind(reason)
        .bind(now)
        .bind(queue)
        .bind(&id)
        .execute(&mut *conn)
        .await?;
    }
    let mut next_due_ms = None;
    if jobs.is_empty() {
        next_due_ms = sqlx::query_scalar::<_, Option<i64>>(
            "SELECT MIN(run_at) FROM cq_jobs WHERE queue = $1 AND state = 'waiting'",
        )
        .bind(queue)
        .fetch_one(&mut *conn)
        .await?;
    }
    Ok(Ok(ClaimBatch { jobs, next_due_ms }))
}

/// Extends leases, in one statement; a lease is held if its (id, token) pair still matches.
pub(crate) async fn extend(
    conn: &mut PgConnection,
    queue: &str,
    leases: &[(String, String)],
    lease_ms: i64,
    now: i64,
) -> SqlResult<Result<Vec<bool>>> {
    if leases.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let ids: Vec<&str> = leases.iter().map(|(id, _)| id.as_str()).collect();
    let tokens: Vec<&str> = leases.iter().map(|(_, t)| t.as_str()).collect();
    // A renewal never waits for a row another transaction holds: it renews the rows it can
    // lock (`SKIP LOCKED`) and leaves the others for the next renewal, a third of a lease
    // later. Waiting is how a renewal and another writer's batched completion, each holding
    // rows the other wanted, deadlocked until Postgres broke the tie a second later. A lease
    // counts as held if the job's last committed version says so (a row being completed
    // meanwhile ends the attempt anyway; a row whose lease lapsed and is being reaped is
    // reported lost at the next renewal). The lock re-checks `ctid` on the row's latest
    // version, so a row that changed since this statement's snapshot is neither locked nor
    // renewed. `state || ''`: see `complete_plain`.
    let held: Vec<(String, String)> = sqlx::query_as(
        "WITH held AS (SELECT j.ctid AS row_id, j.id, j.lease_token FROM cq_jobs AS j \
           JOIN unnest($3::text[], $4::text[]) AS v(id, token) \
           ON j.id = v.id AND j.lease_token = v.token \
           WHERE j.queue = $2 AND j.state || '' = 'active'), \
         renewed AS (UPDATE cq_jobs SET lease_expires_at = $1 \
           WHERE ctid = ANY(ARRAY(SELECT ctid FROM cq_jobs \
             WHERE ctid = ANY(ARRAY(SELECT row_id FROM held)) FOR UPDATE SKIP LOCKED))) \
         SELECT id, lease_token FROM held",
    )
    .bind(now.saturating_add(lease_ms))
    .bind(queue)
    .bind(&ids)
    .bind(&tokens)
    .fetch_all(&mut *conn)
    .await?;
    let held: std::collections::HashSet<(String, String)> = held.into_iter().collect();
    Ok(Ok(leases.iter().map(|l| held.contains(l)).collect()))
}

/// Records events in a job's history.
pub(super) async fn insert_events(
    conn: &mut PgConnection,
    queue: &str,
    id: &str,
    events: &[NewEvent],
) -> SqlResult<()> {
    for e in events {
        sqlx::query(
            "INSERT INTO cq_job_events (queue, job_id, kind, attempt, at, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(queue)
        .bind(id)
        .bind(e.kind.as_str())
        .bind(e.attempt as i64)
        .bind(e.at)
        .bind(e.detail.as_ref().map(to_json))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Completes jobs whose completions carry no effect and no follow-ups, in one statement, each
/// fenced by its lease token.
pub(crate) async fn complete_plain(
    conn: &mut PgConnection,
    jobs: &[(&ClaimedJob, &Completion)],
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Vec<Result<()>>> {
    let n = jobs.len();
    let mut queues = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut results = Vec::with_capacity(n);
    let mut keep_counts = Vec::with_capacity(n);
    let mut expire_ats = Vec::with_capacity(n);
    for (claimed, completion) in jobs {
        let (keep_count, expire_at) = keep_columns(claimed.job.opts.remove_on_complete, now);
        queues.push(claimed.job.queue.as_str());
        ids.push(claimed.job.id.as_str());
        tokens.push(claimed.token.as_str());
        results.push(to_json(&completion.result));
        keep_counts.push(keep_count);
        expire_ats.push(expire_at);
    }
    // `state || ''` is `state` to every reader but the planner, which can no longer match it
    // to the partial lease index (`WHERE state = 'active'`): a bitmap scan of that index visits
    // every dead row version of the queue's finished jobs (vacuum lags far behind a busy
    // queue, and bitmap scans do not mark dead index entries), where the unique (queue, id)
    // index finds each row directly. It was a fifth of Postgres's CPU in a profile under load.
    let done: Vec<(String, String, String)> = sqlx::query_as(
        "UPDATE cq_jobs AS j SET state = 'completed', result = v.result, finished_at = $1, \
         lease_token = NULL, lease_expires_at = NULL, keep_count = v.keep_count, \
         expire_at = v.expire_at \
         FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[]) \
         AS v(queue, id, token, result, keep_count, expire_at) \
         WHERE j.queue = v.queue AND j.id = v.id AND j.state || '' = 'active' \
         AND j.lease_token = v.token \
         RETURNING j.queue, j.id, v.token",
    )
    .bind(now)
    .bind(&queues)
    .bind(&ids)
    .bind(&tokens)
    .bind(&results)
    .bind(&keep_counts)
    .bind(&expire_ats)
    .fetch_all(&mut *conn)
    .await?;
    // A job listed twice with one token is completed once: the second answers lease lost.
    let mut left: HashMap<(String, String, String), usize> = HashMap::with_capacity(done.len());
    for key in done {
        *left.entry(key).or_default() += 1;
    }
    Ok(answers::completions(
        jobs,
        |_, claimed| {
            let key = (
                claimed.job.queue.clone(),
                claimed.job.id.clone(),
                claimed.token.clone(),
            );
            match left.get_mut(&key) {
                Some(k) if *k > 0 => {
                    *k -= 1;
                    true
                }
                _ => false,
            }
        },
        batch,
    ))
}

/// Records the end of an attempt, fenced by the lease token. A completion's effect runs in a
/// savepoint after the fence, exactly as on SQLite.
pub(crate) async fn finish(
    conn: &mut PgConnection,
    claimed: &ClaimedJob,
    outcome: &Outcome,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    let job = &claimed.job;
    match outcome {
        Outcome::Completed(c) => {
            if c.effect.is_some() {
                sqlx::query("SAVEPOINT effect").execute(&mut *conn).await?;
            }
            let (keep_count, expire_at) = keep_columns(job.opts.remove_on_complete, now);
            let n = sqlx::query(
                "UPDATE cq_jobs SET state = 'completed', result = $1, finished_at = $2, \
                 lease_token = NULL, lease_expires_at = NULL, keep_count = $3, expire_at = $4 \
                 WHERE queue = $5 AND id = $6 AND state = 'active' AND lease_token = $7",
            )
            .bind(to_json(&c.result))
            .bind(now)
            .bind(keep_count)
            .bind(expire_at)
            .bind(&job.queue)
            .bind(&job.id)
            .bind(&claimed.token)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if let Err(lost) = answers::fenced(claimed, n) {
                if c.effect.is_some() {
                    sqlx::query("RELEASE SAVEPOINT effect")
                        .execute(&mut *conn)
                        .await?;
                }
                return Ok(Err(lost));
            }
            if let Some(effect) = &c.effect {
                if let Err(e) = apply_guarded(&**effect, SqlConn::Postgres(&mut *conn), now).await {
                    sqlx::query("ROLLBACK TO SAVEPOINT effect")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("RELEASE SAVEPOINT effect")
                        .execute(&mut *conn)
                        .await?;
                    // The attempt is recorded as failed; the caller learns why.
                    return Ok(fail_attempt(conn, claimed, &e, now, batch)
                        .await?
                        .and(Err(QueueError::EffectFailed(e))));
                }
                sqlx::query("RELEASE SAVEPOINT effect")
                    .execute(&mut *conn)
                    .await?;
            }
            match add_jobs(
                conn,
                &c.follow_ups.iter().map(ToAdd::from).collect::<Vec<_>>(),
                now,
                batch,
            )
            .await?
            {
                Ok(_) => {}
                Err(e) => return Ok(Err(e)),
            }
            answers::ended(claimed, Ended::Completed, batch);
            Ok(Ok(()))
        }
        Outcome::Failed(e) => fail_attempt(conn, claimed, e, now, batch).await,
    }
}

async fn fail_attempt(
    conn: &mut PgConnection,
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
        } => sqlx::query(
            "UPDATE cq_jobs SET state = 'failed', failed_reason = $1, finished_at = $2, \
             lease_token = NULL, lease_expires_at = NULL, keep_count = $3, expire_at = $4 \
             WHERE queue = $5 AND id = $6 AND state = 'active' AND lease_token = $7",
        )
        .bind(reason)
        .bind(now)
        .bind(keep_count)
        .bind(expire_at)
        .bind(&job.queue)
        .bind(&job.id)
        .bind(&claimed.token)
        .execute(&mut *conn)
        .await?
        .rows_affected(),
        AttemptFailure::Retry {
            reason,
            run_at,
            events,
        } => {
            let n = sqlx::query(
                "UPDATE cq_jobs SET state = 'waiting', failed_reason = $1, run_at = $2, \
                 lease_token = NULL, lease_expires_at = NULL, processed_at = NULL \
                 WHERE queue = $3 AND id = $4 AND state = 'active' AND lease_token = $5",
            )
            .bind(reason)
            .bind(run_at)
            .bind(&job.queue)
            .bind(&job.id)
            .bind(&claimed.token)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if n == 1 {
                insert_events(conn, &job.queue, &job.id, events).await?;
            }
            n
        }
    };
    if let Err(lost) = answers::fenced(claimed, n) {
        return Ok(Err(lost));
    }
    answers::ended(claimed, failure.ended(), batch);
    Ok(Ok(()))
}

/// Gives a job back without counting its attempt.
pub(crate) async fn release(
    conn: &mut PgConnection,
    claimed: &ClaimedJob,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    let job = &claimed.job;
    let n = sqlx::query(
        "UPDATE cq_jobs SET state = 'waiting', run_at = $1, \
         attempts_made = GREATEST(attempts_made - 1, 0), \
         lease_token = NULL, lease_expires_at = NULL, processed_at = NULL \
         WHERE queue = $2 AND id = $3 AND state = 'active' AND lease_token = $4",
    )
    .bind(now)
    .bind(&job.queue)
    .bind(&job.id)
    .bind(&claimed.token)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if let Err(lost) = answers::fenced(claimed, n) {
        return Ok(Err(lost));
    }
    insert_events(conn, &job.queue, &job.id, &release_events(claimed, now)).await?;
    answers::ended(claimed, Ended::Released, batch);
    Ok(Ok(()))
}
