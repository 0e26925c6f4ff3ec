//! Opening SQLite connections, and the pool that runs reads on them, shared by the queue engine
//! and the service's store (one binding, `rusqlite`, for the whole SQLite path).
//!
//! A `rusqlite` connection runs each statement on the calling thread. The writer owns one on a
//! thread of its own, so its statements cost no hand-off between threads; reads borrow one
//! from a [`ReadPool`] and run on tokio's blocking threads, so that no runtime worker waits on
//! the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{ffi, Connection, ErrorCode, OpenFlags};
use tokio::sync::Semaphore;

use crate::sql::dialect::Failure;
use crate::sql::Durability;

/// Where a database lives and how its connections are set up, parsed from a `sqlite:` URL.
#[derive(Debug, Clone)]
pub struct SqliteFile {
    path: PathBuf,
    create: bool,
    durability: Durability,
    busy_timeout: Duration,
    cache_kib: i64,
}

impl SqliteFile {
    /// Parses `sqlite://PATH` or `sqlite:PATH`. `PATH` may end with `?mode=rwc` (create if
    /// missing, the default) or `?mode=rw` (the file must exist), and is percent-decoded
    /// (`%20` is a space).
    ///
    /// `sqlite::memory:` is refused: an in-memory database lives in one connection (or, in
    /// SQLite's shared-cache mode, is shared with table locks that ignore the busy timeout),
    /// while the writer, the readers and the store each need their own connection to one
    /// database. A file in a temporary directory serves tests and demos.
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
        if path == ":memory:" {
            return Err(format!(
                "{url:?}: in-memory SQLite databases are not supported, since the queue and the \
                 store open several connections to one database; use a file (for a throwaway \
                 one, a path in a temporary directory, e.g. sqlite:///tmp/convoq-demo.db)"
            ));
        }
        let decoded = percent_decode(path).map_err(|e| format!("{url:?}: {e}"))?;
        if decoded.is_empty() {
            return Err(format!("the SQLite URL {url:?} names no file"));
        }
        Ok(SqliteFile {
            path: PathBuf::from(decoded),
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

    /// The same database, opened only if its file exists (never created anew: a connection
    /// opened again must not find an empty database where the file went missing).
    pub(crate) fn existing(mut self) -> Self {
        self.create = false;
        self
    }

    /// The same database with a page cache of `kib` KiB per connection.
    pub fn cache_kib(mut self, kib: i64) -> Self {
        self.cache_kib = kib;
        self
    }

    /// Whether `other` names the same database: the same file (compared by its canonical
    /// path, so `sqlite:x.db`, `sqlite://./x.db` and an absolute path agree; a file not yet
    /// created by the canonical path of its directory).
    pub fn same_database(&self, other: &SqliteFile) -> bool {
        canonical(&self.path) == canonical(&other.path)
    }

    /// How long a statement waits for another connection's lock.
    pub fn busy_timeout_value(&self) -> Duration {
        self.busy_timeout
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a connection in WAL mode with the file's settings, foreign keys on and a cache of
    /// prepared statements.
    ///
    /// # Errors
    /// SQLite's, when the file cannot be opened or set up (a busy answer while another process
    /// switches a new file to WAL mode among them: see [`retry_while_busy`]).
    pub fn open(&self) -> rusqlite::Result<Connection> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if self.create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(&self.path, flags)?;
        conn.busy_timeout(self.busy_timeout)?;
        conn.set_prepared_statement_cache_capacity(64);
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(failure(
                ffi::SQLITE_CANTOPEN,
                format!("SQLite kept journal mode {mode:?}: WAL mode is needed"),
            ));
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

/// `path` made absolute with symbolic links resolved, as far as it exists: a file not yet
/// created is its directory's canonical path joined with its name.
fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let name = path.file_name().map(PathBuf::from).unwrap_or_default();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match dir.canonicalize() {
        Ok(d) => d.join(name),
        Err(_) => std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Decodes `%XX` escapes in a URL's path.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    format!("a % in a path must start an escape like %20 (at byte {i})")
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the path's escapes do not decode to UTF-8".to_owned())
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
    idle: Arc<Mutex<Vec<Connection>>>,
    permits: Arc<Semaphore>,
    acquire_timeout: Duration,
    closed: Arc<AtomicBool>,
}

impl ReadPool {
    /// A pool of at most `size` connections (at least 1) to `file`.
    pub fn new(file: SqliteFile, size: u32, acquire_timeout: Duration) -> Arc<Self> {
        let size = size.max(1) as usize;
        Arc::new(ReadPool {
            file,
            idle: Arc::new(Mutex::new(Vec::with_capacity(size))),
            permits: Arc::new(Semaphore::new(size)),
            acquire_timeout,
            closed: Arc::new(AtomicBool::new(false)),
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
        let permit =
            match tokio::time::timeout(self.acquire_timeout, self.permits.clone().acquire_owned())
                .await
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
        // The permit and the connection's return go with the blocking call: a caller that stops
        // waiting (its future dropped) frees the slot only once the call is over and its
        // connection is back.
        let (pool, closed) = (self.idle.clone(), self.closed.clone());
        let joined = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut conn = match idle {
                Ok(c) => c,
                Err(file) => match file.open() {
                    Ok(c) => c,
                    Err(e) => return Err(e),
                },
            };
            let r = f(&mut conn);
            let keep = conn.is_autocommit() || conn.execute_batch("ROLLBACK").is_ok();
            if keep && !closed.load(Ordering::Acquire) {
                pool.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            }
            r
        })
        .await;
        joined.map_err(|e| {
            failure(
                ffi::SQLITE_INTERNAL,
                format!("a database call did not finish: {e}"),
            )
        })?
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
        assert_eq!(f.path().to_str(), Some("convoq.db"));
        let f = SqliteFile::from_url("sqlite:///tmp/x.db?mode=rw").unwrap();
        assert_eq!(f.path().to_str(), Some("/tmp/x.db"));
        assert!(!f.create);
        let err = SqliteFile::from_url("sqlite::memory:").unwrap_err();
        assert!(err.contains("in-memory"), "{err}");
        let err = SqliteFile::from_url("sqlite://x.db?cache=private").unwrap_err();
        assert!(err.contains("cache=private"), "{err}");
        let err = SqliteFile::from_url("sqlite://").unwrap_err();
        assert!(err.contains("names no file"), "{err}");
        let err = SqliteFile::from_url("postgres://x").unwrap_err();
        assert!(err.contains("starts with sqlite://"), "{err}");
        let f = SqliteFile::from_url("sqlite:///tmp/my%20data.db").unwrap();
        assert_eq!(f.path().to_str(), Some("/tmp/my data.db"));
        let err = SqliteFile::from_url("sqlite://x%2.db").unwrap_err();
        assert!(err.contains("escape"), "{err}");
    }

    #[test]
    fn the_same_file_is_the_same_database_however_it_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = |url: String| SqliteFile::from_url(&url).unwrap();
        let abs = file(format!("sqlite://{}/x.db", dir.path().display()));
        let short = file(format!("sqlite:{}/x.db", dir.path().display()));
        let dotted = file(format!("sqlite://{}/./sub/../x.db", dir.path().display()));
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(abs.same_database(&short));
        assert!(abs.same_database(&dotted));
        assert!(!abs.same_database(&file(format!("sqlite://{}/y.db", dir.path().display()))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_stays_taken_while_its_call_runs_after_the_caller_left() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let pool = super::ReadPool::new(
            SqliteFile::from_url(&url).unwrap(),
            1,
            Duration::from_millis(100),
        );
        let slow = pool.run(|_| {
            std::thread::sleep(Duration::from_millis(600));
            Ok(())
        });
        // The caller gives up; the blocking call runs on.
        assert!(tokio::time::timeout(Duration::from_millis(50), slow)
            .await
            .is_err());
        let busy = pool.run(|_| Ok(())).await;
        assert!(busy.is_err(), "the one connection is still in use");
        tokio::time::sleep(Duration::from_millis(700)).await;
        pool.run(|_| Ok(())).await.unwrap();
    }
}
