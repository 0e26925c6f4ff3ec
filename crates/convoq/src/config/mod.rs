//! Typed configuration, layered: defaults ← TOML file (`--config`) ← `CONVOQ_*` environment ←
//! flags. [`Config::load`] validates everything at start-up and names the setting at fault.
//!
//! Secrets (API keys) live in [`Secret`], which prints as `***`, and only their SHA-256 digests
//! are kept after parsing.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use convoq_queue::sql::SqliteFile;
use sha2::{Digest, Sha256};

mod parse;
mod settings;

pub use settings::Settings;
use settings::Values;

/// Default HTTP address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
/// Default store (and queue) URL: one SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://convoq.db";
/// The Redis key prefix of the BullMQ engine: Node BullMQ's default, so that Node producers and
/// dashboards find convoq's queues without configuration.
pub const DEFAULT_QUEUE_PREFIX: &str = "bull";
/// Default per-queue worker concurrency where processors write to a store of their own (the
/// queue on Redis, or on another database than the store): each slot's insert then waits for
/// the store's pool, where the inserts of jobs in flight together are grouped into one
/// statement (`store/batch.rs`).
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
    /// Requests per second per API key (0: no limit).
    pub key_rate_limit: u64,
    /// Conversation POSTs per second per userId (0: no limit).
    pub user_rate_limit: u64,
    /// Unfinished conversation jobs per API key, per process (0: no quota).
    pub key_backlog_quota: u64,
    /// Unfinished conversation jobs per userId, per process (0: no quota).
    pub user_backlog_quota: u64,
    /// Connections open at once (HTTP).
    pub max_connections: usize,
    /// How long a request's headers may take.
    pub header_read_timeout: Duration,
    /// Job event streams open at once per API key.
    pub max_streams_per_key: usize,
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
    /// Show the queues (counts by state, paused, totals), or pause or resume one.
    ///
    /// Works directly on the configured queue engine (no server needed).
    #[command(after_help = "Examples:\n  \
        convoq queues\n  \
        convoq queues --json\n  \
        convoq queues pause database\n  \
        convoq queues resume database\n\n\
        Exit codes: 0 done, 1 failed, 2 bad usage or settings, 3 not found, \
        5 queue or store unavailable.")]
    Queues {
        /// What to do (default: show every queue).
        #[command(subcommand)]
        action: Option<QueuesAction>,
        /// Print JSON for scripts instead of a table.
        #[arg(long, global = true)]
        json: bool,
    },
    /// List, show, follow, retry, remove or promote jobs.
    ///
    /// Works directly on the configured queue engine (no server needed). Operator actions are
    /// recorded in the audit log as `cli:$USER`.
    #[command(after_help = "Examples:\n  \
        convoq jobs list --queue database --state failed --limit 50\n  \
        convoq jobs show 0193c1d2-...\n  \
        convoq jobs follow 0193c1d2-... --json\n  \
        convoq jobs retry ID1 ID2\n  \
        convoq jobs retry --all-failed --queue database\n  \
        convoq jobs remove ID1\n  \
        convoq jobs promote ID1\n\n\
        Exit codes: 0 done, 1 failed, 2 bad usage or settings, 3 not found, \
        4 refused (the job's state does not allow it), 5 queue or store unavailable, \
        6 timed out (follow --timeout). With several ids, every id is tried and the exit \
        code is the first failure's.")]
    Jobs {
        /// What to do.
        #[command(subcommand)]
        action: JobsAction,
        /// Print JSON for scripts (one object per line for `follow`).
        #[arg(long, global = true)]
        json: bool,
    },
}

impl Command {
    /// Whether this is an operator's command that runs and exits (`queues`, `jobs`), whose
    /// output is for a person or a script rather than a log.
    pub fn is_operator_command(&self) -> bool {
        matches!(self, Command::Queues { .. } | Command::Jobs { .. })
    }
}

/// `convoq queues …`.
#[derive(Debug, Subcommand, Clone, PartialEq, Eq)]
pub enum QueuesAction {
    /// Stop workers (of every process) from taking the queue's jobs; adds still queue.
    Pause {
        /// The queue (database, audit, chat).
        name: String,
    },
    /// Let workers take the queue's jobs again.
    Resume {
        /// The queue (database, audit, chat).
        name: String,
    },
}

/// `convoq jobs …`.
#[derive(Debug, Subcommand, Clone, PartialEq, Eq)]
pub enum JobsAction {
    /// List a queue's jobs in one state, newest first for finished ones, run order otherwise.
    List {
        /// The queue.
        #[arg(long, default_value = "database")]
        queue: String,
        /// waiting, active, delayed, completed, failed or paused.
        #[arg(long, default_value = "waiting")]
        state: String,
        /// At most this many jobs (1 to 10000).
        #[arg(long, default_value_t = 20)]
        limit: u64,
        /// Skip this many first.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Show one job: its fields, data, options, result or failure, and history.
    Show {
        /// The job's id.
        id: String,
        /// Look in this queue only (default: every queue).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Print a job's events as they happen (its history first), until it completes or fails.
    Follow {
        /// The job's id.
        id: String,
        /// Look in this queue only (default: every queue).
        #[arg(long)]
        queue: Option<String>,
        /// Give up after this many seconds (exit code 6) [default: wait until it finishes].
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Run failed (or completed) jobs again, with fresh attempts.
    Retry {
        /// The jobs' ids.
        #[arg(required_unless_present = "all_failed", conflicts_with = "all_failed")]
        ids: Vec<String>,
        /// Retry every failed job of --queue.
        #[arg(long, requires = "queue")]
        all_failed: bool,
        /// The queue (required with --all-failed; default: every queue).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Delete jobs (and their history).
    Remove {
        /// The jobs' ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Look in this queue only (default: every queue).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Make delayed jobs ready now.
    Promote {
        /// The jobs' ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Look in this queue only (default: every queue).
        #[arg(long)]
        queue: Option<String>,
    },
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
        const CONFIG: &str = "--config (CONVOQ_CONFIG)";
        let file = match &settings.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad(CONFIG, format!("cannot read {}: {e}", path.display())))?;
                toml::from_str::<toml::Table>(&text)
                    .map_err(|e| bad(CONFIG, format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        Self::from_layers(settings.clone(), &file)
    }

    /// Each setting from its first layer (see [`Values::read`]), then what one setting decides
    /// for another: the queue follows the store unless set, and the default concurrency follows
    /// where processors write.
    fn from_layers(flags: Settings, file: &toml::Table) -> Result<Config, ConfigError> {
        let v = Values::read(flags, file)?;
        let queue_url = v.queue_url.unwrap_or_else(|| v.database_url.clone());
        let defaults = if queue_is_store(&queue_url, &v.database_url) {
            SHARED_SQL_CONCURRENCY
        } else {
            DEFAULT_CONCURRENCY
        };
        let mut concurrency: BTreeMap<String, usize> =
            defaults.iter().map(|(q, n)| (q.to_string(), *n)).collect();
        concurrency.extend(v.concurrency.unwrap_or_default());
        Ok(Config {
            listen: v.listen,
            worker_listen: v.worker_listen,
            database_url: SecretUrl::new(v.database_url),
            queue_url: SecretUrl::new(queue_url),
            queue_prefix: v.queue_prefix,
            allow_redis_eviction: v.allow_redis_eviction,
            api_keys: v.api_keys.unwrap_or_default(),
            metrics_key: v.metrics_key,
            concurrency,
            log_format: v.log_format,
            log_filter: v.log,
            personality_modes: v.personality_modes,
            key_rate_limit: v.key_rate_limit,
            user_rate_limit: v.user_rate_limit,
            key_backlog_quota: v.key_backlog_quota,
            user_backlog_quota: v.user_backlog_quota,
            max_connections: v.max_connections as usize,
            header_read_timeout: Duration::from_millis(v.header_read_timeout_ms),
            max_streams_per_key: v.max_streams_per_key as usize,
            max_backlog: v.max_backlog,
            shutdown_grace: Duration::from_secs(v.shutdown_grace),
            lease: Duration::from_millis(v.lease_ms),
            durability: v.durability,
            write_timeout: Duration::from_millis(v.write_timeout_ms),
            pg_max_connections: v.pg_max_connections as u32,
            pg_statement_timeout: Duration::from_millis(v.pg_statement_timeout_ms),
            pg_poll_only: v.pg_poll_only,
        })
    }

    /// Whether the server runs in protected mode (no keys: loopback clients only).
    pub fn protected_mode(&self) -> bool {
        self.api_keys.is_empty()
    }
}

#[cfg(test)]
mod tests;
