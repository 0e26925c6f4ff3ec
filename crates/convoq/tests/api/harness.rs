//! The router harness every API test drives: an app on its own SQLite file with its workers,
//! requests, and the checks every response passes.

#![allow(dead_code)] // Each test file uses its own part of it.

pub(crate) use std::net::SocketAddr;
pub(crate) use std::time::{Duration, Instant};

pub(crate) use axum::body::Body;
pub(crate) use axum::extract::ConnectInfo;
pub(crate) use axum::http::{header, HeaderMap, Request, StatusCode};
pub(crate) use axum::{Extension, Router};
pub(crate) use convoq::app::App;
pub(crate) use convoq::config::{Config, Settings};
pub(crate) use http_body_util::BodyExt;
pub(crate) use serde_json::{json, Value};
pub(crate) use tempfile::TempDir;
pub(crate) use tower::ServiceExt;

pub(crate) const SERVICE: &str = "0123456789abcdef";
pub(crate) const SERVICE2: &str = "aaaabbbbccccdddd";
pub(crate) const ADMIN: &str = "fedcba9876543210";
pub(crate) const METRICS_KEY: &str = "metrics-key-0123456789";
pub(crate) const KEYS: &str =
    "bot:service:0123456789abcdef,bot2:service:aaaabbbbccccdddd,ops:admin:fedcba9876543210";

/// An app on its own database, with its workers running.
pub(crate) struct Harness {
    pub(crate) router: Router,
    pub(crate) dir: TempDir,
    pub(crate) _app: App,
}

pub(crate) struct Resp {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) text: String,
}

impl Resp {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an error response: status, `error.code`, and `error.field` (None: absent).
    #[track_caller]
    pub(crate) fn assert_error(&self, status: u16, code: &str, field: Option<&str>) -> Value {
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

pub(crate) async fn harness() -> Harness {
    harness_with(Some(KEYS), |_| {}).await
}

pub(crate) async fn harness_with(
    api_keys: Option<&str>,
    edit: impl FnOnce(&mut Settings),
) -> Harness {
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

pub(crate) fn req(method: &str, uri: &str, key: Option<&str>) -> axum::http::request::Builder {
    let b = Request::builder().method(method).uri(uri);
    match key {
        Some(k) => b.header(header::AUTHORIZATION, format!("Bearer {k}")),
        None => b,
    }
}

pub(crate) fn json_req(method: &str, uri: &str, key: Option<&str>, body: &Value) -> Request<Body> {
    req(method, uri, key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub(crate) fn get_req(uri: &str, key: Option<&str>) -> Request<Body> {
    req("GET", uri, key).body(Body::empty()).unwrap()
}

impl Harness {
    /// Sends a request through the router and checks what holds for every response.
    pub(crate) async fn send(&self, request: Request<Body>) -> Resp {
        send_to(&self.router, request, Some(&self.dir)).await
    }

    pub(crate) async fn get(&self, uri: &str, key: Option<&str>) -> Resp {
        self.send(get_req(uri, key)).await
    }

    pub(crate) async fn post(&self, uri: &str, key: Option<&str>) -> Resp {
        self.send(req("POST", uri, key).body(Body::empty()).unwrap())
            .await
    }

    /// `POST /api/chat/conversations` with a JSON body and extra headers.
    pub(crate) async fn create(&self, key: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        let mut b = req("POST", "/api/chat/conversations", Some(key))
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Body::from(body.to_string())).unwrap())
            .await
    }

    /// `POST /api/chat/conversations` with a raw body and content type.
    pub(crate) async fn create_raw(&self, content_type: Option<&str>, body: Vec<u8>) -> Resp {
        let mut b = req("POST", "/api/chat/conversations", Some(SERVICE));
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        self.send(b.body(Body::from(body)).unwrap()).await
    }

    pub(crate) async fn put_user(&self, id: &str, discord_id: &str) -> Resp {
        self.send(json_req(
            "PUT",
            &format!("/api/users/{id}"),
            Some(SERVICE),
            &json!({ "discordId": discord_id, "username": format!("name-{id}") }),
        ))
        .await
    }

    /// Creates a user and a conversation with `Prefer: wait`, returning the 201 body.
    pub(crate) async fn create_waited(&self, user: &str, title: Option<&str>) -> Value {
        let mut body = json!({ "userId": user });
        if let Some(t) = title {
            body["title"] = json!(t);
        }
        let r = self.create(SERVICE, &body, &[("prefer", "wait=5")]).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()
    }

    /// Waits (bounded) for a job to finish; returns the job.
    pub(crate) async fn wait_job(&self, id: &str) -> Value {
        let r = self
            .get(&format!("/api/jobs/{id}?wait=10"), Some(ADMIN))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.json()["job"].clone()
    }

    /// Polls `GET /api/queues/{name}` until `pred` holds on it (bounded by 10 s).
    pub(crate) async fn queue_until(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
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

pub(crate) async fn send_to(
    router: &Router,
    request: Request<Body>,
    dir: Option<&TempDir>,
) -> Resp {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
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
    crate::contract::check(&method, &path, &r);
    r
}

pub(crate) fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}
