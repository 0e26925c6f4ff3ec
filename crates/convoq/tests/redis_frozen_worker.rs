//! A worker frozen between "conversation created" and its job's completion, then killed, with
//! the queue on Redis and the store on Postgres (the Node stack's own topology).
//!
//! One API process and two worker processes, a 2 s lease (BullMQ's lock duration). Under load,
//! worker 0 is frozen (SIGSTOP) at a moment when it holds a `create_conversation` job whose
//! conversation is already in Postgres but whose completion has not reached Redis (read from
//! its logs, the store and the job's state at the moment it is frozen; tried again until such
//! a moment comes).
//! Worker 1 must take the job back once its lock expires and run it again: the insert finds
//! the conversation there, the audit job has the same id as the first attempt's, and the job
//! completes. Worker 0 is then killed (SIGKILL). At the end every accepted request is exactly
//! one conversation with exactly one audit record, and every accepted job is completed.
//!
//! Needs `CONVOQ_TEST_POSTGRES_URL` and `CONVOQ_TEST_REDIS_URL`.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{eventually, get, json_lines, post_keyed, put_user_u1, Role, Server, TestDatabase};

const LEASE_MS: &str = "2000";
/// The whole test stays under this.
const BUDGET: Duration = Duration::from_secs(120);

/// jobId → conversationId of every 202.
type Accepted = Arc<Mutex<HashMap<String, String>>>;

async fn client(port: u16, stop: Arc<AtomicBool>, accepted: Accepted, who: usize) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = format!("redis-frozen-{who}-{n}");
        let body = json!({"userId": "u1", "title": key});
        loop {
            let r = post_keyed(port, &key, &body).await;
            match r {
                Ok(r) if r.status == 202 => {
                    let v = r.json();
                    accepted.lock().unwrap().insert(
                        v["jobId"].as_str().expect("jobId").to_owned(),
                        v["conversationId"].as_str().expect("cid").to_owned(),
                    );
                    break;
                }
                // Retried with the same key: accepted once at most.
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `create_conversation` jobs `logs` show started and not completed: (job id,
/// conversation id).
fn in_flight(logs: &str) -> Vec<(String, String)> {
    let mut started = HashMap::new();
    for l in json_lines(logs) {
        if l["job_name"] != "create_conversation" {
            continue;
        }
        let (Some(job), Some(cid)) = (l["job_id"].as_str(), l["conversation_id"].as_str()) else {
            continue;
        };
        match l["message"].as_str() {
            Some("job started") => {
                started.insert(job.to_owned(), cid.to_owned());
            }
            Some("job completed" | "job failed") => {
                started.remove(job);
            }
            _ => {}
        }
    }
    started.into_iter().collect()
}

async fn job_state(port: u16, id: &str) -> Option<String> {
    let r = get(port, &format!("/api/jobs/{id}")).await.ok()?;
    (r.status == 200).then(|| r.json()["job"]["state"].as_str().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_frozen_after_the_insert_then_killed_doubles_nothing() {
    let Some(redis) = support::test_redis_url() else {
        return;
    };
    let Some(database) = TestDatabase::postgres().await else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("cq-frozen-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("CONVOQ_QUEUE_URL", redis.as_str()),
        ("CONVOQ_QUEUE_PREFIX", prefix.as_str()),
        ("CONVOQ_LEASE_MS", LEASE_MS),
        ("CONVOQ_CONCURRENCY", "database=8,audit=4"),
    ];
    let api = Server::launch(dir.path(), "api", Role::Api, &database.url, &env).await;
    let mut frozen = Server::launch(dir.path(), "worker0", Role::Worker, &database.url, &env).await;
    let other = Server::launch(dir.path(), "worker1", Role::Worker, &database.url, &env).await;
    put_user_u1(api.port).await;
    let db = database.open().await;

    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Accepted::default();
    let clients: Vec<_> = (0..4)
        .map(|i| tokio::spawn(client(api.port, stop.clone(), accepted.clone(), i)))
        .collect();
    eventually(Duration::from_secs(20), "jobs to flow", || {
        let db = db.clone();
        async move { (db.count("SELECT COUNT(*) FROM conversations").await >= 50).then_some(()) }
    })
    .await;

    // Freeze worker 0 at a moment when a job of its has its conversation and no completion.
    let mut caught = Vec::new();
    let mut tries = 0;
    while caught.is_empty() {
        tries += 1;
        assert!(
            tries <= 300,
            "worker 0 was never caught between insert and completion"
        );
        tokio::time::sleep(Duration::from_millis(37)).await;
        frozen.signal("STOP");
        // Its last log lines are written by now (stderr is unbuffered).
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (job, cid) in in_flight(&frozen.logs()) {
            let sql = format!("SELECT COUNT(*) FROM conversations WHERE id = '{cid}'");
            // Its completion may have reached Redis just before its log line: only a job
            // still active is between the two.
            if db.count(&sql).await == 1
                && job_state(api.port, &job).await.as_deref() == Some("active")
            {
                caught.push((job, cid));
            }
        }
        if caught.is_empty() {
            frozen.signal("CONT");
        }
    }
    let frozen_at = Instant::now();

    // Worker 1 takes the caught jobs back once their locks expire, and completes them.
    let rescued_in = eventually(
        Duration::from_secs(30),
        "the frozen worker's jobs completed by the other",
        || {
            let caught = caught.clone();
            async move {
                for (job, _) in &caught {
                    if job_state(api.port, job).await.as_deref() != Some("completed") {
                        return None;
                    }
                }
                Some(frozen_at.elapsed())
            }
        },
    )
    .await;
    frozen.sigkill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(40), c)
            .await
            .expect("clients stop")
            .expect("client");
    }
    let accepted = accepted.lock().unwrap().clone();
    let n = accepted.len() as i64;

    // Everything drains through worker 1 (worker 0's other jobs come back as its locks expire).
    eventually(
        Duration::from_secs(45),
        "every accepted job completed",
        || {
            let accepted = accepted.clone();
            async move {
                for job in accepted.keys() {
                    if job_state(api.port, job).await.as_deref() != Some("completed") {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM conversations").await,
        n,
        "one conversation per accepted request"
    );
    let ids: HashSet<&String> = accepted.values().collect();
    assert_eq!(
        ids.len(),
        accepted.len(),
        "a conversation id answered twice"
    );
    eventually(
        Duration::from_secs(20),
        "one audit record per conversation",
        || {
            let db = db.clone();
            async move { (db.count("SELECT COUNT(*) FROM audit_log").await == n).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM audit_log").await, n);
    // The caught jobs ran twice (the second attempt found the conversation there).
    let ran_again = json_lines(&other.logs())
        .iter()
        .filter(|l| {
            l["message"] == "job completed"
                && caught
                    .iter()
                    .any(|(job, _)| l["job_id"].as_str() == Some(job.as_str()))
        })
        .count();
    assert_eq!(
        ran_again,
        caught.len(),
        "worker 1 completed each caught job once"
    );
    println!(
        "redis frozen worker: caught {} job(s) between insert and completion after {tries} \
         freezes, completed by the other worker {rescued_in:?} after the freeze; {n} requests, \
         one conversation and one audit record each",
        caught.len()
    );
    assert!(started.elapsed() < BUDGET, "took {:?}", started.elapsed());
    drop(api);
    drop(other);
    db.close().await;
}
