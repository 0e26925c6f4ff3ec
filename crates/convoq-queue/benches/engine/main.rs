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

mod meter;
mod rss;
mod scenarios;

use meter::*;
use rss::*;
use scenarios::*;

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
