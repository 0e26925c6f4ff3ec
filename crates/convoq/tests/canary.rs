//! Secrets never leave the process: with API keys, a metrics key and the most verbose logs
//! (`CONVOQ_LOG=trace`), the real binary is driven through every kind of request (a user, a
//! conversation, a failing job, a job's state and event stream, a wrong key, the metrics, a
//! console login and logout, the queues), and none of the secrets, nor a wrong key a client
//! presented, nor the console's session token, appears in its logs, its response bodies or
//! headers (but the cookie it sets), the jobs' failure reasons or the event streams.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{request, Server};

const SERVICE: &str = "canary-service-secret-7f3a9c";
const ADMIN: &str = "canary-admin-secret-b81e44";
const METRICS: &str = "canary-metrics-secret-2d9f10";
const WRONG: &str = "canary-wrong-key-5c7e21";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_bodies_or_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = format!("bot:service:{SERVICE},ops:admin:{ADMIN}");
    let mut server = Server::start(
        dir.path(),
        &[
            ("CONVOQ_API_KEYS", keys.as_str()),
            ("CONVOQ_METRICS_KEY", METRICS),
            ("CONVOQ_LOG", "trace"),
        ],
    )
    .await;
    let port = server.port;
    let service = format!("Bearer {SERVICE}");
    let admin = format!("Bearer {ADMIN}");
    let mut seen = Vec::new();
    let call = |method: &'static str,
                path: String,
                auth: String,
                body: Option<serde_json::Value>| {
        async move {
            let r = request(
                port,
                method,
                &path,
                &[("authorization", auth.as_str())],
                body.as_ref(),
            )
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let headers: Vec<String> = r
                .headers
                .iter()
                .filter(|(k, _)| k != "set-cookie")
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            (
                r.status,
                r.text(),
                headers.join("\n"),
                r.header("set-cookie").map(str::to_owned),
            )
        }
    };
    let mut record = |what: (u16, String, String, Option<String>)| {
        seen.push(format!("{}\n{}\n{}", what.0, what.1, what.2));
        what
    };

    record(
        call(
            "PUT",
            "/api/users/u1".into(),
            service.clone(),
            Some(json!({"discordId": "1", "username": "alice"})),
        )
        .await,
    );
    let (_, body, _, _) = record(
        call(
            "POST",
            "/api/chat/conversations".into(),
            service.clone(),
            Some(json!({"userId": "u1", "title": "canary"})),
        )
        .await,
    );
    let ok_job = serde_json::from_str::<serde_json::Value>(&body).expect("json")["jobId"]
        .as_str()
        .expect("jobId")
        .to_owned();
    let (_, body, _, _) = record(
        call(
            "POST",
            "/api/chat/conversations".into(),
            service.clone(),
            Some(json!({"userId": "ghost"})),
        )
        .await,
    );
    let failed_job = serde_json::from_str::<serde_json::Value>(&body).expect("json")["jobId"]
        .as_str()
        .expect("jobId")
        .to_owned();
    for job in [&ok_job, &failed_job] {
        record(
            call(
                "GET",
                format!("/api/jobs/{job}?wait=10"),
                service.clone(),
                None,
            )
            .await,
        );
        record(call("GET", format!("/api/jobs/{job}"), admin.clone(), None).await);
        record(
            call(
                "GET",
                format!("/api/jobs/{job}/events"),
                service.clone(),
                None,
            )
            .await,
        );
        record(
            call(
                "GET",
                format!("/api/jobs/{job}/events"),
                admin.clone(),
                None,
            )
            .await,
        );
    }
    let (status, ..) =
        record(call("GET", "/api/queues".into(), format!("Bearer {WRONG}"), None).await);
    assert_eq!(status, 401);
    record(call("GET", "/metrics".into(), format!("Bearer {METRICS}"), None).await);
    record(call("GET", "/api/queues".into(), admin.clone(), None).await);
    let (status, _, _, cookie) = record(
        call(
            "POST",
            "/ui/login".into(),
            String::new(),
            Some(json!({"key": ADMIN})),
        )
        .await,
    );
    assert_eq!(status, 200);
    let cookie = cookie.expect("a session cookie");
    let token = cookie
        .split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .expect("the session token");
    assert!(token.len() >= 32, "{cookie}");
    let r = request(
        port,
        "GET",
        "/ui/session",
        &[("cookie", &format!("convoq_session={token}"))],
        None,
    )
    .await
    .expect("session");
    seen.push(r.text());
    let csrf = r.json()["csrf"].as_str().expect("csrf").to_owned();
    let r = request(
        port,
        "POST",
        "/ui/logout",
        &[
            ("cookie", &format!("convoq_session={token}")),
            ("x-csrf-token", &csrf),
        ],
        None,
    )
    .await
    .expect("logout");
    seen.push(r.text());

    server.stop(Duration::from_secs(20)).await;
    let logs = server.logs();
    assert!(
        logs.contains("\"level\":\"TRACE\"") || logs.contains("\"level\":\"DEBUG\""),
        "the most verbose logs were written: {}",
        &logs[..logs.len().min(2000)]
    );
    for secret in [SERVICE, ADMIN, METRICS, WRONG, token.as_str()] {
        assert!(!logs.contains(secret), "a secret in the logs: {secret}");
        for answer in &seen {
            assert!(
                !answer.contains(secret),
                "a secret in an answer: {secret}\n{answer}"
            );
        }
    }
    // The database file holds no secret either (sessions keep digests only; keys are not stored).
    let db = std::fs::read(dir.path().join("convoq.db")).unwrap_or_default();
    for secret in [SERVICE, ADMIN, METRICS, WRONG, token.as_str()] {
        assert!(
            !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a secret in the database file: {secret}"
        );
    }
}
