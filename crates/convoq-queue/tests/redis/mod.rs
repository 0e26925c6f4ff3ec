//! Fresh Redis key prefixes for tests, from `CONVOQ_TEST_REDIS_URL`.

#![allow(dead_code)] // Each test crate uses its own part of this module.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use convoq_queue::bullmq::{BullConfig, BullEngine};
use convoq_queue::testkit::EngineFactory;
use convoq_queue::{Clock, Engine};

/// The variable naming the test server.
pub const VAR: &str = "CONVOQ_TEST_REDIS_URL";

/// The server's URL, or `None` after saying that the test is skipped.
pub fn url() -> Option<String> {
    match std::env::var(VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            println!("skipped: {VAR} is not set");
            None
        }
    }
}

/// Key prefixes used by one test, whose keys are deleted when it ends.
pub struct Prefixes {
    url: String,
    names: Mutex<Vec<String>>,
}

impl Prefixes {
    pub fn new(url: String) -> Self {
        Prefixes {
            url,
            names: Mutex::new(Vec::new()),
        }
    }

    /// A new prefix (`cqtest-<uuid>`), remembered for clean-up.
    pub fn create(&self) -> String {
        let name = format!("cqtest-{}", uuid::Uuid::new_v4().simple());
        self.names.lock().unwrap().push(name.clone());
        name
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Deletes every key under `prefix:`.
pub async fn delete_keys(url: &str, prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

impl Drop for Prefixes {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap());
        if names.is_empty() {
            return;
        }
        let url = self.url.clone();
        convoq_queue::testkit::run_cleanup(async move {
            for name in names {
                let _ = delete_keys(&url, &name).await;
            }
        });
    }
}

/// The conformance suite's factory: a new key prefix per engine.
pub struct Redis {
    pub prefixes: Prefixes,
    pub engines: Mutex<Vec<Arc<dyn Engine>>>,
}

#[async_trait]
impl EngineFactory for Redis {
    async fn engine(&self, clock: Arc<dyn Clock>) -> Arc<dyn Engine> {
        let config = BullConfig::new(self.prefixes.url())
            .with_prefix(self.prefixes.create())
            .with_clock(clock);
        let engine: Arc<dyn Engine> = BullEngine::connect(config)
            .await
            .expect("connect the BullMQ engine");
        self.engines.lock().unwrap().push(engine.clone());
        engine
    }
}

/// The factory, or `None` when no server is configured.
pub fn factory() -> Option<Redis> {
    Some(Redis {
        prefixes: Prefixes::new(url()?),
        engines: Mutex::new(Vec::new()),
    })
}
