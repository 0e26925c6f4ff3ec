//! The operator console's edge: its embedded page, its sessions (admin keys only, an
//! `HttpOnly`, `SameSite=Strict` cookie), CSRF rules, and the audit records of operator
//! actions. The page itself is driven in a real browser by `tests/console.rs`.

use crate::harness::*;

/// The session cookie's `name=value` from a login response.
fn session_cookie(r: &Resp) -> String {
    let set = r.header("set-cookie").expect("a Set-Cookie");
    set.split(';').next().expect("name=value").to_owned()
}

fn with_cookie(method: &str, uri: &str, cookie: &str) -> axum::http::request::Builder {
    req(method, uri, None).header(header::COOKIE, cookie)
}

async fn login(h: &Harness, key: &str) -> Resp {
    h.send(json_req("POST", "/ui/login", None, &json!({ "key": key })))
        .await
}

#[tokio::test]
async fn the_page_is_served_from_the_binary_under_a_strict_policy() {
    let h = harness().await;
    let r = h.get("/", None).await;
    assert!(r.status.is_redirection(), "{}", r.status);
    assert_eq!(r.header("location"), Some("/ui"));
    let r = h.get("/ui", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.text.contains("/ui/console.js"), "{}", r.text);
    let csp = r.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(
        !r.text.contains("http://") && !r.text.contains("https://"),
        "nothing fetched from elsewhere"
    );
    for (path, kind) in [
        ("/ui/console.js", "text/javascript"),
        ("/ui/console.css", "text/css"),
    ] {
        let r = h.get(path, None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
    }
    // The page holds no secret and no data: it asks the API, which wants a caller.
    h.get("/ui/session", None)
        .await
        .assert_error(401, "unauthorized", None);
}

#[tokio::test]
async fn only_an_admin_key_opens_a_session_and_its_cookie_is_strict() {
    let h = harness().await;
    login(&h, SERVICE)
        .await
        .assert_error(403, "forbidden", None);
    login(&h, "not-a-key")
        .await
        .assert_error(401, "unauthorized", None);
    let r = h
        .send(
            req("POST", "/ui/login", None)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{\"key\":"))
                .unwrap(),
        )
        .await;
    r.assert_error(400, "malformed_json", None);

    let r = login(&h, ADMIN).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let set = r.header("set-cookie").unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{attr} missing in {set}");
    }
    assert!(!set.contains(ADMIN), "the key is not the cookie");
    let cookie = session_cookie(&r);

    let r = h
        .send(
            with_cookie("GET", "/ui/session", &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let session = r.json();
    assert_eq!(session["name"], json!("ops"));
    let csrf = session["csrf"].as_str().expect("a CSRF token").to_owned();
    let r = h
        .send(
            with_cookie("GET", "/api/queues", &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the cookie reads like an admin key"
    );

    // Changing state with the cookie needs the session's CSRF token.
    let pause = "/api/queues/chat/pause";
    h.send(
        with_cookie("POST", pause, &cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_error(403, "csrf", None);
    h.send(
        with_cookie("POST", pause, &cookie)
            .header("x-csrf-token", "wrong")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_error(403, "csrf", None);
    let r = h
        .send(
            with_cookie("POST", pause, &cookie)
                .header("x-csrf-token", &csrf)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // A browser that says the request comes from another site is refused, token or not.
    h.send(
        with_cookie("POST", "/api/queues/chat/resume", &cookie)
            .header("x-csrf-token", &csrf)
            .header("sec-fetch-site", "cross-site")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_error(403, "cross_site", None);
    h.send(
        with_cookie("POST", "/api/queues/chat/resume", &cookie)
            .header("x-csrf-token", &csrf)
            .header("origin", "http://evil.example")
            .header("host", "127.0.0.1:3000")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_error(403, "cross_site", None);
    // Behind a reverse proxy that rewrites Host, the browser's own word decides.
    let r = h
        .send(
            with_cookie("POST", "/api/queues/chat/resume", &cookie)
                .header("x-csrf-token", &csrf)
                .header("sec-fetch-site", "same-origin")
                .header("origin", "https://convoq.example")
                .header("host", "127.0.0.1:3000")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Logging in and out are operator actions too.
    let events: Vec<_> = h
        ._app
        .store
        .audit_events_for("console")
        .await
        .expect("read")
        .into_iter()
        .map(|(event, actor, _)| (event, actor))
        .collect();
    assert_eq!(events, [("console.login".to_owned(), "ops".to_owned())]);

    // After logout the cookie is nobody.
    let r = h
        .send(
            with_cookie("POST", "/ui/logout", &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    h.send(
        with_cookie("GET", "/api/queues", &cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_error(401, "unauthorized", None);
    let logged_out = h
        ._app
        .store
        .audit_events_for("console")
        .await
        .expect("read");
    assert!(logged_out
        .iter()
        .any(|(event, actor, _)| event == "console.logout" && actor == "ops"));
}

#[tokio::test]
async fn in_protected_mode_a_cross_site_request_cannot_act_as_the_loopback_admin() {
    let h = harness_with(None, |_| {}).await;
    let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let router = h.router.clone().layer(Extension(ConnectInfo(local)));
    let cross = req("POST", "/api/queues/chat/pause", None)
        .header("sec-fetch-site", "cross-site")
        .body(Body::empty())
        .unwrap();
    send_to(&router, cross, None)
        .await
        .assert_error(403, "cross_site", None);
    let same = req("POST", "/api/queues/chat/pause", None)
        .header("sec-fetch-site", "same-origin")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send_to(&router, same, None).await.status, StatusCode::OK);
    // No login there: loopback browsers are admins already.
    let r = send_to(
        &router,
        json_req("POST", "/ui/login", None, &json!({"key": "x"})),
        None,
    )
    .await;
    r.assert_error(409, "protected_mode", None);
    let r = send_to(&router, get_req("/ui/session", None), None).await;
    assert_eq!(r.json()["protectedMode"], json!(true), "{}", r.text);
}

#[tokio::test]
async fn operator_actions_are_recorded_in_the_audit_log() {
    let h = harness().await;
    assert_eq!(
        h.post("/api/queues/chat/pause", Some(ADMIN)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.post("/api/queues/chat/resume", Some(ADMIN)).await.status,
        StatusCode::OK
    );
    // A failed job, retried, then removed.
    let r = h.create(SERVICE, &json!({ "userId": "ghost" }), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id = r.json()["jobId"].as_str().unwrap().to_owned();
    assert_eq!(h.wait_job(&id).await["state"], json!("failed"));
    assert_eq!(
        h.post(&format!("/api/jobs/{id}/retry"), Some(ADMIN))
            .await
            .status,
        StatusCode::OK
    );
    h.wait_job(&id).await;
    let r = h
        .send(
            req("DELETE", &format!("/api/jobs/{id}"), Some(ADMIN))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let chat = h._app.store.audit_events_for("chat").await.expect("read");
    // Sorted: two records of one millisecond have no order.
    let mut events: Vec<_> = chat
        .iter()
        .map(|(event, actor, _)| (event.as_str(), actor.as_str()))
        .collect();
    events.sort_unstable();
    assert_eq!(events, [("queue.paused", "ops"), ("queue.resumed", "ops")]);
    let job = h._app.store.audit_events_for(&id).await.expect("read");
    let mut events: Vec<_> = job
        .iter()
        .map(|(event, actor, _)| (event.as_str(), actor.as_str()))
        .collect();
    events.sort_unstable();
    assert_eq!(events, [("job.removed", "ops"), ("job.retried", "ops")]);
    assert!(
        job.iter().all(|(_, _, request_id)| request_id.is_some()),
        "each carries its request id"
    );
}
