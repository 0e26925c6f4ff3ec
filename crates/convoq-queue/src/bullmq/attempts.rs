//! Ending attempts through BullMQ's own scripts: completed or failed (`moveToFinished`),
//! retried later (`moveToDelayed`), the lock checks that fence them, and claims
//! (`moveToActive`).

use super::*;

impl BullEngine {
    /// Checks that `claimed`'s token still holds the job's lock.
    pub(super) async fn holds_lock(&self, claimed: &ClaimedJob) -> Result<bool> {
        let lock = format!(
            "{}:lock",
            self.keys(&claimed.job.queue).job_key(&claimed.job.id)
        );
        let mut c = self.redis.clone();
        let held: Option<String> = self
            .io(redis::cmd("GET").arg(lock).query_async(&mut c))
            .await?;
        Ok(held.as_deref() == Some(claimed.token.as_str()))
    }

    pub(super) fn lease_lost(claimed: &ClaimedJob) -> QueueError {
        QueueError::LeaseLost {
            queue: claimed.job.queue.clone(),
            job_id: claimed.job.id.clone(),
        }
    }

    /// Maps a move script's status reply: 0 or more is success; the lock and state codes mean
    /// the lease is gone.
    pub(super) fn check_move(claimed: &ClaimedJob, reply: &Value, script: &str) -> Result<()> {
        match codec::value_int(reply) {
            Some(code) if code >= 0 => Ok(()),
            // -1 missing job, -2 missing lock, -3 not active, -6 lock held by another token.
            Some(-1 | -2 | -3 | -6) => Err(Self::lease_lost(claimed)),
            Some(code) => Err(QueueError::Corrupt(format!(
                "{script} answered {code} for job {}/{}",
                claimed.job.queue, claimed.job.id
            ))),
            // A non-integer reply is a fetch-next's answer, parsed by the caller.
            None => Ok(()),
        }
    }

    /// Ends an attempt as completed or failed for good, with BullMQ's `moveToFinished`. With
    /// `next_lease_ms`, the script also takes the queue's next ready job (fetch-next) and locks
    /// it with the finishing attempt's token, as Node's workers do: one token is held by one
    /// job at a time, since it passes on only when its job is finished.
    pub(super) async fn move_to_finished(
        &self,
        claimed: &ClaimedJob,
        completed: bool,
        value: &str,
        next_lease_ms: Option<u64>,
    ) -> Result<Option<ClaimOne>> {
        let job = &claimed.job;
        let k = self.keys(&job.queue);
        let (target, field, keep, metrics) = if completed {
            (
                k.completed(),
                "returnvalue",
                job.opts.remove_on_complete,
                k.get("metrics:completed"),
            )
        } else {
            (
                k.failed(),
                "failedReason",
                job.opts.remove_on_fail,
                k.get("metrics:failed"),
            )
        };
        let opts = codec::pack_finish_opts(
            &claimed.token,
            keep.unwrap_or(KeepJobs::FOREVER),
            next_lease_ms.unwrap_or(UNUSED_LOCK_MS),
            job.max_attempts(),
            "convoq",
        );
        let now = self.clock.now_ms().to_string();
        let mut keys = move_to_active_keys(&k);
        keys.extend([target, k.job_key(&job.id), metrics, k.marker()]);
        let cmd = self.scripts.move_to_finished.cmd(
            &keys,
            &[
                job.id.as_bytes(),
                now.as_bytes(),
                field.as_bytes(),
                value.as_bytes(),
                if completed { b"completed" } else { b"failed" },
                if next_lease_ms.is_some() { b"1" } else { b"0" },
                k.key_prefix().as_bytes(),
                &opts,
                b"",
            ],
        );
        let reply = self.eval(cmd).await?;
        if matches!(reply, Value::Array(_)) {
            return self
                .parse_claim(&job.queue, reply, claimed.token.clone())
                .map(Some);
        }
        Self::check_move(claimed, &reply, "moveToFinished").map(|()| None)
    }

    /// [`Engine::finish`], and [`Engine::finish_and_claim`] with `next_lease`.
    pub(super) async fn end_attempt(
        &self,
        claimed: &ClaimedJob,
        outcome: Outcome,
        next_lease: Option<Duration>,
    ) -> Result<Option<ClaimedJob>> {
        let next_lease_ms = next_lease.map(|l| l.as_millis().max(1) as u64);
        let fetched;
        let job = &claimed.job;
        match outcome {
            Outcome::Completed(completion) => {
                if completion.effect.is_some() {
                    return Err(QueueError::Unsupported {
                        engine: "redis",
                        what: "transactional effects (insert on your own first, idempotently)",
                    });
                }
                if !completion.follow_ups.is_empty() {
                    // Follow-ups go in before the completion (at least once, deduplicated by
                    // their custom ids); but not for an attempt whose lease is already gone.
                    if !self.holds_lock(claimed).await? {
                        return Err(Self::lease_lost(claimed));
                    }
                    self.add_bulk(completion.follow_ups).await?;
                }
                let value = serde_json::to_string(&completion.result)
                    .map_err(|e| QueueError::Invalid(format!("job result: {e}")))?;
                fetched = self
                    .move_to_finished(claimed, true, &value, next_lease_ms)
                    .await?;
            }
            Outcome::Failed(error) => {
                let retry = error.is_retryable() && job.attempts_made < job.max_attempts();
                if retry {
                    let delay = job
                        .opts
                        .backoff
                        .map(|b| b.delay_for(job.attempts_made.max(1), rand::random::<f64>()))
                        .unwrap_or_default();
                    self.move_to_delayed(claimed, delay.as_millis() as u64, error.reason())
                        .await?;
                    self.wake(&job.queue);
                    fetched = None;
                } else {
                    fetched = self
                        .move_to_finished(claimed, false, error.reason(), next_lease_ms)
                        .await?;
                }
            }
        }
        self.changed(&job.queue, &job.id);
        match fetched {
            Some(ClaimOne::Job(next, None)) => {
                self.changed(&job.queue, &next.job.id);
                Ok(Some(*next))
            }
            Some(ClaimOne::Job(next, Some(reason))) => {
                // A failure BullMQ deferred to the next worker: fail it without running it.
                self.move_to_finished(&next, false, &reason, None).await?;
                self.changed(&job.queue, &next.job.id);
                Ok(None)
            }
            Some(ClaimOne::None(_)) | None => Ok(None),
        }
    }

    /// Ends an attempt with a retry after `delay_ms`, with BullMQ's `moveToDelayed` (which
    /// counts the attempt in `atm`, as Node's retries do).
    pub(super) async fn move_to_delayed(
        &self,
        claimed: &ClaimedJob,
        delay_ms: u64,
        reason: &str,
    ) -> Result<()> {
        let job = &claimed.job;
        let k = self.keys(&job.queue);
        let now = self.clock.now_ms().to_string();
        let delay = delay_ms.to_string();
        let fields = codec::pack_fields(&[("failedReason", reason)]);
        let opts = codec::pack_delay_opts(&claimed.token, UNUSED_LOCK_MS);
        let cmd = self.scripts.move_to_delayed.cmd(
            &[
                k.marker(),
                k.active(),
                k.prioritized(),
                k.delayed(),
                k.job_key(&job.id),
                k.events(),
                k.meta(),
                k.stalled(),
                k.wait(),
                k.limiter(),
                k.pc(),
            ],
            &[
                k.key_prefix().as_bytes(),
                now.as_bytes(),
                job.id.as_bytes(),
                claimed.token.as_bytes(),
                delay.as_bytes(),
                b"0",
                &fields,
                b"0",
                &opts,
            ],
        );
        let reply = self.eval(cmd).await?;
        Self::check_move(claimed, &reply, "moveToDelayed")
    }

    /// Parses one `moveToActive` reply: a claimed job, or when none was ready, the time the
    /// next delayed job comes due (0 for none).
    pub(super) fn parse_claim(&self, queue: &str, reply: Value, token: String) -> Result<ClaimOne> {
        let Value::Array(items) = reply else {
            return Err(QueueError::Corrupt(format!(
                "moveToActive answered {reply:?}"
            )));
        };
        match items.as_slice() {
            [Value::Array(pairs), id, ..] => {
                let id = codec::value_str(id).unwrap_or_default();
                let fields = codec::pairs_to_map(pairs);
                let placement = Placement {
                    state: JobState::Active,
                    due_ms: None,
                };
                let deferred = fields.get("defa").cloned();
                let job = codec::job_from_hash(queue, &id, &fields, placement)?;
                Ok(ClaimOne::Job(Box::new(ClaimedJob { job, token }), deferred))
            }
            [_, _, _, next] => Ok(ClaimOne::None(codec::value_int(next).filter(|t| *t > 0))),
            _ => Err(QueueError::Corrupt(format!(
                "moveToActive answered {items:?}"
            ))),
        }
    }

    pub(super) fn claim_cmd(
        &self,
        k: &QueueKeys,
        token: &str,
        lease_ms: u64,
        now: &str,
    ) -> redis::Cmd {
        let opts = codec::pack_active_opts(token, lease_ms, "convoq");
        let mut keys = move_to_active_keys(k);
        keys.push(k.marker());
        self.scripts
            .move_to_active
            .cmd(&keys, &[k.key_prefix().as_bytes(), now.as_bytes(), &opts])
    }

    pub(super) async fn claim_jobs(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<ClaimBatch> {
        let k = self.keys(queue);
        let lease_ms = lease.as_millis().max(1) as u64;
        let mut batch = ClaimBatch::default();
        let mut want = 1usize;
        let max = max.clamp(1, MAX_CLAIM);
        while batch.jobs.len() < max {
            let now = self.clock.now_ms().to_string();
            let mut pipe = redis::pipe();
            let tokens: Vec<String> = (0..want).map(|_| new_token()).collect();
            for token in &tokens {
                pipe.add_command(self.claim_cmd(&k, token, lease_ms, &now));
            }
            let replies: Vec<Value> = self.query(&pipe).await?;
            let mut drained = false;
            for (reply, token) in replies.into_iter().zip(tokens) {
                match self.parse_claim(queue, reply, token)? {
                    ClaimOne::Job(claimed, None) => {
                        self.changed(queue, &claimed.job.id);
                        batch.jobs.push(*claimed);
                    }
                    ClaimOne::Job(claimed, Some(reason)) => {
                        // A failure BullMQ deferred to the next worker (a Node stalled check):
                        // fail the job without running it, as Node workers do.
                        self.move_to_finished(&claimed, false, &reason, None)
                            .await?;
                        self.changed(queue, &claimed.job.id);
                    }
                    ClaimOne::None(next) => {
                        drained = true;
                        batch.next_due_ms = next;
                    }
                }
            }
            if drained {
                break;
            }
            // Every call of the round found a job: ask for twice as many next, up to what is
            // left. Asking for all that is left at once sent, on a queue where jobs arrive one
            // at a time, dozens of `moveToActive` calls per job that found nothing (17 scripts
            // per conversation on Redis, against Node's 3: BENCHMARKS.md); doubling costs a few
            // more round trips while a backlog drains, and at most one empty call per claim.
            want = (want * 2).min(max - batch.jobs.len());
        }
        if !batch.jobs.is_empty() {
            batch.next_due_ms = None;
        }
        Ok(batch)
    }

    pub(super) async fn release_job(&self, claimed: &ClaimedJob) -> Result<()> {
        let job = &claimed.job;
        let k = self.keys(&job.queue);
        let job_key = k.job_key(&job.id);
        let cmd = self.scripts.move_to_wait.cmd(
            &[
                k.active(),
                k.wait(),
                k.stalled(),
                k.paused(),
                k.meta(),
                k.limiter(),
                k.prioritized(),
                k.marker(),
                k.events(),
            ],
            &[job.id.as_str(), claimed.token.as_str(), job_key.as_str()],
        );
        let reply = self.eval(cmd).await?;
        Self::check_move(claimed, &reply, "moveJobFromActiveToWait")?;
        // The released attempt does not count: take back the start moveToActive counted.
        let mut c = self.redis.clone();
        let _: i64 = self
            .io(redis::cmd("HINCRBY")
                .arg(&job_key)
                .arg("ats")
                .arg(-1)
                .query_async(&mut c))
            .await?;
        self.wake(&job.queue);
        self.changed(&job.queue, &job.id);
        Ok(())
    }
}

/// The keys `moveToActive` takes before its marker, which `moveToFinished` also takes first
/// (it runs `moveToActive`'s code to fetch the next job): written once for both calls.
fn move_to_active_keys(k: &QueueKeys) -> Vec<String> {
    let mut keys = Vec::with_capacity(14);
    keys.extend([
        k.wait(),
        k.active(),
        k.prioritized(),
        k.events(),
        k.stalled(),
        k.limiter(),
        k.delayed(),
        k.paused(),
        k.meta(),
        k.pc(),
    ]);
    keys
}
