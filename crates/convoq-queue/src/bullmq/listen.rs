//! Wake-ups from other processes: one listener per queue this process works, reading the
//! queue's BullMQ event stream (`<prefix>:<queue>:events`, the stream Node's `QueueEvents`
//! reads) with `XREAD BLOCK`, which consumes nothing, so Node workers on the same queue lose no
//! wake-up of their own. A job added or put back to wait by anyone wakes this process's idle
//! workers at once; every event of a job rings its bell, so followers of jobs run elsewhere see
//! their changes without waiting for the poll.
//!
//! A busy queue writes several events per job. Reading each as it comes would cost Redis an
//! unblocked read per event (as much as the job itself); so after a read that returned events
//! the listener pauses [`READ_GAP`] and then takes everything written meanwhile in one read.
//! A quiet queue's first event still wakes the workers at once.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use super::{codec, BullEngine};
use crate::events::WatchRegistry;

/// The pause after a read that returned events.
const READ_GAP: Duration = Duration::from_millis(20);
/// How long one `XREAD` blocks (the stop signal interrupts it).
const BLOCK_MS: u64 = 5_000;
/// The most events one read returns.
const READ_COUNT: u64 = 10_000;

/// Starts the listener of `queue` unless it runs already (or no tokio runtime is current).
pub(super) fn ensure(engine: &BullEngine, queue: &str) {
    let mut listeners = engine.listeners.lock().unwrap_or_else(|p| p.into_inner());
    if listeners.get(queue).is_some_and(|h| !h.is_finished()) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let listener = Listener {
        url: engine.config.url.clone(),
        stream: engine.keys(queue).events(),
        queue: queue.to_owned(),
        signal: engine.signal(queue),
        watches: engine.watches.clone(),
    };
    let stop = engine.stop_listeners.subscribe();
    let task = runtime.spawn(listener.run(stop));
    listeners.insert(queue.to_owned(), task);
}

struct Listener {
    url: String,
    stream: String,
    queue: String,
    signal: tokio::sync::watch::Sender<u64>,
    watches: WatchRegistry,
}

impl Listener {
    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        // Its own connection, without a response timeout: it blocks in XREAD on purpose.
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(5)));
        redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut retry = Duration::from_millis(200);
        while !*stop.borrow() {
            let mut conn = match self.connect().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(queue = %self.queue, error = %e, "event listener cannot connect; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = stop.changed() => return,
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            retry = Duration::from_millis(200);
            // Jobs added while the listener was (re)connecting were not seen: look once.
            self.signal.send_modify(|v| *v += 1);
            let mut last_id = "$".to_owned();
            loop {
                let mut xread = redis::cmd("XREAD");
                xread
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(BLOCK_MS)
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(&last_id);
                let read = xread.query_async::<Value>(&mut conn);
                let reply = tokio::select! {
                    r = read => r,
                    _ = stop.changed() => return,
                };
                match reply {
                    Ok(v) => {
                        let got = self.dispatch(&v, &mut last_id);
                        if got > 0 {
                            tokio::select! {
                                _ = tokio::time::sleep(READ_GAP) => {}
                                _ = stop.changed() => return,
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(queue = %self.queue, error = %e, "event listener lost its connection; reconnecting");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Rings the bells of the events in an `XREAD` reply and wakes the workers if a job may
    /// have become ready; advances `last_id`. Returns how many events there were.
    fn dispatch(&self, reply: &Value, last_id: &mut String) -> usize {
        // [[stream, [[id, [field, value, ...]], ...]]], or nil when the block timed out.
        let Value::Array(streams) = reply else {
            return 0;
        };
        let mut n = 0;
        let mut wake = false;
        for stream in streams {
            let Value::Array(parts) = stream else {
                continue;
            };
            let Some(Value::Array(entries)) = parts.get(1) else {
                continue;
            };
            for entry in entries {
                let Value::Array(entry) = entry else { continue };
                let (Some(id), Some(Value::Array(fields))) = (entry.first(), entry.get(1)) else {
                    continue;
                };
                if let Some(id) = codec::value_str(id) {
                    *last_id = id;
                }
                n += 1;
                let mut event = None;
                let mut job_id = None;
                for pair in fields.chunks(2) {
                    if let [k, v] = pair {
                        match codec::value_str(k).as_deref() {
                            Some("event") => event = codec::value_str(v),
                            Some("jobId") => job_id = codec::value_str(v),
                            _ => {}
                        }
                    }
                }
                if let Some(id) = &job_id {
                    self.watches.notify(&self.queue, id);
                }
                if matches!(
                    event.as_deref(),
                    Some("added" | "waiting" | "resumed" | "stalled")
                ) {
                    wake = true;
                }
            }
        }
        if wake {
            self.signal.send_modify(|v| *v += 1);
        }
        n
    }
}
