//! SQLite reads: jobs, listings, counts, pause flags and histories (rows become [`Job`]s by
//! the shared rule in `sql/rules.rs`).
//!
//! Each read runs as one closure on a connection of the [`ReadPool`], on a blocking thread.

use rusqlite::{Connection, OptionalExtension};

use super::conn::ReadPool;
use super::schema::map_err;
use super::SqlResult;
use crate::error::Result;
use crate::events::JobEvent;
use crate::job::{Job, JobSearch, JobState, QueueCounts};
use crate::sql::history::{self, EventRow};

pub(crate) use crate::sql::rules::{job_from_row, JOB_COLUMNS};
use crate::sql::rules::{listing, Rows, Tally, ANY_STATE_ORDER};

pub(crate) fn get_on(
    conn: &Connection,
    queue: &str,
    id: &str,
    now: i64,
) -> SqlResult<Result<Option<Job>>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS}, COALESCE((SELECT paused FROM cq_queues WHERE name = cq_jobs.queue), 0) \
         FROM cq_jobs WHERE queue = ? AND id = ?"
    ))?;
    let found = stmt
        .query_row((queue, id), |row| {
            let paused: i64 = row.get(16)?;
            Ok(job_from_row(row, now, paused != 0))
        })
        .optional()?;
    Ok(found.transpose())
}

pub(crate) async fn get(pool: &ReadPool, queue: &str, id: &str, now: i64) -> Result<Option<Job>> {
    let (queue, id) = (queue.to_owned(), id.to_owned());
    pool.run(move |c| get_on(c, &queue, &id, now))
        .await
        .map_err(map_err)?
}

fn paused_on(conn: &Connection, queue: &str) -> SqlResult<bool> {
    let paused: Option<i64> = conn
        .prepare_cached("SELECT paused FROM cq_queues WHERE name = ?")?
        .query_row([queue], |r| r.get(0))
        .optional()?;
    Ok(paused.unwrap_or(0) != 0)
}

pub(crate) async fn is_paused(pool: &ReadPool, queue: &str) -> Result<bool> {
    let queue = queue.to_owned();
    pool.run(move |c| paused_on(c, &queue))
        .await
        .map_err(map_err)
}

pub(crate) async fn list(
    pool: &ReadPool,
    queue: &str,
    state: JobState,
    offset: u64,
    limit: u64,
    now: i64,
) -> Result<Vec<Job>> {
    let queue = queue.to_owned();
    pool.run(move |c| select_on(c, &queue, Some(state), None, offset, limit, now))
        .await
        .map_err(map_err)?
}

pub(crate) async fn search(
    pool: &ReadPool,
    queue: &str,
    state: Option<JobState>,
    search: &JobSearch,
    offset: u64,
    limit: u64,
    now: i64,
) -> Result<Vec<Job>> {
    let (queue, search) = (queue.to_owned(), search.clone());
    pool.run(move |c| select_on(c, &queue, state, Some(&search), offset, limit, now))
        .await
        .map_err(map_err)?
}

/// A listing of one state (or of every state, newest first), narrowed by `search` if given:
/// its text in the id, data or failure reason (ignoring case), its field's value in the data.
fn select_on(
    conn: &mut Connection,
    queue: &str,
    state: Option<JobState>,
    search: Option<&JobSearch>,
    offset: u64,
    limit: u64,
    now: i64,
) -> SqlResult<Result<Vec<Job>>> {
    // One read transaction, so that the pause flag and the rows are one snapshot.
    let tx = conn.transaction()?;
    let paused = paused_on(&tx, queue)?;
    let (rows, order) = match state {
        Some(state) => match listing(state, paused) {
            Some(found) => found,
            None => return Ok(Ok(Vec::new())),
        },
        None => (Rows::Any, ANY_STATE_ORDER),
    };
    let filter = match rows {
        Rows::Ready => "state = 'waiting' AND run_at <= ?2",
        Rows::Later => "state = 'waiting' AND run_at > ?2",
        Rows::State("active") => "state = 'active' AND ?2 = ?2",
        Rows::State("completed") => "state = 'completed' AND ?2 = ?2",
        Rows::State(_) => "state = 'failed' AND ?2 = ?2",
        Rows::Any => "?2 = ?2",
    };
    // Over every state, newest first is the table's own order: `+queue` keeps SQLite from
    // reading the queue's rows by its (queue, id) index and sorting them all, so that the scan
    // stops after `limit` matches.
    let queue_is = if rows == Rows::Any {
        "+queue = ?1"
    } else {
        "queue = ?1"
    };
    let limits = (
        limit.min(i64::MAX as u64) as i64,
        offset.min(i64::MAX as u64) as i64,
    );
    let Some(search) = search else {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM cq_jobs WHERE queue = ?1 AND {filter} \
             ORDER BY {order} LIMIT ?3 OFFSET ?4"
        ))?;
        return stmt
            .query_map((queue, now, limits.0, limits.1), |r| {
                Ok(job_from_row(r, now, paused))
            })?
            .collect();
    };
    let text = search.text.as_ref().map(|t| t.to_lowercase());
    let (path, value) = match &search.field {
        // A key that a JSON path cannot quote plainly is in no job's data as written here.
        Some((k, _)) if k.contains(['"', '\\']) => return Ok(Ok(Vec::new())),
        Some((k, v)) => (Some(format!("$.\"{k}\"")), Some(v.clone())),
        None => (None, None),
    };
    let stalled = if search.stalled {
        "stalled_count > 0"
    } else {
        "1 = 1"
    };
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS} FROM cq_jobs WHERE {queue_is} AND {filter} \
         AND {stalled} \
         AND (?5 IS NULL OR instr(lower(id || ' ' || data || ' ' || COALESCE(failed_reason, '')), ?5) > 0) \
         AND (?6 IS NULL OR (CASE json_type(data, ?6) WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' \
              WHEN 'text' THEN json_extract(data, ?6) WHEN 'integer' THEN CAST(json_extract(data, ?6) AS TEXT) \
              WHEN 'real' THEN CAST(json_extract(data, ?6) AS TEXT) END) = ?7) \
         ORDER BY {order} LIMIT ?3 OFFSET ?4"
    ))?;
    let jobs = stmt
        .query_map((queue, now, limits.0, limits.1, text, path, value), |r| {
            Ok(job_from_row(r, now, paused))
        })?
        .collect();
    jobs
}

pub(crate) async fn counts(pool: &ReadPool, queue: &str, now: i64) -> Result<QueueCounts> {
    let queue = queue.to_owned();
    // One subquery per state, each answered from its partial index alone (the finished ones
    // repeat that index's condition, which is how SQLite sees that it applies).
    let got: [Option<i64>; 8] = pool
        .run(move |c| {
            c.prepare_cached(
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
            )?
            .query_row((&queue, now), |r| {
                let mut got = [None; 8];
                for (i, v) in got.iter_mut().enumerate() {
                    *v = r.get(i)?;
                }
                Ok(got)
            })
        })
        .await
        .map_err(map_err)?;
    let get = |i: usize| got[i].unwrap_or(0).max(0) as u64;
    Ok(Tally {
        ready: get(0).saturating_sub(get(1)),
        later: get(1),
        active: get(2),
        completed: get(3),
        failed: get(4),
        paused: get(5) != 0,
        completed_total: get(6),
        failed_total: get(7),
    }
    .counts())
}

pub(crate) async fn history(
    pool: &ReadPool,
    queue: &str,
    id: &str,
    now: i64,
) -> Result<Option<Vec<JobEvent>>> {
    let (queue, id) = (queue.to_owned(), id.to_owned());
    pool.run(move |c| {
        // One read transaction, so that the row and its events are one snapshot.
        let tx = c.transaction()?;
        let job = match get_on(&tx, &queue, &id, now)? {
            Ok(Some(job)) => job,
            Ok(None) => return Ok(Ok(None)),
            Err(e) => return Ok(Err(e)),
        };
        let stored = tx
            .prepare_cached(
                "SELECT kind, attempt, at, detail FROM cq_job_events \
                 WHERE queue = ? AND job_id = ? ORDER BY idx",
            )?
            .query_map((&queue, &id), |r| {
                Ok(EventRow::from_columns(
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                ))
            })?
            .collect::<SqlResult<Vec<EventRow>>>()?;
        Ok(Ok(Some(history::rebuild(&job, &stored))))
    })
    .await
    .map_err(map_err)?
}

pub(crate) async fn ping(pool: &ReadPool) -> Result<()> {
    pool.run(|c| c.query_row("SELECT 1", [], |_| Ok(())))
        .await
        .map_err(map_err)
}
