//! The SQL engine's plain operations (see `operation.rs`): lease renewals, releases at
//! shutdown, taking back stalled jobs, pruning, pausing, and an operator's retry and removal.
//! Each pairs its parameters and answer with its statement in each dialect
//! (`sqlite/write.rs`, `sqlite/upkeep.rs` and their Postgres twins); the job rules those
//! statements follow are in `rules.rs` and `answers.rs`.

use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::postgres::PgConnection;

use super::operation::Statement;
use super::writer::Batch;
use super::{postgres, sqlite};
use crate::engine::ClaimedJob;
use crate::error::Result;
use crate::job::Job;

/// Implements [`Statement`] for an operation from its statement in each dialect: expressions
/// over the operation (`$s`), the connection, the batch's clock reading and the batch.
macro_rules! statement {
    (
        $op:ty => $answer:ty $(, long = $long:expr)?;
        |$s:ident, $conn:ident, $now:ident, $batch:ident|
        sqlite: $sqlite:expr,
        postgres: $postgres:expr $(,)?
    ) => {
        impl Statement for $op {
            type Answer = $answer;
            $(const LONG: bool = $long;)?
            #[allow(unused_variables)] // Not every statement takes `now` and the batch.
            fn on_sqlite(
                &self,
                $conn: &rusqlite::Connection,
                $now: i64,
                $batch: &mut Batch,
            ) -> rusqlite::Result<Result<$answer>> {
                let $s = self;
                $sqlite
            }
            #[allow(unused_variables)]
            fn on_postgres<'a>(
                &'a self,
                $conn: &'a mut PgConnection,
                $now: i64,
                $batch: &'a mut Batch,
            ) -> BoxFuture<'a, sqlx::Result<Result<$answer>>> {
                let $s = self;
                $postgres.boxed()
            }
        }
    };
}

/// Renews the leases (job id, token) of a queue's jobs: one answer per lease, whether it is
/// still held.
pub(crate) struct Extend {
    pub(crate) queue: String,
    pub(crate) leases: Vec<(String, String)>,
    pub(crate) lease_ms: i64,
}

statement!(Extend => Vec<bool>; |s, conn, now, batch|
    sqlite: sqlite::write::extend(conn, &s.queue, &s.leases, s.lease_ms, now),
    postgres: postgres::write::extend(conn, &s.queue, &s.leases, s.lease_ms, now),
);

/// Gives a claimed job back without counting its attempt (at shutdown).
pub(crate) struct Release {
    pub(crate) job: ClaimedJob,
}

statement!(Release => (); |s, conn, now, batch|
    sqlite: sqlite::write::release(conn, &s.job, now, batch),
    postgres: postgres::write::release(conn, &s.job, now, batch),
);

/// Takes back a queue's active jobs whose lease expired: how many.
pub(crate) struct ReapStalled {
    pub(crate) queue: String,
    pub(crate) max_stalled: u32,
}

statement!(ReapStalled => u64; |s, conn, now, batch|
    sqlite: sqlite::upkeep::reap_stalled(conn, &s.queue, s.max_stalled, now, batch),
    postgres: postgres::upkeep::reap_stalled(conn, &s.queue, s.max_stalled, now, batch),
);

/// Removes at most `limit` of a queue's finished jobs past their retention: how many.
pub(crate) struct Prune {
    pub(crate) queue: String,
    pub(crate) limit: u64,
}

statement!(Prune => u64, long = true; |s, conn, now, batch|
    sqlite: sqlite::upkeep::prune(conn, &s.queue, s.limit, now),
    postgres: postgres::upkeep::prune(conn, &s.queue, s.limit, now),
);

/// Pauses or resumes a queue (a resumed queue's jobs may be ready at once).
pub(crate) struct SetPaused {
    pub(crate) queue: String,
    pub(crate) paused: bool,
}

statement!(SetPaused => (); |s, conn, now, batch|
    sqlite: sqlite::upkeep::set_paused(conn, &s.queue, s.paused, batch),
    postgres: postgres::upkeep::set_paused(conn, &s.queue, s.paused, batch),
);

/// An operator's retry of a failed job: the job as it waits again.
pub(crate) struct Retry {
    pub(crate) queue: String,
    pub(crate) id: String,
}

statement!(Retry => Job; |s, conn, now, batch|
    sqlite: sqlite::upkeep::retry(conn, &s.queue, &s.id, now, batch),
    postgres: postgres::upkeep::retry(conn, &s.queue, &s.id, now, batch),
);

/// An operator's promotion of a delayed job: ready now, the job as it is then.
pub(crate) struct Promote {
    pub(crate) queue: String,
    pub(crate) id: String,
}

statement!(Promote => Job; |s, conn, now, batch|
    sqlite: sqlite::upkeep::promote(conn, &s.queue, &s.id, now, batch),
    postgres: postgres::upkeep::promote(conn, &s.queue, &s.id, now, batch),
);

/// An operator's removal of a job (not an active one): whether there was one.
pub(crate) struct Remove {
    pub(crate) queue: String,
    pub(crate) id: String,
}

statement!(Remove => bool; |s, conn, now, batch|
    sqlite: sqlite::upkeep::remove(conn, &s.queue, &s.id, batch),
    postgres: postgres::upkeep::remove(conn, &s.queue, &s.id, batch),
);
