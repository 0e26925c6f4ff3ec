//! Reading request bodies strictly: JSON content type (415), at most [`BODY_LIMIT`] bytes (413),
//! well-formed JSON (400), an object with only known fields (400 naming the field), and fields
//! of the right type (400 naming the field).

use axum::body::Body;
use axum::http::{header, HeaderMap};
use serde_json::{Map, Value};

use super::error::ApiError;

/// The largest accepted body.
pub const BODY_LIMIT: usize = 16 * 1024;

/// Reads a body of at most `limit` bytes within `within` (the header read timeout: a body
/// trickled in a byte at a time must not hold a request forever either).
///
/// # Errors
/// 413 past the limit, 408 past the time.
pub async fn read_body(
    body: Body,
    limit: usize,
    within: std::time::Duration,
) -> Result<axum::body::Bytes, ApiError> {
    match tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::PayloadTooLarge(limit)),
        Err(_) => Err(ApiError::RequestTimeout),
    }
}

/// Reads a JSON object body with exactly the `allowed` fields (any may be absent), arriving
/// within `within`.
///
/// # Errors
/// The 4xx for the first rule broken.
pub async fn json_object(
    headers: &HeaderMap,
    body: Body,
    allowed: &[&str],
    within: std::time::Duration,
) -> Result<Map<String, Value>, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(ApiError::PayloadTooLarge(BODY_LIMIT));
    }
    let bytes = read_body(body, BODY_LIMIT, within).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest {
        code: "malformed_json",
        message: format!("the body is not valid JSON: {e}"),
        field: None,
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::BadRequest {
            code: "invalid_body",
            message: "the body must be a JSON object".into(),
            field: None,
        });
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::BadRequest {
            code: "unknown_field",
            message: format!(
                "unknown field {unknown:?}; allowed fields: {}",
                allowed.join(", ")
            ),
            field: Some(unknown.clone()),
        });
    }
    Ok(map)
}

/// A required string field.
///
/// # Errors
/// 400 naming the field when absent, null or not a string.
pub fn required_str<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Err(ApiError::field(field, format!("{field} is required"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::field(field, format!("{field} must be a string"))),
    }
}

/// An optional string field (absent or null is `None`).
///
/// # Errors
/// 400 naming the field when present but not a string.
pub fn optional_str<'a>(
    map: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::field(
            field,
            format!("{field} must be a string or null"),
        )),
    }
}

/// A bounded whole-number query parameter.
///
/// # Errors
/// 400 naming the parameter when it is not a whole number in `min..=max`.
pub fn query_number(
    value: Option<&String>,
    name: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ApiError> {
    let Some(v) = value else { return Ok(default) };
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::field(
            name,
            format!("{name} must be a whole number from {min} to {max}"),
        )),
    }
}
