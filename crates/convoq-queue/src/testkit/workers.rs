//! Conformance cases of worker pools over the engine: processing and follow-ups, panics and
//! timeouts, wake-ups, graceful shutdown, waiting for a result, effects, and fetch-next.

use super::*;

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
    let observed = Arc::new(CountFollowUps::default());
    let pool = queues
        .workers()
        .processor("work", echo.clone())
        .queue(Q, fast_opts(8))
        .observer(observed.clone())
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
    assert_eq!(
        (
            observed.completed.load(Ordering::SeqCst),
            observed.follow_ups.load(Ordering::SeqCst)
        ),
        (200, 200),
        "the observer hears of every completion and of every follow-up it added"
    );
}

/// Counts what a pool reports: completions, and the follow-ups they added.
#[derive(Default)]
struct CountFollowUps {
    completed: AtomicUsize,
    follow_ups: AtomicUsize,
}

impl crate::WorkerObserver for CountFollowUps {
    fn finished(&self, _job: &crate::Job, end: crate::AttemptEnd, _: Duration, _: Option<&str>) {
        if end == crate::AttemptEnd::Completed {
            self.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn follow_up_added(&self, queue: &str, name: &str) {
        assert_eq!((queue, name), ("follow", "audit"));
        self.follow_ups.fetch_add(1, Ordering::SeqCst);
    }
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
    // Let the worker go idle. Then `add_bulk`: `add` would hand the job to the free slot as
    // it is stored, with no wake-up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let added = queues.add_bulk(vec![job(1)]).await.unwrap();
    let id = added[0].job.id.clone();
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
    let mut completion = Completion::with_result(json!("done"));
    completion.effect = Some(Arc::new(Noop(applied.clone())));
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

/// A job that runs for three leases keeps its lease by renewals: it completes with one
/// attempt, never stalled, while a second pool sweeps for expired leases all along.
pub async fn a_job_longer_than_its_lease_runs_once(factory: &dyn EngineFactory) {
    struct Long(AtomicUsize);
    #[async_trait]
    impl Processor for Long {
        async fn process(&self, _: &crate::Job) -> Result<Completion, ProcessError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(3_300)).await;
            Ok(Completion::with_result(json!("long")))
        }
    }
    let queues = real(factory).await;
    let long = Arc::new(Long(AtomicUsize::new(0)));
    let opts = WorkerOptions {
        lease: Duration::from_secs(1),
        stalled_interval: Duration::from_millis(250),
        ..fast_opts(1)
    };
    let pool = queues
        .workers()
        .processor("long", long.clone())
        .queue(Q, opts.clone())
        .start();
    // Another process's sweeper, with the same short interval.
    let sweeper = queues
        .workers()
        .processor("long", long.clone())
        .queue(Q, opts)
        .start();
    let id = queues
        .add(NewJob::new(Q, "long", json!({})))
        .await
        .unwrap()
        .job
        .id;
    let done = queues
        .wait_finished(Q, &id, Duration::from_secs(15))
        .await
        .unwrap()
        .expect("the job");
    pool.shutdown(Duration::from_secs(5)).await;
    sweeper.shutdown(Duration::from_secs(5)).await;
    assert_eq!(done.state, JobState::Completed, "{done:?}");
    assert_eq!(done.attempts_made, 1, "one attempt");
    assert_eq!(done.stalled_count, 0, "never taken back");
    assert_eq!(long.0.load(Ordering::SeqCst), 1, "run once");
}

/// A completion and a reap racing for a job whose lease just expired: exactly one wins. The
/// job is either completed (the reap found nothing) or taken back (the completion is refused),
/// never both, and its totals say the same.
pub async fn a_reap_and_a_completion_race_and_one_wins(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let mut outcomes = HashSet::new();
    for round in 0..6 {
        let id = queues.add(job(round)).await.unwrap().job.id;
        let claimed = engine
            .claim(Q, 1, Duration::from_secs(1))
            .await
            .unwrap()
            .jobs
            .pop()
            .expect("the job");
        let_leases_expire(engine.as_ref(), &clock, Duration::from_millis(1_100)).await;
        let finish = engine.finish(
            &claimed,
            Outcome::Completed(Completion::with_result(json!(round))),
        );
        let reap = engine.reap_stalled(Q, 5);
        let (finished, reaped) = tokio::join!(finish, reap);
        let reaped = reaped.unwrap();
        let j = queues.get(Q, &id).await.unwrap().unwrap();
        match finished {
            Ok(()) => {
                assert_eq!(reaped, 0, "a completed job was also taken back");
                assert_eq!(j.state, JobState::Completed);
                outcomes.insert("completed");
            }
            Err(QueueError::LeaseLost { .. }) => {
                assert_eq!(
                    reaped, 1,
                    "the completion was refused but nothing took the job"
                );
                assert_eq!(j.state, JobState::Waiting);
                assert_eq!(j.stalled_count, 1);
                outcomes.insert("taken back");
                // Run it to the end, so that the next round starts from an empty queue.
                let again = engine
                    .claim(Q, 1, Duration::from_secs(1))
                    .await
                    .unwrap()
                    .jobs
                    .pop()
                    .expect("taken back, claimable");
                engine
                    .finish(&again, Outcome::Completed(Completion::default()))
                    .await
                    .unwrap();
            }
            Err(e) => panic!("finish: {e}"),
        }
    }
    let totals = queues.counts(Q).await.unwrap();
    assert_eq!(totals.completed_total, 6, "each job completed once");
    println!("race outcomes seen: {outcomes:?}");
}
