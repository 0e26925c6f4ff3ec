//! Opening SQLite connections, and the pool that runs reads on them, shared by the queue engine
//! and the service's store (one binding, `rusqlite`, for the whole SQLite path).
//!
//! A `rusqlite` connection runs each statement on the calling thread. The writer owns one on a
//! thread of its own, so its statements cost no hand-off between threads; reads borrow one
//! from a [`ReadPool`] and run on tokio's blocking threads, so that no runtime worker waits on
//! the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{ffi, Connection, ErrorCode, OpenFlags};
use tokio::sync::Semaphore;

use crate::sql::dialect::Failure;
use crate::sql::Durability;

/// Where a database lives and how its connections are set up, parsed from a `sqlite:` URL.
#[derive(Debug, Clone)]
pub struct SqliteFile {
    target: Target,
    create: bool,
    durability: Durability,
    busy_timeout: Duration,
    cache_kib: i64,
}

#[derive(Debug, Clone)]
enum Target {
    Path(PathBuf),
    /// A private in-memory database, shared by this process's connections under this name.
    Memory(String),
}

/// Names of in-memory databases, unique within the process.
static MEMORY_DBS: AtomicU64 = AtomicU64::new(0);

impl SqliteFile {
    /// Parses `sqlite://PATH`, `sqlite:PATH` or `sqlite::memory:`. `PATH` may end with
    /// `?mode=rwc` (create if missing, the default) or `?mode=rw` (the file must exist).
    ///
    /// # Errors
    /// A message naming what is wrong with the URL.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| format!("a SQLite URL starts with sqlite://, not {url:?}"))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut create = true;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair {
                "mode=rwc" => create = true,
                "mode=rw" => create = false,
                other => {
                    return Err(format!(
                        "unknown SQLite URL parameter {other:?}: expected mode=rwc or mode=rw"
                    ))
                }
            }
        }
        let target = match path {
            "" => return Err(format!("the SQLite URL {url:?} names no file")),
            ":memory:" => Target::Memory(format!(
                "file:convoq-memory-{}-{}?mode=memory&cache=shared",
                std::process::id(),
                MEMORY_DBS.fetch_add(1, Ordering::Relaxed)
            )),
            p => Target::Path(PathBuf::from(p)),
        };
        Ok(SqliteFile {
            target,
            create,
            durability: Durability::default(),
            busy_timeout: Duration::from_secs(5),
            cache_kib: 2_000,
        })
    }

    /// The same database with SQLite's `synchronous` setting for `durability`.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The same database, each statement waiting up to `timeout` for another connection's lock.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The same database with a page cache of `kib` KiB per connection.
    pub fn cache_kib(mut self, kib: i64) -> Self {
        self.cache_kib = kib;
        self
    }

    /// How long a statement waits for another connection's lock.
    pub fn busy_timeout_value(&self) -> Duration {
        self.busy_timeout
    }

    /// The database file, unless it lives in memory.
    pub fn path(&self) -> Option<&Path> {
        match &self.target {
            Target::Path(p) => Some(p),
            Target::Memory(_) => None,
        }
    }

    /// Opens a connection in WAL mode with the file's settings, foreign keys on and a cache of
    /// prepared statements.
    ///
    /// # Errors
    /// SQLite's, when the file cannot be opened or set up (a busy answer while another process
    /// switches a new file to WAL mode among them: see [`retry_while_busy`]).
    pub fn open(&self) -> rusqlite::Result<Connection> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        if self.create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = match &self.target {
            Target::Path(p) => Connection::open_with_flags(p, flags)?,
            Target::Memory(uri) => Connection::open_with_flags(uri, flags)?,
        };
        conn.busy_timeout(self.busy_timeout)?;
        conn.set_prepared_statement_cache_capacity(64);
        if matches!(self.target, Target::Path(_)) {
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(failure(
                    ffi::SQLITE_CANTOPEN,
                    format!("SQLite kept journal mode {mode:?}: WAL mode is needed"),
                ));
            }
        }
        let synchronous = match self.durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
            Durability::Off => "OFF",
        };
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON; \
             PRAGMA temp_store = MEMORY; PRAGMA cache_size = -{};",
            self.cache_kib.max(0)
        ))?;
        Ok(conn)
    }
}

/// An error of SQLite's own kind with a message of ours.
pub(crate) fn failure(code: std::ffi::c_int, message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some(message))
}

/// Whether SQLite said the database is busy or locked: another connection holds the lock this
/// one needs.
pub fn sqlite_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// What a SQLite error says about the database, for the writer (see [`Failure`]): busy or
/// locked, a full disk, a database that cannot be read or written (I/O, corruption, a file that
/// is gone or read-only), or else one statement's own failure (a constraint, a bad value).
pub(crate) fn classify(e: &rusqlite::Error) -> Failure {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Failure::Busy,
        Some(ErrorCode::DiskFull) => Failure::Full,
        Some(
            ErrorCode::SystemIoFailure
            | ErrorCode::DatabaseCorrupt
            | ErrorCode::NotADatabase
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::OutOfMemory
            | ErrorCode::InternalMalfunction,
        ) => Failure::Broken,
        _ => Failure::Operation,
    }
}

/// Runs `attempt` again while SQLite answers that the database is busy or locked
/// ([`sqlite_busy`]), for up to `within`: for start-up steps that processes opening a new file
/// together race for (switching it to WAL mode, migrating), where SQLite answers the loser at
/// once rather than through the busy timeout. Blocks the calling thread between attempts.
pub fn retry_while_busy<T>(
    within: Duration,
    mut attempt: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match attempt() {
            Err(e) if sqlite_busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Connections of one database for reads (and the store's own writes), each lent to one
/// closure at a time on tokio's blocking threads. Connections open on first use and are kept
/// for the next caller; at most `size` are lent at once, and a caller waits for one up to the
/// pool's acquire timeout.
pub struct ReadPool {
    file: SqliteFile,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
    acquire_timeout: Duration,
    closed: AtomicBool,
}

impl ReadPool {
    /// A pool of at most `size` connections (at least 1) to `file`.
    pub fn new(file: SqliteFile, size: u32, acquire_timeout: Duration) -> Arc<Self> {
        let size = size.max(1) as usize;
        Arc::new(ReadPool {
            file,
            idle: Mutex::new(Vec::with_capacity(size)),
            permits: Semaphore::new(size),
            acquire_timeout,
            closed: AtomicBool::new(false),
        })
    }

    /// The database this pool opens.
    pub fn file(&self) -> &SqliteFile {
        &self.file
    }

    /// Runs `f` on a connection of the pool, on a blocking thread. A connection that `f` left
    /// inside a transaction is rolled back (or dropped, if that fails) before it is kept.
    ///
    /// # Errors
    /// `f`'s own; busy when no connection came free within the acquire timeout; SQLite's when a
    /// connection could not be opened; an internal error when the pool is closed or `f`
    /// panicked.
    pub async fn run<T, F>(&self, f: F) -> rusqlite::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let _permit = match tokio::time::timeout(self.acquire_timeout, self.permits.acquire()).await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(closed()),
            Err(_) => {
                return Err(failure(
                    ffi::SQLITE_BUSY,
                    format!(
                        "no SQLite connection came free within {:?}",
                        self.acquire_timeout
                    ),
                ))
            }
        };
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        // The file's settings travel only when a connection must be opened.
        let idle = idle.ok_or_else(|| self.file.clone());
        let joined = tokio::task::spawn_blocking(move || {
            let mut conn = match idle {
                Ok(c) => c,
                Err(file) => match file.open() {
                    Ok(c) => c,
                    Err(e) => return (None, Err(e)),
                },
            };
            let r = f(&mut conn);
            let keep = conn.is_autocommit() || conn.execute_batch("ROLLBACK").is_ok();
            (keep.then_some(conn), r)
        })
        .await;
        let (conn, r) = joined.map_err(|e| {
            failure(
                ffi::SQLITE_INTERNAL,
                format!("a database call did not finish: {e}"),
            )
        })?;
        if let Some(conn) = conn {
            if !self.closed.load(Ordering::Acquire) {
                self.idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(conn);
            }
        }
        r
    }

    /// Closes the idle connections and refuses later calls; connections lent out close when
    /// their call ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.permits.close();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

fn closed() -> rusqlite::Error {
    failure(ffi::SQLITE_MISUSE, "the connection pool is closed".into())
}

#[cfg(test)]
mod tests {
    use super::SqliteFile;

    #[test]
    fn parses_the_url_forms() {
        let f = SqliteFile::from_url("sqlite://convoq.db").unwrap();
        assert_eq!(f.path().unwrap().to_str(), Some("convoq.db"));
        let f = SqliteFile::from_url("sqlite:///tmp/x.db?mode=rw").unwrap();
        assert_eq!(f.path().unwrap().to_str(), Some("/tmp/x.db"));
        assert!(!f.create);
        assert!(SqliteFile::from_url("sqlite::memory:")
            .unwrap()
            .path()
            .is_none());
        let err = SqliteFile::from_url("sqlite://x.db?cache=private").unwrap_err();
        assert!(err.contains("cache=private"), "{err}");
        assert!(SqliteFile::from_url("sqlite://").is_err());
        assert!(SqliteFile::from_url("postgres://x").is_err());
    }

    #[tokio::test]
    async fn memory_databases_are_shared_by_a_pool_and_private_to_it() {
        let file = SqliteFile::from_url("sqlite::memory:").unwrap();
        let pool = super::ReadPool::new(file, 2, std::time::Duration::from_secs(1));
        // Keep one connection open so that the shared in-memory database lives on.
        let keep = pool.file().open().unwrap();
        keep.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1)")
            .unwrap();
        let n: i64 = pool
            .run(|c| c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(n, 1);
        let other = SqliteFile::from_url("sqlite::memory:").unwrap();
        assert!(other
            .open()
            .unwrap()
            .execute_batch("SELECT * FROM t")
            .is_err());
    }
}
