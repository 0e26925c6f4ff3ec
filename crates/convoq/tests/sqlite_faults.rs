//! The embedded default under faults, with the real binary on a real file (loopback only,
//! bounded in count and time):
//!
//! - another process holds SQLite's write lock for 8 s under a steady stream of POSTs: every
//!   POST is answered within the write timeout (202, or 503 with `Retry-After`), POSTs get 202
//!   again within two seconds of the lock's release, and every request, retried with its
//!   `Idempotency-Key` where it got 503, ends as exactly one conversation;
//! - the database's disk fills up (a small tmpfs, as root; skipped with the reason when it
//!   cannot be mounted): no 5xx but 503, no hang, the process lives; once space returns, POSTs
//!   get 202 again, every accepted job completes, and `PRAGMA integrity_check` says `ok`;
//! - an API process and two worker processes share one SQLite file under load, one worker
//!   killed with SIGKILL mid-run: nothing lost, nothing doubled.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{count, eventually, get, open_db, put_user_u1, request, Role, Server};

/// The write timeout the servers of these tests run with.
const WRITE_TIMEOUT: Duration = Duration::from_millis(2000);
/// Slack for an answer beyond the write timeout (scheduling, a loaded CI machine).
const SLACK: Duration = Duration::from_millis(1500);

/// One POST with `Idempotency-Key: key`; its status, how long it took, and the job id of a 202.
async fn post(port: u16, key: &str, title: &str) -> (u16, Duration, Option<String>, bool) {
    let started = Instant::now();
    let r = request(
        port,
        "POST",
        "/api/chat/conversations",
        &[("Idempotency-Key", key)],
        Some(&json!({ "userId": "u1", "title": title })),
    )
    .await
    .unwrap_or_else(|e| panic!("POST {key}: {e}"));
    let took = started.elapsed();
    let job = (r.status == 202).then(|| r.json()["jobId"].as_str().unwrap().to_owned());
    let retry_after = r.header("retry-after").is_some();
    assert!(
        r.status == 202 || r.status == 503,
        "POST {key}: {} {}",
        r.status,
        r.text()
    );
    (r.status, took, job, retry_after)
}

/// Posts `key` until it is accepted (a 503 retried with the same key), up to `within`.
async fn post_until_accepted(port: u16, key: &str, title: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let (202, _, Some(job), _) = post(port, key, title).await {
            return job;
        }
        assert!(Instant::now() < deadline, "{key} never accepted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every job in `jobs` has completed.
async fn all_completed(port: u16, jobs: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    for job in jobs {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "job {job} did not complete in time");
            if let Ok(r) = get(port, &format!("/api/jobs/{job}?wait=5")).await {
                if r.status == 200 && r.json()["job"]["state"] == json!("completed") {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Holds the write lock of the SQLite file at `path` from this (other) process for `hold`.
fn hold_write_lock(path: PathBuf, hold: Duration) -> std::thread::JoinHandle<()> {
    let (taken_tx, taken) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).expect("open the file");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE")
            .expect("take the lock");
        taken_tx.send(()).unwrap();
        std::thread::sleep(hold);
        conn.execute_batch("ROLLBACK").unwrap();
    });
    taken.recv().expect("the lock was taken");
    holder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_write_lock_bounds_every_post() {
    const HOLD: Duration = Duration::from_secs(8);
    let dir = tempfile::tempdir().unwrap();
    let timeout_ms = WRITE_TIMEOUT.as_millis().to_string();
    let mut server = Server::start(dir.path(), &[("CONVOQ_WRITE_TIMEOUT_MS", &timeout_ms)]).await;
    let port = server.port;
    put_user_u1(port).await;

    let holder = hold_write_lock(server.db_path(), HOLD);
    let locked_at = Instant::now();
    // A steady stream: a POST every 100 ms (each on its own task, so that a slow answer does
    // not hold back the next), through the hold and three seconds beyond.
    let mut posts = Vec::new();
    let mut n = 0;
    while locked_at.elapsed() < HOLD + Duration::from_secs(3) {
        let key = format!("lock-{n}");
        let sent_at = locked_at.elapsed();
        posts.push(tokio::spawn(async move {
            let (status, took, job, retry_after) = post(port, &key, &key).await;
            (key, sent_at, status, took, job, retry_after)
        }));
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder.join().unwrap();
    let mut jobs = Vec::new();
    let (mut refused, mut slowest) = (Vec::new(), Duration::ZERO);
    for p in posts {
        let (key, sent_at, status, took, job, retry_after) = p.await.unwrap();
        slowest = slowest.max(took);
        assert!(
            took < WRITE_TIMEOUT + SLACK,
            "{key} (sent {sent_at:?} into the hold) answered {status} after {took:?}"
        );
        match job {
            Some(job) => jobs.push(job),
            None => {
                assert!(retry_after, "{key}: a 503 without Retry-After");
                assert!(
                    sent_at < HOLD + Duration::from_secs(2),
                    "{key}, sent {sent_at:?} into an {HOLD:?} hold, still refused"
                );
                refused.push(key);
            }
        }
    }
    assert!(
        !refused.is_empty(),
        "the held lock refused nothing: was it held?"
    );
    // A refused request retried with its key ends accepted once (replayed if its job had been
    // committed after all).
    for key in &refused {
        jobs.push(post_until_accepted(port, key, key, Duration::from_secs(20)).await);
    }
    all_completed(port, &jobs, Duration::from_secs(60)).await;
    let db = open_db(&server.db_path()).await;
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM conversations WHERE title LIKE 'lock-%'"
        )
        .await,
        n as i64,
        "every request is one conversation"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(DISTINCT title) FROM conversations WHERE title LIKE 'lock-%'"
        )
        .await,
        n as i64
    );
    eprintln!(
        "held lock: {n} POSTs, {} refused during the hold, slowest answer {slowest:?}",
        refused.len()
    );
    server.stop(Duration::from_secs(20)).await;
}

/// A tmpfs mounted on a new directory, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"16m"`), or says why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount could not run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Fills the file system of `dir` with a file of zeros until it is full.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_posts_and_recovers_when_space_returns() {
    let fs = match Tmpfs::mount("24m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: the full-disk test needs to mount a tmpfs ({why})");
            return;
        }
    };
    let logs = tempfile::tempdir().unwrap();
    let db_path = fs.path().join("convoq.db");
    let url = format!("sqlite://{}", db_path.display());
    let timeout_ms = WRITE_TIMEOUT.as_millis().to_string();
    let mut server = Server::start_on(
        logs.path(),
        &url,
        &[
            ("CONVOQ_WRITE_TIMEOUT_MS", &timeout_ms),
            ("CONVOQ_LEASE_MS", "3000"),
        ],
    )
    .await;
    let port = server.port;
    put_user_u1(port).await;
    let mut jobs = Vec::new();
    for i in 0..20 {
        let key = format!("before-{i}");
        jobs.push(post_until_accepted(port, &key, &key, Duration::from_secs(10)).await);
    }
    all_completed(port, &jobs, Duration::from_secs(30)).await;

    let filler = fill(fs.path());
    // POSTs while full, with a payload that needs new pages: each answered 202 or 503 in time
    // (SQLite may still fit some in pages it already has), none 5xx but 503.
    let big = "x".repeat(180);
    let (mut accepted, mut refused, mut not_ready, mut metric_down) = (0, 0, false, false);
    for i in 0..60 {
        let key = format!("full-{i}");
        let (status, took, job, _) = post(port, &key, &format!("{key}-{big}")).await;
        assert!(
            took < WRITE_TIMEOUT + SLACK,
            "{key}: {status} after {took:?}"
        );
        match job {
            Some(job) => {
                accepted += 1;
                jobs.push(job);
            }
            None => refused += 1,
        }
        if let Ok(r) = get(port, "/readyz").await {
            not_ready |= r.status == 503;
        }
        if let Ok(r) = get(port, "/metrics").await {
            metric_down |= r.text().contains("\nconvoq_queue_ready 0");
        }
    }
    assert!(refused > 0, "nothing was refused on a full disk");
    assert!(
        server.try_exit().is_none(),
        "the process died on a full disk"
    );
    assert!(not_ready, "/readyz never said the writer could not write");
    assert!(metric_down, "convoq_queue_ready never said 0");

    std::fs::remove_file(&filler).unwrap();
    // Space is back: POSTs get 202 again within seconds.
    let back = Instant::now();
    let job = post_until_accepted(port, "after", "after", Duration::from_secs(10)).await;
    let recovered = back.elapsed();
    jobs.push(job);
    all_completed(port, &jobs, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(10), "/readyz 200 again", || async {
        get(port, "/readyz")
            .await
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| ())
    })
    .await;
    let metrics = get(port, "/metrics").await.unwrap().text();
    assert!(metrics.contains("\nconvoq_queue_ready 1"), "{metrics}");
    server.stop(Duration::from_secs(20)).await;
    let check: String = rusqlite::Connection::open(&db_path)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let logs = server.logs();
    assert!(!logs.contains("panicked"), "a panic in the logs");
    eprintln!(
        "full disk: {accepted} accepted and {refused} refused while full; 202 again {recovered:?} \
         after space returned"
    );
}

#[derive(Default)]
struct Load {
    next: AtomicUsize,
    accepted: AtomicUsize,
    jobs: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_and_two_workers_share_one_file_and_lose_nothing() {
    const TOTAL: usize = 1500;
    const BUDGET: Duration = Duration::from_secs(120);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("convoq.db").display());
    let env = [("CONVOQ_LEASE_MS", "2000"), ("CONVOQ_SHUTDOWN_GRACE", "5")];
    let mut api = Server::launch(dir.path(), "api", Role::Api, &url, &env).await;
    let mut workers = [
        Server::launch(dir.path(), "worker0", Role::Worker, &url, &env).await,
        Server::launch(dir.path(), "worker1", Role::Worker, &url, &env).await,
    ];
    let port = api.port;
    put_user_u1(port).await;
    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let load = load.clone();
            tokio::spawn(async move {
                loop {
                    let n = load.next.fetch_add(1, Ordering::SeqCst);
                    if n >= TOTAL {
                        return;
                    }
                    let key = format!("mp-{n}");
                    let job = post_until_accepted(port, &key, &key, BUDGET).await;
                    load.jobs.lock().unwrap().push(job);
                    load.accepted.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    eventually(BUDGET, "a third accepted", || {
        let n = load.accepted.load(Ordering::SeqCst);
        async move { (n >= TOTAL / 3).then_some(()) }
    })
    .await;
    workers[0].sigkill();
    for c in clients {
        tokio::time::timeout(BUDGET, c).await.unwrap().unwrap();
    }
    let jobs = load.jobs.lock().unwrap().clone();
    assert_eq!(jobs.iter().collect::<HashSet<_>>().len(), TOTAL);
    let db = open_db(&dir.path().join("convoq.db")).await;
    eventually(BUDGET, "every job completed", || {
        let db = db.clone();
        async move {
            let done = count(
                &db,
                "SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND state = 'completed'",
            )
            .await;
            (done as usize == TOTAL).then_some(())
        }
    })
    .await;
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM conversations").await as usize,
        TOTAL,
        "every accepted conversation once, and nothing else"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(DISTINCT title) FROM conversations").await as usize,
        TOTAL
    );
    assert_eq!(
        count(&db, "SELECT COUNT(DISTINCT subject_id) FROM audit_log").await as usize,
        TOTAL
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM (SELECT job_id FROM cq_job_events WHERE kind = 'completed' \
             GROUP BY queue, job_id HAVING COUNT(*) > 1)"
        )
        .await,
        0,
        "no job completed twice"
    );
    workers[1].stop(Duration::from_secs(20)).await;
    api.stop(Duration::from_secs(20)).await;
}
