//! Wiring: builds the engine, queues, store and workers from a [`Config`], and runs the roles
//! (`serve`, `serve --no-workers`, `worker`, `migrate`) with the shutdown protocol:
//! signal → stop accepting HTTP → stop claiming jobs → let in-flight jobs finish within the
//! grace period → release the rest without burning an attempt → close the engine → exit 0.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use convoq_queue::bullmq::{BullConfig, BullEngine};
use convoq_queue::sql::{SqlConfig, SqlEngine};
use convoq_queue::{Engine, Queues, WorkerOptions, WorkerPool};

use crate::config::{self, Backend, Command, Config};
use crate::domain::{CREATE_CONVERSATION, QUEUES, RECORD_AUDIT_EVENT};
use crate::http::{self, AppState, QueueStats};
use crate::processors::{CreateConversation, RecordAuditEvent};
use crate::store::{Store, StoreOptions};
use crate::telemetry::{JobTelemetry, Metrics};

/// Everything a role needs.
pub struct App {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The queues.
    pub queues: Queues,
    /// The store.
    pub store: Store,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl App {
    /// Opens the store and the queue engine (migrating both).
    ///
    /// # Errors
    /// When either cannot be opened.
    pub async fn open(config: Config) -> anyhow::Result<App> {
        let metrics = Metrics::new();
        let store_options = StoreOptions {
            max_connections: (config.pg_max_connections / 2).max(2),
            statement_timeout: config.pg_statement_timeout,
            durability: config.durability,
            ..StoreOptions::default()
        };
        let store = Store::connect(
            config.database_url.expose(),
            &store_options,
            metrics.clone(),
        )
        .await
        .with_context(|| format!("opening the store at {}", config.database_url))?;
        let engine = open_engine(&config)
            .await
            .with_context(|| format!("opening the queue at {}", config.queue_url))?;
        let queues = Queues::new(engine);
        Ok(App {
            config: Arc::new(config),
            queues,
            store,
            metrics,
        })
    }

    /// Whether processors can commit their inserts in the queue's completion transaction.
    fn shared_transaction(&self) -> bool {
        config::queue_is_store(
            self.config.queue_url.expose(),
            self.config.database_url.expose(),
        ) && self.queues.engine().capabilities().transactional_effects
    }

    /// Starts this process's workers on every queue.
    pub fn start_workers(&self) -> WorkerPool {
        let shared = self.shared_transaction();
        let mut builder = self
            .queues
            .workers()
            .processor(
                CREATE_CONVERSATION,
                Arc::new(CreateConversation {
                    store: self.store.clone(),
                    shared_transaction: shared,
                    modes: self.config.personality_modes.clone(),
                }),
            )
            .processor(
                RECORD_AUDIT_EVENT,
                Arc::new(RecordAuditEvent {
                    store: self.store.clone(),
                    shared_transaction: shared,
                }),
            )
            .observer(Arc::new(JobTelemetry {
                metrics: self.metrics.clone(),
            }));
        for q in QUEUES {
            let concurrency = self.config.concurrency.get(q).copied().unwrap_or(4);
            builder = builder.queue(
                q,
                WorkerOptions {
                    concurrency,
                    lease: self.config.lease,
                    batch: concurrency.min(64),
                    // A job whose worker died is taken back within a lease and a half at most:
                    // expired leases are looked for every half lease (every 5 s at most).
                    stalled_interval: stalled_interval(self.config.lease),
                    ..WorkerOptions::default()
                },
            );
        }
        builder.start()
    }

    /// Stops the workers of `state`, if any: in-flight jobs finish within the grace period,
    /// the rest are released.
    async fn stop_workers(&self, state: &AppState) {
        let pool = state
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(pool) = pool {
            let report = pool.shutdown(self.config.shutdown_grace).await;
            tracing::info!(released = report.released, "workers stopped");
        }
    }

    /// Closes the queue engine and the store, last thing before exit.
    pub async fn close(&self) {
        self.queues.engine().close().await;
        self.store.close().await;
        tracing::info!("shutdown complete");
    }

    /// The HTTP server's limits.
    pub fn server_limits(&self) -> http::serve::ServerLimits {
        http::serve::ServerLimits {
            max_connections: self.config.max_connections,
            header_read_timeout: self.config.header_read_timeout,
        }
    }

    /// The HTTP state.
    pub fn state(&self, workers: Option<WorkerPool>) -> AppState {
        AppState {
            queues: self.queues.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            config: self.config.clone(),
            stats: Arc::new(QueueStats::default()),
            workers: Arc::new(Mutex::new(workers)),
            sessions: Arc::default(),
            limits: Arc::new(http::limits::Limits::from_config(&self.config)),
        }
    }
}

/// Opens the queue engine the queue URL names: BullMQ on Redis for `redis://` and `rediss://`,
/// the SQL engine otherwise.
async fn open_engine(config: &Config) -> anyhow::Result<Arc<dyn Engine>> {
    if Backend::of(config.queue_url.expose()) != Some(Backend::Redis) {
        return Ok(SqlEngine::connect(sql_config(config)).await?);
    }
    let bull = BullConfig::new(config.queue_url.expose()).with_prefix(config.queue_prefix.clone());
    let engine = BullEngine::connect(bull).await?;
    check_eviction_policy(&engine, config.allow_redis_eviction).await?;
    Ok(engine)
}

/// Refuses to start on a Redis that may evict keys: under any `maxmemory-policy` but
/// `noeviction`, Redis drops keys when memory runs short, and a dropped job key is a lost job
/// (a 202 that never runs). `CONVOQ_ALLOW_REDIS_EVICTION=true` turns the refusal into a warning.
async fn check_eviction_policy(engine: &BullEngine, allow: bool) -> anyhow::Result<()> {
    let policy = match engine.maxmemory_policy().await {
        Ok(p) => p,
        Err(e) => {
            // Managed services may refuse CONFIG GET; the operator has to know the policy then.
            tracing::warn!(error = %e, "could not read Redis's maxmemory-policy; make sure it is noeviction");
            return Ok(());
        }
    };
    if policy == "noeviction" {
        return Ok(());
    }
    if allow {
        tracing::warn!(
            maxmemory_policy = %policy,
            "REDIS MAY EVICT JOBS: maxmemory-policy is not noeviction, so Redis may drop queued \
             jobs when memory runs short; started anyway because CONVOQ_ALLOW_REDIS_EVICTION=true"
        );
        return Ok(());
    }
    anyhow::bail!(
        "Redis's maxmemory-policy is {policy:?}: it may drop queued jobs when memory runs short. \
         Set it to noeviction (CONFIG SET maxmemory-policy noeviction), or start with \
         CONVOQ_ALLOW_REDIS_EVICTION=true to accept the risk"
    )
}

/// How often workers look for expired leases: every half lease, between 250 ms and 5 s.
pub fn stalled_interval(lease: std::time::Duration) -> std::time::Duration {
    (lease / 2).clamp(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(5),
    )
}

/// The queue engine's settings from the configuration (the `pg_*` ones apply on Postgres
/// only, `durability` on SQLite only).
pub fn sql_config(config: &Config) -> SqlConfig {
    let mut sql = SqlConfig::new(config.queue_url.expose());
    sql.durability = config.durability;
    sql.write_timeout = config.write_timeout;
    sql.max_connections = config.pg_max_connections;
    sql.statement_timeout = config.pg_statement_timeout;
    sql.notify = !config.pg_poll_only;
    sql
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs a role until it is told to stop.
///
/// # Errors
/// Start-up failures (bad database, port in use), with context.
pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    let app = App::open(config).await?;
    match command {
        Command::Queues { .. } | Command::Jobs { .. } => {
            app.close().await;
            anyhow::bail!("operator commands run through convoq::cli::run")
        }
        Command::Migrate => {
            tracing::info!("migrations applied");
            app.queues.engine().close().await;
            Ok(())
        }
        Command::Worker => {
            let state = app.state(Some(app.start_workers()));
            tracing::info!(
                engine = app.queues.engine().name(),
                owner = app.queues.engine().owner_id(),
                "workers started"
            );
            // Probes and scrapes, when asked for: this process's readiness and job metrics.
            let (stop_ops, ops) = match app.config.worker_listen {
                None => (None, None),
                Some(addr) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding {addr} (--worker-listen)"))?;
                    tracing::info!(listen = %listener.local_addr()?, "worker health and metrics listening");
                    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                    let serve = http::serve::serve(
                        listener,
                        http::ops_router(state.clone()),
                        app.server_limits(),
                        async move {
                            let _ = rx.await;
                        },
                    );
                    (Some(tx), Some(tokio::spawn(serve)))
                }
            };
            shutdown_signal().await;
            tracing::info!("shutting down: finishing in-flight jobs");
            if let Some(stop) = stop_ops {
                let _ = stop.send(());
            }
            app.stop_workers(&state).await;
            if let Some(ops) = ops {
                // Only probes and scrapes are served, each answered within seconds.
                if tokio::time::timeout(std::time::Duration::from_secs(2), ops)
                    .await
                    .is_err()
                {
                    tracing::warn!("health connections still open at shutdown; closing them");
                }
            }
            app.close().await;
            Ok(())
        }
        Command::Serve { no_workers } => {
            let workers = (!no_workers).then(|| app.start_workers());
            let state = app.state(workers);
            let listener = tokio::net::TcpListener::bind(app.config.listen)
                .await
                .with_context(|| format!("binding {}", app.config.listen))?;
            let addr = listener.local_addr()?;
            if app.config.protected_mode() {
                tracing::warn!(
                    "PROTECTED MODE: no API keys are configured (CONVOQ_API_KEYS), so only loopback clients are served, as admins; requests relayed by a proxy (Forwarded, X-Forwarded-For, X-Real-IP) are refused: set API keys before putting a reverse proxy in front"
                );
            }
            tracing::info!(listen = %addr, engine = app.queues.engine().name(), owner = app.queues.engine().owner_id(),
                workers = !no_workers, console = %format!("http://{addr}/ui"),
                api_docs = %format!("http://{addr}/api/docs"), "convoq listening");
            let router = http::router(state.clone());
            let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
            let serve = http::serve::serve(listener, router, app.server_limits(), async move {
                shutdown_signal().await;
                let _ = stopping_tx.send(true);
            });
            // Open connections get the grace period to finish after the signal, no more: an
            // event stream on a job that cannot finish (or a long-poll) must not hold the process.
            let grace = app.config.shutdown_grace;
            let drain_deadline = async move {
                let _ = stopping_rx.wait_for(|stopping| *stopping).await;
                tokio::time::sleep(grace).await;
            };
            tokio::select! {
                served = serve => served.context("serving HTTP")?,
                () = drain_deadline => tracing::warn!(
                    grace_secs = grace.as_secs(),
                    "HTTP connections still open after the grace period; closing them"
                ),
            }
            tracing::info!("HTTP stopped; finishing in-flight jobs");
            app.stop_workers(&state).await;
            app.close().await;
            Ok(())
        }
    }
}
