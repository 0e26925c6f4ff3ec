//! The Postgres dialect of the SQL engine: `schema.rs` (tables, error mapping and transaction
//! control), `write.rs` and `upkeep.rs` (the writers' statements), `read.rs` (reads and row
//! mapping).
//!
//! It is a second dialect of the same engine, not a second engine: the same operations go
//! through the same group-commit writer, with these differences:
//! - Several writer tasks, each with its own connection, share the writer's channel (SQLite has
//!   exactly one). Claims and stall checks lock rows with `FOR UPDATE SKIP LOCKED`, so writers
//!   (of this process or another) never pick the same job nor wait for each other to.
//! - Time comes from the database server (see [`Postgres::now_ms`]), so that processes on
//!   several machines agree on leases and due times.
//! - A batch that made jobs ready notifies `convoq_jobs` with the queue's name, inside its
//!   transaction; every engine listens (unless [`SqlConfig::notify`] is off) and wakes its
//!   workers on that queue. Polling stays the fallback.
//! - Completions without effect or follow-ups are applied in one statement per batch.
//!
//! It rides out a database outage without a restart: a writer whose connection broke opens a
//! new one at its next batch (bounded by [`CONNECT_TIMEOUT`]), a batch that does not finish in
//! time gives its connection up ([`Schedule::batch_timeout`]), the listener reconnects with
//! backoff (`listen.rs`), and while the writers cannot reach the database, reads give up after
//! [`READ_WHILE_DOWN`] instead of waiting for the pool to connect ([`Reachability`]).

mod listen;
mod notify;
mod read;
mod schema;
pub(super) mod upkeep;
pub(super) mod write;

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};

pub(crate) use listen::spawn_listener;

/// A driver result: `Err` aborts the writer's batch; an inner `Err` is the operation's own
/// answer (lease lost, wrong state) and the batch goes on.
pub(crate) type SqlResult<T> = std::result::Result<T, sqlx::Error>;
use notify::{Notifications, Notifier};

use super::dialect::{transport_error, Dialect, Failure, Reads, Schedule};
use super::operation::Operation;
use super::writer::Batch;
use super::SqlConfig;
use crate::clock::{system_us, Clock, ServerLead};
use crate::effect::SqlConn;
use crate::engine::{ClaimBatch, ClaimedJob, Completion, Outcome};
use crate::error::{QueueError, Result};
use crate::events::JobEvent;
use crate::job::{Added, Job, JobSearch, JobState, QueueCounts};
use crate::sql::rules::ToAdd;

/// How long a writer waits for a new connection to open before its batch fails as
/// unavailable (the next batch tries again).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a read may take while the writers find the database unreachable. Without this, a
/// read would wait the pool's whole acquire timeout ([`SqlConfig::busy_timeout`]) as the pool
/// retries refused connections, and an HTTP caller would wait as long for its 503.
pub(crate) const READ_WHILE_DOWN: Duration = Duration::from_millis(500);

/// Whether the writers reached the database at their last attempt. Set by every batch's first
/// round trip; read by the reads to decide how long to wait.
#[derive(Debug, Default)]
pub(crate) struct Reachability {
    down: AtomicBool,
}

impl Reachability {
    fn set(&self, reachable: bool) {
        let was_down = self.down.swap(!reachable, Ordering::Relaxed);
        if was_down && reachable {
            tracing::info!("the database is reachable again");
        } else if !was_down && !reachable {
            tracing::warn!(
                "the database is unreachable; writes fail as unavailable until it returns"
            );
        }
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }
}

/// The Postgres dialect.
pub(crate) struct Postgres {
    pub(crate) clock: Arc<DbClock>,
    pub(crate) reach: Arc<Reachability>,
    /// Sends the wake-ups of committed batches (see `notify.rs`).
    pub(crate) notifier: Arc<Notifier>,
    /// How long a batch may take before its connection counts as lost.
    pub(crate) batch_timeout: Duration,
}

/// The database server's clock, as seen from this process ([`ServerLead`]), measured on the
/// writers' connections with `SELECT clock_timestamp()`.
#[derive(Debug, Default)]
pub(crate) struct DbClock {
    pub(crate) lead: Arc<ServerLead>,
}

impl DbClock {
    /// Reads the database's clock on `conn` and returns the lead to use.
    async fn sample(&self, conn: &mut PgConnection) -> SqlResult<i64> {
        self.sample_with(conn, false).await
    }

    /// [`DbClock::sample`], opening the batch's transaction in the same round trip when
    /// `begin` is set.
    async fn sample_with(&self, conn: &mut PgConnection, begin: bool) -> SqlResult<i64> {
        const READ: &str = "SELECT floor(extract(epoch from clock_timestamp()) * 1000000)::bigint";
        let before = system_us();
        let db_us: i64 = if begin {
            // Simple protocol, two statements, one round trip.
            const BEGIN_READ: &str =
                "BEGIN; SELECT floor(extract(epoch from clock_timestamp()) * 1000000)::bigint";
            let row = sqlx::Executor::fetch_one(&mut *conn, sqlx::raw_sql(BEGIN_READ)).await?;
            sqlx::Row::try_get(&row, 0)?
        } else {
            sqlx::query_scalar(READ).fetch_one(&mut *conn).await?
        };
        let after = system_us();
        Ok(self.lead.offer(before, db_us, after))
    }

    /// The lead last measured (zero before any measurement).
    pub(crate) fn lead_ms(&self) -> i64 {
        self.lead.lead_ms()
    }
}

/// A writer task's connection: reopened at the next batch after it broke.
pub(crate) struct PgWriter {
    conn: Option<PgConnection>,
    opts: PgConnectOptions,
    /// The row of each queue's lifetime totals this writer adds to (schema step 5).
    shard: i32,
}

impl PgWriter {
    fn conn(&mut self) -> SqlResult<&mut PgConnection> {
        self.conn
            .as_mut()
            .ok_or_else(|| sqlx::Error::Protocol("the writer's connection is not open".into()))
    }
}

/// What [`open`] opened.
pub(crate) struct Opened {
    pub(crate) writers: Vec<PgWriter>,
    pub(crate) reads: PgReads,
    /// The listener, and the one-connection pool it reconnects from.
    pub(crate) listener: Option<(PgListener, PgPool)>,
    /// The task that sends the writers' wake-ups, to be started with the writers.
    pub(crate) notifications: Notifications,
    pub(crate) dialect: Postgres,
}

/// How [`SqlConfig::max_connections`] is split: (writers, listener, readers).
fn budget(config: &SqlConfig) -> (u32, u32, u32) {
    let total = config.max_connections.max(1);
    let writers = ((total.saturating_sub(1)) / 2).clamp(1, 4);
    let listener = u32::from(config.notify);
    let readers = total.saturating_sub(writers + listener).max(1);
    (writers, listener, readers)
}

/// How long a writer's session may sit idle inside a transaction before Postgres ends it.
pub(crate) const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// Opens the writer connections (migrating the schema on the first), the read pool and, unless
/// notifications are off, the listener.
pub(crate) async fn open(config: &SqlConfig) -> Result<Opened> {
    let statement_timeout = config.statement_timeout.as_millis().max(1).to_string();
    let opts = PgConnectOptions::from_str(&config.url)
        .map_err(|e| QueueError::Invalid(format!("bad Postgres URL: {e}")))?
        .application_name("convoq")
        .options([("statement_timeout", statement_timeout.as_str())])
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    let (n_writers, listener, readers) = budget(config);
    // Every statement a writer runs has an index made for it (or a row address), but a
    // writer's statements are prepared while `cq_jobs` is small (a new database, or soon after
    // a start): Postgres then plans its completions and claims as sequential scans and keeps
    // those plans for the connection's life, while the table's dead row versions pile up
    // between vacuums, and every completion and claim read them all (`pg_stat_user_tables`:
    // 10,000 sequential scans reading 14 million rows for 10,000 conversations). Writers ask
    // for the index paths; readers (counts, listings) keep the planner's choice. And since
    // those plans are the same for any parameters, writers keep them: with Postgres's default
    // choice every execution was planned anew (a fifth of the server's CPU in `perf` under
    // load, `standard_planner` under `GetCachedPlan`).
    //
    // A writer's transaction lasts milliseconds. A process frozen inside one (SIGSTOP, a VM
    // paused, a stalled host) would keep its row locks, and with them the jobs it holds, out
    // of every other worker's stall sweep for as long as it stays frozen: Postgres ends such a
    // session after `IDLE_IN_TRANSACTION` instead, its locks go, and the jobs are taken back
    // like those of a dead worker (its late completions are then fenced by their tokens).
    let reads_opts = opts;
    let idle = IDLE_IN_TRANSACTION.as_millis().to_string();
    let opts = reads_opts.clone().options([
        ("enable_seqscan", "off"),
        ("plan_cache_mode", "force_generic_plan"),
        ("idle_in_transaction_session_timeout", idle.as_str()),
    ]);
    let mut first = opts.connect().await.map_err(schema::map_err)?;
    schema::migrate(&mut first).await?;
    let clock = Arc::new(DbClock::default());
    for _ in 0..5 {
        clock.sample(&mut first).await.map_err(schema::map_err)?;
    }
    let first_shard = rand::random::<u32>() % schema::TOTAL_SHARDS;
    let shard = |i: u32| ((first_shard + i) % schema::TOTAL_SHARDS) as i32;
    let mut writers = vec![PgWriter {
        conn: Some(first),
        opts: opts.clone(),
        shard: shard(0),
    }];
    for i in 1..n_writers {
        writers.push(PgWriter {
            conn: Some(opts.connect().await.map_err(schema::map_err)?),
            opts: opts.clone(),
            shard: shard(i),
        });
    }
    // Lazy: read connections open on first use.
    let pool = PgPoolOptions::new()
        .max_connections(readers)
        .min_connections(0)
        .acquire_timeout(config.busy_timeout)
        .connect_lazy_with(reads_opts.clone());
    let listener = if listener > 0 {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.busy_timeout)
            .connect_lazy_with(reads_opts);
        let l = listen::connect(&pool).await.map_err(schema::map_err)?;
        Some((l, pool))
    } else {
        None
    };
    let reach = Arc::new(Reachability::default());
    let notifier = Arc::new(Notifier::default());
    Ok(Opened {
        notifications: Notifications {
            notifier: notifier.clone(),
            pool: pool.clone(),
        },
        writers,
        reads: PgReads {
            pool,
            clock: clock.clone(),
            reach: reach.clone(),
        },
        listener,
        dialect: Postgres {
            clock,
            reach,
            notifier,
            // Every statement of a batch is bounded by the statement timeout on the server;
            // a batch still running long after that has lost its server.
            batch_timeout: config.statement_timeout * 2 + Duration::from_secs(5),
        },
    })
}

#[async_trait]
impl Dialect for Postgres {
    type Conn = PgWriter;
    type Error = sqlx::Error;

    fn map_err(&self, e: sqlx::Error) -> QueueError {
        schema::map_err(e)
    }

    fn timed_out(&self, message: String) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, message))
    }

    /// A lost connection: the driver's transport errors, and the server saying it ends the
    /// session: connection exceptions (`08…`) and shutdowns (`57P01` admin, `57P02` crash,
    /// `57P03` cannot connect now). A full disk (`53100`). Anything else is one operation's.
    fn classify(&self, e: &sqlx::Error) -> Failure {
        let lost = match e {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
            other => transport_error(other),
        };
        let full = matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("53100"));
        if lost {
            Failure::ConnectionLost
        } else if full {
            Failure::Full
        } else {
            Failure::Operation
        }
    }

    /// Several writers on the runtime's own sockets, one transaction per batch (a commit costs a
    /// sync), and a batch timeout so that a half-open connection cannot stall a writer. Adds
    /// have a writer of their own: at 1,000 POST/s a POST's p50 was 0.9 ms with no workers
    /// running and 2.3 ms with them, its add waiting for a writer busy with claims and
    /// completions (BENCHMARKS.md).
    fn schedule(&self) -> Schedule {
        Schedule {
            batch_timeout: Some(self.batch_timeout),
            adds_first: false,
            own_thread: false,
            add_lane: true,
            run_first: false,
        }
    }

    /// The connection's state is unknown after a batch was abandoned mid-flight: close it, and
    /// open a new one at the next batch.
    fn discard(&self, w: &mut PgWriter) {
        w.conn = None;
    }

    /// The batch's time: the database server's clock, read in this batch, plus the offset of
    /// the injected clock from the system clock (`clock.now_ms() - SystemClock.now_ms()`).
    ///
    /// In production the injected clock is the system clock, the offset is zero, and every
    /// lease, due time and fence is stamped by the one clock all processes share: the
    /// database's. No worker's clock is ever compared with a stored timestamp. In tests the
    /// offset is how far a `ManualClock` has been moved, so the conformance suite still moves
    /// time without sleeping.
    ///
    /// The reading is corrected for the round trip ([`DbClock`]): `db + (clock - system)` is
    /// computed as `clock + (db - system)` with the database's lead over this machine rounded
    /// to whole milliseconds, so that a database on the same machine adds exactly zero and a
    /// test's clock reads the same in every batch until it is moved.
    ///
    /// Opens the batch's transaction in the same round trip, and reopens the writer's
    /// connection if it broke in an earlier batch.
    async fn now_ms(&self, w: &mut PgWriter, clock: &dyn Clock) -> SqlResult<i64> {
        if w.conn.is_none() {
            match tokio::time::timeout(CONNECT_TIMEOUT, w.opts.connect()).await {
                Ok(Ok(conn)) => w.conn = Some(conn),
                Ok(Err(e)) => {
                    self.reach.set(false);
                    return Err(e);
                }
                Err(_) => {
                    self.reach.set(false);
                    return Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection to the database within {CONNECT_TIMEOUT:?}"),
                    )));
                }
            }
        }
        // The batch's transaction opens in the same round trip (see `begin`).
        match self.clock.sample_with(w.conn()?, true).await {
            Ok(lead_ms) => {
                self.reach.set(true);
                Ok(clock.now_ms().saturating_add(lead_ms))
            }
            Err(e) => {
                // Most likely a broken connection: open a new one for the next batch (whether
                // the database is down tells itself then).
                w.conn = None;
                Err(e)
            }
        }
    }
    /// Nothing to do: [`Postgres::now_ms`], which the writer calls right before, has opened
    /// the transaction in the round trip that read the clock.
    async fn begin(&self, w: &mut PgWriter) -> SqlResult<()> {
        w.conn().map(drop)
    }
    /// The add lane's batches are mostly one POST's add: run as one self-committing insert,
    /// stamped with the clock lead last measured, a POST waits for one round trip instead of
    /// three.
    async fn autocommit_adds(&self, w: &mut PgWriter, clock: &dyn Clock) -> SqlResult<Option<i64>> {
        if w.conn.is_none() {
            return Ok(None);
        }
        Ok(Some(clock.now_ms().saturating_add(self.clock.lead_ms())))
    }
    async fn autocommitted(&self, _w: &mut PgWriter, batch: &Batch) -> SqlResult<()> {
        self.notifier.announce(&batch.woken);
        Ok(())
    }
    async fn commit(&self, w: &mut PgWriter, batch: &Batch) -> SqlResult<()> {
        let shard = w.shard;
        schema::commit(w.conn()?, batch, shard).await?;
        self.notifier.announce(&batch.woken);
        Ok(())
    }
    async fn rollback(&self, w: &mut PgWriter) -> SqlResult<()> {
        let r = schema::rollback(w.conn()?).await;
        if r.is_err() {
            w.conn = None;
        }
        r
    }
    async fn close(&self, w: PgWriter) {
        if let Some(conn) = w.conn {
            let _ = conn.close().await;
        }
    }
    async fn add_jobs(
        &self,
        w: &mut PgWriter,
        jobs: &[ToAdd<'_>],
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<Vec<Added>>> {
        write::add_jobs(w.conn()?, jobs, now, batch).await
    }
    async fn claim(
        &self,
        w: &mut PgWriter,
        queue: &str,
        max: usize,
        lease_ms: i64,
        token: &str,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<ClaimBatch>> {
        write::claim(w.conn()?, queue, max, lease_ms, token, now, batch).await
    }
    async fn finish(
        &self,
        w: &mut PgWriter,
        job: &ClaimedJob,
        outcome: &Outcome,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<Result<()>> {
        write::finish(w.conn()?, job, outcome, now, batch).await
    }
    async fn complete_plain(
        &self,
        w: &mut PgWriter,
        jobs: &[(&ClaimedJob, &Completion)],
        now: i64,
        _exact: bool,
        batch: &mut Batch,
    ) -> SqlResult<Option<Vec<Result<()>>>> {
        // One statement whose rows come back in one exchange: listing costs no more than
        // counting.
        write::complete_plain(w.conn()?, jobs, now, batch)
            .await
            .map(Some)
    }
    fn effect_conn<'a>(&self, w: &'a mut PgWriter) -> SqlResult<SqlConn<'a>> {
        Ok(SqlConn::Postgres(w.conn()?))
    }
    async fn run(
        &self,
        w: &mut PgWriter,
        op: &mut dyn Operation,
        now: i64,
        batch: &mut Batch,
    ) -> SqlResult<()> {
        op.on_postgres(w.conn()?, now, batch).await
    }
}

/// Postgres reads on a pool. The engine's clock reading is moved to the database's clock by
/// the writers' last measurement of its lead.
pub(crate) struct PgReads {
    pool: PgPool,
    clock: Arc<DbClock>,
    reach: Arc<Reachability>,
}

impl PgReads {
    fn at(&self, now: i64) -> i64 {
        now.saturating_add(self.clock.lead_ms())
    }

    /// Runs a read, bounded by [`READ_WHILE_DOWN`] while the writers cannot reach the database.
    async fn bounded<T>(&self, read: impl Future<Output = Result<T>>) -> Result<T> {
        if !self.reach.is_down() {
            return read.await;
        }
        tokio::time::timeout(READ_WHILE_DOWN, read)
            .await
            .unwrap_or_else(|_| {
                Err(QueueError::Unavailable(
                    "the database is unreachable".to_owned(),
                ))
            })
    }
}

#[async_trait]
impl Reads for PgReads {
    async fn get(&self, queue: &str, id: &str, now: i64) -> Result<Option<Job>> {
        self.bounded(read::get(&self.pool, queue, id, self.at(now)))
            .await
    }
    async fn list(
        &self,
        queue: &str,
        state: JobState,
        offset: u64,
        limit: u64,
        now: i64,
    ) -> Result<Vec<Job>> {
        self.bounded(read::list(
            &self.pool,
            queue,
            state,
            offset,
            limit,
            self.at(now),
        ))
        .await
    }
    async fn search(
        &self,
        queue: &str,
        state: Option<JobState>,
        search: &JobSearch,
        offset: u64,
        limit: u64,
        now: i64,
    ) -> Result<Vec<Job>> {
        let at = self.at(now);
        self.bounded(read::search(
            &self.pool, queue, state, search, offset, limit, at,
        ))
        .await
    }
    async fn counts(&self, queue: &str, now: i64) -> Result<QueueCounts> {
        self.bounded(read::counts(&self.pool, queue, self.at(now)))
            .await
    }
    async fn is_paused(&self, queue: &str) -> Result<bool> {
        self.bounded(read::is_paused(&self.pool, queue)).await
    }
    async fn history(&self, queue: &str, id: &str, now: i64) -> Result<Option<Vec<JobEvent>>> {
        self.bounded(read::history(&self.pool, queue, id, self.at(now)))
            .await
    }
    async fn ping(&self) -> Result<()> {
        self.bounded(read::ping(&self.pool)).await
    }
    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::budget;
    use crate::sql::SqlConfig;

    #[test]
    fn connection_budget_splits_as_documented() {
        let mut c = SqlConfig::new("postgres://u@h/db");
        assert_eq!(budget(&c), (4, 1, 5));
        c.max_connections = 3;
        assert_eq!(budget(&c), (1, 1, 1));
        c.notify = false;
        c.max_connections = 1;
        assert_eq!(budget(&c), (1, 0, 1));
    }
}
