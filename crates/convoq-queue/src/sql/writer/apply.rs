//! Applying a batch's operations inside its transaction: completions together (grouped, or
//! carefully one by one), adds together, then each operation, then the fetch-next claims.

use super::commit::{Abort, Mode};
use super::ops::{Batch, Op};
use crate::effect::{apply_group_guarded, apply_guarded, TxEffect};
use crate::engine::{ClaimedJob, Completion, Outcome};
use crate::error::{QueueError, Result};
use crate::job::Added;
use crate::sql::dialect::Dialect;
use crate::sql::rules::{self, ToAdd};

/// A successful attempt, and whether it carries nothing to commit but itself.
fn completion(op: &Op) -> Option<(&ClaimedJob, &Completion)> {
    match op {
        Op::Finish {
            job,
            outcome: Outcome::Completed(c),
            ..
        }
        | Op::FinishAndClaim {
            job,
            outcome: Outcome::Completed(c),
            ..
        } => Some((job, c)),
        _ => None,
    }
}

fn is_plain(c: &Completion) -> bool {
    c.effect.is_none() && c.follow_ups.is_empty()
}

/// Applies the batch's completions together (see [`Mode`]). Returns each one's answer by the
/// index of its operation.
async fn complete_together<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &[Op],
    now: i64,
    mode: Mode,
    batch: &mut Batch,
) -> std::result::Result<Vec<Option<Result<()>>>, Abort<D::Error>> {
    let together: Vec<(usize, (&ClaimedJob, &Completion))> = ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| completion(op).map(|p| (i, p)))
        .filter(|(_, (_, c))| mode == Mode::Grouped || is_plain(c))
        .collect();
    let mut answers: Vec<Option<Result<()>>> = Vec::new();
    answers.resize_with(ops.len(), || None);
    if together.is_empty() {
        return Ok(answers);
    }
    let jobs: Vec<_> = together.iter().map(|(_, p)| *p).collect();
    let results = complete_jobs(d, conn, &jobs, now, mode, batch).await?;
    for ((i, _), r) in together.iter().zip(results) {
        answers[*i] = Some(r);
    }
    Ok(answers)
}

/// Completes `jobs` with their completions in as few statements as the dialect can (one
/// fenced update; effects of one kind in one call; every follow-up job in one add), answering
/// each. In [`Mode::Grouped`], any effect failure, lost lease or refused follow-up aborts the
/// batch with [`Abort::Careful`]; in [`Mode::Careful`] only plain completions come here.
async fn complete_jobs<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    jobs: &[(&ClaimedJob, &Completion)],
    now: i64,
    mode: Mode,
    batch: &mut Batch,
) -> std::result::Result<Vec<Result<()>>, Abort<D::Error>> {
    let exact = mode == Mode::Careful;
    let Some(results) = d.complete_plain(conn, jobs, now, exact, batch).await? else {
        return Err(Abort::Careful);
    };
    let mut follow_ups = Vec::new();
    // Whose follow-up each is, where a worker waits for it.
    let mut waiting = Vec::new();
    let mut effects: Vec<&dyn TxEffect> = Vec::new();
    for ((_, c), r) in jobs.iter().zip(&results) {
        if r.is_ok() {
            effects.extend(c.effect.as_deref());
            let claims = c.follow_up_claims.as_ref();
            for (k, job) in c.follow_ups.iter().enumerate() {
                let claim = claims.and_then(|f| f.leases.get(k)?.as_ref());
                follow_ups.push(ToAdd {
                    job,
                    claim,
                    minted: None,
                });
                waiting.push(claims);
            }
        }
    }
    // Effects of one group in one call, the others one by one.
    let mut groups: Vec<(&'static str, Vec<&dyn TxEffect>)> = Vec::new();
    for effect in effects {
        let Some(name) = effect.group() else {
            if apply_guarded(effect, d.effect_conn(conn)?, now)
                .await
                .is_err()
            {
                return Err(Abort::Careful);
            }
            continue;
        };
        match groups.iter_mut().find(|(g, _)| *g == name) {
            Some((_, members)) => members.push(effect),
            None => groups.push((name, vec![effect])),
        }
    }
    for (_, members) in groups {
        if apply_group_guarded(&members, d.effect_conn(conn)?, now)
            .await
            .is_err()
        {
            return Err(Abort::Careful);
        }
    }
    if !follow_ups.is_empty() {
        let Ok(added) = d.add_jobs(conn, &follow_ups, now, batch).await? else {
            return Err(Abort::Careful);
        };
        for ((added, add), sink) in added.iter().zip(&follow_ups).zip(waiting) {
            if let (Some(sink), Some(job)) = (sink, add.claim.and_then(|c| c.held(added))) {
                batch.handed.push((sink.clone(), job));
            }
        }
    }
    Ok(results)
}

/// Applies the batch's adds together: in [`Mode::Grouped`], every job of every add in one
/// [`Dialect::add_jobs`], each add answered with its own jobs; if that refuses (an inner error
/// cannot be pinned on one add), the batch is applied again carefully, where each add goes
/// alone. Returns each add's answer by the index of its operation.
async fn add_together<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &[Op],
    now: i64,
    mode: Mode,
    batch: &mut Batch,
) -> std::result::Result<Vec<Option<Result<Vec<Added>>>>, Abort<D::Error>> {
    let mut answers: Vec<Option<Result<Vec<Added>>>> = Vec::new();
    answers.resize_with(ops.len(), || None);
    let mut adds: Vec<(usize, Vec<ToAdd>)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::Add {
            jobs,
            ids,
            claim,
            reply,
            ..
        } = op
        else {
            continue;
        };
        if reply.is_closed() {
            // Its caller gave up while the batch waited for the database (a lock held by
            // another process): not added, so that its "unavailable" answer stays true.
            answers[i] = Some(Err(QueueError::Unavailable(
                "the write deadline passed before the job could be added".into(),
            )));
            continue;
        }
        let claim = claim.as_ref();
        adds.push((
            i,
            jobs.iter()
                .zip(ids)
                .map(|(job, id)| ToAdd {
                    job,
                    claim,
                    minted: id.as_deref(),
                })
                .collect(),
        ));
    }
    if mode == Mode::Careful || adds.len() < 2 {
        for (i, jobs) in adds {
            answers[i] = Some(d.add_jobs(conn, &jobs, now, batch).await?);
        }
    } else {
        let all: Vec<ToAdd> = adds
            .iter()
            .flat_map(|(_, jobs)| jobs.iter().copied())
            .collect();
        let Ok(added) = d.add_jobs(conn, &all, now, batch).await? else {
            return Err(Abort::Careful);
        };
        let mut added = added.into_iter();
        for (i, jobs) in adds {
            answers[i] = Some(Ok(added.by_ref().take(jobs.len()).collect()));
        }
    }
    if mode == Mode::Grouped {
        complete_added(d, conn, ops, &mut answers, now, batch).await?;
    }
    Ok(answers)
}

/// Commits, with the adds that stored their jobs claimed, the completions run before those
/// jobs were stored (`Op::Add`'s `complete`), and shows each such job completed in its add's
/// answer. Only in [`Mode::Grouped`]: applied carefully, the jobs stay claimed and their
/// workers run them, so that a failing effect is recorded by the usual rules.
async fn complete_added<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &[Op],
    answers: &mut [Option<Result<Vec<Added>>>],
    now: i64,
    batch: &mut Batch,
) -> std::result::Result<(), Abort<D::Error>> {
    let mut held: Vec<(usize, ClaimedJob, &Completion)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::Add {
            claim: Some(claim),
            complete: Some(c),
            ..
        } = op
        else {
            continue;
        };
        if let Some(Ok(added)) = &answers[i] {
            if let [added] = added.as_slice() {
                held.extend(claim.held(added).map(|job| (i, job, c)));
            }
        }
    }
    if held.is_empty() {
        return Ok(());
    }
    let jobs: Vec<_> = held.iter().map(|(_, job, c)| (job, *c)).collect();
    let results = complete_jobs(d, conn, &jobs, now, Mode::Grouped, batch).await?;
    for ((i, _, c), r) in held.iter().zip(results) {
        if r.is_err() {
            // Grouped completions abort rather than fail one by one; kept claimed all the same.
            continue;
        }
        if let Some(Ok(added)) = &mut answers[*i] {
            for a in added.iter_mut() {
                rules::completed_by_its_add(&mut a.job, &c.result, now);
            }
        }
    }
    Ok(())
}

/// Applies `ops` inside the batch's open transaction, holding each one's answer in its slot
/// until the batch commits.
pub(super) async fn apply_ops<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &mut [Op],
    now: i64,
    mode: Mode,
) -> std::result::Result<Batch, Abort<D::Error>> {
    let mut batch = Batch::default();
    // Completions go first, together. Operations of one batch come from concurrent callers, so
    // their order among themselves is no one's promise.
    // Then adds, together too, so that this batch's claims can take what they added.
    let mut together = complete_together(d, conn, ops, now, mode, &mut batch).await?;
    let mut added = add_together(d, conn, ops, now, mode, &mut batch).await?;
    for (i, op) in ops.iter_mut().enumerate() {
        let b = &mut batch;
        if let Some(r) = together[i].take() {
            match op {
                Op::FinishAndClaim { reply, .. } => reply.set(r.map(|()| None)),
                Op::Finish { reply, .. } => reply.set(r),
                _ => unreachable!("only finishes are completed together"),
            }
            continue;
        }
        match op {
            Op::Add { reply, .. } => reply.set(added[i].take().unwrap_or_else(|| {
                Err(QueueError::Corrupt(
                    "an add was left out of its batch".into(),
                ))
            })),
            Op::Claim {
                queue,
                max,
                lease_ms,
                token,
                reply,
            } => reply.set(d.claim(conn, queue, *max, *lease_ms, token, now, b).await?),
            Op::Finish {
                job,
                outcome,
                reply,
            } => reply.set(d.finish(conn, job, outcome, now, b).await?),
            Op::FinishAndClaim {
                job,
                outcome,
                reply,
                ..
            } => reply.set(d.finish(conn, job, outcome, now, b).await?.map(|()| None)),
            Op::Run(op) => d.run(conn, op.as_mut(), now, b).await?,
            Op::Close(_) => unreachable!("close is taken out of the batch before it is applied"),
        }
    }
    fetch_next(d, conn, ops, now, &mut batch).await?;
    Ok(batch)
}

/// Claims the next jobs for the batch's fetch-next finishes that were recorded: one claim per
/// queue and lease for all of them, its jobs handed out one each in the order of the
/// operations (a finish whose queue has no more ready jobs gets none). A claim's own error
/// leaves its finishes answered without a job: their ends are recorded all the same.
async fn fetch_next<D: Dialect>(
    d: &D,
    conn: &mut D::Conn,
    ops: &mut [Op],
    now: i64,
    batch: &mut Batch,
) -> std::result::Result<(), Abort<D::Error>> {
    /// A queue and lease, the token of the group's first finish, and the finishes asking.
    struct Group {
        queue: String,
        lease_ms: i64,
        token: String,
        members: Vec<usize>,
    }
    let mut groups: Vec<Group> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::FinishAndClaim {
            job,
            lease_ms,
            token,
            reply,
            ..
        } = op
        else {
            continue;
        };
        if !matches!(reply.answer(), Some(Ok(None))) {
            continue;
        }
        let queue = job.job.queue.as_str();
        match groups
            .iter_mut()
            .find(|g| g.queue == queue && g.lease_ms == *lease_ms)
        {
            Some(g) => g.members.push(i),
            None => groups.push(Group {
                queue: queue.to_owned(),
                lease_ms: *lease_ms,
                token: token.clone(),
                members: vec![i],
            }),
        }
    }
    for g in groups {
        let claimed = d
            .claim(
                conn,
                &g.queue,
                g.members.len(),
                g.lease_ms,
                &g.token,
                now,
                batch,
            )
            .await?;
        let Ok(claimed) = claimed else {
            continue;
        };
        for (i, next) in g.members.into_iter().zip(claimed.jobs) {
            if let Op::FinishAndClaim { reply, .. } = &mut ops[i] {
                reply.set(Ok(Some(next)));
            }
        }
    }
    Ok(())
}
