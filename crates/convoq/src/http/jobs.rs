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

/// The job as the API shows it.
pub fn job_json(job: &Job) -> serde_json::Value {
    let mut v = json!({
        "id": job.id,
        "queue": job.queue,
        "name": job.name,
        "state": job.state,
        "attemptsMade": job.attempts_made,
        "maxAttempts": job.max_attempts(),
        "createdAt": crate::store::timestamp(job.created_at),
        "requestId": job.data.get("requestId"),
    });
    if let Some(r) = &job.result {
        v["result"] = r.clone();
    }
    if let Some(r) = &job.failed_reason {
        v["failedReason"] = json!(r);
    }
    if let Some(t) = job.processed_at {
        v["processedAt"] = json!(crate::store::timestamp(t));
    }
    if let Some(t) = job.finished_at {
        v["finishedAt"] = json!(crate::store::timestamp(t));
    }
    if job.stalled_count > 0 {
        v["stalledCount"] = json!(job.stalled_count);
    }
    if let Some(t) = job.lease_expires_at {
        // An expired lease waits for the stall sweep (every lease / 2 at most) to take the job
        // back.
        v["leaseExpiresAt"] = json!(crate::store::timestamp(t));
        v["leaseExpired"] = json!(t <= chrono::Utc::now());
    }
    if let Some(holder) = &job.lease_holder {
        // The holder's owner id, which it logs at its start ("convoq listening", `owner`).
        v["leaseHolder"] = json!(holder);
    }
    if job.available_at > job.created_at && !job.state.is_finished() {
        v["availableAt"] = json!(crate::store::timestamp(job.available_at));
    }
    v
}

/// The job as an operator sees it: [`job_json`] with what the job carries (`data`) and how it
/// was asked to run (`opts`).
pub fn job_json_admin(job: &Job) -> serde_json::Value {
    let mut shown = job_json(job);
    shown["data"] = job.data.clone();
    shown["opts"] = serde_json::to_value(&job.opts).unwrap_or_default();
    shown
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
pub async fn events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let job = find(&state, &caller, &id).await?;
    let follower = state.queues.follow(&job.queue, &id);
    let stream = futures::stream::unfold(Some(follower), |f| async move {
        let mut f = f?;
        match f.next().await {
            Ok(Some(e)) => {
                let event = Event::default()
                    .event(e.kind.as_str())
                    .json_data(&e)
                    .unwrap_or_else(|_| Event::default().event(e.kind.as_str()));
                Some((Ok::<_, Infallible>(event), Some(f)))
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

/// `POST /api/jobs/{id}/retry` (admin).
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
        json!({ "ok": true, "job": job_json(&job) }),
    ))
}

/// `POST /api/jobs/{id}/promote` (admin): a delayed job ready now.
pub async fn promote(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> ApiResult {
    make_ready(&state, &caller, &request_id, &id, Ready::Promote).await
}

/// `DELETE /api/jobs/{id}` (admin).
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
