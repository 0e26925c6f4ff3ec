//! Shared helpers for the tests that drive the real `convoq` binary (`e2e.rs`, `crash.rs`,
//! `multiprocess.rs`, `outage.rs`) and the store (`store.rs`): a [`Server`] process on a
//! temporary directory and a free loopback port, a minimal HTTP/1.1 client over a plain TCP
//! socket (one connection per request, so a killed server shows up as a connection error and
//! nothing is pooled across restarts), a server-sent-events reader, and the database a test
//! runs on ([`TestDatabase`]: a SQLite file, opened with `rusqlite` through the queue engine's
//! [`ReadPool`], or a fresh Postgres database from `CONVOQ_TEST_POSTGRES_URL`, opened with
//! `sqlx`); [`on_each_database!`] runs one test body on each.
//!
//! Everything targets 127.0.0.1 and every wait is bounded.

#![allow(dead_code)]

mod http;
pub mod metrics;
pub mod postgres;
pub mod proxy;
pub mod redis;
mod sse;
pub mod webdriver;

#[allow(unused_imports)] // Not every test binary reads events.
pub use http::*;
#[allow(unused_imports)]
pub use sse::*;

/// Runs each listed test body (`async fn name(db: TestDatabase)`) once on SQLite (module
/// `sqlite`) and once on Postgres (module `postgres`, skipped with a printed reason when
/// `CONVOQ_TEST_POSTGRES_URL` is unset), under the given test attribute.
#[allow(unused_macros)] // Not every test file runs on each database.
macro_rules! on_each_database {
    (#[$attr:meta] $($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[$attr]
            async fn $name() {
                if let Some(db) = crate::support::TestDatabase::sqlite().await {
                    super::$name(db).await;
                }
            })*
        }
        mod postgres {
            $(#[$attr]
            async fn $name() {
                if let Some(db) = crate::support::TestDatabase::postgres().await {
                    super::$name(db).await;
                }
            })*
        }
    };
}

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoq_queue::sql::{ReadPool, SqliteFile};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// How long one request may take before it counts as lost.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A port nobody listens on right now (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// How many attempts a worker's `logs` show ended late and refused: fenced by their lease
/// token, or not recorded (their session ended while the worker was cut off, then fenced).
pub fn late_attempts_refused(logs: &str) -> usize {
    json_lines(logs)
        .iter()
        .filter(|l| {
            l["message"].as_str().is_some_and(|m| {
                m.contains("lease was taken back") || m.contains("attempt not recorded")
            })
        })
        .count()
}

/// `CONVOQ_TEST_REDIS_URL`, or `None` after saying the test is skipped without it.
pub fn test_redis_url() -> Option<String> {
    let url = std::env::var("CONVOQ_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty());
    if url.is_none() {
        println!("skipped: CONVOQ_TEST_REDIS_URL is not set");
    }
    url
}

/// The database a test runs on, dropped (file or Postgres database) when the test ends.
pub struct TestDatabase {
    /// Its URL, for `--database-url`.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<postgres::Databases>,
}

impl TestDatabase {
    /// A SQLite file in a temporary directory (`Option` only to match [`TestDatabase::postgres`]).
    pub async fn sqlite() -> Option<TestDatabase> {
        let dir = tempfile::tempdir().expect("tempdir");
        Some(TestDatabase {
            url: format!("sqlite://{}", dir.path().join("convoq.db").display()),
            _dir: Some(dir),
            _pg: None,
        })
    }

    /// A fresh Postgres database, or `None` (after saying the test is skipped) when
    /// `CONVOQ_TEST_POSTGRES_URL` is unset.
    pub async fn postgres() -> Option<TestDatabase> {
        let dbs = postgres::Databases::new(postgres::admin_url()?);
        let url = dbs.create().await;
        Some(TestDatabase {
            url,
            _dir: None,
            _pg: Some(dbs),
        })
    }

    /// Whether this is Postgres.
    pub fn is_postgres(&self) -> bool {
        self._pg.is_some()
    }

    /// Opens the database from the test (the server may or may not be running).
    pub async fn open(&self) -> Db {
        match &self._dir {
            Some(dir) => Db::Sqlite(open_db(&dir.path().join("convoq.db")).await),
            None => Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&self.url)
                    .await
                    .unwrap_or_else(|e| panic!("open the test database: {e}")),
            ),
        }
    }
}

/// A test's own connection to the database convoq runs on.
#[derive(Clone)]
pub enum Db {
    /// The SQLite file.
    Sqlite(Arc<ReadPool>),
    /// The Postgres database.
    Postgres(PgPool),
}

impl Db {
    /// `SELECT COUNT(*) …` (or any query of one integer; on Postgres it is cast to `bigint`, so
    /// that a `SUM` reads as on SQLite).
    pub async fn count(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite(pool) => count(pool, sql).await,
            Db::Postgres(pool) => sqlx::query_scalar::<_, i64>(&format!("SELECT ({sql})::bigint"))
                .fetch_one(pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    /// Closes the test's connections.
    pub async fn close(self) {
        match self {
            Db::Sqlite(pool) => pool.close(),
            Db::Postgres(pool) => pool.close().await,
        }
    }
}

/// What a `convoq` process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `convoq` (API and workers), on `--listen`.
    Serve,
    /// `convoq serve --no-workers`, on `--listen`.
    Api,
    /// `convoq worker`, with its health and metrics on `--worker-listen`.
    Worker,
}

/// A `convoq` process on its own directory and database. Killed (SIGKILL) when dropped if it
/// still runs.
pub struct Server {
    /// Names its log files (`NAME-N.log`), so that several processes may share a directory.
    pub name: String,
    /// What it runs.
    pub role: Role,
    /// The port it listens on (kept across restarts).
    pub port: u16,
    /// Its working directory, holding the logs (and, by default, the SQLite database).
    pub dir: PathBuf,
    /// The database URL it runs on.
    pub database_url: String,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// How many times a process was started.
    pub starts: u32,
}

impl Server {
    /// Starts `convoq` on `dir` (database `dir/convoq.db`) with extra `CONVOQ_*` settings, on a
    /// free port, and waits until it is ready.
    pub async fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
        let url = format!("sqlite://{}", dir.join("convoq.db").display());
        Self::start_on(dir, &url, env).await
    }

    /// Starts `convoq` on the database at `database_url`, with its logs in `dir`, and waits
    /// until it is ready.
    pub async fn start_on(dir: &Path, database_url: &str, env: &[(&str, &str)]) -> Server {
        Self::launch(dir, "convoq", Role::Serve, database_url, env).await
    }

    /// Starts a `convoq` process of `role`, logging to `dir/NAME-N.log`, on the database at
    /// `database_url`, and waits until its `/readyz` answers 200.
    pub async fn launch(
        dir: &Path,
        name: &str,
        role: Role,
        database_url: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let mut server = Server {
            name: name.to_owned(),
            role,
            port: 0,
            dir: dir.to_path_buf(),
            database_url: database_url.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            starts: 0,
        };
        // Another process may take the port between our probe and the bind: try a few.
        for _ in 0..3 {
            server.port = free_port();
            server.spawn();
            match server.try_ready(Duration::from_secs(30)).await {
                Ok(()) => return server,
                Err(e) if e.contains("binding") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("convoq could not bind a free port in 3 tries");
    }

    /// The SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("convoq.db")
    }

    /// The log file (stderr) of the `n`th start (1-based).
    pub fn log_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("{}-{n}.log", self.name))
    }

    /// The logs of every start so far, concatenated.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect()
    }

    /// The last lines of the logs, for failure messages.
    pub fn log_tail(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts a new process on the same port and database (the previous one must have exited).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "a convoq process is still running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_convoq"));
        for (k, _) in std::env::vars() {
            if k.starts_with("CONVOQ_") {
                cmd.env_remove(k);
            }
        }
        let listen = format!("127.0.0.1:{}", self.port);
        match self.role {
            Role::Serve => cmd.arg("--listen").arg(&listen),
            Role::Api => cmd.args(["serve", "--no-workers", "--listen", &listen]),
            Role::Worker => cmd.args(["worker", "--worker-listen", &listen]),
        };
        cmd.current_dir(&self.dir)
            .arg("--database-url")
            .arg(&self.database_url)
            .env("CONVOQ_LOG_FORMAT", "json")
            .env("CONVOQ_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().expect("spawn convoq"));
    }

    /// Waits (bounded) until `GET /readyz` answers 200; panics with the log tail otherwise.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        if let Err(e) = self.try_ready(timeout).await {
            panic!("{e}");
        }
    }

    async fn try_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Err(format!(
                    "convoq exited with {status} before it was ready; log tail:\n{}",
                    self.log_tail()
                ));
            }
            if let Ok(r) = get(self.port, "/readyz").await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "convoq not ready after {timeout:?}; log tail:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running convoq").id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// SIGKILLs the process and reaps it.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("a running convoq");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The exit status if the process has exited (and reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// Waits (bounded) for the process to exit; `None` if it is still running at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit (status 0) within `timeout`.
    pub async fn stop(&mut self, timeout: Duration) {
        self.sigterm();
        let started = Instant::now();
        let status = self.wait_exit(timeout).await;
        match status {
            Some(s) => assert!(
                s.success(),
                "convoq exited with {s} after SIGTERM; log tail:\n{}",
                self.log_tail()
            ),
            None => panic!(
                "convoq still running {:?} after SIGTERM; log tail:\n{}",
                started.elapsed(),
                self.log_tail()
            ),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The SQLite file, opened by the test (the server may or may not be running): a pool of one
/// connection, which must find the file there (`mode=rw`) and waits up to 10 s for a lock.
pub async fn open_db(path: &Path) -> Arc<ReadPool> {
    let file = SqliteFile::from_url(&format!("sqlite://{}?mode=rw", path.display()))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .busy_timeout(Duration::from_secs(10));
    let pool = ReadPool::new(file, 1, Duration::from_secs(30));
    // Open the connection now, so that a missing file fails here as it did.
    pool.run(|_| Ok(()))
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    pool
}

/// `SELECT COUNT(*) …` (or any single integer).
pub async fn count(db: &ReadPool, sql: &str) -> i64 {
    let query = sql.to_owned();
    db.run(move |c| c.prepare_cached(&query)?.query_row([], |r| r.get(0)))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Every row of `sql`, each read by `row`.
pub async fn query_rows<T: Send + 'static>(
    db: &ReadPool,
    sql: &str,
    row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Vec<T> {
    let query = sql.to_owned();
    db.run(move |c| c.prepare_cached(&query)?.query_map([], row)?.collect())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The JSON log lines (non-JSON lines skipped).
pub fn json_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
