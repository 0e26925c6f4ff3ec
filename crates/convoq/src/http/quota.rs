//! Backlog quotas: how many conversation jobs one API key (and one `userId`) may have queued
//! and not yet ended, so that one caller cannot fill the `database` queue for everyone
//! (`--key-backlog-quota`, `--user-backlog-quota`; 0, the default, is no quota).
//!
//! Each API process holds, per caller, the ids of the jobs it queued for that caller, in the
//! order it queued them. A POST finding its caller at the quota first looks the held jobs up
//! (at most [`CHECK_AT_ONCE`] reads, at most once per [`CHECK_EVERY`] per caller) and lets go
//! of the ones that ended (completed, failed, removed); if the caller is still at its quota, it
//! is answered 429 `backlog_quota` with `Retry-After`, counted in
//! `convoq_rate_limited_total{scope="key_backlog"|"user_backlog"}`. The check costs nothing
//! for callers under their quota, and reads only for callers at it. Like the rate limits, the
//! quota is per process: with N API processes a caller may queue N times as many. At most
//! [`super::limits::MAX_TRACKED`] callers are tracked (so at most that many times the quota
//! job ids are held): when a new caller finds the map full, the callers that took no place for
//! [`FORGET_IDLE`] are forgotten, jobs and all (most likely ended by then; if not, they no
//! longer count); only if every tracked caller was active that recently is the new one
//! refused as if at its quota.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoq_queue::{JobState, Queues};

use super::error::ApiError;
use super::limits::MAX_TRACKED;
use crate::domain::DATABASE_QUEUE;
use crate::telemetry::Metrics;

/// The most held jobs looked up by one check.
pub const CHECK_AT_ONCE: usize = 256;
/// The least time between two checks of one caller's held jobs.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a caller must have taken no place to be forgotten when the map is full.
pub const FORGET_IDLE: Duration = Duration::from_secs(600);

/// One quota over many callers.
#[derive(Debug)]
pub struct BacklogQuota {
    max: usize,
    scope: &'static str,
    what: &'static str,
    /// [`FORGET_IDLE`], shorter in tests.
    forget_idle: Duration,
    callers: Mutex<HashMap<String, Held>>,
}

/// What one caller holds.
#[derive(Debug, Default)]
struct Held {
    /// Jobs queued for it and not known to have ended, oldest first.
    jobs: VecDeque<String>,
    /// Places taken by POSTs whose add has not answered yet.
    reserved: usize,
    /// When its held jobs were last looked up (or are being looked up now).
    checked_at: Option<Instant>,
    /// When it last took a place.
    active_at: Option<Instant>,
}

impl Held {
    fn used(&self) -> usize {
        self.jobs.len() + self.reserved
    }
}

/// A POST refused by a quota (unless it replays an accepted idempotency key).
#[derive(Debug)]
pub struct Refusal {
    scope: &'static str,
    error: ApiError,
}

impl Refusal {
    /// The answer, counted in `convoq_rate_limited_total{scope}`.
    pub fn counted(self, metrics: &Metrics) -> ApiError {
        metrics.rate_limited.with_label_values(&[self.scope]).inc();
        self.error
    }
}

/// A place in a caller's quota, held while its POST adds the job: [`Place::queued`] keeps it
/// for the job; dropped otherwise, it is given back.
#[derive(Debug)]
pub struct Place {
    quota: Arc<BacklogQuota>,
    who: String,
    settled: bool,
}

impl Place {
    /// The job `id` was queued (not found by an idempotency key): it holds the place until it
    /// ends.
    pub fn queued(mut self, id: &str) {
        let mut callers = self.quota.lock();
        if let Some(held) = callers.get_mut(&self.who) {
            held.reserved = held.reserved.saturating_sub(1);
            held.jobs.push_back(id.to_owned());
        }
        self.settled = true;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut callers = self.quota.lock();
        if let Some(held) = callers.get_mut(&self.who) {
            held.reserved = held.reserved.saturating_sub(1);
            if held.used() == 0 {
                callers.remove(&self.who);
            }
        }
    }
}

impl BacklogQuota {
    /// A quota of `max` unfinished jobs per caller; `None` for 0, no quota. `scope` names it in
    /// the metric, `what` in the message ("API key", "userId").
    pub fn new(max: u64, scope: &'static str, what: &'static str) -> Option<Arc<BacklogQuota>> {
        (max > 0).then(|| {
            Arc::new(BacklogQuota {
                max: usize::try_from(max).unwrap_or(usize::MAX),
                scope,
                what,
                forget_idle: FORGET_IDLE,
                callers: Mutex::default(),
            })
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.callers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more job of `who`, or 429 `backlog_quota` when it has `max` unfinished
    /// jobs (after letting go of the ones that ended, if it may look them up now).
    pub async fn reserve(self: &Arc<Self>, who: &str, queues: &Queues) -> Result<Place, Refusal> {
        if let Some(place) = self.try_reserve(who) {
            return Ok(place);
        }
        if let Some(ids) = self.due_for_check(who) {
            let ended = ended_among(queues, &ids).await;
            let mut callers = self.lock();
            if let Some(held) = callers.get_mut(who) {
                held.jobs.retain(|id| !ended.contains(id));
            }
            drop(callers);
            if let Some(place) = self.try_reserve(who) {
                return Ok(place);
            }
        }
        Err(Refusal {
            scope: self.scope,
            error: ApiError::QuotaReached {
                retry_after: 1,
                message: format!(
                    "this {} has {} jobs queued and not yet ended, its quota; retry when some have ended",
                    self.what, self.max
                ),
            },
        })
    }

    /// A place if `who` is under its quota.
    fn try_reserve(self: &Arc<Self>, who: &str) -> Option<Place> {
        let mut callers = self.lock();
        let now = Instant::now();
        if callers.len() >= MAX_TRACKED && !callers.contains_key(who) {
            callers.retain(|_, h| {
                h.reserved > 0
                    || (!h.jobs.is_empty()
                        && h.active_at
                            .is_some_and(|at| now.saturating_duration_since(at) < self.forget_idle))
            });
            if callers.len() >= MAX_TRACKED {
                return None;
            }
        }
        let held = callers.entry(who.to_owned()).or_default();
        if held.used() >= self.max {
            return None;
        }
        held.reserved += 1;
        held.active_at = Some(now);
        Some(Place {
            quota: self.clone(),
            who: who.to_owned(),
            settled: false,
        })
    }

    /// The oldest held jobs of `who` to look up, if no check of its jobs ran in the last
    /// [`CHECK_EVERY`] (the check is then marked as under way).
    fn due_for_check(&self, who: &str) -> Option<Vec<String>> {
        let mut callers = self.lock();
        let held = callers.get_mut(who)?;
        let now = Instant::now();
        if held
            .checked_at
            .is_some_and(|at| now.saturating_duration_since(at) < CHECK_EVERY)
        {
            return None;
        }
        held.checked_at = Some(now);
        Some(held.jobs.iter().take(CHECK_AT_ONCE).cloned().collect())
    }

    /// How many places `who` takes now.
    #[cfg(test)]
    fn held(&self, who: &str) -> usize {
        self.lock().get(who).map_or(0, Held::used)
    }
}

/// The ids among `ids` whose jobs ended: completed, failed, or gone. A job that cannot be read
/// now counts as unfinished.
async fn ended_among(queues: &Queues, ids: &[String]) -> HashSet<String> {
    let mut ended = HashSet::new();
    for id in ids {
        match queues.get(DATABASE_QUEUE, id).await {
            Ok(None) => {
                ended.insert(id.clone());
            }
            Ok(Some(job)) if matches!(job.state, JobState::Completed | JobState::Failed) => {
                ended.insert(id.clone());
            }
            Ok(Some(_)) => {}
            Err(_) => break,
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoq_queue::sql::{SqlConfig, SqlEngine};
    use convoq_queue::NewJob;

    async fn queues() -> (Queues, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let engine = SqlEngine::connect(SqlConfig::new(&url))
            .await
            .expect("open the engine");
        (Queues::new(engine), dir)
    }

    #[tokio::test]
    async fn a_caller_at_its_quota_is_refused_until_a_job_ends() {
        let (queues, _dir) = queues().await;
        let quota = BacklogQuota::new(2, "key_backlog", "API key").expect("a quota");
        let mut ids = Vec::new();
        for _ in 0..2 {
            let place = quota.reserve("a", &queues).await.expect("a place");
            let added = queues
                .add(NewJob::new(
                    DATABASE_QUEUE,
                    "create_conversation",
                    serde_json::json!({}),
                ))
                .await
                .expect("add");
            place.queued(&added.job.id);
            ids.push(added.job.id);
        }
        let refused = quota.reserve("a", &queues).await;
        assert!(
            matches!(
                refused,
                Err(Refusal {
                    error: ApiError::QuotaReached { retry_after: 1, .. },
                    ..
                })
            ),
            "{refused:?}"
        );
        // Another caller has its own quota; a place given back is free again.
        drop(quota.reserve("b", &queues).await.expect("b's place"));
        assert_eq!(quota.held("b"), 0);
        // One job ends: after the check interval, its place is free.
        assert!(queues
            .remove(DATABASE_QUEUE, &ids[0])
            .await
            .expect("remove"));
        tokio::time::sleep(CHECK_EVERY).await;
        let place = quota.reserve("a", &queues).await.expect("a place again");
        drop(place);
        assert_eq!(quota.held("a"), 1);
        assert!(BacklogQuota::new(0, "key_backlog", "API key").is_none());
    }

    #[tokio::test]
    async fn a_full_map_forgets_idle_callers_only() {
        let (queues, _dir) = queues().await;
        let fill = |quota: &Arc<BacklogQuota>| {
            for n in 0..MAX_TRACKED {
                let who = format!("user-{n}");
                quota
                    .try_reserve(&who)
                    .expect("a place")
                    .queued(&format!("job-{n}"));
            }
        };
        // Every caller took a place just now: a new one is refused.
        let quota = BacklogQuota::new(5, "user_backlog", "userId").expect("a quota");
        fill(&quota);
        assert!(quota.reserve("newcomer", &queues).await.is_err());
        // Callers idle past the horizon are forgotten for the newcomer.
        let mut idle = BacklogQuota::new(5, "user_backlog", "userId").expect("a quota");
        Arc::get_mut(&mut idle).expect("one owner").forget_idle = Duration::ZERO;
        fill(&idle);
        let place = idle.reserve("newcomer", &queues).await.expect("a place");
        assert_eq!(idle.lock().len(), 1, "the idle callers were forgotten");
        drop(place);
    }
}
