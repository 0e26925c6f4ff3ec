//! Conformance cases of claiming on add ([`Engine::add_claimed`], [`Queues::add`] handing a job
//! to a waiting worker): the job is held under its lease as any claim holds it, and only a job
//! that could be claimed at once is.

use super::*;
use crate::JobEvent;

fn kinds(history: &[JobEvent]) -> Vec<JobEventKind> {
    history.iter().map(|e| e.kind).collect()
}

/// A job claimed as it is added is held under its lease like any claimed job: counted as an
/// attempt, in its history, fenced, and taken back when its lease expires. A job that could not
/// be claimed at once (a paused queue, a delay, a custom id that exists) is added unclaimed.
pub async fn add_claimed_holds_the_job_under_its_lease(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let lease = Duration::from_secs(1);
    let add = |job: NewJob| {
        let engine = engine.clone();
        let job = queues.prepare(job).unwrap();
        async move { engine.add_claimed(job, lease).await.unwrap() }
    };
    let (added, a) = add(job(1)).await;
    assert!(added.created);
    let id = added.job.id.clone();
    if !engine.capabilities().claim_on_add {
        assert!(a.is_none());
        assert_eq!(added.job.state, JobState::Waiting);
        println!(
            "documented difference: the {} engine adds jobs unclaimed; its workers claim them",
            engine.name()
        );
        return;
    }
    let a = a.expect("a ready job of an unpaused queue is claimed as it is added");
    assert_eq!((a.job.state, a.job.attempts_made), (JobState::Active, 1));
    let stored = queues.get(Q, &id).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.attempts_made), (JobState::Active, 1));
    assert_eq!(queues.counts(Q).await.unwrap().active, 1);
    assert!(
        engine.claim(Q, 5, lease).await.unwrap().jobs.is_empty(),
        "held, so not claimable"
    );
    let history = engine.history(Q, &id).await.unwrap().unwrap();
    assert_eq!(
        kinds(&history),
        vec![JobEventKind::Waiting, JobEventKind::Active]
    );

    let_leases_expire(engine.as_ref(), &clock, Duration::from_secs(2)).await;
    assert_eq!(engine.reap_stalled(Q, 5).await.unwrap(), 1);
    let b = engine
        .claim(Q, 1, lease)
        .await
        .unwrap()
        .jobs
        .pop()
        .expect("taken back after its lease expired");
    assert_ne!(a.token, b.token);
    assert_eq!(b.job.attempts_made, 2);
    let late = engine
        .finish(&a, Outcome::Completed(Completion::default()))
        .await;
    assert!(
        matches!(late, Err(QueueError::LeaseLost { .. })),
        "{late:?}"
    );
    engine
        .finish(&b, Outcome::Completed(Completion::with_result(json!("b"))))
        .await
        .unwrap();
    assert_eq!(
        queues.get(Q, &id).await.unwrap().unwrap().state,
        JobState::Completed
    );

    queues.pause(Q).await.unwrap();
    let (paused, none) = add(job(2)).await;
    assert!(none.is_none(), "a paused queue's job waits");
    assert_eq!(
        queues.get(Q, &paused.job.id).await.unwrap().unwrap().state,
        JobState::Paused
    );
    queues.resume(Q).await.unwrap();
    let mut delayed = job(3);
    delayed.opts.delay = Some(5_000);
    let (delayed, none) = add(delayed).await;
    assert!(
        none.is_none(),
        "a delayed job is not claimed before its time"
    );
    assert_eq!(delayed.job.state, JobState::Delayed);
    queues.add(job(4).with_id("taken")).await.unwrap();
    let (again, none) = add(job(5).with_id("taken")).await;
    assert!(
        !again.created && none.is_none(),
        "an existing job is not claimed"
    );
    assert_eq!(again.job.data, json!({ "n": 4 }));
}

/// A worker that waits for work takes jobs added in its process as they are stored, and the
/// follow-up jobs that completions add, and runs each once; after the pool has stopped, added
/// jobs wait for the next worker.
pub async fn idle_worker_takes_added_jobs_as_stored(factory: &dyn EngineFactory) {
    struct Count(AtomicUsize);
    #[async_trait]
    impl Processor for Count {
        async fn process(&self, job: &crate::Job) -> Result<Completion, ProcessError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let mut c = Completion::with_result(job.data.clone());
            if job.name == "work" {
                c.follow_ups
                    .push(NewJob::new("follow", "audit", json!({ "of": job.id })));
            }
            Ok(c)
        }
    }
    let queues = real(factory).await;
    let runs = Arc::new(Count(AtomicUsize::new(0)));
    let opts = WorkerOptions {
        concurrency: 8,
        poll_interval: Duration::from_secs(60),
        ..WorkerOptions::default()
    };
    let pool = queues
        .workers()
        .processor("work", runs.clone())
        .processor("audit", runs.clone())
        .queue(Q, opts.clone())
        .queue("follow", opts)
        .start();
    tokio::time::sleep(Duration::from_millis(200)).await; // let the workers go idle
    let mut handed = 0;
    let mut ids = Vec::new();
    for n in 0..20 {
        let added = queues.add(job(n)).await.unwrap();
        handed += usize::from(added.job.state == JobState::Active);
        ids.push(added.job.id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        let done = queues
            .wait_finished(Q, id, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((done.state, done.attempts_made), (JobState::Completed, 1));
    }
    // Every follow-up ran once; one stored claimed started in the instant it was created.
    let mut follow_ups_handed = 0;
    for _ in 0..200 {
        if queues.counts("follow").await.unwrap().completed == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for f in queues
        .list("follow", JobState::Completed, 0, 100)
        .await
        .unwrap()
    {
        assert_eq!(f.attempts_made, 1);
        follow_ups_handed += usize::from(f.processed_at == Some(f.created_at));
    }
    assert_eq!(runs.0.load(Ordering::SeqCst), 40, "each job ran once");
    if queues.engine().capabilities().claim_on_add {
        // Most, not all: a wake-up of a claim loop makes it busy for a moment, and an add then
        // goes the ordinary way.
        assert!(handed >= 10, "only {handed} of 20 adds were handed over");
        assert!(
            follow_ups_handed >= 10,
            "only {follow_ups_handed} of 20 follow-ups were handed over"
        );
    } else {
        assert_eq!(handed, 0);
    }
    pool.shutdown(Duration::from_secs(5)).await;
    let after = queues.add(job(99)).await.unwrap();
    assert_eq!(after.job.state, JobState::Waiting, "no worker holds it");
    assert_eq!(queues.counts(Q).await.unwrap().active, 0);
}
