//! The group-commit writer: one task that owns the write connection, drains every queued
//! operation, applies them in one transaction and answers each caller after the commit.
//!
//! SQLite allows one writer at a time, so funnelling writes through one task costs nothing in
//! concurrency and turns N concurrent commits into one. What happens when a batch fails depends
//! on what the database said ([`Failure`], from [`Dialect::classify`]): one operation's own
//! failure (a constraint) has the batch applied again one operation at a time, so that it
//! fails alone; a lost connection has it applied once more as a whole on a new connection; a
//! lock held elsewhere, a full disk or a broken file refuses the batch as a whole as
//! unavailable (no operation would fare better alone), the last two also marking the writer
//! down (readiness fails) until a batch commits again.
//!
//! Callers wait for their answer up to the engine's write timeout; an operation whose caller
//! gave up before the writer took it up is dropped unapplied ([`abandoned`]). A panic while a
//! batch is applied is caught: a panicking effect fails its own attempt (see
//! `effect::apply_guarded`), and any other panic refuses the batch's unanswered operations as
//! unavailable and has the connection replaced before the next batch ([`Step::commit`]).
//!
//! Postgres takes concurrent writers, so its engine starts several writer tasks, each with its
//! own connection, pulling batches from the same channel: while one commits, the next drains
//! what has queued meanwhile. SQLite keeps exactly one, on a thread of its own
//! ([`Schedule::own_thread`](super::dialect::Schedule::own_thread)): each of its statements is a blocking call into SQLite, which must
//! neither hold up the runtime's request handlers nor wait in their queue.
//!
//! Completions are applied together, at the start of their batch: one fenced statement for all
//! of them ([`Dialect::complete_plain`]), then their effects (without savepoints), then all
//! their follow-up jobs in one add. If an effect fails, or a completion that was only counted
//! turns out to have lost its lease, the batch is rolled back and applied again with
//! completions that carry effects one by one, each effect in a savepoint, so that the failure
//! is its attempt's alone. The batch's adds are applied together as well, after the
//! completions. A batch therefore costs a handful of statements rather than a few per job,
//! which is what bounds a writer that talks to its database one statement at a time.
//!
//! Fetch-next ends (`Op::FinishAndClaim`) are finishes like the others; once everything else in
//! the batch is applied, the ones that were recorded get the next jobs of their queue from one
//! claim per queue, one job each, in the same transaction.
//!
//! Where the dialect asks for it ([`Schedule::adds_first`](super::dialect::Schedule::adds_first), SQLite), a batch's adds commit first
//! in a transaction of their own, then the rest, then each prune alone after the adds that
//! arrived meanwhile (other late operations are carried to the next batch), so that the callers
//! of adds wait for their own commit and at most one step of other work.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use futures::FutureExt;

use super::dialect::{Dialect, Failure};
use super::effect::{apply_group_guarded, apply_guarded, TxEffect};
use super::{Shared, WriterFault};
use crate::clock::Clock;
use crate::engine::{ClaimBatch, ClaimedJob, Completion, Outcome};
use crate::error::{panic_message, QueueError, Result};
use crate::job::{Added, Job, NewJob};

type Reply<T> = oneshot::Sender<Result<T>>;

/// One write, with where to send its answer.
pub(crate) enum Op {
    Add {
        jobs: Vec<NewJob>,
        reply: Reply<Vec<Added>>,
    },
    Claim {
        queue: String,
        max: usize,
        lease_ms: i64,
        token: String,
        reply: Reply<ClaimBatch>,
    },
    Extend {
        queue: String,
        leases: Vec<(String, String)>,
        lease_ms: i64,
        reply: Reply<Vec<bool>>,
    },
    Finish {
        job: ClaimedJob,
        outcome: Outcome,
        reply: Reply<()>,
    },
    /// A finish that also claims the queue's next ready job (fetch-next). The batch's
    /// fetch-next claims of one queue are applied as one claim, after everything else.
    FinishAndClaim {
        job: ClaimedJob,
        outcome: Outcome,
        lease_ms: i64,
        token: String,
        reply: Reply<Option<ClaimedJob>>,
    },
    Release {
        job: ClaimedJob,
        reply: Reply<()>,
    },
    ReapStalled {
        queue: String,
        max_stalled: u32,
        reply: Reply<u64>,
    },
    Prune {
        queue: String,
        limit: u64,
        reply: Reply<u64>,
    },
    SetPaused {
        queue: String,
        paused: bool,
        reply: Reply<()>,
    },
    Retry {
        queue: String,
        id: String,
        reply: Reply<Job>,
    },
    Remove {
        queue: String,
        id: String,
        reply: Reply<bool>,
    },
    Close(oneshot::Sender<()>),
}

/// A request to the writer.
pub(crate) struct Request(Op);

impl Request {
    pub(crate) fn new(op: Op) -> Self {
        Request(op)
    }
}

/// The answer to one operation, held until the batch commits.
#[allow(clippy::large_enum_variant)] // Short-lived, one per operation in a batch.
pub(crate) enum Done {
    Added(Result<Vec<Added>>),
    Claimed(Result<ClaimBatch>),
    Bools(Result<Vec<bool>>),
    Unit(Result<()>),
    Fetched(Result<Option<ClaimedJob>>),
    Count(Result<u64>),
    Job(Result<Job>),
    Bool(Result<bool>),
}

/// What to do once a batch has committed, and the counters it moves.
#[derive(Default)]
pub(crate) struct Batch {
    /// Jobs whose followers should re-read them.
    pub(crate) changed: Vec<(String, String)>,
    /// Queues on which jobs may have become ready.
    pub(crate) woken: HashSet<String>,
    /// Lifetime totals to add, per queue: (completed, failed).
    pub(crate) totals: HashMap<String, (i64, i64)>,
}

impl Batch {
    pub(crate) fn changed(&mut self, queue: &str, id: &str) {
        self.changed.push((queue.to_owned(), id.to_owned()));
    }
    pub(crate) fn wake(&mut self, queue: &str) {
        if !self.woken.contains(queue) {
            self.woken.insert(queue.to_owned());
        }
    }
    pub(crate) fn count_completed(&mut self, queue: &str) {
        self.totals.entry(queue.to_owned()).or_default().0 += 1;
    }
    pub(crate) fn count_failed(&mut self, queue: &str) {
        self.totals.entry(queue.to_owned()).or_default().1 += 1;
    }
}

/// The engine's handle on the writer tasks.
pub(crate) struct WriterHandle {
    tx: mpsc::Sender<Request>,
    closed: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl WriterHandle {
    pub(crate) async fn send(&self, req: Request) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        self.tx.send(req).await.map_err(|_| QueueError::Closed)
    }

    /// Whether the writer has been closed, or has stopped (its channel has no receiver).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Applies what is queued, then stops the writer.
    pub(crate) async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request(Op::Close(tx))).await.is_ok() {
            let _ = rx.await;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// The channel the writer tasks share, and whether one of them has taken the close.
struct Inbox {
    rx: tokio::sync::Mutex<mpsc::Receiver<Request>>,
    closing: AtomicBool,
}

/// Starts one writer task of dialect `D` per connection in `conns` (SQLite passes exactly one),
/// all draining the same channel; each on a thread of its own where the dialect asks for it
/// ([`Schedule::own_thread`](super::dialect::Schedule::own_thread)). Fails as unavailable when such a thread cannot be started.
pub(crate) fn spawn<D: Dialect>(
    dialect: D,
    conns: Vec<D::Conn>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    max_batch: usize,
) -> Result<WriterHandle> {
    let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
    let inbox = Arc::new(Inbox {
        rx: tokio::sync::Mutex::new(rx),
        closing: AtomicBool::new(false),
    });
    let dialect = Arc::new(dialect);
    let tasks = conns
        .into_iter()
        .map(|conn| {
            let writer = run(
                dialect.clone(),
                conn,
                inbox.clone(),
                clock.clone(),
                shared.clone(),
                max_batch.max(1),
            );
            if dialect.schedule().own_thread {
                spawn_on_own_thread(writer)
            } else {
                Ok(tokio::spawn(writer))
            }
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| QueueError::Unavailable(format!("could not start a writer thread: {e}")))?;
    Ok(WriterHandle {
        tx,
        closed: AtomicBool::new(false),
        tasks: Mutex::new(tasks),
    })
}

/// Runs a writer task on a thread of its own, in a single-threaded runtime, and returns a
/// handle on the caller's runtime that ends when it does. Unlike a task of the caller's
/// runtime, a writer there never waits in the run queue behind request handlers each time a
/// statement comes back from the driver's thread. Nothing in the writer's task is bound to the
/// runtime that opened its connection (SQLite's driver runs on a thread of its own).
fn spawn_on_own_thread(
    writer: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let (done_tx, done_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("convoq-writer".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(writer),
                Err(e) => tracing::error!(error = %e, "could not start the writer's runtime"),
            }
            let _ = done_tx.send(());
        })?;
    Ok(tokio::spawn(async move {
        let _ = done_rx.await;
    }))
}

/// How many rounds the writer takes operations that keep arriving before it applies a batch.
const GATHER_ROUNDS: usize = 8;

/// Takes the next batch off the shared channel: waits for one operation (unless `ops` holds
/// some carried over from the last batch), then takes whatever else is queued, up to
/// `max_batch`. Returns `None` when the writer is done (closed or every sender dropped); a
/// batch may come with the closer's reply when it held the close.
async fn next_batch(
    inbox: &Inbox,
    ops: &mut Vec<Op>,
    max_batch: usize,
) -> Option<Option<oneshot::Sender<()>>> {
    let mut rx = inbox.rx.lock().await;
    if inbox.closing.load(Ordering::Acquire) {
        return None;
    }
    if ops.is_empty() {
        let Request(first) = rx.recv().await?;
        ops.push(first);
    }
    // Callers that were woken together (the attempts of one claimed batch, say) are about to
    // send their operations: take them, as long as more keep coming, so that they share this
    // commit instead of each waiting for the next one. On the caller's runtime the yield lets
    // them run; a writer on a thread of its own (SQLite) yields to nothing and takes what the
    // callers, on other threads, sent meanwhile. A yield with nothing else to run returns at
    // once, so a lone caller waits no longer than that.
    for _ in 0..GATHER_ROUNDS {
        tokio::task::yield_now().await;
        let had = ops.len();
        while ops.len() < max_batch {
            match rx.try_recv() {
                Ok(Request(op)) => ops.push(op),
                Err(_) => break,
            }
        }
        if ops.len() == had || ops.len() >= max_batch {
            break;
        }
    }
    let mut closer = None;
    if let Some(pos) = ops.iter().position(|op| matches!(op, Op::Close(_))) {
        // Everything queued before the close is applied; anything after it is refused.
        for op in ops.drain(pos + 1..) {
            refuse(op, QueueError::Closed);
        }
        if let Some(Op::Close(tx)) = ops.pop() {
            closer = Some(tx);
        }
        inbox.closing.store(true, Ordering::Release);
        rx.close();
        while let Ok(Request(op)) = rx.try_recv() {
            refuse(op, QueueError::Closed);
        }
    }
    Some(closer)
}

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
enum Mode {
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

async fn run<D: Dialect>(
    d: Arc<D>,
    mut conn: D::Conn,
    inbox: Arc<Inbox>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    max_batch: usize,
) {
    let d = &*d;
    let mut ops: Vec<Op> = Vec::with_capacity(max_batch);
    let mut closing: Option<oneshot::Sender<()>> = None;
    // Whether the connection is in a known state (false after a panic, until reopened).
    let mut sound = true;
    let mut w = Step {
        d,
        conn: &mut conn,
        clock: &*clock,
        shared: &shared,
        sound: &mut sound,
    };
    while closing.is_none() {
        let Some(closer) = next_batch(&inbox, &mut ops, max_batch).await else {
            break;
        };
        closing = closer;
        if ops.is_empty() {
            continue;
        }
        if d.schedule().adds_first {
            // Callers of adds (POSTs waiting for their 202) wait for their commit only: the
            // batch's adds commit first, then its other work, then each prune (the longest
            // operations) in a transaction of its own, after the adds that arrived meanwhile.
            let (mut adds, rest): (Vec<Op>, Vec<Op>) =
                std::mem::take(&mut ops).into_iter().partition(is_add);
            let (prunes, mut rest): (Vec<Op>, Vec<Op>) = rest
                .into_iter()
                .partition(|op| matches!(op, Op::Prune { .. }));
            w.commit(&mut adds).await;
            w.commit(&mut rest).await;
            for prune in prunes {
                let mut late = queued_adds(&inbox, &mut ops).await;
                w.commit(&mut late).await;
                w.commit(&mut vec![prune]).await;
            }
        } else {
            w.commit(&mut ops).await;
        }
    }
    // Nothing is carried past a close (see `queued_adds`); refused rather than dropped
    // unanswered all the same.
    for op in ops.drain(..) {
        refuse(op, QueueError::Closed);
    }
    d.close(conn).await;
    if let Some(tx) = closing {
        let _ = tx.send(());
    }
}

/// The writer's connection and what it commits with, between batches.
struct Step<'a, D: Dialect> {
    d: &'a D,
    conn: &'a mut D::Conn,
    clock: &'a dyn Clock,
    shared: &'a Shared,
    /// Whether the connection is in a known state (false after a panic, until reopened).
    sound: &'a mut bool,
}

impl<D: Dialect> Step<'_, D> {
    /// Commits `ops` ([`commit_ops`]), first replacing a connection a panic left in an unknown
    /// state; while that fails, `ops` are refused as unavailable.
    async fn commit(&mut self, ops: &mut Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        if !*self.sound {
            *self.sound = reopen(self.d, self.conn, self.shared).await;
            if !*self.sound {
                let why = self
                    .shared
                    .writer_problem()
                    .unwrap_or_else(|| "the writer is recovering".into());
                for op in ops.drain(..) {
                    refuse(op, QueueError::Unavailable(why.clone()));
                }
                // Callers retry; bound how often a failing reopen is tried.
                tokio::time::sleep(REOPEN_PAUSE).await;
                return;
            }
        }
        *self.sound = commit_ops(self.d, self.conn, ops, self.clock, self.shared).await;
    }
}

/// The pause after a failed reopen of the writer's connection.
const REOPEN_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

fn is_add(op: &Op) -> bool {
    matches!(op, Op::Add { .. })
}

/// Takes the adds queued on the channel now, to commit ahead of the batch's remaining work;
/// other operations are carried over to the next batch, in order (a close, and what follows
/// it, stays on the channel for [`next_batch`]).
async fn queued_adds(inbox: &Inbox, carried: &mut Vec<Op>) -> Vec<Op> {
    let mut adds = Vec::new();
    if inbox.closing.load(Ordering::Acquire) || carried.iter().any(|op| matches!(op, Op::Close(_)))
    {
        return adds;
    }
    let mut rx = inbox.rx.lock().await;
    while let Ok(Request(op)) = rx.try_recv() {
        match op {
            Op::Close(_) => {
                carried.push(op);
                break;
            }
            op if is_add(&op) => adds.push(op),
            op => carried.push(op),
        }
    }
    adds
}

/// Applies `ops` in one transaction (see the module docs for what happens when that fails) and
/// answers each of them. Operations whose callers have given up (their deadline passed while
/// they queued) are dropped first, unapplied. A panic while the batch is applied is caught: the
/// operations not yet answered are refused as unavailable (their outcome is unknown to the
/// writer: a panic after the commit leaves them committed), and the connection is replaced
/// before the next batch. Returns whether the writer may go on with its connection.
async fn commit_ops<D: Dialect>(
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

/// Whether nobody waits for the operation's answer any more: its caller gave up (its write
/// deadline passed) or went away. Such an operation is not applied, so that a caller answered
/// "unavailable" before the writer took its write up does not find it committed later.
fn abandoned(op: &Op) -> bool {
    match op {
        Op::Add { reply, .. } => reply.is_closed(),
        Op::Claim { reply, .. } => reply.is_closed(),
        Op::Extend { reply, .. } => reply.is_closed(),
        Op::Finish { reply, .. } | Op::Release { reply, .. } | Op::SetPaused { reply, .. } => {
            reply.is_closed()
        }
        Op::FinishAndClaim { reply, .. } => reply.is_closed(),
        Op::ReapStalled { reply, .. } | Op::Prune { reply, .. } => reply.is_closed(),
        Op::Retry { reply, .. } => reply.is_closed(),
        Op::Remove { reply, .. } => reply.is_closed(),
        Op::Close(_) => false,
    }
}

/// Replaces the writer's connection after a panic left its state unknown; until that succeeds
/// the writer is reported down (readiness fails) and each batch is refused as unavailable.
async fn reopen<D: Dialect>(d: &D, conn: &mut D::Conn, shared: &Shared) -> bool {
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
        Ok((dones, batch)) => {
            shared.writer_up();
            shared.inject(WriterFault::PanicAfterCommit);
            deliver_all(ops, dones, batch, shared)
        }
        Err(e) if ops.len() > 1 && matches!(failed, Some(Failure::Operation) | None) => {
            // One operation's failure (a constraint, a bad value): each alone, so that it fails
            // by itself.
            tracing::warn!(error = %abort_err(d, e), ops = ops.len(), "group commit failed; applying its operations one by one");
            for op in std::mem::take(ops) {
                let single = [op];
                match apply_batch(d, conn, &single, clock, Mode::Careful).await {
                    Ok((dones, batch)) => {
                        let mut v: Vec<Op> = single.into();
                        deliver_all(&mut v, dones, batch, shared);
                    }
                    Err(e) => {
                        let [op] = single;
                        refuse(op, abort_err(d, e));
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

fn deliver_all(ops: &mut Vec<Op>, dones: Vec<Done>, batch: Batch, shared: &Shared) {
    shared.commits.fetch_add(1, Ordering::Relaxed);
    shared.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
    for (op, done) in ops.drain(..).zip(dones) {
        deliver(op, done);
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
    ops: &[Op],
    clock: &dyn Clock,
    mode: Mode,
) -> std::result::Result<(Vec<Done>, Batch), Abort<D::Error>> {
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
    ops: &[Op],
    clock: &dyn Clock,
    mode: Mode,
) -> std::result::Result<(Vec<Done>, Batch), Abort<D::Error>> {
    let now = d.now_ms(conn, clock).await?;
    d.begin(conn).await?;
    let result = apply_ops(d, conn, ops, now, mode).await;
    match result {
        Ok((dones, batch)) => match d.commit(conn, &batch).await {
            Ok(()) => Ok((dones, batch)),
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

/// A successful attempt, and whether it carries nothing to commit but itself.
fn completion(op: &Op) -> Option<(&ClaimedJob, &Completion)> {
    match op {
        Op::Finish {
            job,
            outcome: Outcome::Completed(c),
            ..
        }
        | Op::FinishAndClaim {
            job,
            outcome: Outcome::Completed(c),
            ..
        } => Some((job, c)),
        _ => None,
    }
}

fn is_plain(c: &Completion) -> bool {
    c.effect.is_none() && c.follow_ups.is_empty()
}

/// Applies the batch's completions together (see [`Mode`]). Returns each one's answer by the
/// index of its operation.
async fn complete_together<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &[Op],
    now: i64,
    mode: Mode,
    batch: &mut Batch,
) -> std::result::Result<Vec<Option<Result<()>>>, Abort<D::Error>> {
    let together: Vec<(usize, (&ClaimedJob, &Completion))> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| completion(op).map(|p| (i, p)))
        .filter(|(_, (_, c))| mode == Mode::Grouped || is_plain(c))
        .collect();
    let mut answers: Vec<Option<Result<()>>> = Vec::new();
    answers.resize_with(ops.len(), || None);
    if together.is_empty() {
        return Ok(answers);
    }
    let jobs: Vec<_> = together.iter().map(|(_, p)| *p).collect();
    let exact = mode == Mode::Careful;
    let Some(results) = d.complete_plain(conn, &jobs, now, exact, batch).await? else {
        return Err(Abort::Careful);
    };
    let mut follow_ups = Vec::new();
    let mut effects: Vec<&dyn TxEffect> = Vec::new();
    for ((i, (_, c)), r) in together.iter().zip(results) {
        if r.is_ok() {
            effects.extend(c.effect.as_deref());
            follow_ups.extend(c.follow_ups.iter());
        }
        answers[*i] = Some(r);
    }
    // Effects of one group in one call, the others one by one.
    let mut groups: Vec<(&'static str, Vec<&dyn TxEffect>)> = Vec::new();
    for effect in effects {
        let Some(name) = effect.group() else {
            if apply_guarded(effect, d.effect_conn(conn)?, now)
                .await
                .is_err()
            {
                return Err(Abort::Careful);
            }
            continue;
        };
        match groups.iter_mut().find(|(g, _)| *g == name) {
            Some((_, members)) => members.push(effect),
            None => groups.push((name, vec![effect])),
        }
    }
    for (_, members) in groups {
        if apply_group_guarded(&members, d.effect_conn(conn)?, now)
            .await
            .is_err()
        {
            return Err(Abort::Careful);
        }
    }
    if !follow_ups.is_empty() && d.add_jobs(conn, &follow_ups, now, batch).await?.is_err() {
        return Err(Abort::Careful);
    }
    Ok(answers)
}

/// Applies the batch's adds together: in [`Mode::Grouped`], every job of every add in one
/// [`Dialect::add_jobs`], each add answered with its own jobs; if that refuses (an inner error
/// cannot be pinned on one add), the batch is applied again carefully, where each add goes
/// alone. Returns each add's answer by the index of its operation.
async fn add_together<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &[Op],
    now: i64,
    mode: Mode,
    batch: &mut Batch,
) -> std::result::Result<Vec<Option<Result<Vec<Added>>>>, Abort<D::Error>> {
    let mut answers: Vec<Option<Result<Vec<Added>>>> = Vec::new();
    answers.resize_with(ops.len(), || None);
    let mut adds: Vec<(usize, &[NewJob])> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::Add { jobs, reply } = op else {
            continue;
        };
        if reply.is_closed() {
            // Its caller gave up while the batch waited for the database (a lock held by
            // another process): not added, so that its "unavailable" answer stays true.
            answers[i] = Some(Err(QueueError::Unavailable(
                "the write deadline passed before the job could be added".into(),
            )));
            continue;
        }
        adds.push((i, jobs.as_slice()));
    }
    if mode == Mode::Careful || adds.len() < 2 {
        for (i, jobs) in adds {
            let jobs: Vec<&NewJob> = jobs.iter().collect();
            answers[i] = Some(d.add_jobs(conn, &jobs, now, batch).await?);
        }
        return Ok(answers);
    }
    let all: Vec<&NewJob> = adds.iter().flat_map(|(_, jobs)| jobs.iter()).collect();
    let Ok(added) = d.add_jobs(conn, &all, now, batch).await? else {
        return Err(Abort::Careful);
    };
    let mut added = added.into_iter();
    for (i, jobs) in adds {
        answers[i] = Some(Ok(added.by_ref().take(jobs.len()).collect()));
    }
    Ok(answers)
}

async fn apply_ops<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &[Op],
    now: i64,
    mode: Mode,
) -> std::result::Result<(Vec<Done>, Batch), Abort<D::Error>> {
    let mut batch = Batch::default();
    let mut dones = Vec::with_capacity(ops.len());
    // Completions go first, together. Operations of one batch come from concurrent callers, so
    // their order among themselves is no one's promise.
    // Then adds, together too, so that this batch's claims can take what they added.
    let mut together = complete_together(d, conn, ops, now, mode, &mut batch).await?;
    let mut added = add_together(d, conn, ops, now, mode, &mut batch).await?;
    for (i, op) in ops.iter().enumerate() {
        if let Some(r) = together[i].take() {
            dones.push(match op {
                Op::FinishAndClaim { .. } => Done::Fetched(r.map(|()| None)),
                _ => Done::Unit(r),
            });
            continue;
        }
        let b = &mut batch;
        let done = match op {
            Op::Add { .. } => Done::Added(added[i].take().unwrap_or_else(|| {
                Err(QueueError::Corrupt(
                    "an add was left out of its batch".into(),
                ))
            })),
            Op::Claim {
                queue,
                max,
                lease_ms,
                token,
                ..
            } => Done::Claimed(d.claim(conn, queue, *max, *lease_ms, token, now, b).await?),
            Op::Extend {
                queue,
                leases,
                lease_ms,
                ..
            } => Done::Bools(d.extend(conn, queue, leases, *lease_ms, now).await?),
            Op::Finish { job, outcome, .. } => {
                Done::Unit(d.finish(conn, job, outcome, now, b).await?)
            }
            Op::FinishAndClaim { job, outcome, .. } => {
                Done::Fetched(d.finish(conn, job, outcome, now, b).await?.map(|()| None))
            }
            Op::Release { job, .. } => Done::Unit(d.release(conn, job, now, b).await?),
            Op::ReapStalled {
                queue, max_stalled, ..
            } => Done::Count(d.reap_stalled(conn, queue, *max_stalled, now, b).await?),
            Op::Prune { queue, limit, .. } => Done::Count(d.prune(conn, queue, *limit, now).await?),
            Op::SetPaused { queue, paused, .. } => {
                if !paused {
                    b.wake(queue);
                }
                Done::Unit(d.set_paused(conn, queue, *paused).await?)
            }
            Op::Retry { queue, id, .. } => Done::Job(d.retry(conn, queue, id, now, b).await?),
            Op::Remove { queue, id, .. } => Done::Bool(d.remove(conn, queue, id, b).await?),
            Op::Close(_) => unreachable!("close is taken out of the batch before it is applied"),
        };
        dones.push(done);
    }
    fetch_next(d, conn, ops, &mut dones, now, &mut batch).await?;
    Ok((dones, batch))
}

/// Claims the next jobs for the batch's fetch-next finishes that were recorded: one claim per
/// queue and lease for all of them, its jobs handed out one each in the order of the
/// operations (a finish whose queue has no more ready jobs gets none). A claim's own error
/// leaves its finishes answered without a job: their ends are recorded all the same.
async fn fetch_next<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &[Op],
    dones: &mut [Done],
    now: i64,
    batch: &mut Batch,
) -> std::result::Result<(), Abort<D::Error>> {
    /// A queue and lease, the token of the group's first finish, and the finishes asking.
    struct Group<'a> {
        queue: &'a str,
        lease_ms: i64,
        token: &'a str,
        members: Vec<usize>,
    }
    let mut groups: Vec<Group> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::FinishAndClaim {
            job,
            lease_ms,
            token,
            ..
        } = op
        else {
            continue;
        };
        if !matches!(dones[i], Done::Fetched(Ok(None))) {
            continue;
        }
        let queue = job.job.queue.as_str();
        match groups
            .iter_mut()
            .find(|g| g.queue == queue && g.lease_ms == *lease_ms)
        {
            Some(g) => g.members.push(i),
            None => groups.push(Group {
                queue,
                lease_ms: *lease_ms,
                token,
                members: vec![i],
            }),
        }
    }
    for g in groups {
        let claimed = d
            .claim(
                conn,
                g.queue,
                g.members.len(),
                g.lease_ms,
                g.token,
                now,
                batch,
            )
            .await?;
        let Ok(claimed) = claimed else {
            continue;
        };
        for (i, next) in g.members.into_iter().zip(claimed.jobs) {
            dones[i] = Done::Fetched(Ok(Some(next)));
        }
    }
    Ok(())
}

fn deliver(op: Op, done: Done) {
    match (op, done) {
        (Op::Add { reply, .. }, Done::Added(r)) => drop(reply.send(r)),
        (Op::Claim { reply, .. }, Done::Claimed(r)) => drop(reply.send(r)),
        (Op::Extend { reply, .. }, Done::Bools(r)) => drop(reply.send(r)),
        (Op::Finish { reply, .. } | Op::Release { reply, .. }, Done::Unit(r)) => {
            drop(reply.send(r))
        }
        (Op::FinishAndClaim { reply, .. }, Done::Fetched(r)) => drop(reply.send(r)),
        (Op::SetPaused { reply, .. }, Done::Unit(r)) => drop(reply.send(r)),
        (Op::ReapStalled { reply, .. } | Op::Prune { reply, .. }, Done::Count(r)) => {
            drop(reply.send(r))
        }
        (Op::Retry { reply, .. }, Done::Job(r)) => drop(reply.send(r)),
        (Op::Remove { reply, .. }, Done::Bool(r)) => drop(reply.send(r)),
        (op, _) => refuse(
            op,
            QueueError::Corrupt("writer paired an answer with the wrong operation".into()),
        ),
    }
}

fn refuse(op: Op, err: QueueError) {
    match op {
        Op::Add { reply, .. } => drop(reply.send(Err(err))),
        Op::Claim { reply, .. } => drop(reply.send(Err(err))),
        Op::FinishAndClaim { reply, .. } => drop(reply.send(Err(err))),
        Op::Extend { reply, .. } => drop(reply.send(Err(err))),
        Op::Finish { reply, .. } | Op::Release { reply, .. } | Op::SetPaused { reply, .. } => {
            drop(reply.send(Err(err)))
        }
        Op::ReapStalled { reply, .. } | Op::Prune { reply, .. } => drop(reply.send(Err(err))),
        Op::Retry { reply, .. } => drop(reply.send(Err(err))),
        Op::Remove { reply, .. } => drop(reply.send(Err(err))),
        Op::Close(tx) => drop(tx.send(())),
    }
}

fn clone_err(e: &QueueError) -> QueueError {
    match e {
        QueueError::Unavailable(m) => QueueError::Unavailable(m.clone()),
        QueueError::Corrupt(m) => QueueError::Corrupt(m.clone()),
        other => QueueError::Unavailable(other.to_string()),
    }
}
