//! Several processes on one Postgres database (SPEC §5, §7), Postgres only: one API process
//! (`convoq serve --no-workers`) and three worker processes (`convoq worker`), with a short
//! lease ([`LEASE`]).
//!
//! Sixteen clients on 127.0.0.1 POST [`TOTAL`] conversations, each with its own
//! `Idempotency-Key` (a 503 or 429 is retried with the same key, so each logical request is
//! accepted exactly once). Mid-run, worker 0 is killed with SIGKILL while it holds
//! `create_conversation` jobs: it is frozen (SIGSTOP), the jobs it started and did not finish
//! are read from its log and checked `active` in the database, and then it is killed; if it
//! held none, it is let go (SIGCONT) and tried again a moment later. Later, worker 1 is stopped with SIGTERM and must exit 0.
//! Worker 2 finishes the run.
//!
//! Then: every accepted conversation exists exactly once with one audit record, and nothing
//! else does; every job completed, none failed, each with one `completed` event; each job the killed worker held was taken back as stalled within a lease
//! and the stalled-check interval of the kill, and completed.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{eventually, json_lines, post_keyed, put_user_u1, Role, Server, TestDatabase};

const TOTAL: usize = 3000;
const CLIENTS: usize = 16;
const LEASE: Duration = Duration::from_secs(3);
/// Worker 0 is killed after this many 202s, worker 1 stopped after this many.
const KILL_AT: usize = 1000;
const TERM_AT: usize = 2000;
/// The whole test stays under this.
const BUDGET: Duration = Duration::from_secs(150);

#[derive(Default)]
struct Load {
    next: AtomicUsize,
    accepted: AtomicUsize,
    /// `(jobId, conversationId)` per logical request.
    slots: Mutex<HashMap<usize, (String, String)>>,
    refused: AtomicUsize,
}

async fn client(port: u16, load: Arc<Load>, deadline: Instant) {
    loop {
        let n = load.next.fetch_add(1, Ordering::SeqCst);
        if n >= TOTAL {
            return;
        }
        let key = format!("mp-{n}");
        let body = json!({"userId": "u1", "title": format!("m-{n}")});
        let mut backoff = Duration::from_millis(10);
        loop {
            assert!(
                Instant::now() < deadline,
                "request {n} not accepted in time"
            );
            let r = post_keyed(port, &key, &body).await;
            match r {
                Ok(r) if r.status == 202 => {
                    let v = r.json();
                    let ids = (
                        v["jobId"].as_str().expect("jobId").to_owned(),
                        v["conversationId"].as_str().expect("cid").to_owned(),
                    );
                    load.slots.lock().unwrap().insert(n, ids);
                    load.accepted.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Ok(r) if r.status == 503 || r.status == 429 => {
                    load.refused.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => panic!("POST {n}: {} {}", r.status, r.text()),
                // Sent but not answered: it may or may not have been accepted; the same key
                // tells.
                Err(_) => {
                    load.refused.fetch_add(1, Ordering::SeqCst);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// The `(queue, job id)`s a worker's log shows started and not finished.
fn unfinished(logs: &str) -> HashSet<(String, String)> {
    let mut open = HashSet::new();
    for line in json_lines(logs) {
        let (Some(queue), Some(id)) = (line["queue"].as_str(), line["job_id"].as_str()) else {
            continue;
        };
        let key = (queue.to_owned(), id.to_owned());
        match line["message"].as_str() {
            Some("job started") => {
                open.insert(key);
            }
            Some(
                "job completed"
                | "job retrying"
                | "job failed"
                | "job attempt not recorded; the job will be taken back",
            ) => {
                open.remove(&key);
            }
            _ => {}
        }
    }
    open
}

/// Whether the job is active in the database now.
async fn is_active(pg: &sqlx::PgPool, queue: &str, id: &str) -> bool {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM cq_jobs WHERE queue = $1 AND id = $2")
            .bind(queue)
            .bind(id)
            .fetch_optional(pg)
            .await
            .expect("read a job's state");
    state.as_deref() == Some("active")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_api_and_three_workers_share_one_database() {
    let Some(database) = TestDatabase::postgres().await else {
        return;
    };
    let started = Instant::now();
    let deadline = started + BUDGET;
    let dir = tempfile::tempdir().expect("tempdir");
    let lease_ms = LEASE.as_millis().to_string();
    let env = [
        ("CONVOQ_LEASE_MS", lease_ms.as_str()),
        ("CONVOQ_SHUTDOWN_GRACE", "5"),
        ("CONVOQ_PG_MAX_CONNECTIONS", "6"),
    ];
    let mut api = Server::launch(dir.path(), "api", Role::Api, &database.url, &env).await;
    let mut workers = Vec::new();
    for i in 0..3 {
        let name = format!("worker{i}");
        workers.push(Server::launch(dir.path(), &name, Role::Worker, &database.url, &env).await);
    }
    let port = api.port;
    put_user_u1(port).await;

    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(port, load.clone(), deadline)))
        .collect();
    let db = database.open().await;
    let support::Db::Postgres(pg) = &db else {
        unreachable!("a Postgres test database")
    };
    let pg = pg.clone();

    // SIGKILL worker 0 while it holds jobs.
    eventually(BUDGET, "the first third accepted", || {
        let n = load.accepted.load(Ordering::SeqCst);
        async move { (n >= KILL_AT).then_some(()) }
    })
    .await;
    let (orphans, killed_at_ms) = {
        let victim = &mut workers[0];
        let mut tries = 0;
        loop {
            tries += 1;
            assert!(tries <= 100, "worker 0 never held a job when frozen");
            victim.signal("STOP");
            let mut held = Vec::new();
            // `create_conversation` jobs only: they are kept (for their idempotency keys), so
            // their histories can be checked at the end; audit jobs are trimmed by retention.
            for (queue, id) in unfinished(&victim.logs())
                .into_iter()
                .filter(|(q, _)| q == "database")
            {
                if is_active(&pg, &queue, &id).await {
                    held.push((queue, id));
                }
            }
            if !held.is_empty() {
                // A commit the worker sent before it stopped may still land (a completion read
                // as active above would then never stall): let Postgres finish it, read again.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut still = Vec::new();
                for (queue, id) in held {
                    if is_active(&pg, &queue, &id).await {
                        still.push((queue, id));
                    }
                }
                held = still;
            }
            if held.is_empty() {
                victim.signal("CONT");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let at = now_ms();
            victim.sigkill();
            break (held, at);
        }
    };

    // SIGTERM worker 1 later: a clean exit within the grace period.
    eventually(BUDGET, "two thirds accepted", || {
        let n = load.accepted.load(Ordering::SeqCst);
        async move { (n >= TERM_AT).then_some(()) }
    })
    .await;
    workers[1].stop(Duration::from_secs(20)).await;
    let released = json_lines(&workers[1].logs())
        .into_iter()
        .find(|l| l["message"] == json!("workers stopped"))
        .map(|l| l["released"].clone())
        .expect("worker 1 logged its stop");

    for c in clients {
        tokio::time::timeout(BUDGET, c)
            .await
            .expect("clients finish")
            .expect("client task");
    }
    let slots = load.slots.lock().unwrap().clone();
    assert_eq!(slots.len(), TOTAL, "every request accepted once");
    let job_ids: Vec<String> = slots.values().map(|(j, _)| j.clone()).collect();
    let cids: Vec<String> = slots.values().map(|(_, c)| c.clone()).collect();
    assert_eq!(job_ids.iter().collect::<HashSet<_>>().len(), TOTAL);
    assert_eq!(cids.iter().collect::<HashSet<_>>().len(), TOTAL);

    // Every job completes (worker 2 finishes the run).
    let remaining = BUDGET.saturating_sub(started.elapsed());
    // Audit jobs are kept by the default retention (the last 1000 completed), so their effect
    // is counted instead: one audit row each.
    eventually(remaining, "every job completed", || {
        let db = db.clone();
        async move {
            let done = db
                .count(
                    "SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND state = 'completed'",
                )
                .await;
            let audited = db.count("SELECT COUNT(*) FROM audit_log").await;
            let open = db
                .count("SELECT COUNT(*) FROM cq_jobs WHERE state <> 'completed'")
                .await;
            (done as usize == TOTAL && audited as usize == TOTAL && open == 0).then_some(())
        }
    })
    .await;
    let count = |sql: &'static str| {
        let db = db.clone();
        async move { db.count(sql).await }
    };
    assert_eq!(
        count("SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database'").await as usize,
        TOTAL
    );
    let stored: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND id = ANY($1)",
    )
    .bind(&job_ids)
    .fetch_one(&pg)
    .await
    .expect("count");
    assert_eq!(stored as usize, TOTAL, "every 202 is a stored job");
    let found: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conversations WHERE id = ANY($1)")
        .bind(&cids)
        .fetch_one(&pg)
        .await
        .expect("count");
    assert_eq!(found as usize, TOTAL, "every accepted conversation exists");
    assert_eq!(
        count("SELECT COUNT(*) FROM conversations").await as usize,
        TOTAL,
        "and nothing else"
    );
    assert_eq!(
        count("SELECT COUNT(DISTINCT title) FROM conversations").await as usize,
        TOTAL
    );
    assert_eq!(
        count("SELECT COUNT(DISTINCT subject_id) FROM audit_log").await as usize,
        TOTAL
    );
    let twice: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT queue, job_id, COUNT(*) FROM cq_job_events WHERE kind = 'completed' \
         GROUP BY queue, job_id HAVING COUNT(*) <> 1",
    )
    .fetch_all(&pg)
    .await
    .expect("completions");
    assert!(
        twice.is_empty(),
        "jobs not completed exactly once: {twice:?}"
    );

    // The killed worker's jobs were taken back within the lease (and one stalled check).
    let limit_ms = (LEASE + convoq::app::stalled_interval(LEASE)).as_millis() as i64 + 1500;
    let mut taken_back_after = Vec::new();
    for (queue, id) in &orphans {
        let stalled: Vec<i64> = sqlx::query_scalar(
            "SELECT at FROM cq_job_events WHERE queue = $1 AND job_id = $2 AND kind = 'stalled' \
             ORDER BY idx",
        )
        .bind(queue)
        .bind(id)
        .fetch_all(&pg)
        .await
        .expect("stalled events");
        let first = *stalled
            .first()
            .unwrap_or_else(|| panic!("{queue}/{id}, held by the killed worker, never stalled"));
        let after = first - killed_at_ms;
        assert!(
            after <= limit_ms,
            "{queue}/{id} taken back {after} ms after the kill, more than {limit_ms} ms"
        );
        taken_back_after.push(after);
        let (state, stalled_count, attempts): (String, i64, i64) = sqlx::query_as(
            "SELECT state, stalled_count, attempts_made FROM cq_jobs WHERE queue = $1 AND id = $2",
        )
        .bind(queue)
        .bind(id)
        .fetch_one(&pg)
        .await
        .expect("the job");
        assert_eq!(state, "completed", "{queue}/{id}");
        assert!(
            stalled_count >= 1 && attempts >= 2,
            "{queue}/{id}: {stalled_count} stalls, {attempts} attempts"
        );
    }
    let stalled_total = count("SELECT COALESCE(SUM(stalled_count), 0) FROM cq_jobs").await;
    assert!(stalled_total as usize >= orphans.len());

    let took = started.elapsed();
    let metrics = support::get(workers[2].port, "/metrics")
        .await
        .expect("worker 2 /metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text().contains("convoq_jobs_completed_total{"),
        "a worker process exports its job metrics"
    );
    eprintln!(
        "multiprocess: {TOTAL} conversations in {took:?}; killed worker held {} jobs, taken back \
         {:?} ms after the kill (limit {limit_ms} ms); {stalled_total} stalls in all; the stopped \
         worker released {}; {} POSTs refused and retried",
        orphans.len(),
        taken_back_after,
        released,
        load.refused.load(Ordering::SeqCst),
    );
    workers[2].stop(Duration::from_secs(20)).await;
    api.stop(Duration::from_secs(20)).await;
    db.close().await;
    assert!(took < BUDGET, "took {took:?}");
}
