//! Queue stats and operator actions (admin): counts by state, throughput and mean duration over
//! the last minute, job listings, pause and resume.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Extension;
use convoq_queue::JobState;
use serde_json::json;

use super::error::ApiError;
use super::extract::query_number;
use super::jobs::job_json;
use super::{ok_json, record_action, ApiResult, AppState, Caller, RequestId};
use crate::domain::QUEUES;

fn known(name: &str) -> Result<&'static str, ApiError> {
    QUEUES.into_iter().find(|q| *q == name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no queue {name:?}; queues are {}",
            QUEUES.join(", ")
        ))
    })
}

/// Whether the query asks for counts read now (`?fresh=true`) rather than the cached ones.
fn wants_fresh(q: &std::collections::HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("fresh").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::field(
            "fresh",
            format!("fresh must be true or false, not {other:?}"),
        )),
    }
}

async fn queue_json(
    state: &AppState,
    name: &str,
    fresh: bool,
) -> Result<serde_json::Value, ApiError> {
    // Cached counts are at most a quarter of a second old (five while a slow read is redone);
    // `countsAgeMs` says how old, and `?fresh=true` reads them now.
    let counts = if fresh {
        state
            .stats
            .fresh_counts(&state.queues, &state.metrics, name)
            .await?
    } else {
        state
            .stats
            .counts(&state.queues, &state.metrics, name)
            .await?
    };
    let age_ms = state
        .stats
        .counts_age(name)
        .map_or(0, |a| a.as_millis() as u64);
    let paused = state.queues.is_paused(name).await?;
    let t = state.stats.throughput(name);
    Ok(json!({
        "name": name,
        "paused": paused,
        "counts": {
            "waiting": counts.waiting, "active": counts.active, "delayed": counts.delayed,
            "completed": counts.completed, "failed": counts.failed, "paused": counts.paused,
        },
        "totals": { "completed": counts.completed_total, "failed": counts.failed_total },
        "countsAgeMs": age_ms,
        "throughputPerMinute": (t.per_second * 60.0).round(),
        "meanDurationMs": (t.mean_duration_ms * 100.0).round() / 100.0,
    }))
}

/// `GET /api/queues`.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let fresh = wants_fresh(&query)?;
    let mut out = Vec::new();
    for q in QUEUES {
        out.push(queue_json(&state, q, fresh).await?);
    }
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "queues": out }),
    ))
}

/// `GET /api/queues/{name}`.
pub async fn get_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let q = known(&name)?;
    let fresh = wants_fresh(&query)?;
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "queue": queue_json(&state, q, fresh).await? }),
    ))
}

/// `GET /api/queues/{name}/jobs?state=&limit=&offset=`.
pub async fn jobs(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let queue = known(&name)?;
    let job_state = match q.get("state") {
        None => JobState::Waiting,
        Some(s) => JobState::parse(s).ok_or_else(|| {
            ApiError::field(
                "state",
                "state must be one of waiting, active, delayed, completed, failed, paused",
            )
        })?,
    };
    let limit = query_number(q.get("limit"), "limit", 20, 1, 100)?;
    let offset = query_number(q.get("offset"), "offset", 0, 0, 1_000_000)?;
    let jobs = state.queues.list(queue, job_state, offset, limit).await?;
    let jobs: Vec<_> = jobs.iter().map(job_json).collect();
    Ok(ok_json(StatusCode::OK, json!({ "ok": true, "jobs": jobs })))
}

/// `POST /api/queues/{name}/pause`.
pub async fn pause(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Path(name): Path<String>,
) -> ApiResult {
    set_paused(&state, &caller, &request_id, &name, true).await
}

/// `POST /api/queues/{name}/resume`.
pub async fn resume(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Path(name): Path<String>,
) -> ApiResult {
    set_paused(&state, &caller, &request_id, &name, false).await
}

/// Pauses or resumes a queue for an admin, and records who did in the audit log.
async fn set_paused(
    state: &AppState,
    caller: &Caller,
    request_id: &RequestId,
    name: &str,
    paused: bool,
) -> ApiResult {
    caller.require_admin()?;
    let q = known(name)?;
    if paused {
        state.queues.pause(q).await?;
        tracing::warn!(queue = q, actor = %caller.name, "queue paused");
    } else {
        state.queues.resume(q).await?;
        tracing::info!(queue = q, actor = %caller.name, "queue resumed");
    }
    let event = if paused {
        "queue.paused"
    } else {
        "queue.resumed"
    };
    record_action(state, caller, request_id, event, q).await;
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "queue": q, "paused": paused }),
    ))
}
