//! The parsers of the settings' text (see `settings.rs`): each takes what a flag, a variable
//! or the file gave and answers the typed value, or a message naming what is wrong (the caller
//! adds which setting). A message never repeats a secret.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;

use convoq_queue::sql::{Durability, SqliteFile};

use super::{digest, ApiKey, Backend, LogFormat, Role, Secret};

/// What a parser answers: the value, or what is wrong with the text.
pub(super) type Parsed<T> = Result<T, String>;

/// The kinds `--database-url` takes.
const STORE_BACKENDS: &[Backend] = &[Backend::Sqlite, Backend::Postgres];
/// The kinds `--queue-url` takes.
const QUEUE_BACKENDS: &[Backend] = &[Backend::Sqlite, Backend::Postgres, Backend::Redis];

pub(super) fn address(text: &str) -> Parsed<SocketAddr> {
    text.trim()
        .parse()
        .map_err(|e| format!("{text:?} is not an address like 127.0.0.1:3000: {e}"))
}

/// A whole number from `min` to `max`.
pub(super) fn number(min: u64, max: u64) -> impl Fn(&str) -> Parsed<u64> {
    move |text| {
        let n = text
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("{text:?} is not a whole number"))?;
        if n < min || n > max {
            return Err(format!("{n} is outside {min} to {max}"));
        }
        Ok(n)
    }
}

/// `true`, `1`, `yes` or `on`; `false`, `0`, `no` or `off` (any case).
pub(super) fn boolean(text: &str) -> Parsed<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{text:?}: expected true or false")),
    }
}

pub(super) fn store_url(text: &str) -> Parsed<String> {
    url(text, STORE_BACKENDS)
}

pub(super) fn queue_url(text: &str) -> Parsed<String> {
    url(text, QUEUE_BACKENDS)
}

/// A URL of one of the `accepted` kinds (a Postgres one must parse, a SQLite one must name a
/// file). Messages show the URL with its password hidden.
fn url(text: &str, accepted: &[Backend]) -> Parsed<String> {
    let shown = convoq_queue::sql::redact_url(text);
    match Backend::of(text) {
        Some(b) if accepted.contains(&b) => {
            match b {
                // The parser's message names the part at fault, never the password.
                Backend::Postgres => {
                    sqlx::postgres::PgConnectOptions::from_str(text)
                        .map_err(|e| format!("{shown:?}: {e}"))?;
                }
                Backend::Sqlite => {
                    SqliteFile::from_url(text)?;
                }
                Backend::Redis => {}
            }
            Ok(text.to_owned())
        }
        _ => {
            let expected: Vec<&str> = accepted.iter().map(|b| b.example()).collect();
            Err(format!(
                "{shown:?}: expected a URL like {}",
                expected.join(" or ")
            ))
        }
    }
}

/// The BullMQ engine's key prefix (BullMQ forbids `:` in it).
pub(super) fn queue_prefix(text: &str) -> Parsed<String> {
    if text.is_empty() || text.contains([':', '{', '}']) || text.chars().any(char::is_control) {
        return Err(format!(
            "{text:?}: must be non-empty, without ':', braces or control characters"
        ));
    }
    Ok(text.to_owned())
}

/// Comma-separated `name:role:secret` entries, names unique.
pub(super) fn api_keys(text: &str) -> Parsed<Vec<ApiKey>> {
    let mut keys: Vec<ApiKey> = Vec::new();
    for spec in text.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let key = api_key(spec)?;
        if keys.iter().any(|k| k.name == key.name) {
            return Err(format!("key name {:?} appears twice", key.name));
        }
        keys.push(key);
    }
    Ok(keys)
}

fn api_key(spec: &str) -> Parsed<ApiKey> {
    let mut parts = spec.splitn(3, ':');
    let (Some(name), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        // Never echo the entry: it may hold a secret.
        return Err("each key must be name:role:secret".into());
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err("a key name must be 1 to 64 characters A-Z a-z 0-9 _ -".into());
    }
    let role = match role {
        "service" => Role::Service,
        "admin" => Role::Admin,
        _ => return Err(format!("key {name:?}: role must be service or admin")),
    };
    if secret.len() < 16 {
        return Err(format!(
            "key {name:?}: the secret must be at least 16 characters"
        ));
    }
    Ok(ApiKey {
        name: name.to_owned(),
        role,
        digest: digest(Secret::new(secret).expose()),
    })
}

/// The digest of the `/metrics` bearer secret, at least 16 characters.
pub(super) fn metrics_key(text: &str) -> Parsed<[u8; 32]> {
    if text.len() < 16 {
        return Err("must be at least 16 characters".into());
    }
    Ok(digest(text))
}

/// `queue=number` pairs, each queue one convoq runs, each number 1 to 1024.
pub(super) fn concurrency(text: &str) -> Parsed<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (q, n) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected queue=number"))?;
        let (q, n) = (q.trim(), n.trim());
        if !super::DEFAULT_CONCURRENCY
            .iter()
            .any(|(known, _)| *known == q)
        {
            return Err(format!(
                "unknown queue {q:?}: expected database, audit or chat"
            ));
        }
        let n = n
            .parse::<usize>()
            .map_err(|_| format!("{part:?}: {n:?} is not a whole number"))?;
        if n == 0 || n > 1024 {
            return Err(format!("{q}={n}: must be 1 to 1024"));
        }
        out.insert(q.to_owned(), n);
    }
    Ok(out)
}

pub(super) fn log_format(text: &str) -> Parsed<LogFormat> {
    match text.trim() {
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        other => Err(format!("{other:?}: expected json or pretty")),
    }
}

/// A `tracing` filter, checked by parsing it.
pub(super) fn log_filter(text: &str) -> Parsed<String> {
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| format!("{text:?}: {e}"))?;
    Ok(text.to_owned())
}

/// Comma-separated modes of 1 to 32 characters, the default one among them.
pub(super) fn personality_modes(text: &str) -> Parsed<Vec<String>> {
    let modes: Vec<String> = text
        .split(',')
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    if modes.is_empty()
        || modes.iter().any(|m| {
            m.len() > 32
                || m.chars()
                    .any(|c| !c.is_ascii_alphanumeric() && c != '_' && c != '-')
        })
    {
        return Err("must list 1 or more modes of 1 to 32 characters A-Z a-z 0-9 _ -".into());
    }
    if !modes.iter().any(|m| m == crate::domain::DEFAULT_MODE) {
        return Err(format!(
            "must include the default mode {:?}",
            crate::domain::DEFAULT_MODE
        ));
    }
    Ok(modes)
}

pub(super) fn durability(text: &str) -> Parsed<Durability> {
    text.trim().parse()
}
