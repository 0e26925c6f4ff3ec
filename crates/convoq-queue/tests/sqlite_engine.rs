//! Behaviour specific to the SQL engine on SQLite: adds committed ahead of their batch,
//! checkpoints beside the writer, prunes in chunks, batched completions' answers, and engines
//! opening one new file together. What both dialects share is tested in `sql_engine.rs`.

mod pg;
mod sqldb;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use convoq_queue::sql::{SqlConfig, SqlEngine, SqliteFile};
use convoq_queue::{
    AttemptEnd, Completion, Engine, Job, JobState, NewJob, Outcome, ProcessError, Processor,
    QueueError, Queues, WorkerObserver, WorkerOptions,
};
use serde_json::json;
use sqldb::{HeldWriter, LEASE};

const Q: &str = "sql";

/// A connection of its own to the engine's database, to look at it from outside the engine.
fn open(url: &str) -> rusqlite::Connection {
    SqliteFile::from_url(url).unwrap().open().unwrap()
}

async fn engine(dir: &tempfile::TempDir) -> (Arc<SqlEngine>, String) {
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    (
        SqlEngine::connect(SqlConfig::new(url.clone()))
            .await
            .unwrap(),
        url,
    )
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

/// A caller that goes away while its add waits for the writer (an HTTP client that hangs up)
/// strands nothing: the add goes on without it, a job stored claimed for a free worker runs
/// in that worker at once (not after its lease, as a stalled job), and a job run first is
/// reported to the worker's observer as if the caller had stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_whose_caller_went_away_still_runs_its_job() {
    struct Echo(bool);
    #[async_trait]
    impl Processor for Echo {
        async fn process(&self, job: &Job) -> Result<Completion, ProcessError> {
            Ok(Completion::with_result(job.data.clone()))
        }
        fn effect_only(&self) -> bool {
            self.0
        }
    }
    #[derive(Default)]
    struct Ended(std::sync::Mutex<Vec<String>>);
    impl WorkerObserver for Ended {
        fn finished(&self, job: &Job, end: AttemptEnd, _: Duration, _: Option<&str>) {
            if end == AttemptEnd::Completed {
                self.0.lock().unwrap().push(job.name.clone());
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = engine(&dir).await;
    let queues = Queues::new(engine.clone());
    let ended = Arc::new(Ended::default());
    let pool = queues
        .workers()
        .processor("first", Arc::new(Echo(true)))
        .processor("claimed", Arc::new(Echo(false)))
        .queue(
            Q,
            WorkerOptions {
                concurrency: 4,
                lease: Duration::from_secs(60),
                poll_interval: Duration::from_secs(60),
                ..WorkerOptions::default()
            },
        )
        .observer(ended.clone())
        .start();
    tokio::time::sleep(Duration::from_millis(200)).await; // let the worker go idle
    let held = HeldWriter::new(&engine).await;
    let callers: Vec<_> = ["first", "claimed"]
        .into_iter()
        .map(|name| {
            let queues = queues.clone();
            tokio::spawn(async move { queues.add(NewJob::new(Q, name, json!(name))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await; // both adds wait for the writer
    for caller in callers {
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
    }
    held.release().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while queues.counts(Q).await.unwrap().completed < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the jobs of the callers that went away did not complete: {:?}",
            queues.counts(Q).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pool.shutdown(Duration::from_secs(5)).await;
    let mut names = ended.0.lock().unwrap().clone();
    names.sort();
    assert_eq!(
        names,
        vec!["claimed", "first"],
        "each attempt reported once"
    );
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
    assert_eq!(versions, vec![1, 2, 3, 4, 5], "each step recorded once");
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
    async fn promote(&self, queue: &str, id: &str) -> convoq_queue::Result<convoq_queue::Job> {
        self.inner.promote(queue, id).await
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
