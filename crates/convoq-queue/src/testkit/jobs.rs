//! Conformance cases of a job's life through the engine: adds, order, delays, backoff,
//! leases and stalls, retention, pause, operators' retries and removals, and histories.

use super::*;

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

/// A failed job that an operator retried: its history goes on past the failure, and a
/// subscriber gets all of it, ending with the job's last end, not its first. (On BullMQ a retry
/// resets the job's hash, from which its history is derived, so there the history starts over
/// and holds no failure.)
pub async fn follow_goes_past_a_retried_failure(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let engine = queues.engine().clone();
    let id = queues.add(job(1)).await.unwrap().job.id;
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine
        .finish(&c, Outcome::Failed(ProcessError::unrecoverable("nope")))
        .await
        .unwrap();
    queues.retry(Q, &id).await.unwrap();
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    engine
        .finish(
            &c,
            Outcome::Completed(Completion::with_result(json!({"ok": 2}))),
        )
        .await
        .unwrap();
    let mut follower = queues.follow(Q, &id);
    let mut kinds = Vec::new();
    while let Some(e) = follower.next_within(Duration::from_secs(5)).await.unwrap() {
        kinds.push(e.kind);
    }
    use JobEventKind::*;
    assert_eq!(kinds.first(), Some(&Waiting), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&Completed), "{kinds:?}");
    if queues.engine().capabilities().transactional_effects {
        assert_eq!(kinds, [Waiting, Active, Failed, Waiting, Active, Completed]);
    }
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

/// A search finds jobs by text in their id, data or failure reason (ignoring case) and by a
/// field of their data, in one state or in any, with paging; the engine's search and
/// [`JobSearch::matches`] agree.
pub async fn search_finds_jobs_by_text_and_field(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let engine = queues.engine().clone();
    let data = |user: &str, n: i64, req: &str| json!({ "userId": user, "n": n, "requestId": req, "vip": n == 2 });
    let mut ids = Vec::new();
    for (n, user) in [(1, "alice"), (2, "bob"), (3, "alice"), (4, "carol")] {
        let req = format!("req-{n}-Zeta");
        let added = queues
            .add(NewJob::new(Q, "work", data(user, n, &req)))
            .await
            .unwrap();
        ids.push(added.job.id);
    }
    // Job 1 fails for good with a reason to find.
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    assert_eq!(c.job.id, ids[0]);
    engine
        .finish(
            &c,
            Outcome::Failed(ProcessError::unrecoverable("Database timeout on insert")),
        )
        .await
        .unwrap();
    let find = |state: Option<JobState>, search: JobSearch, offset: u64, limit: u64| {
        let queues = queues.clone();
        async move {
            let found = queues
                .search(Q, state, &search, offset, limit)
                .await
                .unwrap();
            assert!(found.exhaustive, "a handful of jobs is searched whole");
            for j in &found.jobs {
                assert!(search.matches(j), "{search:?} found {j:?}");
            }
            found.jobs.into_iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    let text = |t: &str| JobSearch {
        stalled: false,
        text: Some(t.into()),
        field: None,
    };
    let field = |k: &str, v: &str| JobSearch {
        stalled: false,
        text: None,
        field: Some((k.into(), v.into())),
    };
    // By a request id in the data, in any state, ignoring case.
    assert_eq!(
        find(None, text("REQ-3-zeta"), 0, 10).await,
        [ids[2].as_str()]
    );
    // By words of a failure reason, in the failed state and in any.
    assert_eq!(
        find(Some(JobState::Failed), text("timeout"), 0, 10).await,
        [ids[0].as_str()]
    );
    assert_eq!(
        find(None, text("database TIMEOUT"), 0, 10).await,
        [ids[0].as_str()]
    );
    assert!(find(Some(JobState::Waiting), text("timeout"), 0, 10)
        .await
        .is_empty());
    // By the id itself.
    assert_eq!(find(None, text(&ids[3]), 0, 10).await, [ids[3].as_str()]);
    // Every job of one user, waiting ones in run order, any state newest first.
    assert_eq!(
        find(Some(JobState::Waiting), field("userId", "alice"), 0, 10).await,
        [ids[2].as_str()]
    );
    assert_eq!(
        find(None, field("userId", "alice"), 0, 10).await,
        [ids[2].as_str(), ids[0].as_str()]
    );
    // Numbers and booleans match by their text; a field nobody has matches nothing.
    assert_eq!(find(None, field("n", "4"), 0, 10).await, [ids[3].as_str()]);
    assert_eq!(
        find(None, field("vip", "true"), 0, 10).await,
        [ids[1].as_str()]
    );
    assert!(find(None, field("nobody", "x"), 0, 10).await.is_empty());
    assert!(
        find(None, field("userId", "ALICE"), 0, 10).await.is_empty(),
        "a field matches exactly"
    );
    // Both parts must match; paging skips matches.
    let both = JobSearch {
        stalled: false,
        text: Some("zeta".into()),
        field: Some(("userId".into(), "alice".into())),
    };
    assert_eq!(find(None, both, 0, 10).await.len(), 2);
    let all = find(None, text("zeta"), 0, 10).await;
    assert_eq!(all.len(), 4);
    assert_eq!(find(None, text("zeta"), 1, 2).await, all[1..3].to_vec());
}

/// An active job shows when its lease runs out and which process holds it (SQL engines;
/// BullMQ's lock is a key with a time to live, not in the job); a job that is not active shows
/// none.
pub async fn an_active_jobs_lease_expiry_is_read_back(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let id = queues.add(job(1)).await.unwrap().job.id;
    assert_eq!(
        queues.get(Q, &id).await.unwrap().unwrap().lease_expires_at,
        None
    );
    let c = engine.claim(Q, 1, LEASE).await.unwrap().jobs.pop().unwrap();
    let read = queues.get(Q, &id).await.unwrap().unwrap();
    let listed = queues.list(Q, JobState::Active, 0, 10).await.unwrap();
    let expected = crate::clock::ms_to_datetime(clock.now_ms() + LEASE.as_millis() as i64);
    if engine.name() == "redis" {
        assert_eq!(read.lease_expires_at, None);
    } else {
        assert_eq!(read.lease_expires_at, Some(expected));
        assert_eq!(listed[0].lease_expires_at, Some(expected));
        assert_eq!(read.lease_holder.as_deref(), Some(engine.owner_id()));
    }
    engine
        .finish(&c, Outcome::Completed(Completion::with_result(json!(1))))
        .await
        .unwrap();
    assert_eq!(
        queues.get(Q, &id).await.unwrap().unwrap().lease_expires_at,
        None
    );
}

/// An operator promotes a delayed job: ready at once, claimable before its delay, its history
/// says so (SQL engines); a job that is not delayed is refused, and so is a missing one.
pub async fn promote_makes_a_delayed_job_ready(factory: &dyn EngineFactory) {
    let (queues, _) = manual(factory).await;
    let engine = queues.engine().clone();
    let mut j = job(1);
    j.opts.delay = Some(60_000);
    let id = queues.add(j).await.unwrap().job.id;
    assert_eq!(
        queues.get(Q, &id).await.unwrap().unwrap().state,
        JobState::Delayed
    );
    assert!(
        engine.claim(Q, 1, LEASE).await.unwrap().jobs.is_empty(),
        "not due yet"
    );
    let promoted = queues.promote(Q, &id).await.unwrap();
    assert_eq!(promoted.state, JobState::Waiting);
    let err = queues.promote(Q, &id).await.unwrap_err();
    assert!(matches!(err, QueueError::WrongState { .. }), "{err}");
    let c = engine
        .claim(Q, 1, LEASE)
        .await
        .unwrap()
        .jobs
        .pop()
        .expect("ready now");
    assert_eq!(c.job.id, id);
    let err = queues.promote(Q, "no-such-job").await.unwrap_err();
    assert!(matches!(err, QueueError::Invalid(_)), "{err}");
    if engine.name() != "redis" {
        let kinds: Vec<_> = engine
            .history(Q, &id)
            .await
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        use JobEventKind::*;
        assert_eq!(kinds, [Delayed, Waiting, Active]);
    }
}

/// Jobs in trouble: a search for jobs that stalled before finds the one whose lease ran out and
/// was taken back, in any state, and not the others.
pub async fn search_finds_jobs_that_stalled_before(factory: &dyn EngineFactory) {
    let (queues, clock) = manual(factory).await;
    let engine = queues.engine().clone();
    let stalled = queues.add(job(1)).await.unwrap().job.id;
    let calm = queues.add(job(2)).await.unwrap().job.id;
    let c = engine
        .claim(Q, 1, Duration::from_secs(1))
        .await
        .unwrap()
        .jobs
        .pop()
        .unwrap();
    assert_eq!(c.job.id, stalled);
    let_leases_expire(engine.as_ref(), &clock, Duration::from_secs(2)).await;
    assert_eq!(engine.reap_stalled(Q, 5).await.unwrap(), 1);
    let search = JobSearch {
        stalled: true,
        ..JobSearch::default()
    };
    let found = queues.search(Q, None, &search, 0, 10).await.unwrap();
    let ids: Vec<_> = found.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [stalled.as_str()], "not {calm}");
    assert!(found.jobs[0].stalled_count >= 1);
    let waiting = queues
        .search(Q, Some(JobState::Waiting), &search, 0, 10)
        .await
        .unwrap();
    assert_eq!(waiting.jobs.len(), 1, "taken back to waiting");
}
