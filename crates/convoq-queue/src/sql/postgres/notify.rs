//! The writers' wake-ups to other processes (`pg_notify` on [`CHANNEL`]), sent after their
//! commits from a task of their own, on a read-pool connection, in a transaction of their own.
//!
//! A `NOTIFY` inside a writer's transaction takes the cluster's notification-queue lock at
//! commit and holds it until the commit's WAL record is flushed, so every committing
//! transaction that notifies waits for the one before it: under load, the writers of every
//! process committed one at a time behind each other's WAL syncs (`Lock:object` on `COMMIT` in
//! `pg_stat_activity`, BENCHMARKS.md). A transaction that only notifies writes no WAL, so the
//! lock is held for microseconds. Queues announced while a send is under way go out together
//! in the next one.
//!
//! A wake-up is a hint, never the only way work is found: it goes out only after its commit,
//! and one that is lost (the process dies between the commit and the send, or the send fails)
//! delays other processes' workers by at most their poll interval.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use sqlx::postgres::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::schema::CHANNEL;

/// Queues whose wake-ups wait to be sent.
#[derive(Default)]
pub(crate) struct Notifier {
    pending: Mutex<BTreeSet<String>>,
    ready: Notify,
}

impl Notifier {
    /// Announces `queues` (a committed batch's), to be sent soon.
    pub(crate) fn announce(&self, queues: &HashSet<String>) {
        if queues.is_empty() {
            return;
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(queues.iter().cloned());
        self.ready.notify_one();
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }
}

/// The sending task of an opened database, not yet started.
pub(crate) struct Notifications {
    pub(super) notifier: Arc<Notifier>,
    pub(super) pool: PgPool,
}

impl Notifications {
    pub(crate) fn spawn(self) -> JoinHandle<()> {
        tokio::spawn(send(self.notifier, self.pool))
    }
}

/// Sends what is announced, one statement for every queue pending.
async fn send(notifier: Arc<Notifier>, pool: PgPool) {
    let mut failing = false;
    loop {
        notifier.ready.notified().await;
        let queues = notifier.take();
        if queues.is_empty() {
            continue;
        }
        let sent = sqlx::query("SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q")
            .bind(CHANNEL)
            .bind(&queues)
            .execute(&pool)
            .await;
        match sent {
            Ok(_) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "could not send wake-ups to other processes; their workers find the jobs by polling until a send succeeds");
            }
            Err(_) => {}
        }
    }
}
