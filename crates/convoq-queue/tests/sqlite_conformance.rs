//! The conformance suite on the SQLite engine: each test gets a fresh database file.

use std::sync::Arc;

use async_trait::async_trait;
use convoq_queue::sql::{SqlConfig, SqlEngine};
use convoq_queue::testkit::EngineFactory;
use convoq_queue::{Clock, Engine};

struct Sqlite {
    dir: tempfile::TempDir,
}

#[async_trait]
impl EngineFactory for Sqlite {
    async fn engine(&self, clock: Arc<dyn Clock>) -> Arc<dyn Engine> {
        let path = self.dir.path().join(format!("{}.db", uuid_like()));
        let config = SqlConfig::new(format!("sqlite://{}", path.display())).with_clock(clock);
        SqlEngine::connect(config)
            .await
            .expect("open SQLite engine")
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("engine-{}", N.fetch_add(1, Ordering::SeqCst))
}

fn factory() -> Sqlite {
    Sqlite {
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

convoq_queue::conformance_tests!(crate::factory());
