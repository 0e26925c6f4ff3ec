//! Queue stats and operator actions (admin): counts by state, throughput and mean duration over
//! the last minute, job listings, pause and resume.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Extension;
use convoq_queue::{JobSearch, JobState};
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

/// `GET /api/queues/{name}/jobs?state=&limit=&offset=`, and a search with `q=` (text in the
/// id, data or failure reason, ignoring case) and/or `field=` with `value=` (a top-level field
/// of the job's data), where `state` may be `any` (the default when searching).
pub async fn jobs(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    caller.require_admin()?;
    let queue = known(&name)?;
    let search = search_of(&q)?;
    let job_state = match q.get("state").map(String::as_str) {
        None if search.is_some() => None,
        None => Some(JobState::Waiting),
        Some("any") if search.is_some() => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::field(
                "state",
                "state must be one of waiting, active, delayed, completed, failed, paused \
                 (or any, with q or field)",
            )
        })?),
    };
    let limit = query_number(q.get("limit"), "limit", 20, 1, 100)?;
    let offset = query_number(q.get("offset"), "offset", 0, 0, 1_000_000)?;
    let (jobs, exhaustive) = if let Some(search) = &search {
        let found = state
            .queues
            .search(queue, job_state, search, offset, limit)
            .await?;
        (found.jobs, found.exhaustive)
    } else {
        let job_state = job_state.unwrap_or(JobState::Waiting);
        let jobs = state.queues.list(queue, job_state, offset, limit).await?;
        (jobs, true)
    };
    let jobs: Vec<_> = jobs.iter().map(job_json).collect();
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "jobs": jobs, "exhaustive": exhaustive }),
    ))
}

/// The search a job listing's query asks for, if any.
fn search_of(q: &std::collections::HashMap<String, String>) -> Result<Option<JobSearch>, ApiError> {
    let text = match q.get("q").map(|t| t.trim()) {
        None | Some("") => None,
        Some(t) if t.chars().count() > 200 || t.chars().any(char::is_control) => {
            return Err(ApiError::field(
                "q",
                "q must be at most 200 characters, without control characters",
            ))
        }
        Some(t) => Some(t.to_owned()),
    };
    let field = match (q.get("field"), q.get("value")) {
        (None, None) => None,
        (Some(k), Some(v)) => {
            if k.is_empty()
                || k.len() > 64
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ApiError::field(
                    "field",
                    "field must be 1 to 64 characters of A-Z a-z 0-9 _ -",
                ));
            }
            if v.chars().count() > 200 || v.chars().any(char::is_control) {
                return Err(ApiError::field(
                    "value",
                    "value must be at most 200 characters, without control characters",
                ));
            }
            Some((k.clone(), v.clone()))
        }
        (Some(_), None) => return Err(ApiError::field("value", "field needs a value")),
        (None, Some(_)) => return Err(ApiError::field("field", "value needs a field")),
    };
    Ok((text.is_some() || field.is_some()).then_some(JobSearch { text, field }))
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
