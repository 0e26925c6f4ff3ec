//! The BullMQ engine: convoq's queues as BullMQ queues on Redis, wire-compatible with Node
//! BullMQ. A job added by a Node producer is run by convoq's workers and the other way round,
//! and Node tools (QueueEvents, Bull Board) read convoq's queues.
//!
//! Layout:
//! - `mod.rs` (this file): [`BullEngine`], its [`BullConfig`], and the [`Engine`]
//!   implementation, which hands each operation to the part that does it:
//! - `connection.rs`: connecting, the calls every part goes through, wake-up signals;
//! - `writes.rs`: adds (BullMQ's add scripts), an operator's retry and removal;
//! - `reads.rs`: jobs read back from their hashes, listings by state, counts;
//! - `attempts.rs`: claims and attempt ends through BullMQ's scripts, fenced by the lock;
//! - `housekeeping.rs`: taking back stalled jobs, pruning finished ones.
//! - `scripts.rs`: the Lua scripts it runs: BullMQ's own (copied from the `bullmq-official`
//!   crate, see `lua/README.md`) and one of convoq's, `reapStalled`.
//! - `codec.rs`: convoq's jobs to BullMQ's script arguments, and BullMQ's job hashes back.
//! - `history.rs`: a job's history, derived from its hash.
//! - `listen.rs`: wake-ups from other processes through BullMQ's event stream (the stream
//!   Node's `QueueEvents` reads).
//!
//! How the engine maps onto BullMQ:
//! - The `bullmq-official` crate provides the connection (auto-reconnecting), the key layout
//!   (`QueueKeys`) and the operator calls (pause, resume, retry, remove).
//! - Adds, claims and attempt ends run BullMQ's scripts directly (the crate's manual-processing
//!   calls store the return value as a JSON *string*, keep every finished job whatever its
//!   `removeOnComplete`, and read the system clock).
//! - A lease is BullMQ's job lock (`<job key>:lock`, a key holding the token with a TTL): the
//!   lease token is the lock token, and a finish whose token does not hold the lock is
//!   [`QueueError::LeaseLost`]. Lease expiry therefore follows Redis's clock, not the engine's
//!   [`Clock`] ([`Capabilities::leases_follow_clock`] is false); delays, backoff and timestamps
//!   follow the engine's clock, which is passed to every script as BullMQ's clients do. That
//!   clock is Redis's own as seen from this process (`TIME`, its lead over the system clock
//!   measured at connect and every 30 s, [`ServerLead`]): processes whose clocks disagree, even
//!   by an hour, agree on when a delayed job or a retry is due. (Node BullMQ stamps its own
//!   clock; with the machines' clocks right, the two agree.)
//! - Lifetime totals are BullMQ's metrics counters (`metrics:completed`, `metrics:failed`),
//!   which convoq's completions always feed.
//! - There are no transactional effects: follow-up jobs are added (idempotently, by custom id)
//!   before the completion is recorded.

mod attempts;
mod codec;
mod connection;
mod history;
mod housekeeping;
mod listen;
mod reads;
mod scripts;
mod writes;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bullmq::keys::QueueKeys;
use bullmq::options::RedisConnectionOptions;
use bullmq::redis_connection::RedisConnection;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use tokio::sync::watch;

use crate::clock::{system_us, Clock, LeadingClock, ServerLead, SystemClock};
use crate::engine::{Capabilities, ClaimBatch, ClaimedJob, Engine, Outcome};
use crate::error::{QueueError, Result};
use crate::events::{JobEvent, WatchRegistry};
use crate::job::{Added, Job, JobState, KeepJobs, NewJob, QueueCounts};
use codec::Placement;
use scripts::Scripts;

/// The key prefix Node BullMQ uses unless told otherwise.
pub const DEFAULT_PREFIX: &str = "bull";

/// The lock duration handed to scripts that may fetch the next job; convoq never asks them to,
/// so it only has to be a valid number.
const UNUSED_LOCK_MS: u64 = 30_000;

/// The most jobs one claim takes in one pipeline.
const MAX_CLAIM: usize = 64;

/// The most finished jobs one prune looks at per state.
const PRUNE_SCAN: isize = 1000;

/// Reconnection attempts per round on the engine's own connection, and the delays between
/// them. Short on purpose: while a round runs, every call waits for it, so a long round would
/// hold each POST for the whole command timeout during an outage. With these a call on a
/// Redis that refuses connections fails within a few hundred milliseconds (a 503 at once), the
/// next call starts a new round, and a Redis that is back is found by the first call after it.
const RECONNECT_TRIES: usize = 2;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(200);

/// Settings of the BullMQ engine.
#[derive(Debug, Clone)]
pub struct BullConfig {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://…` (TLS).
    pub url: String,
    /// The key prefix: queue `database` lives under `<prefix>:database:*` (Node's `prefix`
    /// option; default `bull`).
    pub prefix: String,
    /// How long connecting may take before the engine is unavailable.
    pub connect_timeout: Duration,
    /// How long one operation may take before it fails as unavailable (a hung or unreachable
    /// Redis never hangs a caller longer).
    pub command_timeout: Duration,
    /// Listen to each worked queue's event stream to wake idle workers at once when another
    /// process adds a job (default true). Off, other processes' jobs are found by polling.
    pub listen_events: bool,
    /// The clock jobs are stamped with, before Redis's lead is added (the engine's
    /// `Engine::clock` is this clock moved by the lead).
    pub clock: Arc<dyn Clock>,
}

impl BullConfig {
    /// Defaults for a Redis server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        BullConfig {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            listen_events: true,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same settings with another key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same settings with another clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

/// The BullMQ engine. Create it with [`BullEngine::connect`].
pub struct BullEngine {
    owner: String,
    config: BullConfig,
    /// The configured clock moved by Redis's lead over this machine's clock: what every
    /// timestamp, due time and backoff is stamped with. The lead ([`ServerLead`]) is measured
    /// with `TIME` at connect and again every [`LEAD_EVERY`] (at an add or a claim).
    clock: Arc<LeadingClock>,
    /// When the lead was last measured (system microseconds).
    lead_measured_us: std::sync::atomic::AtomicI64,
    /// The engine's own multiplexed connection, for every script and command it sends itself;
    /// reconnects in short rounds (see [`RECONNECT_TRIES`]).
    redis: ConnectionManager,
    /// The `bullmq-official` crate's connection, for its operator calls (pause, resume,
    /// retry, remove) only.
    conn: RedisConnection,
    scripts: &'static Scripts,
    watches: WatchRegistry,
    // Std mutexes: only looked up or inserted into, never held across an await.
    signals: Mutex<HashMap<String, watch::Sender<u64>>>,
    listeners: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Set at close: every listener ends.
    stop_listeners: watch::Sender<bool>,
    queues: tokio::sync::Mutex<HashMap<String, bullmq::Queue>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for BullEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BullEngine")
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(format!("redis: {e}"))
}

fn from_bullmq(e: bullmq::Error) -> QueueError {
    match e {
        bullmq::Error::InvalidConfig(m) => QueueError::Invalid(m),
        bullmq::Error::Serialization(e) => QueueError::Corrupt(e.to_string()),
        other => unavailable(other),
    }
}

/// The parts of a Redis URL safe to show: scheme, host and port, never credentials.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{host}")
        }
        None => "(unparsable URL)".to_owned(),
    }
}

/// One `moveToActive` reply.
enum ClaimOne {
    /// A job, with its deferred failure reason if BullMQ set one.
    Job(Box<ClaimedJob>, Option<String>),
    /// No job was ready; when the next delayed one comes due.
    None(Option<i64>),
}

/// How often Redis's clock is read again to measure its lead (see [`ServerLead`]).
const LEAD_EVERY: Duration = Duration::from_secs(30);

/// A new token per lease: a later lease on the same job never reuses one.
fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// BullMQ's rules for custom ids: not `0`, no integers (they would collide with generated
/// ids), no `:` (it separates key parts).
fn check_custom_id(id: &str) -> Result<()> {
    let integer = id.parse::<i64>().is_ok_and(|n| n.to_string() == id);
    if id == "0" || id.starts_with("0:") || integer || id.contains(':') {
        return Err(QueueError::Invalid(format!(
            "jobId {id:?} is not allowed on the BullMQ engine: it may not be an integer or contain ':'"
        )));
    }
    Ok(())
}

#[async_trait]
impl Engine for BullEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn owner_id(&self) -> &str {
        &self.owner
    }

    fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            transactional_effects: false,
            leases_follow_clock: false,
            fetch_next: true,
            claim_on_add: false,
        }
    }

    fn watches(&self) -> &WatchRegistry {
        &self.watches
    }

    fn work_signal(&self, queue: &str) -> watch::Receiver<u64> {
        let rx = self.signal(queue).subscribe();
        if self.config.listen_events {
            listen::ensure(self, queue);
        }
        rx
    }

    async fn add_bulk(&self, jobs: Vec<NewJob>) -> Result<Vec<Added>> {
        self.measure_lead_if_due().await;
        self.add_jobs(jobs).await
    }

    async fn get(&self, queue: &str, id: &str) -> Result<Option<Job>> {
        self.locate(queue, id).await
    }

    async fn list(
        &self,
        queue: &str,
        state: JobState,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<Job>> {
        self.list_jobs(queue, state, offset, limit).await
    }

    async fn counts(&self, queue: &str) -> Result<QueueCounts> {
        self.count_jobs(queue).await
    }

    async fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        let q = self.queue(queue).await?;
        let op = async {
            if paused {
                q.pause().await
            } else {
                q.resume().await
            }
        };
        tokio::time::timeout(self.config.command_timeout, op)
            .await
            .map_err(|_| unavailable("no answer in time"))?
            .map_err(from_bullmq)?;
        if !paused {
            self.wake(queue);
        }
        Ok(())
    }

    async fn is_paused(&self, queue: &str) -> Result<bool> {
        let mut c = self.redis.clone();
        self.io(redis::cmd("HEXISTS")
            .arg(self.keys(queue).meta())
            .arg("paused")
            .query_async(&mut c))
            .await
    }

    async fn retry(&self, queue: &str, id: &str) -> Result<Job> {
        self.retry_failed(queue, id).await
    }

    async fn promote(&self, queue: &str, id: &str) -> Result<Job> {
        self.promote_delayed(queue, id).await
    }

    async fn remove(&self, queue: &str, id: &str) -> Result<bool> {
        self.remove_job(queue, id).await
    }

    async fn history(&self, queue: &str, id: &str) -> Result<Option<Vec<JobEvent>>> {
        Ok(self.locate(queue, id).await?.map(|j| history::derive(&j)))
    }

    async fn claim(&self, queue: &str, max: usize, lease: Duration) -> Result<ClaimBatch> {
        self.measure_lead_if_due().await;
        self.claim_jobs(queue, max, lease).await
    }

    async fn extend(
        &self,
        queue: &str,
        leases: &[(String, String)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.keys(queue);
        let ms = lease.as_millis().max(1).to_string();
        let mut pipe = redis::pipe();
        for (id, token) in leases {
            pipe.add_command(self.scripts.extend_lock.cmd(
                &[format!("{}:lock", k.job_key(id)), k.stalled()],
                &[token.as_str(), ms.as_str(), id.as_str()],
            ));
        }
        let held: Vec<i64> = self.query(&pipe).await?;
        Ok(held.into_iter().map(|h| h == 1).collect())
    }

    async fn finish(&self, claimed: &ClaimedJob, outcome: Outcome) -> Result<()> {
        self.end_attempt(claimed, outcome, None).await.map(|_| ())
    }

    async fn finish_and_claim(
        &self,
        claimed: &ClaimedJob,
        outcome: Outcome,
        next_lease: Duration,
    ) -> Result<Option<ClaimedJob>> {
        self.end_attempt(claimed, outcome, Some(next_lease)).await
    }

    async fn release(&self, claimed: &ClaimedJob) -> Result<()> {
        self.release_job(claimed).await
    }

    async fn reap_stalled(&self, queue: &str, max_stalled: u32) -> Result<u64> {
        self.reap(queue, max_stalled).await
    }

    async fn prune(&self, queue: &str) -> Result<u64> {
        self.prune_finished(queue).await
    }

    async fn ping(&self) -> Result<()> {
        let mut c = self.redis.clone();
        let _: String = self.io(redis::cmd("PING").query_async(&mut c)).await?;
        Ok(())
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let listeners: Vec<_> = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, h)| h)
            .collect();
        let _ = self.stop_listeners.send(true);
        for mut h in listeners {
            if tokio::time::timeout(Duration::from_secs(1), &mut h)
                .await
                .is_err()
            {
                h.abort();
            }
        }
        self.conn.close().await;
    }
}
