//! The writer's plain operations: those it applies one by one, in the batch's transaction,
//! with no scheduling of their own beyond their place in the batch (the hot path's adds,
//! claims and completions are grouped by the writer instead: see `writer/apply.rs`).
//!
//! A plain operation is a [`Statement`]: its parameters, its typed answer, and the statement
//! each dialect runs for it, synchronous on SQLite (rusqlite runs on the writer's thread) and a
//! future on Postgres. The writer holds it as a [`Pending`] statement with the slot its answer
//! waits in, behind the object-safe [`Operation`], so that a new one needs no new variant, match
//! arm or dialect method in the writer: see `operations.rs` for the list, and ARCHITECTURE.md
//! for the places a new one touches.

use futures::future::BoxFuture;
use sqlx::postgres::PgConnection;

use super::writer::{Batch, Slot};
use crate::error::{QueueError, Result};

/// One plain operation: its parameters (the implementing type), its answer, and its statement
/// in each dialect, run inside the writer's open transaction. An outer `Err` (the driver's)
/// aborts the batch; the inner result is the operation's own answer.
pub(crate) trait Statement: Send + Sync + 'static {
    /// What the caller gets once the batch commits.
    type Answer: Send + Sync + 'static;
    /// Whether the operation is long (it removes many rows): on a dialect whose adds commit
    /// first, it then commits in a transaction of its own, after the adds that arrived
    /// meanwhile.
    const LONG: bool = false;
    /// The statement on SQLite.
    fn on_sqlite(
        &self,
        conn: &rusqlite::Connection,
        now: i64,
        batch: &mut Batch,
    ) -> rusqlite::Result<Result<Self::Answer>>;
    /// The statement on Postgres.
    fn on_postgres<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        now: i64,
        batch: &'a mut Batch,
    ) -> BoxFuture<'a, sqlx::Result<Result<Self::Answer>>>;
}

/// A plain operation as the writer holds it, whatever its answer's type.
pub(crate) trait Operation: Send + Sync {
    /// Runs its statement on SQLite, holding the answer until the batch commits.
    fn on_sqlite(
        &mut self,
        conn: &rusqlite::Connection,
        now: i64,
        batch: &mut Batch,
    ) -> rusqlite::Result<()>;
    /// Runs its statement on Postgres, holding the answer until the batch commits.
    fn on_postgres<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        now: i64,
        batch: &'a mut Batch,
    ) -> BoxFuture<'a, sqlx::Result<()>>;
    /// See [`Statement::LONG`].
    fn is_long(&self) -> bool;
    /// Whether its caller stopped waiting.
    fn abandoned(&self) -> bool;
    /// Sends the answer held (the batch committed).
    fn deliver(self: Box<Self>);
    /// Sends `err` instead (the batch did not commit).
    fn refuse(self: Box<Self>, err: QueueError);
}

/// A statement and the slot its answer waits in.
pub(crate) struct Pending<S: Statement> {
    statement: S,
    reply: Slot<S::Answer>,
}

impl<S: Statement> Pending<S> {
    pub(crate) fn new(statement: S, reply: Slot<S::Answer>) -> Self {
        Pending { statement, reply }
    }
}

impl<S: Statement> Operation for Pending<S> {
    fn on_sqlite(
        &mut self,
        conn: &rusqlite::Connection,
        now: i64,
        batch: &mut Batch,
    ) -> rusqlite::Result<()> {
        let answer = self.statement.on_sqlite(conn, now, batch)?;
        self.reply.set(answer);
        Ok(())
    }
    fn on_postgres<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        now: i64,
        batch: &'a mut Batch,
    ) -> BoxFuture<'a, sqlx::Result<()>> {
        Box::pin(async move {
            let answer = self.statement.on_postgres(conn, now, batch).await?;
            self.reply.set(answer);
            Ok(())
        })
    }
    fn is_long(&self) -> bool {
        S::LONG
    }
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
    fn deliver(self: Box<Self>) {
        self.reply.deliver()
    }
    fn refuse(self: Box<Self>, err: QueueError) {
        self.reply.refuse(err)
    }
}
