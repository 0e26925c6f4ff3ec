//! Jobs: state, long polls, event streams, and operators' retries and removals.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_state_and_long_poll() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    let v = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    let id = v["jobId"].as_str().unwrap();
    let r = h
        .get(&format!("/api/jobs/{id}?wait=5"), Some(SERVICE))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let job = &r.json()["job"];
    assert_eq!(job["id"], json!(id));
    assert_eq!(job["queue"], json!("database"));
    assert_eq!(job["name"], json!("create_conversation"));
    assert_eq!(job["state"], json!("completed"));
    assert_eq!(job["attemptsMade"], json!(1));
    assert!(job["maxAttempts"].as_u64().unwrap() >= 1);
    for k in ["createdAt", "processedAt", "finishedAt"] {
        assert!(job[k].is_string(), "{k}: {job}");
    }
    assert_eq!(job["result"]["conversationId"], v["conversationId"]);
    assert!(job.get("failedReason").is_none());
    assert_eq!(job["requestId"], v["requestId"]);
    assert!(
        job.get("data").is_none(),
        "a service caller sees the job, not its payload"
    );
    // An operator also sees the job's data and options.
    let r = h.get(&format!("/api/jobs/{id}"), Some(ADMIN)).await;
    let job = &r.json()["job"];
    assert_eq!(job["data"]["userId"], json!("u1"), "{job}");
    assert!(job["opts"]["attempts"].as_u64().is_some(), "{job}");

    for bad in ["31", "-1", "abc", "1.5", "99999999999999999999999"] {
        h.get(&format!("/api/jobs/{id}?wait={bad}"), Some(SERVICE))
            .await
            .assert_error(400, "invalid_field", Some("wait"));
    }
    for ok in ["0", "30"] {
        let r = h
            .get(&format!("/api/jobs/{id}?wait={ok}"), Some(SERVICE))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    h.get("/api/jobs/no-such-job", Some(SERVICE))
        .await
        .assert_error(404, "not_found", None);
    let long = "j".repeat(256);
    h.get(&format!("/api/jobs/{long}"), Some(SERVICE))
        .await
        .assert_error(400, "invalid_field", Some("id"));
    h.get("/api/jobs/a%07b", Some(SERVICE))
        .await
        .assert_error(400, "invalid_field", Some("id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_events_replay_the_life_of_the_job() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    let v = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    let id = v["jobId"].as_str().unwrap();
    // Subscribed right away: the stream follows the job live and ends after `completed`.
    let r = h
        .get(&format!("/api/jobs/{id}/events"), Some(SERVICE))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{:?}",
        r.headers
    );
    let order = ["event: waiting", "event: active", "event: completed"];
    let positions: Vec<usize> = order
        .iter()
        .map(|e| {
            r.text
                .find(e)
                .unwrap_or_else(|| panic!("{e} in {}", r.text))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{}", r.text);
    assert!(!r.text.contains("event: failed"));
    // A late subscriber gets the same history.
    let late = h.get(&format!("/api/jobs/{id}/events"), Some(ADMIN)).await;
    assert_eq!(late.status, StatusCode::OK);
    let late_pos: Vec<usize> = order.iter().map(|e| late.text.find(e).unwrap()).collect();
    assert!(late_pos.windows(2).all(|w| w[0] < w[1]), "{}", late.text);
    // Unknown jobs and other callers' jobs are 404.
    h.get("/api/jobs/nope/events", Some(SERVICE))
        .await
        .assert_error(404, "not_found", None);
    h.get(&format!("/api/jobs/{id}/events"), Some(SERVICE2))
        .await
        .assert_error(404, "not_found", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_can_be_retried_by_admins() {
    let h = harness().await;
    let v = h
        .create(SERVICE, &json!({ "userId": "late-user" }), &[])
        .await
        .json();
    let id = v["jobId"].as_str().unwrap();
    let job = h.wait_job(id).await;
    assert_eq!(job["state"], json!("failed"), "{job}");
    assert!(
        job["failedReason"]
            .as_str()
            .unwrap()
            .contains("unknown user"),
        "{job}"
    );
    let events = h
        .get(&format!("/api/jobs/{id}/events"), Some(SERVICE))
        .await;
    assert!(events.text.contains("event: failed"), "{}", events.text);

    // Retrying is an operator action.
    h.post(&format!("/api/jobs/{id}/retry"), Some(SERVICE))
        .await
        .assert_error(403, "forbidden", None);
    h.post("/api/jobs/nope/retry", Some(ADMIN))
        .await
        .assert_error(404, "not_found", None);

    // Fix the cause, retry, and the same job creates the same conversation.
    assert_eq!(
        h.put_user("late-user", "42").await.status,
        StatusCode::CREATED
    );
    let r = h.post(&format!("/api/jobs/{id}/retry"), Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["ok"], json!(true));
    assert_eq!(r.json()["job"]["id"], json!(id));
    let job = h.wait_job(id).await;
    assert_eq!(job["state"], json!("completed"), "{job}");
    assert_eq!(job["result"]["conversationId"], v["conversationId"]);
    let c = h
        .get(
            &format!(
                "/api/chat/conversations/{}",
                v["conversationId"].as_str().unwrap()
            ),
            Some(SERVICE),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.text);

    // A completed job cannot be retried.
    h.post(&format!("/api/jobs/{id}/retry"), Some(ADMIN))
        .await
        .assert_error(409, "wrong_job_state", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_can_be_deleted_by_admins() {
    let h = harness().await;
    let v = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    let id = v["jobId"].as_str().unwrap();
    h.wait_job(id).await;
    let del = |key| {
        req("DELETE", &format!("/api/jobs/{id}"), Some(key))
            .body(Body::empty())
            .unwrap()
    };
    h.send(del(SERVICE))
        .await
        .assert_error(403, "forbidden", None);
    let r = h.send(del(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json(), json!({ "ok": true, "removed": true }));
    h.get(&format!("/api/jobs/{id}"), Some(ADMIN))
        .await
        .assert_error(404, "not_found", None);
    h.send(del(ADMIN))
        .await
        .assert_error(404, "not_found", None);
}

/// A failure's recorded reason may hold a store's own error text (addresses, user names): a
/// service caller gets a stable sentence instead, in the job and in its event stream; an admin
/// gets the reason as recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_callers_get_a_stable_failure_reason() {
    // No workers: the test fails the job itself, with a reason a driver could have written.
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings {
        database_url: Some(format!("sqlite://{}/t.db", dir.path().display())),
        api_keys: Some(KEYS.to_owned()),
        ..Default::default()
    };
    let app = App::open(Config::load(&settings).expect("config"))
        .await
        .expect("app");
    let router = convoq::http::router(app.state(None));
    let engine = app.queues.engine();
    let added = engine
        .add_bulk(vec![convoq_queue::NewJob::new(
            "database",
            "create_conversation",
            json!({ "actor": "bot", "requestId": "req-leak" }),
        )])
        .await
        .expect("add");
    let id = added[0].job.id.clone();
    let claimed = engine
        .claim("database", 1, Duration::from_secs(30))
        .await
        .expect("claim")
        .jobs
        .pop()
        .expect("the job");
    let raw = "store unavailable: error returned from database: password authentication \
               failed for user \"convoq\" at 10.1.2.3:5432";
    engine
        .finish(
            &claimed,
            convoq_queue::Outcome::Failed(convoq_queue::ProcessError::unrecoverable(raw)),
        )
        .await
        .expect("finish");

    let r = send_to(
        &router,
        get_req(&format!("/api/jobs/{id}"), Some(SERVICE)),
        None,
    )
    .await;
    let job = &r.json()["job"];
    assert_eq!(job["state"], "failed", "{job}");
    let reason = job["failedReason"].as_str().expect("a reason");
    assert!(reason.starts_with("the store was unavailable"), "{reason}");
    assert!(
        !reason.contains("10.1.2.3") && !reason.contains("password"),
        "{reason}"
    );

    let r = send_to(
        &router,
        get_req(&format!("/api/jobs/{id}/events"), Some(SERVICE)),
        None,
    )
    .await;
    assert!(r.text.contains("event: failed"), "{}", r.text);
    assert!(r.text.contains("the store was unavailable"), "{}", r.text);
    assert!(!r.text.contains("10.1.2.3"), "{}", r.text);

    let r = send_to(
        &router,
        get_req(&format!("/api/jobs/{id}"), Some(ADMIN)),
        None,
    )
    .await;
    assert_eq!(r.json()["job"]["failedReason"], raw);
    let r = send_to(
        &router,
        get_req(&format!("/api/jobs/{id}/events"), Some(ADMIN)),
        None,
    )
    .await;
    assert!(
        r.text.contains("10.1.2.3"),
        "admins see the reason as recorded"
    );
}

/// An API key may keep only so many event streams open: one more is 429 `too_many_streams`,
/// and a stream's place is free again once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_per_key_are_capped() {
    let h = harness_with(Some(KEYS), |s| s.max_streams_per_key = Some("1".into())).await;
    h.put_user("u1", "1").await;
    // A job that does not finish while the queue is paused.
    let r = h.post("/api/queues/database/pause", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    let id = v["jobId"].as_str().unwrap().to_owned();
    let uri = format!("/api/jobs/{id}/events");
    // The first stream stays open as long as its response is held.
    let open = h
        .router
        .clone()
        .oneshot(get_req(&uri, Some(SERVICE)))
        .await
        .expect("infallible");
    assert_eq!(open.status(), StatusCode::OK);
    let r = h.get(&uri, Some(SERVICE)).await;
    r.assert_error(429, "too_many_streams", None);
    assert!(r.header("retry-after").is_some());
    // Another key has its own places.
    let r = h.get(&format!("/api/jobs/{id}"), Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK);
    drop(open);
    // Once the job finishes, a stream replays it and ends.
    let r = h.post("/api/queues/database/resume", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK);
    h.wait_job(&id).await;
    let r = h.get(&uri, Some(SERVICE)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.text.contains("event: completed"), "{}", r.text);
}
