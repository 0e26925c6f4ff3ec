//! The HTTP API of SPEC §3: the router, its shared state, and the middleware every request
//! passes (request id, authentication, metrics).
//!
//! Layout: `conversations.rs` (POST and reads), `jobs.rs` (job state, long-poll, SSE, operator
//! actions on jobs), `users.rs`, `queues.rs` (stats and operator actions on queues),
//! `health.rs` (`/healthz`, `/readyz`, `/metrics`), `openapi.rs` (the OpenAPI document and its
//! page, generated from the handlers' `#[utoipa::path]` and [`routes`]), `auth.rs`,
//! `console.rs` (the operator console at `/ui`, its sessions and CSRF rules), `stats.rs`
//! (backlog and throughput for 429 and `estimatedWaitTime`), `limits.rs` (rate limits per API
//! key and per userId, event streams per key), `quota.rs` (backlog quotas per API key and per
//! userId), `serve.rs` (the server loop: connection cap,
//! header read timeout, graceful shutdown), `error.rs`, `extract.rs`.
//!
//! *Architecture Invariant:* handlers never run SQL; they call [`convoq_queue::Queues`] and
//! [`crate::store::Store`].

mod auth;
mod console;
mod conversations;
pub mod error;
pub mod extract;
mod health;
mod jobs;
pub mod limits;
pub mod openapi;
mod queues;
pub mod quota;
pub mod serve;
mod stats;
mod users;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use convoq_queue::{Queues, WorkerPool};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::Caller;
use error::ApiError;
pub use jobs::{job_json, job_json_admin, job_json_operator};
pub use queues::queue_state_json;
pub use stats::QueueStats;

use crate::config::Config;
use crate::store::Store;
use crate::telemetry::Metrics;

/// The request id header.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the request being served, in request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The queues.
    pub queues: Queues,
    /// The store.
    pub store: Store,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Configuration.
    pub config: Arc<Config>,
    /// Backlog and throughput per queue.
    pub stats: Arc<QueueStats>,
    /// This process's workers, if it runs any (readiness looks at them).
    pub workers: Arc<Mutex<Option<WorkerPool>>>,
    /// The operator console's sessions.
    pub sessions: Arc<console::Sessions>,
    /// Rate limits per API key and per userId.
    pub limits: Arc<limits::Limits>,
}

/// Every route, each registered with its handler's OpenAPI description: the router and the
/// document ([`openapi::document`]) come from this one list.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(conversations::create))
        .routes(routes!(conversations::get_one))
        .routes(routes!(users::put))
        .routes(routes!(conversations::list_for_user))
        .routes(routes!(jobs::get_one, jobs::remove))
        .routes(routes!(jobs::events))
        .routes(routes!(jobs::retry))
        .routes(routes!(jobs::promote))
        .routes(routes!(queues::list))
        .routes(routes!(queues::get_one))
        .routes(routes!(queues::jobs))
        .routes(routes!(queues::bulk))
        .routes(routes!(queues::pause))
        .routes(routes!(queues::resume))
        .routes(routes!(health::metrics))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(openapi::json))
        .routes(routes!(openapi::page))
        .routes(routes!(openapi::script))
        .routes(routes!(openapi::style))
        .routes(routes!(console::root))
        .routes(routes!(console::page))
        .routes(routes!(console::script))
        .routes(routes!(console::style))
        .routes(routes!(console::session))
        .routes(routes!(console::login))
        .routes(routes!(console::logout))
}

/// The router with every route and middleware.
pub fn router(state: AppState) -> Router {
    let (api, _) = routes().split_for_parts();
    with_middleware(api, state)
}

/// The router of a `convoq worker` process: `/healthz`, `/readyz` and `/metrics` only, behind
/// the same middleware (metrics key, request ids, HTTP metrics), so that each worker process
/// can be probed and scraped on its own.
pub fn ops_router(state: AppState) -> Router {
    let (ops, _) = OpenApiRouter::new()
        .routes(routes!(health::metrics))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .split_for_parts();
    with_middleware(ops, state)
}

/// The fallbacks and the middleware every request passes: `observe` (request id, logs,
/// metrics) outermost, then `authenticate`.
fn with_middleware(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A client's request id if it is sane (1 to 128 characters of `A-Z a-z 0-9 . _ -`), else a
/// new UUIDv7.
fn request_id_of(req: &Request) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// Outermost middleware: assigns the request id, logs the request, times it into the HTTP
/// metrics under its route template, and echoes the id in `X-Request-Id`.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request_id_of(&req);
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let mut resp = {
        let _enter = span.enter();
        tracing::debug!("request received");
        drop(_enter);
        tracing::Instrument::instrument(next.run(req), span.clone()).await
    };
    if resp.status() == axum::http::StatusCode::BAD_REQUEST
        && resp
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
    {
        resp = json_rejection(resp).await;
    }
    let status = resp.status();
    let elapsed = started.elapsed();
    state
        .metrics
        .http_requests
        .with_label_values(&[&method, &route, status.as_str()])
        .inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[&method, &route])
        .observe(elapsed.as_secs_f64());
    if status.is_server_error() {
        tracing::warn!(parent: &span, status = status.as_u16(), duration_ms = elapsed.as_secs_f64() * 1000.0, "request failed");
    } else if route != "/metrics" && route != "/healthz" && route != "/readyz" {
        tracing::info!(parent: &span, status = status.as_u16(), duration_ms = elapsed.as_secs_f64() * 1000.0, "request served");
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    resp
}

/// axum's own extractor rejections (a path segment that is not UTF-8: "Invalid URL: Invalid
/// UTF-8 in `id`") are plain text; answers them in the one error shape, naming the field.
async fn json_rejection(resp: Response) -> Response {
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let field = text.split('`').nth(1).map(str::to_owned);
    ApiError::BadRequest {
        code: if field.is_some() {
            "invalid_field"
        } else {
            "invalid_request"
        },
        message: text,
        field,
    }
    .into_response()
}

/// Records an operator's action in the audit log (see [`Store::record_action`]).
pub(crate) async fn record_action(
    state: &AppState,
    caller: &Caller,
    request_id: &RequestId,
    event: &str,
    subject: &str,
) {
    state
        .store
        .record_action(&caller.name, &request_id.0, event, subject)
        .await;
}

/// Turns a handler result into a response (handlers return `Result<Response, ApiError>`).
pub(crate) type ApiResult = Result<Response, ApiError>;

pub(crate) fn ok_json(status: axum::http::StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}
