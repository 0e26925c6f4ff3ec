//! The SQLite writer under faults: a lock held by another process, a panic in an effect or in
//! the writer itself. Every write is answered within the write timeout; a write answered
//! "unavailable" before the writer took it up is never committed; a panic fails what it
//! touched and the writer goes on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use convoq_queue::sql::{SqlConfig, SqlConn, SqlEngine, SqliteFile, TxEffect, WriterFault};
use convoq_queue::{
    Completion, Engine, JobState, NewJob, Outcome, ProcessError, QueueError, Queues,
};
use serde_json::json;

const Q: &str = "faults";
const LEASE: Duration = Duration::from_secs(30);

async fn engine(dir: &tempfile::TempDir, write_timeout: Duration) -> (Arc<SqlEngine>, String) {
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let mut config = SqlConfig::new(url.clone());
    config.write_timeout = write_timeout;
    (SqlEngine::connect(config).await.unwrap(), url)
}

fn jobs_in(url: &str) -> i64 {
    let conn = SqliteFile::from_url(url).unwrap().open().unwrap();
    conn.query_row("SELECT COUNT(*) FROM cq_jobs WHERE queue = ?", [Q], |r| {
        r.get(0)
    })
    .unwrap()
}

/// Holds SQLite's write lock from another connection (as another process would) until dropped.
struct HeldLock(rusqlite::Connection);

impl HeldLock {
    fn take(url: &str) -> HeldLock {
        let conn = SqliteFile::from_url(url).unwrap().open().unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        HeldLock(conn)
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = self.0.execute_batch("ROLLBACK");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_is_answered_within_the_write_timeout_and_commits_nothing_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(600);
    let (engine, url) = engine(&dir, timeout).await;
    let queues = Queues::new(engine.clone());
    queues.add(NewJob::new(Q, "w", json!(0))).await.unwrap();

    let lock = HeldLock::take(&url);
    // Twenty adds arriving over a second, as POSTs would: each answered within the timeout
    // (plus scheduling slack), none of them slowed by the others' failures.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let queues = queues.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * i)).await;
            let started = Instant::now();
            let r = queues.add(NewJob::new(Q, "w", json!(i))).await;
            (started.elapsed(), r)
        }));
    }
    for t in tasks {
        let (took, r) = t.await.unwrap();
        assert!(
            matches!(r, Err(QueueError::Unavailable(_))),
            "an add under a held lock: {r:?}"
        );
        assert!(
            took < timeout + Duration::from_millis(400),
            "answered after {took:?}, beyond the write timeout of {timeout:?}"
        );
    }
    let ping = engine.ping().await;
    drop(lock);

    // Once the lock is gone, adds go through at once; nothing refused was added behind its
    // caller's back.
    let started = Instant::now();
    queues
        .add(NewJob::new(Q, "w", json!("after")))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        jobs_in(&url),
        2,
        "only the two adds answered as added exist"
    );
    assert!(
        ping.is_ok(),
        "a lock held elsewhere is not the writer's failure: {ping:?}"
    );
}

/// An effect that panics: a bug in a processor's database work.
struct Panics;

#[async_trait]
impl TxEffect for Panics {
    async fn apply(&self, _conn: SqlConn<'_>, _now_ms: i64) -> Result<(), ProcessError> {
        panic!("the effect of a marked payload");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_effect_fails_its_own_attempt_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir, Duration::from_secs(5)).await;
    let queues = Queues::new(engine.clone());
    let mut opts = queues.defaults(Q);
    opts.attempts = Some(2);
    queues.set_defaults(Q, opts);
    let jobs: Vec<_> = (0..8).map(|i| NewJob::new(Q, "w", json!(i))).collect();
    queues.add_bulk(jobs).await.unwrap();
    let claimed = engine.claim(Q, 8, LEASE).await.unwrap().jobs;
    assert_eq!(claimed.len(), 8);
    // All eight end together, so that the panicking effect is in the others' batch.
    let results = futures::future::join_all(claimed.iter().enumerate().map(|(i, c)| {
        let mut completion = Completion::with_result(json!({ "i": i }));
        if i == 3 {
            completion.effect = Some(Arc::new(Panics));
        }
        engine.finish(c, Outcome::Completed(completion))
    }))
    .await;
    for (i, (c, r)) in claimed.iter().zip(results).enumerate() {
        let job = queues.get(Q, &c.job.id).await.unwrap().unwrap();
        if i == 3 {
            assert!(
                matches!(&r, Err(QueueError::EffectFailed(e)) if e.reason().contains("panicked")),
                "{r:?}"
            );
            // Retried by the job's rules: one attempt of two spent.
            assert_eq!(job.state, JobState::Delayed, "{job:?}");
            assert_eq!(job.attempts_made, 1);
        } else {
            assert!(r.is_ok(), "job {i}: {r:?}");
            assert_eq!(job.state, JobState::Completed, "job {i}");
        }
    }
    engine.ping().await.unwrap();
    queues
        .add(NewJob::new(Q, "w", json!("after")))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_panic_before_the_commit_refuses_the_batch_and_commits_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, url) = engine(&dir, Duration::from_secs(5)).await;
    let queues = Queues::new(engine.clone());
    engine.inject_fault(WriterFault::PanicBeforeApply);
    let r = queues.add(NewJob::new(Q, "w", json!(1)).with_id("a")).await;
    assert!(matches!(r, Err(QueueError::Unavailable(_))), "{r:?}");
    assert_eq!(jobs_in(&url), 0);
    // The writer goes on, on a new connection, and says it is ready.
    let added = queues
        .add(NewJob::new(Q, "w", json!(1)).with_id("a"))
        .await
        .unwrap();
    assert!(added.created);
    engine.ping().await.unwrap();
}

#[tokio::test]
async fn a_panic_after_the_commit_is_unavailable_and_a_retry_with_the_same_id_finds_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, url) = engine(&dir, Duration::from_secs(5)).await;
    let queues = Queues::new(engine.clone());
    engine.inject_fault(WriterFault::PanicAfterCommit);
    let r = queues.add(NewJob::new(Q, "w", json!(1)).with_id("b")).await;
    assert!(
        matches!(&r, Err(QueueError::Unavailable(m)) if m.contains("may or may not")),
        "never answered added, though it was: {r:?}"
    );
    assert_eq!(jobs_in(&url), 1, "the add had committed");
    let again = queues
        .add(NewJob::new(Q, "w", json!(1)).with_id("b"))
        .await
        .unwrap();
    assert!(!again.created, "the retry finds the committed job");
    assert_eq!(jobs_in(&url), 1);
    // The rest of the engine works on: a claim and a completion.
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine
        .finish(&c, Outcome::Completed(Completion::with_result(json!(null))))
        .await
        .unwrap();
    engine.ping().await.unwrap();
}
