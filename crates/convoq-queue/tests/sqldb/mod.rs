//! A database of either SQL dialect for the SQL engine's tests, with what they look at or
//! tamper with from outside the engine, and the effect they commit with completions.
//!
//! Statements given to [`Db`] use `$1`, `$2`… for their parameters, which both dialects read.

#![allow(dead_code)] // Each test crate uses its own part of this module.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use convoq_queue::sql::{SqlConfig, SqlConn, SqlEngine, SqliteFile, TxEffect};
use convoq_queue::{Completion, Engine, NewJob, Outcome, ProcessError, Queues};
use serde_json::json;
use tokio::sync::oneshot;

use crate::pg;

pub const LEASE: Duration = Duration::from_secs(30);

/// A fresh database: a SQLite file in a temporary directory, or a Postgres database of its own.
pub enum Db {
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        _dbs: pg::Databases,
        url: String,
    },
}

impl Db {
    pub fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        Db::Sqlite { _dir: dir, url }
    }

    /// A fresh Postgres database, or `None` when no server is configured (the test is skipped,
    /// and says so).
    pub async fn postgres() -> Option<Db> {
        let dbs = pg::Databases::new(pg::admin_url()?);
        let url = dbs.create().await;
        Some(Db::Postgres { _dbs: dbs, url })
    }

    pub fn url(&self) -> &str {
        match self {
            Db::Sqlite { url, .. } | Db::Postgres { url, .. } => url,
        }
    }

    /// An engine on the database, with default settings.
    pub async fn engine(&self) -> Arc<SqlEngine> {
        SqlEngine::connect(SqlConfig::new(self.url()))
            .await
            .unwrap()
    }

    /// A connection of its own to a SQLite database. Its statements block the calling thread,
    /// for at most the busy timeout while the engine's writer holds the lock.
    pub fn sqlite_conn(&self) -> rusqlite::Connection {
        SqliteFile::from_url(self.url()).unwrap().open().unwrap()
    }

    pub async fn execute(&self, sql: &str, args: &[&str]) {
        match self {
            Db::Sqlite { .. } => {
                self.sqlite_conn()
                    .execute(sql, rusqlite::params_from_iter(args))
                    .unwrap();
            }
            Db::Postgres { url, .. } => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                let mut q = sqlx::query(sql);
                for a in args {
                    q = q.bind(*a);
                }
                q.execute(&pool).await.unwrap();
                pool.close().await;
            }
        }
    }

    /// The first column of the first row, as text.
    pub async fn text(&self, sql: &str, args: &[&str]) -> String {
        match self {
            Db::Sqlite { .. } => self
                .sqlite_conn()
                .query_row(sql, rusqlite::params_from_iter(args), |r| r.get(0))
                .unwrap(),
            Db::Postgres { url, .. } => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                let mut q = sqlx::query_scalar(sql);
                for a in args {
                    q = q.bind(*a);
                }
                let v = q.fetch_one(&pool).await.unwrap();
                pool.close().await;
                v
            }
        }
    }

    /// How many effect rows [`InsertRow`] wrote for `key`.
    pub async fn effect_rows(&self, key: &str) -> i64 {
        self.text(
            "SELECT CAST(COUNT(*) AS TEXT) FROM effects WHERE key = $1",
            &[key],
        )
        .await
        .parse()
        .unwrap()
    }
}

/// Inserts a row into `effects` (made on first use), or fails as told. Effects of one batch
/// are applied as a group, in one call (counted in `GROUP_CALLS` when their first key starts
/// with `g`, the keys of the one test that reads it, since tests of one binary may run in
/// parallel threads).
pub struct InsertRow {
    pub key: String,
    pub fail: Option<ProcessError>,
}

pub static GROUP_CALLS: AtomicUsize = AtomicUsize::new(0);

#[async_trait]
impl TxEffect for InsertRow {
    async fn apply(&self, conn: SqlConn<'_>, now_ms: i64) -> Result<(), ProcessError> {
        self.apply_group(&[self], conn, now_ms).await
    }
    fn group(&self) -> Option<&'static str> {
        Some("insert-row")
    }
    async fn apply_group(
        &self,
        effects: &[&dyn TxEffect],
        conn: SqlConn<'_>,
        _now_ms: i64,
    ) -> Result<(), ProcessError> {
        if self.key.starts_with('g') {
            GROUP_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        let rows: Vec<&InsertRow> = effects
            .iter()
            .filter_map(|e| e.as_any()?.downcast_ref())
            .collect();
        const TABLE: &str = "CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL)";
        const INSERT: &str = "INSERT INTO effects (key) VALUES ($1)";
        match conn {
            SqlConn::Sqlite(conn) => {
                conn.execute(TABLE, []).map_err(ProcessError::retryable)?;
                for r in &rows {
                    conn.execute(INSERT, [&r.key])
                        .map_err(ProcessError::retryable)?;
                }
            }
            SqlConn::Postgres(conn) => {
                sqlx::query(TABLE)
                    .execute(&mut *conn)
                    .await
                    .map_err(ProcessError::retryable)?;
                for r in &rows {
                    sqlx::query(INSERT)
                        .bind(&r.key)
                        .execute(&mut *conn)
                        .await
                        .map_err(ProcessError::retryable)?;
                }
            }
        }
        match rows.iter().find_map(|r| r.fail.clone()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// A completion that writes an [`InsertRow`] for `key` (failing as told) and adds the follow-up
/// job `audit-{key}`.
pub fn completion(key: &str, fail: Option<ProcessError>) -> Outcome {
    let mut c = Completion::with_result(json!({ "key": key }));
    c.follow_ups
        .push(NewJob::new("audit", "audit", json!({ "of": key })).with_id(format!("audit-{key}")));
    c.effect = Some(Arc::new(InsertRow {
        key: key.to_owned(),
        fail,
    }));
    Outcome::Completed(c)
}

/// An effect that signals when the writer runs it, then waits to be released.
struct Hold {
    entered: Mutex<Option<oneshot::Sender<()>>>,
    release: Mutex<Option<oneshot::Receiver<()>>>,
}

#[async_trait]
impl TxEffect for Hold {
    async fn apply(&self, _conn: SqlConn<'_>, _now_ms: i64) -> Result<(), ProcessError> {
        let entered = self.entered.lock().unwrap().take();
        if let Some(entered) = entered {
            let _ = entered.send(());
        }
        let release = self.release.lock().unwrap().take();
        if let Some(release) = release {
            let _ = release.await;
        }
        Ok(())
    }
}

/// The writer, kept inside a completion's effect (of a job on queue `hold`) until released:
/// operations sent meanwhile all wait in its queue and reach it as one batch, however a loaded
/// machine schedules the threads. The held completion is one more operation and one more commit
/// in [`SqlEngine::write_stats`]. (On SQLite, whose engine has one writer.)
pub struct HeldWriter {
    release: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl HeldWriter {
    pub async fn new(engine: &Arc<SqlEngine>) -> HeldWriter {
        Queues::new(engine.clone())
            .add(NewJob::new("hold", "hold", json!(null)))
            .await
            .unwrap();
        let claimed = engine.claim("hold", 1, LEASE).await.unwrap().jobs.remove(0);
        let (entered_tx, entered) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        let mut c = Completion::with_result(json!(null));
        c.effect = Some(Arc::new(Hold {
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(Some(release_rx)),
        }));
        let engine = engine.clone();
        let done = tokio::spawn(async move {
            engine
                .finish(&claimed, Outcome::Completed(c))
                .await
                .unwrap();
        });
        entered.await.unwrap();
        HeldWriter { release, done }
    }

    /// Lets the writer go on, and waits for the held completion's commit.
    pub async fn release(self) {
        self.release.send(()).unwrap();
        self.done.await.unwrap();
    }
}
