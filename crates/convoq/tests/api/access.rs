//! Authentication, roles and protected mode.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_is_required_with_the_right_key() {
    let h = harness().await;
    let body = json!({ "userId": "u1" });
    let post = |auth: Option<&str>| {
        let mut b = Request::builder()
            .method("POST")
            .uri("/api/chat/conversations")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(Body::from(body.to_string())).unwrap()
    };
    for auth in [
        None,
        Some("Bearer wrong-key-wrong-key"),
        Some("Bearer "),
        Some("Bearer"),
        Some("Basic MDEyMzQ1Njc4OWFiY2RlZg=="),
        Some("0123456789abcdef"),
        Some("Bearer 0123456789ABCDEF"),
    ] {
        h.send(post(auth))
            .await
            .assert_error(401, "unauthorized", None);
    }
    // The scheme is case-insensitive.
    let r = h.send(post(Some("bearer 0123456789abcdef"))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    // Every API route needs a key, including unknown routes.
    for uri in [
        "/api/queues",
        "/api/jobs/x",
        "/api/users/u1/conversations",
        "/api/nope",
    ] {
        h.get(uri, None)
            .await
            .assert_error(401, "unauthorized", None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_limit_service_keys() {
    let h = harness().await;
    for (method, uri) in [
        ("GET", "/api/queues"),
        ("GET", "/api/queues/database"),
        ("GET", "/api/queues/database/jobs"),
        ("POST", "/api/queues/database/pause"),
        ("POST", "/api/queues/database/resume"),
        ("POST", "/api/jobs/x/retry"),
        ("DELETE", "/api/jobs/x"),
    ] {
        let r = h
            .send(req(method, uri, Some(SERVICE)).body(Body::empty()).unwrap())
            .await;
        r.assert_error(403, "forbidden", None);
        let r = h
            .send(req(method, uri, Some(ADMIN)).body(Body::empty()).unwrap())
            .await;
        assert_ne!(r.status, StatusCode::FORBIDDEN, "{method} {uri}");
    }
    // The queue was not left paused by the admin calls above? It was resumed after.
    let q = h.get("/api/queues/database", Some(ADMIN)).await.json();
    assert_eq!(q["queue"]["paused"], json!(false));

    // Jobs: a service key sees its own, not another key's; an admin sees all.
    let v = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    let id = v["jobId"].as_str().unwrap();
    let uri = format!("/api/jobs/{id}");
    assert_eq!(h.get(&uri, Some(SERVICE)).await.status, StatusCode::OK);
    h.get(&uri, Some(SERVICE2))
        .await
        .assert_error(404, "not_found", None);
    assert_eq!(h.get(&uri, Some(ADMIN)).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_mode_serves_only_loopback_clients() {
    let h = harness_with(None, |_| {}).await;
    // What `into_make_service_with_connect_info::<SocketAddr>()` puts in every request.
    // (Not `MockConnectInfo`: the middleware reads the `ConnectInfo` extension directly, and
    // `MockConnectInfo` is only seen by the `ConnectInfo` extractor.)
    let with_peer = |addr: &str| {
        let addr: SocketAddr = addr.parse().unwrap();
        h.router.clone().layer(Extension(ConnectInfo(addr)))
    };
    let local = with_peer("127.0.0.1:40000");
    let local6 = with_peer("[::1]:40000");
    let remote = with_peer("203.0.113.5:40000");
    let remote6 = with_peer("[2001:db8::1]:40000");

    let body = json!({ "userId": "u1" });
    for router in [&local, &local6] {
        let r = send_to(
            router,
            json_req("POST", "/api/chat/conversations", None, &body),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        // Loopback callers act as an admin named `local`.
        let r = send_to(router, get_req("/api/queues", None), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let id = r.json()["queues"][0]["name"].clone();
        assert_eq!(id, json!("database"));
    }
    for (router, uri) in [
        (&remote, "/api/queues"),
        (&remote, "/api/jobs/x"),
        (&remote6, "/api/queues"),
        (&remote, "/metrics"),
    ] {
        let r = send_to(router, get_req(uri, None), None).await;
        if uri == "/metrics" {
            // /metrics is open unless a metrics key is configured.
            assert_eq!(r.status, StatusCode::OK);
        } else {
            r.assert_error(403, "protected_mode", None);
        }
    }
    let r = send_to(
        &remote,
        json_req("POST", "/api/chat/conversations", Some(ADMIN), &body),
        None,
    )
    .await;
    r.assert_error(403, "protected_mode", None);
    // No peer address at all is not loopback.
    h.send(json_req("POST", "/api/chat/conversations", None, &body))
        .await
        .assert_error(403, "protected_mode", None);
    // A reverse proxy on this machine connects from loopback: what it relays is refused, not
    // served as the local admin.
    for header in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        let r = send_to(
            &local,
            req("GET", "/api/queues", None)
                .header(header, "for=198.51.100.7")
                .body(Body::empty())
                .unwrap(),
            None,
        )
        .await;
        let v = r.assert_error(403, "protected_mode", None);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(header),
            "{v}"
        );
    }
    // Health stays open.
    for uri in ["/healthz", "/readyz"] {
        let r = send_to(&remote, get_req(uri, None), None).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.text);
    }
}

/// One API key over its rate is answered 429 `rate_limited` with `Retry-After`; other keys
/// and the probes are not held back; the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_is_refused_alone() {
    let h = harness_with(Some(KEYS), |s| s.key_rate_limit = Some("2".into())).await;
    // Bursts of twice the rate: four at once, then the fifth waits.
    for _ in 0..4 {
        let r = h.get("/api/jobs/none", Some(SERVICE)).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    }
    let r = h.get("/api/jobs/none", Some(SERVICE)).await;
    r.assert_error(429, "rate_limited", None);
    assert_eq!(r.header("retry-after"), Some("1"));
    // Another key has its own allowance; probes are not limited.
    let r = h.get("/api/jobs/none", Some(SERVICE2)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    for _ in 0..10 {
        assert_eq!(h.get("/healthz", None).await.status, StatusCode::OK);
    }
    // Its allowance comes back at its rate.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = h.get("/api/jobs/none", Some(SERVICE)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let metrics = h.get("/metrics", Some(ADMIN)).await.text;
    assert!(
        metrics.contains("convoq_rate_limited_total{scope=\"key\"} 1"),
        "{metrics}"
    );
}

/// One userId's conversation POSTs over their rate are refused, before anything is queued;
/// other users are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_their_rate_gets_no_more_conversations() {
    let h = harness_with(Some(KEYS), |s| s.user_rate_limit = Some("1".into())).await;
    h.put_user("u1", "1").await;
    h.put_user("u2", "2").await;
    for _ in 0..2 {
        let r = h.create(SERVICE, &json!({ "userId": "u1" }), &[]).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    }
    let r = h.create(SERVICE, &json!({ "userId": "u1" }), &[]).await;
    let v = r.assert_error(429, "rate_limited", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("userId"),
        "{v}"
    );
    assert!(r.header("retry-after").is_some());
    let r = h.create(SERVICE2, &json!({ "userId": "u2" }), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let queued = h
        .queue_until("database", |q| q["totals"]["completed"] == json!(3))
        .await;
    assert_eq!(
        queued["totals"]["completed"],
        json!(3),
        "the refused POST queued nothing"
    );
}

/// A key (and a userId) with its backlog quota of jobs queued and not ended is answered 429
/// `backlog_quota`, nothing queued; other keys and users are not held back; once its jobs
/// end, it may queue again. An idempotent replay takes no new place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_or_a_user_at_its_backlog_quota_is_refused_until_its_jobs_end() {
    let h = harness_with(Some(KEYS), |s| {
        s.key_backlog_quota = Some("3".into());
        s.user_backlog_quota = Some("2".into());
    })
    .await;
    for (id, discord) in [("u1", "1"), ("u2", "2"), ("u3", "3")] {
        h.put_user(id, discord).await;
    }
    // The queue is paused: nothing ends.
    let r = h.post("/api/queues/database/pause", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for (user, key) in [("u1", "a"), ("u1", "b")] {
        let r = h
            .create(
                SERVICE,
                &json!({ "userId": user }),
                &[("Idempotency-Key", key)],
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    }
    // u1 is at its quota of 2: refused, whatever the key.
    let r = h.create(SERVICE2, &json!({ "userId": "u1" }), &[]).await;
    let v = r.assert_error(429, "backlog_quota", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("userId"),
        "{v}"
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    // A replay of an accepted key is answered as before, taking no place.
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1" }),
            &[("Idempotency-Key", "a")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    // The service key takes its third place with u2, then is at its quota of 3.
    let r = h.create(SERVICE, &json!({ "userId": "u2" }), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let r = h.create(SERVICE, &json!({ "userId": "u3" }), &[]).await;
    let v = r.assert_error(429, "backlog_quota", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("API key"),
        "{v}"
    );
    // Another key and another user are not held back.
    let r = h.create(SERVICE2, &json!({ "userId": "u3" }), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let queued = |q: &Value| {
        ["waiting", "paused"]
            .map(|s| q["counts"][s].as_u64().unwrap_or(0))
            .iter()
            .sum::<u64>()
    };
    let q = h.queue_until("database", |q| queued(q) >= 4).await;
    assert_eq!(queued(&q), 4, "only the accepted POSTs queued: {q}");
    // The jobs end: the key and the user may queue again.
    let r = h.post("/api/queues/database/resume", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    h.queue_until("database", |q| q["totals"]["completed"] == json!(4))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = h.create(SERVICE, &json!({ "userId": "u1" }), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let metrics = h.get("/metrics", Some(ADMIN)).await.text;
    for scope in ["key_backlog", "user_backlog"] {
        assert!(
            metrics.contains(&format!("convoq_rate_limited_total{{scope=\"{scope}\"}} 1")),
            "{metrics}"
        );
    }
}
