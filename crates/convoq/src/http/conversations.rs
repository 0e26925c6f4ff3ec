//! `POST /api/chat/conversations` and the conversation reads.
//!
//! The POST validates, enqueues `create_conversation` on `database` with the conversation id
//! fixed, and answers 202 once the job is committed. `Idempotency-Key` maps to a custom job id
//! (scoped to the caller), so a replay finds the original job in the same durable store and the
//! key lives with it (such jobs are kept at least [`IDEMPOTENCY_TTL_SECS`]).

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::Extension;
use convoq_queue::{JobOptions, JobState, KeepJobs, NewJob};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::extract::{json_object, optional_str, query_number, required_str};
use super::stats::Admission;
use super::{ok_json, ApiResult, AppState, Caller, RequestId};
use crate::domain::{
    ConversationJob, PersonalityMode, Title, UserId, CREATE_CONVERSATION, DATABASE_QUEUE,
};

/// How long an idempotency key is honoured, at least: 25 hours (the contract says 24).
pub const IDEMPOTENCY_TTL_SECS: u64 = 25 * 3600;
/// The longest `Prefer: wait` and `?wait=` honoured, in seconds.
pub const MAX_WAIT_SECS: u64 = 30;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `Prefer: wait=N`; absent or malformed preferences are ignored, as RFC 7240 asks.
fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .find_map(|n| n.trim().parse::<u64>().ok())
        .map(|n| n.min(MAX_WAIT_SECS))
}

/// A validated `POST /api/chat/conversations` body.
struct CreateRequest {
    user_id: UserId,
    title: Option<Title>,
    mode: PersonalityMode,
}

impl CreateRequest {
    async fn read(
        headers: &HeaderMap,
        body: Body,
        config: &crate::config::Config,
    ) -> Result<Self, ApiError> {
        let fields = ["userId", "title", "personalityMode"];
        let map = json_object(headers, body, &fields, config.header_read_timeout).await?;
        let modes = &config.personality_modes;
        Ok(CreateRequest {
            user_id: UserId::parse("userId", required_str(&map, "userId")?)?,
            title: Title::parse(optional_str(&map, "title")?)?,
            mode: PersonalityMode::parse(optional_str(&map, "personalityMode")?, modes)?,
        })
    }

    /// A digest of what the request asks for, stored with an idempotent job so that a replay
    /// with another body is refused.
    fn body_hash(&self) -> String {
        hex(&Sha256::digest(
            serde_json::to_vec(&json!([self.user_id, self.title, self.mode])).unwrap_or_default(),
        ))
    }

    /// The `create_conversation` job for this request, its conversation id fixed now; with an
    /// idempotency key, under a custom id scoped to the caller and kept for the key's lifetime.
    fn job(&self, key: Option<&str>, caller: &Caller, request_id: &str) -> NewJob {
        let mut opts = JobOptions::default();
        if let Some(key) = key {
            let scoped = Sha256::digest(format!("{}\u{0}{key}", caller.name).as_bytes());
            opts.job_id = Some(format!("idem-{}", &hex(&scoped)[..40]));
            opts.remove_on_complete = Some(KeepJobs::Keep {
                count: None,
                age_secs: Some(IDEMPOTENCY_TTL_SECS),
            });
            opts.remove_on_fail = opts.remove_on_complete;
        }
        let job = ConversationJob {
            conversation_id: uuid::Uuid::now_v7().to_string(),
            user_id: self.user_id.clone(),
            title: self.title.clone(),
            mode: self.mode.clone(),
            request_id: Some(request_id.to_owned()),
            actor: Some(caller.name.clone()),
            body_hash: key.map(|_| self.body_hash()),
        };
        NewJob::new(DATABASE_QUEUE, CREATE_CONVERSATION, job.to_data()).with_opts(opts)
    }
}

/// The `Idempotency-Key` header, if sent: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .filter(|k| k.bytes().all(|b| b.is_ascii_graphic()))
        .map(Some)
        .ok_or_else(|| {
            ApiError::field(
                "Idempotency-Key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })
}

/// A place in the `database` queue's backlog, or 429 (see `stats::QueueStats::admit`).
async fn admit(state: &AppState) -> Result<Admission, ApiError> {
    let limit = state.config.max_backlog;
    match state
        .stats
        .admit(&state.queues, &state.metrics, DATABASE_QUEUE, limit)
        .await?
    {
        Ok(admission) => Ok(admission),
        Err(full) => Err(ApiError::TooManyRequests {
            retry_after: full.retry_after,
            message: format!(
                "the {DATABASE_QUEUE} queue has {} jobs waiting, at its limit of {limit}; retry later",
                full.backlog
            ),
        }),
    }
}

/// Places in the caller's and the user's backlog quotas, where set (see `quota.rs`).
async fn quota_places(
    state: &AppState,
    caller: &Caller,
    user: &str,
) -> Result<Vec<super::quota::Place>, super::quota::Refusal> {
    let limits = &state.limits;
    let mut places = Vec::new();
    for (quota, who) in [
        (&limits.key_backlog, caller.name.as_str()),
        (&limits.user_backlog, user),
    ] {
        if let Some(quota) = quota {
            places.push(quota.reserve(who, &state.queues).await?);
        }
    }
    Ok(places)
}

/// With `Prefer: wait`, the job's end within the wait: 201 with the conversation, or 422 with
/// the failure; `None` when it did not end in time (the caller answers 202).
async fn waited(
    state: &AppState,
    secs: u64,
    job_id: &str,
    conversation_id: &str,
    request_id: Option<&str>,
) -> Result<Option<axum::response::Response>, ApiError> {
    let done = state
        .queues
        .wait_finished(DATABASE_QUEUE, job_id, Duration::from_secs(secs))
        .await?;
    match done {
        Some(j) if j.state == JobState::Completed => {
            let Some(conversation) = state.store.get_conversation(conversation_id).await? else {
                return Ok(None);
            };
            let mut resp = ok_json(
                StatusCode::CREATED,
                json!({ "ok": true, "jobId": job_id, "conversationId": conversation_id,
                        "status": "completed", "requestId": request_id, "conversation": conversation }),
            );
            resp.headers_mut()
                .insert("preference-applied", HeaderValue::from_static("wait"));
            Ok(Some(resp))
        }
        Some(j) if j.state == JobState::Failed => Err(ApiError::Unprocessable(
            "job_failed",
            super::jobs::public_reason(j.failed_reason.as_deref().unwrap_or("the job failed")),
        )),
        _ => Ok(None),
    }
}

/// `POST /api/chat/conversations`: validate, take a place in the backlog, add the job (or find
/// the one an idempotency key names), then answer 202 (or, with `Prefer: wait`, the job's end).
#[utoipa::path(post, path = "/api/chat/conversations", operation_id = "createConversation", tag = "conversations", security(("apiKey" = ["service", "admin"]), ("consoleSession" = [])),
    request_body(content = super::openapi::CreateConversation, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; a replay with the same key (per API key, for 25 hours) answers the original job, with `Idempotent-Replayed: true`; with another body, 422 `idempotency_key_reused`"),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (N up to 30): wait up to N seconds for the job; 201 with the conversation if it completed, 422 `job_failed` if it failed, else 202"),
    ),
    responses(
        (status = 202, description = "Queued durably; follow the job at `Location`", body = super::openapi::Accepted,
            headers(("Location" = String, description = "`/api/jobs/{jobId}`"),
                    ("Idempotent-Replayed" = Option<String>, description = "`true` when an Idempotency-Key named an existing job"))),
        (status = 201, description = "`Prefer: wait`: the job completed within the wait", body = super::openapi::Created,
            headers(("Preference-Applied" = String, description = "`wait`"))),
        (status = 400, description = "`malformed_json`, `unknown_field`, `invalid_field` (with `field`)", body = super::error::ErrorBody),
        (status = 413, description = "`payload_too_large`", body = super::error::ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not application/json", body = super::error::ErrorBody),
        (status = 422, description = "`idempotency_key_reused`, or `job_failed` under `Prefer: wait`", body = super::error::ErrorBody),
        (status = 429, description = "`backlog_full`: the queue's backlog is at its limit; or `rate_limited`: this API key or this userId is over its rate limit (`--key-rate-limit`, `--user-rate-limit`); or `backlog_quota`: this API key or this userId has as many jobs queued and not yet ended as its quota (`--key-backlog-quota`, `--user-backlog-quota`); nothing was queued", body = super::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request = CreateRequest::read(&headers, body, &state.config).await?;
    let key = idempotency_key(&headers)?;
    state
        .limits
        .admit_user(request.user_id.as_str(), &state.metrics)?;
    let job = request.job(key, &caller, &request_id);
    let quota_places = match quota_places(&state, &caller, request.user_id.as_str()).await {
        Ok(places) => places,
        // A replay of an accepted key is answered as before: it queues nothing new.
        Err(refused) => match &job.opts.job_id {
            Some(id) if state.queues.get(DATABASE_QUEUE, id).await?.is_some() => Vec::new(),
            _ => return Err(refused.counted(&state.metrics)),
        },
    };
    let admission = admit(&state).await?;
    let backlog = admission.backlog;

    let added = state.queues.add(job).await?;
    admission.added(added.created);
    if added.created {
        for place in quota_places {
            place.queued(&added.job.id);
        }
    }
    let stored = ConversationJob::from_job(&added.job, &state.config.personality_modes)
        .map_err(|e| ApiError::Internal(format!("stored job payload unreadable: {e}")))?;
    if !added.created && stored.body_hash.as_deref() != Some(request.body_hash().as_str()) {
        return Err(ApiError::Unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different body".into(),
        ));
    }
    let job_id = added.job.id.clone();
    let conversation_id = stored.conversation_id.clone();
    if added.created {
        state
            .metrics
            .jobs_queued
            .with_label_values(&[DATABASE_QUEUE, CREATE_CONVERSATION])
            .inc();
        tracing::info!(request_id = %request_id, job_id = %job_id, queue = DATABASE_QUEUE,
            user_id = %request.user_id, conversation_id = %conversation_id, "job enqueued");
    }

    if let Some(secs) = prefer_wait(&headers) {
        let request_id = stored.request_id.as_deref();
        if let Some(resp) = waited(&state, secs, &job_id, &conversation_id, request_id).await? {
            return Ok(resp);
        }
    }

    let backlog = backlog - u64::from(!added.created);
    let mut resp = ok_json(
        StatusCode::ACCEPTED,
        json!({
            "ok": true,
            "jobId": job_id,
            "conversationId": conversation_id,
            "status": "queued",
            "requestId": stored.request_id,
            "estimatedWaitTime": state.stats.estimated_wait_ms(DATABASE_QUEUE, backlog),
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/api/jobs/{job_id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if !added.created {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// `GET /api/chat/conversations/{id}`.
#[utoipa::path(get, path = "/api/chat/conversations/{id}", operation_id = "getConversation", tag = "conversations", security(("apiKey" = ["service", "admin"]), ("consoleSession" = [])),
    params(("id" = String, Path, description = "The conversation's id (a UUID)")),
    responses(
        (status = 200, description = "The conversation", body = super::openapi::ConversationBody),
        (status = 400, description = "`invalid_field`: id is not a UUID", body = super::error::ErrorBody),
        (status = 404, description = "`not_found`: no such conversation (yet: its job may still run)", body = super::error::ErrorBody),
    ))]
pub async fn get_one(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(ApiError::field("id", "id must be a UUID"));
    }
    match state.store.get_conversation(&id).await? {
        Some(c) => Ok(ok_json(
            StatusCode::OK,
            json!({ "ok": true, "conversation": c }),
        )),
        None => Err(ApiError::NotFound(format!("no conversation {id} (yet)"))),
    }
}

/// `GET /api/users/{id}/conversations?limit=&cursor=`.
#[utoipa::path(get, path = "/api/users/{id}/conversations", operation_id = "listUserConversations", tag = "conversations", security(("apiKey" = ["service", "admin"]), ("consoleSession" = [])),
    params(("id" = String, Path, description = "The user's id"),
        ("limit" = Option<u64>, Query, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page")),
    responses(
        (status = 200, description = "A page of the user's conversations, newest first", body = super::openapi::ConversationPage),
        (status = 400, description = "`invalid_field`: a bad id, limit or cursor", body = super::error::ErrorBody),
    ))]
pub async fn list_for_user(
    State(state): State<AppState>,
    Path(user): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    let user = UserId::parse("userId", &user)?;
    let limit = query_number(q.get("limit"), "limit", 20, 1, 100)?;
    let cursor = q.get("cursor").map(String::as_str);
    if cursor.is_some_and(|c| uuid::Uuid::parse_str(c).is_err()) {
        return Err(ApiError::field(
            "cursor",
            "cursor must be a conversation id from nextCursor",
        ));
    }
    let items = state
        .store
        .list_conversations(user.as_str(), limit as u32, cursor)
        .await?;
    let next = (items.len() as u64 == limit)
        .then(|| items.last().map(|c| c.id.clone()))
        .flatten();
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "conversations": items, "nextCursor": next }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn headers(name: &'static str, value: &[u8]) -> Option<HeaderMap> {
        let value = HeaderValue::from_bytes(value).ok()?;
        let mut h = HeaderMap::new();
        h.insert(name, value);
        Some(h)
    }

    proptest! {
        /// Any `Prefer` header parses without a panic, to a wait of at most 30 s or none.
        #[test]
        fn any_prefer_header_is_a_bounded_wait_or_none(value in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Some(h) = headers("prefer", &value) {
                if let Some(secs) = prefer_wait(&h) {
                    prop_assert!(secs <= MAX_WAIT_SECS);
                }
            }
        }

        /// `wait=N` among other preferences is found, capped at 30 s.
        #[test]
        fn a_wait_preference_is_read_among_others(n in 0u64..100_000, before in "[a-z-]{1,10}") {
            let h = headers("prefer", format!("{before}, wait={n}, respond-async").as_bytes()).expect("a header");
            prop_assert_eq!(prefer_wait(&h), Some(n.min(MAX_WAIT_SECS)));
        }

        /// An idempotency key is accepted exactly when it is 1 to 255 visible ASCII characters.
        #[test]
        fn idempotency_keys_are_visible_ascii(value in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Some(h) = headers("idempotency-key", &value) {
                let valid = !value.is_empty()
                    && value.len() <= 255
                    && value.iter().all(u8::is_ascii_graphic);
                match idempotency_key(&h) {
                    Ok(Some(k)) => prop_assert!(valid && k.as_bytes() == value.as_slice()),
                    Ok(None) => prop_assert!(false, "a key sent is never absent"),
                    Err(_) => prop_assert!(!valid),
                }
            }
        }
    }

    /// Any body, however broken, is a 4xx or a validated request: never a panic.
    #[tokio::test]
    async fn any_body_is_read_or_refused_without_a_panic() {
        use proptest::strategy::{Strategy, ValueTree};
        let config = crate::config::Config::load(&crate::config::Settings::default())
            .expect("default settings");
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let bodies = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "\\PC{0,100}".prop_map(String::into_bytes),
            (
                any::<Option<String>>(),
                any::<Option<String>>(),
                any::<Option<String>>()
            )
                .prop_map(|(u, t, m)| {
                    serde_json::json!({"userId": u, "title": t, "personalityMode": m})
                        .to_string()
                        .into_bytes()
                }),
        ];
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for _ in 0..300 {
            let body = bodies.new_tree(&mut runner).expect("a body").current();
            match CreateRequest::read(&h, Body::from(body), &config).await {
                Ok(r) => assert!(!r.user_id.as_str().is_empty()),
                Err(e) => {
                    let status = axum::response::IntoResponse::into_response(e).status();
                    assert!(status.is_client_error(), "{status}");
                }
            }
        }
    }
}
