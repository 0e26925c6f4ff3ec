//! Queue stats and operator actions (admin): counts by state, throughput and mean duration over
//! the last minute, job listings, pause and resume.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Extension;
use convoq_queue::{JobSearch, JobState, QueueError};
use serde_json::json;

use super::error::ApiError;
use super::extract::{json_object, query_number, required_str};
use super::jobs::job_json_operator;
use super::{ok_json, record_action, ApiResult, AppState, Caller, RequestId};
use crate::domain::QUEUES;

fn known(name: &str) -> Result<&'static str, ApiError> {
    crate::domain::queue_named(name).map_err(ApiError::NotFound)
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
    let recent = recent_durations(state, name).await?;
    let oldest_waiting_ms = oldest_waiting_age_ms(state, name, paused).await?;
    let mut shown = queue_state_json(name, paused, &counts);
    let stats = json!({
        "countsAgeMs": age_ms,
        "throughputPerMinute": (t.per_second * 60.0).round(),
        "meanDurationMs": (t.mean_duration_ms * 100.0).round() / 100.0,
        "recent": recent,
        "history": state.stats.totals_history(name).iter()
            .map(|(at, completed, failed)| json!({ "at": at, "completed": completed, "failed": failed }))
            .collect::<Vec<_>>(),
        "oldestWaitingAgeMs": oldest_waiting_ms,
    });
    if let (Some(all), serde_json::Value::Object(more)) = (shown.as_object_mut(), stats) {
        all.extend(more);
    }
    Ok(shown)
}

/// A queue's name, whether it is paused, its counts by state and its lifetime totals, as the
/// API and the CLI show them.
pub fn queue_state_json(
    name: &str,
    paused: bool,
    counts: &convoq_queue::QueueCounts,
) -> serde_json::Value {
    json!({
        "name": name,
        "paused": paused,
        "counts": {
            "waiting": counts.waiting, "active": counts.active, "delayed": counts.delayed,
            "completed": counts.completed, "failed": counts.failed, "paused": counts.paused,
        },
        "totals": { "completed": counts.completed_total, "failed": counts.failed_total },
    })
}

/// How many of the latest completions `recent` is computed over.
const RECENT: u64 = 100;

/// Mean and p95 run time (processed to finished) of the queue's latest completed jobs, from
/// the queue itself, so across every process that works it (the `meanDurationMs` beside it is
/// this process's workers' over the last minute).
async fn recent_durations(state: &AppState, name: &str) -> Result<serde_json::Value, ApiError> {
    let done = state
        .queues
        .list(name, JobState::Completed, 0, RECENT)
        .await?;
    let mut ms: Vec<f64> = done
        .iter()
        .filter_map(|j| {
            Some((j.finished_at? - j.processed_at?).num_microseconds()? as f64 / 1000.0)
        })
        .filter(|d| *d >= 0.0)
        .collect();
    if ms.is_empty() {
        return Ok(json!({ "jobs": 0, "meanMs": null, "p95Ms": null }));
    }
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    // Nearest rank.
    let p95 = ms[((ms.len() as f64 * 0.95).ceil() as usize).clamp(1, ms.len()) - 1];
    let round = |v: f64| (v * 100.0).round() / 100.0;
    Ok(json!({ "jobs": ms.len(), "meanMs": round(mean), "p95Ms": round(p95) }))
}

/// How long the queue's next job to run (in run order: by priority, then first in, first out)
/// has waited since it became ready, in milliseconds; `paused` jobs in a paused queue; null
/// when none waits.
async fn oldest_waiting_age_ms(
    state: &AppState,
    name: &str,
    paused: bool,
) -> Result<Option<i64>, ApiError> {
    let waiting = if paused {
        JobState::Paused
    } else {
        JobState::Waiting
    };
    let next = state.queues.list(name, waiting, 0, 1).await?;
    Ok(next.first().map(|j| {
        (chrono::Utc::now() - j.available_at.max(j.created_at))
            .num_milliseconds()
            .max(0)
    }))
}

/// `GET /api/queues`.
#[utoipa::path(get, path = "/api/queues", operation_id = "listQueues", tag = "queues", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("fresh" = Option<bool>, Query, description = "true: count now instead of the cached counts")),
    responses(
        (status = 200, description = "Every queue", body = super::openapi::QueueList),
        (status = 400, description = "`invalid_field`: fresh is not true or false", body = super::error::ErrorBody),
    ))]
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
#[utoipa::path(get, path = "/api/queues/{name}", operation_id = "getQueue", tag = "queues", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("name" = String, Path, description = "database, audit or chat"),
        ("fresh" = Option<bool>, Query, description = "true: count now instead of the cached counts")),
    responses(
        (status = 200, description = "The queue", body = super::openapi::QueueBody),
        (status = 400, description = "`invalid_field`", body = super::error::ErrorBody),
        (status = 404, description = "`not_found`: no such queue", body = super::error::ErrorBody),
    ))]
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
#[utoipa::path(get, path = "/api/queues/{name}/jobs", operation_id = "listQueueJobs", tag = "queues", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("name" = String, Path, description = "database, audit or chat"),
        ("state" = Option<String>, Query, description = "waiting (default), active, delayed, completed, failed, paused; or any, with a search"),
        ("q" = Option<String>, Query, description = "Search: text in the id, data or failure reason (ignoring case), up to 200 characters"),
        ("field" = Option<String>, Query, description = "Search: a top-level field of the data, with value"),
        ("value" = Option<String>, Query, description = "The field's value"),
        ("stalled" = Option<bool>, Query, description = "true: only jobs that stalled before"),
        ("limit" = Option<u64>, Query, description = "1 to 100, default 20"),
        ("offset" = Option<u64>, Query, description = "Skip this many")),
    responses(
        (status = 200, description = "A page of jobs", body = super::openapi::JobPage),
        (status = 400, description = "`invalid_field`", body = super::error::ErrorBody),
        (status = 404, description = "`not_found`: no such queue", body = super::error::ErrorBody),
    ))]
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
    let jobs: Vec<_> = jobs.iter().map(job_json_operator).collect();
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
    let stalled = match q.get("stalled").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::field(
                "stalled",
                format!("stalled must be true or false, not {other:?}"),
            ))
        }
    };
    Ok(
        (text.is_some() || field.is_some() || stalled).then_some(JobSearch {
            text,
            field,
            stalled,
        }),
    )
}

/// `POST /api/queues/{name}/pause`.
#[utoipa::path(post, path = "/api/queues/{name}/pause", operation_id = "pauseQueue", tag = "queues", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("name" = String, Path, description = "database, audit or chat")),
    responses(
        (status = 200, description = "Paused: workers of every process stop taking its jobs; adds still queue", body = super::openapi::PauseBody),
        (status = 404, description = "`not_found`: no such queue", body = super::error::ErrorBody),
    ))]
pub async fn pause(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Path(name): Path<String>,
) -> ApiResult {
    set_paused(&state, &caller, &request_id, &name, true).await
}

/// `POST /api/queues/{name}/resume`.
#[utoipa::path(post, path = "/api/queues/{name}/resume", operation_id = "resumeQueue", tag = "queues", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("name" = String, Path, description = "database, audit or chat")),
    responses(
        (status = 200, description = "Resumed", body = super::openapi::PauseBody),
        (status = 404, description = "`not_found`: no such queue", body = super::error::ErrorBody),
    ))]
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

/// The most ids a bulk action takes by name.
const BULK_IDS: usize = 200;
/// The most jobs one bulk request acts on through a filter; `more: true` says to send it again.
const BULK_MAX: u64 = 10_000;
/// Jobs read, and acted on concurrently, per round of a filtered bulk action.
const BULK_PAGE: u64 = 200;

/// What a bulk action does to each job.
#[derive(Clone, Copy)]
enum BulkAction {
    Retry,
    Remove,
    Promote,
}

impl BulkAction {
    fn event(self) -> &'static str {
        match self {
            BulkAction::Retry => "job.retried",
            BulkAction::Remove => "job.removed",
            BulkAction::Promote => "job.promoted",
        }
    }
}

/// `POST /api/queues/{name}/jobs/bulk` with `{action: "retry" | "remove" | "promote", ids:
/// [...]}` (a selection, at most 200) or `{action, filter: {state, q?, field?, value?}}` (every
/// job the filter matches, at most 10,000 a request): retries failed jobs, removes jobs that are
/// not active, or promotes delayed jobs, each recorded in the audit log. Answers what matched, what was done, why the rest
/// were not (`errors`, the first 20), and `more: true` when a filter matched more than one
/// request does.
#[utoipa::path(post, path = "/api/queues/{name}/jobs/bulk", operation_id = "bulkJobs", tag = "queues", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    params(("name" = String, Path, description = "database, audit or chat")),
    request_body(content = super::openapi::BulkRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "What was done; each job is recorded in the audit log", body = super::openapi::BulkResult),
        (status = 400, description = "`malformed_json`, `unknown_field`, `invalid_field`", body = super::error::ErrorBody),
        (status = 404, description = "`not_found`: no such queue", body = super::error::ErrorBody),
        (status = 413, description = "`payload_too_large`", body = super::error::ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = super::error::ErrorBody),
    ))]
pub async fn bulk(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult {
    caller.require_admin()?;
    let queue = known(&name)?;
    let within = state.config.header_read_timeout;
    let map = json_object(&headers, body, &["action", "ids", "filter"], within).await?;
    let action = match required_str(&map, "action")? {
        "retry" => BulkAction::Retry,
        "remove" => BulkAction::Remove,
        "promote" => BulkAction::Promote,
        other => {
            return Err(ApiError::field(
                "action",
                format!("action must be retry, remove or promote, not {other:?}"),
            ))
        }
    };
    let mut tally = BulkTally::default();
    match (map.get("ids"), map.get("filter")) {
        (Some(ids), None) => {
            let ids = bulk_ids(ids)?;
            tally.matched = ids.len() as u64;
            bulk_apply(&state, &caller, &request_id, queue, action, ids, &mut tally).await?;
        }
        (None, Some(filter)) => {
            let (job_state, search) = bulk_filter(filter, action)?;
            // Jobs acted on leave the state, but a retried job may fail again and come back,
            // newest first: each job is acted on once a request (`seen`), and the offset
            // moves past what stays in the state.
            let mut seen = std::collections::HashSet::new();
            let mut offset = 0;
            loop {
                let page = match &search {
                    Some(s) => {
                        state
                            .queues
                            .search(queue, Some(job_state), s, offset, BULK_PAGE)
                            .await?
                            .jobs
                    }
                    None => {
                        state
                            .queues
                            .list(queue, job_state, offset, BULK_PAGE)
                            .await?
                    }
                };
                if page.is_empty() {
                    break;
                }
                let read = page.len() as u64;
                let fresh: Vec<String> = page
                    .into_iter()
                    .map(|j| j.id)
                    .filter(|id| seen.insert(id.clone()))
                    .collect();
                tally.matched += fresh.len() as u64;
                let before = tally.done;
                bulk_apply(
                    &state,
                    &caller,
                    &request_id,
                    queue,
                    action,
                    fresh,
                    &mut tally,
                )
                .await?;
                offset += read - (tally.done - before);
                if tally.matched >= BULK_MAX {
                    tally.more = true;
                    break;
                }
            }
        }
        _ => {
            return Err(ApiError::field(
                "ids",
                "send either ids (the jobs to act on) or filter (every job it matches)",
            ))
        }
    }
    tracing::warn!(queue, actor = %caller.name, action = action.event(), matched = tally.matched,
        done = tally.done, "bulk action");
    Ok(ok_json(
        StatusCode::OK,
        json!({
            "ok": true, "matched": tally.matched, "done": tally.done,
            "errors": tally.errors, "more": tally.more,
        }),
    ))
}

#[derive(Default)]
struct BulkTally {
    matched: u64,
    done: u64,
    errors: Vec<serde_json::Value>,
    more: bool,
}

fn bulk_ids(v: &serde_json::Value) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::field(
            "ids",
            format!("ids must be 1 to {BULK_IDS} job ids (strings of 1 to 255 characters)"),
        )
    };
    let list = v.as_array().ok_or_else(bad)?;
    if list.is_empty() || list.len() > BULK_IDS {
        return Err(bad());
    }
    list.iter()
        .map(|id| match id.as_str() {
            Some(s) if !s.is_empty() && s.len() <= 255 && !s.chars().any(char::is_control) => {
                Ok(s.to_owned())
            }
            _ => Err(bad()),
        })
        .collect()
}

/// The state and search of a bulk filter: `retry` takes failed jobs, `remove` completed or
/// failed ones.
fn bulk_filter(
    v: &serde_json::Value,
    action: BulkAction,
) -> Result<(JobState, Option<JobSearch>), ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::field("filter", "filter must be an object"))?;
    let mut q = std::collections::HashMap::new();
    for (k, v) in obj {
        if !matches!(k.as_str(), "state" | "q" | "field" | "value" | "stalled") {
            return Err(ApiError::field(
                "filter",
                format!("filter takes state, q, field, value and stalled, not {k:?}"),
            ));
        }
        let s = v
            .as_str()
            .ok_or_else(|| ApiError::field("filter", format!("filter.{k} must be a string")))?;
        q.insert(k.clone(), s.to_owned());
    }
    let job_state = q.get("state").and_then(|s| JobState::parse(s));
    let job_state = match (action, job_state) {
        (BulkAction::Retry, Some(JobState::Failed)) => JobState::Failed,
        (BulkAction::Remove, Some(s @ (JobState::Completed | JobState::Failed))) => s,
        (BulkAction::Promote, Some(JobState::Delayed)) => JobState::Delayed,
        (BulkAction::Promote, _) => {
            return Err(ApiError::field(
                "filter",
                "promote takes filter.state delayed",
            ))
        }
        (BulkAction::Retry, _) => {
            return Err(ApiError::field("filter", "retry takes filter.state failed"))
        }
        (BulkAction::Remove, _) => {
            return Err(ApiError::field(
                "filter",
                "remove takes filter.state completed or failed",
            ))
        }
    };
    Ok((job_state, search_of(&q)?))
}

/// Acts on `ids`, a few at a time (so that the writer commits them together), counting what
/// was done and why the rest was not; a queue that cannot be reached stops the request.
async fn bulk_apply(
    state: &AppState,
    caller: &Caller,
    request_id: &RequestId,
    queue: &'static str,
    action: BulkAction,
    ids: Vec<String>,
    tally: &mut BulkTally,
) -> Result<(), ApiError> {
    use futures::StreamExt;
    let results: Vec<_> = futures::stream::iter(ids)
        .map(|id| async move {
            let r = match action {
                BulkAction::Retry => state.queues.retry(queue, &id).await.map(|_| true),
                BulkAction::Remove => state.queues.remove(queue, &id).await,
                BulkAction::Promote => state.queues.promote(queue, &id).await.map(|_| true),
            };
            (id, r)
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let (mut done, mut unavailable) = (Vec::new(), None);
    for (id, r) in results {
        match r {
            Ok(true) => done.push(id),
            Ok(false) => bulk_error(tally, &id, "not_found", "no such job"),
            Err(QueueError::WrongState { state: s, .. }) => {
                bulk_error(tally, &id, "wrong_state", &format!("the job is {s}"))
            }
            Err(QueueError::Invalid(m)) => bulk_error(tally, &id, "invalid", &m),
            Err(e) => unavailable = Some(e),
        }
    }
    tally.done += done.len() as u64;
    // Recorded together, so that the store's group commit writes them in few statements.
    futures::stream::iter(done)
        .for_each_concurrent(32, |id| async move {
            record_action(state, caller, request_id, action.event(), &id).await;
        })
        .await;
    // What was done is recorded even when the queue failed for the rest.
    unavailable.map_or(Ok(()), |e| Err(e.into()))
}

fn bulk_error(tally: &mut BulkTally, id: &str, code: &str, message: &str) {
    if tally.errors.len() < 20 {
        tally
            .errors
            .push(json!({ "id": id, "code": code, "message": message }));
    }
}
