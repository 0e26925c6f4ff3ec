//! Clock skew (Postgres): two worker processes whose clocks are an hour off, one behind and
//! one ahead (`libfaketime`, Debian's `faketime`, preloaded), share one database with an API
//! process on the true time, under load. The SQL engine reads time against the database's
//! own clock (it measures each process's lead at start and keeps it), so a skewed worker's
//! leases and retries mean what they mean on the true clock: no job is taken back early (no
//! stall), none runs twice, every accepted request is one conversation. Skipped, saying why,
//! without `CONVOQ_TEST_POSTGRES_URL` or without libfaketime.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{request, Role, Server, TestDatabase};

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_an_hour_off_take_nothing_back_early_and_run_nothing_twice() {
    let Some(database) = TestDatabase::postgres().await else {
        return;
    };
    if !std::path::Path::new(FAKETIME).exists() {
        println!("skipped: libfaketime is not installed (Debian package faketime)");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [("CONVOQ_LEASE_MS", "2000")];
    let api = Server::launch(dir.path(), "api", Role::Api, &database.url, &env).await;
    let mut workers = Vec::new();
    for (name, offset) in [("behind", "-1h"), ("ahead", "+1h")] {
        let skewed = [
            ("CONVOQ_LEASE_MS", "2000"),
            ("LD_PRELOAD", FAKETIME),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ];
        let w = Server::launch(dir.path(), name, Role::Worker, &database.url, &skewed).await;
        workers.push(w);
    }
    // The preload took: each worker logs its start an hour off.
    for w in &workers {
        let first = support::json_lines(&w.logs())
            .into_iter()
            .find_map(|l| l["timestamp"].as_str().map(str::to_owned))
            .expect("a log line");
        let at = chrono::DateTime::parse_from_rfc3339(&first).expect("a timestamp");
        let off = (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .num_minutes()
            .abs();
        assert!((55..=65).contains(&off), "{} is {off} minutes off", w.name);
    }
    support::put_user_u1(api.port).await;

    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, accepted, port) = (stop.clone(), accepted.clone(), api.port);
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let key = format!("skew-{c}-{n}");
                    let body = json!({"userId": "u1", "title": key});
                    let r = request(
                        port,
                        "POST",
                        "/api/chat/conversations",
                        &[("Idempotency-Key", &key)],
                        Some(&body),
                    )
                    .await
                    .expect("POST");
                    if r.status == 202 {
                        accepted.lock().unwrap().push(key);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    // Several leases long, so that early rescues would show.
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    let n = accepted.lock().unwrap().len() as i64;
    assert!(n > 100, "only {n} accepted");

    let db = database.open().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.count("SELECT COUNT(*) FROM conversations").await < n {
        assert!(Instant::now() < deadline, "not every accepted request ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM conversations").await,
        n,
        "one conversation per request"
    );
    assert_eq!(
        db.count("SELECT COALESCE(SUM(stalled_count), 0) FROM cq_jobs")
            .await,
        0,
        "a job was taken back early"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM cq_jobs WHERE attempts_made > 1")
            .await,
        0,
        "a job ran twice"
    );
    for w in &workers {
        let ran = support::json_lines(&w.logs())
            .iter()
            .filter(|l| l["message"] == "job completed")
            .count();
        assert!(ran > 0, "worker {} ran no job", w.name);
    }
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
    db.close().await;
}
