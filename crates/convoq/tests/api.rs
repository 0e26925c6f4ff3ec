//! Router tests without a socket (SPEC §3): every endpoint, every validation rule of
//! `POST /api/chat/conversations`, authentication and roles, protected mode, idempotency,
//! `Prefer: wait`, operator actions, and the metrics of SPEC §6.
//!
//! Each test opens its own SQLite file in its own temporary directory, starts the workers, and
//! drives `convoq::http::router` with `tower::ServiceExt::oneshot`. Every response passes
//! [`Harness::send`], which checks what holds for all of them: an `X-Request-Id`, never a 5xx,
//! and for errors the one error shape without internals.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::{Extension, Router};
use convoq::app::App;
use convoq::config::{Config, Settings};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tempfile::TempDir;
use tower::ServiceExt;

const SERVICE: &str = "0123456789abcdef";
const SERVICE2: &str = "aaaabbbbccccdddd";
const ADMIN: &str = "fedcba9876543210";
const METRICS_KEY: &str = "metrics-key-0123456789";
const KEYS: &str =
    "bot:service:0123456789abcdef,bot2:service:aaaabbbbccccdddd,ops:admin:fedcba9876543210";

/// An app on its own database, with its workers running.
struct Harness {
    router: Router,
    dir: TempDir,
    _app: App,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an error response: status, `error.code`, and `error.field` (None: absent).
    #[track_caller]
    fn assert_error(&self, status: u16, code: &str, field: Option<&str>) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        let v = self.json();
        assert_eq!(v["ok"], json!(false), "{v}");
        assert_eq!(v["error"]["code"], json!(code), "{v}");
        match field {
            Some(f) => assert_eq!(v["error"]["field"], json!(f), "{v}"),
            None => assert!(v["error"].get("field").is_none(), "{v}"),
        }
        v
    }
}

async fn harness() -> Harness {
    harness_with(Some(KEYS), |_| {}).await
}

async fn harness_with(api_keys: Option<&str>, edit: impl FnOnce(&mut Settings)) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings {
        database_url: Some(format!("sqlite://{}/t.db", dir.path().display())),
        api_keys: api_keys.map(str::to_owned),
        ..Default::default()
    };
    edit(&mut settings);
    let config = Config::load(&settings).expect("valid config");
    let app = App::open(config).await.expect("app opens");
    let pool = app.start_workers();
    let state = app.state(Some(pool));
    let router = convoq::http::router(state);
    Harness {
        router,
        dir,
        _app: app,
    }
}

fn req(method: &str, uri: &str, key: Option<&str>) -> axum::http::request::Builder {
    let b = Request::builder().method(method).uri(uri);
    match key {
        Some(k) => b.header(header::AUTHORIZATION, format!("Bearer {k}")),
        None => b,
    }
}

fn json_req(method: &str, uri: &str, key: Option<&str>, body: &Value) -> Request<Body> {
    req(method, uri, key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn get_req(uri: &str, key: Option<&str>) -> Request<Body> {
    req("GET", uri, key).body(Body::empty()).unwrap()
}

impl Harness {
    /// Sends a request through the router and checks what holds for every response.
    async fn send(&self, request: Request<Body>) -> Resp {
        send_to(&self.router, request, Some(&self.dir)).await
    }

    async fn get(&self, uri: &str, key: Option<&str>) -> Resp {
        self.send(get_req(uri, key)).await
    }

    async fn post(&self, uri: &str, key: Option<&str>) -> Resp {
        self.send(req("POST", uri, key).body(Body::empty()).unwrap())
            .await
    }

    /// `POST /api/chat/conversations` with a JSON body and extra headers.
    async fn create(&self, key: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        let mut b = req("POST", "/api/chat/conversations", Some(key))
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Body::from(body.to_string())).unwrap())
            .await
    }

    /// `POST /api/chat/conversations` with a raw body and content type.
    async fn create_raw(&self, content_type: Option<&str>, body: Vec<u8>) -> Resp {
        let mut b = req("POST", "/api/chat/conversations", Some(SERVICE));
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        self.send(b.body(Body::from(body)).unwrap()).await
    }

    async fn put_user(&self, id: &str, discord_id: &str) -> Resp {
        self.send(json_req(
            "PUT",
            &format!("/api/users/{id}"),
            Some(SERVICE),
            &json!({ "discordId": discord_id, "username": format!("name-{id}") }),
        ))
        .await
    }

    /// Creates a user and a conversation with `Prefer: wait`, returning the 201 body.
    async fn create_waited(&self, user: &str, title: Option<&str>) -> Value {
        let mut body = json!({ "userId": user });
        if let Some(t) = title {
            body["title"] = json!(t);
        }
        let r = self.create(SERVICE, &body, &[("prefer", "wait=5")]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()
    }

    /// Waits (bounded) for a job to finish; returns the job.
    async fn wait_job(&self, id: &str) -> Value {
        let r = self
            .get(&format!("/api/jobs/{id}?wait=10"), Some(ADMIN))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.json()["job"].clone()
    }

    /// Polls `GET /api/queues/{name}` until `pred` holds on it (bounded by 10 s).
    async fn queue_until(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.get(&format!("/api/queues/{name}"), Some(ADMIN)).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let q = r.json()["queue"].clone();
            if pred(&q) {
                return q;
            }
            assert!(Instant::now() < deadline, "queue never got there: {q}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn send_to(router: &Router, request: Request<Body>, dir: Option<&TempDir>) -> Resp {
    let resp = router.clone().oneshot(request).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the body ends in time")
        .expect("the body reads")
        .to_bytes();
    let text = String::from_utf8(bytes.to_vec()).expect("UTF-8 body");
    let r = Resp {
        status,
        headers,
        text,
    };
    assert!(
        r.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "every response carries X-Request-Id"
    );
    assert!(
        !status.is_server_error(),
        "no 5xx expected, got {status}: {}",
        r.text
    );
    if status.is_client_error() {
        let v = r.json();
        assert_eq!(v["ok"], json!(false), "{v}");
        let code = v["error"]["code"].as_str().expect("error.code");
        assert!(
            !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "snake_case code: {code}"
        );
        let message = v["error"]["message"].as_str().expect("error.message");
        let lower = message.to_lowercase();
        for leak in [
            "sql",
            "constraint",
            ".db",
            ".rs",
            "src/",
            "/tmp",
            "panicked",
        ] {
            assert!(!lower.contains(leak), "message leaks {leak:?}: {message}");
        }
        if let Some(d) = dir {
            assert!(
                !message.contains(&*d.path().to_string_lossy()),
                "message leaks the data path: {message}"
            );
        }
    }
    r
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

// ---------------------------------------------------------------------------------------------
// POST /api/chat/conversations: validation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_must_be_json() {
    let h = harness().await;
    let body = br#"{"userId":"u1"}"#.to_vec();
    h.create_raw(None, body.clone())
        .await
        .assert_error(415, "unsupported_media_type", None);
    h.create_raw(Some("text/plain"), body.clone())
        .await
        .assert_error(415, "unsupported_media_type", None);
    h.create_raw(Some("application/x-www-form-urlencoded"), body.clone())
        .await
        .assert_error(415, "unsupported_media_type", None);
    // JSON with parameters, in any case, and the +json suffix are JSON.
    for ct in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.convoq+json",
    ] {
        let r = h.create_raw(Some(ct), body.clone()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{ct}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_16_kib_is_413() {
    let h = harness().await;
    const LIMIT: usize = 16 * 1024;
    let padded = |len: usize| {
        let mut b = br#"{"userId":"u1"}"#.to_vec();
        b.resize(len, b' ');
        b
    };
    // Exactly the limit is accepted.
    let r = h.create_raw(Some("application/json"), padded(LIMIT)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    // One byte over, without a Content-Length (streamed).
    h.create_raw(Some("application/json"), padded(LIMIT + 1))
        .await
        .assert_error(413, "payload_too_large", None);
    // A large body with a declared Content-Length.
    let big = padded(64 * 1024);
    let r = h
        .send(
            req("POST", "/api/chat/conversations", Some(SERVICE))
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, big.len())
                .body(Body::from(big))
                .unwrap(),
        )
        .await;
    r.assert_error(413, "payload_too_large", None);
    // A large title inside a large body is refused for size, not for the title.
    let body = json!({ "userId": "u1", "title": "x".repeat(20_000) });
    h.create(SERVICE, &body, &[])
        .await
        .assert_error(413, "payload_too_large", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_non_objects_are_400() {
    let h = harness().await;
    for body in [
        &b"{"[..],
        b"",
        b"{\"userId\": }",
        b"not json",
        b"{\"userId\":\"u1\"} trailing",
    ] {
        h.create_raw(Some("application/json"), body.to_vec())
            .await
            .assert_error(400, "malformed_json", None);
    }
    for body in [&b"[]"[..], b"\"u1\"", b"null", b"42"] {
        h.create_raw(Some("application/json"), body.to_vec())
            .await
            .assert_error(400, "invalid_body", None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_400_naming_the_field() {
    let h = harness().await;
    for (body, field) in [
        (json!({ "userId": "u1", "extra": 1 }), "extra"),
        (json!({ "userId": "u1", "user_id": "u1" }), "user_id"),
        (
            json!({ "userId": "u1", "personality_mode": "helpful" }),
            "personality_mode",
        ),
        (json!({ "userID": "u1" }), "userID"),
    ] {
        let v = h
            .create(SERVICE, &body, &[])
            .await
            .assert_error(400, "unknown_field", Some(field));
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_rules() {
    let h = harness().await;
    for body in [
        json!({}),
        json!({ "title": "t" }),
        json!({ "userId": null }),
        json!({ "userId": 42 }),
        json!({ "userId": true }),
        json!({ "userId": ["u1"] }),
        json!({ "userId": { "id": "u1" } }),
        json!({ "userId": "" }),
        json!({ "userId": "x".repeat(65) }),
        json!({ "userId": "é".repeat(65) }),
        json!({ "userId": "a\u{7}b" }),
        json!({ "userId": "a\nb" }),
        json!({ "userId": "a\u{0}b" }),
        json!({ "userId": "a\u{1b}[31mb" }),
        json!({ "userId": "a\u{85}b" }),
    ] {
        let r = h.create(SERVICE, &body, &[]).await;
        let v = r.assert_error(400, "invalid_field", Some("userId"));
        assert!(
            v["error"]["message"].as_str().unwrap().contains("userId"),
            "{body}: {v}"
        );
    }
    // 64 characters (multi-byte ones too) are accepted.
    for id in ["x".repeat(64), "é".repeat(64)] {
        let r = h.create(SERVICE, &json!({ "userId": id }), &[]).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn title_rules() {
    let h = harness().await;
    for title in [
        json!("x".repeat(201)),
        json!("é".repeat(201)),
        json!(format!("  {}  ", "x".repeat(201))),
        json!("a\u{0}b"),
        json!("a\u{7}b"),
        json!("line\nbreak"),
        json!("tab\there"),
        json!("a\u{7f}b"),
        json!(5),
        json!(["t"]),
        json!(false),
    ] {
        let r = h
            .create(SERVICE, &json!({ "userId": "u1", "title": title }), &[])
            .await;
        r.assert_error(400, "invalid_field", Some("title"));
    }
    // 200 characters, surrounding whitespace (trimmed), null and blank are accepted.
    for title in [
        json!("x".repeat(200)),
        json!("é".repeat(200)),
        json!(format!("  {}  ", "x".repeat(200))),
        json!(null),
        json!(""),
        json!("   "),
    ] {
        let r = h
            .create(SERVICE, &json!({ "userId": "u1", "title": title }), &[])
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{title}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personality_mode_rules() {
    let h = harness().await;
    for mode in [
        json!("grumpy"),
        json!(""),
        json!("Helpful"),
        json!(1),
        json!(["helpful"]),
    ] {
        let r = h
            .create(
                SERVICE,
                &json!({ "userId": "u1", "personalityMode": mode }),
                &[],
            )
            .await;
        let v = r.assert_error(400, "invalid_field", Some("personalityMode"));
        if mode.is_string() {
            assert!(
                v["error"]["message"].as_str().unwrap().contains("helpful"),
                "the message lists the modes: {v}"
            );
        }
    }
    for mode in ["helpful", "concise", "creative", "professional", "playful"] {
        let r = h
            .create(
                SERVICE,
                &json!({ "userId": "u1", "personalityMode": mode }),
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{mode}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_modes_replace_the_default_set() {
    let h = harness_with(Some(KEYS), |s| {
        s.personality_modes = Some("helpful,pirate".into());
    })
    .await;
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1", "personalityMode": "pirate" }),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    h.create(
        SERVICE,
        &json!({ "userId": "u1", "personalityMode": "concise" }),
        &[],
    )
    .await
    .assert_error(400, "invalid_field", Some("personalityMode"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_values_are_stored_normalised() {
    let h = harness().await;
    let long_user = "u".repeat(64);
    assert_eq!(
        h.put_user(&long_user, "100").await.status,
        StatusCode::CREATED
    );
    // Default mode, trimmed title.
    let v = h.create_waited(&long_user, Some("  hello  ")).await;
    let c = &v["conversation"];
    assert_eq!(c["userId"], json!(long_user));
    assert_eq!(c["title"], json!("hello"));
    assert_eq!(c["personalityMode"], json!("helpful"));
    assert_eq!(c["id"], v["conversationId"]);
    // A blank title is no title.
    let v = h.create_waited(&long_user, Some("   ")).await;
    assert_eq!(v["conversation"]["title"], Value::Null);
    // 200 characters fit.
    let t = "é".repeat(200);
    let v = h.create_waited(&long_user, Some(&t)).await;
    assert_eq!(v["conversation"]["title"], json!(t));
    // An explicit mode.
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": long_user, "personalityMode": "creative", "title": null }),
            &[("prefer", "wait=5")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        r.json()["conversation"]["personalityMode"],
        json!("creative")
    );
    assert_eq!(r.json()["conversation"]["title"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_must_be_sane() {
    let h = harness().await;
    let body = json!({ "userId": "u1" });
    let long = "k".repeat(256);
    h.create(SERVICE, &body, &[("idempotency-key", &long)])
        .await
        .assert_error(400, "invalid_field", Some("Idempotency-Key"));
    h.create(SERVICE, &body, &[("idempotency-key", "")])
        .await
        .assert_error(400, "invalid_field", Some("Idempotency-Key"));
    h.create(SERVICE, &body, &[("idempotency-key", "two words")])
        .await
        .assert_error(400, "invalid_field", Some("Idempotency-Key"));
    let ok = "k".repeat(255);
    let r = h.create(SERVICE, &body, &[("idempotency-key", &ok)]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

// ---------------------------------------------------------------------------------------------
// POST /api/chat/conversations: success paths
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_shape_location_and_request_id() {
    let h = harness().await;
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1", "title": "t" }),
            &[("x-request-id", "req-abc.123_X")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let v = r.json();
    assert_eq!(v["ok"], json!(true));
    assert_eq!(v["status"], json!("queued"));
    let job_id = v["jobId"].as_str().expect("jobId");
    assert!(!job_id.is_empty());
    assert!(is_uuid(
        v["conversationId"].as_str().expect("conversationId")
    ));
    assert_eq!(v["requestId"], json!("req-abc.123_X"));
    assert!(v["estimatedWaitTime"].is_u64(), "{v}");
    assert_eq!(r.header("location"), Some(&*format!("/api/jobs/{job_id}")));
    assert_eq!(r.header("x-request-id"), Some("req-abc.123_X"));
    assert!(r.header("idempotent-replayed").is_none());
    // The Location resolves, and the job carries the request id.
    let j = h.get(r.header("location").unwrap(), Some(SERVICE)).await;
    assert_eq!(j.status, StatusCode::OK, "{}", j.text);
    assert_eq!(j.json()["job"]["requestId"], json!("req-abc.123_X"));
    assert_eq!(j.json()["job"]["queue"], json!("database"));
    assert_eq!(j.json()["job"]["name"], json!("create_conversation"));

    // Without a key, every POST is a new conversation.
    let a = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    let b = h
        .create(SERVICE, &json!({ "userId": "u1" }), &[])
        .await
        .json();
    assert_ne!(a["jobId"], b["jobId"]);
    assert_ne!(a["conversationId"], b["conversationId"]);
    assert_ne!(a["requestId"], b["requestId"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_only_when_sane() {
    let h = harness().await;
    let max = "r".repeat(128);
    for sane in ["abc", "0190b7f6-6a8e-7cc2-b3c6-0f7d6c1e1a2b", max.as_str()] {
        let r = h
            .send(
                req("GET", "/healthz", None)
                    .header("x-request-id", sane)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.header("x-request-id"), Some(sane));
    }
    let too_long = "r".repeat(129);
    for insane in [
        "has spaces",
        too_long.as_str(),
        "semi;colon",
        "quote\"d",
        "slash/ed",
    ] {
        let r = h
            .create(
                SERVICE,
                &json!({ "userId": "u1" }),
                &[("x-request-id", insane)],
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let echoed = r.header("x-request-id").unwrap();
        assert_ne!(echoed, insane);
        assert!(is_uuid(echoed), "a fresh id: {echoed}");
        assert_eq!(r.json()["requestId"], json!(echoed));
    }
    // Errors carry it too.
    let r = h
        .send(
            req("GET", "/api/queues", None)
                .header("x-request-id", "err-1")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("x-request-id"), Some("err-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_replays_refuses_reuse_and_is_scoped_per_caller() {
    let h = harness().await;
    let body = json!({ "userId": "u1", "title": "hello" });
    let key = [("idempotency-key", "key-1")];
    let first = h.create(SERVICE, &body, &key).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    let f = first.json();

    let again = h.create(SERVICE, &body, &key).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let a = again.json();
    assert_eq!(a["jobId"], f["jobId"]);
    assert_eq!(a["conversationId"], f["conversationId"]);
    assert_eq!(a["requestId"], f["requestId"], "the original request id");
    assert_eq!(again.header("location"), first.header("location"));

    // The same key with a different body.
    for other in [
        json!({ "userId": "u1", "title": "other" }),
        json!({ "userId": "u2", "title": "hello" }),
        json!({ "userId": "u1", "title": "hello", "personalityMode": "concise" }),
    ] {
        h.create(SERVICE, &other, &key)
            .await
            .assert_error(422, "idempotency_key_reused", None);
    }

    // Another caller with the same key gets its own job.
    let theirs = h.create(SERVICE2, &body, &key).await;
    assert_eq!(theirs.status, StatusCode::ACCEPTED, "{}", theirs.text);
    assert!(theirs.header("idempotent-replayed").is_none());
    let t = theirs.json();
    assert_ne!(t["jobId"], f["jobId"]);
    assert_ne!(t["conversationId"], f["conversationId"]);

    // Still replayed once the job has finished (it failed: u1 does not exist).
    let job = h.wait_job(f["jobId"].as_str().unwrap()).await;
    assert_eq!(job["state"], json!("failed"));
    let late = h.create(SERVICE, &body, &key).await;
    assert_eq!(late.status, StatusCode::ACCEPTED, "{}", late.text);
    assert_eq!(late.header("idempotent-replayed"), Some("true"));
    assert_eq!(late.json()["jobId"], f["jobId"]);
}

/// Concurrent PUTs of one new user: exactly one answers 201 (created), the others 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_a_new_user_create_it_once() {
    let h = std::sync::Arc::new(harness().await);
    let puts: Vec<_> = (0..8)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.put_user("u-race", "777").await.status })
        })
        .collect();
    let mut created = 0;
    for p in puts {
        let status = p.await.unwrap();
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "{status}"
        );
        created += usize::from(status == StatusCode::CREATED);
    }
    assert_eq!(created, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_answers_201_with_the_conversation() {
    let h = harness().await;
    let r = h.put_user("u1", "123").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1", "title": "hi" }),
            &[("prefer", "wait=5"), ("x-request-id", "wait-1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.header("preference-applied"), Some("wait"));
    let v = r.json();
    assert_eq!(v["ok"], json!(true));
    assert_eq!(v["status"], json!("completed"));
    assert_eq!(v["requestId"], json!("wait-1"));
    let c = &v["conversation"];
    assert_eq!(c["id"], v["conversationId"]);
    assert_eq!(c["userId"], json!("u1"));
    assert_eq!(c["title"], json!("hi"));
    assert_eq!(c["personalityMode"], json!("helpful"));
    assert!(c["createdAt"].is_string());
    // The conversation is readable, and the job completed with it as its result.
    let id = v["conversationId"].as_str().unwrap();
    let g = h
        .get(&format!("/api/chat/conversations/{id}"), Some(SERVICE))
        .await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert_eq!(g.json()["conversation"], *c);
    let job = h.wait_job(v["jobId"].as_str().unwrap()).await;
    assert_eq!(job["state"], json!("completed"));
    assert_eq!(job["result"]["conversationId"], v["conversationId"]);
    // A malformed preference is ignored (RFC 7240): 202.
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "u1" }),
            &[("prefer", "wait=soon")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_on_an_unknown_user_is_422_job_failed() {
    let h = harness().await;
    let r = h
        .create(
            SERVICE,
            &json!({ "userId": "ghost" }),
            &[("prefer", "wait=5")],
        )
        .await;
    let v = r.assert_error(422, "job_failed", None);
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("unknown user"), "{m}");
    assert!(m.contains("ghost"), "{m}");
}

// ---------------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Conversations and users
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_conversation() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    let v = h.create_waited("u1", Some("t")).await;
    let id = v["conversationId"].as_str().unwrap();
    let r = h
        .get(&format!("/api/chat/conversations/{id}"), Some(SERVICE))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let c = r.json();
    assert_eq!(c["ok"], json!(true));
    assert_eq!(c["conversation"]["id"], json!(id));
    for k in [
        "userId",
        "title",
        "personalityMode",
        "createdAt",
        "updatedAt",
    ] {
        assert!(c["conversation"].get(k).is_some(), "{k}: {c}");
    }
    let missing = uuid::Uuid::now_v7();
    h.get(&format!("/api/chat/conversations/{missing}"), Some(SERVICE))
        .await
        .assert_error(404, "not_found", None);
    for bad in ["not-a-uuid", "1", "'%20OR%201=1"] {
        h.get(&format!("/api/chat/conversations/{bad}"), Some(SERVICE))
            .await
            .assert_error(400, "invalid_field", Some("id"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_conversations_are_newest_first_and_paginated() {
    let h = harness().await;
    h.put_user("u1", "1").await;
    h.put_user("u2", "2").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let v = h.create_waited("u1", Some(&format!("c{i}"))).await;
        ids.push(v["conversationId"].as_str().unwrap().to_owned());
    }
    h.create_waited("u2", None).await;
    let list = |v: &Value| -> Vec<String> {
        v["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let all = h.get("/api/users/u1/conversations", Some(SERVICE)).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.text);
    let all = all.json();
    assert_eq!(list(&all), [ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    assert_eq!(all["nextCursor"], Value::Null);
    assert_eq!(all["conversations"][0]["title"], json!("c2"));

    let p1 = h
        .get("/api/users/u1/conversations?limit=2", Some(SERVICE))
        .await
        .json();
    assert_eq!(list(&p1), [ids[2].clone(), ids[1].clone()]);
    let cursor = p1["nextCursor"].as_str().expect("a next cursor").to_owned();
    let p2 = h
        .get(
            &format!("/api/users/u1/conversations?limit=2&cursor={cursor}"),
            Some(SERVICE),
        )
        .await
        .json();
    assert_eq!(list(&p2), [ids[0].clone()]);
    assert_eq!(p2["nextCursor"], Value::Null);

    let none = h
        .get("/api/users/nobody/conversations", Some(SERVICE))
        .await;
    assert_eq!(none.status, StatusCode::OK);
    assert_eq!(none.json()["conversations"], json!([]));

    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("cursor=nope", "cursor"),
    ] {
        h.get(&format!("/api/users/u1/conversations?{q}"), Some(SERVICE))
            .await
            .assert_error(400, "invalid_field", Some(field));
    }
    let r = h
        .get("/api/users/u1/conversations?limit=100", Some(SERVICE))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let long = "u".repeat(65);
    h.get(&format!("/api/users/{long}/conversations"), Some(SERVICE))
        .await
        .assert_error(400, "invalid_field", Some("userId"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_user_creates_updates_and_conflicts() {
    let h = harness().await;
    let put =
        |id: &str, body: Value| json_req("PUT", &format!("/api/users/{id}"), Some(SERVICE), &body);
    let r = h
        .send(put(
            "u1",
            json!({ "discordId": "111", "username": "alice", "globalName": "Alice" }),
        ))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let u = r.json();
    assert_eq!(u["ok"], json!(true));
    assert_eq!(u["user"]["id"], json!("u1"));
    assert_eq!(u["user"]["discordId"], json!("111"));
    assert_eq!(u["user"]["username"], json!("alice"));
    assert_eq!(u["user"]["globalName"], json!("Alice"));

    let r = h
        .send(put(
            "u1",
            json!({ "discordId": "111", "username": "  alice2 " }),
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["user"]["username"], json!("alice2"));
    assert_eq!(r.json()["user"]["globalName"], Value::Null);
    assert_eq!(r.json()["user"]["createdAt"], u["user"]["createdAt"]);

    // Another user with the same Discord id.
    h.send(put("u2", json!({ "discordId": "111", "username": "bob" })))
        .await
        .assert_error(409, "conflict", None);
    let r = h
        .send(put("u2", json!({ "discordId": "222", "username": "bob" })))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    for (body, field) in [
        (json!({ "discordId": "abc", "username": "x" }), "discordId"),
        (json!({ "discordId": "", "username": "x" }), "discordId"),
        (
            json!({ "discordId": "1".repeat(33), "username": "x" }),
            "discordId",
        ),
        (json!({ "discordId": 111, "username": "x" }), "discordId"),
        (json!({ "username": "x" }), "discordId"),
        (json!({ "discordId": "1" }), "username"),
        (json!({ "discordId": "1", "username": "  " }), "username"),
        (
            json!({ "discordId": "1", "username": "a\u{0}b" }),
            "username",
        ),
        (
            json!({ "discordId": "1", "username": "x".repeat(101) }),
            "username",
        ),
        (
            json!({ "discordId": "1", "username": "x", "globalName": 5 }),
            "globalName",
        ),
        (
            json!({ "discordId": "1", "username": "x", "globalName": "a\nb" }),
            "globalName",
        ),
    ] {
        h.send(put("u3", body))
            .await
            .assert_error(400, "invalid_field", Some(field));
    }
    h.send(put(
        "u3",
        json!({ "discordId": "1", "username": "x", "admin": true }),
    ))
    .await
    .assert_error(400, "unknown_field", Some("admin"));
    let long = "u".repeat(65);
    h.send(put(&long, json!({ "discordId": "1", "username": "x" })))
        .await
        .assert_error(400, "invalid_field", Some("id"));
    h.send(
        req("PUT", "/api/users/u3", Some(SERVICE))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(r#"{"discordId":"1","username":"x"}"#))
            .unwrap(),
    )
    .await
    .assert_error(415, "unsupported_media_type", None);
    h.send(
        req("PUT", "/api/users/u3", Some(SERVICE))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{"))
            .unwrap(),
    )
    .await
    .assert_error(400, "malformed_json", None);
}

// ---------------------------------------------------------------------------------------------
// Queues
// ---------------------------------------------------------------------------------------------

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
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("offset=-1", "offset"),
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

// ---------------------------------------------------------------------------------------------
// Authentication, roles, protected mode
// ---------------------------------------------------------------------------------------------

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
    // Health stays open.
    for uri in ["/healthz", "/readyz"] {
        let r = send_to(&remote, get_req(uri, None), None).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.text);
    }
}

// ---------------------------------------------------------------------------------------------
// Health, metrics, routing
// ---------------------------------------------------------------------------------------------

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
    for uri in ["/", "/api", "/api/nope", "/api/chat/conversations/x/y"] {
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
