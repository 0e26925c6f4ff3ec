//! The group-commit writer: one task that owns the write connection, drains every queued
//! operation, applies them in one transaction and answers each caller after the commit.
//!
//! Files: `ops.rs` (the operations, their answers, and what a batch notes for after its
//! commit), `mod.rs` (this one: the handle, the writer tasks and threads, gathering batches,
//! the close protocol, adds first), `commit.rs` (committing a batch: what a failure means,
//! supervision of panics, deadlines), `apply.rs` (applying a batch's operations inside its
//! transaction: grouped completions, adds, fetch-next).
//!
//! SQLite allows one writer at a time, so funnelling writes through one task costs nothing in
//! concurrency and turns N concurrent commits into one. What happens when a batch fails depends
//! on what the database said ([`Failure`](super::dialect::Failure), from [`Dialect::classify`]): one operation's own
//! failure (a constraint) has the batch applied again one operation at a time, so that it
//! fails alone; a lost connection has it applied once more as a whole on a new connection (an
//! add's job ids are minted before the first application, `Op::Add::ids`, so a batch whose
//! commit happened with its answer lost finds its own jobs rather than adding them twice); a
//! lock held elsewhere, a full disk or a broken file refuses the batch as a whole as
//! unavailable (no operation would fare better alone), the last two also marking the writer
//! down (readiness fails) until a batch commits again.
//!
//! Callers wait for their answer up to the engine's write timeout; an operation whose caller
//! gave up before the writer took it up is dropped unapplied (`commit::abandoned`). A panic while a
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

mod apply;
mod commit;
mod ops;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::dialect::Dialect;
use super::Shared;
use crate::clock::Clock;
use crate::error::{QueueError, Result};
use commit::{commit_ops, reopen};
use ops::refuse;
pub(crate) use ops::{Batch, Op, Request, Slot};

/// The engine's handle on the writer tasks.
pub(crate) struct WriterHandle {
    tx: mpsc::Sender<Request>,
    /// Where adds go when they have a writer of their own
    /// ([`Schedule::add_lane`](super::dialect::Schedule::add_lane)).
    adds_tx: Option<mpsc::Sender<Request>>,
    closed: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl WriterHandle {
    pub(crate) async fn send(&self, req: Request) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let tx = match (&self.adds_tx, &req.0) {
            (Some(adds), Op::Add { .. }) => adds,
            _ => &self.tx,
        };
        tx.send(req).await.map_err(|_| QueueError::Closed)
    }

    /// Whether the writer has been closed, or has stopped (a channel has no receiver).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
            || self.tx.is_closed()
            || self.adds_tx.as_ref().is_some_and(|tx| tx.is_closed())
    }

    /// Applies what is queued, then stops the writers (of each channel).
    pub(crate) async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for tx in std::iter::once(&self.tx).chain(self.adds_tx.as_ref()) {
            let (done, rx) = oneshot::channel();
            if tx.send(Request(Op::Close(done))).await.is_ok() {
                let _ = rx.await;
            }
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
    let inbox = |capacity: usize| {
        let (tx, rx) = mpsc::channel(capacity);
        let inbox = Arc::new(Inbox {
            rx: tokio::sync::Mutex::new(rx),
            closing: AtomicBool::new(false),
        });
        (tx, inbox)
    };
    let (tx, main) = inbox(max_batch.max(1) * 4);
    // With an add lane, the first connection takes the adds alone; the others, the rest.
    let (adds_tx, adds) = if dialect.schedule().add_lane && conns.len() >= 2 {
        let (tx, inbox) = inbox(max_batch.max(1) * 4);
        (Some(tx), Some(inbox))
    } else {
        (None, None)
    };
    let dialect = Arc::new(dialect);
    let tasks = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let inbox = match &adds {
                Some(adds) if i == 0 => adds.clone(),
                _ => main.clone(),
            };
            let writer = run(
                dialect.clone(),
                conn,
                inbox,
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
        adds_tx,
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
                .partition(|op| matches!(op, Op::Run(o) if o.is_long()));
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
