//! Scenarios.

use super::*;

pub(super) async fn add_single(args: &Args, durability: Durability) -> Row {
    let (engine, queues, _fresh) = open(args, durability).await;
    let (n, cap) = (args.add_single, args.cap);
    let meter = Meter::start(&engine);
    let mut done = 0u64;
    for i in 0..n {
        queues.add(new_job(i)).await.expect("add");
        done += 1;
        if meter.t0.elapsed() >= cap {
            break;
        }
    }
    let note = capped_note(done, n, cap);
    let row = meter.finish(&engine, "1. add, single".into(), durability, done, note);
    engine.close().await;
    row
}

pub(super) async fn add_concurrent(args: &Args, durability: Durability) -> Row {
    let (engine, queues, _fresh) = open(args, durability).await;
    let (n, tasks, cap) = (args.add_concurrent, args.tasks, args.cap);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let meter = Meter::start(&engine);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (queues, stop, count) = (queues.clone(), stop.clone(), count.clone());
            let share = n / tasks + usize::from(t < n % tasks);
            tokio::spawn(async move {
                for i in 0..share {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    queues.add(new_job(t * n + i)).await.expect("add");
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let watchdog = tokio::spawn({
        let (stop, at) = (stop.clone(), meter.t0 + cap);
        async move {
            tokio::time::sleep_until(at.into()).await;
            stop.store(true, Ordering::Relaxed);
        }
    });
    for h in handles {
        h.await.expect("adding task");
    }
    watchdog.abort();
    let done = count.load(Ordering::Relaxed);
    let scenario = format!("2. add, concurrent ({tasks} tasks)");
    let note = capped_note(done, n, cap);
    let row = meter.finish(&engine, scenario, durability, done, note);
    engine.close().await;
    row
}

pub(super) async fn add_bulk(args: &Args, durability: Durability) -> Row {
    let (engine, queues, _fresh) = open(args, durability).await;
    let (n, chunk, cap) = (args.bulk, args.chunk, args.cap);
    let meter = Meter::start(&engine);
    let mut i = 0;
    while i < n && meter.t0.elapsed() < cap {
        let m = chunk.min(n - i);
        // Building the chunk is part of the caller's cost, as in real use.
        queues
            .add_bulk((i..i + m).map(new_job).collect())
            .await
            .expect("add_bulk");
        i += m;
    }
    let scenario = format!("3. add, bulk (chunks of {chunk})");
    let note = capped_note(i as u64, n, cap);
    let row = meter.finish(&engine, scenario, durability, i as u64, note);
    engine.close().await;
    row
}

/// Does nothing but count its attempts, so that the timing loop can wait for them without
/// querying the database meanwhile.
pub(super) struct Noop(Arc<std::sync::atomic::AtomicU64>);

#[async_trait]
impl Processor for Noop {
    async fn process(&self, _job: &Job) -> Result<Completion, ProcessError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Completion::default())
    }
}

pub(super) struct Hold(pub(super) Duration);

#[async_trait]
impl Processor for Hold {
    async fn process(&self, _job: &Job) -> Result<Completion, ProcessError> {
        tokio::time::sleep(self.0).await;
        Ok(Completion::default())
    }
}

pub(super) async fn claim_complete(args: &Args, durability: Durability, concurrency: usize) -> Row {
    let (engine, queues, _fresh) = open(args, durability).await;
    let (n, cap, poll) = (args.jobs(), args.cap, args.poll);
    let t = Instant::now();
    preload(&queues, n, args.chunk).await;
    eprintln!(
        "  (pre-added {n} jobs in {:.2} s)",
        t.elapsed().as_secs_f64()
    );
    let meter = Meter::start(&engine);
    let processed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pool = queues
        .workers()
        .processor(JOB_NAME, Arc::new(Noop(processed.clone())))
        .queue(
            QUEUE,
            WorkerOptions {
                concurrency,
                batch: args.claim_batch(),
                ..WorkerOptions::default()
            },
        )
        .start();
    // Wait on the processor's counter (no database reads competing with the workers), then
    // poll counts() until every completion has committed.
    while processed.load(std::sync::atomic::Ordering::Relaxed) < n as u64
        && meter.t0.elapsed() < cap
    {
        tokio::time::sleep(poll).await;
    }
    let (mut polls, mut in_counts) = (0u32, Duration::ZERO);
    let done = loop {
        let c0 = Instant::now();
        let counts = queues.counts(QUEUE).await.expect("counts");
        in_counts += c0.elapsed();
        polls += 1;
        if counts.completed_total >= n as u64 || meter.t0.elapsed() >= cap {
            break counts.completed_total;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let mut note = capped_note(done, n, cap);
    if !note.is_empty() {
        note.push_str("; ");
    }
    note.push_str(&format!(
        "{polls} counts() at the end, {:.1} ms avg",
        in_counts.as_secs_f64() * 1e3 / f64::from(polls.max(1))
    ));
    let scenario = format!("4. claim+complete, concurrency {concurrency}");
    let row = meter.finish(&engine, scenario, durability, done, note);
    pool.shutdown(Duration::from_secs(5)).await;
    engine.close().await;
    row
}
