//! A lost commit acknowledgement on Postgres (loopback only, bounded): a proxy between convoq
//! and Postgres forwards a write that commits (a transaction's `COMMIT`, or an add's insert
//! that commits by itself), lets Postgres commit it, and closes the connection before the
//! answer reaches convoq. The writer cannot know whether its batch committed; it applies the
//! batch once more on a new connection. That must not turn one POST into two jobs: every
//! stored `create_conversation` job is one a 202 announced (POSTs without `Idempotency-Key`,
//! the case where nothing else would catch a second copy), every 202's job completes once,
//! and each makes one conversation.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::postgres::{admin_url, postgres_addr, with_port, Databases};
use support::proxy::Proxy;
use support::{put_user_u1, request, Server};

/// How many acknowledgements are lost.
const LOSSES: usize = 6;
/// The whole test stays under this.
const BUDGET: Duration = Duration::from_secs(90);

#[derive(Default)]
struct Answers {
    accepted: Mutex<Vec<String>>,
    other: Mutex<Vec<u16>>,
    transport: Mutex<Vec<String>>,
}

async fn client(port: u16, answers: Arc<Answers>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let r = request(
            port,
            "POST",
            "/api/chat/conversations",
            &[],
            Some(&json!({"userId": "u1", "title": "lost ack"})),
        )
        .await;
        match r {
            Ok(r) if r.status == 202 => {
                let id = r.json()["jobId"].as_str().expect("jobId").to_owned();
                answers.accepted.lock().unwrap().push(id);
                // Paced: fewer jobs than the queue keeps completed (1,000), so that every
                // job stays countable.
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            Ok(r) => {
                assert_eq!(r.status, 503, "only 202 or 503: {}", r.text());
                answers.other.lock().unwrap().push(r.status);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                answers.transport.lock().unwrap().push(e.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_commit_acknowledgement_doubles_no_job() {
    let Some(admin) = admin_url() else { return };
    let started = Instant::now();
    let dbs = Databases::new(admin.clone());
    let direct_url = dbs.create().await;
    let proxy = Proxy::start(postgres_addr(&admin).await).await;
    // The writes that commit: an add's insert (which commits itself), and transactions'
    // commits (completions, with their conversation and follow-ups).
    proxy.watch_commits(&["INSERT INTO cq_jobs", "COMMIT"]);
    // In clear, so that the proxy can tell a commit from other messages.
    let url = with_port(&direct_url, proxy.port);
    let url = format!(
        "{url}{}sslmode=disable",
        if url.contains('?') { '&' } else { '?' }
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_on(dir.path(), &url, &[("CONVOQ_PG_MAX_CONNECTIONS", "6")]).await;
    let port = server.port;
    put_user_u1(port).await;

    let answers = Arc::new(Answers::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client(port, answers.clone(), stop.clone())))
        .collect();
    // One answer lost at a time, each on a write that committed: the writer applies the batch
    // once more on a new connection, which must find what its first application stored.
    let deadline = Instant::now() + Duration::from_secs(40);
    for round in 1..=LOSSES {
        proxy.lose_acks(1);
        while proxy.acks_lost() < round && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    let transport = answers.transport.lock().unwrap().clone();
    assert!(
        transport.is_empty(),
        "POSTs failed in transport: {transport:?}\n{}",
        server.log_tail()
    );
    let accepted: Vec<String> = answers.accepted.lock().unwrap().clone();
    assert!(
        proxy.acks_lost() >= LOSSES,
        "only {} answers lost\n{}",
        proxy.acks_lost(),
        server.log_tail()
    );
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len(), "a job id answered twice");
    assert!(
        accepted.len() >= 20,
        "too few POSTs accepted: {}",
        accepted.len()
    );

    // Everything accepted completes; counted around the proxy.
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&direct_url)
        .await
        .expect("the test's own connection");
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&db)
                .await
                .expect(sql)
        }
    };
    let n = accepted.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while count("SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND state = 'completed'")
        .await
        < n
    {
        if Instant::now() > deadline {
            let states: Vec<(String, i64)> = sqlx::query_as(
                "SELECT state, COUNT(*) FROM cq_jobs WHERE queue = 'database' GROUP BY 1",
            )
            .fetch_all(&db)
            .await
            .expect("states");
            let logs = server.logs();
            let warnings: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
                .take(20)
                .collect();
            panic!(
                "{n} accepted jobs did not all complete: {states:?}\n{}",
                warnings.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored: Vec<String> = sqlx::query_scalar("SELECT id FROM cq_jobs WHERE queue = 'database'")
        .fetch_all(&db)
        .await
        .expect("stored jobs");
    let unannounced: Vec<&String> = stored.iter().filter(|id| !unique.contains(id)).collect();
    assert!(
        unannounced.is_empty(),
        "{} stored jobs no 202 announced (of {} stored, {} accepted, {} answers lost, {} 503s): {:?}",
        unannounced.len(),
        stored.len(),
        accepted.len(),
        proxy.acks_lost(),
        answers.other.lock().unwrap().len(),
        &unannounced[..unannounced.len().min(5)]
    );
    assert_eq!(stored.len(), accepted.len());
    assert_eq!(
        count("SELECT COUNT(*) FROM conversations").await,
        n,
        "one conversation per accepted POST"
    );
    assert!(started.elapsed() < BUDGET, "took {:?}", started.elapsed());
    db.close().await;
}
