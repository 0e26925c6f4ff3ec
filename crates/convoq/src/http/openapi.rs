//! The OpenAPI 3.1 document, served at `GET /api/openapi.json`, and its human page at
//! `GET /api/docs` (embedded, nothing fetched).
//!
//! The document is generated, not written: every route is registered through
//! `utoipa_axum`'s `routes!` from its handler's `#[utoipa::path]` (method, path, parameters,
//! headers, responses), so the router and the document are one list (the `router` in
//! `mod.rs` has no other way in, and a test fails on any route added by hand). Bodies are Rust types
//! with `ToSchema`: the handlers' own ([`super::jobs::JobView`], [`super::error::ErrorBody`],
//! the store's `User` and `Conversation`) and, for bodies the handlers assemble field by
//! field, the shapes below. `tests/api` validates every response of every API test against
//! the document (JSON Schema, by status), so a shape that drifts fails the suite.
//!
//! [`Finish`] adds what every operation shares: `X-Request-Id` on every response, 401/403 on
//! those that need a key, 500 on all.

// The shapes below describe bodies that handlers build with `json!`; they are never
// constructed, only derived into schemas.
#![allow(dead_code)]

use serde_json::Value;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::error::ErrorBody;
use super::jobs::JobView;
use crate::store::{Conversation, User};

/// The document's fixed parts; the paths come from the router, then [`Finish`] adds what
/// every operation shares.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "convoq",
        description = "A conversation service for chat products. `POST /api/chat/conversations` \
            durably enqueues a `create_conversation` job and answers 202 with its id; follow the \
            job (poll, long-poll, server-sent events) or ask to wait (`Prefer: wait=N`).\n\n\
            **Authentication.** With API keys configured, send `Authorization: Bearer <key>`; a \
            key's role is `service` (conversations, users, its own jobs) or `admin` (everything, \
            and the operator actions), given below as the scheme's roles. Without keys \
            (protected mode) only loopback clients are served, as admins. The operator console \
            logs in with an admin key and then uses a session cookie; its state changes carry \
            `X-CSRF-Token`. Any state change a browser marks cross-site is refused.\n\n\
            **Errors** have one shape (`ErrorBody`) with a stable `code`. Every response carries \
            `X-Request-Id` (the client's own when sane, else a new UUIDv7).",
        license(name = "MIT")
    ),
    tags(
        (name = "conversations", description = "Create and read conversations"),
        (name = "users", description = "The users conversations belong to"),
        (name = "jobs", description = "Follow a job; operator actions on one job"),
        (name = "queues", description = "Queue statistics and operator actions (admin)"),
        (name = "operations", description = "Probes, metrics and this document"),
        (name = "console", description = "The operator console's page and session"),
    ),
    components(schemas(ErrorBody, JobView, User, Conversation, JobEvent)),
)]
pub struct ApiDoc;

/// The security schemes and what every operation shares.
pub struct Finish;

/// Security scheme names, as operations name them.
pub const API_KEY: &str = "apiKey";
/// The console's session cookie.
pub const SESSION: &str = "consoleSession";
/// The `/metrics` bearer secret.
pub const METRICS_KEY: &str = "metricsKey";

impl Modify for Finish {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from CONVOQ_API_KEYS (name:role:secret), as a bearer \
                         token. Roles: service, admin.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            SESSION,
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                super::console::COOKIE,
                "The console's session (POST /ui/login with an admin key); state changes \
                 with it also need the session's X-CSRF-Token header.",
            ))),
        );
        components.add_security_scheme(
            METRICS_KEY,
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "CONVOQ_METRICS_KEY, when configured, as a bearer token.",
                    ))
                    .build(),
            ),
        );
        let error = |description: &str| -> RefOr<Response> {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorBody",
                        ))))
                        .build(),
                )
                .build()
                .into()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            // What reads or writes the queue or the store may find it unavailable.
            let stored = (path.starts_with("/api/") && !is_open(path)) || path == "/ui/login";
            let has_params = path.contains('{');
            for op in operations(item) {
                let secured = op
                    .security
                    .as_ref()
                    .is_some_and(|s| !s.is_empty() && !allows_anonymous(s));
                let responses = &mut op.responses.responses;
                if secured {
                    responses.entry("429".into()).or_insert_with(|| {
                        let mut r = error(
                            "`rate_limited`: this API key is over its rate limit \
                             (`--key-rate-limit`); retry after `Retry-After` seconds",
                        );
                        if let RefOr::T(r) = &mut r {
                            r.headers.insert("Retry-After".into(), retry_after());
                        }
                        r
                    });
                    responses.entry("401".into()).or_insert_with(|| {
                        error("`unauthorized`: no key, or a key that is not configured")
                    });
                    responses.entry("403".into()).or_insert_with(|| {
                        error(
                            "`forbidden`: the key's role may not do this, a non-loopback \
                             client in protected mode, or a cross-site state change",
                        )
                    });
                }
                if op.request_body.is_some() {
                    op.responses
                        .responses
                        .entry("408".into())
                        .or_insert_with(|| {
                            error(
                                "`request_timeout`: the body did not arrive within the header \
                             read timeout (`--header-read-timeout-ms`)",
                            )
                        });
                }
                let responses = &mut op.responses.responses;
                if has_params {
                    responses.entry("400".into()).or_insert_with(|| {
                        error("`invalid_field` (with `field`): a path segment that is not UTF-8")
                    });
                }
                if stored {
                    responses.entry("503".into()).or_insert_with(|| {
                        let mut r = error(
                            "`unavailable`: the queue or the store cannot be reached; nothing \
                             was done or accepted, retry after `Retry-After` seconds",
                        );
                        if let RefOr::T(r) = &mut r {
                            r.headers.insert("Retry-After".into(), retry_after());
                        }
                        r
                    });
                }
                responses
                    .entry("500".into())
                    .or_insert_with(|| error("`internal`: a bug or corrupt data (logged)"));
                for response in responses.values_mut() {
                    if let RefOr::T(r) = response {
                        r.headers.insert(
                            "X-Request-Id".into(),
                            utoipa::openapi::HeaderBuilder::new()
                                .schema(Some(
                                    utoipa::openapi::ObjectBuilder::new()
                                        .schema_type(utoipa::openapi::Type::String),
                                ))
                                .description(Some(
                                    "The request's id: the client's own when it sent a sane \
                                     one (1-128 of A-Z a-z 0-9 . _ -), else a new UUIDv7; in \
                                     every log line of the request and in the jobs it adds.",
                                ))
                                .build()
                                .into(),
                        );
                    }
                }
            }
        }
    }
}

/// The `Retry-After` header of a 429 or 503.
fn retry_after() -> RefOr<utoipa::openapi::Header> {
    utoipa::openapi::HeaderBuilder::new()
        .schema(Some(
            utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::Integer),
        ))
        .description(Some("Seconds to wait"))
        .build()
        .into()
}

/// Whether a security list allows anonymous callers (an empty requirement).
fn allows_anonymous(security: &[utoipa::openapi::security::SecurityRequirement]) -> bool {
    let empty = utoipa::openapi::security::SecurityRequirement::default();
    security.contains(&empty)
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// Whether `path` is the document or its page, which need no key (the contract is public).
pub fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/api/openapi.json" | "/api/docs" | "/api/docs.js" | "/api/docs.css"
    )
}

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, mut api) = super::routes().split_for_parts();
    Finish.modify(&mut api);
    api
}

/// `GET /api/openapi.json`: this document.
#[utoipa::path(get, path = "/api/openapi.json", operation_id = "openapi", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
pub async fn json() -> axum::response::Response {
    use axum::response::IntoResponse;
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| document().to_json().unwrap_or_default());
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc.as_str(),
    )
        .into_response()
}

/// `GET /api/docs`: the document for a person, rendered in the page from the JSON.
#[utoipa::path(get, path = "/api/docs", operation_id = "apiDocs", tag = "operations", security(()),
    responses((status = 200, description = "The API reference page", body = String,
        content_type = "text/html")))]
pub async fn page() -> axum::response::Response {
    super::console::asset(
        "text/html; charset=utf-8",
        include_str!("openapi/docs.html"),
    )
}

/// `GET /api/docs.css`: the reference page's stylesheet.
#[utoipa::path(get, path = "/api/docs.css", operation_id = "apiDocsStyle", tag = "operations", security(()),
    responses((status = 200, description = "The reference page's stylesheet", body = String,
        content_type = "text/css")))]
pub async fn style() -> axum::response::Response {
    super::console::asset("text/css; charset=utf-8", include_str!("openapi/docs.css"))
}

/// `GET /api/docs.js`: the reference page's script.
#[utoipa::path(get, path = "/api/docs.js", operation_id = "apiDocsScript", tag = "operations", security(()),
    responses((status = 200, description = "The reference page's script", body = String,
        content_type = "text/javascript")))]
pub async fn script() -> axum::response::Response {
    super::console::asset(
        "text/javascript; charset=utf-8",
        include_str!("openapi/docs.js"),
    )
}

// ---- Bodies the handlers assemble field by field ----

/// The states of a job.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStateName {
    /// Ready to run.
    Waiting,
    /// Held by a worker.
    Active,
    /// Waiting for its time (a delay or a retry's backoff).
    Delayed,
    /// Done.
    Completed,
    /// Failed for good (until an operator retries it).
    Failed,
    /// Waiting in a paused queue.
    Paused,
}

/// `POST /api/chat/conversations`'s body. Unknown fields are refused (`unknown_field`).
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateConversation {
    /// The owner, an existing user (`PUT /api/users/{id}`): 1 to 64 characters, no control
    /// characters.
    #[schema(min_length = 1, max_length = 64)]
    user_id: String,
    /// Trimmed; at most 200 characters, no control characters; empty or absent means none.
    #[schema(max_length = 200)]
    title: Option<String>,
    /// One of the configured modes (CONVOQ_PERSONALITY_MODES); default the first.
    personality_mode: Option<String>,
}

/// 202: the job is durably queued.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    /// Always true.
    ok: bool,
    /// The `create_conversation` job; follow it at `Location`.
    job_id: String,
    /// The conversation's id, fixed now (readable once the job completes).
    conversation_id: String,
    /// `queued`.
    status: String,
    /// The request that added the job (the original's, for an idempotent replay).
    request_id: Option<String>,
    /// Milliseconds until the job is likely done, from the backlog and recent throughput.
    estimated_wait_time: u64,
}

/// 201 (`Prefer: wait` and the job completed in time): the conversation.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Created {
    /// Always true.
    ok: bool,
    /// The job.
    job_id: String,
    /// The conversation's id.
    conversation_id: String,
    /// `completed`.
    status: String,
    /// The request that added the job.
    request_id: Option<String>,
    /// The conversation.
    conversation: Conversation,
}

/// One conversation.
#[derive(ToSchema)]
pub struct ConversationBody {
    /// Always true.
    ok: bool,
    /// The conversation.
    conversation: Conversation,
}

/// A page of a user's conversations, newest first.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationPage {
    /// Always true.
    ok: bool,
    /// Up to `limit` conversations.
    conversations: Vec<Conversation>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// `PUT /api/users/{id}`'s body. Unknown fields are refused.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PutUser {
    /// The user's Discord id.
    discord_id: String,
    /// The user name.
    username: String,
    /// The display name.
    global_name: Option<String>,
}

/// A user.
#[derive(ToSchema)]
pub struct UserBody {
    /// Always true.
    ok: bool,
    /// The user as stored.
    user: User,
}

/// A job.
#[derive(ToSchema)]
pub struct JobBody {
    /// Always true.
    ok: bool,
    /// The job.
    job: JobView,
}

/// A removal's outcome.
#[derive(ToSchema)]
pub struct Removed {
    /// Always true.
    ok: bool,
    /// Whether the job existed and was removed.
    removed: bool,
}

/// One event of a job's history, the `data` of each server-sent event (the event's name is
/// its `kind`).
#[derive(ToSchema)]
pub struct JobEvent {
    /// waiting, delayed, active, progress, completed, failed, retrying, stalled, removed, ...
    kind: String,
    /// When (RFC 3339).
    at: String,
    /// The attempt it belongs to (0 before the first).
    attempt: u32,
    /// The result (`completed`), the reason (`failed`, `retrying`, `stalled`), or the wait
    /// before the next attempt (`retrying`, as `delayMs`).
    detail: Option<Value>,
}

/// Jobs of one state or a search, 20 a page by default.
#[derive(ToSchema)]
pub struct JobPage {
    /// Always true.
    ok: bool,
    /// The jobs.
    jobs: Vec<JobView>,
    /// False when a search on Redis read only the newest 10,000 jobs of a state.
    exhaustive: bool,
}

/// Counts by state.
#[derive(ToSchema)]
pub struct Counts {
    /// Ready to run.
    waiting: u64,
    /// Held by workers.
    active: u64,
    /// Waiting for their time.
    delayed: u64,
    /// Completed, still kept.
    completed: u64,
    /// Failed, still kept.
    failed: u64,
    /// Waiting in a paused queue.
    paused: u64,
}

/// Lifetime totals, pruned jobs included.
#[derive(ToSchema)]
pub struct Totals {
    /// Ever completed.
    completed: u64,
    /// Ever failed for good.
    failed: u64,
}

/// Run time of the queue's latest completed jobs.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recent {
    /// How many (up to 100).
    jobs: u64,
    /// Mean run time, milliseconds (null without any).
    mean_ms: Option<f64>,
    /// 95th percentile, milliseconds.
    p95_ms: Option<f64>,
}

/// A reading of the lifetime totals (every 10 s, kept 5 minutes).
#[derive(ToSchema)]
pub struct TotalsReading {
    /// When, in Unix milliseconds.
    at: i64,
    /// Ever completed, then.
    completed: u64,
    /// Ever failed, then.
    failed: u64,
}

/// A queue's state and statistics.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    /// database, audit or chat.
    name: String,
    /// Whether workers are held off.
    paused: bool,
    /// Counts by state (cached; see `countsAgeMs`).
    counts: Counts,
    /// Lifetime totals.
    totals: Totals,
    /// How old the counts are, milliseconds (`?fresh=true` reads them now).
    counts_age_ms: u64,
    /// This process's completions per minute, over the last minute.
    throughput_per_minute: f64,
    /// This process's mean run time over the last minute, milliseconds.
    mean_duration_ms: f64,
    /// The latest completions' run time, across every process.
    recent: Recent,
    /// The totals over the last 5 minutes.
    history: Vec<TotalsReading>,
    /// How long the next job to run has waited, milliseconds; null when none waits.
    oldest_waiting_age_ms: Option<i64>,
}

/// Every queue.
#[derive(ToSchema)]
pub struct QueueList {
    /// Always true.
    ok: bool,
    /// database, audit, chat.
    queues: Vec<QueueView>,
}

/// One queue.
#[derive(ToSchema)]
pub struct QueueBody {
    /// Always true.
    ok: bool,
    /// The queue.
    queue: QueueView,
}

/// A pause or resume's outcome.
#[derive(ToSchema)]
pub struct PauseBody {
    /// Always true.
    ok: bool,
    /// The queue.
    queue: String,
    /// Whether it is paused now.
    paused: bool,
}

/// What a bulk action acts on: the jobs of `filter`'s state that its search matches.
#[derive(ToSchema)]
pub struct BulkFilter {
    /// The state: failed (retry), delayed (promote), completed or failed (remove).
    state: String,
    /// Text in the id, data or failure reason.
    q: Option<String>,
    /// A top-level field of the data, with `value`.
    field: Option<String>,
    /// The field's value.
    value: Option<String>,
    /// "true": only jobs that stalled before.
    stalled: Option<String>,
}

/// What to do to which jobs: `ids` (1 to 200) or `filter` (at most 10,000 a request).
#[derive(ToSchema)]
pub struct BulkRequest {
    /// retry, remove or promote.
    #[schema(pattern = "^(retry|remove|promote)$")]
    action: String,
    /// The jobs.
    ids: Option<Vec<String>>,
    /// Or every job it matches.
    filter: Option<BulkFilter>,
}

/// A job a bulk action could not act on.
#[derive(ToSchema)]
pub struct BulkError {
    /// The job.
    id: String,
    /// Why, as a code (`not_found`, `wrong_job_state`, ...).
    code: String,
    /// Why, in a sentence.
    message: String,
}

/// A bulk action's outcome.
#[derive(ToSchema)]
pub struct BulkResult {
    /// Always true.
    ok: bool,
    /// Jobs selected.
    matched: u64,
    /// Jobs acted on.
    done: u64,
    /// The first 20 that could not be.
    errors: Vec<BulkError>,
    /// True when the filter matched more than one request may act on: send it again.
    more: bool,
}

/// `{"ok": true}`.
#[derive(ToSchema)]
pub struct Ok {
    /// Always true.
    ok: bool,
}

/// What readiness checked.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadyChecks {
    /// The store answered within 2 s.
    store: bool,
    /// The queue answered within 2 s.
    queue: bool,
    /// This process's workers run (true without workers).
    workers: bool,
    /// Queues whose workers have not ticked lately.
    stale_worker_queues: Vec<String>,
}

/// Readiness: 200 when everything answers, else 503 with what does not.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// Whether the process is ready.
    ok: bool,
    /// The checks.
    checks: ReadyChecks,
    /// Why the queue is not ready (its disk is full, say).
    queue_problem: Option<String>,
}

/// Who the console's caller is.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// Always true.
    ok: bool,
    /// The key's name.
    name: String,
    /// The session's CSRF token (null without a session cookie).
    csrf: Option<String>,
    /// Whether no keys are configured.
    protected_mode: bool,
}

/// `POST /ui/login`'s body.
#[derive(ToSchema)]
pub struct Login {
    /// An admin API key.
    key: String,
}

/// A login's outcome.
#[derive(ToSchema)]
pub struct LoggedIn {
    /// Always true.
    ok: bool,
    /// The key's name.
    name: String,
}
