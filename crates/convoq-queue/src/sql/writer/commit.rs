//! Committing a batch: applying it (within the dialect's batch timeout), what a failure
//! means for it (see [`Failure`]), catching panics, and answering its callers.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use futures::FutureExt;

use super::apply::apply_ops;
use super::ops::{abandoned, clone_err, deliver, refuse, Batch, Op};
use crate::clock::Clock;
use crate::error::{panic_message, QueueError};
use crate::sql::dialect::{Dialect, Failure};
use crate::sql::{Shared, WriterFault};

/// Why a batch did not commit.
pub(crate) enum Abort<E> {
    /// The database failed.
    Sql(E),
    /// An effect or follow-up failed in a batch applied without savepoints (its partial writes
    /// cannot be undone alone), a completion lost its lease in a batch whose completions were
    /// only counted, or the batch's adds, applied as one, were refused: the batch is applied
    /// again with a savepoint per effect, every completion answered by name and each add on its
    /// own.
    Careful,
}

impl<E> From<E> for Abort<E> {
    fn from(e: E) -> Self {
        Abort::Sql(e)
    }
}

/// How a batch applies its completions.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Every completion in one fenced statement (counted, where the dialect prefers), effects
    /// without savepoints, every follow-up job in one add, every add in one: a handful of
    /// statements per batch, whatever its size. Any effect failure, lost lease or refused add
    /// aborts the batch with [`Abort::Careful`].
    Grouped,
    /// Completions that carry effects or follow-ups one by one, each effect in a savepoint, so
    /// that a failing effect fails its own attempt only; every completion answered by name;
    /// each add on its own.
    Careful,
}

/// Applies `ops` in one transaction (see the module docs for what happens when that fails) and
/// answers each of them. Operations whose callers have given up (their deadline passed while
/// they queued) are dropped first, unapplied. A panic while the batch is applied is caught: the
/// operations not yet answered are refused as unavailable (their outcome is unknown to the
/// writer: a panic after the commit leaves them committed), and the connection is replaced
/// before the next batch. Returns whether the writer may go on with its connection.
pub(super) async fn commit_ops<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &mut Vec<Op>,
    clock: &dyn Clock,
    shared: &Shared,
) -> bool {
    ops.retain(|op| !abandoned(op));
    if ops.is_empty() {
        return true;
    }
    let applied = AssertUnwindSafe(commit_ops_now(d, conn, ops, clock, shared))
        .catch_unwind()
        .await;
    let Err(panic) = applied else {
        return true;
    };
    let message = panic_message(&panic);
    tracing::error!(panic = %message, unanswered = ops.len(),
        "the writer panicked while applying a batch; its unanswered operations are refused as unavailable, and it goes on with a new connection");
    for op in ops.drain(..) {
        refuse(
            op,
            QueueError::Unavailable(format!(
                "the writer failed while applying this write ({message}); it may or may not have been committed"
            )),
        );
    }
    shared.writer_down(format!("the writer panicked: {message}"));
    false
}

/// Replaces the writer's connection after a panic left its state unknown; until that succeeds
/// the writer is reported down (readiness fails) and each batch is refused as unavailable.
pub(super) async fn reopen<D: Dialect>(d: &D, conn: &mut D::Conn, shared: &Shared) -> bool {
    match AssertUnwindSafe(d.reopen(conn)).catch_unwind().await {
        Ok(Ok(())) => {
            tracing::info!("the writer reopened its connection");
            shared.writer_up();
            true
        }
        Ok(Err(e)) => {
            let err = d.map_err(e);
            tracing::error!(error = %err, "the writer could not reopen its connection; writes are refused until it can");
            shared.writer_down(format!("the writer could not reopen its connection: {err}"));
            false
        }
        Err(panic) => {
            let message = panic_message(&panic);
            shared.writer_down(format!(
                "the writer could not reopen its connection: {message}"
            ));
            false
        }
    }
}

async fn commit_ops_now<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &mut Vec<Op>,
    clock: &dyn Clock,
    shared: &Shared,
) {
    shared.inject(WriterFault::PanicBeforeApply);
    let mut result = apply_batch(d, conn, ops, clock, Mode::Grouped).await;
    if failure(d, &result) == Some(Failure::ConnectionLost) {
        // The connection broke, now or while idle (a restarted server): once more, on a
        // new one. If the database is really gone this fails as fast as connecting does,
        // and the whole batch is refused below, not retried one operation at a time.
        result = apply_batch(d, conn, ops, clock, Mode::Grouped).await;
    }
    if matches!(result, Err(Abort::Careful)) {
        result = apply_batch(d, conn, ops, clock, Mode::Careful).await;
    }
    let failed = failure(d, &result);
    match result {
        Ok(batch) => {
            shared.writer_up();
            shared.inject(WriterFault::PanicAfterCommit);
            deliver_all(ops, batch, shared)
        }
        Err(e) if ops.len() > 1 && matches!(failed, Some(Failure::Operation) | None) => {
            // One operation's failure (a constraint, a bad value): each alone, so that it fails
            // by itself.
            tracing::warn!(error = %abort_err(d, e), ops = ops.len(), "group commit failed; applying its operations one by one");
            for op in std::mem::take(ops) {
                let mut single = vec![op];
                match apply_batch(d, conn, &mut single, clock, Mode::Careful).await {
                    Ok(batch) => deliver_all(&mut single, batch, shared),
                    Err(e) => {
                        if let Some(op) = single.pop() {
                            refuse(op, abort_err(d, e));
                        }
                    }
                }
            }
        }
        Err(e) => {
            // The database as a whole failed: no operation would fare better alone.
            let err = abort_err(d, e);
            match failed {
                Some(Failure::Full) => {
                    tracing::error!(error = %err, ops = ops.len(), "write failed: the disk is full; writes are refused until space returns");
                    shared.writer_down(format!("the disk is full: {err}"));
                }
                Some(Failure::Broken) => {
                    tracing::error!(error = %err, ops = ops.len(), "write failed: the database cannot be read or written");
                    shared.writer_down(format!("the database cannot be written: {err}"));
                }
                _ if err.is_transient() => {
                    tracing::warn!(error = %err, ops = ops.len(), "write failed; the database is unavailable")
                }
                _ => tracing::error!(error = %err, ops = ops.len(), "write failed"),
            }
            for op in ops.drain(..) {
                refuse(op, clone_err(&err));
            }
        }
    }
}

/// What a batch's database error says (see [`Dialect::classify`]); `None` when it did not fail
/// in the database.
fn failure<D: Dialect, T>(
    d: &D,
    result: &std::result::Result<T, Abort<D::Error>>,
) -> Option<Failure> {
    match result {
        Err(Abort::Sql(e)) => Some(d.classify(e)),
        _ => None,
    }
}

fn abort_err<D: Dialect>(d: &D, e: Abort<D::Error>) -> QueueError {
    match e {
        Abort::Sql(e) => d.map_err(e),
        // Careful mode never asks for itself; kept total rather than trusted.
        Abort::Careful => QueueError::Unavailable("a batch could not be applied".into()),
    }
}

fn deliver_all(ops: &mut Vec<Op>, batch: Batch, shared: &Shared) {
    shared.commits.fetch_add(1, Ordering::Relaxed);
    shared.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
    // Before the answers, so that a finish's caller finds its follow-ups to run.
    for (sink, job) in batch.handed {
        sink.claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job);
    }
    for op in ops.drain(..) {
        deliver(op);
    }
    for queue in &batch.woken {
        shared.wake(queue);
    }
    for (queue, id) in &batch.changed {
        shared.watches.notify(queue, id);
    }
}

/// Applies `ops` in one transaction, within the dialect's batch timeout. A batch that runs out
/// of time has its connection discarded (its state is unknown: the commit may or may not have
/// happened) and fails as unavailable, like a batch whose connection broke.
async fn apply_batch<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &mut [Op],
    clock: &dyn Clock,
    mode: Mode,
) -> std::result::Result<Batch, Abort<D::Error>> {
    let Some(limit) = d.schedule().batch_timeout else {
        return apply_batch_now(d, conn, ops, clock, mode).await;
    };
    match tokio::time::timeout(limit, apply_batch_now(d, conn, ops, clock, mode)).await {
        Ok(r) => r,
        Err(_) => {
            d.discard(conn);
            Err(Abort::Sql(d.timed_out(format!(
                "a write batch did not finish within {limit:?}; its connection was dropped"
            ))))
        }
    }
}

async fn apply_batch_now<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &mut [Op],
    clock: &dyn Clock,
    mode: Mode,
) -> std::result::Result<Batch, Abort<D::Error>> {
    if mode == Mode::Grouped && ops.iter().all(fresh_adds) {
        if let Some(now) = d.autocommit_adds(conn, clock).await? {
            // One insert that commits itself: nothing to roll back if it fails, and nothing in
            // it asks for the careful mode (no custom id, so no conflict to read back).
            let applied = async {
                let batch = apply_ops(d, conn, ops, now, mode).await?;
                d.autocommitted(conn, &batch).await?;
                Ok(batch)
            }
            .await;
            if applied.is_err() {
                // Lets the dialect see whether the connection still answers (a broken one is
                // opened anew for the next try); there is no transaction to end.
                let _ = d.rollback(conn).await;
            }
            return applied;
        }
    }
    let now = d.now_ms(conn, clock).await?;
    d.begin(conn).await?;
    let result = apply_ops(d, conn, ops, now, mode).await;
    match result {
        Ok(batch) => match d.commit(conn, &batch).await {
            Ok(()) => Ok(batch),
            Err(e) => {
                let _ = d.rollback(conn).await;
                Err(e.into())
            }
        },
        Err(e) => {
            let _ = d.rollback(conn).await;
            Err(e)
        }
    }
}

/// An add whose jobs have no custom id and that commits no completion: its insert cannot
/// conflict, and is all it does (see [`Dialect::autocommit_adds`]).
fn fresh_adds(op: &Op) -> bool {
    match op {
        Op::Add { jobs, complete, .. } => {
            complete.is_none() && jobs.iter().all(|job| job.opts.job_id.is_none())
        }
        _ => false,
    }
}
