//! A worker frozen past its lease and then resumed (Postgres only): one API process and two
//! worker processes with a 2 s lease. Mid-load, worker 0 is frozen (SIGSTOP) while it holds
//! `create_conversation` jobs; worker 1 takes them back once their leases expire and completes
//! them. Worker 0 is then resumed (SIGCONT) and finishes the attempts it was in: each of its
//! late completions must be refused (fenced by the lease token), and nothing it does may add a
//! second conversation. At the end every accepted request is exactly one conversation, and
//! every accepted job is completed.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{json_lines, post_keyed, put_user_u1, Role, Server, TestDatabase};

const LEASE_MS: &str = "2000";
/// The whole test stays under this.
const BUDGET: Duration = Duration::from_secs(90);

async fn client(
    port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<(String, String)>>>,
    who: usize,
) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = format!("frozen-{who}-{n}");
        let body = json!({"userId": "u1", "title": key});
        loop {
            let r = post_keyed(port, &key, &body).await;
            match r {
                Ok(r) if r.status == 202 => {
                    let v = r.json();
                    accepted.lock().unwrap().push((
                        v["jobId"].as_str().expect("jobId").to_owned(),
                        v["conversationId"].as_str().expect("cid").to_owned(),
                    ));
                    break;
                }
                // Retried with the same key: accepted once at most.
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_worker_resumed_late_is_fenced() {
    let Some(database) = TestDatabase::postgres().await else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("CONVOQ_LEASE_MS", LEASE_MS),
        ("CONVOQ_CONCURRENCY", "database=8,audit=4"),
    ];
    let api = Server::launch(dir.path(), "api", Role::Api, &database.url, &env).await;
    let frozen = Server::launch(dir.path(), "worker0", Role::Worker, &database.url, &env).await;
    let other = Server::launch(dir.path(), "worker1", Role::Worker, &database.url, &env).await;
    put_user_u1(api.port).await;
    let db = database.open().await;
    let owner = json_lines(&frozen.logs())
        .into_iter()
        .find_map(|l| l["owner"].as_str().map(str::to_owned))
        .expect("worker 0 logs its owner id");

    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|i| tokio::spawn(client(api.port, stop.clone(), accepted.clone(), i)))
        .collect();

    // Freeze worker 0 while it holds jobs (let it go and try again while it holds none).
    let held_sql = format!(
        "SELECT COUNT(*) FROM cq_jobs WHERE state = 'active' AND lease_token LIKE '{owner}/%'"
    );
    let mut held = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        frozen.signal("STOP");
        held = db.count(&held_sql).await;
        if held > 0 {
            break;
        }
        frozen.signal("CONT");
    }
    assert!(held > 0, "worker 0 never held a job when frozen");
    let frozen_at = Instant::now();

    // Its jobs are taken back by worker 1 within a lease and a sweep, while it is frozen.
    // Within a lease, the idle-in-transaction timeout (5 s) and a sweep, with room to spare.
    let deadline = frozen_at + Duration::from_secs(15);
    while db.count(&held_sql).await > 0 {
        if Instant::now() > deadline {
            let now = chrono::Utc::now().timestamp_millis();
            let expiry = db
                .count(&held_sql.replace("COUNT(*)", "MAX(lease_expires_at)"))
                .await;
            let idle_in_tx = db
                .count("SELECT COUNT(*) FROM pg_stat_activity WHERE state = 'idle in transaction'")
                .await;
            let reaps: Vec<String> = other
                .logs()
                .lines()
                .filter(|l| l.contains("stalled"))
                .map(str::to_owned)
                .collect();
            panic!(
                "worker 0's jobs were never taken back: their leases end {} ms from now; {idle_in_tx} sessions idle in a transaction; worker 1 on stalls: {reaps:?}",
                expiry - now,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rescued_in = frozen_at.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    frozen.signal("CONT");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    let accepted = accepted.lock().unwrap().clone();
    let n = accepted.len() as i64;

    // Everything drains.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = db.count("SELECT COUNT(*) FROM conversations").await;
        if done >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {n} conversations after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM conversations").await,
        n,
        "one conversation per request"
    );
    let ids: HashSet<&String> = accepted.iter().map(|(_, c)| c).collect();
    assert_eq!(
        ids.len(),
        accepted.len(),
        "a conversation id answered twice"
    );
    // Jobs with an idempotency key are kept 25 hours: every accepted one is there, completed.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND state = 'completed'")
            .await,
        n,
        "every accepted job completed"
    );
    assert!(
        db.count("SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND stalled_count > 0")
            .await
            >= held,
        "the frozen worker's jobs were taken back as stalled"
    );
    // The resumed worker's late completions were refused: fenced by their lease tokens, or
    // failed with the session Postgres ended while it was frozen (and then fenced).
    let fenced = support::late_attempts_refused(&frozen.logs());
    assert!(
        fenced >= 1,
        "worker 0 finished nothing late, or it was not fenced"
    );
    println!(
        "held {held} when frozen, taken back within {rescued_in:?}, {fenced} late completions fenced, {n} requests"
    );
    assert!(started.elapsed() < BUDGET, "took {:?}", started.elapsed());
    drop(other);
    db.close().await;
}
