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
use super::{ok_json, ApiResult, AppState, Caller};
use crate::domain::QUEUES;

fn known(name: &str) -> Result<&'static str, ApiError> {
    QUEUES.into_iter().find(|q| *q == name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no queue {name:?}; queues are {}",
            QUEUES.join(", ")
        ))
    })
}

async fn queue_json(state: &AppState, name: &str) -> Result<serde_json::Value, ApiError> {
    let counts = state
        .stats
        .counts(&state.queues, &state.metrics, name)
        .await?;
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
        "throughputPerMinute": (t.per_second * 60.0).round(),
        "meanDurationMs": (t.mean_duration_ms * 100.0).round() / 100.0,
    }))
}

/// `GET /api/queues`.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    caller.require_admin()?;
    let mut out = Vec::new();
    for q in QUEUES {
        out.push(queue_json(&state, q).await?);
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
) -> ApiResult {
    caller.require_admin()?;
    let q = known(&name)?;
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "queue": queue_json(&state, q).await? }),
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
    Path(name): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    let q = known(&name)?;
    state.queues.pause(q).await?;
    tracing::warn!(queue = q, actor = %caller.name, "queue paused");
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "queue": q, "paused": true }),
    ))
}

/// `POST /api/queues/{name}/resume`.
pub async fn resume(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    caller.require_admin()?;
    let q = known(&name)?;
    state.queues.resume(q).await?;
    tracing::info!(queue = q, actor = %caller.name, "queue resumed");
    Ok(ok_json(
        StatusCode::OK,
        json!({ "ok": true, "queue": q, "paused": false }),
    ))
}
