//! [`TxEffect`]: database work that a processor hands back with its completion, so that the
//! engine commits it in the same transaction as the job's completion and its follow-up jobs.
//!
//! This is how "create the conversation, enqueue the audit event and complete the job" becomes
//! one commit on the embedded default: either all of it happened or none of it did.

use async_trait::async_trait;

use crate::error::ProcessError;

/// The connection an effect runs on: inside the engine's open transaction.
pub enum SqlConn<'a> {
    /// The SQLite engine's writer connection.
    Sqlite(&'a mut sqlx::SqliteConnection),
    /// One of the Postgres engine's writer connections.
    Postgres(&'a mut sqlx::PgConnection),
}

/// Database work committed atomically with a job's completion.
///
/// The engine runs `apply` after it has checked the job's lease, inside a savepoint: if `apply`
/// fails, its writes are rolled back and the attempt fails with its error (retryable or not).
/// It may run more than once if the batch it was in had to be retried, so it must be idempotent
/// within the transaction (it always is when the whole transaction is rolled back).
#[async_trait]
pub trait TxEffect: Send + Sync + 'static {
    /// Does the work on `conn`. `now_ms` is the engine's clock reading for this commit.
    async fn apply(&self, conn: SqlConn<'_>, now_ms: i64) -> Result<(), ProcessError>;
}
