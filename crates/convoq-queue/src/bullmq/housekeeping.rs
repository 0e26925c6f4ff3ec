//! Taking back jobs whose lock expired (convoq's `reapStalled` script).

use super::*;

impl BullEngine {
    /// Runs the stalled-job script and rings the bells of the jobs it moved.
    pub(super) async fn reap(&self, queue: &str, max_stalled: u32) -> Result<u64> {
        let k = self.keys(queue);
        let cmd = self.scripts.reap_stalled.cmd(
            &[
                k.active(),
                k.wait(),
                k.meta(),
                k.marker(),
                k.events(),
                k.failed(),
                k.stalled(),
                k.get("metrics:failed"),
            ],
            &[
                k.key_prefix(),
                self.clock.now_ms().to_string(),
                max_stalled.to_string(),
            ],
        );
        let reply = self.eval(cmd).await?;
        let lists: Vec<Vec<String>> = redis::from_redis_value(reply)
            .map_err(|e| QueueError::Corrupt(format!("reapStalled reply: {e}")))?;
        let mut n = 0;
        for (i, ids) in lists.iter().enumerate() {
            for id in ids {
                self.changed(queue, id);
                n += 1;
            }
            if i == 0 && !ids.is_empty() {
                self.wake(queue);
            }
        }
        Ok(n)
    }

    pub(super) async fn prune_finished(&self, queue: &str) -> Result<u64> {
        let k = self.keys(queue);
        let now = self.clock.now_ms();
        let mut doomed = Vec::new();
        for completed in [true, false] {
            let set = if completed { k.completed() } else { k.failed() };
            let mut c = self.redis.clone();
            let total: u64 = self
                .io(redis::cmd("ZCARD").arg(&set).query_async(&mut c))
                .await?;
            let oldest: Vec<(String, f64)> = self
                .io(redis::cmd("ZRANGE")
                    .arg(&set)
                    .arg(0)
                    .arg(PRUNE_SCAN - 1)
                    .arg("WITHSCORES")
                    .query_async(&mut c))
                .await?;
            if oldest.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for (id, _) in &oldest {
                pipe.cmd("HGET").arg(k.job_key(id)).arg("opts");
            }
            let opts: Vec<Option<String>> = self.query(&pipe).await?;
            for (i, ((id, finished), raw)) in oldest.into_iter().zip(opts).enumerate() {
                let o = codec::opts_from_json(raw.as_ref());
                let keep = if completed {
                    o.remove_on_complete
                } else {
                    o.remove_on_fail
                };
                let newer = total.saturating_sub(i as u64 + 1);
                let prune = match keep.unwrap_or(KeepJobs::FOREVER) {
                    KeepJobs::RemoveAtOnce => true,
                    KeepJobs::Keep { count, age_secs } => {
                        count.is_some_and(|c| newer >= c)
                            || age_secs.is_some_and(|a| (finished as i64) < now - a as i64 * 1000)
                    }
                };
                if prune {
                    doomed.push(id);
                }
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let q = self.queue(queue).await?;
        let mut removed = 0;
        for id in doomed {
            let gone = tokio::time::timeout(self.config.command_timeout, q.remove(&id))
                .await
                .map_err(|_| unavailable("no answer in time"))?
                .map_err(from_bullmq)?;
            removed += gone as u64;
            self.changed(queue, &id);
        }
        Ok(removed)
    }
}
