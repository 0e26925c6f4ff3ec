//! The writer's operations (`Op`), each with the [`Slot`] its answer waits in until the batch
//! commits (typed by the operation, so that no answer can reach the wrong caller), and what a
//! batch notes for after its commit (`Batch`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::engine::{ClaimBatch, ClaimOnAdd, ClaimedJob, Completion, FollowUpClaims, Outcome};
use crate::error::{QueueError, Result};
use crate::job::{Added, NewJob};
use crate::sql::operation::Operation;

/// Where an operation's answer goes, and the answer itself while its batch has not committed.
pub(crate) struct Slot<T> {
    reply: oneshot::Sender<Result<T>>,
    answer: Option<Result<T>>,
}

impl<T> Slot<T> {
    pub(crate) fn new(reply: oneshot::Sender<Result<T>>) -> Self {
        Slot {
            reply,
            answer: None,
        }
    }

    /// Holds the operation's answer until the batch commits (a later application of the batch
    /// replaces it).
    pub(crate) fn set(&mut self, answer: Result<T>) {
        self.answer = Some(answer);
    }

    /// The answer held, if any.
    pub(super) fn answer(&self) -> Option<&Result<T>> {
        self.answer.as_ref()
    }

    /// Whether the caller stopped waiting.
    pub(crate) fn is_closed(&self) -> bool {
        self.reply.is_closed()
    }

    /// Sends the answer held (the batch committed).
    pub(crate) fn deliver(self) {
        let answer = self.answer.unwrap_or_else(|| {
            Err(QueueError::Unavailable(
                "the writer applied the batch without answering this write".into(),
            ))
        });
        let _ = self.reply.send(answer);
    }

    /// Sends `err` instead of any answer held (the batch did not commit).
    pub(crate) fn refuse(self, err: QueueError) {
        let _ = self.reply.send(Err(err));
    }
}

type Reply<T> = Slot<T>;

/// One write, with the slot its answer waits in.
#[allow(clippy::large_enum_variant)] // One per write in flight; boxing would allocate per write.
pub(crate) enum Op {
    Add {
        jobs: Vec<NewJob>,
        /// An id for each job without a custom id (`None` for one with), minted once before
        /// the add is first applied: a batch applied again after its connection was lost (its
        /// commit may have happened, its answer lost) finds its own jobs by these ids instead
        /// of adding them twice.
        ids: Vec<Option<String>>,
        /// The lease to insert the jobs under, for a worker that waits for them.
        claim: Option<ClaimOnAdd>,
        /// The completion of the one job's attempt, run before the job was stored
        /// (`Engine::add_run_first`): committed with the add where the job was stored claimed
        /// and the batch goes as a whole (not one operation at a time); otherwise the job
        /// stays claimed and its worker runs it.
        complete: Option<Completion>,
        reply: Reply<Vec<Added>>,
    },
    Claim {
        queue: String,
        max: usize,
        lease_ms: i64,
        token: String,
        reply: Reply<ClaimBatch>,
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
    /// Any other write: see `sql/operation.rs`.
    Run(Box<dyn Operation>),
    Close(oneshot::Sender<()>),
}

/// A request to the writer.
pub(crate) struct Request(pub(super) Op);

impl Request {
    pub(crate) fn new(op: Op) -> Self {
        Request(op)
    }
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
    /// Follow-up jobs stored claimed, for the workers that wait for them (see
    /// [`FollowUpClaims`]).
    pub(crate) handed: Vec<(Arc<FollowUpClaims>, ClaimedJob)>,
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

/// Sends the operation's answer (its batch committed).
pub(super) fn deliver(op: Op) {
    match op {
        Op::Add { reply, .. } => reply.deliver(),
        Op::Claim { reply, .. } => reply.deliver(),
        Op::FinishAndClaim { reply, .. } => reply.deliver(),
        Op::Finish { reply, .. } => reply.deliver(),
        Op::Run(op) => op.deliver(),
        Op::Close(tx) => drop(tx.send(())),
    }
}

/// Whether nobody waits for the operation's answer any more: its caller gave up (its write
/// deadline passed) or went away. Such an operation is not applied, so that a caller answered
/// "unavailable" before the writer took its write up does not find it committed later.
pub(super) fn abandoned(op: &Op) -> bool {
    match op {
        Op::Add { reply, .. } => reply.is_closed(),
        Op::Claim { reply, .. } => reply.is_closed(),
        Op::Finish { reply, .. } => reply.is_closed(),
        Op::FinishAndClaim { reply, .. } => reply.is_closed(),
        Op::Run(op) => op.abandoned(),
        Op::Close(_) => false,
    }
}

/// Refuses the operation with `err` (its batch did not commit).
pub(super) fn refuse(op: Op, err: QueueError) {
    match op {
        Op::Add { reply, .. } => reply.refuse(err),
        Op::Claim { reply, .. } => reply.refuse(err),
        Op::FinishAndClaim { reply, .. } => reply.refuse(err),
        Op::Finish { reply, .. } => reply.refuse(err),
        Op::Run(op) => op.refuse(err),
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
