//! Fresh Postgres databases for tests, from `CONVOQ_TEST_POSTGRES_URL`: a test creates its own
//! `cq_test_<uuid>` databases and drops them, with their connections, when it ends. Without the
//! variable, a test says it is skipped and returns. Used by this crate's tests and the
//! service's.

use std::sync::Mutex;

use sqlx::Connection;

/// The variable naming the test server.
pub const VAR: &str = "CONVOQ_TEST_POSTGRES_URL";

/// The admin URL, or `None` after saying that the test is skipped.
pub fn admin_url() -> Option<String> {
    match std::env::var(VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            println!("skipped: {VAR} is not set");
            None
        }
    }
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Databases created by one test, dropped (with their connections) when it ends.
pub struct Databases {
    admin: String,
    names: Mutex<Vec<String>>,
}

impl Databases {
    /// Databases on the server of `admin` (a URL whose database the test may connect to).
    pub fn new(admin: String) -> Self {
        Databases {
            admin,
            names: Mutex::new(Vec::new()),
        }
    }

    /// Creates a fresh database and returns its URL.
    pub async fn create(&self) -> String {
        let name = format!("cq_test_{}", uuid::Uuid::new_v4().simple());
        create_database(&self.admin, &name).await;
        self.names.lock().unwrap().push(name.clone());
        with_database(&self.admin, &name)
    }
}

async fn create_database(admin: &str, name: &str) {
    let mut admin = sqlx::PgConnection::connect(admin)
        .await
        .expect("connect to the admin database");
    let sql = format!("CREATE DATABASE {name}");
    sqlx::query(&sql)
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let _ = admin.close().await;
}

impl Drop for Databases {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap());
        if names.is_empty() {
            return;
        }
        let admin = self.admin.clone();
        super::run_cleanup(async move {
            let Ok(mut admin) = sqlx::PgConnection::connect(&admin).await else {
                return;
            };
            for name in names {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
            let _ = admin.close().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_in_urls() {
        assert_eq!(
            with_database("postgres://root@127.0.0.1:5432/postgres", "x"),
            "postgres://root@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "x"),
            "postgresql://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }
}
