//! Clock skew: two worker processes whose clocks are an hour off, one behind and one ahead
//! (`libfaketime`, Debian's `faketime`, preloaded), share the queue with an API process on the
//! true time, under load; on Postgres (queue and store), and with the queue on Redis (store on
//! Postgres). Both engines read time against the server's own clock (each process measures its
//! lead over its own clock: `SELECT clock_timestamp()`, Redis's `TIME`), so a skewed worker's
//! leases, due times and retries mean what they mean on the true clock: no job is taken back
//! early (no stall), none runs twice, every accepted request is one conversation; on Redis,
//! where leases are Redis's own TTLs, the jobs' timestamps (what BullMQ's dashboards show and
//! what delays and backoff are counted from) are on the true clock too. Then, with a job due
//! in two minutes, the idle workers wait for it instead of claiming again and again (a worker
//! ahead that waited by its own clock would find it overdue). Skipped, saying why,
//! without `CONVOQ_TEST_POSTGRES_URL` (and `CONVOQ_TEST_REDIS_URL`) or without libfaketime.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{post_keyed, Role, Server, TestDatabase};

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn faketime_installed() -> bool {
    let there = std::path::Path::new(FAKETIME).exists();
    if !there {
        println!("skipped: libfaketime is not installed (Debian package faketime)");
    }
    there
}

/// An API process on the true time and two workers an hour off, under load for several
/// leases; every worker ran jobs. Returns the processes and the accepted job ids.
async fn run_skewed(
    dir: &std::path::Path,
    database_url: &str,
    env: &[(&str, &str)],
) -> (Server, Vec<Server>, Vec<String>) {
    let api = Server::launch(dir, "api", Role::Api, database_url, env).await;
    let mut workers = Vec::new();
    for (name, offset) in [("behind", "-1h"), ("ahead", "+1h")] {
        let mut skewed = env.to_vec();
        skewed.extend([
            ("LD_PRELOAD", FAKETIME),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]);
        let w = Server::launch(dir, name, Role::Worker, database_url, &skewed).await;
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
                    let r = post_keyed(port, &key, &body).await.expect("POST");
                    if r.status == 202 {
                        let id = r.json()["jobId"].as_str().expect("jobId").to_owned();
                        accepted.lock().unwrap().push(id);
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
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 100, "only {} accepted", accepted.len());
    (api, workers, accepted)
}

/// Waits for one conversation per accepted request, and no more.
async fn one_conversation_each(db: &support::Db, n: i64) {
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
}

fn every_worker_ran_jobs(workers: &[Server]) {
    for w in workers {
        let ran = support::json_lines(&w.logs())
            .iter()
            .filter(|l| l["message"] == "job completed")
            .count();
        assert!(ran > 0, "worker {} ran no job", w.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_an_hour_off_take_nothing_back_early_and_run_nothing_twice() {
    let Some(database) = TestDatabase::postgres().await else {
        return;
    };
    if !faketime_installed() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [("CONVOQ_LEASE_MS", "2000")];
    let (_api, workers, accepted) = run_skewed(dir.path(), &database.url, &env).await;
    let db = database.open().await;
    one_conversation_each(&db, accepted.len() as i64).await;
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
    every_worker_ran_jobs(&workers);
    let engine = convoq_queue::sql::SqlEngine::connect(convoq_queue::sql::SqlConfig::new(
        database.url.as_str(),
    ))
    .await
    .expect("the test's own engine");
    idle_workers_wait_for_a_later_job(&workers, engine).await;
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
    db.close().await;
}

/// Adds a job due in two minutes through `engine`: idle workers must wait for it by the
/// server's clock. (A worker an hour ahead that waited by its own clock would find it overdue
/// and claim again every millisecond until it is due.)
async fn idle_workers_wait_for_a_later_job(
    workers: &[Server],
    engine: Arc<dyn convoq_queue::Engine>,
) {
    let mut later = convoq_queue::NewJob::new("database", "create_conversation", json!({}));
    later.opts.delay = Some(120_000);
    convoq_queue::Queues::new(engine.clone())
        .add(later)
        .await
        .expect("add a delayed job");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<u64> = workers.iter().map(|w| cpu_ticks(w.pid())).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (w, before) in workers.iter().zip(before) {
        let used = cpu_ticks(w.pid()) - before;
        assert!(
            used < 60,
            "worker {} used {used} clock ticks in 3 s idle with a job due later: it does not wait by the server's clock",
            w.name
        );
    }
    engine.close().await;
}

/// A process's CPU time so far (user and system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("stat's command") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_an_hour_off_on_redis_stamp_the_true_time_and_run_nothing_twice() {
    let Some(redis) = support::test_redis_url() else {
        return;
    };
    let Some(database) = TestDatabase::postgres().await else {
        return;
    };
    if !faketime_installed() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("cq-skew-{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("CONVOQ_LEASE_MS", "2000"),
        ("CONVOQ_QUEUE_URL", redis.as_str()),
        ("CONVOQ_QUEUE_PREFIX", prefix.as_str()),
    ];
    let (api, workers, accepted) = run_skewed(dir.path(), &database.url, &env).await;
    let db = database.open().await;
    one_conversation_each(&db, accepted.len() as i64).await;
    // Each job ran once, and its timestamps, stamped by the workers an hour off, are on the
    // true clock.
    let mut latest_skew_ms = 0i64;
    for id in &accepted {
        let r = support::get(api.port, &format!("/api/jobs/{id}"))
            .await
            .expect("GET job");
        let job = &r.json()["job"];
        assert_eq!(job["state"], "completed", "{job}");
        assert_eq!(job["attemptsMade"], 1, "a job ran twice: {job}");
        let now = chrono::Utc::now();
        for field in ["processedAt", "finishedAt"] {
            let at = job[field]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .unwrap_or_else(|| panic!("{field} of {job}"));
            let ms = (now - at.with_timezone(&chrono::Utc)).num_milliseconds();
            latest_skew_ms = latest_skew_ms.max(ms.abs());
            assert!(
                (-5_000..=120_000).contains(&ms),
                "{field} is {ms} ms before now, not on the true clock: {job}"
            );
        }
    }
    every_worker_ran_jobs(&workers);
    let config = convoq_queue::bullmq::BullConfig::new(redis.as_str()).with_prefix(prefix.as_str());
    let engine = convoq_queue::bullmq::BullEngine::connect(config)
        .await
        .expect("the test's own engine");
    idle_workers_wait_for_a_later_job(&workers, engine).await;
    println!(
        "clock skew on Redis: {} jobs, each run once, its timestamps at most {latest_skew_ms} ms \
         from the test's clock",
        accepted.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
    db.close().await;
}
