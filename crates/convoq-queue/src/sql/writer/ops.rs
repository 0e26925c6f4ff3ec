//! The writer's operations (`Op`), each with where its answer goes, their answers (`Done`)
//! held until the batch commits, and what a batch notes for after its commit (`Batch`).

use std::collections::{HashMap, HashSet};

use tokio::sync::oneshot;

use crate::engine::{ClaimBatch, ClaimedJob, Outcome};
use crate::error::{QueueError, Result};
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
pub(crate) struct Request(pub(super) Op);

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

pub(super) fn deliver(op: Op, done: Done) {
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

pub(super) fn refuse(op: Op, err: QueueError) {
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

pub(super) fn clone_err(e: &QueueError) -> QueueError {
    match e {
        QueueError::Unavailable(m) => QueueError::Unavailable(m.clone()),
        QueueError::Corrupt(m) => QueueError::Corrupt(m.clone()),
        other => QueueError::Unavailable(other.to_string()),
    }
}
