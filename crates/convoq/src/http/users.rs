//! `PUT /api/users/{id}`: create or update a user.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;

use super::extract::{json_object, optional_str, required_str};
use super::{ok_json, ApiResult, AppState};
use crate::domain::{DiscordId, DisplayName, UserId};

/// `PUT /api/users/{id}` with `{discordId, username, globalName?}`: 201 when created, 200 when
/// updated, 409 when another user has the Discord id.
#[utoipa::path(put, path = "/api/users/{id}", operation_id = "putUser", tag = "users", security(("apiKey" = ["service", "admin"]), ("consoleSession" = [])),
    params(("id" = String, Path, description = "The user's id: 1 to 64 characters")),
    request_body(content = super::openapi::PutUser, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = super::openapi::UserBody),
        (status = 200, description = "Updated", body = super::openapi::UserBody),
        (status = 400, description = "`malformed_json`, `unknown_field`, `invalid_field`", body = super::error::ErrorBody),
        (status = 409, description = "`conflict`: another user has this discordId", body = super::error::ErrorBody),
        (status = 413, description = "`payload_too_large`", body = super::error::ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = super::error::ErrorBody),
    ))]
pub async fn put(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let id = UserId::parse("id", &id)?;
    let within = state.config.header_read_timeout;
    let map = json_object(
        &headers,
        body,
        &["discordId", "username", "globalName"],
        within,
    )
    .await?;
    let discord_id = DiscordId::parse(required_str(&map, "discordId")?)?;
    let username = DisplayName::parse("username", required_str(&map, "username")?)?;
    let global_name = optional_str(&map, "globalName")?
        .map(|g| DisplayName::parse("globalName", g))
        .transpose()?;
    let (user, created) = state
        .store
        .upsert_user(
            id.as_str(),
            discord_id.as_str(),
            username.as_str(),
            global_name.as_ref().map(|g| g.as_str()),
        )
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(ok_json(status, json!({ "ok": true, "user": user })))
}
