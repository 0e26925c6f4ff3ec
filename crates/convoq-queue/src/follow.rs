//! Following a job: its history replayed from the start and then streamed as it happens, so
//! that a subscriber that arrives late misses nothing. [`Follower`] takes a watch
//! ([`crate::events::WatchRegistry`]) *before* reading the history, so a change between the
//! read and the wait is never lost, and re-reads on a poll interval as well, which covers
//! changes made by other processes.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::error::Result;
use crate::events::{JobEvent, JobWatch};

/// Replays a job's history, then yields its new events as they happen.
///
/// Built by [`crate::Queues::follow`]. Ends after a terminal event (`completed`, `failed`)
/// that is the last of the job's history when it is read.
pub struct Follower {
    engine: Arc<dyn Engine>,
    queue: String,
    id: String,
    watch: JobWatch,
    poll: Duration,
    sent: usize,
    pending: std::collections::VecDeque<JobEvent>,
    done: bool,
}

impl Follower {
    pub(crate) fn new(engine: Arc<dyn Engine>, queue: &str, id: &str, poll: Duration) -> Self {
        let watch = engine.watches().watch(queue, id);
        Follower {
            engine,
            queue: queue.to_owned(),
            id: id.to_owned(),
            watch,
            poll,
            sent: 0,
            pending: Default::default(),
            done: false,
        }
    }

    /// The next event, waiting for it if need be. `Ok(None)` once the job has finished (after
    /// its terminal event) or when the job does not exist (any more).
    ///
    /// # Errors
    /// When the engine cannot be read.
    pub async fn next(&mut self) -> Result<Option<JobEvent>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                // A terminal event ends the stream when nothing follows it in the history: a
                // failure that an operator retried is followed by the job's next attempt.
                if event.kind.is_terminal() && self.pending.is_empty() {
                    self.done = true;
                }
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            let Some(history) = self.engine.history(&self.queue, &self.id).await? else {
                self.done = true;
                return Ok(None);
            };
            if history.len() > self.sent {
                self.pending.extend(history[self.sent..].iter().cloned());
                self.sent = history.len();
                continue;
            }
            self.watch.changed(self.poll).await;
        }
    }

    /// Like [`Follower::next`], but gives up with `Ok(None)` after `timeout`.
    ///
    /// # Errors
    /// When the engine cannot be read.
    pub async fn next_within(&mut self, timeout: Duration) -> Result<Option<JobEvent>> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(r) => r,
            Err(_) => Ok(None),
        }
    }
}
