//! The SQL engine's settings ([`SqlConfig`], [`Durability`]) and how its URLs are shown
//! ([`redact_url`]).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};

/// How hard SQLite works to make a commit durable (`PRAGMA synchronous`, in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `NORMAL`: a commit survives a crash of the process (the default). A power loss or kernel
    /// crash may lose the last commits before the most recent WAL sync, but never corrupts the
    /// file.
    #[default]
    Normal,
    /// `FULL`: the WAL is synced at every commit, so a commit survives power loss too, at the
    /// cost of one fsync per group commit.
    Full,
    /// `OFF`: no syncs at all. A process crash is still survived (the OS keeps the writes), a
    /// power loss may corrupt the database. For throwaway test data only.
    Off,
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Durability::Normal),
            "full" => Ok(Durability::Full),
            "off" => Ok(Durability::Off),
            other => Err(format!(
                "unknown durability {other:?}: expected normal, full or off"
            )),
        }
    }
}

/// Settings of the SQL engine.
#[derive(Debug, Clone)]
pub struct SqlConfig {
    /// `sqlite://PATH` (created if missing), or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` (also `postgresql://`).
    pub url: String,
    /// SQLite's `synchronous` setting (SQLite only).
    pub durability: Durability,
    /// How long a statement waits for another process's write lock before failing as
    /// unavailable (SQLite); on Postgres, how long a caller waits for a free read connection.
    pub busy_timeout: Duration,
    /// Connections for reads (SQLite only: writes use one connection of their own).
    pub read_connections: u32,
    /// Postgres only: the most connections this engine opens, all included (default 10).
    /// They are split into writer connections (each runs its own group-commit writer task,
    /// `min(4, (max_connections - 1) / 2)`, at least 1), one listener connection when
    /// [`SqlConfig::notify`] is on, and the read pool (the rest, at least 1). With the default:
    /// 4 writers, 1 listener, 5 readers.
    pub max_connections: u32,
    /// Postgres only: the server-side `statement_timeout` of every connection (default 30 s). A
    /// statement that runs longer is cancelled and the operation fails as unavailable.
    pub statement_timeout: Duration,
    /// Postgres only: wake idle workers through `LISTEN/NOTIFY` (default true). Turn it off
    /// behind a transaction-mode connection pooler (which breaks `LISTEN`): workers then find
    /// other processes' jobs by polling only. Writers send notifications either way.
    pub notify: bool,
    /// The most operations applied in one group commit.
    pub max_batch: usize,
    /// How long a caller waits for a write (an add, a claim, a completion, an operator
    /// action) before it fails as unavailable (default 5 s). A write whose caller gave up
    /// before the writer took it up is not applied; one already under way may still commit
    /// (an add retried with the same job id then finds it). On SQLite the writer also waits
    /// no longer than this for another process's lock.
    pub write_timeout: Duration,
    /// The clock jobs are stamped with.
    pub clock: Arc<dyn Clock>,
}

impl SqlConfig {
    /// Defaults for a database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        SqlConfig {
            url: url.into(),
            durability: Durability::default(),
            busy_timeout: Duration::from_secs(5),
            read_connections: 4,
            max_connections: 10,
            statement_timeout: Duration::from_secs(30),
            notify: true,
            max_batch: 1024,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same settings with another clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

/// How long a caller waits for a write by default ([`SqlConfig::write_timeout`]).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A URL with any password replaced, fit for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://convoq.db"), "sqlite://convoq.db");
    }
}
