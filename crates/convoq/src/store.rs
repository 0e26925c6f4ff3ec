//! The store: users, conversations and the audit log, with embedded numbered migrations
//! (`migrations/sqlite/NNNN_*.sql`; Postgres follows in step). Every query is timed into
//! `convoq_db_query_duration_seconds{operation}`.
//!
//! Conversation and audit inserts come in two forms: `*_on(conn)`, run inside the queue
//! engine's completion transaction when the queue and the store share one database, and the
//! pool form for when they do not. Both are idempotent (`ON CONFLICT DO NOTHING`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::telemetry::Metrics;

/// The migrations, in order. A database records how many it has applied in `convoq_schema`.
const MIGRATIONS: &[&str] = &[include_str!("../migrations/sqlite/0001_init.sql")];

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
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

/// A user.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Opens the store at `url` (creating the SQLite file if needed) and migrates it.
    ///
    /// # Errors
    /// When the database cannot be opened or migrated.
    pub async fn connect(url: &str, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad store URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(opts);
        let store = Store { pool, metrics };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let r = migrate_steps(&mut conn).await;
        if r.is_err() {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        }
        r.map_err(map_err)
    }

    /// Checks the database answers.
    ///
    /// # Errors
    /// When it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _t = self.metrics.db_timer("ping");
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(map_err)
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
        let now = timestamp(Utc::now());
        let existed = self.get_user(id).await?.is_some();
        let row = sqlx::query(
            "INSERT INTO users (id, discord_id, username, global_name, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (id) DO UPDATE SET \
             discord_id = excluded.discord_id, username = excluded.username, \
             global_name = excluded.global_name, updated_at = excluded.updated_at \
             RETURNING id, discord_id, username, global_name, created_at, updated_at",
        )
        .bind(id)
        .bind(discord_id)
        .bind(username)
        .bind(global_name)
        .bind(&now)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match map_err(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict("another user has this discordId".into())
            }
            other => other,
        })?;
        Ok((user_from_row(&row)?, !existed))
    }

    /// Reads a user.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn get_user(&self, id: &str) -> Result<Option<User>, StoreError> {
        let _t = self.metrics.db_timer("get_user");
        let row = sqlx::query(
            "SELECT id, discord_id, username, global_name, created_at, updated_at FROM users WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    /// Reads a conversation.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let _t = self.metrics.db_timer("get_conversation");
        let row = sqlx::query(
            "SELECT id, user_id, title, personality_mode, created_at, updated_at \
             FROM conversations WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.map(|r| conversation_from_row(&r)).transpose()
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
        let rows = sqlx::query(
            "SELECT id, user_id, title, personality_mode, created_at, updated_at \
             FROM conversations WHERE user_id = ?1 AND (?2 IS NULL OR id < ?2) \
             ORDER BY id DESC LIMIT ?3",
        )
        .bind(user_id)
        .bind(cursor)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(conversation_from_row).collect()
    }

    /// Inserts a conversation on its own (when the queue does not share this database).
    ///
    /// # Errors
    /// [`StoreError::UnknownUser`] when the user does not exist.
    pub async fn insert_conversation(
        &self,
        c: &NewConversation,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _t = self.metrics.db_timer("insert_conversation");
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        insert_conversation_on(&mut conn, c, now).await
    }

    /// Records an audit event on its own.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub async fn insert_audit(
        &self,
        e: &NewAuditEvent,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _t = self.metrics.db_timer("insert_audit_event");
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        insert_audit_on(&mut conn, e, now).await
    }

    /// Counts audit events about a subject (for operators and tests).
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn audit_events_for(
        &self,
        subject_id: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
        let _t = self.metrics.db_timer("list_audit_events");
        let rows = sqlx::query("SELECT event, actor, request_id FROM audit_log WHERE subject_id = ? ORDER BY created_at")
            .bind(subject_id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(map_err)?,
                    r.try_get(1).map_err(map_err)?,
                    r.try_get(2).map_err(map_err)?,
                ))
            })
            .collect()
    }

    /// The metrics this store times its queries into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

async fn migrate_steps(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS convoq_schema (version INTEGER NOT NULL)")
        .execute(&mut *conn)
        .await?;
    let have: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM convoq_schema")
        .fetch_one(&mut *conn)
        .await?;
    for (i, step) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(have.unwrap_or(0) as usize)
    {
        for statement in step.split(';').filter(|s| !s.trim().is_empty()) {
            sqlx::query(statement).execute(&mut *conn).await?;
        }
        sqlx::query("INSERT INTO convoq_schema (version) VALUES (?)")
            .bind(i as i64 + 1)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(())
}

/// Inserts a conversation on `conn` (inside the caller's transaction). Idempotent.
///
/// # Errors
/// [`StoreError::UnknownUser`] when the user does not exist.
pub async fn insert_conversation_on(
    conn: &mut SqliteConnection,
    c: &NewConversation,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let now = timestamp(now);
    sqlx::query(
        "INSERT INTO conversations (id, user_id, title, personality_mode, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&c.id)
    .bind(&c.user_id)
    .bind(&c.title)
    .bind(&c.personality_mode)
    .bind(&now)
    .execute(conn)
    .await
    .map(drop)
    .map_err(|e| match map_err(e) {
        StoreError::UnknownUser(_) => StoreError::UnknownUser(c.user_id.clone()),
        other => other,
    })
}

/// Records an audit event on `conn`. Idempotent.
///
/// # Errors
/// When the store cannot be written.
pub async fn insert_audit_on(
    conn: &mut SqliteConnection,
    e: &NewAuditEvent,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_log (id, event, subject_id, actor, request_id, created_at) \
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&e.id)
    .bind(&e.event)
    .bind(&e.subject_id)
    .bind(&e.actor)
    .bind(&e.request_id)
    .bind(timestamp(now))
    .execute(conn)
    .await
    .map(drop)
    .map_err(map_err)
}

fn user_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<User, StoreError> {
    Ok(User {
        id: r.try_get(0).map_err(map_err)?,
        discord_id: r.try_get(1).map_err(map_err)?,
        username: r.try_get(2).map_err(map_err)?,
        global_name: r.try_get(3).map_err(map_err)?,
        created_at: r.try_get(4).map_err(map_err)?,
        updated_at: r.try_get(5).map_err(map_err)?,
    })
}

fn conversation_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Conversation, StoreError> {
    Ok(Conversation {
        id: r.try_get(0).map_err(map_err)?,
        user_id: r.try_get(1).map_err(map_err)?,
        title: r.try_get(2).map_err(map_err)?,
        personality_mode: r.try_get(3).map_err(map_err)?,
        created_at: r.try_get(4).map_err(map_err)?,
        updated_at: r.try_get(5).map_err(map_err)?,
    })
}
