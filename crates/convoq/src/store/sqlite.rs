//! The store on SQLite, through `rusqlite`: the pool, the migrations of `migrations/sqlite/`,
//! and the statements.
//!
//! The pool is the queue engine's [`ReadPool`]: a few connections, each lent to one closure at
//! a time on tokio's blocking threads, so that no runtime worker waits on the file. Every
//! operation here is one such closure, its statements prepared through each connection's
//! statement cache. The inserts that run inside the queue engine's completion transaction
//! ([`insert_conversations`], [`insert_audits`]) are plain functions of a connection: the
//! engine's writer calls them on its own thread, inside its open transaction.
//!
//! Timestamps are stored as RFC 3339 text (UTC, milliseconds), which sorts like time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use convoq_queue::sql::{retry_while_busy, sqlite_busy, ReadPool, SqliteFile};
use rusqlite::{params, Connection, OptionalExtension, Row};

use async_trait::async_trait;

use super::{
    map_sqlite_err, timestamp, Backend, Conversation, NewAuditEvent, NewConversation, StoreError,
    StoreOptions, User,
};

/// The migrations, in order, numbered in step with Postgres's. A database records how many it
/// has applied in `convoq_schema`.
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/sqlite/0001_init.sql")];

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many connections the pool holds at most.
const POOL_SIZE: u32 = 4;

/// Each connection's page cache, in KiB: SQLite's own default.
const CACHE_KIB: i64 = 2_000;

/// Opens the pool (lazily: the first call opens the file, creating it if needed).
pub(super) fn open(url: &str, options: &StoreOptions) -> Result<SqliteStore, StoreError> {
    let file = SqliteFile::from_url(url)
        .map_err(|e| StoreError::Unavailable(format!("bad store URL: {e}")))?
        .durability(options.durability)
        .busy_timeout(BUSY_TIMEOUT)
        .cache_kib(CACHE_KIB);
    Ok(SqliteStore(ReadPool::new(
        file,
        POOL_SIZE,
        options.acquire_timeout,
    )))
}

/// The store on SQLite: the pool its operations run on.
pub(super) struct SqliteStore(Arc<ReadPool>);

#[async_trait]
impl Backend for SqliteStore {
    /// Applies the migrations the database lacks, in one immediate transaction, on a connection of
    /// the pool (which keeps it, and with it an in-memory database, open).
    ///
    /// Processes that open a new file together race to switch it to WAL mode, and SQLite answers
    /// the loser "database is locked" at once rather than through the busy timeout (two readers
    /// that both want to write would otherwise wait for each other): so a busy answer is retried,
    /// for up to the busy timeout: inside the blocking call when the migration gets it, around the
    /// call when opening the pool's connection does.
    async fn migrate(&self) -> Result<(), StoreError> {
        let pool = &self.0;
        let within = pool.file().busy_timeout_value();
        let deadline = Instant::now() + within;
        loop {
            let r = pool
                .run(move |c| retry_while_busy(within, || migrate_once(c)))
                .await;
            match r {
                Err(e) if sqlite_busy(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                r => return r.map_err(map_sqlite_err),
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pool = &self.0;
        pool.run(|c| c.prepare_cached("SELECT 1")?.query_row([], |_| Ok(())))
            .await
            .map_err(map_sqlite_err)
    }

    async fn upsert_user(
        &self,
        id: &str,
        discord_id: &str,
        username: &str,
        global_name: Option<&str>,
    ) -> Result<(User, bool), StoreError> {
        let pool = &self.0;
        let now = timestamp(Utc::now());
        let (id, discord_id, username) =
            (id.to_owned(), discord_id.to_owned(), username.to_owned());
        let global_name = global_name.map(str::to_owned);
        pool.run(move |c| {
            // One immediate transaction: no other writer comes between the read that tells a new
            // user (201) from an updated one (200) and the write.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let existed = select_user(&tx, &id)?.is_some();
            let user = tx
                .prepare_cached(
                    "INSERT INTO users (id, discord_id, username, global_name, created_at, updated_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (id) DO UPDATE SET \
                     discord_id = excluded.discord_id, username = excluded.username, \
                     global_name = excluded.global_name, updated_at = excluded.updated_at \
                     RETURNING id, discord_id, username, global_name, created_at, updated_at",
                )?
                .query_row(
                    params![id, discord_id, username, global_name, now],
                    user_from_row,
                )?;
            tx.commit()?;
            Ok((user, !existed))
        })
        .await
        .map_err(map_sqlite_err)
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>, StoreError> {
        let pool = &self.0;
        let id = id.to_owned();
        pool.run(move |c| select_user(c, &id))
            .await
            .map_err(map_sqlite_err)
    }

    async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let pool = &self.0;
        let id = id.to_owned();
        pool.run(move |c| {
            c.prepare_cached(
                "SELECT id, user_id, title, personality_mode, created_at, updated_at \
                 FROM conversations WHERE id = ?1",
            )?
            .query_row(params![id], conversation_from_row)
            .optional()
        })
        .await
        .map_err(map_sqlite_err)
    }

    async fn list_conversations(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Vec<Conversation>, StoreError> {
        let pool = &self.0;
        let user_id = user_id.to_owned();
        let cursor = cursor.map(str::to_owned);
        pool.run(move |c| {
            c.prepare_cached(
                "SELECT id, user_id, title, personality_mode, created_at, updated_at \
                 FROM conversations WHERE user_id = ?1 AND (?2 IS NULL OR id < ?2) \
                 ORDER BY id DESC LIMIT ?3",
            )?
            .query_map(
                params![user_id, cursor, i64::from(limit)],
                conversation_from_row,
            )?
            .collect()
        })
        .await
        .map_err(map_sqlite_err)
    }

    async fn audit_events_for(
        &self,
        subject_id: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
        let pool = &self.0;
        let subject_id = subject_id.to_owned();
        pool.run(move |c| {
            c.prepare_cached(
                "SELECT event, actor, request_id FROM audit_log WHERE subject_id = ?1 \
                 ORDER BY created_at",
            )?
            .query_map(params![subject_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect()
        })
        .await
        .map_err(map_sqlite_err)
    }

    fn dialect(&self) -> &'static str {
        "sqlite"
    }

    async fn insert_conversations(
        &self,
        rows: &[(&NewConversation, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let rows: Vec<(NewConversation, DateTime<Utc>)> =
            rows.iter().map(|(r, at)| ((*r).clone(), *at)).collect();
        self.0
            .run(move |conn| {
                let rows: Vec<_> = rows.iter().map(|(r, at)| (r, *at)).collect();
                insert_conversations(conn, &rows)
            })
            .await
            .map_err(map_sqlite_err)
    }

    async fn insert_audits(
        &self,
        rows: &[(&NewAuditEvent, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let rows: Vec<(NewAuditEvent, DateTime<Utc>)> =
            rows.iter().map(|(r, at)| ((*r).clone(), *at)).collect();
        self.0
            .run(move |conn| {
                let rows: Vec<_> = rows.iter().map(|(r, at)| (r, *at)).collect();
                insert_audits(conn, &rows)
            })
            .await
            .map_err(map_sqlite_err)
    }

    async fn close(&self) {
        self.0.close();
    }
}

fn migrate_once(conn: &mut Connection) -> rusqlite::Result<()> {
    let r = migrate_steps(conn);
    if r.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    r
}

fn migrate_steps(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS convoq_schema (version INTEGER NOT NULL)")?;
    let have: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM convoq_schema", [], |r| r.get(0))?;
    for (i, step) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(have.unwrap_or(0) as usize)
    {
        conn.execute_batch(step)?;
        conn.execute(
            "INSERT INTO convoq_schema (version) VALUES (?1)",
            params![i as i64 + 1],
        )?;
    }
    conn.execute_batch("COMMIT")
}

fn select_user(c: &Connection, id: &str) -> rusqlite::Result<Option<User>> {
    c.prepare_cached(
        "SELECT id, discord_id, username, global_name, created_at, updated_at FROM users WHERE id = ?1",
    )?
    .query_row(params![id], user_from_row)
    .optional()
}

/// Inserts conversations on `conn` in one statement, the rows passed as one JSON parameter.
/// Idempotent per conversation; an unknown user fails the whole statement.
pub(super) fn insert_conversations(
    conn: &Connection,
    rows: &[(&NewConversation, DateTime<Utc>)],
) -> rusqlite::Result<()> {
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
    conn.prepare_cached(
        "INSERT INTO conversations (id, user_id, title, personality_mode, created_at, updated_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 4 \
         FROM json_each(?1) WHERE true ON CONFLICT (id) DO NOTHING",
    )?
    .execute(params![json_rows(&rows)])
    .map(drop)
}

/// Records audit events on `conn` in one statement. Idempotent per event.
pub(super) fn insert_audits(
    conn: &Connection,
    rows: &[(&NewAuditEvent, DateTime<Utc>)],
) -> rusqlite::Result<()> {
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
    conn.prepare_cached(
        "INSERT INTO audit_log (id, event, subject_id, actor, request_id, created_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5 \
         FROM json_each(?1) WHERE true ON CONFLICT (id) DO NOTHING",
    )?
    .execute(params![json_rows(&rows)])
    .map(drop)
}

/// Rows as one JSON array of arrays, for a statement that reads them with `json_each(?)`.
fn json_rows(rows: &impl serde::Serialize) -> String {
    // Strings and options of strings always serialise.
    serde_json::to_string(rows).unwrap_or_else(|_| "[]".to_owned())
}

fn user_from_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        discord_id: r.get(1)?,
        username: r.get(2)?,
        global_name: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

fn conversation_from_row(r: &Row<'_>) -> rusqlite::Result<Conversation> {
    Ok(Conversation {
        id: r.get(0)?,
        user_id: r.get(1)?,
        title: r.get(2)?,
        personality_mode: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}
