//! A job's history as [`JobEvent`]s, and the per-job bell engines ring when a job changes
//! ([`WatchRegistry`]). Engines store enough to rebuild a job's history
//! ([`crate::Engine::history`]); `crate::follow::Follower` combines the two.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One step in a job's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobEvent {
    /// What happened.
    pub kind: JobEventKind,
    /// When.
    pub at: DateTime<Utc>,
    /// The attempt it belongs to (0 before the first attempt).
    pub attempt: u32,
    /// The result (`completed`), the reason (`failed`, `retrying`, `stalled`), or the wait
    /// before the next attempt in milliseconds (`retrying`, as `delayMs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// The kinds of [`JobEvent`], named as BullMQ's events where BullMQ has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobEventKind {
    /// Added, ready to run (or put back to run again).
    Waiting,
    /// Added with a delay.
    Delayed,
    /// An attempt started.
    Active,
    /// An attempt failed and another will follow after a backoff.
    Retrying,
    /// An attempt's lease expired; the job was taken back.
    Stalled,
    /// Finished successfully.
    Completed,
    /// Finished unsuccessfully.
    Failed,
}

impl JobEventKind {
    /// The lowercase name, as in server-sent events.
    pub fn as_str(self) -> &'static str {
        match self {
            JobEventKind::Waiting => "waiting",
            JobEventKind::Delayed => "delayed",
            JobEventKind::Active => "active",
            JobEventKind::Retrying => "retrying",
            JobEventKind::Stalled => "stalled",
            JobEventKind::Completed => "completed",
            JobEventKind::Failed => "failed",
        }
    }

    /// Whether the job has finished with this event.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobEventKind::Completed | JobEventKind::Failed)
    }
}

type JobKey = (String, String);

/// Per-job change bells. An engine rings [`WatchRegistry::notify`] after it commits a change to a
/// job; a [`JobWatch`] taken earlier sees it even if it was not waiting at that moment.
#[derive(Debug, Default, Clone)]
pub struct WatchRegistry {
    inner: Arc<Mutex<HashMap<JobKey, watch::Sender<u64>>>>,
}

impl WatchRegistry {
    /// Starts watching one job.
    pub fn watch(&self, queue: &str, id: &str) -> JobWatch {
        // A std mutex: the critical sections are a map lookup and never await.
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let sender = map
            .entry((queue.to_owned(), id.to_owned()))
            .or_insert_with(|| watch::channel(0).0);
        JobWatch {
            rx: sender.subscribe(),
        }
    }

    /// Rings the bell of one job, if anyone watches it.
    pub fn notify(&self, queue: &str, id: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return;
        }
        let key = (queue.to_owned(), id.to_owned());
        if let Some(sender) = map.get(&key) {
            if sender.receiver_count() == 0 {
                map.remove(&key);
            } else {
                sender.send_modify(|v| *v += 1);
            }
        }
        // Forget bells nobody listens to any more, a few at a time.
        if map.len() > 1024 {
            map.retain(|_, s| s.receiver_count() > 0);
        }
    }
}

/// A subscription to one job's changes, from [`WatchRegistry::watch`].
#[derive(Debug)]
pub struct JobWatch {
    rx: watch::Receiver<u64>,
}

impl JobWatch {
    /// Waits until the job changed since the last call (or since the watch was taken), or until
    /// `timeout` passes. Returns whether a change was signalled.
    pub async fn changed(&mut self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.rx.changed()).await,
            Ok(Ok(()))
        )
    }
}
