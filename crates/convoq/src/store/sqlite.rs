//! The store on SQLite: the pool, the migrations of `migrations/sqlite/`, and the statements.
//! Timestamps are stored as RFC 3339 text (UTC, milliseconds), which sorts like time.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use convoq_queue::sql::retry_while_busy;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{
    map_err, timestamp, Conversation, NewAuditEvent, NewConversation, StoreError, StoreOptions,
    User,
};

/// The migrations, in order, numbered in step with Postgres's. A database records how many it
/// has applied in `convoq_schema`.
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/sqlite/0001_init.sql")];

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the pool (lazily: the first query opens the file, creating it if needed).
pub(super) fn open(url: &str, options: &StoreOptions) -> Result<SqlitePool, StoreError> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::Unavailable(format!("bad store URL: {e}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    Ok(SqlitePoolOptions::new()
        .max_connections(4)
        .acquire_timeout(options.acquire_timeout)
        .connect_lazy_with(opts))
}

/// Applies the migrations the database lacks, in one immediate transaction.
///
/// Processes that open a new file together race to switch it to WAL mode, and SQLite answers
/// the loser "database is locked" at once rather than through the busy timeout (two readers
/// that both want to write would otherwise wait for each other): so a busy answer is retried,
/// for up to the busy timeout.
pub(super) async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    retry_while_busy(BUSY_TIMEOUT, || migrate_once(pool))
        .await
        .map_err(map_err)
}

async fn migrate_once(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let r = migrate_steps(&mut conn).await;
    if r.is_err() {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    }
    r
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

pub(super) async fn ping(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .map(drop)
        .map_err(map_err)
}

pub(super) async fn upsert_user(
    pool: &SqlitePool,
    id: &str,
    discord_id: &str,
    username: &str,
    global_name: Option<&str>,
) -> Result<(User, bool), StoreError> {
    let now = timestamp(Utc::now());
    let existed = get_user(pool, id).await?.is_some();
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
    .fetch_one(pool)
    .await
    .map_err(map_err)?;
    Ok((user_from_row(&row)?, !existed))
}

pub(super) async fn get_user(pool: &SqlitePool, id: &str) -> Result<Option<User>, StoreError> {
    let row = sqlx::query(
        "SELECT id, discord_id, username, global_name, created_at, updated_at FROM users WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(map_err)?;
    row.map(|r| user_from_row(&r)).transpose()
}

pub(super) async fn get_conversation(
    pool: &SqlitePool,
    id: &str,
) -> Result<Option<Conversation>, StoreError> {
    let row = sqlx::query(
        "SELECT id, user_id, title, personality_mode, created_at, updated_at \
         FROM conversations WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(map_err)?;
    row.map(|r| conversation_from_row(&r)).transpose()
}

pub(super) async fn list_conversations(
    pool: &SqlitePool,
    user_id: &str,
    limit: u32,
    cursor: Option<&str>,
) -> Result<Vec<Conversation>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, user_id, title, personality_mode, created_at, updated_at \
         FROM conversations WHERE user_id = ?1 AND (?2 IS NULL OR id < ?2) \
         ORDER BY id DESC LIMIT ?3",
    )
    .bind(user_id)
    .bind(cursor)
    .bind(limit as i64)
    .fetch_all(pool)
    .await
    .map_err(map_err)?;
    rows.iter().map(conversation_from_row).collect()
}

pub(super) async fn audit_events_for(
    pool: &SqlitePool,
    subject_id: &str,
) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
    let rows = sqlx::query(
        "SELECT event, actor, request_id FROM audit_log WHERE subject_id = ? ORDER BY created_at",
    )
    .bind(subject_id)
    .fetch_all(pool)
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

/// Inserts conversations on `conn` in one statement, the rows passed as one JSON parameter.
/// Idempotent per conversation; an unknown user fails the whole statement.
pub(super) async fn insert_conversations(
    conn: &mut SqliteConnection,
    rows: &[(&NewConversation, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    let rows: Vec<_> = rows
        .iter()
        .map(|(c, at)| {
            (
                &c.id,
                &c.user_id,
                &c.title,
                &c.personality_mode,
                timestamp(*at),
            )
        })
        .collect();
    // `WHERE true` tells SQLite's parser that `ON CONFLICT` is the upsert clause.
    sqlx::query(
        "INSERT INTO conversations (id, user_id, title, personality_mode, created_at, updated_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 4 \
         FROM json_each(?) WHERE true ON CONFLICT (id) DO NOTHING",
    )
    .bind(json_rows(&rows))
    .execute(conn)
    .await
    .map(drop)
}

/// Records audit events on `conn` in one statement. Idempotent per event.
pub(super) async fn insert_audits(
    conn: &mut SqliteConnection,
    rows: &[(&NewAuditEvent, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    let rows: Vec<_> = rows
        .iter()
        .map(|(e, at)| {
            (
                &e.id,
                &e.event,
                &e.subject_id,
                &e.actor,
                &e.request_id,
                timestamp(*at),
            )
        })
        .collect();
    sqlx::query(
        "INSERT INTO audit_log (id, event, subject_id, actor, request_id, created_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5 \
         FROM json_each(?) WHERE true ON CONFLICT (id) DO NOTHING",
    )
    .bind(json_rows(&rows))
    .execute(conn)
    .await
    .map(drop)
}

/// Rows as one JSON array of arrays, for a statement that reads them with `json_each(?)`.
fn json_rows(rows: &impl serde::Serialize) -> String {
    // Strings and options of strings always serialise.
    serde_json::to_string(rows).unwrap_or_else(|_| "[]".to_owned())
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
