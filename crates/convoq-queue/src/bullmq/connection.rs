//! The engine's connection to Redis: connecting (with the prefix and scripts checked), the
//! calls every other part goes through (`io`, `query`, `eval`, each failing fast as
//! unavailable while Redis is away), the crate's queue handles, and wake-up signals.

use super::*;

impl BullEngine {
    /// Connects to Redis and loads the engine's scripts.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] for a bad URL or prefix; [`QueueError::Unavailable`] when Redis
    /// cannot be reached within the connect timeout.
    pub async fn connect(config: BullConfig) -> Result<Arc<BullEngine>> {
        if !(config.url.starts_with("redis://") || config.url.starts_with("rediss://")) {
            return Err(QueueError::Invalid(
                "the Redis URL must start with redis:// or rediss://".into(),
            ));
        }
        if config.prefix.is_empty() || config.prefix.contains([':', '{', '}']) {
            return Err(QueueError::Invalid(
                "the key prefix must be non-empty, without ':' or braces".into(),
            ));
        }
        let timed_out = || {
            unavailable(format!(
                "connecting to {} timed out after {:?}",
                redacted(&config.url),
                config.connect_timeout
            ))
        };
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| QueueError::Invalid(format!("the Redis URL: {e}")))?;
        let manager = ConnectionManagerConfig::new()
            .set_number_of_retries(RECONNECT_TRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY)
            .set_connection_timeout(Some(config.connect_timeout.min(config.command_timeout)))
            // Every call is bounded by the command timeout already.
            .set_response_timeout(None);
        let redis = tokio::time::timeout(
            config.connect_timeout,
            ConnectionManager::new_with_config(client, manager),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(unavailable)?;
        let opts = RedisConnectionOptions::new().url(config.url.clone());
        let conn = tokio::time::timeout(
            config.connect_timeout,
            RedisConnection::new_managed_only(&opts),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(from_bullmq)?;
        let engine = BullEngine {
            owner: uuid::Uuid::new_v4().to_string(),
            clock: Arc::new(LeadingClock {
                base: config.clock.clone(),
                lead: Arc::new(ServerLead::default()),
            }),
            lead_measured_us: std::sync::atomic::AtomicI64::new(system_us()),
            config,
            redis,
            conn,
            scripts: Scripts::get(),
            watches: WatchRegistry::default(),
            signals: Mutex::new(HashMap::new()),
            listeners: Mutex::new(HashMap::new()),
            stop_listeners: watch::channel(false).0,
            queues: tokio::sync::Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        };
        let mut c = engine.redis.clone();
        engine
            .io(engine.scripts.load(&mut c))
            .await
            .map_err(|e| match e {
                QueueError::Unavailable(m) => QueueError::Unavailable(m),
                other => other,
            })?;
        engine.measure_lead().await?;
        Ok(Arc::new(engine))
    }

    /// Reads Redis's clock (`TIME`) and offers the reading to its measured lead.
    async fn measure_lead(&self) -> Result<()> {
        let mut c = self.redis.clone();
        let before = system_us();
        let (secs, micros): (i64, i64) = self.io(redis::cmd("TIME").query_async(&mut c)).await?;
        let after = system_us();
        self.clock
            .lead
            .offer(before, secs.saturating_mul(1_000_000) + micros, after);
        Ok(())
    }

    /// [`BullEngine::measure_lead`] if the last measurement is [`LEAD_EVERY`] old; a failure
    /// keeps the lead held (the caller's own call fails as it will).
    pub(super) async fn measure_lead_if_due(&self) {
        let now = system_us();
        let last = self.lead_measured_us.load(Ordering::Relaxed);
        if now - last < LEAD_EVERY.as_micros() as i64
            || self
                .lead_measured_us
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let _ = self.measure_lead().await;
    }

    /// Redis's `maxmemory-policy`. BullMQ needs `noeviction`: under any other policy Redis may
    /// silently drop job keys when memory runs short.
    ///
    /// # Errors
    /// When Redis cannot be reached, or refuses `CONFIG GET` (some managed services do).
    pub async fn maxmemory_policy(&self) -> Result<String> {
        let mut c = self.redis.clone();
        let reply: Vec<String> = self
            .io(redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async(&mut c))
            .await?;
        Ok(reply.get(1).cloned().unwrap_or_default())
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    pub(super) fn keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(queue, Some(&self.config.prefix))
    }

    /// Runs one Redis operation under the command timeout, translating its error.
    pub(super) async fn io<T>(&self, op: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        match tokio::time::timeout(self.config.command_timeout, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable(format!(
                "no answer within {:?}",
                self.config.command_timeout
            ))),
        }
    }

    /// Runs a pipeline (or transaction) that calls scripts; if Redis lost its script cache (a
    /// restart), loads the scripts and runs it once more.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        let mut c = self.redis.clone();
        let first = tokio::time::timeout(self.config.command_timeout, pipe.query_async(&mut c))
            .await
            .map_err(|_| unavailable("no answer in time"))?;
        match first {
            Err(e) if scripts::is_noscript(&e) => {
                self.io(self.scripts.load(&mut c)).await?;
                self.io(pipe.query_async(&mut c)).await
            }
            other => self.io(async { other }).await,
        }
    }

    /// Runs one script call.
    pub(super) async fn eval(&self, cmd: redis::Cmd) -> Result<Value> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let mut out: Vec<Value> = self.query(&pipe).await?;
        out.pop()
            .ok_or_else(|| unavailable("empty reply to a script call"))
    }

    /// The crate's queue handle for the operator calls, made once per queue.
    pub(super) async fn queue(&self, name: &str) -> Result<bullmq::Queue> {
        let mut map = self.queues.lock().await;
        if let Some(q) = map.get(name) {
            return Ok(q.clone());
        }
        let opts = bullmq::QueueOptions::new().prefix(self.config.prefix.clone());
        let q = tokio::time::timeout(
            self.config.command_timeout,
            bullmq::Queue::with_connection(name, self.conn.clone(), opts),
        )
        .await
        .map_err(|_| unavailable("no answer in time"))?
        .map_err(from_bullmq)?;
        map.insert(name.to_owned(), q.clone());
        Ok(q)
    }

    pub(super) fn signal(&self, queue: &str) -> watch::Sender<u64> {
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(queue.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    pub(super) fn wake(&self, queue: &str) {
        self.signal(queue).send_modify(|v| *v += 1);
    }

    pub(super) fn changed(&self, queue: &str, id: &str) {
        self.watches.notify(queue, id);
    }
}
