//! Crash test of the SQLite engine: a child process runs workers over 2,000 jobs whose processor
//! inserts a row keyed by the job's payload (in the same transaction as the completion); the child
//! is killed with SIGKILL twice mid-run and restarted. Every job must end `completed` and every
//! row must exist exactly once.
//!
//! The test binary re-executes itself as the child: `current_exe() child_worker --exact
//! --nocapture --test-threads 1` with [`CHILD_DB_ENV`] set. Without that variable the
//! `child_worker` test returns at once, so it is harmless under `cargo test` and
//! `cargo nextest run` alike (both run the same libtest binary).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use convoq_queue::sql::SqliteFile;
use convoq_queue::sql::{SqlConfig, SqlConn, SqlEngine, TxEffect};
use convoq_queue::{
    Completion, Engine, Job, JobOptions, JobState, KeepJobs, NewJob, ProcessError, Processor,
    QueueCounts, Queues, WorkerOptions,
};
use rand::Rng;

/// Set (to the database path) only in the child process.
const CHILD_DB_ENV: &str = "CONVOQ_CRASH_CHILD_DB";
const QUEUE: &str = "crash";
const JOB_NAME: &str = "insert_row";
const JOBS: usize = 2_000;
const FIRST_KILL_AT: u64 = 400;
const SECOND_KILL_AT: u64 = 1_200;
/// The whole run (both kills and the final drain) must finish within this.
const RUN_LIMIT: Duration = Duration::from_secs(90);
/// A child that outlives this kills itself, in case its parent died without killing it.
const CHILD_LIFETIME: Duration = Duration::from_secs(150);

fn db_url(path: &str) -> String {
    format!("sqlite://{path}")
}

// ---------------------------------------------------------------------------------------------
// The child: a worker pool that runs until it is killed.
// ---------------------------------------------------------------------------------------------

/// Inserts the job's key into `crash_rows` inside the engine's completion transaction.
struct InsertRow {
    key: String,
}

#[async_trait]
impl TxEffect for InsertRow {
    async fn apply(&self, conn: SqlConn<'_>, _now_ms: i64) -> Result<(), ProcessError> {
        #[allow(unreachable_patterns)] // Other dialects may be added to `SqlConn`.
        let conn = match conn {
            SqlConn::Sqlite(conn) => conn,
            _ => {
                return Err(ProcessError::unrecoverable(
                    "crash test runs on SQLite only",
                ))
            }
        };
        conn.execute("INSERT INTO crash_rows (key) VALUES (?)", [&self.key])
            .map(drop)
            .map_err(|e| ProcessError::retryable(format!("insert into crash_rows: {e}")))
    }
}

struct InsertRowProcessor;

#[async_trait]
impl Processor for InsertRowProcessor {
    async fn process(&self, job: &Job) -> Result<Completion, ProcessError> {
        let key = job.data["key"]
            .as_str()
            .ok_or_else(|| ProcessError::unrecoverable("job data has no string \"key\""))?
            .to_owned();
        let pause_ms = rand::thread_rng().gen_range(0..=3u64);
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let mut completion = Completion::with_result(serde_json::json!({ "key": key }));
        completion.effect = Some(Arc::new(InsertRow { key }));
        Ok(completion)
    }
}

/// A connection of its own to the database the parent created (`mode=rw`: it must exist).
fn open_existing(path: &str) -> rusqlite::Result<rusqlite::Connection> {
    SqliteFile::from_url(&format!("{}?mode=rw", db_url(path)))
        .expect("a SQLite URL")
        .open()
}

fn create_rows_table(path: &str) {
    let conn = open_existing(path).expect("child: open the database for crash_rows");
    // No unique constraint: a duplicate insert must stay visible.
    conn.execute(
        "CREATE TABLE IF NOT EXISTS crash_rows (key TEXT NOT NULL)",
        [],
    )
    .expect("child: create crash_rows");
    conn.close()
        .map_err(|(_, e)| e)
        .expect("child: close setup connection");
}

/// Not a real test: the body of the child process. Returns at once unless [`CHILD_DB_ENV`] is
/// set; otherwise works the queue until killed (and never returns).
#[test]
fn child_worker() {
    let Ok(path) = std::env::var(CHILD_DB_ENV) else {
        return;
    };
    let parent = std::os::unix::process::parent_id();
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("child: tokio runtime");
    rt.block_on(async move {
        create_rows_table(&path);
        let engine = SqlEngine::connect(SqlConfig::new(db_url(&path)))
            .await
            .expect("child: open the engine");
        let queues = Queues::new(engine);
        let _pool = queues
            .workers()
            .processor(JOB_NAME, Arc::new(InsertRowProcessor))
            .queue(
                QUEUE,
                WorkerOptions {
                    concurrency: 16,
                    lease: Duration::from_secs(2),
                    max_stalled: 20,
                    poll_interval: Duration::from_millis(100),
                    stalled_interval: Duration::from_millis(500),
                    ..WorkerOptions::default()
                },
            )
            .start();
        // Run until SIGKILL. Exit on our own only if the parent is gone or something hangs.
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if std::os::unix::process::parent_id() != parent || started.elapsed() > CHILD_LIFETIME {
                std::process::exit(3);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The parent: adds the jobs, kills and restarts the child, checks the outcome.
// ---------------------------------------------------------------------------------------------

/// The running child; killed (SIGKILL) and reaped when dropped, so a failing test leaves no
/// worker behind.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn spawn(db: &Path) -> ChildGuard {
        let exe = std::env::current_exe().expect("path of the test binary");
        let child = Command::new(exe)
            .args([
                "child_worker",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_DB_ENV, db)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child worker");
        ChildGuard(Some(child))
    }

    /// Fails the test if the child ended on its own.
    fn assert_running(&mut self) {
        if let Some(child) = self.0.as_mut() {
            if let Some(status) = child.try_wait().expect("poll the child") {
                panic!("the child worker exited on its own: {status}");
            }
        }
    }

    /// SIGKILLs the child and waits for it to be gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            // `Child::kill` sends SIGKILL on Unix: no destructor, no graceful shutdown.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls the counts until `done(counts)` holds, failing if the child dies or `deadline` passes.
async fn wait_for(
    queues: &Queues,
    child: &mut ChildGuard,
    deadline: Instant,
    what: &str,
    done: impl Fn(&QueueCounts) -> bool,
) -> QueueCounts {
    loop {
        let counts = queues.counts(QUEUE).await.expect("read counts");
        if done(&counts) {
            return counts;
        }
        child.assert_running();
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; counts now {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Active jobs claimed at or after `since_ms`: those held by the child started then (jobs left
/// active by an earlier, killed child were claimed before it).
async fn active_since(queues: &Queues, since_ms: i64) -> usize {
    queues
        .list(QUEUE, JobState::Active, 0, JOBS as u64)
        .await
        .expect("list active jobs")
        .iter()
        .filter(|j| {
            j.processed_at
                .is_some_and(|t| t.timestamp_millis() >= since_ms)
        })
        .count()
}

/// What one SIGKILL hit.
struct Kill {
    /// Lifetime completions once the child was dead.
    completed: u64,
    /// Jobs the killed child held (active, claimed by it) once it was dead.
    held: usize,
    /// All active jobs once it was dead, including those of earlier killed children.
    active: u64,
}

/// Starts a child, waits until `kill_at` jobs have completed while this child holds jobs, then
/// SIGKILLs it.
async fn run_and_kill(queues: &Queues, db: &Path, deadline: Instant, kill_at: u64) -> Kill {
    let since_ms = chrono::Utc::now().timestamp_millis();
    let mut child = ChildGuard::spawn(db);
    loop {
        let counts = wait_for(queues, &mut child, deadline, "completions", |c| {
            c.completed_total >= kill_at
        })
        .await;
        assert!(
            counts.completed_total < JOBS as u64,
            "every job completed before the kill planned at {kill_at}: the kill would not be \
             mid-run ({counts:?})"
        );
        if active_since(queues, since_ms).await > 0 {
            break;
        }
    }
    child.kill();
    let counts = queues.counts(QUEUE).await.expect("read counts");
    Kill {
        completed: counts.completed_total,
        held: active_since(queues, since_ms).await,
        active: counts.active,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_twice_loses_and_duplicates_nothing() {
    let started = Instant::now();
    let deadline = started + RUN_LIMIT;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("crash.db");
    let db_str = db.to_str().expect("utf-8 temp path").to_owned();

    let engine = SqlEngine::connect(SqlConfig::new(db_url(&db_str)))
        .await
        .expect("open the engine");
    let queues = Queues::new(engine.clone());
    let keep_all = JobOptions {
        remove_on_complete: Some(KeepJobs::FOREVER),
        ..JobOptions::default()
    };
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| {
            NewJob::new(
                QUEUE,
                JOB_NAME,
                serde_json::json!({ "key": format!("k-{i}") }),
            )
            .with_opts(keep_all.clone())
        })
        .collect();
    let added = queues.add_bulk(jobs).await.expect("add the jobs");
    assert_eq!(added.len(), JOBS);
    assert!(added.iter().all(|a| a.created));

    // Runs 1 and 2: SIGKILLed ~400 and ~1,200 jobs in, while the child holds jobs.
    let kill_1 = run_and_kill(&queues, &db, deadline, FIRST_KILL_AT).await;
    let kill_2 = run_and_kill(&queues, &db, deadline, SECOND_KILL_AT).await;

    // Run 3: to the end.
    let mut child = ChildGuard::spawn(&db);
    wait_for(&queues, &mut child, deadline, "all jobs to finish", |c| {
        c.backlog() == 0
    })
    .await;
    child.kill();
    let elapsed = started.elapsed();
    for kill in [&kill_1, &kill_2] {
        assert!(kill.completed < JOBS as u64, "a kill was not mid-run");
    }

    // Every job completed, none failed, none left over; lifetime totals agree.
    let end = queues.counts(QUEUE).await.expect("read counts");
    assert_eq!(
        (end.completed, end.completed_total),
        (JOBS as u64, JOBS as u64),
        "{end:?}"
    );
    assert_eq!(
        (end.active, end.waiting, end.delayed, end.paused),
        (0, 0, 0, 0),
        "{end:?}"
    );
    assert_eq!((end.failed, end.failed_total), (0, 0), "{end:?}");

    let completed = queues
        .list(QUEUE, JobState::Completed, 0, 10 * JOBS as u64)
        .await
        .expect("list completed jobs");
    assert_eq!(completed.len(), JOBS);
    let ids: HashSet<&str> = completed.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids.len(), JOBS, "a job id appears twice");
    let expected: HashSet<String> = (0..JOBS).map(|i| format!("k-{i}")).collect();
    let job_keys: HashSet<String> = completed
        .iter()
        .map(|j| j.data["key"].as_str().expect("key").to_owned())
        .collect();
    assert_eq!(
        job_keys, expected,
        "the completed jobs are not the added ones"
    );
    for j in &completed {
        assert_eq!(j.state, JobState::Completed);
        assert_eq!(
            j.result.as_ref().map(|r| r["key"].clone()),
            Some(j.data["key"].clone()),
            "job {} has the wrong result",
            j.id
        );
    }
    let stalled_jobs = completed.iter().filter(|j| j.stalled_count > 0).count();
    let stalls: u32 = completed.iter().map(|j| j.stalled_count).sum();
    let max_attempts = completed.iter().map(|j| j.attempts_made).max().unwrap_or(0);
    engine.close().await;

    // Every row exactly once.
    let conn = open_existing(&db_str).expect("open the database with rusqlite");
    let (rows, distinct): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT key) FROM crash_rows",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("count crash_rows");
    let per_key: Vec<(String, i64)> = conn
        .prepare("SELECT key, COUNT(*) FROM crash_rows GROUP BY key")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()
        })
        .expect("read crash_rows");
    drop(conn);
    let per_key: HashMap<String, i64> = per_key.into_iter().collect();
    let duplicated: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|k| !per_key.contains_key(*k))
        .collect();
    let unknown: Vec<_> = per_key.keys().filter(|k| !expected.contains(*k)).collect();

    println!(
        "crash test: {JOBS} jobs in {:.1} s; kill 1 at {} completed ({} jobs held by the killed \
         child), kill 2 at {} completed ({} held by the killed child, {} active in all); {} jobs \
         were taken back as stalled ({} stalls in all, at most {} attempts on a job); \
         crash_rows: {} rows, {} distinct",
        elapsed.as_secs_f64(),
        kill_1.completed,
        kill_1.held,
        kill_2.completed,
        kill_2.held,
        kill_2.active,
        stalled_jobs,
        stalls,
        max_attempts,
        rows,
        distinct,
    );
    assert!(
        duplicated.is_empty(),
        "rows inserted more than once: {duplicated:?}"
    );
    assert!(missing.is_empty(), "rows missing: {missing:?}");
    assert!(unknown.is_empty(), "unexpected rows: {unknown:?}");
    assert_eq!((rows, distinct), (JOBS as i64, JOBS as i64));
    assert!(elapsed < RUN_LIMIT);
}
