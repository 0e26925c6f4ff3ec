//! End to end against the real `convoq` binary (SPEC §3, §4, §6), each scenario on SQLite
//! (module `sqlite`) and on Postgres (module `postgres`, its own fresh database; skipped when
//! `CONVOQ_TEST_POSTGRES_URL` is unset), by `on_each_database!`:
//!
//! * `a_conversation_end_to_end`: a user, a conversation POSTed with `X-Request-Id`, the job
//!   followed to `completed` three ways at once (polling, long-poll `?wait=`, server-sent events)
//!   while the queue is paused and then resumed, the conversation read back, the request id found
//!   in the JSON logs of the request and the job, its audit record, and every metric of SPEC §6
//!   with plausible values.
//!
//! The shutdown scenarios are in `shutdown.rs`.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::metrics::{parse_metrics, value, Sample};
use support::{eventually, expect_ok, get, json_lines, request, sse_until, Server, TestDatabase};

const USER: &str = "u1";

async fn create_user(port: u16) {
    let r = request(
        port,
        "PUT",
        &format!("/api/users/{USER}"),
        &[],
        Some(&json!({"discordId": "1", "username": "alice"})),
    )
    .await
    .expect("PUT user");
    assert!(
        r.status == 200 || r.status == 201,
        "PUT user: {} {}",
        r.status,
        r.text()
    );
    assert_eq!(r.json()["user"]["id"], json!(USER), "{}", r.text());
}

on_each_database!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    a_conversation_end_to_end,
);

async fn a_conversation_end_to_end(database: TestDatabase) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start_on(dir.path(), &database.url, &[]).await;
    let port = server.port;
    create_user(port).await;

    // Pause the queue so that the three followers below start before the job runs.
    let r = request(port, "POST", "/api/queues/database/pause", &[], None)
        .await
        .expect("pause");
    assert_eq!(r.status, 200, "pause: {}", r.text());

    let rid = format!("e2e-{}", uuid::Uuid::new_v4().simple());
    let r = request(
        port,
        "POST",
        "/api/chat/conversations",
        &[("X-Request-Id", &rid)],
        Some(&json!({"userId": USER, "title": "Hello e2e", "personalityMode": "concise"})),
    )
    .await
    .expect("POST conversation");
    assert_eq!(r.status, 202, "POST: {}", r.text());
    assert_eq!(r.header("x-request-id"), Some(rid.as_str()));
    let v = r.json();
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["status"], json!("queued"), "{v}");
    assert_eq!(v["requestId"], json!(rid), "{v}");
    assert!(v["estimatedWaitTime"].is_u64(), "{v}");
    let job_id = v["jobId"].as_str().expect("jobId").to_owned();
    let cid = v["conversationId"]
        .as_str()
        .expect("conversationId")
        .to_owned();
    uuid::Uuid::parse_str(&cid).expect("conversationId is a UUID");
    assert_eq!(
        r.header("location"),
        Some(format!("/api/jobs/{job_id}").as_str())
    );

    let job_path = format!("/api/jobs/{job_id}");
    let first = expect_ok(get(port, &job_path).await, "GET job")["job"].clone();
    let first_state = first["state"].as_str().unwrap_or_default().to_owned();
    assert!(
        first_state == "paused" || first_state == "waiting",
        "a job of a paused queue: {first}"
    );
    let r = get(port, &format!("/api/chat/conversations/{cid}"))
        .await
        .expect("GET conversation");
    assert_eq!(r.status, 404, "not created while paused: {}", r.text());

    // 1. Polling.
    let poll = {
        let path = job_path.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut states: Vec<String> = Vec::new();
            loop {
                let job = expect_ok(get(port, &path).await, "poll job")["job"].clone();
                let state = job["state"].as_str().unwrap_or_default().to_owned();
                if states.last() != Some(&state) {
                    states.push(state.clone());
                }
                match state.as_str() {
                    "completed" => return (states, job),
                    "failed" => panic!("job failed: {job}"),
                    _ => {}
                }
                assert!(Instant::now() < deadline, "polling: not completed: {job}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    // 2. Long-poll.
    let long = {
        let path = format!("{job_path}?wait=10");
        tokio::spawn(async move {
            let t = Instant::now();
            let r = get(port, &path).await;
            (t.elapsed(), r)
        })
    };
    // 3. Server-sent events.
    let sse = {
        let path = format!("{job_path}/events");
        tokio::spawn(async move {
            sse_until(
                port,
                &path,
                &["completed", "failed"],
                Duration::from_secs(30),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !long.is_finished(),
        "the long-poll answered while the job could not run"
    );
    assert!(
        !sse.is_finished(),
        "the event stream ended while the job could not run"
    );
    let r = request(port, "POST", "/api/queues/database/resume", &[], None)
        .await
        .expect("resume");
    assert_eq!(r.status, 200, "resume: {}", r.text());

    let (states, job) = poll.await.expect("poll task");
    assert_eq!(states.first(), Some(&first_state), "{states:?}");
    assert_eq!(states.last().map(String::as_str), Some("completed"));
    assert_eq!(job["id"], json!(job_id), "{job}");
    assert_eq!(job["queue"], json!("database"), "{job}");
    assert_eq!(job["name"], json!("create_conversation"), "{job}");
    assert_eq!(job["attemptsMade"], json!(1), "{job}");
    assert_eq!(job["maxAttempts"], json!(3), "{job}");
    assert_eq!(job["requestId"], json!(rid), "{job}");
    assert_eq!(job["result"]["success"], json!(true), "{job}");
    assert_eq!(job["result"]["conversationId"], json!(cid), "{job}");
    for t in ["createdAt", "processedAt", "finishedAt"] {
        assert!(job[t].is_string(), "{t} in {job}");
    }
    assert!(job["processedAt"].as_str() <= job["finishedAt"].as_str());

    let (waited, r) = long.await.expect("long-poll task");
    let r = r.expect("long-poll");
    assert_eq!(r.status, 200, "{}", r.text());
    let long_job = r.json()["job"].clone();
    assert_eq!(long_job["state"], json!("completed"), "{long_job}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(10),
        "the long-poll should answer when the job finishes, not at once nor at the deadline: {waited:?}"
    );

    let (status, content_type, events) = sse.await.expect("sse task").expect("event stream");
    assert_eq!(status, 200);
    assert!(
        content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{content_type:?}"
    );
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("no {k} event in {kinds:?}"))
    };
    assert_eq!(kinds.first(), Some(&"waiting"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");
    assert!(
        pos("waiting") < pos("active") && pos("active") < pos("completed"),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| matches!(*k, "failed" | "retrying" | "stalled")),
        "{kinds:?}"
    );
    for e in &events {
        let data: Value = serde_json::from_str(&e.data)
            .unwrap_or_else(|err| panic!("event data is not JSON ({err}): {:?}", e.data));
        assert_eq!(data["kind"], json!(e.event), "{data}");
        assert!(data["at"].is_string(), "{data}");
    }
    let done: Value = serde_json::from_str(&events.last().expect("events").data).expect("JSON");
    assert_eq!(done["detail"]["conversationId"], json!(cid), "{done}");

    // A late subscriber gets the whole history replayed.
    let (_, _, replay) = sse_until(
        port,
        &format!("{job_path}/events"),
        &["completed", "failed"],
        Duration::from_secs(10),
    )
    .await
    .expect("replayed event stream");
    let replay_kinds: Vec<&str> = replay.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(replay_kinds, kinds, "a late subscriber misses nothing");

    // The conversation.
    let c = expect_ok(
        get(port, &format!("/api/chat/conversations/{cid}")).await,
        "GET conversation",
    )["conversation"]
        .clone();
    assert_eq!(c["id"], json!(cid), "{c}");
    assert_eq!(c["userId"], json!(USER), "{c}");
    assert_eq!(c["title"], json!("Hello e2e"), "{c}");
    assert_eq!(c["personalityMode"], json!("concise"), "{c}");
    assert!(c["createdAt"].is_string(), "{c}");

    // Its audit record, committed in the conversation's own transaction (the queue and the
    // store share one database, so no audit job is needed), correlated by the request id.
    {
        let db = database.open().await;
        let audited = db
            .count(&format!(
                "SELECT COUNT(*) FROM audit_log WHERE id = 'conversation.created-{cid}' \
                 AND event = 'conversation.created' AND subject_id = '{cid}' \
                 AND request_id = '{rid}'"
            ))
            .await;
        assert_eq!(audited, 1, "one audit record for {cid}");
        let audit_jobs = db
            .count("SELECT COUNT(*) FROM cq_jobs WHERE queue = 'audit'")
            .await;
        assert_eq!(
            audit_jobs, 0,
            "no audit job where the store shares the queue's database"
        );
        db.close().await;
    }
    let r = get(port, &format!("/api/jobs/conversation.created-{cid}"))
        .await
        .expect("GET audit job");
    assert_eq!(r.status, 404, "{}", r.text());

    // A job that fails for good (unknown user), so that the failure metric has a sample.
    let r = request(
        port,
        "POST",
        "/api/chat/conversations",
        &[("X-Request-Id", "e2e-ghost")],
        Some(&json!({"userId": "ghost"})),
    )
    .await
    .expect("POST ghost");
    assert_eq!(r.status, 202, "{}", r.text());
    let ghost_job = r.json()["jobId"].as_str().expect("jobId").to_owned();
    let ghost = expect_ok(
        get(port, &format!("/api/jobs/{ghost_job}?wait=10")).await,
        "GET ghost job",
    )["job"]
        .clone();
    assert_eq!(ghost["state"], json!("failed"), "{ghost}");
    assert_eq!(ghost["attemptsMade"], json!(1), "unrecoverable: {ghost}");
    assert!(
        ghost["failedReason"]
            .as_str()
            .is_some_and(|r| r.contains("unknown user")),
        "{ghost}"
    );

    // One grep of the request id finds the request, the job and the conversation it created.
    let (lines, total) = eventually(
        Duration::from_secs(10),
        "the log lines of the request id",
        || {
            let logs = server.logs();
            let rid = rid.clone();
            let job_id = job_id.clone();
            let cid = cid.clone();
            async move {
                let total = logs.lines().filter(|l| l.contains(rid.as_str())).count();
                let lines: Vec<Value> = json_lines(&logs)
                    .into_iter()
                    .filter(|l| l.to_string().contains(rid.as_str()))
                    .collect();
                let msg = |l: &Value, m: &str| l["message"] == json!(m);
                let rid_of = |l: &Value| {
                    l.get("request_id")
                        .or_else(|| l["span"].get("request_id"))
                        .cloned()
                        .unwrap_or(Value::Null)
                };
                let request = lines.iter().any(|l| {
                    msg(l, "request served")
                        && rid_of(l) == json!(rid)
                        && l["span"]["route"] == json!("/api/chat/conversations")
                        && l["span"]["method"] == json!("POST")
                        && l["status"] == json!(202)
                });
                let enqueued = lines
                    .iter()
                    .any(|l| msg(l, "job enqueued") && l["job_id"] == json!(job_id));
                let job_step = |m: &str| {
                    lines.iter().any(|l| {
                        msg(l, m)
                            && l["request_id"] == json!(rid)
                            && l["job_id"] == json!(job_id)
                            && l["job_name"] == json!("create_conversation")
                            && l["conversation_id"] == json!(cid)
                            && l["attempt"] == json!(1)
                    })
                };
                let created = lines.iter().any(|l| {
                    msg(l, "conversation created")
                        && l["request_id"] == json!(rid)
                        && l["conversation_id"] == json!(cid)
                });
                (request
                    && enqueued
                    && job_step("job started")
                    && job_step("job completed")
                    && created)
                    .then_some((lines, total))
            }
        },
    )
    .await;
    assert_eq!(total, lines.len(), "every log line is JSON");
    for l in &lines {
        assert!(
            l["level"] == json!("INFO") || l["level"] == json!("DEBUG"),
            "nothing went wrong for this request: {l}"
        );
        assert!(l["timestamp"].is_string(), "{l}");
    }

    // Every metric of SPEC §6, with plausible values. Queue counts are cached for a moment, so
    // the gauge may lag the ghost job's failure by that much.
    let text = eventually(Duration::from_secs(10), "a fresh /metrics", || async move {
        let r = get(port, "/metrics").await.expect("GET /metrics");
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("text/plain")),
            "{:?}",
            r.header("content-type")
        );
        let text = r.text();
        let fresh = parse_metrics(&text).iter().any(|(n, l, v)| {
            n == "convoq_queue_jobs"
                && l.get("queue").map(String::as_str) == Some("database")
                && l.get("state").map(String::as_str) == Some("failed")
                && *v >= 1.0
        });
        fresh.then_some(text)
    })
    .await;
    let s = parse_metrics(&text);
    for name in [
        "convoq_jobs_queued_total",
        "convoq_jobs_completed_total",
        "convoq_jobs_failed_total",
        "convoq_job_duration_seconds_count",
        "convoq_job_wait_seconds_count",
        "convoq_queue_jobs",
        "convoq_http_requests_total",
        "convoq_http_request_duration_seconds_count",
        "convoq_db_query_duration_seconds_count",
    ] {
        assert!(
            s.iter().any(|(n, _, _)| n == name),
            "/metrics has no {name}:\n{text}"
        );
    }
    let db_cc = [("queue", "database"), ("name", "create_conversation")];
    assert!(value(&s, "convoq_jobs_queued_total", &db_cc) >= 2.0);
    assert!(value(&s, "convoq_jobs_completed_total", &db_cc) >= 1.0);
    let failed = [
        ("queue", "database"),
        ("name", "create_conversation"),
        ("final", "true"),
    ];
    assert!(value(&s, "convoq_jobs_failed_total", &failed) >= 1.0);
    assert!(value(&s, "convoq_job_duration_seconds_count", &db_cc) >= 2.0);
    assert!(value(&s, "convoq_job_wait_seconds_count", &db_cc) >= 2.0);
    assert!(value(&s, "convoq_job_wait_seconds_sum", &db_cc) > 0.0);
    let st = |state: &'static str| [("queue", "database"), ("state", state)];
    assert!(value(&s, "convoq_queue_jobs", &st("completed")) >= 1.0);
    assert!(value(&s, "convoq_queue_jobs", &st("failed")) >= 1.0);
    assert_eq!(value(&s, "convoq_queue_jobs", &st("active")), 0.0);
    assert_eq!(value(&s, "convoq_queue_jobs", &st("paused")), 0.0);
    let post = [
        ("method", "POST"),
        ("route", "/api/chat/conversations"),
        ("status", "202"),
    ];
    assert!(value(&s, "convoq_http_requests_total", &post) >= 2.0);
    let get_job = [
        ("method", "GET"),
        ("route", "/api/jobs/{id}"),
        ("status", "200"),
    ];
    assert!(value(&s, "convoq_http_requests_total", &get_job) >= 3.0);
    let post_d = [("method", "POST"), ("route", "/api/chat/conversations")];
    assert!(value(&s, "convoq_http_request_duration_seconds_count", &post_d) >= 2.0);
    let db_queries: f64 = s
        .iter()
        .filter(|(n, _, _)| n == "convoq_db_query_duration_seconds_count")
        .map(|(_, _, v)| v)
        .sum();
    assert!(db_queries >= 1.0, "store queries are timed:\n{text}");
    for (n, l, _) in &s {
        if let Some(route) = l.get("route") {
            assert!(
                !route.contains(&job_id) && !route.contains(&cid) && !route.contains(USER),
                "route labels are templates, not raw paths: {n}{l:?}"
            );
        }
    }
    // Histograms are well formed: cumulative buckets, +Inf == _count.
    let buckets: Vec<&Sample> = s
        .iter()
        .filter(|(n, l, _)| {
            n == "convoq_http_request_duration_seconds_bucket"
                && l.get("method").map(String::as_str) == Some("POST")
                && l.get("route").map(String::as_str) == Some("/api/chat/conversations")
        })
        .collect();
    assert!(buckets.len() > 2, "{text}");
    assert!(buckets.windows(2).all(|w| w[0].2 <= w[1].2), "{buckets:?}");
    let inf = buckets
        .iter()
        .find(|(_, l, _)| l.get("le").map(String::as_str) == Some("+Inf"))
        .expect("+Inf bucket");
    assert_eq!(
        inf.2,
        value(&s, "convoq_http_request_duration_seconds_count", &post_d)
    );

    server.stop(Duration::from_secs(20)).await;
}
