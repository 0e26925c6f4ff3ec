//! `/healthz` (the process answers), `/readyz` (store and queue reachable, and every worker loop
//! of this process ticked recently), and `/metrics` (Prometheus text).

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use convoq_queue::JobState;
use serde_json::json;

use super::{ok_json, ApiResult, AppState};
use crate::domain::QUEUES;

/// A worker loop that has not ticked for this long makes the process unready.
pub const WORKER_STALE_AFTER: Duration = Duration::from_secs(15);

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "operations", security(()),
    responses((status = 200, description = "The process is alive", body = super::openapi::Ok)))]
pub async fn healthz() -> ApiResult {
    Ok(ok_json(StatusCode::OK, json!({ "ok": true })))
}

/// `GET /readyz`.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "operations", security(()),
    responses(
        (status = 200, description = "Ready: the store and the queue answer, the workers run", body = super::openapi::Ready),
        (status = 503, description = "Not ready, with what failed", body = super::openapi::Ready),
    ))]
pub async fn readyz(State(state): State<AppState>) -> ApiResult {
    let store = tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await;
    let queue = tokio::time::timeout(Duration::from_secs(2), state.queues.engine().ping()).await;
    let store_ok = matches!(store, Ok(Ok(())));
    let queue_ok = matches!(queue, Ok(Ok(())));
    // Why the queue is not ready (the writer's disk is full, say), for the operator.
    let queue_problem = match &queue {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("the queue did not answer within 2 s".to_owned()),
    };
    let (workers_ok, stale) = {
        let pool = state.workers.lock().unwrap_or_else(|p| p.into_inner());
        match pool.as_ref() {
            None => (true, Vec::new()),
            Some(p) => {
                let stale: Vec<String> = p
                    .last_ticks()
                    .into_iter()
                    .filter(|(_, t)| t.elapsed() > WORKER_STALE_AFTER)
                    .map(|(q, _)| q)
                    .collect();
                (stale.is_empty(), stale)
            }
        }
    };
    let ready = store_ok && queue_ok && workers_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(ok_json(
        status,
        json!({ "ok": ready, "checks": { "store": store_ok, "queue": queue_ok, "workers": workers_ok, "staleWorkerQueues": stale }, "queueProblem": queue_problem }),
    ))
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations", security((), ("metricsKey" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
        (status = 401, description = "`unauthorized`: CONVOQ_METRICS_KEY is configured and was not sent", body = super::error::ErrorBody),
    ))]
pub async fn metrics(State(state): State<AppState>) -> ApiResult {
    let ready = tokio::time::timeout(Duration::from_secs(2), state.queues.engine().ping()).await;
    state
        .metrics
        .queue_ready
        .set(i64::from(matches!(ready, Ok(Ok(())))));
    for q in QUEUES {
        if let Ok(c) = state.stats.counts(&state.queues, &state.metrics, q).await {
            for s in JobState::ALL {
                state
                    .metrics
                    .queue_jobs
                    .with_label_values(&[q, s.as_str()])
                    .set(c.get(s) as i64);
            }
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response())
}
