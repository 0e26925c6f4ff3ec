//! Behaviour specific to the SQL engine on SQLite: transactional effects, group commit, and
//! refusing corrupt or foreign data without panicking.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use convoq_queue::sql::{SqlConfig, SqlConn, SqlEngine, SqliteFile, TxEffect};
use convoq_queue::{
    Completion, Engine, JobState, NewJob, Outcome, ProcessError, QueueError, Queues,
};
use serde_json::json;
use tokio::sync::oneshot;

const Q: &str = "sql";
const LEASE: Duration = Duration::from_secs(30);

async fn engine(dir: &tempfile::TempDir) -> (Arc<SqlEngine>, String) {
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    (
        SqlEngine::connect(SqlConfig::new(url.clone()))
            .await
            .unwrap(),
        url,
    )
}

/// Inserts a row into `effects`, or fails as told. Effects of one batch are applied as a group,
/// in one statement (counted in `GROUP_CALLS` when their first key starts with `g`, the keys of
/// the one test that reads it, since tests of this binary may run in parallel threads).
struct InsertRow {
    key: String,
    fail: Option<ProcessError>,
}

static GROUP_CALLS: AtomicUsize = AtomicUsize::new(0);

#[async_trait]
impl TxEffect for InsertRow {
    async fn apply(&self, conn: SqlConn<'_>, now_ms: i64) -> Result<(), ProcessError> {
        self.apply_group(&[self], conn, now_ms).await
    }
    fn group(&self) -> Option<&'static str> {
        Some("insert-row")
    }
    async fn apply_group(
        &self,
        effects: &[&dyn TxEffect],
        conn: SqlConn<'_>,
        _now_ms: i64,
    ) -> Result<(), ProcessError> {
        if self.key.starts_with('g') {
            GROUP_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        let SqlConn::Sqlite(conn) = conn else {
            return Err(ProcessError::unrecoverable("this test runs on SQLite"));
        };
        let rows: Vec<&InsertRow> = effects
            .iter()
            .filter_map(|e| e.as_any()?.downcast_ref())
            .collect();
        conn.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL)", [])
            .map_err(ProcessError::retryable)?;
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        conn.execute(
            "INSERT INTO effects (key) SELECT value FROM json_each(?)",
            [serde_json::to_string(&keys).unwrap()],
        )
        .map_err(ProcessError::retryable)?;
        match rows.iter().find_map(|r| r.fail.clone()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// A connection of its own to the engine's database, to look at it (or tamper with it) from
/// outside the engine. Its statements block the calling thread, for at most the busy timeout
/// while the writer (on its own thread) holds the lock.
fn open(url: &str) -> rusqlite::Connection {
    SqliteFile::from_url(url).unwrap().open().unwrap()
}

fn rows(url: &str, key: &str) -> i64 {
    let conn = open(url);
    let exists: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'effects'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    if exists == 0 {
        return 0;
    }
    conn.query_row("SELECT COUNT(*) FROM effects WHERE key = ?", [key], |r| {
        r.get(0)
    })
    .unwrap()
}

/// An effect that signals when the writer runs it, then waits to be released.
struct Hold {
    entered: Mutex<Option<oneshot::Sender<()>>>,
    release: Mutex<Option<oneshot::Receiver<()>>>,
}

#[async_trait]
impl TxEffect for Hold {
    async fn apply(&self, _conn: SqlConn<'_>, _now_ms: i64) -> Result<(), ProcessError> {
        let entered = self.entered.lock().unwrap().take();
        if let Some(entered) = entered {
            let _ = entered.send(());
        }
        let release = self.release.lock().unwrap().take();
        if let Some(release) = release {
            let _ = release.await;
        }
        Ok(())
    }
}

/// The writer, kept inside a completion's effect (of a job on queue `hold`) until released:
/// operations sent meanwhile all wait in its queue and reach it as one batch, however a loaded
/// machine schedules the threads. The held completion is one more operation and one more commit
/// in [`SqlEngine::write_stats`].
struct HeldWriter {
    release: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl HeldWriter {
    async fn new(engine: &Arc<SqlEngine>) -> HeldWriter {
        Queues::new(engine.clone())
            .add(NewJob::new("hold", "hold", json!(null)))
            .await
            .unwrap();
        let claimed = engine.claim("hold", 1, LEASE).await.unwrap().jobs.remove(0);
        let (entered_tx, entered) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        let mut c = Completion::with_result(json!(null));
        c.effect = Some(Arc::new(Hold {
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(Some(release_rx)),
        }));
        let engine = engine.clone();
        let done = tokio::spawn(async move {
            engine
                .finish(&claimed, Outcome::Completed(c))
                .await
                .unwrap();
        });
        entered.await.unwrap();
        HeldWriter { release, done }
    }

    /// Lets the writer go on, and waits for the held completion's commit.
    async fn release(self) {
        self.release.send(()).unwrap();
        self.done.await.unwrap();
    }
}

fn completion(key: &str, fail: Option<ProcessError>) -> Outcome {
    let mut c = Completion::with_result(json!({ "key": key }));
    c.follow_ups
        .push(NewJob::new("audit", "audit", json!({ "of": key })).with_id(format!("audit-{key}")));
    c.effect = Some(Arc::new(InsertRow {
        key: key.to_owned(),
        fail,
    }));
    Outcome::Completed(c)
}

#[tokio::test]
async fn effect_commits_with_the_completion_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, url) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    let mut opts = queues.defaults(Q);
    opts.attempts = Some(2);
    queues.set_defaults(Q, opts);

    // Success: row, follow-up and completion together.
    let ok = queues
        .add(NewJob::new(Q, "w", json!({})))
        .await
        .unwrap()
        .job
        .id;
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine.finish(&c, completion("ok", None)).await.unwrap();
    assert_eq!(rows(&url, "ok"), 1);
    assert!(queues.get("audit", "audit-ok").await.unwrap().is_some());
    assert_eq!(
        queues.get(Q, &ok).await.unwrap().unwrap().state,
        JobState::Completed
    );

    // A failing effect rolls back its row and follow-up, and fails the attempt with its error.
    let bad = queues
        .add(NewJob::new(Q, "w", json!({})))
        .await
        .unwrap()
        .job
        .id;
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    let err = ProcessError::unrecoverable("unknown user u9");
    let r = engine.finish(&c, completion("bad", Some(err))).await;
    assert!(
        matches!(&r, Err(QueueError::EffectFailed(e)) if e.reason() == "unknown user u9"),
        "{r:?}"
    );
    assert_eq!(rows(&url, "bad"), 0, "the effect's insert was rolled back");
    assert!(queues.get("audit", "audit-bad").await.unwrap().is_none());
    let j = queues.get(Q, &bad).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.failed_reason.as_deref(), Some("unknown user u9"));

    // A stale lease applies nothing.
    let stale = queues
        .add(NewJob::new(Q, "w", json!({})))
        .await
        .unwrap()
        .job
        .id;
    let mut c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    c.token = "not-the-token".into();
    let r = engine.finish(&c, completion("stale", None)).await;
    assert!(matches!(r, Err(QueueError::LeaseLost { .. })), "{r:?}");
    assert_eq!(rows(&url, "stale"), 0);
    assert_eq!(
        queues.get(Q, &stale).await.unwrap().unwrap().state,
        JobState::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    queues.add(NewJob::new(Q, "w", json!(0))).await.unwrap();
    let before = engine.write_stats();
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
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
    assert_eq!(after.operations - before.operations, 32);
    let commits = after.commits - before.commits;
    assert!(commits < 32, "32 concurrent adds took {commits} commits");
    assert_eq!(queues.counts(Q).await.unwrap().waiting, 33);
}

/// Adds that reach the writer with other work commit first, in a transaction of their own, so
/// that their callers do not wait for the rest; the rest commits right after, and a prune (the
/// longest operation) after that, alone.
#[tokio::test]
async fn adds_commit_before_the_rest_of_their_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    queues.add(NewJob::new(Q, "w", json!(0))).await.unwrap();
    let held = HeldWriter::new(&engine).await;
    let before = engine.write_stats();
    let mut all = Box::pin(async {
        tokio::join!(
            queues.add(NewJob::new(Q, "w", json!(1))),
            engine.claim(Q, 10, LEASE),
            engine.prune(Q)
        )
    });
    // One poll queues the three; then the writer takes them as one batch.
    assert!(futures::poll!(&mut all).is_pending());
    held.release().await;
    let (added, claimed, pruned) = all.await;
    added.unwrap();
    assert_eq!(pruned.unwrap(), 0);
    let after = engine.write_stats();
    assert_eq!(after.operations - before.operations, 1 + 3);
    assert_eq!(
        after.commits - before.commits,
        1 + 3,
        "the held completion's commit, then the add, the claim and the prune each on their own"
    );
    // The claim ran after the add committed, so it saw both jobs.
    assert_eq!(claimed.unwrap().jobs.len(), 2);
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, url) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    let id = queues
        .add(NewJob::new(Q, "w", json!({"a": 1})))
        .await
        .unwrap()
        .job
        .id;
    let conn = open(&url);
    conn.execute("UPDATE cq_jobs SET data = '{not json' WHERE id = ?", [&id])
        .unwrap();
    let err = queues.get(Q, &id).await.unwrap_err();
    assert!(
        matches!(err, QueueError::Corrupt(ref m) if m.contains("payload")),
        "{err}"
    );
    let fine = queues
        .add(NewJob::new(Q, "w", json!({"b": 2})))
        .await
        .unwrap()
        .job
        .id;
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
    let reason: String = conn
        .query_row(
            "SELECT failed_reason FROM cq_jobs WHERE id = ?",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert!(reason.contains("corrupt"), "{reason}");
}

#[tokio::test]
async fn newer_schema_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, url) = engine(&dir).await;
    engine.close().await;
    let conn = open(&url);
    conn.execute("INSERT INTO cq_schema (version) VALUES (99)", [])
        .unwrap();
    conn.close().map_err(|(_, e)| e).unwrap();
    let err = SqlEngine::connect(SqlConfig::new(url)).await.err().unwrap();
    assert!(err.to_string().contains("newer than this build"), "{err}");
}

#[tokio::test]
async fn closed_engine_refuses_work() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir).await;
    engine.close().await;
    let err = Queues::new(engine)
        .add(NewJob::new(Q, "w", json!(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Closed), "{err}");
}

/// Committed pages reach the database file soon after the commit, long before the WAL holds the
/// 1,000 pages at which the writer would checkpoint it: a task beside the writer checkpoints
/// after its commits. Seen from outside: a copy of the database file alone, without its WAL,
/// holds the jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_checkpointed_beside_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    for i in 0..3 {
        queues.add(NewJob::new(Q, "w", json!(i))).await.unwrap();
    }
    let copy = dir.path().join("copy.db");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let in_file = loop {
        std::fs::copy(dir.path().join("q.db"), &copy).unwrap();
        let n: Option<i64> = match open_immutable(&copy) {
            Ok(conn) => conn
                .query_row("SELECT COUNT(*) FROM cq_jobs WHERE queue = ?", [Q], |r| {
                    r.get(0)
                })
                .ok(),
            // A copy taken while a checkpoint was writing the file.
            Err(_) => None,
        };
        if n == Some(3) || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(in_file, Some(3), "the database file, without its WAL");
    assert_eq!(queues.counts(Q).await.unwrap().waiting, 3);
    engine.close().await;
}

/// Opens the database file at `path` read-only and immutable: SQLite reads the file alone, as
/// it is, and neither looks for nor creates a WAL or any lock beside it.
fn open_immutable(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let mut uri = String::from("file:");
    for c in path.to_str().expect("utf-8 temp path").chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3F"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    rusqlite::Connection::open_with_flags(
        uri,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )
}

/// Completions that arrive together commit together; one failing effect among them fails its
/// own attempt only, and the others still commit with their effects and follow-ups.
#[tokio::test]
async fn a_failing_effect_in_a_group_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, url) = engine(&dir).await;
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
            assert_eq!(rows(&url, &key), 0, "the failed effect left no row");
            assert!(follow_up.is_none());
        } else {
            assert_eq!(job.state, JobState::Completed, "job {i}");
            assert_eq!(rows(&url, &key), 1, "job {i}'s effect");
            assert!(follow_up.is_some(), "job {i}'s follow-up");
        }
    }
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!((counts.completed_total, counts.failed_total), (11, 1));
}

/// Pruning more jobs than one chunk takes several writer operations and keeps exactly the
/// newest `count`, with the lifetime totals untouched.
#[tokio::test]
async fn pruning_beyond_one_chunk_keeps_the_newest() {
    prune_keeps_the_newest(100, 4_500).await;
}

/// The same with a count beyond the window a prune ranks first: every finished job is ranked.
#[tokio::test]
async fn pruning_with_a_large_count_keeps_the_newest() {
    prune_keeps_the_newest(5_000, 9_500).await;
}

/// Finishes `n` jobs kept by count `keep`, prunes, and checks that exactly the newest `keep`
/// are left, in chunks of 500, with the lifetime totals untouched.
async fn prune_keeps_the_newest(keep: u64, n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    let mut opts = queues.defaults(Q);
    opts.remove_on_complete = Some(convoq_queue::KeepJobs::Keep {
        count: Some(keep),
        age_secs: None,
    });
    queues.set_defaults(Q, opts);
    let jobs: Vec<_> = (0..n).map(|i| NewJob::new(Q, "w", json!(i))).collect();
    queues.add_bulk(jobs).await.unwrap();
    let mut last = Vec::new();
    loop {
        let claimed = engine.claim(Q, 500, LEASE).await.unwrap().jobs;
        if claimed.is_empty() {
            break;
        }
        let done =
            futures::future::join_all(claimed.iter().map(|c| {
                engine.finish(c, Outcome::Completed(Completion::with_result(json!(null))))
            }))
            .await;
        done.into_iter().for_each(|r| r.unwrap());
        last = claimed.iter().map(|c| c.job.id.clone()).collect();
    }
    let before = engine.write_stats();
    assert_eq!(engine.prune(Q).await.unwrap(), n - keep);
    assert!(
        engine.write_stats().commits - before.commits >= (n - keep).div_ceil(500),
        "chunks of 500"
    );
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!((counts.completed, counts.completed_total), (keep, n));
    // The survivors are among the last ones finished.
    let mut kept = 0;
    for id in &last {
        kept += u64::from(queues.get(Q, id).await.unwrap().is_some());
    }
    assert_eq!(kept, keep.min(last.len() as u64));
    assert_eq!(engine.prune(Q).await.unwrap(), 0);
}

/// Completions of one batch are only counted; when one of them has lost its lease, the batch
/// is applied again answering each by name, so the stale one alone is refused, the others
/// complete in the same commit, and each result is stored exactly as given.
#[tokio::test]
async fn a_lost_lease_in_a_group_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    let jobs: Vec<_> = (0..8).map(|i| NewJob::new(Q, "w", json!(i))).collect();
    queues.add_bulk(jobs).await.unwrap();
    let mut claimed = engine.claim(Q, 8, LEASE).await.unwrap().jobs;
    assert_eq!(claimed.len(), 8);
    claimed[3].token = "not-the-lease".into();
    let result =
        |i: usize| json!({ "i": i, "text": "quote \" backslash \\ é \u{1F600}", "n": 1.5e300 });
    let held = HeldWriter::new(&engine).await;
    let before = engine.write_stats();
    let mut finishes = Box::pin(futures::future::join_all(claimed.iter().enumerate().map(
        |(i, c)| engine.finish(c, Outcome::Completed(Completion::with_result(result(i)))),
    )));
    assert!(futures::poll!(&mut finishes).is_pending());
    held.release().await;
    let results = finishes.await;
    let after = engine.write_stats();
    assert_eq!(
        after.commits - before.commits,
        1 + 1,
        "the held completion's commit, then one for the batch"
    );
    for (i, (c, r)) in claimed.iter().zip(results).enumerate() {
        let job = queues.get(Q, &c.job.id).await.unwrap().unwrap();
        if i == 3 {
            assert!(matches!(r, Err(QueueError::LeaseLost { .. })), "{r:?}");
            assert_eq!(job.state, JobState::Active);
        } else {
            r.unwrap();
            assert_eq!(job.state, JobState::Completed, "job {i}");
            assert_eq!(job.result, Some(result(i)), "job {i}'s result");
        }
    }
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!(counts.completed_total, 7);
}

/// A stale holder of a job (its lease was taken back) and its current holder end in one batch,
/// the stale one listed first: the current holder's completion is the job's, the stale one is
/// refused, whatever their order.
#[tokio::test]
async fn a_stale_and_a_current_holder_in_one_batch_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    let id = queues
        .add(NewJob::new(Q, "w", json!(0)))
        .await
        .unwrap()
        .job
        .id;
    let stale = engine
        .claim(Q, 1, Duration::from_millis(1))
        .await
        .unwrap()
        .jobs
        .remove(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(engine.reap_stalled(Q, 5).await.unwrap(), 1);
    let current = engine.claim(Q, 1, LEASE).await.unwrap().jobs.remove(0);
    assert_ne!(stale.token, current.token);
    let held = HeldWriter::new(&engine).await;
    let mut finishes = Box::pin(futures::future::join_all([&stale, &current].map(|c| {
        engine.finish(
            c,
            Outcome::Completed(Completion::with_result(json!({ "by": c.token }))),
        )
    })));
    assert!(futures::poll!(&mut finishes).is_pending());
    held.release().await;
    let results = finishes.await;
    assert!(
        matches!(results[0], Err(QueueError::LeaseLost { .. })),
        "the stale holder: {:?}",
        results[0]
    );
    assert!(results[1].is_ok(), "the current holder: {:?}", results[1]);
    let job = queues.get(Q, &id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.result, Some(json!({ "by": current.token })));
}

/// Engines opening a new file together (processes starting at once) all open it, and its
/// schema steps are recorded once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_opening_a_new_file_together_migrate_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let opened =
        futures::future::join_all((0..6).map(|_| SqlEngine::connect(SqlConfig::new(url.clone()))))
            .await;
    let engines: Vec<_> = opened.into_iter().map(|r| r.unwrap()).collect();
    let conn = open(&url);
    let versions: Vec<i64> = conn
        .prepare("SELECT version FROM cq_schema ORDER BY version")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4], "each step recorded once");
    drop(conn);
    for e in engines {
        e.close().await;
    }
}

/// The SQL engine, except that a prune, once asked for, never ends (a very long one).
struct EndlessPrune {
    inner: Arc<SqlEngine>,
    pruning: tokio::sync::Notify,
}

#[async_trait]
impl Engine for EndlessPrune {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn owner_id(&self) -> &str {
        self.inner.owner_id()
    }
    fn clock(&self) -> Arc<dyn convoq_queue::Clock> {
        self.inner.clock()
    }
    fn capabilities(&self) -> convoq_queue::Capabilities {
        self.inner.capabilities()
    }
    fn watches(&self) -> &convoq_queue::events::WatchRegistry {
        self.inner.watches()
    }
    fn work_signal(&self, queue: &str) -> tokio::sync::watch::Receiver<u64> {
        self.inner.work_signal(queue)
    }
    async fn add_bulk(&self, jobs: Vec<NewJob>) -> convoq_queue::Result<Vec<convoq_queue::Added>> {
        self.inner.add_bulk(jobs).await
    }
    async fn get(&self, queue: &str, id: &str) -> convoq_queue::Result<Option<convoq_queue::Job>> {
        self.inner.get(queue, id).await
    }
    async fn list(
        &self,
        queue: &str,
        state: JobState,
        offset: u64,
        limit: u64,
    ) -> convoq_queue::Result<Vec<convoq_queue::Job>> {
        self.inner.list(queue, state, offset, limit).await
    }
    async fn counts(&self, queue: &str) -> convoq_queue::Result<convoq_queue::QueueCounts> {
        self.inner.counts(queue).await
    }
    async fn set_paused(&self, queue: &str, paused: bool) -> convoq_queue::Result<()> {
        self.inner.set_paused(queue, paused).await
    }
    async fn is_paused(&self, queue: &str) -> convoq_queue::Result<bool> {
        self.inner.is_paused(queue).await
    }
    async fn retry(&self, queue: &str, id: &str) -> convoq_queue::Result<convoq_queue::Job> {
        self.inner.retry(queue, id).await
    }
    async fn remove(&self, queue: &str, id: &str) -> convoq_queue::Result<bool> {
        self.inner.remove(queue, id).await
    }
    async fn history(
        &self,
        queue: &str,
        id: &str,
    ) -> convoq_queue::Result<Option<Vec<convoq_queue::JobEvent>>> {
        self.inner.history(queue, id).await
    }
    async fn claim(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> convoq_queue::Result<convoq_queue::ClaimBatch> {
        self.inner.claim(queue, max, lease).await
    }
    async fn extend(
        &self,
        queue: &str,
        leases: &[(String, String)],
        lease: Duration,
    ) -> convoq_queue::Result<Vec<bool>> {
        self.inner.extend(queue, leases, lease).await
    }
    async fn finish(
        &self,
        job: &convoq_queue::ClaimedJob,
        outcome: Outcome,
    ) -> convoq_queue::Result<()> {
        self.inner.finish(job, outcome).await
    }
    async fn finish_and_claim(
        &self,
        job: &convoq_queue::ClaimedJob,
        outcome: Outcome,
        next_lease: Duration,
    ) -> convoq_queue::Result<Option<convoq_queue::ClaimedJob>> {
        self.inner.finish_and_claim(job, outcome, next_lease).await
    }
    async fn release(&self, job: &convoq_queue::ClaimedJob) -> convoq_queue::Result<()> {
        self.inner.release(job).await
    }
    async fn reap_stalled(&self, queue: &str, max_stalled: u32) -> convoq_queue::Result<u64> {
        self.inner.reap_stalled(queue, max_stalled).await
    }
    async fn prune(&self, _queue: &str) -> convoq_queue::Result<u64> {
        self.pruning.notify_one();
        std::future::pending().await
    }
    async fn ping(&self) -> convoq_queue::Result<()> {
        self.inner.ping().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

struct Done(Arc<AtomicUsize>);

#[async_trait]
impl convoq_queue::Processor for Done {
    async fn process(&self, _: &convoq_queue::Job) -> Result<Completion, ProcessError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(Completion::default())
    }
}

/// Housekeeping runs beside the claim loop, not in it: while a prune is under way (here one
/// that never ends), jobs added meanwhile are still claimed and run, and the loop keeps
/// ticking, so readiness stays true.
#[tokio::test]
async fn jobs_run_while_a_prune_is_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let (inner, _) = engine(&dir).await;
    let engine = Arc::new(EndlessPrune {
        inner,
        pruning: tokio::sync::Notify::new(),
    });
    let queues = Queues::new(engine.clone());
    let done = Arc::new(AtomicUsize::new(0));
    let pool = queues
        .workers()
        .processor("w", Arc::new(Done(done.clone())))
        .queue(
            Q,
            convoq_queue::WorkerOptions {
                prune_interval: Duration::from_millis(10),
                poll_interval: Duration::from_millis(50),
                ..Default::default()
            },
        )
        .start();
    tokio::time::timeout(Duration::from_secs(10), engine.pruning.notified())
        .await
        .expect("the worker pool never pruned");
    for i in 0..20 {
        queues.add(NewJob::new(Q, "w", json!(i))).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while done.load(Ordering::Relaxed) < 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("jobs added during a prune were not run");
    assert!(pool.is_healthy(Duration::from_secs(5)));
    // The prune never ends, so shutdown must not wait for it.
    tokio::time::timeout(
        Duration::from_secs(10),
        pool.shutdown(Duration::from_secs(1)),
    )
    .await
    .expect("shutdown waited for the prune");
}
