//! The operator console: one page at `/ui`, served from the binary (its HTML, stylesheet and
//! script are embedded at build time; nothing is fetched at run time), which reads and acts
//! through the JSON API like any other client.
//!
//! Access is for admins only. With API keys configured, `POST /ui/login` takes an admin key
//! and sets an `HttpOnly`, `SameSite=Strict` session cookie; the key itself never stays in the
//! page. The authentication middleware takes the cookie as it takes a bearer key, and a request
//! that changes state with it must carry the session's CSRF token in `X-CSRF-Token`
//! (`GET /ui/session` gives it to the page). In protected mode (no keys) a loopback browser is
//! an admin, as a loopback API client is, and needs no login. Every request that changes state
//! is refused when the browser says it comes from another site ([`cross_site`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use rand::RngCore;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::{ok_json, record_action, ApiResult, AppState, Caller, RequestId};
use crate::config::{digest, Role};

/// The session cookie's name.
pub const COOKIE: &str = "convoq_session";
/// The header that carries the CSRF token of a cookie session.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after its login.
const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
/// The most sessions kept at once; a login beyond it ends the oldest.
const MAX_SESSIONS: usize = 1000;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// What a page may do: its own script and stylesheet, requests to its own origin, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A console session.
#[derive(Clone)]
pub struct Session {
    /// The admin key's name: the actor of what the session does.
    pub name: String,
    /// The token a state-changing request must echo in `X-CSRF-Token`.
    pub csrf: String,
    expires: Instant,
}

/// The open console sessions, by the SHA-256 of their cookie (the cookie itself is not kept).
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<[u8; 32], Session>>);

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// Opens a session for `name`; returns its cookie value.
    fn open(&self, name: &str) -> String {
        let token = random_token();
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(
            digest(&token),
            Session {
                name: name.to_owned(),
                csrf: random_token(),
                expires: now + SESSION_LIFE,
            },
        );
        token
    }

    /// The live session of this cookie value.
    fn get(&self, token: &str) -> Option<Session> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&digest(token))
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    fn close(&self, token: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&digest(token));
    }
}

/// The session cookie's value in `headers`, if any.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .filter(|t| !t.is_empty())
}

/// The caller a session cookie stands for, checked for CSRF when the request changes state.
/// `None` when the request has no session cookie, or one that is not live.
///
/// # Errors
/// 403 when a state-changing request's `X-CSRF-Token` is missing or wrong.
pub fn session_caller(state: &AppState, req: &Request) -> Option<Result<Caller, ApiError>> {
    let session = state.sessions.get(cookie(req.headers())?)?;
    if !is_safe(req.method()) {
        let sent = req
            .headers()
            .get(CSRF_HEADER)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if !bool::from(sent.ct_eq(session.csrf.as_bytes())) {
            return Some(Err(ApiError::Forbidden(
                "csrf",
                format!(
                    "a console request that changes state needs the session's {CSRF_HEADER} header"
                ),
            )));
        }
    }
    Some(Ok(Caller {
        name: session.name,
        role: Role::Admin,
    }))
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Refuses a state-changing request that a browser says another site made (`Sec-Fetch-Site`
/// other than `same-origin` or `none`; without that header, an `Origin` whose host is not this
/// request's `Host`). Clients that are not browsers send neither header and are not concerned. This
/// matters most in protected mode, where any loopback request is an admin's.
///
/// # Errors
/// 403 for such a request.
pub fn cross_site(req: &Request) -> Result<(), ApiError> {
    if is_safe(req.method()) {
        return Ok(());
    }
    let headers = req.headers();
    let refused = || {
        Err(ApiError::Forbidden(
            "cross_site",
            "a request from another site cannot change state here".into(),
        ))
    };
    // A browser that says where the request comes from is believed; only one that does not
    // (older than 2023) is judged by its Origin against the Host it asked, which a reverse
    // proxy may have rewritten.
    if let Some(site) = headers.get("sec-fetch-site") {
        return if matches!(site.as_bytes(), b"same-origin" | b"none") {
            Ok(())
        } else {
            refused()
        };
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).map(HeaderValue::as_bytes);
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, h)| h.as_bytes());
        if origin_host.is_none() || origin_host != host {
            return refused();
        }
    }
    Ok(())
}

/// Paths the authentication middleware lets through without a caller: the page and its assets,
/// and the login and logout, which authenticate themselves.
pub fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/" | "/ui" | "/ui/console.js" | "/ui/console.css" | "/ui/login" | "/ui/logout"
    )
}

pub(super) fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: to the console.
#[utoipa::path(get, path = "/", operation_id = "root", tag = "console", security(()),
    responses((status = 303, description = "To the console", headers(("Location" = String, description = "`/ui`")))))]
pub async fn root() -> Redirect {
    Redirect::to("/ui")
}

/// `GET /ui`.
#[utoipa::path(get, path = "/ui", operation_id = "console", tag = "console", security(()),
    responses((status = 200, description = "The operator console (it reads and acts through this API)", body = String, content_type = "text/html")))]
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /ui/console.js`.
#[utoipa::path(get, path = "/ui/console.js", operation_id = "consoleScript", tag = "console", security(()),
    responses((status = 200, description = "The console's script", body = String, content_type = "text/javascript")))]
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /ui/console.css`.
#[utoipa::path(get, path = "/ui/console.css", operation_id = "consoleStyle", tag = "console", security(()),
    responses((status = 200, description = "The console's stylesheet", body = String, content_type = "text/css")))]
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /ui/session`: who the page acts as, and the CSRF token its requests carry.
#[utoipa::path(get, path = "/ui/session", operation_id = "consoleSession", tag = "console", security(("apiKey" = ["admin"]), ("consoleSession" = [])),
    responses((status = 200, description = "Who the caller is, and the session's CSRF token", body = super::openapi::Session)))]
pub async fn session(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> ApiResult {
    caller.require_admin()?;
    let csrf = cookie(&headers)
        .and_then(|t| state.sessions.get(t))
        .map(|s| s.csrf);
    Ok(ok_json(
        StatusCode::OK,
        json!({
            "ok": true,
            "name": caller.name,
            "csrf": csrf,
            "protectedMode": state.config.protected_mode(),
        }),
    ))
}

/// The login form's body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    key: String,
}

/// `POST /ui/login` with `{"key": "<admin key>"}`: opens a session and sets its cookie.
#[utoipa::path(post, path = "/ui/login", operation_id = "consoleLogin", tag = "console", security(()),
    request_body(content = super::openapi::Login, content_type = "application/json"),
    responses(
        (status = 200, description = "A session: its cookie is set (HttpOnly, SameSite=Strict, 12 hours)", body = super::openapi::LoggedIn,
            headers(("Set-Cookie" = String, description = "`convoq_session=…`"))),
        (status = 400, description = "`malformed_json`", body = super::error::ErrorBody),
        (status = 401, description = "`unauthorized`: not a configured key", body = super::error::ErrorBody),
        (status = 403, description = "`forbidden`: not an admin key, or a cross-site request", body = super::error::ErrorBody),
        (status = 409, description = "`protected_mode`: no keys are configured, no login needed", body = super::error::ErrorBody),
        (status = 413, description = "`payload_too_large`", body = super::error::ErrorBody),
    ))]
pub async fn login(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    req: Request,
) -> ApiResult {
    cross_site(&req)?;
    if state.config.protected_mode() {
        return Err(ApiError::Conflict(
            "protected_mode",
            "no API keys are configured: the console needs no login from loopback".into(),
        ));
    }
    let within = state.config.header_read_timeout;
    let body = super::extract::read_body(req.into_body(), 4096, within).await?;
    let login: Login = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
        code: "malformed_json",
        message: format!("send {{\"key\": \"<admin API key>\"}}: {e}"),
        field: None,
    })?;
    let key = super::auth::key_of(&state.config, &digest(login.key.trim()))
        .ok_or(ApiError::Unauthorized("unknown API key"))?;
    if key.role != Role::Admin {
        return Err(ApiError::Forbidden(
            "forbidden",
            "the console needs an admin key".into(),
        ));
    }
    let token = state.sessions.open(&key.name);
    let who = Caller {
        name: key.name.clone(),
        role: key.role,
    };
    record_action(&state, &who, &request_id, "console.login", "console").await;
    let mut resp = ok_json(StatusCode::OK, json!({ "ok": true, "name": key.name }));
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_LIFE.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// `POST /ui/logout`: ends the session and clears its cookie.
#[utoipa::path(post, path = "/ui/logout", operation_id = "consoleLogout", tag = "console", security(()),
    responses((status = 200, description = "The session ends and its cookie is cleared", body = super::openapi::Ok,
        headers(("Set-Cookie" = String, description = "An expired `convoq_session`")))))]
pub async fn logout(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    req: Request,
) -> ApiResult {
    cross_site(&req)?;
    if let Some(token) = cookie(req.headers()) {
        if let Some(session) = state.sessions.get(token) {
            let who = Caller {
                name: session.name,
                role: Role::Admin,
            };
            record_action(&state, &who, &request_id, "console.logout", "console").await;
        }
        state.sessions.close(token);
    }
    let mut resp = ok_json(StatusCode::OK, json!({ "ok": true }));
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("convoq_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(resp)
}
