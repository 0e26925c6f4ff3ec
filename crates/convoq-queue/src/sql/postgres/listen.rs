//! The listener: one connection that `LISTEN`s on the notification channel and turns each
//! notification into a wake-up of this process's workers on the queue it names.
//!
//! Notifications are a shortcut, never the only way work is found: workers poll anyway. So the
//! listener's one duty in trouble is to come back. Whatever goes wrong with its connection
//! (lost, reset, an error), it drops that listener and opens a new one, with backoff while the
//! database is unreachable, and wakes every queue once it listens again, since notifications
//! sent meanwhile are lost.

use std::sync::Weak;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};

use super::schema;
use crate::sql::Shared;

/// How often a quiet listener checks that its engine is still there.
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// The first and the longest wait between attempts to listen again.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Opens a listener on `pool` (one connection) and listens on the channel.
pub(super) async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    // Reconnection is ours (see the module doc), not the driver's.
    l.eager_reconnect(false);
    l.listen(schema::CHANNEL).await?;
    Ok(l)
}

/// Starts the task that turns notifications into wake-ups of this process's workers. It ends
/// when the engine is dropped or closed.
pub(crate) fn spawn_listener(
    listener: PgListener,
    pool: PgPool,
    shared: Weak<Shared>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut listener = Some(listener);
        let mut retry = RETRY_FIRST;
        loop {
            let Some(l) = listener.as_mut() else {
                match connect(&pool).await {
                    Ok(l) => {
                        tracing::info!("listening for Postgres notifications again");
                        listener = Some(l);
                        retry = RETRY_FIRST;
                        // Notifications sent while no one listened are lost.
                        match shared.upgrade() {
                            Some(shared) => shared.wake_all(),
                            None => return,
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, retry_in_ms = retry.as_millis() as u64,
                            "listening for Postgres notifications failed; polling meanwhile");
                        if shared.strong_count() == 0 {
                            return;
                        }
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
                continue;
            };
            let next = tokio::time::timeout(IDLE_CHECK, l.try_recv()).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match next {
                // Nothing for a while: the engine is still there (checked above).
                Err(_) => {}
                Ok(Ok(Some(n))) => shared.wake(n.payload()),
                Ok(Ok(None)) | Ok(Err(_)) => {
                    if let Ok(Err(e)) = &next {
                        tracing::warn!(error = %e, "the Postgres notification connection failed; reconnecting");
                    } else {
                        tracing::warn!(
                            "the Postgres notification connection was lost; reconnecting"
                        );
                    }
                    // Drop the listener (and its connection) whatever state it is in.
                    listener = None;
                    shared.wake_all();
                }
            }
        }
    })
}
