//! Crash test (SPEC §4, §7): 1,000 POSTs under load while the server is killed with SIGKILL
//! twice and restarted; every conversation that got a 202 exists exactly once. Run with the
//! queue on SQLite, and again with the queue on Redis (`CONVOQ_TEST_REDIS_URL`).
//!
//! Sixteen clients share 1,000 logical requests, each with its own title `c-<n>` and
//! `Idempotency-Key: crash-<n>`. The controller SIGKILLs the server after about 300 and 650
//! 202s and restarts it on the same port and SQLite file (with a 2 s lease, so the jobs the dead
//! process held are taken back quickly). A client retries a refused connection or a 503/429
//! after a short backoff; a request that was sent but got no answer may or may not have been
//! accepted, so it is retried with the same key, and the server either replays the original
//! 202 or accepts it for the first time. So each logical request ends accepted exactly once.
//!
//! Then every accepted job must complete, and the SQLite file must hold exactly one
//! conversation per accepted conversation id (none beyond them, each title once) and exactly one
//! `conversation.created` audit row for each.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{count, eventually, get, open_db, post_keyed, put_user_u1, query_rows, Server};

const TOTAL: usize = 1000;
const CLIENTS: usize = 16;
const KILL_AT: [usize; 2] = [300, 650];
/// The whole test, load and checks, stays under this.
const BUDGET: Duration = Duration::from_secs(110);

#[derive(Default)]
struct Load {
    next: AtomicUsize,
    accepted: AtomicUsize,
    /// (conversationId, jobId) per logical request.
    slots: Mutex<Vec<Option<(String, String)>>>,
    /// Requests sent that got no answer, then sent again with the same key.
    retried: AtomicUsize,
    /// 202s with `Idempotent-Replayed: true`.
    replayed: AtomicUsize,
    /// Connections refused (the server was down).
    refused: AtomicUsize,
    /// 503 or 429 answers.
    unavailable: AtomicUsize,
}

async fn client(port: u16, load: Arc<Load>, deadline: Instant) {
    loop {
        let n = load.next.fetch_add(1, Ordering::SeqCst);
        if n >= TOTAL {
            return;
        }
        let key = format!("crash-{n}");
        let body = json!({"userId": "u1", "title": format!("c-{n}")});
        let mut backoff = Duration::from_millis(10);
        loop {
            assert!(
                Instant::now() < deadline,
                "request {n} still not accepted at the deadline"
            );
            let r = post_keyed(port, &key, &body).await;
            match r {
                Ok(r) if r.status == 202 => {
                    let v = r.json();
                    let ids = (
                        v["conversationId"].as_str().expect("cid").to_owned(),
                        v["jobId"].as_str().expect("jobId").to_owned(),
                    );
                    if r.header("idempotent-replayed") == Some("true") {
                        load.replayed.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut slots = load.slots.lock().unwrap();
                    if let Some(previous) = &slots[n] {
                        assert_eq!(previous, &ids, "request {n}: a replay with other ids");
                    } else {
                        slots[n] = Some(ids);
                        load.accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    break;
                }
                Ok(r) if r.status == 503 || r.status == 429 => {
                    load.unavailable.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => panic!("request {n}: unexpected {} {}", r.status, r.text()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    load.refused.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    // Sent, no answer: maybe accepted. Same key again.
                    load.retried.fetch_add(1, Ordering::SeqCst);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_twice_under_load_loses_and_duplicates_nothing() {
    sigkill_twice(&[]).await;
}

/// The same with the queue on Redis (BullMQ), the store on SQLite: the dead process's jobs
/// come back when their locks expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_twice_with_the_queue_on_redis_loses_and_duplicates_nothing() {
    let Some(redis) = support::test_redis_url() else {
        return;
    };
    let prefix = format!("cq-crash-{}", uuid::Uuid::new_v4().simple());
    sigkill_twice(&[
        ("CONVOQ_QUEUE_URL", redis.as_str()),
        ("CONVOQ_QUEUE_PREFIX", prefix.as_str()),
    ])
    .await;
}

async fn sigkill_twice(queue_env: &[(&str, &str)]) {
    let started = Instant::now();
    let deadline = started + BUDGET;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = vec![("CONVOQ_LEASE_MS", "2000")];
    env.extend_from_slice(queue_env);
    let mut server = Server::start(dir.path(), &env).await;
    let port = server.port;
    put_user_u1(port).await;

    let load = Arc::new(Load {
        slots: Mutex::new(vec![None; TOTAL]),
        ..Load::default()
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(port, load.clone(), deadline)))
        .collect();

    let mut kills = 0;
    for at in KILL_AT {
        let watched = load.clone();
        eventually(
            deadline.saturating_duration_since(Instant::now()),
            &format!("{at} accepted"),
            move || {
                let n = watched.accepted.load(Ordering::SeqCst);
                async move { (n >= at).then_some(()) }
            },
        )
        .await;
        let accepted_at_kill = load.accepted.load(Ordering::SeqCst);
        server.sigkill();
        kills += 1;
        // Down for a moment: clients meet refused connections and back off.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.spawn();
        server.wait_ready(Duration::from_secs(30)).await;
        eprintln!(
            "crash: kill {kills} at {accepted_at_kill} accepted, restarted after {:?}",
            started.elapsed()
        );
    }
    for c in clients {
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), c)
            .await
            .expect("clients finish within the budget")
            .expect("client task");
    }
    let load_done = started.elapsed();

    let accepted: Vec<(String, String)> = load
        .slots
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(n, s)| {
            s.clone()
                .unwrap_or_else(|| panic!("request {n} never accepted"))
        })
        .collect();
    let cids: HashSet<&str> = accepted.iter().map(|(c, _)| c.as_str()).collect();
    let jobs: HashSet<&str> = accepted.iter().map(|(_, j)| j.as_str()).collect();
    assert_eq!(cids.len(), TOTAL, "one conversation id per logical request");
    assert_eq!(jobs.len(), TOTAL, "one job per logical request");

    // Every accepted job completes (a few at a time, each long-polled).
    let queue: Arc<Mutex<Vec<String>>> =
        Arc::new(Mutex::new(jobs.iter().map(|j| j.to_string()).collect()));
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let queue = queue.clone();
            tokio::spawn(async move {
                loop {
                    let Some(job_id) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    loop {
                        assert!(
                            Instant::now() < deadline,
                            "job {job_id} not completed at the deadline"
                        );
                        match get(port, &format!("/api/jobs/{job_id}?wait=5")).await {
                            Ok(r) if r.status == 200 => {
                                let job = r.json()["job"].clone();
                                match job["state"].as_str() {
                                    Some("completed") => break,
                                    Some("failed") => panic!("job failed: {job}"),
                                    _ => {}
                                }
                            }
                            Ok(r) => panic!("GET job {job_id}: {} {}", r.status, r.text()),
                            Err(e) => panic!("GET job {job_id}: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for w in waiters {
        w.await.expect("job waiter");
    }

    // Audit jobs drain: one event per conversation.
    let db = open_db(&server.db_path()).await;
    {
        let db = db.clone();
        eventually(
            deadline.saturating_duration_since(Instant::now()),
            "the audit jobs to drain",
            move || {
                let db = db.clone();
                async move {
                    let n = count(
                        &db,
                        "SELECT COUNT(*) FROM audit_log WHERE event = 'conversation.created'",
                    )
                    .await;
                    (n as usize >= TOTAL).then_some(())
                }
            },
        )
        .await;
    }
    db.close();
    server.stop(Duration::from_secs(20)).await;

    // The file, quiescent.
    let db = open_db(&server.db_path()).await;
    let rows: Vec<(String, Option<String>)> =
        query_rows(&db, "SELECT id, title FROM conversations", |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .await;
    assert_eq!(
        rows.len(),
        TOTAL,
        "exactly the accepted conversations, no more"
    );
    let by_id: HashMap<&str, Option<&str>> = rows
        .iter()
        .map(|(id, t)| (id.as_str(), t.as_deref()))
        .collect();
    assert_eq!(by_id.len(), TOTAL, "conversation ids are unique");
    let mut titles: HashMap<&str, usize> = HashMap::new();
    for (_, t) in &rows {
        *titles
            .entry(t.as_deref().expect("every conversation has a title"))
            .or_default() += 1;
    }
    for (n, (cid, _)) in accepted.iter().enumerate() {
        let title = format!("c-{n}");
        assert_eq!(
            by_id.get(cid.as_str()),
            Some(&Some(title.as_str())),
            "accepted conversation {cid} ({title}) exists with its title"
        );
        assert_eq!(titles.get(title.as_str()), Some(&1), "{title} exactly once");
    }
    let audit: Vec<(String, i64)> = query_rows(
        &db,
        "SELECT subject_id, COUNT(*) FROM audit_log WHERE event = 'conversation.created' \
         GROUP BY subject_id",
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .await;
    assert_eq!(
        audit.len(),
        TOTAL,
        "one audited conversation per accepted one"
    );
    for (subject, n) in &audit {
        assert!(
            cids.contains(subject.as_str()),
            "audit row for {subject}, not accepted"
        );
        assert_eq!(*n, 1, "audit rows for {subject}");
    }
    // The queue's own tables, where the queue is in the file (on Redis every accepted job was
    // seen completed above, through the API).
    let (stalled, multi) = if queue_env.is_empty() {
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM cq_jobs WHERE state = 'active'").await,
            0
        );
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM cq_jobs WHERE state = 'failed'").await,
            0
        );
        (
            Some(count(&db, "SELECT COALESCE(SUM(stalled_count), 0) FROM cq_jobs").await),
            Some(count(&db, "SELECT COUNT(*) FROM cq_jobs WHERE attempts_made > 1").await),
        )
    } else {
        (None, None)
    };
    db.close();

    eprintln!(
        "crash: {} accepted ({} replayed), {} retried after no answer, {} refused connections, \
         {} 503/429, {kills} kills, {stalled:?} stalled takebacks, {multi:?} jobs with >1 attempt; \
         load {load_done:?}, total {:?}",
        load.accepted.load(Ordering::SeqCst),
        load.replayed.load(Ordering::SeqCst),
        load.retried.load(Ordering::SeqCst),
        load.refused.load(Ordering::SeqCst),
        load.unavailable.load(Ordering::SeqCst),
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(120));
}
