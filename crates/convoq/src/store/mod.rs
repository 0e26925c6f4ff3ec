//! The store: users, conversations and the audit log, on SQLite or Postgres, chosen by the
//! URL's scheme as the queue engine chooses its dialect. Every query is timed into
//! `convoq_db_query_duration_seconds{operation}`.
//!
//! Layout: this file holds the types, the errors, the `Backend` trait each database implements,
//! and [`Store`], which times each operation and hands it to its backend: `sqlite.rs` (on
//! `rusqlite`, a small pool of connections lent to closures on blocking threads) and
//! `postgres.rs` (on `sqlx`), each with its own embedded,
//! numbered migrations (`migrations/sqlite/NNNN_*.sql`, `migrations/postgres/NNNN_*.sql`, in
//! step).
//!
//! Conversation and audit inserts come in two forms: `*_in(conn)`, run inside the queue
//! engine's completion transaction when the queue and the store share one database, and the
//! pool form for when they do not, where concurrent inserts of one kind are grouped into one
//! statement and one commit (`batch.rs`). Both are idempotent (`ON CONFLICT DO NOTHING`).

mod batch;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use convoq_queue::sql::{Durability, SqlConn};
use rusqlite::ffi;
use serde::Serialize;

use crate::telemetry::Metrics;
use batch::Batcher;

/// What can go wrong in the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is busy; worth retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The conversation's user does not exist.
    #[error("unknown user {0}")]
    UnknownUser(String),
    /// A uniqueness rule was broken (another user has this Discord id).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Stored data could not be read.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// Maps a Postgres (`sqlx`) error: constraint violations to what they mean, decoding failures
/// to corrupt data, and everything else (connection, timeout, busy) to unavailable.
fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            StoreError::UnknownUser(String::new())
        }
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(db.message().to_owned())
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Maps a SQLite (`rusqlite`) error as [`map_err`] maps a Postgres one: a foreign-key violation
/// to an unknown user, a unique or primary-key violation to a conflict, a value that does not
/// read as its Rust type to corrupt data, and everything else (busy, locked, I/O, a pool that
/// gave no connection in time) to unavailable.
fn map_sqlite_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
        {
            StoreError::UnknownUser(String::new())
        }
        rusqlite::Error::SqliteFailure(f, message)
            if f.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::Conflict(message.clone().unwrap_or_else(|| f.to_string()))
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// A user.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Id.
    pub id: String,
    /// Discord id.
    pub discord_id: String,
    /// User name.
    pub username: String,
    /// Display name.
    pub global_name: Option<String>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last updated (RFC 3339).
    pub updated_at: String,
}

/// A conversation.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    /// UUIDv7.
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Title, if any.
    pub title: Option<String>,
    /// Personality mode.
    pub personality_mode: String,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last updated (RFC 3339).
    pub updated_at: String,
}

/// A conversation to insert.
#[derive(Debug, Clone)]
pub struct NewConversation {
    /// Fixed at enqueue time.
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Title.
    pub title: Option<String>,
    /// Mode.
    pub personality_mode: String,
}

/// An audit event to record.
#[derive(Debug, Clone)]
pub struct NewAuditEvent {
    /// Deterministic from the event, so a retried job records it once.
    pub id: String,
    /// `conversation.created`.
    pub event: String,
    /// What it is about.
    pub subject_id: String,
    /// Who did it.
    pub actor: String,
    /// The request.
    pub request_id: Option<String>,
}

/// RFC 3339 UTC with milliseconds.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Connection settings of the store. SQLite keeps a small pool of its own; on Postgres these
/// bound the store's pool.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Postgres: the most connections of the store's pool.
    pub max_connections: u32,
    /// Postgres: the server-side `statement_timeout` of each connection.
    pub statement_timeout: Duration,
    /// How long a query waits for a free connection before failing as unavailable.
    pub acquire_timeout: Duration,
    /// SQLite: `synchronous` of the store's own writes (users), as `--durability` sets it for
    /// the queue, so that `full` protects them too.
    pub durability: Durability,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 5,
            statement_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(5),
            durability: Durability::default(),
        }
    }
}

/// What each database the store runs on provides: `sqlite.rs` and `postgres.rs` implement it,
/// and [`Store`] times each call. The inserts inside the queue engine's transaction are apart
/// (`Store::insert_conversations_in`): they run on the engine's connection, not the store's.
#[async_trait]
trait Backend: Send + Sync {
    fn dialect(&self) -> &'static str;
    async fn migrate(&self) -> Result<(), StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
    async fn upsert_user(
        &self,
        id: &str,
        discord_id: &str,
        username: &str,
        global_name: Option<&str>,
    ) -> Result<(User, bool), StoreError>;
    async fn get_user(&self, id: &str) -> Result<Option<User>, StoreError>;
    async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError>;
    async fn list_conversations(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Vec<Conversation>, StoreError>;
    async fn audit_events_for(
        &self,
        subject_id: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, StoreError>;
    async fn insert_conversations(
        &self,
        rows: &[(&NewConversation, DateTime<Utc>)],
    ) -> Result<(), StoreError>;
    async fn insert_audits(
        &self,
        rows: &[(&NewAuditEvent, DateTime<Utc>)],
    ) -> Result<(), StoreError>;
    async fn close(&self);
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    known_users: Arc<KnownUsers>,
    conversations: Batcher<NewConversation>,
    audits: Batcher<NewAuditEvent>,
}

/// Ids of users this process has seen in the store. Users are never deleted, so a user seen
/// once exists for good; the set is emptied when it reaches [`KnownUsers::MAX`] ids, which
/// costs a read per user afterwards and nothing else.
#[derive(Default)]
struct KnownUsers(std::sync::Mutex<std::collections::HashSet<String>>);

impl KnownUsers {
    const MAX: usize = 100_000;

    fn contains(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn insert(&self, id: &str) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= Self::MAX {
            set.clear();
        }
        set.insert(id.to_owned());
    }
}

impl Store {
    /// Opens the store at `url` (`sqlite://PATH`, created if missing, or `postgres://…` /
    /// `postgresql://…`) and migrates it.
    ///
    /// # Errors
    /// When the URL is of neither kind, or the database cannot be opened or migrated.
    pub async fn connect(
        url: &str,
        options: &StoreOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        // Insert lanes: SQLite has one writer; on Postgres half the pool, so that reads always
        // find a connection.
        let (db, lanes): (Arc<dyn Backend>, u32) = if url.starts_with("sqlite:") {
            (Arc::new(sqlite::open(url, options)?), 1)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (
                Arc::new(postgres::open(url, options)?),
                options.max_connections / 2,
            )
        } else {
            return Err(StoreError::Unavailable(format!(
                "the store takes sqlite:// or postgres:// URLs, not {:?}",
                convoq_queue::sql::redact_url(url)
            )));
        };
        let lanes = lanes.max(1) as usize;
        let store = Store {
            conversations: Batcher::spawn(db.clone(), lanes, metrics.clone()),
            audits: Batcher::spawn(db.clone(), lanes, metrics.clone()),
            db,
            metrics,
            known_users: Arc::default(),
        };
        {
            let _t = store.metrics.db_timer("migrate");
            store.db.migrate().await?;
        }
        Ok(store)
    }

    /// Which database the store runs on: `sqlite` or `postgres`.
    pub fn dialect(&self) -> &'static str {
        self.db.dialect()
    }

    /// Checks the database answers.
    ///
    /// # Errors
    /// When it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _t = self.metrics.db_timer("ping");
        self.db.ping().await
    }

    /// Creates or updates a user. Returns the user and whether it was created.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when another user has this Discord id.
    pub async fn upsert_user(
        &self,
        id: &str,
        discord_id: &str,
        username: &str,
        global_name: Option<&str>,
    ) -> Result<(User, bool), StoreError> {
        let _t = self.metrics.db_timer("upsert_user");
        let r = self
            .db
            .upsert_user(id, discord_id, username, global_name)
            .await;
        r.map_err(|e| match e {
            StoreError::Conflict(_) => {
                StoreError::Conflict("another user has this discordId".into())
            }
            other => other,
        })
    }

    /// Reads a user.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn get_user(&self, id: &str) -> Result<Option<User>, StoreError> {
        let _t = self.metrics.db_timer("get_user");
        self.db.get_user(id).await
    }

    /// Whether a user exists, from this process's memory of users it has seen, or else from
    /// the store. Lets a job for an unknown user fail before it reaches the queue's writer,
    /// where its conversation's foreign key would roll back the whole batch it shares with
    /// other jobs.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn user_exists(&self, id: &str) -> Result<bool, StoreError> {
        if self.known_users.contains(id) {
            return Ok(true);
        }
        let exists = self.get_user(id).await?.is_some();
        if exists {
            self.known_users.insert(id);
        }
        Ok(exists)
    }

    /// Reads a conversation.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let _t = self.metrics.db_timer("get_conversation");
        self.db.get_conversation(id).await
    }

    /// A user's conversations, newest first, after `cursor` (the last id of the previous page:
    /// UUIDv7 ids sort by creation time).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn list_conversations(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Vec<Conversation>, StoreError> {
        let _t = self.metrics.db_timer("list_conversations");
        self.db.list_conversations(user_id, limit, cursor).await
    }

    /// Inserts a conversation (when the queue does not share this database), in one statement
    /// with the conversations other jobs insert meanwhile.
    ///
    /// # Errors
    /// [`StoreError::UnknownUser`] when the user does not exist.
    pub async fn insert_conversation(
        &self,
        c: &NewConversation,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _t = self.metrics.db_timer("insert_conversation");
        self.conversations
            .insert(c.clone(), now)
            .await
            .map_err(|e| conversation_err(e, c))
    }

    /// Inserts conversations on `conn` in one statement, inside the queue engine's open
    /// transaction (when the queue and the store share one database). Idempotent per
    /// conversation. Timed once per call, under the single insert's operation name.
    ///
    /// # Errors
    /// [`StoreError::UnknownUser`] when a user does not exist (the first row's user, when there
    /// are several: the caller applies them one by one to tell which); nothing is inserted.
    pub async fn insert_conversations_in(
        &self,
        conn: SqlConn<'_>,
        rows: &[(&NewConversation, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let _t = self.metrics.db_timer("insert_conversation");
        let r = match conn {
            SqlConn::Sqlite(conn) => {
                sqlite::insert_conversations(conn, rows).map_err(map_sqlite_err)
            }
            SqlConn::Postgres(conn) => postgres::insert_conversations(conn, rows)
                .await
                .map_err(map_err),
        };
        match rows.first() {
            Some((c, _)) => r.map_err(|e| conversation_err(e, c)),
            None => r,
        }
    }

    /// Records an audit event, in one statement with the events other jobs record meanwhile.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub async fn insert_audit(
        &self,
        e: &NewAuditEvent,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _t = self.metrics.db_timer("insert_audit_event");
        self.audits.insert(e.clone(), now).await
    }

    /// Records an operator's action (who, what, when): `event` is what was done
    /// (`queue.paused`, `job.retried`, ...), `subject` what it was done to, `actor` the API
    /// key's name (`cli:USER` from the command line). The action has happened by then, so a
    /// store that cannot record it is logged as an error, not returned.
    pub async fn record_action(&self, actor: &str, request_id: &str, event: &str, subject: &str) {
        let record = NewAuditEvent {
            id: format!("{event}-{}", uuid::Uuid::now_v7()),
            event: event.to_owned(),
            subject_id: subject.to_owned(),
            actor: actor.to_owned(),
            request_id: Some(request_id.to_owned()),
        };
        match self.insert_audit(&record, Utc::now()).await {
            Ok(()) => tracing::info!(actor, event, subject, "operator action recorded"),
            Err(e) => tracing::error!(actor, event, subject, error = %e,
                "operator action done but not recorded in the audit log"),
        }
    }

    /// Records audit events on `conn` in one statement, inside the queue engine's open
    /// transaction. Idempotent per event.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub async fn insert_audits_in(
        &self,
        conn: SqlConn<'_>,
        rows: &[(&NewAuditEvent, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let _t = self.metrics.db_timer("insert_audit_event");
        match conn {
            SqlConn::Sqlite(conn) => sqlite::insert_audits(conn, rows).map_err(map_sqlite_err),
            SqlConn::Postgres(conn) => postgres::insert_audits(conn, rows).await.map_err(map_err),
        }
    }

    /// Audit events about a subject (for operators and tests).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn audit_events_for(
        &self,
        subject_id: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
        let _t = self.metrics.db_timer("list_audit_events");
        self.db.audit_events_for(subject_id).await
    }

    /// The metrics this store times its queries into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.db.close().await
    }
}

/// A conversation insert's error, naming the user when it is unknown.
fn conversation_err(e: StoreError, c: &NewConversation) -> StoreError {
    match e {
        StoreError::UnknownUser(_) => StoreError::UnknownUser(c.user_id.clone()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::{map_sqlite_err, StoreError};

    /// What each kind of SQLite failure means to the store.
    #[test]
    fn sqlite_errors_map_to_what_they_mean() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute_batch(
            "PRAGMA foreign_keys = ON; \
             CREATE TABLE u (id TEXT PRIMARY KEY, name TEXT UNIQUE); \
             CREATE TABLE c (id TEXT PRIMARY KEY, u TEXT REFERENCES u (id)); \
             INSERT INTO u VALUES ('a', 'x');",
        )
        .unwrap();
        let err = |sql: &str| map_sqlite_err(c.execute_batch(sql).unwrap_err());
        assert!(matches!(
            err("INSERT INTO c VALUES ('1', 'ghost')"),
            StoreError::UnknownUser(_)
        ));
        assert!(matches!(
            err("INSERT INTO u VALUES ('b', 'x')"),
            StoreError::Conflict(_)
        ));
        assert!(matches!(
            err("INSERT INTO u VALUES ('a', 'y')"),
            StoreError::Conflict(_)
        ));
        let read = c
            .query_row("SELECT name FROM u", [], |r| r.get::<_, i64>(0))
            .unwrap_err();
        assert!(matches!(map_sqlite_err(read), StoreError::Corrupt(_)));
        assert!(matches!(
            err("SELECT * FROM nowhere"),
            StoreError::Unavailable(_)
        ));
    }
}
