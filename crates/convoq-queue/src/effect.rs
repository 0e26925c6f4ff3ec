//! [`TxEffect`]: database work that a processor hands back with its completion, so that the
//! engine commits it in the same transaction as the job's completion and its follow-up jobs.
//! Engine-neutral (the engine's `Completion` carries one); the SQL engine is the one that can
//! commit it (`Capabilities::transactional_effects`), also reachable as `sql::TxEffect`.
//!
//! This is how "create the conversation, enqueue the audit event and complete the job" becomes
//! one commit on the embedded default: either all of it happened or none of it did.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use async_trait::async_trait;
use futures::FutureExt;

use crate::error::{panic_message, ProcessError};

/// The connection an effect runs on: inside the engine's open transaction.
pub enum SqlConn<'a> {
    /// The SQLite engine's writer connection (statements run on the writer's own thread).
    Sqlite(&'a mut rusqlite::Connection),
    /// One of the Postgres engine's writer connections.
    Postgres(&'a mut sqlx::PgConnection),
}

impl SqlConn<'_> {
    /// The same connection, borrowed again (to hand to one effect after another).
    pub fn reborrow(&mut self) -> SqlConn<'_> {
        match self {
            SqlConn::Sqlite(c) => SqlConn::Sqlite(c),
            SqlConn::Postgres(c) => SqlConn::Postgres(c),
        }
    }
}

/// Database work committed atomically with a job's completion.
///
/// The engine runs `apply` after it has checked the job's lease. If `apply` fails, its writes
/// are rolled back and the attempt fails with its error (retryable or not); the other
/// completions of the batch are not affected. It may run more than once if the batch it was
/// in had to be applied again, so it must be idempotent within the transaction (it always is
/// when the whole transaction is rolled back).
///
/// Effects of one kind can be applied together, in one statement: they name the same
/// [`TxEffect::group`], and the engine hands all of a batch's effects of that group to one
/// [`TxEffect::apply_group`]. If that fails, the engine rolls the batch back and applies each
/// effect alone, so that the failure is pinned on its own attempt.
#[async_trait]
pub trait TxEffect: Send + Sync + 'static {
    /// Does the work on `conn`. `now_ms` is the engine's clock reading for this commit.
    async fn apply(&self, conn: SqlConn<'_>, now_ms: i64) -> Result<(), ProcessError>;

    /// The group this effect can be applied with; `None` (the default): alone.
    fn group(&self) -> Option<&'static str> {
        None
    }

    /// Applies `effects`, every one of this effect's group in a batch (this one first), as one.
    /// By default one by one. An error need not say which effect failed: the engine then
    /// applies each alone.
    async fn apply_group(
        &self,
        effects: &[&dyn TxEffect],
        mut conn: SqlConn<'_>,
        now_ms: i64,
    ) -> Result<(), ProcessError> {
        for effect in effects {
            effect.apply(conn.reborrow(), now_ms).await?;
        }
        Ok(())
    }

    /// This effect as [`Any`], so that [`TxEffect::apply_group`] can read the others of its
    /// group; `None` (the default) for an effect without a group.
    fn as_any(&self) -> Option<&dyn Any> {
        None
    }
}

/// Runs [`TxEffect::apply`], turning a panic into a retryable failure of the effect's own
/// attempt (as a processor's panic is): the writer that runs effects for every job must not
/// fall over with one of them.
pub(crate) async fn apply_guarded(
    effect: &dyn TxEffect,
    conn: SqlConn<'_>,
    now_ms: i64,
) -> Result<(), ProcessError> {
    guarded(AssertUnwindSafe(effect.apply(conn, now_ms))).await
}

/// Runs [`TxEffect::apply_group`] on `effects` (the first one's), a panic failing the group as
/// [`apply_guarded`] fails one effect (the writer then applies each effect alone).
pub(crate) async fn apply_group_guarded(
    effects: &[&dyn TxEffect],
    conn: SqlConn<'_>,
    now_ms: i64,
) -> Result<(), ProcessError> {
    let Some(first) = effects.first() else {
        return Ok(());
    };
    guarded(AssertUnwindSafe(first.apply_group(effects, conn, now_ms))).await
}

async fn guarded(
    work: AssertUnwindSafe<impl std::future::Future<Output = Result<(), ProcessError>>>,
) -> Result<(), ProcessError> {
    match work.catch_unwind().await {
        Ok(r) => r,
        Err(panic) => Err(ProcessError::retryable(format!(
            "the completion's effect panicked: {}",
            panic_message(&panic)
        ))),
    }
}
