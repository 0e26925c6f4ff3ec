//! Outage test (SPEC §3 "Durability", §7), Postgres only: a TCP proxy written here sits between
//! every convoq process and Postgres, and is cut for 20 s while jobs flow.
//!
//! One API process (`serve --no-workers`) and two worker processes (`worker`) reach the
//! database through the proxy only. Four clients POST conversations, each with its own
//! `Idempotency-Key`. After jobs have started to complete, the proxy closes every connection
//! and refuses new ones for [`OUTAGE`]. Then:
//!
//! * during the outage, every POST that started once the cut had settled answers 503 with
//!   `Retry-After`, none 202; `/readyz` of the API and of each worker answers 503;
//! * after it, with no process restarted, POSTs are accepted again, `/readyz` is 200 everywhere,
//!   every accepted (202) job completes (checked in the database, with the proxy out of the way),
//!   each exactly once (one `completed` event), each conversation exists once with one audit
//!   event, and no conversation exists that no stored job created (a 503 may hide a commit
//!   whose answer was lost with its connection, never the other way round).
//!
//! The whole test takes about 25 s and is bounded by [`BUDGET`].

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::postgres::{admin_url, postgres_addr, with_port, Databases};
use support::proxy::Proxy;
use support::{eventually, get, post_keyed, put_user_u1, Role, Server};

/// How long the database is unreachable.
const OUTAGE: Duration = Duration::from_secs(20);
/// The longest a POST may take while the database refuses connections: the writer's new
/// connection is refused at once and reads give up after 500 ms (`READ_WHILE_DOWN`).
const POST_BOUND: Duration = Duration::from_secs(3);
/// How long after the cut a POST may still have been in flight against the old connections.
const SETTLE: Duration = Duration::from_secs(2);
const CLIENTS: usize = 4;
/// The whole test stays under this.
const BUDGET: Duration = Duration::from_secs(60);

/// One POST's answer, with when it was sent and answered.
#[derive(Debug, Clone)]
struct Answer {
    key: String,
    sent: Instant,
    answered: Instant,
    status: u16,
    retry_after: Option<String>,
    /// `(jobId, conversationId)` of a 202.
    accepted: Option<(String, String)>,
}

#[derive(Default)]
struct Load {
    next: AtomicUsize,
    stop: AtomicBool,
    answers: Mutex<Vec<Answer>>,
    transport_errors: AtomicUsize,
}

async fn client(port: u16, load: Arc<Load>) {
    while !load.stop.load(Ordering::SeqCst) {
        let n = load.next.fetch_add(1, Ordering::SeqCst);
        let key = format!("outage-{n}");
        let body = json!({"userId": "u1", "title": format!("o-{n}")});
        let sent = Instant::now();
        let r = post_keyed(port, &key, &body).await;
        let answered = Instant::now();
        match r {
            Ok(r) => {
                let accepted = (r.status == 202).then(|| {
                    let v = r.json();
                    (
                        v["jobId"].as_str().expect("jobId").to_owned(),
                        v["conversationId"].as_str().expect("cid").to_owned(),
                    )
                });
                let failed = r.status != 202;
                load.answers.lock().unwrap().push(Answer {
                    key,
                    sent,
                    answered,
                    status: r.status,
                    retry_after: r.header("retry-after").map(str::to_owned),
                    accepted,
                });
                if failed {
                    // A client backs off a little after a refusal, as one would.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Err(_) => {
                load.transport_errors.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn readyz(port: u16) -> Option<u16> {
    get(port, "/readyz").await.ok().map(|r| r.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_20_second_database_outage_loses_and_duplicates_nothing() {
    let Some(admin) = admin_url() else { return };
    let started = Instant::now();
    let dbs = Databases::new(admin.clone());
    let direct_url = dbs.create().await;
    let mut proxy = Proxy::start(postgres_addr(&admin).await).await;
    let url = with_port(&direct_url, proxy.port);
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [("CONVOQ_PG_MAX_CONNECTIONS", "6")];
    let mut api = Server::launch(dir.path(), "api", Role::Api, &url, &env).await;
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(
            Server::launch(dir.path(), &format!("worker{i}"), Role::Worker, &url, &env).await,
        );
    }
    let worker_pids: Vec<u32> = workers.iter().map(Server::pid).collect();
    let port = api.port;
    put_user_u1(port).await;

    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&direct_url)
        .await
        .expect("the test's own connection, around the proxy");
    let completed = |db: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND state = 'completed'",
        )
        .fetch_one(&db)
        .await
        .expect("count completed")
    };

    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(port, load.clone())))
        .collect();

    // Jobs flow: some accepted and some completed.
    eventually(Duration::from_secs(20), "jobs to flow", || {
        let db = db.clone();
        async move { (completed(db).await >= 50).then_some(()) }
    })
    .await;

    let cut_at = Instant::now();
    proxy.cut();
    // Readiness follows reachability, per process.
    for p in std::iter::once(port).chain(workers.iter().map(|w| w.port)) {
        eventually(
            SETTLE + Duration::from_secs(8),
            "/readyz 503 during the outage",
            || async move { (readyz(p).await == Some(503)).then_some(()) },
        )
        .await;
    }
    let r = get(port, "/readyz").await.expect("API /readyz");
    let checks = r.json()["checks"].clone();
    assert_eq!(
        (checks["store"].clone(), checks["queue"].clone()),
        (json!(false), json!(false)),
        "{checks}"
    );
    let remaining = OUTAGE.saturating_sub(cut_at.elapsed());
    tokio::time::sleep(remaining).await;
    let restored_at = Instant::now();
    proxy.restore().await;

    // Without restarting anything, everything comes back.
    for p in std::iter::once(port).chain(workers.iter().map(|w| w.port)) {
        eventually(
            Duration::from_secs(15),
            "/readyz 200 after the outage",
            || async move { (readyz(p).await == Some(200)).then_some(()) },
        )
        .await;
    }
    let accepted_before_restore = load
        .answers
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.status == 202)
        .count();
    eventually(Duration::from_secs(15), "POSTs accepted again", || {
        let load = load.clone();
        async move {
            let n = load
                .answers
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.status == 202 && a.sent > restored_at)
                .count();
            (n >= 20).then_some(())
        }
    })
    .await;
    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(35), c)
            .await
            .expect("clients stop")
            .expect("client task");
    }

    let answers = load.answers.lock().unwrap().clone();
    // During the outage: 503 with Retry-After, never 202.
    let during: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent >= cut_at + SETTLE && a.answered <= restored_at)
        .collect();
    assert!(
        during.len() >= 10,
        "too few POSTs answered during the outage to tell anything: {}",
        during.len()
    );
    let slowest = during
        .iter()
        .map(|a| a.answered - a.sent)
        .max()
        .unwrap_or_default();
    assert!(
        slowest <= POST_BOUND,
        "a POST during the outage took {slowest:?} (bound {POST_BOUND:?})"
    );
    for a in &during {
        assert_eq!(
            a.status,
            503,
            "POST {} sent {:?} into the outage, answered after {:?}: {a:?}",
            a.key,
            a.sent - cut_at,
            a.answered - a.sent
        );
        let secs: u64 = a
            .retry_after
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("503 without a Retry-After in seconds: {a:?}"));
        assert!((1..=60).contains(&secs), "{a:?}");
    }
    for a in &answers {
        assert!(
            matches!(a.status, 202 | 503),
            "a POST answered neither 202 nor 503: {a:?}"
        );
    }
    let accepted: HashMap<String, String> =
        answers.iter().filter_map(|a| a.accepted.clone()).collect();
    assert!(accepted.len() > accepted_before_restore);

    // Every accepted job completes, exactly once; the workers were never restarted.
    let job_ids: Vec<String> = accepted.keys().cloned().collect();
    let pending = eventually(
        Duration::from_secs(30),
        "every accepted job to complete",
        || {
            let db = db.clone();
            let job_ids = job_ids.clone();
            async move {
                let done: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND state = 'completed' \
                 AND id = ANY($1)",
            )
            .bind(&job_ids)
            .fetch_one(&db)
            .await
            .expect("count");
                (done as usize == job_ids.len()).then_some(done)
            }
        },
    )
    .await;
    assert_eq!(pending as usize, job_ids.len());
    let stored: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND id = ANY($1)",
    )
    .bind(&job_ids)
    .fetch_one(&db)
    .await
    .expect("count");
    assert_eq!(stored as usize, job_ids.len(), "every 202 was a stored job");
    let twice: Vec<(String, i64)> = sqlx::query_as(
        "SELECT job_id, COUNT(*) FROM cq_job_events WHERE queue = 'database' \
         AND kind = 'completed' GROUP BY job_id HAVING COUNT(*) <> 1",
    )
    .fetch_all(&db)
    .await
    .expect("completions");
    assert!(
        twice.is_empty(),
        "jobs not completed exactly once: {twice:?}"
    );
    let conversation_ids: Vec<String> = accepted.values().cloned().collect();
    let found: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conversations WHERE id = ANY($1)")
        .bind(&conversation_ids)
        .fetch_one(&db)
        .await
        .expect("count");
    assert_eq!(
        found as usize,
        conversation_ids.len(),
        "every accepted conversation exists"
    );
    // A 503 may hide a commit that happened as the connection died (a client would retry with
    // the same key and get the original 202); beyond those, no conversation exists that no
    // stored job created.
    let all: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conversations")
        .fetch_one(&db)
        .await
        .expect("count");
    let jobs: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND state = 'completed'",
    )
    .fetch_one(&db)
    .await
    .expect("count");
    assert!(
        all <= jobs && all as usize >= accepted.len(),
        "{all} conversations for {jobs} completed jobs, {} accepted",
        accepted.len()
    );
    eventually(
        Duration::from_secs(15),
        "one audit event per conversation",
        || {
            let db = db.clone();
            async move {
                let audited: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
                    .fetch_one(&db)
                    .await
                    .expect("count");
                (audited == all).then_some(())
            }
        },
    )
    .await;
    for (w, pid) in workers.iter().zip(&worker_pids) {
        assert_eq!(w.pid(), *pid, "the worker was not restarted");
    }
    let logs: String = workers.iter().map(Server::logs).collect();
    let served_503 = during.len();
    eprintln!(
        "outage: {} POSTs, {} accepted ({accepted_before_restore} before the database returned), \
         {served_503} answered 503 during the outage (slowest in {slowest:?}), {} transport errors, {} proxied connections, \
         {} conversations; took {:?}",
        answers.len(),
        accepted.len(),
        load.transport_errors.load(Ordering::SeqCst),
        proxy.accepted.load(Ordering::Relaxed),
        all,
        started.elapsed()
    );
    assert!(
        logs.contains("claim failed; retrying"),
        "the workers saw the outage"
    );
    for w in &mut workers {
        w.stop(Duration::from_secs(20)).await;
    }
    api.stop(Duration::from_secs(20)).await;
    db.close().await;
    assert!(
        started.elapsed() < BUDGET,
        "the outage test took {:?}",
        started.elapsed()
    );
}
