//! The engine conformance suite: one set of behaviours, written against the engine-neutral API,
//! that every engine must show. An engine's tests supply an [`EngineFactory`] and expand
//! [`conformance_tests!`](crate::conformance_tests) to get one test per case.
//!
//! When engine semantics change, this suite changes first.

mod claim_on_add;
mod jobs;
mod model;
pub mod postgres;
mod workers;

pub use claim_on_add::*;
pub use jobs::*;
pub use model::*;
pub use workers::*;

/// Runs `cleanup` to completion on a thread of its own, with a runtime of its own, and waits
/// for it: for a fixture's `Drop`, which runs inside the test's runtime and cannot block on
/// async work there. A cleanup that cannot start (no runtime) is skipped.
pub fn run_cleanup<F>(cleanup: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(cleanup);
        }
    })
    .join();
}

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use crate::{
    Backoff, BackoffKind, Clock, Completion, Engine, JobEventKind, JobOptions, JobSearch, JobState,
    KeepJobs, ManualClock, NewJob, Outcome, ProcessError, Processor, QueueError, Queues,
    SystemClock, WorkerOptions,
};

/// Makes fresh, isolated engines for the suite (a new database, schema or key prefix each).
#[async_trait]
pub trait EngineFactory: Send + Sync {
    /// A new engine reading time from `clock`, sharing nothing with engines made before.
    async fn engine(&self, clock: Arc<dyn Clock>) -> Arc<dyn Engine>;
}

/// Expands to one `#[tokio::test]` per conformance case, each calling `$factory` (an expression
/// that builds an [`EngineFactory`]).
///
/// `conformance_tests!(optional: $factory)` takes an expression that builds an
/// `Option<impl EngineFactory>` instead: a case whose factory is `None` returns at once (for
/// engines that need a service the environment may not provide; the factory says why).
#[macro_export]
macro_rules! conformance_tests {
    (optional: $factory:expr) => {
        $crate::conformance_tests!(@list (@optional_cases $factory));
    };
    ($factory:expr) => {
        $crate::conformance_tests!(@list (@cases $factory));
    };
    (@list ($($how:tt)*)) => {
        $crate::conformance_tests!($($how)*;
            add_and_read_back, custom_id_added_concurrently_yields_one_job,
            bulk_add_is_all_or_nothing_on_invalid_input, priority_then_fifo_order,
            delayed_job_waits_for_its_time, backoff_delays_stay_in_their_envelope,
            unrecoverable_error_fails_at_once, late_completion_after_lease_expiry_is_rejected,
            job_stalling_too_often_fails, retention_prunes_but_keeps_totals,
            pause_and_resume, retry_and_remove, follow_replays_history_to_late_subscriber, follow_goes_past_a_retried_failure, search_finds_jobs_by_text_and_field, search_finds_jobs_that_stalled_before, an_active_jobs_lease_expiry_is_read_back, promote_makes_a_delayed_job_ready,
            pool_runs_jobs_and_follow_ups, pool_survives_panics_and_times_out_attempts,
            add_wakes_idle_worker_without_polling, graceful_shutdown_releases_unfinished_job,
            graceful_shutdown_lets_short_job_finish, wait_finished_returns_when_done,
            unknown_job_name_fails_with_reason, effects_follow_capabilities,
            finish_and_claim_hands_over_the_next_job, add_claimed_holds_the_job_under_its_lease,
            idle_worker_takes_added_jobs_as_stored,
            random_operation_sequences_keep_the_invariants, a_job_longer_than_its_lease_runs_once,
            a_reap_and_a_completion_race_and_one_wins);
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                $crate::testkit::$case(&factory).await;
            }
        )*
    };
    (@optional_cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(factory) = $factory else {
                    return;
                };
                $crate::testkit::$case(&factory).await;
            }
        )*
    };
}

const Q: &str = "conformance";

fn job(n: i64) -> NewJob {
    NewJob::new(Q, "work", json!({ "n": n }))
}

async fn manual(factory: &dyn EngineFactory) -> (Queues, ManualClock) {
    let clock = ManualClock::starting_now();
    let engine = factory.engine(Arc::new(clock.clone())).await;
    (Queues::new(engine), clock)
}

async fn real(factory: &dyn EngineFactory) -> Queues {
    Queues::new(factory.engine(Arc::new(SystemClock)).await)
        .with_follow_poll(Duration::from_millis(50))
}

const LEASE: Duration = Duration::from_secs(10);

/// Lets leases of length up to `by` expire: moves the manual clock, and where the engine's
/// leases expire by its backend's own time ([`crate::Capabilities::leases_follow_clock`] false:
/// BullMQ's locks are Redis keys with a TTL) also waits that long in real time, saying so.
async fn let_leases_expire(engine: &dyn Engine, clock: &ManualClock, by: Duration) {
    clock.advance(by);
    if !engine.capabilities().leases_follow_clock {
        println!(
            "documented difference: {} engine leases expire by the backend's clock, not the \
             injected one; waiting {by:?} in real time",
            engine.name()
        );
        tokio::time::sleep(by).await;
    }
}

async fn wait_for_state(queues: &Queues, id: &str, state: JobState) {
    for _ in 0..200 {
        if queues.get(Q, id).await.unwrap().map(|j| j.state) == Some(state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never reached {state}");
}
