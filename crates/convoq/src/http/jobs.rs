//! Job endpoints: state (with long-poll), server-sent events replayed from the job's history,
//! and the operator actions retry and delete.
//!
//! Job ids are looked up in the service's queues in order (`database`, `audit`, `chat`). A
//! `service` caller sees only jobs it enqueued; others are 404 to it, not 403, so ids do not
//! leak.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Extension;
use convoq_queue::Job;
use serde_json::json;

use super::conversations::MAX_WAIT_SECS;
use super::error::ApiError;
use super::extract::query_number;
use super::{ok_json, record_action, ApiResult, AppState, Caller, RequestId};
use crate::config::Role;
use crate::domain::QUEUES;

/// A job as the API shows it (`GET /api/jobs/{id}`, listings, operator actions).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// The job's id (a UUIDv7, or `idem-…` for a POST with an `Idempotency-Key`).
    pub id: String,
    /// Its queue: `database`, `audit` or `chat`.
    pub queue: String,
    /// What it does (`create_conversation`, `record_audit_event`).
    pub name: String,
    /// Where it is in its life.
    #[schema(value_type = super::openapi::JobStateName)]
    pub state: convoq_queue::JobState,
    /// Attempts started so far.
    pub attempts_made: u32,
    /// Attempts it may have.
    pub max_attempts: u32,
    /// When it was added (RFC 3339, milliseconds, UTC).
    pub created_at: String,
    /// The id of the HTTP request that added it (null for jobs added otherwise).
    pub request_id: Option<String>,
    /// What its processor returned (completed jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// Why its last attempt failed: a stable sentence for service callers, the reason as
    /// recorded for admins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_reason: Option<String>,
    /// When its last attempt started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<String>,
    /// When it completed or failed for good.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// How often its worker's lease ran out and it was taken back (absent when never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_count: Option<u32>,
    /// An active job's lease end (SQLite and Postgres); after it the stall sweep (every half
    /// lease at most) takes the job back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<String>,
    /// Whether that lease has run out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expired: Option<bool>,
    /// The owner id of the process that holds it (each process logs its own at start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// When a delayed job becomes ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_at: Option<String>,
    /// What the job carries (admins only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
    /// How it was asked to run: attempts, backoff, retention (admins only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub opts: Option<serde_json::Value>,
}

/// The job as the API shows it to any caller that may see it.
pub fn job_json(job: &Job) -> JobView {
    let ts = crate::store::timestamp;
    JobView {
        id: job.id.clone(),
        queue: job.queue.clone(),
        name: job.name.clone(),
        state: job.state,
        attempts_made: job.attempts_made,
        max_attempts: job.max_attempts(),
        created_at: ts(job.created_at),
        request_id: job
            .data
            .get("requestId")
            .and_then(|r| r.as_str())
            .map(str::to_owned),
        result: job.result.clone(),
        failed_reason: job.failed_reason.as_deref().map(public_reason),
        processed_at: job.processed_at.map(ts),
        finished_at: job.finished_at.map(ts),
        stalled_count: (job.stalled_count > 0).then_some(job.stalled_count),
        lease_expires_at: job.lease_expires_at.map(ts),
        lease_expired: job.lease_expires_at.map(|t| t <= chrono::Utc::now()),
        lease_holder: job.lease_holder.clone(),
        available_at: (job.available_at > job.created_at && !job.state.is_finished())
            .then(|| ts(job.available_at)),
        data: None,
        opts: None,
    }
}

/// The job as an operator sees it: [`job_json`] with what the job carries (`data`), how it
/// was asked to run (`opts`), and its failure reason as recorded (which may hold a store's
/// own error text).
pub fn job_json_admin(job: &Job) -> JobView {
    JobView {
        data: Some(job.data.clone()),
        opts: Some(serde_json::to_value(&job.opts).unwrap_or_default()),
        ..job_json_operator(job)
    }
}

/// The job in an operator's listing: [`job_json`] with the failure reason as recorded.
pub fn job_json_operator(job: &Job) -> JobView {
    JobView {
        failed_reason: job.failed_reason.clone(),
        ..job_json(job)
    }
}

/// What a service caller is told of a failure: a stable sentence per kind of failure,
/// never a store's or a driver's own error text (that stays in the logs and for admins). A
/// reason convoq itself wrote from the caller's own input (an unknown user) is kept.
pub fn public_reason(recorded: &str) -> String {
    if recorded.starts_with("unknown user ") {
        return recorded.to_owned();
    }
    let stable = if recorded.starts_with("store unavailable") {
        "the store was unavailable"
    } else if recorded.starts_with("invalid job payload") {
        "the job's data could not be read"
    } else if recorded.starts_with("job stalled more than") {
        "the job's worker stopped too often while running it"
    } else {
        "the job failed"
    };
    format!("{stable}; the operators' logs have the details under the job's request id")
}

/// An event as a service caller sees it: a failure's reason told as [`public_reason`].
pub fn public_event(mut event: convoq_queue::JobEvent) -> convoq_queue::JobEvent {
    use convoq_queue::JobEventKind as K;
    if !matches!(event.kind, K::Failed | K::Retrying | K::Stalled) {
        return event;
    }
    match event.detail.as_mut() {
        Some(serde_json::Value::String(reason)) => *reason = public_reason(reason),
        Some(serde_json::Value::Object(fields)) => {
            if let Some(serde_json::Value::String(reason)) = fields.get_mut("reason") {
                *reason = public_reason(reason);
            }
        }
        _ => {}
    }
    event
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
        return Err(ApiError::field("id", "id must be 1 to 255 characters"));
    }
    Ok(())
}

/// Finds a job the caller may see.
async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    check_id(id)?;
    for q in QUEUES {
        if let Some(job) = state.queues.get(q, id).await? {
            if caller.may_see(job.data.get("actor").and_then(|a| a.as_str())) {
                return Ok(job);
            }
            break;
        }
    }
    Err(ApiError::NotFound(format!("no job {id}")))
}

/// `GET /api/jobs/{id}?wait=N`.
#[utoipa::path(get, path = "/api/jobs/{id}", operation_id = "getJob", tag = "jobs", security(("apiKey" = ["service", "admin"]), ("consoleSession" = [])),
    params(("id" = String, Path, description = "The job's id"),
        ("wait" = Option<u64>, Query, description = "Long-poll: wait up to this many seconds (0 to 30) for the job to finish")),
    responses(
        (status = 200, description = "The job (`data` and `opts` for admins); a service key sees only jobs it added", body = super::openapi::JobBody),
        (status = 400, description = "`invalid_field`: a bad id or wait", body = super::error::ErrorBody),
        (status = 404, description = "`not_found`", body = super::error::ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    let wait = query_number(q.get("wait"), "wait", 0, 0, MAX_WAIT_SECS)?;
    let mut job = find(&state, &caller, &id).await?;
    if wait > 0 && !job.state.is_finished() {
        if let Some(j) = state
            .queues
            .wait_finished(&job.queue, &id, Duration::from_secs(wait))
            .await?
        {
            job = j;
        }
    }
    let shown = if caller.role == Role::Admin {
        job_json_admin(&job)
    } else {
        job_json(&job)
    };
    Ok(ok_json(StatusCode::OK, json!({ "ok": true, "job": shown })))
}

/// `GET /api/jobs/{id}/events`: the job's history, then its live events, as server-sent
/// events named by kind; the stream ends after `completed` or `failed`.
#[utoipa::path(get, path = "/api/jobs/{id}/events", operation_id = "followJob", tag = "jobs", security(("apiKey" = ["service", "admin"]), ("consoleSession" = [])),
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Server-sent events: the job's history from the start, then its events as they happen, each named by its kind with a `JobEvent` as data; the stream ends after `completed` or `failed` (unless an operator's retry follows), or after 30 minutes with an event `timeout` (reconnect to follow on), with a keep-alive comment every 15 s", body = String, content_type = "text/event-stream"),
        (status = 429, description = "`too_many_streams`: this API key has `--max-streams-per-key` streams open; or `rate_limited`", body = super::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 400, description = "`invalid_field`: a bad id", body = super::error::ErrorBody),
        (status = 404, description = "`not_found`", body = super::error::ErrorBody),
    ))]
pub async fn events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let job = find(&state, &caller, &id).await?;
    let slot = state.limits.open_stream(&caller.name)?;
    let follower = state.queues.follow(&job.queue, &id);
    let admin = caller.role == Role::Admin;
    let ends_at = tokio::time::Instant::now() + MAX_STREAM;
    // The slot is held as long as the stream is: dropped with it when it ends or the client
    // goes away.
    let stream = futures::stream::unfold(Some((follower, slot)), move |f| async move {
        let (mut f, slot) = f?;
        let Ok(next) = tokio::time::timeout_at(ends_at, f.next()).await else {
            let event = Event::default().event("timeout").data(format!(
                "this stream ends after {} minutes; reconnect to follow the job on",
                MAX_STREAM.as_secs() / 60
            ));
            return Some((Ok(event), None));
        };
        match next {
            Ok(Some(e)) => {
                let e = if admin { e } else { public_event(e) };
                let event = Event::default()
                    .event(e.kind.as_str())
                    .json_data(&e)
                    .unwrap_or_else(|_| Event::default().event(e.kind.as_str()));
                Some((Ok::<_, Infallible>(event), Some((f, slot))))
            }
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(error = %err, "job event stream ended by a read error");
                let event = Event::default()
                    .event("error")
                    .data("the queue could not be read; reconnect to resume");
                Some((Ok(event), None))
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The longest an event stream stays open: a job that never finishes does not hold a
/// connection forever.
pub const MAX_STREAM: Duration = Duration::from_secs(30 * 60);

/// `POST /api/jobs/{id}/retry` (admin).
#[utoipa::path(post, path = "/api/jobs/{id}/retry", operation_id = "retryJob", tag = "jobs", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The failed job waits again, with fresh attempts", body = super::openapi::JobBody),
        (status = 404, description = "`not_found`", body = super::error::ErrorBody),
        (status = 409, description = "`wrong_job_state`: only a failed job can be retried", body = super::error::ErrorBody),
    ))]
pub async fn retry(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult {
    make_ready(&state, &caller, &request_id, &id, Ready::Retry).await
}

/// How an operator makes a job ready.
#[derive(Clone, Copy)]
enum Ready {
    Retry,
    Promote,
}

/// Retries or promotes job `id` for an admin, records it, and answers the job as it is then.
async fn make_ready(
    state: &AppState,
    caller: &Caller,
    request_id: &RequestId,
    id: &str,
    how: Ready,
) -> ApiResult {
    caller.require_admin()?;
    let job = find(state, caller, id).await?;
    let (job, event) = match how {
        Ready::Retry => (state.queues.retry(&job.queue, id).await?, "job.retried"),
        Ready::Promote => (state.queues.promote(&job.queue, id).await?, "job.promoted"),
    };
    record_action(state, caller, request_id, event, id).await;
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "job": job_json_operator(&job) }),
    ))
}

/// `POST /api/jobs/{id}/promote` (admin): a delayed job ready now.
#[utoipa::path(post, path = "/api/jobs/{id}/promote", operation_id = "promoteJob", tag = "jobs", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The delayed job is ready now", body = super::openapi::JobBody),
        (status = 404, description = "`not_found`", body = super::error::ErrorBody),
        (status = 409, description = "`wrong_job_state`: only a delayed job can be promoted", body = super::error::ErrorBody),
    ))]
pub async fn promote(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult {
    make_ready(&state, &caller, &request_id, &id, Ready::Promote).await
}

/// `DELETE /api/jobs/{id}` (admin).
#[utoipa::path(delete, path = "/api/jobs/{id}", operation_id = "removeJob", tag = "jobs", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Removed, with its history", body = super::openapi::Removed),
        (status = 404, description = "`not_found`", body = super::error::ErrorBody),
        (status = 409, description = "`wrong_job_state`: an active job cannot be removed", body = super::error::ErrorBody),
    ))]
pub async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    let job = find(&state, &caller, &id).await?;
    let removed = state.queues.remove(&job.queue, &id).await?;
    if removed {
        record_action(&state, &caller, &request_id, "job.removed", &id).await;
    }
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "removed": removed }),
    ))
}
