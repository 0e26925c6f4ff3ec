//! The store on Postgres: the pool, the migrations of `migrations/postgres/` (numbered in step
//! with SQLite's), and the statements.
//!
//! Differences from SQLite: timestamps are `TIMESTAMPTZ` (read back and sent as RFC 3339 UTC
//! with milliseconds, as SQLite's text), conversation ids sort with the `C` collation so that
//! pagination follows UUIDv7 byte order whatever the database's locale, migrations are
//! serialised across processes by an advisory lock, and an upsert tells an insert from an
//! update in the same statement.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool, Row};

use async_trait::async_trait;

use super::{
    map_err, timestamp, Backend, Conversation, NewAuditEvent, NewConversation, StoreError,
    StoreOptions, User,
};

/// The migrations, in order, numbered in step with SQLite's.
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/postgres/0001_init.sql")];

/// The advisory lock that serialises the store's migrations in one database ("cv_schem" in
/// ASCII; the queue's is "cq_schem").
const MIGRATION_LOCK: i64 = 0x6376_5f73_6368_656d;

/// Opens the pool (lazily: connections open on first use and are re-opened after they break).
pub(super) fn open(url: &str, options: &StoreOptions) -> Result<PgStore, StoreError> {
    let statement_timeout = options.statement_timeout.as_millis().max(1).to_string();
    let opts = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Unavailable(format!("bad store URL: {e}")))?
        .application_name("convoq-store")
        .options([("statement_timeout", statement_timeout.as_str())])
        .log_statements(tracing::log::LevelFilter::Trace);
    Ok(PgStore(
        PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(opts),
    ))
}

/// The store on Postgres: its pool.
pub(super) struct PgStore(PgPool);

#[async_trait]
impl Backend for PgStore {
    /// Applies the migrations the database lacks, under an advisory transaction lock so that
    /// processes starting together apply each step once.
    async fn migrate(&self) -> Result<(), StoreError> {
        let pool = &self.0;
        let mut conn = pool.acquire().await.map_err(map_err)?;
        let r = migrate_steps(&mut conn).await;
        if r.is_err() {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        }
        r
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pool = &self.0;
        sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop)
            .map_err(map_err)
    }

    async fn upsert_user(
        &self,
        id: &str,
        discord_id: &str,
        username: &str,
        global_name: Option<&str>,
    ) -> Result<(User, bool), StoreError> {
        let pool = &self.0;
        // `xmax = 0` holds for a row this statement inserted, not for one it updated.
        let row = sqlx::query(
            "INSERT INTO users (id, discord_id, username, global_name, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (id) DO UPDATE SET \
             discord_id = excluded.discord_id, username = excluded.username, \
             global_name = excluded.global_name, updated_at = excluded.updated_at \
             RETURNING id, discord_id, username, global_name, created_at, updated_at, (xmax = 0)",
        )
        .bind(id)
        .bind(discord_id)
        .bind(username)
        .bind(global_name)
        .bind(now_ms())
        .fetch_one(pool)
        .await
        .map_err(map_err)?;
        let created: bool = row.try_get(6).map_err(map_err)?;
        Ok((user_from_row(&row)?, created))
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>, StoreError> {
        let pool = &self.0;
        let row = sqlx::query(
            "SELECT id, discord_id, username, global_name, created_at, updated_at FROM users WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(map_err)?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    async fn get_conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError> {
        let pool = &self.0;
        let row = sqlx::query(
            "SELECT id, user_id, title, personality_mode, created_at, updated_at \
             FROM conversations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(map_err)?;
        row.map(|r| conversation_from_row(&r)).transpose()
    }

    async fn list_conversations(
        &self,
        user_id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Vec<Conversation>, StoreError> {
        let pool = &self.0;
        let rows = sqlx::query(
            "SELECT id, user_id, title, personality_mode, created_at, updated_at \
             FROM conversations WHERE user_id = $1 AND ($2::text IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(user_id)
        .bind(cursor)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(conversation_from_row).collect()
    }

    async fn audit_events_for(
        &self,
        subject_id: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
        let pool = &self.0;
        let rows = sqlx::query(
            "SELECT event, actor, request_id FROM audit_log WHERE subject_id = $1 ORDER BY created_at",
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

    fn dialect(&self) -> &'static str {
        "postgres"
    }

    async fn insert_conversations(
        &self,
        rows: &[(&NewConversation, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let mut conn = self.0.acquire().await.map_err(map_err)?;
        insert_conversations(&mut conn, rows).await.map_err(map_err)
    }

    async fn insert_audits(
        &self,
        rows: &[(&NewAuditEvent, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let mut conn = self.0.acquire().await.map_err(map_err)?;
        insert_audits(&mut conn, rows).await.map_err(map_err)
    }

    async fn close(&self) {
        self.0.close().await;
    }
}

async fn migrate_steps(conn: &mut PgConnection) -> Result<(), StoreError> {
    let run = |sql: &'static str| sqlx::query(sql);
    run("BEGIN").execute(&mut *conn).await.map_err(map_err)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    run("CREATE TABLE IF NOT EXISTS convoq_schema (version BIGINT NOT NULL)")
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    let have: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM convoq_schema")
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
    let have = have.unwrap_or(0) as usize;
    if have > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "the store's schema is version {have}, newer than this build knows ({}); upgrade convoq",
            MIGRATIONS.len()
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(have) {
        for statement in step.split(';').filter(|s| !s.trim().is_empty()) {
            sqlx::query(statement)
                .execute(&mut *conn)
                .await
                .map_err(map_err)?;
        }
        sqlx::query("INSERT INTO convoq_schema (version) VALUES ($1)")
            .bind(i as i64 + 1)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
    }
    run("COMMIT").execute(&mut *conn).await.map_err(map_err)?;
    Ok(())
}

/// Inserts conversations on `conn` in one statement, the rows passed as arrays. Idempotent per
/// conversation; an unknown user fails the whole statement.
pub(super) async fn insert_conversations(
    conn: &mut PgConnection,
    rows: &[(&NewConversation, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = rows.iter().map(|(c, _)| c.id.as_str()).collect();
    let users: Vec<&str> = rows.iter().map(|(c, _)| c.user_id.as_str()).collect();
    let titles: Vec<Option<&str>> = rows.iter().map(|(c, _)| c.title.as_deref()).collect();
    let modes: Vec<&str> = rows
        .iter()
        .map(|(c, _)| c.personality_mode.as_str())
        .collect();
    let ats: Vec<DateTime<Utc>> = rows.iter().map(|(_, at)| millis(*at)).collect();
    sqlx::query(
        "INSERT INTO conversations (id, user_id, title, personality_mode, created_at, updated_at) \
         SELECT id, user_id, title, mode, at, at \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) \
           AS r (id, user_id, title, mode, at) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .bind(users)
    .bind(titles)
    .bind(modes)
    .bind(ats)
    .execute(conn)
    .await
    .map(drop)
}

/// Records audit events on `conn` in one statement. Idempotent per event.
pub(super) async fn insert_audits(
    conn: &mut PgConnection,
    rows: &[(&NewAuditEvent, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = rows.iter().map(|(e, _)| e.id.as_str()).collect();
    let events: Vec<&str> = rows.iter().map(|(e, _)| e.event.as_str()).collect();
    let subjects: Vec<&str> = rows.iter().map(|(e, _)| e.subject_id.as_str()).collect();
    let actors: Vec<&str> = rows.iter().map(|(e, _)| e.actor.as_str()).collect();
    let requests: Vec<Option<&str>> = rows.iter().map(|(e, _)| e.request_id.as_deref()).collect();
    let ats: Vec<DateTime<Utc>> = rows.iter().map(|(_, at)| millis(*at)).collect();
    sqlx::query(
        "INSERT INTO audit_log (id, event, subject_id, actor, request_id, created_at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
           $6::timestamptz[]) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(ids)
    .bind(events)
    .bind(subjects)
    .bind(actors)
    .bind(requests)
    .bind(ats)
    .execute(conn)
    .await
    .map(drop)
}

/// `t` cut to whole milliseconds, the precision SQLite's text keeps, so that both dialects
/// read back the same instant.
fn millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

fn now_ms() -> DateTime<Utc> {
    millis(Utc::now())
}

fn rfc3339(r: &sqlx::postgres::PgRow, i: usize) -> Result<String, StoreError> {
    let t: DateTime<Utc> = r.try_get(i).map_err(map_err)?;
    Ok(timestamp(t))
}

fn user_from_row(r: &sqlx::postgres::PgRow) -> Result<User, StoreError> {
    Ok(User {
        id: r.try_get(0).map_err(map_err)?,
        discord_id: r.try_get(1).map_err(map_err)?,
        username: r.try_get(2).map_err(map_err)?,
        global_name: r.try_get(3).map_err(map_err)?,
        created_at: rfc3339(r, 4)?,
        updated_at: rfc3339(r, 5)?,
    })
}

fn conversation_from_row(r: &sqlx::postgres::PgRow) -> Result<Conversation, StoreError> {
    Ok(Conversation {
        id: r.try_get(0).map_err(map_err)?,
        user_id: r.try_get(1).map_err(map_err)?,
        title: r.try_get(2).map_err(map_err)?,
        personality_mode: r.try_get(3).map_err(map_err)?,
        created_at: rfc3339(r, 4)?,
        updated_at: rfc3339(r, 5)?,
    })
}
