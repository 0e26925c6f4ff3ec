//! Durable job queues with BullMQ's semantics and vocabulary.
//!
//! # Layout
//! - [`job`]: jobs as added and as read back ([`NewJob`], [`JobOptions`], [`Job`], [`JobState`]).
//! - [`engine`]: the [`Engine`] interface every engine implements, and what an attempt returns
//!   ([`Completion`], [`Outcome`]).
//! - [`queues`]: [`Queues`], the handle callers hold: defaults, validation, reads, operator
//!   actions, following a job.
//! - [`worker`]: [`WorkerPool`]s that claim and run jobs with [`Processor`]s.
//! - [`events`]: a job's history and its live events ([`Follower`]).
//! - [`sql`]: the SQL engine (SQLite; Postgres as a second dialect).
//! - `bullmq` (feature `redis`): the BullMQ engine, wire-compatible with Node BullMQ.
//! - [`clock`]: injectable time.
//! - `testkit` (feature `testkit`): the conformance suite every engine runs.
//!
//! # Example
//! ```no_run
//! # async fn example() -> Result<(), convoq_queue::QueueError> {
//! use convoq_queue::{sql::{SqlConfig, SqlEngine}, NewJob, Queues};
//! let engine = SqlEngine::connect(SqlConfig::new("sqlite://jobs.db")).await?;
//! let queues = Queues::new(engine);
//! let added = queues.add(NewJob::new("database", "create_conversation", serde_json::json!({}))).await?;
//! println!("queued {}", added.job.id);
//! # Ok(()) }
//! ```

#[cfg(feature = "redis")]
pub mod bullmq;
pub mod clock;
pub mod effect;
pub mod engine;
pub mod error;
pub mod events;
pub mod follow;
pub mod job;
pub mod queues;
pub mod sql;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod worker;

pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{Capabilities, ClaimBatch, ClaimedJob, Completion, Engine, FirstRun, Outcome};
pub use error::{ProcessError, QueueError, Result};
pub use events::{JobEvent, JobEventKind};
pub use follow::Follower;
pub use job::{
    Added, Backoff, BackoffKind, Found, Job, JobOptions, JobSearch, JobState, KeepJobs, NewJob,
    QueueCounts,
};
pub use queues::Queues;
pub use worker::{
    AttemptEnd, Processor, ShutdownReport, WorkerObserver, WorkerOptions, WorkerPool,
    WorkerPoolBuilder,
};
