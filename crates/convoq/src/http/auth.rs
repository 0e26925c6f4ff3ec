//! Authentication: `Authorization: Bearer <secret>` against the configured keys' SHA-256
//! digests, compared in constant time, or the operator console's session cookie
//! (`console.rs`); protected mode (no keys: loopback clients only, and none that a proxy
//! relayed) when none are configured.
//! The resolved [`Caller`] goes into request extensions. A state-changing request that a
//! browser says another site made is refused (`console::cross_site`).
//!
//! `/healthz` and `/readyz` are open; `/metrics` is open unless a metrics key is configured;
//! the console's page, assets, login and logout are open (`console::is_open`), and so are the
//! OpenAPI document and its page (`openapi::is_open`).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::{console, openapi, AppState};
use crate::config::{digest, ApiKey, Config, Role};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name (`local` in protected mode).
    pub name: String,
    /// Its role.
    pub role: Role,
}

impl Caller {
    /// Refuses callers without the admin role.
    ///
    /// # Errors
    /// 403 when the caller is not an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "forbidden",
                "this operation needs an admin key".into(),
            ))
        }
    }

    /// Whether the caller may see a job enqueued by `actor`.
    pub fn may_see(&self, actor: Option<&str>) -> bool {
        self.role == Role::Admin || actor == Some(self.name.as_str())
    }
}

/// The configured key whose secret has digest `d`. Compares against every key, without
/// stopping at a match, so that timing says nothing.
pub(super) fn key_of<'a>(config: &'a Config, d: &[u8; 32]) -> Option<&'a ApiKey> {
    let mut found = None;
    for key in &config.api_keys {
        if bool::from(key.digest.ct_eq(d)) {
            found = Some(key);
        }
    }
    found
}

fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The header that says a proxy relayed the request, if one does.
fn relayed_by(req: &Request) -> Option<&'static str> {
    ["forwarded", "x-forwarded-for", "x-real-ip"]
        .into_iter()
        .find(|h| req.headers().contains_key(*h))
}

/// The middleware.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" || console::is_open(path) || openapi::is_open(path) {
        return next.run(req).await;
    }
    if let Err(e) = console::cross_site(&req) {
        return e.into_response();
    }
    let config = &state.config;
    let presented = bearer(&req).map(digest);
    if path == "/metrics" {
        let Some(metrics_key) = config.metrics_key else {
            return next.run(req).await;
        };
        let ok = presented.is_some_and(|d| {
            bool::from(d.ct_eq(&metrics_key))
                | config
                    .api_keys
                    .iter()
                    .any(|k| k.role == Role::Admin && bool::from(k.digest.ct_eq(&d)))
        });
        if !ok {
            return ApiError::Unauthorized("/metrics needs the metrics key or an admin key")
                .into_response();
        }
        return next.run(req).await;
    }
    let caller = if config.protected_mode() {
        let loopback = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .is_some_and(|ConnectInfo(addr)| addr.ip().is_loopback());
        if !loopback {
            return ApiError::Forbidden(
                "protected_mode",
                "no API keys are configured, so this server only serves loopback clients; set CONVOQ_API_KEYS".into(),
            )
            .into_response();
        }
        // A reverse proxy on this machine connects from loopback for every client it relays:
        // served as "local", each would be an admin.
        if let Some(header) = relayed_by(&req) {
            return ApiError::Forbidden(
                "protected_mode",
                format!(
                    "this request was relayed by a proxy ({header} is set), and protected mode \
                     serves only clients on this machine; set CONVOQ_API_KEYS to serve through \
                     a proxy"
                ),
            )
            .into_response();
        }
        Caller {
            name: "local".into(),
            role: Role::Admin,
        }
    } else {
        let Some(d) = presented else {
            return match console::session_caller(&state, &req) {
                Some(Ok(caller)) => {
                    if let Err(e) = state.limits.admit_key(&caller.name, &state.metrics) {
                        return e.into_response();
                    }
                    req.extensions_mut().insert(caller);
                    next.run(req).await
                }
                Some(Err(e)) => e.into_response(),
                None => {
                    ApiError::Unauthorized("send Authorization: Bearer <api key>").into_response()
                }
            };
        };
        match key_of(config, &d) {
            Some(k) => Caller {
                name: k.name.clone(),
                role: k.role,
            },
            None => return ApiError::Unauthorized("unknown API key").into_response(),
        }
    };
    if let Err(e) = state.limits.admit_key(&caller.name, &state.metrics) {
        return e.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}
