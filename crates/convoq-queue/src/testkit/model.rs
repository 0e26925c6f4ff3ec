//! The model-based case: random sequences of the engine's operations (add, claim, extend,
//! finish, release, reap, pause, resume, retry, remove, clock steps), generated with proptest
//! from a fixed seed, run against an engine and checked after every step against a small
//! model of what must hold whatever the interleaving:
//!
//! - at most one valid lease per job: a claim never hands out a job whose lease is still
//!   held, and a lease that was superseded, released, reaped or finished is refused (finish
//!   answers `LeaseLost`, extend `false`), while a held, unexpired one is honoured;
//! - a reap takes back exactly the leases that expired, never one that has not;
//! - a completed job stays completed until removed; attempts only grow (but for a release,
//!   which gives its attempt back, and an operator's retry);
//! - the lifetime totals add up to the completions and final failures the model saw;
//! - a paused queue hands out nothing; a retry succeeds only on a failed job, a removal
//!   only on a job that is not active.
//!
//! The engines are async and tied to the test's runtime, so proptest's runner cannot drive
//! them: sequences are drawn from its strategies with a deterministic runner, without
//! shrinking, and a failure prints the seed's case number and the sequence up to the step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::json;

use super::{EngineFactory, Q};
use crate::{
    ClaimedJob, Completion, Engine, JobOptions, JobState, ManualClock, NewJob, Outcome,
    ProcessError, QueueError,
};

/// One step of a sequence. Indexes pick among every lease (or job) seen so far, stale ones
/// included, modulo their number.
#[derive(Debug, Clone)]
enum Step {
    Add,
    Claim(usize),
    Finish(usize, bool),
    Extend(usize),
    Release(usize),
    Reap,
    Advance(u64),
    Pause,
    Resume,
    Retry(usize),
    Remove(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => Just(Step::Add),
        5 => (1usize..4).prop_map(Step::Claim),
        5 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Step::Finish(i, ok)),
        2 => any::<usize>().prop_map(Step::Extend),
        1 => any::<usize>().prop_map(Step::Release),
        2 => Just(Step::Reap),
        2 => (0u64..1500).prop_map(Step::Advance),
        1 => Just(Step::Pause),
        1 => Just(Step::Resume),
        1 => any::<usize>().prop_map(Step::Retry),
        1 => any::<usize>().prop_map(Step::Remove),
    ]
}

/// How many sequences, and how long each.
const CASES: usize = 12;
const STEPS: std::ops::Range<usize> = 30..60;
/// The lease claims take (short, so that clock steps expire it where leases follow the clock).
const LEASE: Duration = Duration::from_secs(1);
/// Attempts each job has.
const ATTEMPTS: u32 = 2;

/// A lease the model knows of.
struct Lease {
    claimed: ClaimedJob,
    /// When it expires, by the engine's clock (ms); `None` where leases follow the backend's
    /// own time and cannot expire within a test.
    expires_at: Option<i64>,
    current: bool,
}

#[derive(Default)]
struct Model {
    jobs: Vec<String>,
    leases: Vec<Lease>,
    completed: HashSet<String>,
    completed_total: u64,
    failed_total: u64,
    attempts: HashMap<String, u32>,
    paused: bool,
}

impl Model {
    fn current_of(&self, id: &str) -> Option<usize> {
        self.leases
            .iter()
            .position(|l| l.current && l.claimed.job.id == id)
    }

    fn expired(&self, lease: &Lease, now: i64) -> bool {
        lease.expires_at.is_some_and(|at| at <= now)
    }
}

/// Random operation sequences keep the engine's invariants (see the module's docs).
pub async fn random_operation_sequences_keep_the_invariants(factory: &dyn EngineFactory) {
    let mut runner = TestRunner::deterministic();
    let sequences = proptest::collection::vec(step(), STEPS);
    for case in 0..CASES {
        let steps = sequences
            .new_tree(&mut runner)
            .expect("a sequence")
            .current();
        let clock = ManualClock::starting_now();
        let engine = factory.engine(Arc::new(clock.clone())).await;
        run(engine.as_ref(), &clock, &steps, case).await;
        engine.close().await;
    }
}

async fn run(engine: &dyn Engine, clock: &ManualClock, steps: &[Step], case: usize) {
    use crate::Clock;
    let follows_clock = engine.capabilities().leases_follow_clock;
    let mut m = Model::default();
    for (n, step) in steps.iter().enumerate() {
        let at = || format!("case {case}, step {n} of {steps:?}");
        let now = clock.now_ms();
        match step {
            Step::Add => {
                let opts = JobOptions {
                    attempts: Some(ATTEMPTS),
                    ..JobOptions::default()
                };
                let added = engine
                    .add_bulk(vec![
                        NewJob::new(Q, "model", json!({ "n": n })).with_opts(opts)
                    ])
                    .await
                    .unwrap_or_else(|e| panic!("add: {e} at {}", at()));
                m.jobs.push(added[0].job.id.clone());
            }
            Step::Claim(max) => {
                let batch = engine
                    .claim(Q, *max, LEASE)
                    .await
                    .unwrap_or_else(|e| panic!("claim: {e} at {}", at()));
                if m.paused {
                    assert!(
                        batch.jobs.is_empty(),
                        "a paused queue handed out jobs at {}",
                        at()
                    );
                }
                for claimed in batch.jobs {
                    let id = claimed.job.id.clone();
                    if let Some(i) = m.current_of(&id) {
                        panic!(
                            "job {id} handed out while its lease (expired: {}) was held, at {}",
                            m.expired(&m.leases[i], now),
                            at()
                        );
                    }
                    let before = m.attempts.get(&id).copied().unwrap_or(0);
                    assert!(
                        claimed.job.attempts_made > before,
                        "attempts went from {before} to {} at {}",
                        claimed.job.attempts_made,
                        at()
                    );
                    m.attempts.insert(id, claimed.job.attempts_made);
                    m.leases.push(Lease {
                        expires_at: follows_clock.then(|| now + LEASE.as_millis() as i64),
                        claimed,
                        current: true,
                    });
                }
            }
            Step::Finish(i, ok) if !m.leases.is_empty() => {
                let i = i % m.leases.len();
                let outcome = if *ok {
                    Outcome::Completed(Completion::with_result(json!({ "step": n })))
                } else {
                    Outcome::Failed(ProcessError::retryable("the model's failure"))
                };
                let lease = &m.leases[i];
                let held = lease.current && !m.expired(lease, now);
                let stale = !lease.current;
                let result = engine.finish(&lease.claimed, outcome).await;
                let id = lease.claimed.job.id.clone();
                let final_failure = lease.claimed.job.attempts_made >= ATTEMPTS;
                match result {
                    Ok(()) => {
                        assert!(!stale, "a stale lease finished job {id} at {}", at());
                        m.leases[i].current = false;
                        if *ok {
                            m.completed.insert(id);
                            m.completed_total += 1;
                        } else if final_failure {
                            m.failed_total += 1;
                        }
                    }
                    Err(QueueError::LeaseLost { .. }) => {
                        assert!(!held, "a held lease on job {id} was refused at {}", at());
                        // Expired and refused: the job is taken back at the next reap.
                    }
                    Err(e) => panic!("finish: {e} at {}", at()),
                }
            }
            Step::Extend(i) if !m.leases.is_empty() => {
                let i = i % m.leases.len();
                let lease = &m.leases[i];
                let held = lease.current && !m.expired(lease, now);
                let stale = !lease.current;
                let pair = (lease.claimed.job.id.clone(), lease.claimed.token.clone());
                let renewed = engine
                    .extend(Q, &[pair], LEASE)
                    .await
                    .unwrap_or_else(|e| panic!("extend: {e} at {}", at()));
                assert_eq!(renewed.len(), 1);
                if stale {
                    assert!(!renewed[0], "a stale lease was renewed at {}", at());
                }
                if held {
                    assert!(renewed[0], "a held lease was not renewed at {}", at());
                }
                if renewed[0] {
                    m.leases[i].expires_at = follows_clock.then(|| now + LEASE.as_millis() as i64);
                }
            }
            Step::Release(i) if !m.leases.is_empty() => {
                let i = i % m.leases.len();
                let lease = &m.leases[i];
                let id = lease.claimed.job.id.clone();
                let before = engine.get(Q, &id).await.expect("get");
                let result = engine.release(&lease.claimed).await;
                let after = engine.get(Q, &id).await.expect("get");
                let back = after
                    .as_ref()
                    .is_some_and(|j| matches!(j.state, JobState::Waiting | JobState::Paused));
                if lease.current && m.expired(lease, now) && result.is_ok() && back {
                    // An expired lease the engine still let go of: the job is back, unheld.
                    m.leases[i].current = false;
                } else if lease.current && !m.expired(lease, now) {
                    result.unwrap_or_else(|e| panic!("release: {e} at {}", at()));
                    let state = after.as_ref().map(|j| j.state);
                    assert!(
                        matches!(state, Some(JobState::Waiting | JobState::Paused)),
                        "a released job is {state:?} at {}",
                        at()
                    );
                    m.leases[i].current = false;
                    if let Some(j) = after {
                        m.attempts.insert(id, j.attempts_made);
                    }
                } else if !lease.current {
                    // A stale release changes nothing.
                    let unchanged = |j: Option<crate::Job>| j.map(|j| (j.state, j.attempts_made));
                    assert_eq!(
                        unchanged(before),
                        unchanged(after),
                        "a stale release changed job {id} at {}",
                        at()
                    );
                }
            }
            Step::Reap => {
                let expired: Vec<usize> = (0..m.leases.len())
                    .filter(|&i| m.leases[i].current && m.expired(&m.leases[i], now))
                    .collect();
                let taken = engine
                    .reap_stalled(Q, 100)
                    .await
                    .unwrap_or_else(|e| panic!("reap: {e} at {}", at()));
                assert_eq!(
                    taken,
                    expired.len() as u64,
                    "a reap took back {taken} jobs, {} leases had expired, at {}",
                    expired.len(),
                    at()
                );
                for i in expired {
                    m.leases[i].current = false;
                }
            }
            Step::Advance(ms) => clock.advance(Duration::from_millis(*ms)),
            Step::Pause | Step::Resume => {
                let pause = matches!(step, Step::Pause);
                engine
                    .set_paused(Q, pause)
                    .await
                    .unwrap_or_else(|e| panic!("pause: {e} at {}", at()));
                m.paused = pause;
            }
            Step::Retry(i) if !m.jobs.is_empty() => {
                let id = m.jobs[i % m.jobs.len()].clone();
                let before = engine.get(Q, &id).await.expect("get");
                let result = engine.retry(Q, &id).await;
                match (before.map(|j| j.state), result) {
                    (Some(JobState::Failed), Ok(_)) => {
                        m.attempts.insert(id, 0);
                    }
                    (Some(JobState::Failed), Err(e)) => {
                        panic!("a failed job's retry was refused: {e} at {}", at())
                    }
                    (Some(_), Ok(_)) => panic!("a job that had not failed was retried at {}", at()),
                    (_, Err(_)) => {}
                    (None, Ok(_)) => panic!("a missing job was retried at {}", at()),
                }
            }
            Step::Remove(i) if !m.jobs.is_empty() => {
                let id = m.jobs[i % m.jobs.len()].clone();
                let before = engine.get(Q, &id).await.expect("get");
                let result = engine.remove(Q, &id).await;
                match (before.map(|j| j.state), result) {
                    (Some(JobState::Active), Ok(true)) => {
                        panic!("an active job was removed at {}", at())
                    }
                    (Some(JobState::Active), _) => {}
                    (Some(_), Ok(true)) => {
                        m.completed.remove(&id);
                        for lease in m.leases.iter_mut().filter(|l| l.claimed.job.id == id) {
                            lease.current = false;
                        }
                        m.jobs.retain(|j| *j != id);
                    }
                    (Some(state), other) => {
                        panic!("removing a {state} job answered {other:?} at {}", at())
                    }
                    (None, _) => {}
                }
            }
            // An index into an empty list: nothing to do.
            _ => {}
        }
        // After every step: completed jobs stay completed, and the totals add up.
        for id in &m.completed {
            let state = engine.get(Q, id).await.expect("get").map(|j| j.state);
            assert_eq!(
                state,
                Some(JobState::Completed),
                "completed job {id} left completed at {}",
                at()
            );
        }
        let counts = engine.counts(Q).await.expect("counts");
        if n + 1 == steps.len() {
            let stale = m.leases.iter().filter(|l| !l.current).count();
            println!(
                "case {case}: {} steps, {} jobs, {} leases ({stale} no longer held), {} completed, {} failed for good",
                steps.len(),
                m.jobs.len(),
                m.leases.len(),
                m.completed_total,
                m.failed_total
            );
        }
        assert_eq!(
            (counts.completed_total, counts.failed_total),
            (m.completed_total, m.failed_total),
            "lifetime totals (completed, failed) at {}",
            at()
        );
    }
}
