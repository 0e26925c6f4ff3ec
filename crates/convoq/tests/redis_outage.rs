//! Redis outage under load: the `convoq` binary on BullMQ queues in a private `redis-server`
//! (append-only file, fsync at every write), concurrent clients posting conversations, Redis
//! stopped for 20 s while the load goes on, then restarted on the same port and directory.
//!
//! What must hold, as a user would see it:
//! - while Redis is down every POST is answered 503 with `Retry-After`, never 202 (a 202 is a
//!   job Redis stored), and `/readyz` says not ready (`checks.queue` false);
//! - after the restart `/readyz` is ready again and POSTs are accepted, without restarting
//!   convoq: the same process's workers take the jobs again by themselves;
//! - every conversation answered 202, before, during or after the outage, exists exactly once
//!   at the end, with its title; no conversation exists that no client asked for.
//!
//! Needs `CONVOQ_TEST_REDIS_URL` (the Redis tests' switch; this test uses its own server) and
//! `redis-server` on the path; without either it says why it is skipped. Bounded: the whole
//! test stays under 60 s.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::redis::PrivateRedis;
use support::{count, get, open_db, put_user_u1, query_rows, request, Server};

/// Load before the outage.
const BEFORE: Duration = Duration::from_secs(3);
/// How long Redis stays down.
const OUTAGE: Duration = Duration::from_secs(20);
/// Load after the restart.
const AFTER: Duration = Duration::from_secs(5);
/// The whole test stays under this.
const BUDGET: Duration = Duration::from_secs(60);
const CLIENTS: usize = 4;
/// Each client's pause between requests (a steady, modest load a debug build keeps up with).
const PAUSE: Duration = Duration::from_millis(20);
/// How long after the restart convoq must be ready again.
const RECOVERY: Duration = Duration::from_secs(10);

/// Where the outage stands; read by clients and the readiness probe when they record.
const UP: u8 = 0;
const STOPPING: u8 = 1;
const DOWN: u8 = 2;
const RESTARTED: u8 = 3;

/// One POST as a client saw it.
#[derive(Debug, Clone)]
struct Answer {
    n: usize,
    /// The outage phase when the request was sent and when its answer arrived.
    phases: (u8, u8),
    /// `None`: no answer (connection error or timeout).
    status: Option<u16>,
    retry_after: Option<String>,
    /// How long the answer took.
    took: Duration,
    /// (conversationId, jobId) of a 202.
    ids: Option<(String, String)>,
}

#[derive(Default)]
struct Load {
    next: AtomicUsize,
    stop: AtomicBool,
    phase: AtomicU8,
    answers: Mutex<Vec<Answer>>,
}

async fn client(port: u16, load: Arc<Load>) {
    while !load.stop.load(Ordering::SeqCst) {
        let n = load.next.fetch_add(1, Ordering::SeqCst);
        let body = json!({"userId": "u1", "title": format!("o-{n}")});
        let sent_in = load.phase.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let r = request(port, "POST", "/api/chat/conversations", &[], Some(&body)).await;
        let answered_in = load.phase.load(Ordering::SeqCst);
        let took = t0.elapsed();
        let answer = match r {
            Ok(r) => Answer {
                n,
                phases: (sent_in, answered_in),
                status: Some(r.status),
                retry_after: r.header("retry-after").map(str::to_owned),
                took,
                ids: (r.status == 202).then(|| {
                    let v = r.json();
                    (
                        v["conversationId"].as_str().expect("cid").to_owned(),
                        v["jobId"].as_str().expect("jobId").to_owned(),
                    )
                }),
            },
            Err(_) => Answer {
                n,
                phases: (sent_in, answered_in),
                status: None,
                retry_after: None,
                took,
                ids: None,
            },
        };
        let pause = if answer.status == Some(202) {
            PAUSE
        } else {
            PAUSE * 5
        };
        load.answers.lock().unwrap().push(answer);
        tokio::time::sleep(pause).await;
    }
}

/// One `/readyz` answer: the outage phase, the status (`None`: no answer), `checks.queue`.
type Probe = (u8, Option<u16>, Value);

/// `/readyz` every 250 ms.
async fn probe(port: u16, load: Arc<Load>, seen: Arc<Mutex<Vec<Probe>>>) {
    while !load.stop.load(Ordering::SeqCst) {
        let phase = load.phase.load(Ordering::SeqCst);
        let r = get(port, "/readyz").await;
        let after = load.phase.load(Ordering::SeqCst);
        if phase == after {
            let entry = match r {
                Ok(r) => (phase, Some(r.status), r.json()["checks"]["queue"].clone()),
                Err(_) => (phase, None, Value::Null),
            };
            seen.lock().unwrap().push(entry);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_under_load_loses_nothing_and_workers_resume() {
    if std::env::var("CONVOQ_TEST_REDIS_URL").map_or(true, |u| u.trim().is_empty()) {
        println!("skipped: CONVOQ_TEST_REDIS_URL is not set");
        return;
    }
    let started = Instant::now();
    let Some(mut redis) = PrivateRedis::start() else {
        println!("skipped: redis-server is not installed");
        return;
    };
    redis.wait_up(Duration::from_secs(10)).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let url = redis.url();
    let mut server = Server::start(
        dir.path(),
        &[("CONVOQ_QUEUE_URL", url.as_str()), ("CONVOQ_LOG", "warn")],
    )
    .await;
    let port = server.port;
    let pid = server.pid();
    put_user_u1(port).await;

    let load = Arc::new(Load::default());
    let readiness = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(port, load.clone())))
        .collect();
    let prober = tokio::spawn(probe(port, load.clone(), readiness.clone()));

    tokio::time::sleep(BEFORE).await;
    load.phase.store(STOPPING, Ordering::SeqCst);
    redis.stop().await;
    load.phase.store(DOWN, Ordering::SeqCst);
    let down_at = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    load.phase.store(RESTARTED, Ordering::SeqCst);
    assert!(redis.spawn(), "restart redis-server");
    let restarted_at = Instant::now();
    redis.wait_up(Duration::from_secs(10)).await;
    // Ready again by itself: the same process, not restarted.
    let mut ready_after = None;
    while restarted_at.elapsed() < RECOVERY {
        if let Ok(r) = get(port, "/readyz").await {
            if r.status == 200 {
                ready_after = Some(restarted_at.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_after = ready_after.unwrap_or_else(|| {
        panic!(
            "/readyz not ready {RECOVERY:?} after Redis restarted; log tail:\n{}",
            server.log_tail()
        )
    });
    tokio::time::sleep(AFTER).await;
    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client task");
    }
    prober.await.expect("readiness probe");
    assert_eq!(server.pid(), pid, "convoq was not restarted");

    let answers = load.answers.lock().unwrap().clone();
    let by_phase = |phase: u8| {
        answers
            .iter()
            .filter(move |a| a.phases == (phase, phase))
            .collect::<Vec<_>>()
    };

    // During the outage: 503 with Retry-After, nothing else.
    let during = by_phase(DOWN);
    assert!(
        during.len() >= 10,
        "only {} requests during the outage",
        during.len()
    );
    for a in &during {
        assert_eq!(a.status, Some(503), "during the outage: {a:?}");
        let secs: u64 = a
            .retry_after
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("503 without a valid Retry-After: {a:?}"));
        assert!(secs >= 1, "{a:?}");
    }
    // And at once: a caller is not held for the command timeout (5 s) to learn it.
    let slowest_503 = during.iter().map(|a| a.took).max().unwrap_or_default();
    assert!(
        slowest_503 < Duration::from_secs(2),
        "a 503 during the outage took {slowest_503:?}"
    );
    let readiness = readiness.lock().unwrap().clone();
    let down_probes: Vec<_> = readiness.iter().filter(|(p, ..)| *p == DOWN).collect();
    assert!(
        !down_probes.is_empty(),
        "no readiness probe during the outage"
    );
    for (_, status, queue) in &down_probes {
        assert_eq!(*status, Some(503), "/readyz during the outage");
        assert_eq!(
            *queue,
            json!(false),
            "/readyz checks.queue during the outage"
        );
    }

    // Before and after: accepted.
    let before = by_phase(UP);
    let after = by_phase(RESTARTED);
    let accepted_before = before.iter().filter(|a| a.status == Some(202)).count();
    let accepted_after = after.iter().filter(|a| a.status == Some(202)).count();
    assert!(accepted_before >= 10, "{accepted_before} accepted before");
    assert!(accepted_after >= 10, "{accepted_after} accepted after");
    for a in before.iter().chain(&after) {
        assert!(
            matches!(a.status, Some(202 | 503)),
            "unexpected answer outside the outage: {a:?}"
        );
    }

    // Every accepted conversation is created, by the workers of the same process.
    let accepted: HashMap<String, usize> = answers
        .iter()
        .filter_map(|a| a.ids.as_ref().map(|(cid, _)| (cid.clone(), a.n)))
        .collect();
    assert_eq!(
        accepted.len(),
        answers.iter().filter(|a| a.status == Some(202)).count(),
        "one conversation id per 202"
    );
    let db = open_db(&server.db_path()).await;
    let deadline = started + BUDGET - Duration::from_secs(5);
    loop {
        let ids: Vec<String> = query_rows(&db, "SELECT id FROM conversations", |r| r.get(0)).await;
        let done: HashSet<String> = ids.into_iter().collect();
        let missing = accepted.keys().filter(|c| !done.contains(*c)).count();
        // Each conversation's audit record comes from its own `record_audit_event` job.
        let audited = count(
            &db,
            "SELECT COUNT(DISTINCT subject_id) FROM audit_log WHERE event = 'conversation.created'",
        )
        .await;
        if missing == 0 && audited as usize >= done.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} accepted conversations not created; log tail:\n{}",
            accepted.len(),
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop(Duration::from_secs(15)).await;

    let rows: Vec<(String, Option<String>)> =
        query_rows(&db, "SELECT id, title FROM conversations", |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .await;
    let mut titles: HashMap<String, usize> = HashMap::new();
    for (_, t) in &rows {
        *titles.entry(t.clone().expect("a title")).or_default() += 1;
    }
    let by_id: HashMap<&str, Option<&str>> = rows
        .iter()
        .map(|(id, t)| (id.as_str(), t.as_deref()))
        .collect();
    assert_eq!(by_id.len(), rows.len(), "conversation ids are unique");
    for (cid, n) in &accepted {
        let title = format!("o-{n}");
        assert_eq!(
            by_id.get(cid.as_str()),
            Some(&Some(title.as_str())),
            "accepted conversation {cid} exists with its title"
        );
        assert_eq!(titles.get(&title), Some(&1), "{title} exactly once");
    }
    // Rows beyond the 202s can only come from requests whose answer was not a 202 although
    // Redis stored the job (an answer lost as Redis went down); none may be duplicated.
    let sent: HashSet<String> = answers.iter().map(|a| format!("o-{}", a.n)).collect();
    for (t, n) in &titles {
        assert!(sent.contains(t), "a conversation nobody asked for: {t}");
        assert_eq!(*n, 1, "{t} exactly once");
    }
    let accepted_titles: HashSet<String> = accepted.values().map(|n| format!("o-{n}")).collect();
    let stored_without_202: Vec<&Answer> = answers
        .iter()
        .filter(|a| {
            let t = format!("o-{}", a.n);
            titles.contains_key(&t) && !accepted_titles.contains(&t)
        })
        .collect();
    let audits = count(
        &db,
        "SELECT COUNT(*) FROM audit_log WHERE event = 'conversation.created'",
    )
    .await;
    let audited_conversations = count(
        &db,
        "SELECT COUNT(*) FROM conversations c WHERE (SELECT COUNT(*) FROM audit_log a \
         WHERE a.subject_id = c.id AND a.event = 'conversation.created') = 1",
    )
    .await;
    db.close();
    assert_eq!(
        audits as usize,
        rows.len(),
        "one audit record per conversation, no more"
    );
    assert_eq!(
        audited_conversations as usize,
        rows.len(),
        "every conversation has exactly one audit record"
    );

    let tally = |phase: u8| {
        let mut t: HashMap<String, usize> = HashMap::new();
        for a in by_phase(phase) {
            let k = a.status.map_or("no answer".into(), |s| s.to_string());
            *t.entry(k).or_default() += 1;
        }
        t
    };
    eprintln!(
        "outage: before {:?}, during {:?} (Redis down {:?}), after {:?}; {} requests in total, \
         {} accepted, stored without a 202: {stored_without_202:?}, {audits} audit rows; \
         ready {ready_after:?} after the restart; {} readiness probes down; slowest 503 \
         {slowest_503:?}; total {:?}",
        tally(UP),
        tally(DOWN),
        restarted_at - down_at,
        tally(RESTARTED),
        answers.len(),
        accepted.len(),
        down_probes.len(),
        started.elapsed()
    );
    assert!(started.elapsed() < BUDGET, "took {:?}", started.elapsed());
}
