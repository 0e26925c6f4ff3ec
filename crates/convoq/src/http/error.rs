//! [`ApiError`]: the one error type at the HTTP edge. Each variant maps to a status and a
//! stable snake_case code; the body has one shape, `{"ok": false, "error": {code, message,
//! field?}}`, and never carries internals (SQL, paths, stack traces): those are logged once,
//! with the request id, and the client gets a generic message.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::domain::Invalid;

/// Every error's body: `{"ok": false, "error": {code, message, field?}}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Always false.
    pub ok: bool,
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong, for a person (`message`) and for a program (`code`, `field`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code: `invalid_field`, `malformed_json`, `unknown_field`,
    /// `unsupported_media_type`, `payload_too_large`, `unauthorized`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `wrong_job_state`, `idempotency_key_reused`,
    /// `job_failed`, `backlog_full`, `unavailable`, `internal`, ...
    #[schema(pattern = "^[a-z_]+$")]
    pub code: String,
    /// What is wrong, in a sentence; never internals (SQL, paths, stack traces).
    pub message: String,
    /// The field, query parameter or header at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answered to an HTTP client.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed or a field is invalid.
    BadRequest {
        /// Stable code (`invalid_field`, `malformed_json`, `unknown_field`).
        code: &'static str,
        /// What is wrong.
        message: String,
        /// The field at fault.
        field: Option<String>,
    },
    /// 401: no or wrong credentials.
    Unauthorized(&'static str),
    /// 403: credentials without the right role, or a non-loopback client in protected mode.
    Forbidden(&'static str, String),
    /// 404: nothing here.
    NotFound(String),
    /// 405: wrong method.
    MethodNotAllowed,
    /// 409: a conflict with stored state.
    Conflict(&'static str, String),
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 413: body too large.
    PayloadTooLarge(usize),
    /// 415: not JSON.
    UnsupportedMediaType,
    /// 422: understood but refused (idempotency key reused, job failed).
    Unprocessable(&'static str, String),
    /// 429: backlog over its limit.
    TooManyRequests {
        /// Seconds to wait.
        retry_after: u64,
        /// Why.
        message: String,
    },
    /// 429: this caller (an API key, a userId) is over its rate limit.
    RateLimited {
        /// Seconds to wait.
        retry_after: u64,
        /// Whose limit.
        message: String,
    },
    /// 429: this caller (an API key, a userId) has as many jobs queued and unfinished as its
    /// backlog quota allows.
    QuotaReached {
        /// Seconds to wait.
        retry_after: u64,
        /// Whose quota.
        message: String,
    },
    /// 429: this API key has as many event streams open as it may.
    TooManyStreams(usize),
    /// 503: a dependency (queue, store) is unavailable; nothing was accepted.
    Unavailable {
        /// Seconds to wait.
        retry_after: u64,
        /// Why, without internals.
        message: String,
    },
    /// 500: a bug or corrupt data. The detail is logged, never sent.
    Internal(String),
}

impl ApiError {
    /// A 400 naming an invalid field.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code: "invalid_field",
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    /// A 503 for an unavailable dependency; `detail` is logged, not sent.
    pub fn unavailable(what: &str, detail: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %detail, "{what} unavailable");
        ApiError::Unavailable {
            retry_after: 2,
            message: format!("the {what} is unavailable; nothing was accepted, retry later"),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::field(e.field, format!("{}: {}", e.field, e.message))
    }
}

impl From<convoq_queue::QueueError> for ApiError {
    fn from(e: convoq_queue::QueueError) -> Self {
        use convoq_queue::QueueError as Q;
        match e {
            Q::Unavailable(_) | Q::Closed => ApiError::unavailable("queue", e),
            Q::WrongState { job_id, state } => ApiError::Conflict(
                "wrong_job_state",
                format!("job {job_id} is {state}, which does not allow this"),
            ),
            Q::Invalid(m) => ApiError::BadRequest {
                code: "invalid_request",
                message: m,
                field: None,
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as S;
        match e {
            S::Unavailable(_) => ApiError::unavailable("store", e),
            S::Conflict(m) => ApiError::Conflict("conflict", m),
            S::UnknownUser(u) => ApiError::NotFound(format!("unknown user {u}")),
            S::Corrupt(m) => ApiError::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, field, retry_after) = match self {
            ApiError::BadRequest {
                code,
                message,
                field,
            } => (StatusCode::BAD_REQUEST, code, message, field, None),
            ApiError::Unauthorized(m) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                m.to_owned(),
                None,
                None,
            ),
            ApiError::Forbidden(code, m) => (StatusCode::FORBIDDEN, code, m, None, None),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m, None, None),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this method is not allowed on this path".to_owned(),
                None,
                None,
            ),
            ApiError::Conflict(code, m) => (StatusCode::CONFLICT, code, m, None, None),
            ApiError::PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body must be at most {limit} bytes"),
                None,
                None,
            ),
            ApiError::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request's body did not arrive in time".to_owned(),
                None,
                None,
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type must be application/json".to_owned(),
                None,
                None,
            ),
            ApiError::Unprocessable(code, m) => {
                (StatusCode::UNPROCESSABLE_ENTITY, code, m, None, None)
            }
            ApiError::TooManyRequests {
                retry_after,
                message,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "backlog_full",
                message,
                None,
                Some(retry_after),
            ),
            ApiError::RateLimited {
                retry_after,
                message,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                message,
                None,
                Some(retry_after),
            ),
            ApiError::QuotaReached {
                retry_after,
                message,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "backlog_quota",
                message,
                None,
                Some(retry_after),
            ),
            ApiError::TooManyStreams(max) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!("this API key has {max} event streams open, as many as it may; close one"),
                None,
                Some(5),
            ),
            ApiError::Unavailable {
                retry_after,
                message,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                message,
                None,
                Some(retry_after),
            ),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "an internal error occurred; it has been logged".to_owned(),
                    None,
                    None,
                )
            }
        };
        let body = ErrorBody {
            ok: false,
            error: ErrorDetail {
                code: code.to_owned(),
                message,
                field,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
