//! Processing throughput of the BullMQ engine, the counterpart of Node BullMQ's
//! `bench-queue.js drain` (`/work/shared/bench/node-reference`): preload N jobs, then drain
//! them with a [`WorkerPool`] and time it.
//!
//! ```sh
//! cargo bench -p convoq-queue --features redis --bench redis -- --proc noop --n 20000 --c 10
//! cargo bench -p convoq-queue --features redis --bench redis -- --proc db   --n 20000 --c 10
//! ```
//!
//! `bench/redis.sh` runs it next to Node BullMQ on the same Redis in the same run.
//!
//! What it does, to match `bench-queue.js drain`:
//! - jobs named `create_conversation` with Node's payload (`{userId, title, personalityMode}`)
//!   and Node's default job options (3 attempts, exponential backoff from 1 s, keep 1,000
//!   completed and 5,000 failed), added with `add_bulk` in chunks of 1,000 under a fresh key
//!   prefix (`--prefix`, default `cqbench-<random>`, queue `database`), deleted at the end;
//! - a worker pool on queue `database` with concurrency `--c` (default 10);
//! - `--proc noop` returns Node's no-op result; `--proc db` runs Node's processor: one
//!   `INSERT INTO conversations (user_id, title, personality_mode) VALUES ($1, $2, $3)
//!   RETURNING id::text, created_at::text` on a Postgres pool of at most 10 connections (node-postgres's
//!   default), in the database `bench-queue.js` uses (`PGDATABASE`, default `bench`, table of
//!   `/work/shared/bench/sql/schema.sql`), truncated first;
//! - timed from the pool's start until N attempts were recorded as completed or failed (the
//!   observer's `finished`, called after the engine recorded the end, as Node's `completed`
//!   event follows `moveToFinished`).
//!
//! Prints one JSON line on stdout: jobs/s, the bench process's CPU (cores) and the Redis
//! server's CPU over the drain (`INFO cpu`), and what was left.
//!
//! Redis: `--redis-url` or `REDIS_PORT` (as Node's bench; default 6379 on 127.0.0.1).
//!
//! The bench runs on mimalloc, the allocator of the `convoq` binary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use convoq_queue::bullmq::{BullConfig, BullEngine};
use convoq_queue::{
    AttemptEnd, Backoff, BackoffKind, Completion, Engine, Job, JobOptions, KeepJobs, NewJob,
    ProcessError, Processor, Queues, WorkerObserver, WorkerOptions,
};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

/// The allocator of the `convoq` binary, so that the figures are those of the engine as it runs
/// there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const QUEUE: &str = "database";
const JOB_NAME: &str = "create_conversation";
/// Node's statement, with the returned columns cast to text (this crate's sqlx has no uuid or
/// chrono decoding; the cast costs nothing measurable).
const INSERT_SQL: &str = "INSERT INTO conversations (user_id, title, personality_mode) \
                          VALUES ($1, $2, $3) RETURNING id::text, created_at::text";

struct Args {
    n: usize,
    concurrency: usize,
    batch: usize,
    proc_db: bool,
    redis_url: String,
    prefix: String,
    pg_url: String,
    pg_pool_max: u32,
    timeout: Duration,
    listen_events: bool,
}

fn parse_args() -> Args {
    let port = std::env::var("REDIS_PORT").unwrap_or_else(|_| "6379".into());
    let db = std::env::var("PGDATABASE").unwrap_or_else(|_| "bench".into());
    let user = std::env::var("PGUSER").unwrap_or_else(|_| "root".into());
    let mut a = Args {
        n: 20_000,
        concurrency: 10,
        batch: 64,
        proc_db: false,
        redis_url: format!("redis://127.0.0.1:{port}"),
        prefix: format!("cqbench-{}", uuid::Uuid::new_v4().simple()),
        pg_url: format!("postgres://{user}@127.0.0.1:5432/{db}"),
        pg_pool_max: std::env::var("PG_POOL_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
        timeout: Duration::from_secs(300),
        listen_events: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // cargo bench passes it
        }
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--n" => a.n = value.parse().expect("--n"),
            "--c" => a.concurrency = value.parse().expect("--c"),
            "--batch" => a.batch = value.parse().expect("--batch"),
            "--proc" => {
                a.proc_db = match value.as_str() {
                    "db" => true,
                    "noop" => false,
                    other => panic!("--proc db|noop, not {other}"),
                }
            }
            "--redis-url" => a.redis_url = value,
            "--prefix" => a.prefix = value,
            "--pg-url" => a.pg_url = value,
            "--timeout" => a.timeout = Duration::from_secs(value.parse().expect("--timeout")),
            "--listen-events" => {
                a.listen_events = value.parse().expect("--listen-events true|false")
            }
            other => panic!(
                "unknown flag {other}; flags: --n N --c N --batch N --proc noop|db \
                 --redis-url URL --prefix P --pg-url URL --timeout SECS --listen-events BOOL"
            ),
        }
    }
    a
}

/// Node reference's `defaultJobOptions`.
fn node_job_options() -> JobOptions {
    JobOptions {
        attempts: Some(3),
        backoff: Some(Backoff {
            kind: BackoffKind::Exponential,
            delay: 1000,
            jitter: 0.0,
        }),
        remove_on_complete: Some(KeepJobs::Keep {
            count: Some(1000),
            age_secs: None,
        }),
        remove_on_fail: Some(KeepJobs::Keep {
            count: Some(5000),
            age_secs: None,
        }),
        ..JobOptions::default()
    }
}

/// Node reference's `jobPayload(i)`.
fn payload(i: usize) -> serde_json::Value {
    json!({
        "userId": format!("user-{}", i % 1000),
        "title": format!("Bench conversation {i}"),
        "personalityMode": "friendly",
    })
}

struct Noop(AtomicU64);

#[async_trait]
impl Processor for Noop {
    async fn process(&self, _job: &Job) -> Result<Completion, ProcessError> {
        let i = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Completion::with_result(json!({
            "success": true,
            "conversationId": format!("noop-{i}"),
            "createdAt": chrono::Utc::now().to_rfc3339(),
        })))
    }
}

struct Insert(PgPool);

#[async_trait]
impl Processor for Insert {
    async fn process(&self, job: &Job) -> Result<Completion, ProcessError> {
        let field = |k: &str| job.data.get(k).and_then(|v| v.as_str());
        let row = sqlx::query(INSERT_SQL)
            .bind(field("userId").unwrap_or_default())
            .bind(field("title").unwrap_or("New conversation"))
            .bind(field("personalityMode").unwrap_or("default"))
            .fetch_one(&self.0)
            .await
            .map_err(|e| ProcessError::retryable(e.to_string()))?;
        let id: String = row.get(0);
        let created: String = row.get(1);
        Ok(Completion::with_result(json!({
            "success": true,
            "conversationId": id,
            "createdAt": created,
        })))
    }
}

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    failed: AtomicU64,
    done: tokio::sync::Notify,
    target: AtomicU64,
}

impl WorkerObserver for Tally {
    fn finished(&self, _job: &Job, end: AttemptEnd, _elapsed: Duration, _error: Option<&str>) {
        match end {
            AttemptEnd::Completed => self.completed.fetch_add(1, Ordering::Relaxed),
            AttemptEnd::Failed => self.failed.fetch_add(1, Ordering::Relaxed),
            _ => return,
        };
        let ended = self.completed.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        if ended >= self.target.load(Ordering::Relaxed) {
            self.done.notify_one();
        }
    }
}

/// This process's CPU time (user + system), in seconds.
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The Redis server's CPU time (used_cpu_sys + used_cpu_user), in seconds.
async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| *k == "used_cpu_sys" || *k == "used_cpu_user")
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

async fn delete_prefix(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(conn)
                .await
                .expect("UNLINK");
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let client = redis::Client::open(args.redis_url.as_str()).expect("redis URL");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let mut config = BullConfig::new(args.redis_url.clone()).with_prefix(args.prefix.clone());
    config.listen_events = args.listen_events;
    let engine = BullEngine::connect(config).await.expect("BullMQ engine");
    let queues = Queues::new(engine.clone() as Arc<dyn Engine>);
    queues.set_defaults(QUEUE, node_job_options());

    let pg = if args.proc_db {
        let pool = PgPoolOptions::new()
            .max_connections(args.pg_pool_max)
            .connect(&args.pg_url)
            .await
            .expect("connect to Postgres");
        sqlx::query("TRUNCATE conversations")
            .execute(&pool)
            .await
            .expect("TRUNCATE conversations");
        Some(pool)
    } else {
        None
    };

    let preload = Instant::now();
    for start in (0..args.n).step_by(1000) {
        let jobs = (start..(start + 1000).min(args.n))
            .map(|i| NewJob::new(QUEUE, JOB_NAME, payload(i)))
            .collect();
        queues.add_bulk(jobs).await.expect("add_bulk");
    }
    let preload_s = preload.elapsed().as_secs_f64();

    let processor: Arc<dyn Processor> = match &pg {
        Some(pool) => Arc::new(Insert(pool.clone())),
        None => Arc::new(Noop(AtomicU64::new(0))),
    };
    let tally = Arc::new(Tally::default());
    tally.target.store(args.n as u64, Ordering::Relaxed);
    let opts = WorkerOptions {
        concurrency: args.concurrency,
        batch: args.batch,
        ..WorkerOptions::default()
    };

    let (cpu0, rcpu0) = (process_cpu(), redis_cpu(&mut admin).await);
    let t0 = Instant::now();
    let pool = queues
        .workers()
        .processor(JOB_NAME, processor)
        .queue(QUEUE, opts)
        .observer(tally.clone())
        .start();
    let finished = tokio::time::timeout(args.timeout, tally.done.notified())
        .await
        .is_ok();
    let seconds = t0.elapsed().as_secs_f64();
    let (cpu1, rcpu1) = (process_cpu(), redis_cpu(&mut admin).await);
    pool.shutdown(Duration::from_secs(5)).await;

    let completed = tally.completed.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let counts = queues.counts(QUEUE).await.expect("counts");
    let rows = match &pg {
        Some(pool) => {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
                .fetch_one(pool)
                .await
                .expect("count rows");
            Some(n)
        }
        None => None,
    };
    engine.close().await;
    delete_prefix(&mut admin, &args.prefix).await;

    let out = json!({
        "bench": "drain",
        "engine": "convoq-bullmq",
        "proc": if args.proc_db { "db" } else { "noop" },
        "concurrency": args.concurrency,
        "batch": args.batch,
        "listen_events": args.listen_events,
        "pg_pool_max": pg.as_ref().map(|_| args.pg_pool_max),
        "n": args.n,
        "finished": finished,
        "preload_seconds": (preload_s * 1000.0).round() / 1000.0,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "jobs_per_s": (completed as f64 / seconds).round(),
        "completed": completed,
        "failed": failed,
        "rows_in_db": rows,
        "left_in_queue": { "waiting": counts.waiting, "active": counts.active,
                           "delayed": counts.delayed, "failed": counts.failed },
        "cpu_cores": ((cpu1 - cpu0) / seconds * 100.0).round() / 100.0,
        "redis_cpu_cores": ((rcpu1 - rcpu0) / seconds * 100.0).round() / 100.0,
    });
    println!("{out}");
}
