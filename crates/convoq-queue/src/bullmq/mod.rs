//! The BullMQ engine: convoq's queues as BullMQ queues on Redis, wire-compatible with Node
//! BullMQ. A job added by a Node producer is run by convoq's workers and the other way round,
//! and Node tools (QueueEvents, Bull Board) read convoq's queues.
//!
//! Layout:
//! - `mod.rs` (this file): [`BullEngine`], its [`BullConfig`], and the [`Engine`]
//!   implementation.
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
//!   follow the engine's clock, which is passed to every script as BullMQ's clients do.
//! - Lifetime totals are BullMQ's metrics counters (`metrics:completed`, `metrics:failed`),
//!   which convoq's completions always feed.
//! - There are no transactional effects: follow-up jobs are added (idempotently, by custom id)
//!   before the completion is recorded.

mod codec;
mod history;
mod listen;
mod scripts;

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

use crate::clock::{Clock, SystemClock};
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
    /// The clock jobs are stamped with.
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

impl BullEngine {
    /// Connects to Redis and loads the engine's scripts.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for a bad URL or prefix; [`QueueError::Unavailable`] when Redis
    /// cannot be reached within the connect timeout.
    pub async fn connect(config: BullConfig) -> Result<Arc<BullEngine>> {
        if !(config.url.starts_with("redis://") || config.url.starts_with("rediss://")) {
            return Err(QueueError::Invalid(
                "the Redis URL must start with redis:// or rediss://".into(),
            ));
        }
        if config.prefix.is_empty() || config.prefix.contains([':', '{', '}']) {
            return Err(QueueError::Invalid(
                "the key prefix must be non-empty, without ':' or braces".into(),
            ));
        }
        let timed_out = || {
            unavailable(format!(
                "connecting to {} timed out after {:?}",
                redacted(&config.url),
                config.connect_timeout
            ))
        };
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| QueueError::Invalid(format!("the Redis URL: {e}")))?;
        let manager = ConnectionManagerConfig::new()
            .set_number_of_retries(RECONNECT_TRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY)
            .set_connection_timeout(Some(config.connect_timeout.min(config.command_timeout)))
            // Every call is bounded by the command timeout already.
            .set_response_timeout(None);
        let redis = tokio::time::timeout(
            config.connect_timeout,
            ConnectionManager::new_with_config(client, manager),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(unavailable)?;
        let opts = RedisConnectionOptions::new().url(config.url.clone());
        let conn = tokio::time::timeout(
            config.connect_timeout,
            RedisConnection::new_managed_only(&opts),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(from_bullmq)?;
        let engine = BullEngine {
            owner: uuid::Uuid::new_v4().to_string(),
            config,
            redis,
            conn,
            scripts: Scripts::get(),
            watches: WatchRegistry::default(),
            signals: Mutex::new(HashMap::new()),
            listeners: Mutex::new(HashMap::new()),
            stop_listeners: watch::channel(false).0,
            queues: tokio::sync::Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        };
        let mut c = engine.redis.clone();
        engine
            .io(engine.scripts.load(&mut c))
            .await
            .map_err(|e| match e {
                QueueError::Unavailable(m) => QueueError::Unavailable(m),
                other => other,
            })?;
        Ok(Arc::new(engine))
    }

    /// Redis's `maxmemory-policy`. BullMQ needs `noeviction`: under any other policy Redis may
    /// silently drop job keys when memory runs short.
    ///
    /// # Errors
    /// When Redis cannot be reached, or refuses `CONFIG GET` (some managed services do).
    pub async fn maxmemory_policy(&self) -> Result<String> {
        let mut c = self.redis.clone();
        let reply: Vec<String> = self
            .io(redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async(&mut c))
            .await?;
        Ok(reply.get(1).cloned().unwrap_or_default())
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    fn keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(queue, Some(&self.config.prefix))
    }

    /// Runs one Redis operation under the command timeout, translating its error.
    async fn io<T>(&self, op: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        match tokio::time::timeout(self.config.command_timeout, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable(format!(
                "no answer within {:?}",
                self.config.command_timeout
            ))),
        }
    }

    /// Runs a pipeline (or transaction) that calls scripts; if Redis lost its script cache (a
    /// restart), loads the scripts and runs it once more.
    async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        let mut c = self.redis.clone();
        let first = tokio::time::timeout(self.config.command_timeout, pipe.query_async(&mut c))
            .await
            .map_err(|_| unavailable("no answer in time"))?;
        match first {
            Err(e) if scripts::is_noscript(&e) => {
                self.io(self.scripts.load(&mut c)).await?;
                self.io(pipe.query_async(&mut c)).await
            }
            other => self.io(async { other }).await,
        }
    }

    /// Runs one script call.
    async fn eval(&self, cmd: redis::Cmd) -> Result<Value> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let mut out: Vec<Value> = self.query(&pipe).await?;
        out.pop()
            .ok_or_else(|| unavailable("empty reply to a script call"))
    }

    /// The crate's queue handle for the operator calls, made once per queue.
    async fn queue(&self, name: &str) -> Result<bullmq::Queue> {
        let mut map = self.queues.lock().await;
        if let Some(q) = map.get(name) {
            return Ok(q.clone());
        }
        let opts = bullmq::QueueOptions::new().prefix(self.config.prefix.clone());
        let q = tokio::time::timeout(
            self.config.command_timeout,
            bullmq::Queue::with_connection(name, self.conn.clone(), opts),
        )
        .await
        .map_err(|_| unavailable("no answer in time"))?
        .map_err(from_bullmq)?;
        map.insert(name.to_owned(), q.clone());
        Ok(q)
    }

    fn signal(&self, queue: &str) -> watch::Sender<u64> {
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(queue.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    fn wake(&self, queue: &str) {
        self.signal(queue).send_modify(|v| *v += 1);
    }

    fn changed(&self, queue: &str, id: &str) {
        self.watches.notify(queue, id);
    }

    /// Reads jobs' hashes by id, all in one known placement; ids whose hash is gone are skipped.
    async fn read_many(&self, queue: &str, ids: &[(String, Placement)]) -> Result<Vec<Job>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys(queue);
        let mut pipe = redis::pipe();
        for (id, _) in ids {
            pipe.cmd("HGETALL").arg(keys.job_key(id));
        }
        let hashes: Vec<HashMap<String, String>> = self.query(&pipe).await?;
        let mut out = Vec::with_capacity(ids.len());
        for ((id, placement), fields) in ids.iter().zip(hashes) {
            if !fields.is_empty() {
                out.push(codec::job_from_hash(queue, id, &fields, *placement)?);
            }
        }
        Ok(out)
    }

    /// Where a job is, and when it comes due if delayed; `None` if the job does not exist.
    async fn locate(&self, queue: &str, id: &str) -> Result<Option<Job>> {
        let keys = self.keys(queue);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(keys.job_key(id))
            .cmd("ZSCORE")
            .arg(keys.completed())
            .arg(id)
            .cmd("ZSCORE")
            .arg(keys.failed())
            .arg(id)
            .cmd("ZSCORE")
            .arg(keys.delayed())
            .arg(id)
            .cmd("LPOS")
            .arg(keys.active())
            .arg(id)
            .cmd("HEXISTS")
            .arg(keys.meta())
            .arg("paused");
        type Reply = (
            HashMap<String, String>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<i64>,
            bool,
        );
        let (fields, completed, failed, delayed, active, paused): Reply = self.query(&pipe).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let placement = if completed.is_some() {
            Placement {
                state: JobState::Completed,
                due_ms: None,
            }
        } else if failed.is_some() {
            Placement {
                state: JobState::Failed,
                due_ms: None,
            }
        } else if let Some(score) = delayed {
            Placement {
                state: JobState::Delayed,
                due_ms: Some((score / 4096.0).floor() as i64),
            }
        } else if active.is_some() {
            Placement {
                state: JobState::Active,
                due_ms: None,
            }
        } else {
            Placement {
                state: if paused {
                    JobState::Paused
                } else {
                    JobState::Waiting
                },
                due_ms: None,
            }
        };
        codec::job_from_hash(queue, id, &fields, placement).map(Some)
    }

    /// Runs the stalled-job script and rings the bells of the jobs it moved.
    async fn reap(&self, queue: &str, max_stalled: u32) -> Result<u64> {
        let k = self.keys(queue);
        let cmd = self.scripts.reap_stalled.cmd(
            &[
                k.active(),
                k.wait(),
                k.meta(),
                k.marker(),
                k.events(),
                k.failed(),
                k.stalled(),
                k.get("metrics:failed"),
            ],
            &[
                k.key_prefix(),
                self.config.clock.now_ms().to_string(),
                max_stalled.to_string(),
            ],
        );
        let reply = self.eval(cmd).await?;
        let lists: Vec<Vec<String>> = redis::from_redis_value(reply)
            .map_err(|e| QueueError::Corrupt(format!("reapStalled reply: {e}")))?;
        let mut n = 0;
        for (i, ids) in lists.iter().enumerate() {
            for id in ids {
                self.changed(queue, id);
                n += 1;
            }
            if i == 0 && !ids.is_empty() {
                self.wake(queue);
            }
        }
        Ok(n)
    }

    /// Checks that `claimed`'s token still holds the job's lock.
    async fn holds_lock(&self, claimed: &ClaimedJob) -> Result<bool> {
        let lock = format!(
            "{}:lock",
            self.keys(&claimed.job.queue).job_key(&claimed.job.id)
        );
        let mut c = self.redis.clone();
        let held: Option<String> = self
            .io(redis::cmd("GET").arg(lock).query_async(&mut c))
            .await?;
        Ok(held.as_deref() == Some(claimed.token.as_str()))
    }

    fn lease_lost(claimed: &ClaimedJob) -> QueueError {
        QueueError::LeaseLost {
            queue: claimed.job.queue.clone(),
            job_id: claimed.job.id.clone(),
        }
    }

    /// Maps a move script's status reply: 0 or more is success; the lock and state codes mean
    /// the lease is gone.
    fn check_move(claimed: &ClaimedJob, reply: &Value, script: &str) -> Result<()> {
        match codec::value_int(reply) {
            Some(code) if code >= 0 => Ok(()),
            // -1 missing job, -2 missing lock, -3 not active, -6 lock held by another token.
            Some(-1 | -2 | -3 | -6) => Err(Self::lease_lost(claimed)),
            Some(code) => Err(QueueError::Corrupt(format!(
                "{script} answered {code} for job {}/{}",
                claimed.job.queue, claimed.job.id
            ))),
            // A non-integer reply is a fetch-next's answer, parsed by the caller.
            None => Ok(()),
        }
    }

    /// Ends an attempt as completed or failed for good, with BullMQ's `moveToFinished`. With
    /// `next_lease_ms`, the script also takes the queue's next ready job (fetch-next) and locks
    /// it with the finishing attempt's token, as Node's workers do: one token is held by one
    /// job at a time, since it passes on only when its job is finished.
    async fn move_to_finished(
        &self,
        claimed: &ClaimedJob,
        completed: bool,
        value: &str,
        next_lease_ms: Option<u64>,
    ) -> Result<Option<ClaimOne>> {
        let job = &claimed.job;
        let k = self.keys(&job.queue);
        let (target, field, keep, metrics) = if completed {
            (
                k.completed(),
                "returnvalue",
                job.opts.remove_on_complete,
                k.get("metrics:completed"),
            )
        } else {
            (
                k.failed(),
                "failedReason",
                job.opts.remove_on_fail,
                k.get("metrics:failed"),
            )
        };
        let opts = codec::pack_finish_opts(
            &claimed.token,
            keep.unwrap_or(KeepJobs::FOREVER),
            next_lease_ms.unwrap_or(UNUSED_LOCK_MS),
            job.max_attempts(),
            "convoq",
        );
        let now = self.config.clock.now_ms().to_string();
        let cmd = self.scripts.move_to_finished.cmd(
            &[
                k.wait(),
                k.active(),
                k.prioritized(),
                k.events(),
                k.stalled(),
                k.limiter(),
                k.delayed(),
                k.paused(),
                k.meta(),
                k.pc(),
                target,
                k.job_key(&job.id),
                metrics,
                k.marker(),
            ],
            &[
                job.id.as_bytes(),
                now.as_bytes(),
                field.as_bytes(),
                value.as_bytes(),
                if completed { b"completed" } else { b"failed" },
                if next_lease_ms.is_some() { b"1" } else { b"0" },
                k.key_prefix().as_bytes(),
                &opts,
                b"",
            ],
        );
        let reply = self.eval(cmd).await?;
        if matches!(reply, Value::Array(_)) {
            return self
                .parse_claim(&job.queue, reply, claimed.token.clone())
                .map(Some);
        }
        Self::check_move(claimed, &reply, "moveToFinished").map(|()| None)
    }

    /// [`Engine::finish`], and [`Engine::finish_and_claim`] with `next_lease`.
    async fn end_attempt(
        &self,
        claimed: &ClaimedJob,
        outcome: Outcome,
        next_lease: Option<Duration>,
    ) -> Result<Option<ClaimedJob>> {
        let next_lease_ms = next_lease.map(|l| l.as_millis().max(1) as u64);
        let fetched;
        let job = &claimed.job;
        match outcome {
            Outcome::Completed(completion) => {
                if completion.effect.is_some() {
                    return Err(QueueError::Unsupported {
                        engine: "redis",
                        what: "transactional effects (insert on your own first, idempotently)",
                    });
                }
                if !completion.follow_ups.is_empty() {
                    // Follow-ups go in before the completion (at least once, deduplicated by
                    // their custom ids); but not for an attempt whose lease is already gone.
                    if !self.holds_lock(claimed).await? {
                        return Err(Self::lease_lost(claimed));
                    }
                    self.add_bulk(completion.follow_ups).await?;
                }
                let value = serde_json::to_string(&completion.result)
                    .map_err(|e| QueueError::Invalid(format!("job result: {e}")))?;
                fetched = self
                    .move_to_finished(claimed, true, &value, next_lease_ms)
                    .await?;
            }
            Outcome::Failed(error) => {
                let retry = error.is_retryable() && job.attempts_made < job.max_attempts();
                if retry {
                    let delay = job
                        .opts
                        .backoff
                        .map(|b| b.delay_for(job.attempts_made.max(1), rand::random::<f64>()))
                        .unwrap_or_default();
                    self.move_to_delayed(claimed, delay.as_millis() as u64, error.reason())
                        .await?;
                    self.wake(&job.queue);
                    fetched = None;
                } else {
                    fetched = self
                        .move_to_finished(claimed, false, error.reason(), next_lease_ms)
                        .await?;
                }
            }
        }
        self.changed(&job.queue, &job.id);
        match fetched {
            Some(ClaimOne::Job(next, None)) => {
                self.changed(&job.queue, &next.job.id);
                Ok(Some(*next))
            }
            Some(ClaimOne::Job(next, Some(reason))) => {
                // A failure BullMQ deferred to the next worker: fail it without running it.
                self.move_to_finished(&next, false, &reason, None).await?;
                self.changed(&job.queue, &next.job.id);
                Ok(None)
            }
            Some(ClaimOne::None(_)) | None => Ok(None),
        }
    }

    /// Ends an attempt with a retry after `delay_ms`, with BullMQ's `moveToDelayed` (which
    /// counts the attempt in `atm`, as Node's retries do).
    async fn move_to_delayed(
        &self,
        claimed: &ClaimedJob,
        delay_ms: u64,
        reason: &str,
    ) -> Result<()> {
        let job = &claimed.job;
        let k = self.keys(&job.queue);
        let now = self.config.clock.now_ms().to_string();
        let delay = delay_ms.to_string();
        let fields = codec::pack_fields(&[("failedReason", reason)]);
        let opts = codec::pack_delay_opts(&claimed.token, UNUSED_LOCK_MS);
        let cmd = self.scripts.move_to_delayed.cmd(
            &[
                k.marker(),
                k.active(),
                k.prioritized(),
                k.delayed(),
                k.job_key(&job.id),
                k.events(),
                k.meta(),
                k.stalled(),
                k.wait(),
                k.limiter(),
                k.pc(),
            ],
            &[
                k.key_prefix().as_bytes(),
                now.as_bytes(),
                job.id.as_bytes(),
                claimed.token.as_bytes(),
                delay.as_bytes(),
                b"0",
                &fields,
                b"0",
                &opts,
            ],
        );
        let reply = self.eval(cmd).await?;
        Self::check_move(claimed, &reply, "moveToDelayed")
    }

    /// Parses one `moveToActive` reply: a claimed job, or when none was ready, the time the
    /// next delayed job comes due (0 for none).
    fn parse_claim(&self, queue: &str, reply: Value, token: String) -> Result<ClaimOne> {
        let Value::Array(items) = reply else {
            return Err(QueueError::Corrupt(format!(
                "moveToActive answered {reply:?}"
            )));
        };
        match items.as_slice() {
            [Value::Array(pairs), id, ..] => {
                let id = codec::value_str(id).unwrap_or_default();
                let fields = codec::pairs_to_map(pairs);
                let placement = Placement {
                    state: JobState::Active,
                    due_ms: None,
                };
                let deferred = fields.get("defa").cloned();
                let job = codec::job_from_hash(queue, &id, &fields, placement)?;
                Ok(ClaimOne::Job(Box::new(ClaimedJob { job, token }), deferred))
            }
            [_, _, _, next] => Ok(ClaimOne::None(codec::value_int(next).filter(|t| *t > 0))),
            _ => Err(QueueError::Corrupt(format!(
                "moveToActive answered {items:?}"
            ))),
        }
    }

    fn claim_cmd(&self, k: &QueueKeys, token: &str, lease_ms: u64, now: &str) -> redis::Cmd {
        let opts = codec::pack_active_opts(token, lease_ms, "convoq");
        self.scripts.move_to_active.cmd(
            &[
                k.wait(),
                k.active(),
                k.prioritized(),
                k.events(),
                k.stalled(),
                k.limiter(),
                k.delayed(),
                k.paused(),
                k.meta(),
                k.pc(),
                k.marker(),
            ],
            &[k.key_prefix().as_bytes(), now.as_bytes(), &opts],
        )
    }
}

/// One `moveToActive` reply.
enum ClaimOne {
    /// A job, with its deferred failure reason if BullMQ set one.
    Job(Box<ClaimedJob>, Option<String>),
    /// No job was ready; when the next delayed one comes due.
    None(Option<i64>),
}

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
        self.config.clock.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            transactional_effects: false,
            leases_follow_clock: false,
            fetch_next: true,
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
        let mut pipe = redis::pipe();
        pipe.atomic();
        let now = self.config.clock.now_ms();
        for job in &jobs {
            let k = self.keys(&job.queue);
            let custom = job.opts.job_id.as_deref().unwrap_or("");
            if !custom.is_empty() {
                check_custom_id(custom)?;
                pipe.cmd("EXISTS").arg(k.job_key(custom));
            }
            let args = codec::pack_add_args(&k.key_prefix(), custom, &job.name, now);
            let data = serde_json::to_string(&job.data)
                .map_err(|e| QueueError::Invalid(format!("job data: {e}")))?;
            let opts = codec::pack_job_opts(&job.opts);
            let argv: [&[u8]; 3] = [&args, data.as_bytes(), &opts];
            let cmd = if job.opts.delay.unwrap_or(0) > 0 {
                self.scripts.add_delayed.cmd(
                    &[
                        k.marker(),
                        k.meta(),
                        k.id(),
                        k.delayed(),
                        k.completed(),
                        k.events(),
                    ],
                    &argv,
                )
            } else if job.opts.priority.unwrap_or(0) > 0 {
                self.scripts.add_prioritized.cmd(
                    &[
                        k.marker(),
                        k.meta(),
                        k.id(),
                        k.prioritized(),
                        k.delayed(),
                        k.completed(),
                        k.active(),
                        k.events(),
                        k.pc(),
                    ],
                    &argv,
                )
            } else {
                self.scripts.add_standard.cmd(
                    &[
                        k.wait(),
                        k.paused(),
                        k.meta(),
                        k.id(),
                        k.completed(),
                        k.delayed(),
                        k.active(),
                        k.events(),
                        k.marker(),
                    ],
                    &argv,
                )
            };
            pipe.add_command(cmd);
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        let mut replies = replies.into_iter();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let existed = match job.opts.job_id {
                Some(_) => replies.next().and_then(|v| codec::value_int(&v)) == Some(1),
                None => false,
            };
            let reply = replies
                .next()
                .ok_or_else(|| unavailable("short reply to an add"))?;
            let id = match codec::value_int(&reply) {
                Some(code) if code < 0 => {
                    return Err(QueueError::Invalid(format!(
                        "BullMQ refused the job (code {code})"
                    )))
                }
                _ => codec::value_str(&reply).unwrap_or_default(),
            };
            self.wake(&job.queue);
            self.changed(&job.queue, &id);
            if existed {
                let stored = self.locate(&job.queue, &id).await?.ok_or_else(|| {
                    QueueError::Unavailable(format!("job {id} vanished right after its add"))
                })?;
                out.push(Added {
                    job: stored,
                    created: false,
                });
                continue;
            }
            let run_at = job.due_at(now);
            out.push(Added {
                job: job.into_stored(id, now, run_at),
                created: true,
            });
        }
        Ok(out)
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
        if limit == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys(queue);
        let (start, stop) = (offset as isize, (offset + limit - 1) as isize);
        let mut c = self.redis.clone();
        let at = |state| Placement {
            state,
            due_ms: None,
        };
        let ids: Vec<(String, Placement)> = match state {
            JobState::Completed | JobState::Failed => {
                let key = if state == JobState::Completed {
                    k.completed()
                } else {
                    k.failed()
                };
                let ids: Vec<String> = self
                    .io(redis::cmd("ZREVRANGE")
                        .arg(key)
                        .arg(start)
                        .arg(stop)
                        .query_async(&mut c))
                    .await?;
                ids.into_iter().map(|id| (id, at(state))).collect()
            }
            JobState::Delayed => {
                let ids: Vec<(String, f64)> = self
                    .io(redis::cmd("ZRANGE")
                        .arg(k.delayed())
                        .arg(start)
                        .arg(stop)
                        .arg("WITHSCORES")
                        .query_async(&mut c))
                    .await?;
                ids.into_iter()
                    .map(|(id, score)| {
                        let due = Some((score / 4096.0).floor() as i64);
                        (id, Placement { state, due_ms: due })
                    })
                    .collect()
            }
            JobState::Active => {
                let ids: Vec<String> = self
                    .io(redis::cmd("LRANGE")
                        .arg(k.active())
                        .arg(start)
                        .arg(stop)
                        .query_async(&mut c))
                    .await?;
                ids.into_iter()
                    .filter(|id| !id.starts_with("0:"))
                    .map(|id| (id, at(state)))
                    .collect()
            }
            JobState::Waiting | JobState::Paused => {
                let paused = self.is_paused(queue).await?;
                if paused != (state == JobState::Paused) {
                    return Ok(Vec::new());
                }
                self.ready_ids(&k, offset, limit)
                    .await?
                    .into_iter()
                    .map(|id| (id, at(state)))
                    .collect()
            }
        };
        self.read_many(queue, &ids).await
    }

    async fn counts(&self, queue: &str) -> Result<QueueCounts> {
        let k = self.keys(queue);
        let mut pipe = redis::pipe();
        pipe.cmd("LLEN")
            .arg(k.wait())
            .cmd("LLEN")
            .arg(k.paused())
            .cmd("ZCARD")
            .arg(k.prioritized())
            .cmd("LLEN")
            .arg(k.active())
            .cmd("ZCARD")
            .arg(k.delayed())
            .cmd("ZCARD")
            .arg(k.completed())
            .cmd("ZCARD")
            .arg(k.failed())
            .cmd("HEXISTS")
            .arg(k.meta())
            .arg("paused")
            .cmd("HGET")
            .arg(k.get("metrics:completed"))
            .arg("count")
            .cmd("HGET")
            .arg(k.get("metrics:failed"))
            .arg("count");
        type Reply = (
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            bool,
            Option<u64>,
            Option<u64>,
        );
        let (wait, legacy_paused, prioritized, active, delayed, completed, failed, paused, ct, ft): Reply =
            self.query(&pipe).await?;
        let ready = wait + legacy_paused + prioritized;
        Ok(QueueCounts {
            waiting: if paused { 0 } else { ready },
            paused: if paused { ready } else { 0 },
            active,
            delayed,
            completed,
            failed,
            completed_total: ct.unwrap_or(0).max(completed),
            failed_total: ft.unwrap_or(0).max(failed),
        })
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
        let job = self
            .locate(queue, id)
            .await?
            .ok_or_else(|| QueueError::Invalid(format!("no job {id} in queue {queue}")))?;
        if job.state != JobState::Failed {
            return Err(QueueError::WrongState {
                job_id: id.to_owned(),
                state: job.state.to_string(),
            });
        }
        let q = self.queue(queue).await?;
        let op = async {
            let Some(mut j) = q.get_job(id).await? else {
                return Ok(());
            };
            let opts = bullmq::RetryOptions {
                reset_attempts_made: true,
                reset_attempts_started: true,
            };
            j.retry("failed", Some(opts)).await
        };
        tokio::time::timeout(self.config.command_timeout, op)
            .await
            .map_err(|_| unavailable("no answer in time"))?
            .map_err(|e| match e {
                // reprocessJob's -3: the job left the failed set meanwhile.
                bullmq::Error::InvalidConfig(m) if m.contains("-3") => QueueError::WrongState {
                    job_id: id.to_owned(),
                    state: "not failed".into(),
                },
                other => from_bullmq(other),
            })?;
        self.wake(queue);
        self.changed(queue, id);
        self.locate(queue, id)
            .await?
            .ok_or_else(|| QueueError::Invalid(format!("job {id} was removed meanwhile")))
    }

    async fn remove(&self, queue: &str, id: &str) -> Result<bool> {
        let Some(job) = self.locate(queue, id).await? else {
            return Ok(false);
        };
        if job.state == JobState::Active {
            return Err(QueueError::WrongState {
                job_id: id.to_owned(),
                state: job.state.to_string(),
            });
        }
        let q = self.queue(queue).await?;
        let removed = tokio::time::timeout(self.config.command_timeout, q.remove(id))
            .await
            .map_err(|_| unavailable("no answer in time"))?
            .map_err(from_bullmq)?;
        self.changed(queue, id);
        Ok(removed)
    }

    async fn history(&self, queue: &str, id: &str) -> Result<Option<Vec<JobEvent>>> {
        Ok(self.locate(queue, id).await?.map(|j| history::derive(&j)))
    }

    async fn claim(&self, queue: &str, max: usize, lease: Duration) -> Result<ClaimBatch> {
        let k = self.keys(queue);
        let lease_ms = lease.as_millis().max(1) as u64;
        let mut batch = ClaimBatch::default();
        let mut want = 1usize;
        let max = max.clamp(1, MAX_CLAIM);
        while batch.jobs.len() < max {
            let now = self.config.clock.now_ms().to_string();
            let mut pipe = redis::pipe();
            let tokens: Vec<String> = (0..want).map(|_| new_token()).collect();
            for token in &tokens {
                pipe.add_command(self.claim_cmd(&k, token, lease_ms, &now));
            }
            let replies: Vec<Value> = self.query(&pipe).await?;
            let mut drained = false;
            for (reply, token) in replies.into_iter().zip(tokens) {
                match self.parse_claim(queue, reply, token)? {
                    ClaimOne::Job(claimed, None) => {
                        self.changed(queue, &claimed.job.id);
                        batch.jobs.push(*claimed);
                    }
                    ClaimOne::Job(claimed, Some(reason)) => {
                        // A failure BullMQ deferred to the next worker (a Node stalled check):
                        // fail the job without running it, as Node workers do.
                        self.move_to_finished(&claimed, false, &reason, None)
                            .await?;
                        self.changed(queue, &claimed.job.id);
                    }
                    ClaimOne::None(next) => {
                        drained = true;
                        batch.next_due_ms = next;
                    }
                }
            }
            if drained {
                break;
            }
            want = max - batch.jobs.len();
        }
        if !batch.jobs.is_empty() {
            batch.next_due_ms = None;
        }
        Ok(batch)
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
        let job = &claimed.job;
        let k = self.keys(&job.queue);
        let job_key = k.job_key(&job.id);
        let cmd = self.scripts.move_to_wait.cmd(
            &[
                k.active(),
                k.wait(),
                k.stalled(),
                k.paused(),
                k.meta(),
                k.limiter(),
                k.prioritized(),
                k.marker(),
                k.events(),
            ],
            &[job.id.as_str(), claimed.token.as_str(), job_key.as_str()],
        );
        let reply = self.eval(cmd).await?;
        Self::check_move(claimed, &reply, "moveJobFromActiveToWait")?;
        // The released attempt does not count: take back the start moveToActive counted.
        let mut c = self.redis.clone();
        let _: i64 = self
            .io(redis::cmd("HINCRBY")
                .arg(&job_key)
                .arg("ats")
                .arg(-1)
                .query_async(&mut c))
            .await?;
        self.wake(&job.queue);
        self.changed(&job.queue, &job.id);
        Ok(())
    }

    async fn reap_stalled(&self, queue: &str, max_stalled: u32) -> Result<u64> {
        self.reap(queue, max_stalled).await
    }

    async fn prune(&self, queue: &str) -> Result<u64> {
        let k = self.keys(queue);
        let now = self.config.clock.now_ms();
        let mut doomed = Vec::new();
        for completed in [true, false] {
            let set = if completed { k.completed() } else { k.failed() };
            let mut c = self.redis.clone();
            let total: u64 = self
                .io(redis::cmd("ZCARD").arg(&set).query_async(&mut c))
                .await?;
            let oldest: Vec<(String, f64)> = self
                .io(redis::cmd("ZRANGE")
                    .arg(&set)
                    .arg(0)
                    .arg(PRUNE_SCAN - 1)
                    .arg("WITHSCORES")
                    .query_async(&mut c))
                .await?;
            if oldest.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for (id, _) in &oldest {
                pipe.cmd("HGET").arg(k.job_key(id)).arg("opts");
            }
            let opts: Vec<Option<String>> = self.query(&pipe).await?;
            for (i, ((id, finished), raw)) in oldest.into_iter().zip(opts).enumerate() {
                let o = codec::opts_from_json(raw.as_ref());
                let keep = if completed {
                    o.remove_on_complete
                } else {
                    o.remove_on_fail
                };
                let newer = total.saturating_sub(i as u64 + 1);
                let prune = match keep.unwrap_or(KeepJobs::FOREVER) {
                    KeepJobs::RemoveAtOnce => true,
                    KeepJobs::Keep { count, age_secs } => {
                        count.is_some_and(|c| newer >= c)
                            || age_secs.is_some_and(|a| (finished as i64) < now - a as i64 * 1000)
                    }
                };
                if prune {
                    doomed.push(id);
                }
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let q = self.queue(queue).await?;
        let mut removed = 0;
        for id in doomed {
            let gone = tokio::time::timeout(self.config.command_timeout, q.remove(&id))
                .await
                .map_err(|_| unavailable("no answer in time"))?
                .map_err(from_bullmq)?;
            removed += gone as u64;
            self.changed(queue, &id);
        }
        Ok(removed)
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

impl BullEngine {
    /// Ready jobs' ids in run order: the wait list from its consuming end, then the prioritized
    /// set by priority, from `offset`, at most `limit`.
    async fn ready_ids(&self, k: &QueueKeys, offset: u64, limit: u64) -> Result<Vec<String>> {
        let mut c = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("LLEN").arg(k.wait()).cmd("LLEN").arg(k.paused());
        let (wait_len, legacy_len): (u64, u64) = self.query(&pipe).await?;
        let mut ids = Vec::new();
        let mut offset = offset;
        let mut limit = limit;
        for (key, len) in [(k.wait(), wait_len), (k.paused(), legacy_len)] {
            if limit == 0 {
                break;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            // Run order is from the list's tail: run position p is list index len-1-p.
            let last = (offset + limit).min(len) - 1;
            let from = (len - 1 - last) as isize;
            let to = (len - 1 - offset) as isize;
            let mut part: Vec<String> = self
                .io(redis::cmd("LRANGE")
                    .arg(key)
                    .arg(from)
                    .arg(to)
                    .query_async(&mut c))
                .await?;
            part.reverse();
            limit -= part.len() as u64;
            offset = 0;
            ids.extend(part.into_iter().filter(|id| !id.starts_with("0:")));
        }
        if limit > 0 {
            let part: Vec<String> = self
                .io(redis::cmd("ZRANGE")
                    .arg(k.prioritized())
                    .arg(offset as isize)
                    .arg((offset + limit - 1) as isize)
                    .query_async(&mut c))
                .await?;
            ids.extend(part);
        }
        Ok(ids)
    }
}
