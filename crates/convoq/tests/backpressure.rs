//! Backpressure under a burst (the real binary, on SQLite and on Postgres): with the `database`
//! queue paused and `--max-backlog 200`, a burst of 260 POSTs, one after another and then from
//! 16 concurrent clients, gets exactly 200 accepted (one process: no overshoot) and 429 with
//! `Retry-After` for every one after; after resume and drain, POSTs get 202 again, and every
//! accepted request is one conversation.

#[macro_use]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::{eventually, get, put_user_u1, request, Server, TestDatabase};

const LIMIT: usize = 200;
const BURST: usize = 260;

on_each_database!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    a_burst_stops_at_the_backlog_limit,
);

/// The outcome of one POST: accepted, or refused with 429 and `Retry-After`.
async fn post(port: u16, n: usize) -> bool {
    let r = request(
        port,
        "POST",
        "/api/chat/conversations",
        &[],
        Some(&json!({ "userId": "u1", "title": format!("burst-{n}") })),
    )
    .await
    .unwrap_or_else(|e| panic!("POST {n}: {e}"));
    match r.status {
        202 => true,
        429 => {
            let retry: u64 = r
                .header("retry-after")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("429 without a Retry-After: {:?}", r.headers));
            assert!((1..=60).contains(&retry), "Retry-After {retry}");
            false
        }
        other => panic!("POST {n}: {other} {}", r.text()),
    }
}

async fn admin(port: u16, path: &str) {
    let r = request(port, "POST", path, &[], None)
        .await
        .expect("admin call");
    assert_eq!(r.status, 200, "{path}: {}", r.text());
}

/// Waits until the `database` queue has nothing waiting or running (read fresh).
async fn drained(port: u16) {
    eventually(
        Duration::from_secs(60),
        "the queue drained",
        || async move {
            let r = get(port, "/api/queues/database?fresh=true").await.ok()?;
            let c = &r.json()["queue"]["counts"];
            let left = ["waiting", "active", "delayed", "paused"]
                .iter()
                .map(|s| c[s].as_u64().unwrap_or(u64::MAX))
                .sum::<u64>();
            (left == 0).then_some(())
        },
    )
    .await;
}

async fn a_burst_stops_at_the_backlog_limit(db: TestDatabase) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_on(dir.path(), &db.url, &[("CONVOQ_MAX_BACKLOG", "200")]).await;
    let port = server.port;
    put_user_u1(port).await;

    // One client, one POST after another, as fast as it can.
    admin(port, "/api/queues/database/pause").await;
    let mut accepted = 0;
    let mut refused_from = None;
    for n in 0..BURST {
        if post(port, n).await {
            assert!(
                refused_from.is_none(),
                "POST {n} accepted after POST {refused_from:?} was refused"
            );
            accepted += 1;
        } else if refused_from.is_none() {
            refused_from = Some(n);
        }
    }
    assert_eq!(accepted, LIMIT, "sequential burst");
    admin(port, "/api/queues/database/resume").await;
    drained(port).await;

    // Sixteen clients at once.
    admin(port, "/api/queues/database/pause").await;
    let next = Arc::new(AtomicUsize::new(BURST));
    let won = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (next, won) = (next.clone(), won.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= 2 * BURST {
                        return;
                    }
                    if post(port, n).await {
                        won.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(won.load(Ordering::SeqCst), LIMIT, "concurrent burst");
    // Still full: refused.
    assert!(!post(port, 2 * BURST).await);
    // The cached counts say how old they are; a fresh read sees the burst.
    let q = get(port, "/api/queues/database").await.unwrap().json();
    assert!(q["queue"]["countsAgeMs"].is_u64(), "{q}");
    let q = get(port, "/api/queues/database?fresh=true")
        .await
        .unwrap()
        .json();
    assert_eq!(q["queue"]["counts"]["paused"], json!(LIMIT), "{q}");
    assert!(q["queue"]["countsAgeMs"].as_u64().unwrap() < 1000, "{q}");

    // After resume and drain, POSTs get 202 again, and nothing accepted was lost.
    admin(port, "/api/queues/database/resume").await;
    drained(port).await;
    assert!(post(port, 2 * BURST + 1).await, "202 again after the drain");
    drained(port).await;
    let conn = db.open().await;
    assert_eq!(
        conn.count("SELECT COUNT(*) FROM conversations WHERE title LIKE 'burst-%'")
            .await,
        (2 * LIMIT + 1) as i64
    );
    conn.close().await;
    server.stop(Duration::from_secs(20)).await;
}
