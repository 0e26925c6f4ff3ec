//! Behaviour specific to the SQL engine on Postgres (what both dialects share is tested in
//! `sql_engine.rs`): batched completions across several writers, lease renewals beside them,
//! schema upgrades, migrations of processes
//! starting together, wake-ups through LISTEN/NOTIFY between engines (processes), the poll-only
//! setting, connections the server kills, and histories read by another engine.
//!
//! Runs when `CONVOQ_TEST_POSTGRES_URL` is set; each test gets its own database.

mod pg;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use convoq_queue::sql::{SqlConfig, SqlEngine};
use convoq_queue::{
    Completion, Engine, JobEventKind, JobState, NewJob, Outcome, ProcessError, Processor,
    QueueError, Queues, WorkerOptions,
};
use serde_json::json;
use sqlx::Connection;

const Q: &str = "sql";
const LEASE: Duration = Duration::from_secs(30);

/// A fresh database, or `None` (skipped).
async fn database() -> Option<(pg::Databases, String)> {
    let dbs = pg::Databases::new(pg::admin_url()?);
    let url = dbs.create().await;
    Some((dbs, url))
}

async fn engine(url: &str) -> Arc<SqlEngine> {
    SqlEngine::connect(SqlConfig::new(url)).await.unwrap()
}

/// Many plain completions in flight at once: each is applied exactly once, and a second
/// completion with the same token is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_plain_completions_are_fenced_one_by_one() {
    let Some((_dbs, url)) = database().await else {
        return;
    };
    let engine = engine(&url).await;
    let queues = Queues::new(engine.clone());
    queues
        .add_bulk((0..300).map(|i| NewJob::new(Q, "w", json!(i))).collect())
        .await
        .unwrap();
    let claimed = engine.claim(Q, 300, LEASE).await.unwrap().jobs;
    assert_eq!(claimed.len(), 300);
    let mut tasks = Vec::new();
    for c in claimed.iter().cloned() {
        let e = engine.clone();
        tasks.push(tokio::spawn(async move {
            let n = c.job.data.as_i64().unwrap();
            let mut stale = c.clone();
            if n % 10 == 0 {
                stale.token = "stale".into();
            }
            let r1 = e
                .finish(
                    &stale,
                    Outcome::Completed(Completion::with_result(json!(n))),
                )
                .await;
            let r2 = e
                .finish(&c, Outcome::Completed(Completion::with_result(json!(n))))
                .await;
            (n, r1.is_ok(), r2.is_ok())
        }));
    }
    for t in tasks {
        let (n, first, second) = t.await.unwrap();
        if n % 10 == 0 {
            assert!(!first && second, "job {n}: the stale token is fenced");
        } else {
            assert!(first && !second, "job {n}: the second completion is fenced");
        }
    }
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!(
        (counts.completed, counts.completed_total, counts.active),
        (300, 300, 0)
    );
    let j = queues.get(Q, &claimed[7].job.id).await.unwrap().unwrap();
    assert_eq!(j.result, Some(json!(7)));
    engine.close().await;
}

/// A lease renewal never waits for a job row another transaction holds (a completion of it in
/// another writer's batch, say): waiting there is how a renewal and a completion, each holding
/// rows the other wants, deadlocked until Postgres broke the tie a second later. A held row
/// counts as still leased if its last committed version says so, and is renewed next time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_renewal_skips_rows_other_transactions_hold() {
    let Some((_dbs, url)) = database().await else {
        return;
    };
    let engine = engine(&url).await;
    let queues = Queues::new(engine.clone());
    queues
        .add_bulk((0..2).map(|i| NewJob::new(Q, "w", json!(i))).collect())
        .await
        .unwrap();
    let claimed = engine.claim(Q, 2, LEASE).await.unwrap().jobs;
    let leases: Vec<(String, String)> = claimed
        .iter()
        .map(|c| (c.job.id.clone(), c.token.clone()))
        .collect();
    let expiry = |id: String| {
        let url = url.clone();
        async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let at: i64 = sqlx::query_scalar(
                "SELECT lease_expires_at FROM cq_jobs WHERE queue = $1 AND id = $2",
            )
            .bind(Q)
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
            pool.close().await;
            at
        }
    };
    let (first, second) = (leases[0].0.clone(), leases[1].0.clone());
    let before = (expiry(first.clone()).await, expiry(second.clone()).await);

    // Another transaction holds the first job's row.
    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT 1 FROM cq_jobs WHERE queue = $1 AND id = $2 FOR UPDATE")
        .bind(Q)
        .bind(&first)
        .execute(&mut other)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let held = tokio::time::timeout(Duration::from_secs(5), engine.extend(Q, &leases, LEASE))
        .await
        .expect("the renewal waited for the row another transaction holds")
        .unwrap();
    assert_eq!(held, vec![true, true]);
    assert_eq!(
        expiry(first.clone()).await,
        before.0,
        "the held row is left as it was"
    );
    assert!(
        expiry(second.clone()).await > before.1,
        "the other lease is renewed"
    );

    // Once the other transaction ends, the next renewal takes the first job's row too.
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        engine.extend(Q, &leases, LEASE).await.unwrap(),
        vec![true, true]
    );
    assert!(expiry(first).await > before.0);

    // A lease that is no longer held is still reported lost.
    let stale = vec![(second, "not-the-token".to_owned())];
    assert_eq!(engine.extend(Q, &stale, LEASE).await.unwrap(), vec![false]);
    engine.close().await;
}

/// Schema steps 4 (the `seq` index dropped, `(queue, id)` the primary key) and 5 (lifetime
/// totals spread over shards) upgrade a database that holds jobs in every state and totals, and
/// the engine goes on with them.
#[tokio::test]
async fn steps_4_and_5_upgrade_a_database_holding_jobs() {
    let Some((_dbs, url)) = database().await else {
        return;
    };
    let engine = engine(&url).await;
    let queues = Queues::new(engine.clone());
    for n in 0..4 {
        queues.add(NewJob::new(Q, "w", json!(n))).await.unwrap();
    }
    let done = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine
        .finish(&done, Outcome::Completed(Completion::with_result(json!(1))))
        .await
        .unwrap();
    let active = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine.close().await;
    // Back to version 3's shape, as a database written by an older build is.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for step in [
        "INSERT INTO cq_queues (name, completed_total) \
         SELECT name, SUM(completed_total) FROM cq_queue_totals GROUP BY name \
         ON CONFLICT (name) DO UPDATE SET completed_total = excluded.completed_total",
        "DROP TABLE cq_queue_totals",
        "ALTER TABLE cq_jobs DROP CONSTRAINT cq_jobs_pkey, ADD PRIMARY KEY (seq), \
         ADD CONSTRAINT cq_jobs_queue_id_key UNIQUE (queue, id)",
        "DELETE FROM cq_schema WHERE version >= 4",
    ] {
        sqlx::query(step).execute(&pool).await.unwrap();
    }
    let engine = self::engine(&url).await;
    let pk: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
         ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = 'cq_jobs'::regclass AND i.indisprimary ORDER BY a.attname",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(pk, vec!["id", "queue"]);
    pool.close().await;
    let queues = Queues::new(engine.clone());
    let c = queues.counts(Q).await.unwrap();
    assert_eq!((c.completed, c.active, c.waiting), (1, 1, 2));
    assert_eq!(c.completed_total, 1, "the lifetime total carried over");
    engine
        .finish(
            &active,
            Outcome::Completed(Completion::with_result(json!(2))),
        )
        .await
        .unwrap();
    assert_eq!(queues.counts(Q).await.unwrap().completed_total, 2);
    let rest = engine.claim(Q, 10, LEASE).await.unwrap().jobs;
    assert_eq!(rest.len(), 2, "the waiting jobs are claimed, in order");
    assert_eq!(
        (rest[0].job.data.clone(), rest[1].job.data.clone()),
        (json!(2), json!(3))
    );
    engine.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_migrate_once() {
    let Some((_dbs, url)) = database().await else {
        return;
    };
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = SqlConfig::new(url);
            c.max_connections = 3;
            SqlEngine::connect(c).await.unwrap()
        }));
    }
    let mut engines = Vec::new();
    for t in tasks {
        engines.push(t.await.unwrap());
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM cq_schema ORDER BY version")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5], "each step recorded once");
    pool.close().await;
    for e in engines {
        e.close().await;
    }
}

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    // A port where nothing listens; no server is needed for this one.
    let err = SqlEngine::connect(SqlConfig::new("postgres://root@127.0.0.1:1/x"))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, QueueError::Unavailable(_)), "{err}");
}

struct Count(Arc<std::sync::atomic::AtomicUsize>);

#[async_trait]
impl Processor for Count {
    async fn process(&self, _: &convoq_queue::Job) -> Result<Completion, ProcessError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Completion::with_result(json!("done")))
    }
}

/// A job added by one engine (process) wakes an idle worker of another at once, through
/// NOTIFY; with notifications off, the other finds it by polling.
async fn wake_across_engines(notify: bool) -> Duration {
    let Some((_dbs, url)) = database().await else {
        return Duration::ZERO;
    };
    let producer = engine(&url).await;
    let mut c = SqlConfig::new(url.clone());
    c.notify = notify;
    let consumer = SqlEngine::connect(c).await.unwrap();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let poll = if notify {
        Duration::from_secs(60)
    } else {
        Duration::from_millis(300)
    };
    let pool = Queues::new(consumer.clone())
        .workers()
        .processor("w", Arc::new(Count(runs.clone())))
        .queue(
            Q,
            WorkerOptions {
                concurrency: 1,
                poll_interval: poll,
                ..WorkerOptions::default()
            },
        )
        .start();
    tokio::time::sleep(Duration::from_millis(300)).await; // let the worker go idle
    let producer_queues = Queues::new(producer.clone()).with_follow_poll(Duration::from_millis(50));
    let started = std::time::Instant::now();
    let id = producer_queues
        .add(NewJob::new(Q, "w", json!({})))
        .await
        .unwrap()
        .job
        .id;
    let done = producer_queues
        .wait_finished(Q, &id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(done.state, JobState::Completed);
    // The other engine reads the whole history.
    let kinds: Vec<_> = producer
        .history(Q, &id)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            JobEventKind::Waiting,
            JobEventKind::Active,
            JobEventKind::Completed
        ]
    );
    pool.shutdown(Duration::from_secs(1)).await;
    producer.close().await;
    consumer.close().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_a_worker_of_another_engine() {
    let took = wake_across_engines(true).await;
    assert!(
        took < Duration::from_secs(5),
        "woken in {took:?}, not by the 60 s poll"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_only_engine_still_finds_work() {
    wake_across_engines(false).await;
}

/// The server kills every connection of the engines (a restart, a failover, an idle reaper):
/// the next write succeeds on a new connection without an error reaching the caller, the
/// listener listens again, and an idle worker of the other engine is still woken at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_server_kills_are_reopened() {
    let Some((_dbs, url)) = database().await else {
        return;
    };
    let producer = engine(&url).await;
    let consumer = engine(&url).await;
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pool = Queues::new(consumer.clone())
        .workers()
        .processor("w", Arc::new(Count(runs.clone())))
        .queue(
            Q,
            WorkerOptions {
                concurrency: 1,
                // Only a notification (or the listener's wake-up after reconnecting) can wake it.
                poll_interval: Duration::from_secs(60),
                ..WorkerOptions::default()
            },
        )
        .start();
    let queues = Queues::new(producer.clone()).with_follow_poll(Duration::from_millis(50));
    let first = queues
        .add(NewJob::new(Q, "w", json!(1)))
        .await
        .unwrap()
        .job
        .id;
    queues
        .wait_finished(Q, &first, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("the first job runs");
    tokio::time::sleep(Duration::from_millis(300)).await; // let the worker go idle

    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    admin.close().await;
    assert!(
        killed >= 4,
        "writers, listeners and readers were connected: {killed}"
    );

    let started = std::time::Instant::now();
    let second = queues
        .add(NewJob::new(Q, "w", json!(2)))
        .await
        .expect("a write after the server dropped the connections")
        .job
        .id;
    let done = queues
        .wait_finished(Q, &second, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("the second job runs");
    assert_eq!(done.state, JobState::Completed);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "woken in {took:?}, not by the 60 s poll"
    );
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    pool.shutdown(Duration::from_secs(1)).await;
    producer.close().await;
    consumer.close().await;
}

/// A follower on one engine sees changes made by another engine, by polling the shared history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_sees_another_engines_changes() {
    let Some((_dbs, url)) = database().await else {
        return;
    };
    let a = engine(&url).await;
    let b = engine(&url).await;
    let qa = Queues::new(a.clone()).with_follow_poll(Duration::from_millis(50));
    let id = qa.add(NewJob::new(Q, "w", json!({}))).await.unwrap().job.id;
    let mut follower = qa.follow(Q, &id);
    assert_eq!(
        follower.next().await.unwrap().unwrap().kind,
        JobEventKind::Waiting
    );
    let c = b.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    b.finish(&c, Outcome::Failed(ProcessError::unrecoverable("no")))
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while let Some(e) = follower.next_within(Duration::from_secs(5)).await.unwrap() {
        kinds.push(e.kind);
    }
    assert_eq!(kinds, vec![JobEventKind::Active, JobEventKind::Failed]);
    a.close().await;
    b.close().await;
}
