//! Typed configuration, layered: defaults ← TOML file (`--config`) ← `CONVOQ_*` environment ←
//! flags. [`Config::load`] validates everything at start-up and names the setting at fault.
//!
//! Secrets (API keys) live in [`Secret`], which prints as `***`, and only their SHA-256 digests
//! are kept after parsing.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use convoq_queue::sql::SqliteFile;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::domain::DEFAULT_MODES;

/// Default HTTP address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
/// Default store (and queue) URL: one SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://convoq.db";
/// The Redis key prefix of the BullMQ engine: Node BullMQ's default, so that Node producers and
/// dashboards find convoq's queues without configuration.
pub const DEFAULT_QUEUE_PREFIX: &str = "bull";
/// Default per-queue worker concurrency where processors write to a store of their own (the
/// queue on Redis, or on another database than the store): each slot then holds a store
/// connection while its job runs.
pub const DEFAULT_CONCURRENCY: [(&str, usize); 3] = [("database", 32), ("audit", 32), ("chat", 4)];
/// Default per-queue worker concurrency where the queue and the store are one SQL database (the
/// embedded default, or Postgres for both): a slot holds no connection (the conversation and
/// audit inserts run in the queue writer's completion transaction), and the more jobs in flight,
/// the more each of the writer's commits carries. At 32 the embedded default accepted faster
/// than it processed under load, and the backlog grew; at 128 it keeps pace (`BENCHMARKS.md`).
/// The audit record commits with its conversation there, so `audit` serves only the
/// `record_audit_event` jobs other producers add (a Node producer, say): 4 slots.
pub const SHARED_SQL_CONCURRENCY: [(&str, usize); 3] =
    [("database", 128), ("audit", 4), ("chat", 4)];
/// Default backlog (waiting + delayed jobs) above which POSTs get 429.
pub const DEFAULT_MAX_BACKLOG: u64 = 100_000;
/// Default grace period for in-flight jobs at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default job lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default most Postgres connections of the queue engine per process.
pub const DEFAULT_PG_MAX_CONNECTIONS: u32 = 10;
/// Default server-side statement timeout on Postgres.
pub const DEFAULT_PG_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The kind of database or service a URL names, by its scheme. Each URL setting says which
/// kinds it accepts; a new engine adds a variant here and to the settings that take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://PATH` or `sqlite:PATH`.
    Sqlite,
    /// `postgres://…` or `postgresql://…`.
    Postgres,
    /// `redis://…` or `rediss://…` (TLS): the BullMQ engine.
    Redis,
}

impl Backend {
    /// Every kind, with the URL prefixes that name it.
    const PREFIXES: [(Backend, &'static [&'static str]); 3] = [
        (Backend::Sqlite, &["sqlite:"]),
        (Backend::Postgres, &["postgres://", "postgresql://"]),
        (Backend::Redis, &["redis://", "rediss://"]),
    ];

    /// The kind `url` names, if any.
    pub fn of(url: &str) -> Option<Backend> {
        Self::PREFIXES
            .iter()
            .find(|(_, prefixes)| prefixes.iter().any(|p| url.starts_with(p)))
            .map(|(b, _)| *b)
    }

    /// How URLs of this kind start, for error messages.
    fn example(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite://PATH",
            Backend::Postgres => "postgres://USER@HOST/DATABASE",
            Backend::Redis => "redis://HOST[:PORT]",
        }
    }
}

/// Whether the queue lives in the store's own SQL database (the embedded default, or Postgres
/// for both), so that a job's effect can commit with its completion.
///
/// SQLite URLs name one database when they name the same file, however they spell it
/// (`sqlite:x.db`, `sqlite://./x.db`, an absolute path: see `SqliteFile::same_database`);
/// Postgres URLs when they are equal.
pub fn queue_is_store(queue_url: &str, database_url: &str) -> bool {
    match (Backend::of(queue_url), Backend::of(database_url)) {
        (Some(Backend::Sqlite), Some(Backend::Sqlite)) => {
            match (
                SqliteFile::from_url(queue_url),
                SqliteFile::from_url(database_url),
            ) {
                (Ok(q), Ok(d)) => q.same_database(&d),
                _ => false,
            }
        }
        (Some(Backend::Postgres), Some(Backend::Postgres)) => queue_url == database_url,
        _ => false,
    }
}

/// The kinds `--database-url` takes.
const STORE_BACKENDS: &[Backend] = &[Backend::Sqlite, Backend::Postgres];
/// The kinds `--queue-url` takes.
const QUEUE_BACKENDS: &[Backend] = &[Backend::Sqlite, Backend::Postgres, Backend::Redis];

/// A database or Redis URL, which may carry a password: printed (`Display`, `Debug`) with the
/// password replaced by `***`; [`SecretUrl::expose`] gives the URL itself, to connect with.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }
    /// The URL itself, password included: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&convoq_queue::sql::redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

/// A secret string: never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Conversations, users, and its own jobs.
    Service,
    /// Everything, including queue operations.
    Admin,
}

/// A configured API key: its name (the actor in logs and audit), role, and the SHA-256 of its
/// secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The key's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// SHA-256 of the secret.
    pub digest: [u8; 32],
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Readable lines (a terminal).
    Pretty,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP address.
    pub listen: SocketAddr,
    /// Where a `convoq worker` process serves `/healthz`, `/readyz` and `/metrics`; `None`:
    /// it serves no HTTP.
    pub worker_listen: Option<SocketAddr>,
    /// The store's URL.
    pub database_url: SecretUrl,
    /// The queue engine's URL (the store's by default).
    pub queue_url: SecretUrl,
    /// The BullMQ engine's Redis key prefix (`redis://` queue URLs only).
    pub queue_prefix: String,
    /// Start even when Redis may evict keys (`maxmemory-policy` other than `noeviction`),
    /// with a warning instead of a refusal.
    pub allow_redis_eviction: bool,
    /// API keys; none means protected mode (loopback clients only).
    pub api_keys: Vec<ApiKey>,
    /// A key that `/metrics` requires, if any.
    pub metrics_key: Option<[u8; 32]>,
    /// Worker concurrency per queue.
    pub concurrency: BTreeMap<String, usize>,
    /// Log format; `None` picks by whether stderr is a terminal.
    pub log_format: Option<LogFormat>,
    /// A `tracing` filter.
    pub log_filter: String,
    /// The personality modes offered.
    pub personality_modes: Vec<String>,
    /// Backlog above which POSTs answer 429.
    pub max_backlog: u64,
    /// Grace period for in-flight jobs at shutdown.
    pub shutdown_grace: Duration,
    /// Job lease.
    pub lease: Duration,
    /// SQLite durability (`normal`, `full`, `off`).
    pub durability: convoq_queue::sql::Durability,
    /// How long a write to the SQL queue (a POST's add, a job's completion) may take before
    /// it fails as unavailable (503 with `Retry-After` for a POST).
    pub write_timeout: Duration,
    /// Postgres: the most connections the queue engine opens in this process (the store's
    /// pool gets half as many again, at least 2).
    pub pg_max_connections: u32,
    /// Postgres: the server-side `statement_timeout` of every connection.
    pub pg_statement_timeout: Duration,
    /// Postgres: find jobs by polling only, without `LISTEN` (behind a transaction-mode
    /// connection pooler).
    pub pg_poll_only: bool,
}

/// The command line. Every option also reads a `CONVOQ_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "convoq",
    version,
    about = "convoq: a conversation service for chat products"
)]
pub struct Cli {
    /// What to run (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings.
    #[command(flatten)]
    pub settings: Settings,
}

/// Subcommands.
#[derive(Debug, Subcommand, Clone, PartialEq, Eq)]
pub enum Command {
    /// Serve the HTTP API, with workers unless --no-workers.
    Serve {
        /// Run the API only; jobs are processed by `convoq worker` processes.
        #[arg(long)]
        no_workers: bool,
    },
    /// Run workers only.
    Worker,
    /// Apply database migrations and exit.
    Migrate,
}

/// Settings from flags and environment; unset ones fall back to the file, then defaults.
#[derive(Debug, Args, Default, Clone)]
pub struct Settings {
    /// A TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "CONVOQ_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// HTTP address [default: 127.0.0.1:3000].
    #[arg(long, env = "CONVOQ_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Address where `convoq worker` serves /healthz, /readyz and /metrics [default: none].
    #[arg(long, env = "CONVOQ_WORKER_LISTEN", global = true)]
    pub worker_listen: Option<String>,
    /// Store URL: sqlite://PATH or postgres://USER@HOST/DATABASE [default: sqlite://convoq.db].
    #[arg(long, env = "CONVOQ_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Queue engine URL: sqlite://PATH, postgres://…, or redis://… / rediss://… for BullMQ on
    /// Redis [default: the database URL].
    #[arg(long, env = "CONVOQ_QUEUE_URL", global = true)]
    pub queue_url: Option<String>,
    /// Redis key prefix of BullMQ queues [default: bull].
    #[arg(long, env = "CONVOQ_QUEUE_PREFIX", global = true)]
    pub queue_prefix: Option<String>,
    /// true: start even if Redis's maxmemory-policy may evict job keys (warns) [default: false].
    #[arg(long, env = "CONVOQ_ALLOW_REDIS_EVICTION", global = true)]
    pub allow_redis_eviction: Option<String>,
    /// Comma-separated name:role:secret, role service or admin.
    #[arg(long, env = "CONVOQ_API_KEYS", global = true, hide_env_values = true)]
    pub api_keys: Option<String>,
    /// A secret that /metrics requires as a bearer token.
    #[arg(
        long,
        env = "CONVOQ_METRICS_KEY",
        global = true,
        hide_env_values = true
    )]
    pub metrics_key: Option<String>,
    /// Per-queue worker concurrency, e.g. database=32,audit=4.
    #[arg(long, env = "CONVOQ_CONCURRENCY", global = true)]
    pub concurrency: Option<String>,
    /// json or pretty [default: pretty on a terminal, else json].
    #[arg(long, env = "CONVOQ_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// A tracing filter [default: info].
    #[arg(long = "log", env = "CONVOQ_LOG", global = true)]
    pub log: Option<String>,
    /// Comma-separated personality modes [default: helpful,concise,creative,professional,playful].
    #[arg(long, env = "CONVOQ_PERSONALITY_MODES", global = true)]
    pub personality_modes: Option<String>,
    /// Backlog above which POSTs answer 429 [default: 100000].
    #[arg(long, env = "CONVOQ_MAX_BACKLOG", global = true)]
    pub max_backlog: Option<String>,
    /// Seconds in-flight jobs get at shutdown [default: 10].
    #[arg(long, env = "CONVOQ_SHUTDOWN_GRACE", global = true)]
    pub shutdown_grace: Option<String>,
    /// Job lease in milliseconds [default: 30000].
    #[arg(long, env = "CONVOQ_LEASE_MS", global = true)]
    pub lease_ms: Option<String>,
    /// SQLite durability: normal, full or off [default: normal].
    #[arg(long, env = "CONVOQ_DURABILITY", global = true)]
    pub durability: Option<String>,
    /// SQLite and Postgres queues: how long a write may take before it fails as unavailable
    /// (a POST then answers 503), in milliseconds [default: 5000].
    #[arg(long, env = "CONVOQ_WRITE_TIMEOUT_MS", global = true)]
    pub write_timeout_ms: Option<String>,
    /// Postgres: most connections of the queue engine per process; the store's pool gets half
    /// as many again [default: 10].
    #[arg(long, env = "CONVOQ_PG_MAX_CONNECTIONS", global = true)]
    pub pg_max_connections: Option<String>,
    /// Postgres: statement timeout in milliseconds [default: 30000].
    #[arg(long, env = "CONVOQ_PG_STATEMENT_TIMEOUT_MS", global = true)]
    pub pg_statement_timeout_ms: Option<String>,
    /// Postgres: no LISTEN/NOTIFY, poll only (for transaction-mode poolers); a bare
    /// --pg-poll-only means true, or give --pg-poll-only=false [default: false].
    #[arg(
        long,
        env = "CONVOQ_PG_POLL_ONLY",
        global = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub pg_poll_only: Option<String>,
}

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<String>,
    worker_listen: Option<String>,
    database_url: Option<String>,
    queue_url: Option<String>,
    queue_prefix: Option<String>,
    allow_redis_eviction: Option<bool>,
    api_keys: Option<Vec<String>>,
    metrics_key: Option<String>,
    concurrency: Option<BTreeMap<String, usize>>,
    log_format: Option<String>,
    log: Option<String>,
    personality_modes: Option<Vec<String>>,
    max_backlog: Option<u64>,
    shutdown_grace: Option<u64>,
    lease_ms: Option<u64>,
    durability: Option<String>,
    write_timeout_ms: Option<u64>,
    pg_max_connections: Option<u64>,
    pg_statement_timeout_ms: Option<u64>,
    pg_poll_only: Option<bool>,
}

/// A configuration error, naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {message}")]
pub struct ConfigError {
    /// The setting (flag and variable).
    pub setting: &'static str,
    /// What is wrong.
    pub message: String,
}

fn bad(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        message: message.into(),
    }
}

impl Config {
    /// Layers the file (if any) under `settings` and validates the result.
    ///
    /// # Errors
    /// The first invalid setting, by name.
    pub fn load(settings: &Settings) -> Result<Config, ConfigError> {
        let file = match &settings.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    bad(
                        "--config (CONVOQ_CONFIG)",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                toml::from_str::<FileSettings>(&text).map_err(|e| {
                    bad(
                        "--config (CONVOQ_CONFIG)",
                        format!("{}: {e}", path.display()),
                    )
                })?
            }
            None => FileSettings::default(),
        };
        Self::from_layers(settings.clone(), file)
    }

    fn from_layers(s: Settings, f: FileSettings) -> Result<Config, ConfigError> {
        let listen_s = s
            .listen
            .or(f.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_s.parse::<SocketAddr>().map_err(|e| {
            bad(
                "--listen (CONVOQ_LISTEN)",
                format!("{listen_s:?} is not an address like 127.0.0.1:3000: {e}"),
            )
        })?;
        let worker_listen = match s.worker_listen.or(f.worker_listen) {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                bad(
                    "--worker-listen (CONVOQ_WORKER_LISTEN)",
                    format!("{a:?} is not an address like 127.0.0.1:9090: {e}"),
                )
            })?),
        };
        let database_url = s
            .database_url
            .or(f.database_url)
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        check_url(
            "--database-url (CONVOQ_DATABASE_URL)",
            &database_url,
            STORE_BACKENDS,
        )?;
        let queue_url = s
            .queue_url
            .or(f.queue_url)
            .unwrap_or_else(|| database_url.clone());
        check_url("--queue-url (CONVOQ_QUEUE_URL)", &queue_url, QUEUE_BACKENDS)?;
        let (queue_prefix, allow_redis_eviction) = redis_settings(
            s.queue_prefix.or(f.queue_prefix),
            s.allow_redis_eviction,
            f.allow_redis_eviction,
        )?;
        let key_specs: Vec<String> = match (s.api_keys, f.api_keys) {
            (Some(csv), _) => csv
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect(),
            (None, Some(list)) => list,
            (None, None) => Vec::new(),
        };
        let mut api_keys: Vec<ApiKey> = Vec::new();
        for spec in key_specs {
            let key = parse_api_key(&spec)?;
            if api_keys.iter().any(|k| k.name == key.name) {
                return Err(bad(
                    "--api-keys (CONVOQ_API_KEYS)",
                    format!("key name {:?} appears twice", key.name),
                ));
            }
            api_keys.push(key);
        }
        let metrics_key = match s.metrics_key.or(f.metrics_key) {
            Some(k) if k.len() < 16 => {
                return Err(bad(
                    "--metrics-key (CONVOQ_METRICS_KEY)",
                    "must be at least 16 characters",
                ))
            }
            Some(k) => Some(digest(&k)),
            None => None,
        };
        let defaults = if queue_is_store(&queue_url, &database_url) {
            SHARED_SQL_CONCURRENCY
        } else {
            DEFAULT_CONCURRENCY
        };
        let mut concurrency: BTreeMap<String, usize> =
            defaults.iter().map(|(q, n)| (q.to_string(), *n)).collect();
        let overrides = match (s.concurrency, f.concurrency) {
            (Some(csv), _) => parse_concurrency(&csv)?,
            (None, Some(map)) => map,
            (None, None) => BTreeMap::new(),
        };
        for (q, n) in overrides {
            if !concurrency.contains_key(&q) {
                return Err(bad(
                    "--concurrency (CONVOQ_CONCURRENCY)",
                    format!("unknown queue {q:?}: expected database, audit or chat"),
                ));
            }
            if n == 0 || n > 1024 {
                return Err(bad(
                    "--concurrency (CONVOQ_CONCURRENCY)",
                    format!("{q}={n}: must be 1 to 1024"),
                ));
            }
            concurrency.insert(q, n);
        }
        let log_format = match s.log_format.or(f.log_format).as_deref() {
            None => None,
            Some("json") => Some(LogFormat::Json),
            Some("pretty") => Some(LogFormat::Pretty),
            Some(other) => {
                return Err(bad(
                    "--log-format (CONVOQ_LOG_FORMAT)",
                    format!("{other:?}: expected json or pretty"),
                ))
            }
        };
        let log_filter = s.log.or(f.log).unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_filter)
            .map_err(|e| bad("--log (CONVOQ_LOG)", format!("{log_filter:?}: {e}")))?;
        let personality_modes: Vec<String> = match (s.personality_modes, f.personality_modes) {
            (Some(csv), _) => csv
                .split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect(),
            (None, Some(list)) => list,
            (None, None) => DEFAULT_MODES.iter().map(|m| m.to_string()).collect(),
        };
        if personality_modes.is_empty()
            || personality_modes.iter().any(|m| {
                m.is_empty()
                    || m.len() > 32
                    || m.chars()
                        .any(|c| !c.is_ascii_alphanumeric() && c != '_' && c != '-')
            })
        {
            return Err(bad(
                "--personality-modes (CONVOQ_PERSONALITY_MODES)",
                "must list 1 or more modes of 1 to 32 characters A-Z a-z 0-9 _ -",
            ));
        }
        if !personality_modes
            .iter()
            .any(|m| m == crate::domain::DEFAULT_MODE)
        {
            return Err(bad(
                "--personality-modes (CONVOQ_PERSONALITY_MODES)",
                "must include the default mode \"helpful\"",
            ));
        }
        let max_backlog = number(
            "--max-backlog (CONVOQ_MAX_BACKLOG)",
            s.max_backlog,
            f.max_backlog,
            DEFAULT_MAX_BACKLOG,
            1,
            u64::MAX,
        )?;
        let grace = number(
            "--shutdown-grace (CONVOQ_SHUTDOWN_GRACE)",
            s.shutdown_grace,
            f.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE.as_secs(),
            0,
            3600,
        )?;
        let lease_ms = number(
            "--lease-ms (CONVOQ_LEASE_MS)",
            s.lease_ms,
            f.lease_ms,
            DEFAULT_LEASE.as_millis() as u64,
            500,
            3_600_000,
        )?;
        let durability = match s.durability.or(f.durability) {
            None => Default::default(),
            Some(d) => d
                .parse()
                .map_err(|e: String| bad("--durability (CONVOQ_DURABILITY)", e))?,
        };
        let write_timeout_ms = number(
            "--write-timeout-ms (CONVOQ_WRITE_TIMEOUT_MS)",
            s.write_timeout_ms,
            f.write_timeout_ms,
            convoq_queue::sql::DEFAULT_WRITE_TIMEOUT.as_millis() as u64,
            100,
            600_000,
        )?;
        let pg_max_connections = number(
            "--pg-max-connections (CONVOQ_PG_MAX_CONNECTIONS)",
            s.pg_max_connections,
            f.pg_max_connections,
            u64::from(DEFAULT_PG_MAX_CONNECTIONS),
            3,
            1000,
        )? as u32;
        let pg_statement_timeout_ms = number(
            "--pg-statement-timeout-ms (CONVOQ_PG_STATEMENT_TIMEOUT_MS)",
            s.pg_statement_timeout_ms,
            f.pg_statement_timeout_ms,
            DEFAULT_PG_STATEMENT_TIMEOUT.as_millis() as u64,
            100,
            3_600_000,
        )?;
        let pg_poll_only = match (s.pg_poll_only, f.pg_poll_only) {
            (Some(v), _) => boolean("--pg-poll-only (CONVOQ_PG_POLL_ONLY)", &v)?,
            (None, Some(b)) => b,
            (None, None) => false,
        };
        Ok(Config {
            listen,
            worker_listen,
            database_url: SecretUrl::new(database_url),
            queue_url: SecretUrl::new(queue_url),
            queue_prefix,
            allow_redis_eviction,
            api_keys,
            metrics_key,
            concurrency,
            log_format,
            log_filter,
            personality_modes,
            max_backlog,
            shutdown_grace: Duration::from_secs(grace),
            lease: Duration::from_millis(lease_ms),
            durability,
            write_timeout: Duration::from_millis(write_timeout_ms),
            pg_max_connections,
            pg_statement_timeout: Duration::from_millis(pg_statement_timeout_ms),
            pg_poll_only,
        })
    }

    /// Whether the server runs in protected mode (no keys: loopback clients only).
    pub fn protected_mode(&self) -> bool {
        self.api_keys.is_empty()
    }
}

fn number(
    setting: &'static str,
    flag: Option<String>,
    file: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let n = match (flag, file) {
        (Some(s), _) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| bad(setting, format!("{s:?} is not a whole number")))?,
        (None, Some(n)) => n,
        (None, None) => default,
    };
    if n < min || n > max {
        return Err(bad(setting, format!("{n} is outside {min} to {max}")));
    }
    Ok(n)
}

/// The BullMQ engine's settings: the key prefix (BullMQ forbids `:` in it) and whether Redis
/// eviction is tolerated.
fn redis_settings(
    prefix: Option<String>,
    allow: Option<String>,
    file_allow: Option<bool>,
) -> Result<(String, bool), ConfigError> {
    let prefix = prefix.unwrap_or_else(|| DEFAULT_QUEUE_PREFIX.into());
    if prefix.is_empty() || prefix.contains([':', '{', '}']) || prefix.chars().any(char::is_control)
    {
        return Err(bad(
            "--queue-prefix (CONVOQ_QUEUE_PREFIX)",
            format!("{prefix:?}: must be non-empty, without ':', braces or control characters"),
        ));
    }
    let allow = match allow {
        None => file_allow.unwrap_or(false),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" | "" => false,
            other => {
                return Err(bad(
                    "--allow-redis-eviction (CONVOQ_ALLOW_REDIS_EVICTION)",
                    format!("{other:?}: expected true or false"),
                ))
            }
        },
    };
    Ok((prefix, allow))
}

fn boolean(setting: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(bad(setting, format!("{v:?}: expected true or false"))),
    }
}

/// Checks that `url` names one of the `accepted` kinds, and that a Postgres URL parses.
/// Messages show the URL with its password hidden.
fn check_url(setting: &'static str, url: &str, accepted: &[Backend]) -> Result<(), ConfigError> {
    let shown = convoq_queue::sql::redact_url(url);
    match Backend::of(url) {
        Some(b) if accepted.contains(&b) => {
            match b {
                // The parser's message names the part at fault, never the password.
                Backend::Postgres => {
                    sqlx::postgres::PgConnectOptions::from_str(url)
                        .map_err(|e| bad(setting, format!("{shown:?}: {e}")))?;
                }
                Backend::Sqlite => {
                    SqliteFile::from_url(url).map_err(|e| bad(setting, e))?;
                }
                Backend::Redis => {}
            }
            Ok(())
        }
        _ => {
            let expected: Vec<&str> = accepted.iter().map(|b| b.example()).collect();
            Err(bad(
                setting,
                format!("{shown:?}: expected a URL like {}", expected.join(" or ")),
            ))
        }
    }
}

fn parse_api_key(spec: &str) -> Result<ApiKey, ConfigError> {
    const S: &str = "--api-keys (CONVOQ_API_KEYS)";
    let mut parts = spec.splitn(3, ':');
    let (Some(name), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        // Never echo the entry: it may hold a secret.
        return Err(bad(S, "each key must be name:role:secret"));
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad(
            S,
            "a key name must be 1 to 64 characters A-Z a-z 0-9 _ -",
        ));
    }
    let role = match role {
        "service" => Role::Service,
        "admin" => Role::Admin,
        _ => {
            return Err(bad(
                S,
                format!("key {name:?}: role must be service or admin"),
            ))
        }
    };
    if secret.len() < 16 {
        return Err(bad(
            S,
            format!("key {name:?}: the secret must be at least 16 characters"),
        ));
    }
    Ok(ApiKey {
        name: name.to_owned(),
        role,
        digest: digest(Secret::new(secret).expose()),
    })
}

fn parse_concurrency(csv: &str) -> Result<BTreeMap<String, usize>, ConfigError> {
    const S: &str = "--concurrency (CONVOQ_CONCURRENCY)";
    let mut out = BTreeMap::new();
    for part in csv.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (q, n) = part
            .split_once('=')
            .ok_or_else(|| bad(S, format!("{part:?}: expected queue=number")))?;
        let n = n
            .trim()
            .parse::<usize>()
            .map_err(|_| bad(S, format!("{part:?}: {n:?} is not a whole number")))?;
        out.insert(q.trim().to_owned(), n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(s: Settings) -> Result<Config, ConfigError> {
        Config::from_layers(s, FileSettings::default())
    }

    #[test]
    fn defaults_are_the_embedded_default() {
        let c = load(Settings::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(c.queue_url.expose(), DEFAULT_DATABASE_URL);
        assert!(c.protected_mode());
        assert_eq!(c.concurrency["database"], 128);
        assert_eq!(
            c.worker_listen, None,
            "a worker serves no HTTP unless asked"
        );
    }

    #[test]
    fn default_concurrency_follows_where_processors_write() {
        let pg = "postgres://convoq@db.example/convoq";
        let both_pg = load(Settings {
            database_url: Some(pg.into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(both_pg.concurrency["database"], 128);
        assert_eq!(both_pg.concurrency["audit"], 4);
        assert_eq!(both_pg.concurrency["chat"], 4);
        // A queue apart from the store: each slot holds a store connection while it runs.
        for queue_url in ["redis://127.0.0.1:6379", "sqlite://queue.db"] {
            let apart = load(Settings {
                database_url: Some(pg.into()),
                queue_url: Some(queue_url.into()),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(apart.concurrency["database"], 32, "{queue_url}");
            assert_eq!(apart.concurrency["audit"], 32, "{queue_url}");
        }
        // An explicit setting wins either way; queues it leaves out keep their default.
        let set = load(Settings {
            concurrency: Some("database=8".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(set.concurrency["database"], 8);
        assert_eq!(set.concurrency["audit"], 4);
    }

    #[test]
    fn errors_name_the_setting_and_hide_secrets() {
        let e = load(Settings {
            listen: Some("nope".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("CONVOQ_LISTEN"), "{e}");
        let e = load(Settings {
            worker_listen: Some("9090".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("CONVOQ_WORKER_LISTEN"), "{e}");
        let e = load(Settings {
            api_keys: Some("svc:root:supersecretvalue123".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("role must be service or admin"),
            "{e}"
        );
        assert!(!e.to_string().contains("supersecretvalue123"), "{e}");
        let e = load(Settings {
            concurrency: Some("database=0".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("CONVOQ_CONCURRENCY"), "{e}");
        for bad_sqlite in [
            "sqlite://",
            "sqlite://x.db?cache=private",
            "sqlite://x%zz.db",
            "sqlite::memory:",
        ] {
            let e = load(Settings {
                database_url: Some(bad_sqlite.into()),
                ..Default::default()
            })
            .unwrap_err();
            assert!(
                e.to_string().contains("CONVOQ_DATABASE_URL"),
                "{bad_sqlite}: {e}"
            );
        }
        let e = load(Settings {
            database_url: Some("mysql://x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("CONVOQ_DATABASE_URL"), "{e}");
    }

    #[test]
    fn redis_queue_urls_take_a_prefix_and_an_eviction_override() {
        let c = load(Settings {
            queue_url: Some("redis://:pw@127.0.0.1:6379/2".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.queue_prefix, DEFAULT_QUEUE_PREFIX);
        assert!(!c.allow_redis_eviction);
        let c = load(Settings {
            queue_url: Some("rediss://redis.internal:6380".into()),
            queue_prefix: Some("convoq".into()),
            allow_redis_eviction: Some("true".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.queue_prefix.as_str(), c.allow_redis_eviction),
            ("convoq", true)
        );
        let e = load(Settings {
            queue_prefix: Some("a:b".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("CONVOQ_QUEUE_PREFIX"), "{e}");
        let e = load(Settings {
            allow_redis_eviction: Some("maybe".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("CONVOQ_ALLOW_REDIS_EVICTION"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let file: FileSettings =
            toml::from_str("listen = \"127.0.0.1:4000\"\nmax_backlog = 5\n").unwrap();
        let c = Config::from_layers(
            Settings {
                listen: Some("127.0.0.1:5000".into()),
                ..Default::default()
            },
            file,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.max_backlog, 5);
        assert!(
            toml::from_str::<FileSettings>("lisen = 1").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn postgres_urls_and_settings() {
        let c = load(Settings {
            database_url: Some("postgres://convoq:pw@db.internal:5432/convoq".into()),
            pg_max_connections: Some("20".into()),
            pg_statement_timeout_ms: Some("5000".into()),
            pg_poll_only: Some("true".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.queue_url, c.database_url, "the queue follows the store");
        assert_eq!(Backend::of(c.queue_url.expose()), Some(Backend::Postgres));
        // Printed, the password is hidden.
        assert!(!format!("{c:?}").contains(":pw@"), "{c:?}");
        assert!(c.database_url.to_string().contains(":***@"));
        assert_eq!(c.pg_max_connections, 20);
        assert_eq!(c.pg_statement_timeout, Duration::from_secs(5));
        assert!(c.pg_poll_only);
        let c = load(Settings {
            queue_url: Some("postgresql://u@h/q".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(Backend::of(c.database_url.expose()), Some(Backend::Sqlite));
        assert_eq!(c.pg_max_connections, DEFAULT_PG_MAX_CONNECTIONS);
        assert!(!c.pg_poll_only);

        let e = load(Settings {
            queue_url: Some("postgres://u:hunter2@h:notaport/q".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("CONVOQ_QUEUE_URL"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = load(Settings {
            queue_url: Some("mysql://u:hunter2@h/q".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("postgres://"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        for (s, name) in [
            (
                Settings {
                    pg_max_connections: Some("2".into()),
                    ..Default::default()
                },
                "CONVOQ_PG_MAX_CONNECTIONS",
            ),
            (
                Settings {
                    pg_statement_timeout_ms: Some("soon".into()),
                    ..Default::default()
                },
                "CONVOQ_PG_STATEMENT_TIMEOUT_MS",
            ),
            (
                Settings {
                    pg_poll_only: Some("maybe".into()),
                    ..Default::default()
                },
                "CONVOQ_PG_POLL_ONLY",
            ),
        ] {
            let e = load(s).unwrap_err();
            assert!(e.to_string().contains(name), "{e}");
        }
        let file: FileSettings = toml::from_str(
            "pg_max_connections = 4\npg_statement_timeout_ms = 250\npg_poll_only = true\n",
        )
        .unwrap();
        let c = Config::from_layers(Settings::default(), file).unwrap();
        assert_eq!(
            (
                c.pg_max_connections,
                c.pg_statement_timeout.as_millis(),
                c.pg_poll_only
            ),
            (4, 250, true)
        );
    }

    #[test]
    fn poll_only_is_a_switch_on_the_command_line() {
        let cli = Cli::try_parse_from(["convoq", "worker", "--pg-poll-only"]).unwrap();
        assert_eq!(cli.settings.pg_poll_only.as_deref(), Some("true"));
        let cli = Cli::try_parse_from(["convoq", "--pg-poll-only=false"]).unwrap();
        assert!(!load(cli.settings).unwrap().pg_poll_only);
        // A bare switch before the subcommand does not swallow it.
        let cli = Cli::try_parse_from(["convoq", "--pg-poll-only", "worker"]).unwrap();
        assert_eq!(cli.command, Some(Command::Worker));
        assert!(load(cli.settings).unwrap().pg_poll_only);
    }

    #[test]
    fn api_keys_parse_with_roles() {
        let c = load(Settings {
            api_keys: Some("bot:service:0123456789abcdef, ops:admin:fedcba9876543210".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.api_keys.len(), 2);
        assert_eq!(c.api_keys[1].role, Role::Admin);
        assert!(!format!("{:?}", c.api_keys).contains("fedcba"));
    }

    #[test]
    fn queue_and_store_share_a_sqlite_file_however_its_url_is_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let a = format!("sqlite://{}", path.display());
        let b = format!("sqlite:{}", path.display());
        let c = format!("sqlite://{}/./x.db", dir.path().display());
        assert!(queue_is_store(&a, &b));
        assert!(queue_is_store(&c, &a));
        assert!(!queue_is_store(
            &a,
            &format!("sqlite://{}/y.db", dir.path().display())
        ));
        assert!(queue_is_store("postgres://u@h/d", "postgres://u@h/d"));
        assert!(!queue_is_store("redis://h", "redis://h"));
    }
}
