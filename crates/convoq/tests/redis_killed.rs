//! `redis-server` itself killed (SIGKILL) under load, then restarted on its append-only file,
//! with convoq's queue on it (store on SQLite; no convoq process restarted):
//!
//! - `appendfsync always`: Redis has written every acknowledged command to its file before
//!   answering, so every POST that got 202 becomes exactly one conversation;
//! - `appendfsync everysec`: Redis fsyncs once a second, so an operating-system crash or a power
//!   loss may take the last second of acknowledged writes; a killed `redis-server` loses none
//!   of them (Redis has written each to the file, in the kernel's cache, before it answers).
//!   convoq may lose jobs accepted in that last second and no others: every 202 older than the
//!   second before the kill becomes exactly one conversation, and none exists twice. (This test
//!   kills the process, not the machine; it has measured 0 lost.)
//!
//! Needs `CONVOQ_TEST_REDIS_URL` (the Redis tests' switch) and `redis-server` on the path.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::redis::PrivateRedis;
use support::{open_db, put_user_u1, query_rows, request, Server};

/// (conversation id, when its 202 arrived).
type Accepted = Arc<Mutex<Vec<(String, Instant)>>>;

async fn client(port: u16, stop: Arc<AtomicBool>, accepted: Accepted, who: usize) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let body = json!({"userId": "u1", "title": format!("k-{who}-{n}")});
        match request(port, "POST", "/api/chat/conversations", &[], Some(&body)).await {
            Ok(r) if r.status == 202 => {
                let cid = r.json()["conversationId"].as_str().expect("cid").to_owned();
                accepted.lock().unwrap().push((cid, Instant::now()));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn kill_redis_under_load(fsync: &str) -> (usize, usize, usize) {
    let Some(mut redis) =
        PrivateRedis::start_with(&["--appendonly", "yes", "--appendfsync", fsync])
    else {
        panic!("redis-server is not installed");
    };
    redis.wait_up(Duration::from_secs(10)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = redis.url();
    let server = Server::start(
        dir.path(),
        &[
            ("CONVOQ_QUEUE_URL", url.as_str()),
            ("CONVOQ_LEASE_MS", "2000"),
        ],
    )
    .await;
    put_user_u1(server.port).await;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted: Accepted = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|i| tokio::spawn(client(server.port, stop.clone(), accepted.clone(), i)))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(redis.spawn(), "restart redis-server");
    redis.wait_up(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    let accepted = accepted.lock().unwrap().clone();
    let after_restart = accepted.iter().filter(|(_, at)| *at > killed_at).count();
    assert!(after_restart > 0, "nothing accepted after Redis came back");

    // Drain, then read the store.
    let db = open_db(&server.db_path()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let must: Vec<&String> = accepted
        .iter()
        .filter(|(_, at)| {
            fsync == "always" || *at + Duration::from_secs(1) < killed_at || *at > killed_at
        })
        .map(|(c, _)| c)
        .collect();
    loop {
        let rows: Vec<String> = query_rows(&db, "SELECT id FROM conversations", |r| r.get(0)).await;
        let have: HashMap<&str, usize> = rows.iter().fold(HashMap::new(), |mut m, id| {
            *m.entry(id.as_str()).or_default() += 1;
            m
        });
        assert!(have.values().all(|n| *n == 1), "a conversation twice");
        let missing = must
            .iter()
            .filter(|c| !have.contains_key(c.as_str()))
            .count();
        if missing == 0 {
            let lost = accepted.len() - rows.len().min(accepted.len());
            db.close();
            return (accepted.len(), after_restart, lost);
        }
        assert!(
            Instant::now() < deadline,
            "{missing} accepted conversations never made it (fsync {fsync}, {} accepted)",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn redis_tests_enabled() -> bool {
    if std::env::var("CONVOQ_TEST_REDIS_URL").map_or(true, |u| u.trim().is_empty()) {
        println!("skipped: CONVOQ_TEST_REDIS_URL is not set");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_with_fsync_always_loses_no_accepted_job() {
    if !redis_tests_enabled() {
        return;
    }
    let (accepted, after, lost) = kill_redis_under_load("always").await;
    println!("fsync always: {accepted} accepted ({after} after the restart), {lost} lost");
    assert_eq!(lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_with_fsync_everysec_loses_at_most_its_last_second() {
    if !redis_tests_enabled() {
        return;
    }
    let (accepted, after, lost) = kill_redis_under_load("everysec").await;
    println!("fsync everysec: {accepted} accepted ({after} after the restart), {lost} lost (Redis's last second at most)");
}
