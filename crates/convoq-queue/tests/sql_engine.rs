//! Behaviour of the SQL engine that both dialects share, one suite run on each: transactional
//! effects, group commit, refusing corrupt or foreign data without panicking, and a closed
//! engine. The SQLite cases always run; the Postgres ones when `CONVOQ_TEST_POSTGRES_URL` names
//! a server (each in a fresh database), and say they are skipped otherwise.
//!
//! What only one dialect does is tested in `sqlite_engine.rs` and `postgres_engine.rs`.

mod pg;
mod sqldb;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use convoq_queue::sql::SqlConfig;
use convoq_queue::sql::SqlEngine;
use convoq_queue::{
    AttemptEnd, Completion, Engine, Job, JobEventKind, JobState, NewJob, Outcome, ProcessError,
    Processor, QueueError, Queues, WorkerObserver, WorkerOptions,
};
use serde_json::json;
use sqldb::{completion, Db, HeldWriter, GROUP_CALLS, LEASE};

const Q: &str = "sql";

/// One `#[tokio::test]` per case and dialect, in modules `sqlite` and `postgres`.
macro_rules! on_both_dialects {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Db::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(db) = super::Db::postgres().await else {
                        return;
                    };
                    super::$case(db).await;
                }
            )*
        }
    };
}

on_both_dialects!(
    effect_commits_with_the_completion_or_not_at_all,
    concurrent_adds_share_commits,
    corrupt_rows_are_errors_not_panics,
    newer_schema_is_refused_with_a_clear_error,
    closed_engine_refuses_work,
    effect_only_jobs_complete_in_their_add,
);

/// Runs `w` jobs with the effect of [`completion`] (keyed by the job's `key`, failing for a
/// key starting with `bad`), or fails in the processor for a key starting with `err`; counts
/// its runs per key.
struct RunsFirst(Mutex<HashMap<String, usize>>);

#[async_trait]
impl Processor for RunsFirst {
    async fn process(&self, job: &Job) -> Result<Completion, ProcessError> {
        let key = job.data["key"].as_str().unwrap_or_default().to_owned();
        *self.0.lock().unwrap().entry(key.clone()).or_default() += 1;
        if key.starts_with("err") {
            return Err(ProcessError::unrecoverable("the processor refused it"));
        }
        let fail = key
            .starts_with("bad")
            .then(|| ProcessError::unrecoverable("unknown user u9"));
        match completion(&key, fail) {
            Outcome::Completed(c) => Ok(c),
            Outcome::Failed(e) => Err(e),
        }
    }
    fn effect_only(&self) -> bool {
        true
    }
}

/// Attempts reported to the pool's observer, by how they ended.
#[derive(Default)]
struct Seen(Mutex<Vec<(String, AttemptEnd, u32)>>, AtomicUsize);

impl WorkerObserver for Seen {
    fn started(&self, _job: &Job) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
    fn finished(&self, job: &Job, end: AttemptEnd, _: Duration, _: Option<&str>) {
        let key = job.data["key"].as_str().unwrap_or_default().to_owned();
        self.0.lock().unwrap().push((key, end, job.attempts_made));
    }
}

/// A job whose processor does nothing but return its completion
/// ([`Processor::effect_only`]), added while a worker of the process has a free slot, runs
/// first and is stored completed with its effect and follow-up in the add's own write; its
/// history and the worker's observer still show the attempt. A failed first run, or an effect
/// that fails with the add, leaves the job stored claimed, and the worker runs it by the usual
/// rules (the effect's failure recorded, nothing of it kept). (SQLite; on Postgres the job is
/// stored claimed and run by its worker: `Schedule::run_first`.)
async fn effect_only_jobs_complete_in_their_add(db: Db) {
    let engine = db.engine().await;
    let queues = Queues::new(engine.clone());
    let runs = Arc::new(RunsFirst(Mutex::default()));
    let seen = Arc::new(Seen::default());
    let opts = WorkerOptions {
        concurrency: 4,
        poll_interval: Duration::from_secs(60),
        ..WorkerOptions::default()
    };
    let pool = queues
        .workers()
        .processor("w", runs.clone())
        .queue(Q, opts)
        .observer(seen.clone())
        .start();
    tokio::time::sleep(Duration::from_millis(200)).await; // let the worker go idle
    let add = |key: &str| {
        let queues = queues.clone();
        let job = NewJob::new(Q, "w", json!({ "key": key }));
        async move { queues.add(job).await.unwrap().job }
    };
    let runs_of = |key: &str| runs.0.lock().unwrap().get(key).copied().unwrap_or(0);

    // SQLite's writer commits a job run first with its add; Postgres's does not (its add lane
    // is one connection, where the completion's round trips would queue every POST): there
    // the job is stored claimed and its worker runs it, once.
    let runs_first = engine.name() == "sqlite";
    let first_runs = usize::from(runs_first);
    let ok = add("first").await;
    if runs_first {
        assert_eq!(
            (ok.state, ok.attempts_made, ok.result.clone()),
            (JobState::Completed, 1, Some(json!({ "key": "first" }))),
            "completed in its add"
        );
        assert!(ok.finished_at.is_some() && ok.lease_holder.is_none());
    } else {
        println!(
            "documented difference: the {} dialect stores the job claimed for its worker",
            engine.name()
        );
        assert_eq!(ok.state, JobState::Active);
        queues
            .wait_finished(Q, &ok.id, Duration::from_secs(10))
            .await
            .unwrap();
    }
    assert_eq!(db.effect_rows("first").await, 1, "the effect committed");
    assert!(queues.get("audit", "audit-first").await.unwrap().is_some());
    let stored = queues.get(Q, &ok.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.attempts_made, stored.result),
        (JobState::Completed, 1, Some(json!({ "key": "first" })))
    );
    let kinds: Vec<JobEventKind> = engine
        .history(Q, &ok.id)
        .await
        .unwrap()
        .unwrap()
        .iter()
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
    assert_eq!(runs_of("first"), 1);
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!((counts.completed, counts.completed_total), (1, 1));

    // The processor fails first: stored claimed, run by the worker, failed by its rules.
    let err = add("err").await;
    assert_eq!(err.state, JobState::Active, "stored claimed for its worker");
    let err = queues
        .wait_finished(Q, &err.id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (err.state, err.attempts_made, err.failed_reason.as_deref()),
        (JobState::Failed, 1, Some("the processor refused it"))
    );
    assert_eq!(
        runs_of("err"),
        first_runs + 1,
        "run first, then by the worker"
    );

    // The effect fails with the add: the add commits without it, the worker runs the job, the
    // effect fails again and the attempt is recorded as failed; nothing of the effect is kept.
    let bad = add("bad").await;
    assert_eq!(bad.state, JobState::Active);
    let bad = queues
        .wait_finished(Q, &bad.id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (bad.state, bad.failed_reason.as_deref()),
        (JobState::Failed, Some("unknown user u9"))
    );
    assert_eq!(db.effect_rows("bad").await, 0);
    assert!(queues.get("audit", "audit-bad").await.unwrap().is_none());
    assert_eq!(runs_of("bad"), first_runs + 1);

    // Every attempt was reported once, started and ended.
    pool.shutdown(Duration::from_secs(5)).await;
    let mut ended = seen.0.lock().unwrap().clone();
    ended.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        ended,
        vec![
            ("bad".to_owned(), AttemptEnd::Failed, 1),
            ("err".to_owned(), AttemptEnd::Failed, 1),
            ("first".to_owned(), AttemptEnd::Completed, 1),
        ]
    );
    assert_eq!(seen.1.load(Ordering::SeqCst), 3);
    engine.close().await;
}

async fn effect_commits_with_the_completion_or_not_at_all(db: Db) {
    let engine = db.engine().await;
    let queues = Queues::new(engine.clone());
    let mut opts = queues.defaults(Q);
    opts.attempts = Some(2);
    queues.set_defaults(Q, opts);
    let add = || async {
        let added = queues.add(NewJob::new(Q, "w", json!({}))).await.unwrap();
        added.job.id
    };

    // Success: row, follow-up and completion together.
    let ok = add().await;
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine.finish(&c, completion("ok", None)).await.unwrap();
    assert_eq!(db.effect_rows("ok").await, 1);
    assert!(queues.get("audit", "audit-ok").await.unwrap().is_some());
    assert_eq!(
        queues.get(Q, &ok).await.unwrap().unwrap().state,
        JobState::Completed
    );

    // A failing effect rolls back its row and follow-up, and fails the attempt with its error.
    let bad = add().await;
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    let err = ProcessError::unrecoverable("unknown user u9");
    let r = engine.finish(&c, completion("bad", Some(err))).await;
    assert!(
        matches!(&r, Err(QueueError::EffectFailed(e)) if e.reason() == "unknown user u9"),
        "{r:?}"
    );
    assert_eq!(
        db.effect_rows("bad").await,
        0,
        "the effect's insert was rolled back"
    );
    assert!(queues.get("audit", "audit-bad").await.unwrap().is_none());
    let j = queues.get(Q, &bad).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.failed_reason.as_deref(), Some("unknown user u9"));

    // A stale lease applies nothing.
    let stale = add().await;
    let mut c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    c.token = "not-the-token".into();
    let r = engine.finish(&c, completion("stale", None)).await;
    assert!(matches!(r, Err(QueueError::LeaseLost { .. })), "{r:?}");
    assert_eq!(db.effect_rows("stale").await, 0);
    assert_eq!(
        queues.get(Q, &stale).await.unwrap().unwrap().state,
        JobState::Active
    );
    engine.close().await;
}

async fn concurrent_adds_share_commits(db: Db) {
    const N: u64 = 64;
    let engine = db.engine().await;
    let queues = Queues::new(engine.clone());
    queues.add(NewJob::new(Q, "w", json!(0))).await.unwrap();
    let before = engine.write_stats();
    let barrier = Arc::new(tokio::sync::Barrier::new(N as usize));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (q, b) = (queues.clone(), barrier.clone());
            tokio::spawn(async move {
                b.wait().await;
                q.add(NewJob::new(Q, "w", json!(i))).await.unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let after = engine.write_stats();
    assert_eq!(after.operations - before.operations, N);
    let commits = after.commits - before.commits;
    assert!(commits < N, "{N} concurrent adds took {commits} commits");
    assert_eq!(queues.counts(Q).await.unwrap().waiting, N + 1);
    engine.close().await;
}

async fn corrupt_rows_are_errors_not_panics(db: Db) {
    let engine = db.engine().await;
    let queues = Queues::new(engine.clone());
    let added = queues.add(NewJob::new(Q, "w", json!({"a": 1}))).await;
    let id = added.unwrap().job.id;
    db.execute(
        "UPDATE cq_jobs SET data = '{not json' WHERE id = $1",
        &[&id],
    )
    .await;
    let err = queues.get(Q, &id).await.unwrap_err();
    assert!(
        matches!(err, QueueError::Corrupt(ref m) if m.contains("payload")),
        "{err}"
    );
    let fine = queues.add(NewJob::new(Q, "w", json!({"b": 2}))).await;
    let fine = fine.unwrap().job.id;
    let claimed = engine.claim(Q, 10, LEASE).await.unwrap();
    let ids: Vec<_> = claimed.jobs.iter().map(|c| c.job.id.clone()).collect();
    assert_eq!(
        ids,
        vec![fine],
        "the readable job is claimed, the corrupt one is not"
    );
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!(
        (counts.failed, counts.waiting),
        (1, 0),
        "the corrupt job failed visibly"
    );
    let reason = db
        .text("SELECT failed_reason FROM cq_jobs WHERE id = $1", &[&id])
        .await;
    assert!(reason.contains("corrupt"), "{reason}");
    engine.close().await;
}

async fn newer_schema_is_refused_with_a_clear_error(db: Db) {
    db.engine().await.close().await;
    db.execute("INSERT INTO cq_schema (version) VALUES (99)", &[])
        .await;
    let err = SqlEngine::connect(SqlConfig::new(db.url()))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("newer than this build"), "{err}");
}

async fn closed_engine_refuses_work(db: Db) {
    let engine = db.engine().await;
    let expected = match db {
        Db::Sqlite { .. } => "sqlite",
        Db::Postgres { .. } => "postgres",
    };
    assert_eq!(engine.name(), expected);
    engine.close().await;
    let err = Queues::new(engine)
        .add(NewJob::new(Q, "w", json!(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Closed), "{err}");
}

/// Completions that arrive together commit together; one failing effect among them fails its
/// own attempt only, and the others still commit with their effects and follow-ups. (SQLite:
/// its one writer is what [`HeldWriter`] holds.)
#[tokio::test]
async fn a_failing_effect_in_a_group_fails_alone() {
    let db = Db::sqlite();
    let engine = db.engine().await;
    let queues = Queues::new(engine.clone());
    let jobs: Vec<_> = (0..12).map(|i| NewJob::new(Q, "w", json!(i))).collect();
    queues.add_bulk(jobs).await.unwrap();
    let claimed = engine.claim(Q, 12, LEASE).await.unwrap().jobs;
    assert_eq!(claimed.len(), 12);
    let held = HeldWriter::new(&engine).await;
    let before = engine.write_stats();
    let group_calls = GROUP_CALLS.load(Ordering::Relaxed);
    let mut finishes = Box::pin(futures::future::join_all(claimed.iter().enumerate().map(
        |(i, c)| {
            let fail = (i == 5).then(|| ProcessError::unrecoverable("unknown user g5"));
            engine.finish(c, completion(&format!("g{i}"), fail))
        },
    )));
    // One poll queues every finish; then the writer takes the twelve as one batch.
    assert!(futures::poll!(&mut finishes).is_pending());
    held.release().await;
    let results = finishes.await;
    let after = engine.write_stats();
    assert_eq!(after.operations - before.operations, 1 + 12);
    assert_eq!(
        after.commits - before.commits,
        1 + 1,
        "the held completion's commit, then one for the batch"
    );
    // One call for the group, which failed, then one per effect.
    assert_eq!(GROUP_CALLS.load(Ordering::Relaxed) - group_calls, 1 + 12);
    for (i, (c, r)) in claimed.iter().zip(results).enumerate() {
        assert_eq!(r.is_ok(), i != 5, "job {i}: {r:?}");
        let key = format!("g{i}");
        let job = queues.get(Q, &c.job.id).await.unwrap().unwrap();
        let follow_up = queues.get("audit", &format!("audit-{key}")).await.unwrap();
        if i == 5 {
            assert_eq!(job.state, JobState::Failed);
            assert_eq!(job.failed_reason.as_deref(), Some("unknown user g5"));
            assert_eq!(
                db.effect_rows(&key).await,
                0,
                "the failed effect left no row"
            );
            assert!(follow_up.is_none());
        } else {
            assert_eq!(job.state, JobState::Completed, "job {i}");
            assert_eq!(db.effect_rows(&key).await, 1, "job {i}'s effect");
            assert!(follow_up.is_some(), "job {i}'s follow-up");
        }
    }
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!((counts.completed_total, counts.failed_total), (11, 1));
}
