//! Reading jobs back from their hashes: several at once, one wherever it is, and the ready
//! jobs in run order.

use super::*;

impl BullEngine {
    /// Reads jobs' hashes by id, all in one known placement; ids whose hash is gone are skipped.
    pub(super) async fn read_many(
        &self,
        queue: &str,
        ids: &[(String, Placement)],
    ) -> Result<Vec<Job>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys(queue);
        let mut pipe = redis::pipe();
        for (id, _) in ids {
            pipe.cmd("HGETALL").arg(keys.job_key(id));
        }
        let hashes: Vec<HashMap<String, String>> = self.query(&pipe).await?;
        let mut out = Vec::with_capacity(ids.len());
        for ((id, placement), fields) in ids.iter().zip(hashes) {
            if !fields.is_empty() {
                out.push(codec::job_from_hash(queue, id, &fields, *placement)?);
            }
        }
        Ok(out)
    }

    /// Where a job is, and when it comes due if delayed; `None` if the job does not exist.
    pub(super) async fn locate(&self, queue: &str, id: &str) -> Result<Option<Job>> {
        let keys = self.keys(queue);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(keys.job_key(id))
            .cmd("ZSCORE")
            .arg(keys.completed())
            .arg(id)
            .cmd("ZSCORE")
            .arg(keys.failed())
            .arg(id)
            .cmd("ZSCORE")
            .arg(keys.delayed())
            .arg(id)
            .cmd("LPOS")
            .arg(keys.active())
            .arg(id)
            .cmd("HEXISTS")
            .arg(keys.meta())
            .arg("paused");
        type Reply = (
            HashMap<String, String>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<i64>,
            bool,
        );
        let (fields, completed, failed, delayed, active, paused): Reply = self.query(&pipe).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let placement = if completed.is_some() {
            Placement {
                state: JobState::Completed,
                due_ms: None,
            }
        } else if failed.is_some() {
            Placement {
                state: JobState::Failed,
                due_ms: None,
            }
        } else if let Some(score) = delayed {
            Placement {
                state: JobState::Delayed,
                due_ms: Some((score / 4096.0).floor() as i64),
            }
        } else if active.is_some() {
            Placement {
                state: JobState::Active,
                due_ms: None,
            }
        } else {
            Placement {
                state: if paused {
                    JobState::Paused
                } else {
                    JobState::Waiting
                },
                due_ms: None,
            }
        };
        codec::job_from_hash(queue, id, &fields, placement).map(Some)
    }

    /// Ready jobs' ids in run order: the wait list from its consuming end, then the prioritized
    /// set by priority, from `offset`, at most `limit`.
    pub(super) async fn ready_ids(
        &self,
        k: &QueueKeys,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<String>> {
        let mut c = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("LLEN").arg(k.wait()).cmd("LLEN").arg(k.paused());
        let (wait_len, legacy_len): (u64, u64) = self.query(&pipe).await?;
        let mut ids = Vec::new();
        let mut offset = offset;
        let mut limit = limit;
        for (key, len) in [(k.wait(), wait_len), (k.paused(), legacy_len)] {
            if limit == 0 {
                break;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            // Run order is from the list's tail: run position p is list index len-1-p.
            let last = (offset + limit).min(len) - 1;
            let from = (len - 1 - last) as isize;
            let to = (len - 1 - offset) as isize;
            let mut part: Vec<String> = self
                .io(redis::cmd("LRANGE")
                    .arg(key)
                    .arg(from)
                    .arg(to)
                    .query_async(&mut c))
                .await?;
            part.reverse();
            limit -= part.len() as u64;
            offset = 0;
            ids.extend(part.into_iter().filter(|id| !id.starts_with("0:")));
        }
        if limit > 0 {
            let part: Vec<String> = self
                .io(redis::cmd("ZRANGE")
                    .arg(k.prioritized())
                    .arg(offset as isize)
                    .arg((offset + limit - 1) as isize)
                    .query_async(&mut c))
                .await?;
            ids.extend(part);
        }
        Ok(ids)
    }

    pub(super) async fn list_jobs(
        &self,
        queue: &str,
        state: JobState,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<Job>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys(queue);
        let (start, stop) = (offset as isize, (offset + limit - 1) as isize);
        let mut c = self.redis.clone();
        let at = |state| Placement {
            state,
            due_ms: None,
        };
        let ids: Vec<(String, Placement)> = match state {
            JobState::Completed | JobState::Failed => {
                let key = if state == JobState::Completed {
                    k.completed()
                } else {
                    k.failed()
                };
                let ids: Vec<String> = self
                    .io(redis::cmd("ZREVRANGE")
                        .arg(key)
                        .arg(start)
                        .arg(stop)
                        .query_async(&mut c))
                    .await?;
                ids.into_iter().map(|id| (id, at(state))).collect()
            }
            JobState::Delayed => {
                let ids: Vec<(String, f64)> = self
                    .io(redis::cmd("ZRANGE")
                        .arg(k.delayed())
                        .arg(start)
                        .arg(stop)
                        .arg("WITHSCORES")
                        .query_async(&mut c))
                    .await?;
                ids.into_iter()
                    .map(|(id, score)| {
                        let due = Some((score / 4096.0).floor() as i64);
                        (id, Placement { state, due_ms: due })
                    })
                    .collect()
            }
            JobState::Active => {
                let ids: Vec<String> = self
                    .io(redis::cmd("LRANGE")
                        .arg(k.active())
                        .arg(start)
                        .arg(stop)
                        .query_async(&mut c))
                    .await?;
                ids.into_iter()
                    .filter(|id| !id.starts_with("0:"))
                    .map(|id| (id, at(state)))
                    .collect()
            }
            JobState::Waiting | JobState::Paused => {
                let paused = self.is_paused(queue).await?;
                if paused != (state == JobState::Paused) {
                    return Ok(Vec::new());
                }
                self.ready_ids(&k, offset, limit)
                    .await?
                    .into_iter()
                    .map(|id| (id, at(state)))
                    .collect()
            }
        };
        self.read_many(queue, &ids).await
    }

    pub(super) async fn count_jobs(&self, queue: &str) -> Result<QueueCounts> {
        let k = self.keys(queue);
        let mut pipe = redis::pipe();
        pipe.cmd("LLEN")
            .arg(k.wait())
            .cmd("LLEN")
            .arg(k.paused())
            .cmd("ZCARD")
            .arg(k.prioritized())
            .cmd("LLEN")
            .arg(k.active())
            .cmd("ZCARD")
            .arg(k.delayed())
            .cmd("ZCARD")
            .arg(k.completed())
            .cmd("ZCARD")
            .arg(k.failed())
            .cmd("HEXISTS")
            .arg(k.meta())
            .arg("paused")
            .cmd("HGET")
            .arg(k.get("metrics:completed"))
            .arg("count")
            .cmd("HGET")
            .arg(k.get("metrics:failed"))
            .arg("count");
        type Reply = (
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
            bool,
            Option<u64>,
            Option<u64>,
        );
        let (wait, legacy_paused, prioritized, active, delayed, completed, failed, paused, ct, ft): Reply =
            self.query(&pipe).await?;
        let ready = wait + legacy_paused + prioritized;
        Ok(QueueCounts {
            waiting: if paused { 0 } else { ready },
            paused: if paused { ready } else { 0 },
            active,
            delayed,
            completed,
            failed,
            completed_total: ct.unwrap_or(0).max(completed),
            failed_total: ft.unwrap_or(0).max(failed),
        })
    }
}
