//! Every setting, declared once: its field (also its key in the TOML file), flag, variable,
//! default and parser, in the one [`settings!`] table below. The macro makes from it the
//! command line's [`Settings`] (clap), the label errors name a setting by (`--flag (VAR)`), the
//! file keys accepted, and [`Values`]: each setting parsed from the first layer that sets it
//! (flag or variable, then the file, then its default).
//!
//! A value reads the same wherever it comes from: the file's numbers, booleans, lists and
//! tables are turned into the text a flag would carry (`a,b`, `k=v,k=v`) and go through the
//! same parser, so that a flag and a file key cannot accept different words.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::parse;
use super::{bad, ApiKey, ConfigError, LogFormat};

/// Declares the settings. Each entry: doc comment (its help), `field: Type = "flag", "VAR",
/// parser`, then `default EXPR` (any `Display` value, parsed like the setting's text) or none
/// (the field is then an `Option`), then any extra clap attributes in brackets.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $flag:literal, $env:literal, $parse:expr
            $(, default $default:expr)? $(, [$($extra:tt)*])?;
    )*) => {
        /// Settings from flags and environment; unset ones fall back to the file, then to their
        /// defaults (see `Values::read`).
        #[derive(Debug, Args, Default, Clone)]
        pub struct Settings {
            /// A TOML file with any of the settings below (snake_case keys).
            #[arg(long, env = "CONVOQ_CONFIG", global = true)]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(long = $flag, env = $env, global = true,
                      help = settings!(@help [$($doc)*] $($default)?) $(, $($extra)*)?)]
                pub $field: Option<String>,
            )*
        }

        /// Every setting's file key and label.
        pub(super) const SETTINGS: &[(&str, &str)] = &[
            $((stringify!($field), concat!("--", $flag, " (", $env, ")")),)*
        ];

        /// The settings parsed, each from the first layer that sets it.
        pub(super) struct Values {
            $(pub(super) $field: settings!(@ty $ty $(, $default)?),)*
        }

        impl Values {
            /// Parses every setting from `flags` (flags and environment), else `file`, else its
            /// default; the first invalid one is named in the error.
            pub(super) fn read(flags: Settings, file: &toml::Table) -> Result<Values, ConfigError> {
                if let Some(key) = file.keys().find(|k| SETTINGS.iter().all(|(s, _)| s != k)) {
                    return Err(bad(
                        "--config (CONVOQ_CONFIG)",
                        format!("unknown setting {key:?} in the file"),
                    ));
                }
                Ok(Values {$(
                    $field: {
                        const LABEL: &str = concat!("--", $flag, " (", $env, ")");
                        let text = match flags.$field {
                            Some(text) => Some(text),
                            None => file_text(file, stringify!($field), LABEL)?,
                        };
                        let parse = $parse;
                        settings!(@value text, LABEL, parse $(, $default)?)
                    },
                )*})
            }
        }
    };
    (@ty $ty:ty) => { Option<$ty> };
    (@ty $ty:ty, $default:expr) => { $ty };
    (@help [$($doc:literal)*]) => { concat!($($doc),*).trim() };
    (@help [$($doc:literal)*] $default:expr) => {
        format!(
            "{} [default: {}]",
            concat!($($doc),*).trim().trim_end_matches('.'),
            $default
        )
    };
    (@value $text:ident, $label:ident, $parse:ident) => {
        match $text {
            None => None,
            Some(t) => Some($parse(t.as_str()).map_err(|m| bad($label, m))?),
        }
    };
    (@value $text:ident, $label:ident, $parse:ident, $default:expr) => {{
        let t = $text.unwrap_or_else(|| $default.to_string());
        $parse(t.as_str()).map_err(|m| bad($label, m))?
    }};
}

settings! {
    /// HTTP address.
    listen: SocketAddr = "listen", "CONVOQ_LISTEN", parse::address, default super::DEFAULT_LISTEN;
    /// Address where `convoq worker` serves /healthz, /readyz and /metrics [default: none].
    worker_listen: SocketAddr = "worker-listen", "CONVOQ_WORKER_LISTEN", parse::address;
    /// Store URL: sqlite://PATH or postgres://USER@HOST/DATABASE.
    database_url: String = "database-url", "CONVOQ_DATABASE_URL", parse::store_url,
        default super::DEFAULT_DATABASE_URL;
    /// Queue engine URL: sqlite://PATH, postgres://…, or redis://… / rediss://… for BullMQ on
    /// Redis [default: the database URL].
    queue_url: String = "queue-url", "CONVOQ_QUEUE_URL", parse::queue_url;
    /// Redis key prefix of BullMQ queues.
    queue_prefix: String = "queue-prefix", "CONVOQ_QUEUE_PREFIX", parse::queue_prefix,
        default super::DEFAULT_QUEUE_PREFIX;
    /// true: start even if Redis's maxmemory-policy may evict job keys (warns).
    allow_redis_eviction: bool = "allow-redis-eviction", "CONVOQ_ALLOW_REDIS_EVICTION",
        parse::boolean, default false;
    /// Comma-separated name:role:secret, role service or admin [default: none, protected mode].
    api_keys: Vec<ApiKey> = "api-keys", "CONVOQ_API_KEYS", parse::api_keys,
        [hide_env_values = true];
    /// A secret that /metrics requires as a bearer token [default: none].
    metrics_key: [u8; 32] = "metrics-key", "CONVOQ_METRICS_KEY", parse::metrics_key,
        [hide_env_values = true];
    /// Per-queue worker concurrency, e.g. database=32,audit=4 [default: database=128,audit=4,
    /// chat=4 where the queue is the store's database, else database=32,audit=32,chat=4].
    concurrency: BTreeMap<String, usize> = "concurrency", "CONVOQ_CONCURRENCY",
        parse::concurrency;
    /// json or pretty [default: pretty on a terminal, else json].
    log_format: LogFormat = "log-format", "CONVOQ_LOG_FORMAT", parse::log_format;
    /// A tracing filter.
    log: String = "log", "CONVOQ_LOG", parse::log_filter, default "info";
    /// Comma-separated personality modes.
    personality_modes: Vec<String> = "personality-modes", "CONVOQ_PERSONALITY_MODES",
        parse::personality_modes, default crate::domain::DEFAULT_MODES.join(",");
    /// Requests per second one API key (or, in protected mode, the local caller) may make, in
    /// bursts of up to twice as many; beyond it 429 `rate_limited`. 0: no limit.
    key_rate_limit: u64 = "key-rate-limit", "CONVOQ_KEY_RATE_LIMIT",
        parse::number(0, 1_000_000), default 0;
    /// Conversation POSTs per second for one userId, in bursts of up to twice as many; beyond
    /// it 429 `rate_limited`. 0: no limit.
    user_rate_limit: u64 = "user-rate-limit", "CONVOQ_USER_RATE_LIMIT",
        parse::number(0, 1_000_000), default 0;
    /// Conversation jobs one API key (or, in protected mode, the local caller) may have queued
    /// through this process and not yet ended; beyond it 429 `backlog_quota`. 0: no quota.
    key_backlog_quota: u64 = "key-backlog-quota", "CONVOQ_KEY_BACKLOG_QUOTA",
        parse::number(0, 100_000_000), default 0;
    /// Conversation jobs one userId may have queued through this process and not yet ended;
    /// beyond it 429 `backlog_quota`. 0: no quota.
    user_backlog_quota: u64 = "user-backlog-quota", "CONVOQ_USER_BACKLOG_QUOTA",
        parse::number(0, 100_000_000), default 0;
    /// Connections open at once; one more is answered 503 and closed.
    max_connections: u64 = "max-connections", "CONVOQ_MAX_CONNECTIONS",
        parse::number(1, 1_000_000), default 10_000;
    /// How long a request's headers (and an idle keep-alive connection) may take, in
    /// milliseconds; the connection is closed after it.
    header_read_timeout_ms: u64 = "header-read-timeout-ms", "CONVOQ_HEADER_READ_TIMEOUT_MS",
        parse::number(100, 3_600_000), default 10_000;
    /// Job event streams (server-sent events) one API key may have open at once.
    max_streams_per_key: u64 = "max-streams-per-key", "CONVOQ_MAX_STREAMS_PER_KEY",
        parse::number(1, 100_000), default 64;
    /// Backlog above which POSTs answer 429.
    max_backlog: u64 = "max-backlog", "CONVOQ_MAX_BACKLOG", parse::number(1, u64::MAX),
        default super::DEFAULT_MAX_BACKLOG;
    /// Seconds in-flight jobs get at shutdown.
    shutdown_grace: u64 = "shutdown-grace", "CONVOQ_SHUTDOWN_GRACE", parse::number(0, 3600),
        default super::DEFAULT_SHUTDOWN_GRACE.as_secs();
    /// Job lease in milliseconds.
    lease_ms: u64 = "lease-ms", "CONVOQ_LEASE_MS", parse::number(500, 3_600_000),
        default super::DEFAULT_LEASE.as_millis();
    /// SQLite durability: normal, full or off.
    durability: convoq_queue::sql::Durability = "durability", "CONVOQ_DURABILITY",
        parse::durability, default "normal";
    /// SQLite and Postgres queues: how long a write may take before it fails as unavailable
    /// (a POST then answers 503), in milliseconds.
    write_timeout_ms: u64 = "write-timeout-ms", "CONVOQ_WRITE_TIMEOUT_MS",
        parse::number(100, 600_000), default convoq_queue::sql::DEFAULT_WRITE_TIMEOUT.as_millis();
    /// Postgres: most connections of the queue engine per process; the store's pool gets half
    /// as many again.
    pg_max_connections: u64 = "pg-max-connections", "CONVOQ_PG_MAX_CONNECTIONS",
        parse::number(3, 1000), default super::DEFAULT_PG_MAX_CONNECTIONS;
    /// Postgres: statement timeout in milliseconds.
    pg_statement_timeout_ms: u64 = "pg-statement-timeout-ms", "CONVOQ_PG_STATEMENT_TIMEOUT_MS",
        parse::number(100, 3_600_000), default super::DEFAULT_PG_STATEMENT_TIMEOUT.as_millis();
    /// Postgres: no LISTEN/NOTIFY, poll only (for transaction-mode poolers); a bare
    /// --pg-poll-only means true, or give --pg-poll-only=false.
    pg_poll_only: bool = "pg-poll-only", "CONVOQ_PG_POLL_ONLY", parse::boolean, default false,
        [num_args = 0..=1, require_equals = true, default_missing_value = "true"];
}

/// A file key's value as the text a flag would carry: numbers and booleans as written, a list
/// as `a,b`, a table as `k=v,k=v`. A list item or table key with a comma is refused, as a flag
/// could not carry it either.
fn file_text(
    file: &toml::Table,
    key: &str,
    label: &'static str,
) -> Result<Option<String>, ConfigError> {
    use toml::Value;
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::String(s) if !s.contains(',') => Some(s.clone()),
            Value::Integer(i) => Some(i.to_string()),
            Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        }
    }
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    let text = match value {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<String>>>()
            .map(|items| items.join(",")),
        Value::Table(t) => t
            .iter()
            .map(|(k, v)| Some(format!("{k}={}", scalar(v).filter(|_| !k.contains(','))?)))
            .collect::<Option<Vec<String>>>()
            .map(|items| items.join(",")),
        other => scalar(other),
    };
    text.map(Some).ok_or_else(|| {
        bad(
            label,
            format!(
                "the file's {key} must be a string, number, boolean, or a list or table of \
                 them without commas"
            ),
        )
    })
}
