//! Health, metrics and routing.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open() {
    let h = harness().await;
    let r = h.get("/healthz", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({ "ok": true }));
    let r = h.get("/readyz", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["ok"], json!(true));
    assert_eq!(v["checks"]["store"], json!(true));
    assert_eq!(v["checks"]["queue"], json!(true));
    assert_eq!(v["checks"]["workers"], json!(true));
    // A wrong key does not matter there.
    let r = h.get("/healthz", Some("not-a-key")).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_open_without_a_metrics_key() {
    let h = harness().await;
    let r = h.get("/metrics", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_key_guards_metrics() {
    let h = harness_with(Some(KEYS), |s| s.metrics_key = Some(METRICS_KEY.into())).await;
    for key in [None, Some(SERVICE), Some("metrics-key-wrong-wrong")] {
        h.get("/metrics", key)
            .await
            .assert_error(401, "unauthorized", None);
    }
    for key in [METRICS_KEY, ADMIN] {
        let r = h.get("/metrics", Some(key)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    // The metrics key is not an API key.
    h.get("/api/queues", Some(METRICS_KEY))
        .await
        .assert_error(401, "unauthorized", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_the_spec_with_route_templates() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    let ok = h.create_waited("u1", Some("t")).await;
    let ok_job = ok["jobId"].as_str().unwrap().to_owned();
    let conv = ok["conversationId"].as_str().unwrap().to_owned();
    h.get(&format!("/api/jobs/{ok_job}"), Some(SERVICE)).await;
    h.get(&format!("/api/chat/conversations/{conv}"), Some(SERVICE))
        .await;
    h.get("/api/users/u1/conversations", Some(SERVICE)).await;
    h.get("/api/jobs/raw-id-that-does-not-exist", Some(SERVICE))
        .await;
    h.get("/api/no/such/route/xyz", Some(SERVICE)).await;
    let failed = h
        .create(
            SERVICE,
            &json!({ "userId": "ghost" }),
            &[("prefer", "wait=5")],
        )
        .await;
    failed.assert_error(422, "job_failed", None);

    // A job's end reaches the metrics just after it is recorded (and answered to a waiting
    // POST): read until the failed job is counted, a few seconds at most.
    let mut text = h.get("/metrics", None).await.text;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !text.contains(r#"final="true""#) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = h.get("/metrics", None).await.text;
    }
    for name in [
        "convoq_jobs_queued_total",
        "convoq_jobs_completed_total",
        "convoq_jobs_failed_total",
        "convoq_job_duration_seconds",
        "convoq_job_wait_seconds",
        "convoq_queue_jobs",
        "convoq_http_requests_total",
        "convoq_http_request_duration_seconds",
        "convoq_db_query_duration_seconds",
        "convoq_queue_ready",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from\n{text}"
        );
    }
    assert!(
        text.contains(r#"convoq_jobs_queued_total{name="create_conversation",queue="database"} 2"#),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("convoq_jobs_failed_total") && l.contains(r#"final="true""#)),
        "{text}"
    );
    assert!(text.contains(r#"route="/api/jobs/{id}""#), "{text}");
    assert!(
        text.contains(r#"route="/api/chat/conversations/{id}""#),
        "{text}"
    );
    assert!(
        text.contains(r#"route="/api/users/{id}/conversations""#),
        "{text}"
    );
    assert!(
        text.contains(r#"route="/api/chat/conversations""#),
        "{text}"
    );
    // Raw ids and paths never become labels.
    for raw in [
        ok_job.as_str(),
        conv.as_str(),
        "raw-id-that-does-not-exist",
        "/api/no/such/route",
        "/api/users/u1",
        "ghost",
    ] {
        assert!(!text.contains(raw), "{raw} leaked into metrics:\n{text}");
    }
    let templates = [
        "/api/chat/conversations",
        "/api/chat/conversations/{id}",
        "/api/users/{id}",
        "/api/users/{id}/conversations",
        "/api/jobs/{id}",
        "/api/jobs/{id}/events",
        "/api/jobs/{id}/retry",
        "/api/queues",
        "/api/queues/{name}",
        "/api/queues/{name}/jobs",
        "/api/queues/{name}/pause",
        "/api/queues/{name}/resume",
        "/metrics",
        "/healthz",
        "/readyz",
        "unmatched",
    ];
    for line in text
        .lines()
        .filter(|l| l.starts_with("convoq_http_request"))
    {
        let route = line
            .split("route=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("no route label: {line}"));
        assert!(templates.contains(&route), "route label {route:?}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_answer_json_errors() {
    let h = harness().await;
    // `/` leads to the console (tests/api/console.rs).
    for uri in ["/api", "/api/nope", "/api/chat/conversations/x/y"] {
        h.get(uri, Some(ADMIN))
            .await
            .assert_error(404, "not_found", None);
    }
    for (method, uri) in [
        ("GET", "/api/chat/conversations"),
        ("DELETE", "/api/chat/conversations"),
        ("POST", "/api/jobs/x"),
        ("PUT", "/api/queues"),
        ("GET", "/api/users/u1"),
        ("POST", "/healthz"),
        ("GET", "/api/jobs/x/retry"),
    ] {
        let r = h
            .send(req(method, uri, Some(ADMIN)).body(Body::empty()).unwrap())
            .await;
        r.assert_error(405, "method_not_allowed", None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_path_segments_answer_the_error_shape() {
    let h = harness().await;
    for (method, uri, field) in [
        ("GET", "/api/jobs/%FF", "id"),
        ("GET", "/api/jobs/%FF/events", "id"),
        ("GET", "/api/chat/conversations/%FF%FE", "id"),
        ("GET", "/api/users/%C3%28/conversations", "id"),
        ("GET", "/api/queues/%FF", "name"),
        ("POST", "/api/queues/%FF/pause", "name"),
    ] {
        let r = h
            .send(req(method, uri, Some(ADMIN)).body(Body::empty()).unwrap())
            .await;
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{uri}: {:?}",
            r.headers
        );
        r.assert_error(400, "invalid_field", Some(field));
    }
}
