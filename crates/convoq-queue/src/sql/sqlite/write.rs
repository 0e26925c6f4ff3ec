//! The SQLite statements behind the writer's operations: add, claim, extend, finish, release,
//! reap stalled, prune, pause, retry, remove. Each runs inside the writer's open transaction
//! and records what to announce after the commit in the [`Batch`].

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;
use rand::Rng;
use sqlx::{Row, SqliteConnection};

use super::read::{get_on, job_from_row, JOB_COLUMNS};
use super::SqlResult;
use crate::engine::{ClaimBatch, ClaimedJob, Completion, Outcome};
use crate::error::{ProcessError, QueueError, Result};
use crate::events::JobEventKind;
use crate::job::{Added, Job, JobOptions, JobState, KeepJobs, NewJob};
use crate::sql::effect::SqlConn;
use crate::sql::writer::Batch;

fn keep_columns(keep: Option<KeepJobs>, finished_at: i64) -> (Option<i64>, Option<i64>) {
    match keep.unwrap_or(KeepJobs::FOREVER) {
        KeepJobs::RemoveAtOnce => (Some(0), Some(finished_at)),
        KeepJobs::Keep { count, age_secs } => (
            count.map(|c| c.min(i64::MAX as u64) as i64),
            age_secs.map(|a| finished_at.saturating_add((a as i64).saturating_mul(1000))),
        ),
    }
}

fn to_json(v: &impl serde::Serialize) -> String {
    // Serialising a serde_json::Value or our own option types cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

/// Rows for a statement that reads them with `json_each(?)`, one JSON array per row (a value
/// that is itself JSON text goes as a string, so that `->>` gives it back exactly): one
/// parameter and one statement text for any number of rows (multi-row `VALUES` would need a
/// text per size, each prepared apart).
fn json_rows<R: serde::Serialize>(rows: impl Iterator<Item = R>) -> String {
    to_json(&rows.collect::<Vec<R>>())
}

/// Runs a request of several statements and returns the rows changed by the last one (the
/// driver's total would count, for a statement that changes nothing, the connection's previous
/// change count again).
async fn last_changes<'q>(
    conn: &mut SqliteConnection,
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
) -> SqlResult<u64> {
    let mut steps = sqlx::Executor::fetch_many(&mut *conn, query);
    let mut last = 0;
    while let Some(step) = steps.try_next().await? {
        if let sqlx::Either::Left(done) = step {
            last = done.rows_affected();
        }
    }
    Ok(last)
}

/// Inserts jobs in one statement whatever their number (see [`json_rows`]), after `begin` (the
/// transaction's opening, if no statement has opened it); a custom id that exists already
/// yields the existing job.
pub(crate) async fn add_jobs(
    conn: &mut SqliteConnection,
    begin: &str,
    jobs: &[&NewJob],
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<Vec<Added>>> {
    let planned: Vec<(String, i64)> = jobs
        .iter()
        .map(|job| {
            let id = job
                .opts
                .job_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            (id, job.due_at(now))
        })
        .collect();
    let rows = json_rows(jobs.iter().zip(&planned).map(|(job, (id, run_at))| {
        (
            &job.queue,
            id,
            &job.name,
            to_json(&job.data),
            to_json(&job.opts),
            job.opts.priority.unwrap_or(0) as i64,
            *run_at,
            job.opts.max_attempts() as i64,
        )
    }));
    // `WHERE true` tells SQLite's parser that `ON CONFLICT` is the upsert clause.
    let sql = format!(
        "{begin}INSERT INTO cq_jobs (queue, id, name, data, opts, priority, run_at, \
         max_attempts, created_at, state) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
         value ->> 6, value ->> 7, ?, 'waiting' FROM json_each(?) WHERE true \
         ON CONFLICT (queue, id) DO NOTHING RETURNING queue, id"
    );
    let mut fresh: HashSet<(String, String)> = sqlx::query_as::<_, (String, String)>(&sql)
        .bind(now)
        .bind(rows)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    let mut out = Vec::with_capacity(jobs.len());
    for (job, (id, run_at)) in jobs.iter().zip(planned) {
        // `remove` so that a custom id listed twice is created once and found once.
        if fresh.remove(&(job.queue.clone(), id.clone())) {
            batch.wake(&job.queue);
            out.push(Added {
                job: job.stored(id, now, run_at),
                created: true,
            });
        } else {
            match get_on(&mut *conn, &job.queue, &id, now).await? {
                Ok(Some(existing)) => out.push(Added {
                    job: existing,
                    created: false,
                }),
                Ok(None) => {
                    return Ok(Err(QueueError::Corrupt(format!(
                        "job {id} conflicted on insert but cannot be read"
                    ))))
                }
                Err(e) => return Ok(Err(e)),
            }
        }
    }
    Ok(Ok(out))
}

/// Claims up to `max` ready jobs of an unpaused queue, under one lease token.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn claim(
    conn: &mut SqliteConnection,
    begin: &str,
    queue: &str,
    max: usize,
    lease_ms: i64,
    token: &str,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<ClaimBatch>> {
    let sql = format!(
        "{begin}UPDATE cq_jobs SET state = 'active', lease_token = ?1, lease_expires_at = ?2, \
         attempts_made = attempts_made + 1, processed_at = ?3 \
         WHERE seq IN (SELECT seq FROM cq_jobs WHERE queue = ?4 AND state = 'waiting' \
           AND run_at <= ?3 ORDER BY priority, run_at, seq LIMIT ?5) \
         AND NOT EXISTS (SELECT 1 FROM cq_queues WHERE name = ?4 AND paused = 1) \
         RETURNING {JOB_COLUMNS}"
    );
    let rows = sqlx::query(&sql)
        .bind(token)
        .bind(now.saturating_add(lease_ms))
        .bind(now)
        .bind(queue)
        .bind(max as i64)
        .fetch_all(&mut *conn)
        .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        match job_from_row(row, now, false) {
            Ok(job) => {
                batch.changed(&job.queue, &job.id);
                jobs.push(ClaimedJob {
                    job,
                    token: token.to_owned(),
                });
            }
            Err(e) => {
                // A job that cannot be read can never run: fail it with the reason, so it is
                // visible to operators instead of stalling forever, and go on with the others.
                let id: String = row.try_get(1)?;
                tracing::error!(queue, job_id = %id, error = %e, "failing a job whose stored data cannot be read");
                sqlx::query(
                    "UPDATE cq_jobs SET state = 'failed', failed_reason = ?, finished_at = ?, \
                     lease_token = NULL, lease_expires_at = NULL WHERE queue = ? AND id = ?",
                )
                .bind(e.to_string())
                .bind(now)
                .bind(queue)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                batch.count_failed(queue);
                batch.changed(queue, &id);
            }
        }
    }
    let mut next_due_ms = None;
    if jobs.is_empty() {
        next_due_ms = sqlx::query_scalar::<_, Option<i64>>(
            "SELECT MIN(run_at) FROM cq_jobs WHERE queue = ? AND state = 'waiting'",
        )
        .bind(queue)
        .fetch_one(&mut *conn)
        .await?;
    }
    Ok(Ok(ClaimBatch { jobs, next_due_ms }))
}

pub(crate) async fn extend(
    conn: &mut SqliteConnection,
    queue: &str,
    leases: &[(String, String)],
    lease_ms: i64,
    now: i64,
) -> SqlResult<Result<Vec<bool>>> {
    let mut held = Vec::with_capacity(leases.len());
    for (id, token) in leases {
        let n = sqlx::query(
            "UPDATE cq_jobs SET lease_expires_at = ? \
             WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
        )
        .bind(now.saturating_add(lease_ms))
        .bind(queue)
        .bind(id)
        .bind(token)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        held.push(n == 1);
    }
    Ok(Ok(held))
}

async fn insert_event(
    conn: &mut SqliteConnection,
    queue: &str,
    id: &str,
    kind: JobEventKind,
    attempt: u32,
    at: i64,
    detail: Option<serde_json::Value>,
) -> SqlResult<()> {
    sqlx::query(
        "INSERT INTO cq_job_events (queue, job_id, kind, attempt, at, detail) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(queue)
    .bind(id)
    .bind(kind.as_str())
    .bind(attempt as i64)
    .bind(at)
    .bind(detail.map(|d| to_json(&d)))
    .execute(conn)
    .await
    .map(drop)
}

/// Records the end of an attempt, fenced by the lease token.
pub(crate) async fn finish(
    conn: &mut SqliteConnection,
    claimed: &ClaimedJob,
    outcome: &Outcome,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    let job = &claimed.job;
    let lost = || {
        Ok(Err(QueueError::LeaseLost {
            queue: job.queue.clone(),
            job_id: job.id.clone(),
        }))
    };
    match outcome {
        Outcome::Completed(c) => {
            if c.effect.is_some() {
                sqlx::query("SAVEPOINT effect").execute(&mut *conn).await?;
            }
            let (keep_count, expire_at) = keep_columns(job.opts.remove_on_complete, now);
            let n = sqlx::query(
                "UPDATE cq_jobs SET state = 'completed', result = ?, finished_at = ?, \
                 lease_token = NULL, lease_expires_at = NULL, keep_count = ?, expire_at = ? \
                 WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
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
            if n != 1 {
                if c.effect.is_some() {
                    sqlx::query("RELEASE effect").execute(&mut *conn).await?;
                }
                return lost();
            }
            if let Some(effect) = &c.effect {
                if let Err(e) = effect.apply(SqlConn::Sqlite(&mut *conn), now).await {
                    sqlx::query("ROLLBACK TO effect")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("RELEASE effect").execute(&mut *conn).await?;
                    // The attempt is recorded as failed; the caller learns why.
                    return Ok(fail_attempt(conn, claimed, &e, now, batch)
                        .await?
                        .and(Err(QueueError::EffectFailed(e))));
                }
                sqlx::query("RELEASE effect").execute(&mut *conn).await?;
            }
            match add_jobs(
                conn,
                "",
                &c.follow_ups.iter().collect::<Vec<_>>(),
                now,
                batch,
            )
            .await?
            {
                Ok(_) => {}
                Err(e) => return Ok(Err(e)),
            }
            batch.count_completed(&job.queue);
            batch.changed(&job.queue, &job.id);
            Ok(Ok(()))
        }
        Outcome::Failed(e) => fail_attempt(conn, claimed, e, now, batch).await,
    }
}

/// Completes jobs in one statement whatever their number, fenced per job by its lease token:
/// the rows travel as one JSON parameter (see [`json_rows`]). Answers per job as [`finish`]
/// would; effects and follow-ups are the caller's.
///
/// Unless `exact`, the statement only counts what it completes: every row handed back costs a
/// message from SQLite's thread, so listing the completed jobs is left to the rare batch in
/// which one lost its lease (the answer is then `None` and the writer applies it again).
pub(crate) async fn complete_plain(
    conn: &mut SqliteConnection,
    begin: &str,
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
        let sql = format!("{begin}{COMPLETE}");
        let counted = last_changes(conn, sqlx::query(&sql).bind(now).bind(rows)).await?;
        if counted != jobs.len() as u64 {
            return Ok(None);
        }
        for (claimed, _) in jobs {
            batch.count_completed(&claimed.job.queue);
            batch.changed(&claimed.job.queue, &claimed.job.id);
        }
        return Ok(Some(jobs.iter().map(|_| Ok(())).collect()));
    }
    let sql = format!("{begin}{COMPLETE} RETURNING cq_jobs.queue, cq_jobs.id");
    let done: Vec<(String, String)> = sqlx::query_as(&sql)
        .bind(now)
        .bind(rows)
        .fetch_all(&mut *conn)
        .await?;
    // A job listed twice under one token is completed once: the second answers lease lost.
    let mut left: HashMap<(String, String), usize> = HashMap::with_capacity(done.len());
    for key in done {
        *left.entry(key).or_default() += 1;
    }
    Ok(Some(
        jobs.iter()
            .map(|(claimed, _)| {
                let job = &claimed.job;
                match left.get_mut(&(job.queue.clone(), job.id.clone())) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        batch.count_completed(&job.queue);
                        batch.changed(&job.queue, &job.id);
                        Ok(())
                    }
                    _ => Err(QueueError::LeaseLost {
                        queue: job.queue.clone(),
                        job_id: job.id.clone(),
                    }),
                }
            })
            .collect(),
    ))
}

async fn fail_attempt(
    conn: &mut SqliteConnection,
    claimed: &ClaimedJob,
    error: &ProcessError,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    let job = &claimed.job;
    let attempt = job.attempts_made;
    let final_failure = !error.is_retryable() || attempt >= job.max_attempts();
    let n = if final_failure {
        let (keep_count, expire_at) = keep_columns(job.opts.remove_on_fail, now);
        sqlx::query(
            "UPDATE cq_jobs SET state = 'failed', failed_reason = ?, finished_at = ?, \
             lease_token = NULL, lease_expires_at = NULL, keep_count = ?, expire_at = ? \
             WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
        )
        .bind(error.reason())
        .bind(now)
        .bind(keep_count)
        .bind(expire_at)
        .bind(&job.queue)
        .bind(&job.id)
        .bind(&claimed.token)
        .execute(&mut *conn)
        .await?
        .rows_affected()
    } else {
        let backoff = job.opts.backoff.unwrap_or(crate::job::Backoff::DEFAULT);
        let delay = backoff
            .delay_for(attempt, rand::thread_rng().gen::<f64>())
            .as_millis() as i64;
        let n = sqlx::query(
            "UPDATE cq_jobs SET state = 'waiting', failed_reason = ?, run_at = ?, \
             lease_token = NULL, lease_expires_at = NULL, processed_at = NULL \
             WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
        )
        .bind(error.reason())
        .bind(now.saturating_add(delay))
        .bind(&job.queue)
        .bind(&job.id)
        .bind(&claimed.token)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if n == 1 {
            let started = job.processed_at.map_or(now, |t| t.timestamp_millis());
            insert_event(
                conn,
                &job.queue,
                &job.id,
                JobEventKind::Active,
                attempt,
                started,
                None,
            )
            .await?;
            let detail = serde_json::json!({ "reason": error.reason(), "delayMs": delay });
            insert_event(
                conn,
                &job.queue,
                &job.id,
                JobEventKind::Retrying,
                attempt,
                now,
                Some(detail),
            )
            .await?;
        }
        n
    };
    if n != 1 {
        return Ok(Err(QueueError::LeaseLost {
            queue: job.queue.clone(),
            job_id: job.id.clone(),
        }));
    }
    if final_failure {
        batch.count_failed(&job.queue);
    }
    batch.changed(&job.queue, &job.id);
    Ok(Ok(()))
}

/// Gives a job back without counting its attempt.
pub(crate) async fn release(
    conn: &mut SqliteConnection,
    claimed: &ClaimedJob,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<()>> {
    let job = &claimed.job;
    let n = sqlx::query(
        "UPDATE cq_jobs SET state = 'waiting', run_at = ?, attempts_made = MAX(attempts_made - 1, 0), \
         lease_token = NULL, lease_expires_at = NULL, processed_at = NULL \
         WHERE queue = ? AND id = ? AND state = 'active' AND lease_token = ?",
    )
    .bind(now)
    .bind(&job.queue)
    .bind(&job.id)
    .bind(&claimed.token)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if n != 1 {
        return Ok(Err(QueueError::LeaseLost {
            queue: job.queue.clone(),
            job_id: job.id.clone(),
        }));
    }
    let started = job.processed_at.map_or(now, |t| t.timestamp_millis());
    let attempt = job.attempts_made;
    insert_event(
        conn,
        &job.queue,
        &job.id,
        JobEventKind::Active,
        attempt,
        started,
        None,
    )
    .await?;
    let detail =
        serde_json::json!({ "reason": "released at shutdown; the attempt does not count" });
    insert_event(
        conn,
        &job.queue,
        &job.id,
        JobEventKind::Waiting,
        attempt.saturating_sub(1),
        now,
        Some(detail),
    )
    .await?;
    batch.wake(&job.queue);
    batch.changed(&job.queue, &job.id);
    Ok(Ok(()))
}

/// Takes back active jobs whose lease expired.
pub(crate) async fn reap_stalled(
    conn: &mut SqliteConnection,
    queue: &str,
    max_stalled: u32,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<u64>> {
    let rows = sqlx::query(
        "SELECT id, attempts_made, stalled_count, processed_at, opts FROM cq_jobs \
         WHERE queue = ? AND state = 'active' AND lease_expires_at < ?",
    )
    .bind(queue)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut n = 0;
    for row in rows {
        let id: String = row.try_get(0)?;
        let attempt: i64 = row.try_get(1)?;
        let stalled: i64 = row.try_get(2)?;
        let started: Option<i64> = row.try_get(3)?;
        let opts: JobOptions = serde_json::from_str(row.try_get::<&str, _>(4)?).unwrap_or_default();
        let attempt = attempt.max(0) as u32;
        insert_event(
            conn,
            queue,
            &id,
            JobEventKind::Active,
            attempt,
            started.unwrap_or(now),
            None,
        )
        .await?;
        let reason = "the job's lease expired: its worker stopped or stalled";
        insert_event(
            conn,
            queue,
            &id,
            JobEventKind::Stalled,
            attempt,
            now,
            Some(reason.into()),
        )
        .await?;
        if stalled + 1 > max_stalled as i64 {
            let (keep_count, expire_at) = keep_columns(opts.remove_on_fail, now);
            sqlx::query(
                "UPDATE cq_jobs SET state = 'failed', stalled_count = stalled_count + 1, \
                 failed_reason = ?, finished_at = ?, processed_at = NULL, lease_token = NULL, \
                 lease_expires_at = NULL, keep_count = ?, expire_at = ? WHERE queue = ? AND id = ?",
            )
            .bind(format!(
                "job stalled more than the allowed {max_stalled} times"
            ))
            .bind(now)
            .bind(keep_count)
            .bind(expire_at)
            .bind(queue)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            batch.count_failed(queue);
        } else {
            sqlx::query(
                "UPDATE cq_jobs SET state = 'waiting', stalled_count = stalled_count + 1, \
                 run_at = ?, processed_at = NULL, lease_token = NULL, lease_expires_at = NULL \
                 WHERE queue = ? AND id = ?",
            )
            .bind(now)
            .bind(queue)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            batch.wake(queue);
        }
        batch.changed(queue, &id);
        n += 1;
    }
    Ok(Ok(n))
}

/// Removes at most `limit` finished jobs past their retention (expired first, then those
/// beyond their keep count), with their events, in a few set-based statements. Lifetime totals
/// live in `cq_queues` and are not touched.
pub(crate) async fn prune(
    conn: &mut SqliteConnection,
    queue: &str,
    limit: u64,
    now: i64,
) -> SqlResult<Result<u64>> {
    let limit = limit.min(i64::MAX as u64) as i64;
    let mut removed: Vec<String> = sqlx::query_scalar(
        "DELETE FROM cq_jobs WHERE seq IN (SELECT seq FROM cq_jobs WHERE queue = ?1 \
         AND state IN ('completed', 'failed') AND expire_at IS NOT NULL AND expire_at <= ?2 \
         LIMIT ?3) RETURNING id",
    )
    .bind(queue)
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    // Jobs past their count: ranked newest first among their state's jobs that have a count.
    // Ranking every finished job costs a sort of all of them per chunk, so each state's newest
    // `left + PRUNE_WINDOW` are ranked first (their ranks are exact: they are the newest); only
    // if that leaves work undone (a count larger than the window) are all of them ranked.
    for state in ["completed", "failed"] {
        let left = limit - removed.len() as i64;
        if left <= 0 {
            break;
        }
        let surplus: Vec<String> = sqlx::query_scalar(
            "DELETE FROM cq_jobs WHERE seq IN (SELECT seq FROM (SELECT seq, keep_count, \
             ROW_NUMBER() OVER (ORDER BY finished_at DESC, seq DESC) AS rn FROM ( \
               SELECT seq, keep_count, finished_at FROM cq_jobs WHERE queue = ?1 \
               AND state = ?2 AND state IN ('completed', 'failed') AND keep_count IS NOT NULL \
               ORDER BY finished_at DESC, seq DESC LIMIT ?3)) \
             WHERE rn > keep_count LIMIT ?4) RETURNING id",
        )
        .bind(queue)
        .bind(state)
        .bind(left.saturating_add(crate::sql::PRUNE_WINDOW))
        .bind(left)
        .fetch_all(&mut *conn)
        .await?;
        removed.extend(surplus);
    }
    let left = limit - removed.len() as i64;
    if left > 0 {
        let surplus: Vec<String> = sqlx::query_scalar(
            "DELETE FROM cq_jobs WHERE seq IN (SELECT seq FROM (SELECT seq, keep_count, \
             ROW_NUMBER() OVER (PARTITION BY state ORDER BY finished_at DESC, seq DESC) AS rn \
             FROM cq_jobs WHERE queue = ?1 AND state IN ('completed', 'failed') \
             AND keep_count IS NOT NULL) WHERE rn > keep_count LIMIT ?2) RETURNING id",
        )
        .bind(queue)
        .bind(left)
        .fetch_all(&mut *conn)
        .await?;
        removed.extend(surplus);
    }
    if !removed.is_empty() {
        sqlx::query(
            "DELETE FROM cq_job_events WHERE queue = ?1 \
             AND job_id IN (SELECT value FROM json_each(?2))",
        )
        .bind(queue)
        .bind(to_json(&removed))
        .execute(&mut *conn)
        .await?;
    }
    Ok(Ok(removed.len() as u64))
}

pub(crate) async fn set_paused(
    conn: &mut SqliteConnection,
    queue: &str,
    paused: bool,
) -> SqlResult<Result<()>> {
    sqlx::query(
        "INSERT INTO cq_queues (name, paused) VALUES (?, ?) \
         ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
    )
    .bind(queue)
    .bind(paused as i64)
    .execute(conn)
    .await?;
    Ok(Ok(()))
}

pub(crate) async fn retry(
    conn: &mut SqliteConnection,
    queue: &str,
    id: &str,
    now: i64,
    batch: &mut Batch,
) -> SqlResult<Result<Job>> {
    let Some(job) = (match get_on(&mut *conn, queue, id, now).await? {
        Ok(j) => j,
        Err(e) => return Ok(Err(e)),
    }) else {
        return Ok(Err(QueueError::Invalid(format!(
            "no job {id} in queue {queue}"
        ))));
    };
    if job.state != JobState::Failed {
        return Ok(Err(QueueError::WrongState {
            job_id: id.to_owned(),
            state: job.state.to_string(),
        }));
    }
    let finished = job.finished_at.map_or(now, |t| t.timestamp_millis());
    if let Some(started) = job.processed_at {
        insert_event(
            conn,
            queue,
            id,
            JobEventKind::Active,
            job.attempts_made,
            started.timestamp_millis(),
            None,
        )
        .await?;
    }
    let reason = job.failed_reason.clone().map(serde_json::Value::String);
    insert_event(
        conn,
        queue,
        id,
        JobEventKind::Failed,
        job.attempts_made,
        finished,
        reason,
    )
    .await?;
    insert_event(
        conn,
        queue,
        id,
        JobEventKind::Waiting,
        0,
        now,
        Some("retried by an operator".into()),
    )
    .await?;
    sqlx::query(
        "UPDATE cq_jobs SET state = 'waiting', attempts_made = 0, stalled_count = 0, run_at = ?, \
         processed_at = NULL, finished_at = NULL, result = NULL, keep_count = NULL, expire_at = NULL \
         WHERE queue = ? AND id = ?",
    )
    .bind(now)
    .bind(queue)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    batch.wake(queue);
    batch.changed(queue, id);
    Ok(get_on(conn, queue, id, now)
        .await?
        .and_then(|j| j.ok_or_else(|| QueueError::Corrupt(format!("job {id} vanished")))))
}

pub(crate) async fn remove(
    conn: &mut SqliteConnection,
    queue: &str,
    id: &str,
    batch: &mut Batch,
) -> SqlResult<Result<bool>> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM cq_jobs WHERE queue = ? AND id = ?")
            .bind(queue)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    match state.as_deref() {
        None => Ok(Ok(false)),
        Some("active") => Ok(Err(QueueError::WrongState {
            job_id: id.to_owned(),
            state: "active".into(),
        })),
        Some(_) => {
            sqlx::query("DELETE FROM cq_jobs WHERE queue = ? AND id = ?")
                .bind(queue)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            sqlx::query("DELETE FROM cq_job_events WHERE queue = ? AND job_id = ?")
                .bind(queue)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            batch.changed(queue, id);
            Ok(Ok(true))
        }
    }
}
