//! Shutdown of the real `convoq` binary, each scenario on SQLite (module `sqlite`) and on
//! Postgres (module `postgres`, its own fresh database; skipped when
//! `CONVOQ_TEST_POSTGRES_URL` is unset), by `on_each_database!`:
//!
//! * `sigterm_under_load_exits_cleanly_and_loses_nothing`: SIGTERM while POSTs and jobs are in
//!   flight; exit 0 within the grace period, no job left `active` in the database, and after
//!   a restart every accepted conversation exists.

#[macro_use]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    eventually, expect_ok, get, json_lines, put_user_u1, request, sse_until, Server, TestDatabase,
};

/// The user every conversation here belongs to (`put_user_u1`).
const USER: &str = "u1";

on_each_database!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    sigterm_under_load_exits_cleanly_and_loses_nothing,
    sigterm_is_not_held_by_open_event_streams_or_long_polls,
);

async fn sigterm_under_load_exits_cleanly_and_loses_nothing(database: TestDatabase) {
    const POSTS: usize = 200;
    const CLIENTS: usize = 8;
    const GRACE_SECS: u64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let grace = GRACE_SECS.to_string();
    let mut server = Server::start_on(
        dir.path(),
        &database.url,
        &[("CONVOQ_SHUTDOWN_GRACE", &grace)],
    )
    .await;
    let port = server.port;
    put_user_u1(port).await;

    let next = Arc::new(AtomicUsize::new(0));
    let accepted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let lost = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, accepted, lost) = (next.clone(), accepted.clone(), lost.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= POSTS {
                        return;
                    }
                    let body = json!({"userId": USER, "title": format!("t-{n}")});
                    match request(port, "POST", "/api/chat/conversations", &[], Some(&body)).await {
                        Ok(r) if r.status == 202 => {
                            let v = r.json();
                            accepted.lock().unwrap().push((
                                v["conversationId"].as_str().expect("cid").to_owned(),
                                v["jobId"].as_str().expect("jobId").to_owned(),
                            ));
                        }
                        Ok(r) if r.status == 503 => {
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => panic!("POST {n}: {} {}", r.status, r.text()),
                        // The server is going away: refused, reset, cut short.
                        Err(_) => {
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();

    // SIGTERM while POSTs (and their jobs) are in flight.
    eventually(Duration::from_secs(30), "40 accepted POSTs", || {
        let n = accepted.lock().unwrap().len();
        async move { (n >= 40).then_some(()) }
    })
    .await;
    let signalled = Instant::now();
    server.sigterm();
    for c in clients {
        tokio::time::timeout(Duration::from_secs(40), c)
            .await
            .expect("clients finish")
            .expect("client task");
    }
    let status = server
        .wait_exit(Duration::from_secs(GRACE_SECS + 10))
        .await
        .unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", server.log_tail()));
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{}",
        server.log_tail()
    );
    assert!(
        took <= Duration::from_secs(GRACE_SECS + 2),
        "exited {took:?} after SIGTERM, grace {GRACE_SECS} s"
    );
    let logs = server.logs();
    assert!(logs.contains("\"shutdown complete\""), "{logs}");
    let accepted = accepted.lock().unwrap().clone();
    let lost = lost.load(Ordering::SeqCst);
    assert_eq!(accepted.len() + lost, POSTS);

    {
        let db = database.open().await;
        let active = db
            .count("SELECT COUNT(*) FROM cq_jobs WHERE state = 'active'")
            .await;
        let waiting = db
            .count("SELECT COUNT(*) FROM cq_jobs WHERE state = 'waiting' AND queue = 'database'")
            .await;
        let audit_waiting = db
            .count("SELECT COUNT(*) FROM cq_jobs WHERE state = 'waiting' AND queue = 'audit'")
            .await;
        let rows = db.count("SELECT COUNT(*) FROM conversations").await;
        assert_eq!(active, 0, "no job is left active after a graceful stop");
        let released = json_lines(&logs)
            .into_iter()
            .find(|l| l["message"] == json!("workers stopped"))
            .map(|l| l["released"].clone());
        eprintln!(
            "sigterm: {} accepted, {lost} refused or cut off, exit after {took:?}, \
             {waiting} create and {audit_waiting} audit jobs left waiting, \
             {rows} conversations at stop, {released:?}",
            accepted.len()
        );
        db.close().await;
    }

    server.spawn();
    server.wait_ready(Duration::from_secs(30)).await;
    for (cid, job_id) in &accepted {
        let job = expect_ok(
            get(port, &format!("/api/jobs/{job_id}?wait=20")).await,
            "GET job after restart",
        )["job"]
            .clone();
        assert_eq!(job["state"], json!("completed"), "{job}");
        assert_eq!(
            job["attemptsMade"],
            json!(1),
            "a graceful stop burns no attempt: {job}"
        );
        let c = expect_ok(
            get(port, &format!("/api/chat/conversations/{cid}")).await,
            "GET conversation after restart",
        );
        assert_eq!(c["conversation"]["id"], json!(cid), "{c}");
    }
    let db = database.open().await;
    let rows = db.count("SELECT COUNT(*) FROM conversations").await;
    assert!(rows as usize >= accepted.len(), "{rows} rows");
    assert!(rows as usize <= POSTS, "{rows} rows for {POSTS} POSTs");
    // One audit record per conversation, committed with it.
    eventually(Duration::from_secs(30), "the audit records", || {
        let db = db.clone();
        async move {
            let audited = db.count("SELECT COUNT(DISTINCT subject_id) FROM audit_log WHERE event = 'conversation.created'",
            )
            .await;
            (audited == rows).then_some(())
        }
    })
    .await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM audit_log").await,
        rows,
        "one audit event per conversation"
    );
    db.close().await;
    server.stop(Duration::from_secs(GRACE_SECS + 10)).await;
}

async fn sigterm_is_not_held_by_open_event_streams_or_long_polls(database: TestDatabase) {
    const GRACE_SECS: u64 = 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let grace = GRACE_SECS.to_string();
    let mut server = Server::start_on(
        dir.path(),
        &database.url,
        &[("CONVOQ_SHUTDOWN_GRACE", &grace)],
    )
    .await;
    let port = server.port;
    put_user_u1(port).await;
    // A job that cannot finish: its queue is paused.
    let r = request(port, "POST", "/api/queues/database/pause", &[], None)
        .await
        .expect("pause");
    assert_eq!(r.status, 200, "pause: {}", r.text());
    let r = request(
        port,
        "POST",
        "/api/chat/conversations",
        &[],
        Some(&json!({"userId": USER})),
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 202, "{}", r.text());
    let job_path = format!("/api/jobs/{}", r.json()["jobId"].as_str().expect("jobId"));
    let sse = {
        let path = format!("{job_path}/events");
        tokio::spawn(async move {
            sse_until(
                port,
                &path,
                &["completed", "failed"],
                Duration::from_secs(40),
            )
            .await
        })
    };
    let long = {
        let path = format!("{job_path}?wait=30");
        tokio::spawn(async move { get(port, &path).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sse.is_finished() && !long.is_finished());

    let signalled = Instant::now();
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!(
                "an open event stream held the process after SIGTERM:\n{}",
                server.log_tail()
            )
        });
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status}\n{}",
        server.log_tail()
    );
    assert!(
        took < Duration::from_secs(2 * GRACE_SECS + 3),
        "exited {took:?} after SIGTERM, grace {GRACE_SECS} s"
    );
    // The streams end with the process (with or without a last answer); neither hangs.
    let _ = tokio::time::timeout(Duration::from_secs(5), sse)
        .await
        .expect("the event stream ends with the process");
    let _ = tokio::time::timeout(Duration::from_secs(5), long)
        .await
        .expect("the long-poll ends with the process");
    let db = database.open().await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM cq_jobs WHERE state = 'active'")
            .await,
        0
    );
    db.close().await;
}
