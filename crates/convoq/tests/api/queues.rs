//! Queues: stats, listings, pause, and backpressure.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_stats_and_listings() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    let v = h.create_waited("u1", None).await;
    let job_id = v["jobId"].as_str().unwrap().to_owned();

    let r = h.get("/api/queues", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let names: Vec<String> = r.json()["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["database", "audit", "chat"]);

    let q = h
        .queue_until("database", |q| q["counts"]["completed"] == json!(1))
        .await;
    assert_eq!(q["name"], json!("database"));
    assert_eq!(q["paused"], json!(false));
    for s in [
        "waiting",
        "active",
        "delayed",
        "completed",
        "failed",
        "paused",
    ] {
        assert!(q["counts"][s].is_u64(), "{s}: {q}");
    }
    assert_eq!(q["totals"]["completed"], json!(1));
    assert!(q["throughputPerMinute"].is_number());
    assert!(q["meanDurationMs"].is_number());
    // Over the queue's latest completions (one here), from the queue itself.
    assert_eq!(q["recent"]["jobs"], json!(1), "{q}");
    assert!(
        q["recent"]["p95Ms"].as_f64().is_some_and(|v| v >= 0.0),
        "{q}"
    );
    assert_eq!(q["oldestWaitingAgeMs"], json!(null), "none waits: {q}");
    // The totals as read, for a chart of the last minutes: at least the reading just made.
    let history = q["history"].as_array().expect("a history");
    assert!(!history.is_empty(), "{q}");
    assert!(history
        .iter()
        .all(|h| h["at"].is_i64() && h["completed"].is_u64() && h["failed"].is_u64()));
    assert!(history.last().unwrap()["completed"].as_u64() <= Some(1));
    // The conversation's audit record commits with it (it is in the store, with the request
    // id), so the audit queue has nothing to do.
    let conversation_id = v["conversationId"].as_str().unwrap().to_owned();
    let db = rusqlite::Connection::open(h.dir.path().join("t.db")).unwrap();
    let (event, request_id): (String, Option<String>) = db
        .query_row(
            "SELECT event, request_id FROM audit_log WHERE subject_id = ?1",
            [&conversation_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("one audit record for the conversation");
    assert_eq!(event, "conversation.created");
    assert_eq!(request_id.as_deref(), v["requestId"].as_str());
    let r = h.get("/api/queues/audit", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json()["queue"]["totals"]["completed"],
        json!(0),
        "{}",
        r.text
    );

    let r = h
        .get("/api/queues/database/jobs?state=completed", Some(ADMIN))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let jobs = r.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], json!(job_id));
    assert_eq!(jobs[0]["state"], json!("completed"));
    let r = h.get("/api/queues/database/jobs", Some(ADMIN)).await;
    assert_eq!(r.json()["jobs"], json!([]), "default state is waiting");

    for (q, field) in [
        ("state=bogus", "state"),
        ("state=COMPLETED", "state"),
        ("state=any", "state"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("offset=-1", "offset"),
        ("q=%01", "q"),
        ("field=userId", "value"),
        ("value=u1", "field"),
        ("field=a.b&value=1", "field"),
        ("stalled=yes", "stalled"),
    ] {
        h.get(&format!("/api/queues/database/jobs?{q}"), Some(ADMIN))
            .await
            .assert_error(400, "invalid_field", Some(field));
    }
    h.get("/api/queues/nope", Some(ADMIN))
        .await
        .assert_error(404, "not_found", None);
    h.get("/api/queues/nope/jobs", Some(ADMIN))
        .await
        .assert_error(404, "not_found", None);
    h.post("/api/queues/nope/pause", Some(ADMIN))
        .await
        .assert_error(404, "not_found", None);
    h.post("/api/queues/nope/resume", Some(ADMIN))
        .await
        .assert_error(404, "not_found", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_queue_accepts_but_holds_jobs_until_resumed() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    let r = h.post("/api/queues/database/pause", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({ "ok": true, "queue": "database", "paused": true })
    );

    let r = h.create(SERVICE, &json!({ "userId": "u1" }), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id = r.json()["jobId"].as_str().unwrap().to_owned();
    // A long-poll of one second finds it still waiting.
    let j = h
        .get(&format!("/api/jobs/{id}?wait=1"), Some(SERVICE))
        .await;
    let state = j.json()["job"]["state"].clone();
    assert!(
        state == json!("waiting") || state == json!("paused"),
        "{state}"
    );
    let q = h
        .queue_until("database", |q| q["counts"]["paused"] == json!(1))
        .await;
    assert_eq!(q["paused"], json!(true));
    assert_eq!(q["counts"]["waiting"], json!(0));
    assert_eq!(q["counts"]["completed"], json!(0));
    assert!(
        q["oldestWaitingAgeMs"].as_i64().is_some_and(|ms| ms >= 0),
        "the held job's wait: {q}"
    );

    let r = h.post("/api/queues/database/resume", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["paused"], json!(false));
    let job = h.wait_job(&id).await;
    assert_eq!(job["state"], json!("completed"), "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_over_the_limit_is_429_with_retry_after() {
    let h = harness_with(Some(KEYS), |s| s.max_backlog = Some("1".into())).await;
    h.post("/api/queues/database/pause", Some(ADMIN)).await;
    let r = h.create(SERVICE, &json!({ "userId": "u1" }), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    // Wait until the (cached) counts see the held job.
    h.queue_until("database", |q| q["counts"]["paused"] == json!(1))
        .await;
    let r = h.create(SERVICE, &json!({ "userId": "u1" }), &[]).await;
    r.assert_error(429, "backlog_full", None);
    let secs: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
}

#[tokio::test]
async fn jobs_are_found_by_request_id_user_and_failure_reason() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1" }),
            &[("x-request-id", "find-me-42")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let found_id = r.json()["jobId"].as_str().unwrap().to_owned();
    h.wait_job(&found_id).await;
    let r = h.create(SERVICE, &json!({ "userId": "ghost" }), &[]).await;
    let failed_id = r.json()["jobId"].as_str().unwrap().to_owned();
    h.wait_job(&failed_id).await;

    let h = &h;
    let search = |query: &'static str| async move {
        let r = h
            .get(&format!("/api/queues/database/jobs?{query}"), Some(ADMIN))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.text);
        let v = r.json();
        assert_eq!(v["exhaustive"], json!(true));
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    // By request id, in any state (the default when searching).
    assert_eq!(search("q=FIND-ME-42").await, [found_id.as_str()]);
    assert_eq!(
        search("q=find-me-42&state=completed").await,
        [found_id.as_str()]
    );
    assert!(search("q=find-me-42&state=failed").await.is_empty());
    // Every job of one user; a failure by a word of its reason.
    assert_eq!(search("field=userId&value=u1").await, [found_id.as_str()]);
    assert_eq!(
        search("q=unknown%20user&state=failed").await,
        [failed_id.as_str()]
    );
    assert_eq!(
        search("field=userId&value=ghost&q=unknown").await,
        [failed_id]
    );
    // Nothing stalled here.
    assert!(search("stalled=true").await.is_empty());
}

#[tokio::test]
async fn bulk_actions_act_on_a_selection_or_on_what_a_filter_matches() {
    let h = harness().await;
    // Six failed jobs: four of "ghost", two of "phantom".
    let mut ghost = Vec::new();
    let mut phantom = Vec::new();
    for i in 0..6 {
        let user = if i < 4 { "ghost" } else { "phantom" };
        let r = h.create(SERVICE, &json!({ "userId": user }), &[]).await;
        let id = r.json()["jobId"].as_str().unwrap().to_owned();
        h.wait_job(&id).await;
        if i < 4 {
            ghost.push(id)
        } else {
            phantom.push(id)
        }
    }
    let bulk = |body: Value| {
        let h = &h;
        async move {
            h.send(json_req(
                "POST",
                "/api/queues/database/jobs/bulk",
                Some(ADMIN),
                &body,
            ))
            .await
        }
    };
    // Refused: a service key, no action, both or neither of ids and filter, a filter state
    // that the action does not take.
    let r = h
        .send(json_req(
            "POST",
            "/api/queues/database/jobs/bulk",
            Some(SERVICE),
            &json!({ "action": "retry", "ids": ["x"] }),
        ))
        .await;
    r.assert_error(403, "forbidden", None);
    bulk(json!({ "action": "explode", "ids": ["x"] }))
        .await
        .assert_error(400, "invalid_field", Some("action"));
    bulk(json!({ "action": "retry" }))
        .await
        .assert_error(400, "invalid_field", Some("ids"));
    bulk(json!({ "action": "retry", "ids": [], "filter": {} }))
        .await
        .assert_error(400, "invalid_field", Some("ids"));
    bulk(json!({ "action": "retry", "filter": { "state": "completed" } }))
        .await
        .assert_error(400, "invalid_field", Some("filter"));
    bulk(json!({ "action": "remove", "filter": { "state": "waiting" } }))
        .await
        .assert_error(400, "invalid_field", Some("filter"));

    // A selection: two jobs and one that does not exist.
    let r = bulk(json!({ "action": "remove", "ids": [phantom[0], phantom[1], "nope"] })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(
        (v["matched"].clone(), v["done"].clone()),
        (json!(3), json!(2)),
        "{v}"
    );
    assert_eq!(v["errors"][0]["id"], json!("nope"));
    assert_eq!(v["errors"][0]["code"], json!("not_found"));

    // Everything a filter matches: the ghost's failed jobs, retried (and failing again).
    let r = bulk(json!({
        "action": "retry",
        "filter": { "state": "failed", "field": "userId", "value": "ghost" },
    }))
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["done"], json!(4), "{v}");
    assert_eq!(v["more"], json!(false));
    for id in &ghost {
        let job = h.wait_job(id).await;
        assert_eq!(
            job["attemptsMade"],
            json!(1),
            "retried with fresh attempts: {job}"
        );
    }
    // Each job acted on is in the audit log.
    for id in ghost.iter().chain(&phantom) {
        let events = h._app.store.audit_events_for(id).await.expect("read");
        assert_eq!(events.len(), 1, "{id}: {events:?}");
    }
    // Remove every failed job.
    let r = bulk(json!({ "action": "remove", "filter": { "state": "failed" } })).await;
    assert_eq!(r.json()["done"], json!(4), "{}", r.text);
    h.queue_until("database", |q| q["counts"]["failed"] == json!(0))
        .await;
}

#[tokio::test]
async fn delayed_jobs_are_promoted_alone_or_in_bulk() {
    let h = harness().await;
    // Jobs on `chat` (no processor runs them here, its queue paused), delayed an hour.
    assert_eq!(
        h.post("/api/queues/chat/pause", Some(ADMIN)).await.status,
        StatusCode::OK
    );
    let mut ids = Vec::new();
    for n in 0..3 {
        let mut job = convoq_queue::NewJob::new("chat", "message", json!({ "n": n }));
        job.opts.delay = Some(3_600_000);
        ids.push(h._app.queues.add(job).await.expect("added").job.id);
    }
    let r = h
        .post(&format!("/api/jobs/{}/promote", ids[0]), Some(ADMIN))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json()["job"]["state"],
        json!("paused"),
        "ready now, in a paused queue"
    );
    h.post(&format!("/api/jobs/{}/promote", ids[0]), Some(ADMIN))
        .await
        .assert_error(409, "wrong_job_state", None);
    h.post(&format!("/api/jobs/{}/promote", ids[1]), Some(SERVICE))
        .await
        .assert_error(403, "forbidden", None);
    let r = h
        .send(json_req(
            "POST",
            "/api/queues/chat/jobs/bulk",
            Some(ADMIN),
            &json!({ "action": "promote", "filter": { "state": "delayed" } }),
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["done"], json!(2), "{}", r.text);
    let promoted = h._app.store.audit_events_for(&ids[2]).await.expect("read");
    assert_eq!(promoted[0].0, "job.promoted");
}
