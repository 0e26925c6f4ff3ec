//! The engine conformance suite: one set of behaviours, written against the engine-neutral API,
//! that every engine must show. An engine's tests supply an [`EngineFactory`] and expand
//! [`conformance_tests!`](crate::conformance_tests) to get one test per case.
//!
//! When engine semantics change, this suite changes first.

pub mod postgres;

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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use crate::{
    Backoff, BackoffKind, Clock, Completion, Engine, JobEventKind, JobOptions, JobState, KeepJobs,
    ManualClock, NewJob, Outcome, ProcessError, Processor, QueueError, Queues, SystemClock,
    WorkerOptions,
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
            pause_and_resume, retry_and_remove, follow_replays_history_to_late_subscriber,
            pool_runs_jobs_and_follow_ups, pool_survives_panics_and_times_out_attempts,
            add_wakes_idle_worker_without_polling, graceful_shutdown_releases_unfinished_job,
            graceful_shutdown_lets_short_job_finish, wait_finished_returns_when_done,
            unknown_job_name_fails_with_reason, effects_follow_capabilities,
            finish_and_claim_hands_over_the_next_job);
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

/// An added job reads back with its payload, merged options and state.
pub async fn add_and_read_back(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let added = queues.add(job(1)).await.unwrap();
    assert!(added.created);
    assert_eq!(added.job.state, JobState::Waiting);
    let read = queues
        .get(Q, &added.job.id)
        .await
        .unwrap()
        .expect("job exists");
    assert_eq!(read.data, json!({ "n": 1 }));
    assert_eq!(read.name, "work");
    assert_eq!(
        read.opts.attempts,
        Some(3),
        "seed default of 3 attempts is merged in"
    );
    assert_eq!(read.state, JobState::Waiting);
    assert_eq!(read.attempts_made, 0);
    assert!(queues.get(Q, "no-such-job").await.unwrap().is_none());
    assert_eq!(queues.counts(Q).await.unwrap().waiting, 1);
}

/// Twenty tasks adding the same custom id concurrently produce one job.
pub async fn custom_id_added_concurrently_yields_one_job(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let q = queues.clone();
        tasks.push(tokio::spawn(async move {
            q.add(job(i).with_id("same-id")).await.unwrap()
        }));
    }
    let mut created = 0;
    for t in tasks {
        let added = t.await.unwrap();
        assert_eq!(added.job.id, "same-id");
        created += added.created as usize;
    }
    assert_eq!(created, 1, "exactly one add created the job");
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!(counts.waiting, 1);
}

/// A bulk add with one invalid job adds nothing and names the problem; a valid one keeps order.
pub async fn bulk_add_is_all_or_nothing_on_invalid_input(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let mut bad = job(2);
    bad.opts.attempts = Some(0);
    let err = queues.add_bulk(vec![job(1), bad]).await.unwrap_err();
    assert!(
        matches!(err, QueueError::Invalid(ref m) if m.contains("attempts")),
        "{err}"
    );
    assert_eq!(queues.counts(Q).await.unwrap().waiting, 0);
    let err = queues
        .add(NewJob::new("bad queue!", "work", json!(null)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("queue name"), "{err}");
    let added = queues.add_bulk((0..50).map(job).collect()).await.unwrap();
    assert_eq!(added.len(), 50);
    for (i, a) in added.iter().enumerate() {
        assert_eq!(a.job.data["n"], i as i64);
    }
}

/// Jobs without priority run first, then by priority, each in the order added.
pub async fn priority_then_fifo_order(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let with_prio = |n: i64, p: u32| {
        let mut j = job(n);
        j.opts.priority = Some(p);
        j
    };
    for j in [
        with_prio(1, 5),
        job(2),
        with_prio(3, 1),
        job(4),
        with_prio(5, 5),
    ] {
        queues.add(j).await.unwrap();
        clock.advance(Duration::from_millis(1));
    }
    let mut order = Vec::new();
    for _ in 0..5 {
        let batch = engine.claim(Q, 1, LEASE).await.unwrap();
        order.push(batch.jobs[0].job.data["n"].as_i64().unwrap());
    }
    assert_eq!(order, vec![2, 4, 3, 1, 5]);
}

/// A delayed job is `delayed` and not claimable until its time comes.
pub async fn delayed_job_waits_for_its_time(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let mut j = job(1);
    j.opts.delay = Some(5_000);
    let added = queues.add(j).await.unwrap();
    assert_eq!(added.job.state, JobState::Delayed);
    let batch = queues.engine().claim(Q, 10, LEASE).await.unwrap();
    assert!(batch.jobs.is_empty());
    let due = batch
        .next_due_ms
        .expect("the delayed job's due time is reported");
    assert_eq!(due, clock.now_ms() + 5_000);
    assert_eq!(queues.counts(Q).await.unwrap().delayed, 1);
    clock.advance(Duration::from_millis(5_000));
    assert_eq!(
        queues
            .engine()
            .claim(Q, 10, LEASE)
            .await
            .unwrap()
            .jobs
            .len(),
        1
    );
}

/// Retryable failures wait `delay * 2^(attempt-1)` minus at most `jitter` of it, then fail for
/// good when attempts are spent.
pub async fn backoff_delays_stay_in_their_envelope(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let mut j = job(1);
    j.opts.attempts = Some(3);
    j.opts.backoff = Some(Backoff {
        kind: BackoffKind::Exponential,
        delay: 1_000,
        jitter: 0.5,
    });
    let id = queues.add(j).await.unwrap().job.id;
    for attempt in 1..=3u32 {
        let claimed = engine
            .claim(Q, 1, LEASE)
            .await
            .unwrap()
            .jobs
            .pop()
            .expect("claimable");
        assert_eq!(claimed.job.attempts_made, attempt);
        let failed_at = clock.now_ms();
        engine
            .finish(
                &claimed,
                Outcome::Failed(ProcessError::retryable("store busy")),
            )
            .await
            .unwrap();
        let after = queues.get(Q, &id).await.unwrap().unwrap();
        assert_eq!(after.failed_reason.as_deref(), Some("store busy"));
        if attempt == 3 {
            assert_eq!(after.state, JobState::Failed, "attempts are spent");
            break;
        }
        assert_eq!(after.state, JobState::Delayed);
        let waited = after.available_at.timestamp_millis() - failed_at;
        let max = 1_000i64 << (attempt - 1);
        assert!(
            (max / 2..=max).contains(&waited),
            "attempt {attempt}: waited {waited} ms, envelope [{}, {max}]",
            max / 2
        );
        assert!(
            engine.claim(Q, 1, LEASE).await.unwrap().jobs.is_empty(),
            "not before its time"
        );
        clock.advance(Duration::from_millis(waited as u64));
    }
    assert_eq!(queues.counts(Q).await.unwrap().failed_total, 1);
}

/// An unrecoverable error fails the job at once, whatever attempts remain.
pub async fn unrecoverable_error_fails_at_once(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let engine = queues.engine().clone();
    let id = queues.add(job(1)).await.unwrap().job.id;
    let claimed = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine
        .finish(
            &claimed,
            Outcome::Failed(ProcessError::unrecoverable("unknown user u1")),
        )
        .await
        .unwrap();
    let j = queues.get(Q, &id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.attempts_made, 1);
    assert_eq!(j.failed_reason.as_deref(), Some("unknown user u1"));
}

/// The lease race: A's lease expires, B takes the job back, A's late completion changes nothing.
pub async fn late_completion_after_lease_expiry_is_rejected(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let id = queues.add(job(1)).await.unwrap().job.id;
    let lease = Duration::from_secs(1);
    let a = engine.claim(Q, 1, lease).await.unwrap().jobs.pop().unwrap();
    assert_eq!(
        engine.reap_stalled(Q, 5).await.unwrap(),
        0,
        "lease still valid"
    );
    let_leases_expire(engine.as_ref(), &clock, Duration::from_secs(2)).await;
    assert_eq!(engine.reap_stalled(Q, 5).await.unwrap(), 1);
    let stalled = queues.get(Q, &id).await.unwrap().unwrap();
    assert_eq!(stalled.state, JobState::Waiting);
    assert_eq!(stalled.stalled_count, 1);
    let b = engine
        .claim(Q, 1, lease)
        .await
        .unwrap()
        .jobs
        .pop()
        .expect("taken back");
    assert_ne!(a.token, b.token);
    assert_eq!(b.job.attempts_made, 2, "the stalled attempt counts");
    let late = engine
        .finish(
            &a,
            Outcome::Completed(Completion::with_result(json!("from A"))),
        )
        .await;
    assert!(
        matches!(late, Err(QueueError::LeaseLost { .. })),
        "{late:?}"
    );
    let held = engine
        .extend(
            Q,
            &[(id.clone(), a.token.clone()), (id.clone(), b.token.clone())],
            lease,
        )
        .await
        .unwrap();
    assert_eq!(held, vec![false, true]);
    engine
        .finish(
            &b,
            Outcome::Completed(Completion::with_result(json!("from B"))),
        )
        .await
        .unwrap();
    let done = queues.get(Q, &id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.result, Some(json!("from B")));
    let again = engine
        .finish(&b, Outcome::Completed(Completion::default()))
        .await;
    assert!(
        matches!(again, Err(QueueError::LeaseLost { .. })),
        "a second completion is fenced too"
    );
}

/// A job whose lease expires more often than allowed fails with a reason that says so.
pub async fn job_stalling_too_often_fails(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let id = queues.add(job(1)).await.unwrap().job.id;
    for _ in 0..2 {
        engine
            .claim(Q, 1, Duration::from_secs(1))
            .await
            .unwrap()
            .jobs
            .pop()
            .unwrap();
        let_leases_expire(engine.as_ref(), &clock, Duration::from_secs(2)).await;
        engine.reap_stalled(Q, 1).await.unwrap();
    }
    let j = queues.get(Q, &id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.failed_reason.unwrap().contains("stalled"));
}

/// Pruning removes finished jobs by count and age; lifetime totals stay.
pub async fn retention_prunes_but_keeps_totals(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let keep = |count, age_secs| KeepJobs::Keep { count, age_secs };
    let mut ids = Vec::new();
    for n in 0..5 {
        let mut j = job(n);
        j.opts.remove_on_complete = Some(keep(Some(2), None));
        ids.push(queues.add(j).await.unwrap().job.id);
    }
    let mut at_once = job(99);
    at_once.opts.remove_on_complete = Some(KeepJobs::RemoveAtOnce);
    let at_once_id = queues.add(at_once).await.unwrap().job.id;
    let mut aged = job(100);
    aged.opts.remove_on_fail = Some(keep(None, Some(60)));
    let aged_id = queues.add(aged).await.unwrap().job.id;
    loop {
        let batch = engine.claim(Q, 1, LEASE).await.unwrap();
        let Some(c) = batch.jobs.into_iter().next() else {
            break;
        };
        clock.advance(Duration::from_millis(10));
        let outcome = if c.job.id == aged_id {
            Outcome::Failed(ProcessError::unrecoverable("bad"))
        } else {
            Outcome::Completed(Completion::with_result(json!(true)))
        };
        engine.finish(&c, outcome).await.unwrap();
    }
    engine.prune(Q).await.unwrap();
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!(
        counts.completed, 2,
        "keep the newest 2 of those kept by count"
    );
    assert!(
        queues.get(Q, &ids[4]).await.unwrap().is_some(),
        "the newest is kept"
    );
    assert!(
        queues.get(Q, &ids[0]).await.unwrap().is_none(),
        "the oldest is pruned"
    );
    assert!(
        queues.get(Q, &at_once_id).await.unwrap().is_none(),
        "removeOnComplete: true"
    );
    assert_eq!(
        counts.failed, 1,
        "the failed job is younger than its age limit"
    );
    clock.advance(Duration::from_secs(61));
    engine.prune(Q).await.unwrap();
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!(counts.failed, 0, "aged out");
    assert_eq!(counts.completed_total, 6, "totals survive pruning");
    assert_eq!(counts.failed_total, 1);
}

/// A paused queue's jobs are `paused` and not claimed until it resumes.
pub async fn pause_and_resume(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    queues.add(job(1)).await.unwrap();
    queues.pause(Q).await.unwrap();
    assert!(queues.is_paused(Q).await.unwrap());
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!((counts.waiting, counts.paused), (0, 1));
    assert_eq!(
        queues.list(Q, JobState::Paused, 0, 10).await.unwrap().len(),
        1
    );
    assert!(queues
        .engine()
        .claim(Q, 10, LEASE)
        .await
        .unwrap()
        .jobs
        .is_empty());
    queues.resume(Q).await.unwrap();
    assert!(!queues.is_paused(Q).await.unwrap());
    assert_eq!(
        queues
            .engine()
            .claim(Q, 10, LEASE)
            .await
            .unwrap()
            .jobs
            .len(),
        1
    );
}

/// A failed job can be retried with fresh attempts; a job can be removed unless active.
pub async fn retry_and_remove(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let engine = queues.engine().clone();
    let id = queues.add(job(1)).await.unwrap().job.id;
    let err = queues.retry(Q, &id).await.unwrap_err();
    assert!(matches!(err, QueueError::WrongState { .. }), "{err}");
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    let err = queues.remove(Q, &id).await.unwrap_err();
    assert!(
        matches!(err, QueueError::WrongState { .. }),
        "an active job cannot be removed"
    );
    engine
        .finish(&c, Outcome::Failed(ProcessError::unrecoverable("nope")))
        .await
        .unwrap();
    let retried = queues.retry(Q, &id).await.unwrap();
    assert_eq!(retried.state, JobState::Waiting);
    assert_eq!(retried.attempts_made, 0);
    assert_eq!(
        queues.list(Q, JobState::Waiting, 0, 10).await.unwrap()[0].id,
        id
    );
    assert!(queues.remove(Q, &id).await.unwrap());
    assert!(!queues.remove(Q, &id).await.unwrap());
    assert!(queues.get(Q, &id).await.unwrap().is_none());
}

/// A subscriber that arrives after the job finished still gets every step, in order.
pub async fn follow_replays_history_to_late_subscriber(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let id = queues.add(job(1)).await.unwrap().job.id;
    let mut early = queues.follow(Q, &id);
    let first = early.next().await.unwrap().unwrap();
    assert_eq!(first.kind, JobEventKind::Waiting);
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    let active = early
        .next_within(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(active.kind, JobEventKind::Active);
    engine
        .finish(&c, Outcome::Failed(ProcessError::retryable("flaky")))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine
        .finish(
            &c,
            Outcome::Completed(Completion::with_result(json!({"ok": 1}))),
        )
        .await
        .unwrap();
    let mut late = queues.follow(Q, &id);
    let mut kinds = Vec::new();
    let mut last = None;
    while let Some(e) = late.next_within(Duration::from_secs(5)).await.unwrap() {
        kinds.push(e.kind);
        last = Some(e);
    }
    use JobEventKind::*;
    assert_eq!(kinds, vec![Waiting, Active, Retrying, Active, Completed]);
    assert_eq!(last.unwrap().detail, Some(json!({"ok": 1})));
    let mut rest = Vec::new();
    while let Some(e) = early.next_within(Duration::from_secs(5)).await.unwrap() {
        rest.push(e.kind);
    }
    assert_eq!(
        rest,
        vec![Retrying, Active, Completed],
        "the early subscriber sees the rest"
    );
}

struct Echo {
    runs: AtomicUsize,
    follow_up: bool,
}

#[async_trait]
impl Processor for Echo {
    async fn process(&self, job: &crate::Job) -> Result<Completion, ProcessError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let mut c = Completion::with_result(json!({ "echo": job.data }));
        if self.follow_up && job.name == "work" {
            c.follow_ups.push(
                NewJob::new("follow", "audit", json!({ "of": job.id }))
                    .with_id(format!("audit-{}", job.id)),
            );
        }
        Ok(c)
    }
}

fn fast_opts(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::default()
    }
}

/// A pool runs every job once, stores results, and adds follow-up jobs.
pub async fn pool_runs_jobs_and_follow_ups(factory: &dyn EngineFactory) {
    let queues = real(factory).await;
    let echo = Arc::new(Echo {
        runs: AtomicUsize::new(0),
        follow_up: true,
    });
    let pool = queues
        .workers()
        .processor("work", echo.clone())
        .queue(Q, fast_opts(8))
        .start();
    let added = queues.add_bulk((0..200).map(job).collect()).await.unwrap();
    for a in &added {
        let done = queues
            .wait_finished(Q, &a.job.id, Duration::from_secs(20))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.state, JobState::Completed, "{done:?}");
        assert_eq!(done.result, Some(json!({ "echo": a.job.data })));
        let audit = queues
            .get("follow", &format!("audit-{}", a.job.id))
            .await
            .unwrap();
        assert!(
            audit.is_some(),
            "the follow-up job exists once the job completed"
        );
    }
    assert_eq!(echo.runs.load(Ordering::SeqCst), 200);
    assert_eq!(queues.counts("follow").await.unwrap().waiting, 200);
    pool.shutdown(Duration::from_secs(5)).await;
}

struct Troublesome;

#[async_trait]
impl Processor for Troublesome {
    async fn process(&self, job: &crate::Job) -> Result<Completion, ProcessError> {
        match job.data["mode"].as_str() {
            Some("panic") => panic!("processor bug"),
            Some("slow") => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(Completion::default())
            }
            _ => Ok(Completion::with_result(json!("fine"))),
        }
    }
}

/// A panicking processor fails its attempt, a slow one times out, and the pool keeps working.
pub async fn pool_survives_panics_and_times_out_attempts(factory: &dyn EngineFactory) {
    let queues = real(factory).await;
    let pool = queues
        .workers()
        .processor("t", Arc::new(Troublesome))
        .queue(Q, fast_opts(2))
        .start();
    let one_attempt = JobOptions {
        attempts: Some(1),
        timeout: Some(200),
        ..Default::default()
    };
    let mk =
        |mode: &str| NewJob::new(Q, "t", json!({ "mode": mode })).with_opts(one_attempt.clone());
    let panicking = queues.add(mk("panic")).await.unwrap().job.id;
    let slow = queues.add(mk("slow")).await.unwrap().job.id;
    let fine = queues.add(mk("fine")).await.unwrap().job.id;
    let wait = |id: String| {
        let q = queues.clone();
        async move {
            q.wait_finished(Q, &id, Duration::from_secs(10))
                .await
                .unwrap()
                .unwrap()
        }
    };
    let p = wait(panicking).await;
    assert_eq!(p.state, JobState::Failed);
    assert!(p.failed_reason.unwrap().contains("panicked: processor bug"));
    let s = wait(slow).await;
    assert_eq!(s.state, JobState::Failed);
    assert!(s.failed_reason.unwrap().contains("timed out after 200 ms"));
    assert_eq!(wait(fine).await.state, JobState::Completed);
    pool.shutdown(Duration::from_secs(1)).await;
}

/// An add wakes an idle worker at once, long before its poll interval.
pub async fn add_wakes_idle_worker_without_polling(factory: &dyn EngineFactory) {
    let queues = real(factory).await;
    let echo = Arc::new(Echo {
        runs: AtomicUsize::new(0),
        follow_up: false,
    });
    let opts = WorkerOptions {
        poll_interval: Duration::from_secs(60),
        ..fast_opts(1)
    };
    let pool = queues
        .workers()
        .processor("work", echo)
        .queue(Q, opts)
        .start();
    tokio::time::sleep(Duration::from_millis(200)).await; // let the worker go idle
    let id = queues.add(job(1)).await.unwrap().job.id;
    let done = queues
        .wait_finished(Q, &id, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done.state,
        JobState::Completed,
        "woken well within the 60 s poll interval"
    );
    pool.shutdown(Duration::from_secs(1)).await;
}

/// At shutdown, a job still running after the grace period is released without an attempt.
pub async fn graceful_shutdown_releases_unfinished_job(factory: &dyn EngineFactory) {
    let queues = real(factory).await;
    let pool = queues
        .workers()
        .processor("t", Arc::new(Troublesome))
        .queue(Q, fast_opts(2))
        .start();
    let id = queues
        .add(NewJob::new(Q, "t", json!({ "mode": "slow" })))
        .await
        .unwrap()
        .job
        .id;
    wait_for_state(&queues, &id, JobState::Active).await;
    let report = pool.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.released, 1);
    let j = queues.get(Q, &id).await.unwrap().unwrap();
    assert_eq!(
        j.state,
        JobState::Waiting,
        "released, ready for the next worker"
    );
    assert_eq!(j.attempts_made, 0, "a released attempt does not count");
}

/// At shutdown, a job that finishes within the grace period completes normally.
pub async fn graceful_shutdown_lets_short_job_finish(factory: &dyn EngineFactory) {
    struct Short;
    #[async_trait]
    impl Processor for Short {
        async fn process(&self, _: &crate::Job) -> Result<Completion, ProcessError> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Completion::with_result(json!("finished in grace")))
        }
    }
    let queues = real(factory).await;
    let pool = queues
        .workers()
        .processor("s", Arc::new(Short))
        .queue(Q, fast_opts(1))
        .start();
    let id = queues
        .add(NewJob::new(Q, "s", json!({})))
        .await
        .unwrap()
        .job
        .id;
    wait_for_state(&queues, &id, JobState::Active).await;
    let report = pool.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.released, 0);
    let j = queues.get(Q, &id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Completed);
    assert_eq!(queues.counts(Q).await.unwrap().active, 0);
}

/// `wait_finished` returns as soon as the job finishes, and returns the unfinished job on timeout.
pub async fn wait_finished_returns_when_done(factory: &dyn EngineFactory) {
    let queues = real(factory).await;
    let id = queues.add(job(1)).await.unwrap().job.id;
    let j = queues
        .wait_finished(Q, &id, Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.state, JobState::Waiting, "timed out, job unfinished");
    let echo = Arc::new(Echo {
        runs: AtomicUsize::new(0),
        follow_up: false,
    });
    let pool = queues
        .workers()
        .processor("work", echo)
        .queue(Q, fast_opts(1))
        .start();
    let j = queues
        .wait_finished(Q, &id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.state, JobState::Completed);
    pool.shutdown(Duration::from_secs(1)).await;
}

/// A job whose name has no processor fails with a reason that names it.
pub async fn unknown_job_name_fails_with_reason(factory: &dyn EngineFactory) {
    let queues = real(factory).await;
    let echo = Arc::new(Echo {
        runs: AtomicUsize::new(0),
        follow_up: false,
    });
    let pool = queues
        .workers()
        .processor("work", echo)
        .queue(Q, fast_opts(1))
        .start();
    let id = queues
        .add(NewJob::new(Q, "mystery", json!({})))
        .await
        .unwrap()
        .job
        .id;
    let j = queues
        .wait_finished(Q, &id, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.failed_reason.unwrap().contains("\"mystery\""));
    pool.shutdown(Duration::from_secs(1)).await;
}

/// A completion's transactional effect commits with it on engines that can
/// ([`crate::Capabilities::transactional_effects`]); elsewhere it is refused as unsupported and
/// the job stays active, so that a processor knows to do its work on its own first.
pub async fn effects_follow_capabilities(factory: &dyn EngineFactory) {
    struct Noop(Arc<AtomicUsize>);
    #[async_trait]
    impl crate::sql::TxEffect for Noop {
        async fn apply(&self, _: crate::sql::SqlConn<'_>, _: i64) -> Result<(), ProcessError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let (queues, _) = manual(factory).await;
    let engine = queues.engine().clone();
    let id = queues.add(job(1)).await.unwrap().job.id;
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    let applied = Arc::new(AtomicUsize::new(0));
    let completion = Completion {
        result: json!("done"),
        follow_ups: Vec::new(),
        effect: Some(Arc::new(Noop(applied.clone()))),
    };
    let finished = engine.finish(&c, Outcome::Completed(completion)).await;
    let state = queues.get(Q, &id).await.unwrap().unwrap().state;
    if engine.capabilities().transactional_effects {
        finished.unwrap();
        assert_eq!(applied.load(Ordering::SeqCst), 1, "the effect ran once");
        assert_eq!(state, JobState::Completed);
    } else {
        println!(
            "documented difference: the {} engine has no transactional effects; a completion \
             carrying one is refused",
            engine.name()
        );
        assert!(
            matches!(finished, Err(QueueError::Unsupported { .. })),
            "{finished:?}"
        );
        assert_eq!(applied.load(Ordering::SeqCst), 0);
        assert_eq!(state, JobState::Active, "nothing was recorded");
    }
}

/// An attempt's end can claim the queue's next job in the same step (fetch-next): the job comes
/// under a held lease with its attempt counted; concurrent ends never get the same job; an
/// empty or paused queue hands over nothing; a lost lease claims nothing and says so.
pub async fn finish_and_claim_hands_over_the_next_job(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let engine = queues.engine().clone();
    let fetch = engine.capabilities().fetch_next;
    if !fetch {
        println!(
            "documented difference: the {} engine has no fetch-next; an end claims nothing",
            engine.name()
        );
    }
    let done = Outcome::Completed(Completion::with_result(json!("done")));
    for n in 0..4 {
        queues.add(job(n)).await.unwrap();
    }
    let first = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    let next = engine
        .finish_and_claim(&first, done.clone(), LEASE)
        .await
        .unwrap();
    let Some(second) = next else {
        assert!(!fetch, "the next job comes with the completion");
        return;
    };
    assert_eq!(second.job.data["n"], 1, "in order");
    assert_eq!(second.job.state, JobState::Active);
    assert_eq!(second.job.attempts_made, 1, "its attempt is counted");
    assert_eq!(
        queues.get(Q, &first.job.id).await.unwrap().unwrap().state,
        JobState::Completed
    );
    let held = engine
        .extend(Q, &[(second.job.id.clone(), second.token.clone())], LEASE)
        .await
        .unwrap();
    assert_eq!(held, vec![true], "the handed-over job's lease is held");

    // Three ends at once, two jobs left: two distinct jobs are handed over, one end gets none.
    let more = engine.claim(Q, 2, LEASE).await.unwrap().jobs;
    assert_eq!(more.len(), 2);
    queues.add(job(4)).await.unwrap();
    queues.add(job(5)).await.unwrap();
    let ends = futures::future::join_all(
        std::iter::once(&second)
            .chain(more.iter())
            .map(|c| engine.finish_and_claim(c, done.clone(), LEASE)),
    )
    .await;
    let handed: Vec<_> = ends.into_iter().filter_map(|r| r.unwrap()).collect();
    assert_eq!(handed.len(), 2, "two jobs for three ends");
    assert_ne!(handed[0].job.id, handed[1].job.id);
    let counts = queues.counts(Q).await.unwrap();
    assert_eq!((counts.completed, counts.active, counts.waiting), (4, 2, 0));

    // A paused queue hands over nothing; resumed, it does.
    queues.add(job(6)).await.unwrap();
    engine.set_paused(Q, true).await.unwrap();
    let paused = engine
        .finish_and_claim(&handed[0], done.clone(), LEASE)
        .await
        .unwrap();
    assert!(paused.is_none(), "a paused queue hands over nothing");
    engine.set_paused(Q, false).await.unwrap();
    let last = engine
        .finish_and_claim(&handed[1], done.clone(), LEASE)
        .await
        .unwrap()
        .expect("resumed, the queue hands over its job");
    assert_eq!(last.job.data["n"], 6);

    // A lost lease claims nothing, and says so.
    queues.add(job(7)).await.unwrap();
    let late = engine.finish_and_claim(&first, done, LEASE).await;
    assert!(
        matches!(late, Err(QueueError::LeaseLost { .. })),
        "{late:?}"
    );
    assert_eq!(
        queues.counts(Q).await.unwrap().waiting,
        1,
        "nothing claimed"
    );
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
