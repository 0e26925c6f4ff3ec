//! Wake-ups from other processes: one BullMQ `QueueEvents` listener per queue this process
//! works, reading the queue's event stream (`XREAD BLOCK`, which consumes nothing, so Node
//! workers on the same queue lose no wake-up of their own). A job added or put back to wait by
//! anyone wakes this process's idle workers at once; every event of a job rings its bell, so
//! followers of jobs run elsewhere see their changes without waiting for the poll.

use std::time::Duration;

use bullmq::options::RedisConnectionOptions;
use bullmq::{QueueEvents, QueueEventsOptions};

use super::BullEngine;
use crate::events::WatchRegistry;

/// Starts the listener of `queue` unless it runs already (or no tokio runtime is current).
pub(super) fn ensure(engine: &BullEngine, queue: &str) {
    let mut listeners = engine.listeners.lock().unwrap_or_else(|p| p.into_inner());
    if listeners.get(queue).is_some_and(|h| !h.is_finished()) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let opts = QueueEventsOptions {
        connection: RedisConnectionOptions::new().url(engine.config.url.clone()),
        prefix: engine.config.prefix.clone(),
        blocking_timeout: 5_000,
        last_event_id: None,
        autorun: true,
    };
    let signal = engine.signal(queue);
    let watches = engine.watches.clone();
    let name = queue.to_owned();
    let stop = engine.stop_listeners.subscribe();
    let task = runtime.spawn(run(name, opts, signal, watches, stop));
    listeners.insert(queue.to_owned(), task);
}

async fn run(
    queue: String,
    opts: QueueEventsOptions,
    signal: tokio::sync::watch::Sender<u64>,
    watches: WatchRegistry,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut retry = Duration::from_millis(200);
    while !*stop.borrow() {
        let events = match QueueEvents::with_options(&queue, opts.clone()).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(queue = %queue, error = %e, "queue events listener cannot connect; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        retry = Duration::from_millis(200);
        // Jobs added while the listener was (re)connecting were not seen: look once.
        signal.send_modify(|v| *v += 1);
        loop {
            let entry = tokio::select! {
                e = events.next_event() => e,
                _ = stop.changed() => None,
            };
            let Some(entry) = entry else { break };
            if let Some(id) = entry.event.job_id() {
                watches.notify(&queue, id);
            }
            if matches!(
                entry.event.name(),
                "added" | "waiting" | "resumed" | "stalled"
            ) {
                signal.send_modify(|v| *v += 1);
            }
        }
        // The listener's own reading task ends only when told to.
        events.close().await;
        if *stop.borrow() {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}
