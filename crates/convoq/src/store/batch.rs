//! Group commit for the store's own inserts: the conversation and audit inserts of jobs that
//! run at the same time go to the database as one statement, which commits once for all of them.
//!
//! Used where the store is not the queue's database (the queue on Redis): each job then inserts
//! its row on its own, and one commit per row was most of the database's work per conversation
//! (`BENCHMARKS.md`). An insert waits while the store's insert lanes are all busy; when a lane
//! frees, it takes every insert waiting (up to [`MAX_ROWS`]) in one multi-row statement. When
//! that statement fails and carried several rows, each row is tried again alone, so that every
//! caller gets its own row's answer (an unknown user fails its job, not the others'), except
//! when the store is unavailable, which every caller hears as such.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{Backend, NewAuditEvent, NewConversation, StoreError};
use crate::telemetry::Metrics;

/// The most rows one statement carries.
pub(super) const MAX_ROWS: usize = 256;

/// How many inserts may wait for a lane before a caller waits to hand its row over.
const QUEUE: usize = 4096;

/// Rows the batcher inserts: each kind with the backend's multi-row insert.
#[async_trait]
pub(super) trait Rows: Send + Sync + Sized + 'static {
    /// The operation under which each grouped statement is timed.
    const OPERATION: &'static str;
    async fn insert(db: &dyn Backend, rows: &[(&Self, DateTime<Utc>)]) -> Result<(), StoreError>;
}

#[async_trait]
impl Rows for NewConversation {
    const OPERATION: &'static str = "insert_conversations";
    async fn insert(db: &dyn Backend, rows: &[(&Self, DateTime<Utc>)]) -> Result<(), StoreError> {
        db.insert_conversations(rows).await
    }
}

#[async_trait]
impl Rows for NewAuditEvent {
    const OPERATION: &'static str = "insert_audit_events";
    async fn insert(db: &dyn Backend, rows: &[(&Self, DateTime<Utc>)]) -> Result<(), StoreError> {
        db.insert_audits(rows).await
    }
}

/// One row waiting for its statement, with where its answer goes.
struct Pending<R> {
    row: R,
    at: DateTime<Utc>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Hands rows of one kind to the task that groups them. Cheap to clone.
pub(super) struct Batcher<R> {
    tx: mpsc::Sender<Pending<R>>,
}

impl<R> Clone for Batcher<R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<R: Rows> Batcher<R> {
    /// Starts the grouping task on the current tokio runtime; `lanes` statements at most run at
    /// once, each timed as [`Rows::OPERATION`] (so that its count against the callers' shows
    /// how many rows a statement carries). The task ends when the last `Batcher` is dropped.
    pub(super) fn spawn(db: Arc<dyn Backend>, lanes: usize, metrics: Arc<Metrics>) -> Batcher<R> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let lanes = Arc::new(Semaphore::new(lanes.max(1)));
        tokio::spawn(group(db, rx, lanes, metrics));
        Batcher { tx }
    }

    /// Inserts `row`, in one statement with the rows other callers hand over meanwhile.
    ///
    /// # Errors
    /// This row's failure (alone when its statement failed for another reason than an
    /// unavailable store), or unavailable when the grouping task is gone.
    pub(super) async fn insert(&self, row: R, at: DateTime<Utc>) -> Result<(), StoreError> {
        let gone = || StoreError::Unavailable("the store's insert batcher has stopped".into());
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Pending { row, at, done })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Takes a free lane, then every row waiting (at least one), and inserts them on that lane.
async fn group<R: Rows>(
    db: Arc<dyn Backend>,
    mut rx: mpsc::Receiver<Pending<R>>,
    lanes: Arc<Semaphore>,
    metrics: Arc<Metrics>,
) {
    loop {
        let Ok(lane) = lanes.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_ROWS {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (db, metrics) = (db.clone(), metrics.clone());
        tokio::spawn(async move {
            apply(&*db, &metrics, batch).await;
            drop(lane);
        });
    }
}

/// Inserts `batch` in one statement; on a failure, each row alone (see the module's docs).
async fn apply<R: Rows>(db: &dyn Backend, metrics: &Metrics, batch: Vec<Pending<R>>) {
    let rows: Vec<_> = batch.iter().map(|p| (&p.row, p.at)).collect();
    let all = {
        let _t = metrics.db_timer(R::OPERATION);
        R::insert(db, &rows).await
    };
    drop(rows);
    match all {
        Ok(()) => {
            for p in batch {
                let _ = p.done.send(Ok(()));
            }
        }
        Err(e) if batch.len() == 1 || matches!(e, StoreError::Unavailable(_)) => {
            for p in batch {
                let _ = p.done.send(Err(e.clone()));
            }
        }
        Err(_) => {
            for p in batch {
                let one = R::insert(db, &[(&p.row, p.at)]).await;
                let _ = p.done.send(one);
            }
        }
    }
}
