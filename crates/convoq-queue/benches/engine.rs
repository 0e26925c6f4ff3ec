//! Throughput and memory benchmark of the SQL queue engine, on SQLite or on Postgres.
//!
//! ```sh
//! cargo bench -p convoq-queue --bench engine                 # every scenario, default sizes
//! cargo bench -p convoq-queue --bench engine -- --jobs 20000 # smaller claim-and-complete runs
//! cargo bench -p convoq-queue --bench engine -- --postgres postgres://root@127.0.0.1:5432/postgres
//! cargo bench -p convoq-queue --bench engine -- --help
//! ```
//!
//! Scenarios, each on a fresh database (SQLite: in a fresh temporary directory; Postgres: a
//! `cq_test_<uuid>` database created on the server of `--postgres` and dropped afterwards):
//! 1. `add, single`: one task adding jobs one at a time with `Queues::add`.
//! 2. `add, concurrent`: 32 tasks adding one at a time (the writer's group commit).
//! 3. `add, bulk`: `Queues::add_bulk` in chunks of 1,000.
//! 4. `claim+complete`: a worker pool with a no-op processor over 50,000 pre-added jobs,
//!    concurrency 1 and 32 with claims of up to 64 (Postgres: 100,000 jobs, concurrency 256 and
//!    2,048, claims of up to 128), timed from pool start until `completed_total` reaches N (the
//!    processor's own counter is watched every 20 ms, then counts are polled every 2 ms until
//!    every completion has committed, so that counting does not compete with the workers).
//!    On Postgres a commit costs about the same whatever it carries, so the jobs in
//!    flight set the batch and the rate: 2,048 is what it takes to pass 20,000 jobs/s there.
//! 5. `RSS`: the bench re-executes itself as a child process that opens the engine on a
//!    database holding 100,000 waiting jobs, starts a pool (concurrency 128, the service's default
//!    per queue on SQLite) whose processor holds each job for 60 s, waits 3 s and reports
//!    `VmRSS`/`VmHWM` from `/proc/self/status`.
//!    SQLite only.
//!
//! Every timed scenario stops at a time cap (`--cap`, 20 s by default) so that the whole run is
//! bounded; a capped row says how many of its jobs it got through. Besides jobs/s each row
//! shows the writer's group-commit factor (operations per commit), the CPU the process used
//! (in cores), the busy share of the busiest `convoq-writer` thread (the SQLite writer's own
//! thread, which runs its task and every statement on its connection; SQLite only) and context
//! switches per job, to tell what bounds the figure. The tokio share counts the runtime's
//! worker and blocking threads alike (tokio names both `tokio-runtime-worker`), so on SQLite
//! it includes the reads, which run on blocking threads. On Postgres, the server's CPU is not in the row: it runs in its own processes.
//!
//! The bench runs on mimalloc, the allocator of the `convoq` binary.
//!
//! Progress goes to stderr; the Markdown report to stdout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use convoq_queue::sql::{Durability, SqlConfig, SqlEngine};
use convoq_queue::testkit::postgres::Databases;
use convoq_queue::{
    Completion, Engine, Job, NewJob, ProcessError, Processor, Queues, WorkerOptions,
};

/// The allocator of the `convoq` binary, so that the figures are those of the engine as it runs
/// there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const QUEUE: &str = "bench";
const JOB_NAME: &str = "noop";
/// Jobs the pool of scenario 5 holds: the service's default per queue where the queue and the
/// store are one SQLite file.
const RSS_CONCURRENCY: usize = 128;
/// Environment variable that turns the bench binary into the RSS child (its value: the DB path).
const CHILD_ENV: &str = "CONVOQ_BENCH_RSS_CHILD";
/// `/proc/<pid>/task/<tid>/stat` times are in USER_HZ, which Linux fixes at 100.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone)]
struct Args {
    add_single: usize,
    add_concurrent: usize,
    tasks: usize,
    bulk: usize,
    chunk: usize,
    /// Pre-added jobs of scenario 4 (default: see [`Args::jobs`]).
    jobs: Option<usize>,
    rss_jobs: usize,
    poll: Duration,
    cap: Duration,
    full: bool,
    rss: bool,
    only: Option<Vec<String>>,
    /// Postgres: the server (admin URL) on which each scenario gets a fresh database.
    postgres: Option<String>,
    /// Worker concurrencies of scenario 4.
    concurrency: Option<Vec<usize>>,
    /// The most jobs one claim takes in scenario 4.
    batch: Option<usize>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            add_single: 5_000,
            add_concurrent: 50_000,
            tasks: 32,
            bulk: 100_000,
            chunk: 1_000,
            jobs: None,
            rss_jobs: 100_000,
            poll: Duration::from_millis(20),
            cap: Duration::from_secs(20),
            full: true,
            rss: true,
            only: None,
            postgres: None,
            concurrency: None,
            batch: None,
        }
    }
}

const HELP: &str = "\
options (after `cargo bench -p convoq-queue --bench engine --`):
  --add-single N      jobs of scenario 1 (default 5000)
  --add-concurrent N  jobs of scenario 2 (default 50000)
  --tasks N           adding tasks of scenario 2 (default 32)
  --bulk N            jobs of scenario 3 (default 100000)
  --chunk N           add_bulk chunk size (default 1000)
  --jobs N            pre-added jobs of scenario 4 (default 50000; Postgres 100000)
  --rss-jobs N        waiting jobs of scenario 5 (default 100000)
  --poll-ms N         processed-counter check interval of scenario 4 (default 20)
  --cap SECS          time cap of each timed scenario (default 20)
  --no-full           skip the Durability::Full comparison rows
  --no-rss            skip scenario 5
  --only a,b          run only these scenarios (single, concurrent, bulk, claim, rss)
  --concurrency a,b   worker concurrencies of scenario 4 (default 1,32; Postgres 256,2048)
  --batch N           the most jobs one claim takes in scenario 4 (default 64; Postgres 128)
  --postgres URL      run on Postgres: each scenario on a fresh database created on this
                      server (URL of a database to connect to for that), dropped afterwards;
                      no durability rows and no scenario 5 (both SQLite's)";

fn parse_args() -> Args {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, flag: &str| -> usize {
        v.and_then(|s| s.replace('_', "").parse().ok())
            .unwrap_or_else(|| panic!("{flag} takes a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            // cargo bench passes `--bench` to harness = false targets.
            "--bench" => {}
            "--add-single" => a.add_single = num(it.next(), &arg),
            "--add-concurrent" => a.add_concurrent = num(it.next(), &arg),
            "--tasks" => a.tasks = num(it.next(), &arg).max(1),
            "--bulk" => a.bulk = num(it.next(), &arg),
            "--chunk" => a.chunk = num(it.next(), &arg).max(1),
            "--jobs" => a.jobs = Some(num(it.next(), &arg)),
            "--rss-jobs" => a.rss_jobs = num(it.next(), &arg),
            "--poll-ms" => a.poll = Duration::from_millis(num(it.next(), &arg).max(1) as u64),
            "--cap" => a.cap = Duration::from_secs(num(it.next(), &arg).max(1) as u64),
            "--no-full" => a.full = false,
            "--no-rss" => a.rss = false,
            "--only" => {
                let v = it.next().expect("--only takes a list");
                a.only = Some(v.split(',').map(|s| s.trim().to_owned()).collect());
            }
            "--concurrency" => {
                let v = it.next().expect("--concurrency takes a list");
                a.concurrency = Some(
                    v.split(',')
                        .map(|c| num(Some(c.trim().to_owned()), &arg).max(1))
                        .collect(),
                );
            }
            "--batch" => a.batch = Some(num(it.next(), &arg).max(1)),
            "--postgres" => a.postgres = Some(it.next().expect("--postgres takes a URL")),
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other:?}\n{HELP}");
                std::process::exit(2);
            }
        }
    }
    if a.postgres.is_some() {
        a.full = false;
        a.rss = false;
    }
    a
}

impl Args {
    fn engine_name(&self) -> &'static str {
        if self.postgres.is_some() {
            "Postgres"
        } else {
            "SQLite"
        }
    }

    fn concurrencies(&self) -> Vec<usize> {
        match (&self.concurrency, &self.postgres) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => vec![256, 2048],
            (None, None) => vec![1, 32],
        }
    }

    fn jobs(&self) -> usize {
        match (self.jobs, &self.postgres) {
            (Some(n), _) => n,
            (None, Some(_)) => 100_000,
            (None, None) => 50_000,
        }
    }

    fn claim_batch(&self) -> usize {
        match (self.batch, &self.postgres) {
            (Some(b), _) => b,
            (None, Some(_)) => 128,
            (None, None) => 64,
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == scenario))
    }
}

fn new_job(i: usize) -> NewJob {
    NewJob::new(
        QUEUE,
        JOB_NAME,
        serde_json::json!({ "conversation_id": i, "user_id": "user-1", "text": "hello there" }),
    )
}

fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Normal => "normal",
        Durability::Full => "full",
        Durability::Off => "off",
    }
}

/// A scenario's fresh database, removed when dropped.
enum Fresh {
    Dir(tempfile::TempDir),
    Postgres(#[allow(dead_code)] Databases),
}

/// Opens the engine on a fresh database: a file in a new temporary directory, or a new
/// database on the `--postgres` server.
async fn open(args: &Args, durability: Durability) -> (Arc<SqlEngine>, Queues, Fresh) {
    let (url, fresh) = match &args.postgres {
        Some(admin) => {
            let dbs = Databases::new(admin.clone());
            (dbs.create().await, Fresh::Postgres(dbs))
        }
        None => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("queue.db").display());
            (url, Fresh::Dir(dir))
        }
    };
    let (engine, queues) = connect(url, durability).await;
    (engine, queues, fresh)
}

async fn connect(url: String, durability: Durability) -> (Arc<SqlEngine>, Queues) {
    let mut config = SqlConfig::new(url);
    config.durability = durability;
    let engine = SqlEngine::connect(config).await.expect("open the engine");
    let queues = Queues::new(engine.clone());
    (engine, queues)
}

async fn preload(queues: &Queues, n: usize, chunk: usize) {
    let mut i = 0;
    while i < n {
        let m = chunk.min(n - i);
        queues
            .add_bulk((i..i + m).map(new_job).collect())
            .await
            .expect("pre-add jobs");
        i += m;
    }
}

// ---------------------------------------------------------------------------------------------
// Per-thread CPU and context switches, from /proc/self/task.

/// The name of the SQLite writer's thread (`std::thread::Builder::name` in the engine's
/// `sql/writer/`), where the writer runs its task and every statement on its connection.
/// Short enough (under 16 bytes) for the kernel's `comm` to hold it whole.
const WRITER_THREAD: &str = "convoq-writer";

#[derive(Debug, Clone, Default)]
struct ThreadSample {
    comm: String,
    ticks: u64,
    ctx_switches: u64,
}

/// Busy ticks of the whole machine (every process, the database server's included), from the
/// first line of `/proc/stat`: user, nice, system, irq and softirq.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum()
}

fn sample_threads() -> HashMap<u64, ThreadSample> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let path = entry.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        // Fields after the command: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field =
            |n: usize| -> u64 { fields.get(n - 3).and_then(|s| s.parse().ok()).unwrap_or(0) };
        let ticks = field(14) + field(15);
        let ctx_switches = std::fs::read_to_string(path.join("status"))
            .map(|s| {
                s.lines()
                    .filter(|l| {
                        l.starts_with("voluntary_ctxt_switches")
                            || l.starts_with("nonvoluntary_ctxt_switches")
                    })
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        out.insert(
            tid,
            ThreadSample {
                comm,
                ticks,
                ctx_switches,
            },
        );
    }
    out
}

#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    /// CPU of the whole process, in cores.
    cores: f64,
    /// Busy share of the busiest SQLite writer thread ([`WRITER_THREAD`]).
    writer_thread: f64,
    /// CPU of the tokio runtime's threads (workers and blocking threads), in cores.
    tokio_cores: f64,
    /// Context switches of all threads.
    ctx_switches: u64,
    /// CPU of the whole machine, in cores.
    machine_cores: f64,
}

/// CPU use between two samples of the threads (`before`, `after`) and of the machine's busy
/// ticks (`machine`: before, after), `secs` apart.
fn cpu_between(
    before: &HashMap<u64, ThreadSample>,
    after: &HashMap<u64, ThreadSample>,
    machine: (u64, u64),
    secs: f64,
) -> CpuUse {
    let mut total = 0u64;
    let mut tokio = 0u64;
    let mut sqlite_max = 0u64;
    let mut ctx = 0u64;
    for (tid, a) in after {
        let b = before.get(tid).filter(|b| b.comm == a.comm);
        let ticks = a.ticks - b.map_or(0, |b| b.ticks.min(a.ticks));
        ctx += a.ctx_switches - b.map_or(0, |b| b.ctx_switches.min(a.ctx_switches));
        total += ticks;
        if a.comm.starts_with("tokio-r") {
            tokio += ticks;
        }
        if a.comm == WRITER_THREAD {
            sqlite_max = sqlite_max.max(ticks);
        }
    }
    let per = |t: u64| t as f64 / TICKS_PER_SEC / secs.max(1e-9);
    CpuUse {
        cores: per(total),
        writer_thread: per(sqlite_max),
        tokio_cores: per(tokio),
        ctx_switches: ctx,
        machine_cores: per(machine.1.saturating_sub(machine.0)),
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Debug, Clone)]
struct Row {
    scenario: String,
    durability: Durability,
    done: u64,
    secs: f64,
    ops_per_commit: f64,
    cpu: CpuUse,
    note: String,
}

impl Row {
    fn per_sec(&self) -> f64 {
        self.done as f64 / self.secs.max(1e-9)
    }
}

/// The writer's and the threads' counters at the start of a timed section.
struct Meter {
    stats: convoq_queue::sql::WriteStats,
    threads: HashMap<u64, ThreadSample>,
    machine: u64,
    t0: Instant,
}

impl Meter {
    fn start(engine: &SqlEngine) -> Meter {
        let stats = engine.write_stats();
        let threads = sample_threads();
        Meter {
            stats,
            threads,
            machine: machine_busy_ticks(),
            t0: Instant::now(),
        }
    }

    /// Ends the timed section: `done` jobs went through.
    fn finish(
        self,
        engine: &SqlEngine,
        scenario: String,
        durability: Durability,
        done: u64,
        note: String,
    ) -> Row {
        let secs = self.t0.elapsed().as_secs_f64();
        let threads = sample_threads();
        let machine = machine_busy_ticks();
        let stats = engine.write_stats();
        let commits = stats.commits - self.stats.commits;
        let ops = stats.operations - self.stats.operations;
        let row = Row {
            scenario,
            durability,
            done,
            secs,
            ops_per_commit: ops as f64 / commits.max(1) as f64,
            cpu: cpu_between(&self.threads, &threads, (self.machine, machine), secs),
            note,
        };
        eprintln!(
            "  {} [{}]: {} jobs in {:.2} s = {:.0} jobs/s, {:.1} ops/commit ({commits} commits), \
             {:.2} cores (tokio {:.2}), writer thread {:.0} %, {:.1} ctx sw/job",
            row.scenario,
            durability_name(durability),
            row.done,
            row.secs,
            row.per_sec(),
            row.ops_per_commit,
            row.cpu.cores,
            row.cpu.tokio_cores,
            row.cpu.writer_thread * 100.0,
            row.cpu.ctx_switches as f64 / row.done.max(1) as f64,
        );
        row
    }
}

fn capped_note(done: u64, planned: usize, cap: Duration) -> String {
    if (done as usize) < planned {
        format!("capped at {} s: {done} of {planned}", cap.as_secs())
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

async fn add_single(args: &Args, durability: Durability) -> Row {
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

async fn add_concurrent(args: &Args, durability: Durability) -> Row {
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

async fn add_bulk(args: &Args, durability: Durability) -> Row {
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
struct Noop(Arc<std::sync::atomic::AtomicU64>);

#[async_trait]
impl Processor for Noop {
    async fn process(&self, _job: &Job) -> Result<Completion, ProcessError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Completion::default())
    }
}

struct Hold(Duration);

#[async_trait]
impl Processor for Hold {
    async fn process(&self, _job: &Job) -> Result<Completion, ProcessError> {
        tokio::time::sleep(self.0).await;
        Ok(Completion::default())
    }
}

async fn claim_complete(args: &Args, durability: Durability, concurrency: usize) -> Row {
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

// ---------------------------------------------------------------------------------------------
// Scenario 5: resident memory of a worker process, measured in a child process.

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The child: opens the engine on `db`, reports memory before and after starting a holding pool,
/// then waits to be killed.
fn rss_child(db: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (_engine, queues) = connect(format!("sqlite://{db}"), Durability::Normal).await;
        println!(
            "OPEN VmRSS={} VmHWM={}",
            status_kib("VmRSS:"),
            status_kib("VmHWM:")
        );
        let pool = queues
            .workers()
            .processor(JOB_NAME, Arc::new(Hold(Duration::from_secs(60))))
            .queue(
                QUEUE,
                WorkerOptions {
                    concurrency: RSS_CONCURRENCY,
                    batch: 64,
                    ..WorkerOptions::default()
                },
            )
            .start();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss, hwm, in_flight) = (status_kib("VmRSS:"), status_kib("VmHWM:"), pool.in_flight());
        // One read of the whole queue (what a dashboard or the HTTP layer would do) fills a read
        // connection's page cache: reported separately.
        let counts = queues.counts(QUEUE).await.expect("counts");
        let (rss1, hwm1) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
        // Then as many at once as there are read connections, so that each fills its cache.
        let all = futures::future::join_all((0..4).map(|_| queues.counts(QUEUE))).await;
        for c in all {
            c.expect("counts");
        }
        println!(
            "POOL VmRSS={rss} VmHWM={hwm} in_flight={in_flight} waiting={} active={} \
             counted_VmRSS={rss1} counted_VmHWM={hwm1} counted4_VmRSS={} counted4_VmHWM={}",
            counts.waiting,
            counts.active,
            status_kib("VmRSS:"),
            status_kib("VmHWM:"),
        );
        // Held until the parent kills this process.
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

fn kv(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

struct RssReport {
    open_rss: u64,
    open_hwm: u64,
    rss: u64,
    hwm: u64,
    in_flight: u64,
    waiting: u64,
    active: u64,
    counted_rss: u64,
    counted_hwm: u64,
    counted4_rss: u64,
    counted4_hwm: u64,
}

async fn rss(args: &Args) -> RssReport {
    let (engine, queues, fresh) = open(args, Durability::Normal).await;
    let t = Instant::now();
    preload(&queues, args.rss_jobs, args.chunk).await;
    eprintln!(
        "  (pre-added {} jobs in {:.2} s)",
        args.rss_jobs,
        t.elapsed().as_secs_f64()
    );
    engine.close().await;
    let Fresh::Dir(dir) = &fresh else {
        panic!("scenario 5 runs on SQLite only");
    };
    let db = dir.path().join("queue.db");
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, &db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the RSS child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut report = RssReport {
        open_rss: 0,
        open_hwm: 0,
        rss: 0,
        hwm: 0,
        in_flight: 0,
        waiting: 0,
        active: 0,
        counted_rss: 0,
        counted_hwm: 0,
        counted4_rss: 0,
        counted4_hwm: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::task::block_in_place(|| rx.recv_timeout(left));
        let Ok(line) = line else {
            eprintln!("  RSS child did not report in time");
            break;
        };
        if line.starts_with("OPEN ") {
            report.open_rss = kv(&line, "VmRSS").unwrap_or(0);
            report.open_hwm = kv(&line, "VmHWM").unwrap_or(0);
        } else if line.starts_with("POOL ") {
            report.rss = kv(&line, "VmRSS").unwrap_or(0);
            report.hwm = kv(&line, "VmHWM").unwrap_or(0);
            report.in_flight = kv(&line, "in_flight").unwrap_or(0);
            report.waiting = kv(&line, "waiting").unwrap_or(0);
            report.active = kv(&line, "active").unwrap_or(0);
            report.counted_rss = kv(&line, "counted_VmRSS").unwrap_or(0);
            report.counted_hwm = kv(&line, "counted_VmHWM").unwrap_or(0);
            report.counted4_rss = kv(&line, "counted4_VmRSS").unwrap_or(0);
            report.counted4_hwm = kv(&line, "counted4_VmHWM").unwrap_or(0);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "  RSS: {:.1} MiB (HWM {:.1} MiB), after open {:.1} MiB, after one counts() {:.1} MiB, after 4 concurrent {:.1} MiB; \
         in flight {}, waiting {}, active {}",
        mib(report.rss),
        mib(report.hwm),
        mib(report.open_rss),
        mib(report.counted_rss),
        mib(report.counted4_rss),
        report.in_flight,
        report.waiting,
        report.active
    );
    report
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Report.

fn machine_line() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or_else(String::new, |k| {
            format!(", {:.1} GiB RAM", k as f64 / 1048576.0)
        });
    format!("nproc = {nproc}, CPU model \"{model}\"{mem}")
}

/// The commit the bench was built from, and whether the engine's sources differ from it.
fn build_line() -> String {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--", "src"]).is_some_and(|s| !s.is_empty());
            format!(
                "release build of `{head}`{}",
                if dirty {
                    " with uncommitted changes in crates/convoq-queue/src"
                } else {
                    ""
                }
            )
        }
        None => "release build".into(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn fmt_int(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn target_for(scenario: &str) -> &'static str {
    if scenario.starts_with("3.") {
        "≥ 50,000"
    } else if scenario.starts_with("4.") {
        "≥ 20,000"
    } else {
        "—"
    }
}

fn print_report(args: &Args, rows: &[Row], rss: Option<&RssReport>, load0: &str, secs: f64) {
    let server = match &args.postgres {
        Some(_) => "Postgres (server CPU not in the rows)".to_owned(),
        None => format!("SQLite {}", sqlite_version()),
    };
    println!();
    println!("### convoq-queue {} engine benchmark", args.engine_name());
    println!();
    println!("Build: {}.", build_line());
    println!(
        "Machine: {}; {server}; load average {load0} at start, {} at end; whole run {secs:.0} s.",
        machine_line(),
        loadavg()
    );
    println!(
        "Settings: time cap {} s per scenario, processed counter checked every {} ms, payload ~70 bytes of JSON, default job options.",
        args.cap.as_secs(),
        args.poll.as_millis()
    );
    println!();
    println!("| scenario | durability | jobs | s | jobs/s | target | ops/commit | CPU cores (tokio) | machine CPU | writer thread | ctx sw/job | notes |");
    let writer_thread = |r: &Row| match args.postgres {
        Some(_) => "—".to_owned(),
        None => format!("{:.0} %", r.cpu.writer_thread * 100.0),
    };
    println!("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2} | **{}** | {} | {:.1} | {:.2} ({:.2}) | {:.2} | {} | {:.1} | {} |",
            r.scenario,
            if args.postgres.is_some() {
                "—"
            } else {
                durability_name(r.durability)
            },
            fmt_int(r.done as f64),
            r.secs,
            fmt_int(r.per_sec()),
            target_for(&r.scenario),
            r.ops_per_commit,
            r.cpu.cores,
            r.cpu.tokio_cores,
            r.cpu.machine_cores,
            writer_thread(r),
            r.cpu.ctx_switches as f64 / r.done.max(1) as f64,
            r.note
        );
    }
    if let Some(m) = rss {
        println!(
            "| 5. RSS, worker process, {} waiting, concurrency {} holding | normal | — | — | **{:.1} MiB** VmRSS, {:.1} MiB VmHWM | < 64 MiB | — | — | — | — | — | after engine open {:.1} MiB; after one `counts()` {:.1} MiB (HWM {:.1}), after 4 concurrent `counts()` {:.1} MiB (HWM {:.1}); pool: {} in flight, {} active, {} waiting |",
            fmt_int(args.rss_jobs as f64),
            RSS_CONCURRENCY,
            mib(m.rss),
            mib(m.hwm),
            mib(m.open_rss),
            mib(m.counted_rss),
            mib(m.counted_hwm),
            mib(m.counted4_rss),
            mib(m.counted4_hwm),
            m.in_flight,
            m.active,
            m.waiting
        );
    }
    println!();
    println!("Columns: *ops/commit* = writer operations per group commit (engine `write_stats`); *CPU cores* = process CPU time ÷ wall time (2 = both cores), in brackets the tokio runtime threads' share (workers and blocking threads, where SQLite reads run); *machine CPU* = CPU of the whole machine, every process (a Postgres server's included), ÷ wall time; *writer thread* = busy share of the busiest `convoq-writer` thread (the SQLite writer's own thread, its statements included; SQLite only); *ctx sw/job* = voluntary + involuntary context switches of all threads per job.");
}

/// The version of the SQLite library the engine runs on (rusqlite's bundled one).
fn sqlite_version() -> String {
    rusqlite::version().to_owned()
}

fn main() {
    if let Ok(db) = std::env::var(CHILD_ENV) {
        rss_child(&db);
        return;
    }
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let load0 = loadavg();
    let t0 = Instant::now();
    rt.block_on(async {
        let mut rows = Vec::new();
        let mut durabilities = vec![Durability::Normal];
        if args.full {
            durabilities.push(Durability::Full);
        }
        eprintln!("machine: {}; load {load0}", machine_line());
        if args.wants("single") {
            rows.push(add_single(&args, Durability::Normal).await);
        }
        if args.wants("concurrent") {
            for &d in &durabilities {
                rows.push(add_concurrent(&args, d).await);
            }
        }
        if args.wants("bulk") {
            rows.push(add_bulk(&args, Durability::Normal).await);
        }
        if args.wants("claim") {
            for &d in &durabilities {
                for c in args.concurrencies() {
                    rows.push(claim_complete(&args, d, c).await);
                }
            }
        }
        let rss = if args.rss && args.wants("rss") {
            Some(rss(&args).await)
        } else {
            None
        };
        print_report(
            &args,
            &rows,
            rss.as_ref(),
            &load0,
            t0.elapsed().as_secs_f64(),
        );
    });
}
