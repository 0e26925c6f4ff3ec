//! Half-open connections (Postgres only): the database goes silent without closing anything.
//!
//! One API process and two worker processes, each reaching Postgres through a proxy of its
//! own, with a 2 s lease and `--pg-statement-timeout-ms 1000`. Four clients POST
//! conversations with an `Idempotency-Key` each, retrying a refused one with the same key.
//!
//! 1. Worker 0's proxy stalls (its sockets stay open, nothing is relayed) while it holds jobs:
//!    worker 1 takes them back within a lease, Postgres's idle-in-transaction timeout and a
//!    sweep; when the proxy relays again, worker 0's late completions are refused (fenced by
//!    their lease tokens) and it completes new jobs without a restart.
//! 2. The API's proxy stalls: every POST sent then is answered 503 with `Retry-After` within
//!    [`POST_BOUND`], none 202, and `/readyz` answers 503; when the proxy relays again, POSTs
//!    are accepted again without a restart.
//!
//! At the end every accepted request is exactly one conversation and every accepted job is
//! completed. The whole test is bounded by [`BUDGET`].

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::metrics::parse_metrics;
use support::postgres::{admin_url, postgres_addr, with_port, Databases};
use support::proxy::Proxy;
use support::{eventually, get, json_lines, post_keyed, put_user_u1, Db, Role, Server};

const LEASE_MS: &str = "2000";
const STATEMENT_TIMEOUT_MS: &str = "1000";
/// The longest a POST may take while the API's database connections are silent: a writer's
/// batch gives its connection up after twice the statement timeout and 5 s
/// (`Schedule::batch_timeout`), and a new connection is given up after 5 s; with room to spare.
const POST_BOUND: Duration = Duration::from_secs(12);
/// How long the API's connections stay silent.
const API_STALL: Duration = Duration::from_secs(15);
const CLIENTS: usize = 4;
/// The whole test stays under this.
const BUDGET: Duration = Duration::from_secs(150);

/// One POST's answer.
#[derive(Debug, Clone)]
struct Answer {
    key: String,
    sent: Instant,
    took: Duration,
    status: Option<u16>,
    retry_after: Option<String>,
    /// The conversation id of a 202.
    conversation: Option<String>,
}

#[derive(Default)]
struct Load {
    next: AtomicUsize,
    stop: AtomicBool,
    answers: Mutex<Vec<Answer>>,
}

/// POSTs one request after another, each with its own key, retried with the same key until
/// accepted.
async fn client(port: u16, load: Arc<Load>) {
    while !load.stop.load(Ordering::SeqCst) {
        let n = load.next.fetch_add(1, Ordering::SeqCst);
        let key = format!("half-open-{n}");
        let body = json!({"userId": "u1", "title": key});
        loop {
            let sent = Instant::now();
            let r = post_keyed(port, &key, &body).await;
            let took = sent.elapsed();
            let (status, retry_after, conversation) = match &r {
                Ok(r) => (
                    Some(r.status),
                    r.header("retry-after").map(str::to_owned),
                    (r.status == 202).then(|| {
                        r.json()["conversationId"]
                            .as_str()
                            .expect("conversationId")
                            .to_owned()
                    }),
                ),
                Err(_) => (None, None, None),
            };
            let accepted = conversation.is_some();
            load.answers.lock().unwrap().push(Answer {
                key: key.clone(),
                sent,
                took,
                status,
                retry_after,
                conversation,
            });
            if accepted {
                break;
            }
            if load.stop.load(Ordering::SeqCst) && n > 0 {
                // Stopping: a key never accepted needs no conversation.
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn completed_by(port: u16) -> f64 {
    let r = get(port, "/metrics").await.expect("worker /metrics");
    parse_metrics(&r.text())
        .iter()
        .filter(|(n, l, _)| {
            n == "convoq_jobs_completed_total"
                && l.get("name").map(String::as_str) == Some("create_conversation")
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_connections_are_given_up_within_bounds() {
    let Some(admin) = admin_url() else { return };
    let started = Instant::now();
    let dbs = Databases::new(admin.clone());
    let direct_url = dbs.create().await;
    let target = postgres_addr(&admin).await;
    let api_proxy = Proxy::start(target).await;
    let worker_proxy = Proxy::start(target).await;
    let other_proxy = Proxy::start(target).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("CONVOQ_LEASE_MS", LEASE_MS),
        ("CONVOQ_PG_STATEMENT_TIMEOUT_MS", STATEMENT_TIMEOUT_MS),
        ("CONVOQ_CONCURRENCY", "database=8,audit=4"),
    ];
    let url = |p: &Proxy| with_port(&direct_url, p.port);
    let api = Server::launch(dir.path(), "api", Role::Api, &url(&api_proxy), &env).await;
    let silent = Server::launch(
        dir.path(),
        "worker0",
        Role::Worker,
        &url(&worker_proxy),
        &env,
    )
    .await;
    let other = Server::launch(
        dir.path(),
        "worker1",
        Role::Worker,
        &url(&other_proxy),
        &env,
    )
    .await;
    let pids = (api.pid(), silent.pid(), other.pid());
    put_user_u1(api.port).await;
    let db = Db::Postgres(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&direct_url)
            .await
            .expect("the test's own connection, around the proxies"),
    );
    let owner = json_lines(&silent.logs())
        .into_iter()
        .find_map(|l| l["owner"].as_str().map(str::to_owned))
        .expect("worker 0 logs its owner id");

    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(api.port, load.clone())))
        .collect();
    let completed = "SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND state = 'completed'";
    eventually(Duration::from_secs(20), "jobs to flow", || {
        let db = db.clone();
        async move { (db.count(completed).await >= 50).then_some(()) }
    })
    .await;

    // 1. Worker 0's connections go silent while it holds jobs.
    let held_sql = format!(
        "SELECT COUNT(*) FROM cq_jobs WHERE state = 'active' AND lease_token LIKE '{owner}/%'"
    );
    let mut held = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        worker_proxy.stall();
        held = db.count(&held_sql).await;
        if held > 0 {
            break;
        }
        worker_proxy.resume();
    }
    assert!(held > 0, "worker 0 never held a job when its proxy stalled");
    let stalled_at = Instant::now();
    let rescued_in = eventually(
        Duration::from_secs(20),
        "worker 0's jobs taken back while its connections are silent",
        || {
            let db = db.clone();
            let held_sql = held_sql.clone();
            async move { (db.count(&held_sql).await == 0).then(|| stalled_at.elapsed()) }
        },
    )
    .await;
    // Silent a while longer: its attempts end and try to record themselves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    worker_proxy.resume();
    let resumed_at = Instant::now();
    let before = completed_by(silent.port).await;
    let recovered_in = eventually(
        Duration::from_secs(30),
        "worker 0 completes jobs again, not restarted",
        || async move { (completed_by(silent.port).await > before).then(|| resumed_at.elapsed()) },
    )
    .await;

    // 2. The API's connections go silent.
    let api_stalled_at = Instant::now();
    api_proxy.stall();
    let ready_503 = eventually(Duration::from_secs(10), "/readyz 503 while silent", || {
        let port = api.port;
        async move {
            let t = Instant::now();
            let r = get(port, "/readyz").await.ok()?;
            (r.status == 503).then(|| t.elapsed())
        }
    })
    .await;
    tokio::time::sleep(API_STALL).await;
    let api_resumed_at = Instant::now();
    api_proxy.resume();
    let accepted_again_in = eventually(Duration::from_secs(30), "POSTs accepted again", || {
        let load = load.clone();
        async move {
            let answers = load.answers.lock().unwrap();
            answers
                .iter()
                .find(|a| a.sent > api_resumed_at && a.status == Some(202))
                .map(|a| a.sent + a.took - api_resumed_at)
        }
    })
    .await;
    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(40), c)
            .await
            .expect("clients stop")
            .expect("client task");
    }

    let answers = load.answers.lock().unwrap().clone();
    // Every POST sent into the silence is refused in time (the bound holds for every POST,
    // below), and none is accepted.
    let during: Vec<&Answer> = answers
        .iter()
        .filter(|a| {
            a.sent >= api_stalled_at + Duration::from_secs(1) && a.sent + a.took <= api_resumed_at
        })
        .collect();
    assert!(
        during.len() >= CLIENTS,
        "too few POSTs answered while the API's connections were silent: {}",
        during.len()
    );
    let slowest = during.iter().map(|a| a.took).max().unwrap_or_default();
    for a in &during {
        assert_eq!(a.status, Some(503), "a POST sent into the silence: {a:?}");
        let secs: u64 = a
            .retry_after
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("503 without a Retry-After in seconds: {a:?}"));
        assert!((1..=60).contains(&secs), "{a:?}");
    }
    for a in &answers {
        assert!(
            a.took <= POST_BOUND,
            "a POST took {:?} (bound {POST_BOUND:?}), sent {:?} after the API's proxy stalled: {a:?}",
            a.took,
            a.sent.checked_duration_since(api_stalled_at)
        );
        assert!(
            matches!(a.status, Some(202 | 503)),
            "a POST answered neither 202 nor 503: {a:?}"
        );
    }

    // Everything drains; one conversation per accepted key.
    let accepted: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.conversation.is_some())
        .collect();
    let keys: HashSet<&str> = accepted.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(keys.len(), accepted.len(), "a key was accepted twice");
    let n = accepted.len() as i64;
    eventually(
        Duration::from_secs(30),
        "every accepted job completed",
        || {
            let db = db.clone();
            async move { (db.count(completed).await >= n).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let conversations = db.count("SELECT COUNT(*) FROM conversations").await;
    // A 503 may hide a job stored as its connection went silent; its client retried with the
    // same key, so that job is the one the 202 named.
    assert_eq!(conversations, n, "one conversation per accepted request");
    assert_eq!(db.count(completed).await, n, "every accepted job completed");
    let ids: HashSet<&String> = accepted
        .iter()
        .filter_map(|a| a.conversation.as_ref())
        .collect();
    assert_eq!(
        ids.len(),
        accepted.len(),
        "a conversation id answered twice"
    );
    assert!(
        db.count("SELECT COUNT(*) FROM cq_jobs WHERE queue = 'database' AND stalled_count > 0")
            .await
            >= held,
        "worker 0's jobs were taken back as stalled"
    );
    let fenced = support::late_attempts_refused(&silent.logs());
    assert!(
        fenced >= 1,
        "worker 0 recorded nothing late, or it was not fenced"
    );
    assert_eq!(
        (api.pid(), silent.pid(), other.pid()),
        pids,
        "no process was restarted"
    );
    println!(
        "half-open: worker 0 held {held}, taken back within {rescued_in:?}, {fenced} late \
         attempts refused, completing again {recovered_in:?} after its proxy relayed again; \
         API silent: /readyz 503 in {ready_503:?}, {} POSTs refused, slowest {slowest:?} \
         (bound {POST_BOUND:?}), accepted again {accepted_again_in:?} after; {n} requests",
        during.len()
    );
    assert!(started.elapsed() < BUDGET, "took {:?}", started.elapsed());
    db.close().await;
}
