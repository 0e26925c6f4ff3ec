//! The Postgres engine for this crate's tests: fresh databases from the testkit, and the
//! conformance suite's factory.

#![allow(dead_code)] // Each test crate uses its own part of this module.

use std::sync::Arc;

use async_trait::async_trait;
use convoq_queue::sql::{SqlConfig, SqlEngine};
pub use convoq_queue::testkit::postgres::{admin_url, Databases};
use convoq_queue::testkit::EngineFactory;
use convoq_queue::{Clock, Engine};

/// The conformance suite's factory: a new database per engine.
pub struct Postgres {
    pub dbs: Databases,
    pub configure: Arc<dyn Fn(&mut SqlConfig) + Send + Sync>,
}

#[async_trait]
impl EngineFactory for Postgres {
    async fn engine(&self, clock: Arc<dyn Clock>) -> Arc<dyn Engine> {
        let url = self.dbs.create().await;
        let mut config = SqlConfig::new(url).with_clock(clock);
        (self.configure)(&mut config);
        SqlEngine::connect(config)
            .await
            .expect("open Postgres engine")
    }
}

/// The factory with default settings, or `None` when no server is configured.
pub fn factory() -> Option<Postgres> {
    factory_with(|_| {})
}

/// The factory with adjusted settings.
pub fn factory_with(
    configure: impl Fn(&mut SqlConfig) + Send + Sync + 'static,
) -> Option<Postgres> {
    Some(Postgres {
        dbs: Databases::new(admin_url()?),
        configure: Arc::new(configure),
    })
}
