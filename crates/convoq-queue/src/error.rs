//! The queue crate's errors: [`QueueError`] for callers of the queue, [`ProcessError`] for
//! processors to say whether a failed attempt is worth retrying.
//!
//! Engines translate their native errors (sqlx, redis) into these at their edge, so no driver
//! type reaches a caller.

use std::fmt;

/// What can go wrong when talking to a queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The engine's backing service cannot be reached, is overloaded, or timed out. Callers may
    /// retry later; an HTTP API answers 503 with `Retry-After`.
    #[error("queue engine unavailable: {0}")]
    Unavailable(String),
    /// A lease is no longer held: its token is stale because the job was taken back after the
    /// lease expired, or it finished already. The caller's completion changed nothing.
    #[error("lease lost for job {queue}/{job_id}: it was taken back or finished")]
    LeaseLost {
        /// The job's queue.
        queue: String,
        /// The job's id.
        job_id: String,
    },
    /// The request itself is invalid (bad option, bad name).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The job is not in a state that allows the operation (for example retrying a job that did
    /// not fail).
    #[error("job {job_id} is {state}, which does not allow this")]
    WrongState {
        /// The job's id.
        job_id: String,
        /// The state it is in.
        state: String,
    },
    /// This engine cannot do what was asked (a capability of another engine).
    #[error("not supported by the {engine} engine: {what}")]
    Unsupported {
        /// The engine's name.
        engine: &'static str,
        /// What it cannot do.
        what: &'static str,
    },
    /// A completion's effect failed inside the engine's transaction: nothing of the effect
    /// was kept, and the attempt was recorded as failed with this error (retried or failed for
    /// good by the job's attempts, as if the processor had returned it).
    #[error("the completion's effect failed: {}", .0.reason())]
    EffectFailed(ProcessError),
    /// Stored data could not be read back (a corrupt row or payload).
    #[error("corrupt stored job data: {0}")]
    Corrupt(String),
    /// The engine has shut down.
    #[error("queue engine is shut down")]
    Closed,
}

impl QueueError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

/// Why a processor's attempt failed, and so what happens to the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessError {
    /// Worth another attempt (the store was unreachable, busy, or timed out): the job goes to
    /// `delayed` with backoff until its attempts are spent, then to `failed`.
    Retryable(String),
    /// No attempt can succeed (unknown user, invalid data): the job fails at once.
    Unrecoverable(String),
}

impl ProcessError {
    /// A retryable failure with this reason.
    pub fn retryable(reason: impl fmt::Display) -> Self {
        ProcessError::Retryable(reason.to_string())
    }

    /// An unrecoverable failure with this reason.
    pub fn unrecoverable(reason: impl fmt::Display) -> Self {
        ProcessError::Unrecoverable(reason.to_string())
    }

    /// The reason, as stored in the job's `failedReason`.
    pub fn reason(&self) -> &str {
        match self {
            ProcessError::Retryable(r) | ProcessError::Unrecoverable(r) => r,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProcessError::Retryable(_))
    }
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ProcessError {}

/// The crate's result type.
pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// The message a panic carried, for logs and failure reasons.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
