//! Writes through the crate's and BullMQ's own calls: adding jobs (BullMQ's add scripts,
//! one pipeline for a bulk add), an operator's retry and removal.

use super::*;

impl BullEngine {
    pub(super) async fn add_jobs(&self, jobs: Vec<NewJob>) -> Result<Vec<Added>> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let now = self.clock.now_ms();
        for job in &jobs {
            let k = self.keys(&job.queue);
            let custom = job.opts.job_id.as_deref().unwrap_or("");
            if !custom.is_empty() {
                check_custom_id(custom)?;
                pipe.cmd("EXISTS").arg(k.job_key(custom));
            }
            let args = codec::pack_add_args(&k.key_prefix(), custom, &job.name, now);
            let data = serde_json::to_string(&job.data)
                .map_err(|e| QueueError::Invalid(format!("job data: {e}")))?;
            let opts = codec::pack_job_opts(&job.opts);
            let argv: [&[u8]; 3] = [&args, data.as_bytes(), &opts];
            let cmd = if job.opts.delay.unwrap_or(0) > 0 {
                self.scripts.add_delayed.cmd(
                    &[
                        k.marker(),
                        k.meta(),
                        k.id(),
                        k.delayed(),
                        k.completed(),
                        k.events(),
                    ],
                    &argv,
                )
            } else if job.opts.priority.unwrap_or(0) > 0 {
                self.scripts.add_prioritized.cmd(
                    &[
                        k.marker(),
                        k.meta(),
                        k.id(),
                        k.prioritized(),
                        k.delayed(),
                        k.completed(),
                        k.active(),
                        k.events(),
                        k.pc(),
                    ],
                    &argv,
                )
            } else {
                self.scripts.add_standard.cmd(
                    &[
                        k.wait(),
                        k.paused(),
                        k.meta(),
                        k.id(),
                        k.completed(),
                        k.delayed(),
                        k.active(),
                        k.events(),
                        k.marker(),
                    ],
                    &argv,
                )
            };
            pipe.add_command(cmd);
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        let mut replies = replies.into_iter();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let existed = match job.opts.job_id {
                Some(_) => replies.next().and_then(|v| codec::value_int(&v)) == Some(1),
                None => false,
            };
            let reply = replies
                .next()
                .ok_or_else(|| unavailable("short reply to an add"))?;
            let id = match codec::value_int(&reply) {
                Some(code) if code < 0 => {
                    return Err(QueueError::Invalid(format!(
                        "BullMQ refused the job (code {code})"
                    )))
                }
                _ => codec::value_str(&reply).unwrap_or_default(),
            };
            self.wake(&job.queue);
            self.changed(&job.queue, &id);
            if existed {
                let stored = self.locate(&job.queue, &id).await?.ok_or_else(|| {
                    QueueError::Unavailable(format!("job {id} vanished right after its add"))
                })?;
                out.push(Added {
                    job: stored,
                    created: false,
                });
                continue;
            }
            let run_at = job.due_at(now);
            out.push(Added {
                job: job.into_stored(id, now, run_at),
                created: true,
            });
        }
        Ok(out)
    }

    pub(super) async fn retry_failed(&self, queue: &str, id: &str) -> Result<Job> {
        self.make_ready(queue, id, JobState::Failed, |q| async move {
            let Some(mut j) = q.get_job(id).await? else {
                return Ok(());
            };
            let opts = bullmq::RetryOptions {
                reset_attempts_made: true,
                reset_attempts_started: true,
            };
            j.retry("failed", Some(opts)).await
        })
        .await
    }

    /// BullMQ's own promotion (`promote-9.lua`, through the crate's `Job::promote`): the job
    /// leaves the delayed set for the wait list (or the prioritized set).
    pub(super) async fn promote_delayed(&self, queue: &str, id: &str) -> Result<Job> {
        self.make_ready(queue, id, JobState::Delayed, |q| async move {
            let Some(j) = q.get_job(id).await? else {
                return Ok(());
            };
            j.promote().await
        })
        .await
    }

    /// An operator's step that makes job `id` ready (a retry, a promotion) through BullMQ's
    /// own script, which `step` runs on the queue: refused unless the job is in `wanted`, bounded
    /// by the command timeout, and the job read back after. The scripts answer -3 when the job
    /// left `wanted` meanwhile.
    async fn make_ready<F, Fut>(
        &self,
        queue: &str,
        id: &str,
        wanted: JobState,
        step: F,
    ) -> Result<Job>
    where
        F: FnOnce(bullmq::Queue) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), bullmq::Error>>,
    {
        let job = self
            .locate(queue, id)
            .await?
            .ok_or_else(|| QueueError::Invalid(format!("no job {id} in queue {queue}")))?;
        if job.state != wanted {
            return Err(QueueError::WrongState {
                job_id: id.to_owned(),
                state: job.state.to_string(),
            });
        }
        let q = self.queue(queue).await?;
        tokio::time::timeout(self.config.command_timeout, step(q))
            .await
            .map_err(|_| unavailable("no answer in time"))?
            .map_err(|e| match e {
                bullmq::Error::InvalidConfig(m) if m.contains("-3") => QueueError::WrongState {
                    job_id: id.to_owned(),
                    state: format!("not {wanted}"),
                },
                other => from_bullmq(other),
            })?;
        self.wake(queue);
        self.changed(queue, id);
        self.locate(queue, id)
            .await?
            .ok_or_else(|| QueueError::Invalid(format!("job {id} was removed meanwhile")))
    }

    pub(super) async fn remove_job(&self, queue: &str, id: &str) -> Result<bool> {
        let Some(job) = self.locate(queue, id).await? else {
            return Ok(false);
        };
        if job.state == JobState::Active {
            return Err(QueueError::WrongState {
                job_id: id.to_owned(),
                state: job.state.to_string(),
            });
        }
        let q = self.queue(queue).await?;
        let removed = tokio::time::timeout(self.config.command_timeout, q.remove(id))
            .await
            .map_err(|_| unavailable("no answer in time"))?
            .map_err(from_bullmq)?;
        self.changed(queue, id);
        Ok(removed)
    }
}
